//! Prometheus metrics of `kprof-agent run` (prefix `kprof_agent`), one process-wide registry.
use std::sync::OnceLock;

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

struct Metrics {
    registry: Registry,
    samples: Counter,
    lost: Counter,
    profiles_spooled: Counter,
    profiles_written: Counter,
    spool_depth: Gauge,
    spool_dropped: Counter,
    targeted_pids: Gauge,
    errors: Family<Vec<(String, String)>, Counter>,
}

fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let mut registry = Registry::with_prefix("kprof_agent");
        let m = Metrics {
            registry: Registry::default(),
            samples: Counter::default(),
            lost: Counter::default(),
            profiles_spooled: Counter::default(),
            profiles_written: Counter::default(),
            spool_depth: Gauge::default(),
            spool_dropped: Counter::default(),
            targeted_pids: Gauge::default(),
            errors: Family::default(),
        };
        registry.register(
            "samples",
            "Samples of targeted processes",
            m.samples.clone(),
        );
        registry.register(
            "lost_samples",
            "Samples lost in kernel (ring buffer full)",
            m.lost.clone(),
        );
        registry.register(
            "profiles_spooled",
            "Profiles built and written to the spool",
            m.profiles_spooled.clone(),
        );
        registry.register(
            "profiles_written",
            "Profiles created in the API server",
            m.profiles_written.clone(),
        );
        registry.register(
            "spool_depth",
            "Profiles waiting in the spool",
            m.spool_depth.clone(),
        );
        registry.register(
            "spool_dropped",
            "Profiles dropped because the spool was full",
            m.spool_dropped.clone(),
        );
        registry.register(
            "targeted_pids",
            "Processes being sampled",
            m.targeted_pids.clone(),
        );
        registry.register("errors", "Errors by category", m.errors.clone());
        Metrics { registry, ..m }
    })
}

/// Counts an error of `category` (a fixed, low-cardinality name).
pub fn error(category: &'static str) {
    metrics()
        .errors
        .get_or_create(&vec![("category".to_owned(), category.to_owned())])
        .inc();
}

pub fn samples(n: u64) {
    metrics().samples.inc_by(n);
}

pub fn lost(n: u64) {
    metrics().lost.inc_by(n);
}

pub fn profile_spooled() {
    metrics().profiles_spooled.inc();
}

pub fn profile_written() {
    metrics().profiles_written.inc();
}

pub fn spool_dropped(n: u64) {
    metrics().spool_dropped.inc_by(n);
}

pub fn set_spool_depth(n: usize) {
    metrics()
        .spool_depth
        .set(i64::try_from(n).unwrap_or(i64::MAX));
}

pub fn set_targeted_pids(n: usize) {
    metrics()
        .targeted_pids
        .set(i64::try_from(n).unwrap_or(i64::MAX));
}

/// The text exposition of every metric.
pub fn render() -> String {
    let mut s = String::new();
    let _ = encode(&mut s, &metrics().registry);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_counters() {
        error("store");
        samples(3);
        let text = render();
        assert!(text.contains("kprof_agent_samples_total"), "{text}");
        assert!(
            text.contains("kprof_agent_errors_total{category=\"store\"}"),
            "{text}"
        );
        assert!(text.contains("kprof_agent_spool_depth"), "{text}");
    }
}
