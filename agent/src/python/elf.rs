//! The little ELF knowledge Python detection needs: symbols (`.dynsym` and `.symtab`), sections
//! and the load bias of a mapped file.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol};

use crate::proc::maps::MapEntry;

/// A parsed ELF file: symbols by name (first definition wins, `.symtab` before `.dynsym`),
/// sections and loadable segments.
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

/// Parsed files by (path, device, inode, size, mtime): processes of one interpreter share them.
type ElfKey = (String, u64, u64, u64, i64);
static CACHE: OnceLock<Mutex<HashMap<ElfKey, Arc<ElfInfo>>>> = OnceLock::new();

impl ElfInfo {
    /// Parse `path`, or return the cached parse of the same file.
    pub fn open_cached(path: &str) -> Result<Arc<Self>, String> {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(path).map_err(|e| format!("{path}: {e}"))?;
        let key = (path.to_string(), md.dev(), md.ino(), md.size(), md.mtime());
        let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
        if let Some(e) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(Arc::clone(e));
        }
        let e = Arc::new(Self::open(path)?);
        let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
        if c.len() > 64 {
            c.clear();
        }
        c.insert(key, Arc::clone(&e));
        Ok(e)
    }

    /// Reads only what is needed (headers, symbol tables, `.rodata`) through a read cache
    /// instead of the whole file.
    pub fn open(path: &str) -> Result<Self, String> {
        let file = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
        let cache = object::ReadCache::new(file);
        Self::from_data(&cache).map_err(|e| format!("{path}: {e}"))
    }

    pub fn parse(data: &[u8]) -> Result<Self, String> {
        Self::from_data(data)
    }

    fn from_data<'d, R: object::ReadRef<'d>>(data: R) -> Result<Self, String> {
        let file = object::File::parse(data).map_err(|e| e.to_string())?;
        let mut symbols = HashMap::new();
        for sym in file.symbols().chain(file.dynamic_symbols()) {
            if sym.is_undefined() || sym.address() == 0 {
                continue;
            }
            if let Ok(name) = sym.name() {
                symbols
                    .entry(name.to_string())
                    .or_insert((sym.address(), sym.size()));
            }
        }
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

    pub fn symbol(&self, name: &str) -> Option<u64> {
        self.symbols.get(name).map(|s| s.0)
    }

    pub fn symbol_with_size(&self, name: &str) -> Option<(u64, u64)> {
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
                let rest = &hay[i..];
                let end = rest.iter().position(|&b| b == 0).unwrap_or(0);
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
