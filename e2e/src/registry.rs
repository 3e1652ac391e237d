//! A private image registry on this host, as a cluster admin runs one: the CNCF Distribution
//! registry (`e2e/testbed/build-registry.sh`, part of `make deps`) with htpasswd (basic)
//! authentication, on 127.0.0.1 where containerd speaks plain HTTP. The journey pushes the
//! release images to it with skopeo, the README's command, and installs the chart pulling them
//! with an image pull secret.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::{DEFAULT_CACHE_DIR, env_path, free_port};

const BUILD_SCRIPT: &str = include_str!("../testbed/build-registry.sh");

/// A running registry; stopped when dropped.
pub struct Registry {
    child: Child,
    /// `127.0.0.1:PORT`: the registry part of image references.
    pub host: String,
    pub user: String,
    pub password: String,
    _data: tempfile::TempDir,
}

/// The registry binary `build-registry.sh` made, for the version it pins.
pub fn binary() -> PathBuf {
    let version = BUILD_SCRIPT
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("REGISTRY_VERSION=\"${REGISTRY_VERSION:-")
        })
        .and_then(|rest| rest.split('}').next())
        .expect("build-registry.sh pins REGISTRY_VERSION");
    env_path("KPROF_CACHE")
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_DIR))
        .join("registry")
        .join(version)
        .join("bin/registry")
}

impl Registry {
    /// Starts the registry with one user and a random password; waits until it answers.
    pub async fn start(user: &str) -> Result<Self> {
        let bin = binary();
        ensure!(
            bin.is_file(),
            "no registry at {} (run e2e/testbed/build-registry.sh or make deps)",
            bin.display()
        );
        let data = tempfile::tempdir()?;
        let password = format!("pw-{:x}", std::process::id() ^ 0x6b70_726f);
        let hash = bcrypt::hash(&password, 6)?;
        std::fs::write(data.path().join("htpasswd"), format!("{user}:{hash}\n"))?;
        let host = format!("127.0.0.1:{}", free_port()?);
        let config = format!(
            "version: 0.1\nlog: {{level: warn}}\nstorage:\n  filesystem: {{rootdirectory: {store}}}\n\
             http:\n  addr: {host}\nauth:\n  htpasswd: {{realm: kprof-e2e, path: {htpasswd}}}\n",
            store = data.path().join("store").display(),
            htpasswd = data.path().join("htpasswd").display(),
        );
        let config_path = data.path().join("config.yml");
        std::fs::write(&config_path, config)?;
        let child = Command::new(&bin)
            .arg("serve")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut registry = Self {
            child,
            host,
            user: user.to_owned(),
            password,
            _data: data,
        };
        registry.wait_ready().await?;
        Ok(registry)
    }

    /// Waits for `/v2/` to ask for credentials (401): the registry listens with auth on.
    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                let mut err = String::new();
                if let Some(stderr) = self.child.stderr.take() {
                    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                        err.push_str(&line);
                        err.push('\n');
                    }
                }
                bail!("the registry exited ({status}): {err}");
            }
            if let Ok((status, _)) = crate::http_get_bytes(&self.host, "/v2/").await {
                ensure!(
                    status == 401,
                    "the registry answers /v2/ without credentials: {status}"
                );
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!("the registry on {} did not answer in 20 s", self.host)
    }

    /// Pushes an OCI archive (`make images`) as `HOST/repository:tag` with skopeo, the command
    /// the README gives; returns the reference.
    pub fn push(&self, archive: &Path, repository_tag: &str) -> Result<String> {
        let reference = format!("{}/{repository_tag}", self.host);
        crate::chart::run(Command::new("skopeo").args([
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--dest-creds",
            &format!("{}:{}", self.user, self.password),
            &format!("oci-archive:{}", archive.display()),
            &format!("docker://{reference}"),
        ]))
        .context("skopeo copy (apt-get install skopeo, or make deps)")?;
        Ok(reference)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
