//! Drains the spool: uploads each entry's artifacts to the profile store (or, without a store,
//! publishes them as `file://` paths under the agent's state directory), then creates the
//! Profile. Transient failures (store or API server away, token refused) keep the entry and back
//! off — per namespace, so one namespace whose Profiles are refused does not hold back the
//! others; a Profile that already exists (a retry after a lost answer) counts as done, since
//! names are deterministic; a Profile the API server keeps refusing (a quota, a missing CRD) is
//! given up after [`MAX_REFUSALS`] attempts with an Event; errors that can never succeed drop
//! the entry with an error log.
use std::{
    collections::{HashMap, HashSet},
    fs, io,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use kprof_crds::{ArtifactRef, Profile, store_api};
use kube::{
    Api, Client,
    api::PostParams,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use tokio::sync::{Notify, watch};

use crate::{
    daemon::metrics,
    spool::{ArtifactKind, ArtifactMeta, Entry, Spool},
};

/// Default location of the pod's ServiceAccount token.
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// Errors of one upload attempt.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("profile store unreachable: {0}")]
    StoreUnreachable(String),
    #[error("profile store refused the token ({0}); will retry with a fresh token")]
    StoreAuth(u16),
    #[error("profile store answered {status}: {body}")]
    StoreStatus { status: u16, body: String },
    #[error("cannot read the service account token {}: {source}", path.display())]
    Token {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the store's CA bundle {}: {source}", path.display())]
    StoreCa {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("local artifact {}: {source}", path.display())]
    Local {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("API server: {0}")]
    Api(#[source] kube::Error),
    /// Refused for now: a quota, a missing CRD (being reinstalled), RBAC. Retried a bounded
    /// number of times.
    #[error("the API server refused the Profile ({code}): {message}")]
    Refused { code: u16, message: String },
    #[error("the API server refused the Profile for good ({code}): {message}")]
    Rejected { code: u16, message: String },
}

impl UploadError {
    /// Whether a later attempt may succeed.
    pub fn retryable(&self) -> bool {
        !matches!(self, Self::Rejected { .. } | Self::Local { .. })
    }

    /// Metric label.
    pub fn category(&self) -> &'static str {
        match self {
            Self::StoreUnreachable(_) | Self::StoreStatus { .. } => "store",
            Self::StoreAuth(_) | Self::Token { .. } | Self::StoreCa { .. } => "store_auth",
            Self::Local { .. } => "spool_io",
            Self::Api(_) => "apiserver",
            Self::Refused { .. } => "profile_refused",
            Self::Rejected { .. } => "profile_rejected",
        }
    }

    /// The API server's refusal to create a Profile (a 409 is told by [`same_window`]).
    fn of_create(e: kube::Error) -> UploadError {
        match e {
            // A namespace that is gone takes its Profiles with it; any other 404 is the
            // Profile type missing (a CRD being reinstalled): that passes.
            kube::Error::Api(s) if s.code == 404 && namespace_gone(&s.message) => Self::Rejected {
                code: s.code,
                message: s.message,
            },
            // Malformed, too large, invalid: the same object never passes.
            kube::Error::Api(s) if matches!(s.code, 400 | 413 | 422) => Self::Rejected {
                code: s.code,
                message: s.message,
            },
            // The agent's own credentials (401), a timeout (408), overload (429): an outage,
            // retried without bound like a 5xx.
            kube::Error::Api(s)
                if (400..500).contains(&s.code) && !matches!(s.code, 401 | 408 | 429) =>
            {
                Self::Refused {
                    code: s.code,
                    message: s.message,
                }
            }
            e => Self::Api(e),
        }
    }
}

/// An HTTP client for the store, trusting the PEM certificates in `ca` besides the system's
/// (an unreadable bundle is logged and left out: the handshake then says what is wrong).
fn http_client(ca: Option<&[u8]>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60));
    if let Some(pem) = ca {
        match reqwest::Certificate::from_pem_bundle(pem) {
            Ok(certs) => {
                for c in certs {
                    b = b.add_root_certificate(c);
                }
            }
            Err(e) => tracing::error!(error = %e, "the store CA bundle cannot be read"),
        }
    }
    b.build().unwrap_or_default()
}

/// Whether a 404's message says the namespace itself does not exist.
fn namespace_gone(message: &str) -> bool {
    message.starts_with("namespaces \"") && message.ends_with("not found")
}

/// Where artifacts go.
#[derive(Clone, Debug)]
pub enum ArtifactSink {
    /// The kprof profile store (`PUT {url}/v1/artifacts/sha256:{hex}`), with the token in
    /// `token_file` (meant for the store's audience), trusting the CA in `ca_file` besides the
    /// system's.
    Store {
        url: String,
        token_file: PathBuf,
        ca_file: Option<PathBuf>,
    },
    /// No store: artifacts stay on the node under this directory, referenced as `file://`.
    Local { dir: PathBuf },
}

/// Uploads spool entries.
pub struct Uploader {
    client: Client,
    /// The HTTP client, and the store CA it trusts (read again for every upload: it rotates).
    http: std::sync::Mutex<(Option<Vec<u8>>, reqwest::Client)>,
    sink: ArtifactSink,
}

impl Uploader {
    pub fn new(client: Client, sink: ArtifactSink) -> Uploader {
        Uploader {
            client,
            http: std::sync::Mutex::new((None, http_client(None))),
            sink,
        }
    }

    /// The HTTP client trusting the store CA in `ca_file` as it is now.
    fn http(&self, ca_file: Option<&Path>) -> Result<reqwest::Client, UploadError> {
        let ca = match ca_file {
            Some(f) => Some(fs::read(f).map_err(|source| UploadError::StoreCa {
                path: f.to_owned(),
                source,
            })?),
            None => None,
        };
        let mut cached = self.http.lock().unwrap_or_else(|e| e.into_inner());
        if cached.0 != ca {
            *cached = (ca.clone(), http_client(ca.as_deref()));
        }
        Ok(cached.1.clone())
    }

    /// Publishes one artifact and returns its reference.
    async fn publish(
        &self,
        entry: &Entry,
        a: &ArtifactMeta,
        namespace: &str,
    ) -> Result<Option<ArtifactRef>, UploadError> {
        let path = entry.artifact_path(a);
        match &self.sink {
            ArtifactSink::Local { dir } => {
                let name = entry
                    .manifest
                    .profile
                    .metadata
                    .name
                    .as_deref()
                    .unwrap_or("profile");
                let dest_dir = dir.join(namespace).join(name);
                let dest = dest_dir.join(&a.file);
                let local = |source| UploadError::Local {
                    path: dest.clone(),
                    source,
                };
                fs::create_dir_all(&dest_dir).map_err(local)?;
                if !dest.exists() {
                    let tmp = dest_dir.join(format!(".{}.tmp", a.file));
                    fs::copy(&path, &tmp).map_err(local)?;
                    fs::rename(&tmp, &dest).map_err(local)?;
                }
                Ok(Some(ArtifactRef {
                    url: format!("file://{}", dest.display()),
                    digest: a.digest.clone(),
                    size_bytes: a.size,
                }))
            }
            ArtifactSink::Store {
                url,
                token_file,
                ca_file,
            } => {
                let body = tokio::fs::read(&path)
                    .await
                    .map_err(|source| UploadError::Local {
                        path: path.clone(),
                        source,
                    })?;
                // Re-read every time: the projected token rotates.
                let token = tokio::fs::read_to_string(token_file)
                    .await
                    .map_err(|source| UploadError::Token {
                        path: token_file.clone(),
                        source,
                    })?;
                let target = store_api::artifact_url(url, &a.digest);
                let resp = self
                    .http(ca_file.as_deref())?
                    .put(&target)
                    .bearer_auth(token.trim())
                    .header(store_api::NAMESPACE_HEADER, namespace)
                    .header("Content-Type", &a.content_type)
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| UploadError::StoreUnreachable(e.to_string()))?;
                let status = resp.status().as_u16();
                match status {
                    200 | 201 => Ok(Some(ArtifactRef {
                        url: target,
                        digest: a.digest.clone(),
                        size_bytes: a.size,
                    })),
                    401 | 403 => Err(UploadError::StoreAuth(status)),
                    // Too large, or the digest does not match the bytes: never going to work;
                    // the Profile is still written, without this artifact and with a warning.
                    400 | 413 => {
                        let body = resp.text().await.unwrap_or_default();
                        tracing::error!(artifact = ?a.kind, status, body = %body.trim(), "profile store refused an artifact");
                        metrics::error("store_refused");
                        Ok(None)
                    }
                    _ => Err(UploadError::StoreStatus {
                        status,
                        body: resp.text().await.unwrap_or_default().trim().to_owned(),
                    }),
                }
            }
        }
    }

    /// Uploads one entry: artifacts, then the Profile.
    pub async fn upload(&self, entry: &Entry) -> Result<(), UploadError> {
        let mut profile: Profile = entry.manifest.profile.clone();
        let namespace = profile.metadata.namespace.clone().unwrap_or_default();
        for a in &entry.manifest.artifacts {
            let r = self.publish(entry, a, &namespace).await?;
            if r.is_none() {
                profile
                    .spec
                    .warnings
                    .push(format!("{} artifact refused by the profile store", a.file));
            }
            match a.kind {
                ArtifactKind::Pprof => profile.spec.artifacts.pprof = r,
                ArtifactKind::Flamegraph => profile.spec.artifacts.flamegraph = r,
                ArtifactKind::Summary => profile.spec.artifacts.summary = r,
            }
        }
        let api: Api<Profile> = Api::namespaced(self.client.clone(), &namespace);
        match api.create(&PostParams::default(), &profile).await {
            Ok(_) => {
                self.announce_leaks(&profile).await;
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                // Ours from an attempt whose answer was lost, or another writer's.
                let name = profile.metadata.name.as_deref().unwrap_or_default();
                let existing = api.get(name).await.map_err(UploadError::Api)?;
                same_window(&existing, &profile)
            }
            Err(e) => Err(UploadError::of_create(e)),
        }
    }
}

/// Whether the Profile already under this name is this one (the same container, window and
/// type, and the same pprof): a name taken by another writer, or by another window, is an
/// error and not a silent success. Compared on what identifies a window, not the whole spec,
/// which the API server may normalise (timestamps to the second, defaults).
fn same_window(existing: &Profile, ours: &Profile) -> Result<(), UploadError> {
    let key = |p: &Profile| {
        let s = &p.spec;
        (
            s.node.clone(),
            s.pod.clone(),
            s.container.clone(),
            s.profile_type,
            s.window_start.0.as_second(),
            s.window_end.0.as_second(),
            s.artifacts.pprof.as_ref().map(|a| a.digest.clone()),
        )
    };
    if key(existing) == key(ours) {
        return Ok(());
    }
    let (e, o) = (&existing.spec, &ours.spec);
    Err(UploadError::Rejected {
        code: 409,
        message: format!(
            "a different Profile already has the name {}: it is {} of {}/{} on {} for {}..{} (this one: {} of {}/{} on {} for {}..{})",
            ours.metadata.name.as_deref().unwrap_or_default(),
            e.profile_type.as_str(),
            e.pod,
            e.container,
            e.node,
            e.window_start.0,
            e.window_end.0,
            o.profile_type.as_str(),
            o.pod,
            o.container,
            o.node,
            o.window_start.0,
            o.window_end.0,
        ),
    })
}

impl Uploader {
    /// A thread or memory leak suspected in a Profile is also a Warning Event on its
    /// ProfilingTarget, so `kubectl describe pt` shows it without reading Profiles. Best
    /// effort: the warning is on the Profile either way.
    async fn announce_leaks(&self, profile: &Profile) {
        let spec = &profile.spec;
        let kinds = [
            (
                spec.thread_summary
                    .as_ref()
                    .is_some_and(|t| t.leak_suspected),
                "thread leak",
                "ThreadLeak",
            ),
            (
                spec.memory_summary
                    .as_ref()
                    .is_some_and(|m| m.leak_suspected),
                "memory leak",
                "MemoryLeak",
            ),
        ];
        for (suspected, phrase, reason) in kinds {
            if !suspected {
                continue;
            }
            let leaks: Vec<&str> = spec
                .warnings
                .iter()
                .filter(|w| w.contains(phrase))
                .map(String::as_str)
                .collect();
            let note = format!(
                "pod {} container {}: {}",
                spec.pod,
                spec.container,
                leaks.join("; ")
            );
            self.warn_target(profile, reason, &note).await;
        }
    }

    /// A Warning Event on the ProfilingTarget that owns `profile` (best effort).
    async fn warn_target(&self, profile: &Profile, reason: &str, note: &str) {
        let Some(owner) = profile
            .metadata
            .owner_references
            .as_ref()
            .and_then(|o| o.first())
        else {
            return;
        };
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some(owner.api_version.clone()),
            kind: Some(owner.kind.clone()),
            name: Some(owner.name.clone()),
            namespace: profile.metadata.namespace.clone(),
            uid: Some(owner.uid.clone()),
            ..Default::default()
        };
        let recorder = Recorder::new(
            self.client.clone(),
            Reporter {
                controller: "kprof-agent".into(),
                instance: Some(profile.spec.node.clone()),
            },
        );
        let event = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            // Event notes are limited to 1 kB.
            note: Some(note.chars().take(1000).collect()),
            action: "Profile".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &reference).await {
            tracing::debug!(error = %e, reason, "publishing an event failed");
        }
    }
}

/// How many times a Profile the API server refuses (a quota, RBAC, a missing CRD) is tried
/// before it is given up: with the backoff, about six minutes.
pub const MAX_REFUSALS: u32 = 10;

/// The uploader's waits, per namespace: a failure holds back that namespace's entries only, so
/// one namespace whose Profiles are refused (a quota, a terminating namespace) does not stop
/// the others. Within a namespace the order is kept.
#[derive(Debug, Default)]
pub struct Holds {
    by_namespace: HashMap<String, Hold>,
}

#[derive(Debug, Clone, Copy)]
struct Hold {
    until: tokio::time::Instant,
    backoff: Duration,
}

impl Holds {
    /// Whether `ns` waits at `now`.
    pub fn held(&self, ns: &str, now: tokio::time::Instant) -> bool {
        self.by_namespace.get(ns).is_some_and(|h| h.until > now)
    }

    /// A failure in `ns`: it waits twice as long as last time (1 s to 60 s).
    pub fn fail(&mut self, ns: &str, now: tokio::time::Instant) -> Duration {
        let backoff = self
            .by_namespace
            .get(ns)
            .map_or(Duration::ZERO, |h| h.backoff)
            .saturating_mul(2)
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        self.by_namespace.insert(
            ns.to_owned(),
            Hold {
                until: now + backoff,
                backoff,
            },
        );
        backoff
    }

    /// A success in `ns`.
    pub fn clear(&mut self, ns: &str) {
        self.by_namespace.remove(ns);
    }

    /// When the first hold still running at `now` ends (none: nothing waits). A hold that
    /// ended is kept for its backoff, but there is nothing to wake up for.
    pub fn next_end(&self, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        self.by_namespace
            .values()
            .map(|h| h.until)
            .filter(|&until| until > now)
            .min()
    }

    pub fn any(&self) -> bool {
        !self.by_namespace.is_empty()
    }
}

/// Drains the spool until `shutdown` is set and (then) the spool is empty or `drain_deadline`
/// passed. Wakes on `wake` (a new entry) or when a namespace's backoff elapses.
pub async fn run(
    uploader: Uploader,
    spool: Arc<Spool>,
    wake: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
    drain_deadline: Duration,
) {
    let mut holds = Holds::default();
    // Refusals per entry, up to MAX_REFUSALS.
    let mut refusals: HashMap<PathBuf, u32> = HashMap::new();
    // The namespace of each entry seen: entries of a waiting namespace are skipped unread.
    let mut namespaces: HashMap<PathBuf, String> = HashMap::new();
    let mut stop_at: Option<tokio::time::Instant> = None;
    loop {
        if stop_at.is_none() && *shutdown.borrow() {
            stop_at = Some(tokio::time::Instant::now() + drain_deadline);
        }
        // Namespaces that failed in this pass: their later entries wait too (order kept).
        let mut failed: HashSet<String> = HashSet::new();
        for dir in spool.list() {
            let now = tokio::time::Instant::now();
            if stop_at.is_some_and(|t| now >= t) {
                break;
            }
            if namespaces
                .get(&dir)
                .is_some_and(|ns| failed.contains(ns) || holds.held(ns, now))
            {
                continue;
            }
            let entry = match spool.load(&dir) {
                Ok(e) => e,
                Err(e) => {
                    if dir.exists() {
                        tracing::error!(error = %e, "dropping an unreadable spool entry");
                        metrics::error("spool_corrupt");
                        let _ = spool.remove(&dir);
                    }
                    continue;
                }
            };
            let profile = &entry.manifest.profile;
            let ns = profile.metadata.namespace.clone().unwrap_or_default();
            namespaces.insert(dir.clone(), ns.clone());
            if failed.contains(&ns) || holds.held(&ns, now) {
                continue;
            }
            let name = profile.metadata.name.clone().unwrap_or_default();
            match uploader.upload(&entry).await {
                Ok(()) => {
                    tracing::info!(profile = %name, "profile written");
                    metrics::profile_written();
                    holds.clear(&ns);
                    refusals.remove(&dir);
                    let _ = spool.remove(&dir);
                }
                Err(e) if e.retryable() => {
                    metrics::error(e.category());
                    failed.insert(ns.clone());
                    let backoff = holds.fail(&ns, tokio::time::Instant::now());
                    let refused = matches!(e, UploadError::Refused { .. });
                    let n = if refused {
                        let n = refusals.entry(dir.clone()).or_default();
                        *n += 1;
                        *n
                    } else {
                        0
                    };
                    if n >= MAX_REFUSALS {
                        give_up(&uploader, &spool, &entry, &e, &mut refusals).await;
                    } else {
                        tracing::warn!(profile = %name, namespace = %ns, error = %e, retry_in = ?backoff, "upload failed; keeping it in the spool");
                    }
                }
                Err(e) => {
                    metrics::error(e.category());
                    tracing::error!(profile = %name, error = %e, "dropping a profile that can never be written");
                    refusals.remove(&dir);
                    let _ = spool.remove(&dir);
                }
            }
        }
        refusals.retain(|d, _| d.exists());
        namespaces.retain(|d, _| d.exists());
        metrics::set_spool_depth(spool.depth());
        let empty = spool.depth() == 0;
        if let Some(t) = stop_at
            && (empty || tokio::time::Instant::now() >= t)
        {
            if !empty {
                tracing::warn!(left = spool.depth(), spool = %spool.dir().display(), "shutting down with profiles left in the spool; they are sent at the next start");
            }
            return;
        }
        // Until the first hold ends, or a periodic look; never past the drain deadline (the
        // pod's grace period is short; what is left stays in the spool for the next start).
        let now = tokio::time::Instant::now();
        let until = holds.next_end(now).unwrap_or(now + Duration::from_secs(30));
        let until = stop_at.map_or(until, |t| until.min(t));
        loop {
            tokio::select! {
                () = wake.notified() => {
                    // A new entry is tried at once unless everything waits (an outage of the
                    // store or the API server: no hammering); the depth gauge counts it anyway
                    // (it is what an outage alert watches).
                    metrics::set_spool_depth(spool.depth());
                    if !holds.any() || ready_entry(&spool, &holds, &namespaces) {
                        break;
                    }
                }
                () = tokio::time::sleep_until(until) => break,
                _ = shutdown.changed(), if stop_at.is_none() => break,
            }
        }
    }
}

/// Whether the spool has an entry of a namespace that does not wait (entries already seen are
/// not read again).
fn ready_entry(spool: &Spool, holds: &Holds, namespaces: &HashMap<PathBuf, String>) -> bool {
    let now = tokio::time::Instant::now();
    spool.list().iter().any(|d| {
        let ns = match namespaces.get(d) {
            Some(ns) => ns.clone(),
            None => match spool.load(d) {
                Ok(e) => e.manifest.profile.metadata.namespace.unwrap_or_default(),
                Err(_) => return true, // unreadable: the pass drops it
            },
        };
        !holds.held(&ns, now)
    })
}

/// A Profile refused [`MAX_REFUSALS`] times is given up, with the spooled Profiles of its
/// namespace behind it (they meet the same refusal, and would hold spool space the other
/// namespaces need): counted, logged, and a Warning Event on its ProfilingTarget.
async fn give_up(
    uploader: &Uploader,
    spool: &Spool,
    entry: &Entry,
    e: &UploadError,
    refusals: &mut HashMap<PathBuf, u32>,
) {
    let profile = &entry.manifest.profile;
    let ns = profile.metadata.namespace.clone().unwrap_or_default();
    let mut dropped = 0u64;
    for d in spool.list() {
        let same_ns = spool
            .load(&d)
            .is_ok_and(|o| o.manifest.profile.metadata.namespace.as_deref() == Some(ns.as_str()));
        if same_ns && spool.remove(&d).is_ok() {
            refusals.remove(&d);
            dropped += 1;
        }
    }
    metrics::profiles_given_up(dropped);
    let note = format!(
        "{dropped} Profile(s) of pod {} given up after {MAX_REFUSALS} refusals: {e}",
        profile.spec.pod
    );
    tracing::error!(namespace = %ns, dropped, error = %e, "giving up Profiles the API server keeps refusing");
    uploader.warn_target(profile, "ProfileRefused", &note).await;
}

/// `file://` artifacts directory under the agent's state directory.
pub fn local_artifacts_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("artifacts")
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader, Read as _, Write as _},
        net::TcpListener,
    };

    use super::*;
    use crate::spool::{Limits, NewArtifact};

    /// A one-request-per-answer fake store: answers `statuses` in order, returns the requests.
    fn fake_store(statuses: Vec<u16>) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let h = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for status in statuses {
                let (mut s, _) = l.accept().unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut head = String::new();
                let mut len = 0;
                loop {
                    let mut line = String::new();
                    r.read_line(&mut line).unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                head.push_str(&String::from_utf8_lossy(&body));
                seen.push(head);
                let answer = r#"{"digest":"sha256:x","size":2,"url":"u"}"#;
                write!(
                    s,
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                    answer.len()
                )
                .unwrap();
            }
            seen
        });
        (url, h)
    }

    fn entry(dir: &Path) -> Entry {
        let spool = Spool::open(dir.join("spool"), Limits::default()).unwrap();
        let t = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        );
        let mut p = Profile::new(
            "p-1",
            kprof_crds::ProfileSpec {
                target: "t".into(),
                pod: "p".into(),
                container: "c".into(),
                node: "n".into(),
                pids: vec![],
                runtime: "native".into(),
                profile_type: kprof_crds::ProfileType::Cpu,
                window_start: t.clone(),
                window_end: t,
                sample_hz: 99,
                samples: 1,
                lost_samples: 0,
                cpu_cores: 0.0,
                threads: 1,
                top: String::new(),
                top_functions: vec![],
                artifacts: Default::default(),
                time: None,
                thread_summary: None,
                memory_summary: None,
                warnings: vec![],
            },
        );
        p.metadata.namespace = Some("shop".into());
        let put = spool
            .put(
                &p,
                vec![NewArtifact {
                    kind: ArtifactKind::Pprof,
                    bytes: b"pb".to_vec(),
                }],
            )
            .unwrap();
        spool.load(&put.dir).unwrap()
    }

    fn client() -> Client {
        Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap()
    }

    #[tokio::test]
    async fn store_contract() {
        let tmp = tempfile::tempdir().unwrap();
        let e = entry(tmp.path());
        let a = &e.manifest.artifacts[0];
        let token = tmp.path().join("token");
        fs::write(&token, "tok-1\n").unwrap();
        let (url, server) = fake_store(vec![201, 200, 401, 413, 503]);
        let up = Uploader::new(
            client(),
            ArtifactSink::Store {
                url: url.clone(),
                token_file: token.clone(),
                ca_file: None,
            },
        );
        let r = up.publish(&e, a, "shop").await.unwrap().unwrap();
        assert_eq!(r.url, format!("{url}/v1/artifacts/{}", a.digest));
        assert_eq!((r.digest.as_str(), r.size_bytes), (a.digest.as_str(), 2));
        // The token is re-read for every upload (it rotates).
        fs::write(&token, "tok-2").unwrap();
        assert!(up.publish(&e, a, "shop").await.unwrap().is_some());
        let err = up.publish(&e, a, "shop").await.unwrap_err();
        assert!(matches!(err, UploadError::StoreAuth(401)) && err.retryable());
        assert!(
            up.publish(&e, a, "shop").await.unwrap().is_none(),
            "413: written without it"
        );
        let err = up.publish(&e, a, "shop").await.unwrap_err();
        assert!(matches!(err, UploadError::StoreStatus { status: 503, .. }) && err.retryable());
        let seen = server.join().unwrap();
        let first = seen[0].to_ascii_lowercase();
        assert!(
            first.starts_with(&format!("put /v1/artifacts/{} http/1.1", a.digest)),
            "{first}"
        );
        assert!(first.contains("authorization: bearer tok-1\r\n"), "{first}");
        assert!(first.contains("x-kprof-namespace: shop\r\n"), "{first}");
        assert!(
            first.contains("content-type: application/vnd.google.protobuf+gzip"),
            "{first}"
        );
        assert!(first.ends_with("pb"), "body: {first}");
        assert!(seen[1].to_ascii_lowercase().contains("bearer tok-2"));

        // Store gone (the fake has closed its socket): retryable.
        let err = up.publish(&e, a, "shop").await.unwrap_err();
        assert!(matches!(err, UploadError::StoreUnreachable(_)) && err.retryable());
    }

    /// Shutting down while the store is away: the uploader gives up at the drain deadline (the
    /// backoff sleep does not outlast it) and the profile stays in the spool.
    #[tokio::test]
    async fn shutdown_during_an_outage_keeps_the_drain_deadline() {
        let tmp = tempfile::tempdir().unwrap();
        let _ = entry(tmp.path());
        let spool = Arc::new(Spool::open(tmp.path().join("spool"), Limits::default()).unwrap());
        let token = tmp.path().join("token");
        fs::write(&token, "tok").unwrap();
        // A port nothing listens on: every upload fails fast and retryably.
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let up = Uploader::new(
            client(),
            ArtifactSink::Store {
                url: format!("http://{closed}"),
                token_file: token,
                ca_file: None,
            },
        );
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(run(
            up,
            spool.clone(),
            Arc::new(Notify::new()),
            rx,
            Duration::from_millis(1500),
        ));
        // Let the backoff grow past the deadline (1 s, 2 s, 4 s, …), then stop.
        tokio::time::sleep(Duration::from_millis(3500)).await;
        let stop = std::time::Instant::now();
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the uploader outlived its drain deadline")
            .unwrap();
        let took = stop.elapsed();
        assert!(took < Duration::from_secs(3), "stopped after {took:?}");
        assert_eq!(spool.depth(), 1, "the profile stays in the spool");
    }

    #[tokio::test]
    async fn local_sink_publishes_file_urls() {
        let tmp = tempfile::tempdir().unwrap();
        let e = entry(tmp.path());
        let up = Uploader::new(
            client(),
            ArtifactSink::Local {
                dir: tmp.path().join("artifacts"),
            },
        );
        let r = up
            .publish(&e, &e.manifest.artifacts[0], "shop")
            .await
            .unwrap()
            .unwrap();
        let path = tmp.path().join("artifacts/shop/p-1/profile.pb.gz");
        assert_eq!(r.url, format!("file://{}", path.display()));
        assert_eq!(fs::read(path).unwrap(), b"pb");
    }

    #[test]
    fn urls_and_categories() {
        assert_eq!(
            store_api::artifact_url("http://store:8080/", "sha256:ab"),
            "http://store:8080/v1/artifacts/sha256:ab"
        );
        assert!(UploadError::StoreAuth(401).retryable());
        assert!(
            !UploadError::Rejected {
                code: 422,
                message: String::new()
            }
            .retryable()
        );
        assert_eq!(
            UploadError::StoreUnreachable(String::new()).category(),
            "store"
        );
    }

    fn api_error(code: u16, message: &str) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure(message, "")
                .with_code(code)
                .boxed(),
        )
    }

    #[test]
    fn a_name_taken_by_another_window_is_an_error() {
        use kprof_crds::ArtifactRef;
        let at = |s: i64| {
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::from_second(s).unwrap(),
            )
        };
        let dir = tempfile::tempdir().unwrap();
        let mut ours = entry(dir.path()).manifest.profile;
        ours.spec.window_start = at(60);
        ours.spec.window_end = at(120);
        ours.spec.artifacts.pprof = Some(ArtifactRef {
            url: "https://store/a".into(),
            digest: "sha256:aa".into(),
            size_bytes: 1,
        });
        // Our own, stored with its timestamps cut to the second and a warning added since.
        let mut stored = ours.clone();
        stored.spec.window_start = at(60);
        stored.spec.warnings.push("later".into());
        assert!(same_window(&stored, &ours).is_ok());
        for change in [
            |p: &mut Profile| p.spec.pod = "other".into(),
            |p: &mut Profile| p.spec.node = "n2".into(),
            |p: &mut Profile| {
                p.spec.window_end.0 = k8s_openapi::jiff::Timestamp::from_second(180).unwrap()
            },
            |p: &mut Profile| p.spec.artifacts.pprof.as_mut().unwrap().digest = "sha256:bb".into(),
        ] {
            let mut theirs = ours.clone();
            change(&mut theirs);
            let e = same_window(&theirs, &ours).unwrap_err();
            assert!(
                matches!(e, UploadError::Rejected { code: 409, .. }) && !e.retryable(),
                "{e}"
            );
            assert!(
                e.to_string()
                    .contains("a different Profile already has the name p-1")
            );
        }
    }

    #[test]
    fn the_api_servers_answers_are_told_apart() {
        let outcome = |code, message| UploadError::of_create(api_error(code, message));
        // A quota, RBAC, a missing CRD: refused for now, retried a bounded number of times.
        for (code, message) in [
            (
                403,
                "exceeded quota: profiles, requested: count/profiles.kprof.io=1",
            ),
            (404, "the server could not find the requested resource"),
        ] {
            let e = outcome(code, message);
            assert!(
                matches!(e, UploadError::Refused { .. }) && e.retryable(),
                "{e}"
            );
        }
        // The namespace is gone, or the object can never pass: dropped.
        for (code, message) in [
            (404, "namespaces \"gone\" not found"),
            (422, "Profile.kprof.io \"x\" is invalid"),
            (413, "Request entity too large"),
        ] {
            let e = outcome(code, message);
            assert!(
                matches!(e, UploadError::Rejected { .. }) && !e.retryable(),
                "{e}"
            );
        }
        // Overload and server errors: an outage, retried without bound.
        for code in [401, 429, 500, 503] {
            let e = outcome(code, "busy");
            assert!(matches!(e, UploadError::Api(_)) && e.retryable(), "{e}");
        }
    }

    #[tokio::test]
    async fn a_namespace_that_fails_waits_alone_and_longer_each_time() {
        let mut holds = Holds::default();
        let t0 = tokio::time::Instant::now();
        assert!(!holds.any() && holds.next_end(t0).is_none());
        assert_eq!(holds.fail("a", t0), Duration::from_secs(1));
        assert!(holds.held("a", t0) && !holds.held("b", t0));
        assert_eq!(holds.next_end(t0), Some(t0 + Duration::from_secs(1)));
        assert!(!holds.held("a", t0 + Duration::from_secs(1)));
        // Once over, a hold is nothing to wait for (the uploader would spin), though its
        // backoff is remembered.
        assert_eq!(holds.next_end(t0 + Duration::from_secs(1)), None);
        assert!(holds.any());
        let backoffs: Vec<u64> = (0..8).map(|_| holds.fail("a", t0).as_secs()).collect();
        assert_eq!(backoffs, [2, 4, 8, 16, 32, 60, 60, 60]);
        holds.clear("a");
        assert!(!holds.held("a", t0) && !holds.any());
    }
}
