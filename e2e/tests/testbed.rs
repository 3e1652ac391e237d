//! The test bed's own tests: what every higher test tier relies on.
//! Without a running test bed each test prints `SKIPPED: needs the test bed: ...` and passes,
//! unless KPROF_REQUIRE_CLUSTER=1.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kprof_e2e::{
    TEST_PYTHON_IMAGE, TestNamespace, build_image, free_port, k8s_version, kubectl, node_is_ready,
    pod_logs, poll_until, random_suffix, require_cluster, wait_for, wait_pod_running,
    wait_pod_succeeded,
};
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

const POD_TIMEOUT: Duration = Duration::from_secs(90);

/// A hostNetwork pod running the test image with `command`.
fn python_pod(name: &str, command: &[&str], extra_env: serde_json::Value) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "hostNetwork": true,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main",
                "image": TEST_PYTHON_IMAGE,
                "imagePullPolicy": "Never",
                "command": command,
                "env": extra_env,
            }]
        }
    }))?)
}

#[tokio::test]
async fn node_is_ready_and_versions_match() -> Result<()> {
    let tb = require_cluster!(Ok(()));
    let node = Api::<Node>::all(tb.client.clone()).get(&tb.node).await?;
    assert!(node_is_ready(&node), "node {} not Ready", tb.node);
    let info = node.status.and_then(|s| s.node_info).context("nodeInfo")?;
    let want = format!("v{}", k8s_version());
    assert_eq!(info.kubelet_version, want, "kubelet version");
    assert_eq!(
        tb.client.apiserver_version().await?.git_version,
        want,
        "apiserver version"
    );
    // Schedulable for everything, DaemonSets included: no taints, not cordoned.
    let spec = node.spec.unwrap_or_default();
    assert!(
        spec.taints.unwrap_or_default().is_empty(),
        "node is tainted"
    );
    assert_ne!(spec.unschedulable, Some(true), "node is cordoned");
    assert!(!tb.node_ip.is_empty(), "node has no InternalIP");
    Ok(())
}

#[tokio::test]
async fn host_network_pod_runs_and_logs_and_exec_work() -> Result<()> {
    let tb = require_cluster!(Ok(()));
    let ns = TestNamespace::new(&tb.client, "e2e-pod").await?;
    let pods: Api<Pod> = ns.api();
    let pod = python_pod(
        "hello",
        &[
            "python3",
            "-c",
            "import sys,time; print('hello from', sys.version.split()[0], flush=True); time.sleep(3600)",
        ],
        json!([]),
    )?;
    pods.create(&PostParams::default(), &pod).await?;
    let running = wait_pod_running(&pods, "hello", POD_TIMEOUT).await?;
    assert_eq!(
        running.status.and_then(|s| s.pod_ip).as_deref(),
        Some(tb.node_ip.as_str()),
        "hostNetwork pod IP is the node IP"
    );

    let logs = poll_until(
        "the pod's log line",
        Duration::from_secs(20),
        Duration::from_millis(250),
        || {
            let pods = pods.clone();
            async move {
                Ok(pod_logs(&pods, "hello", None)
                    .await
                    .ok()
                    .filter(|l| l.contains("hello from 3.")))
            }
        },
    )
    .await?;
    assert!(logs.contains("hello from 3.11"), "{logs}");

    // exec goes API server -> kubelet (TLS both ways) -> containerd.
    let out = kubectl()
        .args([
            "exec",
            "-n",
            ns.name(),
            "hello",
            "--",
            "python3",
            "-c",
            "print(6*7)",
        ])
        .output()?;
    assert!(
        out.status.success(),
        "kubectl exec: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");

    // What a failing test would get dumped: pod state, events and container logs.
    let dump = ns.dump().await;
    assert!(
        dump.contains("--- pod hello: phase=Running")
            && dump.contains("| hello from 3.11")
            && dump.contains("Normal Scheduled"),
        "{dump}"
    );
    Ok(())
}

#[tokio::test]
async fn image_sh_builds_a_runnable_image_from_host_binaries() -> Result<()> {
    let tb = require_cluster!(Ok(()));
    let ns = TestNamespace::new(&tb.client, "e2e-image").await?;
    let image = format!("kprof.local/e2e/ls:{}", random_suffix());
    let ls = std::path::Path::new("/usr/bin/ls");
    let b = tokio::task::spawn_blocking({
        let image = image.clone();
        move || build_image(&image, &[ls])
    });
    b.await??;
    let pods: Api<Pod> = ns.api();
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ls"},
        "spec": {"hostNetwork": true, "restartPolicy": "Never", "containers": [{
            "name": "ls", "image": image, "imagePullPolicy": "Never", "args": ["-1", "/usr/local/bin"]}]}
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    wait_pod_succeeded(&pods, "ls", POD_TIMEOUT).await?;
    let logs = pod_logs(&pods, "ls", None).await?;
    assert_eq!(logs.trim(), "ls", "{logs}");
    Ok(())
}

#[tokio::test]
async fn apiserver_service_proxy_reaches_host_network_pod() -> Result<()> {
    let tb = require_cluster!(Ok(()));
    let ns = TestNamespace::new(&tb.client, "e2e-proxy").await?;
    let port = free_port()?;
    let marker = format!("marker-{}", random_suffix());
    let pods: Api<Pod> = ns.api();
    let env = json!([
        {"name": "PORT", "value": port.to_string()},
        {"name": "MESSAGE", "value": marker},
        {"name": "BIND", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]);
    // The image's default entrypoint is the test app (python3 /app/main.py).
    let mut pod = python_pod("web", &[], env)?;
    pod.spec.as_mut().unwrap().containers[0].command = None;
    pods.create(&PostParams::default(), &pod).await?;
    wait_pod_running(&pods, "web", POD_TIMEOUT).await?;

    let svc: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": port}]}
    }))?;
    ns.api::<Service>()
        .create(&PostParams::default(), &svc)
        .await?;

    // Without kube-proxy, the API server proxies straight to the Service's endpoint, which
    // for a hostNetwork pod is the node IP.
    let path = format!(
        "/api/v1/namespaces/{}/services/http:web:http/proxy/hello",
        ns.name()
    );
    let client = tb.client.clone();
    let body = poll_until(
        "the service proxy to answer",
        Duration::from_secs(60),
        Duration::from_millis(500),
        || {
            let (client, path) = (client.clone(), path.clone());
            async move {
                let req = http::Request::get(&path).body(Vec::new())?;
                Ok(client.request_text(req).await.ok())
            }
        },
    )
    .await?;
    assert!(
        body.contains("kprof-testbed ok path=/hello") && body.contains(&marker),
        "{body}"
    );

    let out = kubectl().args(["get", "--raw", &path]).output()?;
    assert!(
        out.status.success(),
        "kubectl get --raw: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&marker));
    let logs = pod_logs(&pods, "web", None).await?;
    assert!(logs.contains("request GET /hello"), "{logs}");
    Ok(())
}

#[tokio::test]
async fn pod_service_account_token_passes_token_review() -> Result<()> {
    let tb = require_cluster!(Ok(()));
    let ns = TestNamespace::new(&tb.client, "e2e-token").await?;
    let pods: Api<Pod> = ns.api();
    // The pod calls the API server the way an in-cluster client does (token + CA from the
    // projected volume, host/port from the env), then prints its token for the test.
    let script = r#"
import json, os, ssl, urllib.request
d = "/var/run/secrets/kubernetes.io/serviceaccount"
token = open(d + "/token").read().strip()
ctx = ssl.create_default_context(cafile=d + "/ca.crt")
url = "https://%s:%s/version" % (os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"])
req = urllib.request.Request(url, headers={"Authorization": "Bearer " + token})
print("VERSION=" + json.load(urllib.request.urlopen(req, context=ctx, timeout=10))["gitVersion"])
print("NAMESPACE=" + open(d + "/namespace").read().strip())
print("TOKEN=" + token, flush=True)
"#;
    let env = serde_json::to_value(tb.in_cluster_env())?;
    let pod = python_pod("token", &["python3", "-c", script], env)?;
    pods.create(&PostParams::default(), &pod).await?;
    wait_pod_succeeded(&pods, "token", POD_TIMEOUT).await?;
    let logs = pod_logs(&pods, "token", None).await?;
    let field = |k: &str| {
        logs.lines()
            .find_map(|l| l.strip_prefix(k))
            .map(str::to_string)
    };
    assert_eq!(
        field("VERSION=").as_deref(),
        Some(format!("v{}", k8s_version()).as_str()),
        "in-pod API call: {logs}"
    );
    assert_eq!(field("NAMESPACE=").as_deref(), Some(ns.name()));
    let token = field("TOKEN=").context("no token in the pod's log")?;

    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token),
            ..Default::default()
        },
        ..Default::default()
    };
    let reviewed = Api::<TokenReview>::all(tb.client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    let status = reviewed.status.context("TokenReview has no status")?;
    ensure!(
        status.authenticated == Some(true),
        "token not authenticated: {:?}",
        status.error
    );
    let user = status.user.context("no user")?;
    assert_eq!(
        user.username.as_deref(),
        Some(format!("system:serviceaccount:{}:default", ns.name()).as_str())
    );
    let extra: BTreeMap<String, Vec<String>> = user.extra.unwrap_or_default();
    assert_eq!(
        extra
            .get("authentication.kubernetes.io/pod-name")
            .map(|v| v[0].as_str()),
        Some("token"),
        "bound token: {extra:?}"
    );
    Ok(())
}

#[tokio::test]
async fn daemonset_is_scheduled_on_the_node() -> Result<()> {
    let tb = require_cluster!(Ok(()));
    let ns = TestNamespace::new(&tb.client, "e2e-ds").await?;
    let ds: DaemonSet = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "ds"},
        "spec": {
            "selector": {"matchLabels": {"app": "ds"}},
            "template": {
                "metadata": {"labels": {"app": "ds"}},
                "spec": {"hostNetwork": true, "terminationGracePeriodSeconds": 1, "containers": [{
                    "name": "main", "image": TEST_PYTHON_IMAGE, "imagePullPolicy": "Never",
                    "command": ["python3", "-c", "import time; time.sleep(3600)"]}]}
            }
        }
    }))?;
    let api: Api<DaemonSet> = ns.api();
    api.create(&PostParams::default(), &ds).await?;
    let ready = wait_for(&api, "ds", POD_TIMEOUT, |d: Option<&DaemonSet>| {
        d.and_then(|d| d.status.as_ref())
            .is_some_and(|s| s.desired_number_scheduled == 1 && s.number_ready == 1)
    })
    .await?;
    assert_eq!(ready.status.unwrap().number_misscheduled, 0);
    Ok(())
}
