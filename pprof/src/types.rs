//! The pprof sample types of each kprof profile kind, declared once for the agent (which writes
//! them) and the store (which reads them). Names and units follow what `go tool pprof`,
//! Pyroscope and Parca already understand.

/// One pprof `ValueType`: what a sample value counts, and in which unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleType {
    pub r#type: &'static str,
    pub unit: &'static str,
}

const fn st(r#type: &'static str, unit: &'static str) -> SampleType {
    SampleType { r#type, unit }
}

/// The sample types of one profile kind, in the order of the values of every sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KindTypes {
    /// The kind's name in the API, labels and file names (`cpu`, `wall`, ...).
    pub name: &'static str,
    pub sample_types: &'static [SampleType],
    /// What `Profile.period` is measured in (the value one sampling event stands for).
    pub period_type: SampleType,
    /// The type shown by default (`default_sample_type`): time or bytes, not counts.
    pub default_index: usize,
}

impl KindTypes {
    /// Index in `sample_types` of the type with this name.
    pub fn index_of(&self, r#type: &str) -> Option<usize> {
        self.sample_types.iter().position(|t| t.r#type == r#type)
    }
}

/// On-CPU time: one sample per tick of the sampling clock.
pub const CPU: KindTypes = KindTypes {
    name: "cpu",
    sample_types: &[st("samples", "count"), st("cpu", "nanoseconds")],
    period_type: st("cpu", "nanoseconds"),
    default_index: 1,
};

/// Wall-clock time: time on and off CPU.
pub const WALL: KindTypes = KindTypes {
    name: "wall",
    sample_types: &[st("wall", "nanoseconds"), st("samples", "count")],
    period_type: st("wall", "nanoseconds"),
    default_index: 0,
};

/// Time blocked on locks.
pub const LOCK: KindTypes = KindTypes {
    name: "lock",
    sample_types: &[st("contentions", "count"), st("delay", "nanoseconds")],
    period_type: st("contentions", "count"),
    default_index: 1,
};

/// Allocations: what was allocated, and what of it is still live.
pub const MEMORY: KindTypes = KindTypes {
    name: "memory",
    sample_types: &[
        st("alloc_space", "bytes"),
        st("alloc_objects", "count"),
        st("inuse_space", "bytes"),
        st("inuse_objects", "count"),
        st("mapped_space", "bytes"),
        st("mapped_objects", "count"),
        st("mapped_inuse_space", "bytes"),
        st("mapped_inuse_objects", "count"),
        st("probed_alloc_space", "bytes"),
        st("probed_alloc_objects", "count"),
        st("probed_inuse_space", "bytes"),
        st("probed_inuse_objects", "count"),
    ],
    period_type: st("space", "bytes"),
    default_index: 2,
};

/// Threads by the stack that created them: created in the window, and alive at its end.
pub const THREADS: KindTypes = KindTypes {
    name: "threads",
    sample_types: &[st("created", "count"), st("alive", "count")],
    period_type: st("threads", "count"),
    default_index: 1,
};

/// Every kind, for lookups by name.
pub const ALL: [KindTypes; 5] = [CPU, WALL, LOCK, MEMORY, THREADS];

/// The sample types of the kind called `name`.
pub fn by_name(name: &str) -> Option<&'static KindTypes> {
    ALL.iter().find(|k| k.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_found_by_name_and_cpu_keeps_its_value_order() {
        assert_eq!(by_name("cpu"), Some(&CPU));
        assert_eq!(by_name("threads").map(|k| k.sample_types.len()), Some(2));
        assert_eq!(by_name("heap"), None);
        assert_eq!(CPU.index_of("cpu"), Some(1));
        assert_eq!(MEMORY.index_of("inuse_space"), Some(2));
        let names: Vec<_> = ALL.iter().map(|k| k.name).collect();
        assert_eq!(names, ["cpu", "wall", "lock", "memory", "threads"]);
    }
}
