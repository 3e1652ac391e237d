//! From kernel events to profiles: the [`engine`] (programs, runtimes, draining), the
//! [`event`] model and [`aggregate`] (events → one profile per kind).
pub mod aggregate;
pub mod engine;
pub mod event;
