//! Python thread names: `threading.Thread.name` and the kernel thread id of every thread the
//! `threading` module knows, read from a live CPython 3.8–3.14 (x86-64, GIL builds) with
//! `process_vm_readv` only — the target is never stopped.
//!
//! The path: `sys.modules` (`interp->modules`; 3.12+ `interp->imports.modules`) →
//! `["threading"]` → its `__dict__["_active"]` (ident → Thread, the main thread included) →
//! each Thread's instance attributes `_name` (str) and `_native_id` (int, the kernel tid).
//!
//! The target may be hostile or mid-mutation, so every object is type-checked before it is
//! parsed, every size is bounded, and nothing loops on a pointer: a thread whose attributes do
//! not read back is skipped, a structure that cannot be right is an error.

use std::io;

use super::PythonSupport;
use super::code::{StrHeader, decode_chars, parse_str_header};
use super::elf::ElfInfo;
use super::layout::PyVersion;
use super::process::{PyProcess, free_threaded_name};
use super::procmem::{ProcMem, RemoteMemory as _};
use crate::proc::files;

/// One Python thread as `threading` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PyThreadName {
    /// `Thread._native_id`: the kernel thread id.
    pub tid: u32,
    /// The `threading._active` key: `threading.get_ident()`, i.e. `PyThreadState.thread_id`.
    pub ident: u64,
    /// `Thread.name`, at most [`MAX_STR_BYTES`] bytes of its characters.
    pub name: String,
}

/// Why thread names could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ThreadNamesError {
    /// `threading` was never imported: callers fall back to the kernel thread names.
    #[error("the threading module is not imported")]
    NoThreadingModule,
    /// No interpreter detected in this process (not Python, or not attached yet).
    #[error("no Python interpreter detected in process {0}")]
    NotAttached(u32),
    #[error("reading thread names is not supported for CPython {0}")]
    Unsupported(PyVersion),
    #[error("reading the target: {0}")]
    Read(#[from] io::Error),
    #[error("implausible interpreter data: {0}")]
    Corrupt(String),
}

type Result<T> = std::result::Result<T, ThreadNamesError>;

/// Larger dicts are refused: `sys.modules`, a module dict or a thread table are far smaller.
pub const MAX_DICT_ENTRIES: u64 = 1 << 16;
/// Longer names are truncated (at a character boundary).
pub const MAX_STR_BYTES: usize = 256;
/// 3 digits of 30 bits hold any u64; thread ids and idents are never larger.
const MAX_INT_DIGITS: u64 = 3;
/// `threading._active` never holds more threads than this many dict entries anyway; a bound on
/// the work done per call.
const MAX_THREADS: usize = 1 << 14;
/// Reads of a thread table torn by the running interpreter are made this many times in all.
pub const READ_ATTEMPTS: u32 = 3;

// Object header and type object (identical in 3.8–3.14, checked with `offsetof` against each
// version's headers).
const OB_TYPE: u64 = 8;
const TP_BASICSIZE: u64 = 32;
const TP_FLAGS: u64 = 168;
const TP_DICTOFFSET: u64 = 288;
const TPFLAGS_INLINE_VALUES: u64 = 1 << 2;
const TPFLAGS_MANAGED_DICT: u64 = 1 << 4;
const TPFLAGS_LONG_SUBCLASS: u64 = 1 << 24;
const TPFLAGS_UNICODE_SUBCLASS: u64 = 1 << 28;
const TPFLAGS_DICT_SUBCLASS: u64 = 1 << 29;
// PyDictObject.
const MA_USED: u64 = 16;
const MA_KEYS: u64 = 32;
const MA_VALUES: u64 = 40;
// PyModuleObject.
const MD_DICT: u64 = 16;
// PyASCIIObject: length, state (interned:2, kind:3, compact:1, ascii:1 in every version).
const STR_LENGTH: usize = 16;
const STR_STATE: usize = 32;
const STR_HEADER: usize = 40;
// PyLongObject: ob_size (≤ 3.11) or lv_tag (3.12+), then 30-bit digits.
const INT_SIZE: usize = 16;
const INT_DIGITS: u64 = 24;
const INT_HEADER: usize = 24;
/// Bytes of a `PyDictKeysObject` header read (3.8–3.10: 40; 3.11+: 32 plus 8 index bytes).
const KEYS_HEADER: usize = 40;
/// Bytes of `PyInterpreterState` searched for `sys.modules` when the known offset is wrong.
const INTERP_SCAN: usize = 16384;

/// How a `PyDictKeysObject` is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeysFormat {
    /// 3.8–3.10: `dk_refcnt, dk_size, dk_lookup, dk_usable, dk_nentries, dk_indices[]`; index
    /// width from `dk_size`; 24-byte entries `{hash, key, value}`.
    Sized,
    /// 3.11+: `dk_refcnt, dk_log2_size, dk_log2_index_bytes, dk_kind, dk_version, dk_usable,
    /// dk_nentries, dk_indices[]`; 16-byte `{key, value}` entries when `dk_kind != GENERAL`.
    Log2,
}

/// How an int is laid out after the object header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntFormat {
    /// ≤ 3.11: `ob_size`, negative for negative numbers, `|ob_size|` digits.
    SignedSize,
    /// 3.12+: `lv_tag` = digits << 3 | sign (0 positive, 1 zero, 2 negative).
    Tagged,
}

/// Where an instance of a Python class keeps its attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AttrStorage {
    /// 3.8–3.10: a `__dict__` pointer at `type->tp_dictoffset`.
    DictOffset,
    /// 3.11: a values pointer at obj-4 words (keys: `ht_cached_keys`), or once materialised a
    /// dict at obj-3 words.
    ValuesOrDict,
    /// 3.12: one word at obj-3: `values - 1` (odd) or a dict (even).
    TaggedDictOrValues,
    /// 3.13+: values inline after the object (`tp_basicsize`) while `valid`, and a dict at obj-3
    /// words once materialised (which then owns or shares the values).
    InlineValues,
}

/// Where `sys.modules` is in `PyInterpreterState`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ModulesAt {
    /// A fixed offset (3.8–3.12).
    Offset(u64),
    /// The offset is published in `_Py_DebugOffsets` at this position (3.13+).
    DebugOffsets(u64),
}

/// Per-version offsets (x86-64, GIL build), checked with `offsetof` against the headers of
/// each version (`-DPy_BUILD_CORE`) and on live interpreters.
#[derive(Clone, Copy, Debug)]
struct VersionLayout {
    modules: ModulesAt,
    keys: KeysFormat,
    /// Offset of `values[]` in `PyDictValues` (3.13+: after capacity, size, embedded, valid).
    values_array: u64,
    /// 3.13+: `PyDictValues.capacity` bounds the values array.
    values_capacity: bool,
    int: IntFormat,
    attrs: AttrStorage,
    /// `PyHeapTypeObject.ht_cached_keys` (3.11+: the shared keys of split instance values).
    ht_cached_keys: u64,
}

fn version_layout(minor: u32) -> Option<VersionLayout> {
    let old = |modules: u64| VersionLayout {
        modules: ModulesAt::Offset(modules),
        keys: KeysFormat::Sized,
        values_array: 0,
        values_capacity: false,
        int: IntFormat::SignedSize,
        attrs: AttrStorage::DictOffset,
        ht_cached_keys: 0,
    };
    let new = |modules: ModulesAt| VersionLayout {
        modules,
        keys: KeysFormat::Log2,
        values_array: 8,
        values_capacity: true,
        int: IntFormat::Tagged,
        attrs: AttrStorage::InlineValues,
        ht_cached_keys: 880,
    };
    Some(match minor {
        8 => old(56),
        9 | 10 => old(856),
        11 => VersionLayout {
            modules: ModulesAt::Offset(888),
            keys: KeysFormat::Log2,
            values_array: 0,
            values_capacity: false,
            int: IntFormat::SignedSize,
            attrs: AttrStorage::ValuesOrDict,
            ht_cached_keys: 872,
        },
        12 => VersionLayout {
            modules: ModulesAt::Offset(944),
            keys: KeysFormat::Log2,
            values_array: 0,
            values_capacity: false,
            int: IntFormat::Tagged,
            attrs: AttrStorage::TaggedDictOrValues,
            ht_cached_keys: 880,
        },
        13 => new(ModulesAt::DebugOffsets(88)),
        14 => new(ModulesAt::DebugOffsets(96)),
        _ => return None,
    })
}

/// Where the entries of one `PyDictKeysObject` are, relative to it, and how to read them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeysTable {
    pub entries_at: u64,
    pub nentries: u64,
    pub entry_size: u64,
    pub key_at: u64,
    pub value_at: u64,
}

/// Width of one `dk_indices` slot of a 3.8–3.10 keys object of `size` slots.
pub fn sized_index_bytes(size: u64) -> u64 {
    match size {
        0..=0xff => 1,
        0x100..=0xffff => 2,
        0x1_0000..=0xffff_ffff => 4,
        _ => 8,
    }
}

/// `dk_log2_index_bytes` of a 3.11+ keys object of `1 << log2_size` slots.
pub fn log2_index_bytes(log2_size: u8) -> u8 {
    log2_size
        + match log2_size {
            0..8 => 0,
            8..16 => 1,
            16..32 => 2,
            _ => 3,
        }
}

/// Parse the header of a `PyDictKeysObject` (its first [`KEYS_HEADER`] bytes).
pub fn parse_keys(format: KeysFormat, h: &[u8]) -> std::result::Result<KeysTable, String> {
    let word = |o: usize| {
        h.get(o..o + 8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    };
    let byte = |o: usize| h.get(o).copied();
    let short = || format!("dict keys header of {} bytes", h.len());
    let (size, entries_at, general) = match format {
        KeysFormat::Sized => {
            let size = word(8).ok_or_else(short)?;
            if !(8..=1 << 30).contains(&size) || size.count_ones() != 1 {
                return Err(format!("dict keys size {size}"));
            }
            let size = size as u64;
            (size, 40 + size * sized_index_bytes(size), true)
        }
        KeysFormat::Log2 => {
            let (log2, log2_ix, kind) = match (byte(8), byte(9), byte(10)) {
                (Some(a), Some(b), Some(c)) => (a, b, c),
                _ => return Err(short()),
            };
            if !(3..=30).contains(&log2) || log2_ix != log2_index_bytes(log2) || kind > 2 {
                return Err(format!(
                    "dict keys log2 size {log2}, log2 index bytes {log2_ix}, kind {kind}"
                ));
            }
            (1u64 << log2, 32 + (1u64 << log2_ix), kind == 0)
        }
    };
    let nentries_at = if format == KeysFormat::Sized { 32 } else { 24 };
    let nentries = word(nentries_at).ok_or_else(short)?;
    if nentries < 0 || nentries as u64 > size {
        return Err(format!("{nentries} entries in a dict of {size} slots"));
    }
    if nentries as u64 > MAX_DICT_ENTRIES {
        return Err(format!(
            "dict of {nentries} entries (at most {MAX_DICT_ENTRIES} read)"
        ));
    }
    let (entry_size, key_at, value_at) = if general { (24, 8, 16) } else { (16, 0, 8) };
    Ok(KeysTable {
        entries_at,
        nentries: nentries as u64,
        entry_size,
        key_at,
        value_at,
    })
}

/// Sign and digit count of an int from its `ob_size` / `lv_tag` word.
pub fn parse_int_header(format: IntFormat, word: u64) -> std::result::Result<(bool, u64), String> {
    let (negative, ndigits) = match format {
        IntFormat::SignedSize => {
            let size = word as i64;
            (size < 0, size.unsigned_abs())
        }
        IntFormat::Tagged => match word & 3 {
            0 => (false, word >> 3),
            1 => (false, 0),
            2 => (true, word >> 3),
            _ => return Err(format!("int tag {word:#x}")),
        },
    };
    if ndigits > MAX_INT_DIGITS {
        return Err(format!("int of {ndigits} digits"));
    }
    Ok((negative, ndigits))
}

/// The value of 30-bit digits, least significant first.
pub fn int_from_digits(negative: bool, digits: &[u32]) -> Option<i128> {
    if digits.len() > MAX_INT_DIGITS as usize {
        return None;
    }
    let mut v: i128 = 0;
    for (i, &d) in digits.iter().enumerate() {
        if d >= 1 << 30 {
            return None;
        }
        v |= i128::from(d) << (30 * i);
    }
    Some(if negative { -v } else { v })
}

/// Type addresses from the interpreter's symbols: an exact match needs one read less than the
/// `tp_flags` subclass bit, which is the check when a symbol is missing.
#[derive(Clone, Copy, Debug, Default)]
struct KnownTypes {
    dict: Option<u64>,
    str_: Option<u64>,
    int: Option<u64>,
}

/// Reads Python objects of one process.
struct Reader<'a> {
    mem: &'a ProcMem,
    v: VersionLayout,
    ascii_data: u64,
    compact_data: u64,
    types: KnownTypes,
}

fn corrupt(what: impl Into<String>) -> ThreadNamesError {
    ThreadNamesError::Corrupt(what.into())
}

fn u64_le(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

impl Reader<'_> {
    fn word(&self, addr: u64) -> Result<u64> {
        Ok(self.mem.read_u64(addr)?)
    }

    /// Whether `obj`'s type is `exact` or has the fast-subclass `flag` (which the base type
    /// itself also has).
    fn has_type(&self, obj: u64, exact: Option<u64>, flag: u64) -> Result<bool> {
        let ty = self.word(obj.wrapping_add(OB_TYPE))?;
        if ty != 0 && exact == Some(ty) {
            return Ok(true);
        }
        Ok(self.word(ty.wrapping_add(TP_FLAGS))? & flag != 0)
    }

    fn is_dict(&self, obj: u64) -> Result<bool> {
        self.has_type(obj, self.types.dict, TPFLAGS_DICT_SUBCLASS)
    }

    /// `(key, value)` of every live entry of a dict.
    fn dict_items(&self, dict: u64) -> Result<Vec<(u64, u64)>> {
        if !self.is_dict(dict)? {
            return Err(corrupt(format!("{dict:#x} is not a dict")));
        }
        let used = self.word(dict.wrapping_add(MA_USED))?;
        if used > MAX_DICT_ENTRIES {
            return Err(corrupt(format!("dict of {used} items")));
        }
        let keys = self.word(dict.wrapping_add(MA_KEYS))?;
        let values = self.word(dict.wrapping_add(MA_VALUES))?;
        let items = self.table_items(keys, (values != 0).then_some(values))?;
        // A dict resized or changed between the reads shows a table that disagrees with its
        // count (an old table, freed and reused, often reads as empty).
        if items.len() as u64 != used {
            return Err(corrupt(format!(
                "dict changed while read: {} live entries, {used} counted",
                items.len()
            )));
        }
        Ok(items)
    }

    /// Entries of a keys object; with `values` (a `PyDictValues`), a split table whose values
    /// are indexed like the keys' entries.
    fn table_items(&self, keys: u64, values: Option<u64>) -> Result<Vec<(u64, u64)>> {
        let header = self.mem.read_vec(keys, KEYS_HEADER)?;
        let t = parse_keys(self.v.keys, &header).map_err(corrupt)?;
        let entries = self.mem.read_vec(
            keys.wrapping_add(t.entries_at),
            (t.nentries * t.entry_size) as usize,
        )?;
        let split_values = match values {
            None => None,
            Some(v) => {
                let mut n = t.nentries;
                if self.v.values_capacity {
                    n = n.min(u64::from(self.mem.read_u8(v)?));
                }
                let raw = self
                    .mem
                    .read_vec(v.wrapping_add(self.v.values_array), (n * 8) as usize)?;
                Some(raw)
            }
        };
        let mut out = Vec::new();
        for (i, e) in entries.chunks_exact(t.entry_size as usize).enumerate() {
            let key = u64_le(e, t.key_at as usize);
            let value = match &split_values {
                Some(raw) => u64_le(raw, i * 8),
                None => u64_le(e, t.value_at as usize),
            };
            // Deleted and unused slots have no value (≤ 3.10 keep a dummy key in them).
            if key != 0 && value != 0 {
                out.push((key, value));
            }
        }
        Ok(out)
    }

    fn str_header(&self, obj: u64) -> Result<StrHeader> {
        let h = self.mem.read_vec(obj, STR_HEADER)?;
        let ty = u64_le(&h, OB_TYPE as usize);
        if self.types.str_ != Some(ty)
            && self.word(ty.wrapping_add(TP_FLAGS))? & TPFLAGS_UNICODE_SUBCLASS == 0
        {
            return Err(corrupt(format!("{obj:#x} is not a str")));
        }
        let length = u64_le(&h, STR_LENGTH) as i64;
        let state = u32::from_le_bytes([
            h[STR_STATE],
            h[STR_STATE + 1],
            h[STR_STATE + 2],
            h[STR_STATE + 3],
        ]);
        parse_str_header(length, state).map_err(corrupt)
    }

    fn str_data_at(&self, obj: u64, h: &StrHeader) -> Result<u64> {
        Ok(match (h.compact, h.ascii) {
            (true, true) => obj.wrapping_add(self.ascii_data),
            (true, false) => obj.wrapping_add(self.compact_data),
            // A legacy (non-compact) str points at its characters.
            (false, _) => self.word(obj.wrapping_add(self.compact_data))?,
        })
    }

    /// A str's characters, truncated to [`MAX_STR_BYTES`] bytes of storage.
    fn str_value(&self, obj: u64) -> Result<String> {
        let h = self.str_header(obj)?;
        let data = self.str_data_at(obj, &h)?;
        let chars = h.length.min(MAX_STR_BYTES as u64 / h.width);
        let bytes = self.mem.read_vec(data, (chars * h.width) as usize)?;
        Ok(decode_chars(h.width, &bytes))
    }

    /// Whether `obj` is the ASCII str `want` (attribute and module names).
    fn str_is(&self, obj: u64, want: &str) -> bool {
        let Ok(h) = self.str_header(obj) else {
            return false;
        };
        if !h.ascii || h.length != want.len() as u64 {
            return false;
        }
        let Ok(data) = self.str_data_at(obj, &h) else {
            return false;
        };
        self.mem
            .read_vec(data, want.len())
            .is_ok_and(|b| b == want.as_bytes())
    }

    fn int_value(&self, obj: u64) -> Result<i128> {
        let h = self.mem.read_vec(obj, INT_HEADER)?;
        let ty = u64_le(&h, OB_TYPE as usize);
        if self.types.int != Some(ty)
            && self.word(ty.wrapping_add(TP_FLAGS))? & TPFLAGS_LONG_SUBCLASS == 0
        {
            return Err(corrupt(format!("{obj:#x} is not an int")));
        }
        let (negative, n) = parse_int_header(self.v.int, u64_le(&h, INT_SIZE)).map_err(corrupt)?;
        let raw = self
            .mem
            .read_vec(obj.wrapping_add(INT_DIGITS), (n * 4) as usize)?;
        let digits: Vec<u32> = raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        int_from_digits(negative, &digits).ok_or_else(|| corrupt(format!("int digits {digits:?}")))
    }

    /// The value of the str key `name` among `items`.
    fn find(&self, items: &[(u64, u64)], name: &str) -> Option<u64> {
        items
            .iter()
            .find(|(k, _)| self.str_is(*k, name))
            .map(|&(_, v)| v)
    }

    /// The instance attributes of `obj` as `(key, value)` pairs.
    fn instance_attrs(&self, obj: u64) -> Result<Vec<(u64, u64)>> {
        let ty = self.word(obj.wrapping_add(OB_TYPE))?;
        let flags = self.word(ty.wrapping_add(TP_FLAGS))?;
        let managed_dict_at = obj.wrapping_sub(3 * 8);
        let cached_values = |values: u64| -> Result<Vec<(u64, u64)>> {
            let keys = self.word(ty.wrapping_add(self.v.ht_cached_keys))?;
            if keys == 0 {
                return Err(corrupt("split values without shared keys"));
            }
            self.table_items(keys, Some(values))
        };
        let storage = if flags & TPFLAGS_MANAGED_DICT == 0 {
            AttrStorage::DictOffset
        } else {
            self.v.attrs
        };
        match storage {
            AttrStorage::DictOffset => {
                let offset = self.word(ty.wrapping_add(TP_DICTOFFSET))? as i64;
                if offset <= 0 || offset > 1 << 16 {
                    return Err(corrupt(format!("tp_dictoffset {offset}")));
                }
                match self.word(obj.wrapping_add(offset as u64))? {
                    0 => Ok(Vec::new()),
                    dict => self.dict_items(dict),
                }
            }
            AttrStorage::ValuesOrDict => {
                let values = self.word(obj.wrapping_sub(4 * 8))?;
                if values != 0 {
                    return cached_values(values);
                }
                match self.word(managed_dict_at)? {
                    0 => Ok(Vec::new()),
                    dict => self.dict_items(dict),
                }
            }
            AttrStorage::TaggedDictOrValues => match self.word(managed_dict_at)? {
                0 => Ok(Vec::new()),
                tagged if tagged & 1 == 1 => cached_values(tagged.wrapping_add(1)),
                dict => self.dict_items(dict),
            },
            AttrStorage::InlineValues => {
                let dict = self.word(managed_dict_at)?;
                if dict != 0 {
                    return self.dict_items(dict);
                }
                if flags & TPFLAGS_INLINE_VALUES == 0 {
                    return Ok(Vec::new());
                }
                let basic = self.word(ty.wrapping_add(TP_BASICSIZE))?;
                if basic == 0 || basic > 1 << 16 || basic % 8 != 0 {
                    return Err(corrupt(format!("tp_basicsize {basic}")));
                }
                let values = obj.wrapping_add(basic);
                // PyDictValues.valid: 0 once the values moved into a dict.
                if self.mem.read_u8(values.wrapping_add(3))? == 0 {
                    return Ok(Vec::new());
                }
                cached_values(values)
            }
        }
    }

    /// Whether `dict` is `sys.modules`: a dict with the keys "sys" and "builtins".
    fn is_sys_modules(&self, dict: u64) -> bool {
        let Ok(items) = self.dict_items(dict) else {
            return false;
        };
        self.find(&items, "sys").is_some() && self.find(&items, "builtins").is_some()
    }
}

impl PyProcess {
    /// The name and kernel thread id of every thread in `threading._active`, as Python sees
    /// them (`Thread.name`, `Thread.native_id`). The interpreter runs on while it is read: a
    /// read torn by a change (a thread starting, ending or renamed) is made again, up to
    /// [`READ_ATTEMPTS`] times.
    pub fn thread_names(&self) -> std::result::Result<Vec<PyThreadName>, ThreadNamesError> {
        let mut attempt = 1;
        loop {
            match self.read_thread_names() {
                Err(ThreadNamesError::Corrupt(_) | ThreadNamesError::Read(_))
                    if attempt < READ_ATTEMPTS =>
                {
                    attempt += 1
                }
                done => return done,
            }
        }
    }

    fn read_thread_names(&self) -> std::result::Result<Vec<PyThreadName>, ThreadNamesError> {
        let unsupported = || ThreadNamesError::Unsupported(self.version);
        if self.version.major != 3 || free_threaded_name(&self.file) {
            return Err(unsupported());
        }
        let v = version_layout(self.version.minor).ok_or_else(unsupported)?;
        let reader = Reader {
            mem: &self.mem,
            v,
            ascii_data: self.layout.ascii_data,
            compact_data: self.layout.compact_data,
            types: self.known_types(),
        };
        let interp = self.interpreter()?;
        if interp == 0 {
            return Err(corrupt("no interpreter"));
        }
        let modules = self.sys_modules(&reader, interp)?;
        let module_items = reader.dict_items(modules)?;
        let threading = reader
            .find(&module_items, "threading")
            .ok_or(ThreadNamesError::NoThreadingModule)?;
        let module_dict = reader.word(threading.wrapping_add(MD_DICT))?;
        let globals = reader.dict_items(module_dict)?;
        let active = reader
            .find(&globals, "_active")
            .ok_or_else(|| corrupt("threading has no _active"))?;
        let mut out = Vec::new();
        for (key, thread) in reader.dict_items(active)?.into_iter().take(MAX_THREADS) {
            out.push(Self::thread_name(&reader, key, thread)?);
        }
        Ok(out)
    }

    /// One `_active` entry. A thread enters `_active` only once its ident and native id are
    /// set, so an entry that does not read back is a torn read.
    fn thread_name(reader: &Reader<'_>, key: u64, thread: u64) -> Result<PyThreadName> {
        let ident = u64::try_from(reader.int_value(key)?)
            .map_err(|_| corrupt(format!("thread ident {key:#x} out of range")))?;
        let attrs = reader.instance_attrs(thread)?;
        let attr = |name: &str| {
            reader
                .find(&attrs, name)
                .ok_or_else(|| corrupt(format!("thread {ident:#x} has no {name}")))
        };
        let name = reader.str_value(attr("_name")?)?;
        let tid = u32::try_from(reader.int_value(attr("_native_id")?)?)
            .ok()
            .filter(|&tid| tid != 0)
            .ok_or_else(|| corrupt(format!("thread {ident:#x} has no native id")))?;
        Ok(PyThreadName { tid, ident, name })
    }

    /// `sys.modules`: at the version's offset in `PyInterpreterState` (3.13+: the offset the
    /// interpreter publishes in `_Py_DebugOffsets`), else searched for in the interpreter
    /// state, since an unlisted build may have moved it.
    fn sys_modules(&self, reader: &Reader<'_>, interp: u64) -> Result<u64> {
        let offset = match reader.v.modules {
            ModulesAt::Offset(o) => Some(o),
            ModulesAt::DebugOffsets(at) => {
                let cookie = self.mem.read_vec(self.runtime, 8)?;
                (cookie == super::layout::DEBUG_COOKIE)
                    .then(|| self.mem.read_u64(self.runtime.wrapping_add(at)).ok())
                    .flatten()
                    .filter(|&o| o < INTERP_SCAN as u64)
            }
        };
        if let Some(o) = offset {
            let modules = reader.word(interp.wrapping_add(o))?;
            if modules != 0 && reader.is_sys_modules(modules) {
                return Ok(modules);
            }
        }
        // Only with a known dict type: without it every word would be tried as a dict.
        if reader.types.dict.is_none() {
            return Err(corrupt("sys.modules not at its offset"));
        }
        let mut len = INTERP_SCAN;
        let state = loop {
            match self.mem.read_vec(interp, len) {
                Ok(b) => break b,
                Err(_) if len > 1024 => len /= 2,
                Err(e) => return Err(e.into()),
            }
        };
        state
            .chunks_exact(8)
            .map(|w| u64_le(w, 0))
            .filter(|&p| p > 0x10000 && p % 8 == 0)
            .find(|&p| {
                reader.word(p.wrapping_add(OB_TYPE)).ok() == reader.types.dict
                    && reader.is_sys_modules(p)
            })
            .ok_or_else(|| corrupt("sys.modules not found in the interpreter state"))
    }

    /// `PyDict_Type`, `PyUnicode_Type`, `PyLong_Type` in the target, from the interpreter
    /// file's symbols (none when the file cannot be read).
    fn known_types(&self) -> KnownTypes {
        let (pid, path) = (self.pid, self.file.clone());
        let read = files::within(files::READ_TIME_LIMIT, move || {
            let file = files::open_in_root(pid, &path).map_err(|e| e.to_string())?;
            ElfInfo::open_cached(file, &path)
        });
        let Ok(Ok(elf)) = read else {
            return KnownTypes::default();
        };
        let at = |name: &str| elf.symbol(name).map(|a| self.bias.wrapping_add(a));
        KnownTypes {
            dict: at("PyDict_Type"),
            str_: at("PyUnicode_Type"),
            int: at("PyLong_Type"),
        }
    }
}

impl PythonSupport {
    /// [`PyProcess::thread_names`] of an attached process.
    pub fn thread_names(
        &self,
        pid: u32,
    ) -> std::result::Result<Vec<PyThreadName>, ThreadNamesError> {
        self.process(pid)
            .ok_or(ThreadNamesError::NotAttached(pid))?
            .thread_names()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(b: &mut [u8], at: usize, v: i64) {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn index_widths_follow_the_table_size() {
        assert_eq!(sized_index_bytes(8), 1);
        assert_eq!(sized_index_bytes(0xff), 1);
        assert_eq!(sized_index_bytes(0x100), 2);
        assert_eq!(sized_index_bytes(0x1_0000), 4);
        assert_eq!(sized_index_bytes(1 << 32), 8);
        // Measured on 3.11–3.14: sizes 8, 512, 2048, 131072.
        assert_eq!(log2_index_bytes(3), 3);
        assert_eq!(log2_index_bytes(9), 10);
        assert_eq!(log2_index_bytes(11), 12);
        assert_eq!(log2_index_bytes(17), 19);
        assert_eq!(log2_index_bytes(32), 35);
    }

    #[test]
    fn sized_keys_of_3_8_to_3_10() {
        // {dk_refcnt 1, dk_size 8, dk_lookup, dk_usable 3, dk_nentries 2}, as read from 3.8.
        let mut h = vec![0u8; KEYS_HEADER];
        put(&mut h, 0, 1);
        put(&mut h, 8, 8);
        put(&mut h, 16, 0x7f71_5666_b470);
        put(&mut h, 24, 3);
        put(&mut h, 32, 2);
        let t = parse_keys(KeysFormat::Sized, &h).unwrap();
        assert_eq!(
            t,
            KeysTable {
                entries_at: 48,
                nentries: 2,
                entry_size: 24,
                key_at: 8,
                value_at: 16
            }
        );
        put(&mut h, 8, 1024);
        assert_eq!(
            parse_keys(KeysFormat::Sized, &h).unwrap().entries_at,
            40 + 2048
        );
        put(&mut h, 8, 12);
        assert!(
            parse_keys(KeysFormat::Sized, &h).is_err(),
            "not a power of two"
        );
        put(&mut h, 8, 8);
        put(&mut h, 32, 9);
        assert!(
            parse_keys(KeysFormat::Sized, &h).is_err(),
            "more entries than slots"
        );
        put(&mut h, 32, -1);
        assert!(parse_keys(KeysFormat::Sized, &h).is_err());
        assert!(parse_keys(KeysFormat::Sized, &h[..20]).is_err());
    }

    #[test]
    fn log2_keys_of_3_11_and_later() {
        let mut h = vec![0u8; KEYS_HEADER];
        put(&mut h, 0, 1);
        h[8] = 9;
        h[9] = 10;
        h[10] = 1; // DICT_KEYS_UNICODE
        put(&mut h, 24, 200);
        let t = parse_keys(KeysFormat::Log2, &h).unwrap();
        assert_eq!(
            t,
            KeysTable {
                entries_at: 32 + 1024,
                nentries: 200,
                entry_size: 16,
                key_at: 0,
                value_at: 8
            }
        );
        h[10] = 0; // DICT_KEYS_GENERAL: {hash, key, value}
        let t = parse_keys(KeysFormat::Log2, &h).unwrap();
        assert_eq!((t.entry_size, t.key_at, t.value_at), (24, 8, 16));
        h[10] = 2; // DICT_KEYS_SPLIT: unicode entries, values elsewhere
        assert_eq!(parse_keys(KeysFormat::Log2, &h).unwrap().entry_size, 16);
        h[10] = 3;
        assert!(parse_keys(KeysFormat::Log2, &h).is_err());
        h[10] = 1;
        h[9] = 9;
        assert!(
            parse_keys(KeysFormat::Log2, &h).is_err(),
            "inconsistent index bytes"
        );
        h[8] = 20;
        h[9] = 22;
        put(&mut h, 24, (MAX_DICT_ENTRIES + 1) as i64);
        assert!(
            parse_keys(KeysFormat::Log2, &h).is_err(),
            "too many entries"
        );
    }

    #[test]
    fn ints_of_both_formats() {
        assert_eq!(parse_int_header(IntFormat::SignedSize, 2), Ok((false, 2)));
        assert_eq!(
            parse_int_header(IntFormat::SignedSize, -3i64 as u64),
            Ok((true, 3))
        );
        assert!(parse_int_header(IntFormat::SignedSize, 4).is_err());
        assert_eq!(parse_int_header(IntFormat::Tagged, 2 << 3), Ok((false, 2)));
        assert_eq!(parse_int_header(IntFormat::Tagged, 1), Ok((false, 0)));
        assert_eq!(
            parse_int_header(IntFormat::Tagged, (1 << 3) | 2),
            Ok((true, 1))
        );
        assert!(parse_int_header(IntFormat::Tagged, 3).is_err());
        assert!(parse_int_header(IntFormat::Tagged, 9 << 3).is_err());

        assert_eq!(int_from_digits(false, &[]), Some(0));
        assert_eq!(int_from_digits(false, &[12345]), Some(12345));
        // A pthread_t: 0x7f3a_1b2c_3640 = digits of 30 bits.
        let ident: u64 = 0x7f3a_1b2c_3640;
        let digits = [
            (ident & 0x3fff_ffff) as u32,
            ((ident >> 30) & 0x3fff_ffff) as u32,
            (ident >> 60) as u32,
        ];
        assert_eq!(int_from_digits(false, &digits), Some(i128::from(ident)));
        assert_eq!(
            int_from_digits(false, &[u32::MAX]),
            None,
            "digit over 30 bits"
        );
        assert_eq!(int_from_digits(true, &[7]), Some(-7));
        assert_eq!(int_from_digits(false, &[1, 1, 1, 1]), None);
    }

    #[test]
    fn every_supported_minor_has_a_layout() {
        for minor in 8..=14 {
            assert!(version_layout(minor).is_some(), "3.{minor}");
        }
        assert!(version_layout(7).is_none());
        assert!(version_layout(15).is_none());
    }

    #[test]
    fn reading_garbage_addresses_fails_cleanly() {
        let mem = ProcMem::new(std::process::id());
        let reader = Reader {
            mem: &mem,
            v: version_layout(12).unwrap(),
            ascii_data: 40,
            compact_data: 56,
            types: KnownTypes::default(),
        };
        for addr in [8, u64::MAX, u64::MAX - 16] {
            assert!(reader.dict_items(addr).is_err());
            assert!(reader.str_value(addr).is_err());
            assert!(reader.int_value(addr).is_err());
            assert!(reader.instance_attrs(addr).is_err());
            assert!(!reader.str_is(addr, "sys"));
        }
    }
}
