//! What the compiler needs of an ELF file: its CFI sections, the bases of their pointer
//! encodings and its executable segments.

use object::{
    Architecture, CompressionFormat, Object, ObjectSection, ObjectSegment, SegmentFlags, elf::PF_X,
};

use super::table::{self, CfiSection, Input, Limits, UnwindTable, UnwindTableError};

/// Compiles the unwind table of an x86-64 ELF file (`.eh_frame`, and `.debug_frame` when
/// present; compressed sections are not read). Row addresses are the file's virtual addresses,
/// as in its symbol table.
pub fn compile_elf(data: &[u8], limits: &Limits) -> Result<UnwindTable, UnwindTableError> {
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
    let code_ranges = file
        .segments()
        .filter(|segment| {
            matches!(segment.flags(), SegmentFlags::Elf { p_flags } if p_flags & PF_X != 0)
        })
        .map(|segment| {
            let start = segment.address();
            (start, start.saturating_add(segment.size()))
        })
        .collect::<Vec<_>>();
    let input = Input {
        eh_frame: cfi_section(&file, ".eh_frame"),
        debug_frame: cfi_section(&file, ".debug_frame"),
        text_address: section_address(".text"),
        got_address: section_address(".got"),
        // An object without program headers (a relocatable file) has no segments to check.
        code_ranges: (!code_ranges.is_empty()).then_some(code_ranges),
    };
    table::compile(&input, limits)
}

/// A section's bytes, if it has any and they are stored uncompressed.
fn cfi_section<'d>(file: &object::File<'d>, name: &str) -> Option<CfiSection<'d>> {
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
