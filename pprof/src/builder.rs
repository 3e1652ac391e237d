//! Building a pprof [`Profile`]: the string, function, mapping and location tables with their
//! interning, in one place for everyone who writes profiles (the agent's encoder, the merger,
//! test and benchmark profiles).

use std::collections::HashMap;

use crate::{Function, Line, Location, Mapping, Profile, ValueType};

/// The tables of a profile being built. Ids start at 1 and follow insertion order, so the same
/// calls give the same bytes.
#[derive(Debug)]
pub struct Builder {
    strings: Vec<String>,
    string_ids: HashMap<String, i64>,
    functions: Vec<Function>,
    function_ids: HashMap<FunctionKey, u64>,
    locations: Vec<Location>,
    location_ids: HashMap<LocationKey, u64>,
    mappings: Vec<Mapping>,
    mapping_ids: HashMap<MappingKey, u64>,
}

/// (name, system name, file name, start line), as string ids.
type FunctionKey = (i64, i64, i64, i64);
/// (mapping id, address, lines, is folded).
type LocationKey = (u64, u64, Vec<Line>, bool);
/// (file name, build id, memory start, memory limit, file offset).
type MappingKey = (i64, i64, u64, u64, u64);

/// A mapping as the caller knows it (strings not yet interned).
#[derive(Clone, Copy, Debug, Default)]
pub struct MappingSpec<'a> {
    pub filename: &'a str,
    pub build_id: &'a str,
    pub memory_start: u64,
    pub memory_limit: u64,
    pub file_offset: u64,
}

impl Default for Builder {
    fn default() -> Self {
        Self::new()
    }
}

impl Builder {
    pub fn new() -> Self {
        let mut b = Builder {
            strings: Vec::new(),
            string_ids: HashMap::new(),
            functions: Vec::new(),
            function_ids: HashMap::new(),
            locations: Vec::new(),
            location_ids: HashMap::new(),
            mappings: Vec::new(),
            mapping_ids: HashMap::new(),
        };
        b.string(""); // string_table[0] must be ""
        b
    }

    /// The string table index of `s`.
    pub fn string(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.string_ids.get(s) {
            return i;
        }
        let i = self.strings.len() as i64;
        self.strings.push(s.to_owned());
        self.string_ids.insert(s.to_owned(), i);
        i
    }

    /// A `type/unit` pair, e.g. `("cpu", "nanoseconds")`.
    pub fn value_type(&mut self, r#type: &str, unit: &str) -> ValueType {
        ValueType {
            r#type: self.string(r#type),
            unit: self.string(unit),
        }
    }

    /// The id of a mapping; equal mappings share one. Mappings flagged as having functions,
    /// file names, line numbers and inline frames (kprof symbolizes before it writes).
    pub fn mapping(&mut self, m: MappingSpec<'_>) -> u64 {
        self.mapping_with(
            m,
            Mapping {
                has_functions: true,
                has_filenames: true,
                has_line_numbers: true,
                has_inline_frames: true,
                ..Default::default()
            },
        )
    }

    /// Like [`Builder::mapping`], with the `has_*` flags (and nothing else) taken from `flags`.
    pub fn mapping_with(&mut self, m: MappingSpec<'_>, flags: Mapping) -> u64 {
        let key = (
            self.string(m.filename),
            self.string(m.build_id),
            m.memory_start,
            m.memory_limit,
            m.file_offset,
        );
        if let Some(&id) = self.mapping_ids.get(&key) {
            return id;
        }
        let id = self.mappings.len() as u64 + 1;
        self.mappings.push(Mapping {
            id,
            memory_start: m.memory_start,
            memory_limit: m.memory_limit,
            file_offset: m.file_offset,
            filename: key.0,
            build_id: key.1,
            ..flags
        });
        self.mapping_ids.insert(key, id);
        id
    }

    /// Widen mapping `id`'s address range to cover `address` (for writers that learn the range
    /// from the addresses they see). The mapping keeps the id it was interned under.
    pub fn cover(&mut self, id: u64, address: u64) {
        let Some(m) = id
            .checked_sub(1)
            .and_then(|i| self.mappings.get_mut(i as usize))
        else {
            return;
        };
        let end = address.saturating_add(1);
        if m.memory_start == 0 && m.memory_limit == 0 {
            (m.memory_start, m.memory_limit) = (address, end);
        } else {
            m.memory_start = m.memory_start.min(address);
            m.memory_limit = m.memory_limit.max(end);
        }
    }

    /// The id of a function; equal functions share one.
    pub fn function(
        &mut self,
        name: &str,
        system_name: &str,
        filename: &str,
        start_line: i64,
    ) -> u64 {
        let key = (
            self.string(name),
            self.string(system_name),
            self.string(filename),
            start_line,
        );
        if let Some(&id) = self.function_ids.get(&key) {
            return id;
        }
        let id = self.functions.len() as u64 + 1;
        self.functions.push(Function {
            id,
            name: key.0,
            system_name: key.1,
            filename: key.2,
            start_line,
        });
        self.function_ids.insert(key, id);
        id
    }

    /// The id of a location (`lines` innermost first: inlined calls, then their caller); equal
    /// locations share one.
    pub fn location(
        &mut self,
        mapping_id: u64,
        address: u64,
        lines: Vec<Line>,
        is_folded: bool,
    ) -> u64 {
        let key = (mapping_id, address, lines, is_folded);
        if let Some(&id) = self.location_ids.get(&key) {
            return id;
        }
        let id = self.locations.len() as u64 + 1;
        self.locations.push(Location {
            id,
            mapping_id,
            address,
            line: key.2.clone(),
            is_folded,
        });
        self.location_ids.insert(key, id);
        id
    }

    /// The functions interned so far (e.g. to set start lines once all lines are known).
    pub fn functions_mut(&mut self) -> &mut [Function] {
        &mut self.functions
    }

    /// The locations interned so far.
    pub fn locations(&self) -> &[Location] {
        &self.locations
    }

    /// Move the tables into `profile` (its own tables are replaced).
    pub fn finish(self, mut profile: Profile) -> Profile {
        profile.string_table = self.strings;
        profile.function = self.functions;
        profile.location = self.locations;
        profile.mapping = self.mappings;
        profile
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interning_shares_ids() {
        let mut b = Builder::new();
        assert_eq!(b.string(""), 0);
        let f = b.function("main", "main", "a.c", 3);
        assert_eq!(b.function("main", "main", "a.c", 3), f);
        assert_ne!(b.function("main", "main", "b.c", 3), f);
        let spec = MappingSpec {
            filename: "/bin/app",
            build_id: "ab",
            ..Default::default()
        };
        let m = b.mapping(spec);
        assert_eq!(b.mapping(spec), m, "one mapping per module");
        b.cover(m, 0x1010);
        b.cover(m, 0x1000);
        let line = |function_id| Line {
            function_id,
            line: 3,
            column: 0,
        };
        let l = b.location(m, 0x1000, vec![line(f)], false);
        assert_eq!(b.location(m, 0x1000, vec![line(f)], false), l);
        assert_ne!(b.location(m, 0x1010, vec![line(f)], false), l);
        let p = b.finish(Profile::default());
        assert_eq!(p.string_table[0], "");
        assert_eq!(
            (p.function.len(), p.location.len(), p.mapping.len()),
            (2, 2, 1)
        );
        assert_eq!(
            (p.mapping[0].memory_start, p.mapping[0].memory_limit),
            (0x1000, 0x1011)
        );
        assert!(p.mapping[0].has_functions && p.mapping[0].has_inline_frames);
        assert_eq!(p.str(p.mapping[0].build_id), "ab");
    }
}
