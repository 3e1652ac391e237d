//! Off-CPU intervals, from the kernel's records to events the aggregation can count.
//!
//! The kernel (`agent/ebpf/src/offcpu.rs`) captures a bounded number of switch-outs per thread
//! with their stacks (`OffCpu`), reports the end of each captured one (`OffCpuEnd`, with its
//! duration) and sums the time of the waits it did not capture per thread and stratum in the
//! `OFF_CPU` map. This module
//! - keeps each captured wait until it ends, and at every [`OffCpuTracker::tick`] reports the
//!   part of it that has passed, so a thread blocked for a whole window shows in that window
//!   (and every later one) with the time it has waited so far;
//! - shares the uncaptured time of a thread and stratum out over the waits of that thread and
//!   stratum captured since the previous tick, in proportion to their durations (a ratio
//!   estimate: totals per thread and stratum are exact, their split by stack is estimated from
//!   the captured sample); with none captured since, the last one captured stands for it, and
//!   with none ever, a `[stack not captured]` frame.
use std::collections::HashMap;

use kprof_common::{OffCpuThread, python::PyFrame, wait};

use super::event::{Event, EventKind};
use kprof_common::python::PyFrames;

/// A captured switch-out: the record's fields and stacks, kept until its wait is settled.
#[derive(Clone, Debug)]
struct Captured {
    tgid: u32,
    tid: u32,
    slot: u32,
    comm: [u8; 16],
    exec_id: u32,
    wait: u32,
    addr: u64,
    ts_out: u64,
    kernel: Vec<u64>,
    user: Vec<u64>,
    py: Vec<PyFrame>,
    py_truncated: bool,
    user_truncated: bool,
}

impl Captured {
    fn of(ev: &Event<'_>) -> Self {
        Captured {
            tgid: ev.tgid,
            tid: ev.tid,
            slot: ev.slot,
            comm: ev.comm,
            exec_id: ev.exec_id,
            wait: ev.wait,
            addr: ev.addr,
            ts_out: ev.timestamp_ns,
            kernel: ev.kernel.to_vec(),
            user: ev.user.to_vec(),
            py: ev.py.frames.to_vec(),
            py_truncated: ev.py.truncated,
            user_truncated: ev.user_truncated,
        }
    }

    /// A wait without stacks (its time gets a `[stack not captured]` frame).
    fn without_stacks(
        tgid: u32,
        tid: u32,
        slot: u32,
        wait: u32,
        addr: u64,
        comm: [u8; 16],
    ) -> Self {
        Captured {
            tgid,
            tid,
            slot,
            comm,
            exec_id: 0,
            wait,
            addr,
            ts_out: 0,
            kernel: Vec::new(),
            user: Vec::new(),
            py: Vec::new(),
            py_truncated: false,
            user_truncated: false,
        }
    }

    fn event(&self, value: u64, count: u64) -> Event<'_> {
        Event {
            kind: EventKind::OffCpu,
            value,
            count,
            timestamp_ns: self.ts_out,
            wait: self.wait,
            addr: self.addr,
            tgid: self.tgid,
            tid: self.tid,
            slot: self.slot,
            comm: self.comm,
            exec_id: self.exec_id,
            in_kernel: !self.kernel.is_empty(),
            user_truncated: self.user_truncated,
            unwind_miss: false,
            gil_held: None,
            kernel: &self.kernel,
            user: &self.user,
            py: PyFrames {
                frames: &self.py,
                truncated: self.py_truncated,
            },
        }
    }
}

/// A captured wait that has not ended, and how much of it was reported.
#[derive(Debug)]
struct Pending {
    wait: Captured,
    reported: u64,
}

/// An uncaptured wait in progress (seen in the `OFF_CPU` map), and how much was reported.
#[derive(Clone, Copy, Debug)]
struct Ongoing {
    ts_out: u64,
    stratum: usize,
    reported: u64,
}

/// A thread of a target that is blocked and that the kernel has not seen leave the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockedThread {
    pub tid: u32,
    pub tgid: u32,
    pub slot: u32,
    pub comm: [u8; 16],
    /// Its wait word (`kprof_common::wait`) and syscall argument, as `/proc` tells them.
    pub wait: u32,
    pub addr: u64,
    /// When its process became a target (CLOCK_MONOTONIC ns): it has been blocked since then
    /// at least, as the kernel saw every switch of the process from then on.
    pub since: u64,
}

/// Counters of the tracker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffCpuStats {
    /// Captured waits settled (their end seen).
    pub settled: u64,
    /// Ends with no captured start (the start record was lost): their time is shared out like
    /// uncaptured time.
    pub unmatched_ends: u64,
    /// Nanoseconds of uncaptured time shared out.
    pub uncaptured_ns: u64,
}

/// Joins captured switch-outs with their ends and shares out the uncaptured time.
#[derive(Debug, Default)]
pub struct OffCpuTracker {
    pending: HashMap<u32, Pending>,
    /// Captured waits settled since the last tick, per (thread, stratum), with durations.
    settled: HashMap<(u32, usize), Vec<(Captured, u64)>>,
    /// The last captured wait per (thread, stratum).
    last: HashMap<(u32, usize), Captured>,
    /// Per thread: `rest_ns` and `rest_count` as last read from the map.
    seen: HashMap<u32, ([u64; wait::STRATA], [u64; wait::STRATA])>,
    ongoing: HashMap<u32, Ongoing>,
    /// Time of settled waits whose start was lost, per (thread, stratum): (ns, count, template).
    loose: HashMap<(u32, usize), (u64, u64, Captured)>,
    /// Threads blocked since before profiling began: reported up to, and their stand-in.
    blocked: HashMap<u32, (u64, Captured)>,
    pub stats: OffCpuStats,
}

impl OffCpuTracker {
    /// Takes one off-CPU record; what can be counted now goes to `sink`.
    pub fn on_record(&mut self, ev: &Event<'_>, mut sink: impl FnMut(&Event<'_>)) {
        match ev.kind {
            EventKind::OffCpu => {
                // A previous capture of this thread whose end was lost is dropped: its
                // duration is unknown.
                self.pending.insert(
                    ev.tid,
                    Pending {
                        wait: Captured::of(ev),
                        reported: 0,
                    },
                );
            }
            EventKind::OffCpuEnd => {
                let s = wait::stratum(ev.wait);
                match self.pending.remove(&ev.tid) {
                    Some(p) => {
                        let count = u64::from(p.reported == 0);
                        sink(&p.wait.event(ev.value.saturating_sub(p.reported), count));
                        self.stats.settled += 1;
                        self.settled
                            .entry((ev.tid, s))
                            .or_default()
                            .push((p.wait, ev.value));
                    }
                    None => {
                        self.stats.unmatched_ends += 1;
                        let e = self.loose.entry((ev.tid, s)).or_insert_with(|| {
                            let w = Captured::without_stacks(
                                ev.tgid, ev.tid, ev.slot, ev.wait, ev.addr, ev.comm,
                            );
                            (0, 0, w)
                        });
                        e.0 += ev.value;
                        e.1 += 1;
                    }
                }
            }
            _ => {}
        }
    }

    /// Reports, as of `now` (CLOCK_MONOTONIC ns), the part of every wait in progress that has
    /// passed and the uncaptured time the kernel summed in `threads` (the `OFF_CPU` map).
    /// `comm` names a thread that has no captured wait.
    pub fn tick(
        &mut self,
        now: u64,
        threads: &[(u32, OffCpuThread)],
        mut comm: impl FnMut(u32, u32) -> [u8; 16],
        mut sink: impl FnMut(&Event<'_>),
    ) {
        for p in self.pending.values_mut() {
            let elapsed = now.saturating_sub(p.wait.ts_out);
            if elapsed > p.reported {
                let count = u64::from(p.reported == 0);
                sink(&p.wait.event(elapsed - p.reported, count));
                p.reported = elapsed;
            }
        }
        for (tid, t) in threads {
            let tid = *tid;
            let (seen_ns, seen_count) = self.seen.get(&tid).copied().unwrap_or_default();
            let mut ns = [0u64; wait::STRATA];
            let mut count = [0u64; wait::STRATA];
            for s in 0..wait::STRATA {
                ns[s] = t.rest_ns[s].saturating_sub(seen_ns[s]);
                count[s] = t.rest_count[s].saturating_sub(seen_count[s]);
            }
            self.seen.insert(tid, (t.rest_ns, t.rest_count));
            // An uncaptured wait reported while in progress has ended when the map shows
            // another wait (or none): its whole length is in the sums now, minus what was
            // reported already.
            if let Some(o) = self.ongoing.get(&tid).copied()
                && (t.ts_out != o.ts_out || t.captured != 0)
            {
                ns[o.stratum] = ns[o.stratum].saturating_sub(o.reported);
                self.ongoing.remove(&tid);
            }
            if t.ts_out != 0 && t.captured == 0 && now > t.ts_out {
                let s = wait::stratum(t.wait);
                let so_far = now - t.ts_out;
                let reported = self.ongoing.get(&tid).map_or(0, |o| o.reported);
                ns[s] += so_far.saturating_sub(reported);
                self.ongoing.insert(
                    tid,
                    Ongoing {
                        ts_out: t.ts_out,
                        stratum: s,
                        reported: so_far.max(reported),
                    },
                );
            }
            for s in 0..wait::STRATA {
                if let Some((lns, lcount, template)) = self.loose.remove(&(tid, s)) {
                    ns[s] += lns;
                    count[s] += lcount;
                    self.last.entry((tid, s)).or_insert(template);
                }
                if ns[s] == 0 {
                    continue;
                }
                self.stats.uncaptured_ns += ns[s];
                self.share_out(tid, t, s, ns[s], count[s], &mut comm, &mut sink);
            }
        }
        for ((tid, s), mut waits) in self.settled.drain() {
            if let Some((w, _)) = waits.pop() {
                self.last.insert((tid, s), w);
            }
        }
        // Threads gone from the map (exited and removed, or evicted) are forgotten.
        let live: std::collections::HashSet<u32> = threads.iter().map(|(t, _)| *t).collect();
        self.seen.retain(|t, _| live.contains(t));
        self.ongoing.retain(|t, _| live.contains(t));
        self.pending.retain(|t, _| live.contains(t));
        self.last.retain(|(t, _), _| live.contains(t));
    }

    /// Reports, as of `now`, the time of threads that were already blocked when profiling began
    /// and have not run since (the kernel never saw them leave the CPU): `blocked` lists those
    /// seen blocked now (from `/proc`). A thread is reported from when its process became a
    /// target; one missing from `blocked` woke (the kernel tracks it from its next wait) or
    /// exited.
    pub fn tick_blocked(
        &mut self,
        now: u64,
        blocked: &[BlockedThread],
        mut sink: impl FnMut(&Event<'_>),
    ) {
        let mut seen = std::collections::HashSet::new();
        for b in blocked {
            seen.insert(b.tid);
            match self.blocked.get_mut(&b.tid) {
                Some((last, wait)) => {
                    if now > *last {
                        sink(&wait.event(now - *last, 0));
                        *last = now;
                    }
                }
                None => {
                    let since = b.since.min(now);
                    let wait = Captured {
                        ts_out: since,
                        ..Captured::without_stacks(b.tgid, b.tid, b.slot, b.wait, b.addr, b.comm)
                    };
                    if now > since {
                        sink(&wait.event(now - since, 1));
                    }
                    self.blocked.insert(b.tid, (now, wait));
                }
            }
        }
        self.blocked.retain(|t, _| seen.contains(t));
    }

    /// Shares `ns` (and `count` waits) of a thread's uncaptured time in stratum `s` out over
    /// the waits that stand for it.
    #[allow(clippy::too_many_arguments)]
    fn share_out(
        &mut self,
        tid: u32,
        t: &OffCpuThread,
        s: usize,
        ns: u64,
        count: u64,
        comm: &mut impl FnMut(u32, u32) -> [u8; 16],
        sink: &mut impl FnMut(&Event<'_>),
    ) {
        if let Some(waits) = self.settled.get(&(tid, s))
            && !waits.is_empty()
        {
            let total: u64 = waits.iter().map(|(_, d)| *d).sum::<u64>().max(1);
            let (mut ns_left, mut count_left) = (ns, count);
            for (i, (w, d)) in waits.iter().enumerate() {
                let (share, share_count) = if i + 1 == waits.len() {
                    (ns_left, count_left)
                } else {
                    let f = *d as f64 / total as f64;
                    let share = ((ns as f64 * f) as u64).min(ns_left);
                    let share_count = ((count as f64 * f).round() as u64).min(count_left);
                    (share, share_count)
                };
                ns_left -= share;
                count_left -= share_count;
                if share > 0 || share_count > 0 {
                    sink(&w.event(share, share_count));
                }
            }
            return;
        }
        let stand_in = self.last.entry((tid, s)).or_insert_with(|| {
            // A wait word of the stratum (its syscall is not known).
            let word = match s {
                0 => wait::of(0, None),
                1 => wait::of(1, Some(wait::SYS_FUTEX)),
                3 => wait::of(2, None),
                _ => wait::of(1, None),
            };
            Captured::without_stacks(t.tgid, tid, t.slot, word, 0, comm(t.tgid, tid))
        });
        sink(&stand_in.event(ns, count));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TID: u32 = 41;
    const TGID: u32 = 40;

    fn begin(ts: u64, word: u32, user: &'static [u64]) -> Event<'static> {
        Event {
            kind: EventKind::OffCpu,
            value: 0,
            timestamp_ns: ts,
            wait: word,
            tid: TID,
            tgid: TGID,
            ..Event::synthetic(EventKind::OffCpu, 0, TGID, user)
        }
    }

    fn end(ns: u64, word: u32) -> Event<'static> {
        Event {
            kind: EventKind::OffCpuEnd,
            value: ns,
            wait: word,
            tid: TID,
            tgid: TGID,
            ..Event::synthetic(EventKind::OffCpuEnd, ns, TGID, &[])
        }
    }

    /// (user stack, value, count) of the events sunk.
    type Out = Vec<(Vec<u64>, u64, u64)>;

    fn collect(out: &mut Out) -> impl FnMut(&Event<'_>) + '_ {
        |e| out.push((e.user.to_vec(), e.value, e.count))
    }

    fn thread(
        ts_out: u64,
        captured: bool,
        word: u32,
        rest: [u64; 4],
        counts: [u64; 4],
    ) -> OffCpuThread {
        OffCpuThread {
            ts_out,
            tgid: TGID,
            wait: word,
            captured: u32::from(captured),
            rest_ns: rest,
            rest_count: counts,
            ..OffCpuThread::default()
        }
    }

    const SLEEP: u32 = wait::of(1, Some(230));

    #[test]
    fn a_captured_wait_is_reported_as_it_passes_and_counted_once() {
        let mut t = OffCpuTracker::default();
        let mut out = Out::new();
        t.on_record(&begin(1_000, SLEEP, &[0xa]), collect(&mut out));
        assert!(
            out.is_empty(),
            "nothing is known until the wait ends or a tick comes"
        );
        let blocked = thread(1_000, true, SLEEP, [0; 4], [0; 4]);
        t.tick(5_000, &[(TID, blocked)], |_, _| [0; 16], collect(&mut out));
        t.tick(9_000, &[(TID, blocked)], |_, _| [0; 16], collect(&mut out));
        t.on_record(&end(10_000, SLEEP), collect(&mut out));
        assert_eq!(
            out,
            [
                (vec![0xa], 4_000, 1),
                (vec![0xa], 4_000, 0),
                (vec![0xa], 2_000, 0)
            ]
        );
        assert_eq!(t.stats.settled, 1);
    }

    #[test]
    fn uncaptured_time_is_shared_over_the_captured_waits_of_its_stratum_by_duration() {
        let mut t = OffCpuTracker::default();
        let mut out = Out::new();
        t.on_record(&begin(0, SLEEP, &[0xa]), collect(&mut out));
        t.on_record(&end(3_000, SLEEP), collect(&mut out));
        t.on_record(&begin(5_000, SLEEP, &[0xb]), collect(&mut out));
        t.on_record(&end(1_000, SLEEP), collect(&mut out));
        out.clear();
        // 8 µs in 4 uncaptured sleeps (stratum 2), and 1 µs runnable (stratum 0).
        let th = thread(0, false, SLEEP, [1_000, 0, 8_000, 0], [1, 0, 4, 0]);
        t.tick(
            20_000,
            &[(TID, th)],
            |_, _| *b"named\0\0\0\0\0\0\0\0\0\0\0",
            collect(&mut out),
        );
        assert_eq!(
            out,
            [
                (vec![], 1_000, 1),
                (vec![0xa], 6_000, 3),
                (vec![0xb], 2_000, 1)
            ],
            "3:1 like the captured durations; runnable time has no captured wait"
        );
        // Next tick: only new uncaptured time, and the last captured wait stands for it.
        out.clear();
        let th = thread(0, false, SLEEP, [1_000, 0, 8_500, 0], [1, 0, 5, 0]);
        t.tick(30_000, &[(TID, th)], |_, _| [0; 16], collect(&mut out));
        assert_eq!(out, [(vec![0xb], 500, 1)]);
    }

    #[test]
    fn an_uncaptured_wait_in_progress_is_reported_and_not_counted_twice_when_it_ends() {
        let mut t = OffCpuTracker::default();
        let mut out = Out::new();
        let waiting = thread(10_000, false, SLEEP, [0; 4], [0; 4]);
        t.tick(15_000, &[(TID, waiting)], |_, _| [0; 16], collect(&mut out));
        t.tick(18_000, &[(TID, waiting)], |_, _| [0; 16], collect(&mut out));
        // It ended after 9 µs (the kernel summed it) and the thread runs.
        let done = thread(0, false, SLEEP, [0, 0, 9_000, 0], [0, 0, 1, 0]);
        t.tick(30_000, &[(TID, done)], |_, _| [0; 16], collect(&mut out));
        let total: u64 = out.iter().map(|(_, v, _)| v).sum();
        let count: u64 = out.iter().map(|(_, _, c)| c).sum();
        assert_eq!((total, count), (9_000, 1), "{out:?}");
        assert_eq!(out[0], (vec![], 5_000, 0));
    }

    #[test]
    fn a_thread_gone_from_the_map_is_forgotten() {
        let mut t = OffCpuTracker::default();
        let mut out = Out::new();
        t.on_record(&begin(0, SLEEP, &[0xa]), collect(&mut out));
        t.tick(1_000, &[], |_, _| [0; 16], collect(&mut out));
        assert_eq!(out.len(), 1, "reported up to the tick");
        t.on_record(&end(2_000, SLEEP), collect(&mut out));
        assert_eq!(
            t.stats.unmatched_ends, 1,
            "the pending wait was dropped with its thread"
        );
    }

    #[test]
    fn a_thread_blocked_before_profiling_is_reported_from_when_its_process_became_a_target() {
        let mut t = OffCpuTracker::default();
        let mut out = Out::new();
        let b = BlockedThread {
            tid: TID,
            tgid: TGID,
            slot: 0,
            comm: [0; 16],
            wait: wait::of(1, Some(wait::SYS_FUTEX)),
            addr: 0x1000,
            since: 400,
        };
        t.tick_blocked(1_000, &[b], collect(&mut out));
        t.tick_blocked(4_000, &[b], collect(&mut out));
        t.tick_blocked(9_000, &[b], collect(&mut out));
        assert_eq!(
            out,
            [(vec![], 600, 1), (vec![], 3_000, 0), (vec![], 5_000, 0)]
        );
        // It woke: the kernel tracks it from now on.
        t.tick_blocked(10_000, &[], collect(&mut out));
        assert_eq!(out.len(), 3);
    }
}
