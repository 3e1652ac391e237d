//! The native user-stack unwinder: `.eh_frame` tables with frame pointers as the fallback.
//!
//! User space compiles each executable's CFI once per file into rows (`UNWIND_ROWS`, located
//! by `UNWIND_TABLES`) and lists every targeted process's executable mappings
//! (`UNWIND_PROCS`). Per frame: find the mapping of the address (binary search in the
//! process's value), then the row for it (binary search in its table), compute the CFA and
//! read the return address and the saved RBP ([`kprof_common::unwind`] says how). An address
//! in a mapping without a table (JIT code, the vDSO, a file not compiled yet) or a row without
//! information is unwound by frame pointers.
//!
//! A stack that goes wrong is cut there, marked `FLAG_USER_TRUNCATED`: a return address in no
//! mapping, a stack pointer that does not grow, memory that cannot be read. A process without
//! mappings yet is walked by the kernel's frame-pointer walker, and both that and an address
//! outside the known mappings set `FLAG_UNWIND_MISS`, which tells user space to read the
//! process's mappings (again).
//!
//! Verifier notes: the frame loop is a `bpf_loop` so one step is verified, not 127; the two
//! binary searches are bounded loops of fixed depth.

use aya_ebpf::{
    helpers::generated::{
        bpf_get_current_task, bpf_probe_read_kernel as bpf_probe_read_kernel_raw,
    },
    helpers::{bpf_loop, bpf_probe_read_user},
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use kprof_common::{
    Config, FLAG_UNWIND_MISS, FLAG_USER_TRUNCATED, MAX_USER_FRAMES, Stat,
    unwind::{
        CFA_DEREF_RBP, CFA_END_OF_STACK, CFA_NO_INFO, CFA_PLT, CFA_RBP, CFA_RSP, CFA_UNSUPPORTED,
        MAPPING_SEARCH_STEPS, MAX_PROC_MAPPINGS, MAX_UNWIND_PROCS, MAX_UNWIND_ROWS,
        MAX_UNWIND_TABLES, NO_TABLE, ProcMappings, RBP_AT_CFA, RBP_AT_RBP, RBP_UNSUPPORTED,
        ROW_SEARCH_STEPS, TableRef, UnwindRow,
    },
};

use crate::maps::bump;

/// `BPF_F_NO_PREALLOC`: a process's 8 KiB of mappings is allocated when user space adds it.
const BPF_F_NO_PREALLOC: u32 = 1;

#[map(name = "UNWIND_ROWS")]
pub static UNWIND_ROWS: Array<UnwindRow> = Array::with_max_entries(MAX_UNWIND_ROWS, 0);

#[map(name = "UNWIND_TABLES")]
pub static UNWIND_TABLES: Array<TableRef> = Array::with_max_entries(MAX_UNWIND_TABLES, 0);

#[map(name = "UNWIND_PROCS")]
pub static UNWIND_PROCS: HashMap<u32, ProcMappings> =
    HashMap::with_max_entries(MAX_UNWIND_PROCS, BPF_F_NO_PREALLOC);

/// Per CPU, the walk in progress: its state lives in a map value, not on the stack, so the
/// verifier sees unknown numbers there and checks the loop's step once instead of once per
/// count of frames so far.
/// One walk per record source (`record::BUF_*`): a CPU sample's NMI may interrupt a walk of the
/// scheduler tracepoint on the same CPU.
#[map(name = "UNWIND_WALK")]
static UNWIND_WALK: PerCpuArray<WalkState> = PerCpuArray::with_max_entries(5, 0);

/// x86-64 `struct pt_regs`: the user registers at the top of a thread's kernel stack.
const THREAD_SIZE: usize = 16 << 10;
const PT_REGS_SIZE: usize = 168;
const PT_REGS_BP: usize = 32;
const PT_REGS_IP: usize = 128;
const PT_REGS_SP: usize = 152;

/// Starts walk `slot` from these user registers (an event that interrupted user mode).
/// The registers go straight into the map value: the programs' stacks are nearly full.
#[inline(always)]
pub fn start_from(slot: u32, ip: u64, sp: u64, bp: u64) -> bool {
    let Some(w) = UNWIND_WALK.get_ptr_mut(slot) else {
        return false;
    };
    // SAFETY: this CPU's walk state for the source (not re-entered on its CPU).
    unsafe {
        (*w).pc = ip;
        (*w).sp = sp;
        (*w).bp = bp;
    }
    true
}

/// Starts walk `slot` from the user registers the current thread saved at its entry into the
/// kernel (a sample in kernel mode, a tracepoint); false when the kernel stack's place is
/// unknown or unreadable.
#[inline(always)]
pub fn start_from_saved(slot: u32, cfg: &Config) -> bool {
    if cfg.task_stack_off == 0 {
        return false;
    }
    let Some(w) = UNWIND_WALK.get_ptr_mut(slot) else {
        return false;
    };
    // SAFETY: probe reads of the current task's `stack` pointer and of the pt_regs at its
    // top, straight into this CPU's walk state (no stack temporaries: see `start_from`).
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let read = |dst: *mut u64, src: *const u8| {
            bpf_probe_read_kernel_raw(dst.cast(), 8, src.cast()) == 0
        };
        if !read(&raw mut (*w).pc, task.add(cfg.task_stack_off as usize)) {
            return false;
        }
        let regs = ((*w).pc as *const u8).wrapping_add(THREAD_SIZE - PT_REGS_SIZE);
        read(&raw mut (*w).pc, regs.wrapping_add(PT_REGS_IP))
            && read(&raw mut (*w).sp, regs.wrapping_add(PT_REGS_SP))
            && read(&raw mut (*w).bp, regs.wrapping_add(PT_REGS_BP))
    }
}

/// Why the walk stopped (`Walk::end`).
const RUNNING: u32 = 0;
const COMPLETE: u32 = 1;
const TRUNCATED: u32 = 2;
const STALE: u32 = 3;

/// The walk in progress (`UNWIND_WALK`): the frames found and the registers of the next one.
#[repr(C)]
pub struct WalkState {
    frames: [u64; MAX_USER_FRAMES],
    pc: u64,
    sp: u64,
    bp: u64,
    n: u32,
    end: u32,
    flags: u32,
    by_table: u32,
    by_fp: u32,
    _pad: u32,
}

/// What the `bpf_loop` callback gets (through the stack).
#[repr(C)]
struct Walk {
    procs: *const ProcMappings,
    state: *mut WalkState,
}

#[inline(always)]
fn read_user(addr: u64) -> Option<u64> {
    // SAFETY: user memory read checked by the helper.
    unsafe { bpf_probe_read_user(addr as *const u64) }.ok()
}

/// The mapping of `procs` that contains `pc`: its bias, table, start and end. A bisection that narrows a
/// range by halves (no data-dependent exit but the range's length): the verifier sees one
/// shape of loop, whatever the data.
#[inline(always)]
fn find_mapping(procs: &ProcMappings, pc: u64) -> Option<(u64, u32, u64, u64)> {
    let count = procs.count as usize;
    if count == 0 || count > MAX_PROC_MAPPINGS {
        return None;
    }
    // Invariant: the answer, if any, is in [base, base + len).
    let (mut base, mut len) = (0usize, count);
    for _ in 0..MAPPING_SEARCH_STEPS {
        if len <= 1 {
            break;
        }
        let half = len / 2;
        let m = &procs.mappings[(base + half) & (MAX_PROC_MAPPINGS - 1)];
        if m.start <= pc {
            base += half;
        }
        len -= half;
    }
    let m = &procs.mappings[base & (MAX_PROC_MAPPINGS - 1)];
    (m.start <= pc && pc < m.end).then_some((m.bias, m.table, m.start, m.end))
}

/// The row of `table` in force at offset `off` (a zeroed row, "no information", when none).
#[inline(always)]
fn find_row(table: u32, off: u64) -> UnwindRow {
    let none = UnwindRow::default();
    let Some(t) = UNWIND_TABLES.get(table) else {
        return none;
    };
    if t.count == 0 || off > u32::MAX as u64 {
        return none;
    }
    let off = off as u32;
    let (mut base, mut len) = (t.first, t.count);
    for _ in 0..ROW_SEARCH_STEPS {
        if len <= 1 {
            break; // log2(rows) steps: 11 for libz, 17 for libpython
        }
        let half = len / 2;
        let pc = match UNWIND_ROWS.get(base + half) {
            Some(row) => row.pc,
            None => return none,
        };
        if pc <= off {
            base += half;
        }
        len -= half;
    }
    match UNWIND_ROWS.get(base) {
        Some(row) if row.pc <= off => *row,
        _ => none,
    }
}

/// One frame: record `pc`, then find the caller's registers. Returns 1 to stop the loop.
#[inline(always)]
fn step(walk: &Walk) -> i64 {
    // SAFETY: both are map values (this CPU's walk state, the process's mappings) that
    // outlive the loop.
    let (w, procs) = unsafe { (&mut *walk.state, &*walk.procs) };
    let n = w.n as usize;
    if n >= MAX_USER_FRAMES {
        w.end = TRUNCATED;
        return 1;
    }
    // A caller's return address points after its call: look up the call itself.
    let lookup = if n == 0 { w.pc } else { w.pc.wrapping_sub(1) };
    let mapping = find_mapping(procs, lookup);
    // A return address in no mapping is garbage (or a library loaded since the mappings were
    // read: user space looks again): it is not recorded. The leaf is, whatever it is.
    if mapping.is_some() || n == 0 {
        if let Some(slot) = w.frames.get_mut(n) {
            *slot = w.pc;
        }
        w.n = n as u32 + 1;
    }
    let Some((bias, table, start, end)) = mapping else {
        w.flags |= FLAG_UNWIND_MISS;
        // A leaf outside every mapping: the mappings are of an image the process no longer
        // runs (it has just `exec`ed): the kernel's frame-pointer walk does better this time.
        w.end = if n == 0 { STALE } else { TRUNCATED };
        return 1;
    };
    let row = if table == NO_TABLE {
        UnwindRow::default()
    } else {
        find_row(table, lookup.wrapping_sub(bias))
    };
    let (cfa, ra, bp) = match row.cfa_type() {
        CFA_END_OF_STACK => {
            w.end = COMPLETE;
            return 1;
        }
        CFA_RSP | CFA_RBP | CFA_PLT | CFA_DEREF_RBP => {
            let off = row.cfa_offset as u64;
            let cfa = match row.cfa_type() {
                CFA_RSP => w.sp.wrapping_add(off),
                CFA_RBP => w.bp.wrapping_add(off),
                CFA_PLT => w.sp + 8 + if (w.pc & 15) >= off { 8 } else { 0 },
                _ => match read_user(w.bp.wrapping_add(row.cfa_offset as i16 as u64)) {
                    Some(cfa) => cfa,
                    None => {
                        w.end = TRUNCATED;
                        return 1;
                    }
                },
            };
            let Some(ra) = read_user(cfa.wrapping_sub(8)) else {
                w.end = TRUNCATED;
                return 1;
            };
            let bp = match row.rbp_type() {
                RBP_AT_CFA => {
                    let at = cfa.wrapping_add((row.rbp_offset as i64 * 8) as u64);
                    match read_user(at) {
                        Some(bp) => bp,
                        None => {
                            w.end = TRUNCATED;
                            return 1;
                        }
                    }
                }
                RBP_AT_RBP => {
                    let at = w.bp.wrapping_add((row.rbp_offset as i64 * 8) as u64);
                    match read_user(at) {
                        Some(bp) => bp,
                        None => {
                            w.end = TRUNCATED;
                            return 1;
                        }
                    }
                }
                RBP_UNSUPPORTED => 0,
                _ => w.bp,
            };
            w.by_table += 1;
            (cfa, ra, bp)
        }
        CFA_NO_INFO | CFA_UNSUPPORTED | _ => {
            // A leaf without unwind information is most often assembly that pushed nothing
            // (glibc's `clone3` after its `syscall`, in the parent): its return address is at
            // RSP, if what is there returns into the same file (which has a table).
            if n == 0
                && table != NO_TABLE
                && let Some(ra) = read_user(w.sp)
                && (start..end).contains(&ra.wrapping_sub(1))
            {
                w.by_fp += 1;
                w.pc = ra;
                w.sp = w.sp.wrapping_add(8);
                return 0;
            }
            // Frame pointers: [rbp] is the caller's rbp, [rbp + 8] the return address.
            if w.bp == 0 {
                w.end = COMPLETE;
                return 1;
            }
            let (Some(bp), Some(ra)) = (read_user(w.bp), read_user(w.bp.wrapping_add(8))) else {
                w.end = TRUNCATED;
                return 1;
            };
            w.by_fp += 1;
            (w.bp.wrapping_add(16), ra, bp)
        }
    };
    if ra == 0 {
        w.end = COMPLETE; // the outermost frame's return address is 0 by convention
        return 1;
    }
    // The stack grows down: a caller's frame lies above its callee's.
    if cfa <= w.sp {
        w.end = TRUNCATED;
        return 1;
    }
    w.pc = ra;
    w.sp = cfa;
    w.bp = bp;
    0
}

extern "C" fn step_callback(_index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `ctx` is the `Walk` passed to bpf_loop by `unwind`.
    step(unsafe { &*(ctx as *const Walk) })
}

/// The unwound stack: where its frames are and how the walk went.
/// [`unwind`]'s answer when it did not unwind (the caller walks frame pointers).
pub const NOT_UNWOUND: u64 = u64::MAX;

/// Unwinds the user stack of process `tgid` with walk `slot`, started by [`start_from`] or
/// [`start_from_saved`], and copies its frames to `dst` (room for `MAX_USER_FRAMES`). Returns
/// the number of frames, with the record's `FLAG_*` bits (truncated, miss) in the high 32 bits;
/// [`NOT_UNWOUND`] when the process has no mappings loaded, or none for its leaf (the caller
/// walks frame pointers, with `FLAG_UNWIND_MISS`). One word, not a struct: the programs' stacks
/// are nearly full.
#[inline(always)]
pub fn unwind(tgid: u32, slot: u32, dst: *mut u8) -> u64 {
    match walk(tgid, slot, dst) {
        Some(r) => r,
        None => NOT_UNWOUND,
    }
}

#[inline(always)]
fn walk(tgid: u32, slot: u32, dst: *mut u8) -> Option<u64> {
    let procs = UNWIND_PROCS.get_ptr(tgid)?;
    let state = UNWIND_WALK.get_ptr_mut(slot)?;
    // SAFETY: this CPU's walk state for the source (not re-entered on its CPU).
    let w = unsafe { &mut *state };
    w.n = 0;
    w.end = RUNNING;
    w.flags = 0;
    w.by_table = 0;
    w.by_fp = 0;
    let walk = Walk { procs, state };
    // SAFETY: helper call with a static callback and a pointer to a live stack struct.
    unsafe {
        bpf_loop(
            MAX_USER_FRAMES as u32 + 1,
            step_callback as *mut core::ffi::c_void,
            &walk as *const Walk as *mut core::ffi::c_void,
            0,
        );
    }
    if w.end == STALE {
        return None; // the caller walks frame pointers and flags the miss
    }
    if w.end != COMPLETE {
        w.flags |= FLAG_USER_TRUNCATED;
        bump(Stat::UserTruncated);
    }
    if w.flags & FLAG_UNWIND_MISS != 0 {
        bump(Stat::UnwindMiss);
    }
    add(Stat::FramesByTable, w.by_table as u64);
    add(Stat::FramesByFramePointer, w.by_fp as u64);
    let n = w.n as usize;
    let n = if n < MAX_USER_FRAMES {
        n
    } else {
        MAX_USER_FRAMES
    };
    // SAFETY: `dst` has room for MAX_USER_FRAMES frames (the caller's record buffer); the
    // source is this CPU's walk state.
    let copied = unsafe {
        bpf_probe_read_kernel_raw(
            dst.cast(),
            (n * 8) as u32,
            (&raw const w.frames).cast::<core::ffi::c_void>(),
        )
    };
    (copied == 0).then_some(n as u64 | (u64::from(w.flags) << 32))
}

#[inline(always)]
fn add(stat: Stat, by: u64) {
    if by == 0 {
        return;
    }
    if let Some(counter) = crate::maps::STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, the program is not re-entered on the same CPU.
        unsafe { *counter += by };
    }
}
