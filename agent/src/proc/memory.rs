//! How much memory a process and its container hold, as the kernel counts it: the process's
//! resident set split into anonymous, file-backed and shared memory (`/proc/<pid>/status`),
//! whether one page is still resident (`/proc/<pid>/pagemap`), and the memory cgroup's usage,
//! limit and OOM kills (v2 or v1).
use std::{
    fs::{self, File},
    io,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
};

/// A process's resident memory in bytes (`/proc/<pid>/status`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ResidentMemory {
    /// `VmRSS`: everything resident.
    pub rss: u64,
    /// `RssAnon`: anonymous memory (the heaps, arenas, stacks, large buffers).
    pub anon: u64,
    /// `RssFile`: mapped files (code, data files).
    pub file: u64,
    /// `RssShmem`: shared memory.
    pub shmem: u64,
}

/// The resident memory of `pid` (`None`: gone, or a kernel thread).
pub fn resident(pid: u32) -> Option<ResidentMemory> {
    parse_status(&fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// Parses the `Vm*`/`Rss*` lines of a `status` file (kB) into bytes.
pub fn parse_status(text: &str) -> Option<ResidentMemory> {
    let mut m = ResidentMemory::default();
    let mut seen = false;
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let field = match name {
            "VmRSS" => &mut m.rss,
            "RssAnon" => &mut m.anon,
            "RssFile" => &mut m.file,
            "RssShmem" => &mut m.shmem,
            _ => continue,
        };
        let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        *field = kb.saturating_mul(1024);
        seen = true;
    }
    seen.then_some(m)
}

/// The parent of `pid` (`PPid` in `/proc/<pid>/status`).
pub fn parent(pid: u32) -> Option<u32> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// A process's proportional share of its anonymous memory (`Pss_Anon` of
/// `/proc/<pid>/smaps_rollup`, bytes): pages shared copy-on-write with a parent or siblings
/// count a share each. Walks the process's page tables: read once a window, only for
/// processes that share.
pub fn pss_anon(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss_Anon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb.saturating_mul(1024))
}

/// A process's `pagemap`: which of its pages are resident or swapped (the page frame numbers,
/// which need CAP_SYS_ADMIN, are not used).
pub struct PageMap(File);

impl PageMap {
    pub fn open(pid: u32) -> io::Result<PageMap> {
        File::open(format!("/proc/{pid}/pagemap")).map(PageMap)
    }

    /// Whether the page holding `addr` is in memory or swapped out: allocated, not given back.
    pub fn is_held(&self, addr: u64) -> io::Result<bool> {
        const PRESENT: u64 = 1 << 63;
        const SWAPPED: u64 = 1 << 62;
        let mut entry = [0u8; 8];
        let at = (addr / kprof_common::PAGE_BYTES).saturating_mul(8);
        self.0.read_exact_at(&mut entry, at)?;
        Ok(u64::from_ne_bytes(entry) & (PRESENT | SWAPPED) != 0)
    }
}

/// A memory cgroup's figures, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CgroupMemory {
    /// Memory charged to the cgroup now (v2 `memory.current`, v1 `memory.usage_in_bytes`).
    pub usage: u64,
    /// Its limit (`None`: unlimited).
    pub limit: Option<u64>,
    /// Processes the kernel's OOM killer killed in it so far.
    pub oom_kills: u64,
}

/// Where the node's cgroup file systems are: where the operator mounts the node's (read-only)
/// in the agent's pod, whose own `/sys/fs/cgroup` shows only its own cgroup; else, as on the
/// host, `/sys/fs/cgroup`.
pub const CGROUP_ROOTS: [&str; 2] = ["/host/sys/fs/cgroup", "/sys/fs/cgroup"];

/// The directory of the memory cgroup of `pid`, v2 first, under the first of `roots` (where
/// cgroup file systems are mounted) that has it. `None`: not found or not readable.
pub fn cgroup_dir(pid: u32, roots: &[PathBuf]) -> Option<PathBuf> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    roots
        .iter()
        .flat_map(|root| cgroup_dirs(&text, root))
        .find(|dir| read_cgroup(dir).is_some())
}

/// Where the memory cgroup of a `/proc/<pid>/cgroup` text may be: the v2 path (at `root` or
/// its `unified` mount) and the v1 `memory` controller's.
fn cgroup_dirs(text: &str, root: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() {
            for base in [root.to_owned(), root.join("unified")] {
                dirs.extend(under(&base, rel));
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            dirs.extend(under(&root.join("memory"), rel));
        }
    }
    dirs
}

/// Where the cgroup `rel` (as `/proc/<pid>/cgroup` names it) may be under the hierarchy at
/// `base`. An agent in a private cgroup namespace (a pod on cgroup v2) sees other cgroups as
/// `../../kubepods-…/…`, relative to its own, whose place it cannot see: the rest after the
/// `..`s is looked for at the top and one and two levels down (`kubepods.slice/…`).
fn under(base: &Path, rel: &str) -> Vec<PathBuf> {
    let rest = rel.trim_start_matches("../").trim_start_matches("..");
    if rest.len() == rel.len() {
        return vec![base.join(rel)];
    }
    if rest.is_empty() || rest.split('/').any(|c| c == "..") {
        return Vec::new();
    }
    let subdirs = |dir: &Path| -> Vec<PathBuf> {
        fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect()
    };
    let mut bases = vec![base.to_owned()];
    for child in subdirs(base) {
        bases.extend(subdirs(&child));
        bases.push(child);
    }
    bases
        .into_iter()
        .map(|b| b.join(rest))
        .filter(|d| d.is_dir())
        .collect()
}

/// The figures of the memory cgroup at `dir` (v2 or v1 files).
pub fn read_cgroup(dir: &Path) -> Option<CgroupMemory> {
    let read = |name: &str| fs::read_to_string(dir.join(name)).ok();
    let number = |s: Option<String>| s.and_then(|s| s.trim().parse::<u64>().ok());
    let oom_kills = |text: Option<String>| {
        text.and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
        })
        .unwrap_or(0)
    };
    if let Some(usage) = number(read("memory.current")) {
        let limit = read("memory.max").and_then(|s| s.trim().parse().ok());
        return Some(CgroupMemory {
            usage,
            limit,
            oom_kills: oom_kills(read("memory.events")),
        });
    }
    let usage = number(read("memory.usage_in_bytes"))?;
    // v1 says "unlimited" with a huge page-aligned number.
    let limit = number(read("memory.limit_in_bytes")).filter(|&l| l < (1 << 60));
    Some(CgroupMemory {
        usage,
        limit,
        oom_kills: oom_kills(read("memory.oom_control")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_figures_are_bytes() {
        let text = "Name:\tpython3\nVmPeak:\t  99 kB\nVmRSS:\t   12000 kB\nRssAnon:\t    8000 kB\n\
                    RssFile:\t    3900 kB\nRssShmem:\t     100 kB\nThreads:\t1\n";
        assert_eq!(
            parse_status(text),
            Some(ResidentMemory {
                rss: 12000 << 10,
                anon: 8000 << 10,
                file: 3900 << 10,
                shmem: 100 << 10,
            })
        );
        assert_eq!(parse_status("Name:\tkthreadd\n"), None);
        assert_eq!(parse_status("VmRSS:\tlots kB\n"), None);
    }

    #[test]
    fn our_own_memory_and_pages_are_read() {
        let me = resident(std::process::id()).expect("our own status");
        assert!(me.rss > 0 && me.anon > 0 && me.rss >= me.anon);
        let pages = PageMap::open(std::process::id()).unwrap();
        let touched = vec![7u8; 1 << 20];
        assert!(pages.is_held(touched.as_ptr() as u64).unwrap());
        // The zero page is never mapped.
        assert!(!pages.is_held(0).unwrap());
    }

    #[test]
    fn cgroups_v2_and_v1_are_found_and_read() {
        let root = tempfile::tempdir().unwrap();
        let v2 = root.path().join("kubepods/pod1/c1");
        fs::create_dir_all(&v2).unwrap();
        fs::write(v2.join("memory.current"), "1048576\n").unwrap();
        fs::write(v2.join("memory.max"), "max\n").unwrap();
        fs::write(
            v2.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n",
        )
        .unwrap();
        let text = "0::/kubepods/pod1/c1\n";
        let dirs = cgroup_dirs(text, root.path());
        let m = dirs.iter().find_map(|d| read_cgroup(d)).unwrap();
        assert_eq!(
            m,
            CgroupMemory {
                usage: 1 << 20,
                limit: None,
                oom_kills: 2
            }
        );
        let v1 = root.path().join("memory/docker/abc");
        fs::create_dir_all(&v1).unwrap();
        fs::write(v1.join("memory.usage_in_bytes"), "4096\n").unwrap();
        fs::write(v1.join("memory.limit_in_bytes"), "536870912\n").unwrap();
        fs::write(
            v1.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
        )
        .unwrap();
        // Seen from a private cgroup namespace (an agent in a pod on cgroup v2): relative to
        // the agent's own cgroup, found one or two levels down.
        let deep = root.path().join("kubepods.slice/besteffort.slice/pod2/c2");
        fs::create_dir_all(&deep).unwrap();
        fs::write(deep.join("memory.current"), "8192\n").unwrap();
        let text = "0::/../../../besteffort.slice/pod2/c2\n";
        let m = cgroup_dirs(text, root.path())
            .iter()
            .find_map(|d| read_cgroup(d))
            .unwrap();
        assert_eq!(m.usage, 8192);
        assert!(cgroup_dirs("0::/../../../../..\n", root.path()).is_empty());
        assert!(cgroup_dirs("0::/../x/../../etc\n", root.path()).is_empty());
        let text = "4:memory:/docker/abc\n0::/\n";
        let m = cgroup_dirs(text, root.path())
            .iter()
            .find_map(|d| read_cgroup(d))
            .unwrap();
        assert_eq!(
            m,
            CgroupMemory {
                usage: 4096,
                limit: Some(512 << 20),
                oom_kills: 1
            }
        );
    }
}
