//! Address → [`Frame`] resolution: kernel addresses through `/proc/kallsyms`, user addresses
//! through `/proc/<pid>/maps` and the ELF symbols / DWARF of the mapped file, with blazesym.
//!
//! A mapped file is opened inside its process's root and checked to be the mapped file
//! ([`crate::proc::files`]); blazesym reads a private copy of its tables ([`snapshot`]), never
//! the tenant's file. Results are cached per module (build id) and file offset, and every
//! process's maps and files are read when it is first seen, so a process that exits later in
//! the window still resolves. An address no symbol names is named by the start of its
//! function from the file's unwind tables when it has some ([`functions`]), else by itself.
pub mod cache;
pub mod functions;
pub mod kallsyms;
pub mod maps;
pub mod snapshot;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use blazesym::symbolize::{
    self as bs, Input, Symbolized,
    source::{Elf, Source},
};

pub use crate::profile::{ModuleId, ModuleInfo};
pub use cache::{CacheStats, SymbolCache};
use functions::FunctionCache;
pub use kallsyms::KernelSymbols;
pub use maps::{MapEntry, ProcessMaps};
use snapshot::{Snapshot, SnapshotError};

use crate::proc::files::{self, OpenError, TimedOut};

use crate::profile::{Frame, FrameKind};

/// The most one file's copy may take ([`snapshot`]): its DWARF is left out beyond it.
const MAX_SNAPSHOT_BYTES: u64 = 128 << 20;
/// The most all copies may take together: the least recently used are dropped beyond it.
const MAX_SNAPSHOTS_BYTES: u64 = 192 << 20;

/// Module name used for kernel frames.
pub const KERNEL_MODULE: &str = kprof_pprof::mappings::KERNEL;

#[derive(Debug)]
struct ProcState {
    maps: ProcessMaps,
    /// Whether a re-read of the maps was already tried for an unknown address this round.
    refreshed: bool,
}

fn unresolved(kind: FrameKind, module: Option<Arc<str>>, addr: u64) -> Frame {
    crate::metrics::unresolved_address();
    Frame::unresolved(kind, module, addr)
}

/// A mapped file: the device and inode the mapping names (shared by every process and
/// container that maps it).
type ModuleKey = (u64, u64);

/// A mapped file as the symbolizer knows it.
#[derive(Clone, Debug)]
struct Module {
    info: ModuleInfo,
    /// The copy blazesym reads; none when the file could not be read (replaced, not an ELF,
    /// too large): its frames stay unresolved.
    snapshot: Option<Arc<Snapshot>>,
    /// When it was last used ([`Symbolizer::clock`]), to drop the least recently used copy.
    used: u64,
}

/// Symbolizer with per-module caches.
pub struct Symbolizer {
    inner: bs::Symbolizer,
    kernel: HashMap<u64, Arc<[Frame]>>,
    user: SymbolCache,
    /// Function starts of the files that have addresses no symbol names.
    functions: FunctionCache,
    procs: HashMap<u32, ProcState>,
    modules: HashMap<ModuleKey, Module>,
    /// Devices whose files took too long to read: not tried again.
    slow_devices: HashSet<u64>,
    /// Files of a process that could not be read, for its profile's warnings.
    refusals: Vec<(u32, String)>,
    /// Bytes the modules' copies take, and the most they may ([`MAX_SNAPSHOTS_BYTES`]).
    snapshot_bytes: u64,
    snapshot_budget: u64,
    clock: u64,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    pub fn new() -> Self {
        Symbolizer {
            inner: blazesym_symbolizer(),
            kernel: HashMap::new(),
            user: SymbolCache::new(1 << 20),
            functions: FunctionCache::default(),
            procs: HashMap::new(),
            modules: HashMap::new(),
            slow_devices: HashSet::new(),
            refusals: Vec::new(),
            snapshot_bytes: 0,
            snapshot_budget: MAX_SNAPSHOTS_BYTES,
            clock: 0,
        }
    }

    /// Reads the maps of `pid` now (call when a process is first seen, while it is alive).
    /// Returns false when the process is gone.
    pub fn track(&mut self, pid: u32) -> bool {
        if self.procs.contains_key(&pid) {
            return true;
        }
        let Ok(maps) = ProcessMaps::read(pid) else {
            return false;
        };
        // Read the code's files while the process is alive (its root is gone with it).
        for e in maps.entries() {
            if e.is_file() && e.is_exec() {
                self.module(pid, e);
            }
        }
        self.procs.insert(
            pid,
            ProcState {
                maps,
                refreshed: false,
            },
        );
        true
    }

    /// Forgets a process (its cached frames stay, keyed by module).
    pub fn forget(&mut self, pid: u32) {
        self.procs.remove(&pid);
    }

    /// Forgets the processes that exited and the files no live process maps (the symbolizer
    /// lives as long as the agent; the cached frames stay, keyed by module).
    pub fn forget_exited(&mut self) {
        self.procs.retain(|pid, _| crate::proc::is_alive(*pid));
        let mapped: HashSet<ModuleKey> = self
            .procs
            .values()
            .flat_map(|p| p.maps.entries())
            .map(|e| (e.dev, e.inode))
            .collect();
        let before = self.modules.len();
        self.modules.retain(|key, _| mapped.contains(key));
        if self.modules.len() != before {
            self.snapshots_dropped();
        }
    }

    /// Marks every process as allowed one more maps re-read on an unknown address.
    pub fn new_round(&mut self) {
        for p in self.procs.values_mut() {
            p.refreshed = false;
        }
    }

    /// All modules seen so far.
    pub fn modules(&self) -> impl Iterator<Item = &ModuleInfo> {
        self.modules.values().map(|m| &m.info)
    }

    /// Statistics of the user-space symbol cache.
    pub fn cache_stats(&self) -> CacheStats {
        self.user.stats()
    }

    /// What is known of the file `mapped` names in process `pid`: read once per file. A path
    /// that is no longer the mapped file (replaced, a FIFO, a symlink out of the process's
    /// root) is never read: its frames stay unresolved.
    fn module(&mut self, pid: u32, mapped: &MapEntry) -> Module {
        self.clock += 1;
        let key = (mapped.dev, mapped.inode);
        if let Some(m) = self.modules.get_mut(&key) {
            m.used = self.clock;
            return m.clone();
        }
        let snapshot = match self.read_module(pid, mapped) {
            Ok(s) => Some(s),
            Err(Unreadable::Snapshot(_, SnapshotError::NotElf(_))) => None,
            Err(e) => {
                tracing::warn!(error = %e, "a mapped file cannot be read (replaced, deleted, not a regular file, or too slow): its frames stay unresolved");
                if !matches!(e, Unreadable::Open(OpenError::Io { .. })) {
                    self.refusals
                        .push((pid, format!("{e}: its frames are not symbolized")));
                }
                None
            }
        };
        let id = match snapshot.as_ref().and_then(|s| s.build_id()) {
            Some(b) => ModuleId::from_build_id(&b),
            None => ModuleId::Path(mapped.path.as_str().into()),
        };
        let module = Module {
            info: ModuleInfo {
                path: mapped.path.as_str().into(),
                id,
            },
            snapshot,
            used: self.clock,
        };
        self.snapshot_bytes += module.snapshot.as_ref().map_or(0, |s| s.bytes());
        self.modules.insert(key, module.clone());
        self.keep_snapshots_bounded(key);
        module
    }

    /// Opens and copies the file `mapped` names, off this thread and within a time limit.
    fn read_module(&mut self, pid: u32, mapped: &MapEntry) -> Result<Arc<Snapshot>, Unreadable> {
        if self.slow_devices.contains(&mapped.dev) {
            return Err(Unreadable::SlowDevice(mapped.path.clone()));
        }
        let entry = mapped.clone();
        let read = files::within(files::READ_TIME_LIMIT, move || {
            let file = files::open_mapped(pid, &entry).map_err(Unreadable::Open)?;
            Snapshot::shared(&file, MAX_SNAPSHOT_BYTES)
                .map_err(|e| Unreadable::Snapshot(entry.path.clone(), e))
        });
        let out = match read {
            Ok(out) => out,
            Err(e) => {
                // Its file system hangs: the process's other files there are not tried.
                self.slow_devices.insert(mapped.dev);
                Err(Unreadable::Slow(mapped.path.clone(), e))
            }
        };
        if let Err(e) = &out {
            crate::metrics::error(e.category());
        }
        out
    }

    /// The files that could not be read since the last call, by process (for warnings: a
    /// replaced or odd file is a tenant's doing, or an upgrade under a running process).
    pub fn take_refusals(&mut self) -> Vec<(u32, String)> {
        std::mem::take(&mut self.refusals)
    }

    /// Drops the least recently used modules (they are read again when next needed) until
    /// their copies fit the budget; `keep` is the one in use now.
    fn keep_snapshots_bounded(&mut self, keep: ModuleKey) {
        if self.snapshot_bytes <= self.snapshot_budget {
            return;
        }
        let mut by_use: Vec<(u64, ModuleKey)> = self
            .modules
            .iter()
            .filter(|(k, m)| **k != keep && m.snapshot.is_some())
            .map(|(k, m)| (m.used, *k))
            .collect();
        by_use.sort_unstable();
        for (_, key) in by_use {
            if self.snapshot_bytes <= self.snapshot_budget {
                break;
            }
            self.modules.remove(&key);
            self.snapshots_dropped();
        }
        crate::metrics::error("symbol_copies_evicted");
    }

    /// After modules were dropped: recounts the copies' bytes and lets blazesym (which maps
    /// the copies it read) let go of the dropped ones.
    fn snapshots_dropped(&mut self) {
        self.snapshot_bytes = self
            .modules
            .values()
            .filter_map(|m| m.snapshot.as_ref())
            .map(|s| s.bytes())
            .sum();
        self.inner = blazesym_symbolizer();
    }

    /// Symbolizes kernel return addresses (innermost first). `ips[0]` is the interrupted
    /// instruction, the others are return addresses.
    pub fn kernel_frames(&mut self, ips: &[u64], out: &mut Vec<Frame>) {
        let missing: Vec<u64> = ips
            .iter()
            .enumerate()
            .map(|(i, &ip)| lookup_addr(i, ip))
            .filter(|a| !self.kernel.contains_key(a))
            .collect();
        if !missing.is_empty() {
            // The process-wide table (refreshed every 10 min for modules loaded later).
            let ksyms = kallsyms::shared();
            for addr in missing {
                // Kept here with the symbol's start: the profile gets only offsets.
                let frame = match ksyms.lookup(addr) {
                    Some((name, off)) => Frame {
                        module: Some(KERNEL_MODULE.into()),
                        address: addr - off,
                        ..Frame::new(FrameKind::Kernel, name)
                    },
                    None => {
                        crate::metrics::unresolved_address();
                        Frame {
                            module: Some(KERNEL_MODULE.into()),
                            ..Frame::new(FrameKind::Kernel, "[kernel]")
                        }
                    }
                };
                self.kernel.insert(addr, vec![frame].into());
            }
        }
        for (i, &ip) in ips.iter().enumerate() {
            if let Some(f) = self.kernel.get(&lookup_addr(i, ip)) {
                // A kernel address would tell every reader of the profile where the kernel
                // sits (KASLR): a frame's address is its offset in its function instead.
                out.extend(f.iter().cloned().map(|mut fr| {
                    fr.address = if fr.address == 0 {
                        0
                    } else {
                        ip.wrapping_sub(fr.address)
                    };
                    fr
                }));
            }
        }
    }

    /// Symbolizes the native user stack of `pid` (innermost first). When `leaf_exact` is false
    /// (the sample interrupted kernel code) `ips[0]` is a return address as well.
    pub fn user_frames(&mut self, pid: u32, ips: &[u64], leaf_exact: bool, out: &mut Vec<Frame>) {
        if !self.track(pid) {
            out.extend(
                ips.iter()
                    .map(|&ip| Frame::unresolved(FrameKind::Native, None, ip)),
            );
            return;
        }
        // Resolve each address to (module, open path, file offset) first.
        let mut resolved: Vec<Resolved> = Vec::with_capacity(ips.len());
        for (i, &ip) in ips.iter().enumerate() {
            let addr = if leaf_exact {
                lookup_addr(i, ip)
            } else {
                lookup_addr(i + 1, ip)
            };
            resolved.push(self.resolve_user(pid, addr));
        }
        // Batch the cache misses per module.
        let mut batches: HashMap<ModuleKey, (ModuleInfo, Arc<Snapshot>, Vec<u64>)> = HashMap::new();
        for r in &resolved {
            if let Resolved::File {
                key,
                module,
                offset,
                snapshot: Some(snapshot),
            } = r
                && self.user.get(&module.id, *offset).is_none()
            {
                batches
                    .entry(*key)
                    .or_insert_with(|| (module.clone(), snapshot.clone(), Vec::new()))
                    .2
                    .push(*offset);
            }
        }
        for (key, (module, snapshot, mut offsets)) in batches {
            offsets.sort_unstable();
            offsets.dedup();
            let src = Source::Elf(Elf::new(snapshot.path()));
            // The reader works on a tenant's bytes: if it panics, that file is never read
            // again (its frames stay addresses) and the reader starts afresh.
            let inner = &self.inner;
            let results = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                inner.symbolize(&src, Input::FileOffset(&offsets))
            }));
            let mut panicked = false;
            let results = match results {
                Ok(r) => r.unwrap_or_default(),
                Err(_) => {
                    panicked = true;
                    crate::metrics::error("panic");
                    tracing::warn!(path = %module.path, "reading a mapped file's symbols failed: its frames stay unresolved");
                    if let Some(m) = self.modules.get_mut(&key) {
                        m.snapshot = None;
                    }
                    self.inner = blazesym_symbolizer();
                    Vec::new()
                }
            };
            // Read when the module has an address without a symbol, at most once.
            let mut functions = None;
            for (i, &off) in offsets.iter().enumerate() {
                let frames = match results.get(i) {
                    Some(Symbolized::Sym(sym)) => {
                        sym_frames(FrameKind::Native, sym, off, &module.path)
                    }
                    _ => {
                        // Named, and located, by its function's start: one row per function.
                        let functions = functions.get_or_insert_with(|| {
                            (!panicked)
                                .then(|| self.functions.get(&module.id, &snapshot))
                                .flatten()
                        });
                        let at = functions
                            .as_ref()
                            .and_then(|f| f.start_of(off))
                            .unwrap_or(off);
                        vec![unresolved(FrameKind::Native, Some(module.path.clone()), at)].into()
                    }
                };
                self.user.insert(module.id.clone(), off, frames);
            }
        }
        for r in resolved {
            match r {
                Resolved::File { module, offset, .. } => match self.user.get(&module.id, offset) {
                    Some(f) => out.extend(f.iter().cloned()),
                    None => out.push(Frame::unresolved(
                        FrameKind::Native,
                        Some(module.path.clone()),
                        offset,
                    )),
                },
                Resolved::Special { name, offset } => {
                    out.push(Frame::unresolved(FrameKind::Native, Some(name), offset));
                }
                Resolved::Unknown(addr) => {
                    out.push(Frame::unresolved(FrameKind::Native, None, addr));
                }
            }
        }
    }

    fn resolve_user(&mut self, pid: u32, addr: u64) -> Resolved {
        let Some(state) = self.procs.get_mut(&pid) else {
            return Resolved::Unknown(addr);
        };
        if state.maps.find(addr).is_none() && !state.refreshed {
            // A library loaded after we first read the maps (dlopen): re-read once per round.
            state.refreshed = true;
            if let Ok(m) = ProcessMaps::read(pid) {
                state.maps = m;
            }
        }
        let Some(entry) = state.maps.find(addr).cloned() else {
            return Resolved::Unknown(addr);
        };
        let offset = entry.file_offset(addr);
        if entry.is_file() {
            let Module { info, snapshot, .. } = self.module(pid, &entry);
            Resolved::File {
                key: (entry.dev, entry.inode),
                module: info,
                offset,
                snapshot,
            }
        } else {
            let name = if entry.path.is_empty() {
                "[anon]".to_owned()
            } else {
                entry.path.clone()
            };
            Resolved::Special {
                name: name.into(),
                offset: addr - entry.start,
            }
        }
    }
}

/// Why a mapped file was not read.
#[derive(Debug, thiserror::Error)]
enum Unreadable {
    #[error(transparent)]
    Open(OpenError),
    #[error("{0}: {1}")]
    Snapshot(String, SnapshotError),
    #[error("{0}: {1}")]
    Slow(String, TimedOut),
    #[error("{0}: its file system was too slow before")]
    SlowDevice(String),
}

impl Unreadable {
    /// Its `kprof_agent_errors_total` category.
    fn category(&self) -> &'static str {
        match self {
            Unreadable::Open(e) => e.category(),
            Unreadable::Snapshot(..) => "module_unreadable",
            Unreadable::Slow(..) | Unreadable::SlowDevice(_) => "file_read_timeout",
        }
    }
}

enum Resolved {
    File {
        key: ModuleKey,
        module: ModuleInfo,
        offset: u64,
        /// The copy of the file's tables (none when it could not be read).
        snapshot: Option<Arc<Snapshot>>,
    },
    Special {
        name: Arc<str>,
        offset: u64,
    },
    Unknown(u64),
}

/// Return addresses point after the call: look up `addr - 1` so the call's own line and
/// function are reported (also right for calls at the very end of a function).
fn lookup_addr(index: usize, ip: u64) -> u64 {
    if index == 0 { ip } else { ip.saturating_sub(1) }
}

fn blazesym_symbolizer() -> bs::Symbolizer {
    bs::Symbolizer::builder()
        .enable_code_info(true)
        .enable_inlined_fns(true)
        .enable_demangling(true)
        // Split debug files would be looked up on the agent's (the host's) file system.
        .set_debug_dirs(Some(Vec::<std::path::PathBuf>::new()))
        .build()
}

/// Frames for one symbolized address, innermost (deepest inlined call) first.
fn sym_frames(kind: FrameKind, sym: &bs::Sym<'_>, address: u64, module: &str) -> Arc<[Frame]> {
    let module: Arc<str> = module.into();
    let code = |ci: Option<&bs::CodeInfo<'_>>| -> (Option<Arc<str>>, u32) {
        match ci {
            Some(ci) => (
                Some(ci.to_path().to_string_lossy().into()),
                ci.line.unwrap_or(0),
            ),
            None => (None, 0),
        }
    };
    let mut frames = Vec::with_capacity(1 + sym.inlined.len());
    for inl in sym.inlined.iter().rev() {
        let (file, line) = code(inl.code_info.as_ref());
        frames.push(Frame {
            kind,
            function: inl.name.as_ref().into(),
            file,
            line,
            module: Some(module.clone()),
            address,
            inlined: true,
        });
    }
    let (file, line) = code(sym.code_info.as_deref());
    frames.push(Frame {
        kind,
        function: sym.name.as_ref().into(),
        file,
        line,
        module: Some(module),
        address,
        inlined: false,
    });
    frames.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{fs, os::unix::fs::MetadataExt as _, path::Path};

    /// A mapping of `path` as it is now, in this process.
    fn mapping_of(path: &Path) -> MapEntry {
        let md = fs::metadata(path).unwrap();
        MapEntry {
            start: 0x1000,
            end: 0x2000,
            offset: 0,
            perms: "r-xp".into(),
            dev: md.dev(),
            inode: md.ino(),
            path: path.to_string_lossy().into(),
        }
    }

    /// A copy of this test binary at `dir/name`.
    fn library(dir: &Path, name: &str) -> std::path::PathBuf {
        let lib = dir.join(name);
        fs::copy("/proc/self/exe", &lib).unwrap();
        lib
    }

    #[test]
    fn a_mapped_file_replaced_at_its_path_is_never_read() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let mut s = Symbolizer::new();
        let lib = library(dir.path(), "libx.so");
        let m = s.module(me, &mapping_of(&lib));
        assert!(
            m.snapshot.is_some() && matches!(m.info.id, ModuleId::BuildId(_)),
            "the file itself is read: {:?}",
            m.info.id
        );
        // Mapped, then swapped by the tenant for a symlink to a host file, or a FIFO.
        let mut swapped = Vec::new();
        for (name, swap) in [("liby.so", "symlink"), ("libz.so", "fifo")] {
            let lib = library(dir.path(), name);
            let mapped = mapping_of(&lib);
            fs::remove_file(&lib).unwrap();
            if swap == "symlink" {
                std::os::unix::fs::symlink("/etc/hostname", &lib).unwrap();
            } else {
                crate::proc::files::make_fifo(&lib);
            }
            let m = s.module(me, &mapped);
            assert!(
                m.snapshot.is_none() && matches!(m.info.id, ModuleId::Path(_)),
                "{lib:?} was read: {:?}",
                m.info.id
            );
            swapped.push(mapped);
        }
        // Its frames stay unresolved.
        s.procs.insert(
            1,
            ProcState {
                maps: ProcessMaps::new(swapped),
                refreshed: true,
            },
        );
        let mut frames = Vec::new();
        s.user_frames(1, &[0x1010], true, &mut frames);
        assert_eq!(frames.len(), 1);
        assert!(
            frames[0].function.contains("+0x"),
            "unresolved: {:?}",
            frames[0]
        );
    }

    #[test]
    fn exited_processes_and_the_files_only_they_mapped_are_forgotten() {
        let mut dead = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = dead.id();
        dead.wait().unwrap();
        let me = std::process::id();
        let mut s = Symbolizer::new();
        assert!(s.track(me));
        let own_modules = s.modules.len();
        assert!(own_modules > 0);
        let dir = tempfile::tempdir().unwrap();
        let theirs = mapping_of(&library(dir.path(), "libdead.so"));
        assert!(s.module(me, &theirs).snapshot.is_some());
        let bytes_with = s.snapshot_bytes;
        s.procs.insert(
            dead_pid,
            ProcState {
                maps: ProcessMaps::new(vec![theirs.clone()]),
                refreshed: false,
            },
        );
        s.forget_exited();
        assert!(s.procs.contains_key(&me) && !s.procs.contains_key(&dead_pid));
        assert!(!s.modules.contains_key(&(theirs.dev, theirs.inode)));
        assert_eq!(s.modules.len(), own_modules);
        assert!(s.snapshot_bytes < bytes_with);
    }

    #[test]
    fn copies_stay_within_their_budget() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let mut s = Symbolizer::new();
        let first = mapping_of(&library(dir.path(), "liba.so"));
        let one = s.module(me, &first).snapshot.unwrap().bytes();
        s.snapshot_budget = one + one / 2;
        let second = mapping_of(&library(dir.path(), "libb.so"));
        assert!(s.module(me, &second).snapshot.is_some());
        // The older copy made room; the newer one is kept.
        assert!(!s.modules.contains_key(&(first.dev, first.inode)));
        assert!(s.modules.contains_key(&(second.dev, second.inode)));
        assert_eq!(s.snapshot_bytes, one);
        // Needed again: read again.
        assert!(s.module(me, &first).snapshot.is_some());
        assert!(s.snapshot_bytes <= s.snapshot_budget);
    }

    /// Symbolizes each of `offsets` of the file at `path` alone, as a leaf, through a process
    /// (pid 1 of a fresh symbolizer) that maps it whole at 0x10000.
    fn names_in(path: &Path, offsets: &[u64]) -> Vec<Frame> {
        let me = std::process::id();
        let path = fs::canonicalize(path).unwrap();
        let mapped = MapEntry {
            start: 0x10000,
            end: 0x10000 + fs::metadata(&path).unwrap().len().next_multiple_of(0x1000),
            ..mapping_of(&path)
        };
        let mut s = Symbolizer::new();
        assert!(s.module(me, &mapped).snapshot.is_some());
        s.procs.insert(
            1,
            ProcState {
                maps: ProcessMaps::new(vec![mapped]),
                refreshed: true,
            },
        );
        offsets
            .iter()
            .map(|off| {
                let mut out = Vec::new();
                s.user_frames(1, &[0x10000 + off], true, &mut out);
                assert_eq!(out.len(), 1, "{out:?}");
                out.pop().unwrap()
            })
            .collect()
    }

    #[test]
    fn unsymbolized_addresses_are_named_by_their_function() {
        let dir = tempfile::tempdir().unwrap();
        let Some((lib, [f0, f1, s0, s1])) = functions::tests::stripped_library(dir.path(), &[])
        else {
            eprintln!("no C compiler: skipped");
            return;
        };
        let frames = names_in(&lib, &[f0 + 1, f1, s0 + 2, s1]);
        let names: Vec<&str> = frames.iter().map(|f| &*f.function).collect();
        let (first, second) = (format!("libtwo.so+{f0:#x}"), format!("libtwo.so+{s0:#x}"));
        assert_eq!(names, [&*first, &first, &second, &second]);
        // One location per function, as well.
        let addresses: Vec<u64> = frames.iter().map(|f| f.address).collect();
        assert_eq!(addresses, [f0, f0, s0, s0]);
        assert!(
            frames
                .iter()
                .all(|f| f.module.as_deref().unwrap().ends_with("libtwo.so"))
        );
        // An address in no function (the ELF header's page) keeps its own name.
        assert_eq!(&*names_in(&lib, &[0x10])[0].function, "libtwo.so+0x10");
    }

    #[test]
    fn a_garbled_stripped_file_keeps_per_address_frames() {
        let dir = tempfile::tempdir().unwrap();
        let Some((lib, [f0, f1, ..])) = functions::tests::stripped_library(dir.path(), &[]) else {
            return;
        };
        let mut bytes = fs::read(&lib).unwrap();
        let file = object::File::parse(&*bytes).unwrap();
        use object::{Object as _, ObjectSection as _};
        let (at, len) = file
            .section_by_name(".eh_frame")
            .and_then(|s| s.file_range())
            .unwrap();
        // CIEs and FDEs whose lengths point past the section.
        bytes[at as usize..(at + len) as usize].fill(0xfe);
        fs::write(&lib, &bytes).unwrap();
        let frames = names_in(&lib, &[f0 + 1, f1]);
        assert_eq!(&*frames[0].function, format!("libtwo.so+{:#x}", f0 + 1));
        assert_eq!(&*frames[1].function, format!("libtwo.so+{f1:#x}"));
        assert_eq!(frames[1].address, f1);
    }

    #[test]
    fn debian_libz_functions_are_one_name_each() {
        // Debian's libz is stripped: its static functions (deflate_slow, longest_match…) have
        // no symbol.
        let libz = Path::new("/lib/x86_64-linux-gnu/libz.so.1");
        let Ok(data) = fs::read(libz) else {
            eprintln!("no {libz:?}: skipped");
            return;
        };
        let name = fs::canonicalize(libz).unwrap();
        let name = name.file_name().unwrap().to_string_lossy().into_owned();
        let f = functions::Functions::of(&data).expect("libz has an .eh_frame");
        let table = crate::unwind::compile_elf(&data, &Default::default()).unwrap();
        // Three offsets inside each function; the file's code lies at its offsets.
        let mut offsets = Vec::new();
        for start in table.functions().starts() {
            let Some(end) =
                (start + 1..start + 0x10000).find(|&a| table.function_start(a) != Some(start))
            else {
                continue;
            };
            assert_eq!(f.start_of(start), Some(start));
            offsets.extend([start, start + (end - start) / 2, end - 1]);
        }
        let frames = names_in(libz, &offsets);
        let mut grouped = 0;
        for (chunk, offs) in frames.chunks(3).zip(offsets.chunks(3)) {
            let unresolved: Vec<&Frame> = chunk
                .iter()
                .filter(|f| f.function.starts_with(&*name))
                .collect();
            for f in &unresolved {
                assert_eq!(&*f.function, format!("{name}+{:#x}", offs[0]), "{chunk:?}");
                assert_eq!(f.address, offs[0]);
            }
            grouped += usize::from(unresolved.len() == 3);
        }
        assert!(grouped >= 5, "{grouped} functions of {name} grouped");
        // The rows of the issue (Debian 12's libz.so.1.2.13): two functions, not four rows.
        let issue = [0x4a26, 0x4a0e, 0x5f77, 0x5f7f];
        let starts = issue.map(|o| table.function_start(o));
        if starts[0] == starts[1] && starts[2] == starts[3] && starts[0] != starts[2] {
            let frames = names_in(libz, &issue);
            let names: Vec<&str> = frames.iter().map(|f| &*f.function).collect();
            assert_eq!(names[0], names[1]);
            assert_eq!(names[2], names[3]);
            assert_ne!(names[0], names[2]);
        }
    }

    #[test]
    fn return_addresses_are_adjusted() {
        assert_eq!(lookup_addr(0, 0x1000), 0x1000);
        assert_eq!(lookup_addr(1, 0x1000), 0xfff);
    }

    #[test]
    fn symbolizes_own_function_with_line() {
        // This test binary has DWARF: resolve a function of ours through our own maps.
        let mut s = Symbolizer::new();
        let addr = return_addresses_are_adjusted as *const () as usize as u64;
        let pid = std::process::id();
        let mut out = Vec::new();
        s.user_frames(pid, &[addr], true, &mut out);
        let f = out.last().expect("a frame");
        assert!(
            f.function.contains("return_addresses_are_adjusted"),
            "got {f:?}"
        );
        assert!(
            f.file.as_deref().unwrap_or("").ends_with("mod.rs"),
            "got {f:?}"
        );
        assert!(f.line > 0);
    }
}
