//! systemd's time spans (systemd.time(7)): `90`, `90s`, `5min 30s`, `1h`, `infinity`.

use std::time::Duration;

/// A time span; `None` for `infinity`.
pub fn parse(text: &str) -> Result<Option<Duration>, String> {
    let text = text.trim();
    if text == "infinity" {
        return Ok(None);
    }
    let bad = || format!("expected a time span such as 30s, 5min or infinity, found '{text}'");
    let mut total = 0f64;
    let mut rest = text;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        rest = rest.trim_start();
        let number_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let number: f64 = rest[..number_end].parse().map_err(|_| bad())?;
        rest = rest[number_end..].trim_start();
        let unit_end = rest.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(rest.len());
        let seconds = match &rest[..unit_end] {
            "" | "s" | "sec" | "second" | "seconds" => 1.0,
            "ms" | "msec" => 1e-3,
            "us" | "usec" | "µs" => 1e-6,
            "m" | "min" | "minute" | "minutes" => 60.0,
            "h" | "hr" | "hour" | "hours" => 3600.0,
            "d" | "day" | "days" => 86400.0,
            "w" | "week" | "weeks" => 604800.0,
            _ => return Err(bad()),
        };
        total += number * seconds;
        rest = &rest[unit_end..];
    }
    Ok(Some(Duration::from_secs_f64(total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_as_systemd_writes_them() {
        assert_eq!(parse("90").unwrap(), Some(Duration::from_secs(90)));
        assert_eq!(parse("5min 30s").unwrap(), Some(Duration::from_secs(330)));
        assert_eq!(parse("1h30min").unwrap(), Some(Duration::from_secs(5400)));
        assert_eq!(parse("250ms").unwrap(), Some(Duration::from_millis(250)));
        assert_eq!(parse("infinity").unwrap(), None);
        assert!(parse("soon").is_err());
        assert!(parse("5 parsecs").is_err());
        assert!(parse("").is_err());
    }
}
