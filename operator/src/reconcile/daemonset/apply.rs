//! Server-side apply and deletion of the agent DaemonSet.

use k8s_openapi::api::apps::v1::DaemonSet;
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams},
};

use crate::{AGENT_NAME, Error, FIELD_MANAGER, Result};

/// Apply the desired DaemonSet (one field manager, forced: the operator owns these fields).
pub async fn apply(api: &Api<DaemonSet>, ds: &DaemonSet) -> Result<DaemonSet> {
    let mut body = serde_json::to_value(ds).map_err(|source| Error::Serialize {
        what: "the agent DaemonSet",
        source,
    })?;
    body["apiVersion"] = "apps/v1".into();
    body["kind"] = "DaemonSet".into();
    api.patch(
        AGENT_NAME,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(Error::kube("applying the agent DaemonSet"))
}

/// Delete the DaemonSet (and, in the background, its pods). Returns whether it existed.
pub async fn delete(api: &Api<DaemonSet>) -> Result<bool> {
    match api.delete(AGENT_NAME, &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(Error::kube("deleting the agent DaemonSet")(e)),
    }
}
