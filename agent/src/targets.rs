//! Which processes are profiled: validating pids, starting a command so that it is targeted
//! before its first instruction, and keeping the kernel's tgid map in step (children added by
//! the fork follower are kept when they are processes, dropped when they are threads or gone).
use std::{
    fs, io,
    process::{Child, Command},
};

/// Errors about targets.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("no process with pid {0}")]
    NoSuchPid(u32),
    #[error("pid {0} is a thread, not a process (its process is {1})")]
    NotAProcess(u32, u32),
    #[error("cannot start {cmd}")]
    Spawn {
        cmd: String,
        #[source]
        source: io::Error,
    },
}

/// The thread-group id of a task, from `/proc/<id>/status` (`None` when it does not exist).
pub fn tgid_of(id: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{id}/status")).ok()?;
    parse_status_tgid(&status)
}

/// Parses `Tgid:` of a `/proc/<id>/status` text.
pub fn parse_status_tgid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Whether a process (thread-group leader) `pid` exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    proc_state(pid).is_some_and(|(tgid, alive)| tgid == pid && alive)
}

/// `(tgid, alive)` of a task id from one read of `/proc/<id>/status` (alive: not a zombie or
/// dead, and a thread-group leader); `None` when it does not exist. The housekeeping calls
/// this for every target every second, so one file read, not three.
pub fn proc_state(id: u32) -> Option<(u32, bool)> {
    let status = fs::read_to_string(format!("/proc/{id}/status")).ok()?;
    let tgid = parse_status_tgid(&status)?;
    let state = status
        .lines()
        .find_map(|l| l.strip_prefix("State:"))
        .and_then(|v| v.trim_start().chars().next());
    Some((
        tgid,
        tgid == id && state.is_some_and(|s| s != 'Z' && s != 'X'),
    ))
}

/// Checks that `pid` names a live process.
pub fn validate_pid(pid: u32) -> Result<(), TargetError> {
    match tgid_of(pid) {
        None => Err(TargetError::NoSuchPid(pid)),
        Some(t) if t != pid => Err(TargetError::NotAProcess(pid, t)),
        Some(_) if !process_alive(pid) => Err(TargetError::NoSuchPid(pid)),
        Some(_) => Ok(()),
    }
}

/// Starts `argv` stopped just before its `exec`, so the caller can target its pid before it
/// runs a single instruction of the program; continue it with [`resume`].
///
/// `/bin/sh -c 'kill -STOP $$; exec "$@"'` stops itself after `spawn` returned and then `exec`s
/// the command under the same pid.
pub fn spawn_stopped(argv: &[String]) -> Result<Child, TargetError> {
    let spawn_err = |source| TargetError::Spawn {
        cmd: argv.join(" "),
        source,
    };
    let prog = argv
        .first()
        .ok_or_else(|| spawn_err(io::Error::new(io::ErrorKind::InvalidInput, "empty command")))?;
    if find_program(prog).is_none() {
        return Err(spawn_err(io::Error::new(
            io::ErrorKind::NotFound,
            "command not found or not executable",
        )));
    }
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg("kill -STOP $$; exec \"$@\"")
        .arg("sh")
        .args(argv)
        .spawn()
        .map_err(spawn_err)?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: waitpid on our own child with a valid status pointer; WUNTRACED reports the stop
    // without reaping.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WUNTRACED) };
    if r != pid || !libc::WIFSTOPPED(status) {
        return Err(spawn_err(io::Error::other(
            "child did not stop before exec",
        )));
    }
    Ok(child)
}

/// Resolves a program name like `execvp` does (a path, or a name searched in `PATH`).
pub fn find_program(prog: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let is_exec = |p: &std::path::Path| {
        fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if prog.contains('/') {
        let p = std::path::PathBuf::from(prog);
        return is_exec(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| is_exec(p))
}

/// Continues a child started by [`spawn_stopped`].
pub fn resume(child: &Child) {
    // SAFETY: signal to our own child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGCONT);
    }
}

/// What to do with one entry of the kernel's target map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prune {
    Keep,
    /// A thread id inserted by the fork follower (older agents), or a process that is gone.
    Remove,
}

/// Decides whether an entry stays (pure, for tests): inherited entries must be live processes.
pub fn prune_decision(id: u32, inherited: bool, tgid: Option<u32>, alive: bool) -> Prune {
    match tgid {
        None => Prune::Remove,
        Some(t) if inherited && t != id => Prune::Remove,
        Some(_) if !alive => Prune::Remove,
        Some(_) => Prune::Keep,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_stat_parsing() {
        assert_eq!(
            parse_status_tgid("Name:\tx\nTgid:\t1234\nPid:\t1240\n"),
            Some(1234)
        );
        assert_eq!(parse_status_tgid("Name: x\n"), None);
        let me = std::process::id();
        assert_eq!(proc_state(me), Some((me, true)));
        assert_eq!(proc_state(u32::MAX - 1), None);
    }

    #[test]
    fn validate_self_and_missing() {
        validate_pid(std::process::id()).unwrap();
        assert!(matches!(
            validate_pid(u32::MAX - 1),
            Err(TargetError::NoSuchPid(_))
        ));
    }

    #[test]
    fn prune_rules() {
        assert_eq!(prune_decision(10, true, Some(10), true), Prune::Keep);
        assert_eq!(
            prune_decision(11, true, Some(10), true),
            Prune::Remove,
            "thread"
        );
        assert_eq!(
            prune_decision(12, false, None, false),
            Prune::Remove,
            "gone"
        );
        assert_eq!(
            prune_decision(13, false, Some(13), false),
            Prune::Remove,
            "zombie"
        );
    }

    #[test]
    fn spawned_child_waits_for_resume() {
        let child = spawn_stopped(&["/bin/true".to_owned()]).unwrap();
        let pid = child.id();
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(
            status.contains("State:\tT (stopped)"),
            "stopped before exec: {status}"
        );
        resume(&child);
        let mut child = child;
        assert!(child.wait().unwrap().success());
        assert!(matches!(
            spawn_stopped(&["/nonexistent/cmd".to_owned()]),
            Err(TargetError::Spawn { .. })
        ));
    }
}
