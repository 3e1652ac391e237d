//! Merging profiles of one kind into one, and small synthetic profiles for tests and benchmarks.

use std::collections::HashMap;

use crate::{
    Function, Label, Line, Location, Mapping, Profile, Sample,
    builder::{Builder, MappingSpec},
};

/// Why profiles could not be combined.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("profiles of different kinds cannot be merged: [{0}] vs [{1}]")]
    Incompatible(String, String),
    #[error("nothing to merge")]
    Empty,
}

/// Merge profiles of the same kind (same sample types) into one: identical stacks with identical
/// labels are summed, strings, functions, locations and mappings are de-duplicated. The result's
/// time span covers every input.
pub fn merge(profiles: &[Profile]) -> Result<Profile, MergeError> {
    let first = profiles.first().ok_or(MergeError::Empty)?;
    let kinds = first.sample_types();
    for p in &profiles[1..] {
        let other = p.sample_types();
        if other != kinds {
            return Err(MergeError::Incompatible(kinds.join(", "), other.join(", ")));
        }
    }
    let mut b = Builder::new();
    let mut out = Profile {
        sample_type: first
            .sample_type
            .iter()
            .map(|t| b.value_type(first.str(t.r#type), first.str(t.unit)))
            .collect(),
        period_type: first
            .period_type
            .as_ref()
            .map(|t| b.value_type(first.str(t.r#type), first.str(t.unit))),
        period: first.period,
        default_sample_type: if first.default_sample_type != 0 {
            b.string(first.str(first.default_sample_type))
        } else {
            0
        },
        ..Default::default()
    };
    let mut start = i64::MAX;
    let mut end = i64::MIN;
    let mut samples: HashMap<(Vec<u64>, Vec<Label>), usize> = HashMap::new();
    for p in profiles {
        if p.time_nanos != 0 {
            start = start.min(p.time_nanos);
            end = end.max(p.time_nanos.saturating_add(p.duration_nanos));
        }
        for c in &p.comment {
            let c = b.string(p.str(*c));
            if !out.comment.contains(&c) {
                out.comment.push(c);
            }
        }
        let mut copy = Copier::new(p);
        for s in &p.sample {
            let ids: Vec<u64> = s
                .location_id
                .iter()
                .filter_map(|id| copy.location(&mut b, *id))
                .collect();
            let mut labels: Vec<Label> = s
                .label
                .iter()
                .map(|l| Label {
                    key: b.string(p.str(l.key)),
                    str: if l.str != 0 {
                        b.string(p.str(l.str))
                    } else {
                        0
                    },
                    num: l.num,
                    num_unit: if l.num_unit != 0 {
                        b.string(p.str(l.num_unit))
                    } else {
                        0
                    },
                })
                .collect();
            labels.sort_by_key(|l| (l.key, l.str, l.num));
            let key = (ids, labels);
            match samples.get(&key) {
                Some(&i) => {
                    let dst: &mut Sample = &mut out.sample[i];
                    for (d, v) in dst.value.iter_mut().zip(&s.value) {
                        *d = d.saturating_add(*v);
                    }
                }
                None => {
                    let mut value = s.value.clone();
                    value.resize(out.sample_type.len(), 0);
                    out.sample.push(Sample {
                        location_id: key.0.clone(),
                        value,
                        label: key.1.clone(),
                    });
                    samples.insert(key, out.sample.len() - 1);
                }
            }
        }
    }
    if start != i64::MAX {
        out.time_nanos = start;
        out.duration_nanos = end.saturating_sub(start).max(0);
    }
    Ok(b.finish(out))
}

/// Copies the locations of one input profile into the builder, remembering what it copied.
struct Copier<'p> {
    p: &'p Profile,
    mappings: HashMap<u64, &'p Mapping>,
    functions: HashMap<u64, &'p Function>,
    locations: HashMap<u64, &'p Location>,
    copied: HashMap<u64, u64>,
}

impl<'p> Copier<'p> {
    fn new(p: &'p Profile) -> Self {
        Copier {
            p,
            mappings: p.mapping.iter().map(|x| (x.id, x)).collect(),
            functions: p.function.iter().map(|x| (x.id, x)).collect(),
            locations: p.location.iter().map(|x| (x.id, x)).collect(),
            copied: HashMap::new(),
        }
    }

    /// The new id of location `id` (None when the input does not define it).
    fn location(&mut self, b: &mut Builder, id: u64) -> Option<u64> {
        if let Some(&n) = self.copied.get(&id) {
            return Some(n);
        }
        let p = self.p;
        let loc = self.locations.get(&id)?;
        let mapping_id = match self.mappings.get(&loc.mapping_id) {
            Some(mp) => b.mapping_with(
                MappingSpec {
                    filename: p.str(mp.filename),
                    build_id: p.str(mp.build_id),
                    memory_start: mp.memory_start,
                    memory_limit: mp.memory_limit,
                    file_offset: mp.file_offset,
                },
                (*mp).clone(),
            ),
            None => 0,
        };
        let lines: Vec<Line> = loc
            .line
            .iter()
            .filter_map(|l| {
                let f = self.functions.get(&l.function_id)?;
                Some(Line {
                    function_id: b.function(
                        p.str(f.name),
                        p.str(f.system_name),
                        p.str(f.filename),
                        f.start_line,
                    ),
                    line: l.line,
                    column: l.column,
                })
            })
            .collect();
        let n = b.location(mapping_id, loc.address, lines, loc.is_folded);
        self.copied.insert(id, n);
        Some(n)
    }
}

/// The sampling period of [`synthetic`] profiles (99 Hz), in nanoseconds.
pub const SYNTHETIC_PERIOD_NS: i64 = 10_101_010;

/// A tiny CPU profile for tests, examples and benchmarks: stacks are given root first as
/// `module.function` names; each function gets the file `<module>.py`, start line 10, line 12.
pub fn synthetic(stacks: &[(&[&str], i64)], time_nanos: i64, duration_nanos: i64) -> Profile {
    let mut b = Builder::new();
    let sample_type = vec![
        b.value_type("samples", "count"),
        b.value_type("cpu", "nanoseconds"),
    ];
    let period_type = Some(b.value_type("cpu", "nanoseconds"));
    let mut sample = Vec::new();
    for (stack, count) in stacks {
        let location_id = stack
            .iter()
            .rev()
            .map(|name| {
                let module = name.rsplit_once('.').map_or("main", |(m, _)| m);
                let file = format!("{}.py", module.replace('.', "/"));
                let function_id = b.function(name, name, &file, 10);
                let line = Line {
                    function_id,
                    line: 12,
                    column: 0,
                };
                b.location(0, 0, vec![line], false)
            })
            .collect();
        sample.push(Sample {
            location_id,
            value: vec![*count, count * SYNTHETIC_PERIOD_NS],
            label: vec![],
        });
    }
    b.finish(Profile {
        sample_type,
        sample,
        time_nanos,
        duration_nanos,
        period_type,
        period: SYNTHETIC_PERIOD_NS,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_gzip() {
        let p = synthetic(
            &[
                (&["main", "app.handle", "app.work"], 5),
                (&["main", "app.idle"], 2),
            ],
            1,
            2,
        );
        let bytes = p.encode_gzip();
        let q = Profile::decode_bytes(&bytes).unwrap();
        assert_eq!(p, q);
        assert_eq!(q.sample_types(), vec!["samples/count", "cpu/nanoseconds"]);
        assert_eq!(q.default_value_index(), 1);
        assert_eq!(q.value_index(Some("samples")), Some(0));
    }

    #[test]
    fn merge_sums_identical_stacks() {
        let a = synthetic(&[(&["main", "app.work"], 5)], 1_000, 10);
        let b = synthetic(
            &[(&["main", "app.work"], 3), (&["main", "app.other"], 1)],
            2_000,
            10,
        );
        let m = merge(&[a, b]).unwrap();
        assert_eq!(m.sample.len(), 2);
        let total: i64 = m.sample.iter().map(|s| s.value[0]).sum();
        assert_eq!(total, 9);
        assert_eq!(m.time_nanos, 1_000);
        assert_eq!(m.duration_nanos, 1_010);
        assert_eq!(m.function.len(), 3);
    }

    #[test]
    fn merge_keeps_mappings_and_labels() {
        let mut b = Builder::new();
        let mapping = b.mapping(MappingSpec {
            filename: "/bin/app",
            build_id: "ab",
            memory_start: 0x1000,
            memory_limit: 0x2000,
            file_offset: 0,
        });
        let function_id = b.function("main", "main", "a.c", 1);
        let loc = b.location(
            mapping,
            0x1010,
            vec![Line {
                function_id,
                line: 2,
                column: 0,
            }],
            false,
        );
        let key = b.string("pid");
        let p = b.finish(Profile {
            sample_type: vec![crate::ValueType { r#type: 0, unit: 0 }],
            sample: vec![Sample {
                location_id: vec![loc],
                value: vec![4],
                label: vec![Label {
                    key,
                    num: 7,
                    ..Default::default()
                }],
            }],
            ..Default::default()
        });
        let m = merge(&[p.clone(), p]).unwrap();
        assert_eq!(m.sample.len(), 1);
        assert_eq!(m.sample[0].value, [8]);
        assert_eq!(m.str(m.sample[0].label[0].key), "pid");
        assert_eq!(m.mapping.len(), 1);
        assert_eq!(m.str(m.mapping[0].build_id), "ab");
        assert!(m.mapping[0].has_functions);
    }

    #[test]
    fn merge_refuses_different_kinds() {
        let a = synthetic(&[(&["main"], 1)], 1, 1);
        let mut b = a.clone();
        b.sample_type.pop();
        assert!(matches!(merge(&[a, b]), Err(MergeError::Incompatible(..))));
        assert!(matches!(merge(&[]), Err(MergeError::Empty)));
    }
}
