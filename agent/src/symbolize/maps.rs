//! `/proc/<pid>/maps` parsing and address → (mapping, file offset) translation.
use std::{fs, io, path::Path};

/// One line of `/proc/<pid>/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    /// Offset in the file of `start`.
    pub offset: u64,
    pub executable: bool,
    pub inode: u64,
    /// The path, or a pseudo name like `[vdso]`; empty for anonymous memory.
    pub path: String,
}

impl MapEntry {
    /// A file-backed mapping (an absolute path, not `[heap]`, `[vdso]` or anonymous memory).
    pub fn is_file(&self) -> bool {
        self.path.starts_with('/') && self.inode != 0
    }

    /// The file offset that `addr` (inside this mapping) corresponds to.
    pub fn file_offset(&self, addr: u64) -> u64 {
        addr - self.start + self.offset
    }
}

/// Parses the text of a `maps` file. Malformed lines are skipped.
pub fn parse_maps(text: &str) -> Vec<MapEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MapEntry> {
    // 7f0e2c000000-7f0e2c021000 r-xp 00001000 08:01 1234   /usr/lib/libc.so.6
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?;
    let offset = u64::from_str_radix(it.next()?, 16).ok()?;
    let _dev = it.next()?;
    let inode = it.next()?.parse().ok()?;
    let path = it.next().unwrap_or("").trim_start().to_owned();
    let (start, end) = range.split_once('-')?;
    Some(MapEntry {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        offset,
        executable: perms.as_bytes().get(2) == Some(&b'x'),
        inode,
        path,
    })
}

/// The executable mappings of one process, sorted by address.
#[derive(Clone, Debug, Default)]
pub struct ProcessMaps {
    entries: Vec<MapEntry>,
}

impl ProcessMaps {
    pub fn new(mut entries: Vec<MapEntry>) -> Self {
        entries.retain(|e| e.executable);
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

    #[test]
    fn paths_with_spaces_and_deleted_marker_survive() {
        let m = parse_maps("1000-2000 r-xp 00000000 08:01 7 /opt/my app/bin (deleted)\n");
        assert_eq!(m[0].path, "/opt/my app/bin (deleted)");
    }
}
