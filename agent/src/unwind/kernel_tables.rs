//! The kernel side of the tables: compiles each executable file a target maps once (by file
//! identity, shared by every process and container that maps it, and by every file with the
//! same unwind information: the same libc in two images is one table), places its rows in
//! `UNWIND_ROWS` within a fixed budget, evicting the least recently used tables when a new one
//! does not fit, and keeps each target's executable mappings in `UNWIND_PROCS`.
//!
//! The work runs on a thread of its own: compiling libpython takes tens of milliseconds and a
//! tenant's file system may stall a read, and the thread that drains events must not wait. Until
//! a process's mappings are in, its stacks are walked by frame pointers (the kernel flags them,
//! and the engine asks again).
//!
//! A file whose CFI is refused (an error, or not one usable entry) is walked by frame pointers,
//! with a warning on the profile of every process that maps it and a count. A mapped file that
//! its path no longer names (another file renamed over it, deleted) keeps the table it had when
//! it was read; a file rewritten in place is another file (its identity changed) and is compiled
//! again.

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    os::fd::{AsFd as _, AsRawFd as _},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
        mpsc::{self, Receiver, Sender},
    },
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use kprof_common::unwind::{
    ExecMapping, MAX_PROC_MAPPINGS, MAX_UNWIND_ROWS, MAX_UNWIND_TABLES, NO_TABLE, ProcMappings,
    TableRef, UnwindRow,
};

use super::{ExecSegment, Limits, compile_elf_file};
use crate::proc::maps::{MapEntry, read_maps};

/// Map names in the eBPF object.
pub const MAP_ROWS: &str = "UNWIND_ROWS";
pub const MAP_TABLES: &str = "UNWIND_TABLES";
pub const MAP_PROCS: &str = "UNWIND_PROCS";

/// Files larger than this are not compiled (their `.eh_frame` is read lazily, but a file this
/// big is not a library a Python service maps).
const MAX_FILE_BYTES: u64 = 2 << 30;
/// How long compiling one file may take, reads of a slow file system included.
const COMPILE_TIME_LIMIT: Duration = Duration::from_secs(20);

/// What the loader has done, for metrics, the benchmark and tests.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoaderStats {
    /// Tables in the kernel now, and the rows they take.
    pub tables: usize,
    pub rows: u64,
    /// Files compiled, with the time it took.
    pub compiled: u64,
    pub compile_time: Duration,
    /// Tables evicted to make room.
    pub evictions: u64,
    /// Files that use the table of another file with the same unwind information (the same
    /// library in another image), not compiled again.
    pub shared: u64,
    /// Files whose tables were refused (hostile or broken CFI, too big, unreadable).
    pub refused: u64,
    /// Processes with mappings in the kernel.
    pub processes: usize,
    /// Mapping lists written (first loads and refreshes).
    pub process_updates: u64,
}

/// Results the worker hands back.
#[derive(Default)]
struct Shared {
    stats: LoaderStats,
    /// (pid, message) for the profiles of the process.
    warnings: Vec<(u32, String)>,
}

enum Request {
    /// Read the process's mappings and load what they need.
    Process(u32),
    Forget(u32),
}

/// The handle the engine keeps: requests go to the worker thread.
pub struct KernelTables {
    requests: Option<Sender<Request>>,
    shared: Arc<Mutex<Shared>>,
    worker: Option<std::thread::JoinHandle<()>>,
    /// When each process was last asked for (a flagged stack asks again at most this often).
    asked: HashMap<u32, Instant>,
}

/// A process flagged by the kernel is looked at again at most once per this.
const ASK_AGAIN_AFTER: Duration = Duration::from_millis(100);

impl KernelTables {
    /// Takes the three maps from the loaded object and starts the worker.
    pub fn start(
        rows: MapData,
        tables: Array<MapData, TableRef>,
        procs: BpfHashMap<MapData, u32, ProcMappings>,
    ) -> std::io::Result<KernelTables> {
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let worker = Worker {
            rows,
            tables,
            procs,
            files: HashMap::new(),
            extents: Extents::new(MAX_UNWIND_ROWS),
            free_ids: (0..MAX_UNWIND_TABLES).rev().collect(),
            tick: 0,
            pids: HashMap::new(),
            by_cfi: HashMap::new(),
            shared: shared.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("kprof-unwind".into())
            .spawn(move || worker.run(rx))?;
        Ok(KernelTables {
            requests: Some(tx),
            shared,
            worker: Some(handle),
            asked: HashMap::new(),
        })
    }

    /// A new target: load its mappings.
    pub fn add_process(&mut self, pid: u32) {
        self.asked.insert(pid, Instant::now());
        self.send(Request::Process(pid));
    }

    /// The kernel met an address outside `pid`'s known mappings (or had none): read them again,
    /// unless that was asked for very recently.
    pub fn on_miss(&mut self, pid: u32) {
        let now = Instant::now();
        match self.asked.get(&pid) {
            Some(t) if now.duration_since(*t) < ASK_AGAIN_AFTER => {}
            _ => {
                self.asked.insert(pid, now);
                self.send(Request::Process(pid));
            }
        }
    }

    /// The process is no longer a target (or exited).
    pub fn forget(&mut self, pid: u32) {
        self.asked.remove(&pid);
        self.send(Request::Forget(pid));
    }

    pub fn stats(&self) -> LoaderStats {
        self.shared
            .lock()
            .map(|s| s.stats.clone())
            .unwrap_or_default()
    }

    /// Warnings for the profiles of each process since the last call.
    pub fn take_warnings(&self) -> Vec<(u32, String)> {
        self.shared
            .lock()
            .map(|mut s| std::mem::take(&mut s.warnings))
            .unwrap_or_default()
    }

    fn send(&self, r: Request) {
        if let Some(tx) = &self.requests {
            PENDING.fetch_add(1, Ordering::AcqRel);
            if tx.send(r).is_err() {
                PENDING.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Waits until the worker has handled every request sent so far (tests, benchmarks).
    pub fn settle(&self, timeout: Duration) -> bool {
        let start = Instant::now();
        while PENDING.load(Ordering::Acquire) > 0 {
            if start.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }
}

/// Requests sent and not handled yet (all workers of this process).
static PENDING: AtomicUsize = AtomicUsize::new(0);

impl Drop for KernelTables {
    fn drop(&mut self) {
        // The worker's loop ends with the channel. It is not waited for: it may be reading a
        // slow file system (bounded by `COMPILE_TIME_LIMIT`), and the maps it writes are
        // released with it.
        self.requests = None;
        drop(self.worker.take());
    }
}

/// A file's identity: device, inode, size, modification time.
type FileKey = (u64, u64, u64, i64);

enum FileState {
    Loaded {
        id: u32,
        first: u32,
    },
    /// Compiled before, evicted since: compiled again when needed.
    Evicted,
    /// No table: why, for the warning on each process that maps it (`None`: the file has no
    /// CFI at all, nothing to warn about).
    Refused(Option<String>),
}

struct FileEntry {
    state: FileState,
    /// Where the table's offsets start (its first row's address) and its size.
    base: u64,
    count: u32,
    segments: Vec<ExecSegment>,
    last_used: u64,
}

/// What a process's mapping list was built from, to patch it when a table is evicted.
struct PidState {
    mappings: Box<ProcMappings>,
    /// The file of each mapping (by index), when it has one.
    files: Vec<Option<FileKey>>,
    /// The executable mappings the list was built from.
    read: Vec<MapEntry>,
}

struct Worker {
    /// `UNWIND_ROWS`, written in batches (see [`write_rows`]).
    rows: MapData,
    tables: Array<MapData, TableRef>,
    procs: BpfHashMap<MapData, u32, ProcMappings>,
    files: HashMap<FileKey, FileEntry>,
    extents: Extents,
    free_ids: Vec<u32>,
    /// Advances once per request: the LRU clock.
    tick: u64,
    pids: HashMap<u32, PidState>,
    /// The file whose loaded table each unwind-information digest names.
    by_cfi: HashMap<CfiDigest, FileKey>,
    shared: Arc<Mutex<Shared>>,
}

impl Worker {
    fn run(mut self, rx: Receiver<Request>) {
        while let Ok(r) = rx.recv() {
            self.tick += 1;
            // A panic on a tenant's bytes must not end unwinding for every process.
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match r {
                Request::Process(pid) => self.load_process(pid),
                Request::Forget(pid) => self.forget(pid),
            }));
            if outcome.is_err() {
                crate::metrics::error("panic");
                tracing::warn!("the unwind-table loader failed on a request; it goes on");
            }
            self.publish();
            PENDING.fetch_sub(1, Ordering::AcqRel);
        }
        // The programs are being unloaded: nothing to clean in the maps.
    }

    fn publish(&self) {
        if let Ok(mut s) = self.shared.lock() {
            s.stats.tables = MAX_UNWIND_TABLES as usize - self.free_ids.len();
            s.stats.rows = u64::from(MAX_UNWIND_ROWS) - u64::from(self.extents.free_total());
            s.stats.processes = self.pids.len();
        }
    }

    fn warn(&self, pid: u32, message: String) {
        if let Ok(mut s) = self.shared.lock() {
            s.warnings.push((pid, message));
        }
    }

    fn forget(&mut self, pid: u32) {
        self.pids.remove(&pid);
        let _ = self.procs.remove(&pid);
    }

    fn load_process(&mut self, pid: u32) {
        // Compiling takes a while: a process that `exec`s (or maps a library) meanwhile is
        // looked at again, so the kernel never gets mappings of an image that is gone.
        for _ in 0..3 {
            let Some(exec) = exec_mappings(pid) else {
                self.forget(pid); // gone
                return;
            };
            if self.up_to_date(pid, &exec) {
                return;
            }
            let written = self.write_process(pid, &exec);
            if !written || exec_mappings(pid).as_ref() == Some(&exec) {
                return;
            }
        }
    }

    /// Whether the kernel holds `pid`'s mappings as read from `exec` with every table they
    /// had: a process whose stacks keep flagging misses (return addresses into garbage) then
    /// costs a read of its maps, not a reopening of every file it maps.
    fn up_to_date(&self, pid: u32, exec: &[MapEntry]) -> bool {
        let Some(state) = self.pids.get(&pid) else {
            return false;
        };
        let evicted = state.files.iter().flatten().any(|k| {
            matches!(
                self.files.get(k).map(|f| &f.state),
                Some(FileState::Evicted)
            )
        });
        state.read.as_slice() == exec && !evicted && self.procs.get(&pid, 0).is_ok()
    }

    /// Loads what `exec` (the process's executable mappings) needs and stores the mapping list.
    fn write_process(&mut self, pid: u32, exec: &[MapEntry]) -> bool {
        let read = exec.to_vec();
        let mut exec = exec.to_vec();
        if exec.len() > MAX_PROC_MAPPINGS {
            self.warn(
                pid,
                format!(
                    "the process maps {} executable regions; native stacks are unwound through \
                     the first {MAX_PROC_MAPPINGS} only",
                    exec.len()
                ),
            );
            exec.truncate(MAX_PROC_MAPPINGS);
        }
        // First the tables known already (libc, the interpreter of a process like one seen
        // before): the kernel gets them at once. Files to compile follow, smallest first, each
        // stored as soon as it is loaded: a library with a huge table (OpenBLAS) does not keep
        // the others waiting.
        let mut mappings = Box::new(ProcMappings::default());
        let mut files = Vec::with_capacity(exec.len());
        let mut known = Vec::with_capacity(exec.len());
        let mut pending = Vec::new();
        for (i, e) in exec.iter().enumerate() {
            known.push(self.known_file(pid, e));
            let (table, bias, key, compile) = self.table_for(pid, e, known[i], false);
            mappings.mappings[i] = ExecMapping {
                start: e.start,
                end: e.end,
                bias,
                table,
                _pad: 0,
            };
            files.push(key);
            if compile {
                pending.push((key.map_or(0, |k| k.2), i));
            }
        }
        mappings.count = exec.len() as u32;
        if !self.store(pid, &mappings) {
            return false;
        }
        pending.sort_unstable();
        for (_, i) in pending {
            let (table, bias, key, _) = self.table_for(pid, &exec[i], known[i], true);
            mappings.mappings[i].table = table;
            mappings.mappings[i].bias = bias;
            files[i] = key;
            if table != NO_TABLE && !self.store(pid, &mappings) {
                return false;
            }
        }
        self.pids.insert(
            pid,
            PidState {
                mappings,
                files,
                read,
            },
        );
        true
    }

    /// Stores `pid`'s mapping list in the kernel.
    fn store(&mut self, pid: u32, mappings: &ProcMappings) -> bool {
        if let Err(e) = self.procs.insert(pid, mappings, 0) {
            tracing::debug!(pid, error = %e, "unwind mappings not stored");
            return false;
        }
        if let Ok(mut s) = self.shared.lock() {
            s.stats.process_updates += 1;
        }
        true
    }

    /// The file mapping `e` of `pid` was when the process's mappings were last read: the same
    /// range of the same inode.
    fn known_file(&self, pid: u32, e: &MapEntry) -> Option<FileKey> {
        let state = self.pids.get(&pid)?;
        let count = (state.mappings.count as usize).min(state.files.len());
        state.mappings.mappings[..count]
            .iter()
            .zip(&state.files)
            .find(|(m, _)| m.start == e.start && m.end == e.end)
            .and_then(|(_, key)| *key)
            .filter(|key| key.1 == e.inode)
    }

    /// The table id and bias for mapping `e` of `pid` (`NO_TABLE`: frame pointers there);
    /// `known`: the file the mapping was at the last read ([`Self::known_file`]). A file not
    /// compiled yet is compiled when `compile`, else the last value says it waits for that.
    fn table_for(
        &mut self,
        pid: u32,
        e: &MapEntry,
        known: Option<FileKey>,
        compile: bool,
    ) -> (u32, u64, Option<FileKey>, bool) {
        use crate::proc::files::{OpenError, identity, open_mapped};
        if !e.is_file() {
            return (NO_TABLE, 0, None, false);
        }
        let opened = open_mapped(pid, e)
            .map_err(Some)
            .and_then(|file| Ok((identity(&file).map_err(|_| None)?, file)));
        let (key, loaded) = match opened {
            Ok((key, file)) => {
                let loaded = match self.files.get(&key).map(|f| &f.state) {
                    Some(FileState::Loaded { id, .. }) => Some(*id),
                    Some(FileState::Refused(why)) => {
                        // Each process that maps a refused file is told (once).
                        if let Some(why) = why.clone()
                            && known != Some(key)
                        {
                            self.warn(pid, refused_warning(&e.path, &why));
                        }
                        None
                    }
                    Some(FileState::Evicted) | None if !compile => {
                        return (NO_TABLE, 0, Some(key), true);
                    }
                    Some(FileState::Evicted) | None => self.compile_and_load(pid, e, key, file),
                };
                (key, loaded)
            }
            // The path no longer names the mapped file (another file renamed over it, or it
            // was deleted) while the mapping is the one read before: the mapped file has not
            // changed, and its table still holds.
            Err(err) => match known.and_then(|key| Some((key, &self.files.get(&key)?.state))) {
                Some((key, FileState::Loaded { id, .. })) => (key, Some(*id)),
                Some((key, _)) => (key, None),
                None => {
                    if let Some(err @ (OpenError::Replaced { .. } | OpenError::NotRegular { .. })) =
                        err
                    {
                        self.warn(
                            pid,
                            format!(
                                "native stacks through {} are walked by frame pointers only: {err}",
                                e.path
                            ),
                        );
                    }
                    return (NO_TABLE, 0, None, false);
                }
            },
        };
        let Some(entry) = self.files.get_mut(&key) else {
            return (NO_TABLE, 0, Some(key), false);
        };
        entry.last_used = self.tick;
        let Some(id) = loaded else {
            return (NO_TABLE, 0, Some(key), false);
        };
        // The address the mapping's first byte has in the file's own address space.
        let Some(vaddr) = entry.segments.iter().find_map(|s| s.vaddr_of(e.offset)) else {
            return (NO_TABLE, 0, Some(key), false);
        };
        let load_bias = e.start.wrapping_sub(vaddr);
        (id, load_bias.wrapping_add(entry.base), Some(key), false)
    }

    fn compile_and_load(
        &mut self,
        pid: u32,
        e: &MapEntry,
        key: FileKey,
        file: File,
    ) -> Option<u32> {
        let started = Instant::now();
        let path = e.path.clone();
        // The same build in another container's image (another inode): its table is shared.
        let (cfi_digest, file) = match crate::proc::files::within(COMPILE_TIME_LIMIT, move || {
            (cfi_digest_of(&file), file)
        }) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(path, error = %e, "unwind information not read");
                return None;
            }
        };
        if let Some(id) = cfi_digest.and_then(|d| self.share(key, d)) {
            return Some(id);
        }
        let result = if key.2 > MAX_FILE_BYTES {
            Err(format!("{} bytes is more than the agent reads", key.2))
        } else {
            crate::proc::files::within(COMPILE_TIME_LIMIT, move || {
                let cache = object::ReadCache::new(file);
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let c =
                        compile_elf_file(&cache, &Limits::default()).map_err(|e| e.to_string())?;
                    let skipped = c.table.stats().skipped_fdes;
                    // CFI none of whose entries could be used is broken, not absent.
                    if c.table.rows().is_empty() && skipped > 0 {
                        return Err(format!(
                            "not one of its CFI entries is usable, {skipped} corrupt or unreadable"
                        ));
                    }
                    Ok((c.table.kernel_rows(), c.table.base(), c.segments))
                }))
                .unwrap_or_else(|_| Err("the unwind-table compiler failed on it".into()))
            })
            .map_err(|e| e.to_string())
            .and_then(|r| r)
        };
        if let Ok(mut s) = self.shared.lock() {
            s.stats.compiled += 1;
            s.stats.compile_time += started.elapsed();
        }
        let (rows, base, segments) = match result {
            Ok(r) if !r.0.is_empty() => r,
            Ok(_) => {
                // No CFI at all (hand-written code, a stripped .eh_frame): frame pointers there.
                self.files.insert(
                    key,
                    FileEntry {
                        state: FileState::Refused(None),
                        base: 0,
                        count: 0,
                        segments: Vec::new(),
                        last_used: self.tick,
                    },
                );
                return None;
            }
            Err(why) => {
                crate::metrics::unwind_table_refused();
                if let Ok(mut s) = self.shared.lock() {
                    s.stats.refused += 1;
                }
                self.warn(pid, refused_warning(&path, &why));
                self.files.insert(
                    key,
                    FileEntry {
                        state: FileState::Refused(Some(why)),
                        base: 0,
                        count: 0,
                        segments: Vec::new(),
                        last_used: self.tick,
                    },
                );
                return None;
            }
        };
        let count = rows.len() as u32;
        let Some((id, first)) = self.place(count) else {
            self.warn(
                pid,
                format!("the unwind table of {path} ({count} rows) does not fit the kernel's table memory"),
            );
            return None;
        };
        if let Err(err) = write_rows(&self.rows, first, &rows).and_then(|()| {
            self.tables
                .set(id, TableRef { first, count }, 0)
                .map_err(std::io::Error::other)
        }) {
            tracing::warn!(path, error = %err, "unwind table not loaded");
            self.extents.free(first, count);
            self.free_ids.push(id);
            return None;
        }
        self.files.insert(
            key,
            FileEntry {
                state: FileState::Loaded { id, first },
                base,
                count,
                segments,
                last_used: self.tick,
            },
        );
        if let Some(d) = cfi_digest {
            self.by_cfi.insert(d, key);
        }
        Some(id)
    }

    /// Makes file `key` use the loaded table of a file with the same unwind information, if
    /// any.
    fn share(&mut self, key: FileKey, digest: CfiDigest) -> Option<u32> {
        let twin = self.by_cfi.get(&digest)?;
        let entry = self.files.get(twin)?;
        let FileState::Loaded { id, first } = entry.state else {
            return None;
        };
        let shared = FileEntry {
            state: FileState::Loaded { id, first },
            base: entry.base,
            count: entry.count,
            segments: entry.segments.clone(),
            last_used: self.tick,
        };
        self.files.insert(key, shared);
        if let Ok(mut s) = self.shared.lock() {
            s.stats.shared += 1;
        }
        Some(id)
    }

    /// A table id and `count` rows of room, evicting the least recently used tables (not one
    /// the current request uses) until they are found.
    fn place(&mut self, count: u32) -> Option<(u32, u32)> {
        if count == 0 || count > MAX_UNWIND_ROWS {
            return None;
        }
        loop {
            if !self.free_ids.is_empty()
                && let Some(first) = self.extents.alloc(count)
            {
                return Some((self.free_ids.pop()?, first));
            }
            if !self.evict_one() {
                return None;
            }
        }
    }

    fn evict_one(&mut self) -> bool {
        let victim = self
            .files
            .iter()
            .filter(|(_, f)| matches!(f.state, FileState::Loaded { .. }) && f.last_used < self.tick)
            .min_by_key(|(_, f)| f.last_used)
            .map(|(k, _)| *k);
        let Some(key) = victim else {
            return false;
        };
        let Some(entry) = self.files.get(&key) else {
            return false;
        };
        let FileState::Loaded { id, first } = entry.state else {
            return false;
        };
        let count = entry.count;
        let _ = self.tables.set(id, TableRef::default(), 0);
        // Every file using the table (files with the same unwind information share it) loses it.
        let mut users = Vec::new();
        for (k, f) in &mut self.files {
            if matches!(f.state, FileState::Loaded { id: other, .. } if other == id) {
                f.state = FileState::Evicted;
                users.push(*k);
            }
        }
        // Mappings that point at the table go to frame pointers before the id is reused.
        for (pid, state) in &mut self.pids {
            let mut changed = false;
            for (i, f) in state.files.iter().enumerate() {
                if f.is_some_and(|f| users.contains(&f)) {
                    state.mappings.mappings[i].table = NO_TABLE;
                    changed = true;
                }
            }
            if changed {
                let _ = self.procs.insert(*pid, state.mappings.as_ref(), 0);
            }
        }
        self.extents.free(first, count);
        self.free_ids.push(id);
        crate::metrics::unwind_table_evicted();
        if let Ok(mut s) = self.shared.lock() {
            s.stats.evictions += 1;
        }
        true
    }
}

/// The warning on the profiles of a process that maps `path`, whose table was refused.
fn refused_warning(path: &str, why: &str) -> String {
    format!(
        "native stacks through {path} are walked by frame pointers only: its unwind information \
         was refused ({why})"
    )
}

/// SHA-256 of everything a compiled table depends on: the CFI sections' bytes and addresses,
/// `.text` and `.got`'s addresses, the executable segments.
type CfiDigest = [u8; 32];

/// The [`CfiDigest`] of an ELF file, read lazily (headers and the CFI sections). Not the build
/// id alone: a tenant could ship a file with libc's build id and hostile CFI, and the table
/// compiled from it would then serve every other tenant's libc.
fn cfi_digest_of(file: &File) -> Option<CfiDigest> {
    use object::{Object as _, ObjectSection as _, ObjectSegment as _};
    use sha2::Digest as _;
    let cache = object::ReadCache::new(file);
    let elf = object::File::parse(&cache).ok()?;
    let mut h = sha2::Sha256::new();
    for name in [".eh_frame", ".debug_frame", ".text", ".got"] {
        h.update(name.as_bytes());
        if let Some(section) = elf.section_by_name(name) {
            h.update(section.address().to_le_bytes());
            if name.ends_with("frame") {
                let data = section.data().ok()?;
                h.update((data.len() as u64).to_le_bytes());
                h.update(data);
            }
        }
    }
    for segment in elf.segments() {
        let (offset, size) = segment.file_range();
        for v in [segment.address(), segment.size(), offset, size] {
            h.update(v.to_le_bytes());
        }
        if let object::SegmentFlags::Elf { p_flags } = segment.flags() {
            h.update(p_flags.to_le_bytes());
        }
    }
    Some(h.finalize().into())
}

/// The executable mappings of `pid`, by address (`None`: the process is gone).
fn exec_mappings(pid: u32) -> Option<Vec<MapEntry>> {
    let mut exec: Vec<MapEntry> = read_maps(pid)
        .ok()?
        .into_iter()
        .filter(MapEntry::is_exec)
        .collect();
    exec.sort_by_key(|e| e.start);
    Some(exec)
}

/// `BPF_MAP_UPDATE_BATCH` of consecutive array slots from `first` (aya has no batch call; one
/// syscall per row would cost ~100 ms for libpython's 74k rows).
fn write_rows(map: &MapData, first: u32, rows: &[UnwindRow]) -> std::io::Result<()> {
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    let fd = map.fd().as_fd().as_raw_fd();
    for (n, chunk) in rows.chunks(1 << 14).enumerate() {
        let start = first + (n as u32) * (1 << 14);
        let keys: Vec<u32> = (start..start + chunk.len() as u32).collect();
        let mut attr = BatchAttr {
            in_batch: 0,
            out_batch: 0,
            keys: keys.as_ptr() as u64,
            values: chunk.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: fd as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `attr` describes `keys` and `chunk`, both alive for the call; the kernel
        // writes back only `count`.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        if ret != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Free extents of the row array: first fit, neighbours merged on free.
#[derive(Debug)]
struct Extents {
    /// start → length.
    free: BTreeMap<u32, u32>,
}

impl Extents {
    fn new(capacity: u32) -> Extents {
        Extents {
            free: BTreeMap::from([(0, capacity)]),
        }
    }

    fn free_total(&self) -> u32 {
        self.free.values().sum()
    }

    fn alloc(&mut self, len: u32) -> Option<u32> {
        let (&start, &have) = self.free.iter().find(|(_, l)| **l >= len)?;
        self.free.remove(&start);
        if have > len {
            self.free.insert(start + len, have - len);
        }
        Some(start)
    }

    fn free(&mut self, start: u32, len: u32) {
        let mut start = start;
        let mut len = len;
        if let Some((&prev, &plen)) = self.free.range(..start).next_back()
            && prev + plen == start
        {
            self.free.remove(&prev);
            start = prev;
            len += plen;
        }
        if let Some(&next_len) = self.free.get(&(start + len)) {
            self.free.remove(&(start + len));
            len += next_len;
        }
        self.free.insert(start, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_first_fit_and_merge() {
        let mut e = Extents::new(100);
        let a = e.alloc(30).unwrap();
        let b = e.alloc(30).unwrap();
        let c = e.alloc(40).unwrap();
        assert_eq!((a, b, c), (0, 30, 60));
        assert_eq!(e.alloc(1), None, "full");
        e.free(b, 30);
        assert_eq!(e.alloc(31), None, "only 30 free in one piece");
        e.free(a, 30);
        assert_eq!(e.free_total(), 60);
        assert_eq!(e.alloc(60), Some(0), "freed neighbours merged");
        e.free(0, 60);
        e.free(c, 40);
        assert_eq!(e.free, BTreeMap::from([(0, 100)]));
    }
}
