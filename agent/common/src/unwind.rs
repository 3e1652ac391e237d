//! `.eh_frame` unwinding: the row the kernel's native unwinder reads.
//!
//! User space (`agent/src/unwind`) compiles an ELF's `.eh_frame` / `.debug_frame` into a sorted
//! array of [`UnwindRow`]s per executable. The unwinder finds the last row whose `pc` is at or
//! below the frame's address (a binary search), then:
//!
//! ```text
//! CFA     = RSP + cfa_offset                           (CFA_RSP)
//!         | RBP + cfa_offset                           (CFA_RBP)
//!         | RSP + 8 + ((RIP & 15) >= cfa_offset ? 8 : 0)   (CFA_PLT, lazy-binding PLT entries)
//! return  = *(CFA - 8)
//!         | *(RBP + (i16) cfa_offset)                  (CFA_DEREF_RBP, realigned stacks)
//! RBP     = *(CFA + 8 * rbp_offset)  if rbp_type == RBP_AT_CFA
//!         | *(RBP + 8 * rbp_offset)  if rbp_type == RBP_AT_RBP, else unchanged
//! RSP     = CFA
//! ```
//!
//! `CFA_NO_INFO` (no FDE covers the address) and `CFA_UNSUPPORTED` (an expression or a register
//! the row cannot hold) send the unwinder to its frame-pointer fallback or make it stop;
//! `CFA_END_OF_STACK` (the return address is explicitly undefined: `_start`, `clone`) ends the
//! stack successfully. A zeroed row is `CFA_NO_INFO`, so an unfilled slot is harmless.
//!
//! 8 bytes a row, no padding: `pc` is a 32-bit offset from the table's base (the lowest
//! address with unwind information; user space folds the base into the mapping's bias), so a
//! plain binary search works without a 64 KiB page index. Debian 12's libc.so.6 compiles to
//! 28k rows (221 KiB), libpython3.11 to 74k (579 KiB); the 12-byte layout of separate fields
//! would take half as much again.

use core::mem::size_of;

/// [`UnwindRow::cfa_type`]: no unwind information at this address.
pub const CFA_NO_INFO: u8 = 0;
/// CFA = RSP + `cfa_offset`.
pub const CFA_RSP: u8 = 1;
/// CFA = RBP + `cfa_offset`.
pub const CFA_RBP: u8 = 2;
/// CFA = RSP + 8 + ((RIP & 15) >= `cfa_offset` ? 8 : 0): the DWARF expression that binutils
/// writes for lazy-binding PLT entries (`cfa_offset` holds the threshold, 11 for the classic PLT).
pub const CFA_PLT: u8 = 3;
/// The return address is undefined: the outermost frame, stop here successfully.
pub const CFA_END_OF_STACK: u8 = 4;
/// A rule the row cannot express (a DWARF expression, another base register, an offset out of
/// range, a return address not at CFA − 8).
pub const CFA_UNSUPPORTED: u8 = 5;
/// CFA = *(RBP + `cfa_offset` as i16): functions that realign their stack (GCC's DRAP, common
/// in SIMD code such as NumPy's sorts) keep the CFA in a slot below their frame pointer.
pub const CFA_DEREF_RBP: u8 = 6;

/// [`UnwindRow::rbp_type`]: RBP keeps its value in the caller.
pub const RBP_UNCHANGED: u8 = 0;
/// The caller's RBP is saved at CFA + 8 × `rbp_offset`.
pub const RBP_AT_CFA: u8 = 1;
/// RBP's rule is not expressible: the caller's RBP is unknown.
pub const RBP_UNSUPPORTED: u8 = 2;
/// The caller's RBP is saved at RBP + 8 × `rbp_offset` (with [`CFA_DEREF_RBP`]).
pub const RBP_AT_RBP: u8 = 3;

/// One row of a compiled unwind table: the rules from `pc` up to the next row's `pc`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UnwindRow {
    /// Offset of the first address the row covers from the table's base.
    pub pc: u32,
    /// Bytes added to the CFA's base register; for [`CFA_PLT`], the threshold.
    pub cfa_offset: u16,
    /// Where RBP is saved, in 8-byte slots from the CFA (x86-64 CFI offsets are multiples of 8).
    pub rbp_offset: i8,
    /// `CFA_*` in the low 4 bits, `RBP_*` in the high 4 bits.
    pub kinds: u8,
}
const _: () = assert!(size_of::<UnwindRow>() == 8);

impl UnwindRow {
    /// The `CFA_*` type.
    pub const fn cfa_type(&self) -> u8 {
        self.kinds & 0xf
    }

    /// The `RBP_*` type.
    pub const fn rbp_type(&self) -> u8 {
        self.kinds >> 4
    }

    /// The `kinds` byte of a CFA and an RBP type.
    pub const fn pack_kinds(cfa_type: u8, rbp_type: u8) -> u8 {
        (cfa_type & 0xf) | (rbp_type << 4)
    }
}

/// Rows of every loaded table together (the `UNWIND_ROWS` array, 8 bytes each: 16 MiB). User
/// space places each table in a free extent and evicts the least recently used tables when a
/// new one does not fit.
pub const MAX_UNWIND_ROWS: u32 = 1 << 21;
/// Tables loaded at once (the `UNWIND_TABLES` array, indexed by table id).
pub const MAX_UNWIND_TABLES: u32 = 4096;
/// Executable mappings known per process; a process with more is unwound through the first
/// ones (by address) only, with a warning.
pub const MAX_PROC_MAPPINGS: usize = 256;
/// Processes with mappings in `UNWIND_PROCS` (entries are allocated on insert).
pub const MAX_UNWIND_PROCS: u32 = 8192;
/// Iterations of the binary search over a process's mappings (2^9 > [`MAX_PROC_MAPPINGS`]).
pub const MAPPING_SEARCH_STEPS: usize = 9;
/// Iterations of the binary search over one table's rows (2^22 > [`MAX_UNWIND_ROWS`]).
pub const ROW_SEARCH_STEPS: usize = 22;
/// [`ExecMapping::table`] of a mapping without a table (anonymous or JIT code, the vDSO, a file
/// without CFI or not compiled yet): it is unwound by frame pointers.
pub const NO_TABLE: u32 = u32::MAX;

/// Where table `id`'s rows lie in `UNWIND_ROWS`; `count == 0`: not loaded (evicted).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableRef {
    pub first: u32,
    pub count: u32,
}
const _: () = assert!(size_of::<TableRef>() == 8);

/// One executable mapping of a process: `[start, end)`, and for an address in it, the row
/// offset `address - bias` in table `table` (the bias folds the load address and the table's
/// base together).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecMapping {
    pub start: u64,
    pub end: u64,
    pub bias: u64,
    pub table: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<ExecMapping>() == 32);

/// A process's executable mappings, sorted by `start`, not overlapping (the `UNWIND_PROCS`
/// value, by tgid). Every executable mapping is listed, with or without a table, so an address
/// in none of them is a stale view (a library loaded since) or a bad return address.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcMappings {
    pub count: u32,
    pub _pad: u32,
    pub mappings: [ExecMapping; MAX_PROC_MAPPINGS],
}
const _: () = assert!(size_of::<ProcMappings>() == 8 + 32 * MAX_PROC_MAPPINGS);
const _: () = assert!(1 << MAPPING_SEARCH_STEPS > MAX_PROC_MAPPINGS);
const _: () = assert!(1u64 << ROW_SEARCH_STEPS > MAX_UNWIND_ROWS as u64);

impl Default for ProcMappings {
    fn default() -> Self {
        ProcMappings {
            count: 0,
            _pad: 0,
            mappings: [ExecMapping::default(); MAX_PROC_MAPPINGS],
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], integers only, no padding (sizes asserted).
    unsafe impl aya::Pod for super::UnwindRow {}
    unsafe impl aya::Pod for super::TableRef {}
    unsafe impl aya::Pod for super::ExecMapping {}
    unsafe impl aya::Pod for super::ProcMappings {}
}
