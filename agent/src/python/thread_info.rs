//! What the pipeline asks of a Python process's threads: each one's `threading` name (read by
//! `threads.rs` at most once a second per process, and only when a thread is asked for that the
//! last reading did not have) and its Python stack now (where a sleeping thread waits, which no
//! sample shows).
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use super::PythonSupport;
use super::procmem::RemoteMemory as _;
use crate::profile::Frame;

/// How soon the names of one process are read again when an unknown thread is asked for.
const REFRESH: Duration = Duration::from_secs(1);
/// Frames read per thread.
const MAX_FRAMES: usize = 128;
/// glibc x86-64: the kernel thread id in `struct pthread` (`pthread_self()`, which CPython ≤
/// 3.10 keeps as a thread state's only id), used when `threading` does not know the thread.
const GLIBC_PTHREAD_TID: u64 = 0x2d0;

/// The last reading of one process's thread names.
#[derive(Debug)]
pub struct NameReading {
    at: Instant,
    /// tid (as the agent sees it) → name.
    names: HashMap<u32, Arc<str>>,
    /// `threading.get_ident()` → tid (as the agent sees it).
    idents: HashMap<u64, u32>,
    /// The process's own thread ids (its PID namespace's: a container's) → the agent's.
    to_host: HashMap<u32, u32>,
}

/// The last `NSpid:` field of a `/proc/<pid>/task/<tid>/status`: the thread's id in its own
/// PID namespace (the one `threading.get_native_id()` and CPython's thread states report).
pub fn innermost_ns_tid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// The process's thread ids as it sees them → as the agent sees them.
fn namespace_tids(pid: u32) -> HashMap<u32, u32> {
    crate::proc::task_dirs(pid)
        .into_iter()
        .filter_map(|(tid, dir)| {
            let status = std::fs::read_to_string(dir.join("status")).ok()?;
            Some((innermost_ns_tid(&status)?, tid))
        })
        .collect()
}

impl PythonSupport {
    /// The names of `pid`'s threads, read again when older than [`REFRESH`].
    fn names_of(&mut self, pid: u32) -> Option<&NameReading> {
        let stale = self
            .names
            .get(&pid)
            .is_none_or(|r| r.at.elapsed() >= REFRESH);
        if stale {
            // A process without `threading` (or unreadable now) has no names: the kernel's
            // thread names stand in, and it is asked again a second later.
            let list = self.thread_names(pid).unwrap_or_default();
            // In a container the interpreter knows its threads by their ids there.
            let to_host = if list.is_empty() {
                HashMap::new()
            } else {
                namespace_tids(pid)
            };
            let host = |tid: u32| to_host.get(&tid).copied().unwrap_or(tid);
            self.names.insert(
                pid,
                NameReading {
                    at: Instant::now(),
                    names: list
                        .iter()
                        .map(|t| (host(t.tid), t.name.as_str().into()))
                        .collect(),
                    idents: list.iter().map(|t| (t.ident, host(t.tid))).collect(),
                    to_host,
                },
            );
        }
        self.names.get(&pid)
    }

    /// The `threading.Thread.name` of thread `tid` of Python process `pid`.
    pub fn thread_name(&mut self, pid: u32, tid: u32) -> Option<Arc<str>> {
        if let Some(n) = self.names.get(&pid).and_then(|r| r.names.get(&tid)) {
            return Some(n.clone());
        }
        // Asked for every new stack of every process: others than Python's cost one lookup.
        if !super::lock(&self.inner).procs.contains_key(&pid) {
            return None;
        }
        self.names_of(pid)?.names.get(&tid).cloned()
    }

    /// The Python stack of thread `tid` of `pid` now (innermost first). CPython 3.11+ thread
    /// states carry the kernel thread id; older ones are matched through `threading`'s idents,
    /// else glibc's thread descriptor.
    pub fn thread_stack(&mut self, pid: u32, tid: u32) -> Option<Vec<Frame>> {
        let proc_ = self.process(pid)?;
        let threads = proc_.walk_all_threads(MAX_FRAMES).ok()?;
        let (idents, to_host) = self
            .names_of(pid)
            .map(|r| (r.idents.clone(), r.to_host.clone()))
            .unwrap_or_default();
        let host = |ns_tid: u32| to_host.get(&ns_tid).copied().unwrap_or(ns_tid);
        let t = threads.iter().find(|t| match t.native_tid {
            Some(n) => host(n) == tid,
            None => {
                idents.get(&t.thread_id) == Some(&tid)
                    || proc_
                        .mem
                        .read_u32(t.thread_id.wrapping_add(GLIBC_PTHREAD_TID))
                        .is_ok_and(|n| host(n) == tid)
            }
        })?;
        Some(t.frames.iter().map(|f| self.symbolize(pid, f)).collect())
    }

    /// Forgets the names read of `pid`.
    pub fn forget_names(&mut self, pid: u32) {
        self.names.remove(&pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_threads_id_in_its_own_namespace_is_the_last_nspid_field() {
        let status = "Name:\tpython3\nTgid:\t4242\nNSpid:\t4250\t7\nPPid:\t1\n";
        assert_eq!(innermost_ns_tid(status), Some(7));
        assert_eq!(innermost_ns_tid("NSpid:\t99\n"), Some(99));
        assert_eq!(innermost_ns_tid("Name:\tx\n"), None);
        // This process: one namespace level, the same id.
        let me = std::process::id();
        assert_eq!(namespace_tids(me).get(&me), Some(&me));
    }
}
