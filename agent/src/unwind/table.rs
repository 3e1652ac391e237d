//! The compiler: every FDE of `.eh_frame` and `.debug_frame`, evaluated into one sorted table
//! of x86-64 unwind rows.
//!
//! Two passes. The first parses the FDE headers, sorts them by address and keeps one FDE per
//! address range (`.eh_frame` first, then the lower address: overlapping FDEs are compiler or
//! linker leftovers). The second evaluates each kept FDE's CFI in address order and appends its
//! rows, merging a row into the previous one when the rules are the same, and marking the end
//! of an FDE with a "no info" row unless the next FDE starts right there.
//!
//! Work and memory are bounded by the input: CFI instructions per FDE are capped before an FDE
//! is evaluated, the table by a row cap, and a corrupt entry ends its section's walk (the FDEs
//! read so far are kept and the rest counted as skipped). Nothing here panics on bad input.

use std::collections::HashMap;

use gimli::{
    BaseAddresses, CommonInformationEntry, DebugFrame, EhFrame, EndianSlice, FrameDescriptionEntry,
    LittleEndian, UnwindContext, UnwindOffset, UnwindSection,
};
use kprof_common::unwind::UnwindRow;

use super::functions::FunctionStarts;
use super::rules::{self, Cfa, Rule, SavedRbp};

type Slice<'d> = EndianSlice<'d, LittleEndian>;

/// Bounds on one compilation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Rows after merging; a larger table is refused ([`UnwindTableError::TooManyRows`]).
    pub max_rows: usize,
    /// CFI instructions (CIE initial ones included) of one FDE; a longer FDE is skipped.
    pub max_instructions_per_fde: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_rows: 2_000_000,
            // The longest FDEs of Debian's libc and libpython have a few hundred.
            max_instructions_per_fde: 16_384,
        }
    }
}

/// Why no table was compiled.
#[derive(Debug, thiserror::Error)]
pub enum UnwindTableError {
    #[error("not a readable ELF file: {0}")]
    Elf(String),
    #[error("unwind tables are compiled for x86-64 only, not {0}")]
    Architecture(String),
    #[error("no .eh_frame or .debug_frame section with data")]
    NoUnwindInfo,
    #[error("the unwind table has more than {max_rows} rows")]
    TooManyRows { max_rows: usize },
    #[error("unwind rows span {span:#x} bytes, beyond the kernel row's 32-bit offsets")]
    AddressSpan { span: u64 },
}

/// What a compilation read, kept and left out (for metrics and logs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// FDEs compiled into the table.
    pub fdes: usize,
    /// FDEs left out because they could not be read or evaluated, or exceeded the instruction
    /// cap; a corrupt entry that ends a section's walk counts as one.
    pub skipped_fdes: usize,
    /// FDEs left out because an FDE already kept covers their start, or they lie outside the
    /// object's executable segments (leftovers of discarded sections).
    pub dropped_fdes: usize,
    /// Rows of the table.
    pub rows: usize,
    /// Rows whose CFA rule the kernel row cannot express ([`Cfa::Unsupported`]).
    pub unsupported_rows: usize,
    /// Rows with a usable CFA whose RBP rule is not expressible.
    pub unsupported_rbp_rows: usize,
    /// Bytes of `.eh_frame` and `.debug_frame` read.
    pub section_bytes: usize,
    /// Bytes of the kernel rows ([`UnwindRow`]).
    pub table_bytes: usize,
    /// The most CFI instructions one kept FDE had.
    pub max_fde_instructions: usize,
}

impl Stats {
    /// The share of rows the unwinder cannot use (0 for an empty table).
    pub fn unsupported_fraction(&self) -> f64 {
        if self.rows == 0 {
            0.0
        } else {
            self.unsupported_rows as f64 / self.rows as f64
        }
    }
}

/// One row: the rules from `pc` (an ELF virtual address) to the next row's `pc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Row {
    pub pc: u64,
    pub rule: Rule,
}

/// A compiled unwind table: rows sorted by strictly increasing `pc`, no two neighbours with the
/// same rule, the last one "no info" (unless empty).
#[derive(Clone, Debug, Default)]
pub struct UnwindTable {
    rows: Vec<Row>,
    functions: FunctionStarts,
    stats: Stats,
}

impl UnwindTable {
    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn functions(&self) -> &FunctionStarts {
        &self.functions
    }

    /// The start of the function (FDE) that contains `pc`.
    pub fn function_start(&self, pc: u64) -> Option<u64> {
        self.functions.function_start(pc)
    }

    /// The rule at `pc` (what the kernel's binary search finds).
    pub fn rule_at(&self, pc: u64) -> Rule {
        let after = self.rows.partition_point(|row| row.pc <= pc);
        after
            .checked_sub(1)
            .map_or(Rule::NO_INFO, |i| self.rows[i].rule)
    }

    /// The address the kernel rows' `pc` offsets are relative to: the first row's.
    pub fn base(&self) -> u64 {
        self.rows.first().map_or(0, |row| row.pc)
    }

    /// The rows as the kernel reads them (offsets from [`Self::base`]).
    pub fn kernel_rows(&self) -> Vec<UnwindRow> {
        let base = self.base();
        self.rows
            .iter()
            // The span was checked to fit when the table was compiled.
            .map(|row| row.rule.to_kernel_row((row.pc - base) as u32))
            .collect()
    }
}

/// One CFI section's bytes and the virtual address they are loaded at (for pc-relative
/// pointers; `.debug_frame` uses absolute ones).
#[derive(Clone, Copy, Debug)]
pub struct CfiSection<'d> {
    pub data: &'d [u8],
    pub address: u64,
}

/// What the compiler reads of an object.
#[derive(Clone, Debug, Default)]
pub struct Input<'d> {
    pub eh_frame: Option<CfiSection<'d>>,
    pub debug_frame: Option<CfiSection<'d>>,
    /// Bases of text- and data-relative pointer encodings (0 when absent).
    pub text_address: u64,
    pub got_address: u64,
    /// `[start, end)` of the executable segments; FDEs outside them are dropped. `None`: keep
    /// every FDE (a bare section, no segments known).
    pub code_ranges: Option<Vec<(u64, u64)>>,
}

/// Compiles a bare `.eh_frame` section loaded at `address`.
pub fn compile_eh_frame(
    data: &[u8],
    address: u64,
    limits: &Limits,
) -> Result<UnwindTable, UnwindTableError> {
    compile(
        &Input {
            eh_frame: Some(CfiSection { data, address }),
            ..Input::default()
        },
        limits,
    )
}

/// Compiles the CFI of `input` into a table.
pub fn compile(input: &Input<'_>, limits: &Limits) -> Result<UnwindTable, UnwindTableError> {
    let eh_frame = input.eh_frame.filter(|s| !s.data.is_empty());
    let debug_frame = input.debug_frame.filter(|s| !s.data.is_empty());
    if eh_frame.is_none() && debug_frame.is_none() {
        return Err(UnwindTableError::NoUnwindInfo);
    }
    let mut stats = Stats {
        section_bytes: [eh_frame, debug_frame]
            .iter()
            .flatten()
            .map(|s| s.data.len())
            .sum(),
        ..Stats::default()
    };
    let bases_for = |section: Option<CfiSection<'_>>| {
        BaseAddresses::default()
            .set_text(input.text_address)
            .set_got(input.got_address)
            .set_eh_frame(section.map_or(0, |s| s.address))
    };
    let (bases_eh, bases_debug) = (bases_for(eh_frame), bases_for(debug_frame));
    let eh = eh_frame.map(|s| {
        let mut section = EhFrame::new(s.data, LittleEndian);
        section.set_address_size(8);
        section
    });
    let debug = debug_frame.map(|s| {
        let mut section = DebugFrame::new(s.data, LittleEndian);
        section.set_address_size(8);
        section
    });

    let mut fdes = Vec::new();
    if let Some(section) = &eh {
        read_fdes(section, &bases_eh, Source::EhFrame, &mut fdes, &mut stats);
    }
    if let Some(section) = &debug {
        read_fdes(
            section,
            &bases_debug,
            Source::DebugFrame,
            &mut fdes,
            &mut stats,
        );
    }
    let fdes = keep_one_per_range(fdes, input.code_ranges.as_deref(), &mut stats);

    let mut builder = RowBuilder {
        rows: Vec::new(),
        max_rows: limits.max_rows,
    };
    let mut functions = Vec::with_capacity(fdes.len());
    let mut ctx = UnwindContext::new();
    let mut previous_end = None;
    for fde in &fdes {
        let evaluated = match fde.source {
            // Both sections exist when an FDE of theirs does.
            Source::EhFrame => eh
                .as_ref()
                .map(|s| evaluate(s, &bases_eh, &fde.fde, &mut ctx, limits)),
            Source::DebugFrame => debug
                .as_ref()
                .map(|s| evaluate(s, &bases_debug, &fde.fde, &mut ctx, limits)),
        };
        let Some(Some((fde_rows, instructions))) = evaluated else {
            stats.skipped_fdes += 1;
            continue;
        };
        if previous_end.is_some_and(|end| end != fde.start) {
            builder.push(previous_end.unwrap_or_default(), Rule::NO_INFO)?;
        }
        for (pc, rule) in fde_rows {
            builder.push(pc, rule)?;
        }
        previous_end = Some(fde.end);
        functions.push((fde.start, fde.end));
        stats.fdes += 1;
        stats.max_fde_instructions = stats.max_fde_instructions.max(instructions);
    }
    if let Some(end) = previous_end {
        builder.push(end, Rule::NO_INFO)?;
    }
    let rows = builder.rows;

    if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
        let span = last.pc - first.pc;
        if span > u64::from(u32::MAX) {
            return Err(UnwindTableError::AddressSpan { span });
        }
    }
    stats.rows = rows.len();
    stats.table_bytes = rows.len() * size_of::<UnwindRow>();
    for row in &rows {
        match row.rule {
            Rule {
                cfa: Cfa::Unsupported,
                ..
            } => stats.unsupported_rows += 1,
            Rule {
                rbp: SavedRbp::Unsupported,
                ..
            } => stats.unsupported_rbp_rows += 1,
            _ => {}
        }
    }
    Ok(UnwindTable {
        rows,
        functions: FunctionStarts::from_sorted(functions),
        stats,
    })
}

/// Which section an FDE came from; `.eh_frame` wins over `.debug_frame` for the same code (it
/// is what the runtime itself unwinds with).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    EhFrame,
    DebugFrame,
}

struct ParsedFde<'d> {
    start: u64,
    end: u64,
    source: Source,
    fde: FrameDescriptionEntry<Slice<'d>>,
}

/// Parses every FDE header of `section` (with its CIE, each CIE parsed once). A corrupt entry
/// ends the walk: its length cannot be trusted to find the next one.
fn read_fdes<'d, S: UnwindSection<Slice<'d>>>(
    section: &S,
    bases: &BaseAddresses,
    source: Source,
    out: &mut Vec<ParsedFde<'d>>,
    stats: &mut Stats,
) {
    let mut cies: HashMap<usize, CommonInformationEntry<Slice<'d>>> = HashMap::new();
    let mut entries = section.entries(bases);
    loop {
        let partial = match entries.next() {
            Ok(None) => break,
            Ok(Some(gimli::CieOrFde::Cie(_))) => continue,
            Ok(Some(gimli::CieOrFde::Fde(partial))) => partial,
            Err(_) => {
                stats.skipped_fdes += 1;
                break;
            }
        };
        let parsed = partial.parse(|section, bases, offset| {
            let key = UnwindOffset::into(offset);
            if let Some(cie) = cies.get(&key) {
                return Ok(cie.clone());
            }
            let cie = section.cie_from_offset(bases, offset)?;
            cies.insert(key, cie.clone());
            Ok(cie)
        });
        let Ok(fde) = parsed else {
            stats.skipped_fdes += 1;
            continue;
        };
        let start = fde.initial_address();
        match start.checked_add(fde.len()) {
            // Empty FDEs cover nothing; wrapping ones are corrupt.
            Some(end) if end > start => out.push(ParsedFde {
                start,
                end,
                source,
                fde,
            }),
            _ => stats.skipped_fdes += 1,
        }
    }
}

/// Sorts the FDEs by start and keeps those that start after every kept one ends and lie in
/// code.
fn keep_one_per_range<'d>(
    mut fdes: Vec<ParsedFde<'d>>,
    code_ranges: Option<&[(u64, u64)]>,
    stats: &mut Stats,
) -> Vec<ParsedFde<'d>> {
    // At the same start, `.eh_frame` first: it wins the tie.
    fdes.sort_by_key(|f| (f.start, f.source));
    let in_code = |f: &ParsedFde<'_>| {
        code_ranges.is_none_or(|ranges| {
            ranges
                .iter()
                .any(|&(start, end)| start <= f.start && f.end <= end)
        })
    };
    let mut kept: Vec<ParsedFde<'d>> = Vec::with_capacity(fdes.len());
    for fde in fdes {
        let overlaps = kept.last().is_some_and(|last| fde.start < last.end);
        if overlaps || !in_code(&fde) {
            stats.dropped_fdes += 1;
        } else {
            kept.push(fde);
        }
    }
    kept
}

/// The rows of one FDE, or `None` when it exceeds the instruction cap or its CFI does not
/// evaluate; with the number of CFI instructions.
fn evaluate<'d, S: UnwindSection<Slice<'d>>>(
    section: &S,
    bases: &BaseAddresses,
    fde: &FrameDescriptionEntry<Slice<'d>>,
    ctx: &mut UnwindContext<usize>,
    limits: &Limits,
) -> Option<(Vec<(u64, Rule)>, usize)> {
    // Counting first bounds the evaluation: it is linear in the instructions.
    let mut instructions = 0;
    let mut cie_instructions = fde.cie().instructions(section, bases);
    let mut fde_instructions = fde.instructions(section, bases);
    loop {
        let next = match cie_instructions.next() {
            Ok(None) => fde_instructions.next(),
            other => other,
        };
        match next {
            Ok(Some(_)) => instructions += 1,
            Ok(None) => break,
            Err(_) => return None,
        }
        if instructions > limits.max_instructions_per_fde {
            return None;
        }
    }

    let (start, end) = (fde.initial_address(), fde.end_address());
    let mut rows: Vec<(u64, Rule)> = Vec::new();
    let mut table = fde.rows(section, bases, ctx).ok()?;
    while let Some(row) = table.next_row().ok()? {
        let pc = row.start_address();
        // Rows outside the FDE's range (a bad advance) say nothing about its code.
        if pc < start || pc >= end || row.end_address() <= pc {
            continue;
        }
        let rule = rules::classify(section, row);
        match rows.last_mut() {
            // A later row at the same address replaces the earlier one.
            Some(last) if last.0 == pc => last.1 = rule,
            _ => rows.push((pc, rule)),
        }
    }
    // An FDE's first row starts at its start; without one, its CFI is unusable.
    (rows.first()?.0 == start).then_some((rows, instructions))
}

/// Appends rows in address order, merging equal neighbours, within the row cap.
struct RowBuilder {
    rows: Vec<Row>,
    max_rows: usize,
}

impl RowBuilder {
    fn push(&mut self, pc: u64, rule: Rule) -> Result<(), UnwindTableError> {
        // Callers push in increasing address order (FDEs sorted, rows within an FDE too).
        debug_assert!(self.rows.last().is_none_or(|last| last.pc <= pc));
        if self.rows.last().is_some_and(|last| last.pc == pc) {
            // The later rule at the same address wins.
            self.rows.pop();
        }
        if self
            .rows
            .last()
            .map_or(rule == Rule::NO_INFO, |last| last.rule == rule)
        {
            return Ok(());
        }
        if self.rows.len() >= self.max_rows {
            return Err(UnwindTableError::TooManyRows {
                max_rows: self.max_rows,
            });
        }
        self.rows.push(Row { pc, rule });
        Ok(())
    }
}
