//! The CPython code-object reader over a target's memory (any bytes): the `str` and `bytes`
//! objects it follows, their sizes and kinds, and the line table read from it, for every
//! supported version's layout. Never a panic; names and tables stay within their bounds.
#![no_main]
use kprof_agent::python::{
    code::read_code_object, layout, linetable::line_for, procmem::MemoryImage,
};
use libfuzzer_sys::fuzz_target;

const BASE: u64 = 0x10000;

fuzz_target!(|input: (u8, u16, u32, &[u8])| {
    let (minor, code_at, lasti, bytes) = input;
    let Some(l) = layout::table(8 + u32::from(minor % 7)) else {
        return;
    };
    let mem = MemoryImage {
        base: BASE,
        bytes: bytes.to_vec(),
    };
    let Ok(info) = read_code_object(&mem, &l, BASE + u64::from(code_at)) else {
        return;
    };
    assert!(info.table.len() <= bytes.len());
    assert!(info.name.len() <= 4 * bytes.len());
    let _ = info.display_name();
    if let Some(line) = line_for(l.line_table, &info.table, info.firstlineno, Some(lasti)) {
        assert!(line > 0);
    }
});
