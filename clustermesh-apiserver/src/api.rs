//! The `mesh.v1.ClusterMesh` gRPC API of the apiserver, served over mTLS with hot-reloaded certificates.
//!
//! ```text
//!  TcpListener ─accept─► spawned handshake (tokio-rustls, ≤ HANDSHAKE_TIMEOUT) ─► channel
//!                                                                                 │
//!  tonic Server::serve_with_incoming_shutdown(ClusterMeshServer<ClusterMeshApi>) ◄┘
//! ```
//!
//! The server certificate is resolved per handshake from the [`rustls::ServerConfig`]'s
//! resolver; built by [`server_tls`] that is a [`ReloadingCertKey`], so rotated files are
//! served to new connections without a restart (tonic's own `ServerTlsConfig` takes a fixed
//! identity, hence our own acceptor). Client certificates must chain to the cluster CA.
//!
//! `GetStatus` answers from the exporter's [`ExportStatus`]; `ListServices` and
//! `ListIdentities` read what is exported in etcd (the source of truth of what peers see).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use mesh_certs::{CertError, ReloadingCertKey};
use mesh_proto::v1 as pb;
use mesh_proto::v1::cluster_mesh_server::{ClusterMesh, ClusterMeshServer};
use meshd::keys::{self, IdentityScope, Key, StateKind, StateValue};
use meshd::kv::{KeyValue, KvError, KvStore};
use meshd::model::{Affinity, ClusterName, ClusterService, IdentityEntry};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::export::{ExportConfig, ExportStatus};

/// The component name reported by `GetStatus`.
pub const COMPONENT: &str = "clustermesh-apiserver";
/// How long one TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for open connections to finish before returning anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// TLS handshakes in flight at most; further connections wait in the listen backlog.
const MAX_HANDSHAKES: usize = 256;
/// Handshaken connections queued for tonic.
const QUEUE: usize = 64;
/// Keys per page when listing etcd.
const LIST_PAGE: usize = 1000;

/// Why serving the API failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The TLS material could not be loaded or watched.
    #[error("gRPC API: {step}: {source}")]
    Tls {
        /// The step that failed.
        step: &'static str,
        /// Cause.
        #[source]
        source: CertError,
    },
    /// The gRPC server failed.
    #[error("gRPC API: serving: {source}")]
    Serve {
        /// Cause.
        #[source]
        source: tonic::transport::Error,
    },
}

/// The server TLS config of the API: `cert_path`/`key_path` are watched and reloaded on
/// change ([`ReloadingCertKey`]); clients must present a certificate signed by
/// `client_ca_pem`. Returns the config and the reloading pair (for its generation/info).
pub fn server_tls(
    cert_path: PathBuf,
    key_path: PathBuf,
    client_ca_pem: &str,
) -> Result<(Arc<rustls::ServerConfig>, Arc<ReloadingCertKey>), ApiError> {
    let pair = ReloadingCertKey::watch(cert_path, key_path).map_err(|source| ApiError::Tls {
        step: "load and watch the server certificate",
        source,
    })?;
    let config =
        mesh_certs::server_config(pair.clone(), client_ca_pem).map_err(|source| ApiError::Tls {
            step: "build the server TLS config",
            source,
        })?;
    Ok((config, pair))
}

/// The `ClusterMesh` service of one cluster's apiserver.
#[derive(Debug, Clone)]
pub struct ClusterMeshApi {
    status: watch::Receiver<ExportStatus>,
    cfg: ExportConfig,
    store: Arc<dyn KvStore>,
}

impl ClusterMeshApi {
    /// An API answering from the exporter's `status` and from what `store` holds for
    /// `cfg.cluster`.
    pub fn new(
        cfg: ExportConfig,
        status: watch::Receiver<ExportStatus>,
        store: Arc<dyn KvStore>,
    ) -> Self {
        Self { status, cfg, store }
    }

    /// The tonic service wrapping this API.
    pub fn into_service(self) -> ClusterMeshServer<Self> {
        ClusterMeshServer::new(self)
    }

    fn scope(&self) -> IdentityScope {
        IdentityScope {
            cluster_id: self.cfg.cluster_id,
            mode: self.cfg.mode,
        }
    }

    /// Whether a validated cluster filter selects this cluster.
    fn selects(&self, filter: &Filter) -> bool {
        filter
            .cluster
            .as_ref()
            .is_none_or(|c| *c == self.cfg.cluster)
    }

    async fn list(&self, step: &'static str, prefix: &str) -> Result<Vec<KeyValue>, Status> {
        self.store
            .list_all(prefix, LIST_PAGE)
            .await
            .map(|p| p.kvs)
            .map_err(unavailable(step))
    }

    /// ClusterSetIPs by (namespace, name), of one namespace or all.
    async fn cluster_set_ips(
        &self,
        namespace: Option<&str>,
    ) -> Result<HashMap<(String, String), IpAddr>, Status> {
        let kvs = self
            .list("list ClusterSetIPs", &cluster_set_ip_prefix(namespace))
            .await?;
        Ok(kvs.iter().filter_map(decode_cluster_set_ip).collect())
    }
}

#[tonic::async_trait]
impl ClusterMesh for ClusterMeshApi {
    async fn get_status(
        &self,
        _request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        let status = self.status.borrow().clone();
        Ok(Response::new(status_to_proto(&status, &self.cfg)))
    }

    async fn list_services(
        &self,
        request: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        let req = request.into_inner();
        let filter = validate(Some(&req.namespace), &req.cluster)?;
        if !self.selects(&filter) {
            return Ok(Response::new(pb::ListServicesResponse::default()));
        }
        let mut prefix = keys::state_prefix(StateKind::Services, &self.cfg.cluster);
        if let Some(ns) = &filter.namespace {
            prefix.push_str(ns);
            prefix.push('/');
        }
        let kvs = self.list("list services", &prefix).await?;
        let ips = self.cluster_set_ips(filter.namespace.as_deref()).await?;
        let services = kvs
            .iter()
            .filter_map(|kv| decode(&self.cfg.cluster, StateKind::Services, self.scope(), kv))
            .filter_map(|v| match v {
                StateValue::Service(s) => Some(s),
                _ => None,
            })
            .map(|s| {
                let ip = ips.get(&(s.namespace.clone(), s.name.clone())).copied();
                service_to_proto(&s, ip)
            })
            .collect();
        Ok(Response::new(pb::ListServicesResponse { services }))
    }

    async fn list_identities(
        &self,
        request: Request<pb::ListIdentitiesRequest>,
    ) -> Result<Response<pb::ListIdentitiesResponse>, Status> {
        let req = request.into_inner();
        let filter = validate(None, &req.cluster)?;
        if !self.selects(&filter) {
            return Ok(Response::new(pb::ListIdentitiesResponse::default()));
        }
        let prefix = keys::state_prefix(StateKind::Identities, &self.cfg.cluster);
        let kvs = self.list("list identities", &prefix).await?;
        let mut identities: Vec<pb::Identity> = kvs
            .iter()
            .filter_map(|kv| decode(&self.cfg.cluster, StateKind::Identities, self.scope(), kv))
            .filter_map(|v| match v {
                StateValue::Identity(e) => Some(identity_to_proto(&e, &self.cfg.cluster)),
                _ => None,
            })
            .collect();
        // etcd orders keys as text; order numerically.
        identities.sort_by_key(|i| i.id);
        Ok(Response::new(pb::ListIdentitiesResponse { identities }))
    }
}

/// Validated filters of a list request.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Filter {
    namespace: Option<String>,
    cluster: Option<ClusterName>,
}

/// Checks the filters of a list request (empty = no filter): a namespace must be an
/// RFC 1123 label, a cluster a valid cluster name.
fn validate(namespace: Option<&str>, cluster: &str) -> Result<Filter, Status> {
    let namespace = match namespace {
        None | Some("") => None,
        Some(ns) if is_dns_label(ns) => Some(ns.to_owned()),
        Some(ns) => {
            return Err(Status::invalid_argument(format!(
                "namespace filter {ns:?} is not an RFC 1123 label \
                 (lowercase alphanumerics and '-', at most 63 characters)"
            )));
        }
    };
    let cluster = match cluster {
        "" => None,
        c => Some(
            ClusterName::new(c)
                .map_err(|e| Status::invalid_argument(format!("cluster filter: {e}")))?,
        ),
    };
    Ok(Filter { namespace, cluster })
}

/// RFC 1123 label of at most 63 characters.
fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// A store error as `UNAVAILABLE`, naming the step.
fn unavailable(step: &'static str) -> impl FnOnce(KvError) -> Status {
    move |e| Status::unavailable(format!("{step}: {e}"))
}

/// Decodes one exported entry of `cluster`/`kind`; anything else is logged and skipped.
fn decode(
    cluster: &ClusterName,
    kind: StateKind,
    scope: IdentityScope,
    kv: &KeyValue,
) -> Option<StateValue> {
    let result = match Key::parse_bytes(&kv.key) {
        Ok(Key::State(sk)) if sk.kind() == kind && sk.cluster() == cluster => {
            keys::decode_state(&sk, &kv.value, Some(scope)).map_err(|e| e.to_string())
        }
        Ok(other) => Err(format!("unexpected key {other} under the {kind} prefix")),
        Err(e) => Err(e.to_string()),
    };
    match result {
        Ok(v) => Some(v),
        Err(error) => {
            tracing::debug!(
                key = %String::from_utf8_lossy(&kv.key),
                %error,
                "skipping an exported entry that does not decode"
            );
            None
        }
    }
}

/// `mesh/clusterset-ips/v1/` or `mesh/clusterset-ips/v1/<ns>/`, spelled by the key schema.
fn cluster_set_ip_prefix(namespace: Option<&str>) -> String {
    let key = Key::ClusterSetIp {
        namespace: namespace.unwrap_or_default().to_owned(),
        name: String::new(),
    }
    .to_string();
    match namespace {
        Some(_) => key,
        // "mesh/clusterset-ips/v1//" without the empty namespace segment.
        None => key.strip_suffix('/').unwrap_or(&key).to_owned(),
    }
}

/// One `mesh/clusterset-ips/v1/<ns>/<name>` entry, if it parses and agrees with its key.
fn decode_cluster_set_ip(kv: &KeyValue) -> Option<((String, String), IpAddr)> {
    let Ok(Key::ClusterSetIp { namespace, name }) = Key::parse_bytes(&kv.key) else {
        return None;
    };
    let key = Key::ClusterSetIp {
        namespace: namespace.clone(),
        name: name.clone(),
    };
    match keys::decode_json::<keys::ClusterSetIpEntry>(&key, &kv.value) {
        Ok(e) if e.namespace == namespace && e.name == name => Some(((namespace, name), e.ip)),
        Ok(_) => {
            tracing::debug!(%key, "skipping a ClusterSetIP entry that disagrees with its key");
            None
        }
        Err(error) => {
            tracing::debug!(%key, %error, "skipping a ClusterSetIP entry that does not decode");
            None
        }
    }
}

/// The exporter's status as `ClusterStatus`.
pub fn status_to_proto(status: &ExportStatus, cfg: &ExportConfig) -> pb::ClusterStatus {
    pb::ClusterStatus {
        component: COMPONENT.to_owned(),
        cluster: cfg.cluster.to_string(),
        cluster_id: u32::from(cfg.cluster_id.get()),
        max_connected_clusters: u32::from(cfg.mode.get()),
        ready: status.ready,
        not_ready_reason: crate::health::not_ready_reason(status).unwrap_or_default(),
        etcd_reachable: status.etcd_reachable,
        export_counts: status.counts.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        synced_kinds: status.synced.clone(),
        last_error: status.last_error.clone().unwrap_or_default(),
        errors: status.errors,
        peers: Vec::new(),
        datapath: String::new(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    }
}

/// An exported service as `Service` (`cluster_set_ip` from `mesh/clusterset-ips/...`).
pub fn service_to_proto(s: &ClusterService, cluster_set_ip: Option<IpAddr>) -> pb::Service {
    pb::Service {
        cluster: s.cluster.to_string(),
        cluster_id: u32::from(s.cluster_id.get()),
        namespace: s.namespace.clone(),
        name: s.name.clone(),
        global: s.global,
        shared: s.shared,
        affinity: affinity_str(s.affinity).to_owned(),
        headless: s.headless,
        frontends: s.frontends.iter().map(IpAddr::to_string).collect(),
        ports: s
            .ports
            .iter()
            .map(|p| port(&p.name, p.port, p.protocol))
            .collect(),
        backends: s
            .backends
            .iter()
            .map(|(ip, b)| pb::Backend {
                ip: ip.to_string(),
                ports: b
                    .ports
                    .iter()
                    .map(|p| port(&p.name, p.port, p.protocol))
                    .collect(),
                ready: b.ready,
                hostname: b.hostname.clone().unwrap_or_default(),
                node: b.node.clone().unwrap_or_default(),
                zone: b.zone.clone().unwrap_or_default(),
                cluster: s.cluster.to_string(),
            })
            .collect(),
        cluster_set_ip: cluster_set_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        export_created_unix: s.export_created.map_or(0, |t| t.unix_timestamp()),
    }
}

/// An exported identity of `cluster` as `Identity`.
pub fn identity_to_proto(e: &IdentityEntry, cluster: &ClusterName) -> pb::Identity {
    pb::Identity {
        id: e.id.get(),
        cluster: cluster.to_string(),
        labels: e.labels.iter().map(ToString::to_string).collect(),
    }
}

fn port(name: &str, number: u16, protocol: meshd::model::Protocol) -> pb::Port {
    pb::Port {
        name: name.to_owned(),
        port: u32::from(number),
        protocol: protocol.to_string(),
    }
}

fn affinity_str(a: Affinity) -> &'static str {
    match a {
        Affinity::None => "none",
        Affinity::Local => "local",
        Affinity::Remote => "remote",
    }
}

/// Serves `api` on `listener` over mTLS (`tls`, e.g. from [`server_tls`]) until `shutdown`.
///
/// Each accepted connection is TLS-handshaken in its own task (bounded by
/// [`HANDSHAKE_TIMEOUT`]; failures are logged at debug and do not stop the server) and
/// handed to tonic. On `shutdown` the listener is closed, open connections are asked to
/// finish (HTTP/2 GOAWAY) and the call returns when they have, or after [`SHUTDOWN_GRACE`].
pub async fn serve_grpc(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    api: ClusterMeshApi,
    shutdown: CancellationToken,
) -> Result<(), ApiError> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving the gRPC API (mTLS)");
    }
    let (tx, rx) = mpsc::channel::<TlsStream<TcpStream>>(QUEUE);
    let stop_accepting = shutdown.child_token();
    let accept = accept_loop(listener, TlsAcceptor::from(tls), tx, stop_accepting.clone());
    let incoming =
        tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, std::convert::Infallible>);
    let server = tonic::transport::Server::builder()
        .add_service(api.into_service())
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
    let serve = async {
        let grace = async {
            shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        let result = tokio::select! {
            r = server => r.map_err(|source| ApiError::Serve { source }),
            () = grace => {
                tracing::warn!(grace = ?SHUTDOWN_GRACE, "gRPC connections still open after the shutdown grace period; returning");
                Ok(())
            }
        };
        // The server is done (shutdown or error): stop accepting too.
        stop_accepting.cancel();
        result
    };
    let ((), result) = tokio::join!(accept, serve);
    result
}

/// Accepts TCP connections and handshakes them in tasks that feed `tx`, until `stop`.
/// Dropping the listener at the end closes the port.
async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<TlsStream<TcpStream>>,
    stop: CancellationToken,
) {
    let mut handshakes = JoinSet::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => {}
            accepted = listener.accept(), if handshakes.len() < MAX_HANDSHAKES => {
                let (tcp, peer) = match accepted {
                    Ok(c) => c,
                    Err(error) => {
                        // E.g. out of file descriptors: do not spin.
                        tracing::warn!(%error, "accepting a gRPC connection failed");
                        tokio::select! {
                            () = stop.cancelled() => break,
                            () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                        }
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                handshakes.spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            // A closed channel means the server is shutting down.
                            let _ = tx.send(tls).await;
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "TLS handshake failed");
                        }
                        Err(_) => {
                            tracing::debug!(%peer, timeout = ?HANDSHAKE_TIMEOUT, "TLS handshake timed out");
                        }
                    }
                });
            }
        }
    }
    // Pending handshakes are aborted with the set.
    handshakes.shutdown().await;
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use meshd::model::{
        Backend, BackendPort, ClusterId, Identity, Labels, MaxConnectedClusters, Protocol,
        ServicePort,
    };

    use super::*;

    #[test]
    fn filters_are_validated() {
        assert_eq!(validate(Some(""), "").unwrap(), Filter::default());
        let f = validate(Some("prod"), "east").unwrap();
        assert_eq!(f.namespace.as_deref(), Some("prod"));
        assert_eq!(f.cluster.unwrap().as_str(), "east");
        for bad in ["Prod", "a/b", "-x", "x-", "a_b", &"a".repeat(64)] {
            let e = validate(Some(bad), "").unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}");
            assert!(e.message().contains("namespace"), "{}", e.message());
        }
        let e = validate(None, "East").unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("cluster"), "{}", e.message());
    }

    #[test]
    fn cluster_set_ip_prefixes() {
        assert_eq!(cluster_set_ip_prefix(None), "mesh/clusterset-ips/v1/");
        assert_eq!(
            cluster_set_ip_prefix(Some("prod")),
            "mesh/clusterset-ips/v1/prod/"
        );
    }

    fn kv(key: &str, value: &[u8]) -> KeyValue {
        KeyValue {
            key: key.as_bytes().to_vec(),
            value: value.to_vec(),
            create_revision: 1,
            mod_revision: 1,
            lease: 0,
        }
    }

    #[test]
    fn undecodable_entries_are_skipped() {
        let m = MaxConnectedClusters::C255;
        let east = ClusterName::new("east").unwrap();
        let scope = IdentityScope {
            cluster_id: ClusterId::new(1, m).unwrap(),
            mode: m,
        };
        let good = kv(
            "mesh/state/identities/v1/east/65792",
            br#"{"id":65792,"labels":["k8s:app=web","mesh:io.meshd.cluster=east"]}"#,
        );
        assert!(decode(&east, StateKind::Identities, scope, &good).is_some());
        for bad in [
            kv("mesh/state/identities/v1/east/65792", b"{"),
            kv("mesh/state/identities/v1/east/x", b"{}"),
            kv(
                "mesh/state/identities/v1/east/131328",
                br#"{"id":131328,"labels":["mesh:io.meshd.cluster=east"]}"#,
            ),
            kv(
                "mesh/state/ip/v1/east/198.18.0.1",
                br#"{"ip":"198.18.0.1","prefixLen":32,"identity":65792}"#,
            ),
        ] {
            assert!(decode(&east, StateKind::Identities, scope, &bad).is_none());
        }
        let csip = kv(
            "mesh/clusterset-ips/v1/default/web",
            br#"{"namespace":"default","name":"web","ip":"198.19.0.1"}"#,
        );
        assert_eq!(
            decode_cluster_set_ip(&csip),
            Some((
                ("default".into(), "web".into()),
                "198.19.0.1".parse().unwrap()
            ))
        );
        let other = kv(
            "mesh/clusterset-ips/v1/default/web",
            br#"{"namespace":"default","name":"api","ip":"198.19.0.1"}"#,
        );
        assert_eq!(decode_cluster_set_ip(&other), None);
    }

    #[test]
    fn conversions() {
        let m = MaxConnectedClusters::C255;
        let east = ClusterName::new("east").unwrap();
        let s = ClusterService {
            cluster: east.clone(),
            cluster_id: ClusterId::new(1, m).unwrap(),
            namespace: "default".into(),
            name: "web".into(),
            global: true,
            shared: true,
            affinity: Affinity::Local,
            headless: false,
            frontends: vec!["10.0.0.1".parse().unwrap()],
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
            }],
            backends: BTreeMap::from([(
                "198.18.0.1".parse().unwrap(),
                Backend {
                    ports: vec![BackendPort {
                        name: "http".into(),
                        port: 8080,
                        protocol: Protocol::Udp,
                    }],
                    ready: true,
                    hostname: None,
                    node: Some("n1".into()),
                    zone: None,
                },
            )]),
            export_created: Some(time::OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap()),
        };
        let p = service_to_proto(&s, Some("198.19.0.1".parse().unwrap()));
        assert_eq!(p.affinity, "local");
        assert_eq!(p.frontends, ["10.0.0.1"]);
        assert_eq!(p.ports[0].protocol, "TCP");
        assert_eq!(p.backends[0].ports[0].protocol, "UDP");
        assert_eq!(p.backends[0].node, "n1");
        assert_eq!(p.backends[0].cluster, "east");
        assert_eq!(p.cluster_set_ip, "198.19.0.1");
        assert_eq!(p.export_created_unix, 1_700_000_000);

        let e = IdentityEntry {
            id: Identity::from_raw(65792).unwrap(),
            labels: Labels::parse(["k8s:app=web", "mesh:io.meshd.cluster=east"]).unwrap(),
        };
        let i = identity_to_proto(&e, &east);
        assert_eq!(i.id, 65792);
        assert_eq!(i.labels, ["k8s:app=web", "mesh:io.meshd.cluster=east"]);

        let cfg = ExportConfig::new(east, ClusterId::new(1, m).unwrap(), m);
        let st = status_to_proto(&ExportStatus::default(), &cfg);
        assert_eq!(st.component, COMPONENT);
        assert!(!st.ready);
        assert!(!st.not_ready_reason.is_empty());
        assert_eq!(st.max_connected_clusters, 255);
    }
}
