//! The one `/proc/<pid>/maps` parser (used by symbolization and the Python support).
use std::{fs, io};

/// One line of `/proc/<pid>/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    /// Offset in the file of `start`.
    pub offset: u64,
    /// `r-xp` and the like.
    pub perms: String,
    /// The device and inode of the mapped file (0 for anonymous memory).
    pub dev: u64,
    pub inode: u64,
    /// The path, or a pseudo name like `[vdso]`; empty for anonymous memory.
    pub path: String,
}

impl MapEntry {
    /// Mapped executable.
    pub fn is_exec(&self) -> bool {
        self.perms.as_bytes().get(2) == Some(&b'x')
    }

    /// A file-backed mapping (an absolute path, not `[heap]`, `[vdso]` or anonymous memory).
    pub fn is_file(&self) -> bool {
        self.path.starts_with('/') && self.inode != 0
    }

    /// Whether `md` (a `stat` of the path, as the agent would open it now) is the file this
    /// mapping maps: a regular file with its device and inode. A tenant may have replaced the
    /// path since — with another file, a FIFO, or a symlink that the agent would resolve
    /// against the host's root.
    pub fn is_mapped_file(&self, md: &fs::Metadata) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        // Some file systems show a file with another device in `maps` than in `stat`, one of
        // them anonymous (major 0): btrfs subvolumes, and overlayfs before Linux 6.8, whose
        // `maps` names the layer's file while `stat` gives the overlay's device. The inode
        // decides there. (Leaving the process's root is prevented by how the file is opened,
        // see `proc::files`; this check only tells a replaced file.)
        let anonymous = |dev: u64| libc::major(dev) == 0;
        md.is_file()
            && md.ino() == self.inode
            && (md.dev() == self.dev || anonymous(md.dev()) || anonymous(self.dev))
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
    let (major, minor) = it.next()?.split_once(':')?;
    let dev = libc::makedev(
        u32::from_str_radix(major, 16).ok()?,
        u32::from_str_radix(minor, 16).ok()?,
    );
    let inode = it.next()?.parse().ok()?;
    let path = it.next().unwrap_or("").trim_start().to_owned();
    let (start, end) = range.split_once('-')?;
    Some(MapEntry {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        offset,
        perms: perms.to_owned(),
        dev,
        inode,
        path,
    })
}

/// Reads and parses `/proc/<pid>/maps`.
pub fn read_maps(pid: u32) -> io::Result<Vec<MapEntry>> {
    Ok(parse_maps(&fs::read_to_string(format!(
        "/proc/{pid}/maps"
    ))?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn a_mapping_knows_its_file_and_no_other() {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let maps = read_maps(std::process::id()).unwrap();
        let mine = maps.iter().find(|m| Path::new(&m.path) == exe).unwrap();
        assert!(mine.is_mapped_file(&fs::metadata(&exe).unwrap()));
        // Another file, a directory, a FIFO: not it.
        assert!(!mine.is_mapped_file(&fs::metadata("/proc/self/status").unwrap()));
        assert!(!mine.is_mapped_file(&fs::metadata("/").unwrap()));
    }

    #[test]
    fn parses_maps_lines() {
        let text = "55d0c8a00000-55d0c8a01000 r--p 00000000 fe:01 1234   /usr/bin/python3.11\n\
                    7f00-8f00 rw-p 00000000 00:00 0 \n\
                    7fff0000-7fff1000 r-xp 00001000 fe:01 99  /usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0 (deleted)\n\
                    garbage line\n";
        let m = parse_maps(text);
        assert_eq!(m.len(), 3);
        assert_eq!((m[0].dev, m[0].inode), (libc::makedev(0xfe, 1), 1234));
        assert_eq!(m[0].start, 0x55d0c8a00000);
        assert_eq!(m[0].path, "/usr/bin/python3.11");
        assert!(!m[0].is_exec());
        assert_eq!(m[1].path, "");
        assert!(!m[1].is_file());
        assert!(m[2].is_exec());
        assert!(m[2].is_file());
        assert_eq!(m[2].offset, 0x1000);
        assert_eq!(m[2].file_offset(0x7fff0010), 0x1010);
        assert_eq!(
            m[2].path,
            "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0 (deleted)"
        );
    }

    #[test]
    fn own_maps_are_read() {
        let maps = read_maps(std::process::id()).unwrap();
        assert!(maps.iter().any(MapEntry::is_exec));
    }
}
