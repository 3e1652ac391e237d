//! The operator's errors, with a bounded [`Error::category`] used as metric label and Event reason.

use std::time::Duration;

/// Everything a reconcile can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The target's spec is wrong in a way the CRD schema cannot check; waits for a change.
    #[error("invalid ProfilingTarget: {0}")]
    InvalidSpec(String),
    /// The stored object does not deserialize (e.g. written by a newer or older API version).
    #[error("ProfilingTarget cannot be read: {0}")]
    InvalidObject(String),
    /// A request to the API server failed; retried with backoff.
    #[error("Kubernetes API request failed while {action}: {source}")]
    Kube {
        action: &'static str,
        #[source]
        source: kube::Error,
    },
    /// Serializing an object failed (a bug).
    #[error("serializing {what}: {source}")]
    Serialize {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// The operator configuration file is wrong.
    #[error("operator configuration: {0}")]
    Config(String),
    /// Another replica holds the leader lease now: this one must stop.
    #[error("lost the leader lease")]
    LeadershipLost,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A short, bounded, stable name of the kind of error: metric label and Event reason.
    pub fn category(&self) -> &'static str {
        match self {
            Self::InvalidSpec(_) => "InvalidSpec",
            Self::InvalidObject(_) => "InvalidObject",
            Self::Kube { source, .. } => match source {
                kube::Error::Api(s) if s.code == 409 => "Conflict",
                kube::Error::Api(s) if s.code == 403 => "Forbidden",
                kube::Error::Api(s) if s.code == 404 => "NotFound",
                kube::Error::Api(s) if s.code == 422 => "Rejected",
                kube::Error::Api(_) => "ApiError",
                _ => "ApiUnavailable",
            },
            Self::Serialize { .. } => "Serialization",
            Self::Config(_) => "Config",
            Self::LeadershipLost => "LeadershipLost",
        }
    }

    /// Whether retrying without a change to the object can help.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Self::InvalidSpec(_) | Self::InvalidObject(_) | Self::Config(_)
        )
    }

    /// Wrap a kube error with what the operator was doing.
    pub fn kube(action: &'static str) -> impl FnOnce(kube::Error) -> Self {
        move |source| Self::Kube { action, source }
    }
}

/// Exponential backoff for transient errors: 1s, 2s, 4s … capped at 5 minutes.
pub fn backoff(consecutive_failures: u32) -> Duration {
    let exp = consecutive_failures.saturating_sub(1).min(9);
    Duration::from_secs(1u64 << exp).min(Duration::from_secs(300))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_are_bounded_and_stable() {
        assert_eq!(Error::InvalidSpec("x".into()).category(), "InvalidSpec");
        let conflict = kube::Error::Api(
            kube::core::Status::failure("conflict", "Conflict")
                .with_code(409)
                .boxed(),
        );
        let e = Error::kube("patching status")(conflict);
        assert_eq!(e.category(), "Conflict");
        assert!(!e.is_permanent());
        assert!(Error::InvalidSpec("x".into()).is_permanent());
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(50), Duration::from_secs(300));
    }
}
