//! The threads of a process as `/proc/<pid>/task` tells them: the truth the threads profile
//! counts against (ids, names, states, CPU time, creation time).
use std::fs;

/// One thread of a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcThread {
    pub tid: u32,
    /// Kernel thread name (`comm`, at most 15 bytes).
    pub comm: String,
    /// State letter (`R`, `S`, `D`, `T`, `Z`, ...).
    pub state: char,
    /// CPU nanoseconds it ran in its life (`schedstat`; `stat`'s ticks when absent).
    pub cpu_ns: u64,
    /// When it was created, in nanoseconds since boot (`stat` field 22, in clock ticks).
    pub start_ns: u64,
}

/// Clock ticks per second of `/proc/*/stat` times.
fn ticks_per_second() -> u64 {
    // SAFETY: sysconf without pointers.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// Parses one `/proc/<pid>/task/<tid>/stat` line: (state, CPU ns from utime + stime, start
/// ns). The name is skipped by its last `)`: it may hold spaces and parentheses.
pub fn parse_stat(stat: &str) -> Option<(char, u64, u64)> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state): utime 14, stime 15, starttime 22.
    let state = fields.first()?.chars().next()?;
    let num = |field: usize| fields.get(field - 3)?.parse::<u64>().ok();
    let ns_per_tick = 1_000_000_000 / ticks_per_second();
    let cpu = (num(14)? + num(15)?).saturating_mul(ns_per_tick);
    Some((state, cpu, num(22)?.saturating_mul(ns_per_tick)))
}

/// The threads of `pid` now (empty once it exited). Threads that exit while they are read
/// are left out.
pub fn threads(pid: u32) -> Vec<ProcThread> {
    let mut out = Vec::new();
    for (tid, path) in super::task_dirs(pid) {
        let Ok(stat) = fs::read_to_string(path.join("stat")) else {
            continue;
        };
        let Some((state, stat_cpu, start_ns)) = parse_stat(&stat) else {
            continue;
        };
        // schedstat's first field is exact nanoseconds; stat's ticks are 10 ms steps.
        let cpu_ns = fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(stat_cpu);
        let comm = fs::read_to_string(path.join("comm"))
            .map(|s| s.trim_end_matches('\n').to_owned())
            .unwrap_or_default();
        out.push(ProcThread {
            tid,
            comm,
            state,
            cpu_ns,
            start_ns,
        });
    }
    out.sort_by_key(|t| t.tid);
    out
}

/// How many threads `pid` has now (`None` once it exited).
pub fn thread_count(pid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Nanoseconds since boot now (`CLOCK_BOOTTIME`: the clock of `stat`'s start times).
pub fn boottime_ns() -> u64 {
    // SAFETY: clock_gettime fills a zeroed struct.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_names_parse() {
        let line = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 2 0 500 \
                    1000 100 18446744073709551615";
        let (state, cpu, start) = parse_stat(line).unwrap();
        let tick = 1_000_000_000 / ticks_per_second();
        assert_eq!((state, cpu, start), ('S', 10 * tick, 500 * tick));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_counts_its_own_threads() {
        let pid = std::process::id();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        let t = std::thread::Builder::new()
            .name("counted".into())
            .spawn(move || {
                // The name is set by the new thread itself as it starts.
                started_tx.send(()).ok();
                rx.recv().ok()
            })
            .unwrap();
        started.recv().unwrap();
        let list = threads(pid);
        // Other tests' threads come and go meanwhile: only bounds are certain.
        assert!(thread_count(pid).is_some_and(|n| n >= 2));
        let named = list
            .iter()
            .find(|t| t.comm == "counted")
            .expect("thread listed");
        assert!(named.start_ns <= boottime_ns() && named.start_ns > 0);
        assert!(list.iter().any(|t| t.tid == pid && t.cpu_ns > 0));
        tx.send(()).unwrap();
        t.join().unwrap();
    }
}
