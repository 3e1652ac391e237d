//! Least privilege for `kprof-agent run`: become an unprivileged user that keeps only the
//! capabilities the agent uses, and deny the system calls it never makes.
//!
//! Why the agent drops its own rights instead of the pod starting it as non-root: a container
//! started with `runAsUser: 65532` gets **no** capabilities after `execve` (the CRI has no
//! ambient capabilities; checked on containerd 1.6.20 / runc 1.1.5: CapEff 0), and file
//! capabilities on the binary are ignored under `no_new_privs` (`allowPrivilegeEscalation:
//! false`). File capabilities would need `allowPrivilegeEscalation: true`, which lets the agent
//! `execve` any set-uid-root binary it can reach — and with `hostPID` it reaches the host's
//! through `/proc/1/root` — so it could get uid 0 back. Instead the pod starts the agent as uid 0
//! with `no_new_privs`, the four run-time capabilities plus CHOWN, SETUID and SETGID, and
//! [`drop_to`], before any other thread exists: makes the state directory the new user's,
//! switches every uid and gid to it, keeps the run-time capabilities and drops the start-up ones
//! from every set. Nothing after that runs as root, and no_new_privs keeps it so.
//!
//! [`install_seccomp`] then adds a deny-list filter (on top of the runtime's default profile):
//! see [`DENIED`]. [`seccomp_self_test`] proves it is enforced with calls that would fail
//! harmlessly without it (a pid that cannot exist), so a filter that silently did not load is
//! an error, not a false sense of safety.
use std::{
    fs, io,
    os::unix::fs::{MetadataExt as _, lchown},
    path::Path,
};

/// Capabilities (bit numbers) the agent needs only at start-up, to hand its state directory
/// and its identity to the unprivileged user; [`drop_to`] drops them from every set.
pub const START_UP_CAPS: [(u32, &str); 3] = [(0, "CHOWN"), (6, "SETGID"), (7, "SETUID")];

/// The user the agent runs as when the DaemonSet does not say otherwise (distroless `nonroot`).
pub const DEFAULT_UID: u32 = 65532;

/// Errors of [`drop_to`] and [`install_seccomp`].
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("cannot drop privileges with {0} threads running (must happen before any is started)")]
    Threads(usize),
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("privileges were not dropped: {0}")]
    Check(String),
    #[error("seccomp is not supported on this architecture")]
    Arch,
}

fn sys(what: impl Into<String>) -> impl FnOnce(io::Error) -> PrivilegeError {
    let what = what.into();
    move |source| PrivilegeError::Sys { what, source }
}

fn check(ret: libc::c_long, what: &str) -> Result<(), PrivilegeError> {
    if ret < 0 {
        Err(sys(what)(io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

/// What the agent runs with after start-up (logged, and read by the tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rights {
    pub uid: u32,
    pub gid: u32,
    /// Effective capabilities (bit mask, as `CapEff` in `/proc/self/status`).
    pub cap_eff: u64,
    pub cap_prm: u64,
}

impl Rights {
    /// The current thread's identity and capabilities.
    pub fn current() -> Result<Rights, PrivilegeError> {
        let (eff, prm) = capget()?;
        // SAFETY: plain getters.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        Ok(Rights {
            uid,
            gid,
            cap_eff: eff,
            cap_prm: prm,
        })
    }

    /// Capability names of `cap_eff`, e.g. `["BPF", "PERFMON"]`.
    pub fn cap_names(&self) -> Vec<&'static str> {
        cap_names(self.cap_eff)
    }
}

/// Names of the capabilities in `mask` (unknown bits as `?`).
pub fn cap_names(mask: u64) -> Vec<&'static str> {
    (0..64)
        .filter(|b| mask & (1u64 << b) != 0)
        .map(|b| CAP_NAMES.get(b as usize).copied().unwrap_or("?"))
        .collect()
}

const CAP_NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

/// (effective, permitted) of the calling thread.
fn capget() -> Result<(u64, u64), PrivilegeError> {
    let mut hdr = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: valid header and a two-element array, as version 3 requires.
    let ret = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    check(ret, "capget")?;
    let join = |f: fn(&CapData) -> u32| u64::from(f(&data[0])) | (u64::from(f(&data[1])) << 32);
    Ok((join(|d| d.effective), join(|d| d.permitted)))
}

/// Sets the calling thread's effective and permitted sets to `caps`, inheritable to none.
fn capset(caps: u64) -> Result<(), PrivilegeError> {
    let mut hdr = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let lo = caps as u32;
    let hi = (caps >> 32) as u32;
    let data = [
        CapData {
            effective: lo,
            permitted: lo,
            inheritable: 0,
        },
        CapData {
            effective: hi,
            permitted: hi,
            inheritable: 0,
        },
    ];
    // SAFETY: valid header and a two-element array, as version 3 requires.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) };
    check(ret, "capset")
}

fn prctl(op: libc::c_int, arg: libc::c_ulong, what: &str) -> Result<(), PrivilegeError> {
    // SAFETY: prctl with integer arguments only.
    let ret = unsafe { libc::prctl(op, arg, 0 as libc::c_ulong, 0 as libc::c_ulong, 0) };
    check(ret.into(), what)
}

fn threads() -> usize {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(1)
}

/// Makes `dir` (created if missing) and everything under it owned by `uid:gid`, without
/// following symbolic links or leaving `dir`'s file system. Returns how many entries changed.
pub fn chown_tree(dir: &Path, uid: u32, gid: u32) -> io::Result<usize> {
    fs::create_dir_all(dir)?;
    let dev = fs::symlink_metadata(dir)?.dev();
    let mut changed = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = fs::symlink_metadata(&p)?;
        if md.dev() != dev {
            continue;
        }
        if md.uid() != uid || md.gid() != gid {
            lchown(&p, Some(uid), Some(gid))?;
            changed += 1;
        }
        if md.is_dir() {
            for e in fs::read_dir(&p)? {
                stack.push(e?.path());
            }
        }
    }
    Ok(changed)
}

/// Switches the process to `uid:gid` (no supplementary groups), keeping the capabilities it has
/// except [`START_UP_CAPS`], after handing `state_dir` to that user. Must run before any other
/// thread starts (capabilities are per thread). A process that is not uid 0 is left as it is.
/// Returns the rights it ends with; fails unless they are exactly what was asked.
pub fn drop_to(uid: u32, gid: u32, state_dir: &Path) -> Result<Rights, PrivilegeError> {
    let before = Rights::current()?;
    if before.uid != 0 {
        tracing::info!(
            uid = before.uid,
            "not started as root: running with the identity given"
        );
        return Ok(before);
    }
    if uid == 0 {
        return Ok(before);
    }
    let n = threads();
    if n != 1 {
        return Err(PrivilegeError::Threads(n));
    }
    let changed = chown_tree(state_dir, uid, gid)
        .map_err(sys(format!("chown -R {uid}:{gid} {}", state_dir.display())))?;
    if changed > 0 {
        tracing::info!(dir = %state_dir.display(), changed, uid, "state directory handed to the agent's user");
    }
    let start_up: u64 = START_UP_CAPS.iter().map(|(b, _)| 1u64 << b).sum();
    let keep = before.cap_prm & !start_up;
    prctl(libc::PR_SET_KEEPCAPS, 1, "prctl(PR_SET_KEEPCAPS)")?;
    // SAFETY: plain syscalls; the process is single-threaded (checked above).
    unsafe {
        check(
            libc::setgroups(0, std::ptr::null()).into(),
            "setgroups(none)",
        )?;
        check(libc::setresgid(gid, gid, gid).into(), "setresgid")?;
        check(libc::setresuid(uid, uid, uid).into(), "setresuid")?;
    }
    capset(keep)?;
    prctl(libc::PR_SET_KEEPCAPS, 0, "prctl(PR_SET_KEEPCAPS, 0)")?;
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        );
    }
    // Nothing exec'd later can gain rights (set-uid binaries, file capabilities), even where
    // the pod did not ask for it.
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")?;

    let after = Rights::current()?;
    let mut ids = [0u32; 6];
    // SAFETY: valid out-pointers.
    unsafe {
        libc::getresuid(&mut ids[0], &mut ids[1], &mut ids[2]);
        libc::getresgid(&mut ids[3], &mut ids[4], &mut ids[5]);
    }
    if ids[..3] != [uid; 3] || ids[3..] != [gid; 3] {
        return Err(PrivilegeError::Check(format!("uids/gids are {ids:?}")));
    }
    if after.cap_eff != keep || after.cap_prm != keep {
        return Err(PrivilegeError::Check(format!(
            "capabilities are eff {:#x} prm {:#x}, wanted {keep:#x}",
            after.cap_eff, after.cap_prm
        )));
    }
    Ok(after)
}

/// System calls the agent never makes, denied with `EPERM` by [`install_seccomp`]. Besides
/// these: `clone` with any namespace flag (`EPERM`), `clone3` (`ENOSYS`, so the C library falls
/// back to `clone`, whose flags a filter can see), and every call of another ABI (x32, i386),
/// which could otherwise reach the same kernel code under other numbers.
pub const DENIED: &[(&str, libc::c_long)] = &[
    // Other processes: the agent reads them (process_vm_readv, /proc) and never attaches to,
    // writes to, or takes from them.
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("process_madvise", libc::SYS_process_madvise),
    ("pidfd_getfd", libc::SYS_pidfd_getfd),
    ("kcmp", libc::SYS_kcmp),
    // Mounts and namespaces.
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("setns", libc::SYS_setns),
    ("unshare", libc::SYS_unshare),
    // The kernel itself.
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("reboot", libc::SYS_reboot),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("acct", libc::SYS_acct),
    ("quotactl", libc::SYS_quotactl),
    // CAP_SYSLOG is for /proc/kallsyms only, not for reading or clearing the kernel log.
    ("syslog", libc::SYS_syslog),
    // Keys, file handles that bypass paths, page-fault tricks, io_uring.
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    #[cfg(target_arch = "x86_64")]
    ("iopl", libc::SYS_iopl),
    #[cfg(target_arch = "x86_64")]
    ("ioperm", libc::SYS_ioperm),
];

#[repr(C)]
struct SockFilter {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

#[repr(C)]
struct SockFprog {
    len: libc::c_ushort,
    filter: *const SockFilter,
}

const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD (0) | BPF_W (0) | BPF_ABS
const BPF_JEQ_K: u16 = 0x05 | 0x10; // BPF_JMP | BPF_JEQ | BPF_K
const BPF_JGE_K: u16 = 0x05 | 0x30; // BPF_JMP | BPF_JGE | BPF_K
const BPF_JSET_K: u16 = 0x05 | 0x40; // BPF_JMP | BPF_JSET | BPF_K
const BPF_RET_K: u16 = 0x06;
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ERRNO: u32 = 0x0005_0000;
/// `struct seccomp_data`: nr at 0, arch at 4, args[0] at 16 (low half first).
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARG0_LO: u32 = 16;
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;
/// x32 system calls are x86-64 numbers with this bit set.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// Every `CLONE_NEW*` flag `clone` takes.
const CLONE_NS_FLAGS: u32 = 0x0002_0000 // NEWNS
    | 0x0200_0000 // NEWCGROUP
    | 0x0400_0000 // NEWUTS
    | 0x0800_0000 // NEWIPC
    | 0x1000_0000 // NEWUSER
    | 0x2000_0000 // NEWPID
    | 0x4000_0000; // NEWNET

fn stmt(code: u16, k: u32) -> SockFilter {
    SockFilter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> SockFilter {
    SockFilter { code, jt, jf, k }
}

/// The classic-BPF program of the deny list.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn program() -> Vec<SockFilter> {
    let eperm = RET_ERRNO | libc::EPERM as u32;
    let mut p = vec![
        stmt(BPF_LD_W_ABS, OFF_ARCH),
        jump(BPF_JEQ_K, AUDIT_ARCH, 1, 0),
        stmt(BPF_RET_K, eperm),
        stmt(BPF_LD_W_ABS, OFF_NR),
    ];
    #[cfg(target_arch = "x86_64")]
    p.extend([
        jump(BPF_JGE_K, X32_SYSCALL_BIT, 0, 1),
        stmt(BPF_RET_K, eperm),
    ]);
    for (_, nr) in DENIED {
        p.push(jump(BPF_JEQ_K, *nr as u32, 0, 1));
        p.push(stmt(BPF_RET_K, eperm));
    }
    p.extend([
        jump(BPF_JEQ_K, libc::SYS_clone3 as u32, 0, 1),
        stmt(BPF_RET_K, RET_ERRNO | libc::ENOSYS as u32),
        jump(BPF_JEQ_K, libc::SYS_clone as u32, 0, 3),
        stmt(BPF_LD_W_ABS, OFF_ARG0_LO),
        jump(BPF_JSET_K, CLONE_NS_FLAGS, 0, 1),
        stmt(BPF_RET_K, eperm),
        stmt(BPF_RET_K, RET_ALLOW),
    ]);
    p
}

/// Installs the deny-list filter on every thread of the process (and sets no_new_privs, which
/// an unprivileged process needs for it). Irreversible.
pub fn install_seccomp() -> Result<(), PrivilegeError> {
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    return Err(PrivilegeError::Arch);
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        let prog = program();
        let fprog = SockFprog {
            len: prog.len() as libc::c_ushort,
            filter: prog.as_ptr(),
        };
        prctl(libc::PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")?;
        const SECCOMP_SET_MODE_FILTER: libc::c_ulong = 1;
        const SECCOMP_FILTER_FLAG_TSYNC: libc::c_ulong = 1;
        // SAFETY: `fprog` points at `prog`, both alive for the call; the kernel copies it.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                SECCOMP_SET_MODE_FILTER,
                SECCOMP_FILTER_FLAG_TSYNC,
                &fprog as *const SockFprog,
            )
        };
        check(ret, "seccomp(SET_MODE_FILTER)")
    }
}

/// Proves the filter is enforced: `ptrace(PTRACE_ATTACH)` and `process_vm_writev` on a pid that
/// cannot exist fail with `ESRCH` without the filter (so the probe never touches a process) and
/// with `EPERM` under it. `Err` names the call that got through.
pub fn seccomp_self_test() -> Result<(), String> {
    const NO_PID: libc::pid_t = 0x3fff_ffff; // above PID_MAX_LIMIT (4 Mi)
    let probe = |name: &str, ret: libc::c_long| {
        let err = io::Error::last_os_error();
        if ret == -1 && err.raw_os_error() == Some(libc::EPERM) {
            Ok(())
        } else {
            Err(format!("{name} was not denied by seccomp: {ret} ({err})"))
        }
    };
    // SAFETY: the pid cannot exist; no memory is passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_ptrace,
            libc::PTRACE_ATTACH as libc::c_long,
            NO_PID as libc::c_long,
            0 as libc::c_long,
            0 as libc::c_long,
        )
    };
    probe("ptrace(PTRACE_ATTACH)", ret)?;
    // SAFETY: zero iovecs; the pid cannot exist.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_process_vm_writev,
            NO_PID as libc::c_long,
            std::ptr::null::<libc::iovec>(),
            0 as libc::c_ulong,
            std::ptr::null::<libc::iovec>(),
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    probe("process_vm_writev", ret)
}

/// `Seccomp:` of `/proc/self/status` (0 off, 1 strict, 2 filter).
pub fn seccomp_mode() -> u32 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Seccomp:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` in a forked child (filters and identities are per process and irreversible);
    /// returns its exit code.
    fn in_child(f: impl FnOnce() -> i32) -> i32 {
        // SAFETY: the child only makes system calls and exits without unwinding.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
            // SAFETY: leaving the child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "child status {status:#x}");
        libc::WEXITSTATUS(status)
    }

    #[test]
    fn the_filter_denies_the_list_and_lets_the_rest_through() {
        let code = in_child(|| {
            if seccomp_self_test().is_ok() {
                return 10; // denied before any filter: the probe could not fail
            }
            if install_seccomp().is_err() {
                return 11;
            }
            if seccomp_mode() != 2 {
                return 12;
            }
            if let Err(e) = seccomp_self_test() {
                eprintln!("{e}");
                return 13;
            }
            // Namespaces are refused; ordinary threads (clone3 → ENOSYS → clone) still start.
            // SAFETY: plain syscall.
            if unsafe { libc::unshare(libc::CLONE_NEWUSER) } != -1 {
                return 14;
            }
            if std::thread::spawn(|| 7).join().ok() != Some(7) {
                return 15;
            }
            if fs::read_to_string("/proc/self/status").is_err() {
                return 16;
            }
            0
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn dropping_privileges_keeps_the_run_time_capabilities_only() {
        if Rights::current().unwrap().uid != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir_all(state.join("spool/entry")).unwrap();
        fs::write(state.join("spool/entry/manifest.json"), "{}").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", state.join("link")).unwrap();
        let code = in_child(|| {
            // As the pod starts it: the run-time capabilities plus the start-up ones.
            let pod: u64 = [0u32, 6, 7, 19, 34, 38, 39].iter().map(|b| 1u64 << b).sum();
            if capset(pod).is_err() {
                return 20;
            }
            let rights = match drop_to(DEFAULT_UID, DEFAULT_UID, &state) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("{e}");
                    return 21;
                }
            };
            if rights.uid != DEFAULT_UID || rights.gid != DEFAULT_UID {
                return 22;
            }
            if rights.cap_names() != ["SYS_PTRACE", "SYSLOG", "PERFMON", "BPF"] {
                eprintln!("{:?}", rights.cap_names());
                return 23;
            }
            // The state directory is the agent's now; root's files are not.
            if fs::write(state.join("spool/entry/new"), "x").is_err() {
                return 24;
            }
            // SAFETY: plain syscalls; no way back to root.
            if unsafe { libc::setuid(0) } == 0 || unsafe { libc::chown(c"/".as_ptr(), 1, 1) } == 0 {
                return 25;
            }
            0
        });
        assert_eq!(code, 0);
        assert_eq!(
            fs::symlink_metadata(state.join("link")).unwrap().uid(),
            DEFAULT_UID
        );
        assert_eq!(
            fs::metadata("/etc/passwd").unwrap().uid(),
            0,
            "links are not followed"
        );
    }
}
