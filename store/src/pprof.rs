//! The pprof messages, merging and synthetic profiles: all `kprof_pprof`'s, named here for the
//! store's modules, its benchmark and its tests.

pub use kprof_pprof::merge::{MergeError, merge, synthetic};
pub use kprof_pprof::{
    Function, Label, Line, Location, MAX_DECODED_BYTES, Mapping, Profile, Sample, ValueType,
};
