//! pid → container id on the host: scans `/proc/*/cgroup` with the cgroup path parser
//! ([`crate::proc::cgroup`]) and caches the answer per pid (including "not in a container"), so a
//! rescan only reads the cgroup file of processes it has not seen before.
//!
//! Only thread-group leaders are listed in `/proc`, so every pid found is a process. A pid that
//! disappears from `/proc` is dropped from the cache on the next scan; a pid reused between two
//! scans (seconds apart) keeps its old answer until it exits — accepted, as the kernel hands out
//! pids sequentially.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    path::PathBuf,
};

use crate::proc::cgroup;

/// Resolves host pids to container ids.
pub struct Resolver {
    proc_root: PathBuf,
    /// pid → container id (`None`: not in a container, or unreadable).
    cache: HashMap<u32, Option<String>>,
}

impl Default for Resolver {
    fn default() -> Self {
        Self::new()
    }
}

impl Resolver {
    pub fn new() -> Self {
        Self::with_proc_root("/proc")
    }

    /// A resolver over another `/proc` (tests).
    pub fn with_proc_root(root: impl Into<PathBuf>) -> Self {
        Resolver {
            proc_root: root.into(),
            cache: HashMap::new(),
        }
    }

    /// The container id of one pid (cached).
    pub fn container_of(&mut self, pid: u32) -> Option<String> {
        if let Some(c) = self.cache.get(&pid) {
            return c.clone();
        }
        let c = self.read(pid);
        self.cache.insert(pid, c.clone());
        c
    }

    fn read(&self, pid: u32) -> Option<String> {
        let text = fs::read_to_string(self.proc_root.join(pid.to_string()).join("cgroup")).ok()?;
        cgroup::parse_proc_cgroup(&text).map(|c| c.id)
    }

    /// Forgets a pid (it exited).
    pub fn forget(&mut self, pid: u32) {
        self.cache.remove(&pid);
    }

    /// Scans every process and returns the pids of each wanted container id.
    pub fn scan(&mut self, wanted: &BTreeSet<String>) -> BTreeMap<String, BTreeSet<u32>> {
        let mut out: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
        let Ok(dir) = fs::read_dir(&self.proc_root) else {
            return out;
        };
        let mut live = BTreeSet::new();
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            live.insert(pid);
            if let Some(id) = self.container_of(pid)
                && wanted.contains(&id)
            {
                out.entry(id).or_default().insert(pid);
            }
        }
        self.cache.retain(|pid, _| live.contains(pid));
        out
    }

    /// Cached pids (for tests and metrics).
    pub fn cached(&self) -> usize {
        self.cache.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn proc_entry(root: &std::path::Path, pid: u32, cgroup: &str) {
        let d = root.join(pid.to_string());
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("cgroup"), cgroup).unwrap();
    }

    #[test]
    fn scan_maps_container_ids_to_pids_and_caches() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        proc_entry(
            root,
            10,
            &format!("0::/kubepods/besteffort/pod0d2b8f8e-1c3a-4b5d-9e7f-a1b2c3d4e5f6/{A}\n"),
        );
        proc_entry(
            root,
            11,
            &format!(
                "0::/system.slice/containerd.service/kubepods-pod1.slice:cri-containerd:{A}\n4:memory:/kubepods/cri-containerd-{A}.scope\n"
            ),
        );
        proc_entry(
            root,
            12,
            &format!("0::/kubepods.slice/cri-containerd-{B}.scope\n"),
        );
        proc_entry(root, 13, "0::/user.slice\n");
        fs::create_dir_all(root.join("self")).unwrap();
        let mut r = Resolver::with_proc_root(root);
        let wanted: BTreeSet<String> = [A.to_owned()].into();
        let got = r.scan(&wanted);
        assert_eq!(got.len(), 1);
        assert_eq!(got[A], BTreeSet::from([10, 11]));
        assert_eq!(r.cached(), 4, "negative answers are cached too");
        assert_eq!(r.container_of(12).as_deref(), Some(B));

        // A process exits: dropped from the cache; a new one is found on the next scan.
        fs::remove_dir_all(root.join("10")).unwrap();
        proc_entry(
            root,
            20,
            &format!("0::/kubepods.slice/cri-containerd-{A}.scope\n"),
        );
        let got = r.scan(&wanted);
        assert_eq!(got[A], BTreeSet::from([11, 20]));
        assert_eq!(r.cached(), 4);
    }

    #[test]
    fn this_process_is_not_in_a_wanted_container() {
        let mut r = Resolver::new();
        let wanted: BTreeSet<String> = [A.to_owned()].into();
        assert!(r.scan(&wanted).is_empty());
        assert!(r.cached() > 0);
    }
}
