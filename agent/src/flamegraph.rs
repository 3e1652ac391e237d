//! Flame graph SVG (inferno) from the aggregated stacks: root frame = process, then the stack
//! from the outermost frame to the leaf.
use std::{collections::BTreeMap, io};

use inferno::flamegraph::{self, Options};

use crate::profile::{FrameKind, Profile};

/// Folded-stack lines (`proc;outer;…;leaf count`), sorted, one per distinct stack.
pub fn folded(profile: &Profile) -> Vec<String> {
    let mut lines: BTreeMap<String, u64> = BTreeMap::new();
    for (key, &count) in &profile.samples {
        let name = profile
            .processes
            .get(&key.pid)
            .map_or("?", |p| p.name.as_str());
        let mut line = sanitize(&format!("{name} ({})", key.pid));
        for f in key.stack.iter().rev() {
            line.push(';');
            line.push_str(&sanitize(&f.function));
            match f.kind {
                FrameKind::Kernel => line.push_str("_[k]"),
                FrameKind::Python if f.line > 0 => {
                    if let Some(file) = &f.file {
                        line.push_str(&sanitize(&format!(" ({file}:{})", f.line)));
                    }
                }
                _ => {}
            }
        }
        *lines.entry(line).or_default() += count;
    }
    lines.into_iter().map(|(l, c)| format!("{l} {c}")).collect()
}

/// `;` separates frames and the last space separates the count in the folded format.
fn sanitize(s: &str) -> String {
    s.replace(';', ":").replace(['\n', '\r'], " ")
}

/// Renders the flame graph SVG.
pub fn render(profile: &Profile, title: &str, out: impl io::Write) -> io::Result<()> {
    let lines = folded(profile);
    let mut opts = Options::default();
    opts.title = title.to_owned();
    opts.count_name = "samples".to_owned();
    opts.deterministic = true;
    if lines.is_empty() {
        // inferno refuses empty input; write a valid, explicit empty graph instead.
        let mut out = out;
        return writeln!(
            out,
            r#"<?xml version="1.0" standalone="no"?><svg xmlns="http://www.w3.org/2000/svg" width="600" height="60"><text x="10" y="30">{title}: no samples</text></svg>"#
        );
    }
    flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), out)
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::SystemTime};

    use super::*;
    use crate::profile::{Frame, ProcessMeta, SampleKey};

    #[test]
    fn folded_and_svg() {
        let mut p = Profile::new(99, SystemTime::UNIX_EPOCH);
        p.processes.insert(
            7,
            ProcessMeta {
                name: "app".into(),
                runtime: None,
            },
        );
        let stack: Arc<[Frame]> = vec![
            Frame::new(FrameKind::Kernel, "do_syscall_64"),
            Frame::new(FrameKind::Native, "a;b"),
            Frame::new(FrameKind::Native, "main"),
        ]
        .into();
        p.add(
            SampleKey {
                pid: 7,
                thread: "app".into(),
                stack,
            },
            3,
        );
        let lines = folded(&p);
        assert_eq!(lines, ["app (7);main;a:b;do_syscall_64_[k] 3"]);
        let mut svg = Vec::new();
        render(&p, "test", &mut svg).unwrap();
        let svg = String::from_utf8(svg).unwrap();
        assert!(svg.contains("<svg") && svg.contains("main"));
    }

    #[test]
    fn empty_profile_still_renders() {
        let p = Profile::new(99, SystemTime::UNIX_EPOCH);
        let mut svg = Vec::new();
        render(&p, "t", &mut svg).unwrap();
        assert!(String::from_utf8(svg).unwrap().contains("no samples"));
    }
}
