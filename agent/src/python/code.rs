//! Reading code objects (names, file, first line, line table) and strings from a CPython
//! process, and naming frames the way users read them: `module.qualname (file:line)`.

use std::collections::HashMap;
use std::io;

use super::layout::Layout;
use super::linetable;
use super::process::PyProcess;
use super::procmem::RemoteMemory;

/// What a code object tells about its function.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CodeInfo {
    /// `co_name`.
    pub name: String,
    /// `co_qualname` (3.11+), else `co_name`.
    pub qualname: String,
    /// `co_filename`.
    pub filename: String,
    /// Module-ish name derived from the file (`pkg.mod`, `app`).
    pub module: String,
    pub firstlineno: u32,
    /// Raw line table bytes (`co_lnotab` / `co_linetable`).
    pub table: Vec<u8>,
    /// What the code object pointed at when it was read ([`read_code_identity`]).
    pub identity: CodeIdentity,
    /// lasti → line, filled lazily.
    lines: HashMap<u32, Option<u32>>,
}

impl CodeInfo {
    /// What the entry holds on the heap, roughly: its strings, its line table and the lines
    /// it may resolve (one per two bytes of table at most).
    pub fn heap_bytes(&self) -> usize {
        self.name.len()
            + self.qualname.len()
            + self.filename.len()
            + self.module.len()
            + self.table.len() * 5
    }

    /// `module.qualname`.
    pub fn display_name(&self) -> String {
        if self.module.is_empty() {
            self.qualname.clone()
        } else {
            format!("{}.{}", self.module, self.qualname)
        }
    }
}

const MAX_STR: i64 = 4096;
const MAX_TABLE: i64 = 1 << 20;

/// What a str's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StrHeader {
    /// Length in characters.
    pub length: u64,
    /// Bytes per character: 1, 2 or 4.
    pub width: u64,
    pub compact: bool,
    pub ascii: bool,
}

/// Parse `PyASCIIObject.length` and `.state`.
pub fn parse_str_header(length: i64, state: u32) -> std::result::Result<StrHeader, String> {
    let width = u64::from((state >> 2) & 7);
    let compact = (state >> 5) & 1 == 1;
    let ascii = (state >> 6) & 1 == 1;
    if !(0..=1 << 40).contains(&length) {
        return Err(format!("str length {length}"));
    }
    if !matches!(width, 1 | 2 | 4) || (ascii && width != 1) {
        return Err(format!("str state {state:#x}"));
    }
    Ok(StrHeader {
        length: length as u64,
        width,
        compact,
        ascii,
    })
}

/// Characters stored `width` bytes each (latin-1, UCS-2 or UCS-4); an invalid code point
/// becomes U+FFFD.
pub fn decode_chars(width: u64, bytes: &[u8]) -> String {
    let point = |c: u32| char::from_u32(c).unwrap_or(char::REPLACEMENT_CHARACTER);
    match width {
        1 => bytes.iter().map(|&b| char::from(b)).collect(),
        2 => bytes
            .chunks_exact(2)
            .map(|c| point(u32::from(u16::from_le_bytes([c[0], c[1]]))))
            .collect(),
        _ => bytes
            .chunks_exact(4)
            .map(|c| point(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
    }
}

/// A Python `str` (compact ASCII, compact non-ASCII or legacy), read from `addr`.
pub fn read_unicode(mem: &impl RemoteMemory, l: &Layout, addr: u64) -> io::Result<String> {
    if addr == 0 {
        return Ok(String::new());
    }
    let length = mem.read_i64(addr.wrapping_add(16))?;
    if !(0..=MAX_STR).contains(&length) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "implausible str length",
        ));
    }
    let state = mem.read_u32(addr.wrapping_add(32))?;
    let h = parse_str_header(length, state)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let data = match (h.compact, h.ascii) {
        (true, true) => addr.wrapping_add(l.ascii_data),
        (true, false) => addr.wrapping_add(l.compact_data),
        // A legacy (non-compact) str points at its characters.
        (false, _) => mem.read_u64(addr.wrapping_add(l.compact_data))?,
    };
    let bytes = mem.read_vec(data, (h.length * h.width) as usize)?;
    Ok(decode_chars(h.width, &bytes))
}

/// A Python `bytes` object's contents.
pub fn read_bytes(mem: &impl RemoteMemory, l: &Layout, addr: u64) -> io::Result<Vec<u8>> {
    if addr == 0 {
        return Ok(Vec::new());
    }
    let size = mem.read_i64(addr.wrapping_add(l.bytes_size))?;
    if !(0..=MAX_TABLE).contains(&size) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "implausible bytes length",
        ));
    }
    mem.read_vec(addr.wrapping_add(l.bytes_data), size as usize)
}

/// Module-ish name of a source file: the dotted path below `site-packages`/`dist-packages`/
/// the stdlib directory when there is one, else the file's stem; `pkg/__init__.py` → `pkg`;
/// `<frozen importlib._bootstrap>` → `importlib._bootstrap`.
pub fn module_name(filename: &str) -> String {
    if let Some(inner) = filename
        .strip_prefix("<frozen ")
        .and_then(|s| s.strip_suffix('>'))
    {
        return inner.to_string();
    }
    if filename.starts_with('<') {
        return String::new();
    }
    let mut rel = filename;
    for marker in ["/site-packages/", "/dist-packages/"] {
        if let Some(i) = filename.rfind(marker) {
            rel = &filename[i + marker.len()..];
        }
    }
    if rel == filename {
        // stdlib: .../lib/python3.X/<rel>
        if let Some(i) = filename.find("/lib/python3.") {
            let after = &filename[i + "/lib/python3.".len()..];
            if let Some(j) = after.find('/') {
                rel = &after[j + 1..];
            }
        }
    }
    if rel == filename {
        rel = filename.rsplit('/').next().unwrap_or(filename);
    }
    let rel = rel
        .strip_suffix(".py")
        .or_else(|| rel.strip_suffix(".pyc"))
        .unwrap_or(rel);
    let rel = rel.strip_suffix("/__init__").unwrap_or(rel);
    rel.replace('/', ".")
}

/// The code object at `code` in `mem`, laid out as `l` says.
pub fn read_code_object(mem: &impl RemoteMemory, l: &Layout, code: u64) -> io::Result<CodeInfo> {
    let identity = read_code_identity(mem, l, code)?;
    let name = read_unicode(mem, l, identity.name)?;
    let qualname = match l.co_qualname {
        Some(_) => read_unicode(mem, l, identity.qualname)?,
        None => name.clone(),
    };
    let filename = read_unicode(mem, l, identity.filename)?;
    let table = read_bytes(mem, l, identity.linetable)?;
    let module = module_name(&filename);
    Ok(CodeInfo {
        name,
        qualname,
        filename,
        module,
        firstlineno: identity.firstlineno.max(0) as u32,
        table,
        identity,
        lines: HashMap::new(),
    })
}

/// The objects a code object points at: its name, qualified name, file name and line table,
/// and its first line. A code object freed and another allocated at its address (code run by
/// `exec`, as `site` does for `.pth` files, then the application's) differ here, so a cached
/// entry is checked against them before it names a frame again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CodeIdentity {
    pub name: u64,
    pub qualname: u64,
    pub filename: u64,
    pub linetable: u64,
    pub firstlineno: i32,
}

/// Read a code object's [`CodeIdentity`]: pointers only, no strings.
pub fn read_code_identity(
    mem: &impl RemoteMemory,
    l: &Layout,
    code: u64,
) -> io::Result<CodeIdentity> {
    let field = |off: u64| mem.read_u64(code.wrapping_add(off));
    Ok(CodeIdentity {
        name: field(l.co_name)?,
        qualname: l.co_qualname.map(field).transpose()?.unwrap_or(0),
        filename: field(l.co_filename)?,
        linetable: field(l.co_linetable)?,
        firstlineno: mem.read_i32(code.wrapping_add(l.co_firstlineno))?,
    })
}

impl PyProcess {
    /// Read a code object.
    pub fn read_code(&self, code: u64) -> io::Result<CodeInfo> {
        read_code_object(&self.mem, &self.layout, code)
    }

    /// Read what a code object points at now, to check a cached [`CodeInfo`].
    pub fn code_identity(&self, code: u64) -> io::Result<CodeIdentity> {
        read_code_identity(&self.mem, &self.layout, code)
    }

    /// The line of `lasti` (kernel units) in `code`.
    pub fn line_of(&self, info: &mut CodeInfo, lasti: u32) -> Option<u32> {
        if let Some(l) = info.lines.get(&lasti) {
            return *l;
        }
        let li = (lasti != kprof_common::python::PY_LASTI_NONE).then_some(lasti);
        let line = linetable::line_for(self.layout.line_table, &info.table, info.firstlineno, li);
        if info.lines.len() < 4096 {
            info.lines.insert(lasti, line);
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::super::procmem::{MemoryImage, ProcMem};
    use super::{
        decode_chars, module_name, parse_str_header, read_bytes, read_code_identity,
        read_code_object, read_unicode,
    };

    #[test]
    fn a_code_object_is_read_from_any_memory() {
        // A 3.12 code object, its names (compact ASCII str) and line table (bytes), laid out
        // in an image as the interpreter would lay them out in its heap.
        let l = super::super::layout::table(12).unwrap();
        let base = 0x10_000u64;
        let mut image = MemoryImage {
            base,
            bytes: vec![0; 0x1000],
        };
        let put = |img: &mut MemoryImage, at: u64, b: &[u8]| {
            let at = (at - base) as usize;
            img.bytes[at..at + b.len()].copy_from_slice(b);
        };
        let str_at = |img: &mut MemoryImage, at: u64, text: &str| {
            put(img, at + 16, &(text.len() as i64).to_le_bytes());
            put(img, at + 32, &(1u32 << 2 | 1 << 5 | 1 << 6).to_le_bytes());
            put(img, at + l.ascii_data, text.as_bytes());
        };
        let code = base;
        str_at(&mut image, base + 0x200, "handle");
        str_at(&mut image, base + 0x300, "/app/shop/views.py");
        put(&mut image, code + l.co_name, &(base + 0x200).to_le_bytes());
        if let Some(q) = l.co_qualname {
            put(&mut image, code + q, &(base + 0x200).to_le_bytes());
        }
        put(
            &mut image,
            code + l.co_filename,
            &(base + 0x300).to_le_bytes(),
        );
        put(&mut image, code + l.co_firstlineno, &42i32.to_le_bytes());
        put(
            &mut image,
            code + l.co_linetable,
            &(base + 0x400).to_le_bytes(),
        );
        put(&mut image, base + 0x400 + l.bytes_size, &2i64.to_le_bytes());
        put(
            &mut image,
            base + 0x400 + l.bytes_data,
            &[0x80 | 13 << 3, 2],
        );
        let info = read_code_object(&image, &l, code).unwrap();
        assert_eq!(
            (info.name.as_str(), info.filename.as_str(), info.firstlineno),
            ("handle", "/app/shop/views.py", 42)
        );
        assert_eq!(info.module, "views");
        assert_eq!(info.table, [0x80 | 13 << 3, 2]);
        assert_eq!(read_code_identity(&image, &l, code).unwrap(), info.identity);
        // Another code object at the same address (the first one freed): new names, so the
        // identity a cached entry is checked against differs.
        str_at(&mut image, base + 0x500, "<module>");
        put(&mut image, code + l.co_name, &(base + 0x500).to_le_bytes());
        let reused = read_code_identity(&image, &l, code).unwrap();
        assert_ne!(reused, info.identity);
        assert_eq!(read_code_object(&image, &l, code).unwrap().name, "<module>");
        // A pointer out of the image is an error, not a panic.
        put(&mut image, code + l.co_filename, &u64::MAX.to_le_bytes());
        assert!(read_code_object(&image, &l, code).is_err());
    }

    #[test]
    fn a_garbage_pointer_at_the_top_of_memory_is_an_error_not_a_panic() {
        // A frame freed while it was read can hand over any value as an object pointer.
        let mem = ProcMem::new(std::process::id());
        let l = super::super::layout::table(12).unwrap();
        for addr in [u64::MAX, u64::MAX - 8, u64::MAX - 40] {
            assert!(read_unicode(&mem, &l, addr).is_err(), "{addr:#x}");
            assert!(read_bytes(&mem, &l, addr).is_err(), "{addr:#x}");
        }
    }

    #[test]
    fn str_headers_and_characters() {
        // interned:2 kind:3 compact:1 ascii:1
        let ascii = parse_str_header(5, (1 << 2) | (1 << 5) | (1 << 6)).unwrap();
        assert_eq!(
            (ascii.length, ascii.width, ascii.compact, ascii.ascii),
            (5, 1, true, true)
        );
        let ucs2 = parse_str_header(3, (2 << 2) | (1 << 5)).unwrap();
        assert_eq!((ucs2.width, ucs2.ascii), (2, false));
        assert!(parse_str_header(-1, 1 << 2).is_err());
        assert!(parse_str_header(1, 3 << 2).is_err(), "kind 3");
        assert!(
            parse_str_header(1, (2 << 2) | (1 << 6)).is_err(),
            "ascii of kind 2"
        );

        assert_eq!(decode_chars(1, b"w\xf6rker-\xfc"), "wörker-ü");
        let ucs2: Vec<u8> = "поток".encode_utf16().flat_map(u16::to_le_bytes).collect();
        assert_eq!(decode_chars(2, &ucs2), "поток");
        let ucs4: Vec<u8> = "🧵x"
            .chars()
            .flat_map(|c| (c as u32).to_le_bytes())
            .collect();
        assert_eq!(decode_chars(4, &ucs4), "🧵x");
        assert_eq!(decode_chars(4, &0xd800u32.to_le_bytes()), "\u{fffd}");
    }

    #[test]
    fn module_names() {
        assert_eq!(module_name("app.py"), "app");
        assert_eq!(module_name("/srv/app/handlers.py"), "handlers");
        assert_eq!(
            module_name("/usr/lib/python3/dist-packages/requests/api.py"),
            "requests.api"
        );
        assert_eq!(
            module_name("/venv/lib/python3.12/site-packages/flask/__init__.py"),
            "flask"
        );
        assert_eq!(
            module_name("/root/.pyenv/versions/3.12.1/lib/python3.12/threading.py"),
            "threading"
        );
        assert_eq!(
            module_name("/usr/lib/python3.11/concurrent/futures/thread.py"),
            "concurrent.futures.thread"
        );
        assert_eq!(
            module_name("<frozen importlib._bootstrap>"),
            "importlib._bootstrap"
        );
        assert_eq!(module_name("<string>"), "");
    }
}
