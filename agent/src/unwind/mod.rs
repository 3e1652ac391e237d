//! Native unwind tables from `.eh_frame` / `.debug_frame` (issue #15): code built without frame
//! pointers (glibc, Debian's libpython, zlib, manylinux wheels) is unwound in the kernel from
//! these tables, with frame pointers as the fallback.
//!
//! This module is the user-space compiler: an ELF's CFI becomes sorted rows of x86-64 rules
//! (`table`, using the rule translation in `rules`), in the layout the kernel reads
//! ([`kprof_common::unwind::UnwindRow`]), plus the function ranges the symbolizer groups
//! unsymbolized addresses by (`functions`); `kernel_tables` loads them into the kernel's maps
//! for the targets, where `agent/ebpf/src/unwind.rs` reads them.

mod elf;
mod functions;
pub mod kernel_tables;
mod rules;
mod table;

pub use elf::{CompiledElf, ExecSegment, compile_elf, compile_elf_file};
pub use functions::FunctionStarts;
pub use rules::{Cfa, Rule, SavedRbp};
pub use table::{
    CfiSection, Input, Limits, Row, Stats, UnwindTable, UnwindTableError, compile, compile_eh_frame,
};

#[cfg(test)]
mod tests;
