//! The Python ELF reader on any bytes a tenant could put where its interpreter was: parsing,
//! the symbols the walker asks for, the load bias and the version-string scan never panic, and
//! what they return lies within what was read.
#![no_main]
use kprof_agent::python::elf::ElfInfo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(elf) = ElfInfo::parse(data) else {
        return;
    };
    for name in [
        "_PyRuntime",
        "Py_Version",
        "PyCode_Type",
        "version.0",
        "PyDict_Type",
    ] {
        let _ = elf.symbol(name);
        let _ = elf.symbol_with_size(name);
    }
    let _ = elf.section(".rodata");
    let _ = elf.load_bias(&[]);
    for minor in 8..=14 {
        if let Some(v) = elf.find_version_string(3, minor) {
            assert!(v.starts_with(&format!("3.{minor}.")), "{v}");
            assert!(v.len() < 16, "{v}");
        }
    }
});
