//! The CRDs against the real API server: they apply, every example a user would copy passes a
//! server-side dry run, and every bad target in crds/tests/invalid is refused with a message
//! that names the field.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use anyhow::{Context, Result, ensure};
use kprof_e2e::{TestNamespace, require_cluster};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn kubectl_stdin(args: &[&str], input: &str) -> Result<Output> {
    let mut child = kprof_e2e::kubectl()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().unwrap().write_all(input.as_bytes())?;
    Ok(child.wait_with_output()?)
}

/// The YAML files of `dir`, moved into namespace `ns`.
fn manifests_in(dir: &Path, ns: &str) -> Result<Vec<(String, String)>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)?.map(|e| e.unwrap().path()).collect();
    files.sort();
    files
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| {
            let mut doc: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&p)?)?;
            doc["metadata"]["namespace"] = ns.into();
            Ok((
                p.file_name().unwrap().to_string_lossy().into_owned(),
                serde_yaml::to_string(&doc)?,
            ))
        })
        .collect()
}

#[tokio::test]
async fn crds_apply_examples_pass_and_bad_targets_are_refused() -> Result<()> {
    let tb = require_cluster!(Ok(()));
    let out = Command::new(kprof_e2e::k8s_bin_dir().join("kubectl"))
        .env("KUBECONFIG", kprof_e2e::kubeconfig_path())
        .args(["apply", "--server-side", "--force-conflicts", "-f"])
        .arg(repo().join("crds/profilingtargets.yaml"))
        .arg("-f")
        .arg(repo().join("crds/profiles.yaml"))
        .output()
        .context("kubectl apply of the CRDs")?;
    ensure!(
        out.status.success(),
        "the CRDs do not apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = kprof_e2e::kubectl()
        .args(["wait", "--for=condition=Established", "--timeout=60s"])
        .args(["crd/profilingtargets.kprof.io", "crd/profiles.kprof.io"])
        .output()?;
    ensure!(
        out.status.success(),
        "CRDs not established: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let ns = TestNamespace::new(&tb.client, "api").await?;
    let examples = manifests_in(&repo().join("crds/examples"), ns.name())?;
    ensure!(!examples.is_empty(), "no examples in crds/examples");
    for (name, yaml) in examples {
        let out = kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], &yaml)?;
        ensure!(
            out.status.success(),
            "{name} refused: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for (name, yaml) in manifests_in(&repo().join("crds/tests/invalid"), ns.name())? {
        let out = kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], &yaml)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success(),
            "{name} was accepted by the API server"
        );
        ensure!(
            stderr.contains("spec."),
            "{name}: the refusal does not name the field: {stderr}"
        );
        eprintln!("{name}: {}", stderr.trim());
    }
    let out = kprof_e2e::kubectl()
        .args(["get", "profilingtargets,profiles", "-n", ns.name()])
        .output()?;
    ensure!(
        out.status.success(),
        "kubectl get profilingtargets,profiles: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
