//! `Profile`: one profile window of one container, written by the agent.

// kube-derive takes one `printcolumn(...)` per column; clippy reads the repeated `type_ = "string"`
// inside them as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::ProfileType;

/// The summary of one profile window of one container and where its artifacts are. Written once
/// by the node agent; never changed afterwards.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kprof.io",
    version = "v1alpha1",
    kind = "Profile",
    namespaced,
    shortname = "prof",
    derive = "PartialEq",
    category = "kprof",
    doc = "One profile window of one container: summary, top functions and references to the pprof and flame graph artifacts.",
    printcolumn(name = "Target", type_ = "string", json_path = ".spec.target"),
    printcolumn(name = "Pod", type_ = "string", json_path = ".spec.pod"),
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.profileType"),
    printcolumn(name = "Samples", type_ = "integer", json_path = ".spec.samples"),
    printcolumn(name = "Threads", type_ = "integer", json_path = ".spec.threads"),
    printcolumn(
        name = "Heap",
        type_ = "string",
        json_path = ".spec.memorySummary.heap"
    ),
    printcolumn(name = "Top", type_ = "string", json_path = ".spec.top"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("a Profile's spec is immutable"))]
#[serde(rename_all = "camelCase")]
pub struct ProfileSpec {
    /// Name of the ProfilingTarget (same namespace) this profile was taken for.
    pub target: String,
    /// Pod the samples come from.
    pub pod: String,
    /// Container the samples come from.
    pub container: String,
    /// Node the pod ran on.
    pub node: String,
    /// Process ids (as seen on the node) that contributed samples.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pids: Vec<i32>,
    /// The runtime detected, e.g. `cpython 3.12.1` or `native`.
    pub runtime: String,
    /// What was measured.
    pub profile_type: ProfileType,
    /// Start of the profile window.
    pub window_start: Time,
    /// End of the profile window.
    pub window_end: Time,
    /// Sampling frequency used, per CPU.
    pub sample_hz: u32,
    /// Samples recorded in the window.
    pub samples: u64,
    /// Samples lost in the window (ring buffer full, unreadable stacks): a non-zero value means
    /// the profile under-counts.
    #[serde(default)]
    pub lost_samples: u64,
    /// Average CPU cores used over the window: samples ÷ (sampleHz × window seconds).
    #[serde(default)]
    pub cpu_cores: f64,
    /// Threads seen in the window (threads profiles: alive at its end).
    #[serde(default)]
    pub threads: u32,
    /// The hottest function and its self share, e.g. `app.handle 41.2%`, for `kubectl get`.
    #[serde(default)]
    pub top: String,
    /// The hottest functions by self time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub top_functions: Vec<TopFunction>,
    /// Where the artifacts of this window are stored.
    #[serde(default)]
    pub artifacts: Artifacts,
    /// Wall and lock profiles: what the threads' time adds up to and where it went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<TimeSummary>,
    /// Threads profiles: counts over the window, each thread, idle threads, leaks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_summary: Option<ThreadSummary>,
    /// Memory profiles: the container's memory over the window, bytes touched and held,
    /// leaks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_summary: Option<MemorySummary>,
    /// Anything that makes this profile less than complete, e.g.
    /// `python version not supported: native frames only`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// The totals of a wall or lock profile.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TimeSummary {
    /// Seconds of thread time in the window: on and off CPU (wall), blocked on locks (lock).
    pub seconds: f64,
    /// Seconds on CPU (state `running`).
    #[serde(default)]
    pub running_seconds: f64,
    /// Seconds waiting for a CPU (state `runnable`).
    #[serde(default)]
    pub runnable_seconds: f64,
    /// Seconds off CPU per wait class (`gil`, `lock`, `io`, `sleep`, `other`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub wait_seconds: BTreeMap<String, f64>,
    /// Share of the window the container's threads held the GIL while on CPU, in percent
    /// (absent when no interpreter's GIL was known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gil_held_percent: Option<f64>,
}

/// The threads of a container over one window.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ThreadSummary {
    /// Threads alive when the window started, when it ended, and the fewest and most alive
    /// at once (counted every second and at each creation and exit).
    pub alive_at_start: u32,
    pub alive_at_end: u32,
    pub min: u32,
    pub max: u32,
    /// Threads created and exited during the window.
    pub created: u32,
    pub exited: u32,
    /// Threads alive at some point of the window: those alive at its end first (a server's
    /// short-lived handler threads must not hide its long-lived ones), busiest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub threads: Vec<ThreadInfo>,
    /// Threads left out of `threads` (more than 50).
    #[serde(default)]
    pub threads_omitted: u32,
    /// Threads alive for longer than the window that have (almost) never run since they were
    /// created, with where they are blocked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub idle: Vec<IdleThreadInfo>,
    /// A process's thread count grows steadily (see the warnings for the creating code).
    #[serde(default)]
    pub leak_suspected: bool,
}

/// The memory of a container over one window (memory profiles). The resident figures are the
/// kernel's for the profiled processes (`/proc/<pid>/status`), summed; the container figures are
/// its memory cgroup's.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MemorySummary {
    /// The heap at the window's end, for `kubectl get`: anonymous resident memory, e.g.
    /// `412.3MiB`.
    pub heap: String,
    /// Resident memory at the window's end: all of it, anonymous (heaps, arenas, buffers) and
    /// file-backed (code, mapped files).
    pub rss_bytes: u64,
    pub anon_bytes: u64,
    pub file_bytes: u64,
    /// The least and the most anonymous memory read during the window (about every second).
    pub anon_min_bytes: u64,
    pub anon_max_bytes: u64,
    /// Of the anonymous memory at the end, the Python object heap: pymalloc's arenas (objects
    /// of up to 512 bytes), read from the interpreters; the rest is native allocations (and
    /// larger objects). Absent when no interpreter's count could be read (a warning says why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python_heap_bytes: Option<u64>,
    /// Memory first touched during the window (sampled page faults): growth, not every
    /// allocation (memory reused inside an allocator is not touched again).
    pub alloc_bytes: u64,
    /// Of the memory kprof saw being touched since it began profiling the container, what is
    /// still held at the window's end.
    pub inuse_bytes: u64,
    /// The container's memory cgroup: usage at the window's end, its limit (absent:
    /// unlimited) and the processes its OOM killer killed during the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_usage_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_limit_bytes: Option<u64>,
    #[serde(default)]
    pub oom_kills: u64,
    /// A process's heap grows steadily (see the warnings for the code that grew it).
    #[serde(default)]
    pub leak_suspected: bool,
}

/// One thread in a window.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ThreadInfo {
    /// Process id and OS thread id, as seen on the node.
    pub pid: u32,
    pub tid: u32,
    /// Python's `threading.Thread.name` where known, else the kernel's thread name.
    pub name: String,
    /// State at the window's end (`R` running, `S` sleeping, `D` disk wait; `X` exited).
    pub state: String,
    pub cpu_seconds: f64,
    pub off_cpu_seconds: f64,
    /// Created during the window.
    #[serde(default)]
    pub created: bool,
    /// The code that created it (`function (file:line)`), when its creation was seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
}

/// A thread that (almost) never runs.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IdleThreadInfo {
    pub pid: u32,
    pub tid: u32,
    pub name: String,
    /// Seconds since it was created, and CPU seconds it ran in all that time.
    pub age_seconds: u64,
    pub cpu_seconds: f64,
    /// Where it is blocked, innermost first: its Python frames, or the syscall it sleeps in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub blocked_in: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
}

/// One row of a profile's top table.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TopFunction {
    /// Function name; Python functions as `module.function`.
    pub function: String,
    /// Source location as `file:line`, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Share of samples with this function as the leaf, in percent.
    pub self_percent: f64,
    /// Share of samples with this function anywhere on the stack, in percent.
    pub total_percent: f64,
}

/// References to the stored artifacts of a profile.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Artifacts {
    /// The gzipped pprof (`profile.proto`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pprof: Option<ArtifactRef>,
    /// The flame graph (SVG).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flamegraph: Option<ArtifactRef>,
    /// The window's figures (JSON): sample totals, and per type the wall and lock split, the
    /// GIL, thread counts over time, memory readings over time (about one a second).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<ArtifactRef>,
}

/// Where one artifact lives and what it contains.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactRef {
    /// Where to fetch it: a store URL, or a `file://` path on the node.
    pub url: String,
    /// Content digest, `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    #[serde(default)]
    pub size_bytes: u64,
}

impl ArtifactRef {
    /// The artifact's content digest: its `digest` field, else the end of its store URL.
    pub fn content_digest(&self) -> Option<crate::store_api::Digest> {
        crate::store_api::Digest::parse(&self.digest)
            .or_else(|| crate::store_api::Digest::from_url(&self.url))
    }
}
