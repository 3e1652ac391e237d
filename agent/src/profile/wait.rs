//! How a thread spends time off CPU: its scheduler state and the class of what it waits for,
//! decided once from the off-CPU source's wait word (state, syscall, first argument) and the
//! process's GIL address range. Every profile type labels waits with these names.
use std::ops::Range;

use kprof_common::wait as w;

/// The thread's scheduler state over an interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ThreadState {
    /// On CPU.
    Running,
    /// Ready to run but waiting for a CPU (preempted, or yielded).
    Runnable,
    /// Interruptible sleep (`S`).
    Sleeping,
    /// Uninterruptible sleep (`D`), usually disk I/O.
    DiskWait,
}

impl ThreadState {
    /// The `state` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ThreadState::Running => "running",
            ThreadState::Runnable => "runnable",
            ThreadState::Sleeping => "sleeping",
            ThreadState::DiskWait => "disk-wait",
        }
    }
}

/// What a sleeping thread waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WaitClass {
    /// A futex inside the interpreter's GIL: waiting to run Python code.
    Gil,
    /// Any other futex: a lock, a condition, a queue, an event.
    Lock,
    /// Reads, writes, sockets, polling for I/O, disk.
    Io,
    /// A timed sleep (`time.sleep`, `nanosleep`, `select` on no descriptors).
    Sleep,
    /// Anything else (waiting for a child, a signal, ...).
    Other,
}

impl WaitClass {
    /// The `wait_class` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            WaitClass::Gil => "gil",
            WaitClass::Lock => "lock",
            WaitClass::Io => "io",
            WaitClass::Sleep => "sleep",
            WaitClass::Other => "other",
        }
    }
}

/// One interval's labels: the state, the wait class (sleeping and disk waits only) and, for a
/// lock wait, the lock's address (a futex word: for `threading.Lock` on CPython ≤ 3.12 its
/// semaphore, the same for every waiter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Wait {
    pub state: ThreadState,
    pub class: Option<WaitClass>,
    pub lock: Option<u64>,
}

impl Wait {
    /// Time on CPU.
    pub const RUNNING: Wait = Wait {
        state: ThreadState::Running,
        class: None,
        lock: None,
    };

    /// Classifies an off-CPU interval from its wait word and syscall argument; `gil` is the
    /// byte range of the process's GIL structure, when known.
    pub fn classify(word: u32, arg0: u64, gil: Option<&Range<u64>>) -> Wait {
        let state = match word & w::STATE_MASK {
            w::STATE_RUNNABLE => ThreadState::Runnable,
            w::STATE_DISK => ThreadState::DiskWait,
            _ => ThreadState::Sleeping,
        };
        let mut lock = None;
        let class = match state {
            ThreadState::Running | ThreadState::Runnable => None,
            ThreadState::DiskWait => Some(WaitClass::Io),
            ThreadState::Sleeping => Some(match w::syscall(word) {
                Some(w::SYS_FUTEX) if gil.is_some_and(|g| g.contains(&arg0)) => WaitClass::Gil,
                Some(w::SYS_FUTEX) => {
                    lock = Some(arg0);
                    WaitClass::Lock
                }
                Some(nr) => syscall_class(nr, arg0),
                None => WaitClass::Other,
            }),
        };
        Wait { state, class, lock }
    }
}

/// The class of a sleep in syscall `nr` (x86-64 numbers) with first argument `arg0`.
fn syscall_class(nr: u32, arg0: u64) -> WaitClass {
    match nr {
        // nanosleep, pause, clock_nanosleep
        35 | 34 | 230 => WaitClass::Sleep,
        // select / pselect6 on no descriptors: how CPython ≤ 3.10 sleeps
        23 | 270 if arg0 == 0 => WaitClass::Sleep,
        // read, write, poll, readv, writev, pread64, pwrite64, select, connect, accept,
        // sendto, recvfrom, sendmsg, recvmsg, epoll_wait, pselect6, ppoll, splice, sendfile,
        // epoll_pwait, accept4, preadv, pwritev, recvmmsg, sendmmsg, io_uring_enter,
        // epoll_pwait2, io_getevents, fsync, fdatasync, sync_file_range, flock
        0 | 1 | 7 | 19 | 20 | 17 | 18 | 23 | 42 | 43 | 44 | 45 | 46 | 47 | 232 | 270 | 271
        | 275 | 40 | 281 | 288 | 295 | 296 | 299 | 307 | 426 | 441 | 208 | 74 | 75 | 277 | 73 => {
            WaitClass::Io
        }
        _ => WaitClass::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeping_in(nr: u32) -> u32 {
        w::of(1, Some(nr))
    }

    #[test]
    fn states_and_classes() {
        let runnable = Wait::classify(w::of(0, None), 0, None);
        assert_eq!(
            (runnable.state, runnable.class),
            (ThreadState::Runnable, None)
        );
        let disk = Wait::classify(w::of(2, Some(0)), 3, None);
        assert_eq!(
            (disk.state, disk.class),
            (ThreadState::DiskWait, Some(WaitClass::Io))
        );
        let c = |nr, arg0| Wait::classify(sleeping_in(nr), arg0, None).class.unwrap();
        assert_eq!(c(230, 1), WaitClass::Sleep);
        assert_eq!(c(23, 0), WaitClass::Sleep, "select on nothing is a sleep");
        assert_eq!(
            c(23, 5),
            WaitClass::Io,
            "select on descriptors waits for I/O"
        );
        assert_eq!(c(0, 3), WaitClass::Io);
        assert_eq!(c(61, 0), WaitClass::Other, "wait4");
        assert_eq!(
            Wait::classify(w::of(1, None), 0, None).class,
            Some(WaitClass::Other)
        );
    }

    #[test]
    fn a_futex_inside_the_gil_is_a_gil_wait_any_other_a_lock_with_its_address() {
        let gil = 0x7000..0x7100;
        let futex = sleeping_in(w::SYS_FUTEX);
        let g = Wait::classify(futex, 0x7040, Some(&gil));
        assert_eq!((g.class, g.lock), (Some(WaitClass::Gil), None));
        let l = Wait::classify(futex, 0x9000, Some(&gil));
        assert_eq!((l.class, l.lock), (Some(WaitClass::Lock), Some(0x9000)));
        let unknown_gil = Wait::classify(futex, 0x7040, None);
        assert_eq!(unknown_gil.class, Some(WaitClass::Lock));
    }
}
