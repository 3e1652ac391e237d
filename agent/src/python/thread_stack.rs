//! Where a Python thread is: its Python stack now, read from the interpreter (the stack a
//! sleeping thread waits in, which no sample shows).
use super::PythonSupport;
use crate::profile::Frame;

/// Frames read per thread.
const MAX_FRAMES: usize = 128;
/// glibc x86-64: the kernel thread id in `struct pthread` (`pthread_self()`, which CPython ≤
/// 3.10 keeps as a thread state's only id).
const GLIBC_PTHREAD_TID: u64 = 0x2d0;

impl PythonSupport {
    /// The Python stack of thread `tid` of `pid` now (innermost first). CPython 3.11+ thread
    /// states carry the kernel thread id; older ones are matched through glibc's thread
    /// descriptor.
    pub fn thread_stack(&mut self, pid: u32, tid: u32) -> Option<Vec<Frame>> {
        let proc_ = self.process(pid)?;
        let threads = proc_.walk_all_threads(MAX_FRAMES).ok()?;
        let t = threads.iter().find(|t| match t.native_tid {
            Some(n) => n == tid,
            None => proc_
                .mem
                .read_u32(t.thread_id.wrapping_add(GLIBC_PTHREAD_TID))
                .is_ok_and(|n| n == tid),
        })?;
        Some(t.frames.iter().map(|f| self.symbolize(pid, f)).collect())
    }
}
