//! The Helm chart on the test bed, as the journey tests install it, and the demo's Python shop
//! profiled under it.
use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use kprof_crds::{Profile, labels};
use kube::{
    Api,
    api::{ListParams, PostParams},
};

use crate::{TestNamespace, poll_until};

/// Where the chart installs kprof, and its release name (as `make demo` does).
pub const SYSTEM_NS: &str = "kprof-system";
pub const RELEASE: &str = "kprof";
/// The demo shop's image (`build_python_image(SHOP_IMAGE, repo().join("e2e/demo/shop"))`).
pub const SHOP_IMAGE: &str = "kprof/demo-shop:dev";

/// The repository's root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ is inside the repository")
        .to_path_buf()
}

/// Runs a command with the test bed's tools; returns stdout, or fails with stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// `helm ARGS` against the test bed, from the repository's root.
pub fn helm(args: &[&str]) -> Command {
    let mut cmd = Command::new(crate::k8s_bin_dir().join("helm"));
    cmd.env("KUBECONFIG", crate::kubeconfig_path())
        .args(args)
        .current_dir(repo());
    cmd
}

/// kprof's version: the chart's version and appVersion, and the images' tag.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The tag of the images the chart installs: `KPROF_IMAGE_TAG` (e2e/cluster-tests.sh sets
/// `VERSION-debug` for `KPROF_DEBUG_IMAGES=1`), else the release images' `VERSION`.
pub fn image_tag() -> String {
    std::env::var("KPROF_IMAGE_TAG").unwrap_or_else(|_| VERSION.to_owned())
}

/// An image `e2e/testbed/build-images.sh` built (and imported into the test bed).
pub struct BuiltImage {
    /// The OCI archive in `target/images/`.
    pub archive: PathBuf,
    /// The image id (`sha256:` of its config), as the CRI reports an imported image.
    pub id: String,
    /// The manifest's digest, as the CRI reports an image pulled from a registry.
    pub manifest: String,
}

impl BuiltImage {
    /// Whether the CRI's `imageID` of a container names this image.
    pub fn is(&self, image_id: &str) -> bool {
        image_id.ends_with(&self.id) || image_id.ends_with(&self.manifest)
    }
}

/// The image `ghcr.io/kprof/NAME:TAG` of [`image_tag`] that `make images` built.
pub fn built_image(name: &str) -> Result<BuiltImage> {
    let tag = image_tag();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"));
    let archive = target.join(format!("images/{name}-{tag}.oci.tar"));
    let id_file = archive.with_extension("tar.id");
    let ids = std::fs::read_to_string(&id_file)
        .with_context(|| format!("reading {} (make images)", id_file.display()))?;
    let mut ids = ids.lines();
    let (Some(id), Some(manifest)) = (ids.next(), ids.next()) else {
        bail!("{}: an image id and a manifest digest", id_file.display());
    };
    Ok(BuiltImage {
        id: id.to_owned(),
        manifest: manifest.to_owned(),
        archive,
    })
}

/// The packaged chart `target/chart/kprof-VERSION.tgz`: `KPROF_CHART_PACKAGE` when
/// e2e/cluster-tests.sh made it, else packaged now (`make chart`).
pub fn chart_package() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("KPROF_CHART_PACKAGE") {
        return Ok(PathBuf::from(path));
    }
    let out = run(Command::new(repo().join("e2e/testbed/package-chart.sh")).current_dir(repo()))?;
    Ok(PathBuf::from(out.trim()))
}

/// `helm upgrade --install` of the chart in the tree with the test bed's values and `extra`
/// arguments.
pub fn install(extra: &[&str]) -> Result<String> {
    install_chart("charts/kprof", extra)
}

/// `helm upgrade --install` of the packaged chart (as a cluster admin installs a release) with
/// the test bed's values and `extra` arguments.
pub fn install_package(extra: &[&str]) -> Result<String> {
    let package = chart_package()?;
    let package = package
        .to_str()
        .context("chart package path is not UTF-8")?;
    install_chart(package, extra)
}

fn install_chart(chart: &str, extra: &[&str]) -> Result<String> {
    apply_crds(chart)?;
    let tag = image_tag();
    let operator_tag = format!("operator.image.tag={tag}");
    let agent_tag = format!("agent.image.tag={tag}");
    let mut args = vec![
        "upgrade",
        "--install",
        RELEASE,
        chart,
        "-n",
        SYSTEM_NS,
        "--create-namespace",
        "--wait",
        "--timeout",
        "3m",
        "-f",
        "e2e/demo/testbed-values.yaml",
        "--set",
        &operator_tag,
        "--set",
        &agent_tag,
    ];
    args.extend_from_slice(extra);
    run(&mut helm(&args))
}

/// Applies the chart's CRDs, as the README tells a cluster admin to before an upgrade: Helm
/// installs a chart's CRDs only when they are missing and never updates them, so a cluster that
/// had an older kprof would keep an older schema (and the API server would drop new fields).
pub fn apply_crds(chart: &str) -> Result<()> {
    let crds = run(&mut helm(&["show", "crds", chart]))?;
    let out = kubectl_apply_args(&crds, &["--server-side", "--force-conflicts"])?;
    ensure!(
        out.status.success(),
        "applying the chart's CRDs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `helm uninstall` of the release, waiting for its objects to go.
pub fn uninstall() -> Result<String> {
    run(&mut helm(&[
        "uninstall",
        RELEASE,
        "-n",
        SYSTEM_NS,
        "--wait",
        "--timeout",
        "2m",
    ]))
}

/// `kubectl apply -f -` of `yaml`.
pub fn kubectl_apply(yaml: &str) -> std::io::Result<std::process::Output> {
    kubectl_apply_args(yaml, &[])
}

/// `kubectl apply -f - ARGS` of `yaml`.
pub fn kubectl_apply_args(yaml: &str, args: &[&str]) -> std::io::Result<std::process::Output> {
    use std::io::Write;
    let mut child = crate::kubectl()
        .args(["apply", "-f", "-"])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(yaml.as_bytes())?;
    child.wait_with_output()
}

/// The demo shop (`e2e/demo/shop.yaml`) in `ns`, on a port of its own (the pods share the
/// host's network, where a `make demo` shop may hold 8765).
pub async fn create_shop(ns: &TestNamespace) -> Result<()> {
    let port = crate::free_port()?.to_string();
    let shop = std::fs::read_to_string(repo().join("e2e/demo/shop.yaml"))?
        .replace("kprof-demo", ns.name())
        .replace("8765", &port)
        // The shop does not handle SIGTERM: without this, deleting its namespace waits out the
        // default 30 s grace period, whatever kprof does.
        .replace(
            "      hostNetwork: true",
            "      hostNetwork: true\n      terminationGracePeriodSeconds: 1",
        );
    let deployments: Api<Deployment> = ns.api();
    deployments
        .create(&PostParams::default(), &serde_yaml::from_str(&shop)?)
        .await?;
    Ok(())
}

/// [`create_shop`] and the demo's target for it, with 5 s windows.
pub async fn start_shop(ns: &TestNamespace) -> Result<()> {
    create_shop(ns).await?;
    let target = std::fs::read_to_string(repo().join("e2e/demo/target.yaml"))?
        .replace("kprof-demo", ns.name())
        .replace("window: 10s", "window: 5s");
    let out = kubectl_apply(&target)?;
    ensure!(
        out.status.success(),
        "target refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The shop target's CPU Profiles.
pub fn shop_cpu_selector() -> ListParams {
    ListParams::default().labels(&format!(
        "{}=shop,{}=cpu",
        labels::TARGET,
        labels::PROFILE_TYPE
    ))
}

/// The first CPU Profile of the shop with samples, checked to have the shop's own Python
/// functions on top.
pub async fn shop_cpu_profile(profiles: &Api<Profile>) -> Result<Profile> {
    let by_target = shop_cpu_selector();
    let first = poll_until(
        "a CPU Profile of the shop with samples",
        Duration::from_secs(150),
        Duration::from_secs(2),
        || {
            let profiles = profiles.clone();
            let by_target = by_target.clone();
            async move {
                let list = profiles.list(&by_target).await?;
                Ok(list.items.into_iter().find(|p| p.spec.samples > 20))
            }
        },
    )
    .await?;
    let top: Vec<&str> = first
        .spec
        .top_functions
        .iter()
        .take(3)
        .map(|f| f.function.as_str())
        .collect();
    ensure!(
        top.iter()
            .any(|f| f.starts_with("main.price_cart") || f.starts_with("main.render_receipt")),
        "the top functions are not the shop's Python functions: {top:?}"
    );
    Ok(first)
}
