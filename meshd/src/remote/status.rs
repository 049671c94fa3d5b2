//! Status snapshot of one supervised cluster.

use std::collections::BTreeMap;
use std::fmt;

use crate::keys::StateKind;
use crate::model::{ClusterId, ClusterName};

/// Lifecycle state of a supervised cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerState {
    /// Connecting and reading the cluster-config.
    Connecting,
    /// Connected; waiting for synced markers and the first full list.
    WaitingForSync,
    /// Every kind listed; following changes.
    Ready,
    /// Failed; waiting before reconnecting.
    Backoff,
    /// The cluster's config is unacceptable (ID clash, name or mode mismatch); retrying.
    Refused,
    /// Stopped (credential removed).
    Stopped,
}

impl PeerState {
    /// The name used in status output and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::WaitingForSync => "waiting-for-sync",
            Self::Ready => "ready",
            Self::Backoff => "backoff",
            Self::Refused => "refused",
            Self::Stopped => "stopped",
        }
    }
}

impl fmt::Display for PeerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `meshctl status` and readiness need to know about one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// The cluster.
    pub name: ClusterName,
    /// Lifecycle state.
    pub state: PeerState,
    /// Connected to its store.
    pub connected: bool,
    /// Its ID, once its config was read.
    pub cluster_id: Option<ClusterId>,
    /// Kinds whose synced marker exists.
    pub synced: Vec<StateKind>,
    /// Entries per kind currently served.
    pub counts: BTreeMap<String, u64>,
    /// The last error.
    pub last_error: Option<String>,
    /// When the last failure happened.
    pub last_failure: Option<time::OffsetDateTime>,
    /// Failures since start.
    pub failures: u64,
    /// The last heartbeat seen.
    pub last_heartbeat: Option<time::OffsetDateTime>,
    /// What the peer guard refused and holds of this peer, where a guard runs.
    pub trust: Option<crate::trust::PeerTrust>,
}

impl PeerStatus {
    /// The initial status.
    pub fn new(name: &ClusterName) -> Self {
        Self {
            name: name.clone(),
            state: PeerState::Connecting,
            connected: false,
            cluster_id: None,
            synced: Vec::new(),
            counts: BTreeMap::new(),
            last_error: None,
            last_failure: None,
            failures: 0,
            last_heartbeat: None,
            trust: None,
        }
    }

    /// Whether the cluster's data is complete and current.
    pub fn is_ready(&self) -> bool {
        self.state == PeerState::Ready
    }
}

impl PeerStatus {
    /// The wire form (`mesh.v1.PeerStatus`), with the peer credential's client certificate
    /// expiry (unix seconds) when known.
    pub fn to_proto(&self, cert_not_after: Option<i64>) -> mesh_proto::v1::PeerStatus {
        mesh_proto::v1::PeerStatus {
            name: self.name.to_string(),
            cluster_id: self.cluster_id.map_or(0, |id| u32::from(id.get())),
            state: self.state.as_str().to_owned(),
            connected: self.connected,
            synced_kinds: self.synced.iter().map(|k| k.as_str().to_owned()).collect(),
            counts: self.counts.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            last_error: self.last_error.clone().unwrap_or_default(),
            last_failure_unix_ms: self.last_failure.map_or(0, |t| {
                i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
            }),
            failures: self.failures,
            cert_not_after_unix: cert_not_after.unwrap_or(0),
            degraded_kinds: self.trust.as_ref().map_or_else(Vec::new, |t| {
                t.degraded.iter().map(|k| k.as_str().to_owned()).collect()
            }),
            refused: self.trust.as_ref().map_or_else(Default::default, |t| {
                t.refused
                    .iter()
                    .map(|(r, n)| (r.as_str().to_owned(), *n))
                    .collect()
            }),
            range_conflicts: self.trust.as_ref().map_or_else(Vec::new, |t| {
                t.conflicts.iter().map(ToString::to_string).collect()
            }),
            pending: self.trust.as_ref().map_or(0, |t| t.pending as u64),
        }
    }
}
