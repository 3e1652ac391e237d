//! kprof node agent: an eBPF CPU sampler (kernel, native and Python stacks) with symbolization,
//! aggregation and pprof / flame graph / top-table output.
//!
//! One module per job: `loader` (eBPF load/attach), `targets` (which processes), `symbolize`
//! (addresses → frames), `aggregate` (events → profile), `pprof`, `flamegraph`, `top`,
//! `record` (a session), `cgroup` (pid → container), `cli` (argument helpers).
pub mod aggregate;
pub mod btf;
pub mod cgroup;
pub mod cli;
pub mod daemon;
pub mod k8s;
pub mod loader;
pub mod perf;
pub mod pprof;
pub mod profile;
pub mod python;
pub mod record;
pub mod spool;
pub mod symbolize;
pub mod targets;
pub mod upload;
