//! Turns sample events into the aggregated [`Profile`]: each distinct raw stack (addresses) is
//! symbolized once, when first seen — while its process is alive — and then only counted.
use std::{
    collections::{HashMap, HashSet},
    fs,
    os::unix::fs::MetadataExt as _,
    sync::Arc,
    time::SystemTime,
};

use kprof_common::{FLAG_IN_KERNEL, SampleEvent, python::PyStack};

use crate::{
    profile::{Frame, ProcessMeta, Profile, SampleKey},
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
    fn merge(&mut self, pid: u32, native: Vec<Frame>, py: &PyStack) -> Vec<Frame>;
}

/// The addresses of one sample: what identifies a distinct stack before symbolization.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RawKey {
    pub pid: u32,
    /// Bumped when the process `exec`s (same pid, new address space).
    pub generation: u32,
    pub thread: [u8; 16],
    pub in_kernel: bool,
    pub kernel: Vec<u64>,
    pub user: Vec<u64>,
    /// (code object, instruction offset, flags) per Python frame.
    pub py: Vec<(u64, u32, u32)>,
}

impl RawKey {
    pub fn of(ev: &SampleEvent) -> RawKey {
        let k = (ev.kernel_len as usize).min(ev.kernel_ips.len());
        let u = (ev.user_len as usize).min(ev.user_ips.len());
        let p = (ev.py.count as usize).min(ev.py.frames.len());
        RawKey {
            pid: ev.tgid,
            generation: 0,
            thread: ev.comm,
            in_kernel: ev.flags & FLAG_IN_KERNEL != 0,
            kernel: ev.kernel_ips[..k].to_vec(),
            user: ev.user_ips[..u].to_vec(),
            py: ev.py.frames[..p]
                .iter()
                .map(|f| (f.code, f.lasti, f.flags))
                .collect(),
        }
    }
}

/// Counters of the aggregation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AggregateStats {
    pub events: u64,
    pub distinct_stacks: u64,
    /// Events shorter than a `SampleEvent` (never expected).
    pub malformed: u64,
}

/// Aggregates events into a profile.
pub struct Aggregator {
    symbolizer: Symbolizer,
    stacks: HashMap<RawKey, (SampleKey, u64)>,
    processes: HashMap<u32, ProcessMeta>,
    /// Identity (device, inode) of each process's executable, to notice `exec` when the
    /// samples carry no exec id.
    exe: HashMap<u32, (u64, u64)>,
    /// Latest exec id (`SampleEvent::exec_id`) seen per process.
    exec_ids: HashMap<u32, u32>,
    generation: HashMap<u32, u32>,
    checked_this_round: HashSet<u32>,
    pub stats: AggregateStats,
    pub warnings: Vec<String>,
}

fn exe_identity(pid: u32) -> Option<(u64, u64)> {
    fs::metadata(format!("/proc/{pid}/exe"))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl Default for Aggregator {
    fn default() -> Self {
        Self::new()
    }
}

/// A NUL-padded `comm` as a string.
pub fn comm_str(comm: &[u8]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

impl Aggregator {
    pub fn new() -> Self {
        Aggregator {
            symbolizer: Symbolizer::new(),
            stacks: HashMap::new(),
            processes: HashMap::new(),
            exe: HashMap::new(),
            exec_ids: HashMap::new(),
            generation: HashMap::new(),
            checked_this_round: HashSet::new(),
            stats: AggregateStats::default(),
            warnings: Vec::new(),
        }
    }

    pub fn symbolizer(&mut self) -> &mut Symbolizer {
        &mut self.symbolizer
    }

    /// Registers a process early (reads its maps and name while it is alive).
    pub fn see_process(&mut self, pid: u32, merger: Option<&mut dyn StackMerger>) {
        if self.processes.contains_key(&pid) {
            return;
        }
        self.symbolizer.track(pid);
        if let Some(id) = exe_identity(pid) {
            self.exe.insert(pid, id);
        }
        self.checked_this_round.insert(pid);
        let name = fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|s| s.trim_end().to_owned())
            .unwrap_or_default();
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
    }

    /// Adds one ring-buffer record.
    pub fn add_bytes(&mut self, bytes: &[u8], merger: Option<&mut dyn StackMerger>) {
        if bytes.len() < size_of::<SampleEvent>() {
            self.stats.malformed += 1;
            return;
        }
        // SAFETY: the record holds a whole `SampleEvent` written by the eBPF program (a
        // plain-integer `#[repr(C)]` type); read_unaligned copies it out of the ring.
        let ev: SampleEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        self.add(&ev, merger);
    }

    /// Adds one sample.
    pub fn add(&mut self, ev: &SampleEvent, mut merger: Option<&mut dyn StackMerger>) {
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
        let mut raw = RawKey::of(ev);
        raw.generation = self.generation.get(&pid).copied().unwrap_or(0);
        if let Some((_, count)) = self.stacks.get_mut(&raw) {
            *count += 1;
            return;
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
        let user = match merger {
            Some(m) if ev.py.count > 0 => m.merge(pid, native, &ev.py),
            _ => native,
        };
        frames.extend(user);
        if let Some(p) = self.processes.get_mut(&pid)
            && p.name.is_empty()
        {
            p.name = comm_str(&ev.comm);
        }
        let key = SampleKey {
            pid,
            thread: comm_str(&ev.comm).into(),
            stack: Arc::from(frames),
        };
        self.stats.distinct_stacks += 1;
        self.stacks.insert(raw, (key, 1));
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
        let Some(now) = exe_identity(pid) else {
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
        self.symbolizer.forget(pid);
        self.symbolizer.track(pid);
        if let Some(meta) = self.processes.get_mut(&pid) {
            meta.name = fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|s| s.trim_end().to_owned())
                .unwrap_or_default();
            meta.runtime = None;
        }
    }

    fn add_warnings(&mut self, pid: u32, warnings: Vec<String>) {
        for w in warnings {
            let w = format!("pid {pid}: {w}");
            if !self.warnings.contains(&w) {
                self.warnings.push(w);
            }
        }
    }

    /// Total samples so far.
    pub fn total(&self) -> u64 {
        self.stats.events
    }

    /// Processes seen so far.
    pub fn process_count(&self) -> usize {
        self.processes.len()
    }

    /// Builds the profile.
    pub fn finish(&self, sample_hz: u32, start: SystemTime) -> Profile {
        let mut p = Profile::new(sample_hz, start);
        for (key, count) in self.stacks.values() {
            p.add(key.clone(), *count);
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
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::FrameKind;

    fn event(pid: u32, user: &[u64]) -> Box<SampleEvent> {
        // SAFETY: SampleEvent is plain integers; all-zero is a valid value.
        let mut ev: Box<SampleEvent> = Box::new(unsafe { std::mem::zeroed() });
        ev.tgid = pid;
        ev.tid = pid;
        ev.comm[..4].copy_from_slice(b"work");
        ev.user_len = user.len() as u32;
        ev.user_ips[..user.len()].copy_from_slice(user);
        ev
    }

    #[test]
    fn a_newer_exec_id_starts_a_new_generation_an_older_one_does_not() {
        let mut agg = Aggregator::new();
        let pid = u32::MAX - 11;
        let with_exec = |id: u32| {
            let mut ev = event(pid, &[0x1000]);
            ev.exec_id = id;
            ev
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
        let p = agg.finish(99, SystemTime::UNIX_EPOCH);
        assert_eq!(p.total(), 6);
        let (key, count) = p
            .sorted_samples()
            .into_iter()
            .max_by_key(|(_, c)| *c)
            .unwrap();
        assert_eq!(count, 5);
        assert_eq!(key.stack.len(), 2);
        assert_eq!(key.stack[0].kind, FrameKind::Native);
        assert_eq!(&*key.stack[0].function, "[unknown]+0x1000");
        assert_eq!(&*key.thread, "work");
        assert_eq!(p.processes[&pid].name, "work", "comm as fallback name");
    }

    #[test]
    fn short_records_are_counted_as_malformed() {
        let mut agg = Aggregator::new();
        agg.add_bytes(&[0u8; 16], None);
        assert_eq!(agg.stats.malformed, 1);
        assert_eq!(agg.stats.events, 0);
    }

    struct FakePython;
    impl StackMerger for FakePython {
        fn on_process(&mut self, _pid: u32) -> Option<(String, Vec<String>)> {
            Some(("cpython 3.12.1".into(), vec!["note".into()]))
        }
        fn merge(&mut self, _pid: u32, mut native: Vec<Frame>, py: &PyStack) -> Vec<Frame> {
            for _ in 0..py.count {
                native.insert(0, Frame::python("handler", "app.py", 3));
            }
            native
        }
    }

    #[test]
    fn python_frames_are_merged() {
        let mut agg = Aggregator::new();
        let mut ev = event(u32::MAX - 9, &[0x1000]);
        ev.py.count = 1;
        ev.py.frames[0].code = 0xdead;
        let mut py = FakePython;
        agg.add(&ev, Some(&mut py));
        let p = agg.finish(99, SystemTime::UNIX_EPOCH);
        let (key, _) = p.sorted_samples()[0];
        assert_eq!(key.stack[0].kind, FrameKind::Python);
        assert_eq!(
            p.processes[&(u32::MAX - 9)].runtime.as_deref(),
            Some("cpython 3.12.1")
        );
        assert_eq!(p.warnings, [format!("pid {}: note", u32::MAX - 9)]);
    }
}
