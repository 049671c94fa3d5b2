//! Per-cluster raw state: every entry a cluster exported, stamped for wholesale replace.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;

use meshd::keys::StateKind;
use meshd::model::{ClusterConfig, ClusterService, Identity, IdentityEntry, IpCacheEntry, Node};

use super::services::ServiceKey;
use super::snapshot::ClusterEntry;

/// Whether an identity-carrying entry is in the merged indexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admission {
    /// Accepted (local, or inside the cluster's identity range).
    Admitted,
    /// Held until the cluster's config arrives.
    Pending,
    /// Outside the cluster's identity range; re-evaluated if the config changes.
    Rejected,
}

/// One entry as a cluster exported it.
#[derive(Debug)]
pub(super) struct Slot<V> {
    /// Value of the view's clock when the entry was last applied.
    pub(super) stamp: u64,
    pub(super) value: Arc<V>,
    /// Only meaningful for identities and ipcache entries.
    pub(super) admission: Admission,
}

/// Everything the view holds of one cluster.
#[derive(Debug, Default)]
pub(super) struct ClusterState {
    pub(super) config: Option<ClusterConfig>,
    /// Per kind being listed: the clock value at its `Init`, until `InitDone`.
    pub(super) listing: BTreeMap<StateKind, u64>,
    pub(super) identities: HashMap<Identity, Slot<ClusterEntry<IdentityEntry>>>,
    pub(super) ips: HashMap<IpAddr, Slot<ClusterEntry<IpCacheEntry>>>,
    pub(super) nodes: HashMap<String, Slot<Node>>,
    pub(super) services: HashMap<ServiceKey, Slot<ClusterService>>,
}

impl ClusterState {
    /// Number of entries held of `kind` (admitted or not).
    pub(super) fn count(&self, kind: StateKind) -> usize {
        match kind {
            StateKind::Identities => self.identities.len(),
            StateKind::Ip => self.ips.len(),
            StateKind::Nodes => self.nodes.len(),
            StateKind::Services => self.services.len(),
        }
    }
}

/// Keys of entries not applied since `generation` (the sweep after a relist).
pub(super) fn stale<K: Clone + Eq + Hash, V>(map: &HashMap<K, Slot<V>>, generation: u64) -> Vec<K> {
    map.iter()
        .filter(|(_, s)| s.stamp < generation)
        .map(|(k, _)| k.clone())
        .collect()
}
