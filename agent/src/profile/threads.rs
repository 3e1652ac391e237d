//! What a threads profile reports besides its samples: per process, how many threads there
//! were over the window and what each did; the idle ones and the leaks.
use std::{collections::BTreeMap, sync::Arc};

use super::Frame;

/// The thread counts of one process over a window.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ThreadCounts {
    /// Alive when the window started (or when the process was first seen in it).
    pub start: u32,
    /// Alive when the window ended.
    pub end: u32,
    pub min: u32,
    pub max: u32,
    /// Created and exited during the window.
    pub created: u32,
    pub exited: u32,
    /// (CLOCK_MONOTONIC ns, threads alive), counted about every second and at the end.
    pub series: Vec<(u64, u32)>,
}

/// One thread in a window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadRow {
    pub pid: u32,
    pub tid: u32,
    /// The Python name (`threading.Thread.name`) where known, else the kernel's.
    pub name: Arc<str>,
    /// CPU and off-CPU nanoseconds in the window (off = alive in the window − CPU).
    pub cpu_ns: u64,
    pub off_cpu_ns: u64,
    /// State at the window's end (`R`, `S`, `D`, ...; `X`: exited in the window).
    pub state: char,
    /// Created in the window.
    pub created: bool,
    /// Alive at the window's end.
    pub alive: bool,
    /// The stack that created it (Python and native, innermost first); `None`: created
    /// before it was profiled.
    pub creator: Option<Arc<[Frame]>>,
}

/// A thread alive for longer than a window with (almost) no CPU since it was created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdleThread {
    pub pid: u32,
    pub tid: u32,
    pub name: Arc<str>,
    /// Seconds since it was created.
    pub age_s: u64,
    /// CPU nanoseconds in its whole life.
    pub cpu_ns: u64,
    /// Where it is blocked: its Python stack (innermost first) where the interpreter could be
    /// read, else the syscall it sleeps in.
    pub blocked_in: Vec<Frame>,
    pub creator: Option<Arc<[Frame]>>,
}

/// A process whose thread count grows steadily.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadLeak {
    pub pid: u32,
    /// The counts the verdict was taken on, oldest first.
    pub counts: Vec<u32>,
    /// The stack that created most of the threads still alive that were created while the
    /// count grew.
    pub creator: Option<Arc<[Frame]>>,
    /// How many of those it created.
    pub by_creator: u32,
}

impl ThreadLeak {
    /// The warning put on the process's profiles.
    pub fn message(&self) -> String {
        let first = self.counts.first().copied().unwrap_or(0);
        let last = self.counts.last().copied().unwrap_or(0);
        let creator = self
            .creator
            .as_deref()
            .map(creator_name)
            .unwrap_or_else(|| "an unknown stack".into());
        format!(
            "pid {}: thread leak suspected: its threads grew steadily from {first} to {last}; \
             {} of the new ones still alive were created by {creator}",
            self.pid, self.by_creator
        )
    }
}

/// Who created a thread, for people: the leaf of its creation site ([`creation_site`]), e.g.
/// `app.spawn (/srv/app.py:3)`.
pub fn creator_name(stack: &[Frame]) -> String {
    creation_site(stack)
        .first()
        .map_or_else(|| "an unknown stack".into(), ToString::to_string)
}

/// Everything a threads profile says beyond its samples.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ThreadReport {
    pub processes: BTreeMap<u32, ThreadCounts>,
    /// Every thread alive at some point of the window, by (pid, tid).
    pub threads: Vec<ThreadRow>,
    pub idle: Vec<IdleThread>,
    pub leaks: Vec<ThreadLeak>,
}

impl ThreadReport {
    /// The counts of all processes together (a container's Profile).
    pub fn total(&self) -> ThreadCounts {
        let mut t = ThreadCounts::default();
        for c in self.processes.values() {
            t.start += c.start;
            t.end += c.end;
            t.min += c.min;
            t.max += c.max;
            t.created += c.created;
            t.exited += c.exited;
        }
        t
    }

    /// The part of the report about `pids`.
    pub fn only(&self, pids: &std::collections::BTreeSet<u32>) -> ThreadReport {
        ThreadReport {
            processes: self
                .processes
                .iter()
                .filter(|(p, _)| pids.contains(p))
                .map(|(p, c)| (*p, c.clone()))
                .collect(),
            threads: super::items_of_pids(&self.threads, pids, |t| t.pid),
            idle: super::items_of_pids(&self.idle, pids, |t| t.pid),
            leaks: super::items_of_pids(&self.leaks, pids, |l| l.pid),
        }
    }
}

/// The frame of threads whose creation was not seen (they existed before profiling began).
pub const CREATED_BEFORE: &str = "[created before profiling]";

/// The part of a creating stack that says who created the thread: inner frames of the thread
/// library (native frames under Python code, Python frames of the standard library) are cut,
/// so the leaf of a threads profile is the code that asked for the thread.
pub fn creation_site(stack: &[Frame]) -> Arc<[Frame]> {
    let has_python = stack.iter().any(|f| f.kind == super::FrameKind::Python);
    let library = |f: &Frame| {
        (has_python && f.kind != super::FrameKind::Python)
            || f.file
                .as_deref()
                .is_some_and(|p| p.contains("/lib/python3"))
    };
    let cut = stack.iter().position(|f| !library(f)).unwrap_or(0);
    stack[cut..].into()
}

impl super::AggregatedProfile {
    /// Fills a threads profile from its report: one sample per thread created in the window
    /// or alive at its end, keyed by the stack that created it; leaks become warnings.
    pub fn add_threads(&mut self, report: ThreadReport) {
        let before: Arc<[Frame]> =
            vec![Frame::new(super::FrameKind::Native, CREATED_BEFORE)].into();
        for r in &report.threads {
            if !r.created && !r.alive {
                continue;
            }
            let stack = r
                .creator
                .as_deref()
                .map_or_else(|| before.clone(), creation_site);
            let key = super::SampleKey {
                pid: r.pid,
                tid: r.tid,
                thread: r.name.clone(),
                wait: None,
                gil_held: None,
                stack,
            };
            self.add_value(key, u64::from(r.created), u64::from(r.alive));
        }
        for leak in &report.leaks {
            let w = leak.message();
            if !self.warnings.contains(&w) {
                self.warnings.push(w);
            }
        }
        self.threads = Some(report);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::FrameKind;

    fn py(name: &str, file: &str) -> Frame {
        let mut f = Frame::new(FrameKind::Python, name);
        f.file = Some(file.into());
        f.line = 3;
        f
    }

    #[test]
    fn the_creation_site_is_the_application_code_that_asked_for_the_thread() {
        let stack = vec![
            Frame::new(FrameKind::Native, "clone3"),
            Frame::new(FrameKind::Native, "pthread_create"),
            py("threading.Thread.start", "/usr/lib/python3.12/threading.py"),
            py("app.spawn", "/srv/app.py"),
            py("app.main", "/srv/app.py"),
        ];
        let site = creation_site(&stack);
        assert_eq!(site.len(), 2);
        assert_eq!(&*site[0].function, "app.spawn");
        assert_eq!(creator_name(&stack), "app.spawn (/srv/app.py:3)");
        // A native program keeps its whole stack.
        let native = vec![
            Frame::new(FrameKind::Native, "clone3"),
            Frame::new(FrameKind::Native, "main"),
        ];
        assert_eq!(creation_site(&native).len(), 2);
    }
}
