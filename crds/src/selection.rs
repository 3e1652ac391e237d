//! Which pods and containers a ProfilingTarget selects: the one rule the operator (status,
//! phase, the agent DaemonSet's nodes) and the agent (what it profiles) both apply.
//!
//! A target selects the pods of its own namespace whose labels its selector matches, that are
//! neither terminating (`deletionTimestamp` set) nor finished (`Succeeded`/`Failed`), and that
//! have a container it names (any container when `spec.containers` is empty). Terminating pods
//! are left out on both sides so that `status.matchedPods` counts the pods actually profiled
//! (see docs/decisions.md).

use k8s_openapi::api::core::v1::Pod;
use kube::core::{Selector, SelectorExt};

use crate::{ProfilingTarget, selector};

/// A target's pod selection, parsed once and applied to many pods.
#[derive(Clone, Debug)]
pub struct PodSelection {
    namespace: Option<String>,
    /// None: the selector is empty or invalid and selects nothing (kprof never profiles a whole
    /// namespace by accident).
    selector: Option<Selector>,
    containers: Vec<String>,
}

impl PodSelection {
    pub fn of(target: &ProfilingTarget) -> Self {
        PodSelection {
            namespace: target.metadata.namespace.clone(),
            selector: selector::parse(&target.spec.selector),
            containers: target.spec.containers.clone(),
        }
    }

    /// Whether the target selects `pod` (the rule in the module documentation).
    pub fn selects(&self, pod: &Pod) -> bool {
        static NO_LABELS: std::collections::BTreeMap<String, String> =
            std::collections::BTreeMap::new();
        let Some(selector) = &self.selector else {
            return false;
        };
        self.namespace.is_some()
            && pod.metadata.namespace == self.namespace
            && !is_leaving(pod)
            && selector.matches(pod.metadata.labels.as_ref().unwrap_or(&NO_LABELS))
            && self.has_selected_container(pod)
    }

    /// Whether the target's `containers` list (empty: every container) includes `name`.
    pub fn container_selected(&self, name: &str) -> bool {
        self.containers.is_empty() || self.containers.iter().any(|c| c == name)
    }

    fn has_selected_container(&self, pod: &Pod) -> bool {
        self.containers.is_empty()
            || pod.spec.as_ref().is_some_and(|s| {
                s.containers
                    .iter()
                    .chain(s.init_containers.iter().flatten())
                    .any(|c| self.container_selected(&c.name))
            })
    }
}

/// Whether a pod is terminating or finished: it is not (or no longer) profiled.
pub fn is_leaving(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    pod.metadata.deletion_timestamp.is_some() || matches!(phase, Some("Succeeded" | "Failed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(yaml: &str) -> ProfilingTarget {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).unwrap()
    }

    const TARGET: &str = "
apiVersion: kprof.io/v1alpha1
kind: ProfilingTarget
metadata: {name: checkout, namespace: shop}
spec:
  selector: {matchLabels: {app: checkout}}
  containers: [app]
";

    const POD: &str = "
metadata: {name: p, namespace: shop, labels: {app: checkout}}
spec: {containers: [{name: app}, {name: envoy}]}
status: {phase: Running}
";

    #[test]
    fn selects_running_labelled_pods_of_its_namespace_with_a_named_container() {
        let s = PodSelection::of(&target(TARGET));
        assert!(s.selects(&pod(POD)));
        assert!(!s.selects(&pod(&POD.replace("namespace: shop", "namespace: other"))));
        assert!(!s.selects(&pod(&POD.replace("app: checkout", "app: cart"))));
        assert!(!s.selects(&pod(&POD.replace("{name: app}", "{name: web}"))));
        assert!(s.container_selected("app") && !s.container_selected("envoy"));
        let sidecar = "spec: {initContainers: [{name: app}], containers: [{name: web}]}";
        assert!(s.selects(&pod(
            &POD.replace("spec: {containers: [{name: app}, {name: envoy}]}", sidecar)
        )));
    }

    #[test]
    fn terminating_and_finished_pods_are_not_selected() {
        let s = PodSelection::of(&target(TARGET));
        let terminating = POD.replace(
            "namespace: shop,",
            "namespace: shop, deletionTimestamp: '2026-12-04T09:00:00Z',",
        );
        assert!(is_leaving(&pod(&terminating)));
        assert!(!s.selects(&pod(&terminating)));
        for phase in ["Succeeded", "Failed"] {
            let done = pod(&POD.replace("phase: Running", &format!("phase: {phase}")));
            assert!(!s.selects(&done), "{phase}");
        }
        assert!(s.selects(&pod(&POD.replace("phase: Running", "phase: Pending"))));
    }

    #[test]
    fn empty_selector_or_no_namespace_selects_nothing() {
        let empty = TARGET.replace("{matchLabels: {app: checkout}}", "{}");
        assert!(!PodSelection::of(&target(&empty)).selects(&pod(POD)));
        let no_ns = TARGET.replace(", namespace: shop", "");
        assert!(!PodSelection::of(&target(&no_ns)).selects(&pod(POD)));
        let all = TARGET.replace("  containers: [app]\n", "");
        assert!(PodSelection::of(&target(&all)).container_selected("envoy"));
    }
}
