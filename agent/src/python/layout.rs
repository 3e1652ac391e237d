//! CPython struct offsets per version: a table for 3.8–3.12 (x86-64, default GIL build), and
//! `_Py_DebugOffsets` (read from the start of `_PyRuntime`) for 3.13+.
//!
//! Code-object offsets are cross-checked at attach time against `PyCode_Type.tp_members`
//! (`super::process`), which the interpreter itself publishes.

use kprof_common::python::layout as kind;

/// Version triple.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PyVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl PyVersion {
    pub fn from_hex(hex: u64) -> Self {
        Self {
            major: ((hex >> 24) & 0xff) as u32,
            minor: ((hex >> 16) & 0xff) as u32,
            patch: ((hex >> 8) & 0xff) as u32,
        }
    }
    pub fn at_least(&self, major: u32, minor: u32) -> bool {
        (self.major, self.minor) >= (major, minor)
    }
}

impl std::fmt::Display for PyVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Line table flavour of code objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineTableKind {
    /// ≤ 3.9 `co_lnotab`; `lasti` in bytes.
    Lnotab,
    /// 3.10 `co_linetable` (PEP 626); `lasti` in code units.
    LineTable310,
    /// 3.11+ location table; `lasti` in code units.
    Locations,
}

/// Every offset the walkers and the symbolizer need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// One of `kprof_common::python::layout`.
    pub frame_kind: u32,
    // _PyRuntime
    pub rt_interpreters_head: u64,
    /// Offset of the gilstate `Py_tss_t` (`{int initialized; pthread_key_t key}`) in
    /// `_PyRuntime`; a starting guess that detection validates.
    pub rt_autotss: Option<u64>,
    // PyInterpreterState
    pub interp_threads_head: u64,
    // PyThreadState
    pub ts_next: u64,
    pub ts_frame: u64,
    pub cframe_current_frame: u64,
    pub ts_thread_id: u64,
    pub ts_native_thread_id: Option<u64>,
    // frames
    pub frame_back: u64,
    pub frame_code: u64,
    pub frame_lasti: u64,
    pub frame_owner: Option<u64>,
    pub shim_owner: u32,
    pub code_mask: u64,
    // PyCodeObject
    pub co_filename: u64,
    pub co_name: u64,
    pub co_qualname: Option<u64>,
    pub co_firstlineno: u64,
    pub co_linetable: u64,
    pub co_code_adaptive: Option<u64>,
    pub line_table: LineTableKind,
    // strings
    pub ascii_data: u64,
    pub compact_data: u64,
    pub bytes_size: u64,
    pub bytes_data: u64,
}

/// The table for 3.8–3.12 (x86-64, GIL build, one layout per minor).
pub fn table(minor: u32) -> Option<Layout> {
    let old = |lasti: u64, tss: u64, linetable: LineTableKind, co_linetable: u64| Layout {
        frame_kind: kind::FRAME_OBJECT,
        rt_interpreters_head: 32,
        rt_autotss: Some(tss),
        interp_threads_head: 8,
        ts_next: 8,
        ts_frame: 24,
        cframe_current_frame: 0,
        ts_thread_id: 176,
        ts_native_thread_id: None,
        frame_back: 24,
        frame_code: 32,
        frame_lasti: lasti,
        frame_owner: None,
        shim_owner: u32::MAX,
        code_mask: !0,
        co_filename: 104,
        co_name: 112,
        co_qualname: None,
        co_firstlineno: 40,
        co_linetable,
        co_code_adaptive: None,
        line_table: linetable,
        ascii_data: 48,
        compact_data: 72,
        bytes_size: 16,
        bytes_data: 32,
    };
    match minor {
        8 => Some(old(104, 1392, LineTableKind::Lnotab, 120)),
        9 => Some(old(104, 584, LineTableKind::Lnotab, 120)),
        10 => Some(old(96, 584, LineTableKind::LineTable310, 120)),
        11 => Some(Layout {
            frame_kind: kind::CFRAME_IS_ENTRY,
            rt_interpreters_head: 40,
            rt_autotss: Some(592),
            interp_threads_head: 16,
            ts_next: 8,
            ts_frame: 56,
            cframe_current_frame: 8,
            ts_thread_id: 152,
            ts_native_thread_id: Some(160),
            frame_back: 48,
            frame_code: 32,
            frame_lasti: 56,
            frame_owner: Some(68), // is_entry
            shim_owner: u32::MAX,
            code_mask: !0,
            co_filename: 112,
            co_name: 120,
            co_qualname: Some(128),
            co_firstlineno: 72,
            co_linetable: 136,
            co_code_adaptive: Some(184),
            line_table: LineTableKind::Locations,
            ascii_data: 48,
            compact_data: 72,
            bytes_size: 16,
            bytes_data: 32,
        }),
        12 => Some(Layout {
            frame_kind: kind::CFRAME_OWNER,
            rt_interpreters_head: 40,
            rt_autotss: Some(1544),
            interp_threads_head: 72,
            ts_next: 8,
            ts_frame: 56,
            cframe_current_frame: 0,
            ts_thread_id: 136,
            ts_native_thread_id: Some(144),
            frame_back: 8,
            frame_code: 0,
            frame_lasti: 56,
            frame_owner: Some(70),
            shim_owner: 3,
            code_mask: !0,
            co_filename: 112,
            co_name: 120,
            co_qualname: Some(128),
            co_firstlineno: 68,
            co_linetable: 136,
            co_code_adaptive: Some(192),
            line_table: LineTableKind::Locations,
            ascii_data: 40,
            compact_data: 56,
            bytes_size: 16,
            bytes_data: 32,
        }),
        _ => None,
    }
}

/// Known `autoTSSkey` offsets in `_PyRuntime` for versions whose layout otherwise comes from
/// `_Py_DebugOffsets` (which does not publish it). Validated at attach time, and searched for
/// when wrong.
pub fn autotss_guess(minor: u32) -> Option<u64> {
    match minor {
        13 => Some(2160),
        14 => Some(2336),
        _ => None,
    }
}

/// The `_Py_DebugOffsets` cookie.
pub const DEBUG_COOKIE: &[u8; 8] = b"xdebugpy";

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    b.get(off..off + 8)
        .map(|s| u64::from_le_bytes(s.try_into().unwrap()))
}

/// Parse `_Py_DebugOffsets` (3.13 and 3.14 layouts) from the first bytes of `_PyRuntime`.
/// Returns the version (`PY_VERSION_HEX`) and the layout, or why not.
pub fn from_debug_offsets(b: &[u8]) -> Result<(u64, Layout), String> {
    if b.len() < 800 {
        return Err("short _Py_DebugOffsets read".into());
    }
    if &b[..8] != DEBUG_COOKIE {
        return Err("no _Py_DebugOffsets cookie at _PyRuntime".into());
    }
    let g = |off: usize| u64_at(b, off).unwrap_or(0);
    let version = g(8);
    let v = PyVersion::from_hex(version);
    if g(16) != 0 {
        return Err(format!("free-threaded CPython {v} is not supported"));
    }
    // Byte positions of the fields inside _Py_DebugOffsets, per minor version.
    struct P {
        interp_head: usize,
        threads_head: usize,
        ts_next: usize,
        ts_current_frame: usize,
        ts_thread_id: usize,
        ts_native_thread_id: usize,
        fr_previous: usize,
        fr_executable: usize,
        fr_instr_ptr: usize,
        fr_owner: usize,
        co_filename: usize,
        co_name: usize,
        co_qualname: usize,
        co_linetable: usize,
        co_firstlineno: usize,
        co_code_adaptive: usize,
        bytes_ob_size: usize,
        bytes_ob_sval: usize,
        unicode_ascii_size: usize,
        shim_owner: u32,
        code_mask: u64,
    }
    let p = match (v.major, v.minor) {
        (3, 13) => P {
            interp_head: 40,
            threads_head: 72,
            ts_next: 168,
            ts_current_frame: 184,
            ts_thread_id: 192,
            ts_native_thread_id: 200,
            fr_previous: 232,
            fr_executable: 240,
            fr_instr_ptr: 248,
            fr_owner: 264,
            co_filename: 280,
            co_name: 288,
            co_qualname: 296,
            co_linetable: 304,
            co_firstlineno: 312,
            co_code_adaptive: 344,
            bytes_ob_size: 520,
            bytes_ob_sval: 528,
            unicode_ascii_size: 560,
            shim_owner: 3,
            code_mask: !0,
        },
        (3, 14) => P {
            interp_head: 40,
            threads_head: 72,
            ts_next: 192,
            ts_current_frame: 208,
            ts_thread_id: 216,
            ts_native_thread_id: 224,
            fr_previous: 256,
            fr_executable: 264,
            fr_instr_ptr: 272,
            fr_owner: 288,
            co_filename: 320,
            co_name: 328,
            co_qualname: 336,
            co_linetable: 344,
            co_firstlineno: 352,
            co_code_adaptive: 384,
            bytes_ob_size: 600,
            bytes_ob_sval: 608,
            unicode_ascii_size: 640,
            shim_owner: 3,
            code_mask: !3,
        },
        _ => return Err(format!("_Py_DebugOffsets layout of CPython {v} is unknown")),
    };
    let ascii = g(p.unicode_ascii_size);
    let layout = Layout {
        frame_kind: kind::CURRENT_FRAME_OWNER,
        rt_interpreters_head: g(p.interp_head),
        rt_autotss: autotss_guess(v.minor),
        interp_threads_head: g(p.threads_head),
        ts_next: g(p.ts_next),
        ts_frame: g(p.ts_current_frame),
        cframe_current_frame: 0,
        ts_thread_id: g(p.ts_thread_id),
        ts_native_thread_id: Some(g(p.ts_native_thread_id)),
        frame_back: g(p.fr_previous),
        frame_code: g(p.fr_executable),
        frame_lasti: g(p.fr_instr_ptr),
        frame_owner: Some(g(p.fr_owner)),
        shim_owner: p.shim_owner,
        code_mask: p.code_mask,
        co_filename: g(p.co_filename),
        co_name: g(p.co_name),
        co_qualname: Some(g(p.co_qualname)),
        co_firstlineno: g(p.co_firstlineno),
        co_linetable: g(p.co_linetable),
        co_code_adaptive: Some(g(p.co_code_adaptive)),
        line_table: LineTableKind::Locations,
        ascii_data: ascii,
        // PyCompactUnicodeObject = PyASCIIObject + utf8_length + utf8.
        compact_data: ascii + 16,
        bytes_size: g(p.bytes_ob_size),
        bytes_data: g(p.bytes_ob_sval),
    };
    // Sanity: every offset must be small; a garbage struct is refused rather than trusted.
    let offs = [
        layout.rt_interpreters_head,
        layout.interp_threads_head,
        layout.ts_frame,
        layout.frame_back,
        layout.frame_lasti,
        layout.co_filename,
        layout.co_firstlineno,
        layout.co_code_adaptive.unwrap_or(0),
    ];
    if offs.iter().any(|&o| o > 1 << 16)
        || layout.frame_owner.unwrap_or(0) > 120
        || ascii == 0
        || ascii > 64
    {
        return Err(format!("implausible _Py_DebugOffsets for CPython {v}"));
    }
    Ok((version, layout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_covers_3_8_to_3_12() {
        for m in 8..=12 {
            assert!(table(m).is_some(), "3.{m}");
        }
        assert!(table(7).is_none());
        assert!(table(13).is_none());
    }

    #[test]
    fn debug_offsets_parse_313() {
        // Values stored in a 3.13.5 .PyRuntime (see docs/research).
        let mut b = vec![0u8; 1024];
        b[..8].copy_from_slice(DEBUG_COOKIE);
        let mut put = |off: usize, v: u64| b[off..off + 8].copy_from_slice(&v.to_le_bytes());
        put(8, 0x030d05f0);
        put(40, 632);
        put(72, 7344);
        put(168, 8);
        put(184, 72);
        put(192, 152);
        put(200, 160);
        put(232, 8);
        put(240, 0);
        put(248, 56);
        put(264, 70);
        put(280, 112);
        put(288, 120);
        put(296, 128);
        put(304, 136);
        put(312, 68);
        put(344, 200);
        put(520, 16);
        put(528, 32);
        put(560, 40);
        let (ver, l) = from_debug_offsets(&b).unwrap();
        assert_eq!(
            PyVersion::from_hex(ver),
            PyVersion {
                major: 3,
                minor: 13,
                patch: 5
            }
        );
        assert_eq!(l.rt_interpreters_head, 632);
        assert_eq!(l.interp_threads_head, 7344);
        assert_eq!(l.ts_frame, 72);
        assert_eq!(l.frame_owner, Some(70));
        assert_eq!(l.co_code_adaptive, Some(200));
        assert_eq!(l.compact_data, 56);
        b[0] = b'y';
        assert!(from_debug_offsets(&b).is_err());
    }

    #[test]
    fn debug_offsets_parse_314() {
        // Values stored in a 3.14.7 .PyRuntime (e2e/testbed/build-cpython.sh; objcopy
        // --only-section=.PyRuntime): the 3.14 struct grew, so every position moved.
        let mut b = vec![0u8; 1024];
        b[..8].copy_from_slice(DEBUG_COOKIE);
        let mut put = |off: usize, v: u64| b[off..off + 8].copy_from_slice(&v.to_le_bytes());
        for (off, v) in [
            (8, 0x030e07f0),
            (40, 808),
            (72, 7344),
            (192, 8),
            (208, 72),
            (216, 152),
            (224, 160),
            (256, 8),
            (264, 0),
            (272, 56),
            (288, 74),
            (320, 112),
            (328, 120),
            (336, 128),
            (344, 136),
            (352, 68),
            (384, 208),
            (600, 16),
            (608, 32),
            (640, 40),
        ] {
            put(off, v);
        }
        let (ver, l) = from_debug_offsets(&b).unwrap();
        assert_eq!(PyVersion::from_hex(ver).to_string(), "3.14.7");
        assert_eq!(l.rt_interpreters_head, 808);
        assert_eq!((l.ts_next, l.ts_frame, l.ts_thread_id), (8, 72, 152));
        assert_eq!(l.ts_native_thread_id, Some(160));
        assert_eq!((l.frame_back, l.frame_code, l.frame_lasti), (8, 0, 56));
        assert_eq!(l.frame_owner, Some(74));
        assert_eq!((l.co_filename, l.co_firstlineno), (112, 68));
        assert_eq!(l.co_code_adaptive, Some(208));
        assert_eq!((l.bytes_size, l.bytes_data), (16, 32));
        assert_eq!((l.ascii_data, l.compact_data), (40, 56));
        // f_executable is a tagged _PyStackRef from 3.14 on.
        assert_eq!(l.code_mask, !3);
        b[16] = 1;
        assert!(
            from_debug_offsets(&b)
                .unwrap_err()
                .contains("free-threaded")
        );
    }
}
