//! The modules (executables, shared objects) a profile's frames come from, for pprof mappings
//! and build ids.
use std::sync::Arc;

/// Identity of a module: its GNU build id (hex) when present, else its path.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ModuleId {
    BuildId(Arc<str>),
    Path(Arc<str>),
}

impl ModuleId {
    /// Hex-encodes a build id.
    pub fn from_build_id(bytes: &[u8]) -> Self {
        use std::fmt::Write as _;
        let mut s = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            let _ = write!(s, "{b:02x}");
        }
        ModuleId::BuildId(s.into())
    }

    /// The build id, hex encoded, if this identity is one.
    pub fn build_id(&self) -> Option<&str> {
        match self {
            ModuleId::BuildId(b) => Some(b),
            ModuleId::Path(_) => None,
        }
    }
}

/// A file-backed module seen in some process (for pprof mappings).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleInfo {
    /// Path as the process sees it (`/proc/<pid>/maps`).
    pub path: Arc<str>,
    pub id: ModuleId,
}
