//! Prometheus metrics (prometheus-client), served at `/metrics` by [`crate::http`].
//!
//! * `kprof_operator_reconciles_total{controller}`: reconciles run (`controller` is `target` or `agent`)
//! * `kprof_operator_reconcile_errors_total{controller,category}`: failed reconciles by
//!   [`Error::category`](crate::Error::category)
//! * `kprof_operator_reconcile_duration_seconds{controller}`: histogram
//! * `kprof_operator_profiles_deleted_total`: Profiles deleted by retention
//! * `kprof_operator_agent_nodes`: nodes the agent DaemonSet covers
//! * `kprof_operator_leader`: 1 while this replica holds the lease

use std::time::Duration;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::Error;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: String,
    pub category: String,
}

fn duration_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

/// The operator's metrics.
pub struct Metrics {
    pub reconciles: Family<ControllerLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub duration: Family<ControllerLabels, Histogram, fn() -> Histogram>,
    pub profiles_deleted: Counter,
    pub agent_nodes: Gauge,
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            reconciles: Family::default(),
            errors: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            profiles_deleted: Counter::default(),
            agent_nodes: Gauge::default(),
            leader: Gauge::default(),
        }
    }
}

impl Metrics {
    /// Register every metric under the `kprof_operator` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("kprof_operator");
        r.register("reconciles", "Reconciles run", self.reconciles.clone());
        r.register(
            "reconcile_errors",
            "Failed reconciles by error category",
            self.errors.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            self.duration.clone(),
        );
        r.register(
            "profiles_deleted",
            "Profiles deleted by retention",
            self.profiles_deleted.clone(),
        );
        r.register(
            "agent_nodes",
            "Nodes the agent DaemonSet covers",
            self.agent_nodes.clone(),
        );
        r.register(
            "leader",
            "1 while this replica holds the leader lease",
            self.leader.clone(),
        );
    }

    /// Record one reconcile of `controller`.
    pub fn observe(&self, controller: &str, took: Duration, error: Option<&Error>) {
        let l = ControllerLabels {
            controller: controller.into(),
        };
        self.reconciles.get_or_create(&l).inc();
        self.duration.get_or_create(&l).observe(took.as_secs_f64());
        if let Some(e) = error {
            self.errors
                .get_or_create(&ErrorLabels {
                    controller: controller.into(),
                    category: e.category().into(),
                })
                .inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_exposed_with_bounded_labels() {
        let m = Metrics::default();
        let mut reg = Registry::default();
        m.register(&mut reg);
        m.observe("target", Duration::from_millis(3), None);
        m.observe(
            "target",
            Duration::from_millis(3),
            Some(&Error::InvalidSpec("long user text".into())),
        );
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(
            out.contains("kprof_operator_reconciles_total{controller=\"target\"} 2"),
            "{out}"
        );
        assert!(out.contains("kprof_operator_reconcile_errors_total{controller=\"target\",category=\"InvalidSpec\"} 1"), "{out}");
        assert!(
            out.contains("kprof_operator_reconcile_duration_seconds_bucket"),
            "{out}"
        );
        assert!(!out.contains("long user text"));
    }
}
