//! The peer guard: a synchronous filter between supervisors and consumers that lets a
//! peer speak only for itself and within its quotas.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::judge::{address_check, encoded_len, filtered, judge_ip, refused_backends, sanitize};
use super::ranges::{Claim, Ownership, RangeConflict, claims_of};
use super::{PeerLimits, PeerTrust, Refusal};
use crate::events::ClusterEvent;
use crate::keys::{StateKey, StateKind, StateValue};
use crate::metrics::{TrustLabels, TrustMetrics};
use crate::model::{ClusterName, ClusterService, Identity, IpCacheEntry, Node};

/// Where an entry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Passed downstream.
    Admitted,
    /// Held until the ranges it is judged against are known.
    Pending,
    /// Held back; re-judged when ranges change.
    Refused(Refusal),
}

/// A peer ipcache entry. Its value is kept only while consumers do not have it (pending
/// or refused); an admitted entry's value went downstream, so the guard keeps just what
/// judging needs. An entry withdrawn after admission has no value: if its address is
/// granted to the peer again, the guard asks for a relist of the peer
/// ([`PeerGuard::take_relists`]).
#[derive(Debug)]
struct IpSlot {
    /// Boxed: an admitted entry costs a pointer, not an inline entry.
    value: Option<Box<IpCacheEntry>>,
    prefix_len: u8,
    bytes: u32,
    stamp: u64,
    verdict: Verdict,
}

#[derive(Debug)]
struct ServiceSlot {
    /// The service as the peer exported it, kept while it is pending or some of its
    /// backends are left out; a service passed whole went downstream (moved) and only its
    /// backend addresses are kept, to tell whether a range that shrank affects it (then
    /// the guard asks for a relist of the peer).
    value: Option<Box<ClusterService>>,
    backends: Box<[IpAddr]>,
    bytes: u32,
    stamp: u64,
    /// `None`: not passed downstream (pending); else the backends left out when passed.
    emitted: Option<BTreeSet<IpAddr>>,
}

#[derive(Debug)]
struct NodeSlot {
    raw: Node,
    bytes: u32,
    stamp: u64,
    /// What downstream holds (the node without its refused ranges), if anything.
    emitted: Option<Node>,
}

/// A list in progress: its generation and what it re-applied so far (quotas count these
/// while the entries of the previous list wait for the sweep).
#[derive(Debug, Clone, Copy)]
struct Listing {
    generation: u64,
    fresh: usize,
    fresh_bytes: u64,
}

/// One cluster's entries as the guard holds them.
#[derive(Debug, Default)]
struct Guarded {
    id: Option<u16>,
    nodes: HashMap<String, NodeSlot>,
    nodes_listed: bool,
    listing: HashMap<StateKind, Listing>,
    /// `InitDone`s held back until the cluster's ranges are known.
    held: Vec<StateKind>,
    identities: HashMap<Identity, (u32, u64)>,
    ips: HashMap<IpAddr, IpSlot>,
    services: HashMap<(String, String), ServiceSlot>,
    /// Entries waiting for ranges (IPs and services).
    pending: usize,
    bytes: u64,
    /// `bytes` per kind.
    kind_bytes: BTreeMap<StateKind, u64>,
    /// Kinds that refused something for quota since their last `Init`.
    over_quota: BTreeSet<StateKind>,
    /// Kinds over quota at their last complete list (or since).
    degraded: BTreeSet<StateKind>,
    refused: BTreeMap<Refusal, u64>,
    /// Keys already logged (each refused key is logged once).
    logged: HashSet<StateKey>,
}

impl Guarded {
    fn count(&self, kind: StateKind) -> usize {
        match kind {
            StateKind::Identities => self.identities.len(),
            StateKind::Ip => self.ips.len(),
            StateKind::Nodes => self.nodes.len(),
            StateKind::Services => self.services.len(),
        }
    }

    /// Bytes and stamp of the entry held under `key`.
    fn held(&self, key: &StateKey) -> Option<(u32, u64)> {
        match key {
            StateKey::Identity { id, .. } => self.identities.get(id).copied(),
            StateKey::Ip { ip, .. } => self.ips.get(ip).map(|s| (s.bytes, s.stamp)),
            StateKey::Node { name, .. } => self.nodes.get(name).map(|s| (s.bytes, s.stamp)),
            StateKey::Service {
                namespace, name, ..
            } => self
                .services
                .get(&(namespace.clone(), name.clone()))
                .map(|s| (s.bytes, s.stamp)),
        }
    }
}

/// The peer guard. See the [module documentation](super).
#[derive(Debug)]
pub struct PeerGuard {
    local: ClusterName,
    limits: PeerLimits,
    clock: u64,
    clusters: BTreeMap<ClusterName, Guarded>,
    ownership: Ownership,
    granted: HashMap<ClusterName, Vec<(u8, u128, u128)>>,
    ranges_dirty: bool,
    /// When each (cluster, range) claim was first seen, in settles (0: granted before,
    /// see [`Self::seed_granted`]).
    first_seen: HashMap<(ClusterName, IpNet), u64>,
    settles: u64,
    /// Peers to relist (entries withdrawn earlier became admissible again).
    relists: BTreeSet<ClusterName>,
    metrics: TrustMetrics,
}

impl PeerGuard {
    /// A guard for consumers of cluster `local`; refusals are counted in `metrics`.
    pub fn new(local: ClusterName, limits: PeerLimits, metrics: TrustMetrics) -> Self {
        Self {
            local,
            limits,
            clock: 0,
            clusters: BTreeMap::new(),
            ownership: Ownership::default(),
            granted: HashMap::new(),
            ranges_dirty: false,
            first_seen: HashMap::new(),
            settles: 0,
            relists: BTreeSet::new(),
            metrics,
        }
    }

    /// Peers the owner should relist (restart their supervisor): an address that was
    /// withdrawn from them (its range went to another cluster) is theirs again, and the
    /// guard, which keeps no copy of admitted entries, needs the entries back. Rare: a
    /// range must change hands twice.
    pub fn take_relists(&mut self) -> Vec<ClusterName> {
        std::mem::take(&mut self.relists).into_iter().collect()
    }

    /// Marks the ranges of `nodes` as granted before this guard started (kvstoremesh
    /// seeds what its cache holds), so that after a restart a peer keeps the ranges it
    /// held against a newcomer's overlapping claim. A seeded claim that no node makes
    /// any more is forgotten at the next settle.
    pub fn seed_granted<'a>(&mut self, nodes: impl IntoIterator<Item = &'a Node>) {
        for n in nodes {
            for c in claims_of(n) {
                self.first_seen.insert((c.cluster.clone(), c.range), 0);
            }
        }
    }

    /// The ownership of addresses as last settled.
    pub fn ownership(&self) -> &Ownership {
        &self.ownership
    }

    /// Applies one event; pushes what consumers should see onto `out`. Call
    /// [`Self::settle`] after a batch, before consumers publish.
    pub fn apply(&mut self, ev: ClusterEvent, out: &mut Vec<ClusterEvent>) {
        if *ev.cluster() == self.local {
            self.apply_local(ev, out);
            return;
        }
        match ev {
            ClusterEvent::Config { cluster, config } => {
                let st = state(&mut self.clusters, &cluster);
                let id = Some(config.id.get());
                if st.id != id {
                    st.id = id;
                    self.ranges_dirty = true;
                }
                out.push(ClusterEvent::Config { cluster, config });
            }
            ClusterEvent::Init { cluster, kind } => {
                self.clock += 1;
                let st = state(&mut self.clusters, &cluster);
                st.listing.insert(
                    kind,
                    Listing {
                        generation: self.clock,
                        fresh: 0,
                        fresh_bytes: 0,
                    },
                );
                st.over_quota.remove(&kind);
                // A list that restarts before its held InitDone went out: that InitDone
                // belongs to the old list and must not complete the new one.
                st.held.retain(|k| *k != kind);
                out.push(ClusterEvent::Init { cluster, kind });
            }
            ClusterEvent::Apply {
                cluster,
                key,
                value,
            } => self.apply_peer(cluster, key, value, out),
            ClusterEvent::Delete { cluster, key } => self.delete_peer(&cluster, &key, out),
            ClusterEvent::InitDone { cluster, kind } => {
                self.sweep(&cluster, kind);
                let ready = self.ranges_ready(&cluster);
                let st = state(&mut self.clusters, &cluster);
                if st.over_quota.remove(&kind) {
                    st.degraded.insert(kind);
                } else if st.degraded.remove(&kind) && st.degraded.is_empty() {
                    self.metrics
                        .degraded
                        .get_or_create(&crate::metrics::ClusterLabel {
                            cluster: cluster.to_string(),
                        })
                        .set(0);
                }
                if kind == StateKind::Nodes {
                    st.nodes_listed = true;
                    self.ranges_dirty = true;
                }
                if kind != StateKind::Identities && (!ready || self.ranges_dirty) {
                    st.held.push(kind);
                } else {
                    out.push(ClusterEvent::InitDone { cluster, kind });
                }
            }
            ClusterEvent::Drain { cluster } => {
                if self.clusters.remove(&cluster).is_some() {
                    self.ranges_dirty = true;
                }
                self.relists.remove(&cluster);
                self.metrics.degraded.remove(&crate::metrics::ClusterLabel {
                    cluster: cluster.to_string(),
                });
                out.push(ClusterEvent::Drain { cluster });
            }
        }
    }

    fn apply_local(&mut self, ev: ClusterEvent, out: &mut Vec<ClusterEvent>) {
        match &ev {
            ClusterEvent::Init {
                kind: StateKind::Nodes,
                cluster,
            } => {
                self.clock += 1;
                let clock = self.clock;
                let st = state(&mut self.clusters, cluster);
                st.listing.insert(
                    StateKind::Nodes,
                    Listing {
                        generation: clock,
                        fresh: 0,
                        fresh_bytes: 0,
                    },
                );
            }
            ClusterEvent::Apply {
                cluster,
                value: StateValue::Node(n),
                ..
            } => {
                let clock = self.clock;
                let st = state(&mut self.clusters, cluster);
                let changed = st.nodes.get(&n.name).is_none_or(|s| s.raw != *n);
                if changed {
                    self.ranges_dirty = true;
                }
                st.nodes.insert(
                    n.name.clone(),
                    NodeSlot {
                        raw: n.clone(),
                        bytes: 0,
                        stamp: clock,
                        emitted: None,
                    },
                );
                if let Some(s) = st.nodes.get_mut(&n.name) {
                    s.stamp = clock;
                }
            }
            ClusterEvent::Delete {
                cluster,
                key: StateKey::Node { name, .. },
            } => {
                if let Some(st) = self.clusters.get_mut(cluster)
                    && st.nodes.remove(name).is_some()
                {
                    self.ranges_dirty = true;
                }
            }
            ClusterEvent::InitDone {
                cluster,
                kind: StateKind::Nodes,
            } => {
                let cluster = cluster.clone();
                self.sweep(&cluster, StateKind::Nodes);
                let st = state(&mut self.clusters, &cluster);
                st.nodes_listed = true;
                self.ranges_dirty = true;
            }
            ClusterEvent::Drain { cluster } => {
                self.clusters.remove(cluster);
                self.ranges_dirty = true;
            }
            _ => {}
        }
        out.push(ev);
    }

    /// Whether `cluster`'s entries can be judged: the local cluster's nodes and the
    /// cluster's own nodes have been listed.
    fn ranges_ready(&self, cluster: &ClusterName) -> bool {
        let listed = |c: &ClusterName| self.clusters.get(c).is_some_and(|s| s.nodes_listed);
        listed(&self.local) && listed(cluster)
    }

    fn refuse(&mut self, cluster: &ClusterName, key: &StateKey, reason: Refusal) {
        let Some(st) = self.clusters.get_mut(cluster) else {
            return;
        };
        *st.refused.entry(reason).or_default() += 1;
        self.metrics
            .refused
            .get_or_create(&TrustLabels {
                cluster: cluster.to_string(),
                kind: key.kind().as_str().to_owned(),
                reason: reason.as_str().to_owned(),
            })
            .inc();
        if reason.is_quota() {
            st.over_quota.insert(key.kind());
            let newly_degraded = st.degraded.insert(key.kind());
            self.metrics
                .degraded
                .get_or_create(&crate::metrics::ClusterLabel {
                    cluster: cluster.to_string(),
                })
                .set(1);
            // Quota refusals are logged once per (peer, kind) as it becomes degraded.
            if newly_degraded {
                tracing::warn!(peer = %cluster, kind = %key.kind(), %reason, "peer over quota: its excess entries are refused");
            }
            return;
        }
        if st.logged.len() < 10_000 && st.logged.insert(key.clone()) {
            tracing::warn!(peer = %cluster, key = ?key, %reason, "peer entry refused");
        }
    }

    fn apply_peer(
        &mut self,
        cluster: ClusterName,
        key: StateKey,
        value: StateValue,
        out: &mut Vec<ClusterEvent>,
    ) {
        let bytes = encoded_len(&value);
        if bytes > self.limits.max_value_bytes {
            state(&mut self.clusters, &cluster);
            self.refuse(&cluster, &key, Refusal::ValueTooLarge);
            return;
        }
        let bytes = bytes as u32;
        let kind = key.kind();
        let st = state(&mut self.clusters, &cluster);
        let held = st.held(&key);
        let old = held.map_or(0, |h| u64::from(h.0));
        let total = st.bytes - old + u64::from(bytes);
        // While a list runs, the previous list's entries wait for the sweep: the limits
        // apply to what this list re-applied, plus the change.
        let listing = st.listing.get(&kind).copied();
        let (count, fits_bytes) = match listing {
            Some(l) => {
                let fresh_old = held
                    .filter(|h| h.1 >= l.generation)
                    .map_or(0, |h| u64::from(h.0));
                let is_fresh = held.is_some_and(|h| h.1 >= l.generation);
                (
                    if is_fresh { None } else { Some(l.fresh) },
                    st.bytes - st.kind_bytes.get(&kind).copied().unwrap_or(0) + l.fresh_bytes
                        - fresh_old
                        + u64::from(bytes)
                        <= self.limits.max_total_bytes,
                )
            }
            None => (
                held.is_none().then(|| st.count(kind)),
                total <= self.limits.max_total_bytes,
            ),
        };
        if count.is_some_and(|n| n >= self.limits.max_entries(kind)) {
            self.refuse(&cluster, &key, Refusal::QuotaEntries);
            return;
        }
        if !fits_bytes {
            self.refuse(&cluster, &key, Refusal::QuotaBytes);
            return;
        }
        if let Some(l) = st.listing.get_mut(&kind) {
            let fresh_old = held
                .filter(|h| h.1 >= l.generation)
                .map_or(0, |h| u64::from(h.0));
            if held.is_none_or(|h| h.1 < l.generation) {
                l.fresh += 1;
            }
            l.fresh_bytes = l.fresh_bytes - fresh_old + u64::from(bytes);
        }
        st.bytes = total;
        let kb = st.kind_bytes.entry(kind).or_default();
        *kb = *kb - old + u64::from(bytes);
        let stamp = self.clock;
        match value {
            StateValue::Identity(e) => {
                st.identities.insert(e.id, (bytes, stamp));
                out.push(ClusterEvent::Apply {
                    cluster,
                    key,
                    value: StateValue::Identity(e),
                });
            }
            StateValue::Ip(e) => {
                let verdict = self.ip_verdict(&cluster, e.ip, e.prefix_len);
                let st = state(&mut self.clusters, &cluster);
                let was = st.ips.get(&e.ip).map(|s| s.verdict);
                if was == Some(Verdict::Pending) {
                    st.pending -= 1;
                }
                if verdict == Verdict::Pending {
                    st.pending += 1;
                }
                let (ip, prefix_len) = (e.ip, e.prefix_len);
                // Admitted: the value goes downstream (moved, not copied).
                let (kept, emit) = if verdict == Verdict::Admitted {
                    (None, Some(e))
                } else {
                    (Some(Box::new(e)), None)
                };
                st.ips.insert(
                    ip,
                    IpSlot {
                        value: kept,
                        prefix_len,
                        bytes,
                        stamp,
                        verdict,
                    },
                );
                self.emit_ip(cluster, key, was, verdict, emit, out);
            }
            StateValue::Node(n) => {
                let prev = st.nodes.remove(&n.name);
                if prev.as_ref().is_none_or(|p| p.raw != n) {
                    self.ranges_dirty = true;
                }
                let emitted = prev.and_then(|p| p.emitted);
                let st = state(&mut self.clusters, &cluster);
                st.nodes.insert(
                    n.name.clone(),
                    NodeSlot {
                        raw: n,
                        bytes,
                        stamp,
                        emitted,
                    },
                );
            }
            StateValue::Service(s) => {
                let ready = self.can_judge(&cluster);
                let st = state(&mut self.clusters, &cluster);
                let sk = (s.namespace.clone(), s.name.clone());
                let prev = st.services.remove(&sk);
                let was_emitted = prev.as_ref().and_then(|p| p.emitted.clone());
                if prev.as_ref().is_some_and(|p| p.emitted.is_none()) {
                    st.pending -= 1;
                }
                let mut slot = ServiceSlot {
                    backends: s.backends.keys().copied().collect(),
                    value: Some(Box::new(s)),
                    bytes,
                    stamp,
                    emitted: None,
                };
                if ready && let Some(value) = slot.value.take() {
                    let refused = self.refused_backends(&cluster, &value);
                    let newly: Vec<IpAddr> = refused
                        .iter()
                        .filter(|ip| !was_emitted.as_ref().is_some_and(|w| w.contains(ip)))
                        .copied()
                        .collect();
                    for _ in newly {
                        self.refuse(&cluster, &key, Refusal::BackendNotOwned);
                    }
                    // Whole: moved downstream. Filtered: the original is kept.
                    let svc = if refused.is_empty() {
                        *value
                    } else {
                        let svc = filtered(&value, &refused);
                        slot.value = Some(value);
                        svc
                    };
                    out.push(ClusterEvent::Apply {
                        cluster: cluster.clone(),
                        key,
                        value: StateValue::Service(svc),
                    });
                    slot.emitted = Some(refused);
                } else {
                    state(&mut self.clusters, &cluster).pending += 1;
                    if was_emitted.is_some() {
                        out.push(ClusterEvent::Delete {
                            cluster: cluster.clone(),
                            key,
                        });
                    }
                }
                self.clusters
                    .entry(cluster)
                    .or_default()
                    .services
                    .insert(sk, slot);
            }
        }
    }

    /// Emits what an IP's verdict change means downstream, and counts a refusal.
    fn emit_ip(
        &mut self,
        cluster: ClusterName,
        key: StateKey,
        was: Option<Verdict>,
        now: Verdict,
        value: Option<IpCacheEntry>,
        out: &mut Vec<ClusterEvent>,
    ) {
        if let Verdict::Refused(r) = now
            && was != Some(now)
        {
            self.refuse(&cluster, &key, r);
        }
        match (was == Some(Verdict::Admitted), value) {
            (_, Some(e)) => out.push(ClusterEvent::Apply {
                cluster,
                key,
                value: StateValue::Ip(e),
            }),
            (true, None) => out.push(ClusterEvent::Delete { cluster, key }),
            (false, None) => {}
        }
    }

    /// Whether `cluster`'s entries can be judged now: its ranges are known and the
    /// ownership is not stale (node changes wait for [`Self::settle`]).
    fn can_judge(&self, cluster: &ClusterName) -> bool {
        !self.ranges_dirty && self.ranges_ready(cluster)
    }

    fn ip_verdict(&self, cluster: &ClusterName, ip: IpAddr, prefix_len: u8) -> Verdict {
        if self.can_judge(cluster) {
            judge_ip(&self.ownership, &self.local, cluster, ip, prefix_len)
        } else {
            Verdict::Pending
        }
    }

    fn refused_backends(&self, cluster: &ClusterName, s: &ClusterService) -> BTreeSet<IpAddr> {
        refused_backends(&self.ownership, &self.local, cluster, s)
    }

    fn delete_peer(&mut self, cluster: &ClusterName, key: &StateKey, out: &mut Vec<ClusterEvent>) {
        let Some(st) = self.clusters.get_mut(cluster) else {
            return;
        };
        let mut forward = false;
        let bytes;
        match key {
            StateKey::Identity { id, .. } => {
                bytes = st.identities.remove(id).map(|s| s.0);
                forward = bytes.is_some();
            }
            StateKey::Ip { ip, .. } => {
                let slot = st.ips.remove(ip);
                bytes = slot.as_ref().map(|s| s.bytes);
                if let Some(s) = slot {
                    forward = s.verdict == Verdict::Admitted;
                    if s.verdict == Verdict::Pending {
                        st.pending -= 1;
                    }
                }
            }
            StateKey::Node { name, .. } => {
                let slot = st.nodes.remove(name);
                bytes = slot.as_ref().map(|s| s.bytes);
                if let Some(s) = slot {
                    forward = s.emitted.is_some();
                    self.ranges_dirty = true;
                }
            }
            StateKey::Service {
                namespace, name, ..
            } => {
                let slot = st.services.remove(&(namespace.clone(), name.clone()));
                bytes = slot.as_ref().map(|s| s.bytes);
                if let Some(s) = slot {
                    forward = s.emitted.is_some();
                    if s.emitted.is_none() {
                        st.pending -= 1;
                    }
                }
            }
        }
        st.bytes -= u64::from(bytes.unwrap_or(0));
        *st.kind_bytes.entry(key.kind()).or_default() -= u64::from(bytes.unwrap_or(0));
        st.logged.remove(key);
        if forward {
            out.push(ClusterEvent::Delete {
                cluster: cluster.clone(),
                key: key.clone(),
            });
        }
    }

    /// Drops `cluster`'s entries of `kind` not applied since its `Init` (consumers sweep
    /// what they were given themselves; this only keeps the guard's own books).
    fn sweep(&mut self, cluster: &ClusterName, kind: StateKind) {
        let Some(st) = self.clusters.get_mut(cluster) else {
            return;
        };
        let Some(Listing { generation, .. }) = st.listing.remove(&kind) else {
            return;
        };
        let mut freed = 0u64;
        match kind {
            StateKind::Identities => st.identities.retain(|_, s| {
                let keep = s.1 >= generation;
                if !keep {
                    freed += u64::from(s.0);
                }
                keep
            }),
            StateKind::Ip => {
                let mut pending = 0;
                st.ips.retain(|_, s| {
                    let keep = s.stamp >= generation;
                    if !keep {
                        freed += u64::from(s.bytes);
                        pending += usize::from(s.verdict == Verdict::Pending);
                    }
                    keep
                });
                st.pending -= pending;
            }
            StateKind::Nodes => {
                let before = st.nodes.len();
                st.nodes.retain(|_, s| {
                    let keep = s.stamp >= generation;
                    if !keep {
                        freed += u64::from(s.bytes);
                    }
                    keep
                });
                if st.nodes.len() != before {
                    self.ranges_dirty = true;
                }
            }
            StateKind::Services => {
                let mut pending = 0;
                st.services.retain(|_, s| {
                    let keep = s.stamp >= generation;
                    if !keep {
                        freed += u64::from(s.bytes);
                        pending += usize::from(s.emitted.is_none());
                    }
                    keep
                });
                st.pending -= pending;
            }
        }
        st.bytes -= freed;
        *st.kind_bytes.entry(kind).or_default() -= freed;
    }

    /// Re-judges what range changes affect (only when nodes or cluster IDs changed since
    /// the last call) and releases `InitDone`s held for ranges. Pushes the resulting
    /// events onto `out`.
    pub fn settle(&mut self, out: &mut Vec<ClusterEvent>) {
        if !self.ranges_dirty {
            return;
        }
        self.ranges_dirty = false;
        // Claims in priority order: the local cluster's first; then peers' by when the
        // claim was first seen (an established range cannot be taken by a newcomer), then
        // by cluster ID (unknown IDs last), then name.
        self.settles += 1;
        let settles = self.settles;
        let mut claims: Vec<(bool, u64, u16, Claim<'_>)> = Vec::new();
        let mut seen = HashSet::new();
        for (cluster, st) in &self.clusters {
            let is_peer = *cluster != self.local;
            for slot in st.nodes.values() {
                for c in claims_of(&slot.raw) {
                    let key = (cluster.clone(), c.range);
                    let first = *self.first_seen.entry(key.clone()).or_insert(settles);
                    seen.insert(key);
                    claims.push((is_peer, first, st.id.unwrap_or(u16::MAX), c));
                }
            }
        }
        claims.sort_by(|a, b| {
            (a.0, a.1, a.2, a.3.cluster, a.3.range).cmp(&(b.0, b.1, b.2, b.3.cluster, b.3.range))
        });
        self.ownership = Ownership::build(claims.into_iter().map(|c| c.3), self.limits.cidr);
        self.first_seen.retain(|k, _| seen.contains(k));
        let granted = self.ownership.granted();
        let mut per_claimant: HashMap<&ClusterName, i64> = HashMap::new();
        for c in self.ownership.conflicts() {
            *per_claimant.entry(&c.claimant).or_default() += 1;
        }
        for cluster in self.clusters.keys() {
            self.metrics
                .range_conflicts
                .get_or_create(&crate::metrics::ClusterLabel {
                    cluster: cluster.to_string(),
                })
                .set(per_claimant.get(cluster).copied().unwrap_or(0));
        }
        let refused_ranges: HashSet<(&ClusterName, &str, IpNet)> = self
            .ownership
            .conflicts()
            .iter()
            .map(|c| (&c.claimant, c.node.as_str(), c.range))
            .collect();
        let peers: Vec<ClusterName> = self
            .clusters
            .keys()
            .filter(|c| **c != self.local)
            .cloned()
            .collect();
        let mut node_updates: Vec<(ClusterName, String, Option<Node>)> = Vec::new();
        for cluster in &peers {
            if !self.ranges_ready(cluster) {
                continue;
            }
            let Some(st) = self.clusters.get(cluster) else {
                continue;
            };
            for (name, slot) in &st.nodes {
                let clean = sanitize(&slot.raw, |net| {
                    refused_ranges.contains(&(cluster, name.as_str(), net))
                });
                if slot.emitted.as_ref() != Some(&clean) {
                    node_updates.push((cluster.clone(), name.clone(), Some(clean)));
                }
            }
        }
        drop(refused_ranges);
        for (cluster, name, node) in node_updates {
            let Some(st) = self.clusters.get_mut(&cluster) else {
                continue;
            };
            if let (Some(slot), Some(node)) = (st.nodes.get_mut(&name), node) {
                slot.emitted = Some(node.clone());
                out.push(ClusterEvent::Apply {
                    key: StateKey::Node {
                        cluster: cluster.clone(),
                        name,
                    },
                    cluster,
                    value: StateValue::Node(node),
                });
            }
        }
        for cluster in &peers {
            if !self.ranges_ready(cluster) {
                continue;
            }
            let (old, new) = (self.granted.get(cluster), granted.get(cluster));
            let changed = old != new;
            let shrunk = changed
                && !super::ranges::covers(
                    new.map_or(&[][..], Vec::as_slice),
                    old.map_or(&[][..], Vec::as_slice),
                );
            let pending = self.clusters.get(cluster).is_some_and(|s| s.pending > 0);
            if changed || pending {
                self.rejudge(cluster, shrunk, out);
            }
            let st = state(&mut self.clusters, cluster);
            for kind in std::mem::take(&mut st.held) {
                out.push(ClusterEvent::InitDone {
                    cluster: cluster.clone(),
                    kind,
                });
            }
        }
        self.granted = granted;
    }

    /// Re-judges every IP and service of `cluster` (whose ranges are known) against the
    /// current ownership.
    /// `shrunk`: some address granted to the cluster before is not any more.
    fn rejudge(&mut self, cluster: &ClusterName, shrunk: bool, out: &mut Vec<ClusterEvent>) {
        let Some(st) = self.clusters.get_mut(cluster) else {
            return;
        };
        let mut ip_changes = Vec::new();
        let mut relist = false;
        for (ip, slot) in &mut st.ips {
            let now = judge_ip(&self.ownership, &self.local, cluster, *ip, slot.prefix_len);
            if now == slot.verdict {
                continue;
            }
            if now == Verdict::Admitted && slot.value.is_none() {
                // Withdrawn earlier and its value is gone: only a relist brings it back.
                relist = true;
                continue;
            }
            let value = if now == Verdict::Admitted {
                slot.value.take().map(|b| *b)
            } else {
                None
            };
            ip_changes.push((*ip, slot.verdict, now, value));
            if slot.verdict == Verdict::Pending {
                st.pending -= 1;
            }
            slot.verdict = now;
        }
        let mut svc_changes = Vec::new();
        for ((ns, name), slot) in &mut st.services {
            let Some(value) = slot.value.take() else {
                // Passed whole: only a shrink can take backends away, and then the original
                // is needed to filter it.
                if shrunk
                    && slot.backends.iter().any(|ip| {
                        address_check(&self.ownership, &self.local, cluster, *ip).is_err()
                    })
                {
                    relist = true;
                }
                continue;
            };
            let refused = refused_backends(&self.ownership, &self.local, cluster, &value);
            if slot.emitted.as_ref() == Some(&refused) {
                slot.value = Some(value);
                continue;
            }
            let newly = refused
                .iter()
                .filter(|ip| !slot.emitted.as_ref().is_some_and(|w| w.contains(ip)))
                .count();
            if slot.emitted.is_none() {
                st.pending -= 1;
            }
            let svc = if refused.is_empty() {
                *value
            } else {
                let svc = filtered(&value, &refused);
                slot.value = Some(value);
                svc
            };
            svc_changes.push((ns.clone(), name.clone(), svc, newly));
            slot.emitted = Some(refused);
        }
        if relist {
            self.relists.insert(cluster.clone());
        }
        for (ip, was, now, value) in ip_changes {
            let key = StateKey::Ip {
                cluster: cluster.clone(),
                ip,
            };
            self.emit_ip(cluster.clone(), key, Some(was), now, value, out);
        }
        for (namespace, name, svc, newly) in svc_changes {
            let key = StateKey::Service {
                cluster: cluster.clone(),
                namespace,
                name,
            };
            for _ in 0..newly {
                self.refuse(cluster, &key, Refusal::BackendNotOwned);
            }
            out.push(ClusterEvent::Apply {
                cluster: cluster.clone(),
                key,
                value: StateValue::Service(svc),
            });
        }
    }

    /// What the guard holds and refused, per peer (the local cluster is not listed).
    pub fn status(&self) -> Vec<PeerTrust> {
        self.clusters
            .iter()
            .filter(|(c, _)| **c != self.local)
            .map(|(c, st)| PeerTrust {
                cluster: c.clone(),
                degraded: st.degraded.iter().copied().collect(),
                refused: st.refused.clone(),
                entries: StateKind::ALL
                    .into_iter()
                    .map(|k| (k, st.count(k)))
                    .collect(),
                bytes: st.bytes,
                pending: st.pending,
                waiting_for_ranges: !self.ranges_ready(c),
                conflicts: self
                    .ownership
                    .conflicts()
                    .iter()
                    .filter(|x| x.claimant == *c || x.holder.as_ref() == Some(c))
                    .cloned()
                    .collect::<Vec<RangeConflict>>(),
            })
            .collect()
    }
}

/// The books of `cluster`, created on first use (no allocation when they exist).
fn state<'a>(
    clusters: &'a mut BTreeMap<ClusterName, Guarded>,
    cluster: &ClusterName,
) -> &'a mut Guarded {
    if !clusters.contains_key(cluster) {
        clusters.insert(cluster.clone(), Guarded::default());
    }
    clusters.get_mut(cluster).expect("just inserted")
}
