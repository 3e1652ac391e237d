//! Opening a profiled process's files as that process sees them, and only those.
//!
//! A tenant controls what lies under its container's root and may change it at any time. A
//! path opened as `/proc/<pid>/root/<path>` resolves an absolute symlink against the agent's
//! root (the host's), blocks on a FIFO, and may name another file than the one mapped. So a
//! target's file is opened with `openat2(RESOLVE_IN_ROOT)` relative to its root — symlinks
//! and `..` stay inside, `/proc` magic links are refused — without blocking, and only when it
//! is a regular file; a mapped file must also still be the file the mapping names.
use std::{
    ffi::CString,
    fs::File,
    io,
    os::fd::{FromRawFd as _, OwnedFd},
    os::unix::fs::MetadataExt as _,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use super::maps::MapEntry;

/// Why a target's file was not opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The file or the process is gone, or access was refused.
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    /// A FIFO, device, socket or directory where a file was expected.
    #[error("{path}: not a regular file")]
    NotRegular { path: String },
    /// The path names another file than the one the process mapped (replaced since).
    #[error("{path}: no longer the file the process mapped")]
    Replaced { path: String },
}

impl OpenError {
    /// Counted under `kprof_agent_errors_total{category}`: a tenant's doing or a vanished file.
    pub fn category(&self) -> &'static str {
        match self {
            OpenError::Io { .. } => "file_unreadable",
            OpenError::NotRegular { .. } | OpenError::Replaced { .. } => "module_replaced",
        }
    }
}

/// Opens `path` (as process `pid` names it) inside that process's root: read-only,
/// non-blocking, and only if it is a regular file.
pub fn open_in_root(pid: u32, path: &str) -> Result<File, OpenError> {
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    let io_err = |source| OpenError::Io {
        path: path.to_owned(),
        source,
    };
    let file = match openat2_in_root(pid, path) {
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => open_through_proc_root(pid, path),
        other => other,
    }
    .map_err(io_err)?;
    let md = file.metadata().map_err(io_err)?;
    if !md.is_file() {
        return Err(OpenError::NotRegular {
            path: path.to_owned(),
        });
    }
    Ok(file)
}

/// Opens the file `mapping` of process `pid` maps, checked to be that very file.
pub fn open_mapped(pid: u32, mapping: &MapEntry) -> Result<File, OpenError> {
    let file = open_in_root(pid, &mapping.path)?;
    let same = file.metadata().is_ok_and(|md| mapping.is_mapped_file(&md));
    if !same {
        return Err(OpenError::Replaced {
            path: mapping.path.clone(),
        });
    }
    Ok(file)
}

fn openat2_in_root(pid: u32, path: &str) -> io::Result<File> {
    let root = CString::new(format!("/proc/{pid}/root")).expect("no NUL in a number");
    // SAFETY: a valid NUL-terminated path; the result is checked.
    let dirfd = unsafe {
        libc::open(
            root.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if dirfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dirfd` was just opened and is owned here only.
    let dirfd = unsafe { OwnedFd::from_raw_fd(dirfd) };
    let relative = CString::new(path.trim_start_matches('/'))
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the path"))?;
    // SAFETY: a plain C struct, valid all zeros.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    use std::os::fd::AsRawFd as _;
    // SAFETY: valid fd, NUL-terminated path and an `open_how` of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirfd.as_raw_fd(),
            relative.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor owned by no one else.
    Ok(unsafe { File::from_raw_fd(fd as i32) })
}

/// Kernels before 5.6 lack `openat2`: the path is opened through `/proc/<pid>/root`, where a
/// symlink could leave the root — [`open_mapped`]'s identity check is then what refuses it.
fn open_through_proc_root(pid: u32, path: &str) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(format!("/proc/{pid}/root/{}", path.trim_start_matches('/')))
}

/// How long the agent waits for a target's file to be opened and read.
pub const READ_TIME_LIMIT: Duration = Duration::from_secs(1);
/// Reads that overran [`READ_TIME_LIMIT`] and have not finished yet.
static OVERRUNNING: AtomicUsize = AtomicUsize::new(0);
/// Beyond this many overrunning reads no more are started.
const MAX_OVERRUNNING: usize = 16;

/// Why [`within`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum TimedOut {
    #[error("reading took longer than {0:?} (a slow or hung file system)")]
    Slow(Duration),
    #[error("too many reads of slow file systems are still pending")]
    TooManyPending,
}

/// Runs `read` (opening and reading a target's files) on a thread of its own and waits at
/// most `limit` for it. A tenant's file system (FUSE, a hung network mount) can block a read
/// for ever, and the thread that samples must not wait with it. A read that overruns finishes
/// (or stays blocked) on its own; while [`MAX_OVERRUNNING`] do, no more are started.
pub fn within<T: Send + 'static>(
    limit: Duration,
    read: impl FnOnce() -> T + Send + 'static,
) -> Result<T, TimedOut> {
    if OVERRUNNING.load(Ordering::Relaxed) >= MAX_OVERRUNNING {
        return Err(TimedOut::TooManyPending);
    }
    // A rendezvous: a result is handed over only while the caller still waits for it.
    let (tx, rx) = std::sync::mpsc::sync_channel(0);
    let spawned = std::thread::Builder::new()
        .name("kprof-file-read".into())
        .spawn(move || {
            let out = read();
            if tx.send(out).is_err() {
                // The caller gave up on this one: it no longer overruns.
                OVERRUNNING.fetch_sub(1, Ordering::Relaxed);
            }
        });
    if spawned.is_err() {
        return Err(TimedOut::TooManyPending);
    }
    match rx.recv_timeout(limit) {
        Ok(out) => Ok(out),
        Err(_) => {
            // Counted before the reader can see the closed channel and uncount it.
            OVERRUNNING.fetch_add(1, Ordering::Relaxed);
            drop(rx);
            Err(TimedOut::Slow(limit))
        }
    }
}

/// A file's identity for caches: device, inode, size and modification time (a file rewritten
/// in place is another file).
pub fn identity(file: &File) -> io::Result<(u64, u64, u64, i64)> {
    let md = file.metadata()?;
    Ok((md.dev(), md.ino(), md.size(), md.mtime()))
}

/// A FIFO at `path`, where a tenant would put one (tests).
#[cfg(test)]
pub(crate) fn make_fifo(path: &std::path::Path) {
    let c = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A process whose root is `dir` is out of reach for a unit test; `/proc/self/root` is
    /// `/`, so escapes are checked by what a symlink may reach from a directory of ours.
    #[test]
    fn opens_regular_files_only() {
        let me = std::process::id();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        assert!(open_in_root(me, exe.to_str().unwrap()).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("libfifo.so");
        make_fifo(&fifo);
        // Returns at once (non-blocking) and refuses it.
        let err = open_in_root(me, fifo.to_str().unwrap()).unwrap_err();
        assert!(matches!(err, OpenError::NotRegular { .. }), "{err}");
        let err = open_in_root(me, dir.path().to_str().unwrap()).unwrap_err();
        assert!(matches!(err, OpenError::NotRegular { .. }), "{err}");
        let err = open_in_root(me, "/no/such/file").unwrap_err();
        assert!(matches!(err, OpenError::Io { .. }), "{err}");
    }

    #[test]
    fn a_read_that_hangs_is_left_behind() {
        let start = std::time::Instant::now();
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let slow = within(Duration::from_millis(50), move || wait.recv().is_ok());
        assert!(matches!(slow, Err(TimedOut::Slow(_))), "{slow:?}");
        assert!(start.elapsed() < Duration::from_secs(1));
        assert_eq!(within(Duration::from_secs(5), || 7).unwrap(), 7);
        release.send(()).unwrap();
    }

    #[test]
    fn magic_links_are_not_followed() {
        // `/proc/self/exe` inside a target's root would reach whatever the link points at.
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("libmagic.so");
        symlink("/proc/self/exe", &link).unwrap();
        let err = open_in_root(std::process::id(), link.to_str().unwrap()).unwrap_err();
        assert!(matches!(err, OpenError::Io { .. }), "{err}");
    }

    /// A process in another root (a child chrooted into a temporary directory, as a container
    /// would be): an absolute symlink and `..` there resolve inside it, never to the host's
    /// files. Needs root for `chroot`.
    #[test]
    fn symlinks_resolve_inside_the_process_root() {
        // SAFETY: plain syscall.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP symlinks_resolve_inside_the_process_root: needs root (chroot)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("lib")).unwrap();
        std::fs::write(dir.path().join("lib/own.so"), b"tenant").unwrap();
        symlink("/etc/hostname", dir.path().join("lib/host.so")).unwrap();
        symlink("../../../../etc/hostname", dir.path().join("lib/up.so")).unwrap();
        symlink("/lib/own.so", dir.path().join("lib/inside.so")).unwrap();
        let root = CString::new(dir.path().to_str().unwrap()).unwrap();
        // SAFETY: the child calls only async-signal-safe functions (chroot, pause, _exit).
        let child = unsafe { libc::fork() };
        if child == 0 {
            unsafe {
                if libc::chroot(root.as_ptr()) != 0 {
                    libc::_exit(1);
                }
                loop {
                    libc::pause();
                }
            }
        }
        assert!(child > 0);
        // Wait for the chroot to take effect.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::fs::read_link(format!("/proc/{child}/root"))
            .ok()
            .as_deref()
            != Some(dir.path())
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let pid = child as u32;
        let read = |p: &str| {
            open_in_root(pid, p).map(|mut f| {
                let mut s = String::new();
                io::Read::read_to_string(&mut f, &mut s).unwrap();
                s
            })
        };
        let results = (
            read("/lib/own.so"),
            read("/lib/inside.so"),
            read("/lib/host.so"),
            read("/lib/up.so"),
        );
        // SAFETY: our own child.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, std::ptr::null_mut(), 0);
        }
        assert_eq!(results.0.unwrap(), "tenant");
        assert_eq!(results.1.unwrap(), "tenant");
        // `/etc/hostname` does not exist inside: the host's is never read.
        assert!(
            results.2.is_err(),
            "the host's file was read: {:?}",
            results.2
        );
        assert!(
            results.3.is_err(),
            "the host's file was read: {:?}",
            results.3
        );
    }

    #[test]
    fn a_mapped_file_must_still_be_the_mapped_file() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("liba.so");
        std::fs::write(&lib, b"first").unwrap();
        let md = std::fs::metadata(&lib).unwrap();
        let mapping = MapEntry {
            start: 0x1000,
            end: 0x2000,
            offset: 0,
            perms: "r-xp".into(),
            dev: md.dev(),
            inode: md.ino(),
            path: lib.to_string_lossy().into(),
        };
        let me = std::process::id();
        assert!(open_mapped(me, &mapping).is_ok());
        // Replaced by another file at the same path (an upgrade, or a tenant's swap).
        let other = dir.path().join("other");
        std::fs::write(&other, b"second").unwrap();
        std::fs::rename(&other, &lib).unwrap();
        let err = open_mapped(me, &mapping).unwrap_err();
        assert!(matches!(err, OpenError::Replaced { .. }), "{err}");
        assert_eq!(err.category(), "module_replaced");
    }
}
