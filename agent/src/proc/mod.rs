//! What the agent reads of a process under `/proc/<pid>`: its mappings ([`maps`]), its
//! container ([`cgroup`]), its memory ([`memory`]), its files ([`files`]), its name and the
//! identity of its executable.
pub mod cgroup;
pub mod files;
pub mod maps;
pub mod memory;
pub mod threads;

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

/// A sleeping thread as `/proc/<pid>/task/<tid>` tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SleepingThread {
    pub tid: u32,
    /// The kernel's state bits: 1 interruptible (`S`), 2 uninterruptible (`D`).
    pub state: u32,
    /// The syscall it sleeps in and its first argument (`/proc/.../syscall`; needs ptrace
    /// access), when known.
    pub syscall: Option<(u32, u64)>,
    pub comm: [u8; 16],
}

/// The thread ids of `pid` now and their `/proc/<pid>/task/<tid>` directories (empty once it
/// exited).
pub fn task_dirs(pid: u32) -> Vec<(u32, std::path::PathBuf)> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let tid = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((tid, e.path()))
        })
        .collect()
}

/// The threads of `pid`, except `skip`, that sleep now (`S` or `D`).
pub fn sleeping_threads(pid: u32, skip: impl Fn(u32) -> bool) -> Vec<SleepingThread> {
    let mut out = Vec::new();
    for (tid, path) in task_dirs(pid) {
        if skip(tid) {
            continue;
        }
        let Ok(stat) = fs::read_to_string(path.join("stat")) else {
            continue;
        };
        let state = match threads::parse_stat(&stat).map(|s| s.0) {
            Some('S') => 1,
            Some('D') => 2,
            _ => continue,
        };
        let syscall = fs::read_to_string(path.join("syscall"))
            .ok()
            .and_then(|s| parse_syscall(&s));
        out.push(SleepingThread {
            tid,
            state,
            syscall,
            comm: thread_comm(pid, tid),
        });
    }
    out
}

/// `/proc/<pid>/task/<tid>/syscall`: `nr arg0 …` (hex arguments) of a thread in a syscall;
/// `-1 …` or `running` otherwise.
fn parse_syscall(s: &str) -> Option<(u32, u64)> {
    let mut it = s.split_whitespace();
    let nr: u32 = it.next()?.parse().ok()?;
    let arg0 = u64::from_str_radix(it.next()?.trim_start_matches("0x"), 16).ok()?;
    Some((nr, arg0))
}

/// The syscall thread `tid` of `pid` is in and its first argument (needs ptrace access).
pub fn thread_syscall(pid: u32, tid: u32) -> Option<(u32, u64)> {
    fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall"))
        .ok()
        .and_then(|s| parse_syscall(&s))
}

/// Whether process `pid` still exists.
pub fn is_alive(pid: u32) -> bool {
    fs::metadata(format!("/proc/{pid}")).is_ok()
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
    fn syscall_lines() {
        assert_eq!(
            parse_syscall("202 0x7f00aa10 0x80 0x0 0x0 0x0 0x0 0x7ffd 0x7f01\n"),
            Some((202, 0x7f00aa10))
        );
        assert_eq!(parse_syscall("-1 0x7ffd 0x7f01\n"), None);
        assert_eq!(parse_syscall("running\n"), None);
    }

    #[test]
    fn a_sleeping_thread_is_listed_with_its_syscall() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let h = std::thread::spawn(move || {
            tid_tx.send(unsafe { libc::gettid() } as u32).unwrap();
            rx.recv().ok();
        });
        let tid = tid_rx.recv().unwrap();
        let me = std::process::id();
        // Until the thread is asleep in its receive (it just started).
        let mut found = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            found = sleeping_threads(me, |t| t != tid);
            if !found.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        tx.send(()).unwrap();
        h.join().unwrap();
        let [t] = found.as_slice() else {
            panic!("{found:?}")
        };
        assert_eq!((t.tid, t.state), (tid, 1));
        // `.../syscall` of one's own threads is readable; a channel receive sleeps in futex(2).
        assert_eq!(t.syscall.map(|s| s.0), Some(202), "{t:?}");
    }

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
