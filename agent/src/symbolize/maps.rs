//! Address → (mapping, file offset) translation over a process's executable mappings.
use std::{fs, io, path::Path};

pub use crate::proc::maps::{MapEntry, parse_maps};

/// The executable mappings of one process, sorted by address.
#[derive(Clone, Debug, Default)]
pub struct ProcessMaps {
    entries: Vec<MapEntry>,
}

impl ProcessMaps {
    pub fn new(mut entries: Vec<MapEntry>) -> Self {
        entries.retain(MapEntry::is_exec);
        entries.sort_by_key(|e| e.start);
        ProcessMaps { entries }
    }

    /// Reads `/proc/<pid>/maps`.
    pub fn read(pid: u32) -> io::Result<Self> {
        Self::read_from(&Path::new("/proc").join(pid.to_string()).join("maps"))
    }

    pub fn read_from(path: &Path) -> io::Result<Self> {
        Ok(Self::new(parse_maps(&fs::read_to_string(path)?)))
    }

    /// The mapping containing `addr`.
    pub fn find(&self, addr: u64) -> Option<&MapEntry> {
        let idx = self.entries.partition_point(|e| e.start <= addr);
        let e = self.entries.get(idx.checked_sub(1)?)?;
        (addr < e.end).then_some(e)
    }

    pub fn entries(&self) -> &[MapEntry] {
        &self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
5581d8a00000-5581d8a01000 r--p 00000000 08:01 1311  /tmp/hot
5581d8a01000-5581d8a02000 r-xp 00001000 08:01 1311  /tmp/hot
7f3c1c028000-7f3c1c1bd000 r-xp 00028000 08:01 2002                       /usr/lib/x86_64-linux-gnu/libc.so.6
7ffd5e3f0000-7ffd5e3f2000 r-xp 00000000 00:00 0                          [vdso]
7ffd5e3c0000-7ffd5e3e1000 rw-p 00000000 00:00 0                          [stack]
7f3c1c400000-7f3c1c500000 r-xp 00000000 00:00 0 
garbage line
";

    #[test]
    fn parses_and_finds_executable_mappings() {
        let maps = ProcessMaps::new(parse_maps(MAPS));
        assert_eq!(maps.entries().len(), 4, "only executable mappings are kept");
        let libc = maps.find(0x7f3c1c028010).expect("libc");
        assert_eq!(libc.path, "/usr/lib/x86_64-linux-gnu/libc.so.6");
        assert_eq!(libc.file_offset(0x7f3c1c028010), 0x28010);
        assert!(libc.is_file());
        let hot = maps.find(0x5581d8a01234).expect("hot");
        assert_eq!(hot.path, "/tmp/hot");
        assert_eq!(hot.file_offset(0x5581d8a01234), 0x1234);
        let vdso = maps.find(0x7ffd5e3f0100).expect("vdso");
        assert!(!vdso.is_file());
        let anon = maps.find(0x7f3c1c400001).expect("anon");
        assert_eq!(anon.path, "");
        assert!(maps.find(0x5581d8a00010).is_none(), "non-executable");
        assert!(maps.find(0x7f3c1c1bd000).is_none(), "end is exclusive");
        assert!(maps.find(1).is_none());
    }
}
