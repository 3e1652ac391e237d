//! The sampling thread of `kprof-agent run`: it drives the [`Engine`] for the whole node and
//! hands finished windows to the spool.
//!
//! * **Targets → pids.** The latest plan (targets and their containers on this node) is picked up
//!   at every loop turn. Container ids are resolved to host pids by scanning `/proc/*/cgroup` on
//!   plan changes and every `rescan` interval, and the kernel's target map is kept in step (new
//!   processes added, exited or unselected ones removed); [`Routing`] says which targets an
//!   event goes to.
//! * **Events → windows.** [`Windows`] aggregates each event into the window of every target
//!   that selects its container, and closes aligned windows.
//! * **Sampling rate.** One perf event per CPU runs at the *highest* `sampleHz` any active target
//!   on this node asks for (the engine is restarted when that changes; it is started with
//!   `--sample-hz`, so a broken eBPF setup fails the agent at once). Each Profile records the
//!   rate actually used, with a warning when it differs from the target's, and its `cpuCores`
//!   sums the CPU time of each sample, so it stays exact even when the rate changed inside a
//!   window.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use kprof_common::Stat;
use kprof_crds::ProfileType;
use tokio::sync::Notify;

use super::{
    build::{self, WindowOutput},
    metrics,
    routing::Routing,
    window::{ClosedContainer, ClosedWindow, Windows},
};
use crate::{
    k8s::{TargetKey, TargetPlan, resolve::Resolver},
    kernel::loader::{LoadError, OffCpuLimits, SamplerConfig},
    pipeline::{
        aggregate::StackMerger,
        engine::{Engine, EngineConfig},
        event::EventKind,
    },
    profile::{AggregatedProfile, ProfileKind},
    spool::Spool,
};

/// Errors that stop the sampling thread.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("cannot start the eBPF sampler: {0}")]
    Load(#[from] LoadError),
}

/// How often off-CPU time in progress is brought into the windows.
const SETTLE_INTERVAL: Duration = Duration::from_secs(1);

/// Shared between the async side and the sampling thread.
pub struct Shared {
    /// The newest plan, taken by the thread.
    pub plan: Mutex<Option<Vec<TargetPlan>>>,
    /// Set to stop: the thread flushes every open window and returns.
    pub stop: AtomicBool,
    /// Milliseconds since the epoch of the last loop turn (health).
    pub heartbeat_ms: AtomicU64,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            plan: Mutex::new(None),
            stop: AtomicBool::new(false),
            heartbeat_ms: AtomicU64::new(now_ms()),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Shared {
    pub fn set_plan(&self, plan: Vec<TargetPlan>) {
        *self.plan.lock().unwrap_or_else(|e| e.into_inner()) = Some(plan);
    }
    fn take_plan(&self) -> Option<Vec<TargetPlan>> {
        self.plan.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
    /// Time since the thread last turned its loop.
    pub fn since_heartbeat(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.heartbeat_ms.load(Ordering::Relaxed)))
    }
}

/// Settings of the sampling thread.
#[derive(Clone, Debug)]
pub struct Options {
    pub node: String,
    pub python: bool,
    pub rescan: Duration,
    /// Rate the sampler is loaded with at start (before any target), so that a broken eBPF
    /// setup fails the agent at once rather than at the first target. 0: load lazily.
    pub initial_hz: u32,
}

/// The types a target's Profiles are written as, one Profile each per window: the types asked
/// for, each once, in their order (`[cpu]` when none is).
pub fn emitted_types(types: &[ProfileType]) -> Vec<ProfileType> {
    let mut out: Vec<ProfileType> = Vec::new();
    for &t in types {
        if !out.contains(&t) {
            out.push(t);
        }
    }
    if out.is_empty() {
        out.push(ProfileType::Cpu);
    }
    out
}

/// Adds an event to the windows of the targets of its container (events of no wanted
/// container go nowhere).
fn route(
    routing: &mut Routing,
    resolver: &mut Resolver,
    windows: &mut Windows,
    ev: &crate::pipeline::event::Event<'_>,
    hz: u32,
    merger: Option<&mut dyn StackMerger>,
) {
    if let Some(cid) =
        routing.container_of_event(ev.tgid, ev.slot, |pid| resolver.container_of(pid))
    {
        windows.add(routing.targets_of(&cid), &cid, ev, hz, merger);
    }
}

/// The sampling thread's state.
struct Daemon {
    opts: Options,
    shared: Arc<Shared>,
    spool: Arc<Spool>,
    wake: Arc<Notify>,
    engine: Option<Engine>,
    resolver: Resolver,
    windows: Windows,
    routing: Routing,
    lost_reported: u64,
    last_scan: Instant,
    last_settle: Instant,
    /// When the sampler recorded nothing for the targets: from the start of each reload until
    /// their processes were targeted again (kept while an open window may overlap them).
    blind: Vec<(SystemTime, SystemTime)>,
}

/// How much of `[start, end)` the `blind` intervals cover.
fn blind_time(blind: &[(SystemTime, SystemTime)], start: SystemTime, end: SystemTime) -> Duration {
    blind
        .iter()
        .map(|&(from, to)| {
            to.min(end)
                .duration_since(from.max(start))
                .unwrap_or_default()
        })
        .sum()
}

/// Blind time below this is not worth a warning (a loop turn).
const BLIND_NOTICED: Duration = Duration::from_millis(200);

/// Runs the sampling thread until `shared.stop` (then flushes every window).
pub fn run(
    opts: Options,
    shared: Arc<Shared>,
    spool: Arc<Spool>,
    wake: Arc<Notify>,
) -> Result<(), DriverError> {
    let mut d = Daemon {
        opts,
        shared,
        spool,
        wake,
        engine: None,
        resolver: Resolver::new(),
        windows: Windows::default(),
        routing: Routing::default(),
        lost_reported: 0,
        last_scan: Instant::now(),
        last_settle: Instant::now(),
        blind: Vec::new(),
    };
    let result = match d.opts.initial_hz {
        0 => d.main_loop(),
        hz => d
            .reload(hz, false, false, None, None)
            .and_then(|()| d.main_loop()),
    };
    d.drain();
    d.settle();
    let now = SystemTime::now();
    for k in d.windows.keys() {
        d.close_window(&k, now, false);
    }
    result
}

impl Daemon {
    fn main_loop(&mut self) -> Result<(), DriverError> {
        loop {
            self.shared.heartbeat_ms.store(now_ms(), Ordering::Relaxed);
            if self.shared.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            if let Some(plan) = self.shared.take_plan() {
                self.apply_plan(plan)?;
            }
            if self.last_scan.elapsed() >= self.opts.rescan {
                self.rescan();
            }
            match &self.engine {
                Some(e) => {
                    e.wait(Duration::from_millis(100));
                    self.drain();
                    if self.last_settle.elapsed() >= SETTLE_INTERVAL {
                        self.settle();
                    }
                }
                None => std::thread::sleep(Duration::from_millis(100)),
            }
            let now = SystemTime::now();
            let due = self.windows.due(now);
            if !due.is_empty() {
                self.settle();
            }
            for k in due {
                self.close_window(&k, now, true);
            }
        }
    }

    /// Takes a new plan: opens/closes target windows, reloads the sampler for a new rate,
    /// rescans pids.
    fn apply_plan(&mut self, plan: Vec<TargetPlan>) -> Result<(), DriverError> {
        let now = SystemTime::now();
        let wanted: BTreeMap<TargetKey, TargetPlan> =
            plan.into_iter().map(|p| (p.key.clone(), p)).collect();
        // Targets gone, or with new settings: close their window now (a partial window).
        for k in self.windows.stale(&wanted) {
            self.drain();
            self.settle();
            self.close_window(&k, now, false);
        }
        self.routing.set_plan(&wanted);
        let hz = wanted
            .values()
            .map(|p| p.settings.sample_hz)
            .max()
            .unwrap_or(0);
        let off_cpu = wanted.values().any(|p| {
            p.settings
                .profile_types
                .iter()
                .any(|&t| ProfileKind::of_type(t, hz).needs_off_cpu())
        });
        let threads = wanted
            .values()
            .any(|p| p.settings.profile_types.contains(&ProfileType::Threads));
        let page_faults = wanted
            .values()
            .flat_map(|p| &p.settings.profile_types)
            .find_map(|&t| ProfileKind::of_type(t, hz).fault_period());
        let alloc_probes = wanted
            .values()
            .any(|p| p.settings.alloc_probes)
            .then_some(crate::kernel::loader::DEFAULT_ALLOC_PERIOD);
        let has_probes = self.engine.as_ref().is_some_and(Engine::has_alloc_probes);
        let has_off_cpu = self.engine.as_ref().is_some_and(Engine::has_off_cpu);
        let has_threads = self.engine.as_ref().is_some_and(Engine::has_thread_events);
        let has_faults = self.engine.as_ref().and_then(Engine::fault_period);
        let mut reload_began = None;
        if hz > 0
            && (hz != self.sample_hz()
                || off_cpu != has_off_cpu
                || threads != has_threads
                || page_faults != has_faults
                || alloc_probes.is_some() != has_probes)
        {
            reload_began = Some(SystemTime::now());
            self.reload(hz, off_cpu, threads, page_faults, alloc_probes)?;
        }
        // New targets' windows open once the sampler that records for them runs (a reload
        // takes seconds), before the rescan hands them their processes.
        let lost = self.lost_now();
        for k in self.windows.apply(&wanted, SystemTime::now(), lost) {
            let p = &wanted[&k];
            tracing::info!(target = %format!("{}/{}", k.namespace, k.name), containers = p.containers.len(), window = ?p.settings.window, "profiling");
        }
        self.rescan();
        if let Some(began) = reload_began {
            // The windows that stayed open say how long the sampler was blind.
            let now = SystemTime::now();
            let oldest = self.windows.oldest_start(now);
            self.blind.retain(|&(_, to)| to > oldest);
            self.blind.push((began, now));
        }
        Ok(())
    }

    /// The CPU sampling rate of the engine (0 before it is started).
    fn sample_hz(&self) -> u32 {
        self.engine.as_ref().map_or(0, Engine::sample_hz)
    }

    /// (Re)loads the programs at `hz`, with the off-CPU source when `off_cpu`, the thread
    /// events when `threads`, the memory source at this period when `page_faults` and the
    /// allocation probes at this period when `alloc_probes`.
    fn reload(
        &mut self,
        hz: u32,
        off_cpu: bool,
        threads: bool,
        page_faults: Option<u64>,
        alloc_probes: Option<u64>,
    ) -> Result<(), DriverError> {
        self.drain();
        self.settle();
        self.read_stats();
        let off_cpu = off_cpu.then(OffCpuLimits::default);
        let engine = match self.engine.take() {
            // One sampler per node: the old programs are detached before the new ones load.
            Some(old) => old.restart(u64::from(hz), off_cpu, threads, page_faults, alloc_probes)?,
            None => Engine::start(EngineConfig {
                sampler: SamplerConfig {
                    sample_hz: u64::from(hz),
                    follow_children: true,
                    cgroup_filter: false,
                    bpf_stats: false,
                    off_cpu,
                    threads,
                    page_faults,
                    alloc_probes,
                    ..SamplerConfig::default()
                },
                python: self.opts.python,
                // Processes are examined when they become targets; the thread never waits.
                python_wait: None,
            })?,
        };
        for w in &engine.warnings {
            tracing::warn!("sampler: {w}");
        }
        tracing::info!(
            hz,
            off_cpu = off_cpu.is_some(),
            threads,
            memory = page_faults.is_some(),
            alloc_probes = alloc_probes.is_some(),
            "eBPF sampler attached"
        );
        self.engine = Some(engine);
        // Every pid is re-added (and re-detected) by the rescan.
        self.routing.forget_pids();
        Ok(())
    }

    /// Reads the kernel counters into the metrics.
    fn read_stats(&mut self) {
        let Some(e) = self.engine.as_mut() else {
            return;
        };
        let c = e.counters();
        metrics::set_bpf_run_time(c.bpf_run_time);
        metrics::set_python_walk_totals(|stat| c.python[stat as usize]);
        let lost = c.stat(Stat::Dropped);
        if lost > self.lost_reported {
            metrics::lost(lost - self.lost_reported);
            self.lost_reported = lost;
        }
        metrics::set_kernel_totals(
            c.stat(Stat::KernelStackErr),
            c.stat(Stat::UserStackErr),
            c.stat(Stat::ChildrenFollowed),
        );
        metrics::set_unwind_totals(c.stat(Stat::UserTruncated), c.stat(Stat::UnwindMiss));
        if let Some(loader) = e.unwind_stats() {
            metrics::set_unwind_table_rows(loader.rows);
        }
    }

    fn lost_now(&mut self) -> u64 {
        self.read_stats();
        self.lost_reported
    }

    /// Resolves the plan's containers to pids and brings the kernel map in step.
    fn rescan(&mut self) {
        self.last_scan = Instant::now();
        let wanted = self.routing.wanted();
        let found = if wanted.is_empty() {
            BTreeMap::new()
        } else {
            self.resolver.scan(&wanted)
        };
        let mut desired: HashMap<u32, String> = HashMap::new();
        for (cid, pids) in found {
            for pid in pids {
                desired.insert(pid, cid.clone());
            }
        }
        let Some(engine) = self.engine.as_mut() else {
            self.routing.set_pids(desired);
            return;
        };
        // Entries in the kernel map: drop the ones no longer wanted (and the fork follower's
        // thread entries); keep forked child processes that are in a wanted container.
        let resolver = &mut self.resolver;
        engine.prune(|t| {
            if desired.contains_key(&t.pid) {
                return true;
            }
            let container = resolver.container_of(t.pid).filter(|c| wanted.contains(c));
            let keep = t.slot.inherited != 0 && Engine::is_live_target(t) && container.is_some();
            if let (true, Some(c)) = (keep, container) {
                desired.insert(t.pid, c);
            }
            keep
        });
        let new: Vec<(u32, String)> = desired
            .iter()
            .filter(|(pid, _)| !self.routing.is_known(**pid))
            .map(|(p, c)| (*p, c.clone()))
            .collect();
        for (pid, cid) in new {
            if let Err(e) = engine.add_target(pid, self.routing.slot_of(&cid)) {
                metrics::error("bpf_map");
                tracing::warn!(pid, error = %e, "cannot target a process");
                desired.remove(&pid);
                continue;
            }
            tracing::debug!(pid, container = %cid, "targeting");
            engine.detect(pid);
            if self.routing.wants_alloc_probes(&cid) {
                let slot = self.routing.slot_of(&cid);
                engine.probe_allocations_of(slot);
                engine.probe_process(pid, slot);
            }
            // Read names and maps while the process is alive.
            let mut m = engine.merger();
            self.windows.see_process(
                self.routing.targets_of(&cid),
                &cid,
                pid,
                m.as_mut().map(|m| m as &mut dyn StackMerger),
            );
        }
        metrics::set_targeted_pids(desired.len());
        metrics::set_python_processes(engine.python_processes());
        self.routing.set_pids(desired);
    }

    /// Reads every pending event into the target windows.
    fn drain(&mut self) {
        let Daemon {
            engine: Some(engine),
            resolver,
            windows,
            routing,
            ..
        } = self
        else {
            return;
        };
        let hz = engine.sample_hz();
        let n = engine.drain(|ev, merger| route(routing, resolver, windows, ev, hz, merger));
        for (pid, warning) in engine.take_process_warnings() {
            windows.add_warning(pid, &warning);
        }
        windows.new_round();
        if n > 0 {
            metrics::samples(n);
        }
    }

    /// Brings the off-CPU time in progress (and not captured) into the windows, as of now.
    fn settle(&mut self) {
        self.last_settle = Instant::now();
        let Daemon {
            engine: Some(engine),
            resolver,
            windows,
            routing,
            ..
        } = self
        else {
            return;
        };
        let hz = engine.sample_hz();
        engine.settle_off_cpu(|ev, merger| route(routing, resolver, windows, ev, hz, merger));
        for agg in windows.thread_aggregations() {
            engine.checkpoint_threads(agg);
        }
        for agg in windows.memory_aggregations() {
            engine.checkpoint_memory(agg);
        }
    }

    /// Closes a target's window: one Profile per container into the spool; reopens the next
    /// window when `reopen`.
    fn close_window(&mut self, key: &TargetKey, now: SystemTime, reopen: bool) {
        let lost = self.lost_now();
        let hz = self.sample_hz();
        let engine = &mut self.engine;
        let Some(closed) = self.windows.close(key, now, reopen, lost, hz, |agg| {
            if let Some(e) = engine.as_mut() {
                e.close_threads(agg);
                e.close_memory(agg);
            } else {
                agg.close_memory(None);
            }
        }) else {
            return;
        };
        for out in self.outputs(&closed, lost) {
            self.spool_window(&out);
        }
    }

    /// The Profiles of a closed window: one per container and type the target asks for.
    fn outputs(&self, w: &ClosedWindow, lost: u64) -> Vec<WindowOutput> {
        let settings = &w.plan.settings;
        let mut common = Vec::new();
        let hz_used = w.hz_seen.iter().copied().max().unwrap_or(self.sample_hz());
        if w.hz_seen.len() > 1 {
            common.push(format!(
                "sampling rate changed during the window ({:?} Hz); cpuCores accounts for it",
                w.hz_seen
            ));
        }
        if hz_used != 0 && hz_used != settings.sample_hz {
            common.push(format!(
                "sampled at {hz_used} Hz, the highest rate a target asks for on this node, instead of {} Hz",
                settings.sample_hz
            ));
        }
        let window = w.end.duration_since(w.start).unwrap_or_default();
        let blind = blind_time(&self.blind, w.start, w.end);
        if blind >= window {
            // Nothing was recorded for it: no Profile rather than an empty one.
            tracing::debug!(target = %w.plan.key.name, "window not recorded (sampler reloading)");
            return Vec::new();
        }
        if blind >= BLIND_NOTICED {
            common.push(format!(
                "the sampler was reloading for {:.1} s of this {:.1} s window (the targets on \
                 this node changed what it records): nothing was recorded then",
                blind.as_secs_f64(),
                window.as_secs_f64()
            ));
        }
        let lost_in_window = lost.saturating_sub(w.lost_at_start);
        if lost_in_window > 0 {
            common.push(format!(
                "{lost_in_window} samples were lost node-wide during this window (ring buffer full)"
            ));
        }
        let types = emitted_types(&settings.profile_types);
        w.containers
            .iter()
            .flat_map(|c| types.iter().map(move |&ty| (c, ty)))
            .map(|(c, ty): (&ClosedContainer, ProfileType)| {
                let built = c.profiles.get(ty.as_str());
                let mut samples = match built {
                    Some(p) => p.clone(),
                    // Not implemented: an empty Profile carrying the warning.
                    None => AggregatedProfile::new(hz_used.max(1), w.start),
                };
                samples.duration = w.end.duration_since(w.start).unwrap_or_default();
                samples.labels.namespace.clone_from(&c.key.namespace);
                samples.labels.pod.clone_from(&c.key.pod);
                samples.labels.container.clone_from(&c.key.container);
                samples.labels.node.clone_from(&self.opts.node);
                let runtime = self.runtime_of(&samples);
                let mut warnings = common.clone();
                warnings.extend(samples.warnings.iter().cloned());
                let cpu_ns = if built.is_some() {
                    c.values.get(&EventKind::CpuSample).copied().unwrap_or(0)
                } else {
                    0
                };
                WindowOutput {
                    target: w.plan.key.clone(),
                    container: c.key.clone(),
                    node: self.opts.node.clone(),
                    profile_type: ty,
                    window_start: w.start,
                    window_end: w.end,
                    sample_hz: if hz_used == 0 {
                        settings.sample_hz
                    } else {
                        hz_used
                    },
                    cpu_seconds: cpu_ns as f64 / 1e9,
                    lost: lost_in_window,
                    runtime,
                    pids: if built.is_some() {
                        c.pids.clone()
                    } else {
                        BTreeSet::new()
                    },
                    warnings,
                    samples,
                }
            })
            .collect()
    }

    fn runtime_of(&self, samples: &AggregatedProfile) -> String {
        let mut rts: BTreeSet<String> = samples
            .processes
            .iter()
            .filter_map(|(pid, meta)| {
                self.engine
                    .as_ref()
                    .and_then(|e| e.runtime(*pid).map(|r| r.display))
                    .or_else(|| meta.runtime.clone())
            })
            .collect();
        match rts.len() {
            0 => "native".to_owned(),
            1 => rts.pop_first().unwrap_or_default(),
            _ => rts.into_iter().collect::<Vec<_>>().join(", "),
        }
    }

    fn spool_window(&self, out: &WindowOutput) {
        let (profile, artifacts) = build::build_window(out);
        match self.spool.put(&profile, artifacts) {
            Ok(o) => {
                metrics::profile_spooled();
                if !o.dropped.is_empty() {
                    metrics::spool_dropped(o.dropped.len() as u64);
                    tracing::warn!(
                        dropped = o.dropped.len(),
                        "spool full: dropped the oldest profiles"
                    );
                }
                if !o.evicted_for_space.is_empty() {
                    metrics::spool_evicted_disk_full(o.evicted_for_space.len() as u64);
                    tracing::warn!(
                        evicted = o.evicted_for_space.len(),
                        dir = %self.spool.dir().display(),
                        "disk full: removed the oldest spooled profiles to keep the newest"
                    );
                }
                tracing::debug!(profile = ?profile.metadata.name, samples = profile.spec.samples, "spooled");
                self.wake.notify_one();
            }
            Err(e) => {
                metrics::error("spool_io");
                tracing::error!(error = %e, "cannot spool a profile");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_is_emitted_once_in_its_order() {
        assert_eq!(emitted_types(&[]), [ProfileType::Cpu]);
        assert_eq!(
            emitted_types(&[ProfileType::Wall, ProfileType::Cpu, ProfileType::Wall]),
            [ProfileType::Wall, ProfileType::Cpu]
        );
        assert_eq!(
            emitted_types(&[ProfileType::Memory, ProfileType::Lock]),
            [ProfileType::Memory, ProfileType::Lock]
        );
    }

    #[test]
    fn blind_time_counts_only_what_falls_in_the_window() {
        let t = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        let blind = [(t(8), t(12)), (t(14), t(15)), (t(30), t(40))];
        // 10..20: 2 s of the first reload, all of the second, none of the third.
        assert_eq!(blind_time(&blind, t(10), t(20)), Duration::from_secs(3));
        assert_eq!(blind_time(&blind, t(20), t(25)), Duration::ZERO);
        // A window inside a reload is blind throughout.
        assert_eq!(blind_time(&blind, t(32), t(35)), Duration::from_secs(3));
    }
}
