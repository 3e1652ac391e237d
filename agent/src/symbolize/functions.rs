//! Function starts of files without symbols (issue #15): an address no symbol names is named
//! by the start of the function its FDE covers (`libz.so.1.2.13+0x4a00`), so the samples of a
//! whole function aggregate under one name and one location.
//!
//! FDE addresses are ELF virtual addresses; frames of unsymbolized code are named by file
//! offset ([`crate::profile::Frame::unresolved`]): the executable `PT_LOAD` segment that holds
//! an offset converts it, and the function's start back.
use std::{collections::HashMap, sync::Arc};

use object::{Object as _, ObjectSegment as _, SegmentFlags, elf::PF_X};

use super::snapshot::Snapshot;
use crate::profile::ModuleId;
use crate::unwind::{FunctionStarts, Limits, compile_elf};

/// The most bytes the function starts of all files take together (a table of the default
/// [`Limits`] fits): the least recently used are dropped beyond it.
pub const MAX_FUNCTION_BYTES: usize = 32 << 20;

/// Where the functions of one file start.
#[derive(Debug)]
pub struct Functions {
    /// The executable `PT_LOAD` segments: file offset, size in the file, virtual address.
    segments: Vec<(u64, u64, u64)>,
    starts: FunctionStarts,
}

impl Functions {
    /// From an ELF file's bytes; `None` when it has no usable unwind table (not an x86-64 ELF,
    /// no `.eh_frame`, too large, …). Parsing errors are values; a panic is the caller's to
    /// catch.
    pub fn of(data: &[u8]) -> Option<Functions> {
        let file = object::File::parse(data).ok()?;
        let segments: Vec<(u64, u64, u64)> = file
            .segments()
            .filter(|s| matches!(s.flags(), SegmentFlags::Elf { p_flags } if p_flags & PF_X != 0))
            .map(|s| {
                let (offset, size) = s.file_range();
                (offset, size, s.address())
            })
            .collect();
        if segments.is_empty() {
            return None;
        }
        let table = match compile_elf(data, &Limits::default()) {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(error = %e, "no function starts for unsymbolized addresses");
                return None;
            }
        };
        let starts = table.functions().clone();
        (!starts.is_empty()).then_some(Functions { segments, starts })
    }

    /// The file offset of the start of the function that holds file offset `offset` (`None`:
    /// in no executable segment, or no FDE covers it).
    pub fn start_of(&self, offset: u64) -> Option<u64> {
        let &(file_start, _, vaddr) = self
            .segments
            .iter()
            .find(|&&(start, size, _)| offset >= start && offset - start < size)?;
        let pc = (offset - file_start).checked_add(vaddr)?;
        let start = self.starts.function_start(pc)?;
        // A function that starts before its segment (lying FDEs) has no offset in it.
        Some(start.checked_sub(vaddr)? + file_start)
    }

    /// Roughly the memory it takes.
    fn bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.segments.len() * std::mem::size_of::<(u64, u64, u64)>()
            + self.starts.len() * std::mem::size_of::<(u64, u64)>()
    }
}

/// The function starts of files, by module (the key of the symbol cache), each file read at
/// most once while it is kept (failures too), bounded by bytes.
#[derive(Debug)]
pub struct FunctionCache {
    map: HashMap<ModuleId, Entry>,
    bytes: usize,
    max_bytes: usize,
    clock: u64,
}

#[derive(Debug)]
struct Entry {
    functions: Option<Arc<Functions>>,
    bytes: usize,
    used: u64,
}

impl Default for FunctionCache {
    fn default() -> Self {
        Self::new(MAX_FUNCTION_BYTES)
    }
}

impl FunctionCache {
    pub fn new(max_bytes: usize) -> Self {
        FunctionCache {
            map: HashMap::new(),
            bytes: 0,
            max_bytes,
            clock: 0,
        }
    }

    /// The function starts of `module`, read from its copy the first time.
    pub fn get(&mut self, module: &ModuleId, snapshot: &Snapshot) -> Option<Arc<Functions>> {
        self.clock += 1;
        if let Some(e) = self.map.get_mut(module) {
            e.used = self.clock;
            return e.functions.clone();
        }
        let functions = read(snapshot).map(Arc::new);
        let bytes = std::mem::size_of::<Entry>()
            + std::mem::size_of::<ModuleId>()
            + functions.as_ref().map_or(0, |f| f.bytes());
        self.bytes += bytes;
        self.map.insert(
            module.clone(),
            Entry {
                functions: functions.clone(),
                bytes,
                used: self.clock,
            },
        );
        self.keep_bounded(module);
        functions
    }

    /// Drops the least recently used entries but `keep` until the rest fit.
    fn keep_bounded(&mut self, keep: &ModuleId) {
        if self.bytes <= self.max_bytes {
            return;
        }
        let mut by_use: Vec<(u64, ModuleId)> = self
            .map
            .iter()
            .filter(|(k, _)| *k != keep)
            .map(|(k, e)| (e.used, k.clone()))
            .collect();
        by_use.sort_unstable_by_key(|(used, _)| *used);
        for (_, key) in by_use {
            if self.bytes <= self.max_bytes {
                break;
            }
            if let Some(e) = self.map.remove(&key) {
                self.bytes -= e.bytes;
            }
        }
    }

    /// Bytes held, as counted.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The function starts in a copy (a stripped file's copy holds its `.eh_frame`). The reader
/// works on a tenant's bytes: a panic is caught and the file keeps its per-address frames.
fn read(snapshot: &Snapshot) -> Option<Functions> {
    let read = snapshot.with_bytes(|data| std::panic::catch_unwind(|| Functions::of(data)));
    match read {
        Ok(Ok(functions)) => functions,
        Ok(Err(_)) => {
            crate::metrics::error("panic");
            tracing::warn!(
                "reading a mapped file's unwind tables failed: its unsymbolized frames stay per address"
            );
            None
        }
        Err(e) => {
            tracing::debug!(error = %e, "a copy could not be mapped");
            None
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::{fs::File, path::Path, process::Command};

    /// A stripped shared library of two static functions (no symbol once stripped), built with
    /// the host's C compiler; the
    /// file offsets of each function's start and of a later instruction of each (from the
    /// symbols before stripping). `None` without a compiler.
    pub(crate) fn stripped_library(
        dir: &Path,
        extra: &[&str],
    ) -> Option<(std::path::PathBuf, [u64; 4])> {
        let src = dir.join("two.c");
        std::fs::write(
            &src,
            r#"
volatile int sink;
__attribute__((noinline, noclone)) static int first(int n) {
    int s = 0;
    for (int i = 0; i < n; i++) { s += i * sink; sink = s; }
    return s;
}
__attribute__((noinline, noclone)) static int second(int n) {
    int s = 1;
    for (int i = 0; i < n; i++) { s *= i + sink; sink = s; }
    return s + first(n);
}
int entry(int n) { return first(n) + second(n); }
"#,
        )
        .unwrap();
        let lib = dir.join("libtwo.so");
        let built = Command::new("cc")
            .args(["-O2", "-fomit-frame-pointer", "-shared", "-fPIC", "-o"])
            .arg(&lib)
            .arg(&src)
            .args(extra)
            .status()
            .ok()?;
        assert!(built.success(), "cc failed");
        let data = std::fs::read(&lib).unwrap();
        let file = object::File::parse(&*data).unwrap();
        use object::ObjectSymbol as _;
        let at = |name: &str| {
            let sym = file.symbols().find(|s| s.name() == Ok(name)).unwrap();
            assert!(sym.size() > 4, "{name}: {}", sym.size());
            let vaddr = sym.address();
            let seg = file
                .segments()
                .find(|s| vaddr >= s.address() && vaddr < s.address() + s.size())
                .unwrap();
            let off = vaddr - seg.address() + seg.file_range().0;
            (off, off + sym.size() - 2)
        };
        let ((f0, f1), (s0, s1)) = (at("first"), at("second"));
        let stripped = Command::new("strip").arg(&lib).status().ok()?;
        assert!(stripped.success());
        Some((lib, [f0, f1, s0, s1]))
    }

    fn functions_of(path: &Path) -> Option<Functions> {
        let snap = Snapshot::of(&File::open(path).unwrap(), 1 << 30).unwrap();
        read(&snap)
    }

    #[test]
    fn offsets_in_one_function_share_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let Some((lib, [f0, f1, s0, s1])) = stripped_library(dir.path(), &[]) else {
            eprintln!("no C compiler: skipped");
            return;
        };
        let f = functions_of(&lib).expect("the copy of a stripped file holds its .eh_frame");
        assert_eq!(f.start_of(f0), Some(f0));
        assert_eq!(f.start_of(f1), Some(f0));
        assert_eq!(f.start_of(s0), Some(s0));
        assert_eq!(f.start_of(s1), Some(s0));
        assert_ne!(f0, s0);
        // Outside any executable segment: nothing.
        assert_eq!(f.start_of(0), None);
        assert_eq!(f.start_of(u64::MAX), None);
    }

    #[test]
    fn offsets_and_virtual_addresses_differ() {
        // Code loaded at another address than its file offset: the name is the start's file
        // offset, as every other unsymbolized frame.
        let dir = tempfile::tempdir().unwrap();
        let Some((lib, [f0, f1, s0, s1])) =
            stripped_library(dir.path(), &["-Wl,-Ttext-segment=0x200000"])
        else {
            return;
        };
        let data = std::fs::read(&lib).unwrap();
        let file = object::File::parse(&*data).unwrap();
        assert!(
            file.segments().any(|s| {
                matches!(s.flags(), SegmentFlags::Elf { p_flags } if p_flags & PF_X != 0)
                    && s.address() != s.file_range().0
            }),
            "the test needs code whose address is not its offset"
        );
        let f = functions_of(&lib).unwrap();
        assert_eq!(f.start_of(f1), Some(f0));
        assert_eq!(f.start_of(s1), Some(s0));
    }

    #[test]
    fn files_with_symbols_and_garbage_have_none() {
        let dir = tempfile::tempdir().unwrap();
        // Symbols: its copy holds no .eh_frame (blazesym names its functions).
        assert!(functions_of(Path::new("/proc/self/exe")).is_none());
        let garbage = dir.path().join("garbage.so");
        std::fs::write(&garbage, b"\x7fELF\x02\x01\x01 and then nothing of an ELF").unwrap();
        assert!(Snapshot::of(&File::open(&garbage).unwrap(), 1 << 20).is_err());
        assert!(Functions::of(b"\x7fELF\x02\x01\x01 and then nothing").is_none());
        assert!(Functions::of(&[]).is_none());
        // A real library cut short, and with its CFI overwritten by noise.
        let Some((lib, _)) = stripped_library(dir.path(), &[]) else {
            return;
        };
        let bytes = std::fs::read(&lib).unwrap();
        for cut in [16, 64, 200, bytes.len() / 2, bytes.len() - 1] {
            assert!(Functions::of(&bytes[..cut]).is_none(), "cut at {cut}");
        }
        let file = object::File::parse(&*bytes).unwrap();
        use object::ObjectSection as _;
        let (at, len) = file
            .section_by_name(".eh_frame")
            .and_then(|s| s.file_range())
            .unwrap();
        let mut noisy = bytes.clone();
        let mut x = 0x9e37_79b9_u32;
        for b in &mut noisy[at as usize..(at + len) as usize] {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        let _ = Functions::of(&noisy);
    }

    #[test]
    fn the_cache_reads_a_file_once_and_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let Some((lib, [_, f1, ..])) = stripped_library(dir.path(), &[]) else {
            return;
        };
        let snap = Snapshot::of(&File::open(&lib).unwrap(), 1 << 30).unwrap();
        let mut c = FunctionCache::new(usize::MAX);
        let a = ModuleId::Path("/a".into());
        let first = c.get(&a, &snap).unwrap();
        assert!(Arc::ptr_eq(&first, &c.get(&a, &snap).unwrap()));
        assert!(first.start_of(f1).is_some());
        let one = c.bytes();
        let mut c = FunctionCache::new(one + one / 2);
        for name in ["/a", "/b", "/c"] {
            assert!(c.get(&ModuleId::Path(name.into()), &snap).is_some());
            assert!(c.bytes() <= one + one / 2);
        }
        assert_eq!(c.len(), 1);
        assert!(c.map.contains_key(&ModuleId::Path("/c".into())));
    }
}
