//! Prometheus metrics of `kprof-agent run` (prefix `kprof_agent`), one process-wide registry.
use std::sync::{OnceLock, atomic::AtomicU64};

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
    python_processes: Gauge,
    errors: Family<Vec<(String, String)>, Counter>,
    stack_errors: Family<Vec<(String, String)>, Counter>,
    children_followed: Counter,
    unresolved_addresses: Counter,
    cpu_seconds: Counter<f64, AtomicU64>,
    bpf_run_seconds: Counter<f64, AtomicU64>,
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
            python_processes: Gauge::default(),
            errors: Family::default(),
            stack_errors: Family::default(),
            children_followed: Counter::default(),
            unresolved_addresses: Counter::default(),
            cpu_seconds: Counter::default(),
            bpf_run_seconds: Counter::default(),
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
        registry.register(
            "python_processes",
            "Processes whose Python frames are walked in kernel",
            m.python_processes.clone(),
        );
        registry.register("errors", "Errors by category", m.errors.clone());
        registry.register(
            "stack_errors",
            "Stacks the kernel could not read, by stack (kernel, user)",
            m.stack_errors.clone(),
        );
        registry.register(
            "children_followed",
            "Child processes added to the targets in kernel at fork",
            m.children_followed.clone(),
        );
        registry.register(
            "unresolved_addresses",
            "Distinct code addresses that could not be symbolized (kept as module+offset)",
            m.unresolved_addresses.clone(),
        );
        registry.register(
            "cpu_seconds",
            "CPU time of the agent process (user + system)",
            m.cpu_seconds.clone(),
        );
        registry.register(
            "bpf_run_seconds",
            "Run time of the sampler program in kernel (when kernel.bpf_stats_enabled is on)",
            m.bpf_run_seconds.clone(),
        );
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

pub fn set_python_processes(n: usize) {
    metrics()
        .python_processes
        .set(i64::try_from(n).unwrap_or(i64::MAX));
}

/// Raises a counter to a running total read from elsewhere (kernel stats, rusage).
fn advance(c: &Counter, total: u64) {
    let now = c.get();
    if total > now {
        c.inc_by(total - now);
    }
}

fn advance_f64(c: &Counter<f64, AtomicU64>, total: f64) {
    let now = c.get();
    if total > now {
        c.inc_by(total - now);
    }
}

/// Totals of the sampler's kernel counters (they restart when the sampler is reloaded, so the
/// caller passes running totals).
pub fn set_kernel_totals(kernel_stack_errors: u64, user_stack_errors: u64, children: u64) {
    let m = metrics();
    for (stack, total) in [("kernel", kernel_stack_errors), ("user", user_stack_errors)] {
        advance(
            &m.stack_errors
                .get_or_create(&vec![("stack".to_owned(), stack.to_owned())]),
            total,
        );
    }
    advance(&m.children_followed, children);
}

/// In-kernel run time of the sampler so far (a running total).
pub fn set_bpf_run_time(total: std::time::Duration) {
    advance_f64(&metrics().bpf_run_seconds, total.as_secs_f64());
}

/// The text exposition of every metric.
pub fn render() -> String {
    let m = metrics();
    advance(
        &m.unresolved_addresses,
        crate::symbolize::unresolved_addresses(),
    );
    advance_f64(&m.cpu_seconds, process_cpu_seconds());
    let mut s = String::new();
    let _ = encode(&mut s, &metrics().registry);
    s
}

/// User + system CPU time of this process.
fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the zeroed struct we pass.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
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
        set_kernel_totals(2, 3, 1);
        set_kernel_totals(2, 5, 1); // totals, not increments
        let text = render();
        assert!(
            text.contains("kprof_agent_stack_errors_total{stack=\"user\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("kprof_agent_children_followed_total 1"),
            "{text}"
        );
        assert!(text.contains("kprof_agent_cpu_seconds_total"), "{text}");
        assert!(
            text.contains("kprof_agent_unresolved_addresses_total"),
            "{text}"
        );
    }
}
