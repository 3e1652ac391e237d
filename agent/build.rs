//! Builds the eBPF programs of `agent/ebpf` for the BPF target with aya-build on the pinned
//! nightly (see `install-toolchain.sh`), into `$OUT_DIR/kprof`.
//!
//! Escape hatch: `AYA_BUILD_SKIP=1` skips the eBPF build (clippy/doc/unit-test lanes without
//! bpf-linker). The agent then compiles with an empty object and `kprof-agent record` reports that
//! the eBPF programs are unavailable.
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, Result};

/// Keep in step with `NIGHTLY` in `install-toolchain.sh`.
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";

fn main() -> Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?);
    let ebpf_dir = manifest_dir.join("ebpf");
    let object = out_dir.join("kprof");
    println!("cargo:rerun-if-env-changed=KPROF_EBPF_TOOLCHAIN");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    println!("cargo:rerun-if-env-changed=KPROF_EBPF_NO_PYTHON");
    println!("cargo:rerun-if-changed={}", ebpf_dir.join("src").display());
    println!(
        "cargo:rerun-if-changed={}",
        ebpf_dir.join("Cargo.toml").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        manifest_dir.join("common/src").display()
    );

    let skip = env::var("AYA_BUILD_SKIP")
        .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
        .unwrap_or(false);
    if skip {
        println!("cargo:warning=AYA_BUILD_SKIP set: building kprof-agent without eBPF programs");
        // An empty object: the loader reports "eBPF programs not built" at run time.
        if !object.exists() {
            fs::write(&object, b"").context("write empty eBPF object")?;
        }
        return Ok(());
    }

    let toolchain = env::var("KPROF_EBPF_TOOLCHAIN").unwrap_or_else(|_| EBPF_TOOLCHAIN.to_owned());
    // The eBPF crate is its own workspace (excluded from the root one): run the nested cargo there.
    env::set_current_dir(&ebpf_dir).context("cd agent/ebpf")?;
    let root = ebpf_dir.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "kprof-ebpf",
            root_dir: root,
            // KPROF_EBPF_NO_PYTHON=1: build without the in-kernel CPython walker (baseline).
            no_default_features: env::var("KPROF_EBPF_NO_PYTHON").is_ok_and(|v| v == "1"),
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
    .context(
        "building the eBPF programs failed; run agent/install-toolchain.sh, \
         or set AYA_BUILD_SKIP=1 to build without them",
    )
}
