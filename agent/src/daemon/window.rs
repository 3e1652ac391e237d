//! Pure: the open windows of the node's targets. Events go to the aggregation of every window
//! that selects their container; windows are aligned to multiples of the target's `window` since
//! the epoch, so windows of different pods and nodes line up (the first one is shortened, or
//! lengthened by one window when less than half a window is left). A closed window gives one
//! profile per (container, event kind). No kernel, no cluster: unit-tested with synthetic events.
use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use kprof_crds::ProfileType;

use crate::{
    k8s::{ContainerKey, TargetKey, TargetPlan},
    pipeline::{
        aggregate::{Aggregator, StackMerger},
        event::{Event, EventKind},
    },
    profile::{AggregatedProfile, ProfileKind},
};

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
pub fn filter_pids(p: &AggregatedProfile, pids: &BTreeSet<u32>) -> AggregatedProfile {
    let mut out = AggregatedProfile::of_kind(p.kind, p.start);
    out.duration = p.duration;
    out.labels = p.labels.clone();
    out.dropped = p.dropped;
    out.modules.clone_from(&p.modules);
    out.threads = p.threads.as_ref().map(|r| r.only(pids));
    out.memory = p.memory.as_ref().map(|r| r.only(pids));
    let kept = || p.samples.iter().filter(|(k, _)| pids.contains(&k.pid));
    let n = kept().count();
    out.samples.reserve(n);
    out.values.reserve(n);
    for (k, &c) in kept() {
        out.add_value(k.clone(), c, p.value_of(k));
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

/// One container inside a target's window.
struct ContainerWindow {
    key: ContainerKey,
    pids: BTreeSet<u32>,
    /// Summed event values per kind (CPU nanoseconds for CPU samples).
    values: BTreeMap<EventKind, u64>,
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
    fn new(plan: &TargetPlan, start: SystemTime, end: SystemTime, lost: u64) -> Self {
        let mut agg = Aggregator::new();
        if plan.settings.profile_types.contains(&ProfileType::Threads) {
            agg.track_threads();
        }
        if plan.settings.profile_types.contains(&ProfileType::Memory) {
            agg.track_memory(None);
        }
        let mut w = TargetWindow {
            plan: plan.clone(),
            start,
            end,
            agg,
            containers: BTreeMap::new(),
            lost_at_start: lost,
            hz_seen: BTreeSet::new(),
        };
        w.set_containers(plan);
        w
    }

    fn set_containers(&mut self, plan: &TargetPlan) {
        for c in &plan.containers {
            self.containers
                .entry(c.id.id.clone())
                .or_insert_with(|| ContainerWindow {
                    key: c.clone(),
                    pids: BTreeSet::new(),
                    values: BTreeMap::new(),
                });
        }
        self.plan = plan.clone();
    }
}

/// A closed window of one target.
#[derive(Debug)]
pub struct ClosedWindow {
    pub plan: TargetPlan,
    pub start: SystemTime,
    pub end: SystemTime,
    /// Node-wide lost-event count when the window opened.
    pub lost_at_start: u64,
    /// The CPU sampling rates events arrived at.
    pub hz_seen: BTreeSet<u32>,
    pub containers: Vec<ClosedContainer>,
}

/// One container of a closed window.
#[derive(Debug)]
pub struct ClosedContainer {
    pub key: ContainerKey,
    /// The processes that had events.
    pub pids: BTreeSet<u32>,
    /// Summed event values per kind.
    pub values: BTreeMap<EventKind, u64>,
    /// One profile per profile type the target asks for that this agent builds, by type name
    /// (empty ones included).
    pub profiles: BTreeMap<&'static str, AggregatedProfile>,
}

/// The open windows, one per target.
#[derive(Default)]
pub struct Windows {
    open: BTreeMap<TargetKey, TargetWindow>,
}

impl Windows {
    /// Targets whose window must close before `wanted` applies: gone, or with new settings.
    pub fn stale(&self, wanted: &BTreeMap<TargetKey, TargetPlan>) -> Vec<TargetKey> {
        self.open
            .iter()
            .filter(|(k, w)| wanted.get(*k).is_none_or(|p| p.settings != w.plan.settings))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Opens a window for each new target (from `now`); others take the plan's containers.
    /// Returns the targets opened.
    pub fn apply(
        &mut self,
        wanted: &BTreeMap<TargetKey, TargetPlan>,
        now: SystemTime,
        lost: u64,
    ) -> Vec<TargetKey> {
        let mut opened = Vec::new();
        for (k, p) in wanted {
            match self.open.get_mut(k) {
                Some(w) => w.set_containers(p),
                None => {
                    let end = aligned_window_end(now, p.settings.window);
                    self.open
                        .insert(k.clone(), TargetWindow::new(p, now, end, lost));
                    opened.push(k.clone());
                }
            }
        }
        opened
    }

    /// Adds one event of a process of container `cid` to the windows of `targets`.
    pub fn add(
        &mut self,
        targets: &[TargetKey],
        cid: &str,
        ev: &Event<'_>,
        sample_hz: u32,
        mut merger: Option<&mut dyn StackMerger>,
    ) {
        for t in targets {
            let Some(w) = self.open.get_mut(t) else {
                continue;
            };
            w.agg.add(
                ev,
                merger.as_mut().map(|m| &mut **m as &mut dyn StackMerger),
            );
            if let Some(c) = w.containers.get_mut(cid) {
                // Saturating: a release's value is a length, up to a whole address range.
                let v = c.values.entry(ev.kind).or_default();
                *v = v.saturating_add(ev.value);
                c.pids.insert(ev.tgid);
            }
            if ev.kind == EventKind::CpuSample {
                w.hz_seen.insert(sample_hz);
            }
        }
    }

    /// Registers a process of container `cid` with the windows of `targets` while it is alive
    /// (names, maps; its threads, for threads profiles, which count idle processes too).
    pub fn see_process(
        &mut self,
        targets: &[TargetKey],
        cid: &str,
        pid: u32,
        mut merger: Option<&mut dyn StackMerger>,
    ) {
        for t in targets {
            if let Some(w) = self.open.get_mut(t) {
                w.agg.see_process(
                    pid,
                    merger.as_mut().map(|m| &mut **m as &mut dyn StackMerger),
                );
                if (w.agg.tracks_threads() || w.agg.tracks_memory())
                    && let Some(c) = w.containers.get_mut(cid)
                {
                    c.pids.insert(pid);
                }
            }
        }
    }

    /// The aggregations of the open windows that keep memory accounting.
    pub fn memory_aggregations(&mut self) -> impl Iterator<Item = &mut Aggregator> {
        self.open
            .values_mut()
            .map(|w| &mut w.agg)
            .filter(|a| a.tracks_memory())
    }

    /// The aggregations of the open windows that keep thread accounting.
    pub fn thread_aggregations(&mut self) -> impl Iterator<Item = &mut Aggregator> {
        self.open
            .values_mut()
            .map(|w| &mut w.agg)
            .filter(|a| a.tracks_threads())
    }

    /// A warning about process `pid` for the windows open now (each container's Profile keeps
    /// the warnings of its own processes).
    pub fn add_warning(&mut self, pid: u32, warning: &str) {
        for w in self.open.values_mut() {
            w.agg.add_warnings(pid, vec![warning.to_owned()]);
        }
    }

    /// After each drain: one maps re-read and exec check per process and round.
    pub fn new_round(&mut self) {
        for w in self.open.values_mut() {
            w.agg.new_round();
        }
    }

    /// The oldest start of an open window (`now` when none is open).
    pub fn oldest_start(&self, now: SystemTime) -> SystemTime {
        self.open
            .values()
            .map(|w| w.start)
            .min()
            .unwrap_or(now)
            .min(now)
    }

    /// Targets whose window ends at or before `now`.
    pub fn due(&self, now: SystemTime) -> Vec<TargetKey> {
        self.open
            .iter()
            .filter(|(_, w)| now >= w.end)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Every open target.
    pub fn keys(&self) -> Vec<TargetKey> {
        self.open.keys().cloned().collect()
    }

    /// Closes a target's window: at its aligned end when `reopen` (the next window starts
    /// there, keeping the symbol caches), else at `now` (a partial window). `sample_hz`: the
    /// CPU rate now, used when no CPU sample arrived.
    /// `close_threads` closes the window's thread and memory accounting (the engine knows who
    /// created each thread, and reads the runtimes' heaps).
    pub fn close(
        &mut self,
        key: &TargetKey,
        now: SystemTime,
        reopen: bool,
        lost: u64,
        sample_hz: u32,
        close_threads: impl FnOnce(&mut Aggregator),
    ) -> Option<ClosedWindow> {
        let mut w = self.open.remove(key)?;
        close_threads(&mut w.agg);
        let end = if reopen { w.end } else { now };
        let hz = w.hz_seen.iter().copied().max().unwrap_or(sample_hz);
        let whole: Vec<(&'static str, AggregatedProfile)> = w
            .plan
            .settings
            .profile_types
            .iter()
            .map(|&t| ProfileKind::of_type(t, hz))
            .map(|kind| {
                let mut p = w.agg.finish(kind, w.start);
                p.duration = end.duration_since(w.start).unwrap_or_default();
                (kind.name(), p)
            })
            .collect();
        let containers = w
            .containers
            .values()
            .map(|c| ClosedContainer {
                key: c.key.clone(),
                pids: c.pids.clone(),
                values: c.values.clone(),
                profiles: whole
                    .iter()
                    .map(|(kind, p)| (*kind, filter_pids(p, &c.pids)))
                    .collect(),
            })
            .collect();
        if reopen {
            let next_end = aligned_window_end(end, w.plan.settings.window);
            let mut next = TargetWindow::new(&w.plan, end, next_end, lost);
            // Keep the symbol caches from one window to the next, less the processes gone.
            std::mem::swap(next.agg.symbolizer(), w.agg.symbolizer());
            next.agg.symbolizer().forget_exited();
            // What memory is held, and the heap's history, carry on into the next window.
            if let Some(ledger) = w.agg.take_memory() {
                next.agg.track_memory(Some(ledger));
            }
            // A threads profile counts every live process of its containers, events or not:
            // the next window starts from them (and their threads' CPU now).
            if next.agg.tracks_threads() || next.agg.tracks_memory() {
                for (cid, c) in &w.containers {
                    for &pid in &c.pids {
                        if !crate::proc::is_alive(pid) {
                            continue;
                        }
                        if let Some(ledger) = next.agg.threads() {
                            ledger.see_process(pid);
                        }
                        if let Some(nc) = next.containers.get_mut(cid) {
                            nc.pids.insert(pid);
                        }
                    }
                }
            }
            self.open.insert(key.clone(), next);
        }
        Some(ClosedWindow {
            plan: w.plan,
            start: w.start,
            end,
            lost_at_start: w.lost_at_start,
            hz_seen: w.hz_seen,
            containers,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kprof_crds::ProfileType;

    use super::*;
    use crate::{
        daemon::routing::Routing,
        k8s::{ContainerId, TargetSettings},
        profile::{Frame, FrameKind, SampleKey},
    };

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
        let mut p = AggregatedProfile::new(99, UNIX_EPOCH);
        let st: Arc<[Frame]> = vec![Frame::new(FrameKind::Native, "f")].into();
        for pid in [1, 2, 3] {
            p.add(
                SampleKey {
                    pid,
                    tid: 0,
                    thread: "t".into(),
                    wait: None,
                    gil_held: None,
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
        assert_eq!(f.total_value(), 3 * (1_000_000_000 / 99));
        assert_eq!(f.warnings, ["pid 2: python too new", "global"]);
    }

    fn container(pod: &str) -> ContainerKey {
        ContainerKey {
            namespace: "shop".into(),
            pod: pod.into(),
            pod_uid: format!("uid-{pod}"),
            container: "app".into(),
            id: ContainerId {
                runtime: "containerd".into(),
                id: format!("cid-{pod}"),
            },
        }
    }

    fn plan(name: &str, pods: &[&str]) -> TargetPlan {
        plan_of(name, pods, vec![ProfileType::Cpu, ProfileType::Wall])
    }

    fn plan_of(name: &str, pods: &[&str], types: Vec<ProfileType>) -> TargetPlan {
        TargetPlan {
            key: TargetKey {
                namespace: "shop".into(),
                name: name.into(),
                uid: format!("uid-{name}"),
            },
            settings: TargetSettings {
                window: Duration::from_secs(10),
                sample_hz: 100,
                profile_types: types,
                alloc_probes: false,
            },
            containers: pods.iter().map(|p| container(p)).collect(),
        }
    }

    /// A synthetic event of a process that does not exist (frames stay unresolved).
    fn event(
        kind: EventKind,
        value: u64,
        pid: u32,
        slot: u32,
        user: &'static [u64],
    ) -> Event<'static> {
        Event {
            slot,
            ..Event::synthetic(kind, value, pid, user)
        }
    }

    #[test]
    fn events_of_two_kinds_become_aligned_windows_with_one_profile_per_container_and_kind() {
        const TICK: u64 = 10_000_000; // 100 Hz
        let (pid_a, pid_b) = (u32::MAX - 21, u32::MAX - 22);
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000); // a window boundary
        let wanted: BTreeMap<TargetKey, TargetPlan> = [
            plan("api", &["a", "b"]),
            plan_of("a-only", &["a"], vec![ProfileType::Cpu]),
        ]
        .into_iter()
        .map(|p| (p.key.clone(), p))
        .collect();
        let mut routing = Routing::default();
        routing.set_plan(&wanted);
        let mut windows = Windows::default();
        assert_eq!(windows.apply(&wanted, t0, 0).len(), 2);
        assert!(windows.stale(&wanted).is_empty());

        // pid a is known from a scan; pid b only by the slot the fork follower gave it.
        routing.set_pids([(pid_a, "cid-a".to_owned())].into());
        let slot_b = routing.slot_of("cid-b");
        let mut feed = |ev: Event<'_>| {
            let cid = routing
                .container_of_event(ev.tgid, ev.slot, |_| None)
                .expect("routed");
            windows.add(routing.targets_of(&cid), &cid, &ev, 100, None);
        };
        for _ in 0..3 {
            feed(event(EventKind::CpuSample, TICK, pid_a, 0, &[0x1000]));
        }
        feed(event(EventKind::CpuSample, TICK, pid_b, slot_b, &[0x2000]));
        feed(event(EventKind::OffCpu, 7_000, pid_a, 0, &[0x1000]));
        feed(event(EventKind::OffCpu, 5_000, pid_a, 0, &[0x1000]));
        // An event of a container no target selects goes nowhere.
        assert!(
            routing
                .container_of_event(7, 999, |_| Some("cid-x".into()))
                .is_none()
        );

        assert!(windows.due(t0 + Duration::from_secs(9)).is_empty());
        let due = windows.due(t0 + Duration::from_secs(10));
        assert_eq!(
            due.len(),
            2,
            "both targets' windows end on the same boundary"
        );

        let api = wanted.keys().find(|k| k.name == "api").unwrap().clone();
        let closed = windows
            .close(&api, t0 + Duration::from_secs(10), true, 4, 100, |_| ())
            .unwrap();
        assert_eq!(
            (closed.start, closed.end),
            (t0, t0 + Duration::from_secs(10))
        );
        assert_eq!(closed.hz_seen, [100].into());
        let [a, b] = &closed.containers[..] else {
            panic!("two containers: {:?}", closed.containers);
        };
        assert_eq!((a.key.pod.as_str(), b.key.pod.as_str()), ("a", "b"));
        assert_eq!(a.pids, [pid_a].into());
        assert_eq!(b.pids, [pid_b].into());

        let cpu_a = &a.profiles["cpu"];
        assert_eq!(cpu_a.kind, ProfileKind::Cpu { sample_hz: 100 });
        assert_eq!((cpu_a.total(), cpu_a.total_value()), (3, 3 * TICK));
        assert!(
            (cpu_a.cpu_cores() - 0.003).abs() < 1e-9,
            "3 ticks of 10 ms in 10 s"
        );
        let wall_a = &a.profiles["wall"];
        assert_eq!(wall_a.kind, ProfileKind::Wall { sample_hz: 100 });
        assert_eq!(
            (wall_a.total(), wall_a.total_value()),
            (5, 3 * TICK + 12_000),
            "wall time is CPU plus off-CPU time"
        );
        assert_eq!(a.values[&EventKind::OffCpu], 12_000);
        assert_eq!(a.values[&EventKind::CpuSample], 3 * TICK);

        let cpu_b = &b.profiles["cpu"];
        assert_eq!((cpu_b.total(), cpu_b.total_value()), (1, TICK));
        assert_eq!(
            b.profiles["wall"].total(),
            1,
            "no off-CPU events of b: its wall time is its CPU time"
        );

        // The next window of the same target starts where this one ended.
        let next = windows
            .close(&api, t0 + Duration::from_secs(12), false, 4, 100, |_| ())
            .unwrap();
        assert_eq!(next.start, t0 + Duration::from_secs(10));
        assert_eq!(next.containers[0].profiles["cpu"].total(), 0);

        // The other target saw only container a.
        let other = wanted.keys().find(|k| k.name == "a-only").unwrap().clone();
        let closed = windows
            .close(&other, t0 + Duration::from_secs(10), false, 4, 100, |_| ())
            .unwrap();
        assert_eq!(closed.containers.len(), 1);
        assert_eq!(closed.containers[0].profiles["cpu"].total(), 3);
        assert!(
            !closed.containers[0].profiles.contains_key("wall"),
            "only the types a target asks for"
        );
        assert!(windows.keys().is_empty());
    }

    #[test]
    fn a_threads_window_counts_its_processes_without_events_and_hands_them_to_the_next() {
        let pid = std::process::id();
        let t0 = UNIX_EPOCH + Duration::from_secs(2_000);
        let target = plan_of("threads", &["a"], vec![ProfileType::Threads]);
        let key = target.key.clone();
        let wanted: BTreeMap<TargetKey, TargetPlan> = [(key.clone(), target)].into();
        let mut windows = Windows::default();
        windows.apply(&wanted, t0, 0);
        // A process placed by a scan: no event needed to be counted.
        windows.see_process(std::slice::from_ref(&key), "cid-a", pid, None);
        let mut registry = crate::pipeline::threads::ThreadRegistry::default();
        let closed = windows
            .close(&key, t0 + Duration::from_secs(10), true, 0, 100, |agg| {
                agg.close_threads(&mut registry, None)
            })
            .unwrap();
        let c = &closed.containers[0];
        assert_eq!(c.pids, [pid].into());
        let threads = &c.profiles["threads"];
        assert_eq!(threads.kind, ProfileKind::Threads);
        let report = threads.threads.as_ref().expect("a thread report");
        assert!(report.processes[&pid].end >= 1);
        assert!(report.threads.iter().any(|t| t.tid == pid && t.alive));
        assert_eq!(
            threads.total_value(),
            report.threads.iter().filter(|t| t.alive).count() as u64,
            "one alive sample per live thread"
        );
        // The next window counts the same process from its start.
        let next = windows
            .close(&key, t0 + Duration::from_secs(12), false, 0, 100, |agg| {
                agg.close_threads(&mut registry, None)
            })
            .unwrap();
        assert_eq!(next.containers[0].pids, [pid].into());
        assert!(
            next.containers[0].profiles["threads"]
                .threads
                .as_ref()
                .is_some_and(|r| r.processes.contains_key(&pid))
        );
    }

    #[test]
    fn a_memory_window_holds_what_was_touched_and_hands_its_pages_to_the_next() {
        let pid = std::process::id();
        let t0 = UNIX_EPOCH + Duration::from_secs(3_000);
        let target = plan_of("mem", &["a"], vec![ProfileType::Memory]);
        let key = target.key.clone();
        let wanted: BTreeMap<TargetKey, TargetPlan> = [(key.clone(), target)].into();
        let mut windows = Windows::default();
        windows.apply(&wanted, t0, 0);
        windows.see_process(std::slice::from_ref(&key), "cid-a", pid, None);
        // A page of ours that stays: a sampled fault standing for 256 KiB.
        let kept = vec![5u8; 1 << 20];
        let fault = Event {
            addr: kept.as_ptr() as u64,
            ..Event::synthetic(EventKind::PageFault, 1 << 18, pid, &[0x1000])
        };
        windows.add(std::slice::from_ref(&key), "cid-a", &fault, 100, None);
        let closed = windows
            .close(&key, t0 + Duration::from_secs(10), true, 0, 100, |agg| {
                agg.close_memory(None)
            })
            .unwrap();
        let memory = &closed.containers[0].profiles["memory"];
        assert!(matches!(memory.kind, ProfileKind::Memory { .. }));
        assert_eq!((memory.total(), memory.total_value()), (1, 1 << 18));
        assert_eq!(memory.total_inuse(), 1 << 18);
        let report = memory.memory.as_ref().expect("a memory report");
        assert!(
            report
                .processes
                .iter()
                .any(|u| u.pid == pid && u.end().is_some())
        );
        // The next window touched nothing new: the page is still held, by the same stack.
        let next = windows
            .close(&key, t0 + Duration::from_secs(12), false, 0, 100, |agg| {
                agg.close_memory(None)
            })
            .unwrap();
        let memory = &next.containers[0].profiles["memory"];
        assert_eq!((memory.total(), memory.total_value()), (0, 0));
        assert_eq!(memory.total_inuse(), 1 << 18);
        assert!(memory.has_data(), "held memory is worth a Profile");
        drop(kept);
    }
}
