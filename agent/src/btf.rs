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

#[derive(Clone, Debug)]
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
}

#[derive(Clone, Debug)]
struct Type {
    name_off: u32,
    kind: u32,
    /// Referenced type for modifiers and typedefs.
    type_ref: u32,
    members: Vec<Member>,
}

/// A parsed BTF blob (types and strings only).
pub struct Btf {
    types: Vec<Type>, // index = type id; id 0 is void
    strings: Vec<u8>,
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
        Self::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Self, String> {
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != BTF_MAGIC {
            return Err("not a little-endian BTF blob".into());
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let tbase = hdr_len + type_off;
        let types_blob = data
            .get(tbase..tbase + type_len)
            .ok_or("BTF type section out of range")?;
        let sbase = hdr_len + str_off;
        let strings = data
            .get(sbase..sbase + str_len)
            .ok_or("BTF string section out of range")?
            .to_vec();
        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            type_ref: 0,
            members: vec![],
        }];
        let mut p = 0usize;
        while p + 12 <= types_blob.len() {
            let name_off = u32_at(types_blob, p)?;
            let info = u32_at(types_blob, p + 4)?;
            let size_or_type = u32_at(types_blob, p + 8)?;
            p += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kflag = info >> 31;
            let mut members = Vec::new();
            let extra = match kind {
                1 => 4,  // INT
                3 => 12, // ARRAY
                4 | 5 => {
                    for i in 0..vlen {
                        let q = p + i * 12;
                        let off = u32_at(types_blob, q + 8)?;
                        members.push(Member {
                            name_off: u32_at(types_blob, q)?,
                            type_id: u32_at(types_blob, q + 4)?,
                            bit_offset: if kflag != 0 { off & 0xff_ffff } else { off },
                        });
                    }
                    vlen * 12
                }
                6 => vlen * 8,   // ENUM
                13 => vlen * 8,  // FUNC_PROTO
                14 => 4,         // VAR
                15 => vlen * 12, // DATASEC
                17 => 4,         // DECL_TAG
                19 => vlen * 12, // ENUM64
                _ => 0,          // PTR FWD TYPEDEF VOLATILE CONST RESTRICT FUNC FLOAT TYPE_TAG
            };
            p += extra;
            types.push(Type {
                name_off,
                kind,
                type_ref: size_or_type,
                members,
            });
        }
        Ok(Self { types, strings })
    }

    fn name(&self, off: u32) -> &[u8] {
        let s = self.strings.get(off as usize..).unwrap_or(&[]);
        let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
        &s[..end]
    }

    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(t)
                    if matches!(
                        t.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.type_ref
                }
                _ => break,
            }
        }
        id
    }

    /// Byte offset of member `name` in struct/union type `id`, looking through anonymous
    /// struct/union members.
    fn member_offset(&self, id: u32, name: &str, depth: u32) -> Option<(u32, u32)> {
        let t = self.types.get(self.resolve(id) as usize)?;
        if !matches!(t.kind, KIND_STRUCT | KIND_UNION) || depth > 8 {
            return None;
        }
        for m in &t.members {
            if self.name(m.name_off) == name.as_bytes() {
                return Some((m.bit_offset / 8, m.type_id));
            }
        }
        for m in &t.members {
            if (m.name_off == 0 || self.name(m.name_off).is_empty())
                && let Some((off, ty)) = self.member_offset(m.type_id, name, depth + 1)
            {
                return Some((m.bit_offset / 8 + off, ty));
            }
        }
        None
    }

    /// Byte offset of a dotted member path (e.g. `thread.fsbase`) in the named struct.
    pub fn offset_of(&self, struct_name: &str, path: &str) -> Option<u32> {
        let id = self.types.iter().position(|t| {
            t.kind == KIND_STRUCT
                && !t.members.is_empty()
                && self.name(t.name_off) == struct_name.as_bytes()
        })? as u32;
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
    /// `thread.fsbase` (x86-64): the thread pointer, where CPython's thread state lives.
    pub fsbase: u32,
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
                fsbase: field("thread.fsbase")?,
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
    }
}
