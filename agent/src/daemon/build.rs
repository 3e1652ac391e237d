//! Pure: one finished window of one container → the `Profile` object (name, labels, owner,
//! summary fields) and its artifacts (gzipped pprof, flame graph SVG, the figures as JSON).
use std::{
    collections::{BTreeMap, BTreeSet},
    time::{SystemTime, UNIX_EPOCH},
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kprof_crds::{
    IdleThreadInfo, MemorySummary, Profile, ProfileSpec, ProfileType, ProfilingTarget, ThreadInfo,
    ThreadSummary, TimeSummary, TopFunction, labels,
};
use kube::Resource as _;
use sha2::{Digest as _, Sha256};

use kprof_pprof::{
    Profile as PprofProfile,
    views::{self, Stacks},
};

use crate::{
    k8s::{ContainerKey, TargetKey},
    pprof,
    profile::{
        AggregatedProfile, MemoryReport, ThreadReport, ThreadState, summary::type_summary,
        threads::creator_name,
    },
    spool::{ArtifactKind, NewArtifact},
};

/// Rows kept in `topFunctions`.
pub const TOP_FUNCTIONS: usize = 10;

/// Everything known about one container's window.
#[derive(Clone, Debug)]
pub struct WindowOutput {
    pub target: TargetKey,
    pub container: ContainerKey,
    pub node: String,
    pub profile_type: ProfileType,
    pub window_start: SystemTime,
    pub window_end: SystemTime,
    /// The rate the sampler ran at (the highest any target on this node asks for).
    pub sample_hz: u32,
    /// CPU time the samples stand for: Σ 1/Hz over samples (exact when the rate changed).
    pub cpu_seconds: f64,
    /// Samples lost node-wide during the window (an upper bound for this container).
    pub lost: u64,
    pub runtime: String,
    pub pids: BTreeSet<u32>,
    pub warnings: Vec<String>,
    /// The aggregated samples of this container only.
    pub samples: AggregatedProfile,
}

/// A Kubernetes name of at most 63 characters, deterministic for (target, pod, container, type,
/// window start): a retry or a re-spool never makes a second Profile for the same window.
pub fn profile_name(
    target: &TargetKey,
    container: &ContainerKey,
    ty: ProfileType,
    window_start: SystemTime,
) -> String {
    let ms = window_start
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let mut h = Sha256::new();
    for part in [
        target.namespace.as_str(),
        target.name.as_str(),
        container.pod.as_str(),
        container.container.as_str(),
        ty.as_str(),
        &ms.to_string(),
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    let hash: String = h.finalize()[..5]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut prefix: String = target.name.chars().take(63 - 1 - hash.len()).collect();
    while prefix.ends_with(['-', '.']) {
        prefix.pop();
    }
    format!("{prefix}-{hash}")
}

/// A label value (≤ 63 characters, alphanumeric at both ends) for a name that may be longer.
pub fn label_value(s: &str) -> String {
    let mut v: String = s.chars().take(63).collect();
    while v.ends_with(|c: char| !c.is_ascii_alphanumeric()) {
        v.pop();
    }
    v
}

/// The owner reference to the target: deleting the target deletes its Profiles, but a Profile
/// never blocks that deletion and is not "controlled" (the operator owns targets' children).
pub fn owner_reference(target: &TargetKey) -> OwnerReference {
    OwnerReference {
        api_version: ProfilingTarget::api_version(&()).into_owned(),
        kind: ProfilingTarget::kind(&()).into_owned(),
        name: target.name.clone(),
        uid: target.uid.clone(),
        controller: Some(false),
        block_owner_deletion: Some(false),
    }
}

fn time(t: SystemTime) -> Time {
    Time(
        k8s_openapi::jiff::Timestamp::try_from(t)
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
}

/// Average cores over the window: CPU seconds ÷ window seconds (= samples ÷ (Hz × seconds)).
pub fn cpu_cores(cpu_seconds: f64, start: SystemTime, end: SystemTime) -> f64 {
    let secs = end.duration_since(start).unwrap_or_default().as_secs_f64();
    if secs <= 0.0 {
        0.0
    } else {
        // Three decimals are plenty for a summary and keep the object readable.
        (cpu_seconds / secs * 1000.0).round() / 1000.0
    }
}

/// The longest name (function, thread, location, warning) a Profile object carries: names come
/// from the profiled code, and one of a megabyte would make the object too large for the API
/// server, losing the window. The artifacts keep them whole.
const MAX_NAME_CHARS: usize = 512;

/// `s`, cut to [`MAX_NAME_CHARS`] characters (marked with `…`).
fn clip(s: &str) -> String {
    match s.char_indices().nth(MAX_NAME_CHARS) {
        None => s.to_owned(),
        Some((at, _)) => format!("{}…", &s[..at]),
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// A window's Profile object (artifact references are filled in by the uploader) and its
/// artifacts, all drawn from one pprof build.
pub fn build_window(w: &WindowOutput) -> (Profile, Vec<NewArtifact>) {
    let pprof = pprof::build(&w.samples);
    let stacks = Stacks::from_profile(&pprof, pprof.default_value_index());
    (
        build_profile(w, &stacks),
        build_artifacts(w, &pprof, &stacks),
    )
}

fn build_profile(w: &WindowOutput, stacks: &Stacks) -> Profile {
    let name = profile_name(&w.target, &w.container, w.profile_type, w.window_start);
    let rows = stacks.top();
    let total = w.samples.total();
    let top = rows
        .first()
        .filter(|_| total > 0)
        .map(|r| format!("{} {:.1}%", clip(&r.function), r.self_percent))
        .unwrap_or_default();
    let top_functions = rows
        .iter()
        .take(TOP_FUNCTIONS)
        .map(|r| TopFunction {
            function: clip(&r.function),
            location: r.location.as_deref().map(clip),
            self_percent: round1(r.self_percent),
            total_percent: round1(r.total_percent),
        })
        .collect();
    let threads: BTreeSet<&str> = w.samples.samples.keys().map(|k| &*k.thread).collect();
    let labels: BTreeMap<String, String> = [
        (labels::TARGET, label_value(&w.target.name)),
        (labels::POD, label_value(&w.container.pod)),
        (labels::CONTAINER, label_value(&w.container.container)),
        (labels::PROFILE_TYPE, w.profile_type.as_str().to_owned()),
        (labels::NODE, label_value(&w.node)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let mut warnings: Vec<String> = w.warnings.iter().map(|w| clip(w)).collect();
    if !w.samples.has_data() {
        warnings.push(match w.profile_type {
            ProfileType::Memory => {
                "no memory touched: no process of the container touched new memory in this window"
                    .to_owned()
            }
            ProfileType::Lock => {
                "no lock waits: no thread of the container blocked on a lock in this window"
                    .to_owned()
            }
            ProfileType::Threads => {
                "no threads: no process of the container was seen in this window".to_owned()
            }
            _ => "no samples: the container did not run on a CPU in this window".to_owned(),
        });
    }
    Profile {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(w.target.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![owner_reference(&w.target)]),
            ..Default::default()
        },
        spec: ProfileSpec {
            target: w.target.name.clone(),
            pod: w.container.pod.clone(),
            container: w.container.container.clone(),
            node: w.node.clone(),
            pids: w
                .pids
                .iter()
                .filter_map(|&p| i32::try_from(p).ok())
                .collect(),
            runtime: w.runtime.clone(),
            profile_type: w.profile_type,
            window_start: time(w.window_start),
            window_end: time(w.window_end),
            sample_hz: w.sample_hz,
            samples: total,
            lost_samples: w.lost,
            cpu_cores: cpu_cores(w.cpu_seconds, w.window_start, w.window_end),
            threads: match &w.samples.threads {
                Some(r) => r.total().end,
                None => u32::try_from(threads.len()).unwrap_or(u32::MAX),
            },
            top,
            top_functions,
            artifacts: Default::default(),
            time: time_summary(&w.samples),
            thread_summary: w.samples.threads.as_ref().map(thread_summary),
            memory_summary: w
                .samples
                .memory
                .as_ref()
                .map(|r| memory_summary(&w.samples, r)),
            warnings,
        },
    }
}

/// The totals of a wall or lock profile for its Profile object (`None` for other kinds): what
/// the threads' time adds up to, on CPU, waiting for a CPU, per wait class, and the GIL.
pub fn time_summary(p: &AggregatedProfile) -> Option<TimeSummary> {
    if !p.kind.needs_off_cpu() {
        return None;
    }
    let secs = |ns: u64| (ns as f64 / 1e6).round() / 1e3;
    let split = p.time_split();
    let state = |s| secs(split.by_state.get(&s).copied().unwrap_or(0));
    Some(TimeSummary {
        seconds: secs(p.total_value()),
        running_seconds: state(ThreadState::Running),
        runnable_seconds: state(ThreadState::Runnable),
        wait_seconds: split
            .by_class
            .iter()
            .map(|(c, v)| (c.as_str().to_owned(), secs(*v)))
            .collect(),
        gil_held_percent: p
            .gil_by_thread()
            .map(|t| p.percent_of_window(t.values().map(|(held, _)| held).sum())),
    })
}

/// The memory summary of a memory profile for its Profile object: the processes' resident
/// memory summed per reading, the bytes touched and held, the container's cgroup.
pub fn memory_summary(p: &AggregatedProfile, r: &MemoryReport) -> MemorySummary {
    use crate::proc::memory::ResidentMemory;
    // The processes are read together about every second: summed per reading time.
    let mut by_time: BTreeMap<u64, ResidentMemory> = BTreeMap::new();
    for u in &r.processes {
        for (t, m) in &u.series {
            let sum = by_time.entry(*t).or_default();
            sum.rss += m.rss;
            sum.anon += m.anon;
            sum.file += m.file;
        }
    }
    // Processes forked without exec share pages: their own share (PSS) is summed, not
    // resident memory that counts the shared pages in each.
    let end = r
        .processes
        .iter()
        .filter_map(|u| Some((u.end()?, u.own_anon()?)))
        .fold(ResidentMemory::default(), |mut sum, (m, own)| {
            sum.rss += m.rss;
            sum.anon += own;
            sum.file += m.file;
            sum
        });
    let anon = by_time.values().map(|m| m.anon);
    let cgroup = r.cgroups.first().and_then(|c| c.end());
    MemorySummary {
        heap: format!("{:.1}MiB", end.anon as f64 / f64::from(1 << 20)),
        rss_bytes: end.rss,
        anon_bytes: end.anon,
        file_bytes: end.file,
        anon_min_bytes: anon.clone().min().unwrap_or(end.anon),
        anon_max_bytes: anon.max().unwrap_or(end.anon),
        python_heap_bytes: r
            .processes
            .iter()
            .filter_map(|u| u.runtime_heap_end())
            .reduce(|a, b| a + b),
        alloc_bytes: p.total_value(),
        inuse_bytes: p.total_inuse(),
        container_usage_bytes: cgroup.map(|c| c.usage),
        container_limit_bytes: cgroup.and_then(|c| c.limit),
        oom_kills: r.cgroups.iter().map(|c| c.oom_kills).sum(),
        leak_suspected: !r.leaks.is_empty(),
    }
}

/// Rows of `threadSummary.threads` and `idle`, and frames of `blockedIn`.
const THREAD_ROWS: usize = 50;
const IDLE_ROWS: usize = 20;
const BLOCKED_FRAMES: usize = 16;

/// The thread summary of a threads profile for its Profile object.
pub fn thread_summary(r: &ThreadReport) -> ThreadSummary {
    let secs = |ns: u64| (ns as f64 / 1e6).round() / 1e3;
    let t = r.total();
    let mut rows: Vec<&crate::profile::threads::ThreadRow> = r.threads.iter().collect();
    // The threads alive at the end first: a server's many short-lived handler threads would
    // otherwise push its long-lived ones out of the rows.
    rows.sort_by(|a, b| (b.alive, b.cpu_ns, a.pid, a.tid).cmp(&(a.alive, a.cpu_ns, b.pid, b.tid)));
    ThreadSummary {
        alive_at_start: t.start,
        alive_at_end: t.end,
        min: t.min,
        max: t.max,
        created: t.created,
        exited: t.exited,
        threads: rows
            .iter()
            .take(THREAD_ROWS)
            .map(|t| ThreadInfo {
                pid: t.pid,
                tid: t.tid,
                name: clip(&t.name),
                state: t.state.to_string(),
                cpu_seconds: secs(t.cpu_ns),
                off_cpu_seconds: secs(t.off_cpu_ns),
                created: t.created,
                created_by: t.creator.as_deref().map(creator_name).map(|c| clip(&c)),
            })
            .collect(),
        threads_omitted: u32::try_from(rows.len().saturating_sub(THREAD_ROWS)).unwrap_or(0),
        idle: r
            .idle
            .iter()
            .take(IDLE_ROWS)
            .map(|t| IdleThreadInfo {
                pid: t.pid,
                tid: t.tid,
                name: clip(&t.name),
                age_seconds: t.age_s,
                cpu_seconds: secs(t.cpu_ns),
                blocked_in: t
                    .blocked_in
                    .iter()
                    .take(BLOCKED_FRAMES)
                    .map(|f| clip(&f.to_string()))
                    .collect(),
                created_by: t.creator.as_deref().map(creator_name).map(|c| clip(&c)),
            })
            .collect(),
        leak_suspected: !r.leaks.is_empty(),
    }
}

/// The artifacts of a window (none when it has no samples).
fn build_artifacts(w: &WindowOutput, pprof: &PprofProfile, stacks: &Stacks) -> Vec<NewArtifact> {
    if !w.samples.has_data() {
        return Vec::new();
    }
    let title = format!(
        "kprof {} {}/{}/{} {}",
        w.profile_type,
        w.target.namespace,
        w.container.pod,
        w.container.container,
        time(w.window_start).0.strftime("%Y-%m-%dT%H:%M:%SZ")
    );
    vec![
        NewArtifact {
            kind: ArtifactKind::Pprof,
            bytes: pprof.encode_gzip(),
        },
        NewArtifact {
            kind: ArtifactKind::Flamegraph,
            bytes: views::flamegraph_svg(stacks, &title),
        },
        NewArtifact {
            kind: ArtifactKind::Summary,
            bytes: type_summary(&w.samples).to_string().into_bytes(),
        },
    ]
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::*;
    use crate::{
        k8s::ContainerId,
        profile::{Frame, FrameKind, SampleKey},
    };

    fn window() -> WindowOutput {
        let start = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut samples = AggregatedProfile::new(99, start);
        let hot: Arc<[Frame]> = vec![
            Frame::new(FrameKind::Native, "spin"),
            Frame::new(FrameKind::Native, "main"),
        ]
        .into();
        let cold: Arc<[Frame]> = vec![Frame::new(FrameKind::Native, "main")].into();
        samples.add(
            SampleKey {
                pid: 7,
                tid: 0,
                thread: "busy".into(),
                wait: None,
                gil_held: None,
                stack: hot,
            },
            396,
        );
        samples.add(
            SampleKey {
                pid: 7,
                tid: 0,
                thread: "busy2".into(),
                wait: None,
                gil_held: None,
                stack: cold,
            },
            99,
        );
        samples.duration = Duration::from_secs(5);
        WindowOutput {
            target: TargetKey {
                namespace: "shop".into(),
                name: "checkout".into(),
                uid: "u-1".into(),
            },
            container: ContainerKey {
                namespace: "shop".into(),
                pod: "web-1".into(),
                pod_uid: "pu".into(),
                container: "app".into(),
                id: ContainerId {
                    runtime: "containerd".into(),
                    id: "ab".into(),
                },
            },
            node: "n1".into(),
            profile_type: ProfileType::Cpu,
            window_start: start,
            window_end: start + Duration::from_secs(5),
            sample_hz: 99,
            cpu_seconds: 495.0 / 99.0,
            lost: 0,
            runtime: "native".into(),
            pids: [7].into(),
            warnings: vec![],
            samples,
        }
    }

    #[test]
    fn names_are_deterministic_and_short() {
        let w = window();
        let a = profile_name(&w.target, &w.container, ProfileType::Cpu, w.window_start);
        assert_eq!(
            a,
            profile_name(&w.target, &w.container, ProfileType::Cpu, w.window_start)
        );
        assert!(
            a.starts_with("checkout-") && a.len() == "checkout-".len() + 10,
            "{a}"
        );
        let b = profile_name(&w.target, &w.container, ProfileType::Wall, w.window_start);
        let c = profile_name(
            &w.target,
            &w.container,
            ProfileType::Cpu,
            w.window_start + Duration::from_secs(5),
        );
        assert!(a != b && a != c && b != c);
        let mut long = w.target.clone();
        long.name = format!("{}-x", "a".repeat(70));
        let n = profile_name(&long, &w.container, ProfileType::Cpu, w.window_start);
        assert!(n.len() <= 63, "{n}");
        long.name = format!("{}-x", "a".repeat(51));
        let n = profile_name(&long, &w.container, ProfileType::Cpu, w.window_start);
        assert!(!n.contains("--"), "{n}");
        assert_eq!(
            label_value(&format!("{}-z", "p".repeat(62))),
            "p".repeat(62)
        );
    }

    #[test]
    fn names_from_the_profiled_code_are_clipped_in_the_profile_object_only() {
        let mut w = window();
        // A tenant's function name of a megabyte (and multi-byte characters at the cut).
        let huge = format!("é{}", "x".repeat(1 << 20));
        let stack: Arc<[Frame]> = vec![Frame::new(FrameKind::Native, huge.as_str())].into();
        w.samples.add(
            SampleKey {
                pid: 7,
                tid: 1,
                thread: "t".into(),
                wait: None,
                gil_held: None,
                stack,
            },
            10_000,
        );
        w.warnings.push("w".repeat(1 << 20));
        let (p, artifacts) = build_window(&w);
        let top = &p.spec.top_functions[0].function;
        assert_eq!(
            top.chars().count(),
            MAX_NAME_CHARS + 1,
            "clipped, with its mark"
        );
        assert!(top.starts_with('é') && top.ends_with('…'));
        assert!(p.spec.top.len() < 2 * MAX_NAME_CHARS);
        assert!(
            p.spec
                .warnings
                .iter()
                .all(|w| w.chars().count() <= MAX_NAME_CHARS + 1)
        );
        let object = serde_json::to_vec(&p).unwrap();
        assert!(object.len() < 64 << 10, "{} bytes", object.len());
        // The pprof keeps the name whole.
        let pprof = artifacts
            .iter()
            .find(|a| a.kind == ArtifactKind::Pprof)
            .unwrap();
        let pprof = PprofProfile::decode_bytes(&pprof.bytes).unwrap();
        assert!(pprof.string_table.contains(&huge));
        assert_eq!(clip("short"), "short");
    }

    #[test]
    fn profile_fields_labels_and_owner() {
        let w = window();
        let (p, _) = build_window(&w);
        assert_eq!(p.metadata.namespace.as_deref(), Some("shop"));
        let l = p.metadata.labels.as_ref().unwrap();
        assert_eq!(l[labels::TARGET], "checkout");
        assert_eq!(l[labels::POD], "web-1");
        assert_eq!(l[labels::CONTAINER], "app");
        assert_eq!(l[labels::PROFILE_TYPE], "cpu");
        assert_eq!(l[labels::NODE], "n1");
        let o = &p.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(o.api_version, "kprof.io/v1alpha1");
        assert_eq!(o.kind, "ProfilingTarget");
        assert_eq!((o.name.as_str(), o.uid.as_str()), ("checkout", "u-1"));
        assert_eq!(
            (o.controller, o.block_owner_deletion),
            (Some(false), Some(false))
        );
        let s = &p.spec;
        assert_eq!(s.samples, 495);
        // 495 samples at 99 Hz over 5 s = 1 core.
        assert!((s.cpu_cores - 1.0).abs() < 1e-9, "{}", s.cpu_cores);
        assert_eq!(s.threads, 2);
        assert_eq!(s.top, "spin 80.0%");
        assert_eq!(s.top_functions[0].function, "spin");
        assert_eq!(s.top_functions[0].self_percent, 80.0);
        assert_eq!(s.top_functions[1].total_percent, 100.0);
        assert_eq!(s.pids, [7]);
        assert!(s.warnings.is_empty());
        let (_, arts) = build_window(&w);
        assert_eq!(arts.len(), 3);
        assert!(String::from_utf8_lossy(&arts[1].bytes).contains("<svg"));
        // The figures as record's summary.json has them for the type.
        assert_eq!(arts[2].kind, ArtifactKind::Summary);
        let figures: serde_json::Value = serde_json::from_slice(&arts[2].bytes).unwrap();
        assert_eq!(figures, type_summary(&w.samples));
        assert_eq!(figures["samples"], w.samples.total());
    }

    #[test]
    fn threads_alive_at_the_end_are_listed_before_busier_ones_that_exited() {
        use crate::profile::threads::ThreadRow;
        let row = |tid: u32, cpu_ns: u64, alive: bool| ThreadRow {
            pid: 1,
            tid,
            name: format!("t{tid}").into(),
            cpu_ns,
            off_cpu_ns: 0,
            state: if alive { 'S' } else { 'X' },
            created: !alive,
            alive,
            creator: None,
        };
        // 60 busy handler threads that came and went, and two quiet long-lived ones.
        let mut threads: Vec<ThreadRow> =
            (100..160).map(|tid| row(tid, 5_000_000, false)).collect();
        threads.push(row(2, 1_000, true));
        threads.push(row(3, 2_000, true));
        let r = ThreadReport {
            threads,
            ..ThreadReport::default()
        };
        let s = thread_summary(&r);
        let tids: Vec<u32> = s.threads.iter().map(|t| t.tid).collect();
        assert_eq!(tids[..2], [3, 2]);
        assert_eq!(s.threads.len(), THREAD_ROWS);
        assert_eq!(s.threads_omitted, 12);
    }

    #[test]
    fn cpu_math_and_empty_windows() {
        let t0 = UNIX_EPOCH;
        assert!((cpu_cores(2.5, t0, t0 + Duration::from_secs(5)) - 0.5).abs() < 1e-9);
        assert_eq!(cpu_cores(1.0, t0, t0), 0.0);
        let mut w = window();
        w.samples.samples.clear();
        w.cpu_seconds = 0.0;
        let (p, arts) = build_window(&w);
        assert_eq!((p.spec.samples, p.spec.top.as_str()), (0, ""));
        assert_eq!(p.spec.warnings.len(), 1);
        assert!(arts.is_empty());
    }

    #[test]
    fn a_wall_profile_sums_its_time_by_state_class_and_gil() {
        use crate::profile::{ProfileKind, Wait, WaitClass};
        let start = UNIX_EPOCH;
        let mut p = AggregatedProfile::of_kind(ProfileKind::Wall { sample_hz: 99 }, start);
        p.duration = Duration::from_secs(10);
        let key = |wait: Wait, gil_held: Option<bool>| SampleKey {
            wait: Some(wait),
            gil_held,
            ..SampleKey::of(7, "t", vec![Frame::new(FrameKind::Python, "f")])
        };
        let sleeping = |class| Wait {
            state: ThreadState::Sleeping,
            class: Some(class),
            lock: None,
        };
        p.add_value(key(Wait::RUNNING, Some(true)), 300, 3_000_000_000);
        p.add_value(key(Wait::RUNNING, Some(false)), 100, 1_000_000_000);
        p.add_value(key(sleeping(WaitClass::Gil), None), 9, 4_000_000_000);
        p.add_value(key(sleeping(WaitClass::Io), None), 2, 1_500_000_000);
        let t = time_summary(&p).unwrap();
        assert_eq!(
            (t.seconds, t.running_seconds, t.runnable_seconds),
            (9.5, 4.0, 0.0)
        );
        assert_eq!(t.wait_seconds["gil"], 4.0);
        assert_eq!(t.wait_seconds["io"], 1.5);
        assert_eq!(t.gil_held_percent, Some(30.0));
        assert!(time_summary(&AggregatedProfile::new(99, start)).is_none());
    }
}
