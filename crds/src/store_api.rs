//! The profile store's upload protocol, shared by the agent (which uploads) and the store (which
//! serves): artifacts are content-addressed by a SHA-256 [`Digest`] at
//! `PUT|GET {store}/v1/artifacts/sha256:<hex>`, and an upload names the namespace of the Profile
//! it belongs to in [`NAMESPACE_HEADER`].

use std::fmt;

use sha2::{Digest as _, Sha256};

/// Header an uploader sets to the namespace of the Profile the artifact belongs to (HTTP header
/// names are case-insensitive; this is how they travel in HTTP/2 and how `http` spells them).
pub const NAMESPACE_HEADER: &str = "x-kprof-namespace";

/// The audience of the tokens agents upload with: a projected ServiceAccount token meant for
/// the store only (the API server refuses it, and the store refuses the API server's tokens).
pub const UPLOAD_AUDIENCE: &str = "kprof-store";

/// The API group through which users read Profiles' data: the store's aggregated API, behind
/// the API server's authentication and RBAC.
pub const GROUP: &str = "data.kprof.io";
pub const VERSION: &str = "v1alpha1";
/// Where the aggregated API's paths start.
pub const API_PREFIX: &str = "/apis/data.kprof.io/v1alpha1";
/// The read rule: reading a Profile's data is `get` on this subresource of `profiles` in the
/// Profile's namespace (aggregated into the built-in view/edit/admin roles by the chart).
pub const READ_SUBRESOURCE: &str = "pprof";

/// Path prefix of the artifacts, followed by `/sha256:<hex>`.
pub const ARTIFACTS_PATH: &str = "/v1/artifacts";

/// The store's route of one artifact (an axum path pattern with a `{digest}` parameter).
pub const ARTIFACT_ROUTE: &str = "/v1/artifacts/{digest}";

/// The URL of the artifact `digest` (`sha256:<hex>`) on the store at `base` (a trailing `/` is
/// ignored).
pub fn artifact_url(base: &str, digest: &str) -> String {
    format!("{}{ARTIFACTS_PATH}/{digest}", base.trim_end_matches('/'))
}

/// A validated `sha256:<64 lowercase hex>` content digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// Parse `sha256:<hex>` (64 hex digits; upper case is accepted and normalised).
    pub fn parse(s: &str) -> Option<Self> {
        let hex = s.strip_prefix("sha256:")?;
        (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| Self(hex.to_ascii_lowercase()))
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(
            Sha256::digest(bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        )
    }

    /// The digest at the end of an artifact URL (`.../v1/artifacts/sha256:<hex>`).
    pub fn from_url(url: &str) -> Option<Self> {
        Self::parse(url.rsplit('/').next()?)
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0
    }

    /// The artifact's path on the store: `/v1/artifacts/sha256:<hex>`.
    pub fn path(&self) -> String {
        self.url("")
    }

    /// The artifact's URL on the store at `base` (see [`artifact_url`]).
    pub fn url(&self, base: &str) -> String {
        artifact_url(base, &self.to_string())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_prefix_names_the_group_and_version() {
        assert_eq!(API_PREFIX, format!("/apis/{GROUP}/{VERSION}"));
    }

    #[test]
    fn digest_of_parse_and_urls() {
        let empty = Digest::of(b"");
        assert_eq!(
            empty.to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let d = Digest::of(b"abc");
        assert_eq!(
            d.hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            Digest::parse(&d.to_string().to_uppercase().replace("SHA256", "sha256")),
            Some(d.clone())
        );
        assert_eq!(Digest::parse("sha256:abc"), None);
        assert_eq!(Digest::parse(&format!("md5:{}", d.hex())), None);
        assert_eq!(
            d.url("http://store:8090/"),
            format!("http://store:8090/v1/artifacts/{d}")
        );
        assert_eq!(Digest::from_url(&d.url("http://x:8090")), Some(d.clone()));
        assert_eq!(ARTIFACT_ROUTE.replace("{digest}", &d.to_string()), d.path());
    }
}
