//! The store's Prometheus metrics, served at the store's own `/metrics` (and registrable in the
//! operator's registry with [`StoreMetrics::register`]):
//!
//! * `kprof_store_uploads_total{result}`: uploads by outcome (`created`, `exists`,
//!   `unauthenticated`, `forbidden`, `too_large`, `bad_digest`, `bad_request`, `error`)
//! * `kprof_store_upload_bytes_total`: bytes of accepted uploads (created or deduplicated)
//! * `kprof_store_reads_total{kind}`: reads served (`artifact`, `pprof`, `flamegraph`, `top`, `diff`, `page`)
//! * `kprof_store_read_bytes_total`: bytes served
//! * `kprof_store_errors_total{op}`: internal errors (backend, API server) by operation
//! * `kprof_store_gc_deleted_total`, `kprof_store_gc_runs_total`: garbage collection
//! * `kprof_store_tokenreviews_total`: TokenReviews sent (cache misses)

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: String,
}

/// Counters of the store (cheap to clone: they share their values).
#[derive(Clone, Debug, Default)]
pub struct StoreMetrics {
    pub uploads: Family<ResultLabels, Counter>,
    pub upload_bytes: Counter,
    pub reads: Family<KindLabels, Counter>,
    pub read_bytes: Counter,
    pub errors: Family<OpLabels, Counter>,
    pub gc_deleted: Counter,
    pub gc_runs: Counter,
    pub tokenreviews: Counter,
}

impl StoreMetrics {
    /// Register every metric under the `kprof_store` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("kprof_store");
        r.register(
            "uploads",
            "Artifact uploads by result",
            self.uploads.clone(),
        );
        r.register(
            "upload_bytes",
            "Bytes of accepted artifact uploads",
            self.upload_bytes.clone(),
        );
        r.register("reads", "Reads served by kind", self.reads.clone());
        r.register("read_bytes", "Bytes served", self.read_bytes.clone());
        r.register(
            "errors",
            "Internal errors by operation",
            self.errors.clone(),
        );
        r.register(
            "gc_deleted",
            "Artifacts deleted by garbage collection",
            self.gc_deleted.clone(),
        );
        r.register("gc_runs", "Garbage collection runs", self.gc_runs.clone());
        r.register(
            "tokenreviews",
            "TokenReviews sent to the API server",
            self.tokenreviews.clone(),
        );
    }

    pub fn upload(&self, result: &str) {
        self.uploads
            .get_or_create(&ResultLabels {
                result: result.to_string(),
            })
            .inc();
    }

    pub fn read(&self, kind: &str, bytes: usize) {
        self.reads
            .get_or_create(&KindLabels {
                kind: kind.to_string(),
            })
            .inc();
        self.read_bytes.inc_by(bytes as u64);
    }

    pub fn error(&self, op: &str) {
        self.errors
            .get_or_create(&OpLabels { op: op.to_string() })
            .inc();
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut registry = Registry::default();
        self.register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("encoding to a String cannot fail");
        out
    }
}
