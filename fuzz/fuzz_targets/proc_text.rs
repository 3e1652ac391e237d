//! What the agent parses of `/proc`: a process's maps and its cgroup file (a tenant names its
//! own cgroups and files). Never a panic; what a map line gives is ordered.
#![no_main]
use kprof_agent::proc::{cgroup, maps};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    for e in maps::parse_maps(text) {
        let _ = (e.is_exec(), e.is_file());
        if e.start <= e.end && e.offset.checked_add(e.end - e.start).is_some() {
            let _ = e.file_offset(e.start);
        }
    }
    let _ = cgroup::parse_proc_cgroup(text);
    for line in text.lines() {
        let _ = cgroup::parse_cgroup_path(line);
    }
});
