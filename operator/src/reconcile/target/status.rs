//! Step 5, status: server-side apply of the status subresource, only when it changed.

use kprof_crds::{ProfilingTarget, ProfilingTargetStatus};
use kube::{
    Api, Resource,
    api::{Patch, PatchParams},
};
use serde_json::json;

use crate::{Error, FIELD_MANAGER, Result};

/// Apply `status` to the target unless it already has exactly this status. Returns whether a
/// request was made.
pub async fn patch_status(
    api: &Api<ProfilingTarget>,
    target: &ProfilingTarget,
    status: &ProfilingTargetStatus,
) -> Result<bool> {
    if target.status.as_ref() == Some(status) {
        return Ok(false);
    }
    let name = target.meta().name.as_deref().unwrap_or_default();
    let patch = json!({
        "apiVersion": ProfilingTarget::api_version(&()),
        "kind": ProfilingTarget::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::kube("patching the target status"))?;
    Ok(true)
}
