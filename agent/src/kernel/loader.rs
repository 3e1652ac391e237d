//! Loads the eBPF object, attaches the sampler to every online CPU (software cpu-clock at the
//! requested frequency) and the fork follower, and hands out the maps.
//!
//! Failures are mapped to one-line, actionable errors (missing capability, perf events, BTF)
//! instead of aya's nested error chains.
use std::{
    collections::HashMap,
    fs,
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{PerfEvent, RawTracePoint},
    sys::{Stats, enable_stats},
    util::online_cpus,
};
use kprof_common::{Config, OffCpuThread, Stat, TargetSlot, names, python::PyStat};

use super::uprobe_multi::{self, MultiError, MultiLink, MultiProgram};

/// The eBPF object built by `build.rs` (empty when built with `AYA_BUILD_SKIP=1`).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kprof"));

/// Whether this binary carries the eBPF programs.
pub fn ebpf_available() -> bool {
    !EBPF_OBJECT.is_empty()
}

/// Errors of loading and attaching.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "this kprof-agent was built without its eBPF programs (AYA_BUILD_SKIP); rebuild after agent/install-toolchain.sh"
    )]
    NotBuilt,
    #[error(
        "missing capability: kprof-agent needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN / root) to load eBPF programs"
    )]
    Capability,
    #[error(
        "kernel BTF (/sys/kernel/btf/vmlinux) is missing: need a kernel built with CONFIG_DEBUG_INFO_BTF"
    )]
    NoBtf,
    #[error("perf events unavailable: cannot open a software cpu-clock event on CPU {cpu}")]
    PerfEvent {
        cpu: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot list online CPUs: {0}")]
    Cpus(std::io::Error),
    #[error("the kernel rejected the eBPF programs: {0}")]
    Load(String),
    #[error("cannot attach the off-CPU source (sched_switch): {0}")]
    OffCpu(String),
    #[error("cannot attach the thread sources (sched_process_fork, sched_process_exit): {0}")]
    Threads(String),
    #[error("cannot attach the memory source (page-fault events): {0}")]
    Faults(String),
    #[error("eBPF map or program {0} missing from the object")]
    Missing(&'static str),
    #[error("eBPF map error: {0}")]
    Map(#[from] aya::maps::MapError),
}

/// Sampler settings.
#[derive(Clone, Copy, Debug)]
pub struct SamplerConfig {
    pub sample_hz: u64,
    /// Children of targets become targets (the fork follower; needs kernel BTF offsets).
    pub follow_children: bool,
    /// Match samples by cgroup v2 id as well (Kubernetes mode).
    pub cgroup_filter: bool,
    /// Enable `BPF_ENABLE_STATS` while sampling (in-kernel run time per sample).
    pub bpf_stats: bool,
    /// Jitter the clock's period so samples cannot lock onto periodic code (`kernel/clock.rs`). Off only
    /// to show what a fixed period does.
    pub clock_jitter: bool,
    /// Attach the off-CPU source (wall and lock profiles) with these limits.
    pub off_cpu: Option<OffCpuLimits>,
    /// Record thread creations (with stacks) and exits of targets (threads profiles).
    pub threads: bool,
    /// Unwind native user stacks with the `.eh_frame` tables (frame pointers where no table
    /// covers an address); off: the kernel's frame-pointer walk only.
    pub unwind_tables: bool,
    /// Attach the memory source: one sample per this many minor page faults per CPU.
    pub page_faults: Option<u64>,
    /// Load the allocation probes (with the memory source), sampling one point per this many
    /// bytes on average; they are attached per process ([`Sampler::probe_allocations`]).
    pub alloc_probes: Option<u64>,
}

/// The allocation probes' default period: a sample per 512 KiB reported, on average.
pub const DEFAULT_ALLOC_PERIOD: u64 = 512 << 10;
/// Processes probed at once at most (each holds two uprobe links).
pub const MAX_PROBED_PROCESSES: usize = 256;

/// The memory source's default period: one sample per 64 faults, 256 KiB of base pages.
pub const DEFAULT_FAULT_PERIOD: u64 = 64;

/// How many off-CPU stacks a targeted thread may capture: one per `gap` of its time, with up
/// to `burst` saved. The waits not captured are still timed exactly (see `offcpu.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffCpuLimits {
    pub gap: Duration,
    pub burst: u32,
}

impl Default for OffCpuLimits {
    /// 100 captures a second per thread, 32 at once: a thread that waits less often than that
    /// has every wait captured.
    fn default() -> Self {
        OffCpuLimits {
            gap: Duration::from_millis(10),
            burst: 32,
        }
    }
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            sample_hz: 99,
            follow_children: true,
            cgroup_filter: false,
            bpf_stats: true,
            clock_jitter: true,
            off_cpu: None,
            threads: false,
            unwind_tables: true,
            page_faults: None,
            alloc_probes: None,
        }
    }
}

/// In-kernel cost of the sampler program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCost {
    pub run_count: u64,
    pub run_time: Duration,
}

/// The loaded and attached sampler.
pub struct Sampler {
    /// The remaining maps and programs (the Python support registers its own maps here).
    pub bpf: Ebpf,
    pub events: RingBuf<MapData>,
    pub targets: BpfHashMap<MapData, u32, TargetSlot>,
    pub cgroups: BpfHashMap<MapData, u64, TargetSlot>,
    stats: PerCpuArray<MapData, u64>,
    /// The CPython walker's counters (absent from objects built without the walker).
    py_stats: Option<PerCpuArray<MapData, u64>>,
    _stats_fd: Option<OwnedFd>,
    /// Warnings for the user (e.g. children not followed).
    pub warnings: Vec<String>,
    pub follow_children: bool,
    /// The per-CPU sampling events (closing them detaches the program).
    clocks: super::clock::CpuClocks,
    /// The CPython walker runs in kernel (the Python sampler program was accepted).
    pub python_walker: bool,
    program: &'static str,
    off_cpu: Option<OffCpuState>,
    /// Thread creations and exits are recorded.
    pub thread_events: bool,
    /// The memory source's counters and program (attached for memory profiles).
    faults: Option<(super::faults::FaultEvents, &'static str)>,
    /// The loaded allocation probes (track, untrack) and their links per probed process.
    alloc_probes: Option<AllocProbes>,
}

/// The allocation probes: loaded once, attached per process.
struct AllocProbes {
    track: MultiProgram,
    untrack: MultiProgram,
    links: HashMap<u32, (MultiLink, MultiLink)>,
}

/// The attached off-CPU source.
struct OffCpuState {
    threads: BpfHashMap<MapData, u32, OffCpuThread>,
    program: &'static str,
}

fn take_map(bpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, LoadError> {
    bpf.take_map(name).ok_or(LoadError::Missing(name))
}

/// Checks the effective capabilities of this process.
pub fn check_capabilities() -> Result<(), LoadError> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    const SYS_ADMIN: u64 = 1 << 21;
    const PERFMON: u64 = 1 << 38;
    const BPF: u64 = 1 << 39;
    if eff & SYS_ADMIN != 0 || (eff & PERFMON != 0 && eff & BPF != 0) {
        Ok(())
    } else {
        Err(LoadError::Capability)
    }
}

fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer. Kernels ≥ 5.11 account BPF memory to the cgroup
    // and ignore this limit; failing is not fatal.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if ret != 0 {
        tracing::debug!("setrlimit(RLIMIT_MEMLOCK) failed");
    }
}

impl Sampler {
    /// Loads the programs and attaches them. Targets are added afterwards with [`Sampler::add_pid`].
    /// Loads the sampler with the CPython walker (falling back to the native sampler when the
    /// kernel rejects the walker; see [`Sampler::warnings`]).
    pub fn load(cfg: &SamplerConfig) -> Result<Sampler, LoadError> {
        Self::load_with(cfg, true)
    }

    /// Like [`Sampler::load`]; `python: false` loads the native-only sampler directly.
    pub fn load_with(cfg: &SamplerConfig, python: bool) -> Result<Sampler, LoadError> {
        if !ebpf_available() {
            return Err(LoadError::NotBuilt);
        }
        check_capabilities()?;
        if !Path::new("/sys/kernel/btf/vmlinux").exists() {
            return Err(LoadError::NoBtf);
        }
        raise_memlock();
        let mut warnings = Vec::new();

        let offsets = super::btf::task_offsets();
        let task = match &offsets {
            Ok(t) if cfg.follow_children || cfg.threads => Some(*t),
            Ok(_) => None,
            Err(e) => {
                if cfg.follow_children {
                    warnings.push(format!("children are not followed: {e}"));
                }
                if cfg.threads {
                    return Err(LoadError::Threads(format!(
                        "kernel BTF lacks the task_struct offsets it needs: {e}"
                    )));
                }
                None
            }
        };
        let config = Config {
            cgroup_filter: u32::from(cfg.cgroup_filter),
            follow_children: u32::from(task.is_some() && cfg.follow_children),
            task_pid_off: task.map_or(0, |t| t.pid),
            task_tgid_off: task.map_or(0, |t| t.tgid),
            // Without it user space notices exec by checking /proc on every drain instead.
            task_exec_id_off: offsets.as_ref().map_or(0, |t| t.self_exec_id),
            task_stack_off: offsets.as_ref().map_or(0, |t| t.stack),
            offcpu_gap_ns: cfg
                .off_cpu
                // Bounded so that gap × burst cannot overflow in kernel.
                .map_or(1, |l| l.gap.as_nanos().clamp(1, 60_000_000_000) as u64),
            offcpu_burst: cfg.off_cpu.map_or(1, |l| l.burst.clamp(1, 1000)),
            thread_events: u32::from(cfg.threads),
            task_runtime_off: offsets.as_ref().map_or(0, |t| t.sum_exec_runtime),
            unwind_tables: u32::from(cfg.unwind_tables),
            alloc_period: cfg
                .alloc_probes
                .filter(|_| cfg.page_faults.is_some())
                .map_or(0, |p| p.clamp(4096, 1 << 30)),
        };

        let cpus = online_cpus().map_err(|(_, e)| LoadError::Cpus(e))?;
        let ring_bytes = ring_size(
            cpus.len(),
            cfg.sample_hz,
            cfg.off_cpu.is_some() || cfg.threads || cfg.page_faults.is_some(),
        );
        // No kernel BTF for the loader: the programs use no CO-RE relocations (kernel offsets
        // are passed as data), and parsing vmlinux BTF costs ~30 MiB of peak RSS.
        let mut bpf = EbpfLoader::new()
            .btf(None)
            .map_max_entries(names::MAP_EVENTS, ring_bytes)
            .override_global(names::GLOBAL_CONFIG, &config, true)
            .load(EBPF_OBJECT)
            .map_err(|e| map_load_error(&e))?;

        let stats_fd = if cfg.bpf_stats {
            enable_stats(Stats::RunTime).ok()
        } else {
            None
        };

        let mut program = if python {
            names::PROG_SAMPLE
        } else {
            names::PROG_SAMPLE_NATIVE
        };
        let loaded = load_perf_program(&mut bpf, program);
        let prog = match loaded {
            Err(LoadError::Load(why)) if program == names::PROG_SAMPLE => {
                warnings.push(format!(
                    "python frames disabled: the kernel rejected the CPython walker ({why}); native and kernel frames only"
                ));
                program = names::PROG_SAMPLE_NATIVE;
                load_perf_program(&mut bpf, program)?
            }
            other => other?,
        };
        let prog_fd = prog.fd().map_err(|e| LoadError::Load(one_line(&e)))?;
        let clocks = super::clock::attach(prog_fd, &cpus, cfg.sample_hz, cfg.clock_jitter)
            .map_err(|(cpu, source)| LoadError::PerfEvent { cpu, source })?;

        let mut follow_children = task.is_some() && cfg.follow_children;
        if follow_children || cfg.threads {
            // Thread creations carry Python frames when the walker runs; the fork program with
            // the walker is only loaded for them (a rejected walker falls back to native).
            let mut fork_program = names::PROG_FORK;
            if cfg.threads && program == names::PROG_SAMPLE {
                match load_raw_tracepoint(&mut bpf, names::PROG_FORK_PY) {
                    Ok(()) => fork_program = names::PROG_FORK_PY,
                    Err(e) => warnings.push(format!(
                        "thread creations carry native frames only: the kernel rejected the \
                         CPython walker in the fork program ({e})"
                    )),
                }
            }
            if fork_program == names::PROG_FORK {
                load_raw_tracepoint(&mut bpf, names::PROG_FORK)?;
            }
            let fork: &mut RawTracePoint = bpf
                .program_mut(fork_program)
                .ok_or(LoadError::Missing(fork_program))?
                .try_into()
                .map_err(|_| LoadError::Missing(fork_program))?;
            if let Err(e) = fork.attach("sched_process_fork") {
                if cfg.threads {
                    return Err(LoadError::Threads(one_line(&e)));
                }
                warnings.push(format!("children are not followed: {}", one_line(&e)));
                follow_children = false;
            }
        }
        if cfg.threads {
            load_raw_tracepoint(&mut bpf, names::PROG_EXIT)?;
            let exit: &mut RawTracePoint = bpf
                .program_mut(names::PROG_EXIT)
                .ok_or(LoadError::Missing(names::PROG_EXIT))?
                .try_into()
                .map_err(|_| LoadError::Missing(names::PROG_EXIT))?;
            exit.attach("sched_process_exit")
                .map_err(|e| LoadError::Threads(one_line(&e)))?;
        }

        let faults = match cfg.page_faults {
            Some(period) => {
                let name = if program == names::PROG_SAMPLE {
                    names::PROG_FAULT
                } else {
                    names::PROG_FAULT_NATIVE
                };
                let prog = load_perf_program(&mut bpf, name)?;
                let fd = prog.fd().map_err(|e| LoadError::Load(one_line(&e)))?;
                let events = super::faults::attach(fd, &cpus, period)
                    .map_err(|(cpu, e)| LoadError::Faults(format!("CPU {cpu}: {e}")))?;
                let memsys = if program == names::PROG_SAMPLE {
                    names::PROG_MEMSYS
                } else {
                    names::PROG_MEMSYS_NATIVE
                };
                load_raw_tracepoint(&mut bpf, memsys)?;
                let hook: &mut RawTracePoint = bpf
                    .program_mut(memsys)
                    .ok_or(LoadError::Missing(memsys))?
                    .try_into()
                    .map_err(|_| LoadError::Missing(memsys))?;
                hook.attach("sys_exit")
                    .map_err(|e| LoadError::Faults(one_line(&e)))?;
                Some((events, name))
            }
            None => None,
        };
        // Allocation probes the kernel refuses leave the rest of the memory profile as it is.
        let alloc_probes = match (cfg.alloc_probes, &faults) {
            (Some(_), Some(_)) => match load_alloc_probes(&bpf, program == names::PROG_SAMPLE) {
                Ok((probes, warning)) => {
                    warnings.extend(warning);
                    Some(probes)
                }
                Err(e) => {
                    warnings.push(format!("no allocation probes: {e}"));
                    None
                }
            },
            _ => None,
        };

        let off_cpu = match cfg.off_cpu {
            Some(_) => {
                if offsets.is_err() {
                    return Err(LoadError::OffCpu(
                        "kernel BTF lacks the task_struct offsets it needs".into(),
                    ));
                }
                let name = if program == names::PROG_SAMPLE {
                    names::PROG_SWITCH
                } else {
                    names::PROG_SWITCH_NATIVE
                };
                let switch: &mut RawTracePoint = bpf
                    .program_mut(name)
                    .ok_or(LoadError::Missing(name))?
                    .try_into()
                    .map_err(|_| LoadError::Missing(name))?;
                switch.load().map_err(|e| map_program_error(&e))?;
                switch
                    .attach("sched_switch")
                    .map_err(|e| LoadError::OffCpu(one_line(&e)))?;
                let map = take_map(&mut bpf, names::MAP_OFF_CPU)?;
                Some(OffCpuState {
                    threads: BpfHashMap::try_from(map)?,
                    program: name,
                })
            }
            None => None,
        };

        // Python walker entries and unwinder mappings of processes that exec are dropped in
        // kernel.
        if (program == names::PROG_SAMPLE || cfg.unwind_tables)
            && let Some(p) = bpf.program_mut(names::PROG_EXEC)
        {
            let exec: Result<&mut RawTracePoint, _> = p.try_into();
            let attached = exec.map_err(|e| one_line(&e)).and_then(|exec| {
                exec.load().map_err(|e| one_line(&e))?;
                exec.attach("sched_process_exec").map_err(|e| one_line(&e))
            });
            if let Err(e) = attached {
                warnings.push(format!(
                    "exec is noticed by user space only (sched_process_exec: {e})"
                ));
            }
        }

        let events = RingBuf::try_from(take_map(&mut bpf, names::MAP_EVENTS)?)?;
        let targets = BpfHashMap::try_from(take_map(&mut bpf, names::MAP_TARGET_PIDS)?)?;
        let cgroups = BpfHashMap::try_from(take_map(&mut bpf, names::MAP_TARGET_CGROUPS)?)?;
        let stats = PerCpuArray::try_from(take_map(&mut bpf, names::MAP_STATS)?)?;
        let py_stats = bpf
            .take_map(kprof_common::python::names::MAP_PY_STATS)
            .and_then(|m| PerCpuArray::try_from(m).ok());
        Ok(Sampler {
            bpf,
            events,
            targets,
            cgroups,
            stats,
            py_stats,
            _stats_fd: stats_fd,
            warnings,
            follow_children,
            clocks,
            python_walker: program == names::PROG_SAMPLE,
            program,
            off_cpu,
            thread_events: cfg.threads,
            faults,
            alloc_probes,
        })
    }

    /// Whether the allocation probes are loaded.
    pub fn has_alloc_probes(&self) -> bool {
        self.alloc_probes.is_some()
    }

    /// Attaches the allocation probes to process `pid` (host pid): `file` is its interpreter
    /// file, opened by the agent (attached through `/proc/self/fd`, so the probe is on exactly
    /// the file the process maps, whatever a tenant did to its path), `track` and `untrack`
    /// the file offsets of `PyTraceMalloc_Track` and `PyTraceMalloc_Untrack`. Only that
    /// process traps into them (the breakpoints are written into its memory only).
    pub fn probe_allocations(
        &mut self,
        pid: u32,
        file: &std::fs::File,
        track: u64,
        untrack: u64,
    ) -> Result<(), String> {
        let Some(probes) = self.alloc_probes.as_mut() else {
            return Err("allocation probes are not loaded".into());
        };
        if probes.links.contains_key(&pid) {
            return Ok(());
        }
        if probes.links.len() >= MAX_PROBED_PROCESSES {
            return Err(format!(
                "{MAX_PROBED_PROCESSES} processes are probed already on this node"
            ));
        }
        let path = format!("/proc/self/fd/{}", file.as_raw_fd());
        let attach = |prog: &MultiProgram, offset: u64| {
            prog.attach(&path, offset, pid).map_err(|e| e.explained())
        };
        // Dropping the track link if the untrack link fails detaches it.
        let links = (
            attach(&probes.track, track)?,
            attach(&probes.untrack, untrack)?,
        );
        probes.links.insert(pid, links);
        Ok(())
    }

    /// Detaches the allocation probes of processes not in `alive` (exited ones).
    pub fn unprobe_gone(&mut self, alive: impl Fn(u32) -> bool) {
        if let Some(probes) = self.alloc_probes.as_mut() {
            // Closing a link removes its breakpoint.
            probes.links.retain(|&pid, _| alive(pid));
        }
    }

    /// The off-CPU state of every tracked thread (empty without the off-CPU source).
    pub fn off_cpu_threads(&self) -> Vec<(u32, OffCpuThread)> {
        self.off_cpu
            .as_ref()
            .map(|o| o.threads.iter().filter_map(Result::ok).collect())
            .unwrap_or_default()
    }

    /// Drops an exited thread's off-CPU state.
    pub fn forget_off_cpu_thread(&mut self, tid: u32) {
        if let Some(o) = self.off_cpu.as_mut() {
            let _ = o.threads.remove(&tid);
        }
    }

    /// Whether the off-CPU source is attached.
    pub fn has_off_cpu(&self) -> bool {
        self.off_cpu.is_some()
    }

    /// Targets a process (all its threads).
    pub fn add_pid(&mut self, pid: u32, slot: u32) -> Result<(), LoadError> {
        self.targets
            .insert(pid, TargetSlot { slot, inherited: 0 }, 0)?;
        Ok(())
    }

    /// Stops targeting a process.
    pub fn remove_pid(&mut self, pid: u32) {
        let _ = self.targets.remove(&pid);
    }

    /// Targets a cgroup v2 id (used only when the sampler was loaded with `cgroup_filter`).
    pub fn add_cgroup(&mut self, id: u64, slot: u32) -> Result<(), LoadError> {
        self.cgroups
            .insert(id, TargetSlot { slot, inherited: 0 }, 0)?;
        Ok(())
    }

    /// Current entries of the tgid map.
    pub fn target_pids(&self) -> Vec<(u32, TargetSlot)> {
        self.targets.iter().filter_map(Result::ok).collect()
    }

    /// Sum over CPUs of one counter.
    pub fn stat(&self, stat: Stat) -> u64 {
        self.stats
            .get(&(stat as u32), 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }

    /// Sum over CPUs of one CPython walker counter (0 without the walker).
    pub fn py_stat(&self, stat: PyStat) -> u64 {
        self.py_stats
            .as_ref()
            .and_then(|m| m.get(&(stat as u32), 0).ok())
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }

    /// Run count and run time of the sampler program (needs `bpf_stats`).
    pub fn kernel_cost(&self) -> KernelCost {
        self.program_cost(self.program)
    }

    /// Run count and run time of the off-CPU program (zero without it).
    pub fn off_cpu_cost(&self) -> KernelCost {
        self.off_cpu
            .as_ref()
            .map_or_else(KernelCost::default, |o| self.program_cost(o.program))
    }

    /// Run count and run time of the memory source's program (zero without it).
    pub fn fault_cost(&self) -> KernelCost {
        self.faults
            .as_ref()
            .map_or_else(KernelCost::default, |(_, name)| self.program_cost(name))
    }

    /// Whether the memory source is attached.
    pub fn has_faults(&self) -> bool {
        self.faults.is_some()
    }

    fn program_cost(&self, name: &str) -> KernelCost {
        let info = self.bpf.program(name).and_then(|p| p.info().ok());
        match info {
            Some(i) => KernelCost {
                run_count: i.run_count(),
                run_time: i.run_time(),
            },
            None => KernelCost::default(),
        }
    }

    /// Redraws the sampling clock's period when it is due (see `kernel/clock.rs`).
    pub fn rearm_clocks(&mut self) {
        self.clocks.rearm_if_due(std::time::Instant::now());
    }

    /// File descriptor of the ring buffer, for poll(2).
    pub fn events_fd(&self) -> i32 {
        self.events.as_raw_fd()
    }
}

/// Ring buffer bytes: one second of the largest records with every CPU busy in a target (4× the
/// 250 ms drain interval), plus a thousand off-CPU captures when that source is on, a power of
/// two within 1–64 MiB. User space maps the data pages twice, so this is also about half of
/// the ring's share of the agent's RSS.
pub fn ring_size(cpus: usize, hz: u64, off_cpu: bool) -> u32 {
    let records = (cpus as u64)
        .saturating_mul(hz)
        .saturating_add(if off_cpu { 1000 } else { 0 });
    let want = records.saturating_mul(kprof_common::MAX_EVENT_BYTES as u64);
    want.clamp(1 << 20, 64 << 20).next_power_of_two() as u32
}

fn load_perf_program<'a>(
    bpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut PerfEvent, LoadError> {
    let prog: &mut PerfEvent = bpf
        .program_mut(name)
        .ok_or(LoadError::Missing(name))?
        .try_into()
        .map_err(|_| LoadError::Missing(name))?;
    prog.load().map_err(|e| map_program_error(&e))?;
    Ok(prog)
}

/// Loads the allocation probes for `uprobe_multi` links: the track program with the CPython
/// walker when `python` (else, or when the kernel rejects it, without, and a warning says so)
/// and the untrack program.
fn load_alloc_probes(bpf: &Ebpf, python: bool) -> Result<(AllocProbes, Option<String>), String> {
    let explain = |e: MultiError| e.explained();
    let object = uprobe_multi::relocate(
        EBPF_OBJECT,
        bpf,
        &[
            names::PROG_TRACK,
            names::PROG_TRACK_NATIVE,
            names::PROG_UNTRACK,
        ],
    )
    .map_err(explain)?;
    let mut warning = None;
    let track = match python.then(|| object.load(names::PROG_TRACK)) {
        Some(Ok(track)) => track,
        rejected => {
            if let Some(Err(e)) = rejected {
                warning = Some(format!(
                    "sampled allocations carry native frames only: the kernel rejected the \
                     CPython walker in the allocation probe ({e})"
                ));
            }
            object.load(names::PROG_TRACK_NATIVE).map_err(explain)?
        }
    };
    let untrack = object.load(names::PROG_UNTRACK).map_err(explain)?;
    Ok((
        AllocProbes {
            track,
            untrack,
            links: HashMap::new(),
        },
        warning,
    ))
}

/// Loads (verifies) a raw tracepoint program of the object.
fn load_raw_tracepoint(bpf: &mut Ebpf, name: &'static str) -> Result<(), LoadError> {
    let prog: &mut RawTracePoint = bpf
        .program_mut(name)
        .ok_or(LoadError::Missing(name))?
        .try_into()
        .map_err(|_| LoadError::Missing(name))?;
    prog.load().map_err(|e| map_program_error(&e))
}

fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s.replace('\n', " ")
}

fn is_eperm(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.raw_os_error() == Some(libc::EPERM)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

fn map_load_error(e: &aya::EbpfError) -> LoadError {
    if is_eperm(e) {
        LoadError::Capability
    } else {
        LoadError::Load(one_line(e))
    }
}

/// The verdict of a verifier log: its last line that says something (the log is long; the
/// one-line error keeps this).
pub(super) fn last_log_line(log: &str) -> Option<&str> {
    log.lines().rev().find(|l| !l.trim().is_empty())
}

fn map_program_error(e: &aya::programs::ProgramError) -> LoadError {
    if is_eperm(e) {
        return LoadError::Capability;
    }
    if let aya::programs::ProgramError::LoadError { verifier_log, .. } = e {
        let log = verifier_log.to_string();
        tracing::debug!("verifier log:\n{log}");
        return LoadError::Load(format!("verifier: {}", last_log_line(&log).unwrap_or("")));
    }
    LoadError::Load(one_line(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_size_scales_with_cpus_and_rate() {
        assert_eq!(ring_size(2, 99, false), 1 << 20);
        assert_eq!(ring_size(2, 99, true), 8 << 20);
        assert_eq!(ring_size(64, 99, false), 32 << 20);
        assert_eq!(ring_size(256, 1000, true), 64 << 20);
        assert!(ring_size(1, 1, false).is_power_of_two());
    }
}
