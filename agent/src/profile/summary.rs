//! The figures of one window's profile as JSON (`summary.json` of `record`, and the `summary`
//! artifact of a node agent's Profile): what its values add up to, and per type the split of
//! wall and lock time, the GIL, threads over time and memory over time.
use crate::profile::{AggregatedProfile, ProfileKind};

/// The figures of one profile for `summary.json`: what its values add up to, and for wall and
/// lock profiles the split by state, wait class and thread.
pub fn type_summary(p: &AggregatedProfile) -> serde_json::Value {
    let secs = |ns: u64| (ns as f64 / 1e6).round() / 1e3;
    let mut out = serde_json::json!({
        "samples": p.total(),
        "seconds": secs(p.total_value()),
    });
    if p.kind.needs_off_cpu() {
        let split = p.time_split();
        let map = |m: Vec<(&str, u64)>| -> serde_json::Value {
            m.into_iter()
                .map(|(k, v)| (k.to_owned(), serde_json::Value::from(secs(v))))
                .collect()
        };
        out["state_seconds"] = map(split
            .by_state
            .iter()
            .map(|(s, v)| (s.as_str(), *v))
            .collect());
        out["wait_class_seconds"] = map(split
            .by_class
            .iter()
            .map(|(c, v)| (c.as_str(), *v))
            .collect());
        out["threads"] = split
            .by_thread
            .iter()
            .map(|(tid, (name, ns))| serde_json::json!({"tid": tid, "name": &**name, "seconds": secs(*ns)}))
            .collect();
    }
    if p.kind == ProfileKind::Lock {
        out["contentions"] = p.total().into();
    }
    if let Some(gil) = gil_summary(p) {
        out["gil"] = gil;
    }
    if let Some(report) = &p.threads {
        out["threads"] = threads_summary(report);
    }
    if let Some(report) = &p.memory {
        out = memory_summary(p, report);
    }
    out
}

/// The figures of a memory profile: bytes touched and held, each process's resident memory
/// over the window, the container's, and leaks.
fn memory_summary(p: &AggregatedProfile, r: &crate::profile::MemoryReport) -> serde_json::Value {
    let mem = |m: &crate::proc::memory::ResidentMemory| serde_json::json!({"rss": m.rss, "anon": m.anon, "file": m.file, "shmem": m.shmem});
    serde_json::json!({
        "samples": p.total(),
        "alloc_bytes": p.total_value(),
        "inuse_bytes": p.total_inuse(),
        "mapped_bytes": r.mapped.values().map(|v| v.1).sum::<u64>(),
        "mapped_inuse_bytes": r.mapped_inuse.values().map(|v| v.1).sum::<u64>(),
        "probed_bytes": r.probed.values().map(|v| v.1).sum::<u64>(),
        "probed_inuse_bytes": r.probed_inuse.values().map(|v| v.1).sum::<u64>(),
        "period_bytes": p.kind.nominal_value(),
        "file_backed_bytes": r.faults.file_bytes,
        "pages_tracked": r.faults.tracked,
        "processes": r.processes.iter().map(|u| {
            let (min, max) = u.anon_range();
            let python = u.runtime_heap_end();
            serde_json::json!({
                "pid": u.pid, "name": u.name,
                "end": u.end().as_ref().map(mem),
                "anon_min": min, "anon_max": max,
                "python_heap": python,
                "pss_anon": u.pss_anon,
                "forked_from": u.forked_from,
                "native_heap": python.zip(u.end()).map(|(p, m)| m.anon.saturating_sub(p)),
                "python_heap_series": u.runtime_heap.iter()
                    .map(|(t, b)| serde_json::json!({"t": *t as f64 / 1e9, "bytes": b}))
                    .collect::<Vec<_>>(),
                "series": u.series.iter().map(|(t, m)| serde_json::json!({
                    "t": *t as f64 / 1e9, "rss": m.rss, "anon": m.anon, "file": m.file,
                })).collect::<Vec<_>>(),
            })
        }).collect::<Vec<_>>(),
        "cgroups": r.cgroups.iter().map(|c| serde_json::json!({
            "pids": c.pids,
            "usage": c.end().map(|m| m.usage),
            "limit": c.end().and_then(|m| m.limit),
            "oom_kills": c.oom_kills,
            "series": c.series.iter().map(|(t, m)| serde_json::json!({
                "t": *t as f64 / 1e9, "usage": m.usage,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "leaks": r.leaks.iter().map(|l| serde_json::json!({
            "pid": l.pid, "from_bytes": l.from_bytes, "to_bytes": l.to_bytes,
            "seconds": l.seconds,
            "grown_by": l.grown_by.iter().map(|(s, b)| serde_json::json!({
                "stack": s.iter().map(|f| f.function.to_string()).collect::<Vec<_>>(),
                "bytes": b,
            })).collect::<Vec<_>>(),
            "message": l.message(),
        })).collect::<Vec<_>>(),
    })
}

/// The figures of a threads profile: counts per process, every thread, idle threads, leaks.
fn threads_summary(r: &crate::profile::ThreadReport) -> serde_json::Value {
    use crate::profile::threads::creator_name;
    let secs = |ns: u64| (ns as f64 / 1e6).round() / 1e3;
    let stack = |s: &[crate::profile::Frame]| -> Vec<String> {
        s.iter().map(|f| f.function.to_string()).collect()
    };
    serde_json::json!({
        "processes": r.processes.iter().map(|(pid, c)| serde_json::json!({
            "pid": pid, "start": c.start, "end": c.end, "min": c.min, "max": c.max,
            "created": c.created, "exited": c.exited,
            "series": c.series.iter().map(|(t, n)| serde_json::json!([*t as f64 / 1e9, n]))
                .collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "threads": r.threads.iter().map(|t| serde_json::json!({
            "pid": t.pid, "tid": t.tid, "name": &*t.name, "state": t.state.to_string(),
            "cpu_seconds": secs(t.cpu_ns), "off_cpu_seconds": secs(t.off_cpu_ns),
            "created": t.created, "alive": t.alive,
            "creator": t.creator.as_deref().map(creator_name),
        })).collect::<Vec<_>>(),
        "idle": r.idle.iter().map(|t| serde_json::json!({
            "pid": t.pid, "tid": t.tid, "name": &*t.name, "age_seconds": t.age_s,
            "cpu_seconds": secs(t.cpu_ns), "blocked_in": stack(&t.blocked_in),
            "creator": t.creator.as_deref().map(creator_name),
        })).collect::<Vec<_>>(),
        "leaks": r.leaks.iter().map(|l| serde_json::json!({
            "pid": l.pid, "counts": l.counts, "by_creator": l.by_creator,
            "creator": l.creator.as_deref().map(creator_name),
            "creator_stack": l.creator.as_deref().map(stack),
            "message": l.message(),
        })).collect::<Vec<_>>(),
    })
}

/// The GIL figures of a CPU or wall profile (`None` when no sample knew the GIL): the share of
/// the window each thread, and the process, held the GIL while on CPU, and (wall) the time
/// each thread waited for it.
fn gil_summary(p: &AggregatedProfile) -> Option<serde_json::Value> {
    let threads = p.gil_by_thread()?;
    let pct = |ns: u64| p.percent_of_window(ns);
    let held: u64 = threads.values().map(|t| t.0).sum();
    let waited: u64 = threads.values().map(|t| t.1).sum();
    Some(serde_json::json!({
        "held_percent": pct(held),
        "wait_seconds": (waited as f64 / 1e6).round() / 1e3,
        "threads": threads
            .into_iter()
            .map(|(tid, (h, w))| serde_json::json!({
                "tid": tid,
                "held_percent": pct(h),
                "wait_seconds": (w as f64 / 1e6).round() / 1e3,
            }))
            .collect::<Vec<_>>(),
    }))
}
