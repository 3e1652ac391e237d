//! What the agent reads of a process under `/proc/<pid>`: its mappings ([`maps`]), its
//! container ([`cgroup`]), its name and the identity of its executable.
pub mod cgroup;
pub mod maps;

use std::{fs, os::unix::fs::MetadataExt as _, time::Duration};

/// The process's name (`/proc/<pid>/comm`; empty once it exited).
pub fn name(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_default()
}

/// Identity (device, inode) of the process's executable: it changes when the process `exec`s
/// another program. `None` once the process exited.
pub fn exe_identity(pid: u32) -> Option<(u64, u64)> {
    fs::metadata(format!("/proc/{pid}/exe"))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// A thread's name (`comm`), NUL padded like the kernel's (zeros once it exited).
pub fn thread_comm(pid: u32, tid: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    if let Ok(s) = fs::read(format!("/proc/{pid}/task/{tid}/comm")) {
        let s = s.strip_suffix(b"\n").unwrap_or(&s);
        let n = s.len().min(15);
        out[..n].copy_from_slice(&s[..n]);
    }
    out
}

/// Whether thread `tid` of process `pid` still exists.
pub fn thread_exists(pid: u32, tid: u32) -> bool {
    fs::metadata(format!("/proc/{pid}/task/{tid}")).is_ok()
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of the kernel's event timestamps
/// (`bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    // SAFETY: clock_gettime fills a zeroed struct.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// This process's CPU time (user + system) and peak RSS in KiB.
pub fn self_usage() -> (Duration, u64) {
    // SAFETY: getrusage fills a zeroed struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    (tv(ru.ru_utime) + tv(ru.ru_stime), ru.ru_maxrss as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_threads() {
        let pid = std::process::id();
        let tid = unsafe { libc::gettid() } as u32;
        assert!(thread_exists(pid, tid));
        assert!(!thread_exists(pid, u32::MAX - 1));
        assert_ne!(thread_comm(pid, tid)[0], 0);
        assert!(monotonic_ns() > 0);
    }

    #[test]
    fn own_name_and_executable() {
        let me = std::process::id();
        assert!(!name(me).is_empty());
        assert!(exe_identity(me).is_some());
        assert_eq!(exe_identity(u32::MAX - 3), None);
        assert_eq!(name(u32::MAX - 3), "");
    }
}
