//! The kprof operator.
//!
//! It reconciles [`ProfilingTarget`](kprof_crds::ProfilingTarget)s and schedules the node agent:
//!
//! * [`reconcile::target`]: one reconciler per target, a pipeline of one module per step:
//!   `read` (pods of the target's own namespace, from the shared pod cache) → `validate` (pure)
//!   → `build` (pure: desired status, retention plan) → `apply` (delete expired Profiles) →
//!   `status` (server-side apply of the status subresource).
//! * [`reconcile::daemonset`]: a second, cluster-wide reconciler that owns the single agent DaemonSet: its node
//!   affinity covers exactly the nodes that run selected pods of active targets, and it is
//!   deleted when no target is active.
//! * [`leader`]: a `coordination.k8s.io` Lease so that only one replica runs the controllers.
//! * [`metrics`] and [`http`]: Prometheus metrics, `/metrics`, `/healthz`, `/readyz`.
//!
//! [`run::Operator`] wires everything together; `main.rs` is only the command line.

#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod reconcile;
pub mod run;
pub mod selector;

pub use config::OperatorConfig;
pub use error::{Error, Result};
pub use run::Operator;

/// The one field manager used for every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "kprof-operator";
/// Name of the agent DaemonSet (in the operator's namespace).
pub const AGENT_NAME: &str = "kprof-agent";
/// Label on every object the operator creates.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Name used as the `reportingController` of Events and in labels.
pub const CONTROLLER_NAME: &str = "kprof-operator";
