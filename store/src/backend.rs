//! Content-addressed artifact storage over the `object_store` crate: a local directory by default
//! (atomic writes: `object_store`'s local backend writes a temporary file and renames it), any
//! `object_store` URL otherwise. Objects live at `artifacts/sha256/<hex>`.

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

pub use kprof_crds::store_api::Digest;

use super::StoreError;

const PREFIX: &str = "artifacts/sha256";

/// An object kept in the store.
#[derive(Clone, Debug)]
pub struct StoredObject {
    pub digest: Digest,
    pub size: u64,
    /// Seconds since the epoch.
    pub last_modified: i64,
}

/// The artifact store.
#[derive(Clone, Debug)]
pub struct Artifacts {
    inner: Arc<dyn ObjectStore>,
    prefix: Path,
    description: String,
}

impl Artifacts {
    /// A store in a local directory (created when missing).
    pub fn local(dir: &std::path::Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Config(format!("creating {}: {e}", dir.display())))?;
        let fs = LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| StoreError::Config(format!("store dir {}: {e}", dir.display())))?;
        Ok(Self {
            inner: Arc::new(fs),
            prefix: Path::from(PREFIX),
            description: format!("directory {}", dir.display()),
        })
    }

    /// A store at an `object_store` URL (`s3://bucket/prefix`, `gs://…`, `az://…`, `file:///…`,
    /// `memory:///`); credentials, region and endpoint come from the environment as the
    /// `object_store` builders' `from_env` reads them (`AWS_*`, `GOOGLE_*`, `AZURE_*`).
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        let (store, base) = super::cloud::open(url)?;
        let prefix = Path::from_iter(base.parts().chain(Path::from(PREFIX).parts()));
        Ok(Self {
            inner: store,
            prefix,
            description: url.to_string(),
        })
    }

    pub fn description(&self) -> &str {
        &self.description
    }

    fn path(&self, d: &Digest) -> Path {
        self.prefix.clone().join(d.hex())
    }

    /// Whether the artifact is present.
    pub async fn exists(&self, d: &Digest) -> Result<bool, StoreError> {
        match self.inner.head(&self.path(d)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(StoreError::Backend(e.to_string())),
        }
    }

    /// Store `bytes` under `d` (atomically; the caller has checked the digest).
    pub async fn put(&self, d: &Digest, bytes: Bytes) -> Result<(), StoreError> {
        self.inner
            .put(&self.path(d), PutPayload::from_bytes(bytes))
            .await
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        Ok(())
    }

    /// The artifact's bytes, `None` when absent.
    pub async fn get(&self, d: &Digest) -> Result<Option<Bytes>, StoreError> {
        match self.inner.get(&self.path(d)).await {
            Ok(r) => Ok(Some(
                r.bytes()
                    .await
                    .map_err(|e| StoreError::Backend(e.to_string()))?,
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(StoreError::Backend(e.to_string())),
        }
    }

    /// Every artifact (name, size, age).
    pub async fn list(&self) -> Result<Vec<StoredObject>, StoreError> {
        let metas: Vec<_> = self
            .inner
            .list(Some(&self.prefix))
            .try_collect()
            .await
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let name = m.location.filename()?;
                let digest = Digest::parse(&format!("sha256:{name}"))?;
                Some(StoredObject {
                    digest,
                    size: m.size,
                    last_modified: m.last_modified.timestamp(),
                })
            })
            .collect())
    }

    /// Remove an artifact (absent is fine).
    pub async fn delete(&self, d: &Digest) -> Result<(), StoreError> {
        match self.inner.delete(&self.path(d)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(StoreError::Backend(e.to_string())),
        }
    }
}

/// The media type of an artifact, sniffed from its first bytes (the local backend keeps no
/// attributes).
pub fn sniff_content_type(bytes: &[u8]) -> &'static str {
    let head = &bytes[..bytes.len().min(512)];
    if head.starts_with(&[0x1f, 0x8b]) {
        "application/gzip"
    } else if head.windows(4).any(|w| w == b"<svg") {
        "image/svg+xml"
    } else if head.first() == Some(&b'{') {
        "application/json"
    } else {
        "application/octet-stream"
    }
}
