//! Splicing Python frames into native stacks.
//!
//! Each activation of the interpreter's eval loop (`_PyEval_EvalFrameDefault`) runs a run of
//! Python frames; the eBPF walker marks the outermost frame of each run with
//! `PYFRAME_RUN_END`. When the native stack is complete enough (it shows at least as many
//! eval-loop frames as there are runs), every eval frame is replaced by its run, so a C
//! extension called from Python shows as Python caller → native callee, and interpreter
//! plumbing between eval frames (`_PyFunction_Vectorcall` …) is dropped. Otherwise — CPython
//! builds without frame pointers make the kernel's user stack stop or go astray in the
//! interpreter — the result is the leaf native frames up to the first frame inside the
//! interpreter, then the Python frames.

use std::sync::Arc;

use kprof_common::python::PYFRAME_RUN_END;

use super::process::PyProcess;
use crate::profile::frame::{Frame, FrameKind};

/// How to recognise the interpreter's native frames.
#[derive(Debug, Clone)]
pub struct InterpreterId {
    /// Basename of the ELF holding the interpreter (`python3.11`, `libpython3.12.so.1.0`).
    pub file: String,
}

impl InterpreterId {
    pub fn of(p: &PyProcess) -> Self {
        Self {
            file: p.file.rsplit('/').next().unwrap_or(&p.file).to_string(),
        }
    }

    /// The frame is an activation of the eval loop.
    pub fn is_eval(&self, f: &Frame) -> bool {
        f.kind == FrameKind::Native && is_eval_name(&f.function)
    }

    /// The frame's code lies in the interpreter's ELF.
    pub fn in_interpreter(&self, f: &Frame) -> bool {
        if f.kind != FrameKind::Native {
            return false;
        }
        if is_eval_name(&f.function) {
            return true;
        }
        f.module
            .as_deref()
            .map(|m| {
                m.trim_end_matches(" (deleted)")
                    .rsplit('/')
                    .next()
                    .unwrap_or(m)
                    == self.file
            })
            .unwrap_or(false)
    }
}

fn is_eval_name(name: &str) -> bool {
    name.starts_with("_PyEval_EvalFrameDefault")
        || name.starts_with("PyEval_EvalFrameEx")
        || name.starts_with("_TAIL_CALL_")
}

/// Marker appended when the Python chain was deeper than the kernel captured.
pub fn truncated_marker() -> Frame {
    Frame::new(
        FrameKind::Python,
        Arc::<str>::from("[truncated python stack]"),
    )
}

/// Merge `native` (innermost first) with the symbolized Python frames `py` (innermost first,
/// with their `PYFRAME_*` flags).
pub fn merge_stacks(
    native: Vec<Frame>,
    py: Vec<(Frame, u32)>,
    truncated: bool,
    interp: Option<&InterpreterId>,
) -> Vec<Frame> {
    // Runs of Python frames, innermost run first.
    let mut runs: Vec<Vec<Frame>> = Vec::new();
    let mut cur = Vec::new();
    for (f, flags) in py {
        cur.push(f);
        if flags & PYFRAME_RUN_END != 0 {
            runs.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        runs.push(cur);
    }
    let mut out = Vec::with_capacity(native.len() + runs.iter().map(Vec::len).sum::<usize>() + 1);
    let Some(interp) = interp else {
        // No interpreter knowledge: native leaves, then Python.
        out.extend(native);
        out.extend(runs.into_iter().flatten());
        if truncated {
            out.push(truncated_marker());
        }
        return out;
    };
    let evals = native.iter().filter(|f| interp.is_eval(f)).count();
    if evals > 0 && evals >= runs.len() {
        let mut runs = runs.into_iter();
        let mut seen_eval = false;
        for f in native {
            if interp.is_eval(&f) {
                seen_eval = true;
                match runs.next() {
                    Some(run) => out.extend(run),
                    None => out.push(f),
                }
            } else if seen_eval && interp.in_interpreter(&f) {
                // Interpreter plumbing between two eval activations.
                continue;
            } else {
                out.push(f);
            }
        }
        out.extend(runs.flatten());
    } else {
        for f in native {
            if interp.in_interpreter(&f) {
                break;
            }
            out.push(f);
        }
        out.extend(runs.into_iter().flatten());
    }
    if truncated {
        out.push(truncated_marker());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nat(name: &str, module: &str) -> Frame {
        let mut f = Frame::new(FrameKind::Native, Arc::<str>::from(name));
        f.module = Some(Arc::from(module));
        f
    }
    fn py(name: &str, flags: u32) -> (Frame, u32) {
        (Frame::python(name, "app.py", 1), flags)
    }
    fn names(v: &[Frame]) -> Vec<String> {
        v.iter().map(|f| f.function.to_string()).collect()
    }

    #[test]
    fn interleaves_when_native_stack_is_complete() {
        let id = InterpreterId {
            file: "libpython3.12.so.1.0".into(),
        };
        let native = vec![
            nat("deflate", "/lib/libz.so.1"),
            nat("zlib_compress", "/x/zlib.cpython-312.so"),
            nat("cfunction_call", "/x/libpython3.12.so.1.0"),
            nat("_PyEval_EvalFrameDefault", "/x/libpython3.12.so.1.0"),
            nat("PyObject_Call", "/x/libpython3.12.so.1.0"),
            nat("ext_callback", "/x/ext.so"),
            nat("_PyEval_EvalFrameDefault", "/x/libpython3.12.so.1.0"),
            nat("Py_RunMain", "/x/libpython3.12.so.1.0"),
            nat("main", "/x/python3.12"),
        ];
        let pyf = vec![
            py("app.compress", 0),
            py("app.work", PYFRAME_RUN_END),
            py("app.<module>", PYFRAME_RUN_END),
        ];
        let m = merge_stacks(native, pyf, false, Some(&id));
        assert_eq!(
            names(&m),
            [
                "deflate",
                "zlib_compress",
                "cfunction_call",
                "app.compress",
                "app.work",
                "ext_callback",
                "app.<module>",
                "main"
            ]
        );
    }

    #[test]
    fn falls_back_without_frame_pointers() {
        let id = InterpreterId {
            file: "python3.11".into(),
        };
        let native = vec![
            nat("deflate", "/lib/libz.so.1"),
            nat("zlib_compress", "/usr/bin/python3.11"),
            nat("garbage", "/usr/bin/python3.11"),
        ];
        let pyf = vec![
            py("app.compress", 0),
            py("app.work", PYFRAME_RUN_END),
            py("app.<module>", PYFRAME_RUN_END),
        ];
        let m = merge_stacks(native, pyf, true, Some(&id));
        assert_eq!(
            names(&m),
            [
                "deflate",
                "app.compress",
                "app.work",
                "app.<module>",
                "[truncated python stack]"
            ]
        );
    }
}
