//! The on-disk spool between a finished window and the API server / profile store.
//!
//! Each entry is one directory `<spool>/<ms since epoch>-<seq>-<profile name>/` with the artifacts
//! (`profile.pb.gz`, `flamegraph.svg`) and `manifest.json` (the Profile object and, per artifact,
//! its file, content type, `sha256:` digest and size). An entry is written under a `.tmp-` name
//! and renamed into place, so a crash never leaves a half entry behind (leftover `.tmp-` dirs
//! are removed at open). Entries are taken oldest first; the spool is bounded by entry count and
//! bytes, and when full the oldest entries are dropped (logged and counted by the caller).
use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use kprof_crds::Profile;
use kprof_crds::store_api::Digest;
use serde::{Deserialize, Serialize};

/// Errors of the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("spool entry {}: bad manifest: {source}", path.display())]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Which artifact of a profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactKind {
    Pprof,
    Flamegraph,
}

impl ArtifactKind {
    pub fn file_name(self) -> &'static str {
        match self {
            Self::Pprof => "profile.pb.gz",
            Self::Flamegraph => "flamegraph.svg",
        }
    }
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Pprof => "application/vnd.google.protobuf+gzip",
            Self::Flamegraph => "image/svg+xml",
        }
    }
}

/// An artifact to spool.
pub struct NewArtifact {
    pub kind: ArtifactKind,
    pub bytes: Vec<u8>,
}

/// A spooled artifact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactMeta {
    pub kind: ArtifactKind,
    pub file: String,
    pub content_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    pub size: u64,
}

/// `manifest.json` of an entry.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub profile: Profile,
    pub artifacts: Vec<ArtifactMeta>,
}

/// A spooled entry, read back.
#[derive(Clone, Debug)]
pub struct Entry {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Entry {
    pub fn artifact_path(&self, a: &ArtifactMeta) -> PathBuf {
        self.dir.join(&a.file)
    }
}

/// Bounds of the spool.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_entries: usize,
    pub max_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries: 2000,
            max_bytes: 512 << 20,
        }
    }
}

/// What `put` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PutOutcome {
    pub dir: PathBuf,
    /// Oldest entries dropped to stay within the limits.
    pub dropped: Vec<PathBuf>,
}

/// The spool directory.
pub struct Spool {
    dir: PathBuf,
    limits: Limits,
    seq: AtomicU64,
    /// Serializes `put` (bounding) against itself.
    lock: Mutex<()>,
}

const TMP_PREFIX: &str = ".tmp-";
const MANIFEST: &str = "manifest.json";

impl Spool {
    /// Opens (creates) the spool in `dir` and removes half-written entries.
    pub fn open(dir: impl Into<PathBuf>, limits: Limits) -> Result<Spool, SpoolError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        for e in fs::read_dir(&dir).map_err(io_err(&dir))?.flatten() {
            if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
        Ok(Spool {
            dir,
            limits,
            seq: AtomicU64::new(0),
            lock: Mutex::new(()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes one entry atomically and enforces the limits (dropping the oldest entries).
    pub fn put(
        &self,
        profile: &Profile,
        artifacts: Vec<NewArtifact>,
    ) -> Result<PutOutcome, SpoolError> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) % 1_000_000;
        let name = profile.metadata.name.as_deref().unwrap_or("profile");
        let final_name = format!("{ms:014}-{seq:06}-{name}");
        let tmp = self.dir.join(format!("{TMP_PREFIX}{final_name}"));
        fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        let mut metas = Vec::new();
        for a in artifacts {
            let path = tmp.join(a.kind.file_name());
            fs::write(&path, &a.bytes).map_err(io_err(&path))?;
            metas.push(ArtifactMeta {
                kind: a.kind,
                file: a.kind.file_name().to_owned(),
                content_type: a.kind.content_type().to_owned(),
                digest: Digest::of(&a.bytes).to_string(),
                size: a.bytes.len() as u64,
            });
        }
        let manifest = Manifest {
            profile: profile.clone(),
            artifacts: metas,
        };
        let mpath = tmp.join(MANIFEST);
        let json = serde_json::to_vec_pretty(&manifest).map_err(|source| SpoolError::Manifest {
            path: mpath.clone(),
            source,
        })?;
        fs::write(&mpath, json).map_err(io_err(&mpath))?;
        // Durability of the data before the rename that publishes it.
        if let Ok(f) = fs::File::open(&mpath) {
            let _ = f.sync_all();
        }
        let dir = self.dir.join(&final_name);
        fs::rename(&tmp, &dir).map_err(io_err(&dir))?;
        let dropped = self.enforce_limits(&dir);
        Ok(PutOutcome { dir, dropped })
    }

    fn enforce_limits(&self, keep: &Path) -> Vec<PathBuf> {
        let entries = self.list();
        let sizes: Vec<u64> = entries.iter().map(|d| dir_size(d)).collect();
        let mut count = entries.len();
        let mut bytes: u64 = sizes.iter().sum();
        let mut dropped = Vec::new();
        for (d, size) in entries.iter().zip(sizes) {
            if count <= self.limits.max_entries && bytes <= self.limits.max_bytes {
                break;
            }
            if d == keep {
                continue;
            }
            if fs::remove_dir_all(d).is_ok() {
                dropped.push(d.clone());
            }
            count -= 1;
            bytes = bytes.saturating_sub(size);
        }
        dropped
    }

    /// Entry directories, oldest first.
    pub fn list(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                !e.file_name().to_string_lossy().starts_with(TMP_PREFIX)
                    && e.file_type().is_ok_and(|t| t.is_dir())
            })
            .map(|e| e.path())
            .collect();
        v.sort();
        v
    }

    /// Number of entries waiting.
    pub fn depth(&self) -> usize {
        self.list().len()
    }

    /// Reads an entry back.
    pub fn load(&self, dir: &Path) -> Result<Entry, SpoolError> {
        let mpath = dir.join(MANIFEST);
        let bytes = fs::read(&mpath).map_err(io_err(&mpath))?;
        let manifest = serde_json::from_slice(&bytes).map_err(|source| SpoolError::Manifest {
            path: mpath.clone(),
            source,
        })?;
        Ok(Entry {
            dir: dir.to_owned(),
            manifest,
        })
    }

    /// Removes an entry (done, or unrecoverable).
    pub fn remove(&self, dir: &Path) -> Result<(), SpoolError> {
        match fs::remove_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(dir)(e)),
        }
    }
}

fn dir_size(d: &Path) -> u64 {
    fs::read_dir(d)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use kprof_crds::{ProfileSpec, ProfileType};

    use super::*;

    fn profile(name: &str) -> Profile {
        let t = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).unwrap(),
        );
        let mut p = Profile::new(
            name,
            ProfileSpec {
                target: "t".into(),
                pod: "p".into(),
                container: "c".into(),
                node: "n".into(),
                pids: vec![1],
                runtime: "native".into(),
                profile_type: ProfileType::Cpu,
                window_start: t.clone(),
                window_end: t,
                sample_hz: 99,
                samples: 10,
                lost_samples: 0,
                cpu_cores: 0.5,
                threads: 1,
                top: String::new(),
                top_functions: vec![],
                artifacts: Default::default(),
                time: None,
                thread_summary: None,
                warnings: vec![],
            },
        );
        p.metadata.namespace = Some("ns".into());
        p
    }

    fn art(kind: ArtifactKind, b: &[u8]) -> NewArtifact {
        NewArtifact {
            kind,
            bytes: b.to_vec(),
        }
    }

    /// The Profile names of the spooled entries, oldest first.
    fn names(spool: &Spool) -> Vec<String> {
        let name = |d: &PathBuf| {
            spool
                .load(d)
                .unwrap()
                .manifest
                .profile
                .metadata
                .name
                .unwrap()
        };
        spool.list().iter().map(name).collect()
    }

    #[test]
    fn round_trip_and_order() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = Spool::open(tmp.path(), Limits::default()).unwrap();
        for i in 0..3 {
            spool
                .put(
                    &profile(&format!("p{i}")),
                    vec![
                        art(ArtifactKind::Pprof, b"pb"),
                        art(ArtifactKind::Flamegraph, b"<svg/>"),
                    ],
                )
                .unwrap();
        }
        let list = spool.list();
        assert_eq!(list.len(), 3);
        assert_eq!(names(&spool), ["p0", "p1", "p2"], "oldest first");
        let e = spool.load(&list[0]).unwrap();
        assert_eq!(e.manifest.profile.spec.samples, 10);
        assert_eq!(e.manifest.artifacts.len(), 2);
        let a = &e.manifest.artifacts[0];
        assert_eq!(a.kind, ArtifactKind::Pprof);
        assert_eq!(a.size, 2);
        assert_eq!(a.digest, Digest::of(b"pb").to_string());
        assert_eq!(fs::read(e.artifact_path(a)).unwrap(), b"pb");
        spool.remove(&list[0]).unwrap();
        spool.remove(&list[0]).unwrap(); // idempotent
        assert_eq!(spool.depth(), 2);

        // Reopen (agent restart): entries are still there, half-written ones are not.
        fs::create_dir_all(tmp.path().join(".tmp-half")).unwrap();
        let spool = Spool::open(tmp.path(), Limits::default()).unwrap();
        assert_eq!(spool.depth(), 2);
        assert!(!tmp.path().join(".tmp-half").exists());
    }

    #[test]
    fn bounded_drops_oldest() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = Spool::open(
            tmp.path(),
            Limits {
                max_entries: 2,
                max_bytes: u64::MAX,
            },
        )
        .unwrap();
        let mut dropped = 0;
        for i in 0..4 {
            dropped += spool
                .put(&profile(&format!("p{i}")), vec![])
                .unwrap()
                .dropped
                .len();
        }
        assert_eq!(dropped, 2);
        assert_eq!(names(&spool), ["p2", "p3"]);

        // Byte bound: a big entry pushes older ones out but is itself kept.
        let spool = Spool::open(
            tmp.path(),
            Limits {
                max_entries: 100,
                max_bytes: 10,
            },
        )
        .unwrap();
        let out = spool
            .put(&profile("big"), vec![art(ArtifactKind::Pprof, &[0; 64])])
            .unwrap();
        assert_eq!(out.dropped.len(), 2);
        assert_eq!(spool.depth(), 1);
    }
}
