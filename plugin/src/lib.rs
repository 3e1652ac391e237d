//! `kubectl kprof`: read profiles with the user's own credentials.
//!
//! The Profile object is read first through the API (RBAC on `profiles.kprof.io`), then its pprof
//! through kprof's aggregated API (`/apis/data.kprof.io/v1alpha1/namespaces/<ns>/profiles/<name>/pprof`:
//! the API server checks RBAC on `profiles/pprof` in that namespace, which the built-in `view`
//! role has) and checked against the Profile's digest. Top tables, flame graphs, diffs and merges
//! are computed locally from the pprof, so each Profile a command reads is authorized on its own.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand, ValueEnum};
use http_body_util::BodyExt;
use kprof_crds::Profile;
use kube::api::ListParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use kprof_crds::store_api::Digest;
use kprof_crds::store_api::{API_PREFIX, GROUP, READ_SUBRESOURCE};
use kprof_pprof::{
    self as pprof,
    views::{self, Stacks, TopReport},
};

/// kubectl kprof: profiles of your pods (top, flame graphs, diffs, merges).
#[derive(Parser, Debug)]
#[command(name = "kubectl-kprof", bin_name = "kubectl kprof", version)]
pub struct Cli {
    /// Namespace of the Profiles (default: the kubeconfig context's).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// Path to the kubeconfig (default: $KUBECONFIG, ~/.kube/config or in-cluster).
    #[arg(long, global = true, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Impersonate this user (like kubectl --as).
    #[arg(long = "as", global = true)]
    pub as_user: Option<String>,
    /// Impersonate this group (like kubectl --as-group; repeatable).
    #[arg(long = "as-group", global = true)]
    pub as_group: Vec<String>,
    /// Which sample value to use (index or type name such as `samples`, `cpu`); default: the
    /// profile's default.
    #[arg(long, global = true)]
    pub sample_index: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Self and total share per function.
    Top {
        profile: String,
        /// Rows to print.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Write an interactive flame graph (SVG).
    Flamegraph {
        profile: String,
        #[arg(short = 'o', long, default_value = "flamegraph.svg")]
        output: PathBuf,
    },
    /// Print the window's figures (JSON): the wall and lock split, the GIL, thread counts and
    /// memory readings over the window.
    Summary { profile: String },
    /// Write the pprof (gzip profile.proto), for `go tool pprof`, speedscope, Pyroscope.
    Pprof {
        profile: String,
        #[arg(short = 'o', long, default_value = "profile.pb.gz")]
        output: PathBuf,
    },
    /// Differential flame graph of B against A, and the functions that grew most.
    Diff {
        /// The "before" profile.
        a: String,
        /// The "after" profile.
        b: String,
        #[arg(short = 'o', long, default_value = "diff.svg")]
        output: PathBuf,
        /// Rows of the growth table.
        #[arg(long, default_value_t = 15)]
        limit: usize,
    },
    /// Merge the Profiles matching a label selector and/or time range into one pprof.
    Merge {
        /// Label selector, e.g. `kprof.io/target=checkout,kprof.io/type=cpu`.
        #[arg(short = 'l', long)]
        selector: Option<String>,
        /// Only profiles whose window ended within this long ago (Go duration: 30m, 1h, 24h).
        #[arg(long)]
        since: Option<String>,
        /// Explicit profile names (in addition to the selector).
        profiles: Vec<String>,
        #[arg(short = 'o', long, default_value = "merged.pb.gz")]
        output: PathBuf,
        /// Also write a flame graph of the merge.
        #[arg(long)]
        flamegraph: Option<PathBuf>,
        /// Rows of the top table printed for the merge.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Print how to open the web page of a namespace or profile (through `kubectl proxy`).
    Open {
        /// A profile to open directly.
        profile: Option<String>,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

/// Entry point of the `kubectl-kprof` binary: results on stdout.
pub async fn run(cli: Cli) -> Result<()> {
    let mut out = Vec::new();
    let result = run_to(&cli, &mut out).await;
    print!("{}", String::from_utf8_lossy(&out));
    result
}

/// Parse `args` (without the program name) and run, writing what would go to stdout into `out`:
/// the plugin in-process, for tests.
pub async fn run_args(args: &[&str], out: &mut Vec<u8>) -> Result<()> {
    let cli = Cli::try_parse_from(std::iter::once("kubectl-kprof").chain(args.iter().copied()))?;
    run_to(&cli, out).await
}

/// Run `cli`, writing the results into `out`.
pub async fn run_to(cli: &Cli, out: &mut Vec<u8>) -> Result<()> {
    use std::io::Write as _;
    let client = client(cli).await?;
    let ns = cli
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let k = Kprof { client, ns, cli };
    match &cli.command {
        Command::Top {
            profile,
            limit,
            output,
        } => {
            let (_, stacks) = k.stacks(profile).await?;
            let report = TopReport::new(&stacks, *limit);
            match output {
                Format::Table => write!(out, "{}", report.table())?,
                Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?,
            }
        }
        Command::Flamegraph { profile, output } => {
            let (p, stacks) = k.stacks(profile).await?;
            let svg = views::flamegraph_svg(
                &stacks,
                &format!(
                    "{}/{profile}: {} of {}/{}",
                    k.ns, p.spec.profile_type, p.spec.pod, p.spec.container
                ),
            );
            write(output, &svg)?;
        }
        Command::Summary { profile } => {
            // The store answers 404 "has no summary artifact" for a Profile without one.
            let bytes = k
                .api_get(&format!("/namespaces/{}/profiles/{profile}/summary", k.ns))
                .await?;
            let v: serde_json::Value = serde_json::from_slice(&bytes)
                .with_context(|| format!("the summary of {profile} is not JSON"))?;
            writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        }
        Command::Pprof { profile, output } => {
            let p = k.profile(profile).await?;
            let bytes = k.pprof_bytes(&p).await?;
            write(output, &bytes)?;
        }
        Command::Diff {
            a,
            b,
            output,
            limit,
        } => {
            let (_, before) = k.stacks(a).await?;
            let (_, after) = k.stacks(b).await?;
            write(
                output,
                &views::diff_svg(&before, &after, &format!("{a} → {b}")),
            )?;
            writeln!(
                out,
                "{:>8} {:>8} {:>8}  FUNCTION (self %, grew most first)",
                "BEFORE", "AFTER", "DELTA"
            )?;
            for g in views::growth(&before, &after).iter().take(*limit) {
                writeln!(
                    out,
                    "{:>7.2}% {:>7.2}% {:>+7.2}%  {}",
                    g.before_self_percent, g.after_self_percent, g.delta_percent, g.function
                )?;
            }
        }
        Command::Merge {
            selector,
            since,
            profiles,
            output,
            flamegraph,
            limit,
        } => {
            let names = k
                .select(selector.as_deref(), since.as_deref(), profiles)
                .await?;
            if names.is_empty() {
                bail!(
                    "no Profiles in namespace {} match (selector {selector:?}, since {since:?})",
                    k.ns
                );
            }
            let mut decoded = Vec::new();
            for n in &names {
                let p = k.profile(n).await?;
                let bytes = k.pprof_bytes(&p).await?;
                decoded.push(
                    pprof::Profile::decode_bytes(&bytes)
                        .with_context(|| format!("decoding {n}"))?,
                );
            }
            let merged = pprof::merge::merge(&decoded)?;
            write(output, &merged.encode_gzip())?;
            let idx = merged
                .value_index(k.cli.sample_index.as_deref())
                .ok_or_else(|| anyhow!("no such sample type"))?;
            let stacks = Stacks::from_profile(&merged, idx);
            eprintln!("merged {} profiles: {}", names.len(), names.join(", "));
            if let Some(f) = flamegraph {
                write(
                    f,
                    &views::flamegraph_svg(
                        &stacks,
                        &format!("{}: merge of {} profiles", k.ns, names.len()),
                    ),
                )?;
            }
            write!(out, "{}", TopReport::new(&stacks, *limit).table())?;
        }
        Command::Open { profile } => {
            let base = format!(
                "http://127.0.0.1:8001{API_PREFIX}/namespaces/{}/profiles",
                k.ns
            );
            let url = match profile {
                Some(p) => format!("{base}/{p}/ui"),
                None => base,
            };
            writeln!(
                out,
                "Run `kubectl proxy` (it serves on 127.0.0.1:8001 with your credentials), then open:\n  {url}"
            )?;
        }
    }
    Ok(())
}

fn write(path: &PathBuf, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {} ({} bytes)", path.display(), bytes.len());
    Ok(())
}

/// A kube client like kubectl builds it: --kubeconfig/--context, else the usual inference;
/// --as/--as-group impersonate.
async fn client(cli: &Cli) -> Result<Client> {
    let opts = KubeConfigOptions {
        context: cli.context.clone(),
        ..Default::default()
    };
    let mut config = match &cli.kubeconfig {
        Some(path) if !path.as_os_str().is_empty() => {
            let path = std::env::split_paths(path)
                .next()
                .unwrap_or_else(|| path.clone());
            let kc = Kubeconfig::read_from(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &opts).await?
        }
        _ if cli.context.is_some() => Config::from_kubeconfig(&opts).await?,
        _ => Config::infer()
            .await
            .context("no kubeconfig found (use --kubeconfig)")?,
    };
    if let Some(user) = &cli.as_user {
        config.auth_info.impersonate = Some(user.clone());
    }
    if !cli.as_group.is_empty() {
        config.auth_info.impersonate_groups = Some(cli.as_group.clone());
    }
    config.read_timeout = Some(Duration::from_secs(120));
    Ok(Client::try_from(config)?)
}

struct Kprof<'a> {
    client: Client,
    ns: String,
    cli: &'a Cli,
}

impl Kprof<'_> {
    async fn profile(&self, name: &str) -> Result<Profile> {
        let api: Api<Profile> = Api::namespaced(self.client.clone(), &self.ns);
        api.get(name).await.map_err(|e| match &e {
            kube::Error::Api(s) if s.code == 403 => anyhow!(
                "not allowed to read Profile {}/{name} (403 from the API server): {}",
                self.ns,
                s.message
            ),
            kube::Error::Api(s) if s.code == 404 => anyhow!("Profile {}/{name} not found", self.ns),
            _ => anyhow!("reading Profile {}/{name}: {e}", self.ns),
        })
    }

    /// GET a path of kprof's aggregated API with the user's credentials.
    async fn api_get(&self, path: &str) -> Result<Vec<u8>> {
        let uri = format!("{API_PREFIX}{path}");
        let req = http::Request::get(&uri).body(kube::client::Body::empty())?;
        let res = self
            .client
            .send(req)
            .await
            .with_context(|| format!("GET {uri}"))?;
        let status = res.status();
        let body = res
            .into_body()
            .collect()
            .await
            .map_err(|e| anyhow!("reading {uri}: {e}"))?
            .to_bytes();
        if status.is_success() {
            return Ok(body.to_vec());
        }
        let text = String::from_utf8_lossy(&body);
        let msg = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| {
                v.get("message")
                    .and_then(|m| m.as_str())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| text.trim().to_string());
        match status.as_u16() {
            401 | 403 => bail!(
                "not allowed to read the profile data ({status}): {msg}\n\
                 Reading it needs `get` on `profiles/{READ_SUBRESOURCE}` in API group {GROUP} in \
                 namespace {} (the built-in view, edit and admin roles include it).",
                self.ns
            ),
            404 if msg.contains("the server could not find the requested resource") => bail!(
                "the kprof API ({GROUP}) is not served: is kprof installed? (kubectl get apiservice v1alpha1.{GROUP})"
            ),
            503 | 502 => bail!(
                "the kprof API is not available ({status}): {msg}\n\
                 See `kubectl get apiservice v1alpha1.{GROUP}` and the operator's pods."
            ),
            _ => bail!("{uri}: {status}: {msg}"),
        }
    }

    /// The pprof bytes of a Profile, checked against its digest.
    async fn pprof_bytes(&self, p: &Profile) -> Result<Vec<u8>> {
        let name = p.metadata.name.clone().unwrap_or_default();
        let r = p
            .spec
            .artifacts
            .pprof
            .as_ref()
            .ok_or_else(|| anyhow!("Profile {name} has no pprof artifact (yet)"))?;
        let d = r.content_digest().ok_or_else(|| {
            anyhow!(
                "Profile {name}: pprof artifact {:?} has no sha256 digest",
                r.url
            )
        })?;
        let bytes = self
            .api_get(&format!("/namespaces/{}/profiles/{name}/pprof", self.ns))
            .await?;
        let got = Digest::of(&bytes);
        if got != d {
            bail!("artifact of {name} does not match its digest: expected {d}, got {got}");
        }
        Ok(bytes)
    }

    async fn stacks(&self, name: &str) -> Result<(Profile, Stacks)> {
        let p = self.profile(name).await?;
        let bytes = self.pprof_bytes(&p).await?;
        let prof = pprof::Profile::decode_bytes(&bytes)
            .with_context(|| format!("decoding the pprof of {name}"))?;
        let idx = prof
            .value_index(self.cli.sample_index.as_deref())
            .ok_or_else(|| {
                anyhow!(
                    "no sample type {:?} in {name}; it has {:?}",
                    self.cli.sample_index,
                    prof.sample_types()
                )
            })?;
        Ok((p, Stacks::from_profile(&prof, idx)))
    }

    /// Names of the Profiles to merge: selector and time range, plus explicit names.
    async fn select(
        &self,
        selector: Option<&str>,
        since: Option<&str>,
        explicit: &[String],
    ) -> Result<Vec<String>> {
        let mut names: Vec<String> = explicit.to_vec();
        if selector.is_some() || since.is_some() {
            let cutoff = match since {
                Some(s) => {
                    let d =
                        kprof_crds::parse_duration(s).map_err(|e| anyhow!("--since {s}: {e}"))?;
                    Some(
                        k8s_openapi::jiff::Timestamp::now()
                            - k8s_openapi::jiff::SignedDuration::try_from(d)?,
                    )
                }
                None => None,
            };
            let api: Api<Profile> = Api::namespaced(self.client.clone(), &self.ns);
            let mut lp = ListParams::default();
            if let Some(s) = selector {
                lp = lp.labels(s);
            }
            let mut items = api
                .list(&lp)
                .await
                .with_context(|| format!("listing Profiles in {}", self.ns))?
                .items;
            items.sort_by_key(|p| p.spec.window_end.0);
            for p in items {
                if cutoff.is_some_and(|c| p.spec.window_end.0 < c) {
                    continue;
                }
                let n = p.metadata.name.unwrap_or_default();
                if !names.contains(&n) {
                    names.push(n);
                }
            }
        }
        Ok(names)
    }
}
