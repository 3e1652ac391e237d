//! The sampling clock: one software cpu-clock perf event per CPU with the sampler program
//! attached, its period jittered around 1/Hz so that samples cannot lock onto periodic code.
//!
//! **Why jitter.** A fixed period sees a loop whose iteration takes about as long as the period at
//! the same phase sample after sample, for seconds: a 10.3 ms Python loop sampled every 10.1 ms
//! was off by up to 8 points per function. So every CPU's clock is re-armed with a period drawn
//! uniformly over ½–1½ × a base near 1/Hz (`PERF_EVENT_IOC_PERIOD`, which also restarts the
//! clock at that moment, so the phase is new too), at most every 10 periods (and 100 ms). Each
//! CPU's position in that range moves by the golden ratio at each re-arm from a random start,
//! so its periods cover the range evenly and a window's rate is Hz within ~1–2 %.
//!
//! **Why the base is not 1/Hz.** A period held for a while gives ticks at 1/p, and the mean of
//! 1/p over ½–1½ × T is ln 3 / T: periods drawn around 1/Hz sampled 10 % too often (measured:
//! 111 samples per CPU-second at 99 Hz). And a re-arm restarts the period in progress, so each
//! re-arm loses half a tick on average. The base is T × ln 3 / (1 + T / 2D), D the time since
//! the previous re-arm: the long-run rate is Hz (simulated: 1.000–1.003 × Hz with drains every
//! 100 or 250 ms; the kernel tests check it).
//!
//! **Why from the drain loop.** The re-arms are made by the thread that drains the ring
//! ([`CpuClocks::rearm_if_due`]), which wakes every 100–250 ms anyway. A thread of their own
//! woke ~16 times a second at 99 Hz and cost 1 ms of CPU per second on this VM (a wake-up ~40
//! µs, plus ~15 µs per ioctl that must interrupt another CPU): more than the agent's whole
//! steady work. Re-arms at drains are as good against phase lock: the first tick after a
//! re-arm is drawn over a whole period, so each run of samples starts at a random phase
//! whatever the moment of the re-arm (simulated over 30 s of a loop locked to 1/Hz: the worst
//! function error is 0.8 points median and 2.4–2.6 at the 99th percentile, as with a thread
//! re-arming every 2–10 periods).
//!
//! **Why it stays exact.** Each sample carries the nanoseconds since the previous tick of its
//! CPU's clock (the CPU sample's value, measured in the program, which sees every tick), so CPU
//! time is the sum of what the samples stand for, not samples × a nominal period.
//!
//! Opened here rather than through `aya::programs::PerfEvent::attach` to set the period and keep
//! the fds for re-arming. The idle task is not excluded: the clock fires in idle anyway, and the
//! program must see every tick to measure the intervals (it returns after one per-CPU write).
use std::{
    io,
    mem::size_of,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use aya_obj::generated::{PERF_EVENT_IOC_SET_BPF, PERF_FLAG_FD_CLOEXEC, perf_event_attr};

/// `PERF_TYPE_SOFTWARE` / `PERF_COUNT_SW_CPU_CLOCK`.
const PERF_TYPE_SOFTWARE: u32 = 1;
const PERF_COUNT_SW_CPU_CLOCK: u64 = 0;
/// `_IO('$', 0)`.
const PERF_EVENT_IOC_ENABLE: u64 = 0x2400;
/// `_IOW('$', 4, __u64)`.
const PERF_EVENT_IOC_PERIOD: u64 = 0x4008_2404;

/// The golden ratio's fractional part: successive multiples mod 1 spread most evenly.
const GOLDEN_STEP: f64 = 0.618_033_988_749_895;

/// How the clock's period is drawn and how often it is re-armed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Jitter {
    /// The nominal period (1/Hz) in nanoseconds.
    pub period_ns: u64,
}

impl Jitter {
    pub fn new(hz: u64) -> Jitter {
        Jitter {
            period_ns: 1_000_000_000 / hz.max(1),
        }
    }

    /// The middle of the period range for a clock re-armed every `interval` (see the module
    /// docs): ticks then come at Hz in the long run.
    pub fn base_period_ns(&self, interval: Duration) -> f64 {
        let t = self.period_ns as f64;
        let d = (interval.as_nanos() as f64).max(t);
        t * 3f64.ln() / (1.0 + t / (2.0 * d))
    }

    /// The period at position `u` (0–1) of the range ½–1½ × [`Self::base_period_ns`], for a
    /// clock re-armed every `interval`. The kernel's floor for a software clock is 10 µs.
    pub fn period_at(&self, u: f64, interval: Duration) -> u64 {
        let p = self.base_period_ns(interval) * (0.5 + u.clamp(0.0, 1.0));
        (p as u64).max(10_000)
    }

    /// The least time between re-arms: 10 periods, and 100 ms at least, so a high rate or a
    /// busy drain loop does not turn into many re-arms (each an IPI to the CPU) per second. Not
    /// drawn: the drain loop's wake-ups already vary, and equal intervals weigh every period
    /// alike, so a window's rate stays within ~1 % of Hz (simulated; random 1–3× intervals
    /// left ±5 %).
    pub fn min_interval(&self) -> Duration {
        Duration::from_nanos((10 * self.period_ns).max(100_000_000))
    }
}

/// The per-CPU events; dropping them detaches the program.
#[derive(Debug)]
pub struct CpuClocks {
    events: Vec<OwnedFd>,
    /// `None`: a fixed period (tests that show what jitter prevents).
    jitter: Option<Jitter>,
    /// Per CPU, the position of its current period in the range: it moves by the golden ratio
    /// at each re-arm from a random start, so a CPU's periods cover the range evenly within a
    /// few re-arms and its rate over a 30 s window is Hz within ~2 %. Independent draws left
    /// ±8 % from window to window (measured).
    positions: Vec<f64>,
    last_rearm: Instant,
    next_rearm: Instant,
}

/// Opens a cpu-clock event at `hz` on every CPU of `cpus` and attaches `prog` to each; with
/// `jitter` (the default everywhere) the period is drawn at random, and redrawn by
/// [`CpuClocks::rearm_if_due`].
pub fn attach(
    prog: impl AsFd,
    cpus: &[u32],
    hz: u64,
    jitter: bool,
) -> Result<CpuClocks, (u32, io::Error)> {
    let prog = prog.as_fd().as_raw_fd();
    let draws = Jitter::new(hz);
    let mut rng = fastrand::Rng::new();
    let mut events = Vec::with_capacity(cpus.len());
    let first_interval = draws.min_interval();
    let positions: Vec<f64> = cpus.iter().map(|_| rng.f64()).collect();
    for (&cpu, &u) in cpus.iter().zip(&positions) {
        let period = if jitter {
            draws.period_at(u, first_interval)
        } else {
            draws.period_ns
        };
        let fd = open_software_event(cpu, PERF_COUNT_SW_CPU_CLOCK, period)
            .and_then(|fd| attach_program(fd, prog))
            .map_err(|e| (cpu, e))?;
        events.push(fd);
    }
    let now = Instant::now();
    Ok(CpuClocks {
        events,
        jitter: jitter.then_some(draws),
        positions,
        last_rearm: now,
        next_rearm: now + first_interval,
    })
}

impl CpuClocks {
    /// Redraws every CPU's period (restarting its clock) once the time drawn for it has come;
    /// a no-op before that and with a fixed period. Called by the drain loop on every wake-up.
    pub fn rearm_if_due(&mut self, now: Instant) {
        let Some(jitter) = self.jitter else {
            return;
        };
        if now < self.next_rearm {
            return;
        }
        // The drain loop's wake-ups set the real interval; the last one is the best guess of the
        // next.
        let interval = now - self.last_rearm;
        for (fd, u) in self.events.iter().zip(&mut self.positions) {
            *u = (*u + GOLDEN_STEP).fract();
            let period = jitter.period_at(*u, interval);
            // SAFETY: PERF_EVENT_IOC_PERIOD on a perf event fd we hold, with a pointer to a u64
            // that lives across the call. A failure leaves the previous period: harmless.
            unsafe { libc::ioctl(fd.as_raw_fd(), PERF_EVENT_IOC_PERIOD as _, &period) };
        }
        self.last_rearm = now;
        self.next_rearm = now + jitter.min_interval();
    }
}

/// Opens a software perf event (`config`: `PERF_COUNT_SW_*`) on `cpu` for every process,
/// sampling every `period` (nanoseconds of a clock, occurrences of a counter), disabled until
/// a program is attached.
pub(super) fn open_software_event(cpu: u32, config: u64, period: u64) -> io::Result<OwnedFd> {
    // SAFETY: perf_event_attr is plain data; all-zero is its "nothing set" value.
    let mut attr: perf_event_attr = unsafe { std::mem::zeroed() };
    attr.type_ = PERF_TYPE_SOFTWARE;
    attr.size = size_of::<perf_event_attr>() as u32;
    attr.config = config;
    attr.__bindgen_anon_1.sample_period = period;
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

/// Attaches program `prog` (a raw fd) to perf event `fd` and enables the event.
pub(super) fn attach_program(fd: OwnedFd, prog: i32) -> io::Result<OwnedFd> {
    // SAFETY: ioctls on a perf event fd we own, with an int argument (the program fd) and
    // no argument.
    let attached = unsafe {
        libc::ioctl(fd.as_raw_fd(), PERF_EVENT_IOC_SET_BPF as _, prog) == 0
            && libc::ioctl(fd.as_raw_fd(), PERF_EVENT_IOC_ENABLE as _, 0) == 0
    };
    if attached {
        Ok(fd)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The long-run tick rate of a clock re-armed every `d` with periods `draws`: the mean of
    /// 1/p, less the half tick each restart loses.
    fn rate_hz(draws: &[u64], d: Duration) -> f64 {
        let inv: f64 = draws.iter().map(|&p| 1e9 / p as f64).sum::<f64>() / draws.len() as f64;
        inv - 1.0 / (2.0 * d.as_secs_f64())
    }

    #[test]
    fn the_long_run_rate_is_the_asked_one_and_periods_spread() {
        let mut rng = fastrand::Rng::with_seed(7);
        for hz in [19, 99, 997] {
            let j = Jitter::new(hz);
            for d in [
                Duration::from_millis(100),
                Duration::from_millis(250),
                Duration::from_secs(1),
            ] {
                // Re-arms are at least 10 periods apart (`draw_interval`).
                let d = d.max(Duration::from_nanos(10 * j.period_ns));
                let draws: Vec<u64> = (0..200_000).map(|_| j.period_at(rng.f64(), d)).collect();
                let rate = rate_hz(&draws, d);
                assert!(
                    (rate / hz as f64 - 1.0).abs() < 0.005,
                    "{hz} Hz, {d:?}: {rate}"
                );
                let base = j.base_period_ns(d);
                let (lo, hi) = (base * 0.5, base * 1.5);
                assert!(
                    draws
                        .iter()
                        .all(|&p| (lo - 1.0..=hi + 1.0).contains(&(p as f64)))
                );
                // Spread over the whole range, not a few values; and wide enough that the first
                // tick after a re-arm can fall anywhere in a loop of the nominal period.
                let quarter = base / 4.0;
                let low = draws.iter().filter(|&&p| (p as f64) < lo + quarter).count();
                let high = draws.iter().filter(|&&p| (p as f64) > hi - quarter).count();
                assert!(low > draws.len() / 5 && high > draws.len() / 5);
                assert!(hi - lo >= j.period_ns as f64);
            }
        }
        // Centred on 1/Hz, the rate would be ln 3 ≈ 1.1 × Hz: what the base corrects.
        let j = Jitter::new(99);
        let naive: Vec<u64> = (0..200_000)
            .map(|_| (j.period_ns as f64 * (0.5 + rng.f64())) as u64)
            .collect();
        let rate = rate_hz(&naive, Duration::from_secs(3600));
        assert!(rate / 99.0 > 1.09, "{rate}");
    }

    #[test]
    fn golden_steps_give_the_rate_within_a_window_not_only_in_the_long_run() {
        // A 30 s window at 99 Hz re-armed at every 250 ms drain is 120 re-arms per CPU.
        let j = Jitter::new(99);
        let d = Duration::from_millis(250);
        let mut rng = fastrand::Rng::with_seed(11);
        let mut worst_golden: f64 = 0.0;
        let mut worst_independent: f64 = 0.0;
        for _ in 0..200 {
            let mut u = rng.f64();
            let golden: Vec<u64> = (0..120)
                .map(|_| {
                    u = (u + GOLDEN_STEP).fract();
                    j.period_at(u, d)
                })
                .collect();
            let independent: Vec<u64> = (0..120).map(|_| j.period_at(rng.f64(), d)).collect();
            worst_golden = worst_golden.max((rate_hz(&golden, d) / 99.0 - 1.0).abs());
            worst_independent =
                worst_independent.max((rate_hz(&independent, d) / 99.0 - 1.0).abs());
        }
        assert!(worst_golden < 0.025, "golden steps: {worst_golden}");
        assert!(
            worst_independent > 0.04,
            "independent draws: {worst_independent}"
        );
    }

    #[test]
    fn a_rearm_waits_for_its_time_and_a_fixed_clock_never_moves() {
        let start = Instant::now();
        let mut clocks = CpuClocks {
            events: Vec::new(),
            jitter: Some(Jitter::new(99)),
            positions: Vec::new(),
            last_rearm: start,
            next_rearm: start + Duration::from_millis(30),
        };
        clocks.rearm_if_due(start);
        assert_eq!(clocks.next_rearm, start + Duration::from_millis(30));
        let later = start + Duration::from_millis(40);
        clocks.rearm_if_due(later);
        assert_eq!(clocks.next_rearm - later, Duration::from_nanos(101_010_100));
        assert_eq!(clocks.last_rearm, later);
        clocks.jitter = None;
        let due = clocks.next_rearm;
        clocks.rearm_if_due(due + Duration::from_secs(1));
        assert_eq!(clocks.next_rearm, due);
    }

    #[test]
    fn rearms_are_ten_periods_apart_and_100_ms_at_least() {
        assert_eq!(Jitter::new(10).min_interval(), Duration::from_secs(1));
        assert_eq!(
            Jitter::new(99).min_interval(),
            Duration::from_nanos(101_010_100)
        );
        assert_eq!(Jitter::new(1000).min_interval(), Duration::from_millis(100));
    }
}
