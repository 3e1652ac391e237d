//! The sampling clock: one software cpu-clock perf event per CPU at the target frequency, with
//! the sampler program attached.
//!
//! Opened here rather than through `aya::programs::PerfEvent::attach` because aya does not
//! expose `exclude_idle`: without it every tick of an idle CPU runs the program (and on a
//! mostly idle node those ticks outnumber the targeted ones). With it, the kernel skips the
//! overflow — and the program — while the CPU runs its idle task.
use std::{
    io,
    mem::size_of,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
};

use aya_obj::generated::{PERF_EVENT_IOC_SET_BPF, PERF_FLAG_FD_CLOEXEC, perf_event_attr};

/// `PERF_TYPE_SOFTWARE` / `PERF_COUNT_SW_CPU_CLOCK`.
const PERF_TYPE_SOFTWARE: u32 = 1;
const PERF_COUNT_SW_CPU_CLOCK: u64 = 0;
/// `_IO('$', 0)`.
const PERF_EVENT_IOC_ENABLE: u64 = 0x2400;

/// The per-CPU events; dropping them detaches the program.
#[derive(Debug)]
pub struct CpuClocks {
    _events: Vec<OwnedFd>,
}

/// Opens a cpu-clock event sampling at `hz` on every CPU of `cpus` (all processes, idle
/// excluded) and attaches `prog` to each.
pub fn attach(prog: impl AsFd, cpus: &[u32], hz: u64) -> Result<CpuClocks, (u32, io::Error)> {
    let prog = prog.as_fd().as_raw_fd();
    let mut events = Vec::with_capacity(cpus.len());
    for &cpu in cpus {
        let fd = open_cpu_clock(cpu, hz).map_err(|e| (cpu, e))?;
        // SAFETY: ioctls on a perf event fd we own, with an int argument (the program fd) and
        // no argument.
        let attached = unsafe {
            libc::ioctl(fd.as_raw_fd(), PERF_EVENT_IOC_SET_BPF as _, prog) == 0
                && libc::ioctl(fd.as_raw_fd(), PERF_EVENT_IOC_ENABLE as _, 0) == 0
        };
        if !attached {
            return Err((cpu, io::Error::last_os_error()));
        }
        events.push(fd);
    }
    Ok(CpuClocks { _events: events })
}

fn open_cpu_clock(cpu: u32, hz: u64) -> io::Result<OwnedFd> {
    // SAFETY: perf_event_attr is plain data; all-zero is its "nothing set" value.
    let mut attr: perf_event_attr = unsafe { std::mem::zeroed() };
    attr.type_ = PERF_TYPE_SOFTWARE;
    attr.size = size_of::<perf_event_attr>() as u32;
    attr.config = PERF_COUNT_SW_CPU_CLOCK;
    attr.__bindgen_anon_1.sample_freq = hz;
    attr.set_freq(1);
    attr.set_exclude_idle(1);
    attr.set_disabled(1); // enabled once the program is attached
    // SAFETY: perf_event_open(2) with a valid attr; pid -1 + cpu = every process on that CPU.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const perf_event_attr,
            -1i32,
            cpu as i32,
            -1i32,
            PERF_FLAG_FD_CLOEXEC as libc::c_ulong,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd returned by the kernel, owned from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
