//! Kubernetes side of `kprof-agent run`: which containers on this node the active
//! ProfilingTargets select (pure, [`plan`]), the watches that feed it ([`watch`]) and the
//! pid → container resolution on the host ([`resolve`]).
//!
//! Which pods and containers a target selects is `kprof_crds::selection`'s rule (shared with the
//! operator); of those, the agent profiles the containers that are running (their `containerID`
//! is known).
pub mod resolve;
pub mod watch;

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kprof_crds::{Phase, ProfileType, ProfilingTarget, selection::PodSelection};
use kube::ResourceExt as _;

/// A container id as the runtime reports it in `status.containerStatuses[].containerID`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerId {
    /// `containerd`, `cri-o`, `docker`, …
    pub runtime: String,
    /// The id (64 hex digits for the supported runtimes).
    pub id: String,
}

/// Parses `containerd://<id>`, `cri-o://<id>`, `docker://<id>`.
pub fn parse_container_id(s: &str) -> Option<ContainerId> {
    let (runtime, id) = s.split_once("://")?;
    if runtime.is_empty() || id.is_empty() {
        return None;
    }
    Some(ContainerId {
        runtime: runtime.to_owned(),
        id: id.to_owned(),
    })
}

/// A running container of a pod on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodContainer {
    pub name: String,
    pub id: ContainerId,
}

/// The running containers (and running init/sidecar containers) of a pod with a known id.
pub fn running_containers(pod: &Pod) -> Vec<PodContainer> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let all = status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten());
    all.filter(|cs| is_running(cs))
        .filter_map(|cs| {
            Some(PodContainer {
                name: cs.name.clone(),
                id: parse_container_id(cs.container_id.as_deref()?)?,
            })
        })
        .collect()
}

fn is_running(cs: &ContainerStatus) -> bool {
    cs.state.as_ref().is_some_and(|s| s.running.is_some())
}

/// Whether a target profiles now: not suspended, not being deleted, and not finished.
pub fn target_active(t: &ProfilingTarget) -> bool {
    if t.spec.suspend || t.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let phase = t.status.as_ref().and_then(|s| s.phase);
    !matches!(
        phase,
        Some(Phase::Completed | Phase::Failed | Phase::Suspended)
    )
}

/// Identity of a target (stable across updates of its spec).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetKey {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// What the agent needs of a target's spec.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetSettings {
    pub window: Duration,
    pub sample_hz: u32,
    pub profile_types: Vec<ProfileType>,
    /// Memory profiles also sample the allocations reported to `PyTraceMalloc_Track`.
    pub alloc_probes: bool,
}

/// One container a target selects.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerKey {
    pub namespace: String,
    pub pod: String,
    pub pod_uid: String,
    pub container: String,
    pub id: ContainerId,
}

/// One active target and the containers it selects on this node.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetPlan {
    pub key: TargetKey,
    pub settings: TargetSettings,
    pub containers: Vec<ContainerKey>,
}

/// Default window when a target's window cannot be parsed (the schema forbids it).
const FALLBACK_WINDOW: Duration = Duration::from_secs(30);

/// The settings of a target (window clamped to the API's 5s–1h, Hz to 1–1000).
pub fn settings_of(t: &ProfilingTarget) -> TargetSettings {
    let window = t
        .spec
        .window
        .to_std()
        .unwrap_or(FALLBACK_WINDOW)
        .clamp(Duration::from_secs(5), Duration::from_secs(3600));
    let mut profile_types = t.spec.profile_types.clone();
    if profile_types.is_empty() {
        profile_types.push(ProfileType::Cpu);
    }
    TargetSettings {
        window,
        sample_hz: t.spec.sample_hz.clamp(1, 1000),
        alloc_probes: t.spec.memory.allocation_probes
            && profile_types.contains(&ProfileType::Memory),
        profile_types,
    }
}

/// Pure: the plan for this node from the targets (all namespaces) and the node's pods.
/// Targets without a selected container on this node are left out. Sorted for stable output.
pub fn plan(targets: &[ProfilingTarget], pods: &[Pod]) -> Vec<TargetPlan> {
    let mut out = Vec::new();
    for t in targets.iter().filter(|t| target_active(t)) {
        let (Some(namespace), Some(uid)) = (t.namespace(), t.uid()) else {
            continue;
        };
        let selection = PodSelection::of(t);
        let mut containers: Vec<ContainerKey> = pods
            .iter()
            .filter(|p| selection.selects(p))
            .flat_map(|p| {
                let pod = p.name_any();
                let pod_uid = p.uid().unwrap_or_default();
                let namespace = namespace.clone();
                running_containers(p)
                    .into_iter()
                    .filter(|c| selection.container_selected(&c.name))
                    .map(move |c| ContainerKey {
                        namespace: namespace.clone(),
                        pod: pod.clone(),
                        pod_uid: pod_uid.clone(),
                        container: c.name,
                        id: c.id,
                    })
            })
            .collect();
        if containers.is_empty() {
            continue;
        }
        containers.sort();
        out.push(TargetPlan {
            key: TargetKey {
                namespace,
                name: t.name_any(),
                uid,
            },
            settings: settings_of(t),
            containers,
        });
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

/// Every container id the plan needs pids for, with the container it is.
pub fn containers_by_id(plan: &[TargetPlan]) -> BTreeMap<String, ContainerKey> {
    plan.iter()
        .flat_map(|t| t.containers.iter())
        .map(|c| (c.id.id.clone(), c.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f3a7c1e2b9d8a6f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a21";

    fn pod(ns: &str, name: &str, labels: &[(&str, &str)], containers: &[(&str, &str)]) -> Pod {
        let statuses: Vec<serde_json::Value> = containers
            .iter()
            .map(|(n, id)| {
                serde_json::json!({
                    "name": n, "image": "x", "imageID": "", "ready": true, "restartCount": 0,
                    "containerID": id, "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
                })
            })
            .collect();
        let specs: Vec<serde_json::Value> = containers
            .iter()
            .map(|(n, _)| serde_json::json!({"name": n}))
            .collect();
        let labels: BTreeMap<_, _> = labels.iter().map(|(k, v)| (*k, *v)).collect();
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"), "labels": labels},
            "spec": {"nodeName": "n1", "containers": specs},
            "status": {"containerStatuses": statuses}
        }))
        .unwrap()
    }

    fn target(ns: &str, name: &str, app: &str, containers: &[&str]) -> ProfilingTarget {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "kprof.io/v1alpha1", "kind": "ProfilingTarget",
            "metadata": {"name": name, "namespace": ns, "uid": format!("tuid-{name}")},
            "spec": {"selector": {"matchLabels": {"app": app}}, "containers": containers,
                     "window": "5s", "sampleHz": 49}
        }))
        .unwrap()
    }

    #[test]
    fn container_ids() {
        let c = parse_container_id(&format!("containerd://{ID}")).unwrap();
        assert_eq!((c.runtime.as_str(), c.id.as_str()), ("containerd", ID));
        assert_eq!(parse_container_id("cri-o://abc").unwrap().runtime, "cri-o");
        assert_eq!(parse_container_id("docker://abc").unwrap().id, "abc");
        assert!(parse_container_id("abc").is_none());
        assert!(parse_container_id("containerd://").is_none());
    }

    #[test]
    fn only_running_containers_with_ids() {
        let mut p = pod("a", "p", &[], &[("app", &format!("containerd://{ID}"))]);
        assert_eq!(running_containers(&p).len(), 1);
        let st = p
            .status
            .as_mut()
            .unwrap()
            .container_statuses
            .as_mut()
            .unwrap();
        st[0].state = Some(Default::default()); // waiting/terminated: not running
        assert!(running_containers(&p).is_empty());
        let p = pod("a", "p", &[], &[("app", "")]);
        assert!(running_containers(&p).is_empty(), "no id yet");
    }

    #[test]
    fn targets_select_their_own_namespace_only() {
        let cid = format!("containerd://{ID}");
        let pods = [
            pod(
                "shop",
                "web-1",
                &[("app", "web")],
                &[("app", &cid), ("sidecar", "containerd://bb")],
            ),
            pod(
                "other",
                "web-2",
                &[("app", "web")],
                &[("app", "containerd://cc")],
            ),
            pod(
                "shop",
                "db-1",
                &[("app", "db")],
                &[("db", "containerd://dd")],
            ),
        ];
        let targets = [
            target("shop", "t", "web", &[]),
            target("nowhere", "t2", "web", &[]),
        ];
        let plan = plan(&targets, &pods);
        assert_eq!(plan.len(), 1, "t2 selects nothing in its namespace");
        let p = &plan[0];
        assert_eq!(p.key.name, "t");
        assert_eq!(p.key.uid, "tuid-t");
        assert_eq!(p.settings.window, Duration::from_secs(5));
        assert_eq!(p.settings.sample_hz, 49);
        assert_eq!(p.settings.profile_types, [ProfileType::Cpu]);
        let names: Vec<_> = p
            .containers
            .iter()
            .map(|c| (c.pod.as_str(), c.container.as_str()))
            .collect();
        assert_eq!(names, [("web-1", "app"), ("web-1", "sidecar")]);
        assert_eq!(p.containers[0].id.id, ID);
        assert_eq!(p.containers[0].pod_uid, "uid-web-1");

        // Named containers only.
        let plan = super::plan(&[target("shop", "t", "web", &["sidecar"])], &pods);
        assert_eq!(plan[0].containers.len(), 1);
        assert_eq!(plan[0].containers[0].container, "sidecar");
        assert_eq!(containers_by_id(&plan).len(), 1);

        // The shared rule: a terminating pod is not selected.
        let mut leaving = pods[0].clone();
        leaving.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert!(kprof_crds::selection::is_leaving(&leaving));
        assert!(super::plan(&targets, &[leaving]).is_empty());
    }

    #[test]
    fn inactive_targets_select_nothing() {
        let pods = [pod(
            "shop",
            "web-1",
            &[("app", "web")],
            &[("app", "containerd://aa")],
        )];
        let mut t = target("shop", "t", "web", &[]);
        t.spec.suspend = true;
        assert!(plan(std::slice::from_ref(&t), &pods).is_empty());
        t.spec.suspend = false;
        t.status = Some(kprof_crds::ProfilingTargetStatus {
            phase: Some(Phase::Completed),
            ..Default::default()
        });
        assert!(!target_active(&t));
        t.status.as_mut().unwrap().phase = Some(Phase::Running);
        assert!(target_active(&t));
        assert_eq!(plan(&[t], &pods).len(), 1);
    }
}
