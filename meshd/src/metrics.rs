//! Prometheus metrics of the core: reflector events, relists, errors and dropped entries.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Labels naming one reflector: whose data (`cluster`) and which prefix kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SourceLabels {
    /// Cluster the data belongs to (or `local`).
    pub cluster: String,
    /// Kind of data (`identities`, `ip`, ...).
    pub kind: String,
}

/// Labels of a dropped entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DropLabels {
    /// Cluster the data came from.
    pub cluster: String,
    /// Kind of data.
    pub kind: String,
    /// Why it was dropped (`bad-key`, `bad-value`, `foreign-cluster`, ...).
    pub reason: String,
}

/// Counters every reflector updates. Cheap to clone (shared families).
#[derive(Debug, Clone, Default)]
pub struct ReflectorMetrics {
    /// Events delivered downstream.
    pub events: Family<SourceLabels, Counter>,
    /// Full relists (initial list included).
    pub relists: Family<SourceLabels, Counter>,
    /// Store errors (list or watch) that caused a retry.
    pub errors: Family<SourceLabels, Counter>,
    /// Entries dropped because they failed to decode or validate.
    pub dropped: Family<DropLabels, Counter>,
}

impl ReflectorMetrics {
    /// Registers the families under `mesh_reflector_*`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "mesh_reflector_events",
            "Events delivered by reflectors",
            self.events.clone(),
        );
        registry.register(
            "mesh_reflector_relists",
            "Full relists by reflectors (initial list included)",
            self.relists.clone(),
        );
        registry.register(
            "mesh_reflector_errors",
            "Store errors that made a reflector back off and relist",
            self.errors.clone(),
        );
        registry.register(
            "mesh_reflector_dropped",
            "Entries dropped by reflectors because they failed to decode or validate",
            self.dropped.clone(),
        );
    }

    /// Total dropped entries for `cluster` and `reason` (all kinds), for tests and status.
    pub fn dropped_total(&self, cluster: &str, reason: &str) -> u64 {
        let mut n = 0;
        for kind in crate::keys::StateKind::ALL
            .iter()
            .map(|k| k.as_str())
            .chain(["raw"])
        {
            n += self
                .dropped
                .get_or_create(&DropLabels {
                    cluster: cluster.to_owned(),
                    kind: kind.to_owned(),
                    reason: reason.to_owned(),
                })
                .get();
        }
        n
    }
}

/// Labels naming a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ClusterLabel {
    /// The cluster.
    pub cluster: String,
}

/// Labels of a refused peer entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TrustLabels {
    /// The peer.
    pub cluster: String,
    /// Kind of data.
    pub kind: String,
    /// Why it was refused (`address-of-local`, `quota-entries`, ...).
    pub reason: String,
}

/// Counters of the peer guard (`crate::trust`). Cheap to clone (shared families).
#[derive(Debug, Clone, Default)]
pub struct TrustMetrics {
    /// Entries (or backends) refused, by peer, kind and reason.
    pub refused: Family<TrustLabels, Counter>,
    /// 1 while a peer is over one of its quotas.
    pub degraded: Family<ClusterLabel, prometheus_client::metrics::gauge::Gauge>,
    /// Range claims refused (conflicts, too wide, special), by claimant.
    pub range_conflicts: Family<ClusterLabel, prometheus_client::metrics::gauge::Gauge>,
}

impl TrustMetrics {
    /// Registers the families under `mesh_peer_*`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "mesh_peer_refused",
            "Peer entries refused by the trust guard, by reason",
            self.refused.clone(),
        );
        registry.register(
            "mesh_peer_degraded",
            "1 while a peer is over one of its quotas",
            self.degraded.clone(),
        );
        registry.register(
            "mesh_peer_range_conflicts",
            "Pod CIDR or node address claims of a peer that were not granted",
            self.range_conflicts.clone(),
        );
    }

    /// Total refusals of `cluster` for `reason` (all kinds), for tests and status.
    pub fn refused_total(&self, cluster: &str, reason: &str) -> u64 {
        crate::keys::StateKind::ALL
            .iter()
            .map(|k| {
                self.refused
                    .get_or_create(&TrustLabels {
                        cluster: cluster.to_owned(),
                        kind: k.as_str().to_owned(),
                        reason: reason.to_owned(),
                    })
                    .get()
            })
            .sum()
    }
}
