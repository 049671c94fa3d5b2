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
    #[arg(long, env = "MESH_PEERS_DIR")]
    pub peers_dir: PathBuf,
    /// How peers are read: from the local etcd's kvstoremesh cache, or straight from
    /// each peer's etcd with its credential.
    #[arg(long, env = "MESH_PEER_ACCESS", value_enum, default_value_t = AccessArg::Cached)]
    pub peer_access: AccessArg,
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
}

impl Args {
    /// The runtime configuration these arguments describe.
    pub fn agent_config(&self) -> Result<AgentConfig, AppError> {
        let (name, id, mode) = self.cluster.resolve()?;
        let mut supervisor = SupervisorConfig::new(name, id, mode);
        supervisor.heartbeat_timeout = self.heartbeat_timeout;
        supervisor.cache_ttl = self.remote_cache_ttl;
        Ok(AgentConfig {
            supervisor,
            peers_dir: self.peers_dir.clone(),
            access: self.peer_access.into(),
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

    let metrics = AgentMetrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let registry = Arc::new(registry);
    let agent = Agent::start(cfg.clone(), store, metrics.reflector.clone());
    let handles = agent.handles();
    let api = AgentApi::new(&cfg.supervisor, handles.clone());

    // Any server ending stops the others; the agent's supervisors stop alongside.
    let stop = shutdown.child_token();
    let mut parts = Components::new(stop.clone());
    parts.spawn({
        let stop = stop.clone();
        async move {
            mesh_proto::server::serve_mtls(grpc, tls, api.routes(), stop)
                .await
                .map_err(AppError::from)
        }
    });
    parts.spawn({
        let (stop, status) = (stop.clone(), handles.status.clone());
        async move {
            meshd::health::serve_health(
                health_listener,
                status,
                api::not_ready_reason,
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
    let servers = parts.join();
    let agent = async {
        stop.cancelled().await;
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
