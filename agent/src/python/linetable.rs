//! Instruction offset → source line, for the three line-table formats of CPython 3.8+.
//!
//! * ≤ 3.9 `co_lnotab`: pairs `(byte increment: u8, line increment: i8)`; `lasti` in bytes.
//! * 3.10 `co_linetable` (PEP 626): pairs `(byte length: u8, line delta: i8)`, −128 = no line;
//!   `lasti` in code units (2 bytes).
//! * 3.11+ location table (`Objects/locations.md`): one entry per run of code units, with a
//!   header byte `1 cccc lll` (code, length − 1) followed by varints; `lasti` in code units.

use super::layout::LineTableKind;

/// The line of the instruction at `lasti` (the version's unit), or `None` when the table says
/// the instruction has no line. `lasti == None` (not started) is the first line.
pub fn line_for(
    kind: LineTableKind,
    table: &[u8],
    firstlineno: u32,
    lasti: Option<u32>,
) -> Option<u32> {
    let Some(lasti) = lasti else {
        // Line 0 is no line (a code object read from a target may say anything).
        return Some(firstlineno).filter(|&l| l > 0);
    };
    let line = match kind {
        LineTableKind::Lnotab => Some(lnotab(table, firstlineno as i64, lasti as i64)),
        LineTableKind::LineTable310 => linetable310(table, firstlineno as i64, lasti as i64 * 2),
        LineTableKind::Locations => locations(table, firstlineno as i64, lasti as i64),
    };
    line.filter(|&l| l > 0 && l < u32::MAX as i64)
        .map(|l| l as u32)
}

/// ≤ 3.9: `PyCode_Addr2Line`.
fn lnotab(table: &[u8], first: i64, lasti_bytes: i64) -> i64 {
    let mut line = first;
    let mut addr = 0i64;
    for pair in table.chunks_exact(2) {
        addr += pair[0] as i64;
        if addr > lasti_bytes {
            break;
        }
        line += pair[1] as i8 as i64;
    }
    line
}

/// 3.10: address ranges `[start, end)` in bytes with a line (or none).
fn linetable310(table: &[u8], first: i64, lasti_bytes: i64) -> Option<i64> {
    let mut line = first;
    let mut end = 0i64;
    for pair in table.chunks_exact(2) {
        let start = end;
        end += pair[0] as i64;
        let delta = pair[1] as i8;
        let this_line = if delta == -128 {
            None
        } else {
            line += delta as i64;
            Some(line)
        };
        if start <= lasti_bytes && lasti_bytes < end {
            return this_line;
        }
    }
    None
}

fn varint(table: &[u8], pos: &mut usize) -> Option<u64> {
    let mut val = 0u64;
    let mut shift = 0;
    loop {
        let b = *table.get(*pos)?;
        *pos += 1;
        val |= ((b & 63) as u64) << shift;
        shift += 6;
        if b & 64 == 0 || shift > 60 {
            return Some(val);
        }
    }
}

fn svarint(table: &[u8], pos: &mut usize) -> Option<i64> {
    let v = varint(table, pos)?;
    Some(if v & 1 != 0 {
        -((v >> 1) as i64)
    } else {
        (v >> 1) as i64
    })
}

/// 3.11+: the location table.
fn locations(table: &[u8], first: i64, lasti: i64) -> Option<i64> {
    let mut line = first;
    let mut addr = 0i64;
    let mut pos = 0usize;
    while pos < table.len() {
        let head = table[pos];
        pos += 1;
        if head & 0x80 == 0 {
            // Not an entry start: a corrupt or misaligned table.
            return None;
        }
        let code = (head >> 3) & 15;
        let len = (head & 7) as i64 + 1;
        let this_line = match code {
            15 => None,
            14 => {
                line = line.wrapping_add(svarint(table, &mut pos)?);
                varint(table, &mut pos)?; // end line delta
                varint(table, &mut pos)?; // column + 1
                varint(table, &mut pos)?; // end column + 1
                Some(line)
            }
            13 => {
                line = line.wrapping_add(svarint(table, &mut pos)?);
                Some(line)
            }
            10..=12 => {
                line = line.wrapping_add((code - 10) as i64);
                pos += 2; // column, end column
                Some(line)
            }
            _ => {
                pos += 1; // column (short form)
                Some(line)
            }
        };
        if addr <= lasti && lasti < addr + len {
            return this_line;
        }
        addr += len;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lnotab_basic() {
        // def f():          line 1
        //     a = 1         line 2, bytes 0..4
        //     b = 2         line 3, bytes 4..8
        let t = [0u8, 1, 4, 1];
        assert_eq!(line_for(LineTableKind::Lnotab, &t, 1, Some(0)), Some(2));
        assert_eq!(line_for(LineTableKind::Lnotab, &t, 1, Some(3)), Some(2));
        assert_eq!(line_for(LineTableKind::Lnotab, &t, 1, Some(6)), Some(3));
        assert_eq!(line_for(LineTableKind::Lnotab, &t, 1, None), Some(1));
        // Found by fuzzing (linetable): a code object whose first line is 0, not started.
        assert_eq!(line_for(LineTableKind::Lnotab, &t, 0, None), None);
        // negative increments (loops jumping back)
        let t = [0u8, 2, 6, 0xff];
        assert_eq!(line_for(LineTableKind::Lnotab, &t, 10, Some(7)), Some(11));
    }

    #[test]
    fn linetable310_basic() {
        // 4 bytes on line first+1, 6 bytes without line, 2 bytes on first+3.
        let t = [4u8, 1, 6, 0x80, 2, 2];
        assert_eq!(
            line_for(LineTableKind::LineTable310, &t, 5, Some(0)),
            Some(6)
        );
        assert_eq!(
            line_for(LineTableKind::LineTable310, &t, 5, Some(1)),
            Some(6)
        );
        assert_eq!(line_for(LineTableKind::LineTable310, &t, 5, Some(2)), None);
        assert_eq!(
            line_for(LineTableKind::LineTable310, &t, 5, Some(5)),
            Some(8)
        );
    }

    #[test]
    fn locations_that_run_past_any_line_are_no_line() {
        // Found by fuzzing (linetable): a delta to near i64::MAX, then a one-line entry (code
        // 12: +2) overflowed.
        let varint = |mut v: u64| {
            let mut out = Vec::new();
            loop {
                let b = (v & 63) as u8;
                v >>= 6;
                if v == 0 {
                    out.push(b);
                    return out;
                }
                out.push(b | 64);
            }
        };
        let mut t = vec![0x80 | 13 << 3];
        t.extend(varint((i64::MAX as u64 - 100) << 1));
        t.extend([0x80 | 12 << 3, 0, 0]);
        assert_eq!(line_for(LineTableKind::Locations, &t, 100, Some(1)), None);
    }

    #[test]
    fn locations_basic() {
        // entry 1: code 13 (no column), len 1, line delta +1 (svarint 2)
        // entry 2: code 0 (short), len 3, column byte
        // entry 3: code 11 (one line, +1), len 2, two column bytes
        // entry 4: code 14 (long), len 1, delta -2 (svarint 5), 3 varints
        // entry 5: code 15 (none), len 1
        let t = [
            0x80 | 13 << 3,
            2,
            0x80 | 2,
            7,
            0x80 | 11 << 3 | 1,
            1,
            5,
            0x80 | 14 << 3,
            5,
            0,
            1,
            2,
            0x80 | 15 << 3,
        ];
        let f = |i| line_for(LineTableKind::Locations, &t, 100, Some(i));
        assert_eq!(f(0), Some(101));
        assert_eq!(f(1), Some(101));
        assert_eq!(f(3), Some(101));
        assert_eq!(f(4), Some(102));
        assert_eq!(f(5), Some(102));
        assert_eq!(f(6), Some(100));
        assert_eq!(f(7), None);
        assert_eq!(f(8), None);
    }

    #[test]
    fn varints() {
        let t = [0x40 | 1, 2];
        let mut p = 0;
        assert_eq!(varint(&t, &mut p), Some(1 | 2 << 6));
        assert_eq!(p, 2);
        let t = [3];
        let mut p = 0;
        assert_eq!(svarint(&t, &mut p), Some(-1));
    }
}
