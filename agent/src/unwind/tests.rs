//! The compiler against real objects: Debian's libc, libpython3.11 and libz, a C program built
//! here without frame pointers, and binutils' own interpretation of the same CFI
//! (`readelf --debug-dump=frames-interp`); then corrupt input.
//!
//! Tests that need a system library or tool not on the machine say so and pass.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use object::{Object, ObjectSymbol, SymbolKind};

use super::*;

const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";
const LIBPYTHON: &str = "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0";
const LIBZ: &str = "/lib/x86_64-linux-gnu/libz.so.1";

fn read(path: &str) -> Option<Vec<u8>> {
    match std::fs::read(path) {
        Ok(data) => Some(data),
        Err(e) => {
            eprintln!("skipped: {path}: {e}");
            None
        }
    }
}

fn tool(name: &str) -> bool {
    let found = Command::new(name).arg("--version").output().is_ok();
    if !found {
        eprintln!("skipped: {name} is not installed");
    }
    found
}

/// The invariants every table keeps, whatever its input.
fn assert_well_formed(table: &UnwindTable, limits: &Limits) {
    let rows = table.rows();
    assert!(rows.len() <= limits.max_rows);
    for pair in rows.windows(2) {
        assert!(pair[0].pc < pair[1].pc, "rows sorted: {pair:?}");
        assert_ne!(pair[0].rule, pair[1].rule, "equal neighbours merged");
    }
    if let Some(last) = rows.last() {
        assert_eq!(last.rule, Rule::NO_INFO, "the last row ends the coverage");
        assert_ne!(rows[0].rule, Rule::NO_INFO);
    }
    let kernel = table.kernel_rows();
    assert_eq!(kernel.len(), rows.len());
    assert!(kernel.windows(2).all(|w| w[0].pc < w[1].pc));
    let stats = table.stats();
    assert_eq!(stats.rows, rows.len());
    assert_eq!(stats.table_bytes, rows.len() * 8);
    assert_eq!(table.functions().len(), stats.fdes);
}

#[test]
fn debian_libraries_compile_within_expected_bounds() {
    // (path, FDEs, rows): research measured 3,713 / 23,759 (libc), 6,102 / 67,370 (libpython)
    // and 123 / 1,016 (libz) before merging equal rows and adding FDE ends.
    let expected = [
        (LIBC, 3_000..5_000, 15_000..40_000),
        (LIBPYTHON, 5_000..8_000, 40_000..100_000),
        (LIBZ, 100..200, 600..2_000),
    ];
    let limits = Limits::default();
    let mut total_bytes = 0;
    for (path, fdes, rows) in expected {
        let Some(data) = read(path) else { continue };
        let started = Instant::now();
        let table = compile_elf(&data, &limits).unwrap();
        let elapsed = started.elapsed();
        let s = table.stats();
        println!(
            "{path}: {} FDEs ({} skipped, {} dropped), {} rows, {} unsupported ({:.3} %), \
             {} RBP-unsupported, CFI {} KiB -> table {} KiB, built in {:.1} ms, \
             longest FDE {} instructions",
            s.fdes,
            s.skipped_fdes,
            s.dropped_fdes,
            s.rows,
            s.unsupported_rows,
            100.0 * s.unsupported_fraction(),
            s.unsupported_rbp_rows,
            s.section_bytes / 1024,
            s.table_bytes / 1024,
            elapsed.as_secs_f64() * 1e3,
            s.max_fde_instructions,
        );
        total_bytes += s.table_bytes;
        assert_well_formed(&table, &limits);
        assert!(fdes.contains(&s.fdes), "{path}: {} FDEs", s.fdes);
        assert!(rows.contains(&s.rows), "{path}: {} rows", s.rows);
        assert_eq!(s.skipped_fdes, 0, "{path}");
        assert!(s.unsupported_fraction() < 0.01, "{path}: {s:?}");
        assert!(s.unsupported_rbp_rows * 100 < s.rows, "{path}: {s:?}");
        assert!(s.max_fde_instructions < limits.max_instructions_per_fde / 4);
    }
    println!("all tables: {} KiB", total_bytes / 1024);
}

#[test]
fn plt_entries_get_the_plt_rule() {
    let Some(data) = read(LIBC) else { return };
    let table = compile_elf(&data, &Limits::default()).unwrap();
    let file = object::File::parse(&*data).unwrap();
    let plt = file.section_by_name(".plt").expect("libc has a .plt");
    let (start, size) = (
        object::ObjectSection::address(&plt),
        object::ObjectSection::size(&plt),
    );
    // The first entry pushes and jumps (its own rows); from the second on, the expression.
    let entry = start + 16;
    assert!(entry < start + size);
    assert_eq!(
        table.rule_at(entry),
        Rule::new(Cfa::Plt { threshold: 11 }, SavedRbp::Unchanged)
    );
}

/// One FDE as readelf interprets it: its range and rows (address, rule).
#[derive(Debug)]
struct ReadelfFde {
    start: u64,
    end: u64,
    rows: Vec<(u64, Rule)>,
}

/// The `.eh_frame` FDEs of `readelf --debug-dump=frames-interp`, with the rules translated as
/// the compiler should: CFA `rsp+N`/`rbp+N`, RBP `c-N`; `exp` is a PLT rule or unsupported (the
/// caller decides), ra `u` the end of the stack. An FDE without instructions prints no rows:
/// its CIE's initial row applies.
fn readelf_fdes(path: &Path) -> Vec<ReadelfFde> {
    let out = Command::new("readelf")
        .args(["--debug-dump=frames-interp", "-W"])
        .arg(path)
        .output()
        .unwrap();
    // readelf may exit non-zero over a separate debug file it also looked at (Debian's libc:
    // "'.eh_frame' has the NOBITS type"); the object's own section is printed first.
    let text = String::from_utf8(out.stdout).unwrap();
    let mut cie_rows: std::collections::HashMap<String, Rule> = Default::default();
    let mut fdes: Vec<ReadelfFde> = Vec::new();
    let mut in_eh_frame = false;
    let mut current_cie: Option<String> = None;
    let mut columns: Vec<String> = Vec::new();
    for line in text.lines() {
        if line.starts_with("Contents of the ") {
            in_eh_frame = line.contains(".eh_frame section");
            continue;
        }
        if line.trim().is_empty() {
            // A blank line ends a CIE's or FDE's block.
            columns.clear();
            continue;
        }
        if !in_eh_frame {
            continue;
        }
        // A register rule prints as `r9 (r9)`: the name in parentheses joins its value.
        let mut words: Vec<&str> = Vec::new();
        for word in line.split_whitespace() {
            if !(word.starts_with('(') && word.ends_with(')') && !words.is_empty()) {
                words.push(word);
            }
        }
        if words.get(3) == Some(&"CIE") {
            current_cie = Some(words[0].to_string());
            columns.clear();
            // A CIE without initial instructions (the signal frame's "zRS") prints no row.
            let undefined = Rule::new(Cfa::Unsupported, SavedRbp::Unchanged);
            cie_rows.insert(words[0].to_string(), undefined);
        } else if words.get(3) == Some(&"FDE") {
            current_cie = None;
            columns.clear();
            let cie = words[4].trim_start_matches("cie=").to_string();
            let range = words[5].trim_start_matches("pc=");
            let (start, end) = range.split_once("..").unwrap();
            let parse = |s: &str| u64::from_str_radix(s, 16).unwrap();
            let (start, end) = (parse(start), parse(end));
            let initial = *cie_rows.get(&cie).expect("CIE printed before its FDEs");
            fdes.push(ReadelfFde {
                start,
                end,
                rows: vec![(start, initial)],
            });
        } else if words[0] == "LOC" {
            columns = words.iter().map(|w| w.to_string()).collect();
        } else if !columns.is_empty() && words.len() == columns.len() {
            let Ok(loc) = u64::from_str_radix(words[0], 16) else {
                continue;
            };
            let column = |name: &str| {
                columns
                    .iter()
                    .position(|c| c == name)
                    .map_or("u", |i| words[i])
            };
            let rule = readelf_rule(words[1], column("rbp"), column("ra"));
            if let Some(cie) = &current_cie {
                cie_rows.insert(cie.clone(), rule);
            } else if let Some(fde) = fdes.last_mut() {
                match fde.rows.last_mut() {
                    Some(last) if last.0 == loc => last.1 = rule,
                    _ => fde.rows.push((loc, rule)),
                }
            }
        }
    }
    fdes
}

fn readelf_rule(cfa: &str, rbp: &str, ra: &str) -> Rule {
    let offset = |s: &str, prefix: &str| {
        s.strip_prefix(prefix)
            .and_then(|n| n.parse::<i64>().ok())
            .and_then(|n| u16::try_from(n).ok())
    };
    let cfa = if ra == "u" {
        Cfa::EndOfStack
    } else if ra != "c-8" {
        Cfa::Unsupported
    } else if let Some(n) = offset(cfa, "rsp+") {
        Cfa::Rsp(n)
    } else if let Some(n) = offset(cfa, "rbp+") {
        Cfa::Rbp(n)
    } else {
        // `exp` and other registers; PLT expressions are told apart by the caller.
        Cfa::Unsupported
    };
    let rbp = match rbp {
        "u" | "s" => SavedRbp::Unchanged,
        c => match c.strip_prefix("c").and_then(|n| n.parse::<i16>().ok()) {
            Some(n) if n % 8 == 0 && (-1024..=1016).contains(&n) => SavedRbp::AtCfa(n),
            _ => SavedRbp::Unsupported,
        },
    };
    Rule::new(cfa, rbp)
}

/// Every row readelf prints, at its first and last address, agrees with the table; and the
/// table says "no info" right after every FDE that no other FDE follows directly.
fn assert_agrees_with_readelf(path: &Path, table: &UnwindTable) -> usize {
    let fdes = readelf_fdes(path);
    assert!(
        !fdes.is_empty(),
        "{}: readelf printed no FDE",
        path.display()
    );
    let starts: std::collections::HashSet<u64> = fdes.iter().map(|f| f.start).collect();
    let mut checked = 0;
    for fde in fdes.iter().filter(|f| f.end > f.start) {
        assert_eq!(table.function_start(fde.start), Some(fde.start), "{fde:?}");
        let rows: Vec<_> = fde
            .rows
            .iter()
            .filter(|r| fde.start <= r.0 && r.0 < fde.end)
            .collect();
        for (i, &&(pc, expected)) in rows.iter().enumerate() {
            let last = rows.get(i + 1).map_or(fde.end, |next| next.0) - 1;
            for at in [pc, last] {
                let got = table.rule_at(at);
                let plt = matches!(got.cfa, Cfa::Plt { .. }) && expected.cfa == Cfa::Unsupported;
                assert!(
                    got == expected || plt,
                    "{} at {at:#x}: table {got:?}, readelf {expected:?}",
                    path.display()
                );
                checked += 1;
            }
        }
        if !starts.contains(&fde.end) {
            assert_eq!(table.rule_at(fde.end), Rule::NO_INFO, "after {fde:?}");
        }
    }
    checked
}

#[test]
fn tables_agree_with_readelf_row_by_row() {
    if !tool("readelf") {
        return;
    }
    for path in [LIBZ, LIBC, LIBPYTHON] {
        let Some(data) = read(path) else { continue };
        let table = compile_elf(&data, &Limits::default()).unwrap();
        let checked = assert_agrees_with_readelf(Path::new(path), &table);
        println!("{path}: {checked} addresses agree with readelf");
    }
}

const FRAMED_C: &str = r#"
__attribute__((noinline)) int framed(int n) {
    volatile char buf[1000];
    for (int i = 0; i < (int)sizeof buf; i++) buf[i] = (char)(i * n);
    int s = 0;
    for (int i = 0; i < (int)sizeof buf; i += 7) s += buf[i];
    return s;
}
int main(int argc, char **argv) { (void)argv; return framed(argc) & 1; }
"#;

/// Builds `FRAMED_C` with `flags` into `dir`; `None` when gcc is missing.
fn build_c(dir: &Path, flags: &[&str]) -> Option<std::path::PathBuf> {
    if !tool("gcc") {
        return None;
    }
    let src = dir.join("framed.c");
    let bin = dir.join("framed");
    std::fs::write(&src, FRAMED_C).unwrap();
    let status = Command::new("gcc")
        .args(flags)
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .status()
        .unwrap();
    assert!(status.success());
    Some(bin)
}

/// The address and size of a function symbol.
fn function_symbol(data: &[u8], name: &str) -> (u64, u64) {
    let file = object::File::parse(data).unwrap();
    let symbol = file
        .symbols()
        .find(|s| s.name() == Ok(name))
        .unwrap_or_else(|| panic!("no symbol {name}"));
    (symbol.address(), symbol.size())
}

/// The pushes before the function's `sub $N,%rsp`, N, and the address after the `sub`, from
/// objdump's disassembly.
fn prologue(bin: &Path, name: &str) -> (u64, u64, u64) {
    let out = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn"])
        .arg(bin)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let body = text
        .split(&format!("<{name}>:\n"))
        .nth(1)
        .expect("function in the disassembly");
    let instructions: Vec<(u64, &str)> = body
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| {
            let (addr, insn) = l.trim().split_once(':')?;
            Some((u64::from_str_radix(addr, 16).ok()?, insn.trim()))
        })
        .collect();
    let mut pushes = 0;
    for (i, (_, insn)) in instructions.iter().enumerate() {
        if insn.starts_with("push") {
            pushes += 1;
        } else if let Some(rest) = insn.strip_prefix("sub") {
            let imm = rest.trim().strip_prefix("$0x").unwrap();
            let (imm, reg) = imm.split_once(',').unwrap();
            assert_eq!(reg, "%rsp");
            return (
                pushes,
                u64::from_str_radix(imm, 16).unwrap(),
                instructions[i + 1].0,
            );
        }
    }
    panic!("no sub from rsp in {name}: {instructions:?}");
}

#[test]
fn gcc_without_frame_pointers_gets_rsp_rules() {
    let dir = tempfile::tempdir().unwrap();
    let Some(bin) = build_c(
        dir.path(),
        &[
            "-O2",
            "-fomit-frame-pointer",
            "-fno-stack-protector",
            "-fno-stack-clash-protection",
        ],
    ) else {
        return;
    };
    if !tool("objdump") {
        return;
    }
    let data = std::fs::read(&bin).unwrap();
    let table = compile_elf(&data, &Limits::default()).unwrap();
    assert_well_formed(&table, &Limits::default());
    let (start, size) = function_symbol(&data, "framed");
    let (pushes, frame, after_sub) = prologue(&bin, "framed");
    println!("framed at {start:#x}: {pushes} pushes, sub ${frame:#x}, body at {after_sub:#x}");
    assert!(frame >= 128, "a 1000-byte array needs a frame");
    let rsp = |off: u64| Rule::new(Cfa::Rsp(off as u16), SavedRbp::Unchanged);
    assert_eq!(
        table.rule_at(start),
        rsp(8),
        "return address on top at entry"
    );
    assert_eq!(table.rule_at(after_sub), rsp(frame + 8 * pushes + 8));
    for pc in [start, after_sub, start + size - 1] {
        assert_eq!(table.function_start(pc), Some(start));
    }
    if tool("readelf") {
        assert_agrees_with_readelf(&bin, &table);
    }
}

#[test]
fn debug_frame_is_compiled_where_eh_frame_has_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Without asynchronous unwind tables, gcc describes the program's own functions in
    // .debug_frame only (the C runtime's objects keep their .eh_frame).
    let Some(bin) = build_c(
        dir.path(),
        &[
            "-O2",
            "-g",
            "-fomit-frame-pointer",
            "-fno-stack-protector",
            "-fno-stack-clash-protection",
            "-fno-asynchronous-unwind-tables",
            "-fno-exceptions",
        ],
    ) else {
        return;
    };
    let data = std::fs::read(&bin).unwrap();
    let file = object::File::parse(&*data).unwrap();
    assert!(file.section_by_name(".debug_frame").is_some());
    let table = compile_elf(&data, &Limits::default()).unwrap();
    assert_well_formed(&table, &Limits::default());
    let (start, _) = function_symbol(&data, "framed");
    assert_eq!(table.function_start(start), Some(start));
    assert_eq!(
        table.rule_at(start),
        Rule::new(Cfa::Rsp(8), SavedRbp::Unchanged)
    );
    assert!(matches!(table.rule_at(start + 8).cfa, Cfa::Rsp(n) if n > 128));
}

#[test]
fn function_start_is_the_symbol_of_the_function() {
    let Some(data) = read(LIBZ) else { return };
    let table = compile_elf(&data, &Limits::default()).unwrap();
    let file = object::File::parse(&*data).unwrap();
    let mut checked = 0;
    for symbol in file.dynamic_symbols() {
        if symbol.kind() != SymbolKind::Text || symbol.size() == 0 || symbol.is_undefined() {
            continue;
        }
        let (start, size) = (symbol.address(), symbol.size());
        for pc in [start, start + size / 2, start + size - 1] {
            assert_eq!(
                table.function_start(pc),
                Some(start),
                "{:?} at {pc:#x}",
                symbol.name()
            );
        }
        checked += 1;
    }
    println!("{LIBZ}: {checked} exported functions");
    assert!(checked > 50);
}

#[test]
fn caps_bound_rows_and_instructions() {
    let Some(data) = read(LIBZ) else { return };
    let small = Limits {
        max_rows: 100,
        ..Limits::default()
    };
    assert!(matches!(
        compile_elf(&data, &small),
        Err(UnwindTableError::TooManyRows { max_rows: 100 })
    ));
    let terse = Limits {
        max_instructions_per_fde: 3,
        ..Limits::default()
    };
    let table = compile_elf(&data, &terse).unwrap();
    let full = compile_elf(&data, &Limits::default()).unwrap();
    assert!(table.stats().skipped_fdes > 0);
    assert_eq!(
        table.stats().fdes + table.stats().skipped_fdes,
        full.stats().fdes
    );
    assert_well_formed(&table, &terse);
}

fn eh_frame_of(data: &[u8]) -> (Vec<u8>, u64) {
    let file = object::File::parse(data).unwrap();
    let section = file.section_by_name(".eh_frame").unwrap();
    (
        object::ObjectSection::data(&section).unwrap().to_vec(),
        object::ObjectSection::address(&section),
    )
}

#[test]
fn corrupt_input_gives_an_error_or_a_partial_table() {
    let Some(data) = read(LIBZ) else { return };
    let limits = Limits::default();
    let (eh_frame, address) = eh_frame_of(&data);
    let whole = compile_eh_frame(&eh_frame, address, &limits).unwrap();
    assert_eq!(
        whole.rows(),
        compile_elf(&data, &limits).unwrap().rows(),
        "a bare section compiles as in its ELF"
    );
    let check = |bytes: &[u8]| {
        if let Ok(table) = compile_eh_frame(bytes, address, &limits) {
            assert_well_formed(&table, &limits);
        }
        if let Ok(table) = compile_elf(bytes, &limits) {
            assert_well_formed(&table, &limits);
        }
    };
    // Truncated anywhere: the FDEs before the cut survive, the cut one is skipped.
    for len in (0..eh_frame.len()).step_by(7) {
        check(&eh_frame[..len]);
    }
    let half = compile_eh_frame(&eh_frame[..eh_frame.len() / 2], address, &limits).unwrap();
    assert!(half.stats().fdes > 0 && half.stats().fdes < whole.stats().fdes);
    assert!(half.stats().skipped_fdes <= 1);
    // A truncated ELF.
    for len in [0, 16, 64, 4096, data.len() / 2] {
        check(&data[..len]);
    }
    // Random bytes, and random bytes over the real section (bit flips in the CFI).
    let mut rng = fastrand::Rng::with_seed(15);
    for _ in 0..300 {
        let random: Vec<u8> = (0..rng.usize(0..512)).map(|_| rng.u8(..)).collect();
        check(&random);
        let mut flipped = eh_frame.clone();
        for _ in 0..rng.usize(1..8) {
            let i = rng.usize(..flipped.len());
            flipped[i] ^= 1 << rng.u8(0..8);
        }
        check(&flipped);
    }
    // Huge declared lengths, 32- and 64-bit.
    let mut huge = eh_frame.clone();
    huge[..4].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
    let table = compile_eh_frame(&huge, address, &limits).unwrap();
    assert_eq!(table.rows().len(), 0);
    assert_eq!(table.stats().skipped_fdes, 1);
    let mut huge64 = vec![0xff, 0xff, 0xff, 0xff];
    huge64.extend_from_slice(&u64::MAX.to_le_bytes());
    huge64.extend_from_slice(&eh_frame);
    check(&huge64);
    // The second FDE's length points past the end: the first FDE survives.
    let mut second = eh_frame.clone();
    let cie_len = u32::from_le_bytes(eh_frame[..4].try_into().unwrap()) as usize + 4;
    let fde_len = u32::from_le_bytes(eh_frame[cie_len..cie_len + 4].try_into().unwrap()) as usize;
    let next = cie_len + 4 + fde_len;
    second[next..next + 4].copy_from_slice(&0x7fff_0000u32.to_le_bytes());
    let table = compile_eh_frame(&second, address, &limits).unwrap();
    assert_eq!(table.stats().fdes, 1);
    assert_eq!(table.stats().skipped_fdes, 1);
    assert!(matches!(
        compile_eh_frame(&[], address, &limits),
        Err(UnwindTableError::NoUnwindInfo)
    ));
}
