//! Threads of targets: the engine's [`ThreadRegistry`] knows, across windows, which stack
//! created each thread (thread creations are recorded in the creating thread) and the thread
//! counts at past window ends; each window's [`ThreadLedger`] counts the creations and exits
//! it saw, the counts every second and the CPU of each thread when the window first saw it,
//! and at the window's end turns that, with `/proc`, into a [`ThreadReport`].
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use super::{
    aggregate::{Aggregator, StackMerger},
    event::{Event, EventKind, comm_str},
};
use crate::{
    proc::threads::{self as proc_threads, ProcThread},
    profile::{
        Frame, FrameKind, Wait,
        threads::{IdleThread, ThreadCounts, ThreadLeak, ThreadReport, ThreadRow, creation_site},
    },
};

/// How a thread came to be, as recorded when it was created.
#[derive(Clone, Debug)]
struct Creation {
    pid: u32,
    stack: Arc<[Frame]>,
}

/// Window-end thread counts kept per process for the leak verdict across windows.
const HISTORY: usize = 12;
/// Creations remembered for threads that are gone are dropped after this long.
const FORGET_EXITED_NS: u64 = 15 * 60 * 1_000_000_000;
/// The registry's stack symbolizer is started afresh past this many distinct stacks (the
/// stacks already resolved stay with their threads) ...
const MAX_CREATOR_STACKS: u64 = 20_000;
/// ... or past this many processes (it keeps each one's mappings).
const MAX_CREATOR_PROCESSES: usize = 256;

/// What the engine knows of the threads of targets across windows.
#[derive(Default)]
pub struct ThreadRegistry {
    created: HashMap<u32, Creation>,
    /// tid → when it exited (CLOCK_MONOTONIC ns).
    exited: HashMap<u32, u64>,
    /// Resolves creating stacks (its own caches: windows come and go).
    symbolizer: Aggregator,
    /// pid → (CLOCK_MONOTONIC ns, threads alive) at past window ends, oldest first.
    history: HashMap<u32, Vec<(u64, u32)>>,
}

impl ThreadRegistry {
    /// A thread creation or exit drained from the kernel.
    pub fn on_event(&mut self, ev: &Event<'_>, merger: Option<&mut dyn StackMerger>) {
        match ev.kind {
            EventKind::ThreadStart => {
                if self.symbolizer.stats.distinct_stacks > MAX_CREATOR_STACKS
                    || self.symbolizer.process_count() > MAX_CREATOR_PROCESSES
                {
                    self.symbolizer = Aggregator::new();
                }
                // Only the part that names who asked for the thread: the native frames under
                // Python code differ between creations (and are junk without frame pointers).
                let stack = creation_site(&self.symbolizer.stack_of(ev, merger));
                self.created.insert(
                    ev.addr as u32,
                    Creation {
                        pid: ev.tgid,
                        stack,
                    },
                );
            }
            EventKind::ThreadExit => {
                self.exited.insert(ev.tid, ev.timestamp_ns);
            }
            _ => {}
        }
    }

    /// After each drain: one maps re-read per process and round.
    pub fn new_round(&mut self) {
        self.symbolizer.new_round();
    }

    /// The stack that created `tid`, if it was created while its process was a target.
    fn creator(&self, pid: u32, tid: u32) -> Option<Arc<[Frame]>> {
        self.created
            .get(&tid)
            .filter(|c| c.pid == pid)
            .map(|c| c.stack.clone())
    }

    /// Forgets threads long gone and processes that exited.
    pub fn sweep(&mut self, now_ns: u64) {
        let old: Vec<u32> = self
            .exited
            .iter()
            .filter(|(_, at)| now_ns.saturating_sub(**at) > FORGET_EXITED_NS)
            .map(|(t, _)| *t)
            .collect();
        for t in old {
            self.exited.remove(&t);
            self.created.remove(&t);
        }
        self.history.retain(|pid, _| crate::proc::is_alive(*pid));
    }

    /// Records a window-end count (at most one per second per process: several targets may
    /// select the same process).
    fn push_history(&mut self, pid: u32, now_ns: u64, alive: u32) {
        let h = self.history.entry(pid).or_default();
        if h.last()
            .is_some_and(|(at, _)| now_ns.saturating_sub(*at) < 1_000_000_000)
        {
            return;
        }
        h.push((now_ns, alive));
        if h.len() > HISTORY {
            h.remove(0);
        }
    }
}

/// One process in a window's ledger.
#[derive(Clone, Debug, Default)]
struct ProcessLedger {
    counts: ThreadCounts,
    /// Threads alive as last known (events move it between checkpoints).
    current: u32,
    /// (CLOCK_MONOTONIC ns, threads alive) every second.
    checkpoints: Vec<(u64, u32)>,
    /// CPU ns of each thread when the window first saw the process.
    base_cpu: HashMap<u32, u64>,
    /// When the window first saw the process (CLOCK_MONOTONIC ns).
    first_ns: u64,
    /// tid → creation time, for threads created in the window.
    created: BTreeMap<u32, u64>,
    /// Threads that exited in the window: tid → (last name, CPU ns of its life, exit time).
    exited: BTreeMap<u32, (String, u64, u64)>,
    /// Last known name of each thread seen alive (exited threads keep theirs).
    names: HashMap<u32, Arc<str>>,
}

/// The thread accounting of one window (part of its [`Aggregator`]).
#[derive(Clone, Debug, Default)]
pub struct ThreadLedger {
    processes: BTreeMap<u32, ProcessLedger>,
    /// Window start (CLOCK_MONOTONIC ns).
    start_ns: u64,
    /// Threads older than this that (almost) never ran are idle: a window's length (`None`:
    /// the window's length at its end).
    idle_after_ns: Option<u64>,
}

/// A thread is idle when, alive for longer than the window, it ran less than this many
/// nanoseconds (a Python thread's start costs a fraction of it) ...
const IDLE_CPU_NS: u64 = 2_000_000;
/// ... or less than this share of its life (per 100,000: an old thread may have run a little).
const IDLE_PER_100K: u64 = 1;
/// Idle threads listed per report.
const MAX_IDLE: usize = 50;

impl ThreadLedger {
    pub fn new() -> Self {
        ThreadLedger {
            processes: BTreeMap::new(),
            start_ns: crate::proc::monotonic_ns(),
            idle_after_ns: None,
        }
    }

    /// Threads alive longer than `age` with (almost) no CPU are listed as idle (a one-window
    /// recording has no earlier window to have lived through).
    pub fn set_idle_after(&mut self, age: std::time::Duration) {
        self.idle_after_ns = Some(u64::try_from(age.as_nanos()).unwrap_or(u64::MAX));
    }

    /// The window sees `pid` for the first time: its threads and their CPU now are the base.
    pub fn see_process(&mut self, pid: u32) {
        if self.processes.contains_key(&pid) {
            return;
        }
        let threads = proc_threads::threads(pid);
        let n = threads.len() as u32;
        let now = crate::proc::monotonic_ns();
        self.processes.insert(
            pid,
            ProcessLedger {
                counts: ThreadCounts {
                    start: n,
                    end: n,
                    min: n,
                    max: n,
                    created: 0,
                    exited: 0,
                    series: Vec::new(),
                },
                current: n,
                checkpoints: vec![(now, n)],
                base_cpu: threads.iter().map(|t| (t.tid, t.cpu_ns)).collect(),
                first_ns: now,
                ..ProcessLedger::default()
            },
        );
    }

    /// A thread creation or exit of a process of this window.
    pub fn on_event(&mut self, ev: &Event<'_>) {
        self.see_process(ev.tgid);
        let Some(p) = self.processes.get_mut(&ev.tgid) else {
            return;
        };
        match ev.kind {
            EventKind::ThreadStart => {
                // The first look at the process may already have counted the new thread.
                if p.created.insert(ev.addr as u32, ev.timestamp_ns).is_none()
                    && !p.base_cpu.contains_key(&(ev.addr as u32))
                {
                    p.current += 1;
                }
                p.counts.created += 1;
                p.counts.max = p.counts.max.max(p.current);
            }
            EventKind::ThreadExit => {
                p.current = p.current.saturating_sub(1);
                p.counts.exited += 1;
                p.counts.min = p.counts.min.min(p.current);
                let name = p
                    .names
                    .get(&ev.tid)
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| comm_str(&ev.comm));
                p.exited.insert(ev.tid, (name, ev.value, ev.timestamp_ns));
            }
            _ => {}
        }
    }

    /// Counts every process's threads in `/proc` now (every second or so), and learns their
    /// runtime names while they are alive (an exit record carries only the kernel's name).
    pub fn checkpoint(&mut self, mut merger: Option<&mut dyn StackMerger>) {
        let now = crate::proc::monotonic_ns();
        for (&pid, p) in self.processes.iter_mut() {
            // Only the list: reading each thread's stat here would cost ~3 reads per thread
            // per second.
            let tids = crate::proc::task_dirs(pid);
            let n = tids.len() as u32;
            p.current = n;
            p.counts.min = p.counts.min.min(n);
            p.counts.max = p.counts.max.max(n);
            p.checkpoints.push((now, n));
            if let Some(m) = merger.as_mut() {
                for (tid, _) in tids {
                    if let Some(name) = m.thread_name(pid, tid) {
                        p.names.insert(tid, name);
                    }
                }
            }
        }
    }

    /// The report of the window, as of now; window-end counts go into the registry's history.
    pub fn report(
        &self,
        registry: &mut ThreadRegistry,
        mut merger: Option<&mut dyn StackMerger>,
    ) -> ThreadReport {
        let now = crate::proc::monotonic_ns();
        let boot_to_mono = proc_threads::boottime_ns().saturating_sub(now);
        let mut report = ThreadReport::default();
        for (&pid, p) in &self.processes {
            let threads = proc_threads::threads(pid);
            let end = threads.len() as u32;
            if let Some(m) = merger.as_mut() {
                m.forget_thread_names(pid);
            }
            let mut counts = p.counts.clone();
            counts.end = end;
            counts.min = counts.min.min(end);
            counts.max = counts.max.max(end);
            counts.series = p.checkpoints.clone();
            counts.series.push((now, end));
            report.processes.insert(pid, counts.clone());
            let since = p.first_ns.max(self.start_ns);
            for t in &threads {
                let name = thread_name(&mut merger, pid, t);
                let created_at = t.start_ns.saturating_sub(boot_to_mono);
                let created = p.created.contains_key(&t.tid);
                let base = if created {
                    0
                } else {
                    p.base_cpu.get(&t.tid).copied().unwrap_or(0)
                };
                let cpu_ns = t.cpu_ns.saturating_sub(base);
                let alive_ns = now.saturating_sub(since.max(created_at));
                let creator = registry.creator(pid, t.tid);
                report.threads.push(ThreadRow {
                    pid,
                    tid: t.tid,
                    name: name.clone(),
                    cpu_ns,
                    off_cpu_ns: alive_ns.saturating_sub(cpu_ns),
                    state: t.state,
                    created,
                    alive: true,
                    creator: creator.clone(),
                });
                let age_ns = now.saturating_sub(created_at);
                let idle_after = self
                    .idle_after_ns
                    .unwrap_or_else(|| now.saturating_sub(self.start_ns));
                if age_ns > idle_after
                    && t.tid != pid
                    && (t.cpu_ns < IDLE_CPU_NS
                        || t.cpu_ns.saturating_mul(100_000) < age_ns.saturating_mul(IDLE_PER_100K))
                    && report.idle.len() < MAX_IDLE
                {
                    report.idle.push(IdleThread {
                        pid,
                        tid: t.tid,
                        name,
                        age_s: age_ns / 1_000_000_000,
                        cpu_ns: t.cpu_ns,
                        blocked_in: blocked_in(&mut merger, pid, t.tid),
                        creator,
                    });
                }
            }
            for (&tid, (name, life_cpu, at)) in &p.exited {
                let created = p.created.get(&tid).copied();
                let base = if created.is_some() {
                    0
                } else {
                    p.base_cpu.get(&tid).copied().unwrap_or(0)
                };
                let cpu_ns = life_cpu.saturating_sub(base);
                let alive_ns = at.saturating_sub(since.max(created.unwrap_or(0)));
                report.threads.push(ThreadRow {
                    pid,
                    tid,
                    name: name.as_str().into(),
                    cpu_ns,
                    off_cpu_ns: alive_ns.saturating_sub(cpu_ns),
                    state: 'X',
                    created: created.is_some(),
                    alive: false,
                    creator: registry.creator(pid, tid),
                });
            }
            // Created and gone again before any exit was seen (a lost record): still created.
            for (&tid, _) in p.created.iter() {
                if !p.exited.contains_key(&tid) && !threads.iter().any(|t| t.tid == tid) {
                    report.threads.push(ThreadRow {
                        pid,
                        tid,
                        name: p
                            .names
                            .get(&tid)
                            .cloned()
                            .unwrap_or_else(|| "[exited]".into()),
                        cpu_ns: 0,
                        off_cpu_ns: 0,
                        state: 'X',
                        created: true,
                        alive: false,
                        creator: registry.creator(pid, tid),
                    });
                }
            }
            registry.push_history(pid, now, end);
            let history = registry.history.get(&pid).map_or(&[][..], Vec::as_slice);
            let leak = leak_series(&counts.series).or_else(|| leak_series(history));
            if let Some((from_ns, counts)) = leak {
                let created_at: HashMap<u32, u64> = threads
                    .iter()
                    .map(|t| (t.tid, t.start_ns.saturating_sub(boot_to_mono)))
                    .collect();
                let (creator, by_creator) =
                    main_creator(&report.threads, pid, from_ns, &created_at);
                report.leaks.push(ThreadLeak {
                    pid,
                    counts,
                    creator,
                    by_creator,
                });
            }
        }
        report
    }
}

/// The name of a thread: its Python name where the interpreter tells it, else the kernel's.
fn thread_name(merger: &mut Option<&mut dyn StackMerger>, pid: u32, t: &ProcThread) -> Arc<str> {
    merger
        .as_mut()
        .and_then(|m| m.thread_name(pid, t.tid))
        .unwrap_or_else(|| t.comm.as_str().into())
}

/// Where an idle thread is blocked: its Python stack, else the syscall it sleeps in.
fn blocked_in(merger: &mut Option<&mut dyn StackMerger>, pid: u32, tid: u32) -> Vec<Frame> {
    if let Some(stack) = merger.as_mut().and_then(|m| m.thread_stack(pid, tid))
        && !stack.is_empty()
    {
        return stack;
    }
    match crate::proc::thread_syscall(pid, tid) {
        Some((nr, arg0)) => {
            let wait = Wait::classify(kprof_common::wait::of(1, Some(nr)), arg0, None);
            let class = wait.class.map_or("other", |c| c.as_str());
            vec![Frame::new(
                FrameKind::Native,
                format!("[blocked: {class}, syscall {nr}]"),
            )]
        }
        None => Vec::new(),
    }
}

/// The creating stack of most of the threads alive now that were created since `from_ns`.
fn main_creator(
    rows: &[ThreadRow],
    pid: u32,
    from_ns: u64,
    created_at: &HashMap<u32, u64>,
) -> (Option<Arc<[Frame]>>, u32) {
    let mut by: HashMap<Arc<[Frame]>, u32> = HashMap::new();
    for r in rows.iter().filter(|r| r.pid == pid && r.alive) {
        if created_at.get(&r.tid).is_some_and(|&at| at >= from_ns)
            && let Some(c) = &r.creator
        {
            *by.entry(c.clone()).or_default() += 1;
        }
    }
    by.into_iter()
        .max_by_key(|(stack, n)| (*n, std::cmp::Reverse(stack.len())))
        .map_or((None, 0), |(s, n)| (Some(s), n))
}

/// Whether a series of (time, threads alive) grows steadily: at least four points, a rise of
/// at least three threads, rises in at least three steps and twice as many rising steps as
/// falling ones, and still rising in the last third (a pool that filled up and stopped is
/// not a leak). Returns when the growth began and the counts.
pub fn leak_series(series: &[(u64, u32)]) -> Option<(u64, Vec<u32>)> {
    if series.len() < 4 {
        return None;
    }
    let counts: Vec<u32> = series.iter().map(|s| s.1).collect();
    let (first, last) = (counts[0], counts[counts.len() - 1]);
    let steps = counts.windows(2);
    let rises = steps.clone().filter(|w| w[1] > w[0]).count();
    let falls = steps.clone().filter(|w| w[1] < w[0]).count();
    let last_rise = counts
        .windows(2)
        .rposition(|w| w[1] > w[0])
        .map_or(0, |i| i + 1);
    let steady = last >= first + 3
        && rises >= 3
        && rises >= 2 * falls
        && last_rise * 3 >= (counts.len() - 1) * 2;
    steady.then(|| (series[0].0, counts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(counts: &[u32]) -> Vec<(u64, u32)> {
        counts
            .iter()
            .enumerate()
            .map(|(i, &c)| (i as u64 * 1_000_000_000, c))
            .collect()
    }

    #[test]
    fn a_steady_rise_is_a_leak_and_a_pool_that_filled_up_is_not() {
        assert!(leak_series(&series(&[5, 6, 7, 8, 9, 10])).is_some());
        assert!(leak_series(&series(&[5, 5, 7, 7, 9, 9, 11])).is_some());
        // A pool of eight started at once, then flat.
        assert!(leak_series(&series(&[1, 9, 9, 9, 9, 9])).is_none());
        // A pool that grew for a while and stopped long ago.
        assert!(leak_series(&series(&[1, 2, 3, 4, 5, 5, 5, 5, 5, 5, 5, 5])).is_none());
        // Threads that come and go.
        assert!(leak_series(&series(&[5, 8, 5, 8, 5, 8, 5, 9])).is_none());
        assert!(leak_series(&series(&[5, 6, 7])).is_none());
        let (from, counts) = leak_series(&series(&[2, 3, 4, 5, 6])).unwrap();
        assert_eq!((from, counts.len()), (0, 5));
    }

    #[test]
    fn the_ledger_counts_creations_and_exits_between_checkpoints() {
        let pid = std::process::id();
        let mut ledger = ThreadLedger::new();
        ledger.see_process(pid);
        let start = ledger.processes[&pid].counts.start;
        assert!(start >= 1);
        let mut ev = Event::synthetic(EventKind::ThreadStart, 0, pid, &[]);
        ev.addr = 4_000_000; // no such thread in the base
        ledger.on_event(&ev);
        ev.addr = 4_000_001;
        ledger.on_event(&ev);
        let mut exit = Event::synthetic(EventKind::ThreadExit, 0, pid, &[]);
        exit.tid = 4_000_000;
        exit.value = 5_000;
        ledger.on_event(&exit);
        let p = &ledger.processes[&pid];
        assert_eq!((p.counts.created, p.counts.exited), (2, 1));
        assert_eq!(p.counts.max, start + 2);
        assert_eq!(p.current, start + 1);
        let mut registry = ThreadRegistry::default();
        let report = ledger.report(&mut registry, None);
        let row = report
            .threads
            .iter()
            .find(|r| r.tid == 4_000_000)
            .expect("exited thread listed");
        assert_eq!((row.alive, row.created, row.state), (false, true, 'X'));
        assert_eq!(row.cpu_ns, 5_000);
        assert!(report.threads.iter().any(|r| r.tid == pid && r.alive));
        let c = &report.processes[&pid];
        assert_eq!((c.created, c.exited), (2, 1));
        assert!(c.end >= 1 && c.max >= start + 2);
    }
}
