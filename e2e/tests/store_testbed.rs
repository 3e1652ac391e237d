//! The profile store against the real test bed: the store runs in-process on the host (its
//! TokenReviews and Profile reads go to the test bed's API server), a selector-less Service +
//! Endpoints/EndpointSlice point `kprof-store` at the node IP, and `kubectl kprof` reads through
//! the API server's service proxy with the user's credentials.
//!
//! Needs `kprof-operator`, `kprof-crds` and `tempfile` as dev-dependencies of this crate. For the
//! `kubectl kprof` binary checks, build it first: `cargo build -p kprof-operator --bin kubectl-kprof`
//! (otherwise the plugin runs in-process only).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort, EndpointSubset, Endpoints, ObjectReference, Pod, Service,
    ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kprof_crds::{ArtifactRef, Artifacts, Profile, ProfileSpec, ProfileType};
use kprof_e2e::{TEST_PYTHON_IMAGE, TestNamespace, kubectl, require_cluster, wait_pod_running};
use kprof_operator::store::{self, Digest, StoreConfig, StoreMetrics};
use kube::api::PostParams;
use kube::{Api, Client};

/// A 10-minute token of `ns/sa` (the API server's minimum lifetime).
async fn token(client: &Client, ns: &str, sa: &str) -> Result<String> {
    kprof_e2e::service_account_token(client, ns, sa, 600).await
}

/// PUT an artifact straight to the store; (status, body).
async fn upload(addr: &str, bytes: &[u8], token: Option<&str>) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "PUT /v1/artifacts/{} HTTP/1.1\r\nHost: {addr}\r\n{auth}X-Kprof-Namespace: shop\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
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
async fn anchor_pod(client: &Client, ns: &str) -> Result<Pod> {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "kprof-store-anchor"},
        "spec": {"hostNetwork": true, "restartPolicy": "Never", "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "sleep", "image": TEST_PYTHON_IMAGE, "imagePullPolicy": "Never",
                "command": ["python3", "-c", "import time; time.sleep(3600)"]}]}
    }))?;
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    api.create(&PostParams::default(), &pod).await?;
    wait_pod_running(&api, "kprof-store-anchor", Duration::from_secs(90)).await
}

/// The `kprof-store` Service in `ns`, with endpoints at `ip:port` (port name `http`) that refer
/// to the anchor pod.
async fn store_service(client: &Client, ns: &str, ip: &str, port: u16, anchor: &Pod) -> Result<()> {
    let target = ObjectReference {
        kind: Some("Pod".into()),
        namespace: Some(ns.into()),
        name: anchor.metadata.name.clone(),
        uid: anchor.metadata.uid.clone(),
        ..Default::default()
    };
    let mut svc = Service::default();
    svc.metadata.name = Some("kprof-store".into());
    svc.spec = Some(ServiceSpec {
        ports: Some(vec![ServicePort {
            name: Some("http".into()),
            port: 8090,
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
    ep.metadata.name = Some("kprof-store".into());
    ep.subsets = Some(vec![EndpointSubset {
        addresses: Some(vec![EndpointAddress {
            ip: ip.into(),
            target_ref: Some(target.clone()),
            ..Default::default()
        }]),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
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
            name: Some("http".into()),
            port: Some(port as i32),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        ..Default::default()
    };
    slice.metadata.name = Some("kprof-store-e2e".into());
    slice.metadata.labels = Some(BTreeMap::from([
        (
            "kubernetes.io/service-name".to_string(),
            "kprof-store".to_string(),
        ),
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

async fn role(
    client: &Client,
    ns: &str,
    name: &str,
    rules: Vec<PolicyRule>,
    sa_ns: &str,
    sa: &str,
) -> Result<()> {
    let mut r = Role::default();
    r.metadata.name = Some(name.into());
    r.rules = Some(rules);
    Api::<Role>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &r)
        .await?;
    let mut b = RoleBinding {
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: name.into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: sa.into(),
            namespace: Some(sa_ns.into()),
            ..Default::default()
        }]),
        ..Default::default()
    };
    b.metadata.name = Some(name.into());
    Api::<RoleBinding>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &b)
        .await?;
    Ok(())
}

fn rule(group: &str, resource: &str, names: Option<Vec<String>>) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![group.into()]),
        resources: Some(vec![resource.into()]),
        resource_names: names,
        verbs: vec!["get".into(), "list".into()],
        ..Default::default()
    }
}

/// The plugin in-process; (ok, stdout, error).
async fn kprof(args: &[&str]) -> (bool, String, String) {
    let mut out = Vec::new();
    let r = kprof_operator::plugin::run_args(args, &mut out).await;
    (
        r.is_ok(),
        String::from_utf8_lossy(&out).into_owned(),
        r.err().map(|e| format!("{e:#}")).unwrap_or_default(),
    )
}

/// The built `kubectl-kprof`, if any (target/debug next to this test's executable).
fn plugin_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("kubectl-kprof");
    p.is_file().then_some(p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_through_the_api_server_proxy() -> Result<()> {
    let tb = require_cluster!(Ok(()));
    apply_crds()?;
    let store_ns = TestNamespace::new(&tb.client, "kprof-store").await?;
    let app_ns = TestNamespace::new(&tb.client, "kprof-shop").await?;
    let (sns, ans) = (store_ns.name().to_string(), app_ns.name().to_string());

    // The store, in-process, on all addresses of the host (the API server proxies to the node IP).
    let dir = tempfile::tempdir()?;
    let agent = format!("system:serviceaccount:{sns}:kprof-agent");
    let mut config = StoreConfig::for_dir(dir.path(), "0.0.0.0:0".parse()?, &agent);
    config.public_url = format!("http://kprof-store.{sns}.svc:8090");
    let bound = store::Store::new(config, tb.client.clone(), StoreMetrics::default())?
        .bind()
        .await?;
    let port = bound.local_addr().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(bound.run(async move {
        let _ = stopped.await;
    }));
    let addr = format!("127.0.0.1:{port}");
    let anchor = anchor_pod(&tb.client, &sns).await?;
    store_service(&tb.client, &sns, &tb.node_ip, port, &anchor).await?;
    println!("store on {}:{port}, Service {sns}/kprof-store", tb.node_ip);

    // Uploads: only the agent's ServiceAccount.
    let pprof = store::pprof::synthetic(
        &[
            (
                &[
                    "python",
                    "main",
                    "app.serve",
                    "app.handle",
                    "checkout.compute_total",
                ],
                60,
            ),
            (&["python", "main", "app.serve", "selectors.select"], 20),
        ],
        1_700_000_000_000_000_000,
        30_000_000_000,
    )
    .encode_gzip();
    let agent_token = token(&tb.client, &sns, "kprof-agent").await?;
    let other_token = token(&tb.client, &ans, "default").await?;
    let (s, body) = upload(&addr, &pprof, None).await?;
    assert_eq!(s, 401, "no token: {body}");
    let (s, body) = upload(&addr, &pprof, Some("not-a-token")).await?;
    assert_eq!(s, 401, "invalid token: {body}");
    let (s, body) = upload(&addr, &pprof, Some(&other_token)).await?;
    assert_eq!(s, 403, "another ServiceAccount: {body}");
    let (s, body) = upload(&addr, &pprof, Some(&agent_token)).await?;
    assert_eq!(s, 201, "agent: {body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let d = Digest::of(&pprof);
    assert_eq!(
        v["url"],
        format!("http://kprof-store.{sns}.svc:8090/v1/artifacts/{d}")
    );
    println!("uploads: none/invalid -> 401, other SA -> 403, agent -> 201");

    // A Profile in the app namespace pointing at it.
    let now = k8s_openapi::jiff::Timestamp::now();
    let mut p = Profile::new(
        "checkout-cpu-1",
        ProfileSpec {
            target: "checkout".into(),
            pod: "checkout-0".into(),
            container: "app".into(),
            node: tb.node.clone(),
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
                    url: v["url"].as_str().unwrap().into(),
                    digest: d.to_string(),
                    size_bytes: pprof.len() as u64,
                }),
                flamegraph: None,
            },
            warnings: vec![],
        },
    );
    p.metadata.labels = Some(BTreeMap::from([(
        "kprof.io/target".to_string(),
        "checkout".to_string(),
    )]));
    Api::<Profile>::namespaced(tb.client.clone(), &ans)
        .create(&PostParams::default(), &p)
        .await?;

    let kubeconfig = kprof_e2e::kubeconfig_path();
    let kc = kubeconfig.to_string_lossy().to_string();
    let common = [
        "--kubeconfig",
        kc.as_str(),
        "-n",
        ans.as_str(),
        "--store-namespace",
        sns.as_str(),
    ];
    let with = |extra: &[&str]| {
        common
            .iter()
            .copied()
            .chain(extra.iter().copied())
            .map(str::to_string)
            .collect::<Vec<_>>()
    };

    // The admin: top and flamegraph through the API server's service proxy (in-process plugin).
    let args = with(&["top", "checkout-cpu-1"]);
    let mut result = (false, String::new(), String::new());
    for attempt in 0..30 {
        // The proxy needs the endpoints to be visible; retry briefly.
        println!("kubectl kprof top: attempt {attempt}");
        result = kprof(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
        if result.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (ok, out, err) = result;
    println!("kubectl kprof top (in-process):\n{out}{err}");
    assert!(ok, "top failed: {err}");
    assert!(
        out.lines()
            .nth(1)
            .unwrap_or_default()
            .contains("checkout.compute_total"),
        "{out}"
    );
    let svg = dir.path().join("checkout.svg");
    let svg_s = svg.to_string_lossy().to_string();
    let (ok, _, err) = kprof(
        &with(&["flamegraph", "checkout-cpu-1", "-o", &svg_s])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
    .await;
    assert!(ok, "flamegraph failed: {err}");
    let text = std::fs::read_to_string(&svg)?;
    assert!(text.contains("<svg") && text.contains("checkout.compute_total"));

    // The same through kubectl's plugin mechanism, when the binary is built.
    match plugin_binary() {
        Some(bin) => {
            let path = format!(
                "{}:{}",
                bin.parent().unwrap().display(),
                std::env::var("PATH").unwrap_or_default()
            );
            let out = kubectl()
                .env("PATH", path)
                .args([
                    "kprof",
                    "-n",
                    &ans,
                    "--store-namespace",
                    &sns,
                    "top",
                    "checkout-cpu-1",
                ])
                .output()?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            println!(
                "kubectl kprof top (binary {}):\n{stdout}{}",
                bin.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success() && stdout.contains("checkout.compute_total"));
        }
        None => {
            println!("NOTE: kubectl-kprof binary not built; checked the plugin in-process only")
        }
    }

    // A user who may read Profiles but not reach the store: refused by the API server.
    let viewer = format!("system:serviceaccount:{ans}:viewer");
    token(&tb.client, &ans, "viewer").await?;
    role(
        &tb.client,
        &ans,
        "profile-reader",
        vec![rule("kprof.io", "profiles", None)],
        &ans,
        "viewer",
    )
    .await?;
    let (ok, _, err) = kprof(
        &with(&["--as", &viewer, "top", "checkout-cpu-1"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
    .await;
    println!("viewer without services/proxy: {err}");
    assert!(
        !ok && err.contains("services/proxy") && err.contains("403"),
        "{err}"
    );

    // A user who may not even read the Profile.
    let stranger = format!("system:serviceaccount:{ans}:default");
    let (ok, _, err) = kprof(
        &with(&["--as", &stranger, "top", "checkout-cpu-1"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
    .await;
    println!("stranger: {err}");
    assert!(!ok && err.contains("not allowed to read Profile"), "{err}");

    // Granting `get` on services/proxy (this Service only) in the store's namespace lets the viewer in.
    role(
        &tb.client,
        &sns,
        "store-reader",
        vec![rule(
            "",
            "services/proxy",
            Some(vec!["kprof-store".into(), "http:kprof-store:8090".into()]),
        )],
        &ans,
        "viewer",
    )
    .await?;
    let mut last = String::new();
    let mut granted = false;
    for _ in 0..20 {
        let (ok, out, err) = kprof(
            &with(&["--as", &viewer, "top", "checkout-cpu-1"])
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
        .await;
        if ok && out.contains("checkout.compute_total") {
            granted = true;
            break;
        }
        last = err;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(granted, "viewer with services/proxy still refused: {last}");
    println!("viewer with get services/proxy on kprof-store: allowed");

    // The web page through the proxy too.
    let req = http::Request::get(format!("/api/v1/namespaces/{sns}/services/http:kprof-store:8090/proxy/ui/profiles/{ans}/checkout-cpu-1")).body(Vec::new())?;
    let page = tb.client.request_text(req).await?;
    assert!(page.contains("flamegraph.svg") && page.contains("checkout.compute_total"));

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    Ok(())
}
