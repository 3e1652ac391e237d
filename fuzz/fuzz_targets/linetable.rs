//! CPython line tables as read from a target's memory (any bytes): every format, any
//! instruction offset; a line is positive when given.
#![no_main]
use kprof_agent::python::{layout::LineTableKind, linetable::line_for};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u32, Option<u32>, &[u8])| {
    let (first, lasti, table) = input;
    for kind in [
        LineTableKind::Lnotab,
        LineTableKind::LineTable310,
        LineTableKind::Locations,
    ] {
        if let Some(line) = line_for(kind, table, first, lasti) {
            assert!(line > 0);
        }
    }
});
