//! Tenancy of the profile store on the real test bed: users read profiles through the
//! Kubernetes API (the aggregated API `data.kprof.io`), with their own RBAC.
//!
//! The store runs in-process on the host as `kprof-operator run` configures it (uploads on one
//! port; reads only on a TLS port from the API server's front proxy), a selector-less
//! `kprof-api` Service points at it (endpoints at the node IP, referring to a sleeping
//! hostNetwork anchor pod), and an `APIService v1alpha1.data.kprof.io` with the test's CA sends
//! the API server's requests there. The chart's read ClusterRole (aggregated into `view`) is
//! rendered with `helm template` and applied. Cluster-scoped objects are deleted when the test
//! ends, even when it fails (an unavailable APIService would stall every namespace deletion).
//!
//! Shows: a user with `view` in namespace A reads A's profiles with `kubectl kprof
//! top/flamegraph/diff` and gets 403 for B; a user with no rights is refused both; a diff across
//! A and B is refused unless the user may read both; without a verified identity every read
//! route and the web page are refused on both ports; only the agent may upload.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort, EndpointSubset, Endpoints, ObjectReference, Pod, Service,
    ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::api::rbac::v1::{ClusterRole, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kprof_crds::{ArtifactRef, Artifacts, Profile, ProfileSpec, ProfileType};
use kprof_e2e::{TEST_PYTHON_IMAGE, TestNamespace, kubectl, require_cluster, wait_pod_running};
use kprof_store::{self as store, ApiListener, Digest, Readers, StoreConfig, StoreMetrics};
use kube::api::PostParams;
use kube::{Api, Client};

const API: &str = "/apis/data.kprof.io/v1alpha1";
const APISERVICE: &str = "v1alpha1.data.kprof.io";
const RELEASE: &str = "kprof-e2e-tenancy";

/// A 10-minute token of `ns/sa` (the API server's minimum lifetime), meant for the API server.
async fn token(client: &Client, ns: &str, sa: &str) -> Result<String> {
    kprof_e2e::service_account_token(client, ns, sa, 600).await
}

/// A 10-minute token of `ns/sa` meant for the store (what the agent DaemonSet projects).
async fn store_token(client: &Client, ns: &str, sa: &str) -> Result<String> {
    let audience = vec![kprof_crds::store_api::UPLOAD_AUDIENCE.to_string()];
    kprof_e2e::service_account_token_for(client, ns, sa, 600, Some(audience)).await
}

/// PUT an artifact straight to the store for namespace `shop`; (status, body).
async fn upload(addr: &str, bytes: &[u8], token: Option<&str>) -> Result<(u16, String)> {
    upload_for(addr, bytes, token, "shop").await
}

/// PUT an artifact straight to the store for namespace `ns`; (status, body).
async fn upload_for(
    addr: &str,
    bytes: &[u8],
    token: Option<&str>,
    ns: &str,
) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "PUT /v1/artifacts/{} HTTP/1.1\r\nHost: {addr}\r\n{auth}X-Kprof-Namespace: {ns}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        Digest::of(bytes),
        bytes.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(bytes).await?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status line")?;
    Ok((
        status,
        text.split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string(),
    ))
}

fn apply_crds() -> Result<()> {
    let crds = kprof_e2e::testbed_dir().join("../../crds");
    for f in ["profilingtargets.yaml", "profiles.yaml"] {
        let out = kubectl()
            .args(["apply", "--server-side", "--force-conflicts", "-f"])
            .arg(crds.join(f))
            .output()?;
        if !out.status.success() {
            bail!(
                "kubectl apply {f}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let out = kubectl()
        .args([
            "wait",
            "--for",
            "condition=established",
            "--timeout=60s",
            "crd/profiles.kprof.io",
            "crd/profilingtargets.kprof.io",
        ])
        .output()?;
    if !out.status.success() {
        bail!(
            "CRDs not established: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A hostNetwork pod that only sleeps: its IP is the node IP, and the API server's service proxy
/// only proxies to endpoint addresses whose `targetRef` is a Pod with that IP ("Address has no
/// target ref" otherwise). The store itself runs in the test process on the host.
async fn anchor_pod(client: &Client, ns: &str, service_account: &str) -> Result<Pod> {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "kprof-store-anchor"},
        "spec": {"hostNetwork": true, "restartPolicy": "Never", "terminationGracePeriodSeconds": 0,
            "serviceAccountName": service_account, "automountServiceAccountToken": false,
            "containers": [{"name": "sleep", "image": TEST_PYTHON_IMAGE, "imagePullPolicy": "Never",
                "command": ["python3", "-c", "import time; time.sleep(3600)"]}]}
    }))?;
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    api.create(&PostParams::default(), &pod).await?;
    wait_pod_running(&api, "kprof-store-anchor", Duration::from_secs(90)).await
}

/// A Service `name` in `ns` (port `svc_port`, named `https`) with endpoints at `ip:port` that
/// refer to the anchor pod.
async fn service(
    client: &Client,
    ns: &str,
    name: &str,
    svc_port: i32,
    ip: &str,
    port: u16,
    anchor: &Pod,
) -> Result<()> {
    let target = ObjectReference {
        kind: Some("Pod".into()),
        namespace: Some(ns.into()),
        name: anchor.metadata.name.clone(),
        uid: anchor.metadata.uid.clone(),
        ..Default::default()
    };
    let mut svc = Service::default();
    svc.metadata.name = Some(name.into());
    svc.spec = Some(ServiceSpec {
        ports: Some(vec![ServicePort {
            name: Some("https".into()),
            port: svc_port,
            target_port: Some(
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port as i32),
            ),
            ..Default::default()
        }]),
        ..Default::default()
    });
    Api::<Service>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &svc)
        .await?;
    let mut ep = Endpoints::default();
    ep.metadata.name = Some(name.into());
    ep.subsets = Some(vec![EndpointSubset {
        addresses: Some(vec![EndpointAddress {
            ip: ip.into(),
            target_ref: Some(target.clone()),
            ..Default::default()
        }]),
        ports: Some(vec![EndpointPort {
            name: Some("https".into()),
            port: port as i32,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        ..Default::default()
    }]);
    Api::<Endpoints>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &ep)
        .await?;
    let mut slice = EndpointSlice {
        address_type: "IPv4".into(),
        endpoints: vec![Endpoint {
            addresses: vec![ip.into()],
            target_ref: Some(target),
            ..Default::default()
        }],
        ports: Some(vec![k8s_openapi::api::discovery::v1::EndpointPort {
            name: Some("https".into()),
            port: Some(port as i32),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        ..Default::default()
    };
    slice.metadata.name = Some(format!("{name}-e2e"));
    slice.metadata.labels = Some(BTreeMap::from([
        ("kubernetes.io/service-name".to_string(), name.to_string()),
        (
            "endpointslice.kubernetes.io/managed-by".to_string(),
            "kprof-e2e".to_string(),
        ),
    ]));
    Api::<EndpointSlice>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &slice)
        .await?;
    Ok(())
}

/// Bind the ClusterRole `role` to the ServiceAccount `sa_ns/sa` in namespace `ns`.
async fn bind(client: &Client, ns: &str, role: &str, sa_ns: &str, sa: &str) -> Result<()> {
    let name = format!("{role}-{sa_ns}-{sa}");
    let mut b = RoleBinding {
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: role.into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: sa.into(),
            namespace: Some(sa_ns.into()),
            ..Default::default()
        }]),
        ..Default::default()
    };
    b.metadata.name = Some(name);
    Api::<RoleBinding>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &b)
        .await?;
    Ok(())
}

/// Deletes the test's cluster-scoped objects when dropped (also on failure).
struct ClusterObjects(Vec<(&'static str, String)>);

impl Drop for ClusterObjects {
    fn drop(&mut self) {
        for (kind, name) in &self.0 {
            let _ = kubectl()
                .args(["delete", kind, name, "--ignore-not-found", "--wait=false"])
                .output();
        }
    }
}

/// The chart's read ClusterRole (`<release>-kprof-view`), rendered by `helm template`.
fn chart_view_role() -> Result<ClusterRole> {
    let chart = kprof_e2e::testbed_dir().join("../../charts/kprof");
    let out = Command::new(kprof_e2e::k8s_bin_dir().join("helm"))
        .args(["template", RELEASE])
        .arg(&chart)
        .args(["--show-only", "templates/rbac.yaml"])
        .output()
        .context("running helm template")?;
    ensure!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = serde_yaml::Value::deserialize(doc)?;
        if v["kind"].as_str() == Some("ClusterRole")
            && v["metadata"]["name"].as_str() == Some(&format!("{RELEASE}-kprof-view"))
        {
            return Ok(serde_yaml::from_value(v)?);
        }
    }
    bail!("the chart has no ClusterRole {RELEASE}-kprof-view")
}
use serde::Deserialize as _;

/// A CA and a serving certificate for `kprof-api.<ns>.svc`: (CA PEM, cert PEM, key PEM).
fn serving_cert(ns: &str) -> Result<(String, String, String)> {
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "kprof-e2e-api-ca");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let host = format!("kprof-api.{ns}.svc");
    let mut p = rcgen::CertificateParams::new(vec![host.clone()])?;
    p.distinguished_name.push(rcgen::DnType::CommonName, host);
    let key = rcgen::KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    Ok((ca_cert.pem(), cert.pem(), key.serialize_pem()))
}

/// A client certificate from the test bed's front-proxy CA with common name `cn`, written to
/// `dir`: (cert path, key path). The test runs as root next to the test bed's PKI.
fn front_proxy_client(dir: &std::path::Path, cn: &str) -> Result<(PathBuf, PathBuf)> {
    let pki = kprof_e2e::state_dir().join("pki");
    let ca_pem = std::fs::read_to_string(pki.join("front-proxy-ca.crt"))?;
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.join("front-proxy-ca.key"))?)?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    let key = rcgen::KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    let (c, k) = (dir.join(format!("{cn}.crt")), dir.join(format!("{cn}.key")));
    std::fs::write(&c, cert.pem())?;
    std::fs::write(&k, key.serialize_pem())?;
    Ok((c, k))
}

/// The HTTP status of `curl -k` (the listener's certificate is not the point here).
fn curl_status(url: &str, extra: &[&str]) -> Result<u16> {
    let out = Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "-m", "10"])
        .args(extra)
        .arg(url)
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0))
}

/// `kubectl get --raw path` as `user`; (ok, stdout, stderr).
fn raw_as(user: &str, path: &str) -> (bool, String, String) {
    match kubectl()
        .args(["get", "--raw", path, "--as", user])
        .output()
    {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ),
        Err(e) => (false, String::new(), e.to_string()),
    }
}

/// The plugin in-process; (ok, stdout, error).
async fn kprof(args: &[&str]) -> (bool, String, String) {
    let mut out = Vec::new();
    let r = kprof_plugin::run_args(args, &mut out).await;
    (
        r.is_ok(),
        String::from_utf8_lossy(&out).into_owned(),
        r.err().map(|e| format!("{e:#}")).unwrap_or_default(),
    )
}

/// Retry `f` until it succeeds or 60 s pass (RBAC aggregation and the APIService's availability
/// take a moment); the last result either way.
async fn eventually<F, Fut>(what: &str, mut f: F) -> (bool, String, String)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (bool, String, String)>,
{
    let mut last = (false, String::new(), String::new());
    for _ in 0..120 {
        last = f().await;
        if last.0 {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!("{what}: still failing after 60 s: {}", last.2);
    last
}

fn profile(name: &str, node: &str, url: &str, d: &Digest, size: usize) -> Profile {
    let now = k8s_openapi::jiff::Timestamp::now();
    let mut p = Profile::new(
        name,
        ProfileSpec {
            target: "checkout".into(),
            pod: "checkout-0".into(),
            container: "app".into(),
            node: node.into(),
            pids: vec![],
            runtime: "cpython 3.11".into(),
            profile_type: ProfileType::Cpu,
            window_start: Time(now - k8s_openapi::jiff::SignedDuration::from_secs(30)),
            window_end: Time(now),
            sample_hz: 99,
            samples: 80,
            lost_samples: 0,
            cpu_cores: 0.03,
            threads: 1,
            top: "checkout.compute_total 75.0%".into(),
            top_functions: vec![],
            artifacts: Artifacts {
                pprof: Some(ArtifactRef {
                    url: url.into(),
                    digest: d.to_string(),
                    size_bytes: size as u64,
                }),
                flamegraph: None,
                summary: None,
            },
            time: None,
            thread_summary: None,
            memory_summary: None,
            warnings: vec![],
        },
    );
    p.metadata.labels = Some(BTreeMap::from([(
        "kprof.io/target".to_string(),
        "checkout".to_string(),
    )]));
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_are_read_through_the_api_server_with_the_readers_rbac() -> Result<()> {
    let tb = require_cluster!(Ok(()));
    apply_crds()?;
    let store_ns = TestNamespace::new(&tb.client, "kprof-store").await?;
    let ns_a = TestNamespace::new(&tb.client, "kprof-team-a").await?;
    let ns_b = TestNamespace::new(&tb.client, "kprof-team-b").await?;
    let (sns, a, b) = (
        store_ns.name().to_string(),
        ns_a.name().to_string(),
        ns_b.name().to_string(),
    );
    // Dropped before the namespaces: their deletion needs the APIService gone or available.
    let _cluster_objects = ClusterObjects(vec![
        ("apiservice", APISERVICE.to_string()),
        ("clusterrole", format!("{RELEASE}-kprof-view")),
    ]);
    let _ = kubectl()
        .args(["delete", "apiservice", APISERVICE, "--ignore-not-found"])
        .output();

    // The store as `kprof-operator run` configures it, on all addresses of the host.
    let dir = tempfile::tempdir()?;
    let (ca_pem, cert_pem, key_pem) = serving_cert(&sns)?;
    std::fs::write(dir.path().join("tls.crt"), cert_pem)?;
    std::fs::write(dir.path().join("tls.key"), key_pem)?;
    let agent = format!("system:serviceaccount:{sns}:kprof-agent");
    let mut config = StoreConfig::for_dir(dir.path().join("store"), "0.0.0.0:0".parse()?, &agent);
    config.readers = Readers::FrontProxy(ApiListener {
        listen: "0.0.0.0:0".parse()?,
        cert_file: dir.path().join("tls.crt"),
        key_file: dir.path().join("tls.key"),
        reload_interval: std::time::Duration::from_secs(60),
        tls_uploads: false,
    });
    config.upload_audience = Some(kprof_crds::store_api::UPLOAD_AUDIENCE.into());
    config.public_url = format!("http://kprof-store.{sns}.svc:8090");
    let bound = store::Store::new(config, tb.client.clone(), StoreMetrics::default())?
        .bind()
        .await
        .context(
            "starting the store (is the test bed's aggregation layer on? e2e/testbed/up.sh)",
        )?;
    let upload_port = bound.local_addr().port();
    let api_port = bound.api_addr().context("no API listener")?.port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(bound.run(async move {
        let _ = stopped.await;
    }));
    let upload_addr = format!("127.0.0.1:{upload_port}");
    let anchor = anchor_pod(&tb.client, &sns, "default").await?;
    service(
        &tb.client,
        &sns,
        "kprof-api",
        443,
        &tb.node_ip,
        api_port,
        &anchor,
    )
    .await?;
    let apiservice: serde_json::Value = serde_json::json!({
        "apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
        "metadata": {"name": APISERVICE},
        "spec": {"group": "data.kprof.io", "version": "v1alpha1",
            "service": {"name": "kprof-api", "namespace": sns, "port": 443},
            "caBundle": k8s_openapi::ByteString(ca_pem.into_bytes()),
            "groupPriorityMinimum": 100, "versionPriority": 10}
    });
    let file = dir.path().join("apiservice.json");
    std::fs::write(&file, apiservice.to_string())?;
    let out = kubectl().args(["create", "-f"]).arg(&file).output()?;
    ensure!(
        out.status.success(),
        "creating the APIService: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Api::<ClusterRole>::all(tb.client.clone())
        .create(&PostParams::default(), &chart_view_role()?)
        .await?;
    println!(
        "store: uploads on {}:{upload_port}, API on {}:{api_port}; APIService {APISERVICE} -> {sns}/kprof-api",
        tb.node_ip, tb.node_ip
    );

    // Uploads: only the agent's ServiceAccount.
    let hot = |hot: i64, idle: i64| {
        store::pprof::synthetic(
            &[
                (
                    &[
                        "python",
                        "main",
                        "app.serve",
                        "app.handle",
                        "checkout.compute_total",
                    ],
                    hot,
                ),
                (&["python", "main", "app.serve", "selectors.select"], idle),
            ],
            1_700_000_000_000_000_000,
            30_000_000_000,
        )
        .encode_gzip()
    };
    let (before, after) = (hot(60, 20), hot(20, 60));
    let agent_token = store_token(&tb.client, &sns, "kprof-agent").await?;
    let agent_api_token = token(&tb.client, &sns, "kprof-agent").await?;
    let other_token = store_token(&tb.client, &a, "default").await?;
    let (s, body) = upload(&upload_addr, &before, None).await?;
    assert_eq!(s, 401, "no token: {body}");
    let (s, body) = upload(&upload_addr, &before, Some("not-a-token")).await?;
    assert_eq!(s, 401, "invalid token: {body}");
    // The agent's own, but meant for the API server: whoever holds it may not upload.
    let (s, body) = upload(&upload_addr, &before, Some(&agent_api_token)).await?;
    assert_eq!(s, 401, "the agent's API-server token: {body}");
    let (s, body) = upload(&upload_addr, &before, Some(&other_token)).await?;
    assert_eq!(s, 403, "another ServiceAccount: {body}");
    for bytes in [&before, &after] {
        let (s, body) = upload(&upload_addr, bytes, Some(&agent_token)).await?;
        assert_eq!(s, 201, "agent: {body}");
    }
    println!(
        "uploads: none/invalid/the API server's audience -> 401, other SA -> 403, agent -> 201"
    );

    // Profiles in A (before, after) and B.
    for (ns, name, bytes) in [(&a, "p1", &before), (&a, "p2", &after), (&b, "p1", &before)] {
        let d = Digest::of(bytes);
        let url = format!("http://kprof-store.{sns}.svc:8090/v1/artifacts/{d}");
        Api::<Profile>::namespaced(tb.client.clone(), ns)
            .create(
                &PostParams::default(),
                &profile(name, &tb.node, &url, &d, bytes.len()),
            )
            .await?;
    }

    // Users: `view` in A; `view` in A and B; nothing.
    let viewer = format!("system:serviceaccount:{a}:viewer");
    let both = format!("system:serviceaccount:{a}:both");
    let stranger = format!("system:serviceaccount:{a}:stranger");
    for sa in ["viewer", "both", "stranger"] {
        token(&tb.client, &a, sa).await?;
    }
    bind(&tb.client, &a, "view", &a, "viewer").await?;
    bind(&tb.client, &a, "view", &a, "both").await?;
    bind(&tb.client, &b, "view", &a, "both").await?;

    let kc = kprof_e2e::kubeconfig_path().to_string_lossy().to_string();
    let plugin = |user: &str, ns: &str, args: &[&str]| {
        let mut v: Vec<String> = ["--kubeconfig", &kc, "--as", user, "-n", ns]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(args.iter().map(|s| s.to_string()));
        v
    };
    let run = |args: Vec<String>| async move {
        kprof(&args.iter().map(String::as_str).collect::<Vec<_>>()).await
    };

    // The viewer of A: top, flame graph and diff in A.
    let (ok, out, err) = eventually("viewer top in A", || {
        run(plugin(&viewer, &a, &["top", "p1"]))
    })
    .await;
    println!("viewer: kubectl kprof top -n A p1:\n{out}{err}");
    assert!(ok && out.contains("checkout.compute_total"), "{err}");
    let svg = dir.path().join("a.svg").to_string_lossy().to_string();
    let (ok, _, err) = run(plugin(&viewer, &a, &["flamegraph", "p1", "-o", &svg])).await;
    assert!(ok, "flamegraph: {err}");
    assert!(std::fs::read_to_string(&svg)?.contains("checkout.compute_total"));
    let diff = dir.path().join("diff.svg").to_string_lossy().to_string();
    let (ok, out, err) = run(plugin(&viewer, &a, &["diff", "p1", "p2", "-o", &diff])).await;
    assert!(ok && out.contains("selectors.select"), "diff: {err}");
    // ... and not in B: 403 from the API server.
    let (ok, _, err) = run(plugin(&viewer, &b, &["top", "p1"])).await;
    println!("viewer in B: {err}");
    assert!(
        !ok && err.contains("403") && err.contains("not allowed"),
        "{err}"
    );
    for sub in ["pprof", "summary"] {
        let (ok, _, err) = raw_as(&viewer, &format!("{API}/namespaces/{b}/profiles/p1/{sub}"));
        assert!(
            !ok && err.contains("Forbidden"),
            "{sub} of B as viewer: {err}"
        );
    }
    // The stranger: refused in both.
    for ns in [&a, &b] {
        let (ok, _, err) = run(plugin(&stranger, ns, &["top", "p1"])).await;
        assert!(
            !ok && err.contains("not allowed"),
            "stranger in {ns}: {err}"
        );
        let (ok, _, err) = raw_as(
            &stranger,
            &format!("{API}/namespaces/{ns}/profiles/p1/pprof"),
        );
        assert!(
            !ok && err.contains("Forbidden"),
            "stranger pprof in {ns}: {err}"
        );
    }
    println!("viewer: A allowed, B 403; stranger: 403 in both");

    // Diffs across A and B: the side outside the URL is checked by kprof (SubjectAccessReview).
    let cross = format!("{API}/namespaces/{a}/profiles/p2/diff?base={b}/p1");
    let (ok, _, err) = raw_as(&viewer, &cross);
    println!("viewer diff A against B: {}", err.trim());
    assert!(!ok && err.contains("Forbidden"), "{err}");
    let page = format!("{API}/namespaces/{a}/profiles?a={b}%2Fp1&b={a}%2Fp2");
    let (ok, _, err) = raw_as(&viewer, &page);
    assert!(
        !ok && err.contains("Forbidden"),
        "diff page as viewer: {err}"
    );
    let (ok, out, err) = eventually("both: cross diff", || {
        let r = raw_as(&both, &cross);
        async move { r }
    })
    .await;
    assert!(
        ok && out.contains("<svg"),
        "both may diff A against B: {err}"
    );
    let (ok, out, err) = raw_as(&both, &page);
    assert!(
        ok && out.contains("selectors.select"),
        "diff page as both: {err}"
    );
    // The web page of A for its viewer, as `kubectl proxy` would fetch it.
    let (ok, out, err) = raw_as(&viewer, &format!("{API}/namespaces/{a}/profiles"));
    assert!(
        ok && out.contains("profiles/p2/ui"),
        "index as viewer: {err}"
    );
    let (ok, out, err) = raw_as(&viewer, &format!("{API}/namespaces/{a}/profiles/p1/ui"));
    assert!(
        ok && out.contains("checkout.compute_total"),
        "page as viewer: {err}"
    );
    println!("cross-namespace diff: viewer 403, both 200; web page served to the viewer");

    // Straight to the store's ports, without the API server.
    let d = Digest::of(&before);
    let reads = [
        format!("{API}/artifacts/{d}"),
        format!("{API}/namespaces/{a}/profiles"),
        format!("{API}/namespaces/{a}/profiles/p1/pprof"),
        format!("{API}/namespaces/{a}/profiles/p1/flamegraph"),
        format!("{API}/namespaces/{a}/profiles/p1/top"),
        format!("{API}/namespaces/{a}/profiles/p1/summary"),
        format!("{API}/namespaces/{a}/profiles/p1/ui"),
        format!("{API}/namespaces/{a}/profiles/p2/diff?base={a}/p1"),
    ];
    // What the store served before: no longer on either port.
    let former = [
        format!("/v1/artifacts/{d}"),
        format!("/v1/profiles/{a}/p1/pprof"),
        format!("/ui/profiles/{a}/p1"),
        "/".to_string(),
    ];
    let certs = tempfile::tempdir()?;
    let (wrong_crt, wrong_key) = front_proxy_client(certs.path(), "not-the-front-proxy")?;
    let (proxy_crt, proxy_key) = front_proxy_client(certs.path(), "front-proxy-client")?;
    let (wc, wk) = (
        wrong_crt.to_string_lossy().to_string(),
        wrong_key.to_string_lossy().to_string(),
    );
    let (pc, pk) = (
        proxy_crt.to_string_lossy().to_string(),
        proxy_key.to_string_lossy().to_string(),
    );
    let admin = "X-Remote-User: kprof-testbed-admin";
    let group = "X-Remote-Group: system:masters";
    for path in &reads {
        let upload_url = format!("http://{}:{upload_port}{path}", tb.node_ip);
        let api_url = format!("https://{}:{api_port}{path}", tb.node_ip);
        let s = curl_status(&upload_url, &["-H", admin])?;
        assert_eq!(s, 403, "upload port {path}");
        let s = curl_status(&api_url, &["-H", admin, "-H", group])?;
        assert_eq!(s, 401, "API port without a certificate {path}");
        let s = curl_status(&api_url, &["--cert", &wc, "--key", &wk, "-H", admin])?;
        assert_eq!(
            s, 401,
            "API port, front-proxy CA but not an allowed name {path}"
        );
        let s = curl_status(&api_url, &["--cert", &pc, "--key", &pk])?;
        assert!(
            s == 401 || s == 404,
            "API port, front proxy naming nobody {path}: {s}"
        );
    }
    for path in &former {
        let s = curl_status(&format!("http://{}:{upload_port}{path}", tb.node_ip), &[])?;
        assert_eq!(s, 403, "upload port {path}");
        let s = curl_status(&format!("https://{}:{api_port}{path}", tb.node_ip), &[])?;
        assert!(s == 401 || s == 404, "API port {path}: {s}");
    }
    // The same front-proxy certificate naming a user is believed (the check is not vacuous).
    let s = curl_status(
        &format!(
            "https://{}:{api_port}{API}/namespaces/{a}/profiles/p1/top",
            tb.node_ip
        ),
        &["--cert", &pc, "--key", &pk, "-H", admin],
    )?;
    assert_eq!(s, 200, "the front proxy naming a user");
    println!(
        "direct requests: upload port 403, API port 401 without the front proxy's certificate and a user, for {} read paths",
        reads.len()
    );

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    Ok(())
}

/// POST a Profile to the API server with a bearer token only; (status, body).
fn create_profile_as(token: &str, ns: &str, p: &Profile) -> Result<(u16, String)> {
    let pki = kprof_e2e::state_dir().join("pki");
    let port = std::env::var("KPROF_APISERVER_PORT").unwrap_or_else(|_| "6443".into());
    let mut p = serde_json::to_value(p)?;
    p["apiVersion"] = "kprof.io/v1alpha1".into();
    p["kind"] = "Profile".into();
    let out = Command::new("curl")
        .args(["-s", "-m", "10", "-w", "\n%{http_code}", "--cacert"])
        .arg(pki.join("ca.crt"))
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args(["-H", "Content-Type: application/json", "-d", &p.to_string()])
        .arg(format!(
            "https://127.0.0.1:{port}/apis/kprof.io/v1alpha1/namespaces/{ns}/profiles"
        ))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or((&text, "0"));
    Ok((code.trim().parse().unwrap_or(0), body.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_writes_profiles_only_for_its_own_node() -> Result<()> {
    use k8s_openapi::api::authentication::v1::{
        BoundObjectReference, TokenRequest, TokenRequestSpec,
    };
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{PolicyRule, Role};
    let tb = require_cluster!(Ok(()));
    apply_crds()?;
    let ns = TestNamespace::new(&tb.client, "kprof-agent-node").await?;
    let n = ns.name().to_string();
    // The chart's policy, rendered for a release in this namespace (its agent is n/kprof-agent).
    let release = format!("e2e-{n}");
    let out = Command::new(kprof_e2e::k8s_bin_dir().join("helm"))
        .args(["template", &release])
        .arg(kprof_e2e::testbed_dir().join("../../charts/kprof"))
        .args(["-n", &n, "--show-only", "templates/admission.yaml"])
        .output()?;
    ensure!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let policy = format!("{release}-kprof-agent-own-node");
    let _cluster_objects = ClusterObjects(vec![
        ("validatingadmissionpolicybinding", policy.clone()),
        ("validatingadmissionpolicy", policy.clone()),
    ]);
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), &out.stdout)?;
    let out = kubectl().args(["apply", "-f"]).arg(file.path()).output()?;
    ensure!(
        out.status.success(),
        "applying the policy: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The agent's ServiceAccount may create Profiles here; its token is bound to a pod on this
    // node, as a DaemonSet pod's token is.
    let sas: Api<ServiceAccount> = Api::namespaced(tb.client.clone(), &n);
    let mut sa = ServiceAccount::default();
    sa.metadata.name = Some("kprof-agent".into());
    sas.create(&PostParams::default(), &sa).await?;
    let mut role = Role::default();
    role.metadata.name = Some("write-profiles".into());
    role.rules = Some(vec![PolicyRule {
        api_groups: Some(vec!["kprof.io".into()]),
        resources: Some(vec!["profiles".into()]),
        verbs: vec!["create".into(), "get".into()],
        ..Default::default()
    }]);
    Api::<Role>::namespaced(tb.client.clone(), &n)
        .create(&PostParams::default(), &role)
        .await?;
    let mut rb = RoleBinding {
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: "write-profiles".into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: "kprof-agent".into(),
            namespace: Some(n.clone()),
            ..Default::default()
        }]),
        ..Default::default()
    };
    rb.metadata.name = Some("write-profiles".into());
    Api::<RoleBinding>::namespaced(tb.client.clone(), &n)
        .create(&PostParams::default(), &rb)
        .await?;
    let pod = anchor_pod(&tb.client, &n, "kprof-agent").await?;
    let tr = TokenRequest {
        spec: TokenRequestSpec {
            expiration_seconds: Some(600),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let bound = sas
        .create_token_request("kprof-agent", &PostParams::default(), &tr)
        .await?
        .status
        .context("no token")?
        .token;
    let unbound = token(&tb.client, &n, "kprof-agent").await?;

    let d = Digest::of(b"x");
    let url = format!("http://kprof-store.{n}.svc:8090/v1/artifacts/{d}");
    let p = |name: &str, node: &str| profile(name, node, &url, &d, 1);
    // The policy takes a moment to be enforced: retry until the other node's Profile is refused.
    let mut refused = (0, String::new());
    for i in 0..60 {
        refused = create_profile_as(&bound, &n, &p(&format!("other-{i}"), "some-other-node"))?;
        if refused.0 == 403 || refused.0 == 422 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "Profile of another node with the agent's pod-bound token: {} {}",
        refused.0, refused.1
    );
    assert!(
        (refused.0 == 403 || refused.0 == 422)
            && refused
                .1
                .contains("may not write a Profile of node some-other-node"),
        "{refused:?}"
    );
    let (s, body) = create_profile_as(&bound, &n, &p("own", &tb.node))?;
    assert_eq!(s, 201, "its own node: {body}");
    let (s, body) = create_profile_as(&unbound, &n, &p("unbound", &tb.node))?;
    assert!(
        (s == 403 || s == 422) && body.contains("bound to its pod"),
        "a token not bound to a pod: {s} {body}"
    );
    println!("own node: 201; a token not bound to a pod: {s}");

    // Its uploads, with the same pod-bound identity in a token meant for the store: only for
    // namespaces that run a pod on the token's node.
    let dir = tempfile::tempdir()?;
    let agent = format!("system:serviceaccount:{n}:kprof-agent");
    let mut config = StoreConfig::for_dir(dir.path().join("store"), "127.0.0.1:0".parse()?, &agent);
    config.upload_audience = Some(kprof_crds::store_api::UPLOAD_AUDIENCE.into());
    let bound_store = store::Store::new(config, tb.client.clone(), StoreMetrics::default())?
        .bind()
        .await?;
    let addr = bound_store.local_addr().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(bound_store.run(async move {
        let _ = stopped.await;
    }));
    let mut tr_store = tr.clone();
    tr_store.spec.audiences = vec![kprof_crds::store_api::UPLOAD_AUDIENCE.into()];
    let bound_store_token = sas
        .create_token_request("kprof-agent", &PostParams::default(), &tr_store)
        .await?
        .status
        .context("no token")?
        .token;
    let (own, own_body) = upload_for(&addr, b"own node", Some(&bound_store_token), &n).await?;
    let elsewhere = format!("{n}-no-pods");
    let (other, other_body) =
        upload_for(&addr, b"another node", Some(&bound_store_token), &elsewhere).await?;
    let unbound_store_token = store_token(&tb.client, &n, "kprof-agent").await?;
    let (unbound_s, unbound_body) =
        upload_for(&addr, b"unbound", Some(&unbound_store_token), &elsewhere).await?;
    let _ = stop.send(());
    let _ = server.await;
    assert_eq!(own, 201, "upload for its own node's namespace: {own_body}");
    assert!(
        other == 403 && other_body.contains("runs no pod there"),
        "upload for a namespace without a pod on its node: {other} {other_body}"
    );
    // A token bound to no pod names no node (only who may mint tokens has one).
    assert_eq!(unbound_s, 201, "a token bound to no pod: {unbound_body}");
    println!("uploads: its node's namespace 201, another namespace {other}, unbound token 201");
    Ok(())
}
