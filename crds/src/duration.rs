//! Durations as users write them in YAML (`30s`, `5m`, `1h30m`).

use std::{borrow::Cow, fmt, str::FromStr, time::Duration};

use serde::{Deserialize, Serialize};

/// A duration in Go's notation (`300ms`, `30s`, `5m`, `1h30m`), kept exactly as written so that
/// what a user applied is what they read back. CEL rules compare these with `duration(...)`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(transparent)]
pub struct GoDuration(String);

/// A string that is not a duration.
#[derive(Debug, thiserror::Error)]
#[error("{value:?} is not a duration such as 30s, 5m or 1h: {reason}")]
pub struct DurationError {
    value: String,
    reason: String,
}

impl GoDuration {
    pub(crate) fn from_static(s: &'static str) -> Self {
        Self(s.to_owned())
    }

    /// The duration as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The duration as a [`Duration`]; negative durations are refused.
    pub fn to_std(&self) -> Result<Duration, DurationError> {
        let err = |reason: String| DurationError {
            value: self.0.clone(),
            reason,
        };
        let parsed = kube::core::Duration::from_str(&self.0).map_err(|e| err(e.to_string()))?;
        if parsed.is_negative() {
            return Err(err("negative".into()));
        }
        Ok(parsed.into())
    }
}

/// A Go duration on a command line (`90s`, `5m`, `1h30m`; `0` is none), as clap's
/// `value_parser`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("\"\" is not a duration such as 30s, 5m or 1h".into());
    }
    GoDuration::from_str(s)
        .and_then(|d| d.to_std())
        .map_err(|e| e.to_string())
}

impl FromStr for GoDuration {
    type Err = DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let d = Self(s.to_owned());
        d.to_std()?;
        Ok(d)
    }
}

impl From<Duration> for GoDuration {
    fn from(d: Duration) -> Self {
        Self(kube::core::Duration::from(d).to_string())
    }
}

impl fmt::Display for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl schemars::JsonSchema for GoDuration {
    fn schema_name() -> Cow<'static, str> {
        "GoDuration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        // The pattern refuses what `duration()` in CEL could not parse, with a message that
        // names the field, before any CEL rule runs.
        schemars::json_schema!({
            "type": "string",
            "pattern": "^([0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$",
            "maxLength": 32,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::parse_duration;

    #[test]
    fn command_line_durations_are_go_durations_or_zero() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("300ms"), Ok(Duration::from_millis(300)));
        for bad in ["-1s", "ten", "5", ""] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("is not a duration"), "{bad:?}: {e}");
        }
    }
}
