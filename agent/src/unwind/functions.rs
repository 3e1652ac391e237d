//! Function ranges from the FDEs: which function an unsymbolized address belongs to.
//!
//! Every FDE covers one function (or one of its split parts, such as `foo.cold`), so the
//! symbolizer can name an address of a stripped library by its function's start
//! (`libz.so.1+0x4a00`) and aggregate the samples of a whole function under one name.

/// Sorted, non-overlapping `[start, end)` ranges of the FDEs a table was compiled from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FunctionStarts {
    ranges: Vec<(u64, u64)>,
}

impl FunctionStarts {
    /// From ranges sorted by start that do not overlap (what the table compiler keeps).
    pub(super) fn from_sorted(ranges: Vec<(u64, u64)>) -> FunctionStarts {
        debug_assert!(ranges.windows(2).all(|w| w[0].1 <= w[1].0));
        FunctionStarts { ranges }
    }

    /// The start of the function that contains `pc` (`None`: no FDE covers it).
    pub fn function_start(&self, pc: u64) -> Option<u64> {
        let after = self.ranges.partition_point(|&(start, _)| start <= pc);
        let (start, end) = *self.ranges.get(after.checked_sub(1)?)?;
        (pc < end).then_some(start)
    }

    /// The function starts, ascending.
    pub fn starts(&self) -> impl ExactSizeIterator<Item = u64> + '_ {
        self.ranges.iter().map(|&(start, _)| start)
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_finds_the_covering_range_only() {
        let f = FunctionStarts::from_sorted(vec![(0x10, 0x20), (0x20, 0x28), (0x30, 0x40)]);
        assert_eq!(f.function_start(0x0f), None);
        assert_eq!(f.function_start(0x10), Some(0x10));
        assert_eq!(f.function_start(0x1f), Some(0x10));
        assert_eq!(f.function_start(0x20), Some(0x20));
        assert_eq!(f.function_start(0x2c), None, "padding between functions");
        assert_eq!(f.function_start(0x3f), Some(0x30));
        assert_eq!(f.function_start(0x40), None);
        assert_eq!(f.function_start(u64::MAX), None);
        assert_eq!(FunctionStarts::default().function_start(0), None);
        assert_eq!(f.starts().collect::<Vec<_>>(), [0x10, 0x20, 0x30]);
    }
}
