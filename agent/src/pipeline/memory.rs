//! The memory ledger of memory profiles: the sampled page faults of targets (who touched
//! memory first), which of those pages are still held at each window's end (by the process's
//! `pagemap`), and the resident memory of each process and its cgroup over time — from which
//! alloc and in-use bytes by stack, heap usage and leaks are reported.
//!
//! Pages are held until the process gives their memory back (`munmap`, `madvise`, a
//! shrinking `brk`: the release records) or its `pagemap` says they are gone; a page whose
//! memory was given back and mapped again is someone else's.
//!
//! Beside the sampled pages, the large blocks: every anonymous mapping of 64 KiB or more, growing
//! `mremap` and `brk` of a target is recorded with its stack and exact size (the growth
//! records). Each is held, as a region, until a release covers it or its mapping is gone at a
//! window's end: `mapped` (in the window) and `mapped_inuse` (at its end) by stack.
//!
//! With allocation probes (on demand), the allocations a process reports to
//! `PyTraceMalloc_Track` are sampled by bytes: each sample is held until its block is reported
//! freed — `probed` (in the window) and `probed_inuse` (at its end) by stack.
//!
//! A page-fault sample stands for `period` pages touched for the first time. Memory that an
//! allocator reuses without giving it back to the kernel (pymalloc's arenas, glibc's heap) is
//! touched once, so it counts once, where it was first touched: this is memory growth, not
//! every allocation (that is what tracemalloc hooks, at a price).
use std::{collections::BTreeMap, ops::Bound, path::PathBuf, sync::Arc};

use super::{aggregate::StackMerger, event::Event};
use crate::{
    proc::{
        maps::MapEntry,
        memory::{self, CgroupMemory, PageMap, ResidentMemory},
    },
    profile::{
        Frame, KeyMap, SampleKey,
        memory::{CgroupUsage, FaultTotals, HeapLeak, MemoryReport, ProcessUsage},
    },
};

/// Pages kept for the in-use view at most (each ~100 bytes of agent memory; at 64 pages a
/// sample, 256 Ki pages stand for 64 GiB of memory held).
const MAX_HELD: usize = 1 << 18;
/// Growth regions kept for the in-use view at most (each ~100 bytes of agent memory for 64 KiB
/// or more of the target's: 64 Ki regions stand for 4 GiB or more).
const MAX_REGIONS: usize = 1 << 16;
/// Sampled allocations of the allocation probes kept until freed, at most (each stands for
/// half a MiB on average: 128 Ki samples, 64 GiB).
const MAX_SAMPLED_ALLOCS: usize = 1 << 17;
/// Resident-memory readings kept per process across windows for the leak verdict; older ones
/// are thinned out (every other one dropped) past it.
const MAX_POINTS: usize = 256;

/// A sampled fault of the window.
struct Fault {
    pid: u32,
    page: u64,
    bytes: u64,
    key: SampleKey,
}

/// Memory a growth record added, not given back since: from its start (the map key) to `end`.
struct Region {
    end: u64,
    key: SampleKey,
}

/// A page seen faulted in and held at the last look.
struct Held {
    key: SampleKey,
    /// The code that touched it ([`crate::profile::memory::site`]).
    site: Arc<str>,
    bytes: u64,
}

/// The pages held per process and code site, read once a second: a site whose held memory
/// grows steadily is a leak, whatever else comes and goes in the process.
struct Site {
    /// One of its stacks (for the report).
    stack: Arc<[Frame]>,
    bytes: u64,
    /// (time, bytes held), across windows, thinned.
    history: Vec<(u64, u64)>,
}

#[derive(Default)]
struct Process {
    name: String,
    /// Its memory cgroup's directory (`None`: not found).
    cgroup: Option<PathBuf>,
    /// Readings of this window (one a second at most: the one with the least anonymous
    /// memory, so memory that comes and goes within the second does not look like growth).
    window: Vec<(u64, ResidentMemory)>,
    /// The second being read: when it began and its reading with the least anonymous memory.
    pending: Option<(u64, ResidentMemory)>,
    /// (time, anonymous bytes) across windows, thinned.
    history: Vec<(u64, u64)>,
    /// (time, bytes of the runtime's own heap: Python's pymalloc arenas) of this window.
    runtime_heap: Vec<(u64, u64)>,
    /// Why the runtime's heap could not be read (said once a window).
    runtime_heap_error: Option<String>,
    /// The followed process it was forked from without `exec` (they share pages).
    forked_from: Option<u32>,
}

/// A memory cgroup's reading when the window started (for the OOM kills in it) and the
/// window's readings.
type CgroupReadings = (Option<CgroupMemory>, Vec<(u64, CgroupMemory)>);

/// See the module docs. Kept across windows (handed from a window to the next).
pub struct MemoryLedger {
    faults: Vec<Fault>,
    /// Growth records of the window by stack: (calls, bytes).
    growths: KeyMap<(u64, u64)>,
    /// By (pid, start); the regions of a process never overlap.
    regions: BTreeMap<(u32, u64), Region>,
    /// Growth records the region map had no room for (this window).
    untracked_regions: u64,
    /// Sampled allocations of the window by stack: (samples, bytes they stand for).
    probed: KeyMap<(u64, u64)>,
    /// Sampled allocations not reported freed, by (pid, address).
    sampled_allocs: BTreeMap<(u32, u64), (SampleKey, u64)>,
    /// Sampled allocations there was no room to keep (this window).
    untracked_allocs: u64,
    /// By (pid, page): ordered, so a released range is removed at once.
    held: BTreeMap<(u32, u64), Held>,
    sites: BTreeMap<(u32, Arc<str>), Site>,
    processes: BTreeMap<u32, Process>,
    /// Each memory cgroup of the processes: its reading when the window started (for the OOM
    /// kills in it) and the window's readings.
    cgroups: BTreeMap<PathBuf, CgroupReadings>,
    /// Where the cgroup file systems may be mounted, first match wins.
    cgroup_roots: Vec<PathBuf>,
    untracked: u64,
}

impl Default for MemoryLedger {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryLedger {
    pub fn new() -> Self {
        MemoryLedger {
            faults: Vec::new(),
            growths: KeyMap::default(),
            regions: BTreeMap::new(),
            untracked_regions: 0,
            probed: KeyMap::default(),
            sampled_allocs: BTreeMap::new(),
            untracked_allocs: 0,
            held: BTreeMap::new(),
            sites: BTreeMap::new(),
            processes: BTreeMap::new(),
            cgroups: BTreeMap::new(),
            cgroup_roots: memory::CGROUP_ROOTS.iter().map(PathBuf::from).collect(),
            untracked: 0,
        }
    }

    /// Starts following a process's memory (a no-op for one followed already).
    pub fn see_process(&mut self, pid: u32) {
        if !self.processes.contains_key(&pid) {
            let cgroup = memory::cgroup_dir(pid, &self.cgroup_roots);
            if let Some(dir) = &cgroup
                && !self.cgroups.contains_key(dir)
            {
                let now = memory::read_cgroup(dir);
                self.cgroups.insert(dir.clone(), (now, Vec::new()));
            }
            // Forked without exec from a followed process (a pre-fork worker): same program.
            let forked_from = memory::parent(pid).filter(|ppid| {
                self.processes.contains_key(ppid)
                    && crate::proc::exe_identity(*ppid).is_some()
                    && crate::proc::exe_identity(*ppid) == crate::proc::exe_identity(pid)
            });
            self.processes.insert(
                pid,
                Process {
                    name: crate::proc::name(pid),
                    cgroup,
                    forked_from,
                    ..Process::default()
                },
            );
            self.read_process(pid, crate::proc::monotonic_ns(), true);
        }
    }

    /// A sampled page fault, with the stack (and thread) it was aggregated under. The page is
    /// held from now on; a page faulted in again was given back and reused: the newer stack
    /// holds it.
    pub fn on_fault(&mut self, ev: &Event<'_>, key: SampleKey) {
        self.see_process(ev.tgid);
        let page = ev.addr / kprof_common::PAGE_BYTES;
        let slot = (ev.tgid, page);
        if self.held.len() < MAX_HELD || self.held.contains_key(&slot) {
            let site: Arc<str> = crate::profile::memory::site(&key.stack).into();
            self.unhold(slot);
            let entry = self
                .sites
                .entry((ev.tgid, site.clone()))
                .or_insert_with(|| Site {
                    stack: key.stack.clone(),
                    bytes: 0,
                    history: Vec::new(),
                });
            entry.bytes += ev.value;
            self.held.insert(
                slot,
                Held {
                    key: key.clone(),
                    site,
                    bytes: ev.value,
                },
            );
        } else {
            self.untracked += 1;
        }
        self.faults.push(Fault {
            pid: ev.tgid,
            page,
            bytes: ev.value,
            key,
        });
    }

    /// A growth record: the process mapped `ev.value` bytes at `ev.addr` (or grew its heap by
    /// them there), by the stack of `key`. What was recorded there before is replaced.
    pub fn on_grow(&mut self, ev: &Event<'_>, key: SampleKey) {
        self.see_process(ev.tgid);
        let end = ev.addr.saturating_add(ev.value);
        self.cut_regions(ev.tgid, ev.addr, end);
        if self.regions.len() < MAX_REGIONS {
            self.regions.insert(
                (ev.tgid, ev.addr),
                Region {
                    end,
                    key: key.clone(),
                },
            );
        } else {
            self.untracked_regions += 1;
        }
        let e = self.growths.entry(key).or_default();
        e.0 += 1;
        e.1 += ev.value;
    }

    /// A sampled allocation of the allocation probes: held until its block is freed.
    pub fn on_alloc_sample(&mut self, ev: &Event<'_>, key: SampleKey) {
        self.see_process(ev.tgid);
        let slot = (ev.tgid, ev.addr);
        if self.sampled_allocs.len() < MAX_SAMPLED_ALLOCS || self.sampled_allocs.contains_key(&slot)
        {
            self.sampled_allocs.insert(slot, (key.clone(), ev.value));
        } else {
            self.untracked_allocs += 1;
        }
        let e = self.probed.entry(key).or_default();
        e.0 += 1;
        e.1 += ev.value;
    }

    /// A sampled block of process `pid` at `addr` was freed.
    pub fn on_alloc_free(&mut self, pid: u32, addr: u64) {
        self.sampled_allocs.remove(&(pid, addr));
    }

    /// Removes `[from, to)` from the regions of `pid`, keeping what lies outside it.
    fn cut_regions(&mut self, pid: u32, from: u64, to: u64) {
        if from >= to {
            return;
        }
        // The one region that may begin before `from` and reach into it, then those that
        // begin inside.
        let before = self
            .regions
            .range((pid, 0)..(pid, from))
            .next_back()
            .filter(|(_, r)| r.end > from)
            .map(|(k, _)| *k);
        let inside: Vec<(u32, u64)> = self
            .regions
            .range((pid, from)..(pid, to))
            .map(|(k, _)| *k)
            .collect();
        for k in before.into_iter().chain(inside) {
            let Some(r) = self.regions.remove(&k) else {
                continue;
            };
            if k.1 < from {
                self.regions.insert(
                    k,
                    Region {
                        end: from,
                        key: r.key.clone(),
                    },
                );
            }
            if r.end > to {
                self.regions.insert(
                    (pid, to),
                    Region {
                        end: r.end,
                        key: r.key,
                    },
                );
            }
        }
    }

    /// Process `pid` gave `len` bytes at `addr` back to the kernel: its pages and regions
    /// there are no longer held.
    pub fn on_release(&mut self, pid: u32, addr: u64, len: u64) {
        self.cut_regions(pid, addr, addr.saturating_add(len));
        let first = addr / kprof_common::PAGE_BYTES;
        let end = addr.saturating_add(len).div_ceil(kprof_common::PAGE_BYTES);
        let gone: Vec<(u32, u64)> = self
            .held
            .range((Bound::Included((pid, first)), Bound::Excluded((pid, end))))
            .map(|(k, _)| *k)
            .collect();
        for k in gone {
            self.unhold(k);
        }
    }

    /// Process `pid` replaced its image (`exec`): none of the pages it held are.
    pub fn on_exec(&mut self, pid: u32) {
        self.on_release(pid, 0, u64::MAX);
        self.sampled_allocs.retain(|&(p, _), _| p != pid);
    }

    /// Drops a held page (a no-op for one not held).
    fn unhold(&mut self, slot: (u32, u64)) {
        if let Some(h) = self.held.remove(&slot)
            && let Some(site) = self.sites.get_mut(&(slot.0, h.site))
        {
            site.bytes = site.bytes.saturating_sub(h.bytes);
        }
    }

    /// Reads every followed process's resident memory (call it a few times a second: each
    /// second keeps its least reading) and, once a second, each cgroup's and the runtime's
    /// own heap (through `merger`).
    pub fn checkpoint(&mut self, merger: Option<&mut dyn StackMerger>) {
        self.read_all(false, merger);
    }

    fn read_all(&mut self, flush: bool, merger: Option<&mut dyn StackMerger>) {
        self.read_all_at(crate::proc::monotonic_ns(), flush, merger);
    }

    /// Reads every process and cgroup as of monotonic time `now`.
    fn read_all_at(&mut self, now: u64, flush: bool, mut merger: Option<&mut dyn StackMerger>) {
        let pids: Vec<u32> = self.processes.keys().copied().collect();
        let mut second_done = flush;
        for pid in pids {
            if self.read_process(pid, now, flush) {
                second_done = true;
                self.note_sites(pid, now);
                if let Some(heap) = merger.as_mut().and_then(|m| m.runtime_heap(pid))
                    && let Some(p) = self.processes.get_mut(&pid)
                {
                    match heap {
                        Ok(bytes) => p.runtime_heap.push((now, bytes)),
                        Err(why) => p.runtime_heap_error = Some(why),
                    }
                }
            }
        }
        if second_done || self.cgroups.values().all(|c| c.1.is_empty()) {
            for (dir, (start, series)) in &mut self.cgroups {
                if let Some(m) = memory::read_cgroup(dir) {
                    start.get_or_insert(m);
                    series.push((now, m));
                }
            }
        }
    }

    /// Notes what each code site of `pid` holds now.
    fn note_sites(&mut self, pid: u32, now: u64) {
        let from = (pid, Arc::<str>::from(""));
        for ((p, _), site) in self.sites.range_mut(from..) {
            if *p != pid {
                break;
            }
            if site.bytes == 0 {
                // Holding nothing, it does not leak: its readings start again if it holds.
                site.history.clear();
                continue;
            }
            site.history.push((now, site.bytes));
            thin(&mut site.history);
        }
    }

    /// Reads a process; returns whether its second was complete (or `flush`) and kept.
    fn read_process(&mut self, pid: u32, now: u64, flush: bool) -> bool {
        let Some(p) = self.processes.get_mut(&pid) else {
            return false;
        };
        let current = memory::resident(pid);
        if let Some(m) = current {
            match &mut p.pending {
                Some((_, least)) if m.anon < least.anon => *least = m,
                Some(_) => {}
                None => p.pending = Some((now, m)),
            }
        }
        let Some((began, least)) = p.pending else {
            return false;
        };
        if !flush && now.saturating_sub(began) < 1_000_000_000 {
            return false;
        }
        // The reading that ends a second also begins the next: read once a second (as the
        // node agent does), every second still has its reading.
        p.pending = current.map(|m| (now, m));
        p.window.push((now, least));
        p.history.push((now, least.anon));
        thin(&mut p.history);
        true
    }

    /// Closes the window: which pages of its faults and of earlier ones are still held, and
    /// the figures of every process. The ledger then starts the next window.
    pub fn close(&mut self, merger: Option<&mut dyn StackMerger>) -> MemoryReport {
        self.read_all(true, merger);
        let mut report = MemoryReport::default();
        let faults = std::mem::take(&mut self.faults);
        let mut by_pid: BTreeMap<u32, Vec<Fault>> = BTreeMap::new();
        for f in faults {
            by_pid.entry(f.pid).or_default().push(f);
        }
        report.mapped = std::mem::take(&mut self.growths);
        report.probed = std::mem::take(&mut self.probed);
        let mut pids: Vec<u32> = self.held.keys().map(|k| k.0).collect();
        pids.extend(self.regions.keys().map(|k| k.0));
        pids.extend(self.sampled_allocs.keys().map(|k| k.0));
        pids.extend(by_pid.keys());
        pids.sort_unstable();
        pids.dedup();
        let mut totals = FaultTotals::default();
        let mut exited = Vec::new();
        for pid in pids {
            let faults = by_pid.remove(&pid).unwrap_or_default();
            self.close_process(pid, faults, &mut report, &mut totals, &mut exited);
        }
        if !exited.is_empty() {
            let shown: Vec<String> = exited.iter().take(5).map(u32::to_string).collect();
            let more = exited.len().saturating_sub(shown.len());
            let more = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            report.warnings.push(format!(
                "memory: {} process(es) exited during the window (pid {}{more}): what they \
                 touched is in alloc, nothing of theirs is in use",
                exited.len(),
                shown.join(", ")
            ));
        }
        let untracked_allocs = std::mem::take(&mut self.untracked_allocs);
        if untracked_allocs > 0 {
            report.warnings.push(format!(
                "memory: {untracked_allocs} sampled allocations were not kept for the probed \
                 in-use view (it holds {MAX_SAMPLED_ALLOCS} at most): probed in-use bytes are low"
            ));
        }
        let untracked_regions = std::mem::take(&mut self.untracked_regions);
        if untracked_regions > 0 {
            report.warnings.push(format!(
                "memory: {untracked_regions} mappings were not kept for the mapped in-use view \
                 (it holds {MAX_REGIONS} at most): mapped in-use bytes are low"
            ));
        }
        totals.tracked = self.held.len() as u64;
        totals.untracked = std::mem::take(&mut self.untracked);
        if totals.untracked > 0 {
            report.warnings.push(format!(
                "memory: {} sampled pages were not kept for the in-use view (it holds {} at \
                 most): in-use bytes are low",
                totals.untracked, MAX_HELD
            ));
        }
        report.faults = totals;
        if let Some(reason) = thp_always() {
            report.warnings.push(reason);
        }
        self.report_cgroups(&mut report);
        self.report_processes(&mut report);
        report
    }

    /// One process at the window's end: its faults go to alloc (anonymous memory) or to the
    /// file-backed total; pages held now go to in use.
    fn close_process(
        &mut self,
        pid: u32,
        faults: Vec<Fault>,
        report: &mut MemoryReport,
        totals: &mut FaultTotals,
        exited: &mut Vec<u32>,
    ) {
        let maps = crate::proc::maps::read_maps(pid).ok();
        let pagemap = PageMap::open(pid);
        let mapping = |addr: u64| -> Option<&MapEntry> {
            let maps = maps.as_ref()?;
            let i = maps.partition_point(|m| m.end <= addr);
            maps.get(i).filter(|m| m.start <= addr)
        };
        for f in faults {
            let addr = f.page * kprof_common::PAGE_BYTES;
            // A fault whose mapping is gone was in memory given back since: anonymous memory
            // (code and data files stay mapped).
            if mapping(addr).is_some_and(MapEntry::is_file) {
                totals.file_bytes += f.bytes;
                continue;
            }
            totals.samples += 1;
            totals.bytes += f.bytes;
            let e = report.alloc.entry(f.key).or_default();
            e.0 += 1;
            e.1 += f.bytes;
        }
        if maps.is_none() {
            // Gone (or its mappings are unreadable): nothing of it is counted as held.
            if crate::proc::is_alive(pid) {
                report.warnings.push(format!(
                    "pid {pid}: its memory map cannot be read: none of its memory is counted \
                     as in use"
                ));
            } else {
                exited.push(pid);
            }
            self.held.retain(|k, _| k.0 != pid);
            self.sites.retain(|k, _| k.0 != pid);
            self.regions.retain(|k, _| k.0 != pid);
            self.sampled_allocs.retain(|k, _| k.0 != pid);
            return;
        }
        for ((_, _), (key, bytes)) in self.sampled_allocs.range((pid, 0)..=(pid, u64::MAX)) {
            let e = report.probed_inuse.entry(key.clone()).or_default();
            e.0 += 1;
            e.1 += bytes;
        }
        // A region is held while an anonymous mapping still begins at or covers its start (a
        // region moved by `mremap` or unmapped unseen is gone).
        let mut gone_regions = Vec::new();
        for (&(p, start), r) in self.regions.range((pid, 0)..=(pid, u64::MAX)) {
            if mapping(start).is_some_and(|m| !m.is_file()) {
                let e = report.mapped_inuse.entry(r.key.clone()).or_default();
                e.0 += 1;
                e.1 += r.end - start;
            } else {
                gone_regions.push((p, start));
            }
        }
        for k in gone_regions {
            self.regions.remove(&k);
        }
        // The page map is the owner's alone (mode 0400): an agent that dropped root to a uid of
        // its own cannot open it. Then a page counts as held while an anonymous mapping covers
        // it and no release of it was seen.
        let pagemap = match pagemap {
            Ok(pagemap) => Some(pagemap),
            Err(e) => {
                report.warnings.push(format!(
                    "pid {pid}: its page map cannot be read ({}): a page counts as in use while \
                     its mapping stands and no release of it was seen",
                    e.kind()
                ));
                None
            }
        };
        let mut gone = Vec::new();
        for (&(p, page), h) in self.held.range((pid, 0)..=(pid, u64::MAX)) {
            let addr = page * kprof_common::PAGE_BYTES;
            let held = mapping(addr).is_some_and(|m| !m.is_file())
                && pagemap
                    .as_ref()
                    .is_none_or(|pm| pm.is_held(addr).unwrap_or(false));
            if held {
                *report.inuse.entry(h.key.clone()).or_default() += h.bytes;
            } else {
                gone.push((p, page));
            }
        }
        for slot in gone {
            self.unhold(slot);
        }
    }

    /// Each cgroup's readings of the window; the next window starts from the last one.
    fn report_cgroups(&mut self, report: &mut MemoryReport) {
        let mut gone = Vec::new();
        for (dir, (start, series)) in &mut self.cgroups {
            let pids: Vec<u32> = self
                .processes
                .iter()
                .filter(|(_, p)| p.cgroup.as_ref() == Some(dir))
                .map(|(pid, _)| *pid)
                .collect();
            let series = std::mem::take(series);
            let Some(&(_, end)) = series.last() else {
                gone.push(dir.clone());
                continue;
            };
            let oom_kills = start.map_or(0, |s| end.oom_kills.saturating_sub(s.oom_kills));
            *start = Some(end);
            report.cgroups.push(CgroupUsage {
                pids,
                series,
                oom_kills,
            });
        }
        for dir in gone {
            self.cgroups.remove(&dir);
        }
    }

    /// Each process's readings of the window, and the leak verdict on its history.
    fn report_processes(&mut self, report: &mut MemoryReport) {
        let mut gone = Vec::new();
        let parents: std::collections::BTreeSet<u32> = self
            .processes
            .values()
            .filter_map(|p| p.forked_from)
            .collect();
        let forked: Vec<(u32, u32)> = self
            .processes
            .iter()
            .filter_map(|(pid, p)| Some((*pid, p.forked_from?)))
            .collect();
        if let Some(&(child, parent)) = forked.first() {
            report.warnings.push(format!(
                "memory: {} process(es) forked without exec (pid {child} from pid {parent}…) \
                 share pages copy-on-write with their parent: each one's resident memory counts \
                 the shared pages, so their own anonymous memory is their proportional share \
                 (PSS)",
                forked.len()
            ));
        }
        for (&pid, p) in &mut self.processes {
            let window = std::mem::take(&mut p.window);
            let runtime_heap = std::mem::take(&mut p.runtime_heap);
            if let Some(why) = p.runtime_heap_error.take()
                && runtime_heap.is_empty()
            {
                report.warnings.push(format!(
                    "pid {pid}: the Python object heap cannot be read ({why}): only the \
                     process's resident memory is shown"
                ));
            }
            if window.is_empty() && !crate::proc::is_alive(pid) {
                gone.push(pid);
                continue;
            }
            if let Some(leak) = leak_of(pid, p, &self.sites) {
                report.leaks.push(leak);
            }
            if p.cgroup.is_none() && !window.is_empty() {
                report.warnings.push(format!(
                    "pid {pid}: its memory cgroup was not found under {}: no container memory \
                     figures",
                    self.cgroup_roots
                        .iter()
                        .map(|r| r.display().to_string())
                        .collect::<Vec<_>>()
                        .join(" or ")
                ));
            }
            let shares = p.forked_from.is_some() || parents.contains(&pid);
            report.processes.push(ProcessUsage {
                pid,
                name: p.name.clone(),
                series: window,
                runtime_heap,
                pss_anon: if shares { memory::pss_anon(pid) } else { None },
                forked_from: p.forked_from,
            });
        }
        for pid in &gone {
            self.processes.remove(pid);
        }
        self.sites
            .retain(|(pid, _), site| site.bytes > 0 && !gone.contains(pid));
    }
}

/// The leak verdict on a process: the code sites whose held memory grows steadily (what
/// else comes and goes in the process does not hide them), with how much each grew; the
/// process's anonymous memory over the same time.
fn leak_of(pid: u32, p: &Process, sites: &BTreeMap<(u32, Arc<str>), Site>) -> Option<HeapLeak> {
    let anon_now = p.history.last().map_or(0, |h| h.1);
    let mut grown: Vec<(Arc<[Frame]>, u64, u64)> = Vec::new();
    for ((p, _), site) in sites.range((pid, Arc::<str>::from(""))..) {
        if *p != pid {
            break;
        }
        if let Some((from_ns, from_bytes)) = leak_series(&site.history, anon_now) {
            let to = site.history.last().map_or(0, |h| h.1);
            grown.push((site.stack.clone(), to.saturating_sub(from_bytes), from_ns));
        }
    }
    if grown.is_empty() {
        return None;
    }
    grown.sort_by_key(|g| std::cmp::Reverse(g.1));
    grown.truncate(3);
    let since = grown.iter().map(|g| g.2).min().unwrap_or(0);
    let at = p
        .history
        .partition_point(|h| h.0 < since)
        .min(p.history.len().saturating_sub(1));
    let (from_ns, from_bytes) = p.history.get(at).copied().unwrap_or((since, 0));
    let to_ns = p.history.last().map_or(from_ns, |h| h.0);
    Some(HeapLeak {
        pid,
        name: p.name.clone(),
        from_bytes,
        to_bytes: anon_now,
        seconds: to_ns.saturating_sub(from_ns) as f64 / 1e9,
        grown_by: grown.into_iter().map(|(s, b, _)| (s, b)).collect(),
    })
}

/// Past [`MAX_POINTS`] readings, every other one is dropped (the first stays).
fn thin(history: &mut Vec<(u64, u64)>) {
    if history.len() > MAX_POINTS {
        let mut i = 0;
        history.retain(|_| {
            i += 1;
            i % 2 == 1
        });
    }
}

/// Whether (time, bytes held) readings grow steadily, in a process holding `process_bytes`. One step that made most of the
/// growth and stands out from the others (a cache filled at once, a burst) is left out: what
/// came after it is judged. Then
/// a line fitted through the readings must explain most of their variation (R² ≥ 0.6: memory
/// that comes and goes does not), rise by at least 4 MiB and 1 % over the span, and still rise
/// over the last half (a cache that filled up and stopped is not a leak). Returns when the
/// growth was first seen and the bytes then.
pub fn leak_series(series: &[(u64, u64)], process_bytes: u64) -> Option<(u64, u64)> {
    if series.len() < 4 {
        return None;
    }
    let (first, last) = (series[0].1, series[series.len() - 1].1);
    let (jump_at, jump) = series
        .windows(2)
        .enumerate()
        .map(|(i, w)| (i, w[1].1.saturating_sub(w[0].1)))
        .max_by_key(|&(_, d)| d)?;
    let mut steps: Vec<u64> = series.windows(2).map(|w| w[1].1.abs_diff(w[0].1)).collect();
    steps.sort_unstable();
    let typical = steps[steps.len() / 2];
    if jump * 2 > last.saturating_sub(first)
        && jump > typical.saturating_mul(3)
        && jump_at + 1 < series.len() - 1
    {
        return leak_series(&series[jump_at + 1..], process_bytes);
    }
    let (slope, r2) = fit(series)?;
    let (t0, t1) = (series[0].0, series[series.len() - 1].0);
    let half = &series[series.partition_point(|p| p.0 < t0 + (t1 - t0) / 2)..];
    let (late_slope, _) = fit(half).unwrap_or((0.0, 0.0));
    let grew = slope * (t1 - t0) as f64;
    let steady = grew >= f64::from(4 << 20)
        && grew >= process_bytes as f64 / 100.0
        && r2 >= 0.6
        && late_slope >= slope / 4.0;
    steady.then_some(series[0])
}

/// The least-squares line through (time, bytes) readings: its slope (bytes per ns) and R².
/// `None` with fewer than two readings or all at one time.
fn fit(points: &[(u64, u64)]) -> Option<(f64, f64)> {
    if points.len() < 2 {
        return None;
    }
    let n = points.len() as f64;
    let t0 = points[0].0;
    let xs = points.iter().map(|p| (p.0 - t0) as f64);
    let ys = points.iter().map(|p| p.1 as f64);
    let (mx, my) = (xs.clone().sum::<f64>() / n, ys.clone().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (x, y) in xs.zip(ys) {
        sxy += (x - mx) * (y - my);
        sxx += (x - mx) * (x - mx);
        syy += (y - my) * (y - my);
    }
    if sxx == 0.0 {
        return None;
    }
    let slope = sxy / sxx;
    let r2 = if syy == 0.0 {
        0.0
    } else {
        sxy * sxy / (sxx * syy)
    };
    Some((slope, r2))
}

/// Transparent huge pages on for every mapping: one fault then maps 2 MiB, which counts as
/// one page.
fn thp_always() -> Option<String> {
    let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
    mode.contains("[always]").then(|| {
        "memory: transparent huge pages are on for all memory ([always]): a fault that maps a \
         huge page counts as one page, so large buffers are undercounted"
            .to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(mib: &[u64]) -> Vec<(u64, u64)> {
        mib.iter()
            .enumerate()
            .map(|(i, m)| (i as u64 * 1_000_000_000, m << 20))
            .collect()
    }

    #[test]
    fn a_steady_rise_is_a_leak_and_a_cache_that_filled_up_is_not() {
        let (from, bytes) = leak_series(&series(&[10, 12, 14, 16, 18, 20, 22, 24]), 0).unwrap();
        assert_eq!((from, bytes), (0, 10 << 20));
        // Noisy but rising to the end (a window of a churning process with a leak).
        assert!(leak_series(&series(&[160, 166, 166, 175, 173]), 0).is_some());
        // A cache built at once, then flat.
        assert!(leak_series(&series(&[10, 200, 200, 200, 200, 200, 200, 200]), 0).is_none());
        // Filled up in the first half, flat since.
        assert!(
            leak_series(
                &series(&[10, 30, 50, 70, 70, 70, 70, 70, 70, 70, 70, 70]),
                0
            )
            .is_none()
        );
        // Comes and goes.
        assert!(leak_series(&series(&[10, 60, 10, 60, 10, 60, 10, 61]), 0).is_none());
        // Too small to tell from noise.
        assert!(leak_series(&series(&[100, 100, 101, 101, 102, 102, 103]), 0).is_none());
        assert!(leak_series(&series(&[900, 901, 902, 903, 904, 905, 906]), 900 << 20).is_none());
        assert!(leak_series(&series(&[10, 20, 30]), 0).is_none());
        // A cache built first, then a slow leak: the growth is dated from the leak.
        let (from, bytes) = leak_series(
            &series(&[
                10, 300, 300, 306, 312, 318, 324, 330, 336, 342, 348, 354, 360,
            ]),
            0,
        )
        .unwrap();
        assert_eq!(bytes >> 20, 300);
        assert!(from >= 1_000_000_000, "{from}");
    }

    #[test]
    fn a_process_forked_without_exec_is_told_and_counted_by_its_share() {
        // A shell whose subshell is a fork of it (no exec); the subshell's `sleep` is exec'd.
        let mut sh = std::process::Command::new("sh")
            .args(["-c", "( while :; do sleep 1; done ) & wait"])
            .spawn()
            .unwrap();
        let parent = sh.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let child = loop {
            let kids = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
                .unwrap_or_default();
            let sub = kids
                .split_whitespace()
                .filter_map(|k| k.parse::<u32>().ok())
                .find(|&k| crate::proc::exe_identity(k) == crate::proc::exe_identity(parent));
            if let Some(k) = sub {
                break k;
            }
            assert!(std::time::Instant::now() < deadline, "no subshell");
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let mut ledger = MemoryLedger::new();
        ledger.see_process(parent);
        ledger.see_process(child);
        let r = ledger.close(None);
        let _ = sh.kill();
        let _ = sh.wait();
        // SAFETY: a signal to the subshell this test started.
        unsafe { libc::kill(child as i32, libc::SIGKILL) };
        let usage = |pid| r.processes.iter().find(|u| u.pid == pid).unwrap();
        assert_eq!(usage(child).forked_from, Some(parent));
        assert_eq!(usage(parent).forked_from, None);
        for pid in [parent, child] {
            let u = usage(pid);
            let share = u.pss_anon.expect("a share read");
            assert!(
                share <= u.end().unwrap().anon + (64 << 10),
                "{share} {:?}",
                u.end()
            );
            assert_eq!(u.own_anon(), Some(share));
        }
        assert!(r.warnings.iter().any(|w| w.contains("forked without exec")));
    }

    #[test]
    fn read_once_a_second_every_second_has_its_reading() {
        let me = std::process::id();
        let mut ledger = MemoryLedger::new();
        ledger.see_process(me);
        // Read at 1.05 s steps of a clock of the test's own: no sleeping, no timing.
        let start = crate::proc::monotonic_ns();
        for k in 1..=3 {
            ledger.read_all_at(start + k * 1_050_000_000, false, None);
        }
        ledger.read_all_at(start + 3_200_000_000, true, None);
        let series = &ledger.processes[&me].window;
        let gaps: Vec<u64> = series.windows(2).map(|w| w[1].0 - w[0].0).collect();
        assert!(
            series.len() >= 4,
            "{} readings over 3 s: {gaps:?}",
            series.len()
        );
        assert!(gaps.iter().all(|&g| g < 1_500_000_000), "gaps {gaps:?}");
    }

    #[test]
    fn our_own_pages_are_alloc_and_held_until_given_back() {
        let me = std::process::id();
        let mut ledger = MemoryLedger::new();
        ledger.see_process(me);
        // Mapped here, not allocated: the allocator might keep freed memory.
        let map = |byte: u8| {
            // SAFETY: a fresh private anonymous mapping, written within its length.
            unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    1 << 20,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                assert_ne!(p, libc::MAP_FAILED);
                std::ptr::write_bytes(p.cast::<u8>(), byte, 1 << 20);
                p.cast::<u8>().cast_const()
            }
        };
        let unmap = |p: *const u8| {
            // SAFETY: a mapping made by `map`, not used after.
            unsafe { libc::munmap(p.cast_mut().cast(), 1 << 20) };
        };
        let (kept, freed) = (map(1), map(2));
        let key = |f: &str| {
            SampleKey::of(
                me,
                "t",
                vec![Frame::new(crate::profile::FrameKind::Python, f)],
            )
        };
        let fault = |addr: *const u8| Event {
            addr: addr as u64,
            ..Event::synthetic(super::super::event::EventKind::PageFault, 1 << 18, me, &[])
        };
        let released = map(3);
        ledger.on_fault(&fault(kept), key("keep"));
        ledger.on_fault(&fault(freed), key("churn"));
        ledger.on_fault(&fault(released.wrapping_add(8192)), key("released"));
        unmap(freed);
        // Given back (a release record): not held although still mapped here.
        ledger.on_release(me, released as u64, 1 << 20);
        // A page of our code: file-backed, not the heap.
        ledger.on_fault(
            &fault(our_own_pages_are_alloc_and_held_until_given_back as *const u8),
            key("code"),
        );
        let r = ledger.close(None);
        assert_eq!(r.alloc.get(&key("keep")), Some(&(1, 1 << 18)));
        assert_eq!(r.alloc.get(&key("churn")), Some(&(1, 1 << 18)));
        assert!(!r.alloc.contains_key(&key("code")));
        assert_eq!(r.faults.file_bytes, 1 << 18);
        assert_eq!(r.inuse.get(&key("keep")), Some(&(1 << 18)));
        assert_eq!(r.inuse.get(&key("churn")), None, "given back");
        assert_eq!(r.inuse.get(&key("released")), None, "released");
        assert_eq!(r.alloc.get(&key("released")), Some(&(1, 1 << 18)));
        unmap(released);
        assert_eq!(r.processes.len(), 1);
        assert!(r.processes[0].end().is_some_and(|m| m.anon >= 1 << 20));
        // The next window: nothing new touched, the kept page is still held.
        let r = ledger.close(None);
        assert!(r.alloc.is_empty());
        assert_eq!(r.inuse.get(&key("keep")), Some(&(1 << 18)));
        unmap(kept);
        let r = ledger.close(None);
        assert!(r.inuse.is_empty());
    }

    #[test]
    fn mapped_blocks_are_held_until_given_back_in_part_or_whole() {
        let me = std::process::id();
        let mut ledger = MemoryLedger::new();
        const MIB: u64 = 1 << 20;
        let map = || {
            // SAFETY: a fresh private anonymous mapping.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    MIB as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            p as u64
        };
        let unmap = |at: u64, len: u64| {
            // SAFETY: within a mapping made by `map`, not used after.
            unsafe { libc::munmap(at as *mut libc::c_void, len as usize) };
        };
        let key = |f: &str| {
            SampleKey::of(
                me,
                "t",
                vec![Frame::new(crate::profile::FrameKind::Python, f)],
            )
        };
        let grow = |addr: u64, len: u64| Event {
            addr,
            ..Event::synthetic(super::super::event::EventKind::MemGrow, len, me, &[])
        };
        let (kept, halved, unseen) = (map(), map(), map());
        ledger.on_grow(&grow(kept, MIB), key("keep"));
        ledger.on_grow(&grow(halved, MIB), key("halve"));
        ledger.on_grow(&grow(unseen, MIB), key("unseen"));
        // Its middle given back: what lies on either side is still held.
        ledger.on_release(me, halved + MIB / 4, MIB / 2);
        // Unmapped without a release record seen: gone at the window's end.
        unmap(unseen, MIB);
        let r = ledger.close(None);
        assert_eq!(r.mapped.get(&key("keep")), Some(&(1, MIB)));
        assert_eq!(r.mapped.get(&key("unseen")), Some(&(1, MIB)));
        assert_eq!(r.mapped_inuse.get(&key("keep")), Some(&(1, MIB)));
        assert_eq!(r.mapped_inuse.get(&key("halve")), Some(&(2, MIB / 2)));
        assert_eq!(r.mapped_inuse.get(&key("unseen")), None);
        // The next window: nothing mapped in it; a new block over part of an old one
        // replaces that part.
        ledger.on_grow(&grow(kept + MIB / 2, MIB / 2), key("over"));
        let r = ledger.close(None);
        assert_eq!(r.mapped.len(), 1);
        assert_eq!(r.mapped_inuse.get(&key("keep")), Some(&(1, MIB / 2)));
        assert_eq!(r.mapped_inuse.get(&key("over")), Some(&(1, MIB / 2)));
        ledger.on_release(me, kept, MIB);
        ledger.on_exec(me);
        let r = ledger.close(None);
        assert!(r.mapped.is_empty() && r.mapped_inuse.is_empty());
        unmap(kept, MIB);
        unmap(halved, MIB);
    }
}
