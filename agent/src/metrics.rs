//! Prometheus metrics of the agent, named after Cilium's clustermesh metrics, fed from `AgentStatus`.
//!
//! ```text
//!  watch<AgentStatus> ──follow_status──► StatusRecorder::record ──► gauges per peer
//!  supervisors/reflectors ─────────────────────────────────────────► ReflectorMetrics
//!  AgentMetrics::register ──► one Registry (/metrics)
//! ```
//!
//! Names carry the project's `mesh_` namespace in front of Cilium's
//! `clustermesh_remote_cluster*` names; the label naming the remote cluster is `peer`.
//! Series of a peer that is no longer configured are removed, not left at their last value.

use std::collections::{BTreeMap, BTreeSet};

use meshd::metrics::ReflectorMetrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::runtime::AgentStatus;

/// Labels of a per-peer series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PeerLabels {
    /// The remote cluster.
    pub peer: String,
}

/// Labels of a per-peer, per-kind series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct EntryLabels {
    /// The remote cluster.
    pub peer: String,
    /// Kind of data (`identities`, `ip`, `nodes`, `services`).
    pub kind: String,
}

/// The agent's metrics. Cheap to clone (shared series).
#[derive(Debug, Clone, Default)]
pub struct AgentMetrics {
    /// `mesh_clustermesh_remote_clusters`: peers configured.
    pub remote_clusters: Gauge,
    /// `mesh_clustermesh_remote_cluster_readiness_status{peer}`: 1 ready, 0 not.
    pub readiness: Family<PeerLabels, Gauge>,
    /// `mesh_clustermesh_remote_cluster_failures{peer}`: failures since the peer was
    /// configured (mirrors the supervisor's count, hence a gauge as in Cilium).
    pub failures: Family<PeerLabels, Gauge>,
    /// `mesh_clustermesh_remote_cluster_last_failure_ts{peer}`: Unix seconds of the last
    /// failure (0: none).
    pub last_failure_ts: Family<PeerLabels, Gauge>,
    /// `mesh_clustermesh_remote_cluster_entries{peer,kind}`: entries received.
    pub entries: Family<EntryLabels, Gauge>,
    /// The reflectors' counters (`mesh_reflector_*`, dropped entries by reason); hand
    /// this to `Agent::start`.
    pub reflector: ReflectorMetrics,
}

impl AgentMetrics {
    /// Registers every family (the reflector metrics included) in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "mesh_clustermesh_remote_clusters",
            "Number of remote clusters (peers) configured",
            self.remote_clusters.clone(),
        );
        registry.register(
            "mesh_clustermesh_remote_cluster_readiness_status",
            "Readiness of a remote cluster: 1 when its data is complete and current",
            self.readiness.clone(),
        );
        registry.register(
            "mesh_clustermesh_remote_cluster_failures",
            "Failures of the connection to a remote cluster since it was configured",
            self.failures.clone(),
        );
        registry.register(
            "mesh_clustermesh_remote_cluster_last_failure_ts",
            "Unix time in seconds of the last failure of a remote cluster (0: none)",
            self.last_failure_ts.clone(),
        );
        registry.register(
            "mesh_clustermesh_remote_cluster_entries",
            "Entries received from a remote cluster, per kind",
            self.entries.clone(),
        );
        self.reflector.register(registry);
    }
}

/// Turns status snapshots into the per-peer series, remembering which series exist so the
/// ones of a removed peer (or a kind it no longer reports) can be removed.
#[derive(Debug)]
pub struct StatusRecorder {
    metrics: AgentMetrics,
    /// Peers with series, and the kinds of their `entries` series.
    series: BTreeMap<String, BTreeSet<String>>,
}

impl StatusRecorder {
    /// A recorder writing into `metrics`.
    pub fn new(metrics: AgentMetrics) -> Self {
        Self {
            metrics,
            series: BTreeMap::new(),
        }
    }

    /// Sets every series from `status`.
    pub fn record(&mut self, status: &AgentStatus) {
        let m = &self.metrics;
        m.remote_clusters
            .set(i64::try_from(status.peers.len()).unwrap_or(i64::MAX));
        let mut now: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for p in &status.peers {
            let peer = PeerLabels {
                peer: p.name.to_string(),
            };
            m.readiness
                .get_or_create(&peer)
                .set(i64::from(p.is_ready()));
            m.failures
                .get_or_create(&peer)
                .set(i64::try_from(p.failures).unwrap_or(i64::MAX));
            m.last_failure_ts
                .get_or_create(&peer)
                .set(p.last_failure.map_or(0, |t| t.unix_timestamp()));
            let kinds = now.entry(peer.peer.clone()).or_default();
            for (kind, n) in &p.counts {
                m.entries
                    .get_or_create(&EntryLabels {
                        peer: peer.peer.clone(),
                        kind: kind.clone(),
                    })
                    .set(i64::try_from(*n).unwrap_or(i64::MAX));
                kinds.insert(kind.clone());
            }
        }
        for (peer, kinds) in &self.series {
            let current = now.get(peer);
            if current.is_none() {
                let labels = PeerLabels { peer: peer.clone() };
                m.readiness.remove(&labels);
                m.failures.remove(&labels);
                m.last_failure_ts.remove(&labels);
            }
            for kind in kinds
                .iter()
                .filter(|k| current.is_none_or(|c| !c.contains(*k)))
            {
                m.entries.remove(&EntryLabels {
                    peer: peer.clone(),
                    kind: kind.clone(),
                });
            }
        }
        self.series = now;
    }
}

/// Records every change of `status` into `metrics` until `shutdown` or until the status
/// sender is gone.
pub async fn follow_status(
    metrics: AgentMetrics,
    mut status: watch::Receiver<AgentStatus>,
    shutdown: CancellationToken,
) {
    let mut recorder = StatusRecorder::new(metrics);
    loop {
        // Clone out of the channel: recording takes the families' locks.
        let current = status.borrow_and_update().clone();
        recorder.record(&current);
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = status.changed() => if changed.is_err() { break },
        }
    }
}

#[cfg(test)]
mod tests {
    use meshd::model::ClusterName;
    use meshd::remote::{PeerState, PeerStatus};

    use super::*;

    fn peer(name: &str, ready: bool, counts: &[(&str, u64)]) -> PeerStatus {
        let mut p = PeerStatus::new(&ClusterName::new(name).unwrap());
        if ready {
            p.state = PeerState::Ready;
        }
        p.failures = 3;
        p.last_failure = Some(time::OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap());
        p.counts = counts.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect();
        p
    }

    fn encode(registry: &Registry) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, registry).unwrap();
        s
    }

    fn has(text: &str, line: &str) -> bool {
        text.lines().any(|l| l == line)
    }

    #[tokio::test]
    async fn series_follow_the_status_and_vanish_with_their_peer() {
        let metrics = AgentMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let (tx, rx) = watch::channel(AgentStatus::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(follow_status(metrics.clone(), rx, shutdown.clone()));

        tx.send_replace(AgentStatus {
            peers: vec![
                peer("west", true, &[("ip", 4), ("services", 2)]),
                peer("north", false, &[]),
            ],
            ..AgentStatus::default()
        });
        let wait = |want: &'static str| {
            let registry = &registry;
            async move {
                for _ in 0..200 {
                    if has(&encode(registry), want) {
                        return;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                panic!("no {want:?} in\n{}", encode(registry));
            }
        };
        wait("mesh_clustermesh_remote_clusters 2").await;
        let text = encode(&registry);
        for line in [
            r#"mesh_clustermesh_remote_cluster_readiness_status{peer="west"} 1"#,
            r#"mesh_clustermesh_remote_cluster_readiness_status{peer="north"} 0"#,
            r#"mesh_clustermesh_remote_cluster_failures{peer="west"} 3"#,
            r#"mesh_clustermesh_remote_cluster_last_failure_ts{peer="west"} 1700000000"#,
            r#"mesh_clustermesh_remote_cluster_entries{peer="west",kind="ip"} 4"#,
            r#"mesh_clustermesh_remote_cluster_entries{peer="west",kind="services"} 2"#,
        ] {
            assert!(has(&text, line), "no {line:?} in\n{text}");
        }

        // west stops reporting services; north goes away.
        tx.send_replace(AgentStatus {
            peers: vec![peer("west", true, &[("ip", 5)])],
            ..AgentStatus::default()
        });
        wait("mesh_clustermesh_remote_clusters 1").await;
        let text = encode(&registry);
        assert!(!text.contains(r#"peer="north""#), "{text}");
        assert!(!text.contains(r#"kind="services""#), "{text}");
        assert!(has(
            &text,
            r#"mesh_clustermesh_remote_cluster_entries{peer="west",kind="ip"} 5"#
        ));
        // The reflector families are in the same registry.
        metrics
            .reflector
            .dropped
            .get_or_create(&meshd::metrics::DropLabels {
                cluster: "west".into(),
                kind: "ip".into(),
                reason: "foreign-cluster".into(),
            })
            .inc();
        let text = encode(&registry);
        assert!(
            has(
                &text,
                r#"mesh_reflector_dropped_total{cluster="west",kind="ip",reason="foreign-cluster"} 1"#
            ),
            "{text}"
        );

        shutdown.cancel();
        task.await.unwrap();
    }
}
