//! Remote-cluster supervision: one task per cluster that connects, validates, waits for
//! sync, reflects the cluster's state and recovers from failures.
//!
//! ```text
//!  ClusterSource (peer etcd over mTLS | local kvstoremesh cache | the local cluster)
//!     │ connect ─► read cluster-config ─► validate (name, ID unique, mode) ─► Config event
//!     │ wait for synced markers (bounded) ─► 4 reflectors (identities, ip, nodes, services)
//!     │            ─► Init / Apply / Delete / InitDone events ─► sink (merged view, cache)
//!     │ heartbeat watchdog: `mesh/heartbeat` older than the threshold ⇒ failure
//!     └ failure ⇒ Backoff (jittered, growing) ⇒ reconnect (consumers replace wholesale)
//! ```
//!
//! The lifecycle is `Connecting → WaitingForSync → Ready`, or `Backoff` after a failure
//! (`Refused` when the peer's config is unacceptable). A status snapshot (state, synced
//! kinds, counts per kind, last error, last failure time, failures) is published on a
//! watch channel. While a peer is unreachable its last state stays in the consumers
//! until `cache_ttl` (zero means forever) expires; then, and when the supervisor is
//! stopped (peer removed), a `Drain` event removes exactly that peer's data.

mod manager;
mod status;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use self::manager::{PeerManager, SourceFor};
pub use self::status::{PeerState, PeerStatus};

#[cfg(test)]
mod tests;
use crate::backoff::{Backoff, BackoffConfig};

/// Longest wait before asking a reachable peer again whether it has exported yet.
const NOT_EXPORTED_RETRY: Duration = Duration::from_millis(250);
use crate::events::ClusterEvent;
use crate::keys::{self, IdentityScope, Key, StateKind};
use crate::kv::{EtcdConfig, EtcdStore, KvError, KvStore};
use crate::metrics::ReflectorMetrics;
use crate::model::{ClusterConfig, ClusterId, ClusterName, MaxConnectedClusters};
use crate::reflector::{Reflector, StateCodec};

/// Where a cluster's data is read from.
#[derive(Clone)]
pub enum ClusterSource {
    /// The peer's own etcd (`mesh/state/...`), with the peer credential's TLS config.
    Direct(EtcdConfig),
    /// The local etcd's kvstoremesh cache of the peer (`mesh/cache/...`).
    Cached(Arc<dyn KvStore>),
    /// The local cluster in the local etcd (`mesh/state/...`); no peer checks.
    Local(Arc<dyn KvStore>),
}

impl std::fmt::Debug for ClusterSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Direct(c) => f.debug_tuple("Direct").field(&c.endpoints).finish(),
            Self::Cached(_) => f.write_str("Cached"),
            Self::Local(_) => f.write_str("Local"),
        }
    }
}

impl ClusterSource {
    fn cached(&self) -> bool {
        matches!(self, Self::Cached(_))
    }

    async fn store(&self) -> Result<Arc<dyn KvStore>, KvError> {
        match self {
            Self::Direct(cfg) => Ok(Arc::new(EtcdStore::connect(cfg).await?)),
            Self::Cached(s) | Self::Local(s) => Ok(s.clone()),
        }
    }

    fn config_key(&self, cluster: &ClusterName) -> String {
        if self.cached() {
            Key::CacheClusterConfig(cluster.clone()).to_string()
        } else {
            Key::ClusterConfig(cluster.clone()).to_string()
        }
    }

    fn synced_key(&self, cluster: &ClusterName, kind: StateKind) -> String {
        let cluster = cluster.clone();
        if self.cached() {
            Key::CacheSynced { cluster, kind }.to_string()
        } else {
            Key::Synced { cluster, kind }.to_string()
        }
    }

    fn heartbeat_key(&self, cluster: &ClusterName) -> String {
        if self.cached() {
            Key::CacheHeartbeat(cluster.clone()).to_string()
        } else {
            keys::HEARTBEAT.to_owned()
        }
    }
}

/// Supervisor settings.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// This (local) cluster.
    pub local: ClusterName,
    /// Its ID (a peer with the same ID is refused).
    pub local_id: ClusterId,
    /// The mesh mode (a peer with another mode is refused).
    pub mode: MaxConnectedClusters,
    /// How long to wait for a peer's synced markers before serving anyway (default 60 s).
    pub sync_timeout: Duration,
    /// A heartbeat older than this fails the connection (default 60 s; DESIGN: 15 s
    /// refresh).
    pub heartbeat_timeout: Duration,
    /// How often the heartbeat is checked (default 5 s).
    pub heartbeat_check: Duration,
    /// How long an unreachable peer's data is kept (zero: forever).
    pub cache_ttl: Duration,
    /// Backoff between connection attempts.
    pub backoff: BackoffConfig,
    /// Reflector page size (default 10 000).
    pub page_size: usize,
}

impl SupervisorConfig {
    /// Defaults for a local cluster.
    pub fn new(local: ClusterName, local_id: ClusterId, mode: MaxConnectedClusters) -> Self {
        Self {
            local,
            local_id,
            mode,
            sync_timeout: Duration::from_secs(60),
            heartbeat_timeout: Duration::from_secs(60),
            heartbeat_check: Duration::from_secs(5),
            cache_ttl: Duration::ZERO,
            backoff: BackoffConfig {
                initial: Duration::from_millis(500),
                max: Duration::from_secs(30),
            },
            // etcd 3.4 counts the remaining range on every page: large pages keep a
            // million-entry peer from costing a thousand full scans. Pages that exceed
            // the gRPC message limit shrink automatically.
            page_size: 10_000,
        }
    }
}

/// Cluster IDs claimed by connected peers (shared by the supervisors of one process), so
/// two peers with one ID are never served together.
#[derive(Debug, Clone, Default)]
pub struct IdRegistry(Arc<Mutex<HashMap<ClusterId, ClusterName>>>);

impl IdRegistry {
    fn claim(&self, id: ClusterId, name: &ClusterName) -> Result<(), ClusterName> {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match g.get(&id) {
            Some(other) if other != name => Err(other.clone()),
            _ => {
                g.insert(id, name.clone());
                Ok(())
            }
        }
    }

    fn release(&self, name: &ClusterName) {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.retain(|_, n| n != name);
    }
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The store failed.
    #[error("{step}: {source}")]
    Store {
        /// Which step.
        step: &'static str,
        /// Cause.
        #[source]
        source: KvError,
    },
    /// The peer's cluster-config is unacceptable.
    #[error("refused: {0}")]
    Refused(String),
    /// No heartbeat has been written yet (or kvstoremesh has not mirrored one).
    #[error("{0} does not exist yet (no heartbeat)")]
    NoHeartbeat(String),
    /// The peer has not exported its cluster-config yet (its apiserver is starting).
    #[error("{0} does not exist yet")]
    NotExported(String),
    /// The peer's heartbeat is stale.
    #[error("heartbeat is {age:?} old (threshold {threshold:?})")]
    StaleHeartbeat {
        /// Age of the last heartbeat.
        age: Duration,
        /// Threshold.
        threshold: Duration,
    },
    /// The consumer went away.
    #[error("the event consumer is gone")]
    SinkClosed,
}

/// A running supervisor; stopping it drains the cluster's data.
#[derive(Debug)]
pub struct RemoteCluster {
    name: ClusterName,
    status: watch::Receiver<PeerStatus>,
    stop: CancellationToken,
    drain_on_stop: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl RemoteCluster {
    /// Starts supervising `name`, sending its events to `sink`.
    pub fn spawn(
        name: ClusterName,
        source: ClusterSource,
        cfg: SupervisorConfig,
        ids: IdRegistry,
        metrics: ReflectorMetrics,
        sink: mpsc::Sender<ClusterEvent>,
    ) -> Self {
        let (tx, status) = watch::channel(PeerStatus::new(&name));
        let stop = CancellationToken::new();
        let drain_on_stop = Arc::new(AtomicBool::new(true));
        let sup = Supervisor {
            drain_on_stop: drain_on_stop.clone(),
            name: name.clone(),
            source,
            cfg,
            ids,
            metrics,
            sink,
            status: tx,
            stop: stop.clone(),
        };
        let span = tracing::info_span!("cluster", peer = %name);
        let task = tokio::spawn(tracing::Instrument::instrument(sup.run(), span));
        Self {
            name,
            status,
            stop,
            drain_on_stop,
            task: Some(task),
        }
    }

    /// The cluster supervised.
    pub fn name(&self) -> &ClusterName {
        &self.name
    }

    /// The current status.
    pub fn status(&self) -> PeerStatus {
        self.status.borrow().clone()
    }

    /// Subscribes to status changes.
    pub fn subscribe(&self) -> watch::Receiver<PeerStatus> {
        self.status.clone()
    }

    /// Stops the supervisor and waits until the cluster's data is drained (the peer was
    /// removed).
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    /// Stops the supervisor keeping the cluster's data in the consumers (a restart with a
    /// changed credential, or process shutdown); a new supervisor's first list replaces it.
    pub async fn stop_keep_data(mut self) {
        self.drain_on_stop.store(false, Ordering::Relaxed);
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for RemoteCluster {
    fn drop(&mut self) {
        // Dropping without `stop().await`: the task still drains in the background.
        self.stop.cancel();
    }
}

struct Supervisor {
    drain_on_stop: Arc<AtomicBool>,
    name: ClusterName,
    source: ClusterSource,
    cfg: SupervisorConfig,
    ids: IdRegistry,
    metrics: ReflectorMetrics,
    sink: mpsc::Sender<ClusterEvent>,
    status: watch::Sender<PeerStatus>,
    stop: CancellationToken,
}

/// How a connection ended.
enum Ended {
    Stopped,
    Failed(SupervisorError),
}

impl Supervisor {
    fn set_state(&self, state: PeerState) {
        self.status.send_if_modified(|s| {
            let changed = s.state != state;
            s.state = state;
            s.connected = matches!(state, PeerState::WaitingForSync | PeerState::Ready);
            changed
        });
    }

    async fn run(self) {
        let mut backoff = Backoff::new(self.cfg.backoff);
        let mut down_since: Option<Instant> = None;
        let mut drained = true;
        loop {
            self.set_state(PeerState::Connecting);
            let ended = self.connect_and_serve(&mut backoff, &mut drained).await;
            self.ids.release(&self.name);
            // A connection that got ready ends any earlier outage: the cache TTL counts
            // from this failure.
            if self.status.borrow().state == PeerState::Ready {
                down_since = None;
            }
            match ended {
                Ended::Stopped => break,
                Ended::Failed(e) => {
                    let refused = matches!(e, SupervisorError::Refused(_));
                    let not_yet = matches!(
                        e,
                        SupervisorError::NotExported(_) | SupervisorError::NoHeartbeat(_)
                    );
                    if not_yet {
                        tracing::info!(error = %e, "cluster not exported yet; retrying");
                    } else {
                        tracing::warn!(error = %e, "cluster connection failed");
                    }
                    self.status.send_modify(|s| {
                        s.state = if refused {
                            PeerState::Refused
                        } else {
                            PeerState::Backoff
                        };
                        s.connected = false;
                        s.last_error = Some(e.to_string());
                        s.last_failure = Some(time::OffsetDateTime::now_utc());
                        s.failures += 1;
                    });
                    if matches!(e, SupervisorError::SinkClosed) {
                        break;
                    }
                    let since = *down_since.get_or_insert_with(Instant::now);
                    // A peer that answers but has not exported yet is polled four times a second
                    // (one cheap read each), so a new connection is used promptly.
                    let delay = if not_yet {
                        backoff.next_delay().min(NOT_EXPORTED_RETRY)
                    } else {
                        backoff.next_delay()
                    };
                    // Wait, draining the data once the cache TTL passes.
                    let until = Instant::now() + delay;
                    loop {
                        let ttl_at = (!drained && !self.cfg.cache_ttl.is_zero())
                            .then(|| since + self.cfg.cache_ttl);
                        let wake = ttl_at.map_or(until, |t| t.min(until));
                        tokio::select! {
                            () = self.stop.cancelled() => break,
                            () = tokio::time::sleep_until(wake) => {}
                        }
                        if ttl_at.is_some_and(|t| Instant::now() >= t) {
                            tracing::warn!(ttl = ?self.cfg.cache_ttl, "cluster unreachable past the cache TTL; draining its data");
                            if self.drain().await {
                                drained = true;
                            }
                        }
                        if Instant::now() >= until {
                            break;
                        }
                    }
                    if self.stop.is_cancelled() {
                        break;
                    }
                }
            }
        }
        if !drained && self.drain_on_stop.load(Ordering::Relaxed) {
            self.drain().await;
        }
        self.ids.release(&self.name);
        self.set_state(PeerState::Stopped);
    }

    async fn drain(&self) -> bool {
        self.status.send_modify(|s| {
            s.counts.clear();
            s.synced.clear();
        });
        self.sink
            .send(ClusterEvent::Drain {
                cluster: self.name.clone(),
            })
            .await
            .is_ok()
    }

    async fn send(&self, ev: ClusterEvent) -> Result<(), SupervisorError> {
        self.sink
            .send(ev)
            .await
            .map_err(|_| SupervisorError::SinkClosed)
    }

    /// Reads and validates the cluster's config.
    async fn read_config(&self, store: &dyn KvStore) -> Result<ClusterConfig, SupervisorError> {
        let key = self.source.config_key(&self.name);
        let kv = store
            .get(&key)
            .await
            .map_err(|source| SupervisorError::Store {
                step: "read cluster-config",
                source,
            })?
            .ok_or_else(|| SupervisorError::NotExported(key.clone()))?;
        let cfg = keys::decode_cluster_config(&self.name, &kv.value)
            .map_err(|e| SupervisorError::Refused(e.to_string()))?;
        if matches!(self.source, ClusterSource::Local(_)) {
            return Ok(cfg);
        }
        if cfg.max_connected_clusters != self.cfg.mode {
            return Err(SupervisorError::Refused(format!(
                "max-connected-clusters {} differs from ours ({})",
                cfg.max_connected_clusters, self.cfg.mode
            )));
        }
        if cfg.id == self.cfg.local_id {
            return Err(SupervisorError::Refused(format!(
                "cluster ID {} is ours ({})",
                cfg.id, self.cfg.local
            )));
        }
        if let Err(other) = self.ids.claim(cfg.id, &self.name) {
            return Err(SupervisorError::Refused(format!(
                "cluster ID {} is already used by connected peer {other}",
                cfg.id
            )));
        }
        Ok(cfg)
    }

    /// Waits (bounded) until every synced marker exists; returns the kinds synced.
    async fn wait_synced(&self, store: &dyn KvStore) -> Result<Vec<StateKind>, Ended> {
        let deadline = Instant::now() + self.cfg.sync_timeout;
        loop {
            let mut synced = Vec::new();
            for kind in StateKind::ALL {
                match store.get(&self.source.synced_key(&self.name, kind)).await {
                    Ok(Some(_)) => synced.push(kind),
                    Ok(None) => {}
                    Err(source) => {
                        return Err(Ended::Failed(SupervisorError::Store {
                            step: "read synced markers",
                            source,
                        }));
                    }
                }
            }
            self.status.send_modify(|s| s.synced.clone_from(&synced));
            if synced.len() == StateKind::ALL.len() {
                return Ok(synced);
            }
            if Instant::now() >= deadline {
                tracing::warn!(?synced, timeout = ?self.cfg.sync_timeout, "synced markers missing; serving the data anyway");
                return Ok(synced);
            }
            tokio::select! {
                () = self.stop.cancelled() => return Err(Ended::Stopped),
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    async fn check_heartbeat(&self, store: &dyn KvStore) -> Result<(), SupervisorError> {
        let key = self.source.heartbeat_key(&self.name);
        let kv = store
            .get(&key)
            .await
            .map_err(|source| SupervisorError::Store {
                step: "read heartbeat",
                source,
            })?;
        let Some(kv) = kv else {
            return Err(SupervisorError::NoHeartbeat(key));
        };
        let t = keys::decode_time(&Key::Heartbeat, &kv.value)
            .map_err(|e| SupervisorError::Refused(format!("heartbeat: {e}")))?;
        let age = (time::OffsetDateTime::now_utc() - t)
            .try_into()
            .unwrap_or(Duration::ZERO);
        self.status.send_modify(|s| s.last_heartbeat = Some(t));
        if age > self.cfg.heartbeat_timeout {
            return Err(SupervisorError::StaleHeartbeat {
                age,
                threshold: self.cfg.heartbeat_timeout,
            });
        }
        Ok(())
    }

    async fn connect_and_serve(&self, backoff: &mut Backoff, drained: &mut bool) -> Ended {
        let store = match self.source.store().await {
            Ok(s) => s,
            Err(source) => {
                return Ended::Failed(SupervisorError::Store {
                    step: "connect",
                    source,
                });
            }
        };
        let config = tokio::select! {
            () = self.stop.cancelled() => return Ended::Stopped,
            c = self.read_config(&*store) => match c {
                Ok(c) => c,
                Err(e) => return Ended::Failed(e),
            },
        };
        self.status.send_modify(|s| s.cluster_id = Some(config.id));
        if let Err(e) = self
            .send(ClusterEvent::Config {
                cluster: self.name.clone(),
                config: config.clone(),
            })
            .await
        {
            return Ended::Failed(e);
        }
        let remote = !matches!(self.source, ClusterSource::Local(_));
        if remote {
            self.set_state(PeerState::WaitingForSync);
            if let Err(e) = self.check_heartbeat(&*store).await {
                return Ended::Failed(e);
            }
            if let Err(ended) = self.wait_synced(&*store).await {
                return ended;
            }
        }
        let scope = IdentityScope::of(&config);
        let mut events = futures::stream::select_all(StateKind::ALL.into_iter().map(|kind| {
            let codec = StateCodec {
                kind,
                cluster: self.name.clone(),
                cached: self.source.cached(),
                scope: Some(scope),
            };
            let mut rcfg = codec.reflector_config();
            rcfg.page_size = self.cfg.page_size;
            rcfg.backoff = self.cfg.backoff;
            Reflector::new(
                store.clone(),
                codec.prefix(),
                codec,
                rcfg,
                self.metrics.clone(),
            )
            .into_stream_with_len()
            .map(move |item| (kind, item))
            .boxed()
        }));
        let mut heartbeat = tokio::time::interval(self.cfg.heartbeat_check);
        heartbeat.reset();
        let mut listed: BTreeMap<StateKind, bool> = BTreeMap::new();
        let mut counts: BTreeMap<StateKind, usize> = BTreeMap::new();
        let mut consecutive_errors = 0u32;
        loop {
            let (kind, (item, len)) = tokio::select! {
                () = self.stop.cancelled() => return Ended::Stopped,
                _ = heartbeat.tick() => {
                    if remote && let Err(e) = self.check_heartbeat(&*store).await {
                        return Ended::Failed(e);
                    }
                    let counts: BTreeMap<String, u64> = counts
                        .iter()
                        .map(|(k, n)| (k.as_str().to_owned(), *n as u64))
                        .collect();
                    self.status.send_if_modified(|s| {
                        let changed = s.counts != counts;
                        s.counts = counts;
                        changed
                    });
                    continue;
                }
                next = events.next() => match next {
                    Some(x) => x,
                    None => return Ended::Stopped,
                },
            };
            counts.insert(kind, len);
            let ev = match item {
                Ok(ev) => {
                    consecutive_errors = 0;
                    ev
                }
                Err(e) => {
                    consecutive_errors += 1;
                    tracing::debug!(error = %e, "reflector error");
                    self.status
                        .send_modify(|s| s.last_error = Some(e.to_string()));
                    // The reflectors retry on their own; a peer that keeps failing is
                    // treated as down so that it is reported and backed off as a whole.
                    if consecutive_errors >= 8 {
                        return Ended::Failed(SupervisorError::Store {
                            step: "watch",
                            source: e.source,
                        });
                    }
                    continue;
                }
            };
            let cluster = self.name.clone();
            let out = ClusterEvent::from_reflector(cluster, kind, ev);
            let done = matches!(out, ClusterEvent::InitDone { .. });
            if done {
                listed.insert(kind, true);
            }
            if let Err(e) = self.send(out).await {
                return Ended::Failed(e);
            }
            *drained = false;
            if done {
                let counts: BTreeMap<String, u64> = counts
                    .iter()
                    .map(|(k, n)| (k.as_str().to_owned(), *n as u64))
                    .collect();
                let ready = listed.len() == StateKind::ALL.len();
                self.status.send_modify(|s| {
                    s.counts = counts;
                    if ready && s.state != PeerState::Ready {
                        s.state = PeerState::Ready;
                        s.connected = true;
                    }
                });
                if ready {
                    backoff.reset();
                }
            }
        }
    }
}
