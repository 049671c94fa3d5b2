//! The mesh-agent process: arguments, wiring of the runtime, gRPC API, health and metrics, and shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use meshd::args::{ArgFileError, ClusterArgs, EtcdArgs, parse_duration};
use meshd::kv::{EtcdStore, KvStore};
use meshd::process::{Components, bind};
use meshd::remote::SupervisorConfig;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::api::{self, AgentApi};
use crate::datapath::iface::RouteResolver;
use crate::datapath::sync::{DatapathMetrics, SyncConfig, SyncInputs, Syncer};
use crate::datapath::{AyaConfig, AyaDatapath, Datapath, DatapathError, RecordingDatapath};
use crate::metrics::{self, AgentMetrics};
use crate::runtime::{Agent, AgentConfig, PeerAccess};

/// mesh-agent: follows this cluster's and its peers' exported state, merges it into one
/// view, and serves it over an mTLS gRPC API with health and metrics endpoints.
#[derive(Debug, Parser)]
#[command(name = "mesh-agent", version, about)]
pub struct Args {
    /// This cluster.
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// This cluster's etcd (read-only access to `mesh/` is enough).
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Directory of peer kubeconfigs (`<peer>.kubeconfig`), watched for changes.
    #[arg(
        long,
        env = "MESH_PEERS_DIR",
        required_unless_present = "peer_secrets_namespace"
    )]
    pub peers_dir: Option<PathBuf>,
    /// Kubernetes mode: namespace whose Secrets `meshd-peer-<remote>` (label
    /// meshd.io/peer=true, key kubeconfig) name the peers; replaces --peers-dir.
    #[arg(
        long,
        env = "MESH_PEER_SECRETS_NAMESPACE",
        conflicts_with = "peers_dir"
    )]
    pub peer_secrets_namespace: Option<String>,
    /// Kubeconfig for --peer-secrets-namespace (default: in-cluster configuration).
    #[arg(long, env = "MESH_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Context of --kubeconfig (default: its current context).
    #[arg(long, env = "MESH_KUBE_CONTEXT")]
    pub kube_context: Option<String>,
    /// How peers are read: from the local etcd's kvstoremesh cache, or straight from
    /// each peer's etcd with its credential.
    #[arg(long, env = "MESH_PEER_ACCESS", value_enum, default_value_t = AccessArg::Cached)]
    pub peer_access: AccessArg,
    /// Per-peer quotas of the peer guard.
    #[command(flatten)]
    pub peer_limits: meshd::args::PeerLimitArgs,
    /// How long an unreachable peer's data is kept ("0": forever).
    #[arg(long, env = "MESH_REMOTE_CACHE_TTL", value_parser = parse_ttl, default_value = "0")]
    pub remote_cache_ttl: Duration,
    /// A peer heartbeat older than this fails the connection.
    #[arg(long, env = "MESH_HEARTBEAT_TIMEOUT", value_parser = parse_duration, default_value = "60s")]
    pub heartbeat_timeout: Duration,
    /// Address of the mTLS gRPC API.
    #[arg(long, env = "MESH_GRPC_LISTEN", default_value = "127.0.0.1:9444")]
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
    #[arg(long, env = "MESH_HEALTH_LISTEN", default_value = "127.0.0.1:9091")]
    pub health_listen: SocketAddr,
    /// Datapath: `ebpf` (fail without BPF), `recording` (enforce nothing, on purpose), or
    /// `auto` (eBPF; when the kernel refuses it or no bpffs is mounted, fail — or, only with
    /// --datapath-fallback, run the recording datapath and never report ready).
    #[arg(long, env = "MESH_DATAPATH", value_enum, default_value_t = DatapathArg::Auto)]
    pub datapath: DatapathArg,
    /// Let `--datapath auto` fall back to the recording datapath (nothing enforced) when
    /// eBPF cannot be opened. The agent then serves DNS and status but stays not ready,
    /// and says why in its log, status and metrics. Without it, it fails closed.
    #[arg(long, env = "MESH_DATAPATH_FALLBACK")]
    pub datapath_fallback: bool,
    /// bpffs directory of this agent's pinned maps and links (default
    /// `/sys/fs/bpf/meshd/<cluster>`; must be on a mounted bpffs).
    #[arg(long, env = "MESH_BPF_PIN_DIR")]
    pub bpf_pin_dir: Option<PathBuf>,
    /// cgroup v2 directory the socket load balancer attaches to (default: the cgroup2
    /// mount, i.e. every process of the machine).
    #[arg(long, env = "MESH_CGROUP")]
    pub cgroup: Option<PathBuf>,
    /// UDP+TCP address of the `clusterset.local` DNS server (unset: no DNS server).
    #[arg(long, env = "MESH_DNS_LISTEN")]
    pub dns_listen: Option<SocketAddr>,
    /// TTL of DNS answers (and of negative answers), e.g. 5s.
    #[arg(long, env = "MESH_DNS_TTL", value_parser = parse_duration, default_value = "5s")]
    pub dns_ttl: Duration,
    /// Upstream DNS server(s) for names outside `clusterset.local` (`ip:port`, repeat or
    /// comma-separate); none: such queries are REFUSED.
    #[arg(long, env = "MESH_DNS_UPSTREAM", value_delimiter = ',')]
    pub dns_upstream: Vec<SocketAddr>,
    /// Most addresses in the answer for a headless service name.
    #[arg(long, env = "MESH_DNS_MAX_HEADLESS_ANSWERS", default_value_t = 64)]
    pub dns_max_headless_answers: usize,
}

/// `--datapath` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DatapathArg {
    /// eBPF; recording only when `--datapath-fallback` allows it.
    Auto,
    /// eBPF or fail.
    Ebpf,
    /// In-memory maps only: nothing is enforced.
    Recording,
}

/// `--peer-access` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccessArg {
    /// From the local etcd's kvstoremesh cache (one watcher per cluster on each peer).
    Cached,
    /// From each peer's etcd.
    Direct,
}

impl From<AccessArg> for PeerAccess {
    fn from(a: AccessArg) -> Self {
        match a {
            AccessArg::Cached => Self::Cached,
            AccessArg::Direct => Self::Direct,
        }
    }
}

/// A duration like `parse_duration`'s, or a bare `0`.
fn parse_ttl(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        Ok(Duration::ZERO)
    } else {
        parse_duration(s)
    }
}

/// Why the process could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A command-line value is invalid.
    #[error("invalid argument: {0}")]
    Args(#[from] meshd::model::ModelError),
    /// A file named on the command line could not be read.
    #[error(transparent)]
    File(#[from] ArgFileError),
    /// Connecting to etcd failed.
    #[error("connecting to etcd: {0}")]
    Etcd(#[from] meshd::kv::KvError),
    /// A listener could not be bound.
    #[error(transparent)]
    Bind(#[from] meshd::process::BindError),
    /// The gRPC API failed.
    #[error(transparent)]
    Api(#[from] mesh_proto::server::ServeError),
    /// The health server failed.
    #[error("health server: {0}")]
    Health(std::io::Error),
    /// The eBPF datapath could not be opened.
    #[error("opening the datapath (use --datapath recording to run without one): {0}")]
    Datapath(#[from] DatapathError),
    /// `--datapath auto` found no usable eBPF and no fallback was allowed.
    #[error(
        "no eBPF datapath ({reason}); refusing to run without enforcement (fails closed): \
         allow the recording fallback with --datapath-fallback, or choose --datapath recording"
    )]
    NoDatapath {
        /// Why eBPF cannot run.
        reason: String,
    },
    /// The DNS server failed.
    #[error(transparent)]
    Dns(#[from] crate::dns::DnsError),
    /// The Kubernetes client for peer Secrets could not be built.
    #[error("Kubernetes (peer Secrets): {0}")]
    Kube(#[from] meshd::kube::KubeError),
}

/// Whether `dir` is on (or would be created on) a mounted bpffs, from `/proc/mounts`.
fn on_bpffs(dir: &std::path::Path) -> bool {
    meshd::mounts::is_on(dir, "bpf")
}

/// Opens the datapath `--datapath` asks for; the string is why the recording datapath
/// runs as a fallback (`None` for eBPF, and for recording chosen with `--datapath
/// recording`). Without `allow_fallback`, `auto` fails closed where eBPF cannot run.
pub fn open_datapath(
    choice: DatapathArg,
    allow_fallback: bool,
    config: AyaConfig,
) -> Result<(Box<dyn Datapath>, Option<String>), AppError> {
    let fallback = |reason: String| -> Result<(Box<dyn Datapath>, Option<String>), AppError> {
        if !allow_fallback {
            return Err(AppError::NoDatapath { reason });
        }
        tracing::warn!(
            reason,
            "running the RECORDING datapath as a fallback; no load balancing or policy is enforced and the agent stays not ready"
        );
        Ok((Box::new(RecordingDatapath::new()), Some(reason)))
    };
    match choice {
        DatapathArg::Recording => Ok((Box::new(RecordingDatapath::new()), None)),
        DatapathArg::Ebpf => Ok((Box::new(AyaDatapath::open(config)?), None)),
        DatapathArg::Auto if !on_bpffs(&config.pin_dir) => {
            fallback(format!("no bpffs mounted at {}", config.pin_dir.display()))
        }
        DatapathArg::Auto => match AyaDatapath::open(config) {
            Ok(dp) => Ok((Box::new(dp), None)),
            Err(e) => fallback(error_chain(&e)),
        },
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl Args {
    /// The datapath configuration these arguments describe.
    pub fn aya_config(&self, cfg: &AgentConfig) -> AyaConfig {
        AyaConfig {
            pin_dir: self.bpf_pin_dir.clone().unwrap_or_else(|| {
                PathBuf::from("/sys/fs/bpf/meshd").join(cfg.supervisor.local.as_str())
            }),
            cgroup: self.cgroup.clone(),
            socket_lb: true,
        }
    }

    /// The runtime configuration these arguments describe.
    pub fn agent_config(&self) -> Result<AgentConfig, AppError> {
        let (name, id, mode) = self.cluster.resolve()?;
        let mut supervisor = SupervisorConfig::new(name, id, mode);
        supervisor.heartbeat_timeout = self.heartbeat_timeout;
        supervisor.cache_ttl = self.remote_cache_ttl;
        Ok(AgentConfig {
            supervisor,
            peers_dir: self.peers_dir.clone().unwrap_or_default(),
            access: self.peer_access.into(),
            limits: self.peer_limits.limits(),
            trust_metrics: meshd::metrics::TrustMetrics::default(),
        })
    }
}

/// Runs until `shutdown` is cancelled (or a server fails), then shuts down gracefully.
pub async fn run(args: Args, shutdown: CancellationToken) -> Result<(), AppError> {
    let cfg = args.agent_config()?;
    let store: Arc<dyn KvStore> = Arc::new(EtcdStore::connect(&args.etcd.load()?).await?);
    let client_ca =
        std::fs::read_to_string(&args.grpc_client_ca).map_err(|source| ArgFileError {
            what: "--grpc-client-ca",
            path: args.grpc_client_ca.clone(),
            source,
        })?;
    let (tls, _cert) =
        mesh_proto::server::server_tls(args.grpc_cert.clone(), args.grpc_key.clone(), &client_ca)?;
    let grpc = bind("the gRPC API", args.grpc_listen).await?;
    let health_listener = bind("the health endpoint", args.health_listen).await?;
    tracing::info!(
        cluster = %cfg.supervisor.local,
        id = %cfg.supervisor.local_id,
        access = ?cfg.access,
        peers_dir = %cfg.peers_dir.display(),
        grpc = %args.grpc_listen,
        health = %args.health_listen,
        "mesh-agent starting"
    );

    let (dp, fallback) =
        open_datapath(args.datapath, args.datapath_fallback, args.aya_config(&cfg))?;
    tracing::info!(datapath = dp.mode().as_str(), fallback = ?fallback, "datapath open");

    let metrics = AgentMetrics::default();
    let dp_metrics = DatapathMetrics::default();
    let dns_metrics = crate::dns::DnsMetrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    cfg.trust_metrics.register(&mut registry);
    dp_metrics.register(&mut registry);
    dns_metrics.register(&mut registry);
    let registry = Arc::new(registry);
    let agent = match &args.peer_secrets_namespace {
        Some(ns) => {
            let client = meshd::kube::client_from_kubeconfig(
                args.kubeconfig.as_deref(),
                args.kube_context.as_deref(),
            )
            .await?;
            let peers = meshd::kube::PeerSecretWatcher::new(client, ns.clone())
                .with_events("mesh-agent", None)
                .run(shutdown.child_token());
            Agent::start_with_peers(cfg.clone(), store.clone(), metrics.reflector.clone(), peers)
        }
        None => Agent::start(cfg.clone(), store.clone(), metrics.reflector.clone()),
    };
    let handles = agent.handles();
    // Local MeshNetworkPolicies → engine → policy snapshots for the syncer.
    let policy_stop = shutdown.child_token();
    let (policy, policy_task) = crate::policy::start(
        store,
        cfg.supervisor.local.clone(),
        handles.identities.clone(),
        handles.ipcache.clone(),
        metrics.reflector.clone(),
        policy_stop.clone(),
    );
    let syncer = Syncer::new(
        dp,
        fallback,
        Box::new(RouteResolver::new()),
        SyncConfig {
            local_id: cfg.supervisor.local_id.get(),
            ..SyncConfig::new(cfg.supervisor.local.clone(), cfg.supervisor.mode)
        },
        dp_metrics,
    );
    let dp_handles = syncer.handles();
    let api = AgentApi::new(&cfg.supervisor, handles.clone())
        .with_datapath(dp_handles.clone())
        .with_policy(policy.status.clone());

    // Any server ending stops the others; the agent's supervisors stop alongside.
    let stop = shutdown.child_token();
    let mut parts = Components::new(stop.clone());
    let (readiness, follow_readiness) = api::readiness(
        handles.status.clone(),
        dp_handles.status.clone(),
        stop.clone(),
    );
    parts.spawn(async move {
        follow_readiness.await;
        Ok(())
    });
    parts.spawn({
        let stop = stop.clone();
        let authz = api.authorizer();
        async move {
            mesh_proto::server::serve_mtls(grpc, tls, api.routes(), authz, stop)
                .await
                .map_err(AppError::from)
        }
    });
    parts.spawn({
        let stop = stop.clone();
        let inputs = SyncInputs::from_handles(&handles, Some(policy.snapshots.clone()));
        async move {
            syncer.run(inputs, stop).await;
            Ok(())
        }
    });
    parts.spawn({
        let (stop, status) = (stop.clone(), readiness);
        async move {
            meshd::health::serve_health(
                health_listener,
                status,
                api::readiness_reason,
                registry,
                stop,
            )
            .await
            .map_err(AppError::Health)
        }
    });
    parts.spawn({
        let (stop, status) = (stop.clone(), handles.status.clone());
        async move {
            metrics::follow_status(metrics, status, stop).await;
            Ok(())
        }
    });
    if let Some(listen) = args.dns_listen {
        let mut dcfg = crate::dns::DnsConfig::new(listen);
        dcfg.ttl = u32::try_from(args.dns_ttl.as_secs()).unwrap_or(u32::MAX);
        dcfg.upstreams.clone_from(&args.dns_upstream);
        dcfg.max_headless_answers = args.dns_max_headless_answers;
        let (stop, services) = (stop.clone(), handles.services.clone());
        parts.spawn(async move {
            crate::dns::serve(dcfg, services, dns_metrics, None, stop)
                .await
                .map_err(AppError::from)
        });
    }
    let servers = parts.join();
    let agent = async {
        stop.cancelled().await;
        policy_stop.cancel();
        let _ = policy_task.await;
        agent.shutdown().await;
    };
    let (result, ()) = tokio::join!(servers, agent);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQUIRED: &[&str] = &[
        "mesh-agent",
        "--cluster-name",
        "east",
        "--cluster-id",
        "1",
        "--etcd-endpoint",
        "https://127.0.0.1:2379",
        "--etcd-ca",
        "ca.crt",
        "--etcd-cert",
        "c.crt",
        "--etcd-key",
        "c.key",
        "--peers-dir",
        "/peers",
        "--grpc-cert",
        "g.crt",
        "--grpc-key",
        "g.key",
        "--grpc-client-ca",
        "ca.crt",
    ];

    #[test]
    fn auto_fails_closed_unless_the_fallback_is_allowed() {
        let dir = tempfile::tempdir().unwrap();
        // A plain directory is not on a bpffs: eBPF cannot run there.
        let config = || AyaConfig {
            pin_dir: dir.path().join("meshd"),
            cgroup: None,
            socket_lb: true,
        };
        let err = open_datapath(DatapathArg::Auto, false, config()).unwrap_err();
        assert!(matches!(err, AppError::NoDatapath { .. }), "{err}");
        assert!(err.to_string().contains("--datapath-fallback"), "{err}");
        let (dp, why) = open_datapath(DatapathArg::Auto, true, config()).unwrap();
        assert_eq!(dp.mode(), crate::datapath::DatapathMode::Recording);
        assert!(why.unwrap().contains("no bpffs mounted"));
        // Recording chosen on purpose is not a fallback.
        let (dp, why) = open_datapath(DatapathArg::Recording, false, config()).unwrap();
        assert_eq!(dp.mode(), crate::datapath::DatapathMode::Recording);
        assert_eq!(why, None);
        let args = Args::try_parse_from(REQUIRED).unwrap();
        assert!(!args.datapath_fallback, "fail closed by default");
    }

    #[test]
    fn defaults_and_overrides() {
        let args = Args::try_parse_from(REQUIRED).unwrap();
        let cfg = args.agent_config().unwrap();
        assert_eq!(cfg.access, PeerAccess::Cached);
        assert_eq!(cfg.supervisor.cache_ttl, Duration::ZERO);
        assert_eq!(cfg.supervisor.heartbeat_timeout, Duration::from_secs(60));
        assert_eq!(cfg.peers_dir, PathBuf::from("/peers"));

        let more = [
            "--peer-access",
            "direct",
            "--remote-cache-ttl",
            "5m",
            "--heartbeat-timeout",
            "20s",
        ];
        let args = Args::try_parse_from(REQUIRED.iter().chain(&more)).unwrap();
        let cfg = args.agent_config().unwrap();
        assert_eq!(cfg.access, PeerAccess::Direct);
        assert_eq!(cfg.supervisor.cache_ttl, Duration::from_secs(300));
        assert_eq!(cfg.supervisor.heartbeat_timeout, Duration::from_secs(20));

        for bad in [
            &["--peer-access", "both"][..],
            &["--remote-cache-ttl", "5"][..],
        ] {
            assert!(Args::try_parse_from(REQUIRED.iter().chain(bad)).is_err());
        }
        // A cluster ID outside the mode's range parses but does not resolve.
        let out_of_range = REQUIRED.iter().map(|a| if *a == "1" { "300" } else { a });
        let args = Args::try_parse_from(out_of_range).unwrap();
        assert!(matches!(args.agent_config(), Err(AppError::Args(_))));
    }
}
