//! The API as users meet it: the examples they copy parse with the documented defaults, survive
//! a round trip, and pass the generated schema; bad specs are refused with a message that names
//! the field; the committed CRD YAML is what the types generate.

use std::{fs, path::Path};

use kprof_crds::validate::{open_api_schema, violations};
use kprof_crds::{Phase, Profile, ProfileType, ProfilingTarget, ProfilingTargetStatus};
use kube::CustomResourceExt;
use serde_json::Value;

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn yaml_files(dir: &str) -> Vec<(String, Value)> {
    let mut files: Vec<_> = fs::read_dir(crate_dir().join(dir))
        .unwrap_or_else(|e| panic!("reading {dir}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text = fs::read_to_string(&p).unwrap();
            let value: Value = serde_yaml::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not YAML: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), value)
        })
        .collect()
}

fn schema_errors<K>(object: &Value, old: Option<&Value>) -> Vec<String>
where
    K: kube::CustomResourceExt + serde::Serialize + serde::de::DeserializeOwned,
{
    violations::<K>(object, old)
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn minimal_target_gets_the_documented_defaults() {
    let t: ProfilingTarget = serde_yaml::from_str(
        &fs::read_to_string(crate_dir().join("examples/minimal.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(t.spec.profile_types, vec![ProfileType::Cpu]);
    assert_eq!(t.spec.sample_hz, 99);
    assert_eq!(t.spec.window.as_str(), "30s");
    assert_eq!(t.spec.window.to_std().unwrap().as_secs(), 30);
    assert_eq!(t.spec.duration, None);
    assert!(!t.spec.suspend);
    assert!(t.spec.containers.is_empty());
    assert_eq!(t.spec.retention.max_profiles, 20);
    assert_eq!(
        t.spec.retention.max_age.to_std().unwrap().as_secs(),
        24 * 3600
    );
    assert!(t.status.is_none());
}

#[test]
fn examples_round_trip_and_keep_what_the_user_wrote() {
    let examples = yaml_files("examples");
    assert!(
        examples.len() >= 3,
        "crds/examples should hold the targets users copy"
    );
    for (name, raw) in examples {
        let parsed: ProfilingTarget =
            serde_json::from_value(raw.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let written = serde_json::to_value(&parsed).unwrap();
        let again: ProfilingTarget = serde_json::from_value(written.clone()).unwrap();
        assert_eq!(parsed, again, "{name}: round trip changed the object");
        // Every field the user wrote comes back unchanged (durations are not normalised).
        for (key, value) in raw["spec"].as_object().unwrap() {
            assert_eq!(
                &written["spec"][key], value,
                "{name}: spec.{key} changed in a round trip"
            );
        }
    }
}

#[test]
fn examples_pass_the_generated_schema_after_defaulting() {
    for (name, raw) in yaml_files("examples") {
        let errors = schema_errors::<ProfilingTarget>(&raw, None);
        assert!(errors.is_empty(), "{name}: {errors:?}");
    }
}

#[test]
fn bad_targets_are_refused_with_a_message_naming_the_field() {
    let expected = [
        (
            "duplicate-types.yaml",
            "profileTypes must not list a type twice",
        ),
        (
            "duration-shorter-than-window.yaml",
            "spec.duration must be at least one spec.window",
        ),
        ("empty-selector.yaml", "spec.selector must not be empty"),
        ("sample-hz-too-high.yaml", "/spec/sampleHz"),
        ("unknown-type.yaml", "/spec/profileTypes/0"),
        ("window-not-a-duration.yaml", "/spec/window"),
        (
            "window-too-long.yaml",
            "spec.window must be between 5s and 1h",
        ),
        (
            "window-too-short.yaml",
            "spec.window must be between 5s and 1h",
        ),
    ];
    let files = yaml_files("tests/invalid");
    assert_eq!(
        files.len(),
        expected.len(),
        "every invalid example needs an expected message"
    );
    for (name, raw) in files {
        let (_, want) = expected.iter().find(|(f, _)| *f == name).unwrap();
        let errors = schema_errors::<ProfilingTarget>(&raw, None);
        assert!(
            errors.iter().any(|e| e.contains(want)),
            "{name}: expected an error containing {want:?}, got {errors:?}"
        );
    }
}

#[test]
fn profile_spec_is_immutable() {
    let profile = serde_json::json!({
        "apiVersion": "kprof.io/v1alpha1", "kind": "Profile",
        "metadata": {"name": "checkout-7d9-app-cpu-1", "namespace": "shop"},
        "spec": {
            "target": "checkout", "pod": "checkout-7d9", "container": "app", "node": "node-1",
            "runtime": "cpython 3.12.1", "profileType": "cpu",
            "windowStart": "2026-11-24T10:00:00Z", "windowEnd": "2026-11-24T10:00:30Z",
            "sampleHz": 99, "samples": 2970, "top": "app.handle 41.2%",
            "topFunctions": [{"function": "app.handle", "location": "app.py:42",
                              "selfPercent": 41.2, "totalPercent": 88.0}],
            "artifacts": {"pprof": {"url": "file:///var/lib/kprof/a.pb.gz",
                                    "digest": "sha256:00", "sizeBytes": 1234}}
        }
    });
    let parsed: Profile = serde_json::from_value(profile.clone()).unwrap();
    assert_eq!(
        parsed.spec.top_functions[0].location.as_deref(),
        Some("app.py:42")
    );
    assert!(schema_errors::<Profile>(&profile, None).is_empty());
    assert!(schema_errors::<Profile>(&profile, Some(&profile)).is_empty());
    let mut changed = profile.clone();
    changed["spec"]["samples"] = 1.into();
    let errors = schema_errors::<Profile>(&changed, Some(&profile));
    assert!(errors.iter().any(|e| e.contains("immutable")), "{errors:?}");
}

#[test]
fn crds_carry_names_columns_and_rules_from_the_design() {
    let pt = ProfilingTarget::crd();
    assert_eq!(pt.spec.group, "kprof.io");
    assert_eq!(
        pt.spec.names.short_names.as_deref(),
        Some(&["pt".to_string()][..])
    );
    let columns: Vec<_> = pt.spec.versions[0]
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.to_uppercase())
        .collect();
    assert_eq!(
        columns,
        ["PHASE", "PODS", "NODES", "PROFILES", "LAST", "AGE"]
    );
    assert!(
        pt.spec.versions[0]
            .subresources
            .as_ref()
            .unwrap()
            .status
            .is_some()
    );

    let prof = Profile::crd();
    assert_eq!(
        prof.spec.names.short_names.as_deref(),
        Some(&["prof".to_string()][..])
    );
    let columns: Vec<_> = prof.spec.versions[0]
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.to_uppercase())
        .collect();
    // THREADS: the thread count (#18; for threads Profiles, alive at the window's end). HEAP:
    // memory Profiles' anonymous resident memory at the window's end (#17).
    assert_eq!(
        columns,
        [
            "TARGET", "POD", "TYPE", "SAMPLES", "THREADS", "HEAP", "TOP", "AGE"
        ]
    );

    let schema = serde_json::to_string(&open_api_schema::<ProfilingTarget>()).unwrap();
    for rule in [
        "duration(self) >= duration('5s')",
        "exists_one",
        "matchLabels",
        "duration(self.window)",
    ] {
        assert!(
            schema.contains(rule),
            "CEL rule with {rule:?} missing from the schema"
        );
    }
    let schema = serde_json::to_string(&open_api_schema::<Profile>()).unwrap();
    assert!(schema.contains("self == oldSelf"));
}

#[test]
fn status_serialises_without_empty_noise() {
    let status = ProfilingTargetStatus {
        phase: Some(Phase::Running),
        matched_pods: 2,
        ..Default::default()
    };
    let v = serde_json::to_value(&status).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"phase": "Running", "matchedPods": 2, "profilesWritten": 0})
    );
}

#[test]
fn committed_crd_yaml_matches_the_types() {
    let generated = kprof_crds::crd_manifests().unwrap();
    for dir in ["crds", "charts/kprof/crds"] {
        for m in &generated {
            let path = crate_dir().parent().unwrap().join(dir).join(m.file_name);
            let committed = fs::read_to_string(&path).unwrap_or_default();
            assert!(
                committed == m.yaml,
                "{} is not what the API types generate: run `make crds` and commit the result",
                path.display()
            );
        }
    }
}
