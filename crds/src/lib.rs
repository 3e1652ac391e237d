//! The kprof API, group `kprof.io`, version `v1alpha1`: the single source of truth for the
//! `ProfilingTarget` and `Profile` custom resources. The CRD YAML in `crds/` and in the Helm chart
//! is generated from these types (`make crds`).

mod duration;
mod profile;
pub mod selection;
mod selector;
pub mod store_api;
mod target;
#[cfg(feature = "validate")]
pub mod validate;

use kube::CustomResourceExt;
use serde::{Deserialize, Serialize};

pub use duration::{DurationError, GoDuration, parse_duration};
pub use profile::{
    ArtifactRef, Artifacts, IdleThreadInfo, MemorySummary, Profile, ProfileSpec, ThreadInfo,
    ThreadSummary, TimeSummary, TopFunction,
};
pub use target::{
    Exporter, ExporterKind, MemoryOptions, Phase, ProfilingTarget, ProfilingTargetSpec,
    ProfilingTargetStatus, Retention,
};

/// API group of every kprof resource.
pub const GROUP: &str = "kprof.io";

/// Labels the agent puts on every Profile so that they can be selected without reading specs.
pub mod labels {
    /// Name of the ProfilingTarget a Profile belongs to.
    pub const TARGET: &str = "kprof.io/target";
    /// Pod the Profile's samples come from.
    pub const POD: &str = "kprof.io/pod";
    /// Container the Profile's samples come from.
    pub const CONTAINER: &str = "kprof.io/container";
    /// Profile type (`cpu`, `wall`, …).
    pub const PROFILE_TYPE: &str = "kprof.io/type";
    /// Node that took the profile.
    pub const NODE: &str = "kprof.io/node";
}

/// What a profile measures.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ProfileType {
    /// On-CPU time: where the threads burn CPU.
    Cpu,
    /// Wall-clock time: on-CPU plus time waiting (I/O, sleep, locks).
    Wall,
    /// Time blocked on locks (futexes, the GIL).
    Lock,
    /// Memory allocations.
    Memory,
    /// Threads: counts over time, names, the stacks that create them, idle threads and leaks.
    Threads,
}

impl ProfileType {
    /// The name used in the API, labels and file names.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Wall => "wall",
            Self::Lock => "lock",
            Self::Memory => "memory",
            Self::Threads => "threads",
        }
    }
}

impl std::fmt::Display for ProfileType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One generated CRD manifest: the file name it is written to and its YAML.
pub struct CrdManifest {
    pub file_name: &'static str,
    pub yaml: String,
}

/// The CRD manifests generated from the types, as `make crds` writes them.
pub fn crd_manifests() -> Result<Vec<CrdManifest>, serde_yaml::Error> {
    // Each file is its own YAML document: `helm show crds` prints the chart's CRD files one
    // after another, and `kubectl apply -f -` must see two documents, not one with every key
    // twice.
    const HEADER: &str =
        "# Generated from the Rust types in crds/src by `make crds`. Do not edit.\n---\n";
    Ok(vec![
        CrdManifest {
            file_name: "profilingtargets.yaml",
            yaml: format!(
                "{HEADER}{}",
                serde_yaml::to_string(&ProfilingTarget::crd())?
            ),
        },
        CrdManifest {
            file_name: "profiles.yaml",
            yaml: format!("{HEADER}{}", serde_yaml::to_string(&Profile::crd())?),
        },
    ])
}
