//! Opening an `object_store` backend from a `--store-url`: S3 (and S3-compatible servers), GCS
//! and Azure Blob through the `object_store` builders' `from_env` (so every `AWS_*`, `GOOGLE_*`,
//! `AZURE_*` variable they know applies, including `AWS_ENDPOINT` and `AWS_ALLOW_HTTP` for MinIO
//! and friends), `file://` and `memory://` as `object_store::parse_url` does.

use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreScheme};

use super::StoreError;

/// The schemes this build accepts, for error messages.
pub const SUPPORTED: &str =
    "s3://, s3a://, gs://, az://, adl://, azure://, abfs[s]://, file://, memory://";

/// The store at `url` and the path inside it that the URL names (the prefix under which
/// artifacts are kept).
pub fn open(url: &str) -> Result<(Arc<dyn ObjectStore>, Path), StoreError> {
    let config = |e: &dyn std::fmt::Display| StoreError::Config(format!("--store-url {url}: {e}"));
    let parsed = url::Url::parse(url).map_err(|e| config(&e))?;
    let (scheme, base) = ObjectStoreScheme::parse(&parsed).map_err(|e| {
        config(&format!(
            "{e} (this build supports {SUPPORTED}; see docs/store.md)"
        ))
    })?;
    let store: Arc<dyn ObjectStore> = match scheme {
        ObjectStoreScheme::AmazonS3 => {
            install_tls_provider();
            let s = AmazonS3Builder::from_env().with_url(url).build();
            Arc::new(s.map_err(|e| config(&e))?)
        }
        ObjectStoreScheme::GoogleCloudStorage => {
            install_tls_provider();
            let s = GoogleCloudStorageBuilder::from_env().with_url(url).build();
            Arc::new(s.map_err(|e| config(&e))?)
        }
        ObjectStoreScheme::MicrosoftAzure => {
            install_tls_provider();
            let s = MicrosoftAzureBuilder::from_env().with_url(url).build();
            Arc::new(s.map_err(|e| config(&e))?)
        }
        ObjectStoreScheme::Local | ObjectStoreScheme::Memory => {
            let (s, _) = object_store::parse_url(&parsed).map_err(|e| config(&e))?;
            Arc::from(s)
        }
        other => {
            return Err(config(&format!(
                "{other:?} is not supported (this build supports {SUPPORTED}; see docs/store.md)"
            )));
        }
    };
    Ok((store, base))
}

/// reqwest is built without a bundled crypto provider (its default, aws-lc-rs, is a C/cmake
/// build); make ring, which rustls already uses for the Kubernetes client, the process default.
/// Installing twice is harmless (the first one stays).
pub(crate) fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Logs how many CA certificates the system offers the https clients of cloud stores and
/// exporters (reqwest verifies against them: SSL_CERT_FILE, SSL_CERT_DIR, else the usual
/// /etc/ssl paths), and warns when there are none: every https call would then fail.
pub fn log_system_trust() {
    let found = rustls_native_certs::load_native_certs();
    let errors = found.errors.len();
    match found.certs.len() {
        0 => tracing::warn!(
            errors,
            "no CA certificates found (SSL_CERT_FILE, SSL_CERT_DIR, /etc/ssl/certs): https to cloud stores and exporters will fail; mount a CA bundle at /etc/ssl/certs/ca-certificates.crt"
        ),
        n => tracing::info!(
            errors,
            "https clients trust {n} CA certificates from the system"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes() {
        assert!(open("memory:///").is_ok());
        let dir = std::env::temp_dir();
        assert!(open(&format!("file://{}", dir.display())).is_ok());
        // Refused with the list of what works.
        let e = open("http://example.invalid/bucket")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not supported") && e.contains("s3://"), "{e}");
        let e = open("ftp://x/y").unwrap_err().to_string();
        assert!(e.contains("s3://"), "{e}");
        // A cloud URL builds offline (credentials are only fetched on first use); the bucket and
        // the prefix come from the URL.
        let (s3, base) = open("s3://kprof-bucket/clusters/prod").unwrap();
        assert_eq!(base.as_ref(), "clusters/prod");
        assert!(s3.to_string().contains("kprof-bucket"), "{s3}");
        let (gcs, _) = open("gs://kprof-gcs/p").unwrap();
        assert!(gcs.to_string().contains("kprof-gcs"), "{gcs}");
    }
}
