//! Test fixtures: objects built from short YAML, so tests read like specifications.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{apps::v1::DaemonSet, core::v1::Pod},
    jiff::Timestamp,
};
use kprof_crds::{Profile, ProfilingTarget};
use serde_json::json;

use crate::{config::OperatorConfig, reconcile::daemonset::build::desired_daemonset};

pub fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

/// A ProfilingTarget at generation 1 with the given spec (YAML).
pub fn target(name: &str, ns: &str, spec_yaml: &str) -> ProfilingTarget {
    let spec: serde_json::Value = serde_yaml::from_str(spec_yaml).unwrap();
    serde_json::from_value(json!({
        "apiVersion": "kprof.io/v1alpha1",
        "kind": "ProfilingTarget",
        "metadata": {"name": name, "namespace": ns, "generation": 1, "uid": format!("uid-{name}")},
        "spec": spec,
    }))
    .unwrap()
}

/// A pod with one container `main`, bound to `node` (or not scheduled), in `phase`.
pub fn pod(
    ns: &str,
    name: &str,
    labels: &[(&str, &str)],
    node: Option<&str>,
    phase: &str,
) -> std::sync::Arc<Pod> {
    let labels: BTreeMap<_, _> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    std::sync::Arc::new(
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "main", "image": "x"}]},
            "status": {"phase": phase},
        }))
        .unwrap(),
    )
}

/// A Profile of `target` for pod/container/type whose window ended at `end` (RFC 3339).
pub fn profile(
    ns: &str,
    name: &str,
    target: &str,
    pod: &str,
    container: &str,
    ty: &str,
    end: &str,
) -> Profile {
    serde_json::from_value(json!({
        "apiVersion": "kprof.io/v1alpha1",
        "kind": "Profile",
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"),
            "labels": {"kprof.io/target": target, "kprof.io/pod": pod, "kprof.io/container": container, "kprof.io/type": ty}},
        "spec": {"target": target, "pod": pod, "container": container, "node": "n", "runtime": "native",
            "profileType": ty, "windowStart": end, "windowEnd": end, "sampleHz": 99, "samples": 10},
    }))
    .unwrap()
}

/// The agent DaemonSet the default configuration yields for `nodes`.
pub fn agent_ds(nodes: &[&str]) -> DaemonSet {
    let nodes = nodes.iter().map(|n| n.to_string()).collect();
    desired_daemonset(&OperatorConfig::default().agent, "kprof-system", &nodes)
}
