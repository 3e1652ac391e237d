//! OTLP profiles export: a stored pprof converted to the `opentelemetry.proto.profiles.
//! v1development` model (proto v1.10.0, through the `opentelemetry-proto` crate's generated
//! messages) and sent as OTLP/HTTP protobuf to `{endpoint}/v1development/profiles`.
//!
//! The mapping: pprof's functions, locations and mappings become the request's shared
//! `ProfilesDictionary` (each table starts with its zero value, as the spec requires); every
//! sample's location list becomes a de-duplicated `Stack`, its labels dictionary attributes. An
//! OTLP `Profile` has one sample type, so a pprof with several (`samples/count`,
//! `cpu/nanoseconds`) becomes one OTLP profile per type, the pprof's default type first (viewers
//! show `profiles[0]`). The Kubernetes identity of the Profile goes into the resource.

use std::collections::HashMap;
use std::io::Write;

use bytes::Bytes;
use flate2::{Compression, write::GzEncoder};
use kprof_crds::Profile as KprofProfile;
use opentelemetry_proto::tonic::collector::profiles::v1development::{
    ExportProfilesServiceRequest, ExportProfilesServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::profiles::v1development as otlp;
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

use super::exporter::{ExportError, error_text};
use super::pprof;
use dict::{Dict, push};

mod dict;

/// The OTLP/HTTP path of the profiles signal while it is in development.
pub const PATH: &str = "/v1development/profiles";

/// The resource attributes of a Profile: where it was taken (semantic conventions' `k8s.*`),
/// the ProfilingTarget as `service.name`, and kprof's own names. Empty values are left out.
pub fn resource_attributes(p: &KprofProfile) -> Vec<KeyValue> {
    let s = &p.spec;
    let strings = [
        (
            "k8s.namespace.name",
            p.metadata.namespace.clone().unwrap_or_default(),
        ),
        ("k8s.pod.name", s.pod.clone()),
        ("k8s.container.name", s.container.clone()),
        ("k8s.node.name", s.node.clone()),
        ("service.name", s.target.clone()),
        (
            "kprof.profile.name",
            p.metadata.name.clone().unwrap_or_default(),
        ),
        ("kprof.profile.type", s.profile_type.to_string()),
        ("process.runtime.description", s.runtime.clone()),
    ];
    let mut attrs: Vec<KeyValue> = strings
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| key_value(k, any_value::Value::StringValue(v)))
        .collect();
    // A single process is the usual case; several pids have no single-valued attribute.
    if let [pid] = s.pids.as_slice() {
        attrs.push(key_value(
            "process.pid",
            any_value::Value::IntValue(i64::from(*pid)),
        ));
    }
    attrs
}

fn key_value(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

/// Convert a pprof to an export request with the given resource attributes.
pub fn convert(p: &pprof::Profile, resource: Vec<KeyValue>) -> ExportProfilesServiceRequest {
    let mut dict = Dict::new();
    let mappings: HashMap<u64, i32> = p
        .mapping
        .iter()
        .map(|m| {
            let filename_strindex = dict.string(p.str(m.filename));
            let i = push(
                &mut dict.d.mapping_table,
                otlp::Mapping {
                    memory_start: m.memory_start,
                    memory_limit: m.memory_limit,
                    file_offset: m.file_offset,
                    filename_strindex,
                    attribute_indices: vec![],
                },
            );
            (m.id, i)
        })
        .collect();
    let functions: HashMap<u64, i32> = p
        .function
        .iter()
        .map(|f| {
            let function = otlp::Function {
                name_strindex: dict.string(p.str(f.name)),
                system_name_strindex: dict.string(p.str(f.system_name)),
                filename_strindex: dict.string(p.str(f.filename)),
                start_line: f.start_line,
            };
            (f.id, push(&mut dict.d.function_table, function))
        })
        .collect();
    let locations: HashMap<u64, i32> = p
        .location
        .iter()
        .map(|l| {
            let location = otlp::Location {
                mapping_index: mappings.get(&l.mapping_id).copied().unwrap_or(0),
                address: l.address,
                lines: l
                    .line
                    .iter()
                    .map(|ln| otlp::Line {
                        function_index: functions.get(&ln.function_id).copied().unwrap_or(0),
                        line: ln.line,
                        column: ln.column,
                    })
                    .collect(),
                attribute_indices: vec![],
            };
            (l.id, push(&mut dict.d.location_table, location))
        })
        .collect();
    // Stack and attributes of every pprof sample, shared by the per-type profiles.
    let shapes: Vec<(i32, Vec<i32>)> = p
        .sample
        .iter()
        .map(|s| {
            let stack: Vec<i32> = s
                .location_id
                .iter()
                .map(|id| locations.get(id).copied().unwrap_or(0))
                .collect();
            (dict.stack(stack), dict.labels(p, &s.label))
        })
        .collect();

    let seed = ring::digest::digest(&ring::digest::SHA256, &p.encode_to_vec());
    let default = p.default_value_index();
    let order = std::iter::once(default).chain((0..p.sample_type.len()).filter(|&i| i != default));
    let profiles = order
        .filter(|&i| i < p.sample_type.len())
        .map(|i| {
            let t = &p.sample_type[i];
            let samples = p
                .sample
                .iter()
                .zip(&shapes)
                .filter_map(|(s, (stack_index, attrs))| {
                    // pprof keeps samples whose value of this type is 0; they carry nothing here.
                    let v = *s.value.get(i)?;
                    (v != 0).then(|| otlp::Sample {
                        stack_index: *stack_index,
                        attribute_indices: attrs.clone(),
                        link_index: 0,
                        values: vec![v],
                        timestamps_unix_nano: vec![],
                    })
                })
                .collect();
            otlp::Profile {
                sample_type: Some(dict.value_type(p, t)),
                samples,
                time_unix_nano: u64::try_from(p.time_nanos).unwrap_or(0),
                duration_nano: u64::try_from(p.duration_nanos).unwrap_or(0),
                period_type: p.period_type.as_ref().map(|t| dict.value_type(p, t)),
                period: p.period,
                profile_id: profile_id(seed.as_ref(), i),
                ..Default::default()
            }
        })
        .collect();

    ExportProfilesServiceRequest {
        resource_profiles: vec![otlp::ResourceProfiles {
            resource: Some(Resource {
                attributes: resource,
                ..Default::default()
            }),
            scope_profiles: vec![otlp::ScopeProfiles {
                scope: Some(InstrumentationScope {
                    name: "kprof".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                profiles,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
        dictionary: Some(dict.d),
    }
}

/// `POST {base}/v1development/profiles` (the path is added unless `base` already ends with
/// it), gzip-compressed protobuf.
pub fn request(
    base: &str,
    p: &KprofProfile,
    pprof_bytes: &[u8],
) -> Result<http::Request<Bytes>, ExportError> {
    super::exporter::check_url(base)?;
    let profile = pprof::Profile::decode_bytes(pprof_bytes)?;
    let body = convert(&profile, resource_attributes(p)).encode_to_vec();
    let mut gz = GzEncoder::new(Vec::with_capacity(body.len() / 4), Compression::default());
    gz.write_all(&body).expect("writing to a Vec cannot fail");
    let gz = gz.finish().expect("writing to a Vec cannot fail");
    let base = base.trim_end_matches('/');
    let url = if base.ends_with(PATH) {
        base.to_string()
    } else {
        format!("{base}{PATH}")
    };
    http::Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/x-protobuf")
        .header(http::header::CONTENT_ENCODING, "gzip")
        .body(Bytes::from(gz))
        .map_err(|e| ExportError::Http(e.to_string()))
}

/// Judge the receiver's answer: a 2xx whose `ExportProfilesServiceResponse` rejects nothing.
pub fn check_response(status: http::StatusCode, body: &[u8]) -> Result<(), ExportError> {
    if !status.is_success() {
        return Err(ExportError::Status(status, error_text(body)));
    }
    let res = ExportProfilesServiceResponse::decode(body)
        .map_err(|e| ExportError::Http(format!("undecodable OTLP response: {e}")))?;
    match res.partial_success {
        Some(ps) if ps.rejected_profiles > 0 => Err(ExportError::Rejected {
            rejected: ps.rejected_profiles,
            message: ps.error_message,
        }),
        _ => Ok(()),
    }
}

/// 16 bytes, non-zero and stable for the same pprof and sample type.
fn profile_id(seed: &[u8], i: usize) -> Vec<u8> {
    let mut input = seed.to_vec();
    input.extend_from_slice(&(i as u64).to_le_bytes());
    ring::digest::digest(&ring::digest::SHA256, &input).as_ref()[..16].to_vec()
}

#[cfg(test)]
mod tests;
