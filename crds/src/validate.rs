//! Client-side validation of objects against the generated CRD schema, the way the API server
//! does it: defaults first, then the structural schema (types, enums, ranges, patterns), then the
//! CEL rules. It lets `crdgen check` and the tests refuse a bad spec without a cluster; the API
//! server remains the authority.

use kube::CustomResourceExt;
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

/// One reason an object is refused, with the path of the offending field.
#[derive(Debug, Clone, PartialEq)]
pub struct SchemaViolation {
    /// Where: a JSON pointer (`/spec/sampleHz`) or a CEL field path (`spec.window`).
    pub path: String,
    /// What is wrong, as the user will read it.
    pub message: String,
}

impl std::fmt::Display for SchemaViolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// The `openAPIV3Schema` of the CRD generated for `K`.
pub fn open_api_schema<K: CustomResourceExt>() -> Value {
    let crd = K::crd();
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("derived CRDs always carry a schema");
    serde_json::to_value(schema).expect("a schema serialises")
}

/// Applies the schema defaults the way the API server would, where the object parses as `K`.
pub fn with_defaults<K: Serialize + DeserializeOwned>(object: &Value) -> Value {
    match serde_json::from_value::<K>(object.clone()) {
        Ok(typed) => serde_json::to_value(&typed).expect("a typed object serialises"),
        Err(_) => object.clone(),
    }
}

/// Every reason the API server would refuse `object` (on update, `old` is the stored object).
/// Empty when it would be accepted.
pub fn violations<K>(object: &Value, old: Option<&Value>) -> Vec<SchemaViolation>
where
    K: CustomResourceExt + Serialize + DeserializeOwned,
{
    let object = with_defaults::<K>(object);
    let schema = open_api_schema::<K>();
    let validator = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft4)
        .build(&schema)
        .expect("the generated schema is a valid JSON schema");
    let structural: Vec<_> = validator
        .iter_errors(&object)
        .map(|e| SchemaViolation {
            path: e.instance_path().to_string(),
            message: e.to_string(),
        })
        .collect();
    // Like the API server, CEL rules only run on objects that are structurally valid.
    if !structural.is_empty() {
        return structural;
    }
    match kube::core::cel::Validator::new().validate(&schema, &object, old) {
        Ok(()) => Vec::new(),
        Err(errors) => errors
            .as_slice()
            .iter()
            .map(|e| SchemaViolation {
                path: e.field_path.clone(),
                message: e.message.clone(),
            })
            .collect(),
    }
}
