//! kprof node agent: an eBPF sampler (kernel, native and Python stacks) with symbolization,
//! aggregation and pprof / flame graph / top-table output.
//!
//! One module per job, from the kernel up: `kernel` (eBPF load/attach, the sampling clock, BTF),
//! `proc` (what is read of a process: maps, cgroup, name, exec identity), `targets` (which
//! processes), `symbolize` (addresses → frames), `python` (the CPython runtime), `pipeline` (the
//! engine both drivers run: draining, the event model, aggregation), `profile` (the model),
//! `pprof`; the drivers `record` (one window written to files) and `daemon` (aligned windows
//! per target, to the spool); the cluster side `k8s`, `spool`, `upload`, `privilege` (the
//! agent's uid, capabilities and seccomp filter); `metrics` (a leaf);
//! `cli` (argument helpers).
pub mod cli;
pub mod daemon;
pub mod k8s;
pub mod kernel;
pub mod metrics;
pub mod pipeline;
pub mod pprof;
pub mod privilege;
pub mod proc;
pub mod profile;
pub mod python;
pub mod record;
pub mod spool;
pub mod symbolize;
pub mod targets;
pub mod unwind;
pub mod upload;
