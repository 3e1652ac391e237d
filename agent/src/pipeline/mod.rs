//! From kernel events to profiles: the [`engine`] (programs, runtimes, draining), the
//! [`event`] model, [`offcpu`] (off-CPU records → timed intervals) and [`aggregate`] (events →
//! one profile per kind).
pub mod aggregate;
pub mod engine;
pub mod event;
pub mod offcpu;
