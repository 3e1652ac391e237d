//! The one engine both drivers (`record`, the node daemon) run: it owns the eBPF programs, the
//! runtimes (Python), ring-buffer draining and decoding, the target map and the kernel
//! counters. Drivers decide *which* processes are targets and where each event goes.
use std::time::Duration;

use kprof_common::{Stat, TargetSlot, python::PyStat};

use super::{
    aggregate::StackMerger,
    event::{Decoder, Event, EventKind},
    offcpu::{BlockedThread, OffCpuTracker},
    threads::ThreadRegistry,
};
use crate::{
    kernel::loader::{KernelCost, LoadError, Sampler, SamplerConfig},
    profile::Frame,
    python::{PythonSupport, RuntimeInfo},
    targets,
    unwind::kernel_tables::{self, KernelTables, LoaderStats},
};

/// What the engine runs.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    pub sampler: SamplerConfig,
    /// Walk and resolve Python frames.
    pub python: bool,
    /// How long a new target that is an initialising interpreter is waited for (it is looked at
    /// again in the background after that). `None`: processes first seen in events are not
    /// examined at all, only those made targets (the daemon's thread must not block).
    pub python_wait: Option<Duration>,
}

/// Kernel counters summed over the life of the engine (they restart from zero in kernel when
/// the programs are reloaded).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Indexed by [`Stat`].
    pub stats: [u64; Stat::COUNT as usize],
    /// Indexed by [`PyStat`].
    pub python: [u64; PyStat::COUNT as usize],
    /// In-kernel run time of the sampler program (only counted while `bpf_stats` is on).
    pub bpf_run_time: Duration,
    /// The readings of the current programs, subtracted from the next ones.
    last_stats: [u64; Stat::COUNT as usize],
    last_python: [u64; PyStat::COUNT as usize],
    last_run_time: Duration,
}

impl Counters {
    pub fn stat(&self, s: Stat) -> u64 {
        self.stats[s as usize]
    }

    fn read(&mut self, sampler: &Sampler) {
        for s in Stat::ALL {
            let now = sampler.stat(s);
            self.stats[s as usize] += now.saturating_sub(self.last_stats[s as usize]);
            self.last_stats[s as usize] = now;
        }
        for s in PyStat::ALL {
            let now = sampler.py_stat(s);
            self.python[s as usize] += now.saturating_sub(self.last_python[s as usize]);
            self.last_python[s as usize] = now;
        }
        let now = sampler.kernel_cost().run_time;
        self.bpf_run_time += now.saturating_sub(self.last_run_time);
        self.last_run_time = now;
    }

    /// New programs: their counters start from zero.
    fn restart(&mut self) {
        self.last_stats = [0; Stat::COUNT as usize];
        self.last_python = [0; PyStat::COUNT as usize];
        self.last_run_time = Duration::ZERO;
    }
}

/// The Python support as the aggregation's stack merger (the only adapter).
pub struct PythonMerger<'a> {
    py: &'a mut PythonSupport,
    /// See [`EngineConfig::python_wait`].
    wait: Option<Duration>,
}

impl StackMerger for PythonMerger<'_> {
    fn on_exec(&mut self, pid: u32) {
        self.py.on_exec(pid); // the background watcher looks at the new image
    }

    fn on_process(&mut self, pid: u32) -> Option<(String, Vec<String>)> {
        let info = match self.wait {
            Some(wait) => self.py.detect(pid, wait),
            None => self.py.runtime(pid),
        };
        info.map(|r| (r.display, r.warnings))
    }

    fn merge(
        &mut self,
        pid: u32,
        native: Vec<Frame>,
        py: kprof_common::python::PyFrames<'_>,
    ) -> Vec<Frame> {
        self.py.merge(pid, native, py)
    }

    fn gil(&mut self, pid: u32) -> Option<std::ops::Range<u64>> {
        self.py.gil(pid)
    }

    fn thread_name(&mut self, pid: u32, tid: u32) -> Option<std::sync::Arc<str>> {
        self.py.thread_name(pid, tid)
    }

    fn forget_thread_names(&mut self, pid: u32) {
        self.py.forget_names(pid);
    }

    fn thread_stack(&mut self, pid: u32, tid: u32) -> Option<Vec<Frame>> {
        self.py.thread_stack(pid, tid)
    }

    fn runtime_heap(&mut self, pid: u32) -> Option<Result<u64, String>> {
        self.py.python_heap(pid)
    }
}

/// A process in the target map, as seen by [`Engine::prune`].
#[derive(Clone, Copy, Debug)]
pub struct TargetState {
    pub pid: u32,
    pub slot: TargetSlot,
    /// `Some((tgid, alive))` while `/proc/<pid>` exists.
    pub proc: Option<(u32, bool)>,
}

/// The loaded programs and the runtimes.
pub struct Engine {
    cfg: EngineConfig,
    sampler: Sampler,
    python: Option<PythonSupport>,
    /// The `.eh_frame` tables of the targets' executables, in kernel.
    unwind: Option<KernelTables>,
    /// Per process: when its first sample came (`Err`), then how long after it the first one
    /// unwound with its mappings loaded came (`Ok`, ns).
    unwind_delay: std::collections::HashMap<u32, Result<u64, u64>>,
    counters: Counters,
    /// Set-up warnings for the user (children not followed, Python frames disabled, ...).
    pub warnings: Vec<String>,
    /// Records that did not decode (never expected; counted, not trusted).
    pub malformed: u64,
    decoder: Decoder,
    off_cpu: OffCpuTracker,
    /// When each process became a target (CLOCK_MONOTONIC ns).
    targeted_at: std::collections::HashMap<u32, u64>,
    /// Who created each thread, across windows (threads profiles).
    threads: ThreadRegistry,
    /// Processes whose events panicked the pipeline: their later events are dropped.
    pub quarantine: Quarantine,
    /// Allocation probes: the target slots whose processes get them, the processes seen in
    /// their events and not looked at yet, and those looked at (probed, or not probeable).
    probe_slots: std::collections::HashSet<u32>,
    probe_candidates: std::collections::HashSet<u32>,
    probe_done: std::collections::HashSet<u32>,
    probe_sweep: u32,
    /// Processes that could not be given allocation probes, and why: said on their Profiles
    /// of every window while they live.
    probe_refused: std::collections::HashMap<u32, String>,
}

/// Processes whose data made per-event work panic (a parser meeting bytes nobody foresaw). The
/// sampling thread survives: the event is dropped, the process is set aside with a warning and
/// a metric, and every other process keeps being profiled.
#[derive(Debug, Default)]
pub struct Quarantine {
    pids: std::collections::HashSet<u32>,
}

impl Quarantine {
    /// Runs `work` for an event of `pid`, unless `pid` is set aside; a panic sets it aside.
    pub fn run(&mut self, pid: u32, work: impl FnOnce()) {
        if self.pids.contains(&pid) {
            return;
        }
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).is_err() {
            crate::metrics::error("panic");
            tracing::warn!(
                pid,
                "an internal error while handling this process's data: it is no longer profiled"
            );
            self.pids.insert(pid);
        }
    }

    pub fn contains(&self, pid: u32) -> bool {
        self.pids.contains(&pid)
    }

    /// Forgets processes that exited (their pids may be reused).
    pub fn retain_alive(&mut self) {
        self.pids.retain(|p| crate::proc::is_alive(*p));
    }
}

impl Engine {
    /// Loads and attaches the programs and sets up the runtimes.
    pub fn start(cfg: EngineConfig) -> Result<Engine, LoadError> {
        let (mut sampler, python, mut warnings) = Self::load(&cfg)?;
        let unwind = if cfg.sampler.unwind_tables {
            match start_unwind(&mut sampler) {
                Ok(u) => Some(u),
                Err(e) => {
                    warnings.push(format!(
                        "native stacks are walked by frame pointers only: the unwind tables could \
                         not be set up ({e})"
                    ));
                    None
                }
            }
        } else {
            None
        };
        Ok(Engine {
            cfg,
            sampler,
            python,
            unwind,
            unwind_delay: Default::default(),
            counters: Counters::default(),
            warnings,
            malformed: 0,
            decoder: Decoder::default(),
            off_cpu: OffCpuTracker::default(),
            targeted_at: Default::default(),
            threads: ThreadRegistry::default(),
            quarantine: Quarantine::default(),
            probe_slots: Default::default(),
            probe_candidates: Default::default(),
            probe_done: Default::default(),
            probe_sweep: 0,
            probe_refused: Default::default(),
        })
    }

    fn load(
        cfg: &EngineConfig,
    ) -> Result<(Sampler, Option<PythonSupport>, Vec<String>), LoadError> {
        let cpu0 = crate::proc::self_usage().0;
        let mut sampler = Sampler::load_with(&cfg.sampler, cfg.python)?;
        let cpu1 = crate::proc::self_usage().0;
        let mut warnings = sampler.warnings.clone();
        let python = if cfg.python && sampler.python_walker {
            match PythonSupport::new(&mut sampler.bpf) {
                Ok(p) => Some(p),
                Err(e) => {
                    warnings.push(format!("python frames disabled: {e}"));
                    None
                }
            }
        } else {
            None
        };
        tracing::debug!(
            programs = ?cpu1.saturating_sub(cpu0),
            python = ?crate::proc::self_usage().0.saturating_sub(cpu1),
            "engine loaded (CPU)"
        );
        Ok((sampler, python, warnings))
    }

    /// Reloads the programs at another sampling rate, with or without the off-CPU source, the
    /// thread events and the memory source (targets must be added again); the counters and
    /// what is known of threads carry on. The old programs are detached first: one sampler
    /// per node.
    pub fn restart(
        mut self,
        sample_hz: u64,
        off_cpu: Option<crate::kernel::loader::OffCpuLimits>,
        threads: bool,
        page_faults: Option<u64>,
        alloc_probes: Option<u64>,
    ) -> Result<Engine, LoadError> {
        self.counters.read(&self.sampler);
        let mut counters = self.counters.clone();
        counters.restart();
        let mut cfg = self.cfg;
        cfg.sampler.sample_hz = sample_hz;
        cfg.sampler.off_cpu = off_cpu;
        cfg.sampler.threads = threads;
        cfg.sampler.page_faults = page_faults;
        cfg.sampler.alloc_probes = alloc_probes;
        let registry = std::mem::take(&mut self.threads);
        drop(self);
        let mut engine = Engine::start(cfg)?;
        engine.counters = counters;
        engine.threads = registry;
        Ok(engine)
    }

    /// The CPU sampling rate.
    pub fn sample_hz(&self) -> u32 {
        u32::try_from(self.cfg.sampler.sample_hz).unwrap_or(u32::MAX)
    }

    /// Nanoseconds of CPU one sample stands for.
    pub fn cpu_period_ns(&self) -> u64 {
        1_000_000_000 / self.cfg.sampler.sample_hz.max(1)
    }

    /// Makes `pid` (all its threads) a target, attributed to `slot`.
    pub fn add_target(&mut self, pid: u32, slot: u32) -> Result<(), LoadError> {
        self.sampler.add_pid(pid, slot)?;
        if let Some(u) = self.unwind.as_mut() {
            u.add_process(pid);
        }
        self.targeted_at
            .entry(pid)
            .or_insert_with(crate::proc::monotonic_ns);
        Ok(())
    }

    /// Looks for an interpreter in `pid` at once, so that its samples carry Python frames
    /// from the start and the workers it forks inherit the walker in kernel.
    pub fn detect(&mut self, pid: u32) -> Option<RuntimeInfo> {
        let wait = self.cfg.python_wait.unwrap_or(Duration::ZERO);
        self.python.as_mut().and_then(|py| py.detect(pid, wait))
    }

    /// The stack merger of the runtimes, for aggregation outside [`Engine::drain`].
    pub fn merger(&mut self) -> Option<PythonMerger<'_>> {
        let wait = self.cfg.python_wait;
        self.python.as_mut().map(|py| PythonMerger { py, wait })
    }

    /// What is known about the runtime of `pid`.
    pub fn runtime(&self, pid: u32) -> Option<RuntimeInfo> {
        self.python.as_ref().and_then(|py| py.runtime(pid))
    }

    /// Processes with a detected interpreter.
    pub fn python_processes(&self) -> usize {
        self.python.as_ref().map_or(0, PythonSupport::process_count)
    }

    /// Waits up to `timeout` for events (the programs never wake the reader: this bounds the
    /// agent's fixed cost per second).
    pub fn wait(&self, timeout: Duration) {
        let mut pfd = libc::pollfd {
            fd: self.sampler.events_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().clamp(1, 60_000) as i32) };
    }

    /// Decodes every pending record and hands each event, with the stack merger, to `sink`
    /// (off-CPU records go through the off-CPU tracker first). Returns the number of records.
    pub fn drain(&mut self, mut sink: impl FnMut(&Event<'_>, Option<&mut dyn StackMerger>)) -> u64 {
        self.sampler.rearm_clocks();
        let period = self.cpu_period_ns();
        let wait = self.cfg.python_wait;
        let Engine {
            sampler,
            python,
            unwind,
            unwind_delay,
            malformed,
            decoder,
            off_cpu,
            threads,
            quarantine,
            probe_slots,
            probe_candidates,
            probe_done,
            ..
        } = self;
        // An interpreter's GIL created since its detection is looked for before this drain's
        // events are classified (a futex inside it is a GIL wait).
        if let Some(py) = python.as_ref() {
            py.find_missing_gils();
        }
        let mut merger = python.as_mut().map(|py| PythonMerger { py, wait });
        let mut n = 0;
        while let Some(item) = sampler.events.next() {
            match decoder.decode(&item, period) {
                Ok(ev) => {
                    n += 1;
                    if !probe_slots.is_empty()
                        && probe_slots.contains(&ev.slot)
                        && !probe_done.contains(&ev.tgid)
                    {
                        probe_candidates.insert(ev.tgid);
                    }
                    if let Some(u) = unwind.as_mut() {
                        if ev.unwind_miss {
                            u.on_miss(ev.tgid);
                        }
                        if ev.kind == EventKind::CpuSample {
                            note_unwind_delay(unwind_delay, &ev);
                        }
                    }
                    quarantine.run(ev.tgid, || match ev.kind {
                        EventKind::OffCpu | EventKind::OffCpuEnd => off_cpu.on_record(&ev, |e| {
                            sink(e, merger.as_mut().map(|m| m as &mut dyn StackMerger))
                        }),
                        EventKind::CpuSample
                        | EventKind::PageFault
                        | EventKind::MemGrow
                        | EventKind::MemRelease
                        | EventKind::AllocSample
                        | EventKind::AllocFree => {
                            sink(&ev, merger.as_mut().map(|m| m as &mut dyn StackMerger))
                        }
                        EventKind::ThreadStart | EventKind::ThreadExit => {
                            threads
                                .on_event(&ev, merger.as_mut().map(|m| m as &mut dyn StackMerger));
                            sink(&ev, merger.as_mut().map(|m| m as &mut dyn StackMerger))
                        }
                    });
                }
                Err(_) => *malformed += 1,
            }
        }
        threads.new_round();
        quarantine.retain_alive();
        self.probe_candidates_now();
        n
    }

    /// Gives the processes of target `slot` allocation probes (when loaded), from their next
    /// event on.
    pub fn probe_allocations_of(&mut self, slot: u32) {
        if self.sampler.has_alloc_probes() {
            self.probe_slots.insert(slot);
        }
    }

    /// Probes `pid` now if its target's processes get allocation probes (a process just
    /// detected need not wait for its first event).
    pub fn probe_process(&mut self, pid: u32, slot: u32) {
        if self.probe_slots.contains(&slot) && !self.probe_done.contains(&pid) {
            self.probe_candidates.insert(pid);
            self.probe_candidates_now();
        }
    }

    /// Whether the allocation probes are loaded.
    pub fn has_alloc_probes(&self) -> bool {
        self.sampler.has_alloc_probes()
    }

    /// Attaches the allocation probes to the candidates whose interpreter is detected; a
    /// process that cannot be probed gets a warning, once.
    fn probe_candidates_now(&mut self) {
        // Exited processes: their probes go (every 256 drains, a few seconds), their pids may
        // come back as others.
        self.probe_sweep = self.probe_sweep.wrapping_add(1);
        if self.probe_sweep.is_multiple_of(256) && !self.probe_done.is_empty() {
            self.sampler.unprobe_gone(crate::proc::is_alive);
            self.probe_done.retain(|&p| crate::proc::is_alive(p));
            self.probe_refused.retain(|p, _| crate::proc::is_alive(*p));
        }
        if self.probe_candidates.is_empty() {
            return;
        }
        let Some(py) = self.python.as_ref() else {
            self.probe_candidates.clear();
            return;
        };
        for pid in std::mem::take(&mut self.probe_candidates) {
            let outcome = match py.alloc_probe_points(pid) {
                // No interpreter ready (yet, or not Python): looked at again at its next event.
                Ok(None) if crate::proc::is_alive(pid) => continue,
                Ok(None) => Ok(()),
                Ok(Some(at)) => self
                    .sampler
                    .probe_allocations(pid, &at.file, at.track, at.untrack),
                Err(e) => Err(e),
            };
            self.probe_done.insert(pid);
            if let Err(e) = outcome {
                crate::metrics::error("alloc_probe");
                tracing::warn!(pid, "no allocation probes: {e}");
                self.probe_refused
                    .insert(pid, format!("no allocation probes: {e}"));
            }
        }
    }

    /// Whether thread creations and exits are recorded.
    pub fn has_thread_events(&self) -> bool {
        self.sampler.thread_events
    }

    /// Whether the memory source (sampled page faults) is attached.
    pub fn has_page_faults(&self) -> bool {
        self.sampler.has_faults()
    }

    /// The memory source's period in faults (`None`: not attached).
    pub fn fault_period(&self) -> Option<u64> {
        self.cfg
            .sampler
            .page_faults
            .filter(|_| self.sampler.has_faults())
    }

    /// Run count and run time of the memory source's program of the current load.
    pub fn fault_cost(&self) -> KernelCost {
        self.sampler.fault_cost()
    }

    /// Counts the threads of every process of `agg`'s window now, and learns their names.
    pub fn checkpoint_threads(&mut self, agg: &mut crate::pipeline::aggregate::Aggregator) {
        let wait = self.cfg.python_wait;
        let mut merger = self.python.as_mut().map(|py| PythonMerger { py, wait });
        if let Some(ledger) = agg.threads() {
            ledger.checkpoint(merger.as_mut().map(|m| m as &mut dyn StackMerger));
        }
    }

    /// Closes the thread accounting of `agg`'s window (its threads profile's report).
    pub fn close_threads(&mut self, agg: &mut crate::pipeline::aggregate::Aggregator) {
        let wait = self.cfg.python_wait;
        let mut merger = self.python.as_mut().map(|py| PythonMerger { py, wait });
        agg.close_threads(
            &mut self.threads,
            merger.as_mut().map(|m| m as &mut dyn StackMerger),
        );
        self.threads.sweep(crate::proc::monotonic_ns());
    }

    /// Reads the memory of every process of `agg`'s window now (memory profiles).
    pub fn checkpoint_memory(&mut self, agg: &mut crate::pipeline::aggregate::Aggregator) {
        let wait = self.cfg.python_wait;
        let mut merger = self.python.as_mut().map(|py| PythonMerger { py, wait });
        if let Some(ledger) = agg.memory() {
            ledger.checkpoint(merger.as_mut().map(|m| m as &mut dyn StackMerger));
        }
    }

    /// Closes the memory accounting of `agg`'s window (its memory profile's report).
    pub fn close_memory(&mut self, agg: &mut crate::pipeline::aggregate::Aggregator) {
        let wait = self.cfg.python_wait;
        let mut merger = self.python.as_mut().map(|py| PythonMerger { py, wait });
        agg.close_memory(merger.as_mut().map(|m| m as &mut dyn StackMerger));
    }

    /// Reports the off-CPU time that has passed and is not in events yet (waits in progress,
    /// uncaptured waits), as of now, to `sink`; forgets the threads that exited. Call it after
    /// a drain, at least once per window and at its end.
    pub fn settle_off_cpu(
        &mut self,
        mut sink: impl FnMut(&Event<'_>, Option<&mut dyn StackMerger>),
    ) {
        if !self.sampler.has_off_cpu() {
            return;
        }
        let threads = self.sampler.off_cpu_threads();
        let now = crate::proc::monotonic_ns();
        // Threads blocked since before profiling began: the kernel has not seen them yet.
        let known: std::collections::HashSet<u32> = threads.iter().map(|(t, _)| *t).collect();
        let mut blocked = Vec::new();
        for (pid, slot) in self.sampler.target_pids() {
            for t in crate::proc::sleeping_threads(pid, |tid| known.contains(&tid)) {
                blocked.push(BlockedThread {
                    tid: t.tid,
                    tgid: pid,
                    slot: slot.slot,
                    comm: t.comm,
                    wait: kprof_common::wait::of(t.state, t.syscall.map(|s| s.0)),
                    addr: t.syscall.map_or(0, |s| s.1),
                    since: self.targeted_at.get(&pid).copied().unwrap_or(now),
                });
            }
        }
        let wait = self.cfg.python_wait;
        let Engine {
            python, off_cpu, ..
        } = self;
        let mut merger = python.as_mut().map(|py| PythonMerger { py, wait });
        off_cpu.tick(now, &threads, crate::proc::thread_comm, |e| {
            sink(e, merger.as_mut().map(|m| m as &mut dyn StackMerger))
        });
        off_cpu.tick_blocked(now, &blocked, |e| {
            sink(e, merger.as_mut().map(|m| m as &mut dyn StackMerger))
        });
        // Entries of exited threads: settled above, removed now (the map stays small).
        for (tid, t) in &threads {
            if !crate::proc::thread_exists(t.tgid, *tid) {
                self.sampler.forget_off_cpu_thread(*tid);
            }
        }
    }

    /// Whether the off-CPU source is attached.
    pub fn has_off_cpu(&self) -> bool {
        self.sampler.has_off_cpu()
    }

    /// Run count and run time of the off-CPU program of the current load.
    pub fn off_cpu_cost(&self) -> KernelCost {
        self.sampler.off_cpu_cost()
    }

    /// The off-CPU tracker's counters.
    pub fn off_cpu_stats(&self) -> super::offcpu::OffCpuStats {
        self.off_cpu.stats
    }

    /// Walks the target map: entries `keep` refuses are removed (and their runtime state
    /// dropped when the process is gone). Returns the pids kept.
    pub fn prune(&mut self, mut keep: impl FnMut(&TargetState) -> bool) -> Vec<u32> {
        let mut kept = Vec::new();
        for (pid, slot) in self.sampler.target_pids() {
            let state = TargetState {
                pid,
                slot,
                proc: targets::proc_state(pid),
            };
            if keep(&state) {
                kept.push(pid);
                continue;
            }
            self.sampler.remove_pid(pid);
            self.targeted_at.remove(&pid);
            if let Some(u) = self.unwind.as_mut() {
                u.forget(pid);
            }
            if state.proc.is_none()
                && let Some(py) = self.python.as_mut()
            {
                py.on_exit(pid);
            }
        }
        kept
    }

    /// The processes (and followed threads) in the target map now.
    pub fn target_pids(&self) -> Vec<u32> {
        self.sampler
            .target_pids()
            .into_iter()
            .map(|(p, _)| p)
            .collect()
    }

    /// The default pruning rule: exited processes go, and so do the fork follower's entries
    /// for threads.
    pub fn is_live_target(t: &TargetState) -> bool {
        targets::prune_decision(
            t.pid,
            t.slot.inherited != 0,
            t.proc.map(|s| s.0),
            t.proc.is_some_and(|s| s.1),
        ) == targets::Prune::Keep
    }

    /// Reads the kernel counters and returns their totals.
    pub fn counters(&mut self) -> &Counters {
        self.counters.read(&self.sampler);
        &self.counters
    }

    /// Run count and run time of the sampler program of the current load.
    pub fn kernel_cost(&self) -> KernelCost {
        self.sampler.kernel_cost()
    }

    /// What the unwind-table loader has done (`None`: frame pointers only).
    pub fn unwind_stats(&self) -> Option<LoaderStats> {
        self.unwind.as_ref().map(KernelTables::stats)
    }

    /// Waits up to `timeout` for the unwind-table loader to finish the work asked of it.
    pub fn settle_unwind(&self, timeout: Duration) -> bool {
        self.unwind.as_ref().is_none_or(|u| u.settle(timeout))
    }

    /// For each process sampled so far, how long after its first sample the first one came
    /// that was unwound with its mappings loaded (`None`: none yet).
    pub fn unwind_delays(&self) -> Vec<(u32, Option<Duration>)> {
        self.unwind_delay
            .iter()
            .map(|(pid, d)| (*pid, d.ok().map(Duration::from_nanos)))
            .collect()
    }

    /// Warnings for the profiles of each process: of the unwind-table loader since the last
    /// call, and of the processes that could not be given allocation probes (every call).
    pub fn take_process_warnings(&mut self) -> Vec<(u32, String)> {
        let mut out = self
            .unwind
            .as_ref()
            .map(KernelTables::take_warnings)
            .unwrap_or_default();
        out.extend(self.probe_refused.iter().map(|(p, w)| (*p, w.clone())));
        out
    }
}

/// Notes a CPU sample for [`Engine::unwind_delays`].
fn note_unwind_delay(
    delays: &mut std::collections::HashMap<u32, Result<u64, u64>>,
    ev: &Event<'_>,
) {
    let entry = delays.entry(ev.tgid).or_insert(Err(ev.timestamp_ns));
    if let Err(first) = *entry
        && !ev.unwind_miss
    {
        *entry = Ok(ev.timestamp_ns.saturating_sub(first));
    }
}

/// Takes the unwinder's maps from the loaded object and starts the table loader.
fn start_unwind(sampler: &mut Sampler) -> Result<KernelTables, String> {
    let mut take = |name: &'static str| {
        sampler
            .bpf
            .take_map(name)
            .ok_or_else(|| format!("the eBPF object has no map {name}"))
    };
    let rows = take(kernel_tables::MAP_ROWS)?;
    let tables = take(kernel_tables::MAP_TABLES)?;
    let procs = take(kernel_tables::MAP_PROCS)?;
    let aya::maps::Map::Array(rows) = rows else {
        return Err(format!("{} is not an array", kernel_tables::MAP_ROWS));
    };
    KernelTables::start(
        rows,
        tables
            .try_into()
            .map_err(|e: aya::maps::MapError| e.to_string())?,
        procs
            .try_into()
            .map_err(|e: aya::maps::MapError| e.to_string())?,
    )
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_whose_event_panics_is_set_aside_and_the_others_go_on() {
        let me = std::process::id();
        let mut dead = std::process::Command::new("true").spawn().unwrap();
        let gone = dead.id();
        dead.wait().unwrap();
        let mut q = Quarantine::default();
        let mut handled = Vec::new();
        for pid in [me, gone] {
            q.run(pid, || panic!("a parser met bytes nobody foresaw"));
        }
        q.run(me, || handled.push(me));
        q.run(1, || handled.push(1));
        assert_eq!(handled, [1], "the set-aside process's events are dropped");
        assert!(q.contains(me) && q.contains(gone));
        q.retain_alive();
        assert!(
            q.contains(me) && !q.contains(gone),
            "a gone pid may be reused"
        );
    }
}
