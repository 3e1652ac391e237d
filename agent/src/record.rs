//! One recording session (`kprof-agent record`): target pids or a command, sample for a
//! window, drain and aggregate the events, and write pprof + flame graph.
use std::{
    fs, io,
    io::{IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    process::{Child, ExitStatus},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant, SystemTime},
};

use kprof_common::{Stat, python::PyStat};
use kprof_pprof::views;

use crate::{
    kernel::loader::{KernelCost, LoadError, OffCpuLimits, SamplerConfig},
    pipeline::{
        aggregate::{Aggregator, StackMerger},
        engine::{Engine, EngineConfig},
    },
    pprof,
    profile::{AggregatedProfile, ProfileKind, summary::type_summary},
    targets::{self, TargetError},
};
pub use kprof_crds::ProfileType;

/// How often the ring buffer is drained (the eBPF side never wakes the reader). Each wake-up
/// costs ~65 µs of agent CPU, so this bounds the fixed per-second cost; the ring holds a second
/// of samples at full rate (`loader::ring_size`).
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(250);

/// How long a command has to exit after SIGTERM at the end of a recording.
const CHILD_GRACE: Duration = Duration::from_secs(5);

/// Waits up to `limit` for `c` to exit.
fn wait_at_most(c: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Ok(Some(st)) = c.try_wait() {
            return Some(st);
        }
        if start.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How often the target map is pruned, new children registered and progress shown.
pub const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

/// The steady-state cost is measured from this long after sampling starts (kernel symbols and
/// the first symbolization of each binary happen before) to the end of sampling.
pub const STEADY_AFTER: Duration = Duration::from_secs(3);

/// Errors of a recording session.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("cannot write to {}", dir.display())]
    OutputDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("nothing to profile: give --pid PID or a command after --")]
    NoTarget,
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pprof: {0}")]
    Pprof(#[from] pprof::PprofError),
}

/// Options of `record`.
#[derive(Clone, Debug)]
pub struct RecordOptions {
    pub pids: Vec<u32>,
    pub command: Vec<String>,
    pub duration: Duration,
    pub sample_hz: u32,
    pub follow_children: bool,
    pub python: bool,
    /// Show elapsed time / samples on stderr while recording (when it is a terminal).
    pub progress: bool,
    /// Jitter the sampling clock (see `kernel/clock.rs`); off only to compare with a fixed period.
    pub clock_jitter: bool,
    /// The profile types to write (one profile each), in this order.
    pub types: Vec<ProfileType>,
    /// Off-CPU stack captures per thread (wall and lock profiles).
    pub off_cpu: OffCpuLimits,
    /// Unwind native stacks with `.eh_frame` tables (off: frame pointers only, to compare).
    pub unwind_tables: bool,
    /// Memory profiles: also sample the allocations Python processes report to
    /// `PyTraceMalloc_Track` (NumPy's arrays), one sample per this many bytes on average.
    pub alloc_probes: Option<u64>,
}

impl Default for RecordOptions {
    fn default() -> Self {
        RecordOptions {
            pids: Vec::new(),
            command: Vec::new(),
            duration: Duration::from_secs(10),
            sample_hz: 99,
            follow_children: true,
            python: true,
            progress: true,
            clock_jitter: true,
            types: vec![ProfileType::Cpu],
            off_cpu: OffCpuLimits::default(),
            unwind_tables: true,
            alloc_probes: None,
        }
    }
}

/// Figures of a session.
#[derive(Clone, Debug, Default)]
pub struct SessionStats {
    pub events: u64,
    /// Records read from the kernel (the node agent's `kprof_agent_samples_total`).
    pub records: u64,
    pub distinct_stacks: u64,
    pub dropped: u64,
    pub targeted: u64,
    pub kernel_stack_errors: u64,
    pub user_stack_errors: u64,
    pub children_followed: u64,
    /// Off-CPU source: switch-outs of targeted threads, and those whose stacks were captured.
    pub switch_outs: u64,
    pub switch_outs_captured: u64,
    /// In-kernel cost of the off-CPU program (every context switch on the node).
    pub off_cpu_kernel: KernelCost,
    /// The CPython walker's counters, indexed by `PyStat`.
    pub python: [u64; PyStat::COUNT as usize],
    pub wall: Duration,
    /// User + system CPU of the agent process over the session.
    pub agent_cpu: Duration,
    /// CPU of the agent process from its start until sampling started (programs loaded and
    /// attached, targets in the map): the start-up cost.
    pub startup_cpu: Duration,
    /// Wall time from the start of the session until sampling started.
    pub startup_wall: Duration,
    /// Part of `agent_cpu` spent while sampling (draining, symbolizing new stacks, counting),
    /// without loading the programs and writing the outputs.
    pub loop_cpu: Duration,
    pub peak_rss_kib: u64,
    /// The kernel's counters, indexed by `Stat`.
    pub counters: [u64; Stat::COUNT as usize],
    /// What the unwind-table loader did (`None`: frame pointers only).
    pub unwind: Option<crate::unwind::kernel_tables::LoaderStats>,
    /// The longest time from a process's first sample to its first one unwound with its
    /// mappings loaded.
    pub unwind_delay: Option<Duration>,
    pub kernel: KernelCost,
    /// The cost of sampling once warmed up (from [`STEADY_AFTER`] to the end of sampling): what
    /// a continuous profiler pays per sample. `None` for sessions shorter than that.
    pub steady: Option<SteadyCost>,
}

/// Agent CPU and in-kernel time over the steady part of a session.
#[derive(Clone, Copy, Debug, Default)]
pub struct SteadyCost {
    pub wall: Duration,
    pub events: u64,
    pub agent_cpu: Duration,
    pub kernel_time: Duration,
}

impl SteadyCost {
    /// (agent µs, in-kernel µs) per targeted sample.
    pub fn us_per_sample(&self) -> (f64, f64) {
        let n = self.events.max(1) as f64;
        (
            self.agent_cpu.as_nanos() as f64 / 1000.0 / n,
            self.kernel_time.as_nanos() as f64 / 1000.0 / n,
        )
    }
}

/// A point of the session: (when, agent CPU, in-kernel time, events so far).
type Mark = (Instant, Duration, Duration, u64);

impl SessionStats {
    /// In-kernel time per run of the sampler program (all ticks, targeted or not).
    pub fn kernel_ns_per_run(&self) -> f64 {
        if self.kernel.run_count == 0 {
            0.0
        } else {
            self.kernel.run_time.as_nanos() as f64 / self.kernel.run_count as f64
        }
    }

    /// Agent CPU + in-kernel time, per targeted sample, in µs.
    pub fn total_us_per_sample(&self) -> f64 {
        if self.events == 0 {
            return 0.0;
        }
        (self.agent_cpu + self.kernel.run_time).as_nanos() as f64 / 1000.0 / self.events as f64
    }

    /// A JSON object (for scripts and the benchmark).
    pub fn to_json(&self) -> String {
        let steady = self.steady.unwrap_or_default();
        let (steady_agent, steady_kernel) = steady.us_per_sample();
        let round = |v: f64, places: i32| (v * 10f64.powi(places)).round() / 10f64.powi(places);
        let py = &self.python;
        serde_json::json!({
            "events": self.events,
            "records": self.records,
            "distinct_stacks": self.distinct_stacks,
            "dropped": self.dropped,
            "targeted": self.targeted,
            "kernel_stack_errors": self.kernel_stack_errors,
            "user_stack_errors": self.user_stack_errors,
            "children_followed": self.children_followed,
            "switch_outs": self.switch_outs,
            "switch_outs_captured": self.switch_outs_captured,
            "off_cpu_bpf_run_count": self.off_cpu_kernel.run_count,
            "off_cpu_bpf_run_time_ns": self.off_cpu_kernel.run_time.as_nanos() as u64,
            "python": {
                "walks": py[PyStat::Walks as usize],
                "frames": py[PyStat::Frames as usize],
                "no_thread_state": py[PyStat::NoThreadState as usize],
                "thread_state_unreadable": py[PyStat::TsdReadErr as usize],
                "no_python_frame": py[PyStat::NoFrame as usize],
                "frame_unreadable": py[PyStat::FrameReadErr as usize],
                "too_deep": py[PyStat::Truncated as usize],
            },
            "wall_s": round(self.wall.as_secs_f64(), 3),
            "agent_cpu_s": round(self.agent_cpu.as_secs_f64(), 6),
            "loop_cpu_s": round(self.loop_cpu.as_secs_f64(), 6),
            "startup_cpu_s": round(self.startup_cpu.as_secs_f64(), 6),
            "startup_wall_s": round(self.startup_wall.as_secs_f64(), 3),
            "peak_rss_kib": self.peak_rss_kib,
            "bpf_run_count": self.kernel.run_count,
            "bpf_run_time_ns": self.kernel.run_time.as_nanos() as u64,
            "bpf_ns_per_run": round(self.kernel_ns_per_run(), 1),
            "total_us_per_sample": round(self.total_us_per_sample(), 3),
            "steady_s": round(steady.wall.as_secs_f64(), 3),
            "steady_events": steady.events,
            "steady_agent_us_per_sample": round(steady_agent, 3),
            "steady_bpf_us_per_sample": round(steady_kernel, 3),
            "native": {
                "frames_by_table": self.counters[Stat::FramesByTable as usize],
                "frames_by_frame_pointer": self.counters[Stat::FramesByFramePointer as usize],
                "stacks_truncated": self.counters[Stat::UserTruncated as usize],
                "unwind_misses": self.counters[Stat::UnwindMiss as usize],
                "first_unwound_after_ms": self.unwind_delay.map(|d| round(d.as_secs_f64() * 1e3, 1)),
                "tables": self.unwind.as_ref().map(|u| u.tables),
                "table_rows": self.unwind.as_ref().map(|u| u.rows),
                "table_bytes": self.unwind.as_ref().map(|u| u.rows * 8),
                "files_compiled": self.unwind.as_ref().map(|u| u.compiled),
                "files_sharing_a_table": self.unwind.as_ref().map(|u| u.shared),
                "compile_ms": self.unwind.as_ref().map(|u| round(u.compile_time.as_secs_f64() * 1e3, 1)),
                "tables_refused": self.unwind.as_ref().map(|u| u.refused),
                "tables_evicted": self.unwind.as_ref().map(|u| u.evictions),
            },
        })
        .to_string()
    }
}

/// The result of a session.
pub struct Recording {
    /// One profile per asked type, in the order asked.
    pub profiles: Vec<AggregatedProfile>,
    pub stats: SessionStats,
    /// Exit status of the command, when one was started and has exited.
    pub exit_status: Option<ExitStatus>,
}

impl Recording {
    /// The profile of the first asked type.
    pub fn profile(&self) -> &AggregatedProfile {
        &self.profiles[0]
    }

    /// The profile of one type, if it was asked for.
    pub fn of_type(&self, ty: ProfileType) -> Option<&AggregatedProfile> {
        self.profiles.iter().find(|p| p.kind.name() == ty.as_str())
    }
}

/// Creates `dir` and checks that it is writable, before sampling starts.
pub fn prepare_output_dir(dir: &Path) -> Result<(), RecordError> {
    let err = |source| RecordError::OutputDir {
        dir: dir.to_owned(),
        source,
    };
    fs::create_dir_all(dir).map_err(err)?;
    let probe = dir.join(".kprof-write-test");
    fs::write(&probe, b"").map_err(err)?;
    let _ = fs::remove_file(probe);
    Ok(())
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Runs a session until the duration elapses, `stop` is set, or no target is left.
pub fn record(opts: &RecordOptions, stop: &AtomicBool) -> Result<Recording, RecordError> {
    if opts.pids.is_empty() && opts.command.is_empty() {
        return Err(RecordError::NoTarget);
    }
    let kinds = opts
        .types
        .iter()
        .map(|&t| ProfileKind::of_type(t, opts.sample_hz))
        .collect::<Vec<_>>();
    let kinds = if kinds.is_empty() {
        vec![ProfileKind::Cpu {
            sample_hz: opts.sample_hz,
        }]
    } else {
        kinds
    };
    for &pid in &opts.pids {
        targets::validate_pid(pid)?;
    }
    if let Some(prog) = opts.command.first()
        && targets::find_program(prog).is_none()
    {
        return Err(TargetError::Spawn {
            cmd: opts.command.join(" "),
            source: io::Error::new(
                io::ErrorKind::NotFound,
                "command not found or not executable",
            ),
        }
        .into());
    }
    let session_start = Instant::now();
    let (cpu0, _) = crate::proc::self_usage();
    let mut engine = Engine::start(EngineConfig {
        sampler: SamplerConfig {
            sample_hz: u64::from(opts.sample_hz),
            follow_children: opts.follow_children,
            cgroup_filter: false,
            bpf_stats: true,
            clock_jitter: opts.clock_jitter,
            off_cpu: kinds
                .iter()
                .any(|k| k.needs_off_cpu())
                .then_some(opts.off_cpu),
            threads: kinds.iter().any(|k| k.needs_thread_events()),
            unwind_tables: opts.unwind_tables,
            page_faults: kinds.iter().find_map(|k| k.fault_period()),
            alloc_probes: opts.alloc_probes,
        },
        python: opts.python,
        python_wait: Some(PYTHON_WAIT),
    })?;
    let mut agg = Aggregator::new();
    if engine.has_thread_events() {
        agg.track_threads();
        if let Some(ledger) = agg.threads() {
            ledger.set_idle_after(opts.duration / 2);
        }
    }
    if engine.has_page_faults() {
        agg.track_memory(None);
    }

    let mut child: Option<Child> = None;
    let mut pids = opts.pids.clone();
    if !opts.command.is_empty() {
        let c = targets::spawn_stopped(&opts.command)?;
        pids.push(c.id());
        child = Some(c);
    }
    engine.probe_allocations_of(0);
    for &pid in &pids {
        engine.add_target(pid, 0)?;
    }
    if let Some(c) = &child {
        targets::resume(c);
        // Look for an interpreter now, not at the first drain: its samples carry Python frames
        // from its first milliseconds, and workers it forks inherit the walker in kernel.
        engine.detect(c.id());
    }
    for &pid in &pids {
        engine.probe_process(pid, 0);
    }
    for &pid in &opts.pids {
        see_process(&mut engine, &mut agg, pid);
    }

    // Sampling runs from here.
    let start = Instant::now();
    let startup_wall = session_start.elapsed();
    let wall_start = SystemTime::now();
    let (loop_cpu0, _) = crate::proc::self_usage();
    tracing::debug!(cpu = ?loop_cpu0, wall = ?startup_wall, "sampling started");
    // Kernel symbols while the first samples collect in the ring, not before sampling (start-up)
    // nor at the first kernel frame mid-session (the steady-state cost and peak RSS).
    crate::symbolize::kallsyms::shared();
    let progress = opts.progress && io::stderr().is_terminal();
    let mut last_housekeeping = Instant::now();
    let mut exit_status = None;
    let mark = |engine: &Engine, agg: &Aggregator| -> Mark {
        (
            Instant::now(),
            crate::proc::self_usage().0,
            engine.kernel_cost().run_time,
            agg.total(),
        )
    };
    let mut steady_from: Option<Mark> = None;
    loop {
        let elapsed = start.elapsed();
        if elapsed >= opts.duration || stop.load(Ordering::Relaxed) {
            break;
        }
        engine.wait((opts.duration - elapsed).min(DRAIN_INTERVAL));
        drain(&mut engine, &mut agg);
        // Resident memory a few times a second: each second keeps its least reading.
        engine.checkpoint_memory(&mut agg);

        if last_housekeeping.elapsed() >= HOUSEKEEPING_INTERVAL {
            last_housekeeping = Instant::now();
            if let (Some(c), None) = (child.as_mut(), exit_status) {
                exit_status = c.try_wait().ok().flatten();
            }
            // Off-CPU time in progress or not captured, so far (and exited threads forgotten).
            engine.settle_off_cpu(|ev, merger| agg.add(ev, merger));
            engine.checkpoint_threads(&mut agg);
            // Exited processes leave the target map; new children are registered while alive.
            let live = engine.prune(Engine::is_live_target);
            for &pid in &live {
                see_process(&mut engine, &mut agg, pid);
            }
            if progress {
                eprint!(
                    "\r\x1b[2Krecording {:>5.1}s / {:.0}s   samples {:>7}   processes {}",
                    start.elapsed().as_secs_f64(),
                    opts.duration.as_secs_f64(),
                    agg.total(),
                    agg.process_count().max(live.len()),
                );
                let _ = io::stderr().flush();
            }
            if live.is_empty() {
                break; // every target exited
            }
            if steady_from.is_none() && start.elapsed() >= STEADY_AFTER {
                steady_from = Some(mark(&engine, &agg));
            }
        }
    }
    let wall = start.elapsed();
    let kernel = engine.kernel_cost();
    drain(&mut engine, &mut agg);
    engine.settle_off_cpu(|ev, merger| agg.add(ev, merger));
    engine.close_threads(&mut agg);
    engine.close_memory(&mut agg);
    let (loop_cpu1, _) = crate::proc::self_usage();
    let steady = steady_from.map(|(t0, cpu0, k0, n0)| {
        let (t1, cpu1, k1, n1) = mark(&engine, &agg);
        SteadyCost {
            wall: t1 - t0,
            events: n1 - n0,
            agent_cpu: cpu1.saturating_sub(cpu0),
            kernel_time: k1.saturating_sub(k0),
        }
    });
    if progress {
        eprintln!();
    }
    if let Some(mut c) = child {
        if exit_status.is_none() {
            exit_status = c.try_wait().ok().flatten();
        }
        if exit_status.is_none() {
            // SAFETY: signal to our own child.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            exit_status = wait_at_most(&mut c, CHILD_GRACE);
        }
        if exit_status.is_none() {
            // It ignores SIGTERM — e.g. `unshare --pid --fork`, which waits for a child that is
            // PID 1 of its namespace and so ignores it too: the command and everything it
            // started (the followed targets) are killed.
            tracing::warn!(pid = c.id(), grace = ?CHILD_GRACE, "the command ignored SIGTERM: killing it and its children");
            for pid in engine.target_pids().into_iter().chain([c.id()]) {
                // SAFETY: signals to processes of our own child's tree.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
            exit_status = c.wait().ok();
        }
    }

    let counters = engine.counters().clone();
    let node = hostname();
    let profiles: Vec<AggregatedProfile> = kinds
        .iter()
        .map(|&kind| {
            let mut profile = agg.finish(kind, wall_start);
            // Interpreters found later by the background watcher (a child that exec'ed python,
            // an interpreter still initialising at first sight) name their runtime too.
            for (pid, meta) in profile.processes.iter_mut() {
                if meta.runtime.is_none() {
                    meta.runtime = engine.runtime(*pid).map(|r| r.display);
                }
            }
            profile.duration = wall;
            profile.labels.node.clone_from(&node);
            profile.dropped = counters.stat(Stat::Dropped);
            let mut warnings = engine.warnings.clone();
            warnings.append(&mut profile.warnings);
            profile.warnings = warnings;
            if profile.dropped > 0 {
                profile.warnings.push(format!(
                    "{} events dropped in kernel (ring buffer full)",
                    profile.dropped
                ));
            }
            profile
        })
        .collect();
    let (cpu1, rss) = crate::proc::self_usage();
    let stats = SessionStats {
        events: agg.stats.events,
        records: agg.stats.records,
        distinct_stacks: agg.stats.distinct_stacks,
        dropped: counters.stat(Stat::Dropped),
        switch_outs: counters.stat(Stat::SwitchOuts),
        switch_outs_captured: counters.stat(Stat::SwitchOutsCaptured),
        off_cpu_kernel: engine.off_cpu_cost(),
        targeted: counters.stat(Stat::Targeted),
        kernel_stack_errors: counters.stat(Stat::KernelStackErr),
        user_stack_errors: counters.stat(Stat::UserStackErr),
        children_followed: counters.stat(Stat::ChildrenFollowed),
        python: counters.python,
        wall,
        agent_cpu: cpu1.saturating_sub(cpu0),
        loop_cpu: loop_cpu1.saturating_sub(loop_cpu0),
        startup_cpu: loop_cpu0,
        startup_wall,
        peak_rss_kib: rss,
        counters: counters.stats,
        unwind: engine.unwind_stats(),
        unwind_delay: engine
            .unwind_delays()
            .into_iter()
            .filter_map(|(_, d)| d)
            .max(),
        kernel,
        steady,
    };
    Ok(Recording {
        profiles,
        stats,
        exit_status,
    })
}

/// How long `record` waits for an interpreter that is still initialising when it first sees
/// its process.
const PYTHON_WAIT: Duration = Duration::from_secs(2);

fn drain(engine: &mut Engine, agg: &mut Aggregator) {
    let records = engine.drain(|ev, merger| agg.add(ev, merger));
    agg.stats.records += records;
    for (pid, warning) in engine.take_process_warnings() {
        agg.add_warnings(pid, vec![warning]);
    }
    agg.new_round();
}

/// Registers a process with the aggregation while it is alive (name, maps, runtime).
fn see_process(engine: &mut Engine, agg: &mut Aggregator, pid: u32) {
    let mut merger = engine.merger();
    agg.see_process(pid, merger.as_mut().map(|m| m as &mut dyn StackMerger));
}

/// Writes, per profile type, `<type>.pb.gz` and `<type>.svg` (the CPU profile also as
/// `profile.pb.gz` and `flamegraph.svg`), and `summary.json` with the session's figures and a
/// section per type.
pub fn write_outputs(rec: &Recording, dir: &Path, title: &str) -> Result<(), RecordError> {
    let werr = |path: PathBuf| move |source| RecordError::Write { path, source };
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        fs::write(&path, bytes).map_err(werr(path.clone()))
    };
    let mut summary: serde_json::Value =
        serde_json::from_str(&rec.stats.to_json()).expect("the stats are JSON");
    for profile in &rec.profiles {
        let name = profile.kind.name();
        let pprof = pprof::build(profile);
        let gz = pprof.encode_gzip();
        let stacks = views::Stacks::from_profile(&pprof, pprof.default_value_index());
        let svg = views::flamegraph_svg(&stacks, &format!("{title} ({name})"));
        write(&format!("{name}.pb.gz"), &gz)?;
        write(&format!("{name}.svg"), &svg)?;
        if matches!(profile.kind, ProfileKind::Cpu { .. }) {
            write("profile.pb.gz", &gz)?;
            write("flamegraph.svg", &svg)?;
        }
        summary[name] = type_summary(profile);
    }
    write("summary.json", summary.to_string().as_bytes())
}

/// The top table text of each profile of a recording, headed by its type.
pub fn top_table(rec: &Recording, limit: usize) -> String {
    let mut out = String::new();
    for p in &rec.profiles {
        let pprof = pprof::build(p);
        let stacks = views::Stacks::from_profile(&pprof, pprof.default_value_index());
        if rec.profiles.len() > 1 {
            out.push_str(&format!("== {} ==\n", p.kind.name()));
        }
        out.push_str(&views::TopReport::new(&stacks, limit).table());
    }
    out
}
