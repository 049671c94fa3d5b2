//! The syncer: merged view + policy → desired map state → only the differences, batched.
//!
//! ```text
//!  watch<ServicesSnapshot> ─┐ changed keys only (Arc::ptr_eq skips the rest)
//!  watch<IpCacheSnapshot> ──┼─► desired MapState ──diff(dirty keys) vs applied──► Vec<Change>
//!  watch<PolicySnapshot> ───┘         ▲                          │ ordered, ≤ max_batch each
//!  InterfaceResolver (routes) ────────┘ endpoints + attach       ▼
//!                                                       Datapath::apply / attach_interface
//!  ring buffer ─► broadcast<DropEvent> (meshctl observe)   counters ─► watch<DatapathStatus>
//! ```
//!
//! - **Services**: every IPv4 ClusterIP and the ClusterSetIP of a global, non-headless
//!   service × each TCP/UDP service port → the *active* backends (affinity already
//!   applied by the view) on the backend port of the same name. Two services claiming
//!   one VIP:port: the first by namespace/name wins until it goes.
//! - **ipcache**: every IPv4 entry of every cluster → (identity, cluster ID from the
//!   identity's cluster bits).
//! - **Local endpoints**: local-cluster ipcache entries whose host-side interface the
//!   resolver finds on this host. The endpoint id *is* the endpoint's security identity:
//!   selectors match labels, so every endpoint of one identity has the same policy, the
//!   policy map stays per identity, and ids survive a restart without bookkeeping.
//! - **Policy**: not computed here. A policy engine publishes [`PolicySnapshot`]s
//!   (rules keyed by local identity + per-identity enforcement). Until its first
//!   snapshot (generation > 0) the policy map and the endpoints' enforce flags in the
//!   pinned maps are left as they are.
//!
//! **Start.** The syncer writes nothing until the view is complete (agent status ready,
//! or `initial_sync_timeout`); then it reads the pinned maps (`Datapath::snapshot`),
//! takes them as "applied" and writes only what differs from the desired state (no
//! flush): an agent restart leaves established and new connections alone. After a failed
//! write it re-reads the maps and reconciles again.
//!
//! Write order in one round keeps lookups valid: ipcache and policy upserts, then
//! endpoint upserts (after their interface is attached), services; then service,
//! endpoint (then detach), policy and ipcache deletes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use meshd::model::{ClusterName, MaxConnectedClusters};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::iface::{HostInterface, InterfaceResolver};
use super::{
    Backend, Change, Datapath, DatapathError, DatapathMode, Direction, DropEvent, Endpoint,
    MapSnapshot, Planner, PolicyRule, Protocol, ServiceKey, Verdict, VerdictCounters,
};
use crate::runtime::AgentStatus;
use crate::view::{self, IpCacheSnapshot, MergedService, ServicesSnapshot};

/// Default-deny switches of one local identity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Enforcement {
    /// Traffic to endpoints of the identity is denied unless a rule allows it.
    pub ingress: bool,
    /// Traffic from endpoints of the identity is denied unless a rule allows it.
    pub egress: bool,
}

/// What a policy rule does, with an opaque id shown in drop events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyAction {
    /// Allow or deny.
    pub verdict: Verdict,
    /// Opaque rule id.
    pub rule_id: u32,
}

/// The policy engine's output, the syncer's policy input (published through a `watch`).
///
/// `PolicyRule::endpoint_id` is the *local identity* the rule applies to (see the
/// module doc); identity/port/proto 0 are wildcards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicySnapshot {
    /// 0: nothing computed yet (the syncer leaves pinned policy alone); then > 0.
    pub generation: u64,
    /// Enforcement per local identity; an identity not listed enforces nothing.
    pub enforce: BTreeMap<u32, Enforcement>,
    /// Every policy entry.
    pub rules: BTreeMap<PolicyRule, PolicyAction>,
}

/// Syncer settings.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// This cluster (its ipcache entries are the local endpoint candidates).
    pub local: ClusterName,
    /// The mesh mode (cluster ID bits of identities).
    pub mode: MaxConnectedClusters,
    /// Longest wait for a complete view before the first reconcile. Default 60 s.
    pub initial_sync_timeout: Duration,
    /// Interface rescan, counter refresh and retry period. Default 1 s.
    pub rescan_interval: Duration,
    /// Changes per `Datapath::apply` call. Default 4096.
    pub max_batch: usize,
    /// This cluster's ID (the cluster of `host` ipcache entries). Default 0.
    pub local_id: u16,
}

impl SyncConfig {
    /// Defaults for `local` in `mode`.
    pub fn new(local: ClusterName, mode: MaxConnectedClusters) -> Self {
        Self {
            local,
            mode,
            initial_sync_timeout: Duration::from_secs(60),
            rescan_interval: Duration::from_secs(1),
            max_batch: 4096,
            local_id: 0,
        }
    }
}

/// What the datapath reports for status, readiness and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatapathStatus {
    /// `ebpf` or `recording`; `None` before the syncer starts.
    pub mode: Option<DatapathMode>,
    /// Why the recording datapath runs (the kernel's refusal), if it does.
    pub fallback_reason: Option<String>,
    /// Whether the first reconcile against the pinned maps is done.
    pub reconciled: bool,
    /// Service frontends (VIP:port/proto) in the maps.
    pub services: usize,
    /// ipcache prefixes in the maps.
    pub ipcache: usize,
    /// Local endpoints in the maps.
    pub endpoints: usize,
    /// Policy entries in the maps.
    pub policy: usize,
    /// Interfaces with the policy programs attached.
    pub interfaces: Vec<String>,
    /// The last write error, cleared by the next successful round.
    pub last_error: Option<String>,
    /// Per-verdict counters, refreshed every rescan.
    pub counters: VerdictCounters,
}

impl DatapathStatus {
    /// `ebpf`, `recording (<reason>)`, or `none` before the syncer runs.
    pub fn describe(&self) -> String {
        match (self.mode, &self.fallback_reason) {
            (None, _) => "none".to_owned(),
            (Some(DatapathMode::Ebpf), _) => "ebpf".to_owned(),
            (Some(DatapathMode::Recording), Some(r)) => format!("recording ({r})"),
            (Some(DatapathMode::Recording), None) => "recording (requested)".to_owned(),
        }
    }
}

/// Labels of a per-map series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct MapLabels {
    /// `services`, `ipcache`, `endpoints`, `policy`.
    pub map: String,
}

/// Labels of a per-reason drop series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabels {
    /// `policy`, `deny`, `spoof`, `malformed`.
    pub reason: String,
}

/// The syncer's metrics (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct DatapathMetrics {
    /// `mesh_datapath_map_writes_total{map}`: changes written (upserts and deletes).
    pub writes: Family<MapLabels, Counter>,
    /// `mesh_datapath_map_write_errors_total`: failed batches.
    pub errors: Counter,
    /// `mesh_datapath_batches_total`: `Datapath::apply` calls.
    pub batches: Counter,
    /// `mesh_datapath_entries{map}`: entries the syncer keeps in each map.
    pub entries: Family<MapLabels, Gauge>,
    /// `mesh_datapath_drops_total{reason}`: drop events read from the ring buffer.
    pub drops: Family<ReasonLabels, Counter>,
    /// `mesh_datapath_recording`: 1 when nothing is enforced (recording datapath).
    pub recording: Gauge,
}

impl DatapathMetrics {
    /// Registers every series.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "mesh_datapath_map_writes",
            "BPF map changes written by the syncer, per map",
            self.writes.clone(),
        );
        registry.register(
            "mesh_datapath_map_write_errors",
            "Batches of BPF map changes that failed",
            self.errors.clone(),
        );
        registry.register(
            "mesh_datapath_batches",
            "Batches of BPF map changes applied",
            self.batches.clone(),
        );
        registry.register(
            "mesh_datapath_entries",
            "Entries the syncer keeps in each BPF map",
            self.entries.clone(),
        );
        registry.register(
            "mesh_datapath_drops",
            "Packets dropped by the policy programs (ring-buffer events), per reason",
            self.drops.clone(),
        );
        registry.register(
            "mesh_datapath_recording",
            "1 when the agent runs the recording datapath (nothing is enforced)",
            self.recording.clone(),
        );
    }
}

/// The drop reason's short name (`policy`, `deny`, `spoof`, `malformed`).
pub fn reason_name(reason: u8) -> &'static str {
    match u32::from(reason) {
        mesh_ebpf::verdict::DROP_POLICY => "policy",
        mesh_ebpf::verdict::DROP_DENY => "deny",
        mesh_ebpf::verdict::DROP_SPOOF => "spoof",
        mesh_ebpf::verdict::DROP_MALFORMED => "malformed",
        _ => "other",
    }
}

/// The map contents the syncer reasons about (desired or applied).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MapState {
    /// Frontend → backends in slot order.
    pub services: HashMap<ServiceKey, Vec<Backend>>,
    /// Prefix → (identity, cluster ID).
    pub ipcache: HashMap<Ipv4Net, (u32, u16)>,
    /// Local endpoints by IP.
    pub endpoints: HashMap<Ipv4Addr, Endpoint>,
    /// Policy entries.
    pub policy: HashMap<PolicyRule, PolicyAction>,
}

impl MapState {
    /// Reads raw map contents back into the syncer's terms.
    pub fn from_snapshot(s: &MapSnapshot) -> Self {
        let (planner, _) = Planner::from_maps(
            s.services.iter().map(|(k, v)| (*k, *v)),
            s.backends.iter().map(|(k, v)| (*k, *v)),
        );
        let services = planner.services().into_iter().collect();
        let ipcache = s
            .ipcache
            .iter()
            .filter_map(|(k, v)| {
                let prefix =
                    Ipv4Net::new(mesh_ebpf::layout::endpoint_ip(k.address), k.prefixlen as u8)
                        .ok()?;
                Some((prefix, (v.identity, v.cluster_id)))
            })
            .collect();
        let endpoints = s
            .endpoints
            .iter()
            .map(|(k, v)| {
                let ip = mesh_ebpf::layout::endpoint_ip(*k);
                (
                    ip,
                    Endpoint {
                        ip,
                        endpoint_id: v.endpoint_id,
                        identity: v.identity,
                        ifindex: v.ifindex,
                        enforce_ingress: v.flags & mesh_ebpf::EP_F_ENFORCE_INGRESS != 0,
                        enforce_egress: v.flags & mesh_ebpf::EP_F_ENFORCE_EGRESS != 0,
                    },
                )
            })
            .collect();
        let policy = s
            .policy
            .iter()
            .filter_map(|(k, v)| {
                let direction = match k.direction {
                    mesh_ebpf::direction::INGRESS => Direction::Ingress,
                    mesh_ebpf::direction::EGRESS => Direction::Egress,
                    _ => return None,
                };
                let verdict = match v.action {
                    mesh_ebpf::action::ALLOW => Verdict::Allow,
                    mesh_ebpf::action::DENY => Verdict::Deny,
                    _ => return None,
                };
                Some((
                    PolicyRule {
                        endpoint_id: k.endpoint_id,
                        identity: k.identity,
                        port: k.port(),
                        proto: k.proto,
                        direction,
                    },
                    PolicyAction {
                        verdict,
                        rule_id: v.rule_id,
                    },
                ))
            })
            .collect();
        Self {
            services,
            ipcache,
            endpoints,
            policy,
        }
    }
}

/// Keys whose desired value may differ from the applied one.
#[derive(Debug, Default)]
struct Dirty {
    services: HashSet<ServiceKey>,
    ipcache: HashSet<Ipv4Net>,
    endpoints: HashSet<Ipv4Addr>,
    policy: HashSet<PolicyRule>,
}

impl Dirty {
    fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.ipcache.is_empty()
            && self.endpoints.is_empty()
            && self.policy.is_empty()
    }
}

/// Subscriptions the API needs: status and drop events.
#[derive(Debug)]
pub struct SyncHandles {
    /// Datapath status.
    pub status: watch::Receiver<DatapathStatus>,
    /// Drop events as they are read from the ring buffer (lagging readers lose events;
    /// closed when the syncer ends). `resubscribe` for another reader.
    pub drops: broadcast::Receiver<DropEvent>,
    /// The last [`RECENT_DROPS`] drop events, oldest first.
    pub recent: Arc<std::sync::Mutex<std::collections::VecDeque<DropEvent>>>,
}

/// How many drop events the syncer remembers for `meshctl observe` without `--follow`.
pub const RECENT_DROPS: usize = 1024;

impl Clone for SyncHandles {
    fn clone(&self) -> Self {
        Self {
            status: self.status.clone(),
            drops: self.drops.resubscribe(),
            recent: Arc::clone(&self.recent),
        }
    }
}

impl SyncHandles {
    /// The remembered drop events, oldest first, and a receiver of the ones after them.
    pub fn subscribe_drops(&self) -> (Vec<DropEvent>, broadcast::Receiver<DropEvent>) {
        // Subscribing under the lock: no event is in both or in neither.
        let recent = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let rx = self.drops.resubscribe();
        (recent.iter().copied().collect(), rx)
    }
}

impl SyncInputs {
    /// The view's subscriptions, plus the policy engine's output if there is one.
    pub fn from_handles(
        h: &crate::runtime::ViewHandles,
        policy: Option<watch::Receiver<Arc<PolicySnapshot>>>,
    ) -> Self {
        Self {
            services: h.services.clone(),
            ipcache: h.ipcache.clone(),
            status: h.status.clone(),
            policy,
            nodes: Some(h.nodes.clone()),
        }
    }
}

/// The inputs of [`Syncer::run`].
#[derive(Debug)]
pub struct SyncInputs {
    /// Merged services.
    pub services: watch::Receiver<Arc<ServicesSnapshot>>,
    /// Merged ipcache.
    pub ipcache: watch::Receiver<Arc<IpCacheSnapshot>>,
    /// The agent's status (the first reconcile waits for `ready`).
    pub status: watch::Receiver<AgentStatus>,
    /// The policy engine's output; `None`: policy is not managed by this agent yet.
    pub policy: Option<watch::Receiver<Arc<PolicySnapshot>>>,
    /// Nodes of every cluster (their addresses get the `host` / `remote-node`
    /// identities); `None`: no node entries.
    pub nodes: Option<watch::Receiver<Arc<crate::view::NodesSnapshot>>>,
}

/// Keeps a `Datapath` equal to the view (see the module doc).
#[derive(Debug)]
pub struct Syncer {
    dp: Box<dyn Datapath>,
    resolver: Box<dyn InterfaceResolver>,
    cfg: SyncConfig,
    metrics: DatapathMetrics,
    seen_services: Arc<ServicesSnapshot>,
    seen_ipcache: Arc<IpCacheSnapshot>,
    /// `None` until the policy engine's first snapshot: policy is left as pinned.
    seen_policy: Option<Arc<PolicySnapshot>>,
    claims: HashMap<ServiceKey, BTreeMap<view::ServiceKey, Vec<Backend>>>,
    contrib: HashMap<view::ServiceKey, Vec<ServiceKey>>,
    /// Local endpoint candidates: IP → identity.
    local_ips: HashMap<Ipv4Addr, u32>,
    /// ipcache entries of the view's endpoints (they win over node entries).
    view_ipcache: HashMap<Ipv4Net, (u32, u16)>,
    /// ipcache entries of node addresses (`host`, `remote-node`; see `reserved`).
    node_ipcache: HashMap<Ipv4Net, (u32, u16)>,
    seen_nodes: Arc<crate::view::NodesSnapshot>,
    host_addresses: std::collections::HashSet<Ipv4Addr>,
    interfaces: HashMap<Ipv4Addr, HostInterface>,
    desired: MapState,
    applied: MapState,
    dirty: Dirty,
    reconciled: bool,
    needs_resync: bool,
    status_tx: watch::Sender<DatapathStatus>,
    drops_tx: broadcast::Sender<DropEvent>,
    recent: Arc<std::sync::Mutex<std::collections::VecDeque<DropEvent>>>,
    scratch: Vec<Change>,
}

impl Syncer {
    /// A syncer over `dp`; `fallback` is why a recording datapath runs instead of eBPF.
    pub fn new(
        dp: Box<dyn Datapath>,
        fallback: Option<String>,
        resolver: Box<dyn InterfaceResolver>,
        cfg: SyncConfig,
        metrics: DatapathMetrics,
    ) -> Self {
        let mode = dp.mode();
        metrics
            .recording
            .set(i64::from(mode == DatapathMode::Recording));
        let (status_tx, _) = watch::channel(DatapathStatus {
            mode: Some(mode),
            fallback_reason: fallback,
            interfaces: dp.attached_interfaces(),
            ..DatapathStatus::default()
        });
        let (drops_tx, _) = broadcast::channel(4096);
        Self {
            dp,
            resolver,
            cfg,
            metrics,
            seen_services: Arc::default(),
            seen_ipcache: Arc::default(),
            seen_policy: None,
            claims: HashMap::new(),
            contrib: HashMap::new(),
            local_ips: HashMap::new(),
            view_ipcache: HashMap::new(),
            node_ipcache: HashMap::new(),
            seen_nodes: Arc::default(),
            host_addresses: std::collections::HashSet::new(),
            interfaces: HashMap::new(),
            desired: MapState::default(),
            applied: MapState::default(),
            dirty: Dirty::default(),
            reconciled: false,
            needs_resync: false,
            status_tx,
            drops_tx,
            recent: Arc::default(),
            scratch: Vec::new(),
        }
    }

    /// Status and drop-event subscriptions.
    pub fn handles(&self) -> SyncHandles {
        SyncHandles {
            status: self.status_tx.subscribe(),
            drops: self.drops_tx.subscribe(),
            recent: Arc::clone(&self.recent),
        }
    }

    /// The datapath (tests and status).
    pub fn datapath(&self) -> &dyn Datapath {
        &*self.dp
    }

    /// The desired state computed so far.
    pub fn desired(&self) -> &MapState {
        &self.desired
    }

    /// Consumes a services snapshot: only keys whose `Arc` changed are recomputed.
    pub fn update_services(&mut self, new: Arc<ServicesSnapshot>) {
        let old = std::mem::replace(&mut self.seen_services, new);
        let new = Arc::clone(&self.seen_services);
        let mut changed: Vec<view::ServiceKey> = Vec::new();
        merge_join(&old.entries, &new.entries, |k| changed.push(k.clone()));
        for k in changed {
            self.recompute_service(&k, new.entries.get(&k).map(|s| &**s));
        }
    }

    fn recompute_service(&mut self, vk: &view::ServiceKey, svc: Option<&MergedService>) {
        for fk in self.contrib.remove(vk).unwrap_or_default() {
            if let Some(c) = self.claims.get_mut(&fk) {
                c.remove(vk);
                if c.is_empty() {
                    self.claims.remove(&fk);
                }
            }
            self.refresh_service(fk);
        }
        let Some(svc) = svc else { return };
        let entries = frontends(svc);
        let keys: Vec<ServiceKey> = entries.iter().map(|(k, _)| *k).collect();
        for (fk, backends) in entries {
            self.claims
                .entry(fk)
                .or_default()
                .insert(vk.clone(), backends);
            self.refresh_service(fk);
        }
        if !keys.is_empty() {
            self.contrib.insert(vk.clone(), keys);
        }
    }

    fn refresh_service(&mut self, fk: ServiceKey) {
        match self.claims.get(&fk).and_then(|c| c.values().next()) {
            Some(b) => {
                if self.desired.services.get(&fk) != Some(b) {
                    self.desired.services.insert(fk, b.clone());
                }
            }
            None => {
                self.desired.services.remove(&fk);
            }
        }
        self.dirty.services.insert(fk);
    }

    /// Consumes an ipcache snapshot: changed IPs update the ipcache and the endpoints.
    pub fn update_ipcache(&mut self, new: Arc<IpCacheSnapshot>) {
        let old = std::mem::replace(&mut self.seen_ipcache, new);
        let new = Arc::clone(&self.seen_ipcache);
        let mut changed: Vec<IpAddr> = Vec::new();
        merge_join(&old.entries, &new.entries, |k| changed.push(*k));
        for ip in changed {
            let IpAddr::V4(v4) = ip else { continue };
            if let Some(e) = old.entries.get(&ip)
                && let Ok(p) = Ipv4Net::new(v4, e.value.prefix_len)
            {
                self.view_ipcache.remove(&p);
                self.refresh_prefix(p);
            }
            self.local_ips.remove(&v4);
            if let Some(e) = new.entries.get(&ip) {
                let Ok(prefix) = Ipv4Net::new(v4, e.value.prefix_len) else {
                    continue;
                };
                let identity = e.value.identity.get();
                let cluster_id =
                    u16::try_from(e.value.identity.cluster_id(self.cfg.mode)).unwrap_or(0);
                self.view_ipcache.insert(prefix, (identity, cluster_id));
                self.refresh_prefix(prefix);
                if e.cluster == self.cfg.local && e.value.prefix_len == 32 {
                    self.local_ips.insert(v4, identity);
                }
            }
            self.refresh_endpoint(v4);
        }
    }

    /// The desired ipcache entry of `p`: the view's endpoint, else a node's reserved one.
    fn refresh_prefix(&mut self, p: Ipv4Net) {
        match self
            .view_ipcache
            .get(&p)
            .or_else(|| self.node_ipcache.get(&p))
        {
            Some(v) => self.desired.ipcache.insert(p, *v),
            None => self.desired.ipcache.remove(&p),
        };
        self.dirty.ipcache.insert(p);
    }

    /// Consumes a nodes snapshot: node addresses get `remote-node` (or `host`).
    pub fn update_nodes(&mut self, new: Arc<crate::view::NodesSnapshot>) {
        self.seen_nodes = new;
        self.refresh_node_entries();
    }

    fn refresh_node_entries(&mut self) {
        let now = super::reserved::node_entries(
            &self.seen_nodes,
            &self.host_addresses,
            self.cfg.local_id,
        );
        let old = std::mem::replace(&mut self.node_ipcache, now);
        let mut changed: Vec<Ipv4Net> = old
            .iter()
            .filter(|(p, v)| self.node_ipcache.get(*p) != Some(*v))
            .map(|(p, _)| *p)
            .collect();
        changed.extend(
            self.node_ipcache
                .keys()
                .filter(|p| !old.contains_key(*p))
                .copied(),
        );
        for p in changed {
            self.refresh_prefix(p);
        }
    }

    /// Consumes a policy snapshot (generation 0 is ignored: nothing computed yet).
    pub fn update_policy(&mut self, new: Arc<PolicySnapshot>) {
        if new.generation == 0 {
            return;
        }
        let keep = Arc::clone(&new);
        let old = self.seen_policy.replace(new);
        let new: &PolicySnapshot = &keep;
        let managed_before = old.is_some();
        let old = old.unwrap_or_default();
        if managed_before {
            merge_join_eq(&old.rules, &new.rules, |k| {
                self.dirty.policy.insert(*k);
            });
        } else {
            // Taking over from the pinned state: compare everything.
            self.dirty
                .policy
                .extend(self.applied.policy.keys().copied());
            self.dirty.policy.extend(new.rules.keys().copied());
        }
        self.desired.policy = new.rules.iter().map(|(k, v)| (*k, *v)).collect();
        let ips: Vec<Ipv4Addr> = self.local_ips.keys().copied().collect();
        for ip in ips {
            self.refresh_endpoint(ip);
        }
    }

    /// Re-reads where endpoint IPs live; endpoints that gained, lost or moved their
    /// interface are updated.
    pub fn rescan_interfaces(&mut self) {
        let host = self.resolver.host_addresses();
        if host != self.host_addresses {
            self.host_addresses = host;
            self.refresh_node_entries();
        }
        let now = self.resolver.scan();
        let mut touched: Vec<Ipv4Addr> = Vec::new();
        for ip in self.local_ips.keys() {
            if now.get(ip) != self.interfaces.get(ip) {
                touched.push(*ip);
            }
        }
        self.interfaces = now;
        for ip in touched {
            self.refresh_endpoint(ip);
        }
    }

    fn refresh_endpoint(&mut self, ip: Ipv4Addr) {
        self.dirty.endpoints.insert(ip);
        let (Some(identity), Some(iface)) = (self.local_ips.get(&ip), self.interfaces.get(&ip))
        else {
            self.desired.endpoints.remove(&ip);
            return;
        };
        let enforce = match &self.seen_policy {
            Some(p) => p.enforce.get(identity).copied().unwrap_or_default(),
            // Policy not managed yet: keep what the pinned maps say.
            None => self
                .applied
                .endpoints
                .get(&ip)
                .map(|e| Enforcement {
                    ingress: e.enforce_ingress,
                    egress: e.enforce_egress,
                })
                .unwrap_or_default(),
        };
        self.desired.endpoints.insert(
            ip,
            Endpoint {
                ip,
                endpoint_id: *identity,
                identity: *identity,
                ifindex: iface.ifindex,
                enforce_ingress: enforce.ingress,
                enforce_egress: enforce.egress,
            },
        );
    }

    /// Takes the maps as they are (pinned state after a restart, or after a failed
    /// write) as the applied state and writes only what differs from the desired state.
    pub fn reconcile(&mut self) -> Result<usize, DatapathError> {
        let snap = self.dp.snapshot()?;
        self.applied = MapState::from_snapshot(&snap);
        // Endpoint flags kept from the pinned maps while policy is not managed.
        let ips: Vec<Ipv4Addr> = self.local_ips.keys().copied().collect();
        for ip in ips {
            self.refresh_endpoint(ip);
        }
        let d = &mut self.dirty;
        d.services.extend(self.applied.services.keys().copied());
        d.services.extend(self.desired.services.keys().copied());
        d.ipcache.extend(self.applied.ipcache.keys().copied());
        d.ipcache.extend(self.desired.ipcache.keys().copied());
        d.endpoints.extend(self.applied.endpoints.keys().copied());
        d.endpoints.extend(self.desired.endpoints.keys().copied());
        if self.seen_policy.is_some() {
            d.policy.extend(self.applied.policy.keys().copied());
            d.policy.extend(self.desired.policy.keys().copied());
        }
        self.needs_resync = false;
        let n = self.flush()?;
        if !self.reconciled {
            info!(
                changes = n,
                services = self.applied.services.len(),
                ipcache = self.applied.ipcache.len(),
                endpoints = self.applied.endpoints.len(),
                "datapath reconciled against the pinned maps"
            );
        }
        self.reconciled = true;
        self.publish_status(None);
        Ok(n)
    }

    /// Writes the differences of the dirty keys; returns how many changes were written.
    pub fn flush(&mut self) -> Result<usize, DatapathError> {
        if self.dirty.is_empty() {
            return Ok(0);
        }
        let dirty = std::mem::take(&mut self.dirty);
        let mut changes = std::mem::take(&mut self.scratch);
        changes.clear();
        let policy_managed = self.seen_policy.is_some();

        // Upserts first: ipcache, policy, endpoints, services.
        for p in &dirty.ipcache {
            if let Some(v) = self.desired.ipcache.get(p)
                && self.applied.ipcache.get(p) != Some(v)
            {
                changes.push(Change::UpsertIpcache {
                    prefix: *p,
                    identity: v.0,
                    cluster_id: v.1,
                });
            }
        }
        if policy_managed {
            for r in &dirty.policy {
                if let Some(a) = self.desired.policy.get(r)
                    && self.applied.policy.get(r) != Some(a)
                {
                    changes.push(Change::UpsertPolicy {
                        rule: *r,
                        verdict: a.verdict,
                        rule_id: a.rule_id,
                    });
                }
            }
        }
        let mut attach: BTreeSet<&str> = BTreeSet::new();
        for ip in &dirty.endpoints {
            if let Some(e) = self.desired.endpoints.get(ip) {
                if let Some(i) = self.interfaces.get(ip) {
                    attach.insert(&i.name);
                }
                if self.applied.endpoints.get(ip) != Some(e) {
                    changes.push(Change::UpsertEndpoint(*e));
                }
            }
        }
        let upsert_end = changes.len();
        for k in &dirty.services {
            match (self.desired.services.get(k), self.applied.services.get(k)) {
                (Some(d), a) if a != Some(d) => changes.push(Change::UpsertService {
                    key: *k,
                    backends: d.clone(),
                }),
                (None, Some(_)) => changes.push(Change::DeleteService(*k)),
                _ => {}
            }
        }
        let mut removed_endpoints = false;
        for ip in &dirty.endpoints {
            if !self.desired.endpoints.contains_key(ip) && self.applied.endpoints.contains_key(ip) {
                changes.push(Change::DeleteEndpoint(*ip));
                removed_endpoints = true;
            }
        }
        if policy_managed {
            for r in &dirty.policy {
                if !self.desired.policy.contains_key(r) && self.applied.policy.contains_key(r) {
                    changes.push(Change::DeletePolicy(*r));
                }
            }
        }
        for p in &dirty.ipcache {
            if !self.desired.ipcache.contains_key(p) && self.applied.ipcache.contains_key(p) {
                changes.push(Change::DeleteIpcache(*p));
            }
        }

        // Interfaces first (the programs must be there when the endpoint entry is).
        let mut result = Ok(());
        let attached: BTreeSet<String> = self.dp.attached_interfaces().into_iter().collect();
        for name in attach {
            if !attached.contains(name)
                && let Err(e) = self.dp.attach_interface(name)
            {
                warn!(interface = name, error = %e, "attaching the policy programs");
                result = Err(e);
            }
        }
        let (up, down) = changes.split_at(upsert_end);
        let n = changes.len();
        if result.is_ok() {
            result = self
                .apply_batches(up)
                .and_then(|()| self.apply_batches(down));
        }
        if result.is_ok() && (removed_endpoints || !dirty.endpoints.is_empty()) {
            // Detach interfaces no endpoint uses any more.
            let used: HashSet<&str> = self
                .desired
                .endpoints
                .keys()
                .filter_map(|ip| self.interfaces.get(ip).map(|i| i.name.as_str()))
                .collect();
            for name in self.dp.attached_interfaces() {
                if !used.contains(name.as_str())
                    && let Err(e) = self.dp.detach_interface(&name)
                {
                    warn!(interface = %name, error = %e, "detaching the policy programs");
                }
            }
        }
        changes.clear();
        self.scratch = changes;
        match result {
            Ok(()) => {
                self.publish_status(None);
                Ok(n)
            }
            Err(e) => {
                self.metrics.errors.inc();
                self.needs_resync = true;
                self.publish_status(Some(e.to_string()));
                Err(e)
            }
        }
    }

    fn apply_batches(&mut self, changes: &[Change]) -> Result<(), DatapathError> {
        for chunk in changes.chunks(self.cfg.max_batch.max(1)) {
            self.metrics.batches.inc();
            self.dp.apply(chunk)?;
            for c in chunk {
                self.record_applied(c);
            }
        }
        Ok(())
    }

    fn record_applied(&mut self, c: &Change) {
        let map = match c {
            Change::UpsertService { key, backends } => {
                self.applied.services.insert(*key, backends.clone());
                "services"
            }
            Change::DeleteService(k) => {
                self.applied.services.remove(k);
                "services"
            }
            Change::UpsertIpcache {
                prefix,
                identity,
                cluster_id,
            } => {
                self.applied
                    .ipcache
                    .insert(*prefix, (*identity, *cluster_id));
                "ipcache"
            }
            Change::DeleteIpcache(p) => {
                self.applied.ipcache.remove(p);
                "ipcache"
            }
            Change::UpsertEndpoint(e) => {
                self.applied.endpoints.insert(e.ip, *e);
                "endpoints"
            }
            Change::DeleteEndpoint(ip) => {
                self.applied.endpoints.remove(ip);
                "endpoints"
            }
            Change::UpsertPolicy {
                rule,
                verdict,
                rule_id,
            } => {
                self.applied.policy.insert(
                    *rule,
                    PolicyAction {
                        verdict: *verdict,
                        rule_id: *rule_id,
                    },
                );
                "policy"
            }
            Change::DeletePolicy(r) => {
                self.applied.policy.remove(r);
                "policy"
            }
        };
        self.metrics
            .writes
            .get_or_create(&MapLabels { map: map.into() })
            .inc();
    }

    fn publish_status(&self, error: Option<String>) {
        let a = &self.applied;
        for (map, n) in [
            ("services", a.services.len()),
            ("ipcache", a.ipcache.len()),
            ("endpoints", a.endpoints.len()),
            ("policy", a.policy.len()),
        ] {
            self.metrics
                .entries
                .get_or_create(&MapLabels { map: map.into() })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let interfaces = self.dp.attached_interfaces();
        let counters = self.dp.counters().unwrap_or_default();
        self.status_tx.send_if_modified(|s| {
            let next = DatapathStatus {
                mode: s.mode,
                fallback_reason: s.fallback_reason.clone(),
                reconciled: self.reconciled,
                services: a.services.len(),
                ipcache: a.ipcache.len(),
                endpoints: a.endpoints.len(),
                policy: a.policy.len(),
                interfaces,
                last_error: error,
                counters,
            };
            let changed = *s != next;
            *s = next;
            changed
        });
    }

    /// Reads queued drop events and hands them to subscribers.
    pub fn pump_drops(&mut self) -> usize {
        let events = self.dp.take_drop_events();
        if events.is_empty() {
            return 0;
        }
        let mut recent = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for ev in &events {
            if recent.len() == RECENT_DROPS {
                recent.pop_front();
            }
            recent.push_back(*ev);
            self.metrics
                .drops
                .get_or_create(&ReasonLabels {
                    reason: reason_name(ev.reason).into(),
                })
                .inc();
            // No subscriber is fine.
            let _ = self.drops_tx.send(*ev);
        }
        events.len()
    }

    /// Runs until `shutdown` or until the view's senders go away: waits for a complete
    /// view (or `initial_sync_timeout`), reconciles, then follows every change.
    pub async fn run(mut self, mut inputs: SyncInputs, shutdown: CancellationToken) {
        let deadline = tokio::time::Instant::now() + self.cfg.initial_sync_timeout;
        loop {
            if inputs.status.borrow_and_update().ready {
                break;
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(deadline) => {
                    warn!(timeout = ?self.cfg.initial_sync_timeout,
                        "view not complete yet: reconciling the datapath with what is known");
                    break;
                }
                r = inputs.status.changed() => if r.is_err() { return },
            }
        }
        self.update_services(inputs.services.borrow_and_update().clone());
        self.update_ipcache(inputs.ipcache.borrow_and_update().clone());
        if let Some(n) = &mut inputs.nodes {
            let snap = n.borrow_and_update().clone();
            self.update_nodes(snap);
        }
        if let Some(p) = &mut inputs.policy {
            let snap = p.borrow_and_update().clone();
            self.update_policy(snap);
        }
        self.rescan_interfaces();
        if let Err(e) = self.reconcile() {
            warn!(error = %e, "reconciling the datapath; retrying");
        }

        let drop_fd = self.drop_fd();
        let mut tick = tokio::time::interval(self.cfg.rescan_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let drops_ready = async {
                match &drop_fd {
                    Some(fd) => fd.readable().await.map(|mut g| g.clear_ready()).is_ok(),
                    None => std::future::pending().await,
                }
            };
            let policy_changed = async {
                match &mut inputs.policy {
                    Some(p) => p.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let nodes_changed = async {
                match &mut inputs.nodes {
                    Some(n) => n.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                r = inputs.services.changed() => {
                    if r.is_err() { break }
                    let s = inputs.services.borrow_and_update().clone();
                    self.update_services(s);
                }
                r = inputs.ipcache.changed() => {
                    if r.is_err() { break }
                    let s = inputs.ipcache.borrow_and_update().clone();
                    self.update_ipcache(s);
                }
                ok = nodes_changed => {
                    if !ok {
                        inputs.nodes = None;
                    } else if let Some(n) = &mut inputs.nodes {
                        let s = n.borrow_and_update().clone();
                        self.update_nodes(s);
                    }
                }
                ok = policy_changed => {
                    if ok {
                        if let Some(p) = &mut inputs.policy {
                            let s = p.borrow_and_update().clone();
                            self.update_policy(s);
                        }
                    } else {
                        inputs.policy = None;
                    }
                }
                _ = drops_ready => {
                    self.pump_drops();
                    continue;
                }
                _ = tick.tick() => {
                    self.pump_drops();
                    self.rescan_interfaces();
                    if self.needs_resync {
                        if let Err(e) = self.reconcile() {
                            warn!(error = %e, "reconciling the datapath after an error; retrying");
                        }
                        continue;
                    }
                    // Counters in status.
                    self.publish_status(None);
                }
            }
            if self.needs_resync {
                continue;
            }
            match self.flush() {
                Ok(0) => {}
                Ok(n) => debug!(changes = n, "datapath updated"),
                Err(e) => warn!(error = %e, "writing the datapath; re-reading the maps next tick"),
            }
        }
    }

    fn drop_fd(&self) -> Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
        let fd = self.dp.drop_events_fd()?.try_clone_to_owned().ok()?;
        // Deprecated for types whose fd can change under the reactor; an `OwnedFd` owns
        // its descriptor for its whole life, and the safe replacement needs `unsafe`.
        #[allow(deprecated)]
        tokio::io::unix::AsyncFd::with_interest(fd, tokio::io::Interest::READABLE).ok()
    }
}

/// Calls `f` for every key present in only one map or whose values are different `Arc`s.
fn merge_join<K: Ord, V>(
    old: &BTreeMap<K, Arc<V>>,
    new: &BTreeMap<K, Arc<V>>,
    mut f: impl FnMut(&K),
) {
    let (mut a, mut b) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => return,
            (Some((ka, _)), None) => {
                f(ka);
                a.next();
            }
            (None, Some((kb, _))) => {
                f(kb);
                b.next();
            }
            (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    f(ka);
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    f(kb);
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if !Arc::ptr_eq(va, vb) {
                        f(kb);
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
}

/// Calls `f` for every key present in only one map or with different values.
fn merge_join_eq<K: Ord, V: PartialEq>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    mut f: impl FnMut(&K),
) {
    for (k, v) in old {
        if new.get(k) != Some(v) {
            f(k);
        }
    }
    for k in new.keys() {
        if !old.contains_key(k) {
            f(k);
        }
    }
}

/// The frontends of a merged service with their backends (module doc).
pub fn frontends(svc: &MergedService) -> Vec<(ServiceKey, Vec<Backend>)> {
    if svc.headless {
        return Vec::new();
    }
    let vips: Vec<Ipv4Addr> = svc
        .frontends_local
        .iter()
        .chain(svc.clusterset_ip.iter())
        .filter_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
        .collect();
    let mut out = Vec::new();
    for p in &svc.ports {
        let proto = match p.protocol {
            meshd::model::Protocol::Tcp => Protocol::Tcp,
            meshd::model::Protocol::Udp => Protocol::Udp,
            meshd::model::Protocol::Sctp => continue,
        };
        let mut backends: Vec<Backend> = Vec::new();
        for b in svc.active() {
            let IpAddr::V4(ip) = b.ip else { continue };
            let port = b
                .ports
                .iter()
                .find(|bp| bp.protocol == p.protocol && bp.name == p.name)
                .or_else(|| {
                    // An unnamed single port: the backend's only port of the protocol.
                    let mut same = b.ports.iter().filter(|bp| bp.protocol == p.protocol);
                    match (p.name.is_empty(), same.next(), same.next()) {
                        (true, Some(only), None) => Some(only),
                        _ => None,
                    }
                });
            if let Some(bp) = port {
                let be = Backend { ip, port: bp.port };
                if !backends.contains(&be) {
                    backends.push(be);
                }
            }
        }
        for vip in &vips {
            out.push((
                ServiceKey {
                    vip: *vip,
                    port: p.port,
                    proto,
                },
                backends.clone(),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests;
