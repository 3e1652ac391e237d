//! Command-line errors of `kprof-agent record` that need no privileges: one line, non-zero exit.
use std::process::{Command, Output};

const AGENT: &str = env!("CARGO_BIN_EXE_kprof-agent");

fn run(args: &[&str]) -> Output {
    Command::new(AGENT)
        .args(args)
        .output()
        .expect("run kprof-agent")
}

fn assert_one_line_error(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "must fail: {err}");
    assert!(err.contains(needle), "expected {needle:?} in {err:?}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err:?}");
    assert!(!err.contains("panicked") && !err.contains("backtrace"));
}

#[test]
fn bad_pid() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(&[
        "record",
        "--pid",
        "4294967290",
        "-o",
        dir.path().to_str().unwrap(),
    ]);
    assert_one_line_error(&o, "no process with pid 4294967290");
}

#[test]
fn unwritable_output_dir() {
    let o = run(&[
        "record",
        "--pid",
        "1",
        "-o",
        "/proc/kprof-cannot-write-here",
    ]);
    assert_one_line_error(&o, "cannot write to /proc/kprof-cannot-write-here");
}

#[test]
fn nothing_to_profile() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(&["record", "-o", dir.path().to_str().unwrap()]);
    assert_one_line_error(&o, "nothing to profile");
}

#[test]
fn missing_command() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(&[
        "record",
        "-o",
        dir.path().to_str().unwrap(),
        "--",
        "/nonexistent/kprof-cmd",
    ]);
    // Without privileges the capability check may come first; both are one-line errors.
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn bad_frequency_and_duration_are_usage_errors() {
    let o = run(&["record", "--hz", "5000", "-o", "/tmp", "--pid", "1"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("1..=1000"));
    let o = run(&["record", "-d", "soon", "-o", "/tmp", "--pid", "1"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("invalid duration"));
}
