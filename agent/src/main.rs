//! `kprof-agent`: the kprof node agent command line.
use std::{
    path::PathBuf,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kprof_agent::{
    cli::{parse_duration, parse_hz},
    kernel::loader,
    record::{self, RecordOptions},
};

#[derive(Parser)]
#[command(
    name = "kprof-agent",
    version,
    about = "kprof node agent: eBPF CPU, wall-clock and lock profiler"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Profile running processes or a command, write DIR/<type>.pb.gz and DIR/<type>.svg per
    /// profile type (the CPU profile also as DIR/profile.pb.gz and DIR/flamegraph.svg), and
    /// print the top functions.
    Record(RecordArgs),
    /// Print what this machine supports (eBPF object, capabilities, BTF, fork follower).
    SystemInfo,
    /// Run as the node agent in a Kubernetes cluster: profile the containers that
    /// ProfilingTargets select on this node and write a Profile per window.
    Run(kprof_agent::daemon::RunArgs),
}

#[derive(clap::Args)]
struct RecordArgs {
    /// Process to profile (all its threads and, by default, its children). Repeatable.
    #[arg(short, long = "pid", value_name = "PID")]
    pids: Vec<u32>,
    /// Length of the window (e.g. 10s, 500ms, 2m). A command is stopped when it elapses.
    #[arg(short, long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Sampling frequency per CPU, 1–1000 Hz.
    #[arg(long, default_value = "99", value_parser = parse_hz)]
    hz: u32,
    /// Output directory.
    #[arg(short, long, value_name = "DIR")]
    output: PathBuf,
    /// Do not profile children forked by the targets.
    #[arg(long)]
    no_follow: bool,
    /// Do not collect Python frames.
    #[arg(long)]
    no_python: bool,
    /// Walk native stacks by frame pointers only (no `.eh_frame` unwinding), to compare.
    #[arg(long)]
    frame_pointers_only: bool,
    /// Profile types, comma separated: cpu (on-CPU time), wall (on- and off-CPU time per thread,
    /// by state and wait class), lock (time blocked on locks, by site and lock), threads
    /// (counts, names, the code that creates them, idle threads and leaks), memory (bytes
    /// first touched and still held, by the code that touched them; large blocks mapped and
    /// still mapped, by the code that asked for them; heap usage and leaks).
    #[arg(long, value_delimiter = ',', default_value = "cpu", value_parser = parse_type)]
    types: Vec<record::ProfileType>,
    /// Memory profiles: also sample the allocations Python processes report through
    /// `PyTraceMalloc_Track` (NumPy's arrays, extensions that tell tracemalloc about their
    /// memory), by bytes, with uprobes in those processes only. Each reported allocation and
    /// free then costs its process a trap into the kernel (~1–3 µs).
    #[arg(long)]
    alloc_probes: bool,
    /// Rows of the top table.
    #[arg(long, default_value = "20")]
    top: usize,
    /// Command to start and profile.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

fn parse_type(s: &str) -> Result<record::ProfileType, String> {
    use record::ProfileType as T;
    [T::Cpu, T::Wall, T::Lock, T::Threads, T::Memory]
        .into_iter()
        .find(|t| t.as_str() == s.trim())
        .ok_or_else(|| format!("unknown profile type {s:?} (cpu, wall, lock, threads, memory)"))
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KPROF_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Record(args) => run_record(args),
        Command::SystemInfo => system_info(),
        Command::Run(args) => kprof_agent::daemon::run(args)
            .map(|()| ExitCode::SUCCESS)
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line: the error and its causes.
            eprintln!("kprof-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_record(args: RecordArgs) -> anyhow::Result<ExitCode> {
    if args.pids.is_empty() && args.command.is_empty() {
        anyhow::bail!("nothing to profile: give --pid PID or a command after --");
    }
    record::prepare_output_dir(&args.output)?;
    // Ctrl-C / SIGTERM end the window early; the profile is still written.
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    if args.alloc_probes && !args.types.contains(&record::ProfileType::Memory) {
        anyhow::bail!("--alloc-probes needs the memory profile type (--types memory)");
    }
    let opts = RecordOptions {
        alloc_probes: args
            .alloc_probes
            .then_some(kprof_agent::kernel::loader::DEFAULT_ALLOC_PERIOD),
        pids: args.pids,
        command: args.command,
        duration: args.duration,
        sample_hz: args.hz,
        follow_children: !args.no_follow,
        python: !args.no_python,
        unwind_tables: !args.frame_pointers_only,
        progress: true,
        clock_jitter: true,
        types: args.types,
        ..RecordOptions::default()
    };
    let rec = record::record(&opts, &STOP)?;
    let title = if opts.command.is_empty() {
        format!("kprof: pid {:?}", opts.pids)
    } else {
        format!("kprof: {}", opts.command.join(" "))
    };
    record::write_outputs(&rec, &args.output, &title)
        .with_context(|| format!("writing {}", args.output.display()))?;

    print!("{}", record::top_table(&rec, args.top));
    let s = &rec.stats;
    eprintln!(
        "kprof: {} samples ({} dropped) from {} process(es) in {:.1}s at {} Hz; eBPF {:.2} µs/run; agent CPU {:.3}s ({:.3}s before sampling); peak RSS {} MiB",
        s.events,
        s.dropped,
        rec.profile().processes.len(),
        s.wall.as_secs_f64(),
        opts.sample_hz,
        s.kernel_ns_per_run() / 1000.0,
        s.agent_cpu.as_secs_f64(),
        s.startup_cpu.as_secs_f64(),
        s.peak_rss_kib / 1024,
    );
    for (pid, p) in &rec.profile().processes {
        if let Some(rt) = &p.runtime {
            eprintln!("kprof: pid {pid} ({}): {rt}", p.name);
        }
    }
    for w in &rec.profile().warnings {
        eprintln!("kprof: warning: {w}");
    }
    let names: Vec<String> = rec
        .profiles
        .iter()
        .map(|p| format!("{0}.pb.gz {0}.svg", p.kind.name()))
        .collect();
    eprintln!(
        "kprof: wrote {}: {} summary.json",
        args.output.display(),
        names.join(" ")
    );
    Ok(match rec.exit_status {
        Some(st) if !st.success() && st.code().is_some() => {
            eprintln!("kprof: command exited with {st}");
            ExitCode::SUCCESS
        }
        _ => ExitCode::SUCCESS,
    })
}

fn system_info() -> anyhow::Result<ExitCode> {
    let yes = |b: bool| if b { "yes" } else { "no" };
    println!("ebpf programs built in: {}", yes(loader::ebpf_available()));
    println!(
        "capabilities (BPF+PERFMON or SYS_ADMIN): {}",
        yes(loader::check_capabilities().is_ok())
    );
    println!(
        "kernel BTF: {}",
        yes(std::path::Path::new("/sys/kernel/btf/vmlinux").exists())
    );
    println!(
        "children followed (task_struct offsets in kernel BTF): {}",
        yes(kprof_agent::kernel::btf::task_offsets().is_ok())
    );
    Ok(ExitCode::SUCCESS)
}
