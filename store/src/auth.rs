//! Who may upload: the bearer token is checked with a TokenReview, for the store's own audience
//! (a token meant for the API server is refused: whoever holds one of the agent's ordinary
//! tokens cannot upload, and an upload token is no use against the API server); positive
//! answers are cached briefly (keyed by the token's SHA-256, never the token itself).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};

use super::placement::NODE_NAME_EXTRA;

/// Who uploads: the token's user and, for a token bound to a pod (as the kubelet projects the
/// agent's), the node that pod runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uploader {
    pub user: String,
    pub node: Option<String>,
}

/// The outcome of checking an upload's credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthOutcome {
    /// A valid token of an allowed uploader.
    Allowed(Uploader),
    /// No token, or the API server does not accept it.
    Unauthenticated(String),
    /// A valid token of someone who may not upload.
    Forbidden(String),
}

/// TokenReview-based authentication with a small positive cache.
pub struct Authenticator {
    client: Client,
    allowed: Vec<String>,
    ttl: Duration,
    audience: Option<String>,
    cache: Mutex<HashMap<[u8; 32], (Uploader, Instant)>>,
    reviews: prometheus_client::metrics::counter::Counter,
}

const MAX_CACHE: usize = 4096;

impl Authenticator {
    /// `reviews` counts the TokenReviews sent (cache misses).
    pub fn new(
        client: Client,
        allowed: Vec<String>,
        ttl: Duration,
        audience: Option<String>,
        reviews: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        Self {
            client,
            allowed,
            ttl,
            audience,
            cache: Mutex::new(HashMap::new()),
            reviews,
        }
    }

    /// Check the value of an `Authorization` header.
    pub async fn check(&self, authorization: Option<&str>) -> Result<AuthOutcome, kube::Error> {
        let Some(token) = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
        else {
            return Ok(AuthOutcome::Unauthenticated("missing bearer token".into()));
        };
        let key: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
            .as_ref()
            .try_into()
            .expect("sha256 is 32 bytes");
        let cached = {
            let cache = self.cache.lock().expect("auth cache lock");
            cache
                .get(&key)
                .filter(|(_, at)| at.elapsed() < self.ttl)
                .map(|(u, _)| u.clone())
        };
        let uploader = match cached {
            Some(u) => u,
            None => {
                let review = TokenReview {
                    spec: TokenReviewSpec {
                        token: Some(token.to_string()),
                        audiences: self.audience.clone().map(|a| vec![a]),
                    },
                    ..Default::default()
                };
                self.reviews.inc();
                let api: Api<TokenReview> = Api::all(self.client.clone());
                let answer = api.create(&PostParams::default(), &review).await?;
                let status = answer.status.unwrap_or_default();
                if status.authenticated != Some(true) {
                    let why = status.error.unwrap_or_else(|| "token not accepted".into());
                    return Ok(AuthOutcome::Unauthenticated(why));
                }
                // The API server answers with the audiences the token is good for among those
                // asked; one that ignores them would say nothing of ours.
                if let Some(a) = &self.audience
                    && !status.audiences.as_ref().is_some_and(|got| got.contains(a))
                {
                    return Ok(AuthOutcome::Unauthenticated(format!(
                        "the token is not meant for {a}"
                    )));
                }
                let user = status.user.unwrap_or_default();
                let node = user
                    .extra
                    .as_ref()
                    .and_then(|extra| extra.get(NODE_NAME_EXTRA))
                    .and_then(|values| values.first())
                    .filter(|n| !n.is_empty())
                    .cloned();
                let uploader = Uploader {
                    user: user.username.unwrap_or_default(),
                    node,
                };
                let mut cache = self.cache.lock().expect("auth cache lock");
                if cache.len() >= MAX_CACHE {
                    cache.retain(|_, (_, at)| at.elapsed() < self.ttl);
                    if cache.len() >= MAX_CACHE {
                        cache.clear();
                    }
                }
                cache.insert(key, (uploader.clone(), Instant::now()));
                uploader
            }
        };
        if self.allowed.iter().any(|a| a == &uploader.user) {
            Ok(AuthOutcome::Allowed(uploader))
        } else {
            Ok(AuthOutcome::Forbidden(uploader.user))
        }
    }
}
