//! The sampling thread of `kprof-agent run`: one eBPF sampler for the whole node, the targets'
//! windows, and the hand-off of finished windows to the spool.
//!
//! * **Targets → pids.** The latest plan (targets and their containers on this node) is picked up
//!   at every loop turn. Container ids are resolved to host pids by scanning `/proc/*/cgroup` on
//!   plan changes and every `rescan` interval, and the kernel's target map is kept in step (new
//!   processes added, exited or unselected ones removed). Each container gets a slot number, so
//!   a child forked between two scans (added in kernel by the fork follower with its parent's slot) is
//!   attributed at once; other unknown pids are resolved from their cgroup on first sight.
//! * **Events → windows.** Each sample goes to the aggregator of every target window whose
//!   containers include its process. Windows are aligned to multiples of the target's `window`
//!   since the epoch, so windows of different pods and nodes line up (the first one is shortened,
//!   or lengthened by one window when less than half a window is left).
//! * **Sampling rate.** One perf event per CPU runs at the *highest* `sampleHz` any active target
//!   on this node asks for (the sampler is reloaded when that changes; it is loaded at start with
//!   `--sample-hz`, so a broken eBPF setup fails the agent at once). Each Profile records the
//!   rate actually used, with a warning when it differs from the target's, and its `cpuCores`
//!   sums 1/Hz per sample, so it stays exact even when the rate changed inside a window.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use kprof_common::{SampleEvent, Stat, python::PyStat};
use kprof_crds::ProfileType;
use tokio::sync::Notify;

use super::{
    build::{self, WindowOutput},
    metrics,
};
use crate::{
    aggregate::{Aggregator, StackMerger},
    k8s::{ContainerKey, TargetKey, TargetPlan, TargetSettings, resolve::Resolver},
    loader::{LoadError, Sampler, SamplerConfig},
    profile::{Frame, Profile as Samples},
    python::PythonSupport,
    spool::Spool,
    targets::{self, Prune},
};

/// Errors that stop the sampling thread.
#[derive(Debug, thiserror::Error)]
pub enum SamplerError {
    #[error("cannot start the eBPF sampler: {0}")]
    Load(#[from] LoadError),
}

/// Profile types this agent implements today.
pub const IMPLEMENTED: &[ProfileType] = &[ProfileType::Cpu];

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

/// The end of the window that starts at `now`: the next multiple of `window` since the epoch,
/// one window later when less than half a window is left.
pub fn aligned_window_end(now: SystemTime, window: Duration) -> SystemTime {
    let w = window.as_millis().max(1);
    let t = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let mut end = (t / w + 1) * w;
    if end - t < w / 2 {
        end += w;
    }
    UNIX_EPOCH + Duration::from_millis(u64::try_from(end).unwrap_or(u64::MAX))
}

/// Keeps the samples of some pids (one container) out of a window's profile.
pub fn filter_pids(p: &Samples, pids: &BTreeSet<u32>) -> Samples {
    let mut out = Samples::new(p.sample_hz, p.start);
    out.duration = p.duration;
    out.labels = p.labels.clone();
    out.dropped = p.dropped;
    out.modules.clone_from(&p.modules);
    for (k, &c) in &p.samples {
        if pids.contains(&k.pid) {
            out.add_measured(k.clone(), c, p.cpu_ns_of(k));
        }
    }
    out.processes = p
        .processes
        .iter()
        .filter(|(pid, _)| pids.contains(pid))
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    out.warnings = p
        .warnings
        .iter()
        .filter(
            |w| match w.strip_prefix("pid ").and_then(|r| r.split_once(':')) {
                Some((pid, _)) => pid.parse().is_ok_and(|pid: u32| pids.contains(&pid)),
                None => true,
            },
        )
        .cloned()
        .collect();
    out
}

/// Warnings for the profile types a target asks for that this agent does not implement.
pub fn unimplemented_warnings(types: &[ProfileType]) -> Vec<String> {
    types
        .iter()
        .filter(|t| !IMPLEMENTED.contains(t))
        .map(|t| {
            format!(
                "profile type {t} is not implemented by this agent yet: no {t} profile was taken"
            )
        })
        .collect()
}

/// The type a target's Profiles are written as: `cpu` when asked for, else the first type asked
/// for (an empty Profile carrying the "not implemented" warning, rather than silence).
pub fn emitted_type(types: &[ProfileType]) -> ProfileType {
    if types.contains(&ProfileType::Cpu) {
        ProfileType::Cpu
    } else {
        types.first().copied().unwrap_or(ProfileType::Cpu)
    }
}

/// One container inside a target's window.
struct ContainerWindow {
    key: ContainerKey,
    pids: BTreeSet<u32>,
    cpu_seconds: f64,
}

/// One target's open window.
struct TargetWindow {
    plan: TargetPlan,
    start: SystemTime,
    end: SystemTime,
    agg: Aggregator,
    /// container id → window state (containers that left stay until the window closes).
    containers: BTreeMap<String, ContainerWindow>,
    lost_at_start: u64,
    hz_seen: BTreeSet<u32>,
}

impl TargetWindow {
    fn new(
        plan: TargetPlan,
        now: SystemTime,
        lost: u64,
        symbolizer_from: Option<&mut Aggregator>,
    ) -> Self {
        let end = aligned_window_end(now, plan.settings.window);
        let mut agg = Aggregator::new();
        if let Some(old) = symbolizer_from {
            // Keep the symbol caches from one window to the next.
            std::mem::swap(agg.symbolizer(), old.symbolizer());
        }
        let mut w = TargetWindow {
            plan: plan.clone(),
            start: now,
            end,
            agg,
            containers: BTreeMap::new(),
            lost_at_start: lost,
            hz_seen: BTreeSet::new(),
        };
        w.set_containers(&plan);
        w
    }

    fn set_containers(&mut self, plan: &TargetPlan) {
        for c in &plan.containers {
            self.containers
                .entry(c.id.id.clone())
                .or_insert_with(|| ContainerWindow {
                    key: c.clone(),
                    pids: BTreeSet::new(),
                    cpu_seconds: 0.0,
                });
        }
        self.plan = plan.clone();
    }
}

/// The Python support as the aggregator's merger: runtimes come from the detection cache (the
/// sampling thread detects each process once, when it is added).
struct CachedPython<'a>(&'a PythonSupport);

impl StackMerger for CachedPython<'_> {
    fn on_exec(&mut self, pid: u32) {
        self.0.on_exec(pid); // the background watcher detects the new image
    }
    fn on_process(&mut self, pid: u32) -> Option<(String, Vec<String>)> {
        self.0.runtime(pid).map(|r| (r.display, r.warnings))
    }
    fn merge(
        &mut self,
        pid: u32,
        native: Vec<Frame>,
        py: &kprof_common::python::PyStack,
    ) -> Vec<Frame> {
        self.0.merge(pid, native, py)
    }
}

/// The sampling thread's state.
struct Daemon {
    opts: Options,
    shared: Arc<Shared>,
    spool: Arc<Spool>,
    wake: Arc<Notify>,
    sampler: Option<Sampler>,
    hz: u32,
    python: Option<PythonSupport>,
    python_taken: bool,
    resolver: Resolver,
    windows: BTreeMap<TargetKey, TargetWindow>,
    /// container id → targets selecting it.
    routes: HashMap<String, Vec<TargetKey>>,
    /// container id ↔ slot in the kernel's target map.
    slots: HashMap<String, u32>,
    slot_ids: HashMap<u32, String>,
    next_slot: u32,
    /// pid → container id, for the processes of selected containers (as of the last rescan).
    pids: HashMap<u32, String>,
    /// pid → container id of processes first seen in events since the last rescan (forks).
    lazy: HashMap<u32, Option<String>>,
    /// Running totals of the kernel counters across sampler reloads.
    stats: RunningTotals<{ Stat::COUNT as usize }>,
    py_stats: RunningTotals<{ PyStat::COUNT as usize }>,
    lost_reported: u64,
    /// In-kernel run time of the sampler program: running total and last reading.
    bpf_time_total: Duration,
    bpf_time_last: Duration,
    last_scan: Instant,
}

/// Running totals of kernel counters, which restart from zero when the sampler is reloaded.
struct RunningTotals<const N: usize> {
    total: [u64; N],
    /// The last reading of the current sampler.
    last: [u64; N],
}

impl<const N: usize> RunningTotals<N> {
    fn new() -> Self {
        Self {
            total: [0; N],
            last: [0; N],
        }
    }

    fn update(&mut self, i: usize, reading: u64) {
        self.total[i] += reading.saturating_sub(self.last[i]);
        self.last[i] = reading;
    }

    /// A new sampler: its counters start from zero.
    fn restart(&mut self) {
        self.last = [0; N];
    }
}

/// Runs the sampling thread until `shared.stop` (then flushes every window).
pub fn run(
    opts: Options,
    shared: Arc<Shared>,
    spool: Arc<Spool>,
    wake: Arc<Notify>,
) -> Result<(), SamplerError> {
    let mut d = Daemon {
        opts,
        shared,
        spool,
        wake,
        sampler: None,
        hz: 0,
        python: None,
        python_taken: false,
        resolver: Resolver::new(),
        windows: BTreeMap::new(),
        routes: HashMap::new(),
        slots: HashMap::new(),
        slot_ids: HashMap::new(),
        next_slot: 1,
        pids: HashMap::new(),
        lazy: HashMap::new(),
        stats: RunningTotals::new(),
        py_stats: RunningTotals::new(),
        lost_reported: 0,
        bpf_time_total: Duration::ZERO,
        bpf_time_last: Duration::ZERO,
        last_scan: Instant::now(),
    };
    let result = match d.opts.initial_hz {
        0 => d.main_loop(),
        hz => d.reload(hz).and_then(|()| d.main_loop()),
    };
    d.drain();
    let now = SystemTime::now();
    let keys: Vec<TargetKey> = d.windows.keys().cloned().collect();
    for k in keys {
        d.close_window(&k, now, false);
    }
    result
}

impl Daemon {
    fn main_loop(&mut self) -> Result<(), SamplerError> {
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
            match &self.sampler {
                Some(s) => {
                    let mut pfd = libc::pollfd {
                        fd: s.events_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut pfd, 1, 100) };
                    self.drain();
                }
                None => std::thread::sleep(Duration::from_millis(100)),
            }
            let now = SystemTime::now();
            let due: Vec<TargetKey> = self
                .windows
                .iter()
                .filter(|(_, w)| now >= w.end)
                .map(|(k, _)| k.clone())
                .collect();
            for k in due {
                self.close_window(&k, now, true);
            }
        }
    }

    /// Takes a new plan: opens/closes target windows, reloads the sampler for a new rate,
    /// rescans pids.
    fn apply_plan(&mut self, plan: Vec<TargetPlan>) -> Result<(), SamplerError> {
        let now = SystemTime::now();
        let wanted: BTreeMap<TargetKey, TargetPlan> =
            plan.into_iter().map(|p| (p.key.clone(), p)).collect();
        // Targets gone, or with new settings: close their window now (a partial window).
        let stale: Vec<TargetKey> = self
            .windows
            .iter()
            .filter(|(k, w)| wanted.get(*k).is_none_or(|p| p.settings != w.plan.settings))
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            self.drain();
            self.close_window(&k, now, false);
        }
        let lost = self.lost_now();
        for (k, p) in &wanted {
            match self.windows.get_mut(k) {
                Some(w) => w.set_containers(p),
                None => {
                    tracing::info!(target = %format!("{}/{}", k.namespace, k.name), containers = p.containers.len(), window = ?p.settings.window, "profiling");
                    self.windows
                        .insert(k.clone(), TargetWindow::new(p.clone(), now, lost, None));
                }
            }
        }
        self.routes.clear();
        for p in wanted.values() {
            for c in &p.containers {
                self.routes
                    .entry(c.id.id.clone())
                    .or_default()
                    .push(p.key.clone());
                if !self.slots.contains_key(&c.id.id) {
                    let slot = self.next_slot;
                    self.next_slot = self.next_slot.wrapping_add(1).max(1);
                    self.slots.insert(c.id.id.clone(), slot);
                    self.slot_ids.insert(slot, c.id.id.clone());
                }
            }
        }
        let hz = wanted
            .values()
            .map(|p| p.settings.sample_hz)
            .max()
            .unwrap_or(0);
        if hz > 0 && hz != self.hz {
            self.reload(hz)?;
        }
        self.rescan();
        Ok(())
    }

    fn reload(&mut self, hz: u32) -> Result<(), SamplerError> {
        self.drain();
        self.read_stats();
        // Detach the old programs first: one sampler per node.
        self.sampler = None;
        self.python = None;
        self.python_taken = false;
        self.stats.restart();
        self.py_stats.restart();
        self.bpf_time_last = Duration::ZERO;
        let mut sampler = Sampler::load(&SamplerConfig {
            sample_hz: u64::from(hz),
            follow_children: true,
            cgroup_filter: false,
            bpf_stats: false,
            ..SamplerConfig::default()
        })?;
        for w in &sampler.warnings {
            tracing::warn!("sampler: {w}");
        }
        if self.opts.python {
            match PythonSupport::new(&mut sampler.bpf) {
                Ok(p) => self.python = Some(p),
                Err(e) => tracing::warn!(error = %e, "python frames disabled"),
            }
        }
        tracing::info!(hz, "eBPF sampler attached");
        self.hz = hz;
        self.sampler = Some(sampler);
        // Every pid is re-added (and re-detected) by the rescan.
        self.pids.clear();
        Ok(())
    }

    /// Reads the kernel counters into running totals and the metrics.
    fn read_stats(&mut self) {
        let Some(s) = &self.sampler else { return };
        for stat in Stat::ALL {
            self.stats.update(stat as usize, s.stat(stat));
        }
        // Maintained by the kernel only while kernel.bpf_stats_enabled is on.
        let run_time = s.kernel_cost().run_time;
        self.bpf_time_total += run_time.saturating_sub(self.bpf_time_last);
        self.bpf_time_last = run_time;
        metrics::set_bpf_run_time(self.bpf_time_total);
        for stat in PyStat::ALL {
            self.py_stats.update(stat as usize, s.py_stat(stat));
        }
        metrics::set_python_walk_totals(|stat| self.py_stats.total[stat as usize]);
        let total = |stat: Stat| self.stats.total[stat as usize];
        let lost = total(Stat::Dropped);
        if lost > self.lost_reported {
            metrics::lost(lost - self.lost_reported);
            self.lost_reported = lost;
        }
        metrics::set_kernel_totals(
            total(Stat::KernelStackErr),
            total(Stat::UserStackErr),
            total(Stat::ChildrenFollowed),
        );
    }

    fn lost_now(&mut self) -> u64 {
        self.read_stats();
        self.stats.total[Stat::Dropped as usize]
    }

    /// Resolves the plan's containers to pids and brings the kernel map in step.
    fn rescan(&mut self) {
        self.last_scan = Instant::now();
        self.lazy.clear();
        let wanted: BTreeSet<String> = self.routes.keys().cloned().collect();
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
        let Some(sampler) = self.sampler.as_mut() else {
            self.pids = desired;
            return;
        };
        // Entries in the kernel map: drop the ones no longer wanted (and the fork follower's
        // thread entries); keep forked child processes that are in a wanted container.
        for (id, slot) in sampler.target_pids() {
            if desired.contains_key(&id) {
                continue;
            }
            let state = targets::proc_state(id);
            let keep = slot.inherited != 0
                && targets::prune_decision(
                    id,
                    true,
                    state.map(|s| s.0),
                    state.is_some_and(|s| s.1),
                ) == Prune::Keep
                && self
                    .resolver
                    .container_of(id)
                    .is_some_and(|c| wanted.contains(&c));
            if keep {
                if let Some(c) = self.resolver.container_of(id) {
                    desired.insert(id, c);
                }
            } else {
                sampler.remove_pid(id);
                if let Some(py) = self.python.as_mut()
                    && state.is_none()
                {
                    py.on_exit(id);
                }
            }
        }
        let new: Vec<(u32, String)> = desired
            .iter()
            .filter(|(pid, _)| !self.pids.contains_key(pid))
            .map(|(p, c)| (*p, c.clone()))
            .collect();
        for (pid, cid) in new {
            let slot = self.slots.get(&cid).copied().unwrap_or(0);
            if let Err(e) = sampler.add_pid(pid, slot) {
                metrics::error("bpf_map");
                tracing::warn!(pid, error = %e, "cannot target a process");
                desired.remove(&pid);
                continue;
            }
            tracing::debug!(pid, container = %cid, "targeting");
            if let Some(py) = self.python.as_mut() {
                if self.python_taken {
                    py.attach(pid, Duration::ZERO);
                } else {
                    py.on_process(&mut sampler.bpf, pid);
                    self.python_taken = true;
                }
            }
            // Read names and maps while the process is alive.
            for t in self.routes.get(&cid).into_iter().flatten() {
                if let Some(w) = self.windows.get_mut(t) {
                    let mut m = self.python.as_ref().map(CachedPython);
                    w.agg
                        .see_process(pid, m.as_mut().map(|m| m as &mut dyn StackMerger));
                }
            }
        }
        metrics::set_targeted_pids(desired.len());
        metrics::set_python_processes(self.python.as_ref().map_or(0, PythonSupport::process_count));
        self.pids = desired;
    }

    /// Which container a sampled process belongs to.
    fn container_of_event(&mut self, tgid: u32, slot: u32) -> Option<String> {
        if let Some(c) = self.pids.get(&tgid) {
            return Some(c.clone());
        }
        if let Some(c) = self.lazy.get(&tgid) {
            return c.clone();
        }
        let c = self
            .slot_ids
            .get(&slot)
            .cloned()
            .filter(|c| self.routes.contains_key(c))
            .or_else(|| {
                self.resolver
                    .container_of(tgid)
                    .filter(|c| self.routes.contains_key(c))
            });
        self.lazy.insert(tgid, c.clone());
        c
    }

    /// Reads every pending event into the target windows.
    fn drain(&mut self) {
        let Some(mut sampler) = self.sampler.take() else {
            return;
        };
        let period_ns = 1_000_000_000 / u64::from(self.hz.max(1));
        let mut n = 0u64;
        while let Some(item) = sampler.events.next() {
            let bytes: &[u8] = &item;
            let (Some(tgid), Some(slot)) = (
                read_u32(bytes, std::mem::offset_of!(SampleEvent, tgid)),
                read_u32(bytes, std::mem::offset_of!(SampleEvent, slot)),
            ) else {
                continue;
            };
            n += 1;
            let Some(cid) = self.container_of_event(tgid, slot) else {
                continue;
            };
            for t in self.routes.get(&cid).into_iter().flatten() {
                let Some(w) = self.windows.get_mut(t) else {
                    continue;
                };
                let mut m = self.python.as_ref().map(CachedPython);
                let cpu_ns = w.agg.add_bytes(
                    bytes,
                    period_ns,
                    m.as_mut().map(|m| m as &mut dyn StackMerger),
                );
                if let Some(c) = w.containers.get_mut(&cid) {
                    c.cpu_seconds += cpu_ns.unwrap_or(0) as f64 / 1e9;
                    c.pids.insert(tgid);
                }
                w.hz_seen.insert(self.hz);
            }
        }
        for w in self.windows.values_mut() {
            w.agg.new_round();
        }
        if n > 0 {
            metrics::samples(n);
        }
        self.sampler = Some(sampler);
    }

    /// Closes a target's window: one Profile per container into the spool; reopens the next
    /// window when `reopen`.
    fn close_window(&mut self, key: &TargetKey, now: SystemTime, reopen: bool) {
        let lost = self.lost_now();
        let Some(mut w) = self.windows.remove(key) else {
            return;
        };
        let end = if reopen { w.end } else { now };
        let mut profile = w.agg.finish(self.hz.max(1), w.start);
        profile.duration = end.duration_since(w.start).unwrap_or_default();
        profile.labels.node.clone_from(&self.opts.node);
        let settings: &TargetSettings = &w.plan.settings;
        let ty = emitted_type(&settings.profile_types);
        let mut common = unimplemented_warnings(&settings.profile_types);
        let hz_used = w.hz_seen.iter().copied().max().unwrap_or(self.hz);
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
        let lost_in_window = lost.saturating_sub(w.lost_at_start);
        if lost_in_window > 0 {
            common.push(format!(
                "{lost_in_window} samples were lost node-wide during this window (ring buffer full)"
            ));
        }
        let produces = IMPLEMENTED.contains(&ty);
        for c in w.containers.values() {
            let mut samples = if produces {
                filter_pids(&profile, &c.pids)
            } else {
                filter_pids(&profile, &BTreeSet::new())
            };
            samples.labels.namespace.clone_from(&c.key.namespace);
            samples.labels.pod.clone_from(&c.key.pod);
            samples.labels.container.clone_from(&c.key.container);
            samples.labels.node.clone_from(&self.opts.node);
            let runtime = self.runtime_of(&samples);
            let mut warnings = common.clone();
            warnings.extend(samples.warnings.iter().cloned());
            let out = WindowOutput {
                target: w.plan.key.clone(),
                container: c.key.clone(),
                node: self.opts.node.clone(),
                profile_type: ty,
                window_start: w.start,
                window_end: end,
                sample_hz: if hz_used == 0 {
                    settings.sample_hz
                } else {
                    hz_used
                },
                cpu_seconds: if produces { c.cpu_seconds } else { 0.0 },
                lost: lost_in_window,
                runtime,
                pids: c.pids.clone(),
                warnings,
                samples,
            };
            self.spool_window(&out);
        }
        if reopen {
            let plan = w.plan.clone();
            let mut next = TargetWindow::new(plan, end, lost, Some(&mut w.agg));
            // Aligned: the next window starts where this one ended.
            next.end = aligned_window_end(end, w.plan.settings.window);
            self.windows.insert(key.clone(), next);
        }
    }

    fn runtime_of(&self, samples: &Samples) -> String {
        let mut rts: BTreeSet<String> = samples
            .processes
            .iter()
            .filter_map(|(pid, meta)| {
                self.python
                    .as_ref()
                    .and_then(|py| py.runtime(*pid).map(|r| r.display))
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
        let profile = build::build_profile(out);
        let artifacts = match build::build_artifacts(out) {
            Ok(a) => a,
            Err(e) => {
                metrics::error("pprof");
                tracing::error!(error = %e, "cannot encode the pprof; writing the Profile without artifacts");
                Vec::new()
            }
        };
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

fn read_u32(bytes: &[u8], off: usize) -> Option<u32> {
    let b = bytes.get(off..off + 4)?;
    Some(u32::from_ne_bytes(b.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::profile::{FrameKind, SampleKey};

    #[test]
    fn windows_align_to_the_epoch() {
        let w = Duration::from_secs(10);
        let t = |s: u64, ms: u64| UNIX_EPOCH + Duration::from_secs(s) + Duration::from_millis(ms);
        assert_eq!(aligned_window_end(t(100, 0), w), t(110, 0));
        assert_eq!(aligned_window_end(t(103, 0), w), t(110, 0));
        // Less than half a window left: one more window.
        assert_eq!(aligned_window_end(t(106, 0), w), t(120, 0));
        assert_eq!(aligned_window_end(t(110, 0), w), t(120, 0));
    }

    #[test]
    fn samples_split_by_container_pids() {
        let mut p = Samples::new(99, UNIX_EPOCH);
        let st: Arc<[Frame]> = vec![Frame::new(FrameKind::Native, "f")].into();
        for pid in [1, 2, 3] {
            p.add(
                SampleKey {
                    pid,
                    thread: "t".into(),
                    stack: st.clone(),
                },
                u64::from(pid),
            );
        }
        p.warnings = vec![
            "pid 2: python too new".into(),
            "pid 3: x".into(),
            "global".into(),
        ];
        let only: BTreeSet<u32> = [1, 2].into();
        let f = filter_pids(&p, &only);
        assert_eq!(f.total(), 3);
        assert_eq!(f.warnings, ["pid 2: python too new", "global"]);
    }

    #[test]
    fn unimplemented_types_are_reported() {
        assert!(unimplemented_warnings(&[ProfileType::Cpu]).is_empty());
        let w = unimplemented_warnings(&[ProfileType::Cpu, ProfileType::Wall]);
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("wall"));
        assert_eq!(
            emitted_type(&[ProfileType::Wall, ProfileType::Cpu]),
            ProfileType::Cpu
        );
        assert_eq!(emitted_type(&[ProfileType::Lock]), ProfileType::Lock);
        assert_eq!(read_u32(&7u32.to_ne_bytes(), 0), Some(7));
        assert_eq!(read_u32(&[0, 1], 0), None);
    }
}
