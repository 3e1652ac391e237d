//! The operator against the test bed's real API server (and its garbage collector): the operator
//! runs in-process from the library, each test in its own namespaces, and every wait is on a
//! condition (watch or poll), never a fixed sleep.
//!
//! Each test starts its own operator whose `targetSelector` only sees the test's targets
//! (label `kprof.io/e2e-run=<run>`), whose agent DaemonSet and Lease live in the test's operator
//! namespace, so tests run in parallel without seeing each other.
//!
//! Pods are either real (the test bed's pause image on the real node) or pod objects bound to
//! made-up node names that never run (no kubelet serves them).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, ensure};
use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Pod};
use kprof_crds::{Phase, Profile, ProfilingTarget, ProfilingTargetStatus};
use kprof_e2e::{
    operator::{PAUSE_IMAGE, WAIT, with_operator_bed},
    poll_until, wait_for,
};
use kprof_operator::{AGENT_NAME, reconcile::daemonset::build::daemonset_nodes};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, PostParams},
    runtime::wait::await_condition,
};
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// helpers

/// The spec of a target that selects the pods labelled `app=<app>`.
fn selecting(app: &str) -> serde_json::Value {
    json!({"selector": {"matchLabels": {"app": app}}})
}

/// A pause pod bound to `node`: it runs when `node` is the test bed's node, and stays a pod
/// object that never runs on a made-up node.
async fn create_pod(
    api: &Api<Pod>,
    name: &str,
    labels: &[(&str, &str)],
    node: &str,
) -> Result<Pod> {
    let labels: BTreeMap<_, _> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "nodeName": node,
            "hostNetwork": true,
            "terminationGracePeriodSeconds": 0,
            "automountServiceAccountToken": false,
            "tolerations": [{"operator": "Exists"}],
            "containers": [{"name": "main", "image": PAUSE_IMAGE, "imagePullPolicy": "Never"}],
        }
    }))?;
    api.create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("creating pod {name}"))
}

async fn delete_now<K>(api: &Api<K>, name: &str) -> Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::background()
    };
    match api.delete(name, &dp).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(st)) if st.code == 404 => Ok(()),
        Err(e) => Err(anyhow!(e).context(format!("deleting {name}"))),
    }
}

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

async fn wait_agent_nodes(api: &Api<DaemonSet>, want: &[&str]) -> Result<DaemonSet> {
    let want = set(want);
    let what = format!("the agent DaemonSet to cover exactly {want:?}");
    wait_for(api, AGENT_NAME, WAIT, move |d| {
        d.is_some_and(|d| daemonset_nodes(d) == want)
    })
    .await
    .context(what)
}

async fn wait_gone<K>(api: &Api<K>, name: &str) -> Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    tokio::time::timeout(
        WAIT,
        await_condition(api.clone(), name, |o: Option<&K>| o.is_none()),
    )
    .await
    .with_context(|| format!("timed out waiting for {name} to be deleted"))?
    .with_context(|| format!("watching {name}"))?;
    Ok(())
}

fn condition<'a>(s: &'a ProfilingTargetStatus, type_: &str) -> Option<(&'a str, &'a str)> {
    s.conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.as_str(), c.reason.as_str()))
}

/// Wait until the target's status satisfies `f` (and describes the current generation).
async fn wait_status(
    api: &Api<ProfilingTarget>,
    name: &str,
    f: impl Fn(&ProfilingTargetStatus) -> bool + Send + 'static,
) -> Result<ProfilingTarget> {
    wait_for(api, name, WAIT, move |t| {
        t.is_some_and(|t| {
            t.status
                .as_ref()
                .is_some_and(|s| s.observed_generation == t.metadata.generation && f(s))
        })
    })
    .await
    .with_context(|| format!("status of ProfilingTarget {name}"))
}

fn is_ready_running(s: &ProfilingTargetStatus) -> bool {
    s.phase == Some(Phase::Running)
        && condition(s, "Ready") == Some(("True", "Profiling"))
        && condition(s, "Scheduled") == Some(("True", "AgentsScheduled"))
}

// ---------------------------------------------------------------------------------------------
// tests

/// Applying a target that selects running pods yields the agent DaemonSet with the right node
/// affinity and a Ready status within seconds; the agent follows a pod to a new node; suspend
/// removes the target's nodes; deleting the last target deletes the DaemonSet.
#[tokio::test]
async fn target_schedules_agent_and_reports_status() -> Result<()> {
    with_operator_bed("op-sched", async |s| {
        let app = s.namespace("app").await?;
        let pods: Api<Pod> = app.api();
        let (fake_a, fake_b, fake_c) = (
            format!("fake-{}-a", s.run),
            format!("fake-{}-b", s.run),
            format!("fake-{}-c", s.run),
        );
        create_pod(&pods, "web-real", &[("app", "web")], &s.node).await?;
        create_pod(&pods, "web-a", &[("app", "web")], &fake_a).await?;
        create_pod(&pods, "web-b", &[("app", "web")], &fake_b).await?;
        create_pod(&pods, "db", &[("app", "db")], &fake_c).await?;

        let op = s.start("op-sched-1");
        let targets: Api<ProfilingTarget> = app.api();
        let agents: Api<DaemonSet> = s.op_ns.api();

        let t0 = Instant::now();
        s.apply_target(&targets, "web", selecting("web")).await?;
        let ds = wait_agent_nodes(&agents, &[&s.node, &fake_a, &fake_b]).await?;
        let t_ds = t0.elapsed();
        let t = wait_status(&targets, "web", is_ready_running).await?;
        let t_ready = t0.elapsed();
        eprintln!(
            "FIGURE schedule: agent DaemonSet after {t_ds:?}, target Ready after {t_ready:?}"
        );
        let st = t.status.unwrap();
        assert_eq!(st.matched_pods, 3);
        assert_eq!(st.nodes, {
            let mut n = vec![s.node.clone(), fake_a.clone(), fake_b.clone()];
            n.sort();
            n
        });
        assert!(st.start_time.is_some());

        // The fixed parts of the agent pod.
        let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        assert_eq!(pod.host_pid, Some(true));
        let c = &pod.containers[0];
        assert_eq!(c.name, "agent");
        assert_eq!(c.args.as_deref(), Some(&["run".to_string()][..]));
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.privileged, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));

        // A selected pod moves to another node: the agent follows.
        let t1 = Instant::now();
        delete_now(&pods, "web-b").await?;
        create_pod(&pods, "web-c", &[("app", "web")], &fake_c).await?;
        wait_agent_nodes(&agents, &[&s.node, &fake_a, &fake_c]).await?;
        eprintln!(
            "FIGURE follow: agent DaemonSet followed a pod to a new node in {:?}",
            t1.elapsed()
        );
        let fc = fake_c.clone();
        wait_status(&targets, "web", move |st| {
            st.nodes.contains(&fc) && st.matched_pods == 3
        })
        .await?;

        // Suspended: the only target no longer counts, so no agents at all.
        s.apply_target(
            &targets,
            "web",
            json!({"selector": {"matchLabels": {"app": "web"}}, "suspend": true}),
        )
        .await?;
        wait_gone(&agents, AGENT_NAME).await?;
        wait_status(&targets, "web", |st| {
            st.phase == Some(Phase::Suspended)
                && condition(st, "Ready") == Some(("False", "Suspended"))
        })
        .await?;

        // Resumed, then deleted: the DaemonSet comes back, then goes with the last target.
        s.apply_target(&targets, "web", selecting("web")).await?;
        wait_agent_nodes(&agents, &[&s.node, &fake_a, &fake_c]).await?;
        let t2 = Instant::now();
        delete_now(&targets, "web").await?;
        wait_gone(&agents, AGENT_NAME).await?;
        eprintln!(
            "FIGURE delete: agent DaemonSet deleted {:?} after the last target",
            t2.elapsed()
        );

        op.stop().await?;
        Ok(())
    })
    .await
}

/// A target in namespace A never selects or reports pods of namespace B, even with the same
/// labels; the agent only covers A's nodes.
#[tokio::test]
async fn target_never_selects_pods_of_another_namespace() -> Result<()> {
    with_operator_bed("op-iso", async |s| {
        let ns_a = s.namespace("a").await?;
        let ns_b = s.namespace("b").await?;
        let (node_a, node_b) = (format!("fake-{}-a", s.run), format!("fake-{}-b", s.run));
        create_pod(&ns_a.api(), "shared-1", &[("app", "shared")], &node_a).await?;
        create_pod(&ns_b.api(), "shared-1", &[("app", "shared")], &node_b).await?;
        create_pod(&ns_b.api(), "shared-2", &[("app", "shared")], &node_b).await?;

        let op = s.start("op-iso-1");
        let targets_a: Api<ProfilingTarget> = ns_a.api();
        let agents: Api<DaemonSet> = s.op_ns.api();
        s.apply_target(&targets_a, "shared", selecting("shared"))
            .await?;
        let t = wait_status(&targets_a, "shared", is_ready_running).await?;
        let st = t.status.unwrap();
        assert_eq!(st.matched_pods, 1, "only namespace A's pod");
        assert_eq!(st.nodes, std::slice::from_ref(&node_a));
        wait_agent_nodes(&agents, &[&node_a]).await?;

        // A pod with the same label appearing in B changes nothing for A.
        create_pod(&ns_b.api(), "shared-3", &[("app", "shared")], &node_a).await?;
        // The same target in B selects B's pods only; the agent covers both.
        let targets_b: Api<ProfilingTarget> = ns_b.api();
        s.apply_target(&targets_b, "shared", selecting("shared"))
            .await?;
        let tb = wait_status(&targets_b, "shared", |st| {
            is_ready_running(st) && st.matched_pods == 3
        })
        .await?;
        assert_eq!(tb.status.unwrap().nodes, {
            let mut v = vec![node_a.clone(), node_b.clone()];
            v.sort();
            v
        });
        wait_agent_nodes(&agents, &[&node_a, &node_b]).await?;
        let ta = targets_a.get("shared").await?.status.unwrap();
        assert_eq!(
            (ta.matched_pods, ta.nodes.clone()),
            (1, vec![node_a.clone()]),
            "A still reports only its own pod"
        );
        op.stop().await?;
        Ok(())
    })
    .await
}

fn profile_body(name: &str, target: &ProfilingTarget, pod: &str, end: &str) -> serde_json::Value {
    json!({
        "apiVersion": "kprof.io/v1alpha1",
        "kind": "Profile",
        "metadata": {
            "name": name,
            "labels": {"kprof.io/target": target.name_any(), "kprof.io/pod": pod, "kprof.io/container": "main", "kprof.io/type": "cpu"},
            "ownerReferences": [{
                "apiVersion": "kprof.io/v1alpha1", "kind": "ProfilingTarget",
                "name": target.name_any(), "uid": target.uid().unwrap(),
            }],
        },
        "spec": {
            "target": target.name_any(), "pod": pod, "container": "main", "node": "n",
            "runtime": "cpython 3.11", "profileType": "cpu",
            "windowStart": end, "windowEnd": end, "sampleHz": 99, "samples": 100,
        },
    })
}

/// Profiles feed the status; retention deletes the oldest beyond maxProfiles and those older
/// than maxAge; deleting the target garbage-collects its Profiles (kube-controller-manager).
#[tokio::test]
async fn profiles_status_retention_and_garbage_collection() -> Result<()> {
    with_operator_bed("op-ret", async |s| {
        let app = s.namespace("app").await?;
        let op = s.start("op-ret-1");
        let targets: Api<ProfilingTarget> = app.api();
        let profiles: Api<Profile> = app.api();
        let t = s.apply_target(&targets, "ret", json!({"selector": {"matchLabels": {"app": "ret"}}, "retention": {"maxProfiles": 3, "maxAge": "1h"}}))
        .await?;
        wait_status(&targets, "ret", |st| st.phase == Some(Phase::Pending)).await?;

        let now = k8s_openapi::jiff::Timestamp::now();
        let at =
            |mins_ago: i64| (now - k8s_openapi::jiff::SignedDuration::from_mins(mins_ago)).to_string();
        // Pod p1: six windows, the newest three must stay. Pod p2: one recent, one 2h old.
        let mut bodies = Vec::new();
        for i in 0..6 {
            bodies.push(profile_body(&format!("p1-{i}"), &t, "p1", &at(10 - i)));
        }
        bodies.push(profile_body("p2-new", &t, "p2", &at(1)));
        bodies.push(profile_body("p2-old", &t, "p2", &at(120)));
        let t0 = Instant::now();
        for b in &bodies {
            profiles
                .create(&PostParams::default(), &serde_json::from_value(b.clone())?)
                .await?;
        }
        let want = set(&["p1-3", "p1-4", "p1-5", "p2-new"]);
        let names = poll_until(
            "retention to leave the newest Profiles",
            WAIT,
            Duration::from_millis(200),
            || {
                let (profiles, want) = (profiles.clone(), want.clone());
                async move {
                    let names: BTreeSet<String> = profiles
                        .list(&ListParams::default())
                        .await?
                        .items
                        .iter()
                        .map(|p| p.name_any())
                        .collect();
                    Ok((names == want).then_some(names))
                }
            },
        )
        .await?;
        eprintln!(
            "FIGURE retention: {} Profiles kept of {} after {:?}",
            names.len(),
            bodies.len(),
            t0.elapsed()
        );
        let t = wait_status(&targets, "ret", |st| st.profiles_written == 4).await?;
        let st = t.status.unwrap();
        assert_eq!(st.recent_profiles, ["p2-new", "p1-5", "p1-4", "p1-3"]);
        assert!(st.last_profile_time.is_some());
        // What happened is told on the target as Events.
        let events: Api<k8s_openapi::api::events::v1::Event> = app.api();
        poll_until(
            "a RetentionDeleted Event on the target",
            WAIT,
            Duration::from_millis(200),
            || {
                let events = events.clone();
                async move {
                    let list = events.list(&ListParams::default()).await?;
                    Ok(list
                        .items
                        .into_iter()
                        .find(|e| {
                            e.reason.as_deref() == Some("RetentionDeleted")
                                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("ret")
                        })
                        .map(|e| {
                            eprintln!(
                                "FIGURE event: {} {}",
                                e.reason.unwrap_or_default(),
                                e.note.unwrap_or_default()
                            )
                        }))
                }
            },
        )
        .await?;

        // Deleting the target removes its Profiles (ownerReferences + the garbage collector).
        let t1 = Instant::now();
        targets.delete("ret", &DeleteParams::background()).await?;
        poll_until(
            "the garbage collector to delete the Profiles",
            Duration::from_secs(60),
            Duration::from_millis(250),
            || {
                let profiles = profiles.clone();
                async move {
                    Ok(profiles
                        .list(&ListParams::default())
                        .await?
                        .items
                        .is_empty()
                        .then_some(()))
                }
            },
        )
        .await?;
        eprintln!(
            "FIGURE gc: Profiles garbage-collected {:?} after the target was deleted",
            t1.elapsed()
        );
        op.stop().await?;
        Ok(())
    })
    .await
}

/// A spec the schema accepts but that can never work is reported (phase Failed, Degraded) and
/// does not stall the other targets.
#[tokio::test]
async fn invalid_target_is_reported_and_others_proceed() -> Result<()> {
    with_operator_bed("op-bad", async |s| {
        let app = s.namespace("app").await?;
        let node = format!("fake-{}-a", s.run);
        create_pod(&app.api(), "good-1", &[("app", "good")], &node).await?;
        let op = s.start("op-bad-1");
        let targets: Api<ProfilingTarget> = app.api();
        s.apply_target(&targets, "bad", json!({"selector": {"matchExpressions": [{"key": "app", "operator": "In", "values": []}]}}))
            .await?;
        s.apply_target(&targets, "good", selecting("good"))
        .await?;
        let bad = wait_status(&targets, "bad", |st| st.phase == Some(Phase::Failed)).await?;
        let st = bad.status.unwrap();
        assert_eq!(condition(&st, "Degraded"), Some(("True", "InvalidSpec")));
        let msg = &st
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap()
            .message;
        assert!(msg.contains("needs at least one value"), "{msg}");
        wait_status(&targets, "good", is_ready_running).await?;
        // The user fixes the spec: the target recovers.
        s.apply_target(&targets, "bad", selecting("good"))
        .await?;
        wait_status(&targets, "bad", is_ready_running).await?;
        op.stop().await?;
        Ok(())
    })
    .await
}

/// `duration`: the target completes `startTime + duration` after it started, and no longer
/// counts for the agent DaemonSet.
#[tokio::test]
async fn duration_completes_the_target() -> Result<()> {
    with_operator_bed("op-done", async |s| {
        let app = s.namespace("app").await?;
        let node = format!("fake-{}-a", s.run);
        create_pod(&app.api(), "job-1", &[("app", "job")], &node).await?;
        let op = s.start("op-done-1");
        let targets: Api<ProfilingTarget> = app.api();
        let agents: Api<DaemonSet> = s.op_ns.api();
        s.apply_target(
            &targets,
            "job",
            json!({"selector": {"matchLabels": {"app": "job"}}, "window": "5s", "duration": "5s"}),
        )
        .await?;
        let running = wait_status(&targets, "job", is_ready_running).await?;
        wait_agent_nodes(&agents, &[&node]).await?;
        let done = wait_status(&targets, "job", |st| st.phase == Some(Phase::Completed)).await?;
        let start = running.status.unwrap().start_time.unwrap().0;
        let took = k8s_openapi::jiff::Timestamp::now().duration_since(start);
        eprintln!("FIGURE duration: Completed {took:?} after startTime (duration 5s)");
        assert_eq!(
            condition(&done.status.unwrap(), "Ready"),
            Some(("False", "Completed"))
        );
        wait_gone(&agents, AGENT_NAME).await?;
        op.stop().await?;
        Ok(())
    })
    .await
}

fn snapshot(
    list: &[ProfilingTarget],
) -> BTreeMap<String, (String, Option<Phase>, u32, Vec<String>)> {
    list.iter()
        .map(|t| {
            let st = t.status.clone().unwrap_or_default();
            (
                t.name_any(),
                (
                    t.resource_version().unwrap_or_default(),
                    st.phase,
                    st.matched_pods,
                    st.nodes,
                ),
            )
        })
        .collect()
}

/// Killing the operator mid-reconcile and starting it again converges to the same state; a
/// second replica with another identity takes over only once the lease expires, and then
/// changes nothing.
#[tokio::test]
async fn restart_mid_reconcile_converges() -> Result<()> {
    with_operator_bed("op-restart", async |s| {
        let app = s.namespace("app").await?;
        let pods: Api<Pod> = app.api();
        let nodes: Vec<String> = (0..4).map(|i| format!("fake-{}-{i}", s.run)).collect();
        for (i, n) in nodes.iter().enumerate() {
            create_pod(
                &pods,
                &format!("svc-{i}"),
                &[("app", &format!("svc-{i}"))],
                n,
            )
            .await?;
        }
        let targets: Api<ProfilingTarget> = app.api();
        let agents: Api<DaemonSet> = s.op_ns.api();
        for i in 0..4 {
            let mut spec = json!({"selector": {"matchLabels": {"app": format!("svc-{i}")}}});
            if i == 3 {
                spec["suspend"] = true.into();
            }
            s.apply_target(&targets, &format!("t{i}"), spec).await?;
        }

        // Kill the first operator as soon as it has written anything.
        let op1 = s.start("op-restart");
        poll_until(
            "the first status write",
            WAIT,
            Duration::from_millis(20),
            || {
                let targets = targets.clone();
                async move {
                    Ok(targets
                        .list(&ListParams::default())
                        .await?
                        .items
                        .iter()
                        .any(|t| t.status.is_some())
                        .then_some(()))
                }
            },
        )
        .await?;
        op1.kill();

        // Same identity (a restarted pod): it holds the lease already and converges.
        let op2 = s.start("op-restart");
        for i in 0..3 {
            wait_status(&targets, &format!("t{i}"), is_ready_running).await?;
        }
        wait_status(&targets, "t3", |st| st.phase == Some(Phase::Suspended)).await?;
        let ds = wait_agent_nodes(&agents, &[&nodes[0], &nodes[1], &nodes[2]]).await?;
        // Let op2 finish its pass (every target reconciled at least once) before the snapshot.
        poll_until(
            "op2 to reconcile every target",
            WAIT,
            Duration::from_millis(100),
            || {
                let n = op2.reconciles();
                async move { Ok((n >= 4).then_some(())) }
            },
        )
        .await?;
        let before = snapshot(&targets.list(&ListParams::default()).await?.items);
        let generation = ds.metadata.generation;

        // Kill again; a replica with another identity must wait for the lease to expire.
        op2.kill();
        let t0 = Instant::now();
        let op3 = s.start("op-restart-other");
        poll_until("op3 to lead", WAIT, Duration::from_millis(100), || {
            let leader = op3.is_leader();
            async move { Ok(leader.then_some(())) }
        })
        .await?;
        let took = t0.elapsed();
        eprintln!("FIGURE takeover: a new replica took the expired lease after {took:?}");
        ensure!(
            took >= Duration::from_secs(2),
            "took the lease of a live holder after {took:?}"
        );
        poll_until(
            "op3 to reconcile every target",
            WAIT,
            Duration::from_millis(100),
            || {
                let n = op3.reconciles();
                async move { Ok((n >= 4).then_some(())) }
            },
        )
        .await?;
        let after = snapshot(&targets.list(&ListParams::default()).await?.items);
        assert_eq!(
            after, before,
            "the restarted operator converged to the same state without writing"
        );
        assert_eq!(
            agents.get(AGENT_NAME).await?.metadata.generation,
            generation,
            "agent DaemonSet unchanged"
        );
        op3.stop().await?;
        Ok(())
    })
    .await
}

/// Two replicas: one leads, the other stands by; when the leader stops cleanly it releases the
/// lease and the standby takes over at once.
#[tokio::test]
async fn two_replicas_one_leader() -> Result<()> {
    with_operator_bed("op-ha", async |s| {
        let a = s.start("replica-a");
        poll_until("replica a to lead", WAIT, Duration::from_millis(50), || {
            let l = a.is_leader();
            async move { Ok(l.then_some(())) }
        })
        .await?;
        let b = s.start("replica-b");
        // b keeps standing by for several renew intervals while a renews.
        let lease: Api<k8s_openapi::api::coordination::v1::Lease> = s.op_ns.api();
        let renewed = |l: &k8s_openapi::api::coordination::v1::Lease| {
            l.spec.as_ref().and_then(|s| s.renew_time.clone())
        };
        let first = renewed(&lease.get("kprof-operator").await?);
        let first2 = first.clone();
        wait_for(&lease, "kprof-operator", WAIT, move |l| {
            l.is_some_and(|l| renewed(l) != first2)
        })
        .await?;
        assert!(!b.is_leader(), "two leaders");
        let t0 = Instant::now();
        a.stop().await?;
        poll_until("replica b to lead", WAIT, Duration::from_millis(50), || {
            let l = b.is_leader();
            async move { Ok(l.then_some(())) }
        })
        .await?;
        eprintln!(
            "FIGURE handover: standby led {:?} after the leader stopped cleanly",
            t0.elapsed()
        );
        b.stop().await?;
        Ok(())
    })
    .await
}
