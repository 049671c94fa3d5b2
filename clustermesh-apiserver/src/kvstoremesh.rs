//! kvstoremesh: mirrors every peer's exported state into the local etcd's
//! `mesh/cache/...`, so agents of this cluster read one local etcd and each peer's etcd
//! serves one watcher per cluster instead of one per node.
//!
//! ```text
//!  peer etcd ──RemoteCluster (Direct)──► ClusterEvent ──► CacheWriter ──► local etcd
//!                                                          mesh/cache/<kind>/v1/<peer>/…
//!                                                          mesh/cache/cluster-config/<peer>
//!                                                          mesh/cache/synced/<peer>/<kind>
//!                                                          mesh/cache/heartbeat/<peer>
//! ```
//!
//! The writer remembers a hash of every value it wrote (loaded from the cache at start),
//! so a reconnect or restart rewrites nothing that did not change; at each `InitDone` it
//! deletes the cache keys of that peer and kind that the new list did not contain, then
//! creates the cache's synced marker. `Drain` deletes everything of the peer.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::FutureExt;
use meshd::events::ClusterEvent;
use meshd::keys::{self, Key, StateKind, StateValue};
use meshd::kv::{KvError, KvStore, Op, Txn};
use meshd::model::ClusterName;
use tokio::sync::mpsc;

/// Events written per batch (bounds latency under a burst).
const MAX_BATCH: usize = 5000;
/// Operations per transaction.
const TXN_OPS: usize = 100;

/// Writes cluster events of peers into the local etcd cache (single owner).
#[derive(Debug)]
pub struct CacheWriter {
    store: Arc<dyn KvStore>,
    /// Cache key → hash of the value written.
    written: HashMap<String, u64>,
    /// Keys per (peer, kind) currently in the cache.
    present: HashMap<(ClusterName, StateKind), HashSet<String>>,
    /// Keys applied since the last `Init` per (peer, kind).
    seen: HashMap<(ClusterName, StateKind), HashSet<String>>,
    ops: Vec<Op>,
    /// Position in `ops` of the pending operation on each key (a later change to the
    /// same key replaces it: etcd refuses a transaction naming a key twice).
    op_index: HashMap<String, usize>,
}

impl CacheWriter {
    /// Loads what the cache holds.
    pub async fn new(store: Arc<dyn KvStore>) -> Result<Self, KvError> {
        let all = store.list_all(keys::CACHE_PREFIX, 5000).await?;
        let mut w = Self {
            store,
            written: HashMap::new(),
            present: HashMap::new(),
            seen: HashMap::new(),
            ops: Vec::new(),
            op_index: HashMap::new(),
        };
        for kv in all.kvs {
            let Ok(k) = String::from_utf8(kv.key) else {
                continue;
            };
            if let Ok(Key::Cache(sk)) = Key::parse(&k) {
                w.present
                    .entry((sk.cluster().clone(), sk.kind()))
                    .or_default()
                    .insert(k.clone());
            }
            w.written.insert(k, keys::value_hash(&kv.value));
        }
        Ok(w)
    }

    fn put(&mut self, key: String, value: Vec<u8>) {
        let h = keys::value_hash(&value);
        if self.written.get(&key) == Some(&h) {
            return;
        }
        self.written.insert(key.clone(), h);
        self.push(
            key.clone(),
            Op::Put {
                key,
                value,
                lease: None,
            },
        );
    }

    fn delete(&mut self, key: String) {
        if self.written.remove(&key).is_some() {
            self.push(key.clone(), Op::Delete(key));
        }
    }

    fn push(&mut self, key: String, op: Op) {
        match self.op_index.get(&key) {
            Some(&i) => self.ops[i] = op,
            None => {
                self.op_index.insert(key, self.ops.len());
                self.ops.push(op);
            }
        }
    }

    /// Applies one event to the pending writes.
    pub fn apply(&mut self, ev: ClusterEvent) {
        match ev {
            ClusterEvent::Config { cluster, config } => {
                self.put(
                    Key::CacheClusterConfig(cluster).to_string(),
                    keys::encode(&config),
                );
            }
            ClusterEvent::Init { cluster, kind } => {
                self.seen.insert((cluster, kind), HashSet::new());
            }
            ClusterEvent::Apply {
                cluster,
                key,
                value,
            } => {
                let id = (cluster, key.kind());
                let k = Key::Cache(key).to_string();
                let v = match &value {
                    StateValue::Identity(e) => keys::encode(e),
                    StateValue::Ip(e) => keys::encode(e),
                    StateValue::Node(e) => keys::encode(e),
                    StateValue::Service(e) => keys::encode(e),
                };
                if let Some(seen) = self.seen.get_mut(&id) {
                    seen.insert(k.clone());
                }
                self.present.entry(id).or_default().insert(k.clone());
                self.put(k, v);
            }
            ClusterEvent::Delete { cluster, key } => {
                let id = (cluster, key.kind());
                let k = Key::Cache(key).to_string();
                if let Some(p) = self.present.get_mut(&id) {
                    p.remove(&k);
                }
                if let Some(s) = self.seen.get_mut(&id) {
                    s.remove(&k);
                }
                self.delete(k);
            }
            ClusterEvent::InitDone { cluster, kind } => {
                let id = (cluster.clone(), kind);
                let seen = self.seen.remove(&id).unwrap_or_default();
                let stale: Vec<String> = self
                    .present
                    .get(&id)
                    .map(|p| p.difference(&seen).cloned().collect())
                    .unwrap_or_default();
                for k in stale {
                    self.delete(k);
                }
                self.present.insert(id, seen);
                let marker = Key::CacheSynced { cluster, kind }.to_string();
                if !self.written.contains_key(&marker) {
                    let now = keys::encode_time(time::OffsetDateTime::now_utc());
                    self.put(marker, now);
                }
            }
            ClusterEvent::Drain { cluster } => self.drain(&cluster),
        }
    }

    fn drain(&mut self, cluster: &ClusterName) {
        for kind in StateKind::ALL {
            let id = (cluster.clone(), kind);
            self.seen.remove(&id);
            for k in self.present.remove(&id).unwrap_or_default() {
                self.delete(k);
            }
            self.delete(
                Key::CacheSynced {
                    cluster: cluster.clone(),
                    kind,
                }
                .to_string(),
            );
        }
        self.delete(Key::CacheClusterConfig(cluster.clone()).to_string());
        self.delete(Key::CacheHeartbeat(cluster.clone()).to_string());
    }

    /// Mirrors a peer's heartbeat value.
    pub fn heartbeat(&mut self, cluster: &ClusterName, at: time::OffsetDateTime) {
        self.put(
            Key::CacheHeartbeat(cluster.clone()).to_string(),
            keys::encode_time(at),
        );
    }

    /// Writes pending operations in transactions. On error the unsent operations stay
    /// pending (puts and deletes are idempotent, so retrying is safe).
    pub async fn flush(&mut self) -> Result<usize, KvError> {
        let mut sent = 0;
        while sent < self.ops.len() {
            let end = (sent + TXN_OPS).min(self.ops.len());
            let txn = Txn {
                success: self.ops[sent..end].to_vec(),
                ..Txn::default()
            };
            if let Err(e) = self.store.txn(txn).await {
                self.ops.drain(..sent);
                self.op_index = self
                    .ops
                    .iter()
                    .enumerate()
                    .map(|(i, op)| (op_key(op).to_owned(), i))
                    .collect();
                return Err(e);
            }
            sent = end;
        }
        self.ops.clear();
        self.op_index.clear();
        Ok(sent)
    }

    /// Pending operations.
    pub fn pending(&self) -> usize {
        self.ops.len()
    }

    /// Runs until the event channel closes: applies events in batches and flushes.
    pub async fn run(mut self, mut rx: mpsc::Receiver<ClusterEvent>) {
        let mut backoff = meshd::backoff::Backoff::new(meshd::backoff::BackoffConfig::default());
        while let Some(ev) = rx.recv().await {
            self.apply(ev);
            let mut n = 1;
            while n < MAX_BATCH {
                match rx.recv().now_or_never() {
                    Some(Some(ev)) => {
                        self.apply(ev);
                        n += 1;
                    }
                    _ => break,
                }
            }
            while let Err(e) = self.flush().await {
                tracing::warn!(error = %e, "kvstoremesh: writing the cache failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            backoff.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use meshd::kv::MemoryStore;
    use meshd::model::{
        Capabilities, ClusterConfig, ClusterId, Identity, IpCacheEntry, MaxConnectedClusters,
    };

    use super::*;
    use meshd::keys::StateKey;

    fn west() -> ClusterName {
        ClusterName::new("west").unwrap()
    }

    fn ip_event(i: u8, local: u32) -> ClusterEvent {
        let m = MaxConnectedClusters::C255;
        let ip: std::net::IpAddr = [198, 18, 2, i].into();
        ClusterEvent::Apply {
            cluster: west(),
            key: StateKey::Ip {
                cluster: west(),
                ip,
            },
            value: StateValue::Ip(IpCacheEntry {
                ip,
                prefix_len: 32,
                identity: Identity::cluster_scoped(ClusterId::new(2, m).unwrap(), local, m)
                    .unwrap(),
                host_ip: None,
                node: None,
                namespace: None,
                pod: None,
                named_ports: Default::default(),
            }),
        }
    }

    fn list(writer: &mut CacheWriter, ips: &[u8]) {
        writer.apply(ClusterEvent::Init {
            cluster: west(),
            kind: StateKind::Ip,
        });
        for i in ips {
            writer.apply(ip_event(*i, 300));
        }
        writer.apply(ClusterEvent::InitDone {
            cluster: west(),
            kind: StateKind::Ip,
        });
    }

    async fn cache_keys(store: &MemoryStore) -> Vec<String> {
        store
            .list_all("mesh/cache/", 100)
            .await
            .unwrap()
            .kvs
            .into_iter()
            .map(|kv| String::from_utf8(kv.key).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn mirrors_sweeps_without_churn_and_drains() {
        let store = MemoryStore::new();
        let mut w = CacheWriter::new(Arc::new(store.clone())).await.unwrap();
        let m = MaxConnectedClusters::C255;
        w.apply(ClusterEvent::Config {
            cluster: west(),
            config: ClusterConfig {
                id: ClusterId::new(2, m).unwrap(),
                name: west(),
                max_connected_clusters: m,
                capabilities: Capabilities::default(),
            },
        });
        list(&mut w, &[1, 2, 3]);
        w.heartbeat(&west(), time::OffsetDateTime::now_utc());
        w.flush().await.unwrap();
        let keys = cache_keys(&store).await;
        assert!(keys.contains(&"mesh/cache/ip/v1/west/198.18.2.1".to_owned()));
        assert!(keys.contains(&"mesh/cache/synced/west/ip".to_owned()));
        assert!(keys.contains(&"mesh/cache/cluster-config/west".to_owned()));
        assert!(keys.contains(&"mesh/cache/heartbeat/west".to_owned()));

        // A restarted writer relisting the same data writes nothing; one key fewer →
        // exactly one delete.
        let rev = store.revision();
        let mut w = CacheWriter::new(Arc::new(store.clone())).await.unwrap();
        list(&mut w, &[1, 2]);
        assert_eq!(w.pending(), 1, "only the sweep of 198.18.2.3");
        w.flush().await.unwrap();
        assert_eq!(store.revision(), rev + 1);
        assert!(
            !cache_keys(&store)
                .await
                .contains(&"mesh/cache/ip/v1/west/198.18.2.3".to_owned())
        );

        // Live changes, then a drain removes everything of the peer.
        w.apply(ip_event(2, 301));
        w.apply(ClusterEvent::Delete {
            cluster: west(),
            key: StateKey::Ip {
                cluster: west(),
                ip: [198, 18, 2, 1].into(),
            },
        });
        w.flush().await.unwrap();
        assert_eq!(
            store
                .list_all("mesh/cache/ip/", 10)
                .await
                .unwrap()
                .kvs
                .len(),
            1
        );
        w.apply(ClusterEvent::Drain { cluster: west() });
        w.flush().await.unwrap();
        assert!(cache_keys(&store).await.is_empty());
    }

    #[tokio::test]
    async fn failed_writes_stay_pending() {
        let store = MemoryStore::new();
        let mut w = CacheWriter::new(Arc::new(store.clone())).await.unwrap();
        list(&mut w, &(1..=250).collect::<Vec<u8>>());
        store.fail_next(2);
        assert!(w.flush().await.is_err());
        assert!(w.pending() > 0);
        assert!(w.flush().await.is_err());
        w.flush().await.unwrap();
        assert_eq!(
            store
                .list_all("mesh/cache/ip/", 1000)
                .await
                .unwrap()
                .kvs
                .len(),
            250
        );
    }
}

/// The key an operation writes.
fn op_key(op: &Op) -> &str {
    match op {
        Op::Put { key, .. } | Op::Delete(key) => key,
    }
}

/// kvstoremesh settings.
#[derive(Debug, Clone)]
pub struct KvStoreMeshConfig {
    /// Supervisor settings (this cluster, mode, timeouts).
    pub supervisor: meshd::remote::SupervisorConfig,
    /// Directory of peer kubeconfigs (read directly: kvstoremesh talks to peers' etcd).
    pub peers_dir: std::path::PathBuf,
    /// How often peers' heartbeats are copied into the cache.
    pub heartbeat_mirror: std::time::Duration,
    /// Per-peer quotas of the peer guard.
    pub limits: meshd::trust::PeerLimits,
    /// Counters of the peer guard (shared families; register them to export).
    pub trust_metrics: meshd::metrics::TrustMetrics,
}

/// Runs kvstoremesh until `shutdown`: a supervisor per peer reading the peer's etcd, and
/// the cache writer; peers' heartbeats are mirrored so agents can watch peers' liveness.
/// Returns the peers' statuses channel.
pub async fn run(
    local: Arc<dyn KvStore>,
    cfg: KvStoreMeshConfig,
    metrics: meshd::metrics::ReflectorMetrics,
    statuses: tokio::sync::watch::Sender<Vec<meshd::remote::PeerStatus>>,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), KvError> {
    let peers =
        meshd::peers::PeerDirWatcher::new(cfg.peers_dir.clone()).run(shutdown.child_token());
    run_with_peers(local, cfg, metrics, statuses, peers, shutdown).await
}

/// [`run`] with the peer credentials from `peers` (e.g. a
/// [`meshd::kube::PeerSecretWatcher`] in Kubernetes mode) instead of `cfg.peers_dir`.
pub async fn run_with_peers(
    local: Arc<dyn KvStore>,
    cfg: KvStoreMeshConfig,
    metrics: meshd::metrics::ReflectorMetrics,
    statuses: tokio::sync::watch::Sender<Vec<meshd::remote::PeerStatus>>,
    mut peers: futures::stream::BoxStream<'static, meshd::peers::PeerEvent>,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), KvError> {
    use futures::StreamExt;
    let writer = CacheWriter::new(local.clone()).await?;
    let (tx, rx) = mpsc::channel(8192);
    let (hb_tx, mut hb_rx) = mpsc::channel::<(ClusterName, time::OffsetDateTime)>(64);
    let local_name = cfg.supervisor.local.clone();
    let mut guard =
        meshd::trust::PeerGuard::new(local_name.clone(), cfg.limits, cfg.trust_metrics.clone());
    // Ranges granted before a restart stay granted against newcomers' claims.
    let cached = local
        .list_all(&keys::cache_kind_prefix(StateKind::Nodes), 5000)
        .await?;
    let cached: Vec<meshd::model::Node> = cached
        .kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect();
    guard.seed_granted(&cached);
    // The local cluster's nodes: the ranges peers may not claim.
    let local_nodes = local_nodes(local, local_name.clone(), metrics.clone(), tx.clone());
    let mut manager = meshd::remote::PeerManager::new(
        cfg.supervisor.clone(),
        metrics,
        tx.clone(),
        Box::new(|cred| meshd::remote::ClusterSource::Direct(cred.to_etcd_config())),
    );
    let (trust_tx, trust_rx) = tokio::sync::watch::channel(Vec::new());
    // Peers the guard needs relisted (rare: an address range changed hands twice).
    let (relist_tx, mut relist_rx) = mpsc::unbounded_channel::<ClusterName>();
    // The writer owns the cache; every event passes the peer guard first, and only
    // peers' events reach the cache. Heartbeats reach it through the event channel's order.
    let writer_task = tokio::spawn(async move {
        let mut writer = writer;
        let mut rx = rx;
        let mut out = Vec::new();
        let mut backoff = meshd::backoff::Backoff::new(meshd::backoff::BackoffConfig::default());
        loop {
            tokio::select! {
                ev = rx.recv() => {
                    let Some(ev) = ev else { break };
                    guard.apply(ev, &mut out);
                    for _ in 0..MAX_BATCH {
                        match rx.recv().now_or_never() {
                            Some(Some(ev)) => guard.apply(ev, &mut out),
                            _ => break,
                        }
                    }
                    guard.settle(&mut out);
                    for ev in out.drain(..) {
                        if *ev.cluster() != local_name {
                            writer.apply(ev);
                        }
                    }
                    for peer in guard.take_relists() {
                        let _ = relist_tx.send(peer);
                    }
                    let status = guard.status();
                    trust_tx.send_if_modified(|s| {
                        let changed = *s != status;
                        *s = status;
                        changed
                    });
                }
                hb = hb_rx.recv() => {
                    let Some((c, t)) = hb else { break };
                    writer.heartbeat(&c, t);
                }
            }
            while let Err(e) = writer.flush().await {
                tracing::warn!(error = %e, "kvstoremesh: writing the cache failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            backoff.reset();
        }
    });
    let mut tick = tokio::time::interval(cfg.heartbeat_mirror);
    let mut mirrored: std::collections::HashMap<ClusterName, time::OffsetDateTime> =
        std::collections::HashMap::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            ev = peers.next() => match ev {
                Some(ev) => manager.handle(ev).await,
                None => break,
            },
            Some(peer) = relist_rx.recv() => manager.relist(&peer).await,
            _ = tick.tick() => {
                let mut st = manager.statuses();
                {
                    let trust = trust_rx.borrow();
                    for s in &mut st {
                        s.trust = trust.iter().find(|t| t.cluster == s.name).cloned();
                    }
                }
                for s in &st {
                    if let Some(t) = s.last_heartbeat
                        && mirrored.get(&s.name) != Some(&t)
                    {
                        mirrored.insert(s.name.clone(), t);
                        let _ = hb_tx.send((s.name.clone(), t)).await;
                    }
                }
                statuses.send_replace(st);
            }
        }
    }
    manager.shutdown().await;
    local_nodes.abort();
    drop(tx);
    drop(hb_tx);
    let _ = writer_task.await;
    Ok(())
}

/// Reflects the local cluster's nodes into `tx` as the local cluster's events, so the
/// peer guard knows the ranges peers may not claim.
fn local_nodes(
    store: Arc<dyn KvStore>,
    local: ClusterName,
    metrics: meshd::metrics::ReflectorMetrics,
    tx: mpsc::Sender<ClusterEvent>,
) -> tokio::task::JoinHandle<()> {
    use futures::StreamExt;
    use meshd::reflector::{Reflector, StateCodec};
    let codec = StateCodec {
        kind: StateKind::Nodes,
        cluster: local.clone(),
        cached: false,
        scope: None,
    };
    let mut rcfg = codec.reflector_config();
    rcfg.kind_label = "local-nodes".into();
    let reflector = Reflector::new(store, codec.prefix(), codec, rcfg, metrics);
    tokio::spawn(async move {
        let mut events = std::pin::pin!(reflector.into_stream());
        while let Some(item) = events.next().await {
            let ev = match item {
                Ok(ev) => ClusterEvent::from_reflector(local.clone(), StateKind::Nodes, ev),
                Err(e) => {
                    tracing::debug!(error = %e, "kvstoremesh: local nodes reflector retrying");
                    continue;
                }
            };
            if tx.send(ev).await.is_err() {
                break;
            }
        }
    })
}
