//! Address → [`Frame`] resolution: kernel addresses through `/proc/kallsyms`, user addresses
//! through `/proc/<pid>/maps` and the ELF symbols / DWARF of the mapped file (opened through
//! `/proc/<pid>/root` when the process lives in another mount namespace), with blazesym.
//!
//! Results are cached per module (build id) and file offset, and every process's maps are read
//! when it is first seen, so a process that exits later in the window still resolves.
pub mod cache;
pub mod kallsyms;
pub mod maps;

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use blazesym::symbolize::{
    self as bs, Input, Symbolized,
    source::{Elf, Source},
};

pub use crate::profile::{ModuleId, ModuleInfo};
pub use cache::{CacheStats, SymbolCache};
pub use kallsyms::KernelSymbols;
pub use maps::{MapEntry, ProcessMaps};

use crate::profile::{Frame, FrameKind};

/// Module name used for kernel frames.
pub const KERNEL_MODULE: &str = kprof_pprof::mappings::KERNEL;

#[derive(Debug)]
struct ProcState {
    maps: ProcessMaps,
    /// Prefix to open the process's files (`/proc/<pid>/root` in another mount namespace).
    root: Option<PathBuf>,
    /// Whether a re-read of the maps was already tried for an unknown address this round.
    refreshed: bool,
}

fn unresolved(kind: FrameKind, module: Option<Arc<str>>, addr: u64) -> Frame {
    crate::metrics::unresolved_address();
    Frame::unresolved(kind, module, addr)
}

/// A mapped file: its open path and the device and inode the mapping names.
type ModuleKey = (PathBuf, u64, u64);

/// A mapped file as the symbolizer knows it.
#[derive(Clone, Debug)]
struct Module {
    info: ModuleInfo,
    /// Whether the path still is the mapped file (else it is never read).
    readable: bool,
}

/// Symbolizer with per-module caches.
pub struct Symbolizer {
    inner: bs::Symbolizer,
    kernel: HashMap<u64, Arc<[Frame]>>,
    user: SymbolCache,
    procs: HashMap<u32, ProcState>,
    /// (open path) → module identity and display path.
    /// Keyed by the file's identity too: a path may name another file later (an upgrade).
    modules: HashMap<ModuleKey, Module>,
    self_mnt_ns: Option<PathBuf>,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    pub fn new() -> Self {
        Symbolizer {
            inner: bs::Symbolizer::builder()
                .enable_code_info(true)
                .enable_inlined_fns(true)
                .enable_demangling(true)
                .build(),
            kernel: HashMap::new(),
            user: SymbolCache::new(1 << 20),
            procs: HashMap::new(),
            modules: HashMap::new(),
            self_mnt_ns: fs::read_link("/proc/self/ns/mnt").ok(),
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
        let ns = fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
        let root = (ns.is_some() && ns != self.self_mnt_ns)
            .then(|| PathBuf::from(format!("/proc/{pid}/root")));
        // Open the modules while the process is alive (build ids, paths through its root).
        for e in maps.entries() {
            if e.is_file() {
                let open = open_path(root.as_deref(), &e.path);
                self.module_info(&open, e);
            }
        }
        self.procs.insert(
            pid,
            ProcState {
                maps,
                root,
                refreshed: false,
            },
        );
        true
    }

    /// Forgets a process (its cached frames stay, keyed by module).
    pub fn forget(&mut self, pid: u32) {
        self.procs.remove(&pid);
    }

    /// Forgets the processes that exited and the modules opened through their roots (the
    /// symbolizer lives as long as the agent; the cached frames stay, keyed by module).
    pub fn forget_exited(&mut self) {
        self.procs.retain(|pid, _| crate::proc::is_alive(*pid));
        let procs = &self.procs;
        let live =
            |open: &PathBuf| pid_of_root_path(open).is_none_or(|pid| procs.contains_key(&pid));
        self.modules.retain(|(open, ..), _| live(open));
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

    /// What is known of the file `mapped` names, opened at `open`. A path that is no longer
    /// the mapped file (replaced, a FIFO, a symlink out of the process's root) is never read:
    /// its frames stay unresolved.
    fn module_info(&mut self, open: &Path, mapped: &MapEntry) -> Module {
        let key = (open.to_owned(), mapped.dev, mapped.inode);
        if let Some(m) = self.modules.get(&key) {
            return m.clone();
        }
        let readable = fs::metadata(open).is_ok_and(|md| mapped.is_mapped_file(&md));
        if !readable {
            crate::metrics::error("module_replaced");
            tracing::warn!(
                path = %mapped.path,
                "a mapped file is no longer at its path (replaced, deleted, or not a regular file): its frames stay unresolved"
            );
        }
        let id = match readable.then(|| blazesym::helper::read_elf_build_id(&open)) {
            Some(Ok(Some(b))) if !b.is_empty() => ModuleId::from_build_id(&b),
            _ => ModuleId::Path(mapped.path.as_str().into()),
        };
        let module = Module {
            info: ModuleInfo {
                path: mapped.path.as_str().into(),
                id,
            },
            readable,
        };
        self.modules.insert(key, module.clone());
        module
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
        let mut batches: HashMap<PathBuf, (ModuleInfo, Vec<u64>)> = HashMap::new();
        for r in &resolved {
            if let Resolved::File {
                open,
                module,
                offset,
                readable: true,
            } = r
                && self.user.get(&module.id, *offset).is_none()
            {
                batches
                    .entry(open.clone())
                    .or_insert_with(|| (module.clone(), Vec::new()))
                    .1
                    .push(*offset);
            }
        }
        for (open, (module, mut offsets)) in batches {
            offsets.sort_unstable();
            offsets.dedup();
            let src = Source::Elf(Elf::new(open));
            let results = self
                .inner
                .symbolize(&src, Input::FileOffset(&offsets))
                .unwrap_or_default();
            for (i, &off) in offsets.iter().enumerate() {
                let frames = match results.get(i) {
                    Some(Symbolized::Sym(sym)) => {
                        sym_frames(FrameKind::Native, sym, off, &module.path)
                    }
                    _ => vec![unresolved(
                        FrameKind::Native,
                        Some(module.path.clone()),
                        off,
                    )]
                    .into(),
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
        let root = state.root.clone();
        let Some(entry) = state.maps.find(addr).cloned() else {
            return Resolved::Unknown(addr);
        };
        let offset = entry.file_offset(addr);
        if entry.is_file() {
            let open = open_path(root.as_deref(), &entry.path);
            let Module { info, readable } = self.module_info(&open, &entry);
            Resolved::File {
                open,
                module: info,
                offset,
                readable,
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

enum Resolved {
    File {
        open: PathBuf,
        module: ModuleInfo,
        offset: u64,
        /// The path still is the mapped file.
        readable: bool,
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

fn open_path(root: Option<&Path>, path: &str) -> PathBuf {
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    match root {
        Some(r) => r.join(path.trim_start_matches('/')),
        None => PathBuf::from(path),
    }
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

/// The process whose root `open` goes through (`/proc/<pid>/root/…`).
fn pid_of_root_path(open: &Path) -> Option<u32> {
    let rest = open.strip_prefix("/proc").ok()?;
    let mut parts = rest.components();
    let pid = parts.next()?.as_os_str().to_str()?.parse().ok()?;
    (parts.next()?.as_os_str() == "root").then_some(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapped_file_replaced_at_its_path_is_never_read() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("libx.so");
        let exe = fs::read_link("/proc/self/exe").unwrap();
        fs::copy(&exe, &lib).unwrap();
        let md = fs::metadata(&lib).unwrap();
        use std::os::unix::fs::MetadataExt as _;
        let mapped = MapEntry {
            start: 0x1000,
            end: 0x2000,
            offset: 0,
            perms: "r-xp".into(),
            dev: md.dev(),
            inode: md.ino(),
            path: lib.to_string_lossy().into(),
        };
        let mut s = Symbolizer::new();
        let m = s.module_info(&lib, &mapped);
        assert!(
            m.readable && matches!(m.info.id, ModuleId::BuildId(_)),
            "the file itself is read: {:?}",
            m.info.id
        );
        // The tenant swaps it for a symlink to a host file, or a FIFO.
        let swapped = dir.path().join("liby.so");
        std::os::unix::fs::symlink("/etc/hostname", &swapped).unwrap();
        let fifo = dir.path().join("libz.so");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for open in [&swapped, &fifo] {
            let m = s.module_info(open, &mapped);
            assert!(
                !m.readable && matches!(m.info.id, ModuleId::Path(_)),
                "{open:?} was read: {:?}",
                m.info.id
            );
        }
        // A path that names another file later (a library upgraded on disk) is looked at
        // afresh for the processes that map the new file.
        let upgraded = MapEntry {
            inode: md.ino() + 1,
            ..mapped.clone()
        };
        assert!(!s.module_info(&lib, &upgraded).readable);
        assert!(s.module_info(&lib, &mapped).readable);
        let mut frames = Vec::new();
        s.procs.insert(
            1,
            ProcState {
                maps: ProcessMaps::new(vec![MapEntry {
                    path: swapped.to_string_lossy().into(),
                    ..mapped.clone()
                }]),
                root: None,
                refreshed: true,
            },
        );
        s.user_frames(1, &[0x1010], true, &mut frames);
        assert_eq!(frames.len(), 1);
        assert!(
            frames[0].function.contains("+0x"),
            "unresolved: {:?}",
            frames[0]
        );
    }

    #[test]
    fn exited_processes_and_the_modules_seen_through_them_are_forgotten() {
        let mut dead = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = dead.id();
        dead.wait().unwrap();
        let me = std::process::id();
        let mut s = Symbolizer::new();
        assert!(s.track(me));
        let through = |pid: u32| PathBuf::from(format!("/proc/{pid}/root/usr/lib/libc.so.6"));
        let mapped = MapEntry {
            start: 0,
            end: 1,
            offset: 0,
            perms: "r-xp".into(),
            dev: 0,
            inode: 1,
            path: "/usr/lib/libc.so.6".into(),
        };
        for open in [
            through(dead_pid),
            through(me),
            PathBuf::from("/usr/lib/libz.so"),
        ] {
            s.module_info(&open, &mapped);
        }
        s.procs.insert(
            dead_pid,
            ProcState {
                maps: ProcessMaps::read(me).unwrap(),
                root: None,
                refreshed: false,
            },
        );
        s.forget_exited();
        assert!(s.procs.contains_key(&me) && !s.procs.contains_key(&dead_pid));
        let opens: Vec<&PathBuf> = s.modules.keys().map(|(open, ..)| open).collect();
        assert!(!opens.contains(&&through(dead_pid)));
        assert!(opens.contains(&&through(me)));
        assert!(opens.contains(&&PathBuf::from("/usr/lib/libz.so")));
        assert_eq!(pid_of_root_path(Path::new("/proc/12/root/x")), Some(12));
        assert_eq!(pid_of_root_path(Path::new("/proc/12/exe")), None);
        assert_eq!(pid_of_root_path(Path::new("/proc/self/root/x")), None);
    }

    #[test]
    fn return_addresses_are_adjusted() {
        assert_eq!(lookup_addr(0, 0x1000), 0x1000);
        assert_eq!(lookup_addr(1, 0x1000), 0xfff);
    }

    #[test]
    fn files_of_other_mount_namespaces_open_through_proc_root() {
        assert_eq!(
            open_path(Some(Path::new("/proc/7/root")), "/usr/bin/python3.12"),
            PathBuf::from("/proc/7/root/usr/bin/python3.12")
        );
        assert_eq!(open_path(None, "/bin/x (deleted)"), PathBuf::from("/bin/x"));
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
