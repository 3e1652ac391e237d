//! Caches of symbolization results, keyed by module identity (ELF build id when the file has
//! one, else path) and file offset, so the same library in many processes is resolved once.
use std::{collections::HashMap, sync::Arc};

use crate::profile::{Frame, ModuleId};

/// Counters of a cache, for the end-of-run report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

/// The most bytes of names a [`SymbolCache`] holds by default: a tenant's binary may carry
/// symbols of any length.
pub const SYMBOL_CACHE_BYTES: usize = 64 << 20;

/// Bounded map (module, offset) → frames (innermost first; several when inlined), by entries
/// and by the bytes of their names.
#[derive(Debug)]
pub struct SymbolCache {
    map: HashMap<(ModuleId, u64), Arc<[Frame]>>,
    capacity: usize,
    bytes: usize,
    max_bytes: usize,
    stats: CacheStats,
}

/// Roughly what an entry holds: its names and paths (shared ones counted each time) and the
/// frames themselves.
fn entry_bytes(frames: &[Frame]) -> usize {
    frames
        .iter()
        .map(|f| {
            std::mem::size_of::<Frame>() + f.function.len() + f.file.as_ref().map_or(0, |s| s.len())
        })
        .sum()
}

impl SymbolCache {
    pub fn new(capacity: usize) -> Self {
        Self::with_limits(capacity, SYMBOL_CACHE_BYTES)
    }

    pub fn with_limits(capacity: usize, max_bytes: usize) -> Self {
        SymbolCache {
            map: HashMap::new(),
            capacity: capacity.max(1),
            bytes: 0,
            max_bytes,
            stats: CacheStats::default(),
        }
    }

    pub fn get(&mut self, module: &ModuleId, offset: u64) -> Option<Arc<[Frame]>> {
        let hit = self.map.get(&(module.clone(), offset)).cloned();
        if hit.is_some() {
            self.stats.hits += 1;
        } else {
            self.stats.misses += 1;
        }
        hit
    }

    /// Inserts a result. When full, the cache is cleared first (simple and bounded; entries are
    /// cheap to recompute while the process lives).
    pub fn insert(&mut self, module: ModuleId, offset: u64, frames: Arc<[Frame]>) {
        let size = entry_bytes(&frames);
        if self.map.len() >= self.capacity || self.bytes + size > self.max_bytes {
            self.stats.evictions += self.map.len() as u64;
            self.map.clear();
            self.bytes = 0;
        }
        if let Some(old) = self.map.insert((module, offset), frames) {
            self.bytes -= entry_bytes(&old);
        }
        self.bytes += size;
    }

    /// Bytes held, as [`SymbolCache`] counts them.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{Frame, FrameKind};

    fn frames(name: &str) -> Arc<[Frame]> {
        vec![Frame::new(FrameKind::Native, name)].into()
    }

    #[test]
    fn bounded_by_the_bytes_of_its_names() {
        let mut c = SymbolCache::with_limits(1 << 20, 1 << 20);
        let m = ModuleId::Path("/bin/x".into());
        let huge = "f".repeat(300 << 10);
        for i in 0..10 {
            c.insert(m.clone(), i, frames(&huge));
            assert!(c.bytes() <= 1 << 20, "{} bytes", c.bytes());
        }
        assert!(c.len() <= 3 && c.stats().evictions >= 7);
        // Replacing an entry does not count it twice.
        let before = c.bytes();
        c.insert(m.clone(), 9, frames(&huge));
        assert_eq!(c.bytes(), before);
    }

    #[test]
    fn build_id_is_hex_and_shared_across_paths() {
        let id = ModuleId::from_build_id(&[0xde, 0xad, 0x01]);
        assert_eq!(id.build_id(), Some("dead01"));
        let mut c = SymbolCache::new(8);
        c.insert(id.clone(), 0x10, frames("f"));
        // The same build id seen through another path (another container) hits.
        let again = ModuleId::from_build_id(&[0xde, 0xad, 0x01]);
        assert_eq!(&*c.get(&again, 0x10).unwrap()[0].function, "f");
        assert!(c.get(&again, 0x11).is_none());
        assert!(c.get(&ModuleId::Path("/x".into()), 0x10).is_none());
        assert_eq!(c.stats().hits, 1);
        assert_eq!(c.stats().misses, 2);
    }

    #[test]
    fn bounded() {
        let mut c = SymbolCache::new(2);
        let m = ModuleId::Path("/bin/x".into());
        c.insert(m.clone(), 1, frames("a"));
        c.insert(m.clone(), 2, frames("b"));
        c.insert(m.clone(), 3, frames("c"));
        assert_eq!(c.len(), 1);
        assert_eq!(c.stats().evictions, 2);
        assert!(c.get(&m, 3).is_some());
    }
}
