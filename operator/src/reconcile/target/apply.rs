//! Step 4, apply: make the world match what `build` decided. For a target that means deleting
//! the Profiles retention expired (the agent DaemonSet is applied by the `agent` reconciler,
//! from all targets at once).

use kprof_crds::Profile;
use kube::{
    Api,
    api::{DeleteParams, Preconditions},
};

use super::build::Expired;
use crate::{Error, Result};

/// Delete the expired Profiles; returns how many were deleted (gone already counts as done).
pub async fn delete_expired(api: &Api<Profile>, expired: &[Expired]) -> Result<usize> {
    let mut deleted = 0;
    for e in expired {
        // The uid precondition makes sure a Profile re-created under the same name survives.
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: e.uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::background()
        };
        match api.delete(&e.name, &dp).await {
            Ok(_) => deleted += 1,
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(err) => return Err(Error::kube("deleting expired Profiles")(err)),
        }
    }
    Ok(deleted)
}
