//! The operator's configuration file (`--config`, YAML, rendered by the Helm chart).
//!
//! Every field is optional; an absent file means all defaults. Unknown fields are refused so
//! that a typo in the chart is an error at start-up, not a silently ignored setting.
//!
//! ```yaml
//! # Label selector (kubectl syntax) on the ProfilingTargets this operator manages; empty: all.
//! targetSelector: ""
//! # How often every target is reconciled even without a change (status refresh, retention).
//! resyncInterval: 5m
//! leaderElection:
//!   enabled: true
//!   leaseName: kprof-operator       # in the operator's namespace
//!   leaseDuration: 15s              # a standby takes over this long after the leader stops renewing
//!   renewInterval: 5s
//! agent:                             # the node agent DaemonSet `kprof-agent`
//!   image: ghcr.io/kprof/kprof-agent:0.1.0
//!   imagePullPolicy: IfNotPresent
//!   imagePullSecrets: []             # names
//!   serviceAccountName: kprof-agent
//!   resources: {requests: {cpu: 50m, memory: 96Mi}, limits: {memory: 1Gi}}
//!   tolerations: [{operator: Exists}] # run wherever a selected pod runs, whatever the taints
//!   nodeSelector: {}
//!   priorityClassName: ""            # e.g. system-node-critical
//!   env: []                          # extra EnvVars for the agent container
//!   storeUrl: ""                     # KPROF_STORE_URL (the profile store); empty: not set
//!   storeCaConfigMap: ""             # ConfigMap with ca.crt for the store's certificate
//!   storeTokenAudience: ""           # projected upload token's audience; empty: the pod's token
//!   hostNetwork: false
//!   spoolDir: /var/lib/kprof         # hostPath mounted read-write at the same path
//!   mountBtf: true                   # /sys/kernel/btf read-only
//!   capabilities: {add: [BPF, PERFMON, SYS_PTRACE, SYSLOG], drop: [ALL]}
//!   runAsUser: 65532                 # the agent switches to it at start-up; 0: stays root
//!   runAsGroup: 65532
//!   seccomp: true                    # RuntimeDefault profile + the agent's own deny list
//!   podLabels: {}                    # extra labels on the agent pods
//!   podAnnotations: {}
//!   ownerDeployment: ""            # e.g. kprof-operator: the DaemonSet is garbage collected with it
//! ```

use std::{collections::BTreeMap, path::Path, time::Duration};

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements, Toleration};
use kprof_crds::GoDuration;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The whole configuration file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct OperatorConfig {
    /// Label selector (as `kubectl -l` takes it) restricting the ProfilingTargets this operator
    /// manages. Empty: every target in the cluster.
    pub target_selector: String,
    /// Reconcile every target at least this often.
    pub resync_interval: GoDuration,
    pub leader_election: LeaderElectionConfig,
    pub agent: AgentConfig,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            target_selector: String::new(),
            resync_interval: "5m".parse().expect("a valid duration"),
            leader_election: LeaderElectionConfig::default(),
            agent: AgentConfig::default(),
        }
    }
}

/// Lease-based leader election (`coordination.k8s.io/v1` Lease in the operator's namespace).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct LeaderElectionConfig {
    pub enabled: bool,
    pub lease_name: String,
    pub lease_duration: GoDuration,
    pub renew_interval: GoDuration,
}

impl Default for LeaderElectionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            lease_name: "kprof-operator".into(),
            lease_duration: "15s".parse().expect("a valid duration"),
            renew_interval: "5s".parse().expect("a valid duration"),
        }
    }
}

/// Linux capabilities of the agent container.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Capabilities {
    pub add: Vec<String>,
    pub drop: Vec<String>,
}

impl Default for Capabilities {
    fn default() -> Self {
        Self {
            add: ["BPF", "PERFMON", "SYS_PTRACE", "SYSLOG"]
                .map(String::from)
                .to_vec(),
            drop: vec!["ALL".into()],
        }
    }
}

/// The configurable parts of the agent DaemonSet's pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct AgentConfig {
    pub image: String,
    pub image_pull_policy: String,
    pub image_pull_secrets: Vec<String>,
    pub service_account_name: String,
    pub resources: Option<ResourceRequirements>,
    pub tolerations: Vec<Toleration>,
    pub node_selector: BTreeMap<String, String>,
    pub priority_class_name: String,
    pub env: Vec<EnvVar>,
    pub store_url: String,
    /// A ConfigMap (key `ca.crt`) with the CA the store's certificate is checked against;
    /// empty: the system's CAs only.
    pub store_ca_config_map: String,
    /// The audience of the ServiceAccount token projected for uploads (the store's own, so
    /// the token is no use against the API server); empty: the pod's ordinary token.
    pub store_token_audience: String,
    pub host_network: bool,
    pub spool_dir: String,
    pub mount_btf: bool,
    /// The capabilities the agent runs with. With a non-zero `run_as_user` the pod also gets
    /// CHOWN, SETGID and SETUID, which the agent drops at start-up.
    pub capabilities: Capabilities,
    /// The user the agent switches to at start-up, keeping only `capabilities` (the container
    /// starts as uid 0: without ambient capabilities in the CRI a non-root container gets
    /// none). 0: the agent stays root.
    pub run_as_user: u32,
    /// Its group (supplementary groups are cleared).
    pub run_as_group: u32,
    /// `seccompProfile: RuntimeDefault` on the agent container, and the agent's own deny list
    /// on top of it (ptrace, process_vm_writev, mounts, namespaces, modules, ...).
    pub seccomp: bool,
    pub pod_labels: BTreeMap<String, String>,
    pub pod_annotations: BTreeMap<String, String>,
    /// A Deployment in the operator's namespace (the operator's own) that owns the agent
    /// DaemonSet, so that uninstalling the operator removes the agents too. Empty: no owner.
    pub owner_deployment: String,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            image: format!("ghcr.io/kprof/kprof-agent:{}", env!("CARGO_PKG_VERSION")),
            image_pull_policy: "IfNotPresent".into(),
            image_pull_secrets: Vec::new(),
            service_account_name: crate::AGENT_NAME.into(),
            resources: Some(
                serde_json::from_value(serde_json::json!({
                    "requests": {"cpu": "50m", "memory": "96Mi"},
                    // The eBPF verifier's working memory is charged to the agent while its
                    // programs load: ~650 MiB for a second (see the chart's values.yaml).
                    "limits": {"memory": "1Gi"},
                }))
                .expect("valid resources"),
            ),
            tolerations: vec![Toleration {
                operator: Some("Exists".into()),
                ..Default::default()
            }],
            node_selector: BTreeMap::new(),
            priority_class_name: String::new(),
            env: Vec::new(),
            store_url: String::new(),
            store_ca_config_map: String::new(),
            store_token_audience: String::new(),
            host_network: false,
            spool_dir: "/var/lib/kprof".into(),
            mount_btf: true,
            capabilities: Capabilities::default(),
            run_as_user: 65532,
            run_as_group: 65532,
            seccomp: true,
            pod_labels: BTreeMap::new(),
            pod_annotations: BTreeMap::new(),
            owner_deployment: String::new(),
        }
    }
}

impl OperatorConfig {
    /// Parse a configuration document and check what serde cannot.
    pub fn from_yaml(text: &str) -> Result<Self> {
        let cfg: Self = if text.trim().is_empty() {
            Self::default()
        } else {
            serde_yaml::from_str(text).map_err(|e| Error::Config(e.to_string()))?
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// Read and parse the file at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("reading {}: {e}", path.display())))?;
        Self::from_yaml(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    fn check(&self) -> Result<()> {
        let dur = |name: &str, d: &GoDuration| {
            d.to_std()
                .map_err(|e| Error::Config(format!("{name}: {e}")))
        };
        if dur("resyncInterval", &self.resync_interval)? < Duration::from_secs(1) {
            return Err(Error::Config("resyncInterval must be at least 1s".into()));
        }
        let lease = dur(
            "leaderElection.leaseDuration",
            &self.leader_election.lease_duration,
        )?;
        let renew = dur(
            "leaderElection.renewInterval",
            &self.leader_election.renew_interval,
        )?;
        if renew.is_zero() || renew >= lease {
            return Err(Error::Config(
                "leaderElection.renewInterval must be shorter than leaseDuration".into(),
            ));
        }
        if self.agent.image.is_empty() {
            return Err(Error::Config("agent.image must be set".into()));
        }
        if !["Always", "IfNotPresent", "Never"].contains(&self.agent.image_pull_policy.as_str()) {
            return Err(Error::Config(format!(
                "agent.imagePullPolicy {:?} is not Always, IfNotPresent or Never",
                self.agent.image_pull_policy
            )));
        }
        if !self.agent.spool_dir.starts_with('/') {
            return Err(Error::Config(
                "agent.spoolDir must be an absolute path".into(),
            ));
        }
        if !self.target_selector.is_empty() {
            crate::selector::check_selector_string(&self.target_selector)
                .map_err(|e| Error::Config(format!("targetSelector: {e}")))?;
        }
        Ok(())
    }

    /// `resyncInterval` as a [`Duration`] (checked at load time).
    pub fn resync(&self) -> Duration {
        self.resync_interval
            .to_std()
            .unwrap_or(Duration::from_secs(300))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_all_defaults() {
        let cfg = OperatorConfig::from_yaml("").unwrap();
        assert_eq!(cfg, OperatorConfig::default());
        assert_eq!(cfg.agent.service_account_name, "kprof-agent");
        assert_eq!(
            cfg.agent.capabilities.add,
            ["BPF", "PERFMON", "SYS_PTRACE", "SYSLOG"]
        );
        assert!(cfg.leader_election.enabled);
        assert_eq!(
            (cfg.agent.run_as_user, cfg.agent.run_as_group),
            (65532, 65532)
        );
        assert!(cfg.agent.seccomp);
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let cfg = OperatorConfig::from_yaml(
            "agent:\n  image: local/agent:dev\n  imagePullPolicy: Never\n  hostNetwork: true\n  storeUrl: http://store:8080\n",
        )
        .unwrap();
        assert_eq!(cfg.agent.image, "local/agent:dev");
        assert!(cfg.agent.host_network);
        assert_eq!(cfg.agent.spool_dir, "/var/lib/kprof");
        assert_eq!(cfg.resync(), Duration::from_secs(300));
    }

    #[test]
    fn typos_and_bad_values_are_refused() {
        let err = OperatorConfig::from_yaml("agent:\n  imagee: x\n").unwrap_err();
        assert!(err.to_string().contains("imagee"), "{err}");
        let err = OperatorConfig::from_yaml("agent:\n  imagePullPolicy: Sometimes\n").unwrap_err();
        assert!(err.to_string().contains("Sometimes"), "{err}");
        let err = OperatorConfig::from_yaml("leaderElection:\n  renewInterval: 1m\n").unwrap_err();
        assert!(err.to_string().contains("renewInterval"), "{err}");
        let err = OperatorConfig::from_yaml("targetSelector: 'a in (b'\n").unwrap_err();
        assert!(err.to_string().contains("targetSelector"), "{err}");
    }
}
