//! The `mesh.v1.ClusterMesh` gRPC API of the apiserver, served over mTLS with hot-reloaded certificates.
//!
//! ```text
//!  ExportStatus (watch) ──► GetStatus
//!  etcd mesh/state/<kind>/v1/<cluster>/… ──► ListServices / ListIdentities / ListIpCache
//!  ClusterMeshApi ─routes─► mesh_proto::server::serve_mtls (TLS accept loop, reloaded cert,
//!                           every call authorized by the caller certificate's role)
//! ```
//!
//! `GetStatus` answers from the exporter's [`ExportStatus`]; the list calls read what is
//! exported in etcd (the source of truth of what peers see). Serving (TLS handshakes,
//! certificate reload, graceful shutdown) is [`mesh_proto::server`], shared with the agent.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use mesh_proto::server::Authorizer;
use mesh_proto::v1 as pb;
use mesh_proto::v1::cluster_mesh_server::{ClusterMesh, ClusterMeshServer};
use meshd::keys::{self, IdentityScope, Key, StateKind, StateValue};
use meshd::kv::{KeyValue, KvError, KvStore};
use meshd::model::{ClusterName, ClusterService, IdentityEntry, IpCacheEntry};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::{Request, Response, Status};

use crate::export::{ExportConfig, ExportStatus};

pub use mesh_proto::server::{HANDSHAKE_TIMEOUT, SHUTDOWN_GRACE, server_tls};

/// The component name reported by `GetStatus`.
pub const COMPONENT: &str = "clustermesh-apiserver";
/// Keys per page when listing etcd.
const LIST_PAGE: usize = 1000;

/// Why serving the API failed (the shared server's error).
pub type ApiError = mesh_proto::server::ServeError;

/// The `ClusterMesh` service of one cluster's apiserver.
#[derive(Debug, Clone)]
pub struct ClusterMeshApi {
    status: watch::Receiver<ExportStatus>,
    cfg: ExportConfig,
    store: Arc<dyn KvStore>,
    peers: Option<watch::Receiver<Vec<meshd::remote::PeerStatus>>>,
}

impl ClusterMeshApi {
    /// An API answering from the exporter's `status` and from what `store` holds for
    /// `cfg.cluster`.
    pub fn new(
        cfg: ExportConfig,
        status: watch::Receiver<ExportStatus>,
        store: Arc<dyn KvStore>,
    ) -> Self {
        Self {
            status,
            cfg,
            store,
            peers: None,
        }
    }

    /// Reports kvstoremesh's peers in `GetStatus`.
    #[must_use]
    pub fn with_peers(mut self, peers: watch::Receiver<Vec<meshd::remote::PeerStatus>>) -> Self {
        self.peers = Some(peers);
        self
    }

    /// The tonic service wrapping this API.
    pub fn into_service(self) -> ClusterMeshServer<Self> {
        ClusterMeshServer::new(self)
    }

    /// The gRPC routes serving this API (for [`mesh_proto::server::serve_mtls`]).
    pub fn routes(self) -> Routes {
        Routes::new(self.into_service())
    }

    /// What authorizes calls to this API: roles of this cluster, per
    /// [`mesh_proto::server::ACCESS`].
    pub fn authorizer(&self) -> Authorizer {
        Authorizer::new(self.cfg.cluster.as_str())
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
        let peers = self
            .peers
            .as_ref()
            .map(|p| p.borrow().clone())
            .unwrap_or_default();
        Ok(Response::new(status_to_proto(&status, &self.cfg, &peers)))
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

    async fn list_ip_cache(
        &self,
        request: Request<pb::ListIpCacheRequest>,
    ) -> Result<Response<pb::ListIpCacheResponse>, Status> {
        let req = request.into_inner();
        let filter = validate(None, &req.cluster)?;
        if !self.selects(&filter) {
            return Ok(Response::new(pb::ListIpCacheResponse::default()));
        }
        let prefix = keys::state_prefix(StateKind::Ip, &self.cfg.cluster);
        let kvs = self.list("list ipcache entries", &prefix).await?;
        let mut entries: Vec<(IpAddr, pb::IpCacheEntry)> = kvs
            .iter()
            .filter_map(|kv| decode(&self.cfg.cluster, StateKind::Ip, self.scope(), kv))
            .filter_map(|v| match v {
                StateValue::Ip(e) => Some((e.ip, ip_cache_entry_to_proto(&e, &self.cfg.cluster))),
                _ => None,
            })
            .collect();
        // etcd orders keys as text; order by address.
        entries.sort_by_key(|(ip, _)| *ip);
        Ok(Response::new(pb::ListIpCacheResponse {
            entries: entries.into_iter().map(|(_, e)| e).collect(),
        }))
    }

    type ObserveDropsStream = futures::stream::Empty<Result<pb::DropEvent, Status>>;

    /// The apiserver has no datapath: drops are observed on agents.
    async fn observe_drops(
        &self,
        _request: Request<pb::ObserveDropsRequest>,
    ) -> Result<Response<Self::ObserveDropsStream>, Status> {
        Err(Status::unimplemented(
            "drops are observed on agents (mesh-agent's gRPC API), not on the apiserver",
        ))
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
    Ok(Filter {
        namespace: mesh_proto::filter::namespace(namespace.unwrap_or_default())?,
        cluster: mesh_proto::filter::cluster(cluster, ClusterName::new)?,
    })
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
pub fn status_to_proto(
    status: &ExportStatus,
    cfg: &ExportConfig,
    peers: &[meshd::remote::PeerStatus],
) -> pb::ClusterStatus {
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
        peers: peers.iter().map(|p| p.to_proto(None)).collect(),
        datapath: String::new(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        peer_config_errors: Vec::new(),
        ..pb::ClusterStatus::default()
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
        affinity: meshd::wire::affinity(s.affinity).to_owned(),
        headless: s.headless,
        frontends: s.frontends.iter().map(IpAddr::to_string).collect(),
        ports: s
            .ports
            .iter()
            .map(|p| meshd::wire::port(&p.name, p.port, p.protocol))
            .collect(),
        backends: s
            .backends
            .iter()
            .map(|(ip, b)| pb::Backend {
                ip: ip.to_string(),
                ports: b
                    .ports
                    .iter()
                    .map(|p| meshd::wire::port(&p.name, p.port, p.protocol))
                    .collect(),
                ready: b.ready,
                hostname: b.hostname.clone().unwrap_or_default(),
                node: b.node.clone().unwrap_or_default(),
                zone: b.zone.clone().unwrap_or_default(),
                cluster: s.cluster.to_string(),
                // The apiserver does not route: a backend is "active" when ready.
                active: b.ready,
            })
            .collect(),
        cluster_set_ip: cluster_set_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        export_created_unix: s.export_created.map_or(0, |t| t.unix_timestamp()),
        clusters: vec![s.cluster.to_string()],
        conflicts: Vec::new(),
    }
}

/// An exported identity of `cluster` as `Identity`.
pub fn identity_to_proto(e: &IdentityEntry, cluster: &ClusterName) -> pb::Identity {
    meshd::wire::identity(e, cluster)
}

/// An exported ipcache entry of `cluster` as `IpCacheEntry`.
pub fn ip_cache_entry_to_proto(e: &IpCacheEntry, cluster: &ClusterName) -> pb::IpCacheEntry {
    meshd::wire::ip_cache_entry(e, cluster)
}

/// Serves `api` on `listener` over mTLS (`tls`, e.g. from [`server_tls`]) until `shutdown`,
/// each call authorized by the caller's role ([`ClusterMeshApi::authorizer`]); see
/// [`mesh_proto::server::serve_mtls`] (handshakes bounded by [`HANDSHAKE_TIMEOUT`],
/// graceful shutdown within [`SHUTDOWN_GRACE`]).
pub async fn serve_grpc(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    api: ClusterMeshApi,
    shutdown: CancellationToken,
) -> Result<(), ApiError> {
    let authz = api.authorizer();
    mesh_proto::server::serve_mtls(listener, tls, api.routes(), authz, shutdown).await
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use meshd::model::{
        Affinity, Backend, BackendPort, ClusterId, Identity, Labels, MaxConnectedClusters,
        Protocol, ServicePort,
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
            frontends: vec!["198.18.0.1".parse().unwrap()],
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
        assert_eq!(p.frontends, ["198.18.0.1"]);
        assert_eq!(p.ports[0].protocol, "TCP");
        assert_eq!(p.backends[0].ports[0].protocol, "UDP");
        assert_eq!(p.backends[0].node, "n1");
        assert_eq!(p.backends[0].cluster, "east");
        assert_eq!(p.cluster_set_ip, "198.19.0.1");
        assert_eq!(p.export_created_unix, 1_700_000_000);
        assert!(p.backends[0].active, "a ready backend is active");
        assert_eq!(p.clusters, ["east"]);
        assert!(p.conflicts.is_empty());

        let ipc = IpCacheEntry {
            ip: "198.18.0.1".parse().unwrap(),
            prefix_len: 32,
            identity: Identity::from_raw(65792).unwrap(),
            host_ip: Some("198.18.0.9".parse().unwrap()),
            node: Some("n1".into()),
            namespace: Some("default".into()),
            pod: None,
            named_ports: BTreeMap::new(),
        };
        let p = ip_cache_entry_to_proto(&ipc, &east);
        assert_eq!(
            (p.ip.as_str(), p.prefix_len, p.identity, p.cluster.as_str()),
            ("198.18.0.1", 32, 65792, "east")
        );
        assert_eq!((p.host_ip.as_str(), p.node.as_str()), ("198.18.0.9", "n1"));
        assert_eq!((p.namespace.as_str(), p.pod.as_str()), ("default", ""));

        let e = IdentityEntry {
            id: Identity::from_raw(65792).unwrap(),
            labels: Labels::parse(["k8s:app=web", "mesh:io.meshd.cluster=east"]).unwrap(),
        };
        let i = identity_to_proto(&e, &east);
        assert_eq!(i.id, 65792);
        assert_eq!(i.labels, ["k8s:app=web", "mesh:io.meshd.cluster=east"]);

        let cfg = ExportConfig::new(east, ClusterId::new(1, m).unwrap(), m);
        let mut west = meshd::remote::PeerStatus::new(&ClusterName::new("west").unwrap());
        west.state = meshd::remote::PeerState::Ready;
        west.failures = 2;
        let with_peer = status_to_proto(&ExportStatus::default(), &cfg, &[west]);
        assert_eq!(with_peer.peers.len(), 1);
        assert_eq!(
            (
                with_peer.peers[0].name.as_str(),
                with_peer.peers[0].state.as_str()
            ),
            ("west", "ready")
        );
        assert_eq!(with_peer.peers[0].failures, 2);
        let st = status_to_proto(&ExportStatus::default(), &cfg, &[]);
        assert_eq!(st.component, COMPONENT);
        assert!(!st.ready);
        assert!(!st.not_ready_reason.is_empty());
        assert_eq!(st.max_connected_clusters, 255);
    }
}
