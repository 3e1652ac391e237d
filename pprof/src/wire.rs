//! What decoding a profile would cost in memory, read off its wire format before decoding it.
//!
//! A message of a few bytes decodes into a struct of tens (an empty `Sample` is 2 bytes on the
//! wire and 72 in memory, each with its vectors), so the inflated size alone does not bound the
//! memory of a decode: a gzip bomb within [`crate::MAX_DECODED_BYTES`] could still ask for
//! gigabytes. [`decoded_memory`] walks the fields once, without allocating, and
//! [`crate::Profile::decode_bytes`] refuses what would take more than
//! [`crate::MAX_DECODED_MEMORY`].

use std::mem::size_of;

use crate::{Function, Label, Line, Location, Mapping, Sample, ValueType};

/// One field's value on the wire.
enum Value<'a> {
    Varint,
    Bytes(&'a [u8]),
    Fixed,
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for i in 0..10 {
        let (&b, rest) = buf.split_first()?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Calls `f` with every field of the message in `buf` (fields inside groups, which protobuf
/// decoders skip, are left out). None when `buf` is not a well-formed message.
fn fields<'a>(mut buf: &'a [u8], mut f: impl FnMut(u64, Value<'a>)) -> Option<()> {
    let mut groups = 0usize;
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let (field, value) = (
            key >> 3,
            match key & 7 {
                0 => {
                    varint(&mut buf)?;
                    Value::Varint
                }
                1 => {
                    buf = buf.get(8..)?;
                    Value::Fixed
                }
                2 => {
                    let len = usize::try_from(varint(&mut buf)?).ok()?;
                    let (v, rest) = buf.split_at_checked(len)?;
                    buf = rest;
                    Value::Bytes(v)
                }
                3 => {
                    groups += 1;
                    continue;
                }
                4 => {
                    groups = groups.checked_sub(1)?;
                    continue;
                }
                5 => {
                    buf = buf.get(4..)?;
                    Value::Fixed
                }
                _ => return None,
            },
        );
        if groups == 0 {
            f(field, value);
        }
    }
    (groups == 0).then_some(())
}

/// The integers of a repeated integer field: one, or as many as a packed run holds.
fn integers(v: &Value<'_>) -> u64 {
    match v {
        Value::Bytes(b) => b.iter().filter(|b| *b & 0x80 == 0).count() as u64,
        _ => 1,
    }
}

const INT: u64 = size_of::<u64>() as u64;

/// The bytes of `size_of::<T>()`.
fn size<T>() -> u64 {
    size_of::<T>() as u64
}

/// An upper estimate of the heap memory that decoding `raw` as a [`crate::Profile`] takes
/// (every element of every repeated field at its in-memory size, every string's bytes; a
/// vector's spare capacity not counted). None when `raw` is not well-formed, which the decoder
/// then reports.
pub(crate) fn decoded_memory(raw: &[u8]) -> Option<u64> {
    let mut total = 0u64;
    let mut nested_ok = true;
    fields(raw, |field, v| {
        let cost = match (field, &v) {
            (1, _) => size::<ValueType>(),
            (2, Value::Bytes(b)) => {
                let mut c = size::<Sample>();
                nested_ok &= fields(b, |field, v| {
                    c += match field {
                        1 | 2 => INT * integers(&v),
                        3 => size::<Label>(),
                        _ => 0,
                    };
                })
                .is_some();
                c
            }
            (3, _) => size::<Mapping>(),
            (4, Value::Bytes(b)) => {
                let mut c = size::<Location>();
                nested_ok &= fields(b, |field, _| {
                    if field == 4 {
                        c += size::<Line>();
                    }
                })
                .is_some();
                c
            }
            (5, _) => size::<Function>(),
            (6, Value::Bytes(b)) => size::<String>() + b.len() as u64,
            (13, v) => INT * integers(v),
            _ => 0,
        };
        total = total.saturating_add(cost);
    })?;
    nested_ok.then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Message as _, Profile, merge::synthetic};

    #[test]
    fn estimates_what_a_decode_holds() {
        let p = synthetic(
            &[(&["main", "app.work"], 3), (&["main", "app.idle"], 1)],
            1,
            1,
        );
        let raw = p.encode_to_vec();
        let est = decoded_memory(&raw).unwrap();
        let strings: u64 = p.string_table.iter().map(|s| s.len() as u64 + 24).sum();
        let samples = 2 * (size::<Sample>() + 2 * INT + 2 * INT);
        let locations = p.location.len() as u64 * (size::<Location>() + size::<Line>());
        let functions = p.function.len() as u64 * size::<Function>();
        let mappings = p.mapping.len() as u64 * size::<Mapping>();
        let types = 2 * size::<ValueType>();
        assert_eq!(
            est,
            strings + samples + locations + functions + mappings + types
        );
        assert_eq!(Profile::decode(raw.as_slice()).unwrap(), p);
    }

    #[test]
    fn malformed_is_left_to_the_decoder() {
        assert_eq!(decoded_memory(&[0x12, 0x05, 0x00]), None);
        assert_eq!(decoded_memory(&[0x12, 0x02, 0x0a, 0x85]), None);
        assert_eq!(decoded_memory(&[]), Some(0));
        // A group (skipped by decoders) costs nothing, and must close.
        assert_eq!(decoded_memory(&[0x7b, 0x12, 0x00, 0x7c]), Some(0));
        assert_eq!(decoded_memory(&[0x7b, 0x12, 0x00]), None);
    }

    /// Fuzzing (pprof_views, by hand after the views' frame copies): 40 MiB of empty samples
    /// gzip to 40 KB and would decode into 1.4 GB of `Sample`s. Refused before decoding.
    #[test]
    fn a_bomb_of_empty_samples_is_refused_before_decoding() {
        use std::io::Write as _;
        let raw = [0x12u8, 0x00].repeat(20 << 20);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&raw).unwrap();
        let bomb = gz.finish().unwrap();
        assert!(bomb.len() < 200 << 10, "{}", bomb.len());
        assert!(decoded_memory(&raw).unwrap() > crate::MAX_DECODED_MEMORY);
        assert!(matches!(
            Profile::decode_bytes(&bomb),
            Err(crate::PprofError::TooMuchMemory)
        ));
        // Far below the limit, the same shape decodes.
        let small = [0x12u8, 0x00].repeat(1000);
        assert_eq!(Profile::decode_bytes(&small).unwrap().sample.len(), 1000);
    }
}
