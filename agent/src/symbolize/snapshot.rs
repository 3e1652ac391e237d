//! A private copy of what symbolization reads of a target's ELF file.
//!
//! The symbolizer (blazesym) maps the files it reads. A tenant can truncate a file of its
//! container after the agent mapped it, and the next read of a page past the new end ends the
//! agent with SIGBUS. So the agent never maps a tenant's file: it reads, with bounded sizes,
//! the ELF headers, symbol and string tables, notes and DWARF into a sealed `memfd` of the
//! file's size — everything else (code, data) stays a hole that takes no memory — and hands
//! blazesym that copy, which no one else can change. A file without a `.symtab` (stripped)
//! also has its `.eh_frame` copied: its FDEs name the functions no symbol names
//! ([`super::functions`]).
use std::{
    collections::HashMap,
    ffi::CString,
    fs::File,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _},
        unix::fs::FileExt as _,
    },
    path::PathBuf,
    ptr::NonNull,
    sync::{Arc, Mutex, OnceLock, Weak},
};

use object::{
    Endianness, ReadCache, ReadRef,
    elf::{SHT_DYNSYM, SHT_NOTE, SHT_STRTAB, SHT_SYMTAB},
    read::elf::{FileHeader, ProgramHeader as _, SectionHeader as _},
};

/// Why no snapshot was made.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("not an ELF file: {0}")]
    NotElf(String),
    #[error("its symbol tables take {0} bytes, over the limit")]
    TooLarge(u64),
    #[error("read while it changed (truncated?): {0}")]
    Io(#[from] io::Error),
}

/// A sealed in-memory copy of a file's symbolization data, at the file's offsets.
#[derive(Debug)]
pub struct Snapshot {
    memfd: File,
    bytes: u64,
    build_id: Option<Vec<u8>>,
}

/// One range of the file to copy.
struct Part {
    offset: u64,
    len: u64,
    /// For a DWARF or `.eh_frame` section (dropped first when over the limit): where its
    /// section header's `sh_type` lies, and the file's byte order, to mark it without data
    /// when dropped.
    droppable: Option<(u64, Endianness)>,
}

/// Copies in use, by the identity of their file: every target's symbolizer shares them.
type Shared = HashMap<(u64, u64, u64, i64), Weak<Snapshot>>;
static SHARED: OnceLock<Mutex<Shared>> = OnceLock::new();

impl Snapshot {
    /// The copy of `file` ([`Snapshot::of`]), shared with whoever holds one of the same file.
    pub fn shared(file: &File, max_bytes: u64) -> Result<Arc<Self>, SnapshotError> {
        let key = crate::proc::files::identity(file)?;
        let shared = SHARED.get_or_init(Mutex::default);
        let lock = || shared.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = lock().get(&key).and_then(Weak::upgrade) {
            return Ok(s);
        }
        // Copied without the lock: at worst two symbolizers copy one file at once.
        let snapshot = Arc::new(Self::of(file, max_bytes)?);
        let mut map = lock();
        map.retain(|_, w| w.strong_count() > 0);
        map.insert(key, Arc::downgrade(&snapshot));
        Ok(snapshot)
    }

    /// Copies from `file` what symbolization needs, at most `max_bytes` (DWARF and
    /// `.eh_frame` are left out when the symbol tables fit and they do not: functions without
    /// lines, unsymbolized addresses not grouped by function).
    pub fn of(file: &File, max_bytes: u64) -> Result<Self, SnapshotError> {
        let size = file.metadata()?.len();
        let parts = parts(file, size)?;
        let total = |dwarf: bool| -> u64 {
            parts
                .iter()
                .filter(|p| dwarf || p.droppable.is_none())
                .map(|p| p.len)
                .sum()
        };
        let with_dwarf = total(true) <= max_bytes;
        if !with_dwarf && total(false) > max_bytes {
            return Err(SnapshotError::TooLarge(total(false)));
        }
        let memfd = memfd(size)?;
        let mut bytes = 0;
        let mut buf = vec![0u8; 1 << 20];
        for p in parts.iter().filter(|p| with_dwarf || p.droppable.is_none()) {
            let mut done = 0;
            while done < p.len {
                let n = (p.len - done).min(buf.len() as u64) as usize;
                // A short read is a file that shrank since its size was taken: an error.
                file.read_exact_at(&mut buf[..n], p.offset + done)?;
                memfd.write_all_at(&buf[..n], p.offset + done)?;
                done += n as u64;
            }
            bytes += p.len;
        }
        if !with_dwarf {
            // A DWARF section full of zeros would be an error to the reader: say it has none.
            for (at, endian) in parts.iter().filter_map(|p| p.droppable) {
                let nobits = object::U32::new(endian, object::elf::SHT_NOBITS);
                memfd.write_all_at(object::bytes_of(&nobits), at)?;
            }
        }
        seal(&memfd)?;
        let build_id = build_id(&memfd);
        Ok(Snapshot {
            memfd,
            bytes,
            build_id,
        })
    }

    /// Where blazesym opens the copy (this process's descriptor of it).
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.memfd.as_raw_fd()))
    }

    /// Bytes copied (the memory the copy takes).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The file's GNU build id.
    pub fn build_id(&self) -> Option<Vec<u8>> {
        self.build_id.clone()
    }

    /// Runs `f` on the copy's bytes, at the file's offsets (what was not copied reads as
    /// zeros). The copy is mapped read-only for the call: sealed, it cannot shrink under the
    /// mapping.
    pub fn with_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> io::Result<R> {
        let len = usize::try_from(self.memfd.metadata()?.len())
            .map_err(|_| io::Error::other("larger than the address space"))?;
        if len == 0 {
            return Ok(f(&[]));
        }
        // SAFETY: a new private read-only mapping of a descriptor we own; the result is checked.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                self.memfd.as_raw_fd(),
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mapping = Mapping {
            at: NonNull::new(at.cast()).ok_or_else(|| io::Error::other("mapped at 0"))?,
            len,
        };
        // SAFETY: `len` readable bytes, unchanged (sealed against writes and shrinking) and
        // mapped until `mapping` drops, after `f` returns or unwinds.
        let bytes = unsafe { std::slice::from_raw_parts(mapping.at.as_ptr(), mapping.len) };
        Ok(f(bytes))
    }

    #[cfg(test)]
    fn file(&self) -> &File {
        &self.memfd
    }
}

/// A mapping of a copy, unmapped when dropped.
struct Mapping {
    at: NonNull<u8>,
    len: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping `Snapshot::with_bytes` made, no longer borrowed.
        unsafe { libc::munmap(self.at.as_ptr().cast(), self.len) };
    }
}

/// The ranges of `file` to copy: the ELF header, program and section headers, symbol and
/// string tables, notes (the build id), the debug link and DWARF; each within the file.
fn parts(file: &File, size: u64) -> Result<Vec<Part>, SnapshotError> {
    let data = ReadCache::new(file);
    let class = data
        .read_bytes_at(0, 5)
        .map_err(|()| SnapshotError::NotElf("shorter than an ELF header".into()))?;
    let mut parts = match class {
        [0x7f, b'E', b'L', b'F', 2] => {
            parts_of::<object::elf::FileHeader64<Endianness>, _>(&data, size)
        }
        [0x7f, b'E', b'L', b'F', 1] => {
            parts_of::<object::elf::FileHeader32<Endianness>, _>(&data, size)
        }
        _ => Err(SnapshotError::NotElf("no ELF magic".into())),
    }?;
    for p in &parts {
        if p.offset.checked_add(p.len).is_none_or(|end| end > size) {
            return Err(SnapshotError::NotElf(format!(
                "a part at {:#x}+{:#x} lies past the end ({size:#x})",
                p.offset, p.len
            )));
        }
    }
    parts.retain(|p| p.len > 0);
    Ok(parts)
}

fn parts_of<'d, Elf, R>(data: R, file_size: u64) -> Result<Vec<Part>, SnapshotError>
where
    Elf: FileHeader<Endian = Endianness>,
    R: ReadRef<'d>,
{
    let bad = |e: object::Error| SnapshotError::NotElf(e.to_string());
    let header = Elf::parse(data).map_err(bad)?;
    let endian = header.endian().map_err(bad)?;
    let part = |offset: u64, len: u64| Part {
        offset,
        len,
        droppable: None,
    };
    let mut parts = vec![part(0, std::mem::size_of::<Elf>() as u64)];
    // Counts and sizes are the file's word: a product past u64 is a lie, not a panic.
    let table = |num: usize, entsize: u16| {
        (num as u64)
            .checked_mul(u64::from(entsize))
            .ok_or_else(|| SnapshotError::NotElf("a header table larger than any file".into()))
    };
    let phnum = header.phnum(endian, data).map_err(bad)?;
    parts.push(part(
        header.e_phoff(endian).into(),
        table(phnum, header.e_phentsize(endian))?,
    ));
    // A loaded segment must lie in the file: the reader turns file offsets into addresses
    // through them.
    for ph in header.program_headers(endian, data).map_err(bad)? {
        if ph.p_type(endian) == object::elf::PT_LOAD {
            let (offset, size): (u64, u64) =
                (ph.p_offset(endian).into(), ph.p_filesz(endian).into());
            if offset.checked_add(size).is_none_or(|end| end > file_size) {
                return Err(SnapshotError::NotElf(format!(
                    "a loaded segment at {offset:#x}+{size:#x} lies past the end ({file_size:#x})"
                )));
            }
        }
    }
    let shoff: u64 = header.e_shoff(endian).into();
    let shentsize = u64::from(header.e_shentsize(endian));
    let shnum = header.shnum(endian, data).map_err(bad)?;
    parts.push(part(shoff, table(shnum, header.e_shentsize(endian))?));
    let sections = header.sections(endian, data).map_err(bad)?;
    // Stripped: the FDEs are all that knows where its functions start.
    let stripped = !sections.iter().any(|s| s.sh_type(endian) == SHT_SYMTAB);
    for (index, section) in sections.iter().enumerate() {
        let name = sections.section_name(endian, section).unwrap_or(b"");
        let droppable = name.starts_with(b".debug_")
            || name.starts_with(b".zdebug_")
            || (stripped && name == b".eh_frame");
        let wanted = matches!(
            section.sh_type(endian),
            SHT_SYMTAB | SHT_DYNSYM | SHT_STRTAB | SHT_NOTE
        ) || droppable
            || name == b".gnu_debuglink";
        if let (true, Some((offset, len))) = (wanted, section.file_range(endian)) {
            // `sh_type` is the second word of a section header in both ELF classes (the table
            // was read, so this lies within the file).
            let type_at = shoff
                .wrapping_add((index as u64).wrapping_mul(shentsize))
                .wrapping_add(4);
            parts.push(Part {
                droppable: droppable.then_some((type_at, endian)),
                ..part(offset, len)
            });
        }
    }
    Ok(parts)
}

/// The GNU build id in the copy's notes (read with `object`, which returns errors on any
/// input; blazesym's reader asserts on odd note alignments).
fn build_id(copy: &File) -> Option<Vec<u8>> {
    let data = ReadCache::new(copy);
    let file = object::File::parse(&data).ok()?;
    use object::Object as _;
    file.build_id()
        .ok()
        .flatten()
        .filter(|b| !b.is_empty())
        .map(<[u8]>::to_vec)
}

/// An anonymous in-memory file of `size` bytes, all a hole.
fn memfd(size: u64) -> io::Result<File> {
    let name = CString::new("kprof-elf").expect("no NUL");
    // SAFETY: a valid NUL-terminated name; the result is checked.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor owned by no one else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

/// Nothing may change the copy any more (not even through `/proc/self/fd`).
fn seal(file: &File) -> io::Result<()> {
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use blazesym::symbolize::{Input, Symbolized, Symbolizer, source::Elf, source::Source};
    use std::path::Path;

    fn own_exe() -> File {
        File::open("/proc/self/exe").unwrap()
    }

    /// Symbolizes `offsets` of the file at `path`.
    fn names(path: &Path, offsets: &[u64]) -> Vec<Option<String>> {
        let s = Symbolizer::new();
        let src = Source::Elf(Elf::new(path));
        s.symbolize(&src, Input::FileOffset(offsets))
            .unwrap()
            .into_iter()
            .map(|r| match r {
                Symbolized::Sym(sym) => Some(sym.name.to_string()),
                Symbolized::Unknown(_) => None,
            })
            .collect()
    }

    #[inline(never)]
    fn a_function_to_find() -> u64 {
        std::hint::black_box(42)
    }

    /// The file offset of a function of this test binary.
    fn offset_of(f: u64) -> u64 {
        let maps = crate::symbolize::ProcessMaps::read(std::process::id()).unwrap();
        maps.find(f).unwrap().file_offset(f)
    }

    #[test]
    fn the_copy_symbolizes_like_the_file_and_holds_only_the_tables() {
        let exe = own_exe();
        let snap = Snapshot::of(&exe, 1 << 30).unwrap();
        let off = offset_of(a_function_to_find as *const () as u64);
        let exe_path = std::fs::read_link("/proc/self/exe").unwrap();
        let from_file = names(&exe_path, &[off]);
        let from_copy = names(&snap.path(), &[off]);
        assert!(
            from_file[0]
                .as_deref()
                .is_some_and(|n| n.contains("a_function_to_find")),
            "{from_file:?}"
        );
        assert_eq!(from_copy, from_file);
        let size = exe.metadata().unwrap().len();
        assert_eq!(snap.file().metadata().unwrap().len(), size);
        // Code and data are holes: the copy holds less than the file.
        assert!(snap.bytes() < size, "{} of {size}", snap.bytes());
        assert_eq!(snap.build_id(), {
            let b = blazesym::helper::read_elf_build_id(&exe_path).unwrap();
            b.map(|b| b.into_owned()).filter(|b| !b.is_empty())
        });
    }

    #[test]
    fn one_copy_per_file_while_in_use() {
        let a = Snapshot::shared(&own_exe(), 1 << 30).unwrap();
        let b = Snapshot::shared(&own_exe(), 1 << 30).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let path = a.path();
        drop((a, b));
        let c = Snapshot::shared(&own_exe(), 1 << 30).unwrap();
        assert!(c.bytes() > 0);
        drop(path);
    }

    #[test]
    fn over_the_limit_dwarf_goes_first_then_everything() {
        let exe = own_exe();
        let full = Snapshot::of(&exe, 1 << 30).unwrap().bytes();
        let parts = parts(&exe, exe.metadata().unwrap().len()).unwrap();
        let tables: u64 = parts
            .iter()
            .filter(|p| p.droppable.is_none())
            .map(|p| p.len)
            .sum();
        assert!(tables < full, "a test binary has DWARF");
        let without = Snapshot::of(&exe, tables).unwrap();
        assert_eq!(without.bytes(), tables);
        let off = offset_of(a_function_to_find as *const () as u64);
        assert!(
            names(&without.path(), &[off])[0].is_some(),
            "symbols remain"
        );
        assert!(matches!(
            Snapshot::of(&exe, tables - 1),
            Err(SnapshotError::TooLarge(_))
        ));
    }

    #[test]
    fn the_copy_cannot_be_changed_and_outlives_a_truncated_file() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("libt.so");
        std::fs::copy("/proc/self/exe", &lib).unwrap();
        let file = File::open(&lib).unwrap();
        let snap = Snapshot::of(&file, 1 << 30).unwrap();
        // The tenant truncates its file: the copy is untouched (a mapping of the file itself
        // would now raise SIGBUS on its next read past the end).
        File::options()
            .write(true)
            .open(&lib)
            .unwrap()
            .set_len(100)
            .unwrap();
        let off = offset_of(a_function_to_find as *const () as u64);
        assert!(names(&snap.path(), &[off])[0].is_some());
        // Sealed: not writable, not shrinkable, even by us.
        let again = File::options().write(true).open(snap.path());
        assert!(again.is_err() || again.unwrap().set_len(1).is_err());
        // Truncated while copied: an error, not a crash.
        assert!(Snapshot::of(&file, 1 << 30).is_err());
    }

    #[test]
    fn a_loaded_segment_past_the_end_is_an_error() {
        // Found by fuzzing (elf_symbolize): a PT_LOAD whose offset + size overflows made
        // blazesym's offset-to-address translation panic.
        let mut bytes = std::fs::read("/proc/self/exe").unwrap();
        let phoff = u64::from_le_bytes(bytes[0x20..0x28].try_into().unwrap()) as usize;
        let phentsize = u16::from_le_bytes(bytes[0x36..0x38].try_into().unwrap()) as usize;
        let load = (0..16)
            .map(|i| phoff + i * phentsize)
            .find(|&at| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) == 1)
            .unwrap();
        bytes[load + 0x20..load + 0x28].copy_from_slice(&u64::MAX.to_le_bytes()); // p_filesz
        let dir = tempfile::tempdir().unwrap();
        let lying = dir.path().join("segment.so");
        std::fs::write(&lying, &bytes).unwrap();
        assert!(matches!(
            Snapshot::of(&File::open(&lying).unwrap(), 1 << 30),
            Err(SnapshotError::NotElf(_))
        ));
    }

    #[test]
    fn a_section_count_past_any_file_is_an_error() {
        // Found by fuzzing (elf_symbolize): e_shnum 0 and section 0's sh_size (the real count)
        // near u64::MAX overflowed the size of the section header table.
        let mut bytes = std::fs::read("/proc/self/exe").unwrap();
        let shoff = u64::from_le_bytes(bytes[0x28..0x30].try_into().unwrap()) as usize;
        bytes[0x3c..0x3e].copy_from_slice(&0u16.to_le_bytes());
        bytes[shoff + 0x20..shoff + 0x28].copy_from_slice(&(u64::MAX / 3).to_le_bytes());
        let dir = tempfile::tempdir().unwrap();
        let lying = dir.path().join("many.so");
        std::fs::write(&lying, &bytes).unwrap();
        assert!(Snapshot::of(&File::open(&lying).unwrap(), 1 << 30).is_err());
    }

    #[test]
    fn not_elf_and_lying_headers_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("locale-archive");
        std::fs::write(&text, b"not an ELF at all").unwrap();
        assert!(matches!(
            Snapshot::of(&File::open(&text).unwrap(), 1 << 20),
            Err(SnapshotError::NotElf(_))
        ));
        // A section header table that claims to lie past the end of the file.
        let mut bytes = std::fs::read("/proc/self/exe").unwrap();
        bytes[0x28..0x30].copy_from_slice(&(u64::MAX - 8).to_le_bytes());
        let lying = dir.path().join("lying.so");
        std::fs::write(&lying, &bytes).unwrap();
        assert!(matches!(
            Snapshot::of(&File::open(&lying).unwrap(), 1 << 30),
            Err(SnapshotError::NotElf(_))
        ));
    }
}
