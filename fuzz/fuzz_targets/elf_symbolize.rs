//! Symbolization of an arbitrary ELF with DWARF, as the agent does it: the file a tenant maps
//! is copied (`Snapshot`) and blazesym reads the copy. The copy never panics and never holds
//! more than its limit; a panic of blazesym's is caught, as the agent catches it.
#![no_main]
use std::io::Write as _;

use blazesym::symbolize::{Input, Symbolizer, source::Elf, source::Source};
use kprof_agent::symbolize::snapshot::Snapshot;
use libfuzzer_sys::fuzz_target;

const LIMIT: u64 = 4 << 20;

fuzz_target!(|data: &[u8]| {
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(data).unwrap();
    let Ok(snapshot) = Snapshot::of(&file, LIMIT) else {
        return;
    };
    assert!(snapshot.bytes() <= LIMIT);
    let _ = snapshot.build_id();
    let symbolizer = Symbolizer::builder()
        .enable_code_info(true)
        .enable_inlined_fns(true)
        .enable_demangling(true)
        .set_debug_dirs(Some(Vec::<std::path::PathBuf>::new()))
        .build();
    let offsets: Vec<u64> = (0..8u64).map(|i| i * (data.len() as u64 / 8 + 1)).collect();
    // blazesym's own assertions on odd files are caught by the agent (that file's frames stay
    // addresses): do the same here, so that fuzzing goes on to what the agent does not catch.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        symbolizer.symbolize(
            &Source::Elf(Elf::new(snapshot.path())),
            Input::FileOffset(&offsets),
        )
    }));
    std::panic::set_hook(hook);
});
