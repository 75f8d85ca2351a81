//! CDI's names, one grammar for the definition's `cdi:` selectors and the specs the devices
//! crate reads, as the CDI reference library's `pkg/parser` has it: a fully qualified device
//! name is `VENDOR/CLASS=NAME`; vendor and class start with a letter, end with a letter or
//! digit, and hold letters, digits, `_`, `-` and `.`; a device name starts and ends with a
//! letter or digit and may also hold `:`.

/// Splits `VENDOR/CLASS=NAME` into its kind (`VENDOR/CLASS`) and name, each checked.
pub fn parse_qualified(qualified: &str) -> Result<(String, String), String> {
    let (kind, name) = qualified.split_once('=').ok_or("a CDI device is VENDOR/CLASS=NAME")?;
    validate_kind(kind)?;
    validate_device_name(name)?;
    Ok((kind.to_owned(), name.to_owned()))
}

/// Checks `vendor/class` syntax.
pub fn validate_kind(kind: &str) -> Result<(), String> {
    let Some((vendor, class)) = kind.split_once('/') else {
        return Err("a kind is vendor/class, e.g. nvidia.com/gpu".into());
    };
    validate_segment(vendor).map_err(|e| format!("vendor {vendor:?} {e}"))?;
    validate_segment(class).map_err(|e| format!("class {class:?} {e}"))
}

fn validate_segment(s: &str) -> Result<(), String> {
    let b = s.as_bytes();
    if b.is_empty() {
        return Err("is empty".into());
    }
    if !b[0].is_ascii_alphabetic() {
        return Err("must start with a letter".into());
    }
    if !b[b.len() - 1].is_ascii_alphanumeric() {
        return Err("must end with a letter or digit".into());
    }
    match s.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))) {
        Some(c) => Err(format!("holds {c:?}; only letters, digits, '_', '-' and '.' are allowed")),
        None => Ok(()),
    }
}

/// Checks a CDI device name.
pub fn validate_device_name(name: &str) -> Result<(), String> {
    let b = name.as_bytes();
    if b.is_empty() {
        return Err("the device name is empty".into());
    }
    if !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return Err("a device name must start and end with a letter or digit".into());
    }
    match name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))) {
        Some(c) => Err(format!("a device name holds only letters, digits, '_', '-', '.' and ':', not {c:?}")),
        None => Ok(()),
    }
}
