//! The agent's merged global view: one synchronous, single-writer index over every
//! cluster's exported state, read by subscribers through `watch` snapshots.
//!
//! Data flow:
//!
//! ```text
//! supervisors (local + one per peer) ── ClusterEvent ──▶ MergedView::apply
//!     per cluster (store.rs): raw entries stamped with the view's clock; Init/InitDone
//!     sweep what a relist did not return, Drain drops a cluster, Config gates identities
//!       ├─ identities (claims.rs): identity → (cluster, labels); remote ones must be in
//!       │   their cluster's ID range; the first claimant wins, others are conflicts
//!       ├─ ipcache   (claims.rs): IP → (cluster, entry); local wins, then first remote;
//!       │   every claimant is kept so the next one takes over when the winner goes
//!       ├─ nodes: (cluster, name) → node
//!       └─ services (services.rs): per namespace/name, recomputed only for the key an
//!           event touched: global definitions merged by MCS precedence, affinity applied
//! MergedView::publish ── Arc<Snapshot> per changed kind ──▶ watch receivers
//!     (datapath syncer, DNS, policy, status)
//! ```
//!
//! `apply` never awaits and takes no locks; it only marks kinds dirty. The caller drains
//! the events available, then calls `publish` once, so a burst (a relist) becomes one
//! snapshot per changed kind. Snapshots share their values (`Arc`) with the index.
//!
//! Choices where the rules leave room:
//! - A remote identity or ipcache entry that arrives before its cluster's `Config` is
//!   held as *pending* (stored, counted, not visible) and admitted or rejected when the
//!   config arrives; a config change re-evaluates every entry of that cluster. The
//!   local cluster's entries are trusted and never range-checked.
//! - Identity claims follow the ipcache rule: the local cluster first, then the first
//!   remote claimant; all claimants are kept, so a conflict resolves when the winner goes.
//! - Service precedence: MCS exports (with `export_created`) oldest first, ties by
//!   cluster name, then annotation-only global services by cluster name. `headless` and
//!   conflicting ports follow precedence. Affinity is the local service's if it takes
//!   part (it is this agent's routing preference), else that of the cluster with
//!   precedence; a disagreement is still reported as a conflict. Conflicts are detected
//!   among all participating (global) definitions, not only MCS exports.
//! - A remote global service with `shared: false` still takes part (ports, headless,
//!   `clusters`) but contributes no backends.

mod claims;
#[cfg(test)]
mod model_tests;
mod services;
mod snapshot;
mod store;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;

use meshd::events::ClusterEvent;
use meshd::keys::{StateKey, StateKind, StateValue};
use meshd::model::{
    ClusterConfig, ClusterName, ClusterService, Identity, IdentityEntry, IpCacheEntry, Node,
};
use tokio::sync::watch;

use claims::ClaimIndex;
use snapshot::Publisher;
use store::{Admission, ClusterState, Slot};

pub use services::{MergedBackend, MergedService, ServiceKey};
pub use snapshot::{ClusterEntry, Snapshot};

/// Merged global services by namespace/name.
pub type ServicesSnapshot = Snapshot<ServiceKey, MergedService>;
/// Identity → owning cluster and labels.
pub type IdentitiesSnapshot = Snapshot<Identity, ClusterEntry<IdentityEntry>>;
/// Endpoint IP → winning cluster and its ipcache entry.
pub type IpCacheSnapshot = Snapshot<IpAddr, ClusterEntry<IpCacheEntry>>;
/// Key of the nodes index: (cluster, node name).
pub type NodeKey = (ClusterName, String);
/// Nodes of every cluster.
pub type NodesSnapshot = Snapshot<NodeKey, Node>;

impl Snapshot<ServiceKey, MergedService> {
    /// The merged service `namespace/name`.
    pub fn service(&self, namespace: &str, name: &str) -> Option<&Arc<MergedService>> {
        self.entries.get(&ServiceKey::new(namespace, name))
    }
}

/// Two clusters claim the same endpoint IP.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Collision {
    /// The IP.
    pub ip: IpAddr,
    /// The cluster whose entry is used.
    pub winner: ClusterName,
    /// A cluster whose entry is ignored while the winner's exists.
    pub loser: ClusterName,
}

/// Two clusters claim the same identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct IdentityConflict {
    /// The identity.
    pub identity: Identity,
    /// The cluster whose labels are used.
    pub winner: ClusterName,
    /// A cluster whose claim is ignored while the winner's exists.
    pub loser: ClusterName,
}

/// A conflict between clusters' definitions of one global service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceConflict {
    /// The service.
    pub service: ServiceKey,
    /// What conflicts and how it was resolved.
    pub message: String,
}

/// Why the view refused an event's entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// The key or value names another cluster than the event (a peer speaking for another).
    ForeignCluster,
    /// The value does not match its key (kind, ID, IP or name).
    Mismatch,
    /// A remote identity (or an ipcache entry's identity) outside the cluster's ID range.
    IdentityOutOfScope,
}

impl RejectReason {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ForeignCluster => "foreign-cluster",
            Self::Mismatch => "mismatch",
            Self::IdentityOutOfScope => "identity-out-of-scope",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Services by key, the clusters contributing to each, and the published merge.
#[derive(Debug)]
struct ServiceIndex {
    /// Clusters holding a definition (global or not) of each key.
    members: HashMap<ServiceKey, BTreeSet<ClusterName>>,
    clusterset_ips: HashMap<ServiceKey, IpAddr>,
    /// Keys whose merged service has conflicts.
    conflicted: BTreeSet<ServiceKey>,
    out: Publisher<ServiceKey, MergedService>,
}

impl ServiceIndex {
    fn add_member(&mut self, key: &ServiceKey, cluster: &ClusterName) {
        self.members
            .entry(key.clone())
            .or_default()
            .insert(cluster.clone());
    }

    fn remove_member(&mut self, key: &ServiceKey, cluster: &ClusterName) {
        if let Some(m) = self.members.get_mut(key) {
            m.remove(cluster);
            if m.is_empty() {
                self.members.remove(key);
            }
        }
    }

    /// Re-merges one service from the clusters' current definitions.
    fn recompute(
        &mut self,
        key: &ServiceKey,
        local: &ClusterName,
        clusters: &BTreeMap<ClusterName, ClusterState>,
    ) {
        let defs = self
            .members
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|c| clusters.get(c)?.services.get(key))
            .map(|slot| &*slot.value);
        let Some(merged) = services::merge(local, defs, self.clusterset_ips.get(key).copied())
        else {
            self.conflicted.remove(key);
            self.out.remove(key);
            return;
        };
        let old = self.out.get(key);
        if old.is_some_and(|old| **old == merged) {
            return;
        }
        if merged.conflicts.is_empty() {
            self.conflicted.remove(key);
        } else {
            if old.is_none_or(|old| old.conflicts != merged.conflicts) {
                tracing::warn!(service = %key, conflicts = ?merged.conflicts, "global service definitions conflict");
            }
            self.conflicted.insert(key.clone());
        }
        self.out.insert(key.clone(), Arc::new(merged));
    }
}

/// The merged view of all clusters. See the module documentation.
#[derive(Debug)]
pub struct MergedView {
    local: ClusterName,
    /// Incremented at every `Init`; entries are stamped with it when applied.
    clock: u64,
    clusters: BTreeMap<ClusterName, ClusterState>,
    identities: ClaimIndex<Identity, IdentityEntry>,
    ipcache: ClaimIndex<IpAddr, IpCacheEntry>,
    nodes: Publisher<NodeKey, Node>,
    services: ServiceIndex,
    rejected: BTreeMap<(ClusterName, RejectReason), u64>,
}

impl MergedView {
    /// An empty view for an agent of cluster `local`.
    pub fn new(local: ClusterName) -> Self {
        Self {
            local,
            clock: 0,
            clusters: BTreeMap::new(),
            identities: ClaimIndex::new(),
            ipcache: ClaimIndex::new(),
            nodes: Publisher::new(),
            services: ServiceIndex {
                members: HashMap::new(),
                clusterset_ips: HashMap::new(),
                conflicted: BTreeSet::new(),
                out: Publisher::new(),
            },
            rejected: BTreeMap::new(),
        }
    }

    /// The local cluster.
    pub fn local(&self) -> &ClusterName {
        &self.local
    }

    /// Applies one event. `Apply`/`Delete` cost is proportional to the change (one key,
    /// or one service re-merged); `InitDone` scans that cluster's entries of the kind,
    /// `Drain` that cluster's entries, and a changed `Config` re-evaluates that cluster's
    /// identities and IPs. Nothing is sent to subscribers until [`Self::publish`].
    pub fn apply(&mut self, ev: ClusterEvent) {
        match ev {
            ClusterEvent::Config { cluster, config } => self.apply_config(cluster, config),
            ClusterEvent::Init { cluster, kind } => {
                self.clock += 1;
                let clock = self.clock;
                self.clusters
                    .entry(cluster)
                    .or_default()
                    .listing
                    .insert(kind, clock);
            }
            ClusterEvent::Apply {
                cluster,
                key,
                value,
            } => self.apply_entry(cluster, &key, value),
            ClusterEvent::Delete { cluster, key } => self.delete_entry(&cluster, key),
            ClusterEvent::InitDone { cluster, kind } => self.sweep(&cluster, kind),
            ClusterEvent::Drain { cluster } => self.drain(&cluster),
        }
    }

    /// Sends a new snapshot to the subscribers of every kind that changed since the last
    /// publish; kinds that did not change keep their current `Arc`.
    pub fn publish(&mut self) {
        self.identities.publisher().publish();
        self.ipcache.publisher().publish();
        self.nodes.publish();
        self.services.out.publish();
    }

    /// Whether some kind changed since the last [`Self::publish`].
    pub fn has_unpublished(&self) -> bool {
        self.services.out.is_dirty()
            || self.nodes.is_dirty()
            || self.identities.is_dirty()
            || self.ipcache.is_dirty()
    }

    /// Merged global services (published snapshots).
    pub fn subscribe_services(&self) -> watch::Receiver<Arc<ServicesSnapshot>> {
        self.services.out.subscribe()
    }

    /// Identities (published snapshots).
    pub fn subscribe_identities(&self) -> watch::Receiver<Arc<IdentitiesSnapshot>> {
        self.identities.subscribe()
    }

    /// The ipcache (published snapshots).
    pub fn subscribe_ipcache(&self) -> watch::Receiver<Arc<IpCacheSnapshot>> {
        self.ipcache.subscribe()
    }

    /// Nodes (published snapshots).
    pub fn subscribe_nodes(&self) -> watch::Receiver<Arc<NodesSnapshot>> {
        self.nodes.subscribe()
    }

    /// The current services, including changes not yet published.
    pub fn services(&self) -> &ServicesSnapshot {
        self.services.out.current()
    }

    /// The current identities, including changes not yet published.
    pub fn identities(&self) -> &IdentitiesSnapshot {
        self.identities.current()
    }

    /// The current ipcache, including changes not yet published.
    pub fn ipcache(&self) -> &IpCacheSnapshot {
        self.ipcache.current()
    }

    /// The current nodes, including changes not yet published.
    pub fn nodes(&self) -> &NodesSnapshot {
        self.nodes.current()
    }

    /// Sets (or clears) the ClusterSetIP of `namespace/name`, read by the caller from
    /// `mesh/clusterset-ips/v1/<ns>/<name>`.
    pub fn set_clusterset_ip(&mut self, namespace: &str, name: &str, ip: Option<IpAddr>) {
        let key = ServiceKey::new(namespace, name);
        let changed = match ip {
            Some(ip) => self.services.clusterset_ips.insert(key.clone(), ip) != Some(ip),
            None => self.services.clusterset_ips.remove(&key).is_some(),
        };
        if changed {
            self.services.recompute(&key, &self.local, &self.clusters);
        }
    }

    /// The config last received for `cluster`.
    pub fn config(&self, cluster: &ClusterName) -> Option<&ClusterConfig> {
        self.clusters.get(cluster)?.config.as_ref()
    }

    /// Current endpoint-IP collisions, one per (IP, losing cluster), in IP order.
    pub fn collisions(&self) -> Vec<Collision> {
        self.ipcache
            .contests()
            .map(|(ip, winner, loser)| Collision {
                ip,
                winner: winner.clone(),
                loser: loser.clone(),
            })
            .collect()
    }

    /// How many endpoint-IP collisions happened since the view was created.
    pub fn collisions_total(&self) -> u64 {
        self.ipcache.contests_total()
    }

    /// Current identity conflicts, one per (identity, losing cluster).
    pub fn identity_conflicts(&self) -> Vec<IdentityConflict> {
        self.identities
            .contests()
            .map(|(identity, winner, loser)| IdentityConflict {
                identity,
                winner: winner.clone(),
                loser: loser.clone(),
            })
            .collect()
    }

    /// How many identity conflicts happened since the view was created.
    pub fn identity_conflicts_total(&self) -> u64 {
        self.identities.contests_total()
    }

    /// Current conflicts between clusters' definitions of global services.
    pub fn conflicts(&self) -> Vec<ServiceConflict> {
        let current = self.services.out.current();
        self.services
            .conflicted
            .iter()
            .filter_map(|k| current.entries.get(k))
            .flat_map(|s| {
                let service = s.key();
                s.conflicts.iter().map(move |message| ServiceConflict {
                    service: service.clone(),
                    message: message.clone(),
                })
            })
            .collect()
    }

    /// Entries held per cluster and kind (pending and out-of-range ones included; every
    /// kind of a known cluster is listed, zero or not).
    pub fn counts(&self) -> BTreeMap<(ClusterName, StateKind), usize> {
        self.clusters
            .iter()
            .flat_map(|(c, s)| {
                StateKind::ALL
                    .into_iter()
                    .map(move |k| ((c.clone(), k), s.count(k)))
            })
            .collect()
    }

    /// Entries refused, per cluster and reason, since the view was created (an entry
    /// found out of range again after a config change counts again).
    pub fn rejected(&self) -> &BTreeMap<(ClusterName, RejectReason), u64> {
        &self.rejected
    }

    fn apply_config(&mut self, cluster: ClusterName, config: ClusterConfig) {
        if config.name != cluster {
            reject(&mut self.rejected, &cluster, RejectReason::ForeignCluster);
            return;
        }
        let is_local = cluster == self.local;
        let state = self.clusters.entry(cluster).or_default();
        if state.config.as_ref() == Some(&config) {
            return;
        }
        let config = state.config.insert(config);
        if is_local {
            return;
        }
        readmit(
            &mut state.identities,
            &mut self.identities,
            config,
            |e| e.id,
            &mut self.rejected,
        );
        readmit(
            &mut state.ips,
            &mut self.ipcache,
            config,
            |e| e.identity,
            &mut self.rejected,
        );
    }

    fn apply_entry(&mut self, cluster: ClusterName, key: &StateKey, value: StateValue) {
        if let Err(reason) = check_entry(&cluster, key, &value) {
            reject(&mut self.rejected, &cluster, reason);
            return;
        }
        let is_local = cluster == self.local;
        let stamp = self.clock;
        match value {
            StateValue::Identity(e) => {
                let state = self.clusters.entry(cluster.clone()).or_default();
                let admission = admission(is_local, state.config.as_ref(), e.id);
                upsert_claimed(
                    &mut state.identities,
                    &mut self.identities,
                    e.id,
                    ClusterEntry { cluster, value: e },
                    Stamped { stamp, admission },
                    is_local,
                    &mut self.rejected,
                );
            }
            StateValue::Ip(e) => {
                let state = self.clusters.entry(cluster.clone()).or_default();
                let admission = admission(is_local, state.config.as_ref(), e.identity);
                upsert_claimed(
                    &mut state.ips,
                    &mut self.ipcache,
                    e.ip,
                    ClusterEntry { cluster, value: e },
                    Stamped { stamp, admission },
                    is_local,
                    &mut self.rejected,
                );
            }
            StateValue::Node(n) => {
                let state = self.clusters.entry(cluster).or_default();
                if let Some(slot) = state.nodes.get_mut(&n.name)
                    && *slot.value == n
                {
                    slot.stamp = stamp;
                    return;
                }
                let value = Arc::new(n);
                state
                    .nodes
                    .insert(value.name.clone(), slot(stamp, Arc::clone(&value)));
                self.nodes
                    .insert((value.cluster.clone(), value.name.clone()), value);
            }
            StateValue::Service(s) => self.apply_service(cluster, s, stamp),
        }
    }

    fn apply_service(&mut self, cluster: ClusterName, s: ClusterService, stamp: u64) {
        let key = ServiceKey::new(&s.namespace, &s.name);
        let state = self.clusters.entry(cluster).or_default();
        if let Some(slot) = state.services.get_mut(&key)
            && *slot.value == s
        {
            slot.stamp = stamp;
            return;
        }
        let value = Arc::new(s);
        let is_new = state
            .services
            .insert(key.clone(), slot(stamp, Arc::clone(&value)))
            .is_none();
        if is_new {
            self.services.add_member(&key, &value.cluster);
        }
        self.services.recompute(&key, &self.local, &self.clusters);
    }

    fn delete_entry(&mut self, cluster: &ClusterName, key: StateKey) {
        if key.cluster() != cluster {
            reject(&mut self.rejected, cluster, RejectReason::ForeignCluster);
            return;
        }
        let Some(state) = self.clusters.get_mut(cluster) else {
            return;
        };
        match key {
            StateKey::Identity { id, .. } => {
                delete_claimed(&mut state.identities, &mut self.identities, id, cluster);
            }
            StateKey::Ip { ip, .. } => {
                delete_claimed(&mut state.ips, &mut self.ipcache, ip, cluster);
            }
            StateKey::Node { name, .. } => {
                if state.nodes.remove(&name).is_some() {
                    self.nodes.remove(&(cluster.clone(), name));
                }
            }
            StateKey::Service {
                namespace, name, ..
            } => {
                let key = ServiceKey { namespace, name };
                if state.services.remove(&key).is_some() {
                    self.services.remove_member(&key, cluster);
                    self.services.recompute(&key, &self.local, &self.clusters);
                }
            }
        }
    }

    /// `InitDone`: removes `cluster`'s entries of `kind` not applied since its `Init`.
    fn sweep(&mut self, cluster: &ClusterName, kind: StateKind) {
        let Some(state) = self.clusters.get_mut(cluster) else {
            return;
        };
        let Some(generation) = state.listing.remove(&kind) else {
            tracing::debug!(%cluster, %kind, "InitDone without Init ignored");
            return;
        };
        match kind {
            StateKind::Identities => {
                for id in store::stale(&state.identities, generation) {
                    delete_claimed(&mut state.identities, &mut self.identities, id, cluster);
                }
            }
            StateKind::Ip => {
                for ip in store::stale(&state.ips, generation) {
                    delete_claimed(&mut state.ips, &mut self.ipcache, ip, cluster);
                }
            }
            StateKind::Nodes => {
                for name in store::stale(&state.nodes, generation) {
                    state.nodes.remove(&name);
                    self.nodes.remove(&(cluster.clone(), name));
                }
            }
            StateKind::Services => {
                let stale = store::stale(&state.services, generation);
                for key in &stale {
                    state.services.remove(key);
                    self.services.remove_member(key, cluster);
                }
                for key in &stale {
                    self.services.recompute(key, &self.local, &self.clusters);
                }
            }
        }
    }

    /// `Drain`: removes everything of `cluster`, its config included.
    fn drain(&mut self, cluster: &ClusterName) {
        let Some(state) = self.clusters.remove(cluster) else {
            return;
        };
        for (id, slot) in state.identities {
            if slot.admission == Admission::Admitted {
                self.identities.remove(id, cluster);
            }
        }
        for (ip, slot) in state.ips {
            if slot.admission == Admission::Admitted {
                self.ipcache.remove(ip, cluster);
            }
        }
        for name in state.nodes.into_keys() {
            self.nodes.remove(&(cluster.clone(), name));
        }
        for key in state.services.into_keys() {
            self.services.remove_member(&key, cluster);
            self.services.recompute(&key, &self.local, &self.clusters);
        }
    }
}

fn slot<V>(stamp: u64, value: Arc<V>) -> Slot<V> {
    Slot {
        stamp,
        value,
        admission: Admission::Admitted,
    }
}

/// Checks an `Apply` against the event's cluster and its own key.
fn check_entry(
    cluster: &ClusterName,
    key: &StateKey,
    value: &StateValue,
) -> Result<(), RejectReason> {
    if key.cluster() != cluster {
        return Err(RejectReason::ForeignCluster);
    }
    match (key, value) {
        (StateKey::Identity { id, .. }, StateValue::Identity(e)) => {
            if e.id != *id {
                Err(RejectReason::Mismatch)
            } else if e.labels.cluster() != Some(cluster.as_str()) {
                Err(RejectReason::ForeignCluster)
            } else {
                Ok(())
            }
        }
        (StateKey::Ip { ip, .. }, StateValue::Ip(e)) if e.ip == *ip => Ok(()),
        (StateKey::Node { name, .. }, StateValue::Node(n)) if n.name == *name => {
            if n.cluster == *cluster {
                Ok(())
            } else {
                Err(RejectReason::ForeignCluster)
            }
        }
        (
            StateKey::Service {
                namespace, name, ..
            },
            StateValue::Service(s),
        ) if s.namespace == *namespace && s.name == *name => {
            if s.cluster == *cluster {
                Ok(())
            } else {
                Err(RejectReason::ForeignCluster)
            }
        }
        _ => Err(RejectReason::Mismatch),
    }
}

fn reject(
    rejected: &mut BTreeMap<(ClusterName, RejectReason), u64>,
    cluster: &ClusterName,
    reason: RejectReason,
) {
    tracing::debug!(%cluster, %reason, "entry rejected by the merged view");
    *rejected.entry((cluster.clone(), reason)).or_default() += 1;
}

/// Whether an entry carrying `identity` from a cluster may enter the indexes.
fn admission(is_local: bool, config: Option<&ClusterConfig>, identity: Identity) -> Admission {
    if is_local {
        return Admission::Admitted;
    }
    match config {
        None => Admission::Pending,
        Some(c) => match identity.check_scope(c.id, c.max_connected_clusters) {
            Ok(()) => Admission::Admitted,
            Err(_) => Admission::Rejected,
        },
    }
}

/// Stamp and admission of an entry being applied.
#[derive(Debug, Clone, Copy)]
struct Stamped {
    stamp: u64,
    admission: Admission,
}

/// Stores a claimed entry (identity or IP) and updates its claim.
fn upsert_claimed<K: Copy + Ord + Hash + fmt::Display, T: PartialEq>(
    slots: &mut HashMap<K, Slot<ClusterEntry<T>>>,
    index: &mut ClaimIndex<K, T>,
    key: K,
    entry: ClusterEntry<T>,
    at: Stamped,
    is_local: bool,
    rejected: &mut BTreeMap<(ClusterName, RejectReason), u64>,
) {
    if let Some(slot) = slots.get_mut(&key)
        && slot.value.value == entry.value
    {
        // Re-applied unchanged (a relist): only the stamp moves.
        slot.stamp = at.stamp;
        return;
    }
    let value = Arc::new(entry);
    slots.insert(
        key,
        Slot {
            stamp: at.stamp,
            value: Arc::clone(&value),
            admission: at.admission,
        },
    );
    match at.admission {
        Admission::Admitted => {
            if let Some(c) = index.upsert(key, value, is_local) {
                tracing::warn!(%key, winner = %c.winner, loser = %c.loser, "two clusters claim the same key; the winner's entry is used");
            }
        }
        Admission::Pending => index.remove(key, &value.cluster),
        Admission::Rejected => {
            index.remove(key, &value.cluster);
            reject(rejected, &value.cluster, RejectReason::IdentityOutOfScope);
        }
    }
}

fn delete_claimed<K: Copy + Ord + Hash, T>(
    slots: &mut HashMap<K, Slot<ClusterEntry<T>>>,
    index: &mut ClaimIndex<K, T>,
    key: K,
    cluster: &ClusterName,
) {
    if let Some(slot) = slots.remove(&key)
        && slot.admission == Admission::Admitted
    {
        index.remove(key, cluster);
    }
}

/// Re-evaluates a remote cluster's identity-carrying entries after its config changed.
fn readmit<K: Copy + Ord + Hash + fmt::Display, T>(
    slots: &mut HashMap<K, Slot<ClusterEntry<T>>>,
    index: &mut ClaimIndex<K, T>,
    config: &ClusterConfig,
    identity_of: fn(&T) -> Identity,
    rejected: &mut BTreeMap<(ClusterName, RejectReason), u64>,
) {
    for (key, slot) in slots.iter_mut() {
        let now = admission(false, Some(config), identity_of(&slot.value.value));
        if now == slot.admission {
            continue;
        }
        let was = std::mem::replace(&mut slot.admission, now);
        match now {
            Admission::Admitted => {
                if let Some(c) = index.upsert(*key, Arc::clone(&slot.value), false) {
                    tracing::warn!(%key, winner = %c.winner, loser = %c.loser, "two clusters claim the same key; the winner's entry is used");
                }
            }
            Admission::Pending | Admission::Rejected => {
                if was == Admission::Admitted {
                    index.remove(*key, &slot.value.cluster);
                }
                if now == Admission::Rejected {
                    reject(
                        rejected,
                        &slot.value.cluster,
                        RejectReason::IdentityOutOfScope,
                    );
                }
            }
        }
    }
}
