//! kprof node agent: an eBPF CPU sampler (kernel, native and Python stacks) with symbolization,
//! aggregation and pprof / flame graph / top-table output.
//!
//! One module per job: `loader` (eBPF load/attach), `targets` (which processes), `symbolize`
//! (addresses → frames), `pipeline` (the engine both drivers run: draining, the event model,
//! aggregation), `profile` (the model), `pprof`, `flamegraph`, `top`, `record` (one window
//! written to files), `daemon` (aligned windows per target, to the spool), `cgroup`
//! (pid → container), `cli` (argument helpers).
pub mod btf;
pub mod cgroup;
pub mod cli;
pub mod daemon;
pub mod k8s;
pub mod loader;
pub mod metrics;
pub mod perf;
pub mod pipeline;
pub mod pprof;
pub mod proc;
pub mod profile;
pub mod python;
pub mod record;
pub mod spool;
pub mod symbolize;
pub mod targets;
pub mod upload;
