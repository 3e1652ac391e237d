//! `crdgen write DIR...` writes the CRD YAML generated from the API types (`make crds` passes
//! `crds/` and `charts/kprof/crds/`); `crdgen check FILE...` validates kprof objects against
//! that schema the way the API server would, and prints why a bad one would be refused.

use std::{path::PathBuf, process::ExitCode};

use kprof_crds::{Profile, ProfilingTarget, validate::violations};
use serde::Deserialize;
use serde_json::Value;

const USAGE: &str = "usage: crdgen write DIR...   write profilingtargets.yaml and profiles.yaml into each DIR\n       crdgen check FILE...  validate ProfilingTarget/Profile YAML against the generated schema";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let command = args.next();
    let paths: Vec<PathBuf> = args.map(PathBuf::from).collect();
    match (command.as_deref(), paths.is_empty()) {
        (Some("write"), false) => write(&paths),
        (Some("check"), false) => check(&paths),
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn write(dirs: &[PathBuf]) -> ExitCode {
    let manifests = match kprof_crds::crd_manifests() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("crdgen: cannot render the CRDs: {e}");
            return ExitCode::FAILURE;
        }
    };
    for dir in dirs {
        for m in &manifests {
            let path = dir.join(m.file_name);
            if let Err(e) =
                std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, &m.yaml))
            {
                eprintln!("crdgen: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            println!("wrote {}", path.display());
        }
    }
    ExitCode::SUCCESS
}

fn check(files: &[PathBuf]) -> ExitCode {
    let mut refused = 0;
    for file in files {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("crdgen: cannot read {}: {e}", file.display());
                return ExitCode::FAILURE;
            }
        };
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let object = match Value::deserialize(doc) {
                Ok(Value::Null) => continue,
                Ok(v) => v,
                Err(e) => {
                    println!("{}: not YAML: {e}", file.display());
                    refused += 1;
                    continue;
                }
            };
            let name = object["metadata"]["name"]
                .as_str()
                .unwrap_or("<unnamed>")
                .to_owned();
            let problems = match object["kind"].as_str() {
                Some("ProfilingTarget") => violations::<ProfilingTarget>(&object, None),
                Some("Profile") => violations::<Profile>(&object, None),
                other => {
                    println!(
                        "{}: {name}: not a kprof object (kind {other:?})",
                        file.display()
                    );
                    refused += 1;
                    continue;
                }
            };
            if problems.is_empty() {
                println!("{}: {name}: valid", file.display());
            } else {
                refused += 1;
                for p in problems {
                    println!("{}: {name}: refused: {p}", file.display());
                }
            }
        }
    }
    if refused == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
