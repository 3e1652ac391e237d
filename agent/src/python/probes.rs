//! Where the allocation probes go in a Python process: `PyTraceMalloc_Track` and
//! `PyTraceMalloc_Untrack`, CPython's public calls through which NumPy and other extensions
//! report the memory they allocate and free, found in the interpreter file the process maps.
use std::fs::File;

use super::{PythonSupport, elf::ElfInfo};
use crate::proc::{files, maps::read_maps};

/// The interpreter file of a Python process, opened by the agent, and the file offsets of its
/// `PyTraceMalloc_Track` and `PyTraceMalloc_Untrack`.
pub struct ProbePoints {
    pub file: File,
    pub track: u64,
    pub untrack: u64,
}

/// The file offset of virtual address `addr` of an ELF file with these PT_LOAD segments
/// ((vaddr, memsz, offset, filesz) each).
pub fn file_offset(segments: &[(u64, u64, u64, u64)], addr: u64) -> Option<u64> {
    segments
        .iter()
        .find(|&&(vaddr, _, _, filesz)| addr >= vaddr && addr - vaddr < filesz)
        .map(|&(vaddr, _, offset, _)| offset + (addr - vaddr))
}

impl PythonSupport {
    /// Where to probe `pid`'s allocations: `Ok(None)` while its interpreter is not detected
    /// (yet); an error when it cannot be probed (a file replaced since it was mapped, an
    /// interpreter without the calls).
    pub fn alloc_probe_points(&self, pid: u32) -> Result<Option<ProbePoints>, String> {
        let Some(p) = self.process(pid) else {
            return Ok(None);
        };
        let maps = read_maps(pid).map_err(|e| format!("its mappings: {e}"))?;
        let mapped = maps
            .iter()
            .find(|m| m.path == p.file)
            .cloned()
            .ok_or_else(|| format!("{} is no longer mapped", p.file))?;
        let path = p.file.clone();
        // A tenant's file system may hang: never wait for it here.
        let opened = files::within(files::READ_TIME_LIMIT, move || {
            let file = files::open_mapped(pid, &mapped).map_err(|e| e.to_string())?;
            let elf = ElfInfo::open_cached(file.try_clone().map_err(|e| e.to_string())?, &path)?;
            Ok::<_, String>((file, elf))
        })
        .map_err(|e| e.to_string())??;
        let (file, elf) = opened;
        let offset = |name: &str| {
            elf.symbol(name)
                .and_then(|a| file_offset(&elf.segments, a))
                .ok_or_else(|| format!("{} has no {name}", p.file))
        };
        Ok(Some(ProbePoints {
            track: offset("PyTraceMalloc_Track")?,
            untrack: offset("PyTraceMalloc_Untrack")?,
            file,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_map_to_their_segments_file_offsets() {
        // A typical shared object: text at 0x1000 from offset 0x1000, data moved up a page.
        let segments = [
            (0, 0x800, 0, 0x800),
            (0x1000, 0x5000, 0x1000, 0x5000),
            (0x7e00, 0x1000, 0x6e00, 0x200),
        ];
        assert_eq!(file_offset(&segments, 0x1234), Some(0x1234));
        assert_eq!(file_offset(&segments, 0x7e10), Some(0x6e10));
        // In no segment, or in memory past a segment's file bytes (.bss).
        assert_eq!(file_offset(&segments, 0x900), None);
        assert_eq!(file_offset(&segments, 0x8100), None);
    }
}
