//! The agent's runtime: the local cluster's and every peer's supervisor feeding one
//! merged view, which readers (API, datapath, DNS, policy) subscribe to.
//!
//! ```text
//!  local etcd mesh/state/*/<local> ──RemoteCluster(Local)──┐
//!  peers dir ─► PeerManager ─► RemoteCluster(Cached|Direct)├─► mpsc<ClusterEvent> ─► view task
//!  local etcd mesh/clusterset-ips/ ──Reflector─────────────┘        MergedView::apply/publish
//!                                                              ─► watch snapshots (readers)
//! ```

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use meshd::events::ClusterEvent;
use meshd::keys::{self, ClusterSetIpEntry, DecodeError, Key, KeyError};
use meshd::kv::KvStore;
use meshd::metrics::ReflectorMetrics;
use meshd::metrics::TrustMetrics;
use meshd::peers::PeerDirWatcher;
use meshd::reflector::{Codec, Event, Reflector, ReflectorConfig};
use meshd::remote::{
    ClusterSource, IdRegistry, PeerManager, PeerStatus, RemoteCluster, SupervisorConfig,
};
use meshd::trust::{PeerGuard, PeerLimits, PeerTrust};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::view::{
    IdentitiesSnapshot, IpCacheSnapshot, MergedView, NodesSnapshot, ServicesSnapshot,
};

/// Events applied before the view publishes (bounds the latency of a burst).
const MAX_BATCH: usize = 10_000;
/// Shortest time between two snapshots while events keep coming.
const PUBLISH_INTERVAL: Duration = Duration::from_millis(20);
/// A batch this small after a quiet period is published at once.
const SMALL_BATCH: usize = 64;

/// How the agent reads peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerAccess {
    /// From the local etcd's kvstoremesh cache (default: one watcher per cluster on peers).
    Cached,
    /// Straight from each peer's etcd with the peer credential.
    Direct,
}

/// Agent runtime settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Supervisor settings (local cluster name, ID, mode, timeouts, cache TTL).
    pub supervisor: SupervisorConfig,
    /// Directory of peer kubeconfigs.
    pub peers_dir: PathBuf,
    /// How peers are read.
    pub access: PeerAccess,
    /// Per-peer quotas of the peer guard.
    pub limits: PeerLimits,
    /// Counters of the peer guard (shared families; register them to export).
    pub trust_metrics: TrustMetrics,
}

/// What the agent reports about its sources.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentStatus {
    /// The local cluster's supervisor.
    pub local: Option<PeerStatus>,
    /// Every peer's supervisor.
    pub peers: Vec<PeerStatus>,
    /// Client certificate expiry per peer (unix seconds).
    pub peer_cert_not_after: Vec<(String, Option<i64>)>,
    /// Peer credential files rejected, with the reason.
    pub peer_errors: Vec<(String, String)>,
    /// Whether the local cluster and every peer are ready.
    pub ready: bool,
}

/// Subscriptions to the merged view and the status.
#[derive(Debug, Clone)]
pub struct ViewHandles {
    /// Merged global services.
    pub services: watch::Receiver<Arc<ServicesSnapshot>>,
    /// Identities of every cluster.
    pub identities: watch::Receiver<Arc<IdentitiesSnapshot>>,
    /// IP → identity of every cluster.
    pub ipcache: watch::Receiver<Arc<IpCacheSnapshot>>,
    /// Nodes of every cluster.
    pub nodes: watch::Receiver<Arc<NodesSnapshot>>,
    /// Sources' status.
    pub status: watch::Receiver<AgentStatus>,
}

/// Codec of `mesh/clusterset-ips/v1/<ns>/<name>`.
#[derive(Debug, Clone, Copy)]
struct ClusterSetIpCodec;

impl Codec for ClusterSetIpCodec {
    type Key = (String, String);
    type Value = IpAddr;

    fn decode_key(&self, key: &[u8]) -> Result<Self::Key, DecodeError> {
        match Key::parse_bytes(key)? {
            Key::ClusterSetIp { namespace, name } => Ok((namespace, name)),
            _ => Err(KeyError {
                key: String::from_utf8_lossy(key).into_owned(),
                reason: "not a ClusterSetIP name key",
            }
            .into()),
        }
    }

    fn decode_value(&self, key: &Self::Key, value: &[u8]) -> Result<IpAddr, DecodeError> {
        let k = Key::ClusterSetIp {
            namespace: key.0.clone(),
            name: key.1.clone(),
        };
        let e: ClusterSetIpEntry = keys::decode_json(&k, value)?;
        if e.namespace != key.0 || e.name != key.1 {
            return Err(DecodeError::Mismatch {
                key: k.to_string(),
                field: "namespace/name",
                expected: format!("{}/{}", key.0, key.1),
                found: format!("{}/{}", e.namespace, e.name),
            });
        }
        Ok(e.ip)
    }
}

/// The running agent core.
#[derive(Debug)]
pub struct Agent {
    handles: ViewHandles,
    shutdown: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
}

enum Input {
    Cluster(ClusterEvent),
    ClusterSetIp(Event<(String, String), IpAddr>),
}

impl Agent {
    /// Starts the supervisors, the peers-directory watcher and the view task.
    pub fn start(
        cfg: AgentConfig,
        local_store: Arc<dyn KvStore>,
        metrics: ReflectorMetrics,
    ) -> Self {
        let shutdown = CancellationToken::new();
        let peers = PeerDirWatcher::new(cfg.peers_dir.clone()).run(shutdown.child_token());
        Self::start_inner(cfg, local_store, metrics, peers, shutdown)
    }

    /// Like [`Self::start`], with the peer credentials from `peers` instead of
    /// `cfg.peers_dir` (Kubernetes mode: a `meshd::kube::PeerSecretWatcher` stream).
    pub fn start_with_peers(
        cfg: AgentConfig,
        local_store: Arc<dyn KvStore>,
        metrics: ReflectorMetrics,
        peers: futures::stream::BoxStream<'static, meshd::peers::PeerEvent>,
    ) -> Self {
        Self::start_inner(cfg, local_store, metrics, peers, CancellationToken::new())
    }

    fn start_inner(
        cfg: AgentConfig,
        local_store: Arc<dyn KvStore>,
        metrics: ReflectorMetrics,
        mut peer_events: futures::stream::BoxStream<'static, meshd::peers::PeerEvent>,
        shutdown: CancellationToken,
    ) -> Self {
        let AgentConfig {
            supervisor,
            peers_dir: _,
            access,
            limits,
            trust_metrics,
        } = cfg;
        let local_name = supervisor.local.clone();
        let mut view = Guarded {
            guard: PeerGuard::new(local_name.clone(), limits, trust_metrics),
            view: MergedView::new(local_name.clone()),
            buf: Vec::new(),
        };
        let (trust_tx, trust_rx) = watch::channel(Vec::<PeerTrust>::new());
        // Peers the guard needs relisted (rare: an address range changed hands twice).
        let (relist_tx, mut relist_rx) = mpsc::unbounded_channel::<meshd::model::ClusterName>();
        let (status_tx, status) = watch::channel(AgentStatus::default());
        let handles = ViewHandles {
            services: view.view.subscribe_services(),
            identities: view.view.subscribe_identities(),
            ipcache: view.view.subscribe_ipcache(),
            nodes: view.view.subscribe_nodes(),
            status,
        };
        let (tx, mut rx) = mpsc::channel::<ClusterEvent>(4096);
        let mut tasks = tokio::task::JoinSet::new();

        // The local cluster.
        let local = RemoteCluster::spawn(
            local_name.clone(),
            ClusterSource::Local(local_store.clone()),
            supervisor.clone(),
            IdRegistry::default(),
            metrics.clone(),
            tx.clone(),
        );
        // Peers.
        let cache = local_store.clone();
        let mut manager = PeerManager::new(
            supervisor,
            metrics.clone(),
            tx,
            Box::new(move |cred| match access {
                PeerAccess::Direct => ClusterSource::Direct(cred.to_etcd_config()),
                PeerAccess::Cached => ClusterSource::Cached(cache.clone()),
            }),
        );
        tasks.spawn({
            let shutdown = shutdown.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        ev = peer_events.next() => match ev {
                            Some(ev) => manager.handle(ev).await,
                            None => break,
                        },
                        Some(peer) = relist_rx.recv() => manager.relist(&peer).await,
                        _ = tick.tick() => {}
                    }
                    let local_status = local.status();
                    let peers = manager.statuses_with_expiry();
                    let ready = local_status.is_ready()
                        && manager.synced()
                        && peers.iter().all(|(p, _)| p.is_ready());
                    let st = AgentStatus {
                        local: Some(local_status),
                        peer_cert_not_after: peers
                            .iter()
                            .map(|(p, t)| (p.name.to_string(), t.map(|t| t.unix_timestamp())))
                            .collect(),
                        peers: {
                            let trust = trust_rx.borrow();
                            peers
                                .into_iter()
                                .map(|(mut p, _)| {
                                    p.trust = trust.iter().find(|t| t.cluster == p.name).cloned();
                                    p
                                })
                                .collect()
                        },
                        peer_errors: manager
                            .errors()
                            .iter()
                            .map(|(p, e)| (p.display().to_string(), e.clone()))
                            .collect(),
                        ready,
                    };
                    status_tx.send_if_modified(|s| {
                        let changed = *s != st;
                        *s = st;
                        changed
                    });
                }
                manager.shutdown().await;
                local.stop_keep_data().await;
            }
        });

        // ClusterSetIPs allocated by the apiserver.
        let codec = ClusterSetIpCodec;
        let mut csip = Reflector::new(
            local_store,
            "mesh/clusterset-ips/v1/",
            codec,
            ReflectorConfig {
                cluster_label: local_name.to_string(),
                kind_label: "clusterset-ips".into(),
                ..ReflectorConfig::default()
            },
            metrics,
        );

        // The view task: the single writer of the merged view. A publish copies the
        // changed maps once, so under a burst snapshots are spaced by at least
        // PUBLISH_INTERVAL and by ten times what the last publish cost (publishing stays
        // under ~10 % of the task's time even for million-entry maps); a small batch
        // after a quiet period is published at once.
        tasks.spawn({
            let shutdown = shutdown.clone();
            async move {
                let mut last_publish = tokio::time::Instant::now() - PUBLISH_INTERVAL;
                let mut spacing = Duration::ZERO;
                let mut publish_at: Option<tokio::time::Instant> = None;
                loop {
                    let deferred = async {
                        match publish_at {
                            Some(t) => tokio::time::sleep_until(t).await,
                            None => std::future::pending().await,
                        }
                    };
                    let input = tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = deferred => {
                            publish_at = None;
                            spacing = timed_publish(&mut view, &trust_tx);
                            last_publish = tokio::time::Instant::now();
                            continue;
                        }
                        ev = rx.recv() => match ev {
                            Some(ev) => Input::Cluster(ev),
                            None => break,
                        },
                        item = csip.next() => match item {
                            Ok(ev) => Input::ClusterSetIp(ev),
                            Err(e) => {
                                tracing::debug!(error = %e, "clusterset-ips reflector retrying");
                                continue;
                            }
                        },
                    };
                    apply(&mut view, input);
                    let mut batch = 1;
                    while batch < MAX_BATCH {
                        match rx.recv().now_or_never() {
                            Some(Some(ev)) => view.apply(ev),
                            _ => break,
                        }
                        batch += 1;
                    }
                    view.settle();
                    for peer in view.guard.take_relists() {
                        let _ = relist_tx.send(peer);
                    }
                    if !view.has_unpublished() || publish_at.is_some() {
                        continue;
                    }
                    let now = tokio::time::Instant::now();
                    let quiet = now >= last_publish + spacing;
                    if quiet && batch < SMALL_BATCH {
                        spacing = timed_publish(&mut view, &trust_tx);
                        last_publish = tokio::time::Instant::now();
                    } else {
                        publish_at = Some(last_publish + spacing.max(PUBLISH_INTERVAL));
                    }
                }
            }
        });
        Self {
            handles,
            shutdown,
            tasks,
        }
    }

    /// Subscriptions to the view and status.
    pub fn handles(&self) -> ViewHandles {
        self.handles.clone()
    }

    /// Stops everything (peer data is kept until the process ends).
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// The merged view behind the peer guard: cluster events pass the guard first.
#[derive(Debug)]
struct Guarded {
    guard: PeerGuard,
    view: MergedView,
    buf: Vec<ClusterEvent>,
}

impl Guarded {
    fn apply(&mut self, ev: ClusterEvent) {
        self.guard.apply(ev, &mut self.buf);
        for ev in self.buf.drain(..) {
            self.view.apply(ev);
        }
    }

    /// Lets the guard re-judge what range changes affect (after a batch).
    fn settle(&mut self) {
        self.guard.settle(&mut self.buf);
        for ev in self.buf.drain(..) {
            self.view.apply(ev);
        }
    }

    fn has_unpublished(&self) -> bool {
        self.view.has_unpublished()
    }

    fn set_clusterset_ip(&mut self, namespace: &str, name: &str, ip: Option<IpAddr>) {
        self.view.set_clusterset_ip(namespace, name, ip);
    }
}

/// Publishes (the view's snapshots and the guard's status) and returns how long to wait
/// before the next publish under load.
fn timed_publish(view: &mut Guarded, trust: &watch::Sender<Vec<PeerTrust>>) -> Duration {
    let t = std::time::Instant::now();
    view.view.publish();
    let elapsed = t.elapsed();
    let status = view.guard.status();
    trust.send_if_modified(|s| {
        let changed = *s != status;
        *s = status;
        changed
    });
    elapsed * 10
}

fn apply(view: &mut Guarded, input: Input) {
    match input {
        Input::Cluster(ev) => view.apply(ev),
        Input::ClusterSetIp(ev) => match ev {
            Event::InitApply((ns, name), ip) | Event::Apply((ns, name), ip) => {
                view.set_clusterset_ip(&ns, &name, Some(ip));
            }
            Event::Delete((ns, name)) => view.set_clusterset_ip(&ns, &name, None),
            Event::Init | Event::InitDone => {}
        },
    }
}
