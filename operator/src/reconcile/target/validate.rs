//! Step 2, validate (pure): what the CRD schema cannot check. A selector that matches nothing is
//! not an error (the target is Pending), only a spec that can never work is.

use std::time::Duration;

use kprof_crds::{ProfileType, ProfilingTarget};

use kprof_crds::selection::PodSelection;

use crate::{Error, Result, selector};

/// A target whose spec has been checked, with the parsed values the later steps use.
#[derive(Clone, Debug)]
pub struct ValidTarget {
    /// Which pods it selects (the rule shared with the agent).
    pub selection: PodSelection,
    pub profile_types: Vec<ProfileType>,
    pub window: Duration,
    pub duration: Option<Duration>,
    pub suspend: bool,
    pub max_profiles: u32,
    pub max_age: Duration,
}

/// Check `target.spec`; the error message tells the user what to change.
pub fn validate(target: &ProfilingTarget) -> Result<ValidTarget> {
    let spec = &target.spec;
    selector::check(&spec.selector)
        .map_err(|e| Error::InvalidSpec(format!("spec.selector: {e}")))?;
    let mut seen = std::collections::BTreeSet::new();
    for c in &spec.containers {
        if !is_dns_label(c) {
            return Err(Error::InvalidSpec(format!(
                "spec.containers: {c:?} is not a container name (lowercase alphanumerics and '-', at most 63)"
            )));
        }
        if !seen.insert(c) {
            return Err(Error::InvalidSpec(format!(
                "spec.containers: {c:?} is listed twice"
            )));
        }
    }
    let dur = |field: &str, d: &kprof_crds::GoDuration| {
        d.to_std()
            .map_err(|e| Error::InvalidSpec(format!("{field}: {e}")))
    };
    let window = dur("spec.window", &spec.window)?;
    let duration = spec
        .duration
        .as_ref()
        .map(|d| dur("spec.duration", d))
        .transpose()?;
    let max_age = dur("spec.retention.maxAge", &spec.retention.max_age)?;
    if window < Duration::from_secs(1) {
        return Err(Error::InvalidSpec("spec.window must be at least 1s".into()));
    }
    if spec.profile_types.is_empty() {
        return Err(Error::InvalidSpec(
            "spec.profileTypes must list at least one type".into(),
        ));
    }
    if spec.retention.max_profiles == 0 {
        return Err(Error::InvalidSpec(
            "spec.retention.maxProfiles must be at least 1".into(),
        ));
    }
    Ok(ValidTarget {
        selection: PodSelection::of(target),
        profile_types: spec.profile_types.clone(),
        window,
        duration,
        suspend: spec.suspend,
        max_profiles: spec.retention.max_profiles,
        max_age,
    })
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::target::fixtures::target;

    #[test]
    fn a_good_target_is_valid() {
        let v = validate(&target(
            "checkout",
            "shop",
            "selector: {matchLabels: {app: checkout}}\nwindow: 10s\nduration: 1m",
        ))
        .unwrap();
        assert_eq!(v.window, Duration::from_secs(10));
        assert_eq!(v.duration, Some(Duration::from_secs(60)));
        assert_eq!(v.max_profiles, 20);
        assert_eq!(v.max_age, Duration::from_secs(24 * 3600));
    }

    #[test]
    fn what_the_schema_misses_is_refused() {
        let cases = [
            (
                "selector: {matchExpressions: [{key: app, operator: In}]}",
                "spec.selector",
            ),
            (
                "selector: {matchLabels: {app: x}}\ncontainers: [App]",
                "spec.containers",
            ),
            (
                "selector: {matchLabels: {app: x}}\ncontainers: [app, app]",
                "listed twice",
            ),
        ];
        for (yaml, want) in cases {
            let err = validate(&target("t", "ns", yaml)).unwrap_err();
            assert!(matches!(err, Error::InvalidSpec(_)), "{yaml}");
            assert!(err.to_string().contains(want), "{yaml}: {err}");
        }
    }
}
