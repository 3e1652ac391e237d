//! Command-line value parsers.
use std::time::Duration;

use kprof_crds::GoDuration;

/// Parses a positive duration in the notation of the kprof API (`GoDuration`: `10s`, `500ms`,
/// `2m`, `1h30m`), so that the command line and the ProfilingTarget read durations alike.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = s
        .trim()
        .parse::<GoDuration>()
        .and_then(|d| d.to_std())
        .map_err(|e| format!("invalid duration: {e}"))?;
    if d.is_zero() {
        return Err(format!("duration must be positive, got {s:?}"));
    }
    Ok(d)
}

/// Parses a sampling frequency in 1..=1000 Hz.
pub fn parse_hz(s: &str) -> Result<u32, String> {
    let v: u32 = s
        .trim()
        .parse()
        .map_err(|_| format!("invalid frequency {s:?}"))?;
    if (1..=1000).contains(&v) {
        Ok(v)
    } else {
        Err(format!("frequency must be within 1..=1000 Hz, got {v}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert!(
            parse_duration("1.5").is_err(),
            "a unit is required, as in the API"
        );
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn frequencies() {
        assert_eq!(parse_hz("99").unwrap(), 99);
        assert!(parse_hz("0").is_err());
        assert!(parse_hz("1001").is_err());
        assert!(parse_hz("x").is_err());
    }
}
