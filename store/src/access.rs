//! Who may read what. The API server authorizes every aggregated-API request for the namespace
//! and Profile in its URL; kprof asks it again (a SubjectAccessReview) only for a Profile a
//! request names outside its URL: the other side of a diff.

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::{Api, Client};

use super::frontproxy::User;

pub use kprof_crds::store_api::{API_PREFIX, GROUP, READ_SUBRESOURCE, VERSION};

/// The reader of a request, as the middleware established it.
#[derive(Clone, Debug)]
pub enum Reader {
    /// A user the API server's front proxy vouches for.
    User(User),
    /// Anyone who reaches the listener ([`super::Readers::Unauthenticated`]: in-process tests).
    Anyone,
}

/// Whether `reader` may read the Profile `ns/name`.
pub async fn may_read(
    client: &Client,
    reader: &Reader,
    ns: &str,
    name: &str,
) -> Result<bool, kube::Error> {
    let user = match reader {
        Reader::Anyone => return Ok(true),
        Reader::User(u) => u,
    };
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.name.clone()),
            groups: Some(user.groups.clone()),
            extra: (!user.extra.is_empty()).then(|| user.extra.clone()),
            resource_attributes: Some(ResourceAttributes {
                group: Some(GROUP.into()),
                version: Some(VERSION.into()),
                resource: Some("profiles".into()),
                subresource: Some(READ_SUBRESOURCE.into()),
                verb: Some("get".into()),
                namespace: Some(ns.into()),
                name: Some(name.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}
