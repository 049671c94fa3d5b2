//! Prometheus metrics of the exporter.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// `kind` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct KindLabel {
    /// Exported kind (`identities`, `ip`, `nodes`, `services`, `policies`).
    pub kind: String,
}

/// `reason` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why the export failed (`invalid-input`, `ip-collision`, `etcd`, `allocation`).
    pub reason: String,
}

/// The exporter's metrics (cheap to clone; shared families).
#[derive(Debug, Clone)]
pub struct ExportMetrics {
    /// Entries exported per kind.
    pub entries: Family<KindLabel, Gauge>,
    /// Export errors by reason.
    pub errors: Family<ReasonLabel, Counter>,
    /// etcd round-trip latency of exporter writes, seconds.
    pub etcd_latency: Histogram,
    /// Identities allocated (created) by this replica.
    pub identity_allocations: Counter,
    /// Keys written (put or delete) to etcd.
    pub writes: Counter,
}

impl Default for ExportMetrics {
    fn default() -> Self {
        Self {
            entries: Family::default(),
            errors: Family::default(),
            etcd_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            identity_allocations: Counter::default(),
            writes: Counter::default(),
        }
    }
}

impl ExportMetrics {
    /// Registers under `mesh_export_*`.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "mesh_export_entries",
            "Entries exported per kind",
            self.entries.clone(),
        );
        r.register(
            "mesh_export_errors",
            "Export errors by reason",
            self.errors.clone(),
        );
        r.register(
            "mesh_export_etcd_latency_seconds",
            "etcd round-trip latency of exporter writes",
            self.etcd_latency.clone(),
        );
        r.register(
            "mesh_export_identity_allocations",
            "Identities created by this replica",
            self.identity_allocations.clone(),
        );
        r.register(
            "mesh_export_writes",
            "Keys written to etcd",
            self.writes.clone(),
        );
    }

    /// Counts an error.
    pub fn error(&self, reason: &str) {
        self.errors
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }
}
