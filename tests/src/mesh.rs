//! `TestCluster`: one cluster of a test mesh on this machine — its own etcd (TLS + auth),
//! an exporter fed through a channel, optional kvstoremesh — and `connect` to peer two.

use std::sync::Arc;
use std::time::Duration;

use clustermesh_apiserver::bootstrap;
use clustermesh_apiserver::export::ExportConfig;
use clustermesh_apiserver::kvstoremesh::{self, KvStoreMeshConfig};
use clustermesh_apiserver::source::{ChannelSource, Object, SourceEvent};
use mesh_agent::runtime::{Agent, AgentConfig, PeerAccess};
use mesh_certs::{CertRequest, Role};
use meshd::kv::KvStore;
use meshd::metrics::ReflectorMetrics;
use meshd::model::{ClusterId, ClusterName, MaxConnectedClusters};
use meshd::peers::{PeerCredential, write_peer_file};
use meshd::remote::{PeerStatus, SupervisorConfig};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::EtcdGuard;
use crate::exporter::RunningExporter;

/// One cluster of a test mesh.
#[derive(Debug)]
pub struct TestCluster {
    /// Name.
    pub name: ClusterName,
    /// ID.
    pub id: ClusterId,
    /// Its etcd.
    pub etcd: EtcdGuard,
    /// Root store of its etcd.
    pub store: Arc<dyn KvStore>,
    /// Feeds the exporter's source.
    pub source: mpsc::Sender<SourceEvent>,
    /// The exporter.
    pub exporter: RunningExporter,
    /// Peers directory (kvstoremesh and agents of this cluster read it).
    pub peers_dir: tempfile::TempDir,
    kvstoremesh: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
    background: Vec<(CancellationToken, tokio::task::JoinHandle<()>)>,
    /// kvstoremesh's view of its peers.
    pub kvstoremesh_status: Option<watch::Receiver<Vec<PeerStatus>>>,
}

/// Short timeouts so fault tests run fast.
pub fn supervisor_config(name: &ClusterName, id: ClusterId) -> SupervisorConfig {
    let mut c = SupervisorConfig::new(name.clone(), id, MaxConnectedClusters::C255);
    c.heartbeat_check = Duration::from_millis(500);
    c.heartbeat_timeout = Duration::from_secs(20);
    c.sync_timeout = Duration::from_secs(20);
    c.backoff = meshd::backoff::BackoffConfig {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(1),
    };
    c
}

impl TestCluster {
    /// Starts etcd, bootstraps it, and exports `objects`.
    pub async fn start(name: &str, id: u32, objects: Vec<Object>) -> anyhow::Result<Self> {
        Box::pin(Self::start_with(name, id, objects, |_| {})).await
    }

    /// Like [`Self::start`], with the exporter's config adjusted by `configure` (e.g. a
    /// short identity GC grace so deleted pods' identities go away within a test).
    pub async fn start_with(
        name: &str,
        id: u32,
        objects: Vec<Object>,
        configure: impl FnOnce(&mut ExportConfig),
    ) -> anyhow::Result<Self> {
        let name = ClusterName::new(name)?;
        let id = ClusterId::new(id, MaxConnectedClusters::C255)?;
        // Boxed: these futures are large and the caller's stays small.
        let etcd = Box::pin(EtcdGuard::start()).await?;
        let root = etcd.root_store().await?;
        Box::pin(bootstrap::bootstrap(&root.client(), &name)).await?;
        let store: Arc<dyn KvStore> = Arc::new(root);
        let mut cfg = ExportConfig::new(name.clone(), id, MaxConnectedClusters::C255);
        cfg.heartbeat_interval = Duration::from_secs(1);
        configure(&mut cfg);
        let (tx, src) = ChannelSource::new(4096);
        let mut exporter = RunningExporter::start(store.clone(), cfg, Box::new(src));
        for o in objects {
            tx.send(SourceEvent::Apply(o)).await?;
        }
        tx.send(SourceEvent::Synced).await?;
        Box::pin(exporter.wait_ready(Duration::from_secs(60))).await?;
        Ok(Self {
            name,
            id,
            etcd,
            store,
            source: tx,
            exporter,
            peers_dir: tempfile::tempdir()?,
            kvstoremesh: None,
            kvstoremesh_status: None,
            background: Vec::new(),
        })
    }

    /// Starts kvstoremesh, mirroring this cluster's peers into its etcd.
    pub fn start_kvstoremesh(&mut self) {
        self.start_kvstoremesh_with(
            meshd::trust::PeerLimits::default(),
            meshd::metrics::TrustMetrics::default(),
        );
    }

    /// Starts kvstoremesh with per-peer `limits`, counting its refusals into `trust`.
    pub fn start_kvstoremesh_with(
        &mut self,
        limits: meshd::trust::PeerLimits,
        trust: meshd::metrics::TrustMetrics,
    ) {
        let shutdown = CancellationToken::new();
        let (tx, rx) = watch::channel(Vec::new());
        let cfg = KvStoreMeshConfig {
            supervisor: supervisor_config(&self.name, self.id),
            peers_dir: self.peers_dir.path().to_owned(),
            heartbeat_mirror: Duration::from_millis(200),
            limits,
            trust_metrics: trust,
        };
        let task = tokio::spawn({
            let (store, shutdown) = (self.store.clone(), shutdown.clone());
            async move {
                if let Err(e) =
                    kvstoremesh::run(store, cfg, ReflectorMetrics::default(), tx, shutdown).await
                {
                    tracing::error!(error = %e, "kvstoremesh failed");
                }
            }
        });
        self.kvstoremesh = Some((shutdown, task));
        self.kvstoremesh_status = Some(rx);
    }

    /// Starts ClusterSetIP allocation from `cidr` (the apiserver's job) until the cluster
    /// is dropped.
    pub fn start_clusterset(&mut self, cidr: &str) -> anyhow::Result<()> {
        let cfg = clustermesh_apiserver::clusterset::ClusterSetConfig::new(cidr.parse()?);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let (store, shutdown) = (self.store.clone(), shutdown.clone());
            async move {
                if let Err(e) = clustermesh_apiserver::clusterset::run(store, cfg, shutdown).await {
                    tracing::error!(error = %e, "clusterset allocation failed");
                }
            }
        });
        self.background.push((shutdown, task));
        Ok(())
    }

    /// Starts an agent of this cluster.
    pub fn start_agent(&self, access: PeerAccess) -> Agent {
        self.start_agent_with(access, ReflectorMetrics::default())
    }

    /// Starts an agent of this cluster whose peer guard has `limits` and counts into
    /// `trust`.
    pub fn start_agent_with_limits(
        &self,
        access: PeerAccess,
        limits: meshd::trust::PeerLimits,
        trust: meshd::metrics::TrustMetrics,
    ) -> Agent {
        self.start_agent_full(access, ReflectorMetrics::default(), limits, trust)
    }

    /// Starts an agent of this cluster counting into `metrics`.
    pub fn start_agent_with(&self, access: PeerAccess, metrics: ReflectorMetrics) -> Agent {
        self.start_agent_full(
            access,
            metrics,
            meshd::trust::PeerLimits::default(),
            meshd::metrics::TrustMetrics::default(),
        )
    }

    fn start_agent_full(
        &self,
        access: PeerAccess,
        metrics: ReflectorMetrics,
        limits: meshd::trust::PeerLimits,
        trust_metrics: meshd::metrics::TrustMetrics,
    ) -> Agent {
        let mut supervisor = supervisor_config(&self.name, self.id);
        if access == PeerAccess::Cached {
            // The cache's heartbeat copy moves only when kvstoremesh sees a new one.
            supervisor.heartbeat_timeout = Duration::from_secs(30);
        }
        Agent::start(
            AgentConfig {
                supervisor,
                peers_dir: self.peers_dir.path().to_owned(),
                access,
                limits,
                trust_metrics,
            },
            self.store.clone(),
            metrics,
        )
    }

    /// The credential with which `reader` reads this cluster (creates `remote-<reader>`).
    pub async fn credential_for(&self, reader: &ClusterName) -> anyhow::Result<PeerCredential> {
        let root = self.etcd.root_store().await?;
        bootstrap::add_remote_user(&root.client(), reader).await?;
        let cert = self.etcd.ca().issue(
            &CertRequest::client(&bootstrap::remote_user(reader))
                .with_role(self.name.as_str(), Role::Peer),
        )?;
        Ok(PeerCredential {
            name: self.name.clone(),
            cluster_id: self.id,
            max_connected_clusters: MaxConnectedClusters::C255,
            server: self.etcd.endpoint(),
            ca_pem: self.etcd.ca().cert_pem().to_owned(),
            cert_pem: cert.cert_pem,
            key_pem: cert.key_pem,
            tls_server_name: Some("localhost".into()),
        })
    }

    /// Stops kvstoremesh (keeps the cache).
    pub async fn stop_kvstoremesh(&mut self) {
        if let Some((t, task)) = self.kvstoremesh.take() {
            t.cancel();
            let _ = task.await;
        }
    }
}

/// Peers `a` and `b` both ways (credentials written into each one's peers directory).
pub async fn connect(a: &TestCluster, b: &TestCluster) -> anyhow::Result<()> {
    let a_reads_b = b.credential_for(&a.name).await?;
    let b_reads_a = a.credential_for(&b.name).await?;
    write_peer_file(
        a.peers_dir.path(),
        &a_reads_b,
        &bootstrap::remote_user(&a.name),
    )?;
    write_peer_file(
        b.peers_dir.path(),
        &b_reads_a,
        &bootstrap::remote_user(&b.name),
    )?;
    Ok(())
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for (t, task) in self.background.drain(..) {
            t.cancel();
            task.abort();
        }
        if let Some((t, task)) = self.kvstoremesh.take() {
            t.cancel();
            task.abort();
        }
    }
}
