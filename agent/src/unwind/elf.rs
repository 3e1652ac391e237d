//! What the compiler needs of an ELF file: its CFI sections, the bases of their pointer
//! encodings and its executable segments.

use object::{
    Architecture, CompressionFormat, Object, ObjectSection, ObjectSegment, ReadRef, SegmentFlags,
    elf::PF_X,
};

use super::table::{self, CfiSection, Input, Limits, UnwindTable, UnwindTableError};

/// An executable segment of an ELF file: `file_size` bytes at file offset `offset` are loaded
/// at virtual address `vaddr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecSegment {
    pub offset: u64,
    pub vaddr: u64,
    pub file_size: u64,
}

impl ExecSegment {
    /// The virtual address of file offset `offset`, if this segment holds it.
    pub fn vaddr_of(&self, offset: u64) -> Option<u64> {
        let inside = offset.checked_sub(self.offset)?;
        (inside < self.file_size).then(|| self.vaddr.wrapping_add(inside))
    }
}

/// A compiled ELF file: its table, and where its code is loaded (to place the table under a
/// mapping of the file).
#[derive(Clone, Debug)]
pub struct CompiledElf {
    pub table: UnwindTable,
    pub segments: Vec<ExecSegment>,
}

/// Compiles the unwind table of an x86-64 ELF file (`.eh_frame`, and `.debug_frame` when
/// present; compressed sections are not read). Row addresses are the file's virtual addresses,
/// as in its symbol table.
pub fn compile_elf(data: &[u8], limits: &Limits) -> Result<UnwindTable, UnwindTableError> {
    compile_elf_file(data, limits).map(|c| c.table)
}

/// [`compile_elf`] over any reader (a [`object::ReadCache`] of an open file reads only the
/// headers and the CFI sections), with the executable segments.
pub fn compile_elf_file<'d, R: ReadRef<'d>>(
    data: R,
    limits: &Limits,
) -> Result<CompiledElf, UnwindTableError> {
    let file = object::File::parse(data).map_err(|e| UnwindTableError::Elf(e.to_string()))?;
    if file.format() != object::BinaryFormat::Elf {
        return Err(UnwindTableError::Elf("not an ELF file".into()));
    }
    if file.architecture() != Architecture::X86_64 {
        return Err(UnwindTableError::Architecture(format!(
            "{:?}",
            file.architecture()
        )));
    }
    let section_address = |name: &str| file.section_by_name(name).map_or(0, |s| s.address());
    let exec = || {
        file.segments().filter(|segment| {
            matches!(segment.flags(), SegmentFlags::Elf { p_flags } if p_flags & PF_X != 0)
        })
    };
    let code_ranges = exec()
        .map(|segment| {
            let start = segment.address();
            (start, start.saturating_add(segment.size()))
        })
        .collect::<Vec<_>>();
    let segments = exec()
        .map(|segment| {
            let (offset, file_size) = segment.file_range();
            ExecSegment {
                offset,
                vaddr: segment.address(),
                file_size,
            }
        })
        .collect();
    let input = Input {
        eh_frame: cfi_section(&file, ".eh_frame"),
        debug_frame: cfi_section(&file, ".debug_frame"),
        text_address: section_address(".text"),
        got_address: section_address(".got"),
        // An object without program headers (a relocatable file) has no segments to check.
        code_ranges: (!code_ranges.is_empty()).then_some(code_ranges),
    };
    let table = table::compile(&input, limits)?;
    Ok(CompiledElf { table, segments })
}

/// A section's bytes, if it has any and they are stored uncompressed.
fn cfi_section<'d, R: ReadRef<'d>>(
    file: &object::File<'d, R>,
    name: &str,
) -> Option<CfiSection<'d>> {
    let section = file.section_by_name(name)?;
    let uncompressed = section
        .compressed_file_range()
        .is_ok_and(|range| range.format == CompressionFormat::None);
    let data = section.data().ok().filter(|_| uncompressed)?;
    Some(CfiSection {
        data,
        address: section.address(),
    })
}
