//! Kernel tests of the allocation probes (memory profiles, on demand): uprobes on
//! `PyTraceMalloc_Track`/`_Untrack` in the profiled process only, allocations sampled by bytes
//! in eBPF, through `kprof_agent::record` (`kprof-agent record --types memory --alloc-probes`),
//! on every installed CPython (pyenv 3.8–3.13, the built 3.14, the distribution's 3.11 and a C
//! program embedding its libpython).
//!
//! The workload (`workloads/python/probes.py`) counts what it reports: blocks kept and blocks
//! freed at once (through ctypes, on every interpreter), and, where NumPy is installed for the
//! interpreter (`$KPROF_CACHE/pylibs/3.X`), NumPy arrays kept and dropped. The probed
//! allocation view must give each function its reported bytes within ±25 %, the probed in-use
//! view the kept bytes within ±25 % and the freed ones (almost) nothing; without
//! `--alloc-probes` nothing is probed. And the node agent's rights suffice: `kprof-agent record`
//! as uid 65532 with only CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE and CAP_SYSLOG (what the
//! DaemonSet grants) probes the distribution's interpreter too.
//!
//! Needs root and the eBPF object; otherwise it prints `SKIP` and passes — unless
//! `KPROF_REQUIRE_KERNEL=1`, which turns a skip into a failure.
//!
//!   sudo -E cargo test -p kprof-agent --test python_alloc_probes -- --nocapture

#[path = "workloads/python/harness.rs"]
mod harness;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use kprof_agent::kernel::loader::DEFAULT_ALLOC_PERIOD;
use kprof_agent::profile::{AggregatedProfile, FrameKind};
use kprof_agent::record::{ProfileType, RecordOptions, record};

/// Seconds the workload reports allocations for.
const SECONDS: u64 = 3;

fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1 << 20)
}

/// (probed bytes, probed in-use bytes) of the stacks running each workload function.
fn probed_by_function(p: &AggregatedProfile) -> BTreeMap<String, (u64, u64)> {
    let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for key in p.samples.keys() {
        let Some(f) = key
            .stack
            .iter()
            .find(|f| f.kind == FrameKind::Python && f.function.contains("_"))
        else {
            continue;
        };
        let name = f
            .function
            .rsplit('.')
            .next()
            .unwrap_or_default()
            .to_string();
        let ((_, alloc), (_, held)) = p.probed_of(key);
        let e = out.entry(name).or_default();
        e.0 += alloc;
        e.1 += held;
    }
    out
}

fn check(interp: &harness::Interp, dir: &Path) -> Result<String, String> {
    let truth_path = dir.join("truth.json");
    let cache = std::env::var("KPROF_CACHE").unwrap_or_else(|_| "/var/cache/kprof".into());
    let pylibs = harness::minor_of(interp)
        .map(|m| Path::new(&cache).join(format!("pylibs/3.{m}")))
        .filter(|d| d.join("numpy").is_dir());
    let mut command = vec!["/usr/bin/env".to_string()];
    if let Some(d) = &pylibs {
        command.push(format!("PYTHONPATH={}", d.display()));
    }
    command.push(interp.path.to_string_lossy().to_string());
    command.extend(interp.pre_args.iter().cloned());
    command.push(harness::script("probes.py").to_string_lossy().to_string());
    command.push(truth_path.to_string_lossy().to_string());
    command.push(SECONDS.to_string());
    let opts = RecordOptions {
        command,
        duration: Duration::from_secs(SECONDS + 3),
        progress: false,
        types: vec![ProfileType::Memory],
        alloc_probes: Some(DEFAULT_ALLOC_PERIOD),
        ..RecordOptions::default()
    };
    let rec = record(&opts, &AtomicBool::new(false)).map_err(|e| format!("record: {e}"))?;
    let text = std::fs::read_to_string(&truth_path).map_err(|e| format!("truth: {e}"))?;
    let truth: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("truth: {e}"))?;
    let p = rec
        .of_type(ProfileType::Memory)
        .ok_or("no memory profile")?;
    let got = probed_by_function(p);
    let figure = |name: &str| {
        let (alloc, held) = got.get(name).copied().unwrap_or_default();
        let want = truth[name].as_u64().unwrap_or(0);
        format!(
            "{name} {:.0}/{:.0} MiB (held {:.0})",
            mib(alloc),
            mib(want),
            mib(held)
        )
    };
    let numpy = truth["numpy"].as_str().is_some();
    let mut names = vec!["keep_blocks", "churn_blocks"];
    if numpy {
        names.extend(["keep_arrays", "churn_arrays"]);
    }
    let figures = names
        .iter()
        .map(|n| figure(n))
        .collect::<Vec<_>>()
        .join(", ");
    let within = |got: u64, want: u64, what: &str| -> Result<(), String> {
        let ratio = got as f64 / want.max(1) as f64;
        if (0.75..=1.25).contains(&ratio) {
            Ok(())
        } else {
            Err(format!(
                "{what}: {ratio:.2}× the truth; {figures}; warnings {:?}",
                p.warnings
            ))
        }
    };
    for name in &names {
        let (alloc, held) = got.get(*name).copied().unwrap_or_default();
        let want = truth[*name].as_u64().unwrap_or(0);
        within(alloc, want, &format!("{name}'s probed bytes"))?;
        if name.starts_with("keep") {
            within(held, want, &format!("{name}'s probed bytes in use"))?;
        } else if held > want / 20 {
            return Err(format!(
                "{name} frees what it allocates but holds {:.1} MiB; {figures}",
                mib(held)
            ));
        }
    }
    if pylibs.is_some() && !numpy {
        return Err(format!("NumPy under {:?} did not import", pylibs));
    }
    Ok(format!(
        "{figures}{}",
        if numpy { "" } else { " (no NumPy for it)" }
    ))
}

#[test]
fn probed_allocations_match_what_the_program_reported_on_every_interpreter() {
    if !harness::kernel_or_skip("python_alloc_probes") {
        return;
    }
    let interps = harness::interpreters();
    harness::assert_required_minors(&interps);
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut failed = Vec::new();
    for interp in &interps {
        let sub = dir.path().join(interp.name.replace('/', "_"));
        std::fs::create_dir_all(&sub).expect("temporary directory");
        match check(interp, &sub) {
            Ok(summary) => println!("ok    {:<24} {summary}", interp.name),
            Err(e) => {
                println!("FAIL  {:<24} {e}", interp.name);
                failed.push(interp.name.clone());
            }
        }
    }
    assert!(
        failed.is_empty(),
        "allocation probes wrong on: {}",
        failed.join(", ")
    );
}

/// The agent's user and capabilities in the DaemonSet.
const AGENT_UID: &str = "65532";
const AGENT_CAPS: &str = "+bpf,+perfmon,+sys_ptrace,+syslog";

#[test]
fn the_node_agents_capabilities_suffice_for_allocation_probes() {
    if !harness::kernel_or_skip("python_alloc_probes") {
        return;
    }
    // An interpreter the agent's user may read (pyenv's live under /root).
    let Some(interp) = harness::interpreters().into_iter().find(|i| {
        i.pre_args.is_empty() && i.path.starts_with("/usr") && harness::minor_of(i).is_some()
    }) else {
        assert!(
            std::env::var("KPROF_REQUIRE_KERNEL").as_deref() != Ok("1"),
            "no interpreter under /usr for the unprivileged agent"
        );
        eprintln!(
            "SKIPPED the_node_agents_capabilities_suffice_for_allocation_probes: no interpreter under /usr"
        );
        return;
    };
    if std::process::Command::new("setpriv")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("setpriv (util-linux) is needed to drop to the agent's rights");
    }
    // The agent and the workload where uid 65532 may run and write them.
    let dir = tempfile::tempdir().expect("temporary directory");
    let agent = dir.path().join("kprof-agent");
    let script = dir.path().join("probes.py");
    std::fs::copy(env!("CARGO_BIN_EXE_kprof-agent"), &agent).expect("copy the agent");
    std::fs::copy(harness::script("probes.py"), &script).expect("copy the workload");
    let world = |p: &Path, mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    };
    world(dir.path(), 0o777);
    world(&agent, 0o755);
    world(&script, 0o644);
    let truth_path = dir.path().join("truth.json");
    let out = dir.path().join("out");
    let o = std::process::Command::new("setpriv")
        .args([
            &format!("--reuid={AGENT_UID}"),
            &format!("--regid={AGENT_UID}"),
            "--clear-groups",
            &format!("--inh-caps=-all,{AGENT_CAPS}"),
            &format!("--ambient-caps=-all,{AGENT_CAPS}"),
            &format!("--bounding-set=-all,{AGENT_CAPS}"),
        ])
        .arg(&agent)
        .args(["record", "--types", "memory", "--alloc-probes", "-d"])
        .arg(format!("{}s", SECONDS + 3))
        .arg("-o")
        .arg(&out)
        .arg("--")
        .arg(&interp.path)
        .arg(&script)
        .arg(&truth_path)
        .arg(SECONDS.to_string())
        .output()
        .expect("run setpriv");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "record as the agent's user failed: {err}"
    );
    assert!(
        !err.contains("no allocation probes"),
        "the agent's rights did not suffice for allocation probes: {err}"
    );
    let truth: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&truth_path).expect("truth")).expect("truth");
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("summary.json")).expect("summary.json"),
    )
    .expect("summary.json");
    let held = summary["memory"]["probed_inuse_bytes"]
        .as_u64()
        .unwrap_or(0);
    let kept =
        truth["keep_blocks"].as_u64().unwrap_or(0) + truth["keep_arrays"].as_u64().unwrap_or(0);
    println!(
        "{} as uid {AGENT_UID}: probed in use {:.0} MiB, kept {:.0} MiB",
        interp.name,
        mib(held),
        mib(kept)
    );
    assert!(kept > 0, "the workload kept nothing: {truth}");
    let ratio = held as f64 / kept as f64;
    assert!(
        (0.75..=1.25).contains(&ratio),
        "probed in use {held} B for {kept} B kept ({ratio:.2}×): {err}"
    );
}
