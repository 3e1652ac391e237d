//! Where an uploader may upload for: an agent's token is bound to its pod, and so to its node
//! (the TokenReview names the node); it uploads only for namespaces that run a pod on that node.
//! Answers are cached briefly per (node, namespace): a window's uploads ask once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client};

/// The TokenReview `extra` key naming the node of the pod a token is bound to (Kubernetes 1.30+).
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// How long a "runs pods there" answer holds. Long enough that the last windows of a namespace's
/// last pod on the node, uploaded after that pod was deleted, are still taken.
const POSITIVE_TTL: Duration = Duration::from_secs(600);
/// How long a "runs no pod there" answer holds: short, as a new pod's first window may follow.
const NEGATIVE_TTL: Duration = Duration::from_secs(5);
const MAX_ENTRIES: usize = 4096;

/// Whether a namespace runs pods on a node, from the API server, cached.
pub struct Placement {
    client: Client,
    cache: Mutex<HashMap<(String, String), (bool, Instant)>>,
}

impl Placement {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `namespace` has at least one pod on `node`.
    pub async fn runs_pods_on(&self, namespace: &str, node: &str) -> Result<bool, kube::Error> {
        let key = (node.to_string(), namespace.to_string());
        if let Some(answer) = self.cached(&key) {
            return Ok(answer);
        }
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let params = ListParams::default()
            .fields(&format!("spec.nodeName={node}"))
            .limit(1);
        let answer = !pods.list_metadata(&params).await?.items.is_empty();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_ENTRIES {
            cache.clear();
        }
        cache.insert(key, (answer, Instant::now()));
        Ok(answer)
    }

    fn cached(&self, key: &(String, String)) -> Option<bool> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let &(answer, at) = cache.get(key)?;
        let ttl = if answer { POSITIVE_TTL } else { NEGATIVE_TTL };
        (at.elapsed() < ttl).then_some(answer)
    }
}
