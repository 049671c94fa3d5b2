//! The clustermesh-apiserver process: arguments, wiring of exporter, gRPC and health
//! servers, and shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use meshd::args::{EtcdArgs, parse_duration};
use meshd::kv::{EtcdStore, KvStore};
use meshd::model::{ClusterId, ClusterName, MaxConnectedClusters};
use meshd::process::{Components, bind};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ClusterMeshApi};
use crate::export::{self, ExportConfig, ExportMetrics, ExportStatus};
use crate::health;
use crate::source::Source;
use crate::source::kube::{KubeSource, KubeSourceConfig};
use crate::source::manifest::ManifestSource;

/// Where the cluster's objects come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceKind {
    /// A directory of manifests (`--manifests`), watched for changes (standalone mode).
    Manifests,
    /// The cluster's Kubernetes API (`--kubeconfig`, default in-cluster).
    Kubernetes,
}

/// Which cluster this is. Like `meshd::args::ClusterArgs`, except that in Kubernetes mode
/// the name may come from the KEP-2149 `ClusterProperty` instead.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiserverClusterArgs {
    /// Name of this cluster (RFC 1123 label, at most 32 characters). With `--source
    /// kubernetes` it defaults to the ClusterProperty `cluster.clusterset.k8s.io` (else
    /// `id.k8s.io`).
    #[arg(long, env = "MESH_CLUSTER_NAME")]
    pub cluster_name: Option<ClusterName>,
    /// Numeric ID of this cluster (1-255, or 1-511 with --max-connected-clusters 511).
    #[arg(long, env = "MESH_CLUSTER_ID")]
    pub cluster_id: u32,
    /// Mesh size: 255 or 511. Every cluster of a mesh must use the same value.
    #[arg(long, env = "MESH_MAX_CONNECTED_CLUSTERS", default_value_t = 255)]
    pub max_connected_clusters: u32,
}

/// clustermesh-apiserver: exports this cluster's identities, endpoints, nodes and services
/// into its etcd, where peers read them over mTLS.
#[derive(Debug, Parser)]
#[command(name = "clustermesh-apiserver", version, about)]
pub struct Args {
    /// This cluster.
    #[command(flatten)]
    pub cluster: ApiserverClusterArgs,
    /// This cluster's etcd (client certificate of user `apiserver-<cluster>`).
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Where the cluster's objects come from.
    #[arg(long, env = "MESH_SOURCE", value_enum, default_value = "manifests")]
    pub source: SourceKind,
    /// Directory of Kubernetes manifests to export (`--source manifests`), watched for
    /// changes.
    #[arg(long, env = "MESH_MANIFESTS")]
    pub manifests: Option<PathBuf>,
    /// Kubeconfig of the cluster's API server (`--source kubernetes`, and peer Secrets);
    /// default: the in-cluster service account. `$KUBECONFIG` is not read.
    #[arg(long, env = "MESH_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Context of --kubeconfig (default: its current context).
    #[arg(long, env = "MESH_KUBE_CONTEXT", requires = "kubeconfig")]
    pub kube_context: Option<String>,
    /// Namespace whose Secrets `meshd-peer-<remote>` (label meshd.io/peer=true, key
    /// kubeconfig) name the peers (Kubernetes mode); replaces --peers-dir.
    #[arg(
        long,
        env = "MESH_PEER_SECRETS_NAMESPACE",
        conflicts_with = "peers_dir"
    )]
    pub peer_secrets_namespace: Option<String>,
    /// Client certificate with CN `root` (PEM): when set, the etcd users, roles and auth
    /// of DESIGN §5 are bootstrapped (idempotently) before the apiserver starts — for an
    /// etcd started empty next to it (the Helm chart's sidecar).
    #[arg(
        long,
        env = "MESH_ETCD_BOOTSTRAP_CERT",
        requires = "etcd_bootstrap_key"
    )]
    pub etcd_bootstrap_cert: Option<PathBuf>,
    /// Key of --etcd-bootstrap-cert.
    #[arg(
        long,
        env = "MESH_ETCD_BOOTSTRAP_KEY",
        requires = "etcd_bootstrap_cert"
    )]
    pub etcd_bootstrap_key: Option<PathBuf>,
    /// Write MCS status back (`--source kubernetes`): ServiceExport conditions (Valid, Ready,
    /// Conflict) and a ServiceImport per global service in each namespace that exists.
    #[arg(long, env = "MESH_MCS_STATUS", default_value_t = true, action = clap::ArgAction::Set)]
    pub mcs_status: bool,
    /// Name of this replica (identity references are per replica).
    #[arg(long, env = "MESH_REPLICA", default_value = "apiserver-0")]
    pub replica: String,
    /// Address of the mTLS gRPC API.
    #[arg(long, env = "MESH_GRPC_LISTEN", default_value = "127.0.0.1:9443")]
    pub grpc_listen: SocketAddr,
    /// Server certificate of the gRPC API (PEM; reloaded when it changes).
    #[arg(long, env = "MESH_GRPC_CERT")]
    pub grpc_cert: PathBuf,
    /// Server key of the gRPC API (PEM; reloaded when it changes).
    #[arg(long, env = "MESH_GRPC_KEY")]
    pub grpc_key: PathBuf,
    /// CA whose client certificates the gRPC API accepts.
    #[arg(long, env = "MESH_GRPC_CLIENT_CA")]
    pub grpc_client_ca: PathBuf,
    /// Address of the plain-HTTP /healthz, /readyz and /metrics endpoints.
    #[arg(long, env = "MESH_HEALTH_LISTEN", default_value = "127.0.0.1:9090")]
    pub health_listen: SocketAddr,
    /// How often `mesh/heartbeat` is refreshed.
    #[arg(long, value_parser = parse_duration, default_value = "15s")]
    pub heartbeat_interval: Duration,
    /// TTL of this replica's lease (identity references).
    #[arg(long, value_parser = parse_duration, default_value = "15s")]
    pub lease_ttl: Duration,
    /// How long an identity must stay unused before it is deleted.
    #[arg(long, value_parser = parse_duration, default_value = "5m")]
    pub identity_gc_grace: Duration,
    /// Directory of peer kubeconfigs (`<peer>.kubeconfig`); kvstoremesh mirrors each peer
    /// into this cluster's etcd under `mesh/cache/`.
    #[arg(long, env = "MESH_PEERS_DIR")]
    pub peers_dir: Option<PathBuf>,
    /// Run kvstoremesh (needs --peers-dir). `--kvstoremesh false` leaves peers to agents
    /// reading them directly.
    #[arg(long, env = "MESH_KVSTOREMESH", default_value_t = true, action = clap::ArgAction::Set)]
    pub kvstoremesh: bool,
    /// How long kvstoremesh keeps an unreachable peer's data (0 = forever).
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub remote_cache_ttl: Duration,
    /// Per-peer quotas kvstoremesh enforces before it writes a peer's data.
    #[command(flatten)]
    pub peer_limits: meshd::args::PeerLimitArgs,
    /// CIDR from which every global service of the mesh gets a ClusterSetIP in this
    /// cluster (unset: no ClusterSetIPs).
    #[arg(long, env = "MESH_CLUSTERSET_CIDR")]
    pub clusterset_cidr: Option<ipnet::IpNet>,
    /// The identity relay peers dial instead of etcd (off without --relay-listen).
    #[command(flatten)]
    pub relay: crate::relay::RelayArgs,
    /// Only parse --manifests, print every problem with its location, and exit (1 when any
    /// manifest is bad); nothing is connected or started. `meshctl up` runs this first.
    #[arg(long)]
    pub check: bool,
}

/// How often MCS status (ServiceExport conditions, ServiceImports) is reconciled.
const MCS_STATUS_INTERVAL: Duration = Duration::from_secs(2);

/// Why the process could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A command-line value is invalid.
    #[error("invalid argument: {0}")]
    Args(#[from] meshd::model::ModelError),
    /// A file named on the command line could not be read.
    #[error(transparent)]
    File(#[from] meshd::args::ArgFileError),
    /// Connecting to etcd failed.
    #[error("connecting to etcd: {0}")]
    Etcd(#[from] meshd::kv::KvError),
    /// A listener could not be bound.
    #[error(transparent)]
    Bind(#[from] meshd::process::BindError),
    /// The gRPC API failed.
    #[error(transparent)]
    Api(#[from] api::ApiError),
    /// The export failed for good.
    #[error(transparent)]
    Export(#[from] export::ExportError),
    /// The health server failed.
    #[error("health server: {0}")]
    Health(std::io::Error),
    /// kvstoremesh failed for good.
    #[error("kvstoremesh: {0}")]
    KvStoreMesh(meshd::kv::KvError),
    /// ClusterSetIP allocation failed for good.
    #[error(transparent)]
    ClusterSet(#[from] crate::clusterset::ClusterSetError),
    /// The Kubernetes API could not be used.
    #[error(transparent)]
    Kube(#[from] meshd::kube::KubeError),
    /// The cluster name could not be read from the ClusterProperty.
    #[error(transparent)]
    ClusterProperty(#[from] crate::source::kube::cluster::ClusterPropertyError),
    /// A required setting is missing.
    #[error("{0}")]
    Missing(String),
    /// Bootstrapping etcd's users and roles failed.
    #[error(transparent)]
    Bootstrap(#[from] crate::bootstrap::BootstrapError),
    /// The identity relay could not be set up.
    #[error(transparent)]
    Relay(#[from] crate::relay::RelayError),
    /// `--check` found bad manifests.
    #[error("{} problem(s) in the manifests under {}:\n{}", .problems.len(), .dir.display(), .problems.join("\n"))]
    Manifests {
        /// The manifest directory.
        dir: PathBuf,
        /// One line per problem: `<location>: <message>`.
        problems: Vec<String>,
    },
}

/// `--check`: parses every manifest under `dir` the way the running source would and
/// returns how many objects it holds, or every problem with its location.
pub fn check_manifests(dir: &std::path::Path) -> Result<usize, AppError> {
    ManifestSource::new(dir.to_owned())
        .check()
        .map_err(|errors| AppError::Manifests {
            dir: dir.to_owned(),
            problems: errors
                .iter()
                .map(|e| format!("{}: {}", e.location, e.message))
                .collect(),
        })
}

impl Args {
    /// The export configuration these arguments describe (the cluster name must be given).
    pub fn export_config(&self) -> Result<ExportConfig, AppError> {
        let name = self.cluster.cluster_name.clone().ok_or_else(|| {
            AppError::Missing(
                "--cluster-name is required (with --source kubernetes it may come from the ClusterProperty cluster.clusterset.k8s.io)".into(),
            )
        })?;
        self.export_config_for(name)
    }

    /// The export configuration for cluster `name`.
    pub fn export_config_for(&self, name: ClusterName) -> Result<ExportConfig, AppError> {
        let mode = MaxConnectedClusters::from_u32(self.cluster.max_connected_clusters)?;
        let id = ClusterId::new(self.cluster.cluster_id, mode)?;
        let mut cfg = ExportConfig::new(name, id, mode);
        cfg.replica.clone_from(&self.replica);
        cfg.heartbeat_interval = self.heartbeat_interval;
        cfg.lease_ttl = self.lease_ttl;
        cfg.gc_grace = self.identity_gc_grace;
        cfg.gc_interval = (self.identity_gc_grace / 5).max(Duration::from_secs(1));
        Ok(cfg)
    }
}

/// Runs until `shutdown` is cancelled (or a component fails), then shuts down gracefully.
pub async fn run(args: Args, shutdown: CancellationToken) -> Result<(), AppError> {
    let kube = if args.source == SourceKind::Kubernetes || args.peer_secrets_namespace.is_some() {
        Some(
            meshd::kube::client_from_kubeconfig(
                args.kubeconfig.as_deref(),
                args.kube_context.as_deref(),
            )
            .await?,
        )
    } else {
        None
    };
    let cfg = match (&args.cluster.cluster_name, &kube) {
        (Some(name), _) => args.export_config_for(name.clone())?,
        (None, Some(client)) if args.source == SourceKind::Kubernetes => {
            match crate::source::kube::cluster::cluster_name(client).await? {
                Some((property, name)) => {
                    tracing::info!(%name, property, "cluster name from ClusterProperty");
                    args.export_config_for(name)?
                }
                None => {
                    return Err(AppError::Missing(
                        "no --cluster-name and no ClusterProperty cluster.clusterset.k8s.io or id.k8s.io".into(),
                    ));
                }
            }
        }
        (None, _) => args.export_config()?,
    };
    let source: Box<dyn Source> = match (args.source, &args.manifests, &kube) {
        (SourceKind::Manifests, Some(dir), _) => Box::new(ManifestSource::new(dir.clone())),
        (SourceKind::Manifests, None, _) => {
            return Err(AppError::Missing(
                "--manifests is required with --source manifests".into(),
            ));
        }
        (SourceKind::Kubernetes, _, Some(client)) => {
            Box::new(KubeSource::new(client.clone(), KubeSourceConfig::default()))
        }
        (SourceKind::Kubernetes, _, None) => {
            return Err(AppError::Missing("no Kubernetes client".into()));
        }
    };
    if let (Some(cert), Some(key)) = (&args.etcd_bootstrap_cert, &args.etcd_bootstrap_key) {
        let read = |what: &'static str, path: &PathBuf| {
            std::fs::read_to_string(path).map_err(|source| meshd::args::ArgFileError {
                what,
                path: path.clone(),
                source,
            })
        };
        let mut root = args.etcd.load()?;
        root.cert_pem = Some(read("--etcd-bootstrap-cert", cert)?);
        root.key_pem = Some(read("--etcd-bootstrap-key", key)?);
        let root = EtcdStore::connect(&root).await?;
        let report = crate::bootstrap::bootstrap(&root.client(), &cfg.cluster).await?;
        tracing::info!(?report, "etcd bootstrapped");
    }
    let store: Arc<dyn KvStore> = Arc::new(EtcdStore::connect(&args.etcd.load()?).await?);
    let client_ca = std::fs::read_to_string(&args.grpc_client_ca).map_err(|source| {
        meshd::args::ArgFileError {
            what: "--grpc-client-ca",
            path: args.grpc_client_ca.clone(),
            source,
        }
    })?;
    let (tls, _cert) = api::server_tls(args.grpc_cert.clone(), args.grpc_key.clone(), &client_ca)?;
    let relay = crate::relay::RelayConfig::from_args(&args.relay, &args.etcd.load()?)?;
    let grpc = bind("the gRPC API", args.grpc_listen).await?;
    let relay = match relay {
        Some((addr, rcfg)) => Some((bind("the relay", addr).await?, rcfg)),
        None => None,
    };
    let health_listener = bind("the health endpoint", args.health_listen).await?;
    tracing::info!(
        cluster = %cfg.cluster,
        id = %cfg.cluster_id,
        grpc = %args.grpc_listen,
        health = %args.health_listen,
        relay = ?args.relay.relay_listen,
        source = ?args.source,
        "clustermesh-apiserver starting"
    );

    let metrics = ExportMetrics::default();
    let reflector_metrics = meshd::metrics::ReflectorMetrics::default();
    let clusterset_cfg = args
        .clusterset_cidr
        .map(crate::clusterset::ClusterSetConfig::new);
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    reflector_metrics.register(&mut registry);
    let trust_metrics = meshd::metrics::TrustMetrics::default();
    trust_metrics.register(&mut registry);
    if let Some(c) = &clusterset_cfg {
        c.metrics.register(&mut registry);
    }
    let relay = match relay {
        Some((listener, rcfg)) => {
            let m = crate::relay::RelayMetrics::default();
            m.register(&mut registry);
            Some((listener, crate::relay::Relay::new(rcfg, m)?))
        }
        None => None,
    };
    let registry = Arc::new(registry);
    let (status_tx, status) = watch::channel(ExportStatus::default());

    // Any component ending stops the others.
    let stop = shutdown.child_token();
    let mut parts = Components::new(stop.clone());
    let (peers_tx, peers_rx) = watch::channel(Vec::new());
    let api = ClusterMeshApi::new(cfg.clone(), status.clone(), store.clone()).with_peers(peers_rx);
    parts.spawn({
        let stop = stop.clone();
        async move {
            api::serve_grpc(grpc, tls, api, stop.clone())
                .await
                .map_err(AppError::from)
        }
    });
    parts.spawn({
        let (stop, status, registry) = (stop.clone(), status.clone(), registry.clone());
        async move {
            health::serve_health(health_listener, status, registry, stop.clone())
                .await
                .map_err(AppError::Health)
        }
    });
    if let Some((listener, relay)) = relay {
        let stop = stop.clone();
        parts.spawn(async move {
            relay.run(listener, stop).await;
            Ok(())
        });
    }
    let peer_events = match (&args.peer_secrets_namespace, &kube, &args.peers_dir) {
        (Some(ns), Some(client), _) => Some(
            meshd::kube::PeerSecretWatcher::new(client.clone(), ns.clone())
                .with_events("clustermesh-apiserver", Some(args.replica.clone()))
                .run(stop.child_token()),
        ),
        (None, _, Some(dir)) => {
            Some(meshd::peers::PeerDirWatcher::new(dir.clone()).run(stop.child_token()))
        }
        _ => None,
    };
    if let (Some(peers), true) = (peer_events, args.kvstoremesh) {
        let mut supervisor =
            meshd::remote::SupervisorConfig::new(cfg.cluster.clone(), cfg.cluster_id, cfg.mode);
        supervisor.cache_ttl = args.remote_cache_ttl;
        let kcfg = crate::kvstoremesh::KvStoreMeshConfig {
            supervisor,
            peers_dir: args.peers_dir.clone().unwrap_or_default(),
            heartbeat_mirror: Duration::from_millis(250),
            limits: args.peer_limits.limits(),
            trust_metrics: trust_metrics.clone(),
        };
        parts.spawn({
            let (stop, store, m) = (stop.clone(), store.clone(), reflector_metrics.clone());
            async move {
                crate::kvstoremesh::run_with_peers(store, kcfg, m, peers_tx, peers, stop.clone())
                    .await
                    .map_err(AppError::KvStoreMesh)
            }
        });
    }
    if let Some(mut ccfg) = clusterset_cfg {
        ccfg.reflector_metrics = reflector_metrics.clone();
        parts.spawn({
            let (stop, store) = (stop.clone(), store.clone());
            async move {
                crate::clusterset::run(store, ccfg, stop.clone())
                    .await
                    .map_err(AppError::from)
            }
        });
    }
    if let (true, SourceKind::Kubernetes, Some(client)) = (args.mcs_status, args.source, &kube) {
        let (client, store, local, stop) = (
            client.clone(),
            store.clone(),
            cfg.cluster.clone(),
            stop.clone(),
        );
        parts.spawn(async move {
            crate::source::kube::status::run(client, store, local, MCS_STATUS_INTERVAL, stop).await;
            Ok(())
        });
    }
    parts.spawn({
        let stop = stop.clone();
        async move {
            export::run(store, cfg, source, metrics, status_tx, stop.clone())
                .await
                .map_err(AppError::from)
        }
    });
    parts.join().await
}
