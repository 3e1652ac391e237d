//! The x86-64 unwind rules a row can hold, and their translation from gimli's evaluated CFI.
//!
//! Only what the kernel row ([`kprof_common::unwind::UnwindRow`]) can express is kept; every
//! other rule becomes `Unsupported`, so the unwinder knows to fall back or stop there.

use gimli::{CfaRule, Reader, Register, RegisterRule, UnwindSection, UnwindTableRow, X86_64};
use kprof_common::unwind as abi;

/// How the canonical frame address (the caller's RSP) is found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cfa {
    /// No FDE covers the address.
    NoInfo,
    /// RSP + offset.
    Rsp(u16),
    /// RBP + offset.
    Rbp(u16),
    /// RSP + 8 + ((RIP & 15) >= threshold ? 8 : 0): lazy-binding PLT entries.
    Plt { threshold: u8 },
    /// *(RBP + offset): the CFA saved below the frame pointer of a function that realigns its
    /// stack (`DW_OP_breg6 (rbp) N; DW_OP_deref`).
    DerefRbp(i16),
    /// The return address is undefined: the outermost frame.
    EndOfStack,
    /// Not expressible in a row (a DWARF expression, another register, an offset out of range,
    /// a return address not at CFA − 8).
    Unsupported,
}

/// Where the caller's RBP is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SavedRbp {
    /// RBP was not changed by the function (or not yet saved).
    Unchanged,
    /// Saved at CFA + this many bytes (a multiple of 8 in `-1024..=1016`).
    AtCfa(i16),
    /// Saved at RBP + this many bytes (`DW_CFA_expression: rbp (DW_OP_breg6 (rbp) N)`, with a
    /// realigned stack; a multiple of 8 in `-1024..=1016`).
    AtRbp(i16),
    /// Not expressible: the caller's RBP is unknown.
    Unsupported,
}

/// The rules of one address range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    pub cfa: Cfa,
    pub rbp: SavedRbp,
}

impl Rule {
    /// No unwind information.
    pub const NO_INFO: Rule = Rule {
        cfa: Cfa::NoInfo,
        rbp: SavedRbp::Unchanged,
    };

    /// A rule whose RBP part is dropped when the CFA cannot be used, so that rows compare (and
    /// merge) by what the unwinder can do with them.
    pub fn new(cfa: Cfa, rbp: SavedRbp) -> Rule {
        let rbp = match cfa {
            Cfa::Rsp(_) | Cfa::Rbp(_) | Cfa::Plt { .. } | Cfa::DerefRbp(_) => rbp,
            Cfa::NoInfo | Cfa::EndOfStack | Cfa::Unsupported => SavedRbp::Unchanged,
        };
        Rule { cfa, rbp }
    }

    /// The kernel row of this rule at `pc` (an offset from the table's base).
    pub fn to_kernel_row(self, pc: u32) -> abi::UnwindRow {
        let (cfa_type, cfa_offset) = match self.cfa {
            Cfa::NoInfo => (abi::CFA_NO_INFO, 0),
            Cfa::Rsp(off) => (abi::CFA_RSP, off),
            Cfa::Rbp(off) => (abi::CFA_RBP, off),
            Cfa::Plt { threshold } => (abi::CFA_PLT, u16::from(threshold)),
            // The kernel reads it back as i16.
            Cfa::DerefRbp(off) => (abi::CFA_DEREF_RBP, off as u16),
            Cfa::EndOfStack => (abi::CFA_END_OF_STACK, 0),
            Cfa::Unsupported => (abi::CFA_UNSUPPORTED, 0),
        };
        let (rbp_type, rbp_offset) = match self.rbp {
            SavedRbp::Unchanged => (abi::RBP_UNCHANGED, 0),
            // In range by construction (see `saved_rbp`).
            SavedRbp::AtCfa(bytes) => (abi::RBP_AT_CFA, (bytes / 8) as i8),
            SavedRbp::AtRbp(bytes) => (abi::RBP_AT_RBP, (bytes / 8) as i8),
            SavedRbp::Unsupported => (abi::RBP_UNSUPPORTED, 0),
        };
        abi::UnwindRow {
            pc,
            cfa_offset,
            rbp_offset,
            kinds: abi::UnwindRow::pack_kinds(cfa_type, rbp_type),
        }
    }
}

/// The rule of one evaluated CFI row.
pub fn classify<R: Reader, S: UnwindSection<R>>(
    section: &S,
    row: &UnwindTableRow<R::Offset>,
) -> Rule {
    let cfa = match return_address(row.register(X86_64::RA)) {
        ReturnAddress::BelowCfa => cfa(section, row.cfa()),
        ReturnAddress::Undefined => Cfa::EndOfStack,
        ReturnAddress::Elsewhere => Cfa::Unsupported,
    };
    let rbp = match row.register(X86_64::RBP) {
        Some(RegisterRule::Expression(ref e)) => expression_bytes(section, e)
            .and_then(|b| breg6(&b, false))
            .and_then(slot_bytes)
            .map_or(SavedRbp::Unsupported, SavedRbp::AtRbp),
        other => saved_rbp(other),
    };
    Rule::new(cfa, rbp)
}

/// The bytes of an expression in `section`.
fn expression_bytes<R: Reader, S: UnwindSection<R>>(
    section: &S,
    e: &gimli::UnwindExpression<R::Offset>,
) -> Option<Vec<u8>> {
    let expression = e.get(section).ok()?;
    Some(expression.0.to_slice().ok()?.into_owned())
}

/// N of `DW_OP_breg6 (rbp) N` (followed by `DW_OP_deref` when `deref`), N a one- or two-byte
/// SLEB128.
fn breg6(expression: &[u8], deref: bool) -> Option<i16> {
    const DW_OP_BREG6: u8 = 0x76;
    const DW_OP_DEREF: u8 = 0x06;
    let (&op, rest) = expression.split_first()?;
    if op != DW_OP_BREG6 {
        return None;
    }
    let (value, used) = match *rest {
        [b0, ..] if b0 & 0x80 == 0 => (i64::from(((b0 << 1) as i8) >> 1), 1),
        [b0, b1, ..] if b1 & 0x80 == 0 => {
            let raw = i64::from(b0 & 0x7f) | (i64::from(b1 & 0x7f) << 7);
            // Sign-extend from 14 bits.
            ((raw << 50) >> 50, 2)
        }
        _ => return None,
    };
    let tail = &rest[used..];
    let ok = if deref {
        tail == [DW_OP_DEREF]
    } else {
        tail.is_empty()
    };
    ok.then_some(i16::try_from(value).ok()?)
}

/// `bytes` when it is a whole 8-byte slot offset that a row holds.
fn slot_bytes(bytes: i16) -> Option<i16> {
    (bytes % 8 == 0 && i8::try_from(bytes / 8).is_ok()).then_some(bytes)
}

enum ReturnAddress {
    /// At CFA − 8, where `call` put it.
    BelowCfa,
    /// Explicitly undefined (`.cfi_undefined rip`): the outermost frame.
    Undefined,
    Elsewhere,
}

fn return_address<T: gimli::ReaderOffset>(rule: Option<RegisterRule<T>>) -> ReturnAddress {
    match rule {
        Some(RegisterRule::Offset(-8)) => ReturnAddress::BelowCfa,
        Some(RegisterRule::Undefined) => ReturnAddress::Undefined,
        _ => ReturnAddress::Elsewhere,
    }
}

fn cfa<R: Reader, S: UnwindSection<R>>(section: &S, rule: &CfaRule<R::Offset>) -> Cfa {
    match *rule {
        CfaRule::RegisterAndOffset { register, offset } => {
            let Ok(offset) = u16::try_from(offset) else {
                return Cfa::Unsupported;
            };
            match register {
                X86_64::RSP => Cfa::Rsp(offset),
                X86_64::RBP => Cfa::Rbp(offset),
                _ => Cfa::Unsupported,
            }
        }
        CfaRule::Expression(ref expression) => {
            let Ok(expression) = expression.get(section) else {
                return Cfa::Unsupported;
            };
            let Ok(bytes) = expression.0.to_slice() else {
                return Cfa::Unsupported;
            };
            if let Some(offset) = breg6(&bytes, true) {
                return Cfa::DerefRbp(offset);
            }
            plt_threshold(&bytes).map_or(Cfa::Unsupported, |threshold| Cfa::Plt { threshold })
        }
    }
}

/// The threshold K of binutils' PLT expression
/// `DW_OP_breg7 (rsp) 8; DW_OP_breg16 (rip) 0; DW_OP_lit15; DW_OP_and; DW_OP_litK; DW_OP_ge;
/// DW_OP_lit3; DW_OP_shl; DW_OP_plus`: RSP + 8, plus 8 once the entry's `push` has run (K is
/// where the `push` ends in the 16-byte entry: 11 for the classic PLT; binutils' other PLT
/// layouts write other values).
fn plt_threshold(expression: &[u8]) -> Option<u8> {
    const DW_OP_LIT0: u8 = 0x30;
    match *expression {
        [
            0x77,
            0x08,
            0x80,
            0x00,
            0x3f,
            0x1a,
            lit,
            0x2a,
            0x33,
            0x24,
            0x22,
        ] if (DW_OP_LIT0 + 1..=DW_OP_LIT0 + 15).contains(&lit) => Some(lit - DW_OP_LIT0),
        _ => None,
    }
}

fn saved_rbp<T: gimli::ReaderOffset>(rule: Option<RegisterRule<T>>) -> SavedRbp {
    match rule {
        None | Some(RegisterRule::SameValue) => SavedRbp::Unchanged,
        Some(RegisterRule::Register(Register(6))) => SavedRbp::Unchanged,
        Some(RegisterRule::Offset(bytes)) => match i16::try_from(bytes) {
            Ok(b) if b % 8 == 0 && i8::try_from(b / 8).is_ok() => SavedRbp::AtCfa(b),
            _ => SavedRbp::Unsupported,
        },
        Some(_) => SavedRbp::Unsupported,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plt_expression_is_recognized_with_its_threshold() {
        let classic = [
            0x77, 0x08, 0x80, 0x00, 0x3f, 0x1a, 0x3b, 0x2a, 0x33, 0x24, 0x22,
        ];
        assert_eq!(plt_threshold(&classic), Some(11));
        let mut lit10 = classic;
        lit10[6] = 0x3a;
        assert_eq!(plt_threshold(&lit10), Some(10));
        let mut other_base = classic;
        other_base[1] = 0x10;
        assert_eq!(plt_threshold(&other_base), None);
        assert_eq!(plt_threshold(&classic[..10]), None);
        assert_eq!(plt_threshold(&[]), None);
    }

    #[test]
    fn realigned_stack_expressions_are_recognized() {
        // DW_OP_breg6 (rbp) -40; DW_OP_deref
        assert_eq!(breg6(&[0x76, 0x58, 0x06], true), Some(-40));
        assert_eq!(breg6(&[0x76, 0x78, 0x06], true), Some(-8));
        // DW_OP_breg6 (rbp) 0, the saved-RBP form.
        assert_eq!(breg6(&[0x76, 0x00], false), Some(0));
        // Two-byte SLEB128: -200 and 300.
        assert_eq!(breg6(&[0x76, 0xb8, 0x7e], false), Some(-200));
        assert_eq!(breg6(&[0x76, 0xac, 0x02], false), Some(300));
        assert_eq!(breg6(&[0x76, 0x58], true), None, "no deref");
        assert_eq!(breg6(&[0x76, 0x58, 0x06], false), None, "a deref too many");
        assert_eq!(breg6(&[0x77, 0x58, 0x06], true), None, "rsp, not rbp");
        assert_eq!(breg6(&[0x76], true), None);
        assert_eq!(slot_bytes(-16), Some(-16));
        assert_eq!(slot_bytes(-12), None);
        let row = Rule::new(Cfa::DerefRbp(-40), SavedRbp::AtRbp(0)).to_kernel_row(0);
        assert_eq!(row.cfa_type(), abi::CFA_DEREF_RBP);
        assert_eq!(row.cfa_offset as i16, -40);
        assert_eq!((row.rbp_type(), row.rbp_offset), (abi::RBP_AT_RBP, 0));
    }

    #[test]
    fn rbp_offsets_outside_a_slot_are_unsupported() {
        assert_eq!(
            saved_rbp::<usize>(Some(RegisterRule::Offset(-16))),
            SavedRbp::AtCfa(-16)
        );
        assert_eq!(
            saved_rbp::<usize>(Some(RegisterRule::Offset(-12))),
            SavedRbp::Unsupported
        );
        assert_eq!(
            saved_rbp::<usize>(Some(RegisterRule::Offset(-8 * 129))),
            SavedRbp::Unsupported
        );
        assert_eq!(saved_rbp::<usize>(None), SavedRbp::Unchanged);
        assert_eq!(
            saved_rbp::<usize>(Some(RegisterRule::Undefined)),
            SavedRbp::Unsupported
        );
    }

    #[test]
    fn kernel_rows_pack_types_and_offsets() {
        let row = Rule::new(Cfa::Rsp(4104), SavedRbp::AtCfa(-48)).to_kernel_row(0x1234);
        assert_eq!(row.pc, 0x1234);
        assert_eq!(row.cfa_type(), abi::CFA_RSP);
        assert_eq!(row.cfa_offset, 4104);
        assert_eq!(row.rbp_type(), abi::RBP_AT_CFA);
        assert_eq!(row.rbp_offset, -6);
        let plt = Rule::new(Cfa::Plt { threshold: 11 }, SavedRbp::Unchanged).to_kernel_row(0);
        assert_eq!((plt.cfa_type(), plt.cfa_offset), (abi::CFA_PLT, 11));
        // An unusable CFA drops the RBP rule: such rows merge by what the unwinder can do.
        let stop = Rule::new(Cfa::Unsupported, SavedRbp::AtCfa(-16));
        assert_eq!(stop, Rule::new(Cfa::Unsupported, SavedRbp::Unchanged));
        assert_eq!(abi::UnwindRow::default().cfa_type(), abi::CFA_NO_INFO);
    }
}
