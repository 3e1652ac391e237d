//! pid → container: parses `/proc/<pid>/cgroup` into the container id (and the pod UID when the
//! path carries it) for containerd, CRI-O and docker, in cgroup v1 and v2, cgroupfs and systemd
//! driver forms. Pure; the Kubernetes mode maps the id to pod/container through the node's pods.
use std::{fs, io};

/// Container runtime named by the cgroup path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
    /// A bare id (cgroupfs driver): the runtime is not in the path.
    Unknown,
}

/// The container a process runs in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerRef {
    pub runtime: Runtime,
    /// 64 hex digits.
    pub id: String,
    /// Pod UID with dashes, when the path has a `pod<uid>` segment (Kubernetes).
    pub pod_uid: Option<String>,
}

/// Reads and parses `/proc/<pid>/cgroup`. `Ok(None)`: not in a container.
pub fn container_of(pid: u32) -> io::Result<Option<ContainerRef>> {
    Ok(parse_proc_cgroup(&fs::read_to_string(format!(
        "/proc/{pid}/cgroup"
    ))?))
}

/// Parses the text of `/proc/<pid>/cgroup` (`hierarchy-id:controllers:path` lines). The v2 line
/// (`0::`) is preferred; v1 lines are tried next.
pub fn parse_proc_cgroup(text: &str) -> Option<ContainerRef> {
    let mut paths: Vec<(bool, &str)> = text
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let id = it.next()?;
            let _controllers = it.next()?;
            let path = it.next()?;
            Some((id == "0", path))
        })
        .collect();
    paths.sort_by_key(|(v2, _)| !v2);
    paths.into_iter().find_map(|(_, p)| parse_cgroup_path(p))
}

/// Finds the container in one cgroup path.
pub fn parse_cgroup_path(path: &str) -> Option<ContainerRef> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let pod_uid = segments.iter().rev().find_map(|s| pod_uid_of(s));
    for (i, seg) in segments.iter().enumerate().rev() {
        let name = seg.strip_suffix(".scope").unwrap_or(seg);
        let (runtime, id) = if let Some(id) = name.strip_prefix("cri-containerd-") {
            (Runtime::Containerd, id)
        } else if let Some(id) = name.strip_prefix("crio-") {
            if id.starts_with("conmon-") {
                continue; // the conmon monitor process, not the container
            }
            (Runtime::CriO, id)
        } else if let Some(id) = name.strip_prefix("docker-") {
            (Runtime::Docker, id)
        } else if let Some(id) = name.strip_prefix("containerd-") {
            (Runtime::Containerd, id)
        } else if i > 0 && segments[i - 1] == "docker" {
            (Runtime::Docker, name)
        } else {
            (Runtime::Unknown, name)
        };
        if is_container_id(id) {
            return Some(ContainerRef {
                runtime,
                id: id.to_owned(),
                pod_uid,
            });
        }
    }
    None
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `pod<uid>` (cgroupfs) or `kubepods-<qos>-pod<uid_with_underscores>.slice` (systemd).
fn pod_uid_of(seg: &str) -> Option<String> {
    let s = seg.strip_suffix(".slice").unwrap_or(seg);
    let idx = s.rfind("pod")?;
    // `pod` must start the segment or follow a `-`.
    if idx > 0 && s.as_bytes()[idx - 1] != b'-' {
        return None;
    }
    let uid = s[idx + 3..].replace('_', "-");
    let ok = uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| {
            if [8, 13, 18, 23].contains(&i) {
                b == b'-'
            } else {
                b.is_ascii_hexdigit()
            }
        });
    ok.then_some(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f3a7c1e2b9d8a6f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a21";
    const UID: &str = "0d2b8f8e-1c3a-4b5d-9e7f-a1b2c3d4e5f6";

    fn uid_us() -> String {
        UID.replace('-', "_")
    }

    #[test]
    fn containerd_systemd_v2() {
        let text = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope\n",
            uid_us()
        );
        let c = parse_proc_cgroup(&text).unwrap();
        assert_eq!(c.runtime, Runtime::Containerd);
        assert_eq!(c.id, ID);
        assert_eq!(c.pod_uid.as_deref(), Some(UID));
    }

    #[test]
    fn cgroupfs_v1_kubepods() {
        let text = format!(
            "12:pids:/kubepods/besteffort/pod{UID}/{ID}\n11:memory:/kubepods/besteffort/pod{UID}/{ID}\n1:name=systemd:/kubepods/besteffort/pod{UID}/{ID}\n0::/\n"
        );
        let c = parse_proc_cgroup(&text).unwrap();
        assert_eq!(c.runtime, Runtime::Unknown);
        assert_eq!(c.id, ID);
        assert_eq!(c.pod_uid.as_deref(), Some(UID));
        // guaranteed QoS: no qos segment
        let c = parse_cgroup_path(&format!("/kubepods/pod{UID}/{ID}")).unwrap();
        assert_eq!(c.pod_uid.as_deref(), Some(UID));
    }

    #[test]
    fn crio_skips_conmon() {
        let c = parse_cgroup_path(&format!(
            "/kubepods.slice/kubepods-pod{}.slice/crio-{ID}.scope",
            uid_us()
        ))
        .unwrap();
        assert_eq!(c.runtime, Runtime::CriO);
        assert_eq!(c.pod_uid.as_deref(), Some(UID));
        assert!(parse_cgroup_path(&format!("/kubepods.slice/crio-conmon-{ID}.scope")).is_none());
    }

    #[test]
    fn docker_forms() {
        let c = parse_cgroup_path(&format!("/system.slice/docker-{ID}.scope")).unwrap();
        assert_eq!((c.runtime, c.pod_uid), (Runtime::Docker, None));
        let c = parse_proc_cgroup(&format!("4:cpu,cpuacct:/docker/{ID}\n")).unwrap();
        assert_eq!(c.runtime, Runtime::Docker);
        assert_eq!(c.id, ID);
    }

    #[test]
    fn kind_nested_and_namespaced_paths() {
        // kind node: the node's own cgroup prefixes the pod path.
        let c = parse_cgroup_path(&format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{}.slice/cri-containerd-{ID}.scope",
            uid_us()
        ))
        .unwrap();
        assert_eq!(c.pod_uid.as_deref(), Some(UID));
        // Inside a cgroup namespace the path is relative.
        assert_eq!(
            parse_proc_cgroup(&format!("0::/../cri-containerd-{ID}.scope"))
                .unwrap()
                .id,
            ID
        );
    }

    #[test]
    fn v2_preferred_over_v1() {
        let other = ID.replace('4', "5");
        let text = format!("5:memory:/docker/{other}\n0::/system.slice/docker-{ID}.scope\n");
        assert_eq!(parse_proc_cgroup(&text).unwrap().id, ID);
    }

    #[test]
    fn not_in_a_container() {
        assert!(parse_proc_cgroup("0::/\n").is_none());
        assert!(parse_proc_cgroup("0::/user.slice/user-0.slice/session-1.scope\n").is_none());
        assert!(parse_proc_cgroup("12:cpu:/\n").is_none());
        assert!(parse_proc_cgroup("").is_none());
        assert!(parse_cgroup_path("/kubepods/burstable/podnot-a-uid/abc").is_none());
    }
}
