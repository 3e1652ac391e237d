//! A pprof from anywhere (an upload, a spool file) through every view kprof derives from it:
//! the top table, folded stacks, flame graph, diff, growth, merging and the OTLP conversion.
//! Decoding is bounded (gzip bombs are refused); the views never panic and add up: folded
//! stacks, the top table's self column, the flame graph's root and a merge of the profile with
//! itself all account for the sample values, and every OTLP index points into its table.
#![no_main]
use kprof_pprof::{
    Profile,
    merge::merge,
    views::{Stacks, TopReport, diff_svg, flamegraph_svg, growth},
};
use libfuzzer_sys::fuzz_target;

/// The count of the flame graph's root frame: `<title>all (1,234 unit, 100%)</title>`.
fn svg_root_count(svg: &[u8]) -> Option<i128> {
    let svg = std::str::from_utf8(svg).ok()?;
    let rest = &svg[svg.find("<title>all (")? + "<title>all (".len()..];
    let digits: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ',')
        .filter(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn views(p: &Profile, index: usize) {
    let stacks = Stacks::from_profile(p, index);
    // With no sum near the limits (the sums saturate), every view accounts for every value.
    let exact = stacks
        .stacks
        .iter()
        .map(|s| i128::from(s.value).abs())
        .sum::<i128>()
        < i128::from(i64::MAX / 2);
    let sum: i128 = stacks.stacks.iter().map(|s| i128::from(s.value)).sum();
    let positive = stacks.stacks.iter().all(|s| s.value > 0);
    if exact {
        assert_eq!(i128::from(stacks.total), sum);
    } else if positive {
        assert_eq!(i128::from(stacks.total), sum.min(i128::from(i64::MAX)));
    }

    let folded = stacks.folded();
    assert!(folded.len() <= stacks.stacks.len());
    if exact {
        let folded_sum: i128 = folded
            .iter()
            .map(|l| l.rsplit(' ').next().unwrap().parse::<i128>().unwrap())
            .sum();
        assert_eq!(folded_sum, sum, "{folded:?}");
    }

    let top = stacks.top();
    if exact {
        // Every stack with a frame has exactly one self frame.
        let with_frames: i128 = stacks
            .stacks
            .iter()
            .filter(|s| !s.frames.is_empty())
            .map(|s| i128::from(s.value))
            .sum();
        let self_sum: i128 = top.iter().map(|r| i128::from(r.self_value)).sum();
        assert_eq!(self_sum, with_frames);
    }
    let report = TopReport::new(&stacks, 20);
    assert!(report.rows.len() <= 20);
    let _ = report.table();

    let svg = flamegraph_svg(&stacks, "fuzz");
    if exact && positive && sum > 0 {
        // inferno reads every folded line (a count of a positive stack is positive).
        if let Some(root) = svg_root_count(&svg) {
            assert_eq!(root, sum);
        }
    }
    let _ = diff_svg(&stacks, &stacks, "fuzz");
    // Against itself nothing grows (up to the rounding of the shares' sums).
    for g in growth(&stacks, &stacks) {
        assert!(g.delta_percent.abs() <= 0.01, "{g:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(p) = Profile::decode_bytes(data) else {
        return;
    };
    for index in 0..p.sample_type.len().min(4) {
        views(&p, index);
    }
    if p.sample_type.is_empty() {
        views(&p, 0);
    }

    // Merging a profile with itself doubles every value (within the sums' bounds).
    let merged = merge(&[p.clone(), p.clone()]).expect("a profile merges with itself");
    assert_eq!(merged.sample_types(), p.sample_types());
    for index in 0..p.sample_type.len().min(4) {
        let (one, two) = (
            Stacks::from_profile(&p, index),
            Stacks::from_profile(&merged, index),
        );
        let bound: i128 = one.stacks.iter().map(|s| i128::from(s.value).abs()).sum();
        if 2 * bound < i128::from(i64::MAX / 2) {
            assert_eq!(i128::from(two.total), 2 * i128::from(one.total));
        }
    }

    // OTLP: one profile per sample type, values carried over, every index in its table.
    let req = kprof_store::otlp::convert(&p, Vec::new());
    let dict = req.dictionary.as_ref().unwrap();
    let profiles = &req.resource_profiles[0].scope_profiles[0].profiles;
    assert_eq!(profiles.len(), p.sample_type.len());
    let total_in = |i: usize| -> i128 {
        p.sample
            .iter()
            .filter_map(|s| s.value.get(i))
            .map(|v| i128::from(*v))
            .sum()
    };
    let within = |i: i32, len: usize| usize::try_from(i).is_ok_and(|i| i < len);
    let mut seen_types = Vec::new();
    for prof in profiles {
        let t = prof.sample_type.as_ref().unwrap();
        assert!(within(t.type_strindex, dict.string_table.len()));
        assert!(within(t.unit_strindex, dict.string_table.len()));
        let mut sum = 0i128;
        for s in &prof.samples {
            assert!(within(s.stack_index, dict.stack_table.len()));
            for a in &s.attribute_indices {
                assert!(within(*a, dict.attribute_table.len()));
            }
            assert_eq!(s.values.len(), 1);
            assert_ne!(s.values[0], 0);
            sum += i128::from(s.values[0]);
        }
        seen_types.push(sum);
    }
    // The default type comes first; the others keep their order.
    let default = p.default_value_index();
    let order = std::iter::once(default)
        .chain((0..p.sample_type.len()).filter(|&i| i != default))
        .filter(|&i| i < p.sample_type.len());
    for (sum, i) in seen_types.iter().zip(order) {
        assert_eq!(*sum, total_in(i));
    }
    for stack in &dict.stack_table {
        for l in &stack.location_indices {
            assert!(within(*l, dict.location_table.len()));
        }
    }
    for loc in &dict.location_table {
        assert!(within(loc.mapping_index, dict.mapping_table.len()));
        for line in &loc.lines {
            assert!(within(line.function_index, dict.function_table.len()));
        }
    }
});
