//! Turns events into aggregated [`AggregatedProfile`]s, one per profile kind: each distinct raw
//! stack (addresses) is symbolized once, when first seen — while its process is alive — and
//! then only counted, its events' values summed per (event kind, stack, thread, wait).
use std::{
    collections::{HashMap, HashSet},
    ops::Range,
    sync::Arc,
    time::SystemTime,
};

use kprof_common::python::PyFrames;

use super::{
    event::{Event, EventKind, comm_str},
    memory::MemoryLedger,
    threads::{ThreadLedger, ThreadRegistry},
};
use crate::{
    profile::{
        AggregatedProfile, Frame, FrameKind, MemoryReport, ProcessMeta, ProfileKind, SampleKey,
        ThreadReport, Wait, WaitClass,
    },
    symbolize::Symbolizer,
};

/// Splices interpreter frames into a native stack (implemented by the Python support).
pub trait StackMerger {
    /// Called once per new process, before its first stack is symbolized. Returns the runtime
    /// display name (e.g. `cpython 3.12.1`) and warnings.
    fn on_process(&mut self, pid: u32) -> Option<(String, Vec<String>)>;
    /// Called when a known process `exec`ed, before `on_process` is called for it again.
    fn on_exec(&mut self, _pid: u32) {}
    /// Merges the captured Python frames into `native` (both innermost first).
    fn merge(&mut self, pid: u32, native: Vec<Frame>, py: PyFrames<'_>) -> Vec<Frame>;
    /// The address range of the process's GIL (a futex inside it is a GIL wait).
    fn gil(&mut self, _pid: u32) -> Option<Range<u64>> {
        None
    }
    /// The runtime's name of a thread (Python's `threading.Thread.name`).
    fn thread_name(&mut self, _pid: u32, _tid: u32) -> Option<Arc<str>> {
        None
    }
    /// Drops the thread names read of a process: the next are read afresh (a window's end
    /// names threads started a moment ago).
    fn forget_thread_names(&mut self, _pid: u32) {}
    /// The runtime's stack of a thread now (innermost first), read from its memory: where a
    /// sleeping thread waits.
    fn thread_stack(&mut self, _pid: u32, _tid: u32) -> Option<Vec<Frame>> {
        None
    }
    /// The runtime's own heap in `pid` (Python: pymalloc's arenas), or why it cannot be read;
    /// `None` for a process without a runtime.
    fn runtime_heap(&mut self, _pid: u32) -> Option<Result<u64, String>> {
        None
    }
}

/// The frame an off-CPU interval gets when its stacks were not captured (the share of
/// uncaptured time with no captured wait to stand for it).
pub const NOT_CAPTURED: &str = "[stack not captured]";
/// The root frame of a native stack the unwinder cut where it went wrong.
pub const TRUNCATED_NATIVE: &str = "[truncated native stack]";

/// The addresses of one event: what identifies a distinct stack before symbolization.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RawKey {
    pub kind: EventKind,
    pub pid: u32,
    /// Bumped when the process `exec`s (same pid, new address space).
    pub generation: u32,
    pub tid: u32,
    pub thread: [u8; 16],
    /// Off-CPU events: how the thread waited.
    pub wait: Option<Wait>,
    /// CPU samples of Python threads: whether the thread held the GIL.
    pub gil_held: Option<bool>,
    pub in_kernel: bool,
    pub user_truncated: bool,
    pub kernel: Vec<u64>,
    pub user: Vec<u64>,
    /// (code object, instruction offset, flags) per Python frame.
    pub py: Vec<(u64, u32, u32)>,
}

impl RawKey {
    pub fn of(ev: &Event<'_>, wait: Option<Wait>) -> RawKey {
        RawKey {
            kind: ev.kind,
            pid: ev.tgid,
            generation: 0,
            tid: ev.tid,
            thread: ev.comm,
            wait,
            gil_held: ev.gil_held,
            in_kernel: ev.in_kernel,
            user_truncated: ev.user_truncated,
            kernel: ev.kernel.to_vec(),
            user: ev.user.to_vec(),
            py: ev
                .py
                .frames
                .iter()
                .map(|f| (f.code, f.lasti, f.flags))
                .collect(),
        }
    }
}

/// What the events of one key add up to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Totals {
    count: u64,
    value: u64,
}

/// Counters of the aggregation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AggregateStats {
    /// Events counted into the profile.
    pub events: u64,
    pub distinct_stacks: u64,
    /// Records read from the kernel (an off-CPU interval is two: its switch-out and its end),
    /// as the node agent's `kprof_agent_samples_total` counts them.
    pub records: u64,
}

/// Aggregates events into a profile.
pub struct Aggregator {
    symbolizer: Symbolizer,
    /// Raw stacks (addresses) of every event: hashed once per event, hence foldhash.
    stacks: HashMap<RawKey, (SampleKey, Totals), foldhash::fast::RandomState>,
    processes: HashMap<u32, ProcessMeta>,
    /// Identity (device, inode) of each process's executable, to notice `exec` when the
    /// samples carry no exec id.
    exe: HashMap<u32, (u64, u64)>,
    /// Latest exec id (`EventHeader::exec_id`) seen per process.
    exec_ids: HashMap<u32, u32>,
    generation: HashMap<u32, u32>,
    checked_this_round: HashSet<u32>,
    /// Threads profiles: the window's thread accounting, and its report once closed.
    threads: Option<ThreadLedger>,
    thread_report: Option<ThreadReport>,
    /// Memory profiles: the page faults and memory readings (kept across windows), and the
    /// window's report once closed.
    memory: Option<MemoryLedger>,
    memory_report: Option<MemoryReport>,
    /// Each process's GIL once the interpreter support found it: waits on it classified as
    /// lock waits before it was found (an interpreter starting, an embedded one) are GIL waits.
    gils: HashMap<u32, Range<u64>>,
    pub stats: AggregateStats,
    pub warnings: Vec<String>,
}

impl Default for Aggregator {
    fn default() -> Self {
        Self::new()
    }
}

impl Aggregator {
    pub fn new() -> Self {
        Aggregator {
            symbolizer: Symbolizer::new(),
            stacks: HashMap::default(),
            processes: HashMap::new(),
            exe: HashMap::new(),
            exec_ids: HashMap::new(),
            generation: HashMap::new(),
            checked_this_round: HashSet::new(),
            threads: None,
            thread_report: None,
            memory: None,
            memory_report: None,
            gils: HashMap::new(),
            stats: AggregateStats::default(),
            warnings: Vec::new(),
        }
    }

    pub fn symbolizer(&mut self) -> &mut Symbolizer {
        &mut self.symbolizer
    }

    /// Keeps the thread accounting of a threads profile (from now on).
    pub fn track_threads(&mut self) {
        if self.threads.is_none() {
            let mut ledger = ThreadLedger::new();
            for &pid in self.processes.keys() {
                ledger.see_process(pid);
            }
            self.threads = Some(ledger);
        }
    }

    /// Whether the thread accounting is kept.
    pub fn tracks_threads(&self) -> bool {
        self.threads.is_some()
    }

    /// The thread accounting, when kept.
    pub fn threads(&mut self) -> Option<&mut ThreadLedger> {
        self.threads.as_mut()
    }

    /// Closes the thread accounting: the report the threads profile is built from.
    pub fn close_threads(
        &mut self,
        registry: &mut ThreadRegistry,
        merger: Option<&mut dyn StackMerger>,
    ) {
        if let Some(ledger) = &self.threads {
            self.thread_report = Some(ledger.report(registry, merger));
        }
    }

    /// Keeps the memory accounting of a memory profile (from now on), continuing `ledger`
    /// (the previous window's) when given.
    pub fn track_memory(&mut self, ledger: Option<MemoryLedger>) {
        if ledger.is_none() && self.memory.is_some() {
            return;
        }
        let mut ledger = ledger.unwrap_or_default();
        for &pid in self.processes.keys() {
            ledger.see_process(pid);
        }
        self.memory = Some(ledger);
    }

    /// Whether the memory accounting is kept.
    pub fn tracks_memory(&self) -> bool {
        self.memory.is_some()
    }

    /// The memory accounting, when kept.
    pub fn memory(&mut self) -> Option<&mut MemoryLedger> {
        self.memory.as_mut()
    }

    /// Closes the memory accounting: the report the memory profile is built from.
    pub fn close_memory(&mut self, merger: Option<&mut dyn StackMerger>) {
        if let Some(ledger) = self.memory.as_mut() {
            self.memory_report = Some(ledger.close(merger));
        }
    }

    /// Hands the memory accounting on (to the next window).
    pub fn take_memory(&mut self) -> Option<MemoryLedger> {
        self.memory.take()
    }

    /// Registers a process early (reads its maps and name while it is alive).
    pub fn see_process(&mut self, pid: u32, merger: Option<&mut dyn StackMerger>) {
        if self.processes.contains_key(&pid) {
            return;
        }
        self.symbolizer.track(pid);
        if let Some(id) = crate::proc::exe_identity(pid) {
            self.exe.insert(pid, id);
        }
        self.checked_this_round.insert(pid);
        if let Some(ledger) = self.threads.as_mut() {
            ledger.see_process(pid);
        }
        if let Some(ledger) = self.memory.as_mut() {
            ledger.see_process(pid);
        }
        let name = crate::proc::name(pid);
        let mut meta = ProcessMeta {
            name,
            runtime: None,
        };
        if let Some(m) = merger
            && let Some((runtime, warnings)) = m.on_process(pid)
        {
            meta.runtime = Some(runtime);
            self.add_warnings(pid, warnings);
        }
        self.processes.insert(pid, meta);
        self.take_refusals();
    }

    /// Adds one event.
    pub fn add(&mut self, ev: &Event<'_>, merger: Option<&mut dyn StackMerger>) {
        if matches!(ev.kind, EventKind::ThreadStart | EventKind::ThreadExit) {
            self.see_process(ev.tgid, merger);
            if let Some(ledger) = self.threads.as_mut() {
                ledger.on_event(ev);
            }
            return;
        }
        if ev.kind == EventKind::MemRelease {
            if let Some(ledger) = self.memory.as_mut() {
                ledger.on_release(ev.tgid, ev.addr, ev.value);
            }
            return;
        }
        if ev.kind == EventKind::AllocFree {
            if let Some(ledger) = self.memory.as_mut() {
                ledger.on_alloc_free(ev.tgid, ev.addr);
            }
            return;
        }
        if matches!(
            ev.kind,
            EventKind::PageFault | EventKind::MemGrow | EventKind::AllocSample
        ) {
            let key = self.intern(ev, merger, true);
            if let (Some(ledger), Some(key)) = (self.memory.as_mut(), key) {
                match ev.kind {
                    EventKind::PageFault => ledger.on_fault(ev, key),
                    EventKind::MemGrow => ledger.on_grow(ev, key),
                    _ => ledger.on_alloc_sample(ev, key),
                }
            }
            return;
        }
        self.intern(ev, merger, false);
    }

    /// The symbolized stack of an event (aggregated like any other).
    pub fn stack_of(
        &mut self,
        ev: &Event<'_>,
        merger: Option<&mut dyn StackMerger>,
    ) -> Arc<[Frame]> {
        self.intern(ev, merger, true)
            .expect("the stack is asked for")
            .stack
    }

    /// Counts one event under its key, symbolizing its stack when first seen; returns the
    /// key when `want_key` (one map lookup per event either way).
    fn intern(
        &mut self,
        ev: &Event<'_>,
        mut merger: Option<&mut dyn StackMerger>,
        want_key: bool,
    ) -> Option<SampleKey> {
        self.stats.events += 1;
        let pid = ev.tgid;
        let execed = if ev.exec_id != 0 {
            // The first sample of a process is its baseline; an exec between the first look
            // at the process (its maps) and that sample is caught by the executable check.
            let first = !self.exec_ids.contains_key(&pid);
            self.exec_id_changed(pid, ev.exec_id)
                || (first && self.processes.contains_key(&pid) && self.check_exec(pid))
        } else {
            self.processes.contains_key(&pid)
                && self.checked_this_round.insert(pid)
                && self.check_exec(pid)
        };
        if execed
            && self.processes.contains_key(&pid)
            && let Some(m) = merger.as_mut()
            && let Some((runtime, warnings)) = {
                m.on_exec(pid);
                m.on_process(pid)
            }
        {
            if let Some(meta) = self.processes.get_mut(&pid) {
                meta.runtime = Some(runtime);
            }
            self.add_warnings(pid, warnings);
        }
        let wait = match ev.kind {
            EventKind::OffCpu => {
                let gil = merger.as_mut().and_then(|m| m.gil(pid));
                if let Some(g) = &gil
                    && self.gils.get(&pid) != Some(g)
                {
                    self.gils.insert(pid, g.clone());
                }
                Some(Wait::classify(ev.wait, ev.addr, gil.as_ref()))
            }
            _ => None,
        };
        let mut raw = RawKey::of(ev, wait);
        raw.generation = self.generation.get(&pid).copied().unwrap_or(0);
        if let Some((key, totals)) = self.stacks.get_mut(&raw) {
            totals.count += ev.count;
            totals.value += ev.value;
            return want_key.then(|| key.clone());
        }
        if !self.processes.contains_key(&pid) {
            self.see_process(
                pid,
                merger.as_mut().map(|m| &mut **m as &mut dyn StackMerger),
            );
        }
        let mut frames: Vec<Frame> = Vec::with_capacity(raw.kernel.len() + raw.user.len());
        self.symbolizer.kernel_frames(&raw.kernel, &mut frames);
        let mut native = Vec::with_capacity(raw.user.len());
        self.symbolizer
            .user_frames(pid, &raw.user, !raw.in_kernel, &mut native);
        // A caller in no mapping is a return address read from garbage (a frame-pointer walk
        // through code without frame pointers, before the unwinder has the process's tables):
        // the stack is cut there, like one the unwinder cut itself.
        // (Only where the process's mappings were known: a gone process has every frame
        // unresolved, and its stacks keep their shape.)
        let maps_known = native.iter().any(|f| f.module.is_some());
        let junk = native
            .iter()
            .skip(1)
            .position(|f| f.kind == FrameKind::Native && f.module.is_none())
            .filter(|_| maps_known);
        if let Some(at) = junk {
            native.truncate(at + 1);
        }
        if (raw.user_truncated || junk.is_some()) && !native.is_empty() {
            // The callers below are unknown, not absent.
            native.push(Frame::new(FrameKind::Native, TRUNCATED_NATIVE));
        }
        self.take_refusals();
        let user = match merger.as_mut() {
            Some(m) if !ev.py.frames.is_empty() => m.merge(pid, native, ev.py),
            _ => native,
        };
        let thread = merger
            .as_mut()
            .and_then(|m| m.thread_name(pid, ev.tid))
            .unwrap_or_else(|| comm_str(&ev.comm).into());
        frames.extend(user);
        if frames.is_empty() && ev.kind == EventKind::OffCpu {
            frames.push(Frame::new(FrameKind::Native, NOT_CAPTURED));
        }
        if let Some(p) = self.processes.get_mut(&pid)
            && p.name.is_empty()
        {
            p.name = comm_str(&ev.comm);
        }
        let key = SampleKey {
            pid,
            tid: ev.tid,
            thread,
            wait,
            gil_held: ev.gil_held,
            stack: Arc::from(frames),
        };
        self.stats.distinct_stacks += 1;
        let totals = Totals {
            count: ev.count,
            value: ev.value,
        };
        let out = want_key.then(|| key.clone());
        self.stacks.insert(raw, (key, totals));
        out
    }

    /// Starts a new drain round (allows one maps re-read and one exec check per process).
    pub fn new_round(&mut self) {
        self.symbolizer.new_round();
        self.checked_this_round.clear();
    }

    /// Whether the exec id of a sample says its process `exec`ed since the last one (then the
    /// process is re-registered). Exec ids only grow; an older one is a sample taken before the
    /// exec and drained after a newer one (CPUs share the ring), not a new exec.
    fn exec_id_changed(&mut self, pid: u32, id: u32) -> bool {
        let Some(&last) = self.exec_ids.get(&pid) else {
            self.exec_ids.insert(pid, id);
            return false;
        };
        if (id.wrapping_sub(last) as i32) <= 0 {
            return false;
        }
        self.exec_ids.insert(pid, id);
        if self.processes.contains_key(&pid) {
            self.on_exec(pid);
        }
        true
    }

    /// Without exec ids: a process whose executable changed since it was first seen `exec`ed.
    fn check_exec(&mut self, pid: u32) -> bool {
        let Some(now) = crate::proc::exe_identity(pid) else {
            return false; // exited: keep what we know
        };
        if self.exe.get(&pid) == Some(&now) {
            return false;
        }
        self.exe.insert(pid, now);
        self.on_exec(pid);
        true
    }

    /// A process that `exec`ed gets fresh maps, a new generation (its old raw stacks mean other
    /// code now) and its new name (e.g. `sh -c python3 …`).
    fn on_exec(&mut self, pid: u32) {
        *self.generation.entry(pid).or_default() += 1;
        if let Some(ledger) = self.memory.as_mut() {
            ledger.on_exec(pid);
        }
        self.symbolizer.forget(pid);
        self.symbolizer.track(pid);
        if let Some(meta) = self.processes.get_mut(&pid) {
            meta.name = crate::proc::name(pid);
            meta.runtime = None;
        }
    }

    /// The symbolizer's unreadable files become their processes' warnings.
    fn take_refusals(&mut self) {
        for (pid, w) in self.symbolizer.take_refusals() {
            self.add_warnings(pid, vec![w]);
        }
    }

    /// Warnings about process `pid` for the profile.
    pub fn add_warnings(&mut self, pid: u32, warnings: Vec<String>) {
        for w in warnings {
            let w = format!("pid {pid}: {w}");
            if !self.warnings.contains(&w) {
                self.warnings.push(w);
            }
        }
    }

    /// Total events so far.
    pub fn total(&self) -> u64 {
        self.stats.events
    }

    /// The kinds of the events seen so far.
    pub fn kinds(&self) -> std::collections::BTreeSet<EventKind> {
        self.stacks.keys().map(|k| k.kind).collect()
    }

    /// Processes seen so far.
    pub fn process_count(&self) -> usize {
        self.processes.len()
    }

    /// Builds the profile of one kind from the events it takes (`ProfileKind::takes`). In a
    /// wall profile CPU samples are time in state `running`.
    /// `w` of process `pid`, as a GIL wait when it waited on the futex of a GIL found since.
    fn with_known_gil(&self, pid: u32, w: Wait) -> Wait {
        let on_gil = w.class == Some(WaitClass::Lock)
            && w.lock
                .zip(self.gils.get(&pid))
                .is_some_and(|(addr, gil)| gil.contains(&addr));
        if on_gil {
            Wait {
                class: Some(WaitClass::Gil),
                lock: None,
                ..w
            }
        } else {
            w
        }
    }

    pub fn finish(&self, kind: ProfileKind, start: SystemTime) -> AggregatedProfile {
        let mut p = AggregatedProfile::of_kind(kind, start);
        p.samples.reserve(self.stacks.len());
        p.values.reserve(self.stacks.len());
        for (raw, (key, totals)) in &self.stacks {
            let wait = key.wait.map(|w| self.with_known_gil(key.pid, w));
            if !kind.takes(raw.kind, wait.as_ref()) {
                continue;
            }
            let key = SampleKey {
                wait: match (kind, wait) {
                    (ProfileKind::Wall { .. }, None) => Some(Wait::RUNNING),
                    _ => wait,
                },
                ..key.clone()
            };
            p.add_value(key, totals.count, totals.value);
        }
        p.processes = self
            .processes
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        let mut modules: Vec<_> = self.symbolizer.modules().cloned().collect();
        modules.sort_by(|a, b| a.path.cmp(&b.path));
        modules.dedup_by(|a, b| a.path == b.path);
        p.modules = modules;
        p.warnings.clone_from(&self.warnings);
        if kind == ProfileKind::Threads
            && let Some(report) = &self.thread_report
        {
            p.add_threads(report.clone());
        }
        if matches!(kind, ProfileKind::Memory { .. })
            && let Some(report) = &self.memory_report
        {
            p.add_memory(report.clone());
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::FrameKind;

    const PERIOD: u64 = 1_000_000_000 / 99;
    const CPU: ProfileKind = ProfileKind::Cpu { sample_hz: 99 };

    fn event(pid: u32, user: &'static [u64]) -> Event<'static> {
        Event::synthetic(EventKind::CpuSample, PERIOD, pid, user)
    }

    #[test]
    fn a_newer_exec_id_starts_a_new_generation_an_older_one_does_not() {
        let mut agg = Aggregator::new();
        let pid = u32::MAX - 11;
        let with_exec = |id: u32| Event {
            exec_id: id,
            ..event(pid, &[0x1000])
        };
        agg.add(&with_exec(5), None);
        agg.add(&with_exec(5), None);
        assert_eq!(agg.generation.get(&pid).copied().unwrap_or(0), 0);
        assert_eq!(agg.stats.distinct_stacks, 1);
        agg.add(&with_exec(6), None); // exec'ed: same addresses now mean other code
        assert_eq!(agg.generation[&pid], 1);
        assert_eq!(agg.stats.distinct_stacks, 2);
        agg.add(&with_exec(5), None); // a sample from before the exec, drained late
        assert_eq!(agg.generation[&pid], 1);
        agg.add(&with_exec(u32::MAX), None); // older (wrapping), not newer
        assert_eq!(agg.generation[&pid], 1);
        assert_eq!(agg.stats.events, 5);
    }

    #[test]
    fn identical_stacks_are_symbolized_once_and_counted() {
        let mut agg = Aggregator::new();
        // A pid that does not exist: frames stay unresolved but are still counted.
        let pid = u32::MAX - 7;
        for _ in 0..5 {
            agg.add(&event(pid, &[0x1000, 0x2000]), None);
        }
        agg.add(&event(pid, &[0x1000, 0x3000]), None);
        assert_eq!(agg.stats.events, 6);
        assert_eq!(agg.stats.distinct_stacks, 2);
        let p = agg.finish(CPU, SystemTime::UNIX_EPOCH);
        assert_eq!(p.total(), 6);
        assert_eq!(p.total_value(), 6 * PERIOD);
        let (key, count) = p
            .sorted_samples()
            .into_iter()
            .max_by_key(|(_, c)| *c)
            .unwrap();
        assert_eq!(count, 5);
        assert_eq!(key.stack.len(), 2);
        assert_eq!(key.stack[0].kind, FrameKind::Native);
        assert_eq!(&*key.stack[0].function, "[unknown]+0x1000");
        assert_eq!(&*key.thread, "worker");
        assert_eq!(p.processes[&pid].name, "worker", "comm as fallback name");
    }

    #[test]
    fn cpu_wall_and_lock_profiles_take_their_events_and_labels() {
        use crate::profile::{ThreadState, WaitClass};
        use kprof_common::wait as w;
        let mut agg = Aggregator::new();
        let pid = u32::MAX - 5;
        agg.add(&event(pid, &[0x1000]), None);
        let off = |ns, word, addr| Event {
            kind: EventKind::OffCpu,
            value: ns,
            wait: word,
            addr,
            ..event(pid, &[0x1000])
        };
        let futex = w::of(1, Some(w::SYS_FUTEX));
        agg.add(&off(3_000, futex, 0xabc0), None);
        agg.add(
            &Event {
                count: 0,
                ..off(4_000, futex, 0xabc0)
            },
            None,
        );
        agg.add(&off(5_000, w::of(1, Some(230)), 1), None);
        agg.add(&off(6_000, w::of(0, None), 0), None);
        assert_eq!(
            agg.stats.distinct_stacks, 4,
            "same stack, four ways of spending time"
        );
        let cpu = agg.finish(CPU, SystemTime::UNIX_EPOCH);
        assert_eq!((cpu.total(), cpu.total_value()), (1, PERIOD));
        let wall = agg.finish(ProfileKind::Wall { sample_hz: 99 }, SystemTime::UNIX_EPOCH);
        assert_eq!((wall.total(), wall.total_value()), (4, PERIOD + 18_000));
        let by_state = |state| -> u64 {
            wall.values
                .iter()
                .filter(|(k, _)| k.wait.is_some_and(|w| w.state == state))
                .map(|(_, v)| v)
                .sum()
        };
        assert_eq!(by_state(ThreadState::Running), PERIOD);
        assert_eq!(by_state(ThreadState::Sleeping), 12_000);
        assert_eq!(by_state(ThreadState::Runnable), 6_000);
        let lock = agg.finish(ProfileKind::Lock, SystemTime::UNIX_EPOCH);
        assert_eq!(
            (lock.total(), lock.total_value()),
            (1, 7_000),
            "one contention, two parts"
        );
        let (key, _) = lock.sorted_samples()[0];
        let wait = key.wait.unwrap();
        assert_eq!(
            (wait.class, wait.lock),
            (Some(WaitClass::Lock), Some(0xabc0))
        );
        assert_eq!(key.tid, pid);
    }

    #[test]
    fn an_off_cpu_interval_without_stacks_is_marked_not_captured() {
        let mut agg = Aggregator::new();
        let ev = Event {
            kind: EventKind::OffCpu,
            value: 9,
            ..Event::synthetic(EventKind::OffCpu, 9, u32::MAX - 3, &[])
        };
        agg.add(&ev, None);
        let wall = agg.finish(ProfileKind::Wall { sample_hz: 99 }, SystemTime::UNIX_EPOCH);
        let (key, _) = wall.sorted_samples()[0];
        assert_eq!(&*key.stack[0].function, NOT_CAPTURED);
    }

    struct FakePython;
    impl StackMerger for FakePython {
        fn on_process(&mut self, _pid: u32) -> Option<(String, Vec<String>)> {
            Some(("cpython 3.12.1".into(), vec!["note".into()]))
        }
        fn merge(&mut self, _pid: u32, mut native: Vec<Frame>, py: PyFrames<'_>) -> Vec<Frame> {
            for _ in py.frames {
                native.insert(0, Frame::python("handler", "app.py", 3));
            }
            native
        }
    }

    /// An interpreter whose GIL is found only after its first waits on it.
    struct GilFoundLate {
        found: bool,
    }
    impl StackMerger for GilFoundLate {
        fn on_process(&mut self, _pid: u32) -> Option<(String, Vec<String>)> {
            None
        }
        fn merge(&mut self, _pid: u32, native: Vec<Frame>, _py: PyFrames<'_>) -> Vec<Frame> {
            native
        }
        fn gil(&mut self, _pid: u32) -> Option<Range<u64>> {
            self.found.then_some(0x7000..0x7000 + 208)
        }
    }

    #[test]
    fn waits_on_a_gil_found_late_are_gil_waits() {
        use crate::profile::WaitClass;
        use kprof_common::wait as w;
        let mut agg = Aggregator::new();
        let pid = u32::MAX - 11;
        let futex = w::of(1, Some(w::SYS_FUTEX));
        let off = |ns, addr| Event {
            kind: EventKind::OffCpu,
            value: ns,
            wait: futex,
            addr,
            ..event(pid, &[0x1000])
        };
        let mut py = GilFoundLate { found: false };
        // Before the GIL is known: a wait on it, and one on another lock.
        agg.add(&off(5_000, 0x7000 + 40), Some(&mut py));
        agg.add(&off(2_000, 0x9000), Some(&mut py));
        py.found = true;
        agg.add(&off(7_000, 0x7000 + 40), Some(&mut py));
        let class_ns = |p: &AggregatedProfile, class| -> u64 {
            p.values
                .iter()
                .filter(|(k, _)| k.wait.is_some_and(|w| w.class == Some(class)))
                .map(|(_, v)| v)
                .sum()
        };
        let wall = agg.finish(ProfileKind::Wall { sample_hz: 99 }, SystemTime::UNIX_EPOCH);
        assert_eq!(class_ns(&wall, WaitClass::Gil), 12_000);
        assert_eq!(class_ns(&wall, WaitClass::Lock), 2_000);
        let lock = agg.finish(ProfileKind::Lock, SystemTime::UNIX_EPOCH);
        assert_eq!(
            (lock.total(), lock.total_value()),
            (1, 2_000),
            "the other lock only"
        );
    }

    #[test]
    fn python_frames_are_merged() {
        let mut agg = Aggregator::new();
        let frames = [kprof_common::python::PyFrame {
            code: 0xdead,
            ..Default::default()
        }];
        let ev = Event {
            py: PyFrames {
                frames: &frames,
                truncated: false,
            },
            ..event(u32::MAX - 9, &[0x1000])
        };
        let mut py = FakePython;
        agg.add(&ev, Some(&mut py));
        let p = agg.finish(CPU, SystemTime::UNIX_EPOCH);
        let (key, _) = p.sorted_samples()[0];
        assert_eq!(key.stack[0].kind, FrameKind::Python);
        assert_eq!(
            p.processes[&(u32::MAX - 9)].runtime.as_deref(),
            Some("cpython 3.12.1")
        );
        assert_eq!(p.warnings, [format!("pid {}: note", u32::MAX - 9)]);
    }
}
