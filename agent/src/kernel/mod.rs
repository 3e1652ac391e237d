//! Everything that talks to the kernel's BPF and perf interfaces: loading and attaching the
//! programs (`loader`), the jittered sampling clock (`clock`), the sampled page-fault counters
//! of memory profiles (`faults`), the allocation probes' `uprobe_multi` links (`uprobe_multi`)
//! and the `task_struct` offsets read from kernel BTF (`btf`).
pub mod btf;
pub mod clock;
pub mod faults;
pub mod loader;
pub mod uprobe_multi;
