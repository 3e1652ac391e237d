//! The ProfilingTarget reconciler: `read` → `validate` → `build` → `apply` → `status`, one
//! module per step; `validate` and `build` are pure and carry most of the tests.

pub mod apply;
pub mod build;
#[cfg(test)]
pub mod fixtures;
pub mod read;
pub mod status;
pub mod validate;

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{apps::v1::DaemonSet, core::v1::Pod},
    jiff::Timestamp,
};
use kprof_crds::{Profile, ProfilingTarget, labels, selection::PodSelection};
use kube::{
    Api, Client, Resource, ResourceExt,
    core::DeserializeGuard,
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder},
        reflector::{ObjectRef, Store},
    },
};
use tokio::sync::Notify;

use crate::{Error, Result, error::backoff, metrics::Metrics};

/// The object the controller works on: a target, or what is left of one that does not parse.
pub type Guarded = DeserializeGuard<ProfilingTarget>;

/// `(namespace, name)` of a target.
type Key = (String, String);

/// Which pods each target selected at its last reconcile, so that a pod that stops matching
/// (labels changed) still triggers the targets that used to select it.
#[derive(Default)]
pub struct MatchIndex(Mutex<HashMap<Key, BTreeSet<String>>>);

impl MatchIndex {
    fn set(&self, key: Key, pods: BTreeSet<String>) {
        self.0.lock().expect("not poisoned").insert(key, pods);
    }
    fn contains(&self, key: &Key, pod: &str) -> bool {
        self.0
            .lock()
            .expect("not poisoned")
            .get(key)
            .is_some_and(|s| s.contains(pod))
    }
}

/// Everything a reconcile needs, shared by all reconciles.
pub struct Context {
    pub client: Client,
    /// The operator's namespace (where the agent DaemonSet lives).
    pub namespace: String,
    pub caches: read::Caches,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub agent_trigger: Arc<Notify>,
    pub resync: Duration,
    pub matched: Arc<MatchIndex>,
    failures: Mutex<HashMap<Key, u32>>,
}

impl Context {
    #[allow(
        clippy::too_many_arguments,
        reason = "plain wiring of the shared state"
    )]
    pub fn new(
        client: Client,
        namespace: &str,
        caches: read::Caches,
        recorder: Recorder,
        metrics: Arc<Metrics>,
        agent_trigger: Arc<Notify>,
        resync: Duration,
        matched: Arc<MatchIndex>,
    ) -> Self {
        Self {
            client,
            namespace: namespace.into(),
            caches,
            recorder,
            metrics,
            agent_trigger,
            resync,
            matched,
            failures: Mutex::default(),
        }
    }
}

fn key_of<K: Resource>(obj: &K) -> Key {
    (
        obj.meta().namespace.clone().unwrap_or_default(),
        obj.meta().name.clone().unwrap_or_default(),
    )
}

/// Reconcile one target (the controller's entry point).
pub async fn reconcile(obj: Arc<Guarded>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let res = match &obj.0 {
        Ok(target) => reconcile_target(target, &ctx).await,
        Err(invalid) => {
            tracing::warn!(namespace = ?invalid.metadata.namespace, name = ?invalid.metadata.name, error = %invalid.error, "skipping a ProfilingTarget that cannot be read");
            let ev = Event {
                type_: EventType::Warning,
                reason: "InvalidObject".into(),
                note: Some(truncate(&format!(
                    "the object cannot be read by this operator: {}",
                    invalid.error
                ))),
                action: "Reconcile".into(),
                secondary: None,
            };
            publish(&ctx, &obj.object_ref(&()), ev).await;
            Err(Error::InvalidObject(invalid.error.clone()))
        }
    };
    ctx.metrics
        .observe("target", started.elapsed(), res.as_ref().err());
    if res.is_ok() {
        ctx.failures
            .lock()
            .expect("not poisoned")
            .remove(&key_of(obj.as_ref()));
    }
    res
}

/// What to do after a failed reconcile: an invalid spec waits for a change of the target,
/// anything else is retried with exponential backoff (per target).
pub fn error_policy(obj: Arc<Guarded>, err: &Error, ctx: Arc<Context>) -> Action {
    if err.is_permanent() {
        return Action::await_change();
    }
    let n = {
        let mut f = ctx.failures.lock().expect("not poisoned");
        let n = f.entry(key_of(obj.as_ref())).or_insert(0);
        *n += 1;
        *n
    };
    tracing::warn!(target = %obj.name_any(), category = err.category(), error = %err, attempt = n, "reconcile failed, retrying");
    let ev = Event {
        type_: EventType::Warning,
        reason: err.category().into(),
        note: Some(truncate(&err.to_string())),
        action: "Reconcile".into(),
        secondary: None,
    };
    let reference = obj.object_ref(&());
    tokio::spawn(async move { publish(&ctx, &reference, ev).await });
    Action::requeue(backoff(n))
}

async fn publish(
    ctx: &Context,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    ev: Event,
) {
    if let Err(e) = ctx.recorder.publish(&ev, reference).await {
        tracing::debug!(error = %e, "publishing an event failed");
    }
}

fn truncate(s: &str) -> String {
    // Event notes are limited to 1 kB.
    if s.len() <= 1000 {
        s.to_string()
    } else {
        format!("{}…", &s[..s.floor_char_boundary(990)])
    }
}

async fn reconcile_target(target: &ProfilingTarget, ctx: &Context) -> Result<Action> {
    let ns = target.namespace().unwrap_or_default();
    let now = Timestamp::now();

    // 1. read
    let observed = read::read(target, &ctx.caches, &ctx.namespace);
    // 2. validate
    let valid = validate::validate(target);
    // 3. build
    let selected = match &valid {
        Ok(v) => build::select_pods(v, &observed.pods),
        Err(_) => Vec::new(),
    };
    ctx.matched.set(
        key_of(target),
        selected.iter().map(|p| p.name.clone()).collect(),
    );
    let (expired, next_expiry) = match &valid {
        Ok(v) => build::retention(&observed.profiles, v.max_profiles, v.max_age, now),
        Err(_) => (Vec::new(), None),
    };
    let gone: HashSet<&str> = expired.iter().map(|e| e.name.as_str()).collect();
    let kept: Vec<&Profile> = observed
        .profiles
        .iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none() && !gone.contains(p.name_any().as_str())
        })
        .map(AsRef::as_ref)
        .collect();
    let inputs = build::Inputs {
        target,
        valid: valid.as_ref().map_err(ToString::to_string),
        selected: &selected,
        profiles: kept,
        agent: observed.agent.as_deref(),
        agent_name: format!("{}/{}", ctx.namespace, crate::AGENT_NAME),
        now,
    };
    let status = build::status(&inputs);

    // 4. apply
    if !expired.is_empty() {
        let api: Api<Profile> = Api::namespaced(ctx.client.clone(), &ns);
        let deleted = apply::delete_expired(&api, &expired).await?;
        ctx.metrics.profiles_deleted.inc_by(deleted as u64);
        if deleted > 0 {
            let too_many = expired
                .iter()
                .filter(|e| e.reason == build::RetentionReason::TooMany)
                .count();
            let note = format!(
                "deleted {deleted} Profile(s): {too_many} beyond maxProfiles {}, {} older than maxAge {}",
                target.spec.retention.max_profiles,
                expired.len() - too_many,
                target.spec.retention.max_age
            );
            let ev = Event {
                type_: EventType::Normal,
                reason: "RetentionDeleted".into(),
                note: Some(note),
                action: "Retention".into(),
                secondary: None,
            };
            publish(ctx, &target.object_ref(&()), ev).await;
        }
    }

    // 5. status
    let api: Api<ProfilingTarget> = Api::namespaced(ctx.client.clone(), &ns);
    let changed = status::patch_status(&api, target, &status).await?;
    if changed {
        announce(ctx, target, &status).await;
        if target.status.as_ref().and_then(|s| s.phase) != status.phase {
            tracing::info!(namespace = %ns, name = %target.name_any(), phase = ?status.phase, pods = status.matched_pods, nodes = status.nodes.len(), "target phase changed");
        }
    }

    match valid {
        Err(e) => Err(e),
        Ok(v) => Ok(Action::requeue(build::requeue_after(
            Some(&v),
            &status,
            next_expiry,
            ctx.resync,
            now,
        ))),
    }
}

/// An Event when the Ready condition changes (status or reason): what the user should know.
async fn announce(
    ctx: &Context,
    target: &ProfilingTarget,
    new: &kprof_crds::ProfilingTargetStatus,
) {
    let ready = |s: Option<&kprof_crds::ProfilingTargetStatus>| {
        s.and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == build::conditions::READY)
        })
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    };
    let (Some(after), before) = (ready(Some(new)), ready(target.status.as_ref())) else {
        return;
    };
    if before.as_ref().map(|b| (&b.0, &b.1)) == Some((&after.0, &after.1)) {
        return;
    }
    let type_ = if after.1 == "InvalidSpec" {
        EventType::Warning
    } else {
        EventType::Normal
    };
    let ev = Event {
        type_,
        reason: after.1,
        note: Some(truncate(&after.2)),
        action: "Reconcile".into(),
        secondary: None,
    };
    publish(ctx, &target.object_ref(&()), ev).await;
}

/// Pod → the targets of its namespace that select it now or selected it at their last
/// reconcile. Never a target of another namespace.
pub fn pod_mapper(
    targets: Store<Guarded>,
    matched: Arc<MatchIndex>,
) -> impl Fn(Pod) -> Vec<ObjectRef<Guarded>> + Send + Sync + 'static {
    move |pod: Pod| {
        let Some(ns) = pod.metadata.namespace.as_deref() else {
            return Vec::new();
        };
        let pod_name = pod.name_any();
        targets
            .state()
            .into_iter()
            .filter(|g| g.meta().namespace.as_deref() == Some(ns))
            .filter(|g| {
                let key = key_of(g.as_ref());
                let selects = match &g.0 {
                    Ok(t) => PodSelection::of(t).selects(&pod),
                    Err(_) => false,
                };
                selects || matched.contains(&key, &pod_name)
            })
            .map(|g| ObjectRef::from_obj(g.as_ref()))
            .collect()
    }
}

/// Profile → its target (label `kprof.io/target`, same namespace).
pub fn profile_mapper(p: DeserializeGuard<Profile>) -> Option<ObjectRef<Guarded>> {
    let meta = p.meta();
    let target = meta.labels.as_ref()?.get(labels::TARGET)?;
    Some(ObjectRef::new(target).within(meta.namespace.as_deref()?))
}

/// Agent DaemonSet → every target (their Scheduled and Degraded conditions depend on it).
pub fn agent_mapper(
    targets: Store<Guarded>,
) -> impl Fn(DaemonSet) -> Vec<ObjectRef<Guarded>> + Send + Sync + 'static {
    move |_ds: DaemonSet| {
        targets
            .state()
            .iter()
            .map(|g| ObjectRef::from_obj(g.as_ref()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use kube::runtime::{reflector, watcher};

    use super::*;
    use crate::reconcile::target::fixtures::{pod, profile, target};

    fn store_of(targets: Vec<ProfilingTarget>) -> Store<Guarded> {
        let (reader, mut writer) = reflector::store::<Guarded>();
        writer.apply_watcher_event(&watcher::Event::Init);
        for t in targets {
            writer.apply_watcher_event(&watcher::Event::InitApply(DeserializeGuard(Ok(t))));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        reader
    }

    fn names(refs: &[ObjectRef<Guarded>]) -> Vec<String> {
        let mut v: Vec<_> = refs
            .iter()
            .map(|r| format!("{}/{}", r.namespace.clone().unwrap_or_default(), r.name))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_pod_triggers_only_targets_of_its_namespace_that_select_or_selected_it() {
        let store = store_of(vec![
            target("web", "shop", "selector: {matchLabels: {app: web}}"),
            target(
                "all-web",
                "shop",
                "selector: {matchExpressions: [{key: app, operator: Exists}]}",
            ),
            target("db", "shop", "selector: {matchLabels: {app: db}}"),
            target("web", "other", "selector: {matchLabels: {app: web}}"),
        ]);
        let matched = Arc::new(MatchIndex::default());
        let map = pod_mapper(store, matched.clone());
        let p = pod("shop", "web-1", &[("app", "web")], Some("n"), "Running");
        assert_eq!(names(&map((*p).clone())), ["shop/all-web", "shop/web"]);

        // web-1's labels change to something `db` does not select either: `db` selected it at
        // its last reconcile, so it is told.
        matched.set(("shop".into(), "db".into()), ["web-1".to_string()].into());
        let p = pod("shop", "web-1", &[("app", "cache")], Some("n"), "Running");
        assert_eq!(names(&map((*p).clone())), ["shop/all-web", "shop/db"]);
    }

    #[test]
    fn a_profile_triggers_its_target() {
        let p = profile(
            "shop",
            "p1",
            "web",
            "web-1",
            "main",
            "cpu",
            "2026-01-01T00:00:00Z",
        );
        let r = profile_mapper(DeserializeGuard(Ok(p))).unwrap();
        assert_eq!(
            (r.namespace.as_deref(), r.name.as_str()),
            (Some("shop"), "web")
        );
    }
}
