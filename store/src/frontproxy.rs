//! Who is reading: the API server's front proxy and the user it vouches for.
//!
//! kube-apiserver authenticates and authorizes the user, then proxies the request to the
//! aggregated API over TLS with its front-proxy client certificate and the user in
//! `X-Remote-User` / `X-Remote-Group` / `X-Remote-Extra-*`. Those headers are believed only on a
//! connection whose client certificate chains to the request-header CA and whose common name is
//! an allowed name, both published by the API server in the
//! `kube-system/extension-apiserver-authentication` ConfigMap.
//!
//! Both that CA and the store's serving certificate rotate: [`keep_fresh`] re-reads them and
//! hands new connections the [`Trust`] built from what is current, without a restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use super::StoreError;

const AUTH_CONFIGMAP_NS: &str = "kube-system";
const AUTH_CONFIGMAP: &str = "extension-apiserver-authentication";

/// The request-header settings of the API server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontProxy {
    /// PEM of the CA that signs the front proxy's client certificate.
    pub client_ca_pem: String,
    /// Common names a front-proxy certificate may have; empty: any name that CA signed.
    pub allowed_names: Vec<String>,
    pub username_headers: Vec<String>,
    pub group_headers: Vec<String>,
    pub extra_headers_prefixes: Vec<String>,
}

/// What the API listener trusts and shows now: the request-header settings, and the TLS
/// configuration built from them and the serving certificate.
#[derive(Clone, Debug)]
pub struct Trust {
    pub front_proxy: Arc<FrontProxy>,
    pub tls: Arc<rustls::ServerConfig>,
    /// The upload listener's: the same certificate, no client certificates asked for.
    pub upload_tls: Arc<rustls::ServerConfig>,
}

/// The [`Trust`] in force, for each new connection and request.
pub type TrustWatch = tokio::sync::watch::Receiver<Trust>;

/// Where the [`Trust`] comes from, and what it was built from last.
pub struct TrustSource {
    client: Client,
    cert_file: PathBuf,
    key_file: PathBuf,
    built_from: Option<(FrontProxy, Vec<u8>, Vec<u8>)>,
}

impl TrustSource {
    pub fn new(client: Client, cert_file: PathBuf, key_file: PathBuf) -> Self {
        Self {
            client,
            cert_file,
            key_file,
            built_from: None,
        }
    }

    /// Reads the settings and the serving certificate; a new [`Trust`] when they changed since
    /// the last call (always on the first).
    pub async fn read(&mut self) -> Result<Option<Trust>, StoreError> {
        let fp = FrontProxy::from_cluster(&self.client).await?;
        let file = |p: &Path| {
            std::fs::read(p).map_err(|e| StoreError::Config(format!("{}: {e}", p.display())))
        };
        let (cert, key) = (file(&self.cert_file)?, file(&self.key_file)?);
        let current = (fp, cert, key);
        if self.built_from.as_ref() == Some(&current) {
            return Ok(None);
        }
        let tls = current.0.tls_config(&self.cert_file, &self.key_file)?;
        let upload_tls = serving_only_tls(&self.cert_file, &self.key_file)?;
        let trust = Trust {
            front_proxy: Arc::new(current.0.clone()),
            tls: Arc::new(tls),
            upload_tls: Arc::new(upload_tls),
        };
        self.built_from = Some(current);
        Ok(Some(trust))
    }
}

/// Re-reads the trust every `interval` and publishes it when it changed. A failed read keeps
/// the trust in force (logged): a rotation half done, or the API server away for a moment.
pub async fn keep_fresh(
    mut source: TrustSource,
    publish: tokio::sync::watch::Sender<Trust>,
    interval: Duration,
) {
    loop {
        tokio::time::sleep(interval).await;
        match source.read().await {
            Ok(Some(trust)) => {
                tracing::info!(
                    "the front-proxy CA or the serving certificate changed: new connections use them"
                );
                publish.send_replace(trust);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "re-reading the front-proxy CA and serving certificate")
            }
        }
    }
}

/// The serving certificate chain and key from their PEM files.
fn serving_certificate(
    cert_file: &Path,
    key_file: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), StoreError> {
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| StoreError::Config(format!("{}: {e}", cert_file.display())))?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| StoreError::Config(format!("{}: {e}", key_file.display())))?;
    Ok((certs, key))
}

/// TLS with the serving certificate only (the upload listener: uploaders prove who they are
/// with a token, not a certificate).
fn serving_only_tls(cert_file: &Path, key_file: &Path) -> Result<rustls::ServerConfig, StoreError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let (certs, key) = serving_certificate(cert_file, key_file)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| StoreError::Config(format!("serving certificate: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A user the API server has authenticated and authorized for the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// What the TLS layer learnt about a connection's peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// A client certificate from the request-header CA with an allowed common name.
    FrontProxy,
    /// No certificate, or one whose common name is not allowed.
    Unverified(String),
}

impl FrontProxy {
    /// Read the settings from `kube-system/extension-apiserver-authentication` (the operator
    /// needs the `extension-apiserver-authentication-reader` Role there).
    pub async fn from_cluster(client: &Client) -> Result<Self, StoreError> {
        let cm = Api::<ConfigMap>::namespaced(client.clone(), AUTH_CONFIGMAP_NS)
            .get(AUTH_CONFIGMAP)
            .await?;
        Self::from_configmap_data(&cm.data.unwrap_or_default())
    }

    fn from_configmap_data(data: &BTreeMap<String, String>) -> Result<Self, StoreError> {
        let list = |key: &str| -> Result<Vec<String>, StoreError> {
            match data.get(key) {
                None => Ok(Vec::new()),
                Some(v) => serde_json::from_str(v)
                    .map_err(|e| StoreError::Config(format!("{AUTH_CONFIGMAP} {key}: {e}"))),
            }
        };
        let client_ca_pem = data
            .get("requestheader-client-ca-file")
            .filter(|v| !v.trim().is_empty())
            .cloned()
            .ok_or_else(|| {
                StoreError::Config(format!(
                    "{AUTH_CONFIGMAP_NS}/{AUTH_CONFIGMAP} has no requestheader-client-ca-file: \
                     the API server runs without --requestheader-client-ca-file (no aggregation layer)"
                ))
            })?;
        let or_default = |v: Vec<String>, d: &str| if v.is_empty() { vec![d.into()] } else { v };
        Ok(Self {
            client_ca_pem,
            allowed_names: list("requestheader-allowed-names")?,
            username_headers: or_default(list("requestheader-username-headers")?, "X-Remote-User"),
            group_headers: or_default(list("requestheader-group-headers")?, "X-Remote-Group"),
            extra_headers_prefixes: or_default(
                list("requestheader-extra-headers-prefix")?,
                "X-Remote-Extra-",
            ),
        })
    }

    /// The TLS server configuration: our serving certificate, and client certificates verified
    /// against the request-header CA when offered (a client without one still connects, and is
    /// then refused with a 401 rather than a handshake error).
    pub fn tls_config(
        &self,
        cert_file: &Path,
        key_file: &Path,
    ) -> Result<rustls::ServerConfig, StoreError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.client_ca_pem.as_bytes()) {
            let cert = cert.map_err(|e| StoreError::Config(format!("request-header CA: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| StoreError::Config(format!("request-header CA: {e}")))?;
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| StoreError::Config(format!("request-header CA: {e}")))?;
        let (certs, key) = serving_certificate(cert_file, key_file)?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| StoreError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| StoreError::Config(format!("serving certificate: {e}")))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    /// Classify a connection by the certificate chain rustls has already verified.
    pub fn peer(&self, certs: Option<&[CertificateDer<'_>]>) -> Peer {
        let Some(leaf) = certs.and_then(|c| c.first()) else {
            return Peer::Unverified("no client certificate".into());
        };
        let cn = match x509_parser::parse_x509_certificate(leaf.as_ref()) {
            Ok((_, cert)) => cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .unwrap_or_default()
                .to_string(),
            Err(e) => return Peer::Unverified(format!("unreadable client certificate: {e}")),
        };
        if self.allowed_names.is_empty() || self.allowed_names.contains(&cn) {
            Peer::FrontProxy
        } else {
            Peer::Unverified(format!(
                "client certificate {cn:?} is not an allowed front-proxy name"
            ))
        }
    }

    /// The user the front proxy names in the request headers.
    pub fn user(&self, headers: &HeaderMap) -> Option<User> {
        let first = |names: &[String]| {
            names.iter().find_map(|n| {
                headers
                    .get(n.as_str())
                    .and_then(|v| v.to_str().ok())
                    .filter(|v| !v.is_empty())
                    .map(str::to_string)
            })
        };
        let name = first(&self.username_headers)?;
        let groups = self
            .group_headers
            .iter()
            .flat_map(|n| headers.get_all(n.as_str()))
            .filter_map(|v| v.to_str().ok())
            .map(str::to_string)
            .collect();
        let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (k, v) in headers {
            let key = k.as_str();
            let Some(rest) = self.extra_headers_prefixes.iter().find_map(|p| {
                let p = p.to_ascii_lowercase();
                key.strip_prefix(p.as_str()).map(str::to_string)
            }) else {
                continue;
            };
            // Extra keys are percent-encoded in header names (kubernetes/kubernetes#63682).
            let rest: String = form_urlencoded::parse(format!("k={rest}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or(rest);
            if let Ok(v) = v.to_str() {
                extra.entry(rest).or_default().push(v.to_string());
            }
        }
        Some(User {
            name,
            groups,
            extra,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn configmap_without_request_header_ca_is_an_error() {
        let err = FrontProxy::from_configmap_data(&data(&[("client-ca-file", "x")])).unwrap_err();
        assert!(
            err.to_string().contains("requestheader-client-ca-file"),
            "{err}"
        );
    }

    #[test]
    fn user_headers_as_configured() {
        let fp = FrontProxy::from_configmap_data(&data(&[
            ("requestheader-client-ca-file", "PEM"),
            ("requestheader-allowed-names", "[\"front-proxy-client\"]"),
            ("requestheader-username-headers", "[\"X-Remote-User\"]"),
            ("requestheader-group-headers", "[\"X-Remote-Group\"]"),
            (
                "requestheader-extra-headers-prefix",
                "[\"X-Remote-Extra-\"]",
            ),
        ]))
        .unwrap();
        assert_eq!(fp.allowed_names, ["front-proxy-client"]);
        let mut h = HeaderMap::new();
        assert_eq!(fp.user(&h), None, "no user header: nobody");
        h.insert("x-remote-user", "alice".parse().unwrap());
        h.append("x-remote-group", "dev".parse().unwrap());
        h.append("x-remote-group", "system:authenticated".parse().unwrap());
        h.insert(
            "x-remote-extra-authentication.kubernetes.io%2fnode-name",
            "n1".parse().unwrap(),
        );
        let u = fp.user(&h).unwrap();
        assert_eq!(u.name, "alice");
        assert_eq!(u.groups, ["dev", "system:authenticated"]);
        assert_eq!(
            u.extra["authentication.kubernetes.io/node-name"],
            vec!["n1".to_string()]
        );
    }

    #[test]
    fn only_allowed_names_are_the_front_proxy() {
        let ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = ca;
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let client = |cn: &str| {
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name
                .push(rcgen::DnType::CommonName, cn.to_string());
            let k = rcgen::KeyPair::generate().unwrap();
            p.signed_by(&k, &issuer).unwrap().der().clone()
        };
        let fp = FrontProxy {
            client_ca_pem: ca_cert.pem(),
            allowed_names: vec!["front-proxy-client".into()],
            username_headers: vec!["X-Remote-User".into()],
            group_headers: vec![],
            extra_headers_prefixes: vec![],
        };
        assert_eq!(
            fp.peer(Some(&[client("front-proxy-client")])),
            Peer::FrontProxy
        );
        assert!(matches!(
            fp.peer(Some(&[client("mallory")])),
            Peer::Unverified(_)
        ));
        assert!(matches!(fp.peer(None), Peer::Unverified(_)));
        let any = FrontProxy {
            allowed_names: vec![],
            ..fp
        };
        assert_eq!(any.peer(Some(&[client("anyone")])), Peer::FrontProxy);
    }
}
