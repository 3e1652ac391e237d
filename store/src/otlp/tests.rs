//! The pprof → OTLP conversion keeps what a viewer shows: values per sample type, stacks (leaf
//! first) with function names, files and lines, inlined frames, mappings and labels.

use super::*;
use crate::pprof::{Label, Line, Mapping, synthetic};

/// A Python-like profile plus what `synthetic` lacks: a label, a mapping and an inlined frame.
fn fixture() -> pprof::Profile {
    let mut p = synthetic(
        &[
            (&["main", "app.serve", "app.handle", "checkout.total"], 60),
            (&["main", "app.serve", "selectors.select"], 20),
            (&["main", "app.serve", "app.handle", "json.dumps"], 3),
        ],
        1_700_000_000_000_000_000,
        30_000_000_000,
    );
    let s = |p: &mut pprof::Profile, v: &str| {
        p.string_table.push(v.to_string());
        (p.string_table.len() - 1) as i64
    };
    let (key, value, libc) = (
        s(&mut p, "thread"),
        s(&mut p, "worker-1"),
        s(&mut p, "libc.so.6"),
    );
    p.sample[0].label.push(Label {
        key,
        str: value,
        ..Default::default()
    });
    p.mapping.push(Mapping {
        id: 7,
        memory_start: 0x1000,
        memory_limit: 0x9000,
        filename: libc,
        ..Default::default()
    });
    // The leaf of the hot stack sits in the mapping and has `app.handle` inlined into it.
    let leaf = p.sample[0].location_id[0];
    let handle_fn = p
        .function
        .iter()
        .find(|f| p.str(f.name) == "app.handle")
        .unwrap()
        .id;
    let loc = p.location.iter_mut().find(|l| l.id == leaf).unwrap();
    loc.mapping_id = 7;
    loc.address = 0x1234;
    loc.line.push(Line {
        function_id: handle_fn,
        line: 99,
        column: 0,
    });
    p
}

/// The function names of a stack, leaf first, with inlined frames expanded.
fn frames(d: &otlp::ProfilesDictionary, stack_index: i32) -> Vec<String> {
    let stack = &d.stack_table[stack_index as usize];
    stack
        .location_indices
        .iter()
        .flat_map(|&l| d.location_table[l as usize].lines.iter())
        .map(|ln| {
            let f = &d.function_table[ln.function_index as usize];
            d.string_table[f.name_strindex as usize].clone()
        })
        .collect()
}

fn pprof_frames(p: &pprof::Profile, s: &pprof::Sample) -> Vec<String> {
    s.location_id
        .iter()
        .flat_map(|id| p.location.iter().find(|l| l.id == *id).unwrap().line.iter())
        .map(|ln| {
            let f = p.function.iter().find(|f| f.id == ln.function_id).unwrap();
            p.str(f.name).to_string()
        })
        .collect()
}

#[test]
fn values_stacks_and_names_survive() {
    let p = fixture();
    let pod = key_value(
        "k8s.pod.name",
        any_value::Value::StringValue("checkout-7d9f".into()),
    );
    let req = convert(&p, vec![pod]);
    let d = req.dictionary.as_ref().unwrap();
    // Zero values first in every table.
    assert_eq!(d.string_table[0], "");
    assert_eq!(d.function_table[0], otlp::Function::default());
    assert_eq!(d.location_table[0], otlp::Location::default());
    assert_eq!(d.mapping_table[0], otlp::Mapping::default());
    assert_eq!(d.stack_table[0], otlp::Stack::default());
    assert_eq!(d.link_table.len(), 1);

    let rp = &req.resource_profiles[0];
    let attrs = &rp.resource.as_ref().unwrap().attributes;
    assert_eq!(attrs[0].key, "k8s.pod.name");
    let profiles = &rp.scope_profiles[0].profiles;
    assert_eq!(profiles.len(), 2, "one OTLP profile per pprof sample type");
    let ty = |vt: &otlp::ValueType| {
        format!(
            "{}/{}",
            d.string_table[vt.type_strindex as usize], d.string_table[vt.unit_strindex as usize]
        )
    };
    // pprof's default type (the last: cpu/nanoseconds) comes first.
    assert_eq!(
        ty(profiles[0].sample_type.as_ref().unwrap()),
        "cpu/nanoseconds"
    );
    assert_eq!(
        ty(profiles[1].sample_type.as_ref().unwrap()),
        "samples/count"
    );
    assert_eq!(
        ty(profiles[0].period_type.as_ref().unwrap()),
        "cpu/nanoseconds"
    );
    assert_eq!(profiles[0].period, p.period);
    assert_eq!(profiles[0].time_unix_nano, 1_700_000_000_000_000_000);
    assert_eq!(profiles[0].duration_nano, 30_000_000_000);
    assert_eq!(profiles[0].profile_id.len(), 16);
    assert_ne!(profiles[0].profile_id, profiles[1].profile_id);

    for (profile, vi) in [(&profiles[0], 1), (&profiles[1], 0)] {
        assert_eq!(profile.samples.len(), p.sample.len());
        for (o, s) in profile.samples.iter().zip(&p.sample) {
            assert_eq!(o.values, vec![s.value[vi]]);
            assert_eq!(frames(d, o.stack_index), pprof_frames(&p, s));
        }
    }
    let hot = &profiles[1].samples[0];
    assert_eq!(hot.values, vec![60]);
    assert_eq!(
        frames(d, hot.stack_index),
        [
            "checkout.total",
            "app.handle",
            "app.handle",
            "app.serve",
            "main"
        ]
    );
    // File, line, mapping and address of the leaf.
    let leaf =
        &d.location_table[d.stack_table[hot.stack_index as usize].location_indices[0] as usize];
    assert_eq!(leaf.address, 0x1234);
    let m = &d.mapping_table[leaf.mapping_index as usize];
    assert_eq!(d.string_table[m.filename_strindex as usize], "libc.so.6");
    assert_eq!((m.memory_start, m.memory_limit), (0x1000, 0x9000));
    assert_eq!(leaf.lines[0].line, 12);
    assert_eq!(leaf.lines[1].line, 99);
    let f = &d.function_table[leaf.lines[0].function_index as usize];
    assert_eq!(d.string_table[f.filename_strindex as usize], "checkout.py");
    // The label became a dictionary attribute of that sample only.
    assert_eq!(hot.attribute_indices.len(), 1);
    let a = &d.attribute_table[hot.attribute_indices[0] as usize];
    assert_eq!(d.string_table[a.key_strindex as usize], "thread");
    assert_eq!(
        a.value.as_ref().unwrap().value,
        Some(any_value::Value::StringValue("worker-1".into()))
    );
    assert!(profiles[1].samples[1].attribute_indices.is_empty());
    // Strings and stacks are not duplicated.
    let mut strings = d.string_table.clone();
    strings.sort();
    strings.dedup();
    assert_eq!(strings.len(), d.string_table.len());
    assert_eq!(d.stack_table.len(), 1 + p.sample.len());
}

#[test]
fn zero_values_are_dropped_per_type() {
    let mut p = fixture();
    p.sample[1].value[1] = 0;
    let req = convert(&p, vec![]);
    let profiles = &req.resource_profiles[0].scope_profiles[0].profiles;
    assert_eq!(profiles[0].samples.len(), 2);
    assert_eq!(profiles[1].samples.len(), 3);
}

#[test]
fn responses() {
    use opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesPartialSuccess;
    assert!(check_response(http::StatusCode::OK, b"").is_ok());
    let partial = ExportProfilesServiceResponse {
        partial_success: Some(ExportProfilesPartialSuccess {
            rejected_profiles: 1,
            error_message: "too old".into(),
        }),
    }
    .encode_to_vec();
    let e = check_response(http::StatusCode::OK, &partial).unwrap_err();
    assert!(e.to_string().contains("too old"), "{e}");
    let e = check_response(http::StatusCode::NOT_FOUND, b"404 page not found").unwrap_err();
    assert!(e.to_string().contains("404"), "{e}");
}
