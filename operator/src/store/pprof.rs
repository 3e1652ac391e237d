//! Merging pprof profiles; the messages and their reading/writing are `kprof_pprof`'s.

use std::collections::HashMap;

pub use kprof_pprof::{
    Function, Label, Line, Location, MAX_DECODED_BYTES, Mapping, Profile, Sample, ValueType,
};

/// Why a profile could not be read or combined.
#[derive(Debug, thiserror::Error)]
pub enum PprofError {
    #[error(transparent)]
    Read(#[from] kprof_pprof::PprofError),
    #[error("profiles of different kinds cannot be merged: [{0}] vs [{1}]")]
    Incompatible(String, String),
    #[error("nothing to merge")]
    Empty,
}

/// Merge profiles of the same kind (same sample types) into one: identical stacks with identical
/// labels are summed, strings, functions, locations and mappings are de-duplicated. The result's
/// time span covers every input.
pub fn merge(profiles: &[Profile]) -> Result<Profile, PprofError> {
    let first = profiles.first().ok_or(PprofError::Empty)?;
    let kinds = first.sample_types();
    for p in &profiles[1..] {
        let other = p.sample_types();
        if other != kinds {
            return Err(PprofError::Incompatible(kinds.join(", "), other.join(", ")));
        }
    }
    let mut m = Merger::default();
    m.string(""); // index 0 is always ""
    let mut out = Profile {
        sample_type: first
            .sample_type
            .iter()
            .map(|t| m.value_type(first, t))
            .collect(),
        period_type: first.period_type.as_ref().map(|t| m.value_type(first, t)),
        period: first.period,
        default_sample_type: if first.default_sample_type != 0 {
            m.string(first.str(first.default_sample_type))
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
            let c = m.string(p.str(*c));
            if !out.comment.contains(&c) {
                out.comment.push(c);
            }
        }
        let mappings: HashMap<u64, &Mapping> = p.mapping.iter().map(|x| (x.id, x)).collect();
        let functions: HashMap<u64, &Function> = p.function.iter().map(|x| (x.id, x)).collect();
        let locations: HashMap<u64, &Location> = p.location.iter().map(|x| (x.id, x)).collect();
        let mut loc_map: HashMap<u64, u64> = HashMap::new();
        for s in &p.sample {
            let mut ids = Vec::with_capacity(s.location_id.len());
            for id in &s.location_id {
                let new = match loc_map.get(id) {
                    Some(n) => *n,
                    None => {
                        let Some(loc) = locations.get(id) else {
                            continue;
                        };
                        let n = m.location(p, loc, &mappings, &functions);
                        loc_map.insert(*id, n);
                        n
                    }
                };
                ids.push(new);
            }
            let mut labels: Vec<Label> = s
                .label
                .iter()
                .map(|l| Label {
                    key: m.string(p.str(l.key)),
                    str: if l.str != 0 {
                        m.string(p.str(l.str))
                    } else {
                        0
                    },
                    num: l.num,
                    num_unit: if l.num_unit != 0 {
                        m.string(p.str(l.num_unit))
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
    out.string_table = m.strings;
    out.function = m.functions;
    out.location = m.locations;
    out.mapping = m.mappings;
    Ok(out)
}

#[derive(Default)]
struct Merger {
    strings: Vec<String>,
    string_ids: HashMap<String, i64>,
    functions: Vec<Function>,
    function_ids: HashMap<(i64, i64, i64, i64), u64>,
    locations: Vec<Location>,
    location_ids: HashMap<(u64, u64, Vec<Line>, bool), u64>,
    mappings: Vec<Mapping>,
    mapping_ids: HashMap<(i64, i64, u64, u64, u64), u64>,
}

impl Merger {
    fn string(&mut self, s: &str) -> i64 {
        if let Some(i) = self.string_ids.get(s) {
            return *i;
        }
        let i = self.strings.len() as i64;
        self.strings.push(s.to_string());
        self.string_ids.insert(s.to_string(), i);
        i
    }

    fn value_type(&mut self, p: &Profile, t: &ValueType) -> ValueType {
        ValueType {
            r#type: self.string(p.str(t.r#type)),
            unit: self.string(p.str(t.unit)),
        }
    }

    fn function(&mut self, p: &Profile, f: &Function) -> u64 {
        let key = (
            self.string(p.str(f.name)),
            self.string(p.str(f.system_name)),
            self.string(p.str(f.filename)),
            f.start_line,
        );
        if let Some(id) = self.function_ids.get(&key) {
            return *id;
        }
        let id = self.functions.len() as u64 + 1;
        self.functions.push(Function {
            id,
            name: key.0,
            system_name: key.1,
            filename: key.2,
            start_line: key.3,
        });
        self.function_ids.insert(key, id);
        id
    }

    fn mapping(&mut self, p: &Profile, mp: &Mapping) -> u64 {
        let key = (
            self.string(p.str(mp.filename)),
            self.string(p.str(mp.build_id)),
            mp.memory_start,
            mp.memory_limit,
            mp.file_offset,
        );
        if let Some(id) = self.mapping_ids.get(&key) {
            return *id;
        }
        let id = self.mappings.len() as u64 + 1;
        self.mappings.push(Mapping {
            id,
            filename: key.0,
            build_id: key.1,
            ..mp.clone()
        });
        self.mapping_ids.insert(key, id);
        id
    }

    fn location(
        &mut self,
        p: &Profile,
        loc: &Location,
        mappings: &HashMap<u64, &Mapping>,
        functions: &HashMap<u64, &Function>,
    ) -> u64 {
        let mapping_id = match mappings.get(&loc.mapping_id) {
            Some(mp) => self.mapping(p, mp),
            None => 0,
        };
        let lines: Vec<Line> = loc
            .line
            .iter()
            .filter_map(|l| {
                let f = functions.get(&l.function_id)?;
                Some(Line {
                    function_id: self.function(p, f),
                    line: l.line,
                    column: l.column,
                })
            })
            .collect();
        let key = (mapping_id, loc.address, lines, loc.is_folded);
        if let Some(id) = self.location_ids.get(&key) {
            return *id;
        }
        let id = self.locations.len() as u64 + 1;
        self.locations.push(Location {
            id,
            mapping_id,
            address: key.1,
            line: key.2.clone(),
            is_folded: key.3,
        });
        self.location_ids.insert(key, id);
        id
    }
}

/// A tiny profile builder for tests, examples and benchmarks: stacks are given root first as
/// `module.function` names; each function gets the file `<module>.py`.
pub fn synthetic(stacks: &[(&[&str], i64)], time_nanos: i64, duration_nanos: i64) -> Profile {
    let mut m = Merger::default();
    m.string("");
    let sample_type = vec![
        ValueType {
            r#type: m.string("samples"),
            unit: m.string("count"),
        },
        ValueType {
            r#type: m.string("cpu"),
            unit: m.string("nanoseconds"),
        },
    ];
    let period_type = Some(ValueType {
        r#type: m.string("cpu"),
        unit: m.string("nanoseconds"),
    });
    let mut fids: HashMap<String, u64> = HashMap::new();
    let mut sample = Vec::new();
    for (stack, count) in stacks {
        let mut location_id = Vec::new();
        for name in stack.iter().rev() {
            let next = fids.len() as u64 + 1;
            let fid = *fids.entry(name.to_string()).or_insert_with(|| {
                let module = name.rsplit_once('.').map_or("main", |(m, _)| m);
                let (n, f) = (
                    m.string(name),
                    m.string(&format!("{}.py", module.replace('.', "/"))),
                );
                m.functions.push(Function {
                    id: next,
                    name: n,
                    system_name: n,
                    filename: f,
                    start_line: 10,
                });
                m.locations.push(Location {
                    id: next,
                    line: vec![Line {
                        function_id: next,
                        line: 12,
                        column: 0,
                    }],
                    ..Default::default()
                });
                next
            });
            location_id.push(fid);
        }
        sample.push(Sample {
            location_id,
            value: vec![*count, count * 10_101_010],
            label: vec![],
        });
    }
    Profile {
        sample_type,
        sample,
        string_table: m.strings,
        function: m.functions,
        location: m.locations,
        time_nanos,
        duration_nanos,
        period_type,
        period: 10_101_010,
        ..Default::default()
    }
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
    fn merge_refuses_different_kinds() {
        let a = synthetic(&[(&["main"], 1)], 1, 1);
        let mut b = a.clone();
        b.sample_type.pop();
        assert!(matches!(merge(&[a, b]), Err(PprofError::Incompatible(..))));
    }
}
