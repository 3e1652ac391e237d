//! From kernel events to profiles: the [`engine`] (programs, runtimes, draining), the
//! [`event`] model, [`offcpu`] (off-CPU records → timed intervals), [`threads`] (thread
//! creations and exits → counts, creating stacks, idle threads, leaks), [`memory`] (sampled
//! page faults → bytes touched and held by stack, heap usage, leaks) and [`aggregate`]
//! (events → one profile per kind).
pub mod aggregate;
pub mod engine;
pub mod event;
pub mod memory;
pub mod offcpu;
pub mod threads;
