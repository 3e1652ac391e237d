//! The agent DaemonSet (pure): which nodes need an agent, and the DaemonSet that puts one there.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, DaemonSetSpec},
        core::v1::{
            Affinity, Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar,
            EnvVarSource, HTTPGetAction, HostPathVolumeSource, LocalObjectReference, NodeAffinity,
            NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, ObjectFieldSelector, Pod,
            PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource,
            SeccompProfile, SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount,
            VolumeProjection,
        },
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
    jiff::Timestamp,
};
use kprof_crds::ProfilingTarget;
use kube::ResourceExt;

use crate::{
    AGENT_NAME, CONTROLLER_NAME, MANAGED_BY_LABEL,
    config::AgentConfig,
    reconcile::target::{
        build::{is_active, select_pods},
        validate::validate,
    },
};

/// Annotation holding a digest of the desired DaemonSet, so an unchanged one is not re-applied.
pub const SPEC_HASH_ANNOTATION: &str = "kprof.io/spec-hash";

/// The agent's `/metrics` and `/healthz` port (its liveness probe).
pub const AGENT_METRICS_PORT: i32 = 9464;

/// Capabilities the agent needs only at start-up, to hand its state directory (a hostPath the
/// kubelet creates root-owned) and its identity to `runAsUser`; it drops them before it starts
/// anything else (agent/src/privilege.rs).
pub const START_UP_CAPABILITIES: [&str; 3] = ["CHOWN", "SETGID", "SETUID"];

/// The nodes that run selected pods of any active target (valid, not suspended, not completed).
pub fn active_nodes<'a>(
    targets: impl IntoIterator<Item = &'a ProfilingTarget>,
    pods: &[Arc<Pod>],
    now: Timestamp,
) -> BTreeSet<String> {
    let mut by_ns: BTreeMap<&str, Vec<Arc<Pod>>> = BTreeMap::new();
    for p in pods {
        if let Some(ns) = p.metadata.namespace.as_deref() {
            by_ns.entry(ns).or_default().push(p.clone());
        }
    }
    let mut nodes = BTreeSet::new();
    for t in targets {
        let Ok(valid) = validate(t) else { continue };
        if !is_active(t, Some(&valid), now) {
            continue;
        }
        let ns = t.namespace().unwrap_or_default();
        let Some(pods) = by_ns.get(ns.as_str()) else {
            continue;
        };
        nodes.extend(select_pods(&valid, pods).into_iter().map(|p| p.node));
    }
    nodes
}

/// The nodes a DaemonSet's required node affinity allows (`matchFields` on `metadata.name`).
pub fn daemonset_nodes(ds: &DaemonSet) -> BTreeSet<String> {
    let terms = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .map(|r| r.node_selector_terms.as_slice())
        .unwrap_or_default();
    terms
        .iter()
        .flat_map(|t| t.match_fields.iter().flatten())
        .filter(|r| r.key == "metadata.name" && r.operator == "In")
        .flat_map(|r| r.values.iter().flatten().cloned())
        .collect()
}

fn selector_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), AGENT_NAME.to_string()),
        (
            "app.kubernetes.io/component".to_string(),
            "agent".to_string(),
        ),
    ])
}

/// Where the agent finds its upload token and the store's CA.
const STORE_TOKEN_DIR: &str = "/var/run/secrets/kprof-store";
const STORE_CA_DIR: &str = "/etc/kprof-store-ca";
/// Where the agent finds the node's cgroup file systems (read-only): its own `/sys/fs/cgroup`
/// shows only its own cgroup, and memory profiles read the targets' containers' cgroups.
const HOST_CGROUP_DIR: &str = "/host/sys/fs/cgroup";

/// A directory of the node, mounted read-only at `mount_path`.
fn read_only_host_dir(name: &str, host_path: &str, mount_path: &str) -> (VolumeMount, Volume) {
    let mount = VolumeMount {
        name: name.into(),
        mount_path: mount_path.into(),
        read_only: Some(true),
        ..Default::default()
    };
    let volume = Volume {
        name: name.into(),
        host_path: Some(HostPathVolumeSource {
            path: host_path.into(),
            type_: Some("Directory".into()),
        }),
        ..Default::default()
    };
    (mount, volume)
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

/// The agent DaemonSet in `namespace` whose pods run exactly on `nodes`.
pub fn desired_daemonset(
    cfg: &AgentConfig,
    namespace: &str,
    nodes: &BTreeSet<String>,
) -> DaemonSet {
    let mut labels = selector_labels();
    labels.insert(MANAGED_BY_LABEL.into(), CONTROLLER_NAME.into());
    let mut pod_labels = cfg.pod_labels.clone();
    pod_labels.extend(selector_labels());

    let mut env_vars = vec![
        EnvVar {
            name: "NODE_NAME".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "spec.nodeName".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
        env("KPROF_NAMESPACE", namespace),
    ];
    if !cfg.store_url.is_empty() {
        env_vars.push(env("KPROF_STORE_URL", &cfg.store_url));
    }
    env_vars.push(env("KPROF_METRICS_PORT", &AGENT_METRICS_PORT.to_string()));
    env_vars.push(env("KPROF_RUN_AS_USER", &cfg.run_as_user.to_string()));
    env_vars.push(env("KPROF_RUN_AS_GROUP", &cfg.run_as_group.to_string()));
    env_vars.push(env("KPROF_SECCOMP", &cfg.seccomp.to_string()));

    let mut mounts = vec![VolumeMount {
        name: "spool".into(),
        mount_path: cfg.spool_dir.clone(),
        ..Default::default()
    }];
    let mut volumes = vec![Volume {
        name: "spool".into(),
        host_path: Some(HostPathVolumeSource {
            path: cfg.spool_dir.clone(),
            type_: Some("DirectoryOrCreate".into()),
        }),
        ..Default::default()
    }];
    // Uploads: a token meant for the store only, and the store's CA.
    if !cfg.store_token_audience.is_empty() {
        mounts.push(VolumeMount {
            name: "store-token".into(),
            mount_path: STORE_TOKEN_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
        volumes.push(Volume {
            name: "store-token".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(cfg.store_token_audience.clone()),
                        expiration_seconds: Some(3600),
                        path: "token".into(),
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        });
        env_vars.push(env("KPROF_TOKEN_FILE", &format!("{STORE_TOKEN_DIR}/token")));
    }
    if !cfg.store_ca_config_map.is_empty() {
        mounts.push(VolumeMount {
            name: "store-ca".into(),
            mount_path: STORE_CA_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
        volumes.push(Volume {
            name: "store-ca".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: cfg.store_ca_config_map.clone(),
                ..Default::default()
            }),
            ..Default::default()
        });
        env_vars.push(env(
            "KPROF_STORE_CA_FILE",
            &format!("{STORE_CA_DIR}/ca.crt"),
        ));
    }
    let (mount, volume) = read_only_host_dir("cgroup", "/sys/fs/cgroup", HOST_CGROUP_DIR);
    mounts.push(mount);
    volumes.push(volume);
    // The chart's own settings last: they override.
    env_vars.extend(cfg.env.iter().cloned());
    if cfg.mount_btf {
        let (mount, volume) = read_only_host_dir("btf", "/sys/kernel/btf", "/sys/kernel/btf");
        mounts.push(mount);
        volumes.push(volume);
    }
    // no_new_privs is compatible with capabilities granted at start, except CAP_SYS_ADMIN,
    // which the API server refuses together with allowPrivilegeEscalation: false.
    let adds_sys_admin = cfg
        .capabilities
        .add
        .iter()
        .any(|c| c.trim_start_matches("CAP_") == "SYS_ADMIN");
    let mut cap_add = cfg.capabilities.add.clone();
    if cfg.run_as_user != 0 {
        for c in START_UP_CAPABILITIES {
            if !cap_add.iter().any(|a| a.trim_start_matches("CAP_") == c) {
                cap_add.push(c.into());
            }
        }
    }
    let container = Container {
        name: "agent".into(),
        image: Some(cfg.image.clone()),
        image_pull_policy: Some(cfg.image_pull_policy.clone()),
        args: Some(vec!["run".into()]),
        env: Some(env_vars),
        resources: cfg.resources.clone(),
        security_context: Some(SecurityContext {
            privileged: Some(false),
            allow_privilege_escalation: Some(adds_sys_admin),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: Some(cap_add),
                drop: Some(cfg.capabilities.drop.clone()),
            }),
            // Started as root, whatever the image says: a non-root container gets no
            // capabilities. The agent itself switches to `runAsUser` before it does anything.
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            // The runtime's default profile (it lets bpf and perf_event_open through with
            // CAP_BPF / CAP_PERFMON on containerd 1.6); the agent adds its own deny list.
            seccomp_profile: cfg.seccomp.then(|| SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        volume_mounts: Some(mounts),
        ports: Some(vec![ContainerPort {
            name: Some("metrics".into()),
            container_port: AGENT_METRICS_PORT,
            ..Default::default()
        }]),
        // `/healthz` fails when the sampling loop has not turned for 10 s; a minute of that
        // (not a slow window) restarts the agent.
        liveness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz".into()),
                port: IntOrString::String("metrics".into()),
                ..Default::default()
            }),
            initial_delay_seconds: Some(30),
            period_seconds: Some(10),
            timeout_seconds: Some(5),
            failure_threshold: Some(6),
            ..Default::default()
        }),
        ..Default::default()
    };
    // The API server allows exactly one value for a `matchFields` requirement on
    // `metadata.name`, so every node gets its own term (terms are ORed), as the DaemonSet
    // controller itself pins its pods.
    let terms = nodes
        .iter()
        .map(|n| NodeSelectorTerm {
            match_fields: Some(vec![NodeSelectorRequirement {
                key: "metadata.name".into(),
                operator: "In".into(),
                values: Some(vec![n.clone()]),
            }]),
            ..Default::default()
        })
        .collect();
    let affinity = Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: terms,
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let pod_spec = PodSpec {
        service_account_name: Some(cfg.service_account_name.clone()),
        host_pid: Some(true),
        host_network: Some(cfg.host_network),
        dns_policy: Some(
            if cfg.host_network {
                "ClusterFirstWithHostNet"
            } else {
                "ClusterFirst"
            }
            .into(),
        ),
        affinity: Some(affinity),
        tolerations: (!cfg.tolerations.is_empty()).then(|| cfg.tolerations.clone()),
        node_selector: (!cfg.node_selector.is_empty()).then(|| cfg.node_selector.clone()),
        priority_class_name: (!cfg.priority_class_name.is_empty())
            .then(|| cfg.priority_class_name.clone()),
        image_pull_secrets: (!cfg.image_pull_secrets.is_empty()).then(|| {
            cfg.image_pull_secrets
                .iter()
                .map(|n| LocalObjectReference { name: n.clone() })
                .collect()
        }),
        // The kubelet writes the ServiceAccount token 0600 for the container's user (uid 0 here);
        // with an fsGroup it is also readable by that group, which the agent switches to.
        security_context: (cfg.run_as_user != 0).then(|| PodSecurityContext {
            fs_group: Some(i64::from(cfg.run_as_group)),
            ..Default::default()
        }),
        termination_grace_period_seconds: Some(30),
        containers: vec![container],
        volumes: Some(volumes),
        ..Default::default()
    };
    let mut ds = DaemonSet {
        metadata: ObjectMeta {
            name: Some(AGENT_NAME.into()),
            namespace: Some(namespace.into()),
            labels: Some(labels),
            ..Default::default()
        },
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(selector_labels()),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: (!cfg.pod_annotations.is_empty())
                        .then(|| cfg.pod_annotations.clone()),
                    ..Default::default()
                }),
                spec: Some(pod_spec),
            },
            ..Default::default()
        }),
        status: None,
    };
    let hash = spec_hash(&ds);
    ds.metadata.annotations = Some(BTreeMap::from([(SPEC_HASH_ANNOTATION.to_string(), hash)]));
    ds
}

/// A stable digest (FNV-1a, 64 bit) of the DaemonSet as built, before the annotation is added.
fn spec_hash(ds: &DaemonSet) -> String {
    let bytes = serde_json::to_vec(ds).expect("a DaemonSet serializes");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The spec hash recorded on a DaemonSet.
pub fn recorded_hash(ds: &DaemonSet) -> Option<&str> {
    ds.annotations()
        .get(SPEC_HASH_ANNOTATION)
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::OperatorConfig,
        reconcile::target::fixtures::{pod, target, ts},
    };

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn desired_daemonset_has_the_fixed_parts() {
        let ds = desired_daemonset(
            &OperatorConfig::default().agent,
            "kprof-system",
            &set(&["n2", "n1"]),
        );
        assert_eq!(ds.metadata.name.as_deref(), Some("kprof-agent"));
        assert_eq!(ds.metadata.namespace.as_deref(), Some("kprof-system"));
        assert_eq!(daemonset_nodes(&ds), set(&["n1", "n2"]));
        let v = serde_json::to_value(&ds).unwrap();
        let pod = &v["spec"]["template"]["spec"];
        assert_eq!(pod["hostPID"], true);
        assert_eq!(pod["serviceAccountName"], "kprof-agent");
        let terms = &pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"];
        assert_eq!(
            *terms,
            serde_json::json!([
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]},
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n2"]}]},
            ]),
            "one term per node: the API server allows a single value per metadata.name requirement"
        );
        let c = &pod["containers"][0];
        assert_eq!(c["name"], "agent");
        assert_eq!(c["args"], serde_json::json!(["run"]));
        // Restarted when its sampling loop stops turning.
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(c["livenessProbe"]["httpGet"]["port"], "metrics");
        assert_eq!(c["ports"][0]["containerPort"], AGENT_METRICS_PORT);
        assert!(
            c["env"]
                .as_array()
                .unwrap()
                .contains(&serde_json::json!({"name": "KPROF_METRICS_PORT", "value": "9464"}))
        );
        assert_eq!(
            c["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
            "spec.nodeName"
        );
        assert_eq!(
            c["env"][1],
            serde_json::json!({"name": "KPROF_NAMESPACE", "value": "kprof-system"})
        );
        let sc = &c["securityContext"];
        assert_eq!(sc["privileged"], false);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(
            sc["capabilities"]["add"],
            serde_json::json!([
                "BPF",
                "PERFMON",
                "SYS_PTRACE",
                "SYSLOG",
                "CHOWN",
                "SETGID",
                "SETUID"
            ]),
            "the run-time capabilities, then the start-up ones the agent drops"
        );
        assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
        // Started as uid 0 (a non-root container gets no capabilities); the agent switches to
        // 65532 and installs its deny list on top of the runtime's default profile.
        assert_eq!(sc["runAsUser"], 0);
        assert_eq!(sc["runAsGroup"], 0);
        assert_eq!(sc["runAsNonRoot"], false);
        assert_eq!(
            pod["securityContext"]["fsGroup"], 65532,
            "the token is readable by the agent's group"
        );
        assert_eq!(
            sc["seccompProfile"],
            serde_json::json!({"type": "RuntimeDefault"})
        );
        let envs = c["env"].as_array().unwrap();
        for (name, value) in [
            ("KPROF_RUN_AS_USER", "65532"),
            ("KPROF_RUN_AS_GROUP", "65532"),
            ("KPROF_SECCOMP", "true"),
        ] {
            assert!(
                envs.contains(&serde_json::json!({"name": name, "value": value})),
                "{name}={value} missing: {envs:?}"
            );
        }
        assert_eq!(
            c["volumeMounts"][0],
            serde_json::json!({"name": "spool", "mountPath": "/var/lib/kprof"})
        );
        assert_eq!(c["volumeMounts"][1]["readOnly"], true);
        assert_eq!(pod["volumes"][0]["hostPath"]["path"], "/var/lib/kprof");
        let cgroup = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "cgroup")
            .expect("the node's cgroups are mounted");
        assert_eq!(
            (&cgroup["mountPath"], &cgroup["readOnly"]),
            (
                &serde_json::json!(HOST_CGROUP_DIR),
                &serde_json::json!(true)
            )
        );
        assert!(
            pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["name"] == "cgroup" && v["hostPath"]["path"] == "/sys/fs/cgroup")
        );
        assert_eq!(
            v["spec"]["selector"]["matchLabels"],
            v["spec"]["template"]["metadata"]["labels"]
        );
    }

    #[test]
    fn configuration_reaches_the_pod() {
        let cfg = OperatorConfig::from_yaml(
            "agent:\n  image: local/agent:dev\n  hostNetwork: true\n  storeUrl: http://store:8080\n  priorityClassName: system-node-critical\n  env: [{name: RUST_LOG, value: debug}]\n  mountBtf: false\n  capabilities: {add: [BPF, SYS_ADMIN], drop: [ALL]}\n",
        )
        .unwrap();
        let ds = desired_daemonset(&cfg.agent, "ns", &set(&["n"]));
        let v = serde_json::to_value(&ds).unwrap();
        let pod = &v["spec"]["template"]["spec"];
        assert_eq!(pod["hostNetwork"], true);
        assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
        assert_eq!(pod["priorityClassName"], "system-node-critical");
        let c = &pod["containers"][0];
        assert_eq!(c["image"], "local/agent:dev");
        assert_eq!(
            c["env"][2],
            serde_json::json!({"name": "KPROF_STORE_URL", "value": "http://store:8080"})
        );
        assert_eq!(c["env"][7]["name"], "RUST_LOG");
        // The spool and the node's cgroups; no BTF mount (mountBtf: false).
        assert_eq!(c["volumeMounts"].as_array().unwrap().len(), 2);
        assert_eq!(
            c["securityContext"]["allowPrivilegeEscalation"], true,
            "SYS_ADMIN needs it"
        );
    }

    #[test]
    fn uploads_get_a_token_meant_for_the_store_and_its_ca() {
        let cfg = OperatorConfig::from_yaml(
            "agent:\n  storeUrl: https://kprof-store.ns.svc:8090\n  storeCaConfigMap: kprof-store-ca\n  storeTokenAudience: kprof-store\n  env: [{name: KPROF_TOKEN_FILE, value: /mine}]\n",
        )
        .unwrap();
        let ds = desired_daemonset(&cfg.agent, "ns", &set(&["n"]));
        let v = serde_json::to_value(&ds).unwrap();
        let pod = &v["spec"]["template"]["spec"];
        let volumes = pod["volumes"].as_array().unwrap();
        let token = volumes.iter().find(|v| v["name"] == "store-token").unwrap();
        assert_eq!(
            token["projected"]["sources"][0]["serviceAccountToken"],
            serde_json::json!({"audience": "kprof-store", "expirationSeconds": 3600, "path": "token"})
        );
        let ca = volumes.iter().find(|v| v["name"] == "store-ca").unwrap();
        assert_eq!(ca["configMap"]["name"], "kprof-store-ca");
        let c = &pod["containers"][0];
        let envs = c["env"].as_array().unwrap();
        let at = |name: &str| envs.iter().rposition(|e| e["name"] == name).unwrap();
        assert_eq!(
            envs[at("KPROF_STORE_CA_FILE")]["value"],
            "/etc/kprof-store-ca/ca.crt"
        );
        // The projected token, unless the chart's own env says otherwise (it comes last).
        let token_envs: Vec<&serde_json::Value> = envs
            .iter()
            .filter(|e| e["name"] == "KPROF_TOKEN_FILE")
            .collect();
        assert_eq!(token_envs[0]["value"], "/var/run/secrets/kprof-store/token");
        assert_eq!(envs[at("KPROF_TOKEN_FILE")]["value"], "/mine");
        for name in ["store-token", "store-ca"] {
            let m = c["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["name"] == name)
                .unwrap();
            assert_eq!(m["readOnly"], true);
        }
        // Without them, the pod's ordinary token and the system's CAs.
        let plain = desired_daemonset(&OperatorConfig::default().agent, "ns", &set(&["n"]));
        let v = serde_json::to_value(&plain).unwrap();
        assert!(!v.to_string().contains("store-token"));
        assert!(!v.to_string().contains("KPROF_STORE_CA_FILE"));
    }

    #[test]
    fn root_and_no_seccomp_when_configured() {
        let cfg = OperatorConfig::from_yaml(
            "agent:\n  runAsUser: 0\n  seccomp: false\n  capabilities: {add: [BPF, PERFMON, SETUID], drop: [ALL]}\n",
        )
        .unwrap();
        let ds = desired_daemonset(&cfg.agent, "ns", &set(&["n"]));
        let v = serde_json::to_value(&ds).unwrap();
        let c = &v["spec"]["template"]["spec"]["containers"][0];
        let sc = &c["securityContext"];
        assert_eq!(
            sc["capabilities"]["add"],
            serde_json::json!(["BPF", "PERFMON", "SETUID"]),
            "staying root: no start-up capabilities added"
        );
        assert!(sc.get("seccompProfile").is_none(), "{sc}");
        assert!(
            v["spec"]["template"]["spec"]
                .get("securityContext")
                .is_none()
        );
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        let envs = c["env"].as_array().unwrap();
        assert!(envs.contains(&serde_json::json!({"name": "KPROF_RUN_AS_USER", "value": "0"})));
        assert!(envs.contains(&serde_json::json!({"name": "KPROF_SECCOMP", "value": "false"})));

        let cfg = OperatorConfig::from_yaml(
            "agent:\n  runAsUser: 1000\n  runAsGroup: 2000\n  capabilities: {add: [BPF, PERFMON, CAP_SETUID], drop: [ALL]}\n",
        )
        .unwrap();
        let ds = desired_daemonset(&cfg.agent, "ns", &set(&["n"]));
        let v = serde_json::to_value(&ds).unwrap();
        let c = &v["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            c["securityContext"]["capabilities"]["add"],
            serde_json::json!(["BPF", "PERFMON", "CAP_SETUID", "CHOWN", "SETGID"]),
            "a start-up capability already given is not repeated"
        );
        let envs = c["env"].as_array().unwrap();
        assert!(envs.contains(&serde_json::json!({"name": "KPROF_RUN_AS_USER", "value": "1000"})));
        assert!(envs.contains(&serde_json::json!({"name": "KPROF_RUN_AS_GROUP", "value": "2000"})));
    }

    #[test]
    fn hash_changes_with_nodes_only() {
        let cfg = OperatorConfig::default().agent;
        let a = desired_daemonset(&cfg, "ns", &set(&["n1"]));
        let b = desired_daemonset(&cfg, "ns", &set(&["n1"]));
        let c = desired_daemonset(&cfg, "ns", &set(&["n1", "n2"]));
        assert_eq!(recorded_hash(&a), recorded_hash(&b));
        assert_ne!(recorded_hash(&a), recorded_hash(&c));
    }

    #[test]
    fn active_nodes_cover_active_targets_only() {
        let now = ts("2026-01-01T00:00:00Z");
        let running = target("a", "shop", "selector: {matchLabels: {app: a}}");
        let suspended = target(
            "b",
            "shop",
            "selector: {matchLabels: {app: b}}\nsuspend: true",
        );
        let mut completed = target(
            "c",
            "shop",
            "selector: {matchLabels: {app: c}}\nduration: 1m",
        );
        completed.status = Some(kprof_crds::ProfilingTargetStatus {
            start_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(ts(
                "2025-12-31T00:00:00Z",
            ))),
            ..Default::default()
        });
        let invalid = target(
            "d",
            "shop",
            "selector: {matchExpressions: [{key: app, operator: In}]}",
        );
        let other_ns = target("e", "other", "selector: {matchLabels: {app: e}}");
        let pods = vec![
            pod("shop", "a1", &[("app", "a")], Some("n1"), "Running"),
            pod("shop", "a2", &[("app", "a")], Some("n2"), "Running"),
            pod("shop", "b1", &[("app", "b")], Some("n3"), "Running"),
            pod("shop", "c1", &[("app", "c")], Some("n4"), "Running"),
            pod("shop", "d1", &[("app", "d")], Some("n5"), "Running"),
            pod("shop", "e1", &[("app", "e")], Some("n6"), "Running"),
        ];
        let targets = [running, suspended, completed, invalid, other_ns];
        assert_eq!(active_nodes(&targets, &pods, now), set(&["n1", "n2"]));
        assert!(
            active_nodes(&targets[1..], &pods, now).is_empty(),
            "no active target: no agents"
        );
    }
}
