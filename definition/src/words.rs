//! systemd's word splitting and specifiers, as `ExecStart=`, `Environment=` and list-valued keys
//! use them: whitespace separates words, `"…"` and `'…'` group them (also mid-word), C escapes
//! (`\n`, `\t`, `\\`, `\"`, `\xHH`, `\ooo`, `\s`, …) are decoded, and `%i`-style specifiers are
//! expanded per word afterwards.

/// Splits `value` into unquoted, unescaped words. The error says what is wrong, for the caller
/// to wrap with file, line and key.
pub fn split(value: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut chars = value.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(words);
        }
        let mut word = String::new();
        let mut quote: Option<char> = None;
        loop {
            let Some(c) = chars.next() else {
                if let Some(q) = quote {
                    return Err(format!("unterminated {q} quote"));
                }
                break;
            };
            match (quote, c) {
                (None, c) if c.is_whitespace() => break,
                (None, '"' | '\'') => quote = Some(c),
                (Some(q), c) if c == q => quote = None,
                (_, '\\') => word.push(unescape(&mut chars)?),
                (_, c) => word.push(c),
            }
        }
        words.push(word);
    }
}

fn unescape(chars: &mut std::iter::Peekable<std::str::Chars>) -> Result<char, String> {
    let c = chars.next().ok_or("trailing backslash")?;
    let mut number = |first: Option<char>, radix: u32, len: usize| -> Result<u32, String> {
        let digits: String =
            first.into_iter().chain((first.is_some() as usize..len).filter_map(|_| chars.next())).collect();
        u32::from_str_radix(&digits, radix)
            .ok()
            .filter(|&n| digits.len() == len && n != 0)
            .ok_or_else(|| format!("invalid escape sequence with '{digits}'"))
    };
    // Values are UTF-8 text here: a byte escape above 0x7f would not be a character.
    let byte = |n: u32| {
        char::from_u32(n).filter(char::is_ascii).ok_or_else(|| {
            format!("byte escape {n:#x} is not ASCII; write the character itself, or \\u/\\U for a code point")
        })
    };
    Ok(match c {
        'a' => '\x07',
        'b' => '\x08',
        'f' => '\x0c',
        'n' => '\n',
        'r' => '\r',
        't' => '\t',
        'v' => '\x0b',
        's' => ' ',
        '\\' | '"' | '\'' => c,
        'x' => byte(number(None, 16, 2)?)?,
        'u' => char::from_u32(number(None, 16, 4)?).ok_or("invalid \\u escape")?,
        'U' => char::from_u32(number(None, 16, 8)?).ok_or("invalid \\U escape")?,
        '0'..='7' => byte(number(Some(c), 8, 3)?)?,
        other => return Err(format!("invalid escape sequence '\\{other}'")),
    })
}

/// What specifiers expand to for one definition, named like the unit that runs it.
#[derive(Debug, Clone)]
pub struct Specifiers<'a> {
    /// The definition's name, which is the unit's instance.
    pub instance: &'a str,
}

impl Specifiers<'_> {
    pub const SUPPORTED: &'static str = "%i %I %n %N %p %P %%";

    /// Expands `%i`/`%I` (instance), `%n` (`gpu@NAME.service`), `%N` (`gpu@NAME`),
    /// `%p`/`%P` (`gpu`) and `%%`.
    pub fn expand(&self, word: &str) -> Result<String, String> {
        if !word.contains('%') {
            return Ok(word.to_owned());
        }
        let mut out = String::with_capacity(word.len() + 16);
        let mut chars = word.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('i' | 'I') => out.push_str(self.instance),
                Some('n') => out.push_str(&format!("gpu@{}.service", self.instance)),
                Some('N') => out.push_str(&format!("gpu@{}", self.instance)),
                Some('p' | 'P') => out.push_str("gpu"),
                Some('%') => out.push('%'),
                Some(other) => return Err(format!("unknown specifier '%{other}' (supported: {})", Self::SUPPORTED)),
                None => return Err("'%' at the end of a value; write '%%' for a literal '%'".into()),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Vec<String> {
        split(v).unwrap()
    }

    #[test]
    fn plain_words() {
        assert_eq!(s("  /bin/echo  a\tb "), ["/bin/echo", "a", "b"]);
        assert!(s("   ").is_empty());
    }

    #[test]
    fn quotes_group_and_may_appear_mid_word() {
        assert_eq!(s(r#"sh -c "echo 'hi there'""#), ["sh", "-c", "echo 'hi there'"]);
        assert_eq!(s(r#"'a b' c"d e"f """#), ["a b", "cd ef", ""]);
    }

    #[test]
    fn c_escapes() {
        assert_eq!(s(r#"a\sb "x\"y" \x41\101\u00e9 tab\tend"#), ["a b", "x\"y", "AAé", "tab\tend"]);
    }

    #[test]
    fn errors() {
        assert_eq!(split(r#"echo "open"#).unwrap_err(), "unterminated \" quote");
        assert_eq!(split(r"a\q").unwrap_err(), "invalid escape sequence '\\q'");
        assert_eq!(split(r"a\").unwrap_err(), "trailing backslash");
        assert!(split(r"\xZZ").is_err());
        assert_eq!(split(r"\100\040").unwrap(), ["@ "]);
        assert!(split(r"\200").unwrap_err().contains("not ASCII"), "systemd would give a raw byte");
        assert!(split(r"\000").is_err());
    }

    #[test]
    fn specifiers() {
        let sp = Specifiers { instance: "job" };
        assert_eq!(sp.expand("/srv/%i/%n:%N:%p:100%%").unwrap(), "/srv/job/gpu@job.service:gpu@job:gpu:100%");
        assert_eq!(sp.expand("%h").unwrap_err(), "unknown specifier '%h' (supported: %i %I %n %N %p %P %%)");
        assert!(sp.expand("50%").is_err());
    }
}
