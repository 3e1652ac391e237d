//! The user-space stack frame shared by every producer of frames (kernel and native symbolizers,
//! the Python support) and every consumer (aggregation, pprof, flame graph, top table).
//!
//! Stacks are `Vec<Frame>` ordered **innermost first** (leaf at index 0, root last), the order
//! in which the kernel reports return addresses.
use std::{fmt, sync::Arc};

/// Where a frame comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrameKind {
    /// A kernel function (symbolized from `/proc/kallsyms`).
    Kernel,
    /// A native user-space function (ELF symbols / DWARF).
    Native,
    /// A Python function (from a CPython code object).
    Python,
}

impl FrameKind {
    /// Short lower-case name, used in labels and the top table.
    pub fn as_str(self) -> &'static str {
        match self {
            FrameKind::Kernel => "kernel",
            FrameKind::Native => "native",
            FrameKind::Python => "python",
        }
    }
}

/// One symbolized frame.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frame {
    pub kind: FrameKind,
    /// Demangled function name. Unresolved frames use `module+0xoffset` (see [`Frame::unresolved`]).
    pub function: Arc<str>,
    /// Source file, when known (DWARF for native frames, `co_filename` for Python).
    pub file: Option<Arc<str>>,
    /// Source line, 0 when unknown.
    pub line: u32,
    /// The mapping the code belongs to: an ELF path, `[kernel.kallsyms]`, `[vdso]`, …
    pub module: Option<Arc<str>>,
    /// Kernel frames: the offset in the function (never the kernel address). Native frames: the file offset inside `module` (stable
    /// across processes and ASLR). Python frames: the code object address (informational).
    pub address: u64,
    /// The frame is an inlined call inside the next (outer) frame.
    pub inlined: bool,
}

impl Frame {
    /// A frame with a resolved function name and no source information.
    pub fn new(kind: FrameKind, function: impl Into<Arc<str>>) -> Self {
        Frame {
            kind,
            function: function.into(),
            file: None,
            line: 0,
            module: None,
            address: 0,
            inlined: false,
        }
    }

    /// A Python frame (`function` in `file` at `line`).
    pub fn python(function: impl Into<Arc<str>>, file: impl Into<Arc<str>>, line: u32) -> Self {
        Frame {
            file: Some(file.into()),
            line,
            ..Frame::new(FrameKind::Python, function)
        }
    }

    /// An address that could not be symbolized: named `module+0xoffset` (or `[unknown]+0x…`).
    pub fn unresolved(kind: FrameKind, module: Option<Arc<str>>, address: u64) -> Self {
        let base = module
            .as_deref()
            .map(|m| m.rsplit('/').next().unwrap_or(m).to_owned())
            .unwrap_or_else(|| "[unknown]".to_owned());
        Frame {
            module,
            address,
            ..Frame::new(kind, format!("{base}+{address:#x}"))
        }
    }

    /// `file:line`, `file`, or the module when no source is known.
    pub fn location(&self) -> String {
        match (&self.file, self.line) {
            (Some(f), 0) => f.to_string(),
            (Some(f), l) => format!("{f}:{l}"),
            (None, _) => self.module.as_deref().unwrap_or("").to_owned(),
        }
    }
}

impl fmt::Display for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.function)?;
        let loc = self.location();
        if !loc.is_empty() {
            write!(f, " ({loc})")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unresolved_frames_keep_module_and_offset() {
        let f = Frame::unresolved(
            FrameKind::Native,
            Some("/usr/lib/libfoo.so.1".into()),
            0x1a2b,
        );
        assert_eq!(&*f.function, "libfoo.so.1+0x1a2b");
        assert_eq!(f.location(), "/usr/lib/libfoo.so.1");
        let f = Frame::unresolved(FrameKind::Native, None, 0x10);
        assert_eq!(&*f.function, "[unknown]+0x10");
    }

    #[test]
    fn python_frames_show_file_and_line() {
        let f = Frame::python("handler", "app.py", 42);
        assert_eq!(f.to_string(), "handler (app.py:42)");
        assert_eq!(f.kind.as_str(), "python");
    }
}
