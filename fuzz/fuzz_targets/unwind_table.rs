//! The unwind table compiler on any bytes a tenant's binary could hold: as a bare `.eh_frame`
//! section or as a whole ELF file. It never panics, stays within its row cap, and what it
//! returns is what the kernel's binary search needs: rows strictly ascending, no two equal
//! neighbours, "no info" last, and a function for every address with unwind rules.
//!
//! Input: byte 0 selects the mode (bit 0: whole ELF) and the row cap (bits 1–3: 16 << n rows,
//! so that the cap is hit); in section mode, bytes 1–4 are the section's address (LE).
#![no_main]
use kprof_agent::unwind::{Limits, Rule, UnwindTable, UnwindTableError, compile_eh_frame, compile_elf};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let limits = Limits {
        max_rows: 16 << ((selector >> 1) & 7),
        max_instructions_per_fde: 1024,
    };
    let result = if selector & 1 == 1 {
        compile_elf(rest, &limits)
    } else {
        let Some((address, section)) = rest.split_first_chunk::<4>() else {
            return;
        };
        compile_eh_frame(section, u64::from(u32::from_le_bytes(*address)), &limits)
    };
    match result {
        Ok(table) => check(&table, &limits),
        Err(UnwindTableError::TooManyRows { max_rows }) => assert_eq!(max_rows, limits.max_rows),
        Err(_) => {}
    }
});

fn check(table: &UnwindTable, limits: &Limits) {
    let rows = table.rows();
    assert!(rows.len() <= limits.max_rows);
    for pair in rows.windows(2) {
        assert!(pair[0].pc < pair[1].pc, "{pair:?}");
        assert_ne!(pair[0].rule, pair[1].rule, "{pair:?}");
    }
    if let Some(last) = rows.last() {
        assert_eq!(last.rule, Rule::NO_INFO);
        assert!(last.pc - rows[0].pc <= u64::from(u32::MAX));
    }
    for row in rows {
        let covered = table.function_start(row.pc).is_some();
        assert_eq!(covered, row.rule != Rule::NO_INFO, "{row:?}");
        assert_eq!(table.rule_at(row.pc), row.rule);
    }
    for start in table.functions().starts() {
        assert_eq!(table.function_start(start), Some(start));
        assert_ne!(table.rule_at(start), Rule::NO_INFO);
    }
    let kernel = table.kernel_rows();
    assert_eq!(kernel.len(), rows.len());
    assert!(kernel.windows(2).all(|w| w[0].pc < w[1].pc));
    let stats = table.stats();
    assert_eq!(stats.rows, rows.len());
    assert_eq!(stats.fdes, table.functions().len());
    assert!(stats.unsupported_rows <= stats.rows);
}
