//! A pprof from anywhere (an upload, a spool file) through every view kprof derives from it:
//! the top table, folded stacks, flame graph, diff, growth and the OTLP conversion. Decoding is
//! bounded (gzip bombs are refused); the views never panic and add up.
#![no_main]
use kprof_pprof::{
    Profile,
    views::{Stacks, TopReport, diff_svg, flamegraph_svg, growth},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(p) = Profile::decode_bytes(data) else {
        return;
    };
    // A profile with absurd tables is decoded but kept small by the input size limit.
    for index in 0..p.sample_type.len().min(4) {
        let stacks = Stacks::from_profile(&p, index);
        let _ = stacks.folded();
        let top = stacks.top();
        let _ = TopReport::new(&stacks, 20).table();
        let _ = flamegraph_svg(&stacks, "fuzz");
        let _ = diff_svg(&stacks, &stacks, "fuzz");
        for g in growth(&stacks, &stacks) {
            let _ = g;
        }
        drop(top);
    }
    let _ = kprof_operator::store::otlp::convert(&p, Vec::new());
});
