//! Prometheus metrics of the agent (prefix `kprof_agent`), one process-wide registry. A leaf:
//! every layer may count here; it imports nothing of the agent but `proc` (its own CPU time).
use std::sync::{OnceLock, atomic::AtomicU64};

use kprof_common::python::PyStat;

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
    spool_evicted_disk_full: Counter,
    profiles_given_up: Counter,
    targeted_pids: Gauge,
    python_processes: Gauge,
    python_walks: Family<Vec<(String, String)>, Counter>,
    python_frames: Counter,
    python_stack_cuts: Family<Vec<(String, String)>, Counter>,
    errors: Family<Vec<(String, String)>, Counter>,
    stack_errors: Family<Vec<(String, String)>, Counter>,
    children_followed: Counter,
    unresolved_addresses: Counter,
    user_stacks_truncated: Counter,
    unwind_misses: Counter,
    unwind_tables_refused: Counter,
    unwind_tables_evicted: Counter,
    unwind_table_rows: Gauge,
    cpu_seconds: Counter<f64, AtomicU64>,
    bpf_run_seconds: Counter<f64, AtomicU64>,
    uid: Gauge,
    seccomp_enforced: Gauge,
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
            spool_evicted_disk_full: Counter::default(),
            profiles_given_up: Counter::default(),
            targeted_pids: Gauge::default(),
            python_processes: Gauge::default(),
            python_walks: Family::default(),
            python_frames: Counter::default(),
            python_stack_cuts: Family::default(),
            errors: Family::default(),
            stack_errors: Family::default(),
            children_followed: Counter::default(),
            unresolved_addresses: Counter::default(),
            user_stacks_truncated: Counter::default(),
            unwind_misses: Counter::default(),
            unwind_tables_refused: Counter::default(),
            unwind_tables_evicted: Counter::default(),
            unwind_table_rows: Gauge::default(),
            cpu_seconds: Counter::default(),
            bpf_run_seconds: Counter::default(),
            uid: Gauge::default(),
            seccomp_enforced: Gauge::default(),
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
            "spool_evicted_disk_full",
            "Profiles removed from the spool to make room on a full disk (oldest first)",
            m.spool_evicted_disk_full.clone(),
        );
        registry.register(
            "profiles_given_up",
            "Profiles given up because the API server kept refusing them (see the ProfileRefused events)",
            m.profiles_given_up.clone(),
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
        registry.register(
            "python_walks",
            "Samples of Python processes by how the in-kernel walk went (walked, no_thread_state, \
             thread_state_unreadable, no_python_frame)",
            m.python_walks.clone(),
        );
        registry.register(
            "python_frames",
            "Python frames recorded in kernel",
            m.python_frames.clone(),
        );
        registry.register(
            "python_stack_cuts",
            "Python stacks cut short, by reason (frame_unreadable, too_deep: marked truncated)",
            m.python_stack_cuts.clone(),
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
            "user_stacks_truncated",
            "Native user stacks cut where they went wrong (a return address in no mapping, a stack \
             pointer that did not grow, unreadable memory): marked [truncated] in the profile",
            m.user_stacks_truncated.clone(),
        );
        registry.register(
            "unwind_misses",
            "Samples whose process or address had no unwind mappings loaded yet (walked by frame \
             pointers or cut; the mappings are read again)",
            m.unwind_misses.clone(),
        );
        registry.register(
            "unwind_tables_refused",
            "Executable files whose unwind information was refused (broken, hostile, too big or \
             unreadable): stacks through them are walked by frame pointers",
            m.unwind_tables_refused.clone(),
        );
        registry.register(
            "unwind_tables_evicted",
            "Unwind tables evicted from the kernel's table memory to make room (least recently used)",
            m.unwind_tables_evicted.clone(),
        );
        registry.register(
            "unwind_table_rows",
            "Rows of unwind tables in the kernel's table memory (8 bytes each)",
            m.unwind_table_rows.clone(),
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
        registry.register(
            "uid",
            "The user id the agent runs as after start-up",
            m.uid.clone(),
        );
        registry.register(
            "seccomp_enforced",
            "1 when the agent's seccomp deny list is installed and its self-test saw ptrace and process_vm_writev denied",
            m.seccomp_enforced.clone(),
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

pub fn profiles_given_up(n: u64) {
    metrics().profiles_given_up.inc_by(n);
}

pub fn spool_evicted_disk_full(n: u64) {
    metrics().spool_evicted_disk_full.inc_by(n);
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

/// The rights the agent runs with (set once at start-up).
pub fn set_rights(uid: u32, seccomp_enforced: bool) {
    let m = metrics();
    m.uid.set(i64::from(uid));
    m.seccomp_enforced.set(i64::from(seccomp_enforced));
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

/// Totals of the CPython walker's kernel counters (running totals, as for the stack errors).
pub fn set_python_walk_totals(total: impl Fn(PyStat) -> u64) {
    let m = metrics();
    let label = |k: &str, v: &str| vec![(k.to_owned(), v.to_owned())];
    let (none, unreadable, no_frame) = (
        total(PyStat::NoThreadState),
        total(PyStat::TsdReadErr),
        total(PyStat::NoFrame),
    );
    let walked = total(PyStat::Walks).saturating_sub(none + unreadable + no_frame);
    for (outcome, n) in [
        ("walked", walked),
        ("no_thread_state", none),
        ("thread_state_unreadable", unreadable),
        ("no_python_frame", no_frame),
    ] {
        advance(&m.python_walks.get_or_create(&label("outcome", outcome)), n);
    }
    advance(&m.python_frames, total(PyStat::Frames));
    for (reason, n) in [
        ("frame_unreadable", total(PyStat::FrameReadErr)),
        ("too_deep", total(PyStat::Truncated)),
    ] {
        advance(
            &m.python_stack_cuts.get_or_create(&label("reason", reason)),
            n,
        );
    }
}

/// In-kernel run time of the sampler so far (a running total).
pub fn set_bpf_run_time(total: std::time::Duration) {
    advance_f64(&metrics().bpf_run_seconds, total.as_secs_f64());
}

/// The text exposition of every metric.
pub fn render() -> String {
    let m = metrics();
    advance_f64(&m.cpu_seconds, crate::proc::self_usage().0.as_secs_f64());
    let mut s = String::new();
    let _ = encode(&mut s, &metrics().registry);
    s
}

/// A code address that could not be symbolized (each distinct one is counted once, when first
/// looked up; later samples hit the cache).
pub fn unresolved_address() {
    metrics().unresolved_addresses.inc();
}

/// Totals of the unwinder's kernel counters (running totals, as for the stack errors).
pub fn set_unwind_totals(truncated: u64, misses: u64) {
    let m = metrics();
    advance(&m.user_stacks_truncated, truncated);
    advance(&m.unwind_misses, misses);
}

pub fn unwind_table_refused() {
    metrics().unwind_tables_refused.inc();
}

pub fn unwind_table_evicted() {
    metrics().unwind_tables_evicted.inc();
}

pub fn set_unwind_table_rows(rows: u64) {
    metrics()
        .unwind_table_rows
        .set(i64::try_from(rows).unwrap_or(i64::MAX));
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

    #[test]
    fn python_walks_are_split_by_outcome() {
        let reading = |s: PyStat| match s {
            PyStat::Walks => 100,
            PyStat::NoThreadState => 4,
            PyStat::TsdReadErr => 1,
            PyStat::NoFrame => 5,
            PyStat::Frames => 900,
            PyStat::FrameReadErr => 2,
            PyStat::Truncated => 3,
        };
        set_python_walk_totals(reading);
        set_python_walk_totals(reading); // totals, not increments
        let text = render();
        for line in [
            "kprof_agent_python_walks_total{outcome=\"walked\"} 90",
            "kprof_agent_python_walks_total{outcome=\"no_thread_state\"} 4",
            "kprof_agent_python_walks_total{outcome=\"thread_state_unreadable\"} 1",
            "kprof_agent_python_walks_total{outcome=\"no_python_frame\"} 5",
            "kprof_agent_python_frames_total 900",
            "kprof_agent_python_stack_cuts_total{reason=\"frame_unreadable\"} 2",
            "kprof_agent_python_stack_cuts_total{reason=\"too_deep\"} 3",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
    }
}
