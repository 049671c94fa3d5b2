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
        }
    }

    /// Whether the cluster's data is complete and current.
    pub fn is_ready(&self) -> bool {
        self.state == PeerState::Ready
    }
}
