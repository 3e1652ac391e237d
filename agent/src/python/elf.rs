//! The little ELF knowledge Python detection needs: symbols (`.dynsym` and `.symtab`), sections
//! and the load bias of a mapped file.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol};

use crate::proc::maps::MapEntry;

/// The symbols Python support looks up; [`ElfInfo`] keeps only these.
pub const WANTED_SYMBOLS: &[&str] = &[
    "_PyRuntime",
    "Py_Version",
    "PyCode_Type",
    "PyDict_Type",
    "PyUnicode_Type",
    "PyLong_Type",
    "_PyEval_EvalFrameDefault",
    "_PyEval_EvalFrameDefault.cold",
    "PyEval_EvalFrameEx",
    // `Py_GetVersion`'s buffer (a local symbol of unstripped builds).
    "version.0",
    "version",
    // pymalloc's arena count (local symbols of unstripped builds): a static counter on
    // 3.8–3.11, inside the main interpreter's static allocator state from 3.13.
    "narenas_currently_allocated",
    "obmalloc_state_main",
    // Where the allocation probes go (public API: in `.dynsym` of every build).
    "PyTraceMalloc_Track",
    "PyTraceMalloc_Untrack",
];

/// The largest `.rodata` kept for version-string scans (a libpython's is ~1 MiB; a file in a
/// tenant's container may claim any size).
const MAX_RODATA: u64 = 16 << 20;

/// The largest symbol or string table read (a libpython's are ~0.5 MiB each).
const MAX_SYMBOL_TABLE: u64 = 64 << 20;

/// A parsed ELF file: the [`WANTED_SYMBOLS`] it defines (first definition wins, `.symtab`
/// before `.dynsym`), sections and loadable segments.
#[derive(Debug, Default)]
pub struct ElfInfo {
    pub symbols: HashMap<String, (u64, u64)>,
    /// (name, address, size, file offset).
    pub sections: Vec<(String, u64, u64, u64)>,
    /// (vaddr, memsz, file offset, file size) of every PT_LOAD.
    pub segments: Vec<(u64, u64, u64, u64)>,
    pub is_dyn: bool,
    /// `.rodata`, kept for version-string scans (the rest of the file is not kept: a
    /// libpython with symbols is ~30 MiB and is cached per interpreter).
    rodata: Vec<u8>,
}

/// Parsed files by (device, inode, size, mtime): processes of one interpreter share them,
/// whatever path or container they map it from.
type ElfKey = (u64, u64, u64, i64);
static CACHE: OnceLock<Mutex<HashMap<ElfKey, Arc<ElfInfo>>>> = OnceLock::new();

/// The [`WANTED_SYMBOLS`] `file` defines. Each symbol and string table is read whole, in one
/// go: through a read cache, name by name, a libpython's ~15k symbols cost tens of
/// milliseconds — long enough to miss the first waits of an interpreter just started.
fn wanted_symbols<'d, R: object::ReadRef<'d>>(
    file: &object::File<'d, R>,
) -> HashMap<String, (u64, u64)> {
    let mut symbols = HashMap::new();
    if !(file.is_64() && file.is_little_endian()) {
        for sym in file.symbols().chain(file.dynamic_symbols()) {
            if let Ok(name) = sym.name()
                && WANTED_SYMBOLS.contains(&name)
                && !sym.is_undefined()
                && sym.address() != 0
            {
                symbols
                    .entry(name.to_string())
                    .or_insert((sym.address(), sym.size()));
            }
        }
        return symbols;
    }
    let data = |name: &str| {
        file.section_by_name(name)
            .filter(|s| s.size() <= MAX_SYMBOL_TABLE)
            .and_then(|s| s.data().ok())
            .unwrap_or_default()
    };
    for (table, strings) in [(".symtab", ".strtab"), (".dynsym", ".dynstr")] {
        let (table, strings) = (data(table), data(strings));
        // Elf64_Sym: st_name u32, st_info u8, st_other u8, st_shndx u16, st_value u64,
        // st_size u64 (24 bytes).
        for sym in table.chunks_exact(24) {
            let word = |at: usize| u64::from_le_bytes(sym[at..at + 8].try_into().unwrap());
            let name_at = u32::from_le_bytes(sym[..4].try_into().unwrap()) as usize;
            let shndx = u16::from_le_bytes(sym[6..8].try_into().unwrap());
            let (address, size) = (word(8), word(16));
            if shndx == 0 || address == 0 {
                continue; // undefined
            }
            let Some(rest) = strings.get(name_at..) else {
                continue;
            };
            let name = rest.split(|b| *b == 0).next().unwrap_or_default();
            if let Some(wanted) = WANTED_SYMBOLS.iter().find(|w| w.as_bytes() == name) {
                symbols
                    .entry((*wanted).to_string())
                    .or_insert((address, size));
            }
        }
    }
    symbols
}

impl ElfInfo {
    /// Parses `file` (a target's, opened with [`crate::proc::files`]; `name` is for errors),
    /// or returns the cached parse of the same file.
    pub fn open_cached(file: std::fs::File, name: &str) -> Result<Arc<Self>, String> {
        let key = crate::proc::files::identity(&file).map_err(|e| format!("{name}: {e}"))?;
        let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
        if let Some(e) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(Arc::clone(e));
        }
        let e = Arc::new(Self::open(file, name)?);
        let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
        if c.len() > 64 {
            c.clear();
        }
        c.insert(key, Arc::clone(&e));
        Ok(e)
    }

    /// Reads only what is needed (headers, symbol tables, `.rodata`) through a read cache
    /// instead of the whole file, never mapping it (a tenant could truncate it under us).
    pub fn open(file: std::fs::File, name: &str) -> Result<Self, String> {
        let cache = object::ReadCache::new(file);
        Self::from_data(&cache).map_err(|e| format!("{name}: {e}"))
    }

    pub fn parse(data: &[u8]) -> Result<Self, String> {
        Self::from_data(data)
    }

    fn from_data<'d, R: object::ReadRef<'d>>(data: R) -> Result<Self, String> {
        let file = object::File::parse(data).map_err(|e| e.to_string())?;
        let symbols = wanted_symbols(&file);
        let sections = file
            .sections()
            .map(|s| {
                (
                    s.name().unwrap_or("").to_string(),
                    s.address(),
                    s.size(),
                    s.file_range().map(|r| r.0).unwrap_or(0),
                )
            })
            .collect();
        let segments = file
            .segments()
            .map(|s| {
                let (off, fsz) = s.file_range();
                (s.address(), s.size(), off, fsz)
            })
            .collect();
        let is_dyn = matches!(file.kind(), object::ObjectKind::Dynamic);
        let rodata = file
            .section_by_name(".rodata")
            .filter(|s| s.size() <= MAX_RODATA)
            .and_then(|s| s.data().ok())
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        Ok(Self {
            symbols,
            sections,
            segments,
            is_dyn,
            rodata,
        })
    }

    /// The address of `name`, one of [`WANTED_SYMBOLS`].
    pub fn symbol(&self, name: &str) -> Option<u64> {
        debug_assert!(WANTED_SYMBOLS.contains(&name), "{name} is not kept");
        self.symbols.get(name).map(|s| s.0)
    }

    pub fn symbol_with_size(&self, name: &str) -> Option<(u64, u64)> {
        debug_assert!(WANTED_SYMBOLS.contains(&name), "{name} is not kept");
        self.symbols.get(name).copied()
    }

    pub fn section(&self, name: &str) -> Option<(u64, u64)> {
        self.sections
            .iter()
            .find(|s| s.0 == name)
            .map(|s| (s.1, s.2))
    }

    /// Load bias of this file given the process's mappings of it: `runtime = bias + vaddr`.
    pub fn load_bias(&self, maps: &[&MapEntry]) -> Option<u64> {
        if !self.is_dyn {
            return Some(0);
        }
        for m in maps {
            for &(vaddr, _memsz, off, fsz) in &self.segments {
                if m.offset >= off && m.offset < off + fsz.max(1) {
                    let seg_vaddr_at_map = vaddr + (m.offset - off);
                    return Some(m.start.wrapping_sub(seg_vaddr_at_map));
                }
            }
        }
        None
    }

    /// Find a version-looking string `major.minor.patch[suffix]` preceded and followed by NUL
    /// in the read-only data, e.g. `3.9.18`.
    pub fn find_version_string(&self, major: u32, minor: u32) -> Option<String> {
        let needle = format!("{major}.{minor}.");
        let hay = &self.rodata;
        let nb = needle.as_bytes();
        let mut i = 0;
        while i + nb.len() < hay.len() {
            if &hay[i..i + nb.len()] == nb && (i == 0 || hay[i - 1] == 0) {
                // Up to the NUL (or the end: a tenant's file need not have one).
                let rest = &hay[i..];
                let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
                let s = &rest[..end];
                let tail = &s[nb.len()..];
                if !tail.is_empty()
                    && tail[0].is_ascii_digit()
                    && end < 16
                    && tail.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'+')
                {
                    return Some(String::from_utf8_lossy(s).into_owned());
                }
            }
            i += 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_rodata(bytes: &[u8]) -> ElfInfo {
        ElfInfo {
            rodata: bytes.to_vec(),
            ..ElfInfo::default()
        }
    }

    #[test]
    fn a_version_string_is_found_between_nuls() {
        let e = with_rodata(b"\0junk\x003.10.13 (main)\x003.10.13\0more\0");
        assert_eq!(e.find_version_string(3, 10).as_deref(), Some("3.10.13"));
        assert_eq!(e.find_version_string(3, 11), None);
    }

    #[test]
    fn a_version_without_its_nul_is_no_panic() {
        // A tenant's fake interpreter: `.rodata` ends in the middle of the version.
        assert_eq!(
            with_rodata(b"\x003.12.1")
                .find_version_string(3, 12)
                .as_deref(),
            Some("3.12.1")
        );
        assert_eq!(with_rodata(b"\x003.12.").find_version_string(3, 12), None);
        assert_eq!(with_rodata(b"3.12.").find_version_string(3, 12), None);
    }
}
