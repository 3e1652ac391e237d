//! pprof output: the [`AggregatedProfile`] encoded as `profile.proto` (gzip). The messages, the
//! table interning and the views (top, flame graph) are `kprof_pprof`'s, shared with the store.
use std::{collections::HashMap, time::UNIX_EPOCH};

use kprof_pprof::{
    builder::{Builder, MappingSpec},
    labels, mappings,
};

use crate::profile::{AggregatedProfile, Frame, FrameKind};

pub use kprof_pprof::{
    Function, Label, Line, Location, Mapping, PprofError, Profile as PprofProfile, Sample,
    ValueType,
};

/// Builds the pprof message of a profile.
pub fn build(profile: &AggregatedProfile) -> PprofProfile {
    let mut b = Builder::new();
    // The sample types are the profile kind's, declared once in `kprof_pprof::types`.
    let types = profile.kind.pprof_types();
    let sample_type: Vec<ValueType> = types
        .sample_types
        .iter()
        .map(|t| b.value_type(t.r#type, t.unit))
        .collect();
    let default_sample_type = sample_type.get(types.default_index).map_or(0, |t| t.r#type);
    let mut out = PprofProfile {
        sample_type,
        period_type: Some(b.value_type(types.period_type.r#type, types.period_type.unit)),
        period: profile.period_ns(),
        time_nanos: profile
            .start
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0),
        duration_nanos: profile.duration.as_nanos() as i64,
        default_sample_type,
        ..Default::default()
    };

    // Mappings: one per module (kernel, each ELF file, pseudo mappings), ids from 1.
    let build_ids: HashMap<&str, &str> = profile
        .modules
        .iter()
        .filter_map(|m| m.id.build_id().map(|b| (&*m.path, b)))
        .collect();
    let mapping = |b: &mut Builder, module: &str| {
        b.mapping(MappingSpec {
            filename: module,
            build_id: build_ids.get(module).copied().unwrap_or(""),
            ..Default::default()
        })
    };

    // Mapping order: tools treat the first mapping as the main binary. Native modules by the
    // number of samples they appear in (executables before shared objects on ties), kernel last.
    let mut weight: HashMap<&str, u64> = HashMap::new();
    for (key, count) in &profile.samples {
        let mut seen: Vec<&str> = Vec::new();
        for f in key.stack.iter() {
            let m = module_name(f);
            if !seen.contains(&m) {
                seen.push(m);
            }
        }
        for m in seen {
            *weight.entry(m).or_default() += count;
        }
    }
    let mut order: Vec<(&str, u64)> = weight.into_iter().collect();
    order.sort_by(|(a, wa), (b, wb)| {
        let rank = |m: &str| (m == mappings::KERNEL, m.contains(".so"));
        rank(a)
            .cmp(&rank(b))
            .then(wb.cmp(wa))
            .then_with(|| a.cmp(b))
    });
    for (module, _) in order {
        mapping(&mut b, module);
    }

    let label_keys = LabelKeys::new(&mut b);
    for (key, count) in profile.sorted_samples() {
        let mut loc_ids = Vec::with_capacity(key.stack.len());
        // Group inlined frames with their caller into one location (pprof's inline model).
        let mut i = 0;
        while i < key.stack.len() {
            let mut j = i;
            while j + 1 < key.stack.len()
                && key.stack[j].inlined
                && key.stack[j + 1].address == key.stack[i].address
                && key.stack[j + 1].module == key.stack[i].module
            {
                j += 1;
            }
            let group = &key.stack[i..=j];
            let head = &group[0];
            let mapping_id = mapping(&mut b, module_name(head));
            b.cover(mapping_id, head.address);
            let lines = group
                .iter()
                .map(|f| {
                    let file = f.file.as_deref().unwrap_or("");
                    // Start lines are set below, once every line of the function is known.
                    let function_id = b.function(&f.function, &f.function, file, 0);
                    Line {
                        function_id,
                        line: i64::from(f.line),
                        ..Line::default()
                    }
                })
                .collect();
            loc_ids.push(b.location(mapping_id, head.address, lines, false));
            i = j + 1;
        }
        let mut label = vec![
            Label {
                key: label_keys.pid,
                num: i64::from(key.pid),
                ..Default::default()
            },
            Label {
                key: label_keys.thread,
                str: b.string(&key.thread),
                ..Default::default()
            },
        ];
        if key.tid != 0 {
            label.push(Label {
                key: label_keys.tid,
                num: i64::from(key.tid),
                ..Default::default()
            });
        }
        if let Some(held) = key.gil_held {
            label.push(Label {
                key: label_keys.gil,
                str: b.string(if held { "held" } else { "released" }),
                ..Default::default()
            });
        }
        if let Some(w) = &key.wait {
            label.push(Label {
                key: label_keys.state,
                str: b.string(w.state.as_str()),
                ..Default::default()
            });
            if let Some(class) = w.class {
                label.push(Label {
                    key: label_keys.wait_class,
                    str: b.string(class.as_str()),
                    ..Default::default()
                });
            }
            if let Some(lock) = w.lock {
                label.push(Label {
                    key: label_keys.lock,
                    num: lock as i64,
                    ..Default::default()
                });
            }
        }
        if let Some(p) = profile.processes.get(&key.pid)
            && !p.name.is_empty()
        {
            label.push(Label {
                key: label_keys.process,
                str: b.string(&p.name),
                ..Default::default()
            });
        }
        let l = &profile.labels;
        for (k, v) in [
            (label_keys.namespace, &l.namespace),
            (label_keys.pod, &l.pod),
            (label_keys.container, &l.container),
            (label_keys.node, &l.node),
        ] {
            if !v.is_empty() {
                label.push(Label {
                    key: k,
                    str: b.string(v),
                    ..Default::default()
                });
            }
        }
        out.sample.push(Sample {
            location_id: loc_ids,
            value: profile.pprof_values(key, count),
            label,
        });
    }
    // A function's start line: the smallest line seen in it (a useful approximation).
    let mut start: HashMap<u64, i64> = HashMap::new();
    for loc in b.locations() {
        for l in &loc.line {
            if l.line > 0 {
                let e = start.entry(l.function_id).or_insert(l.line);
                *e = (*e).min(l.line);
            }
        }
    }
    for f in b.functions_mut() {
        f.start_line = start.get(&f.id).copied().unwrap_or(0);
    }
    for w in &profile.warnings {
        let c = b.string(w);
        out.comment.push(c);
    }
    if profile.dropped > 0 {
        let c = b.string(&format!("dropped samples: {}", profile.dropped));
        out.comment.push(c);
    }
    b.finish(out)
}

struct LabelKeys {
    pid: i64,
    thread: i64,
    tid: i64,
    state: i64,
    wait_class: i64,
    lock: i64,
    gil: i64,
    process: i64,
    namespace: i64,
    pod: i64,
    container: i64,
    node: i64,
}

impl LabelKeys {
    fn new(b: &mut Builder) -> Self {
        LabelKeys {
            pid: b.string(labels::PID),
            thread: b.string(labels::THREAD_NAME),
            tid: b.string(labels::THREAD_ID),
            state: b.string(labels::STATE),
            wait_class: b.string(labels::WAIT_CLASS),
            lock: b.string(labels::LOCK),
            gil: b.string(labels::GIL),
            process: b.string(labels::PROCESS_NAME),
            namespace: b.string(labels::NAMESPACE),
            pod: b.string(labels::POD),
            container: b.string(labels::CONTAINER),
            node: b.string(labels::NODE),
        }
    }
}

/// The mapping a frame belongs to.
fn module_name(f: &Frame) -> &str {
    match (f.kind, &f.module) {
        (FrameKind::Kernel, _) => mappings::KERNEL,
        (FrameKind::Python, m) => m.as_deref().unwrap_or(mappings::PYTHON),
        (FrameKind::Native, m) => m.as_deref().unwrap_or("[unknown]"),
    }
}

/// Encodes a profile as gzip-compressed `profile.proto` bytes.
pub fn encode(profile: &AggregatedProfile) -> Result<Vec<u8>, PprofError> {
    Ok(build(profile).encode_gzip())
}

/// Decodes gzip-compressed (or plain) `profile.proto` bytes.
pub fn decode(bytes: &[u8]) -> Result<PprofProfile, PprofError> {
    PprofProfile::decode_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use std::{
        sync::Arc,
        time::{Duration, SystemTime},
    };

    use super::*;

    /// Function names of a sample's stack, leaf first (inlined frames expanded).
    fn stack_names(p: &PprofProfile, sample: &Sample) -> Vec<String> {
        let locs: HashMap<u64, &Location> = p.location.iter().map(|l| (l.id, l)).collect();
        let funcs: HashMap<u64, &Function> = p.function.iter().map(|f| (f.id, f)).collect();
        let mut names = Vec::new();
        for id in &sample.location_id {
            if let Some(loc) = locs.get(id) {
                for line in &loc.line {
                    if let Some(f) = funcs.get(&line.function_id) {
                        names.push(p.str(f.name).to_owned());
                    }
                }
            }
        }
        names
    }
    use crate::{
        profile::{ProcessMeta, SampleKey},
        symbolize::{KERNEL_MODULE, ModuleId, ModuleInfo},
    };

    fn sample_profile() -> AggregatedProfile {
        let mut p = AggregatedProfile::new(
            99,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        );
        p.duration = Duration::from_secs(10);
        p.labels.node = "node-a".into();
        p.processes.insert(
            42,
            ProcessMeta {
                name: "hot".into(),
                runtime: None,
            },
        );
        p.modules.push(ModuleInfo {
            path: "/tmp/hot".into(),
            id: ModuleId::from_build_id(&[0xab, 0xcd]),
        });
        let native = |name: &str, addr: u64, line: u32, inlined: bool| Frame {
            kind: FrameKind::Native,
            function: name.into(),
            file: Some("hot.c".into()),
            line,
            module: Some("/tmp/hot".into()),
            address: addr,
            inlined,
        };
        let stack: Arc<[Frame]> = vec![
            native("square", 0x1010, 3, true), // inlined into hot_loop at the same address
            native("hot_loop", 0x1010, 9, false),
            native("main", 0x1100, 20, false),
        ]
        .into();
        p.add(
            SampleKey {
                pid: 42,
                tid: 0,
                thread: "hot".into(),
                wait: None,
                gil_held: None,
                stack,
            },
            90,
        );
        let kstack: Arc<[Frame]> = vec![
            Frame {
                address: 0xffff_ffff_8100_0000,
                module: Some(KERNEL_MODULE.into()),
                ..Frame::new(FrameKind::Kernel, "__x64_sys_getpid")
            },
            native("main", 0x1100, 20, false),
        ]
        .into();
        p.add(
            SampleKey {
                pid: 42,
                tid: 0,
                thread: "hot".into(),
                wait: None,
                gil_held: None,
                stack: kstack,
            },
            10,
        );
        p
    }

    #[test]
    fn round_trip() {
        let p = sample_profile();
        let bytes = encode(&p).unwrap();
        assert_eq!(&bytes[..2], &[0x1f, 0x8b], "gzip");
        let d = decode(&bytes).unwrap();
        assert_eq!(d.string_table[0], "");
        assert_eq!(d.str(d.sample_type[0].r#type), "samples");
        assert_eq!(d.str(d.sample_type[0].unit), "count");
        assert_eq!(d.str(d.sample_type[1].r#type), "cpu");
        assert_eq!(d.str(d.sample_type[1].unit), "nanoseconds");
        assert_eq!(d.period, 1_000_000_000 / 99);
        assert_eq!(d.duration_nanos, 10_000_000_000);
        let total: i64 = d.sample.iter().map(|s| s.value[0]).sum();
        assert_eq!(total, 100);
        for s in &d.sample {
            assert_eq!(s.value[1], s.value[0] * d.period);
        }
        let hot = d.sample.iter().find(|s| s.value[0] == 90).unwrap();
        assert_eq!(stack_names(&d, hot), ["square", "hot_loop", "main"]);
        assert_eq!(
            hot.location_id.len(),
            2,
            "inlined frame shares its caller's location"
        );
        // Locations and functions are shared across samples.
        assert_eq!(d.function.len(), 4);
        let main_fn = d.function.iter().find(|f| d.str(f.name) == "main").unwrap();
        assert_eq!(d.str(main_fn.filename), "hot.c");
        assert_eq!(main_fn.start_line, 20);
        // Mappings carry the build id; the kernel has its own mapping.
        let m = d
            .mapping
            .iter()
            .find(|m| d.str(m.filename) == "/tmp/hot")
            .unwrap();
        assert_eq!(d.str(m.build_id), "abcd");
        assert!(m.memory_start <= 0x1010 && m.memory_limit > 0x1100);
        assert!(d.mapping.iter().any(|m| d.str(m.filename) == KERNEL_MODULE));
        // Labels.
        let labels: Vec<(String, String, i64)> = hot
            .label
            .iter()
            .map(|l| (d.str(l.key).to_owned(), d.str(l.str).to_owned(), l.num))
            .collect();
        assert!(labels.contains(&("pid".into(), "".into(), 42)));
        assert!(labels.contains(&("thread_name".into(), "hot".into(), 0)));
        assert!(labels.contains(&("node".into(), "node-a".into(), 0)));
        assert!(
            !labels.iter().any(|l| l.0 == "pod"),
            "empty k8s labels are omitted"
        );
        // Every id referenced exists.
        for s in &d.sample {
            for id in &s.location_id {
                assert!(d.location.iter().any(|l| l.id == *id));
            }
        }
    }

    #[test]
    fn deterministic() {
        let p = sample_profile();
        assert_eq!(encode(&p).unwrap(), encode(&p).unwrap());
    }

    #[test]
    fn decode_rejects_garbage() {
        assert!(decode(&[0x1f, 0x8b, 0, 1, 2]).is_err());
    }
}
