//! One namespace whose Profiles the API server refuses does not stop the others: the agent
//! keeps writing the Profiles of every other namespace from the same node, counts the
//! refusals, and delivers the refused namespace's spooled Profiles once the refusal is lifted.
//!
//! Real pieces: the test bed (API server with its ResourceQuota admission and the controller
//! manager's quota controller, kubelet, containerd), two hostNetwork pods burning a fifth of a
//! CPU each in two namespaces, and `kprof-agent run` as a host process (root, eBPF, no store:
//! `file://` artifacts). A ResourceQuota of zero Profiles in one namespace is the refusal.
//!
//! Needs the test bed, root, and `cargo build --bins -p kprof-agent` with the same
//! `CARGO_TARGET_DIR`. Without them it prints `SKIPPED` (fails under `KPROF_REQUIRE_CLUSTER=1`).
//!
//! Run: `KPROF_REQUIRE_CLUSTER=1 cargo test -p kprof-e2e --test namespace_refusal -- --nocapture`

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Pod, ResourceQuota};
use kprof_crds::Profile;
use kprof_e2e::{
    TestNamespace,
    agent::{
        AgentProcess, SPIN_IMAGE, build_spin_image, create_target, ensure_crds, host_network_pod,
        http_get, metric, require_root, wait_agent_healthy,
    },
    free_port, poll_until, require_cluster, wait_pod_running,
};
use kube::{
    Api,
    api::{DeleteParams, ListParams, PostParams},
};
use serde_json::json;

const WINDOW_SECS: u64 = 5;
const APP: &str = "kprof-spin-refusal";
const REFUSED: &str = "kprof_agent_errors_total{category=\"profile_refused\"}";

async fn profile_count(api: &Api<Profile>) -> Result<usize> {
    Ok(api.list(&ListParams::default()).await?.items.len())
}

fn refusals(port: u16) -> Result<f64> {
    Ok(metric(&http_get(port, "/metrics")?, REFUSED).unwrap_or(0.0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_whose_profiles_are_refused_does_not_stop_the_others() -> Result<()> {
    let tb = require_cluster!(Ok(()));
    if !require_root()? {
        return Ok(());
    }
    ensure_crds()?;
    build_spin_image()?;
    let refused = TestNamespace::new(&tb.client, "refused").await?;
    let open = TestNamespace::new(&tb.client, "open").await?;

    // No Profile may be created in `refused`.
    let quotas: Api<ResourceQuota> = refused.api();
    let quota: ResourceQuota = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ResourceQuota",
        "metadata": {"name": "no-profiles"},
        "spec": {"hard": {"count/profiles.kprof.io": "0"}}
    }))?;
    quotas.create(&PostParams::default(), &quota).await?;

    for ns in [&refused, &open] {
        let pods: Api<Pod> = ns.api();
        pods.create(
            &PostParams::default(),
            &host_network_pod("spin", APP, SPIN_IMAGE, Some("200m"))?,
        )
        .await?;
    }
    for ns in [&refused, &open] {
        wait_pod_running(&ns.api(), "spin", Duration::from_secs(90))
            .await
            .with_context(|| format!("the spin pod of {} did not start", ns.name()))?;
    }

    let port = free_port()?;
    let mut agent = AgentProcess::start(&tb.node, port, |_, _| Ok(()))?;
    let outcome: Result<()> = async {
        wait_agent_healthy(port).await?;
        for ns in [&refused, &open] {
            create_target(&tb.client, ns.name(), "spin", APP, WINDOW_SECS).await?;
        }
        let (profiles_refused, profiles_open): (Api<Profile>, Api<Profile>) =
            (refused.api(), open.api());

        // 1. The refusals begin (the quota admission answers 403).
        let start = Instant::now();
        poll_until(
            "the agent counting refused Profiles",
            Duration::from_secs(4 * WINDOW_SECS + 30),
            Duration::from_millis(500),
            || async { Ok((refusals(port)? >= 1.0).then_some(())) },
        )
        .await?;
        println!(
            "first refusal counted {:.1}s after the targets",
            start.elapsed().as_secs_f64()
        );

        // 2. Behind them, the other namespace's windows keep arriving: three more windows' worth
        //    while the refused namespace's entries wait in the spool, retried.
        let open_before = profile_count(&profiles_open).await?;
        let since = Instant::now();
        poll_until(
            "Profiles of the open namespace while the other one is refused",
            Duration::from_secs(3 * WINDOW_SECS + 30),
            Duration::from_millis(500),
            || async {
                Ok((profile_count(&profiles_open).await? >= open_before + 3).then_some(()))
            },
        )
        .await?;
        let refused_count = refusals(port)?;
        println!(
            "open namespace: {} -> {} Profiles in {:.1}s while {refused_count} refusals were counted",
            open_before,
            profile_count(&profiles_open).await?,
            since.elapsed().as_secs_f64()
        );
        if profile_count(&profiles_refused).await? != 0 {
            bail!("the quota let a Profile through: the test proves nothing");
        }
        if refused_count < 2.0 {
            bail!("the refused namespace was not retried ({refused_count} refusals)");
        }

        // 3. The refusal lifted, its spooled windows are delivered (within the longest backoff).
        quotas.delete("no-profiles", &DeleteParams::default()).await?;
        let lifted = Instant::now();
        poll_until(
            "the refused namespace's spooled Profiles after the quota is gone",
            Duration::from_secs(60 + 2 * WINDOW_SECS + 30),
            Duration::from_millis(500),
            || async { Ok((profile_count(&profiles_refused).await? >= 2).then_some(())) },
        )
        .await?;
        println!(
            "quota removed: {} Profiles in the refused namespace {:.1}s later",
            profile_count(&profiles_refused).await?,
            lifted.elapsed().as_secs_f64()
        );
        if let Some(st) = agent.exited()? {
            bail!("the agent exited ({st})");
        }
        Ok(())
    }
    .await;
    if let Err(e) = &outcome {
        eprintln!(
            "FAILED: {e:#}\n===== kprof-agent log (tail) =====\n{}\n===== {} =====\n{}",
            tail(&agent.log(), 60),
            refused.name(),
            refused.dump().await
        );
    }
    let _ = agent.stop(Duration::from_secs(20));
    outcome
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
