//! The agent's two watches, as kube-runtime reflectors: ProfilingTargets in every namespace and
//! the Pods of this node only (`spec.nodeName=<node>` field selector, so the API server sends
//! nothing about other nodes). Every change wakes [`Watches::changed`].
use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kprof_crds::ProfilingTarget;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, reflector, reflector::Store, watcher},
};
use tokio::sync::Notify;

use super::{TargetPlan, plan};

/// Errors of the watches.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("the {0} watch ended before its first list")]
    NeverReady(&'static str),
}

/// Reflector stores of the targets and this node's pods.
#[derive(Clone)]
pub struct Watches {
    pub targets: Store<ProfilingTarget>,
    pub pods: Store<Pod>,
    /// Notified on every watch event (and on errors, so that a caller re-plans).
    pub changed: Arc<Notify>,
}

impl Watches {
    /// Starts both reflectors (as tasks of the current runtime) and waits for their first list.
    pub async fn start(client: Client, node: &str) -> Result<Watches, WatchError> {
        let changed = Arc::new(Notify::new());
        let (targets, tw) = reflector::store::<ProfilingTarget>();
        let (pods, pw) = reflector::store::<Pod>();

        let tapi: Api<ProfilingTarget> = Api::all(client.clone());
        let tstream = watcher(tapi, watcher::Config::default())
            .default_backoff()
            .reflect(tw);
        tokio::spawn(drive("profilingtargets", tstream, changed.clone()));

        let papi: Api<Pod> = Api::all(client);
        let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let pstream = watcher(papi, cfg).default_backoff().reflect(pw);
        tokio::spawn(drive("pods", pstream, changed.clone()));

        targets
            .wait_until_ready()
            .await
            .map_err(|_| WatchError::NeverReady("profilingtargets"))?;
        pods.wait_until_ready()
            .await
            .map_err(|_| WatchError::NeverReady("pods"))?;
        Ok(Watches {
            targets,
            pods,
            changed,
        })
    }

    /// The plan from the current state of the stores.
    pub fn plan(&self) -> Vec<TargetPlan> {
        let targets: Vec<ProfilingTarget> =
            self.targets.state().iter().map(|t| (**t).clone()).collect();
        let pods: Vec<Pod> = self.pods.state().iter().map(|p| (**p).clone()).collect();
        plan(&targets, &pods)
    }
}

async fn drive<S, K>(what: &'static str, stream: S, changed: Arc<Notify>)
where
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(_) => {}
            Err(e) => {
                crate::daemon::metrics::error("watch");
                tracing::warn!(watch = what, error = %e, "watch error (retrying with backoff)");
            }
        }
        changed.notify_one();
    }
    tracing::error!(watch = what, "watch stream ended");
}
