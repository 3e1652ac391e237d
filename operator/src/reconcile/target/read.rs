//! Step 1, read: what the reconciler needs to know about the world, from the shared caches
//! (reflector stores) filled by the operator's watches. No request is made here.
//!
//! Only pods of the target's OWN namespace are read: a target never sees another namespace.

use std::sync::Arc;

use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Pod};
use kprof_crds::{Profile, ProfilingTarget, labels};
use kube::{
    ResourceExt,
    core::DeserializeGuard,
    runtime::reflector::{ObjectRef, Store},
};

/// The caches the target reconciler reads.
#[derive(Clone)]
pub struct Caches {
    pub pods: Store<Pod>,
    pub profiles: Store<DeserializeGuard<Profile>>,
    pub agents: Store<DaemonSet>,
}

/// What the reconciler observed for one target.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Every pod of the target's namespace (selection happens in `build`, once validated).
    pub pods: Vec<Arc<Pod>>,
    /// The target's Profiles (label `kprof.io/target`, same namespace).
    pub profiles: Vec<Arc<Profile>>,
    /// The agent DaemonSet, when it exists.
    pub agent: Option<Arc<DaemonSet>>,
}

/// Read the pods, Profiles and agent DaemonSet relevant to `target`.
pub fn read(target: &ProfilingTarget, caches: &Caches, operator_namespace: &str) -> Observed {
    let ns = target.namespace().unwrap_or_default();
    let name = target.name_any();
    let pods = caches
        .pods
        .state_filter(|p| p.metadata.namespace.as_deref() == Some(ns.as_str()));
    let profiles = caches
        .profiles
        .state()
        .into_iter()
        .filter_map(|g| match &g.0 {
            Ok(p)
                if p.metadata.namespace.as_deref() == Some(ns.as_str())
                    && p.labels().get(labels::TARGET) == Some(&name) =>
            {
                Some(Arc::new(p.clone()))
            }
            _ => None,
        })
        .collect();
    let agent = caches
        .agents
        .get(&ObjectRef::new(crate::AGENT_NAME).within(operator_namespace));
    Observed {
        pods,
        profiles,
        agent,
    }
}
