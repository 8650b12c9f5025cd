//! Human durations for flags: `500ms`, `3s`, `1m30s` (humantime syntax).

use std::time::Duration;

/// Parses a human duration; used as a clap `value_parser`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration {s:?}: {e}; write e.g. 500ms, 3s or 1m"))
}

/// Parses a human duration that must be more than zero.
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("invalid duration {s:?}: must be more than 0"));
    }
    Ok(d)
}

/// Formats a duration the way flags are written.
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("3 parsecs").expect_err("bad").contains("500ms"));
        assert!(parse_positive_duration("0s").is_err());
        assert_eq!(format_duration(Duration::from_millis(1500)), "1s 500ms");
    }
}
