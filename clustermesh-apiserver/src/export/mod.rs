//! Exporter: cluster objects → desired keys → etcd, incrementally and without churn.
//!
//! ```text
//!  SourceEvent ──► ClusterState (pods, services, slices, exports, nodes, policies)
//!        │            │ derive (pure, `derive`)       identities: IdentityAllocator (txns)
//!        ▼            ▼
//!   desired: key → JSON ──diff vs written──► dirty keys ──flush──► etcd txns (≤ txn_ops)
//! ```
//!
//! `written` starts as what etcd holds under this cluster's prefixes, so a restart with an
//! unchanged source writes nothing. Nothing is flushed before the source's first full
//! load (`Synced`); after the first full flush the `synced` markers are created.
//! Input that cannot be derived (bad field, colliding IP) is reported and the previous
//! export of that object stays.

pub mod derive;
pub mod metrics;
mod run;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node as K8sNode, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use meshd::keys::{self, Key, StateKey, StateKind};
use meshd::kv::{KvError, KvStore, LeaseId, Op, Txn};
use meshd::model::{
    Capabilities, ClusterConfig, ClusterId, ClusterName, Identity, IpCacheEntry,
    MaxConnectedClusters,
};
use tokio::sync::watch;

pub use self::derive::PodInfo;
pub use self::metrics::ExportMetrics;
pub use self::run::run;
use crate::allocator::{AllocError, AllocatorConfig, IdentityAllocator};
use crate::source::{Object, ObjectKind, ObjectRef, ServiceExport, SourceEvent};

/// Exporter settings.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// The cluster.
    pub cluster: ClusterName,
    /// Its ID.
    pub cluster_id: ClusterId,
    /// The mesh mode.
    pub mode: MaxConnectedClusters,
    /// This replica's name (for identity references).
    pub replica: String,
    /// Heartbeat period (DESIGN: 15 s).
    pub heartbeat_interval: Duration,
    /// Lease TTL of this replica's session.
    pub lease_ttl: Duration,
    /// Identity garbage-collection period.
    pub gc_interval: Duration,
    /// How long an identity stays unreferenced before it is deleted.
    pub gc_grace: Duration,
    /// Operations per etcd transaction (etcd's default limit is 128).
    pub txn_ops: usize,
    /// Capabilities advertised in cluster-config.
    pub capabilities: Capabilities,
}

impl ExportConfig {
    /// Defaults for a cluster: heartbeat 15 s, lease 15 s, GC every 60 s with 5 min grace.
    pub fn new(cluster: ClusterName, cluster_id: ClusterId, mode: MaxConnectedClusters) -> Self {
        Self {
            cluster,
            cluster_id,
            mode,
            replica: "apiserver-0".into(),
            heartbeat_interval: Duration::from_secs(15),
            lease_ttl: Duration::from_secs(15),
            gc_interval: Duration::from_secs(60),
            gc_grace: Duration::from_secs(300),
            txn_ops: 100,
            capabilities: Capabilities {
                synced_canaries: true,
                cached: false,
                service_exports: true,
            },
        }
    }

    /// The cluster-config value this exporter writes.
    pub fn cluster_config(&self) -> ClusterConfig {
        ClusterConfig {
            id: self.cluster_id,
            name: self.cluster.clone(),
            max_connected_clusters: self.mode,
            capabilities: self.capabilities,
        }
    }
}

/// Why exporting failed (store problems; input problems are only reported).
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// etcd failed; retrying helps.
    #[error("export of cluster {cluster}: {step}: {source}")]
    Store {
        /// Cluster.
        cluster: String,
        /// Step.
        step: &'static str,
        /// Cause.
        #[source]
        source: KvError,
    },
    /// Identity allocation failed.
    #[error(transparent)]
    Alloc(#[from] AllocError),
}

/// A source event that could not be applied because the store failed; apply it again
/// after a backoff.
#[derive(Debug)]
pub struct Retry {
    /// The event.
    pub event: SourceEvent,
    /// Why it failed.
    pub error: ExportError,
}

/// What the exporter reports (served by the gRPC API and `/readyz`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportStatus {
    /// The first full export is done.
    pub ready: bool,
    /// The last etcd operation succeeded.
    pub etcd_reachable: bool,
    /// Entries exported per kind (`identities`, `ip`, `nodes`, `services`, `policies`).
    pub counts: BTreeMap<String, u64>,
    /// Kinds whose synced marker exists.
    pub synced: Vec<String>,
    /// The last error (input or store).
    pub last_error: Option<String>,
    /// Errors since start.
    pub errors: u64,
}

type NsName = (String, String);

#[derive(Debug)]
struct PodState {
    info: PodInfo,
    identity: Identity,
    /// IPs this pod owns in the export (collisions are not owned).
    owned: Vec<IpAddr>,
}

#[derive(Debug, Default)]
struct ClusterState {
    pods: HashMap<NsName, PodState>,
    ip_owner: HashMap<IpAddr, NsName>,
    services: HashMap<NsName, Box<Service>>,
    slices: HashMap<NsName, Box<EndpointSlice>>,
    slices_by_service: HashMap<NsName, BTreeSet<String>>,
    exports: HashMap<NsName, ServiceExport>,
    nodes: HashMap<String, Box<K8sNode>>,
}

/// Kinds of keys the exporter owns (identities are written by the allocator).
const OWNED: [&str; 4] = ["ip", "nodes", "services", "policies"];

/// The exporter of one cluster (single owner; see module docs).
#[derive(Debug)]
pub struct Exporter {
    store: Arc<dyn KvStore>,
    cfg: ExportConfig,
    allocator: IdentityAllocator,
    state: ClusterState,
    desired: HashMap<String, (usize, Vec<u8>)>,
    /// Key → hash of the value etcd holds (what was loaded or last written).
    written: HashMap<String, u64>,
    dirty: BTreeSet<String>,
    counts: [u64; OWNED.len()],
    source_synced: bool,
    status: watch::Sender<ExportStatus>,
    metrics: ExportMetrics,
}

/// The ipcache entry of one pod IP.
fn ip_entry(ip: IpAddr, identity: Identity, info: &PodInfo, pod: &NsName) -> IpCacheEntry {
    IpCacheEntry {
        ip,
        prefix_len: if ip.is_ipv4() { 32 } else { 128 },
        identity,
        host_ip: info.host_ip,
        node: info.node.clone(),
        namespace: Some(pod.0.clone()),
        pod: Some(pod.1.clone()),
        named_ports: info.named_ports.clone(),
    }
}

fn nsname(r: &ObjectRef) -> NsName {
    (r.namespace.clone(), r.name.clone())
}

fn meta_nsname(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> NsName {
    (
        m.namespace.clone().unwrap_or_else(|| "default".into()),
        m.name.clone().unwrap_or_default(),
    )
}

impl Exporter {
    /// Loads what etcd holds for this cluster and prepares the allocator on `lease`.
    pub async fn new(
        store: Arc<dyn KvStore>,
        cfg: ExportConfig,
        lease: LeaseId,
        metrics: ExportMetrics,
    ) -> Result<Self, ExportError> {
        let allocator = IdentityAllocator::new(
            store.clone(),
            AllocatorConfig {
                cluster: cfg.cluster.clone(),
                cluster_id: cfg.cluster_id,
                mode: cfg.mode,
                owner: cfg.replica.clone(),
                gc_grace: cfg.gc_grace,
            },
            lease,
        )
        .await?;
        let mut written = HashMap::new();
        for p in Self::owned_prefixes(&cfg.cluster) {
            let all = store
                .list_all(&p, 5000)
                .await
                .map_err(|source| ExportError::Store {
                    cluster: cfg.cluster.to_string(),
                    step: "load existing export",
                    source,
                })?;
            for kv in all.kvs {
                if let Ok(k) = String::from_utf8(kv.key) {
                    written.insert(k, keys::value_hash(&kv.value));
                }
            }
        }
        Ok(Self {
            store,
            cfg,
            allocator,
            state: ClusterState::default(),
            desired: HashMap::new(),
            written,
            dirty: BTreeSet::new(),
            counts: [0; OWNED.len()],
            source_synced: false,
            status: watch::channel(ExportStatus::default()).0,
            metrics,
        })
    }

    fn owned_prefixes(cluster: &ClusterName) -> [String; 4] {
        [
            keys::state_prefix(StateKind::Ip, cluster),
            keys::state_prefix(StateKind::Nodes, cluster),
            keys::state_prefix(StateKind::Services, cluster),
            format!("{}{cluster}/", keys::POLICY_PREFIX),
        ]
    }

    /// Subscribes to status updates.
    pub fn status(&self) -> watch::Receiver<ExportStatus> {
        self.status.subscribe()
    }

    /// The configuration.
    pub fn config(&self) -> &ExportConfig {
        &self.cfg
    }

    /// The allocator (for GC and lease restore).
    pub fn allocator_mut(&mut self) -> &mut IdentityAllocator {
        &mut self.allocator
    }

    /// Whether the source finished its first full load.
    pub fn source_synced(&self) -> bool {
        self.source_synced
    }

    /// Keys waiting to be written.
    pub fn pending(&self) -> usize {
        self.dirty.len()
    }

    /// Exported services (decoded desired values), for the API.
    pub fn services(&self) -> Vec<meshd::model::ClusterService> {
        self.desired
            .values()
            .filter(|(kind, _)| OWNED[*kind] == "services")
            .filter_map(|(_, v)| serde_json::from_slice(v).ok())
            .collect()
    }

    /// Identities in use by this replica, for the API.
    pub fn identities(&self) -> Vec<(Identity, meshd::model::Labels)> {
        let mut seen = HashMap::new();
        for p in self.state.pods.values() {
            seen.entry(p.identity)
                .or_insert_with(|| p.info.labels.clone());
        }
        let mut v: Vec<_> = seen.into_iter().collect();
        v.sort();
        v
    }

    fn report(&self, reason: &str, what: &str, err: &dyn std::fmt::Display) {
        self.metrics.error(reason);
        tracing::warn!(cluster = %self.cfg.cluster, reason, object = what, error = %err, "export problem");
        let msg = format!("{what}: {err}");
        self.status.send_modify(|s| {
            s.errors += 1;
            s.last_error = Some(msg);
        });
    }

    fn set(&mut self, kind: usize, key: String, value: Vec<u8>) {
        match self.desired.get_mut(&key) {
            Some((_, v)) if *v == value => return,
            Some((_, v)) => *v = value,
            None => {
                self.counts[kind] += 1;
                self.desired.insert(key.clone(), (kind, value));
            }
        }
        self.dirty.insert(key);
    }

    fn unset(&mut self, key: String) {
        if let Some((kind, _)) = self.desired.remove(&key) {
            self.counts[kind] -= 1;
            self.dirty.insert(key);
        }
    }

    fn ip_key(&self, ip: IpAddr) -> String {
        Key::State(StateKey::Ip {
            cluster: self.cfg.cluster.clone(),
            ip,
        })
        .to_string()
    }

    /// Allocates (in batches) the identities the pods among `events` will need, so that
    /// applying them one by one does not cost a transaction per new label set.
    pub async fn prepare<'a>(
        &mut self,
        events: impl IntoIterator<Item = &'a SourceEvent>,
    ) -> Result<(), ExportError> {
        let labels: Vec<_> = events
            .into_iter()
            .filter_map(|ev| match ev {
                SourceEvent::Apply(Object::Pod(p)) => derive::pod_labels(p, &self.cfg.cluster).ok(),
                _ => None,
            })
            .filter(|l| self.allocator.lookup(l).is_none())
            .collect();
        if labels.is_empty() {
            return Ok(());
        }
        self.allocator.prefetch(labels.iter()).await?;
        Ok(())
    }

    /// Drops this replica's references to identities no longer used (released or
    /// prepared and not used).
    pub async fn finish_batch(&mut self) -> Result<(), ExportError> {
        self.allocator.sweep().await?;
        Ok(())
    }

    /// Applies one source event to the state and the desired keys. On a store failure
    /// (identity allocation) the event comes back to be retried later.
    pub async fn handle(&mut self, ev: SourceEvent) -> Result<(), Box<Retry>> {
        match ev {
            SourceEvent::Apply(Object::Pod(p)) => {
                let key = meta_nsname(&p.metadata);
                match derive::pod_info(&p, &self.cfg.cluster) {
                    Ok(info) => {
                        if let Err(error) = self.apply_pod(key, info).await {
                            self.metrics.error("allocation");
                            return Err(Box::new(Retry {
                                event: SourceEvent::Apply(Object::Pod(p)),
                                error,
                            }));
                        }
                    }
                    Err(e) => self.report(
                        "invalid-input",
                        &format!("Pod {}/{}", key.0, key.1),
                        &format!("{}: {}", e.field, e.message),
                    ),
                }
            }
            SourceEvent::Apply(obj) => self.apply(obj),
            SourceEvent::Delete(r) => self.delete(&r).await,
            SourceEvent::Synced => {
                if !self.source_synced {
                    self.source_synced = true;
                    // Reconcile: every key etcd holds or we want is compared once.
                    let all: Vec<String> = self
                        .written
                        .keys()
                        .chain(self.desired.keys())
                        .cloned()
                        .collect();
                    self.dirty.extend(all);
                }
            }
            SourceEvent::Error(e) => self.report("invalid-input", &e.location, &e.message),
        }
        Ok(())
    }

    fn apply(&mut self, obj: Object) {
        let r = obj.object_ref();
        match obj {
            // Pods need the allocator; `handle` does them.
            Object::Pod(_) => {}
            Object::Node(n) => match derive::node(&n, &self.cfg.cluster, self.cfg.cluster_id) {
                Ok(node) => {
                    let name = node.name.clone();
                    let k = Key::State(StateKey::Node {
                        cluster: self.cfg.cluster.clone(),
                        name: name.clone(),
                    })
                    .to_string();
                    self.set(1, k, keys::encode(&node));
                    self.state.nodes.insert(name, n);
                }
                Err(e) => self.report(
                    "invalid-input",
                    &r.to_string(),
                    &format!("{}: {}", e.field, e.message),
                ),
            },
            Object::Service(s) => {
                let key = meta_nsname(&s.metadata);
                self.state.services.insert(key.clone(), s);
                self.recompute_service(&key);
            }
            Object::EndpointSlice(s) => {
                let key = meta_nsname(&s.metadata);
                let new_svc = s
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(derive::SERVICE_NAME_LABEL))
                    .map(|n| (key.0.clone(), n.clone()));
                let old_svc = self.remove_slice(&key);
                if let Some(svc) = &new_svc {
                    self.state
                        .slices_by_service
                        .entry(svc.clone())
                        .or_default()
                        .insert(key.1.clone());
                }
                self.state.slices.insert(key, s);
                for svc in old_svc.iter().chain(new_svc.iter()) {
                    self.recompute_service(svc);
                }
            }
            Object::ServiceExport(e) => {
                let key = (e.namespace.clone(), e.name.clone());
                self.state.exports.insert(key.clone(), e);
                self.recompute_service(&key);
            }
            Object::Policy(p) => {
                let k = Key::Policy {
                    cluster: self.cfg.cluster.clone(),
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                }
                .to_string();
                self.set(3, k, keys::encode(&p));
            }
            Object::Namespace(_) => {}
        }
    }

    /// Removes a slice from the indexes; returns the service it belonged to.
    fn remove_slice(&mut self, key: &NsName) -> Option<NsName> {
        let old = self.state.slices.remove(key)?;
        let svc = old
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(derive::SERVICE_NAME_LABEL))
            .map(|n| (key.0.clone(), n.clone()))?;
        if let Some(set) = self.state.slices_by_service.get_mut(&svc) {
            set.remove(&key.1);
            if set.is_empty() {
                self.state.slices_by_service.remove(&svc);
            }
        }
        Some(svc)
    }

    async fn delete(&mut self, r: &ObjectRef) {
        let key = nsname(r);
        match r.kind {
            ObjectKind::Pod => {
                if let Some(old) = self.state.pods.remove(&key) {
                    for ip in &old.owned {
                        self.state.ip_owner.remove(ip);
                        let k = self.ip_key(*ip);
                        self.unset(k);
                    }
                    self.allocator.release(&old.info.labels);
                }
            }
            ObjectKind::Node => {
                if self.state.nodes.remove(&r.name).is_some() {
                    let k = Key::State(StateKey::Node {
                        cluster: self.cfg.cluster.clone(),
                        name: r.name.clone(),
                    })
                    .to_string();
                    self.unset(k);
                }
            }
            ObjectKind::Service => {
                self.state.services.remove(&key);
                self.recompute_service(&key);
            }
            ObjectKind::EndpointSlice => {
                if let Some(svc) = self.remove_slice(&key) {
                    self.recompute_service(&svc);
                }
            }
            ObjectKind::ServiceExport => {
                self.state.exports.remove(&key);
                self.recompute_service(&key);
            }
            ObjectKind::Policy => {
                let k = Key::Policy {
                    cluster: self.cfg.cluster.clone(),
                    namespace: key.0,
                    name: key.1,
                }
                .to_string();
                self.unset(k);
            }
            ObjectKind::Namespace => {}
        }
    }

    async fn apply_pod(&mut self, key: NsName, info: PodInfo) -> Result<(), ExportError> {
        let old = self.state.pods.remove(&key);
        let identity = match &old {
            Some(o) if o.info.labels == info.labels => o.identity,
            _ => {
                let id = self.allocator.acquire(&info.labels).await?;
                if let Some(o) = &old {
                    self.allocator.release(&o.info.labels);
                }
                id
            }
        };
        // Give up IPs the pod no longer has.
        let mut owned = Vec::with_capacity(info.ips.len());
        if let Some(o) = &old {
            for ip in &o.owned {
                if !info.ips.contains(ip) {
                    self.state.ip_owner.remove(ip);
                    let k = self.ip_key(*ip);
                    self.unset(k);
                }
            }
        }
        for ip in &info.ips {
            match self.state.ip_owner.get(ip) {
                Some(owner) if *owner != key => {
                    let msg = format!(
                        "IP {ip} is already used by pod {}/{}; not exported for this pod",
                        owner.0, owner.1
                    );
                    self.report("ip-collision", &format!("Pod {}/{}", key.0, key.1), &msg);
                    continue;
                }
                _ => {}
            }
            self.state.ip_owner.insert(*ip, key.clone());
            owned.push(*ip);
            let k = self.ip_key(*ip);
            self.set(0, k, keys::encode(&ip_entry(*ip, identity, &info, &key)));
        }
        self.state.pods.insert(
            key,
            PodState {
                info,
                identity,
                owned,
            },
        );
        Ok(())
    }

    fn recompute_service(&mut self, key: &NsName) {
        let k = Key::State(StateKey::Service {
            cluster: self.cfg.cluster.clone(),
            namespace: key.0.clone(),
            name: key.1.clone(),
        })
        .to_string();
        let Some(svc) = self.state.services.get(key) else {
            self.unset(k);
            return;
        };
        let export = self.state.exports.get(key);
        if !derive::is_global(svc, export) {
            self.unset(k);
            return;
        }
        let slices = self
            .state
            .slices_by_service
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|s| self.state.slices.get(&(key.0.clone(), s.clone())))
            .map(|b| &**b);
        match derive::cluster_service(svc, slices, export, &self.cfg.cluster, self.cfg.cluster_id) {
            Ok(cs) => {
                let v = keys::encode(&cs);
                self.set(2, k, v);
            }
            Err(e) => self.report(
                "invalid-input",
                &format!("Service {}/{}", key.0, key.1),
                &format!("{}: {}", e.field, e.message),
            ),
        }
    }

    fn store_err(&self, step: &'static str) -> impl FnOnce(KvError) -> ExportError + '_ {
        move |source| ExportError::Store {
            cluster: self.cfg.cluster.to_string(),
            step,
            source,
        }
    }

    async fn timed<T>(&self, f: impl Future<Output = Result<T, KvError>>) -> Result<T, KvError> {
        let t = std::time::Instant::now();
        let r = f.await;
        self.metrics.etcd_latency.observe(t.elapsed().as_secs_f64());
        let ok = r.is_ok();
        self.status.send_if_modified(|s| {
            let changed = s.etcd_reachable != ok;
            s.etcd_reachable = ok;
            changed
        });
        r
    }

    /// Writes every dirty key whose desired value differs from etcd. Returns keys written.
    /// Does nothing before the source's first full load.
    pub async fn flush(&mut self) -> Result<usize, ExportError> {
        if !self.source_synced {
            return Ok(0);
        }
        let mut written = 0;
        while !self.dirty.is_empty() {
            let mut ops = Vec::with_capacity(self.cfg.txn_ops);
            let mut keys_in_txn = Vec::with_capacity(self.cfg.txn_ops);
            while ops.len() < self.cfg.txn_ops {
                let Some(k) = self.dirty.pop_first() else {
                    break;
                };
                let want = self.desired.get(&k).map(|(_, v)| v);
                let have = self.written.get(&k).copied();
                match (want, have) {
                    (Some(w), Some(h)) if keys::value_hash(w) == h => {}
                    (None, None) => {}
                    (Some(w), _) => {
                        ops.push(Op::Put {
                            key: k.clone(),
                            value: w.clone(),
                            lease: None,
                        });
                        keys_in_txn.push(k);
                    }
                    (None, Some(_)) => {
                        ops.push(Op::Delete(k.clone()));
                        keys_in_txn.push(k);
                    }
                }
            }
            if ops.is_empty() {
                continue;
            }
            let n = ops.len();
            let res = self
                .timed(self.store.txn(Txn {
                    success: ops,
                    ..Txn::default()
                }))
                .await;
            if let Err(e) = res {
                // Keep them dirty for the retry.
                self.dirty.extend(keys_in_txn);
                self.metrics.error("etcd");
                return Err(self.store_err("write")(e));
            }
            for k in keys_in_txn {
                match self.desired.get(&k) {
                    Some((_, v)) => {
                        self.written.insert(k, keys::value_hash(v));
                    }
                    None => {
                        self.written.remove(&k);
                    }
                }
            }
            written += n;
            self.metrics.writes.inc_by(n as u64);
        }
        self.publish_counts();
        Ok(written)
    }

    fn publish_counts(&self) {
        let ids = self.allocator.in_use() as u64;
        let mut counts: BTreeMap<String, u64> = OWNED
            .iter()
            .zip(self.counts)
            .map(|(k, n)| ((*k).to_owned(), n))
            .collect();
        counts.insert("identities".into(), ids);
        for (k, n) in &counts {
            self.metrics
                .entries
                .get_or_create(&metrics::KindLabel { kind: k.clone() })
                .set(*n as i64);
        }
        self.metrics.identity_allocations.inc_by(
            self.allocator
                .allocations()
                .saturating_sub(self.metrics.identity_allocations.get()),
        );
        self.status.send_if_modified(|s| {
            let changed = s.counts != counts;
            s.counts = counts;
            changed
        });
    }

    /// Writes cluster-config if it differs from what etcd holds.
    pub async fn write_cluster_config(&self) -> Result<(), ExportError> {
        let key = Key::ClusterConfig(self.cfg.cluster.clone()).to_string();
        let want = keys::encode(&self.cfg.cluster_config());
        let have = self
            .timed(self.store.get(&key))
            .await
            .map_err(self.store_err("read cluster-config"))?;
        if have.map(|kv| kv.value) != Some(want.clone()) {
            self.timed(self.store.put(&key, &want, None))
                .await
                .map_err(self.store_err("write cluster-config"))?;
        }
        Ok(())
    }

    /// Refreshes `mesh/heartbeat`.
    pub async fn heartbeat(&self) -> Result<(), ExportError> {
        let v = keys::encode_time(time::OffsetDateTime::now_utc());
        self.timed(self.store.put(keys::HEARTBEAT, &v, None))
            .await
            .map_err(self.store_err("heartbeat"))?;
        Ok(())
    }

    /// After the first full flush: creates missing synced markers and reports ready.
    pub async fn mark_synced(&self) -> Result<(), ExportError> {
        let now = keys::encode_time(time::OffsetDateTime::now_utc());
        let mut synced = Vec::new();
        for kind in StateKind::ALL {
            let key = Key::Synced {
                cluster: self.cfg.cluster.clone(),
                kind,
            }
            .to_string();
            self.timed(self.store.create(&key, &now, None))
                .await
                .map_err(self.store_err("write synced marker"))?;
            synced.push(kind.as_str().to_owned());
        }
        self.status.send_modify(|s| {
            s.ready = true;
            s.synced = synced;
        });
        Ok(())
    }

    /// Re-references identities under a new lease and re-exports pods whose identity changed.
    pub async fn restore_lease(&mut self, lease: LeaseId) -> Result<(), ExportError> {
        let changed = self.allocator.restore(lease).await?;
        if changed.is_empty() {
            return Ok(());
        }
        let pods: Vec<NsName> = self
            .state
            .pods
            .iter()
            .filter(|(_, p)| changed.contains(&p.info.labels))
            .map(|(k, _)| k.clone())
            .collect();
        for key in pods {
            if let Some(mut p) = self.state.pods.remove(&key) {
                if let Some(id) = self.allocator.lookup(&p.info.labels) {
                    p.identity = id;
                }
                let info = p.info.clone();
                // Re-derive entries with the new identity; references are already held.
                self.state.pods.insert(key.clone(), p);
                self.rewrite_pod_entries(&key, &info);
            }
        }
        Ok(())
    }

    fn rewrite_pod_entries(&mut self, key: &NsName, info: &PodInfo) {
        let Some(p) = self.state.pods.get(key) else {
            return;
        };
        let (identity, owned) = (p.identity, p.owned.clone());
        for ip in owned {
            let k = self.ip_key(ip);
            self.set(0, k, keys::encode(&ip_entry(ip, identity, info, key)));
        }
    }
}
