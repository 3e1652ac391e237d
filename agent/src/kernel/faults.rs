//! The memory source's events: one software minor-page-fault counter per CPU with the fault
//! program attached, firing every `period` faults. Every process's faults advance a CPU's
//! counter, so the faults of a target are sampled at no fixed phase of its own.
use std::{
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
};

/// `PERF_COUNT_SW_PAGE_FAULTS_MIN`: faults served without I/O (a fresh anonymous page, a page
/// already in the page cache).
const PERF_COUNT_SW_PAGE_FAULTS_MIN: u64 = 5;

/// The per-CPU fault counters; dropping them detaches the program.
#[derive(Debug)]
pub struct FaultEvents {
    _events: Vec<OwnedFd>,
}

/// Opens the counters on every CPU of `cpus` with `prog` attached, one sample per `period`
/// faults.
pub fn attach(prog: impl AsFd, cpus: &[u32], period: u64) -> Result<FaultEvents, (u32, io::Error)> {
    let prog = prog.as_fd().as_raw_fd();
    let events = cpus
        .iter()
        .map(|&cpu| {
            super::clock::open_software_event(cpu, PERF_COUNT_SW_PAGE_FAULTS_MIN, period.max(1))
                .and_then(|fd| super::clock::attach_program(fd, prog))
                .map_err(|e| (cpu, e))
        })
        .collect::<Result<_, _>>()?;
    Ok(FaultEvents { _events: events })
}
