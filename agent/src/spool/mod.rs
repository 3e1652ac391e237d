//! The on-disk spool between a finished window and the API server / profile store.
//!
//! Each entry is one directory `<spool>/<ms since epoch>-<seq>-<profile name>/` with the artifacts
//! (`profile.pb.gz`, `flamegraph.svg`) and `manifest.json` (the Profile object and, per artifact,
//! its file, content type, `sha256:` digest and size). An entry is written under a `.tmp-` name
//! and renamed into place, so a crash never leaves a half entry behind (leftover `.tmp-` dirs
//! are removed at open); files and directories are synced before and after the rename. Entries
//! are taken oldest first; the spool is bounded by entry count and bytes, and when full — or
//! when the disk is — the oldest entries are dropped (logged and counted by the caller).
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
    /// The window's figures as JSON (what `record` writes to `summary.json` for the type).
    Summary,
}

impl ArtifactKind {
    pub fn file_name(self) -> &'static str {
        match self {
            Self::Pprof => "profile.pb.gz",
            Self::Flamegraph => "flamegraph.svg",
            Self::Summary => "summary.json",
        }
    }
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Pprof => "application/vnd.google.protobuf+gzip",
            Self::Flamegraph => "image/svg+xml",
            Self::Summary => "application/json",
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
    /// Oldest entries removed to make room on a full disk.
    pub evicted_for_space: Vec<PathBuf>,
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

    /// Writes one entry atomically and enforces the limits (dropping the oldest entries). On a
    /// full disk the oldest entries are removed until the new one fits: the newest windows are
    /// the ones worth keeping.
    pub fn put(
        &self,
        profile: &Profile,
        artifacts: Vec<NewArtifact>,
    ) -> Result<PutOutcome, SpoolError> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut evicted_for_space = Vec::new();
        let dir = loop {
            match self.write_entry(profile, &artifacts) {
                Ok(dir) => break dir,
                Err(e) if is_out_of_space(&e) => {
                    // An entry that could not fit even in an empty spool evicts nothing.
                    let entries = self.list();
                    if evicted_for_space.is_empty() {
                        let needed: u64 =
                            artifacts.iter().map(|a| a.bytes.len() as u64).sum::<u64>() + 8192;
                        let reclaimable: u64 = entries.iter().map(|d| dir_size(d)).sum();
                        if needed > free_bytes(&self.dir).saturating_add(reclaimable) {
                            return Err(e);
                        }
                    }
                    match entries.into_iter().next() {
                        Some(oldest) if fs::remove_dir_all(&oldest).is_ok() => {
                            evicted_for_space.push(oldest);
                        }
                        _ => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            }
        };
        let dropped = self.enforce_limits(&dir);
        Ok(PutOutcome {
            dir,
            dropped,
            evicted_for_space,
        })
    }

    /// Writes an entry under a temporary name, syncs it and renames it into place; a failed
    /// write leaves nothing behind.
    fn write_entry(
        &self,
        profile: &Profile,
        artifacts: &[NewArtifact],
    ) -> Result<PathBuf, SpoolError> {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) % 1_000_000;
        let name = profile.metadata.name.as_deref().unwrap_or("profile");
        let final_name = format!("{ms:014}-{seq:06}-{name}");
        let tmp = self.dir.join(format!("{TMP_PREFIX}{final_name}"));
        let written = (|| {
            fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
            let mut metas = Vec::new();
            for a in artifacts {
                let path = tmp.join(a.kind.file_name());
                write_synced(&path, &a.bytes)?;
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
            let json =
                serde_json::to_vec_pretty(&manifest).map_err(|source| SpoolError::Manifest {
                    path: mpath.clone(),
                    source,
                })?;
            write_synced(&mpath, &json)?;
            sync_dir(&tmp)
        })();
        if let Err(e) = written {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        // The data is durable before the rename that publishes it, and the rename after it.
        let dir = self.dir.join(&final_name);
        if let Err(e) = fs::rename(&tmp, &dir) {
            let _ = fs::remove_dir_all(&tmp);
            return Err(io_err(&dir)(e));
        }
        sync_dir(&self.dir)?;
        Ok(dir)
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

/// Writes `bytes` to a new file at `path` and syncs it.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), SpoolError> {
    use io::Write as _;
    let mut f = fs::File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Syncs a directory: its entries (a new file, a rename) survive a crash.
fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Bytes free for an unprivileged writer on the file system of `dir` (0 when unknown).
fn free_bytes(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return 0;
    };
    // SAFETY: a valid NUL-terminated path and a zeroed out-parameter.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path.as_ptr(), &mut st) != 0 {
            return 0;
        }
        st.f_bavail.saturating_mul(st.f_frsize)
    }
}

/// Whether the error is a full disk (or quota).
fn is_out_of_space(e: &SpoolError) -> bool {
    matches!(e, SpoolError::Io { source, .. }
        if matches!(source.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)))
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
                memory_summary: None,
                warnings: vec![],
            },
        );
        p.metadata.namespace = Some("ns".into());
        p
    }

    /// A small tmpfs mounted for the test's life (root only).
    struct SmallDisk(tempfile::TempDir);

    impl SmallDisk {
        fn mount(bytes: usize) -> Option<SmallDisk> {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                return None;
            }
            let dir = tempfile::tempdir().ok()?;
            let c = |s: &str| std::ffi::CString::new(s).unwrap();
            let (target, opts) = (c(dir.path().to_str()?), c(&format!("size={bytes}")));
            // SAFETY: valid NUL-terminated strings.
            let r = unsafe {
                libc::mount(
                    c("tmpfs").as_ptr(),
                    target.as_ptr(),
                    c("tmpfs").as_ptr(),
                    0,
                    opts.as_ptr().cast(),
                )
            };
            (r == 0).then_some(SmallDisk(dir))
        }
    }

    impl Drop for SmallDisk {
        fn drop(&mut self) {
            let target = std::ffi::CString::new(self.0.path().to_str().unwrap()).unwrap();
            // SAFETY: a valid NUL-terminated path.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
    }

    #[test]
    fn a_full_disk_evicts_the_oldest_windows_and_keeps_the_newest() {
        let Some(disk) = SmallDisk::mount(96 << 10) else {
            eprintln!(
                "SKIPPED a_full_disk_evicts_the_oldest_windows_and_keeps_the_newest: needs root to mount a small tmpfs (make test runs it as root)"
            );
            return;
        };
        let spool = Spool::open(disk.0.path().join("spool"), Limits::default()).unwrap();
        let (mut evicted, mut written) = (0, Vec::new());
        for i in 0..12 {
            let name = format!("w{i:02}");
            let o = spool
                .put(
                    &profile(&name),
                    vec![art(ArtifactKind::Pprof, &[7; 20 << 10])],
                )
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            evicted += o.evicted_for_space.len();
            written.push(name);
        }
        let left = names(&spool);
        assert!(evicted > 0, "the disk never filled");
        assert_eq!(left.len() + evicted, 12, "{left:?}");
        // The newest windows, in order.
        assert_eq!(left[..], written[12 - left.len()..], "{left:?}");
        for d in spool.list() {
            let e = spool.load(&d).unwrap();
            assert_eq!(
                fs::read(e.artifact_path(&e.manifest.artifacts[0]))
                    .unwrap()
                    .len(),
                20 << 10
            );
        }
        // An entry larger than the disk evicts nothing and leaves nothing half-written.
        let before = names(&spool);
        let err = spool
            .put(
                &profile("huge"),
                vec![art(ArtifactKind::Pprof, &[1; 200 << 10])],
            )
            .unwrap_err();
        assert!(is_out_of_space(&err), "{err}");
        assert_eq!(names(&spool), before);
        let leftovers = fs::read_dir(spool.dir())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(TMP_PREFIX))
            .count();
        assert_eq!(leftovers, 0);
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
