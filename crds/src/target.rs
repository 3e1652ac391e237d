//! `ProfilingTarget`: what a user asks kprof to profile.

// kube-derive takes one `printcolumn(...)` per column; clippy reads the repeated `type_ = "string"`
// inside them as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::{GoDuration, ProfileType};

/// What to profile: the pods selected in this target's own namespace, which profile types, how
/// often and in which windows.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kprof.io",
    version = "v1alpha1",
    kind = "ProfilingTarget",
    namespaced,
    shortname = "pt",
    derive = "PartialEq",
    category = "kprof",
    status = "ProfilingTargetStatus",
    doc = "Selects pods in its own namespace for continuous profiling. Each profile window of each selected container becomes a Profile.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Pods", type_ = "integer", json_path = ".status.matchedPods"),
    printcolumn(name = "Nodes", type_ = "string", json_path = ".status.nodes"),
    printcolumn(
        name = "Profiles",
        type_ = "integer",
        json_path = ".status.profilesWritten"
    ),
    printcolumn(name = "Last", type_ = "date", json_path = ".status.lastProfileTime"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new(
    "!has(self.duration) || duration(self.duration) >= duration(self.window)"
).message("spec.duration must be at least one spec.window long").field_path(".duration"))]
#[serde(rename_all = "camelCase")]
pub struct ProfilingTargetSpec {
    /// Label selector for the pods to profile. Only pods in the ProfilingTarget's own namespace
    /// are ever selected. Must not be empty: an empty selector would select every pod.
    #[x_kube(validation = Rule::new(
        "(has(self.matchLabels) && size(self.matchLabels) > 0) || (has(self.matchExpressions) && size(self.matchExpressions) > 0)"
    ).message("spec.selector must not be empty: set matchLabels or matchExpressions"))]
    pub selector: LabelSelector,

    /// Names of the containers to profile in each selected pod. Absent or empty: every container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub containers: Vec<String>,

    /// What to profile: `cpu` (on-CPU samples), `wall` (on- and off-CPU time), `lock` (time
    /// blocked on locks and futexes), `threads` (thread counts and who creates them), `memory`
    /// (memory touched and held, heap usage, leaks). Default `[cpu]`.
    #[serde(default = "default_profile_types")]
    #[schemars(length(min = 1, max = 5))]
    #[x_kube(validation = Rule::new("self.all(t, self.exists_one(u, u == t))")
        .message("spec.profileTypes must not list a type twice"))]
    pub profile_types: Vec<ProfileType>,

    /// Samples per second per CPU, 1–1000. Default 99 (a prime off the kernel tick, so sampling
    /// does not lock step with periodic work).
    #[serde(default = "default_sample_hz")]
    #[schemars(range(min = 1, max = 1000))]
    pub sample_hz: u32,

    /// Length of one profile window, written as a duration (`30s`, `5m`, `1h`), between 5s and
    /// 1h. Every window of every selected container becomes one Profile. Default `30s`.
    #[serde(default = "default_window")]
    #[x_kube(validation = Rule::new(
        "duration(self) >= duration('5s') && duration(self) <= duration('1h')"
    ).message("spec.window must be between 5s and 1h"))]
    pub window: GoDuration,

    /// Stop profiling after this long (a duration such as `10m`), counted from the first time the
    /// target ran; the target then moves to phase Completed. Absent: profile continuously. Must
    /// be at least one window long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<GoDuration>,

    /// Pause profiling without deleting the target or its Profiles.
    #[serde(default)]
    pub suspend: bool,

    /// How many Profiles to keep, and for how long.
    #[serde(default)]
    pub retention: Retention,

    /// Also push every profile to these external systems.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub exporters: Vec<Exporter>,

    /// Options of `memory` profiles.
    #[serde(default, skip_serializing_if = "MemoryOptions::is_default")]
    pub memory: MemoryOptions,
}

/// Options of `memory` profiles.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MemoryOptions {
    /// Also sample the allocations the selected Python processes report to CPython's
    /// `PyTraceMalloc_Track` (NumPy's arrays, extensions that tell tracemalloc about their
    /// memory), with uprobes in those processes only: every reported allocation and free then
    /// costs its process a trap into the kernel (about 1–3 µs). Default false.
    #[serde(default)]
    pub allocation_probes: bool,
}

impl MemoryOptions {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// Retention of the Profiles written for a target.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Retention {
    /// Keep at most this many Profiles per pod, container and profile type (oldest deleted
    /// first), 1–10000. Default 20.
    #[serde(default = "default_max_profiles")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_profiles: u32,

    /// Delete Profiles older than this (a duration such as `24h`). Default `24h`.
    #[serde(default = "default_max_age")]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1m')")
        .message("spec.retention.maxAge must be at least 1m"))]
    pub max_age: GoDuration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_profiles: default_max_profiles(),
            max_age: default_max_age(),
        }
    }
}

/// An external system that receives every profile of the target.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Exporter {
    /// The protocol: `pyroscope` (HTTP ingest of pprof) or `otlp` (OTLP profiles over HTTP).
    pub kind: ExporterKind,
    /// Where to send profiles, an `http://` or `https://` URL.
    #[x_kube(validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')")
        .message("exporter url must start with http:// or https://"))]
    #[schemars(length(max = 2048))]
    pub url: String,
}

/// Protocol of an [`Exporter`].
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ExporterKind {
    Pyroscope,
    Otlp,
}

/// What the operator reports about a target.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProfilingTargetStatus {
    /// Pending (nothing selected yet), Running, Suspended, Completed (duration over) or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Scheduled and Degraded conditions, with reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Number of running pods the selector matches in the target's namespace.
    #[serde(default)]
    pub matched_pods: u32,
    /// Nodes that run the matched pods (where samplers are scheduled).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// When the target first started profiling (the start of `spec.duration`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// Profiles currently kept for this target (after retention).
    #[serde(default)]
    pub profiles_written: u64,
    /// End of the newest profile window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_profile_time: Option<Time>,
    /// Names of the newest Profiles, newest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_profiles: Vec<String>,
}

/// Lifecycle phase of a [`ProfilingTarget`].
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Running,
    Suspended,
    Completed,
    Failed,
}

fn default_profile_types() -> Vec<ProfileType> {
    vec![ProfileType::Cpu]
}
fn default_sample_hz() -> u32 {
    99
}
fn default_window() -> GoDuration {
    GoDuration::from_static("30s")
}
fn default_max_profiles() -> u32 {
    20
}
fn default_max_age() -> GoDuration {
    GoDuration::from_static("24h")
}
