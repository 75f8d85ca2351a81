//! systemd's unit-file syntax (systemd.syntax(7)): `[Section]` headers, `Key=Value` lines,
//! `#`/`;` comments, and backslash continuation. Values are kept raw; each key's own grammar
//! (words, booleans, paths) is applied by the model, which knows what the key means.
//!
//! A small exact parser instead of an INI crate: the `ini` crate keeps only the last of a
//! repeated key, and `rust-ini` loses line numbers, which every error here must carry.

use crate::Error;
use std::path::Path;

pub const KNOWN_SECTIONS: &[&str] = &["Container", "GPU", "Unit", "Service", "Install"];

/// One `Key=Value` assignment, where it came from, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub section: String,
    pub key: String,
    pub value: String,
    /// 1-based line of the assignment's first physical line.
    pub line: usize,
}

/// Splits a file into its assignments, in order; the first error if there is any.
pub fn parse(path: &Path, text: &str) -> Result<Vec<Assignment>, Error> {
    let (assignments, mut errors) = parse_all(path, text);
    if errors.is_empty() {
        Ok(assignments)
    } else {
        Err(errors.remove(0))
    }
}

/// Splits a file into its assignments, in order, and every error found on the way (for
/// `gpuboxctl validate`): a line in error is left out, and so are the keys under a section
/// header in error, which would only be misread.
pub fn parse_all(path: &Path, text: &str) -> (Vec<Assignment>, Vec<Error>) {
    let mut errors = Vec::new();
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let syntax = |line: usize, message: String| Error::Syntax { path: path.to_owned(), line, message };

    // systemd ends a line at a carriage return or NUL too: one inside a value would start a
    // new line for systemd (`Description=x\r[Service]\rExecStartPre=…`) that this parser
    // never saw. No control character but tab has a meaning in a definition, so each is an
    // error (a Windows line end, CR LF, is a line end as `str::lines` reads it).
    for (i, line) in text.lines().enumerate() {
        if let Some(c) = line.chars().find(|&c| c.is_control() && c != '\t') {
            let name = match c {
                '\r' => " (carriage return)".to_owned(),
                '\0' => " (NUL)".to_owned(),
                _ => String::new(),
            };
            errors.push(syntax(
                i + 1,
                format!("control character U+{:04X}{name} in the line; definitions are text", c as u32),
            ));
        }
    }
    // Such a line may be several lines to systemd: nothing of the file can be trusted.
    if !errors.is_empty() {
        return (Vec::new(), errors);
    }

    let mut out = Vec::new();
    let mut section: Option<String> = None;
    // Under a header in error, keys are skipped (their error would only repeat it).
    let mut bad_section = false;
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));

    while let Some((first_line, raw)) = lines.next() {
        let mut logical = raw.trim().to_owned();
        if logical.is_empty() || logical.starts_with('#') || logical.starts_with(';') {
            continue;
        }
        // A trailing backslash joins the next line with a space; comment lines inside a
        // continuation are skipped, as systemd does.
        while ends_with_unescaped_backslash(&logical) {
            logical.pop();
            logical.push(' ');
            let next = lines.by_ref().map(|(_, l)| l.trim()).find(|l| !l.starts_with('#') && !l.starts_with(';'));
            match next {
                Some(next) => logical.push_str(next),
                None => break,
            }
        }
        let logical = logical.trim_end();

        if let Some(rest) = logical.strip_prefix('[') {
            let Some(name) = rest.strip_suffix(']') else {
                errors.push(syntax(first_line, format!("section header '{logical}' lacks a closing ']'")));
                bad_section = true;
                continue;
            };
            if name.is_empty() || name.contains(['[', ']']) {
                errors.push(syntax(first_line, format!("invalid section header '{logical}'")));
                bad_section = true;
                continue;
            }
            if !KNOWN_SECTIONS.contains(&name) {
                let hint = crate::suggest::did_you_mean(name, KNOWN_SECTIONS.iter().copied())
                    .map(|s| format!("did you mean [{s}]? "))
                    .unwrap_or_default();
                errors.push(syntax(
                    first_line,
                    format!(
                        "unknown section [{name}] ({hint}expected [Container], [GPU], [Unit], [Service] or [Install])"
                    ),
                ));
                bad_section = true;
                continue;
            }
            section = Some(name.to_owned());
            bad_section = false;
            continue;
        }
        if bad_section {
            continue;
        }

        let Some((key, value)) = logical.split_once('=') else {
            errors.push(syntax(first_line, format!("expected 'Key=Value' or '[Section]', found '{logical}'")));
            continue;
        };
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.') {
            errors.push(syntax(first_line, format!("invalid key name '{key}'")));
            continue;
        }
        let Some(section) = &section else {
            errors.push(syntax(first_line, format!("'{key}=' appears before any [Section] header")));
            continue;
        };
        out.push(Assignment {
            section: section.clone(),
            key: key.to_owned(),
            value: value.trim().to_owned(),
            line: first_line,
        });
    }
    (out, errors)
}

/// `a\\` ends in an escaped backslash, not a continuation.
fn ends_with_unescaped_backslash(line: &str) -> bool {
    line.bytes().rev().take_while(|&b| b == b'\\').count() % 2 == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Vec<Assignment>, Error> {
        parse(Path::new("t.gpubox"), text)
    }

    #[test]
    fn control_characters_are_refused_with_their_line() {
        // The audit's attack: a second line for systemd that gpubox would not have checked.
        let e = p("[Unit]\nDescription=x\r[Service]\rExecStartPre=/bin/sh -c id\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "t.gpubox:2: control character U+000D (carriage return) in the line; definitions are text"
        );
        assert!(p("[Unit]\nDescription=a\0b\n")
            .unwrap_err()
            .to_string()
            .contains("t.gpubox:2: control character U+0000 (NUL)"));
        assert!(p("[Unit]\nDescription=a\x1bb\n").is_err());
        // Tabs and Windows line ends are text.
        assert_eq!(p("[Unit]\r\nDescription=a\tb\r\n").unwrap()[0].value, "a\tb");
    }

    #[test]
    fn sections_keys_and_comments() {
        let a = p("# c\n; c\n[Unit]\nK = v w \n\n[Service]\nK=\n").unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!((a[0].section.as_str(), a[0].key.as_str(), a[0].value.as_str(), a[0].line), ("Unit", "K", "v w", 4));
        assert_eq!((a[1].section.as_str(), a[1].value.as_str(), a[1].line), ("Service", "", 7));
    }

    #[test]
    fn continuation_joins_with_space_and_skips_comments() {
        let a = p("[Unit]\nExec=/bin/echo \\\n  one \\\n# skipped\n  two\nNext=1\n").unwrap();
        // As systemd: the backslash becomes a space, the line's own spaces stay.
        assert_eq!(a[0].value, "/bin/echo  one  two");
        assert_eq!(a[0].line, 2);
        assert_eq!(a[1].line, 6);
    }

    #[test]
    fn escaped_backslash_is_not_a_continuation() {
        let a = p("[Unit]\nExec=/bin/echo a\\\\\nNext=1\n").unwrap();
        assert_eq!((a[0].value.as_str(), a[1].key.as_str()), ("/bin/echo a\\\\", "Next"));
    }

    #[test]
    fn continuation_at_end_of_file() {
        let a = p("[Unit]\nK=v \\").unwrap();
        assert_eq!(a[0].value, "v");
    }

    #[test]
    fn errors_name_file_and_line() {
        let e = p("[Unit]\nK=1\nnot an assignment\n").unwrap_err().to_string();
        assert_eq!(e, "t.gpubox:3: expected 'Key=Value' or '[Section]', found 'not an assignment'");
        let e = p("K=1\n").unwrap_err().to_string();
        assert_eq!(e, "t.gpubox:1: 'K=' appears before any [Section] header");
        let e = p("[Unit\n").unwrap_err().to_string();
        assert!(e.starts_with("t.gpubox:1: section header"), "{e}");
        let e = p("[Unit]\nK K=1\n").unwrap_err().to_string();
        assert_eq!(e, "t.gpubox:2: invalid key name 'K K'");
        let e = p("[Unit]\n[Foo]\n").unwrap_err().to_string();
        assert_eq!(
            e,
            "t.gpubox:2: unknown section [Foo] (expected [Container], [GPU], [Unit], [Service] or [Install])"
        );
    }

    #[test]
    fn value_may_contain_equals_and_quotes() {
        let a = p("[Unit]\nEnvironment=\"A=b c\" D=e\n").unwrap();
        assert_eq!(a[0].value, "\"A=b c\" D=e");
    }
}
