//! Kernel struct offsets from BTF (`/sys/kernel/btf/vmlinux`): aya has no CO-RE field
//! relocations, so the `task_struct` offsets the eBPF programs need (`pid` and `tgid` for the
//! fork follower, `thread.fsbase` for the CPython walker) are computed here and handed to them
//! as data.

use std::sync::OnceLock;

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

/// A parsed BTF blob: the raw bytes and where each type record starts. Members are decoded on
/// demand, so parsing vmlinux BTF (~150k types) costs little more than the blob itself.
pub struct Btf {
    data: Vec<u8>,
    /// The string section in `data`.
    strings: std::ops::Range<usize>,
    /// Offset of each type record in `data`; index = type id (id 0, void, has none).
    offsets: Vec<u32>,
}

/// The fixed part of a type record.
struct TypeHeader {
    name_off: u32,
    kind: u32,
    vlen: usize,
    kflag: bool,
    /// Size, or the referenced type for modifiers and typedefs.
    size_or_type: u32,
    /// Where the kind-specific data (e.g. members) starts in `data`.
    body: usize,
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, String> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes(s.try_into().unwrap()))
        .ok_or_else(|| "truncated BTF".to_string())
}

impl Btf {
    pub fn from_sys() -> Result<Self, String> {
        let data = std::fs::read("/sys/kernel/btf/vmlinux")
            .map_err(|e| format!("/sys/kernel/btf/vmlinux: {e}"))?;
        Self::parse(data)
    }

    pub fn parse(data: Vec<u8>) -> Result<Self, String> {
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != BTF_MAGIC {
            return Err("not a little-endian BTF blob".into());
        }
        let hdr_len = u32_at(&data, 4)? as usize;
        let type_off = u32_at(&data, 8)? as usize;
        let type_len = u32_at(&data, 12)? as usize;
        let str_off = u32_at(&data, 16)? as usize;
        let str_len = u32_at(&data, 20)? as usize;
        let types = hdr_len + type_off;
        let type_end = types + type_len;
        let strings = hdr_len + str_off..hdr_len + str_off + str_len;
        if type_end > data.len() || strings.end > data.len() {
            return Err("BTF sections out of range".into());
        }
        let mut btf = Btf {
            data,
            strings,
            offsets: vec![0],
        };
        let mut p = types;
        while p + 12 <= type_end {
            btf.offsets.push(p as u32);
            let h = btf.header(p)?;
            let extra = match h.kind {
                1 => 4,                         // INT
                3 => 12,                        // ARRAY
                4 | 5 | 15 | 19 => h.vlen * 12, // STRUCT UNION DATASEC ENUM64
                6 | 13 => h.vlen * 8,           // ENUM FUNC_PROTO
                14 | 17 => 4,                   // VAR DECL_TAG
                _ => 0, // PTR FWD TYPEDEF VOLATILE CONST RESTRICT FUNC FLOAT TYPE_TAG
            };
            p = h.body + extra;
        }
        Ok(btf)
    }

    fn header(&self, p: usize) -> Result<TypeHeader, String> {
        let info = u32_at(&self.data, p + 4)?;
        Ok(TypeHeader {
            name_off: u32_at(&self.data, p)?,
            kind: (info >> 24) & 0x1f,
            vlen: (info & 0xffff) as usize,
            kflag: info >> 31 != 0,
            size_or_type: u32_at(&self.data, p + 8)?,
            body: p + 12,
        })
    }

    fn type_header(&self, id: u32) -> Option<TypeHeader> {
        let p = *self.offsets.get(id as usize).filter(|&&p| p != 0)?;
        self.header(p as usize).ok()
    }

    fn name(&self, off: u32) -> &[u8] {
        let s = self
            .data
            .get(self.strings.start + off as usize..self.strings.end)
            .unwrap_or(&[]);
        let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
        &s[..end]
    }

    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.type_header(id) {
                Some(t)
                    if matches!(
                        t.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.size_or_type
                }
                _ => break,
            }
        }
        id
    }

    /// Members of a struct/union record: (name offset, type id, byte offset).
    fn members(&self, t: &TypeHeader) -> impl Iterator<Item = (u32, u32, u32)> + '_ {
        let (body, kflag) = (t.body, t.kflag);
        (0..t.vlen).filter_map(move |i| {
            let q = body + i * 12;
            let off = u32_at(&self.data, q + 8).ok()?;
            let bits = if kflag { off & 0xff_ffff } else { off };
            Some((
                u32_at(&self.data, q).ok()?,
                u32_at(&self.data, q + 4).ok()?,
                bits / 8,
            ))
        })
    }

    /// Byte offset of member `name` in struct/union type `id`, looking through anonymous
    /// struct/union members.
    fn member_offset(&self, id: u32, name: &str, depth: u32) -> Option<(u32, u32)> {
        let t = self.type_header(self.resolve(id))?;
        if !matches!(t.kind, KIND_STRUCT | KIND_UNION) || depth > 8 {
            return None;
        }
        if let Some((_, ty, off)) = self
            .members(&t)
            .find(|&(n, _, _)| self.name(n) == name.as_bytes())
        {
            return Some((off, ty));
        }
        self.members(&t)
            .filter(|&(n, _, _)| self.name(n).is_empty())
            .find_map(|(_, ty, off)| {
                self.member_offset(ty, name, depth + 1)
                    .map(|(o, ty)| (off + o, ty))
            })
    }

    /// Byte offset of a dotted member path (e.g. `thread.fsbase`) in the named struct.
    pub fn offset_of(&self, struct_name: &str, path: &str) -> Option<u32> {
        let id = (1..self.offsets.len() as u32).find(|&id| {
            self.type_header(id).is_some_and(|t| {
                t.kind == KIND_STRUCT
                    && t.vlen > 0
                    && self.name(t.name_off) == struct_name.as_bytes()
            })
        })?;
        let mut total = 0u32;
        let mut cur = id;
        for part in path.split('.') {
            let (off, ty) = self.member_offset(cur, part, 0)?;
            total += off;
            cur = ty;
        }
        Some(total)
    }
}

/// Offsets of the `task_struct` fields the eBPF programs read, on this kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskOffsets {
    pub pid: u32,
    pub tgid: u32,
    /// `self_exec_id`: bumped by every `exec`, so a sample tells which image it ran.
    pub self_exec_id: u32,
    /// `thread.fsbase` (x86-64): the thread pointer, where CPython's thread state lives.
    pub fsbase: u32,
    /// `stack`: the kernel stack, whose top holds a thread's user registers (the off-CPU
    /// source reads the syscall a thread waits in there).
    pub stack: u32,
    /// `se.sum_exec_runtime`: a thread's CPU nanoseconds (thread exits carry it).
    pub sum_exec_runtime: u32,
}

/// The `task_struct` offsets, read from kernel BTF once per process (parsing vmlinux BTF costs
/// tens of MiB and milliseconds; the loader and the Python support both need it).
pub fn task_offsets() -> Result<TaskOffsets, String> {
    static OFFSETS: OnceLock<Result<TaskOffsets, String>> = OnceLock::new();
    OFFSETS
        .get_or_init(|| {
            let btf = Btf::from_sys()?;
            let field = |path: &str| {
                btf.offset_of("task_struct", path)
                    .ok_or_else(|| format!("task_struct.{path} not found in kernel BTF"))
            };
            Ok(TaskOffsets {
                pid: field("pid")?,
                tgid: field("tgid")?,
                self_exec_id: field("self_exec_id")?,
                fsbase: field("thread.fsbase")?,
                stack: field("stack")?,
                sum_exec_runtime: field("se.sum_exec_runtime")?,
            })
        })
        .clone()
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_task_offsets_in_kernel_btf() {
        if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
            eprintln!("SKIP: no /sys/kernel/btf/vmlinux");
            return;
        }
        let off = super::task_offsets().unwrap();
        // task_struct is several KiB; thread is its last member; tgid follows pid (both pid_t).
        assert!(off.fsbase > 1000 && off.fsbase < 20000, "{off:?}");
        assert_eq!(off.tgid, off.pid + 4, "{off:?}");
        assert!(off.pid > 0 && off.pid < off.fsbase, "{off:?}");
        assert!(off.stack > 0 && off.stack < off.pid, "{off:?}");
        assert!(
            off.self_exec_id > 0 && off.self_exec_id < off.fsbase,
            "{off:?}"
        );
    }
}
