//! Step 3, build (pure): from the observed world and the validated spec, the desired status of
//! the target and the Profiles retention must delete. No client, no clock: `now` is an input.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    api::{apps::v1::DaemonSet, core::v1::Pod},
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::{SignedDuration, Timestamp},
};
use kprof_crds::{Phase, Profile, ProfilingTarget, ProfilingTargetStatus};
use kube::ResourceExt;

use super::validate::ValidTarget;
use crate::reconcile::daemonset::build::daemonset_nodes;

/// Condition types the operator sets on every target.
pub mod conditions {
    /// The target is profiling: pods are selected and agents are scheduled on their nodes.
    pub const READY: &str = "Ready";
    /// The agent DaemonSet covers every node that runs a selected pod.
    pub const SCHEDULED: &str = "Scheduled";
    /// Something is wrong that the user may need to act on (invalid spec, agents unavailable).
    pub const DEGRADED: &str = "Degraded";
}

/// How many Profile names `status.recentProfiles` lists.
pub const RECENT_PROFILES: usize = 5;

/// A pod the target selects, scheduled to a node.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SelectedPod {
    pub name: String,
    pub node: String,
}

/// The node a pod is bound to, when it is scheduled.
pub fn scheduled_node(pod: &Pod) -> Option<&str> {
    pod.spec
        .as_ref()?
        .node_name
        .as_deref()
        .filter(|n| !n.is_empty())
}

/// The scheduled pods `valid` selects (sorted by name); which pods a target selects is
/// `kprof_crds::selection`'s rule, shared with the agent.
pub fn select_pods(valid: &ValidTarget, pods: &[Arc<Pod>]) -> Vec<SelectedPod> {
    let mut out: Vec<SelectedPod> = pods
        .iter()
        .filter(|p| valid.selection.selects(p))
        .filter_map(|p| {
            Some(SelectedPod {
                name: p.name_any(),
                node: scheduled_node(p)?.to_string(),
            })
        })
        .collect();
    out.sort();
    out
}

/// The phase of a target and its start time (set the first time it runs, then kept).
pub fn phase(
    valid: Option<&ValidTarget>,
    matched_pods: usize,
    start_time: Option<Timestamp>,
    now: Timestamp,
) -> (Phase, Option<Timestamp>) {
    let Some(valid) = valid else {
        return (Phase::Failed, start_time);
    };
    if let (Some(d), Some(start)) = (valid.duration, start_time)
        && ends_at(start, d) <= now
    {
        return (Phase::Completed, start_time);
    }
    if valid.suspend {
        (Phase::Suspended, start_time)
    } else if matched_pods == 0 {
        (Phase::Pending, start_time)
    } else {
        (Phase::Running, Some(start_time.unwrap_or(now)))
    }
}

fn ends_at(start: Timestamp, d: Duration) -> Timestamp {
    start
        .saturating_add(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX)
}

/// Whether a target counts for the agent DaemonSet: valid, not suspended, not completed.
pub fn is_active(target: &ProfilingTarget, valid: Option<&ValidTarget>, now: Timestamp) -> bool {
    let start = target
        .status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .map(|t| t.0);
    // Matched pods do not matter here: a target without pods adds no node anyway.
    matches!(phase(valid, 1, start, now).0, Phase::Running)
}

/// Why a Profile is deleted by retention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetentionReason {
    /// Beyond `maxProfiles` for its pod, container and type.
    TooMany,
    /// Older than `maxAge`.
    TooOld,
}

/// A Profile retention deletes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expired {
    pub name: String,
    pub uid: Option<String>,
    pub reason: RetentionReason,
}

/// The Profiles to delete: beyond `max_profiles` per (pod, container, type), oldest first by
/// window end, and every Profile whose window ended more than `max_age` ago. Also returns when
/// the next kept Profile will become too old.
pub fn retention(
    profiles: &[Arc<Profile>],
    max_profiles: u32,
    max_age: Duration,
    now: Timestamp,
) -> (Vec<Expired>, Option<Duration>) {
    let max_age = SignedDuration::try_from(max_age).unwrap_or(SignedDuration::MAX);
    let cutoff = now.saturating_sub(max_age).unwrap_or(Timestamp::MIN);
    let mut groups: BTreeMap<(&str, &str, &str), Vec<&Profile>> = BTreeMap::new();
    for p in profiles
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        groups
            .entry((&p.spec.pod, &p.spec.container, p.spec.profile_type.as_str()))
            .or_default()
            .push(p);
    }
    let mut expired = Vec::new();
    let mut next: Option<Duration> = None;
    for group in groups.values_mut() {
        // Newest first; equal window ends by name, so the choice is deterministic.
        group.sort_by(|a, b| {
            b.spec
                .window_end
                .0
                .cmp(&a.spec.window_end.0)
                .then_with(|| b.name_any().cmp(&a.name_any()))
        });
        for (i, p) in group.iter().enumerate() {
            let reason = if i >= max_profiles as usize {
                Some(RetentionReason::TooMany)
            } else if p.spec.window_end.0 < cutoff {
                Some(RetentionReason::TooOld)
            } else {
                let left = p.spec.window_end.0.duration_since(cutoff);
                let left = Duration::try_from(left).unwrap_or_default();
                next = Some(next.map_or(left, |n| n.min(left)));
                None
            };
            if let Some(reason) = reason {
                expired.push(Expired {
                    name: p.name_any(),
                    uid: p.metadata.uid.clone(),
                    reason,
                });
            }
        }
    }
    expired.sort_by(|a, b| a.name.cmp(&b.name));
    (expired, next)
}

/// Everything `build` needs.
pub struct Inputs<'a> {
    pub target: &'a ProfilingTarget,
    /// The validated spec, or the reason it is invalid.
    pub valid: Result<&'a ValidTarget, String>,
    pub selected: &'a [SelectedPod],
    /// The target's Profiles, minus those retention deletes.
    pub profiles: Vec<&'a Profile>,
    pub agent: Option<&'a DaemonSet>,
    /// `namespace/name` of the agent DaemonSet, for messages.
    pub agent_name: String,
    pub now: Timestamp,
}

/// The desired status of a target.
pub fn status(inp: &Inputs<'_>) -> ProfilingTargetStatus {
    let old = inp.target.status.clone().unwrap_or_default();
    let nodes: BTreeSet<&str> = inp.selected.iter().map(|p| p.node.as_str()).collect();
    let (phase, start) = phase(
        inp.valid.as_ref().ok().copied(),
        inp.selected.len(),
        old.start_time.as_ref().map(|t| t.0),
        inp.now,
    );
    let generation = inp.target.metadata.generation;
    let wanted = conditions_for(inp, phase, &nodes);
    let conditions = wanted
        .into_iter()
        .map(|(type_, ok, reason, message)| {
            let status = if ok { "True" } else { "False" }.to_string();
            let last = old
                .conditions
                .iter()
                .find(|c| c.type_ == type_ && c.status == status)
                .map_or(Time(inp.now), |c| c.last_transition_time.clone());
            Condition {
                type_: type_.into(),
                status,
                reason: reason.into(),
                message,
                observed_generation: generation,
                last_transition_time: last,
            }
        })
        .collect();

    let mut newest: Vec<&Profile> = inp.profiles.clone();
    newest.sort_by(|a, b| {
        b.spec
            .window_end
            .0
            .cmp(&a.spec.window_end.0)
            .then_with(|| b.name_any().cmp(&a.name_any()))
    });
    ProfilingTargetStatus {
        phase: Some(phase),
        observed_generation: generation,
        conditions,
        matched_pods: u32::try_from(inp.selected.len()).unwrap_or(u32::MAX),
        nodes: nodes.iter().map(|n| n.to_string()).collect(),
        start_time: start.map(Time),
        profiles_written: inp.profiles.len() as u64,
        last_profile_time: newest.first().map(|p| p.spec.window_end.clone()),
        recent_profiles: newest
            .iter()
            .take(RECENT_PROFILES)
            .map(|p| p.name_any())
            .collect(),
    }
}

type Wanted = (&'static str, bool, &'static str, String);

fn conditions_for(inp: &Inputs<'_>, phase: Phase, nodes: &BTreeSet<&str>) -> Vec<Wanted> {
    use conditions::{DEGRADED, READY, SCHEDULED};
    let ns = inp.target.namespace().unwrap_or_default();
    let covered = inp.agent.map(daemonset_nodes).unwrap_or_default();
    let missing: Vec<&str> = nodes
        .iter()
        .copied()
        .filter(|n| !covered.contains(*n))
        .collect();
    let list = |v: &[&str]| {
        let mut s = v.iter().take(5).copied().collect::<Vec<_>>().join(", ");
        if v.len() > 5 {
            s.push_str(&format!(" and {} more", v.len() - 5));
        }
        s
    };
    let nodes_v: Vec<&str> = nodes.iter().copied().collect();
    let (scheduled, ready): (Wanted, Wanted) = match phase {
        Phase::Failed => {
            let why = inp.valid.as_ref().err().cloned().unwrap_or_default();
            let msg = format!("the spec is invalid: {why}");
            (
                (SCHEDULED, false, "InvalidSpec", msg.clone()),
                (READY, false, "InvalidSpec", msg),
            )
        }
        Phase::Completed => {
            let msg = "spec.duration has passed since the target started: profiling is complete"
                .to_string();
            (
                (SCHEDULED, false, "Completed", msg.clone()),
                (READY, false, "Completed", msg),
            )
        }
        Phase::Suspended => {
            let msg = "spec.suspend is true: no agent samples these pods".to_string();
            (
                (SCHEDULED, false, "Suspended", msg.clone()),
                (READY, false, "Suspended", msg),
            )
        }
        Phase::Pending => {
            let msg = format!(
                "no running or scheduled pod in namespace {ns} matches the selector{}",
                if inp.target.spec.containers.is_empty() {
                    String::new()
                } else {
                    " and has one of spec.containers".into()
                }
            );
            (
                (SCHEDULED, false, "NoMatchingPods", msg.clone()),
                (READY, false, "NoMatchingPods", msg),
            )
        }
        Phase::Running if !missing.is_empty() => {
            let msg = format!(
                "waiting for the agent DaemonSet {} to cover node(s) {}",
                inp.agent_name,
                list(&missing)
            );
            (
                (SCHEDULED, false, "WaitingForAgents", msg.clone()),
                (READY, false, "WaitingForAgents", msg),
            )
        }
        Phase::Running => (
            (
                SCHEDULED,
                true,
                "AgentsScheduled",
                format!(
                    "the agent DaemonSet {} covers node(s) {}",
                    inp.agent_name,
                    list(&nodes_v)
                ),
            ),
            (
                READY,
                true,
                "Profiling",
                format!(
                    "profiling {} pod(s) on {} node(s)",
                    inp.selected.len(),
                    nodes.len()
                ),
            ),
        ),
    };
    let unavailable = inp
        .agent
        .and_then(|d| d.status.as_ref())
        .map_or(0, |s| s.number_unavailable.unwrap_or(0));
    let degraded: Wanted = match (&inp.valid, phase) {
        (Err(why), _) => (
            DEGRADED,
            true,
            "InvalidSpec",
            format!("the spec is invalid: {why}"),
        ),
        (Ok(_), Phase::Running) if unavailable > 0 => (
            DEGRADED,
            true,
            "AgentsUnavailable",
            format!(
                "{unavailable} agent pod(s) of {} are not available: some nodes may not be profiled",
                inp.agent_name
            ),
        ),
        _ => (
            DEGRADED,
            false,
            "AsExpected",
            "nothing needs attention".into(),
        ),
    };
    vec![ready, scheduled, degraded]
}

/// When to reconcile again without a change: when the duration ends, when the next Profile
/// expires, and at least every `resync`.
pub fn requeue_after(
    valid: Option<&ValidTarget>,
    status: &ProfilingTargetStatus,
    next_expiry: Option<Duration>,
    resync: Duration,
    now: Timestamp,
) -> Duration {
    let mut after = resync;
    if let (Some(v), Some(start), Some(Phase::Running | Phase::Suspended)) =
        (valid, status.start_time.as_ref(), status.phase)
        && let Some(d) = v.duration
    {
        let left = ends_at(start.0, d).duration_since(now);
        after = after.min(Duration::try_from(left).unwrap_or_default());
    }
    if let Some(e) = next_expiry {
        after = after.min(e);
    }
    after.max(Duration::from_millis(500))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::target::{
        fixtures::{agent_ds, pod, profile, target, ts},
        validate::validate,
    };

    #[test]
    fn selects_only_scheduled_matching_pods_of_its_own_namespace() {
        let t = target(
            "checkout",
            "shop",
            "selector: {matchLabels: {app: checkout}}",
        );
        let v = validate(&t).unwrap();
        let pods = vec![
            pod(
                "shop",
                "a",
                &[("app", "checkout")],
                Some("node-1"),
                "Running",
            ),
            pod(
                "shop",
                "b",
                &[("app", "checkout")],
                Some("node-2"),
                "Pending",
            ),
            pod(
                "shop",
                "unscheduled",
                &[("app", "checkout")],
                None,
                "Pending",
            ),
            pod(
                "shop",
                "done",
                &[("app", "checkout")],
                Some("node-1"),
                "Succeeded",
            ),
            pod(
                "shop",
                "other",
                &[("app", "cart")],
                Some("node-3"),
                "Running",
            ),
            pod(
                "elsewhere",
                "same-label",
                &[("app", "checkout")],
                Some("node-9"),
                "Running",
            ),
        ];
        let sel = select_pods(&v, &pods);
        assert_eq!(
            sel,
            vec![
                SelectedPod {
                    name: "a".into(),
                    node: "node-1".into()
                },
                SelectedPod {
                    name: "b".into(),
                    node: "node-2".into()
                },
            ]
        );
    }

    #[test]
    fn terminating_pods_are_not_selected() {
        // The rule shared with the agent (kprof_crds::selection): a pod being deleted is
        // neither profiled nor counted.
        let t = target("t", "shop", "selector: {matchLabels: {app: checkout}}");
        let v = validate(&t).unwrap();
        let running = pod("shop", "a", &[("app", "checkout")], Some("n"), "Running");
        let mut leaving = (*running).clone();
        leaving.metadata.deletion_timestamp = Some(Time(ts("2026-01-01T00:00:00Z")));
        assert_eq!(select_pods(&v, &[running]).len(), 1);
        assert!(kprof_crds::selection::is_leaving(&leaving));
        assert!(select_pods(&v, &[Arc::new(leaving)]).is_empty());
    }

    #[test]
    fn containers_filter_pods() {
        let t = target(
            "t",
            "shop",
            "selector: {matchLabels: {app: checkout}}\ncontainers: [sidecar]",
        );
        let v = validate(&t).unwrap();
        let pods = vec![pod(
            "shop",
            "a",
            &[("app", "checkout")],
            Some("n"),
            "Running",
        )];
        assert!(
            select_pods(&v, &pods).is_empty(),
            "fixture pods only have container `main`"
        );
    }

    #[test]
    fn phase_logic() {
        let now = ts("2026-01-01T00:10:00Z");
        let v = validate(&target(
            "t",
            "ns",
            "selector: {matchLabels: {a: b}}\nduration: 5m",
        ))
        .unwrap();
        assert_eq!(phase(None, 3, None, now), (Phase::Failed, None));
        assert_eq!(phase(Some(&v), 0, None, now), (Phase::Pending, None));
        assert_eq!(phase(Some(&v), 2, None, now), (Phase::Running, Some(now)));
        let start = ts("2026-01-01T00:06:00Z");
        assert_eq!(
            phase(Some(&v), 2, Some(start), now),
            (Phase::Running, Some(start))
        );
        let start = ts("2026-01-01T00:05:00Z");
        assert_eq!(
            phase(Some(&v), 2, Some(start), now).0,
            Phase::Completed,
            "exactly at the end"
        );
        let mut s = v.clone();
        s.suspend = true;
        assert_eq!(phase(Some(&s), 2, None, now), (Phase::Suspended, None));
        assert_eq!(
            phase(Some(&s), 2, Some(start), now).0,
            Phase::Completed,
            "completion wins"
        );
    }

    #[test]
    fn retention_keeps_the_newest_per_pod_container_type_and_drops_old_ones() {
        let now = ts("2026-01-02T00:00:00Z");
        let mut profiles = Vec::new();
        for i in 0..5 {
            profiles.push(profile(
                "ns",
                &format!("a-cpu-{i}"),
                "t",
                "a",
                "main",
                "cpu",
                &format!("2026-01-01T23:5{i}:00Z"),
            ));
        }
        profiles.push(profile(
            "ns",
            "a-wall-0",
            "t",
            "a",
            "main",
            "wall",
            "2026-01-01T23:50:00Z",
        ));
        profiles.push(profile(
            "ns",
            "b-cpu-0",
            "t",
            "b",
            "main",
            "cpu",
            "2026-01-01T23:50:00Z",
        ));
        profiles.push(profile(
            "ns",
            "b-cpu-old",
            "t",
            "b",
            "main",
            "cpu",
            "2025-12-31T00:00:00Z",
        ));
        let profiles: Vec<_> = profiles.into_iter().map(Arc::new).collect();
        let (expired, next) = retention(&profiles, 3, Duration::from_secs(24 * 3600), now);
        let got: Vec<_> = expired
            .iter()
            .map(|e| (e.name.as_str(), e.reason))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a-cpu-0", RetentionReason::TooMany),
                ("a-cpu-1", RetentionReason::TooMany),
                ("b-cpu-old", RetentionReason::TooOld),
            ]
        );
        // The oldest kept Profile (23:50 yesterday) expires in 23h50m.
        assert_eq!(next, Some(Duration::from_secs(23 * 3600 + 50 * 60)));
    }

    fn inputs<'a>(
        t: &'a ProfilingTarget,
        v: &'a Result<ValidTarget, crate::Error>,
        sel: &'a [SelectedPod],
        agent: Option<&'a DaemonSet>,
    ) -> Inputs<'a> {
        Inputs {
            target: t,
            valid: v.as_ref().map_err(|e| e.to_string()),
            selected: sel,
            profiles: Vec::new(),
            agent,
            agent_name: "kprof-system/kprof-agent".into(),
            now: ts("2026-01-01T00:00:00Z"),
        }
    }

    fn cond<'a>(s: &'a ProfilingTargetStatus, t: &str) -> (&'a str, &'a str) {
        let c = s.conditions.iter().find(|c| c.type_ == t).unwrap();
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn status_running_and_scheduled() {
        let t = target("t", "shop", "selector: {matchLabels: {app: x}}");
        let v = validate(&t);
        let sel = [
            SelectedPod {
                name: "a".into(),
                node: "n1".into(),
            },
            SelectedPod {
                name: "b".into(),
                node: "n2".into(),
            },
            SelectedPod {
                name: "c".into(),
                node: "n1".into(),
            },
        ];
        let ds = agent_ds(&["n1", "n2", "n3"]);
        let s = status(&inputs(&t, &v, &sel, Some(&ds)));
        assert_eq!(s.phase, Some(Phase::Running));
        assert_eq!(s.matched_pods, 3);
        assert_eq!(s.nodes, ["n1", "n2"]);
        assert_eq!(s.observed_generation, Some(1));
        assert_eq!(s.start_time, Some(Time(ts("2026-01-01T00:00:00Z"))));
        assert_eq!(cond(&s, "Ready"), ("True", "Profiling"));
        assert_eq!(cond(&s, "Scheduled"), ("True", "AgentsScheduled"));
        assert_eq!(cond(&s, "Degraded"), ("False", "AsExpected"));

        // The agent DaemonSet does not cover n2 yet.
        let ds = agent_ds(&["n1"]);
        let s = status(&inputs(&t, &v, &sel, Some(&ds)));
        assert_eq!(cond(&s, "Scheduled"), ("False", "WaitingForAgents"));
        assert!(s.conditions.iter().any(|c| c.message.contains("n2")));
        assert_eq!(cond(&s, "Ready"), ("False", "WaitingForAgents"));
    }

    #[test]
    fn status_pending_failed_and_transition_times_kept() {
        let mut t = target("t", "shop", "selector: {matchLabels: {app: x}}");
        let v = validate(&t);
        let s = status(&inputs(&t, &v, &[], None));
        assert_eq!(s.phase, Some(Phase::Pending));
        assert_eq!(cond(&s, "Ready"), ("False", "NoMatchingPods"));
        assert!(s.conditions[0].message.contains("namespace shop"));

        // Unchanged condition status keeps its lastTransitionTime.
        t.status = Some(s.clone());
        let mut later = inputs(&t, &v, &[], None);
        later.now = ts("2026-01-01T01:00:00Z");
        let s2 = status(&later);
        assert_eq!(s2, s, "nothing changed: same status, no patch needed");

        let bad = target(
            "t",
            "shop",
            "selector: {matchExpressions: [{key: a, operator: In}]}",
        );
        let v = validate(&bad);
        let s = status(&inputs(&bad, &v, &[], None));
        assert_eq!(s.phase, Some(Phase::Failed));
        assert_eq!(cond(&s, "Degraded"), ("True", "InvalidSpec"));
        assert!(
            s.conditions[2].message.contains("needs at least one value"),
            "{:?}",
            s.conditions[2]
        );
    }

    #[test]
    fn status_reports_profiles_newest_first() {
        let t = target("t", "shop", "selector: {matchLabels: {app: x}}");
        let v = validate(&t);
        let ps: Vec<Profile> = (0..8)
            .map(|i| {
                profile(
                    "shop",
                    &format!("p{i}"),
                    "t",
                    "a",
                    "main",
                    "cpu",
                    &format!("2026-01-01T00:0{i}:00Z"),
                )
            })
            .collect();
        let mut inp = inputs(&t, &v, &[], None);
        inp.profiles = ps.iter().collect();
        let s = status(&inp);
        assert_eq!(s.profiles_written, 8);
        assert_eq!(s.recent_profiles, ["p7", "p6", "p5", "p4", "p3"]);
        assert_eq!(s.last_profile_time, Some(Time(ts("2026-01-01T00:07:00Z"))));
    }

    #[test]
    fn requeue_at_completion_and_expiry() {
        let now = ts("2026-01-01T00:00:00Z");
        let t = target("t", "ns", "selector: {matchLabels: {a: b}}\nduration: 10m");
        let v = validate(&t).unwrap();
        let st = ProfilingTargetStatus {
            phase: Some(Phase::Running),
            start_time: Some(Time(ts("2025-12-31T23:58:00Z"))),
            ..Default::default()
        };
        let r = Duration::from_secs(300);
        assert_eq!(
            requeue_after(Some(&v), &st, None, r, now),
            Duration::from_secs(300)
        );
        let st2 = ProfilingTargetStatus {
            start_time: Some(Time(ts("2025-12-31T23:52:00Z"))),
            ..st.clone()
        };
        assert_eq!(
            requeue_after(Some(&v), &st2, None, r, now),
            Duration::from_secs(120)
        );
        assert_eq!(
            requeue_after(Some(&v), &st, Some(Duration::from_secs(7)), r, now),
            Duration::from_secs(7)
        );
    }
}
