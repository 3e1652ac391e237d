//! Uprobes as BPF `uprobe_multi` links (Linux ≥ 6.6), for the allocation probes.
//!
//! Why not aya's `UProbe`: it attaches through a uprobe perf event, and the kernel opens those to
//! CAP_SYS_ADMIN only, which the node agent does not hold. A `uprobe_multi` link needs no perf
//! event: loading the program needs CAP_BPF and CAP_PERFMON, the link nothing more. aya 0.14
//! neither loads a program for that attach type nor creates the link, so this module does both:
//! the program comes out of the same object, relocated by aya-obj against the maps aya already
//! created (the probes share the ring buffer, targets and configuration with the other
//! programs), and is loaded and linked with two bpf(2) calls.
use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
};

use aya::{Ebpf, maps::Map};
use aya_obj::{
    Object,
    generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_prog_type},
};

/// Errors of loading a program for `uprobe_multi` links and of linking it.
#[derive(Debug, thiserror::Error)]
pub enum MultiError {
    #[error("cannot read the eBPF object: {0}")]
    Object(String),
    #[error("program {0} missing from the eBPF object")]
    MissingProgram(String),
    #[error("map {0} of the eBPF object is not loaded")]
    MissingMap(String),
    #[error("the kernel has no BTF support, which the probe programs need")]
    NoBtf,
    #[error("the kernel rejected the object's BTF: {0}")]
    Btf(std::io::Error),
    #[error("the kernel rejected {program}: {error}{}", verifier.as_ref().map(|v| format!(": verifier: {v}")).unwrap_or_default())]
    Load {
        program: String,
        error: std::io::Error,
        /// The last line of the verifier's log.
        verifier: Option<String>,
    },
    #[error("cannot link the probe: {0}")]
    Link(std::io::Error),
}

impl MultiError {
    /// The error and what it means for the user: a right missing, or a kernel without
    /// `uprobe_multi` links (before 6.6 the program loads but the link is refused as invalid).
    pub fn explained(&self) -> String {
        let errno = match self {
            MultiError::Btf(e) | MultiError::Link(e) | MultiError::Load { error: e, .. } => {
                e.raw_os_error()
            }
            _ => None,
        };
        match (self, errno) {
            (_, Some(libc::EPERM | libc::EACCES)) => {
                format!("{self} (the agent needs CAP_BPF and CAP_PERFMON)")
            }
            (MultiError::Link(_), Some(libc::EINVAL | libc::EOPNOTSUPP)) => format!(
                "{self} (allocation probes need the kernel's uprobe_multi links, Linux 6.6 or later)"
            ),
            _ => self.to_string(),
        }
    }
}

/// A program loaded for `uprobe_multi` links.
pub struct MultiProgram {
    fd: OwnedFd,
}

/// One attached probe: dropping it (closing the link) removes the breakpoint.
pub struct MultiLink {
    _link: OwnedFd,
}

/// The programs of the object, relocated for loading as `uprobe_multi` programs.
pub struct Relocated {
    obj: Object,
    btf: OwnedFd,
}

/// Relocates the programs `names` of the ELF object `elf` (already loaded by aya into `ebpf`,
/// whose maps they use), for [`Relocated::load`]. All of the object's maps must still be in
/// `ebpf`.
pub fn relocate(elf: &[u8], ebpf: &Ebpf, names: &[&str]) -> Result<Relocated, MultiError> {
    let mut obj = Object::parse(elf).map_err(|e| MultiError::Object(e.to_string()))?;
    let features = aya::features();
    let btf_features = features.btf().ok_or(MultiError::NoBtf)?;
    let btf = obj
        .fixup_and_sanitize_btf(btf_features)
        .map_err(|e| MultiError::Object(e.to_string()))?
        .ok_or(MultiError::NoBtf)?
        .to_bytes();
    let btf = load_btf(&btf).map_err(MultiError::Btf)?;

    // The map definitions are taken out of the object so that the relocation can borrow them.
    let definitions: HashMap<String, aya_obj::Map> = obj.maps.drain().collect();
    let mut fds = Vec::with_capacity(definitions.len());
    for (name, def) in &definitions {
        let map = ebpf
            .map(name)
            .ok_or_else(|| MultiError::MissingMap(name.clone()))?;
        fds.push((name.as_str(), map_fd(map), def));
    }
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(section, _)| *section).collect();
    obj.relocate_maps(fds.into_iter(), &text_sections)
        .map_err(|e| MultiError::Object(e.to_string()))?;
    obj.programs
        .retain(|name, _| names.contains(&name.as_str()));
    obj.relocate_calls(&text_sections)
        .map_err(|e| MultiError::Object(e.to_string()))?;
    obj.sanitize_functions(features);
    Ok(Relocated { obj, btf })
}

impl Relocated {
    /// Loads (verifies) one of the programs.
    pub fn load(&self, name: &str) -> Result<MultiProgram, MultiError> {
        let program = self
            .obj
            .programs
            .get(name)
            .ok_or_else(|| MultiError::MissingProgram(name.to_owned()))?;
        let function = self
            .obj
            .functions
            .get(&program.function_key())
            .ok_or_else(|| MultiError::MissingProgram(name.to_owned()))?;
        // The kernel keeps the BTF referenced by each program loaded with it.
        load_program(name, program, function, &self.btf).map(|fd| MultiProgram { fd })
    }
}

impl MultiProgram {
    /// Attaches the program at `offset` of the file `path` (a path the kernel resolves, e.g.
    /// `/proc/self/fd/N`) in process `pid` only (the breakpoint is written into that process's
    /// memory alone).
    pub fn attach(&self, path: &str, offset: u64, pid: u32) -> Result<MultiLink, MultiError> {
        let path = CString::new(path).map_err(|e| MultiError::Link(std::io::Error::other(e)))?;
        let offsets = [offset];
        // SAFETY: an all-zero bpf_attr is valid; the union member set is the one the command reads.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writing plain integer fields of the link_create member.
        unsafe {
            let link = &mut attr.link_create;
            link.__bindgen_anon_1.prog_fd = self.fd.as_raw_fd() as u32;
            link.attach_type = bpf_attach_type::BPF_TRACE_UPROBE_MULTI as u32;
            let multi = &mut link.__bindgen_anon_3.uprobe_multi;
            multi.path = path.as_ptr() as u64;
            multi.offsets = offsets.as_ptr() as u64;
            multi.cnt = 1;
            multi.pid = pid;
        }
        bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr)
            .map(|fd| MultiLink { _link: fd })
            .map_err(MultiError::Link)
    }
}

/// The file descriptor of a map aya created (every kind holds a `MapData`).
fn map_fd(map: &Map) -> i32 {
    let data = match map {
        Map::Array(d)
        | Map::ArrayOfMaps(d)
        | Map::BloomFilter(d)
        | Map::CgroupArray(d)
        | Map::CgroupStorage(d)
        | Map::CgrpStorage(d)
        | Map::CpuMap(d)
        | Map::DevMap(d)
        | Map::DevMapHash(d)
        | Map::HashMap(d)
        | Map::HashOfMaps(d)
        | Map::InodeStorage(d)
        | Map::LpmTrie(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuCgroupStorage(d)
        | Map::PerCpuHashMap(d)
        | Map::PerCpuLruHashMap(d)
        | Map::PerfEventArray(d)
        | Map::ProgramArray(d)
        | Map::Queue(d)
        | Map::ReusePortSockArray(d)
        | Map::RingBuf(d)
        | Map::SockHash(d)
        | Map::SockMap(d)
        | Map::SkStorage(d)
        | Map::Stack(d)
        | Map::StackTraceMap(d)
        | Map::Unsupported(d)
        | Map::XskMap(d) => d,
    };
    data.fd().as_fd().as_raw_fd()
}

/// Loads the object's BTF (the programs' function and line information point into it; the
/// verifier needs the former for `bpf_loop` callbacks).
fn load_btf(btf: &[u8]) -> std::io::Result<OwnedFd> {
    // SAFETY: as in `attach`.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: plain fields of the BTF_LOAD member; `btf` outlives the call.
    unsafe {
        let u = &mut attr.__bindgen_anon_7;
        u.btf = btf.as_ptr() as u64;
        u.btf_size = btf.len() as u32;
    }
    bpf(bpf_cmd::BPF_BTF_LOAD, &mut attr)
}

/// Verifier log kept when a load fails: its tail says why (the kernel keeps the tail of a log
/// longer than the buffer).
const LOG_BYTES: usize = 64 << 10;

fn load_program(
    name: &str,
    program: &aya_obj::Program,
    function: &aya_obj::Function,
    btf: &OwnedFd,
) -> Result<OwnedFd, MultiError> {
    let func_info = function.func_info.func_info_bytes();
    let line_info = function.line_info.line_info_bytes();
    let attempt = |log: Option<&mut [u8]>| {
        // SAFETY: as in `attach`.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: plain fields of the PROG_LOAD member; every buffer outlives the call.
        unsafe {
            let u = &mut attr.__bindgen_anon_3;
            let short = name.as_bytes();
            for (dst, src) in u.prog_name.iter_mut().zip(&short[..short.len().min(15)]) {
                *dst = *src as _;
            }
            u.prog_type = bpf_prog_type::BPF_PROG_TYPE_KPROBE as u32;
            u.expected_attach_type = bpf_attach_type::BPF_TRACE_UPROBE_MULTI as u32;
            u.insns = function.instructions.as_ptr() as u64;
            u.insn_cnt = function.instructions.len() as u32;
            u.license = program.license.as_ptr() as u64;
            u.prog_btf_fd = btf.as_raw_fd() as u32;
            if function.func_info_rec_size > 0 {
                u.func_info = func_info.as_ptr() as u64;
                u.func_info_cnt = function.func_info.len() as u32;
                u.func_info_rec_size = function.func_info_rec_size as u32;
            }
            if function.line_info_rec_size > 0 {
                u.line_info = line_info.as_ptr() as u64;
                u.line_info_cnt = function.line_info.len() as u32;
                u.line_info_rec_size = function.line_info_rec_size as u32;
            }
            if let Some(log) = log {
                u.log_level = 1;
                u.log_buf = log.as_mut_ptr() as u64;
                u.log_size = log.len() as u32;
            }
        }
        bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr)
    };
    attempt(None).or_else(|error| {
        // Again with the verifier's log, to say why.
        let mut log = vec![0u8; LOG_BYTES];
        if let Ok(fd) = attempt(Some(&mut log)) {
            return Ok(fd);
        }
        let text = String::from_utf8_lossy(&log);
        let text = text.trim_end_matches('\0');
        tracing::debug!("verifier log of {name}:\n{text}");
        Err(MultiError::Load {
            program: name.to_owned(),
            error,
            verifier: super::loader::last_log_line(text).map(str::to_owned),
        })
    })
}

/// bpf(2), returning the new file descriptor.
fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a valid bpf_attr for `cmd`, of the size passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_int,
            attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor this process owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(errno: i32) -> MultiError {
        MultiError::Link(std::io::Error::from_raw_os_error(errno))
    }

    #[test]
    fn a_refused_link_says_whether_rights_or_the_kernel_are_missing() {
        assert!(
            link(libc::EPERM)
                .explained()
                .contains("CAP_BPF and CAP_PERFMON")
        );
        assert!(
            link(libc::EINVAL)
                .explained()
                .contains("Linux 6.6 or later")
        );
        let load = MultiError::Load {
            program: "kprof_track".into(),
            error: std::io::Error::from_raw_os_error(libc::EPERM),
            verifier: None,
        };
        assert!(load.explained().contains("CAP_BPF and CAP_PERFMON"));
        // A process gone before its link: neither.
        let gone = link(libc::ESRCH).explained();
        assert!(!gone.contains("CAP_") && !gone.contains("6.6"), "{gone}");
    }
}
