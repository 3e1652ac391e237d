//! The pprof `profile.proto` messages (perftools.profiles), shared by the agent, which writes
//! them, and the store and `kubectl kprof`, which read, merge and convert them.
//!
//! prost structs declared by hand after the field numbers of `profile.proto`
//! (github.com/google/pprof, Apache-2.0), so no `protoc` is needed. Every field a reader may meet
//! is declared, so that a profile written by another tool (Go, py-spy, Pyroscope) decodes and
//! encodes again without losing anything kprof shows.

pub mod builder;
pub mod merge;
pub mod types;
pub mod views;
mod wire;

use std::io::{Read, Write};

use flate2::{Compression, read::GzDecoder, write::GzEncoder};
pub use prost::Message;

/// Sample label keys kprof writes (and the views read).
pub mod labels {
    pub const PID: &str = "pid";
    pub const THREAD_NAME: &str = "thread_name";
    pub const PROCESS_NAME: &str = "process_name";
    pub const NAMESPACE: &str = "namespace";
    pub const POD: &str = "pod";
    pub const CONTAINER: &str = "container";
    pub const NODE: &str = "node";
    /// The OS thread id (a number).
    pub const THREAD_ID: &str = "thread_id";
    /// Wall and lock profiles: the thread's state (`running`, `runnable`, `sleeping`,
    /// `disk-wait`).
    pub const STATE: &str = "state";
    /// Wall and lock profiles: what a waiting thread waits for (`gil`, `lock`, `io`, `sleep`,
    /// `other`).
    pub const WAIT_CLASS: &str = "wait_class";
    /// CPU and wall profiles of Python threads: `held` when the thread held the GIL while on
    /// CPU, `released` otherwise.
    pub const GIL: &str = "gil";
    /// Lock profiles: the lock's address (a number; the same for every waiter of one lock).
    pub const LOCK: &str = "lock";
}

/// Mapping file names that are not files: the views mark their frames.
pub mod mappings {
    /// Kernel frames (the name perf uses).
    pub const KERNEL: &str = "[kernel.kallsyms]";
    /// Python frames without a module of their own.
    pub const PYTHON: &str = "[python]";
}

/// Refuse to inflate a profile to more than this (a zip bomb guard): 512 MiB.
pub const MAX_DECODED_BYTES: u64 = 512 << 20;

/// Refuse a profile whose decoded messages would hold more than this in memory: 1 GiB. A few
/// bytes on the wire can stand for a struct of tens (an empty sample: 2 bytes, 72 in memory),
/// so a profile within [`MAX_DECODED_BYTES`] could otherwise ask for gigabytes; one as the
/// agent writes it holds a few times its encoded size.
pub const MAX_DECODED_MEMORY: u64 = 1 << 30;

/// `perftools.profiles.Profile`.
#[derive(Clone, PartialEq, Message)]
pub struct Profile {
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    #[prost(message, repeated, tag = "3")]
    pub mapping: Vec<Mapping>,
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    #[prost(int64, tag = "7")]
    pub drop_frames: i64,
    #[prost(int64, tag = "8")]
    pub keep_frames: i64,
    #[prost(int64, tag = "9")]
    pub time_nanos: i64,
    #[prost(int64, tag = "10")]
    pub duration_nanos: i64,
    #[prost(message, optional, tag = "11")]
    pub period_type: Option<ValueType>,
    #[prost(int64, tag = "12")]
    pub period: i64,
    #[prost(int64, repeated, tag = "13")]
    pub comment: Vec<i64>,
    #[prost(int64, tag = "14")]
    pub default_sample_type: i64,
}

/// `perftools.profiles.ValueType`.
#[derive(Clone, PartialEq, Eq, Hash, Message)]
pub struct ValueType {
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

/// `perftools.profiles.Sample`: `location_id[0]` is the leaf.
#[derive(Clone, PartialEq, Message)]
pub struct Sample {
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
    #[prost(message, repeated, tag = "3")]
    pub label: Vec<Label>,
}

/// `perftools.profiles.Label`.
#[derive(Clone, PartialEq, Eq, Hash, Message)]
pub struct Label {
    #[prost(int64, tag = "1")]
    pub key: i64,
    #[prost(int64, tag = "2")]
    pub str: i64,
    #[prost(int64, tag = "3")]
    pub num: i64,
    #[prost(int64, tag = "4")]
    pub num_unit: i64,
}

/// `perftools.profiles.Mapping`.
#[derive(Clone, PartialEq, Message)]
pub struct Mapping {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub memory_start: u64,
    #[prost(uint64, tag = "3")]
    pub memory_limit: u64,
    #[prost(uint64, tag = "4")]
    pub file_offset: u64,
    #[prost(int64, tag = "5")]
    pub filename: i64,
    #[prost(int64, tag = "6")]
    pub build_id: i64,
    #[prost(bool, tag = "7")]
    pub has_functions: bool,
    #[prost(bool, tag = "8")]
    pub has_filenames: bool,
    #[prost(bool, tag = "9")]
    pub has_line_numbers: bool,
    #[prost(bool, tag = "10")]
    pub has_inline_frames: bool,
}

/// `perftools.profiles.Location`: several lines = inlined calls, the last one the caller.
#[derive(Clone, PartialEq, Message)]
pub struct Location {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub mapping_id: u64,
    #[prost(uint64, tag = "3")]
    pub address: u64,
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
    #[prost(bool, tag = "5")]
    pub is_folded: bool,
}

/// `perftools.profiles.Line`.
#[derive(Clone, PartialEq, Eq, Hash, Message)]
pub struct Line {
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    #[prost(int64, tag = "2")]
    pub line: i64,
    #[prost(int64, tag = "3")]
    pub column: i64,
}

/// `perftools.profiles.Function`.
#[derive(Clone, PartialEq, Message)]
pub struct Function {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int64, tag = "2")]
    pub name: i64,
    #[prost(int64, tag = "3")]
    pub system_name: i64,
    #[prost(int64, tag = "4")]
    pub filename: i64,
    #[prost(int64, tag = "5")]
    pub start_line: i64,
}

/// Why a profile could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PprofError {
    #[error("not a pprof profile: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("reading the compressed profile: {0}")]
    Io(#[from] std::io::Error),
    #[error("the profile inflates to more than {MAX_DECODED_BYTES} bytes")]
    TooLarge,
    #[error("the profile would take more than {MAX_DECODED_MEMORY} bytes of memory decoded")]
    TooMuchMemory,
}

impl Profile {
    /// Decode `profile.proto`, gzip-compressed or not.
    pub fn decode_bytes(bytes: &[u8]) -> Result<Self, PprofError> {
        if bytes.starts_with(&[0x1f, 0x8b]) {
            let mut raw = Vec::new();
            let mut reader = GzDecoder::new(bytes).take(MAX_DECODED_BYTES + 1);
            reader.read_to_end(&mut raw)?;
            if raw.len() as u64 > MAX_DECODED_BYTES {
                return Err(PprofError::TooLarge);
            }
            Self::decode_bounded(&raw)
        } else {
            Self::decode_bounded(bytes)
        }
    }

    /// Decode `profile.proto` unless the result would take more than [`MAX_DECODED_MEMORY`].
    fn decode_bounded(raw: &[u8]) -> Result<Self, PprofError> {
        if wire::decoded_memory(raw).is_some_and(|m| m > MAX_DECODED_MEMORY) {
            return Err(PprofError::TooMuchMemory);
        }
        Ok(Self::decode(raw)?)
    }

    /// Encode as gzip-compressed `profile.proto` (what `go tool pprof` and Pyroscope read).
    pub fn encode_gzip(&self) -> Vec<u8> {
        let mut gz = GzEncoder::new(Vec::new(), Compression::default());
        gz.write_all(&self.encode_to_vec())
            .expect("writing to a Vec cannot fail");
        gz.finish().expect("writing to a Vec cannot fail")
    }

    /// The string at `index` of the string table ("" when out of range).
    pub fn str(&self, index: i64) -> &str {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.string_table.get(i))
            .map_or("", String::as_str)
    }

    /// `type/unit` of every sample value, e.g. `["samples/count", "cpu/nanoseconds"]`.
    pub fn sample_types(&self) -> Vec<String> {
        self.sample_type
            .iter()
            .map(|t| format!("{}/{}", self.str(t.r#type), self.str(t.unit)))
            .collect()
    }

    /// The index of the sample value shown by default: the `default_sample_type`, else the last
    /// one (as `go tool pprof` does).
    pub fn default_value_index(&self) -> usize {
        if self.default_sample_type != 0
            && let Some(i) = self
                .sample_type
                .iter()
                .position(|t| t.r#type == self.default_sample_type)
        {
            return i;
        }
        self.sample_type.len().saturating_sub(1)
    }

    /// Resolve a `--sample-index` given as a number or a type name (`samples`, `cpu`, ...).
    pub fn value_index(&self, wanted: Option<&str>) -> Option<usize> {
        let Some(wanted) = wanted else {
            return Some(self.default_value_index());
        };
        if let Ok(i) = wanted.parse::<usize>() {
            return (i < self.sample_type.len()).then_some(i);
        }
        self.sample_type
            .iter()
            .position(|t| self.str(t.r#type) == wanted)
    }
}
