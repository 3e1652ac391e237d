//! The `ProfilesDictionary` of an OTLP profiles request under construction: every table starts
//! with its zero value (index 0 means "unset" in OTLP), strings, stacks and attributes are
//! de-duplicated (the spec says there SHOULD NOT be duplicates).

use std::collections::HashMap;

use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};
use opentelemetry_proto::tonic::profiles::v1development as otlp;

use crate::pprof;

/// Append `v` to a dictionary table; its index.
pub(super) fn push<T>(table: &mut Vec<T>, v: T) -> i32 {
    table.push(v);
    i32::try_from(table.len() - 1).unwrap_or(i32::MAX)
}

/// An attribute's identity in the dictionary: key, string or integer value, unit.
type AttrKey = (i32, Option<String>, i64, i32);

/// The request's dictionary under construction, with de-duplication of strings, stacks and
/// attributes.
pub(super) struct Dict {
    pub(super) d: otlp::ProfilesDictionary,
    strings: HashMap<String, i32>,
    stacks: HashMap<Vec<i32>, i32>,
    attrs: HashMap<AttrKey, i32>,
}

impl Dict {
    pub(super) fn new() -> Self {
        let d = otlp::ProfilesDictionary {
            mapping_table: vec![Default::default()],
            location_table: vec![Default::default()],
            function_table: vec![Default::default()],
            link_table: vec![Default::default()],
            string_table: vec![String::new()],
            attribute_table: vec![Default::default()],
            stack_table: vec![Default::default()],
        };
        Self {
            d,
            strings: HashMap::from([(String::new(), 0)]),
            stacks: HashMap::from([(Vec::new(), 0)]),
            attrs: HashMap::new(),
        }
    }

    pub(super) fn string(&mut self, s: &str) -> i32 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = push(&mut self.d.string_table, s.to_string());
        self.strings.insert(s.to_string(), i);
        i
    }

    pub(super) fn stack(&mut self, location_indices: Vec<i32>) -> i32 {
        if let Some(&i) = self.stacks.get(&location_indices) {
            return i;
        }
        let i = push(
            &mut self.d.stack_table,
            otlp::Stack {
                location_indices: location_indices.clone(),
            },
        );
        self.stacks.insert(location_indices, i);
        i
    }

    pub(super) fn value_type(
        &mut self,
        p: &pprof::Profile,
        t: &pprof::ValueType,
    ) -> otlp::ValueType {
        otlp::ValueType {
            type_strindex: self.string(p.str(t.r#type)),
            unit_strindex: self.string(p.str(t.unit)),
        }
    }

    /// pprof labels as attribute indices (a key appears once: the first label wins).
    pub(super) fn labels(&mut self, p: &pprof::Profile, labels: &[pprof::Label]) -> Vec<i32> {
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for l in labels {
            let key = self.string(p.str(l.key));
            if seen.contains(&key) {
                continue;
            }
            seen.push(key);
            let text = (l.str != 0).then(|| p.str(l.str).to_string());
            let unit = self.string(p.str(l.num_unit));
            let id: AttrKey = (key, text.clone(), l.num, unit);
            let i = match self.attrs.get(&id) {
                Some(&i) => i,
                None => {
                    let value = match text {
                        Some(t) => any_value::Value::StringValue(t),
                        None => any_value::Value::IntValue(l.num),
                    };
                    let kv = otlp::KeyValueAndUnit {
                        key_strindex: key,
                        value: Some(AnyValue { value: Some(value) }),
                        unit_strindex: unit,
                    };
                    let i = push(&mut self.d.attribute_table, kv);
                    self.attrs.insert(id, i);
                    i
                }
            };
            out.push(i);
        }
        out
    }
}
