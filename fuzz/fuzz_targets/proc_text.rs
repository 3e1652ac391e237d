//! What the agent parses of `/proc`: a process's maps and its cgroup file (a tenant names its
//! own cgroups and files). Never a panic; one map entry per line at most, its path within its
//! line; a container is a 64-hex-digit id (the key the agent looks pods up by), a pod UID is
//! a UUID.
#![no_main]
use kprof_agent::proc::{cgroup, maps};
use libfuzzer_sys::fuzz_target;

fn check(c: &cgroup::ContainerRef) {
    assert_eq!(c.id.len(), 64, "{c:?}");
    assert!(c.id.bytes().all(|b| b.is_ascii_hexdigit()), "{c:?}");
    if let Some(uid) = &c.pod_uid {
        assert_eq!(uid.len(), 36, "{c:?}");
        assert_eq!(uid.matches('-').count(), 4, "{c:?}");
    }
}

fuzz_target!(|text: &str| {
    let entries = maps::parse_maps(text);
    assert!(entries.len() <= text.lines().count());
    for e in entries {
        assert!(!e.path.contains('\n'));
        let _ = (e.is_exec(), e.is_file());
        if e.start <= e.end && e.offset.checked_add(e.end - e.start).is_some() {
            let _ = e.file_offset(e.start);
        }
    }
    if let Some(c) = cgroup::parse_proc_cgroup(text) {
        check(&c);
    }
    for line in text.lines() {
        if let Some(c) = cgroup::parse_cgroup_path(line) {
            check(&c);
        }
    }
});
