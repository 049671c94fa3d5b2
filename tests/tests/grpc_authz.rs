//! Authorization by role on both gRPC APIs over real mTLS: every RPC of the apiserver's and
//! the agent's `ClusterMesh` service called with a real peer credential (role peer, CN
//! `remote-west`, the one `connect` hands west), a certificate without a role, the in-cluster
//! roles, an admin of another cluster and meshctl's admin.
//!
//! One cluster CA signs everything, as in `meshctl up`: etcd's certificates, the peer
//! credential, the gRPC servers' certificates and the clients'. So each refusal below is the
//! role check, not TLS.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use clustermesh_apiserver::api::{ClusterMeshApi, serve_grpc};
use clustermesh_apiserver::export::ExportConfig;
use mesh_agent::api::AgentApi;
use mesh_agent::runtime::{Agent, PeerAccess};
use mesh_certs::{CertRequest, IssuedCert, Role};
use mesh_proto::server::{ACCESS, ServeError, serve_mtls, server_tls};
use mesh_proto::v1::cluster_mesh_client::ClusterMeshClient;
use mesh_proto::v1::{
    GetStatusRequest, ListIdentitiesRequest, ListIpCacheRequest, ListServicesRequest,
    ObserveDropsRequest,
};
use mesh_tests::init_tracing;
use mesh_tests::mesh::{TestCluster, supervisor_config};
use mesh_tests::objects::web_cluster;
use meshd::kv::{EtcdStore, KvStore};
use meshd::model::{ClusterName, MaxConnectedClusters};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Code, Status};

const CALL: std::time::Duration = std::time::Duration::from_secs(10);
const SERVICE: &str = "/mesh.v1.ClusterMesh/";
/// Every RPC of `mesh.v1.ClusterMesh` (checked against the access table below).
const METHODS: [&str; 5] = [
    "GetStatus",
    "ListServices",
    "ListIdentities",
    "ListIpCache",
    "ObserveDrops",
];

/// Cluster east (etcd, exporter) with its apiserver API and an agent API, both on mTLS with
/// the cluster CA.
struct Harness {
    east: TestCluster,
    agent: Agent,
    apiserver_addr: SocketAddr,
    agent_addr: SocketAddr,
    shutdown: CancellationToken,
    servers: Vec<JoinHandle<Result<(), ServeError>>>,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start() -> anyhow::Result<Self> {
        init_tracing();
        let east = Box::pin(TestCluster::start("east", 1, web_cluster(1))).await?;
        let ca = east.etcd.ca();
        let dir = tempfile::tempdir()?;
        let lo = [IpAddr::V4(Ipv4Addr::LOCALHOST)];
        let shutdown = CancellationToken::new();

        let (crt, key) = ca
            .issue(
                &CertRequest::server("clustermesh-apiserver", &["localhost"], &lo)
                    .with_role("east", Role::Apiserver),
            )?
            .write_files(dir.path(), "apiserver-grpc")?;
        let (tls, _) = server_tls(crt, key, ca.cert_pem())?;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let apiserver_addr = listener.local_addr()?;
        let cfg = ExportConfig::new(east.name.clone(), east.id, MaxConnectedClusters::C255);
        let api = ClusterMeshApi::new(cfg, east.exporter.status.clone(), east.store.clone());
        let apiserver = tokio::spawn(serve_grpc(listener, tls, api, shutdown.clone()));

        let agent = east.start_agent(PeerAccess::Direct);
        let (crt, key) = ca
            .issue(
                &CertRequest::server("mesh-agent", &["localhost"], &lo)
                    .with_role("east", Role::Agent),
            )?
            .write_files(dir.path(), "agent-grpc")?;
        let (tls, _) = server_tls(crt, key, ca.cert_pem())?;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let agent_addr = listener.local_addr()?;
        let api = AgentApi::new(&supervisor_config(&east.name, east.id), agent.handles());
        let authz = api.authorizer();
        let agent_server = tokio::spawn(serve_mtls(
            listener,
            tls,
            api.routes(),
            authz,
            shutdown.clone(),
        ));
        Ok(Harness {
            east,
            agent,
            apiserver_addr,
            agent_addr,
            shutdown,
            servers: vec![apiserver, agent_server],
            _dir: dir,
        })
    }

    /// A client certificate of the cluster CA.
    fn issue(&self, req: &CertRequest) -> IssuedCert {
        self.east.etcd.ca().issue(req).unwrap()
    }

    /// Both servers, by name.
    fn servers(&self) -> [(&'static str, SocketAddr); 2] {
        [
            ("apiserver", self.apiserver_addr),
            ("agent", self.agent_addr),
        ]
    }

    /// Calls every RPC of `addr` presenting `cert_pem`/`key_pem`: (method, result).
    async fn call_all(
        &self,
        addr: SocketAddr,
        cert_pem: &str,
        key_pem: &str,
    ) -> Vec<(&'static str, Result<(), Status>)> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.east.etcd.ca().cert_pem()))
            .domain_name("localhost")
            .identity(Identity::from_pem(cert_pem, key_pem));
        let channel = Channel::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_timeout(CALL)
            .timeout(CALL)
            .connect()
            .await
            .expect("the TLS handshake succeeds: the certificate chains to the cluster CA");
        let mut c = ClusterMeshClient::new(channel);
        let mut out = Vec::new();
        for m in METHODS {
            let r = match m {
                "GetStatus" => c.get_status(GetStatusRequest {}).await.map(drop),
                "ListServices" => c
                    .list_services(ListServicesRequest::default())
                    .await
                    .map(drop),
                "ListIdentities" => c
                    .list_identities(ListIdentitiesRequest::default())
                    .await
                    .map(drop),
                "ListIpCache" => c
                    .list_ip_cache(ListIpCacheRequest::default())
                    .await
                    .map(drop),
                "ObserveDrops" => c
                    .observe_drops(ObserveDropsRequest {
                        cluster: String::new(),
                        follow: false,
                    })
                    .await
                    .map(drop),
                other => unreachable!("{other}"),
            };
            out.push((m, r));
        }
        out
    }

    /// Every RPC of both servers, called as `cert`, is refused with PERMISSION_DENIED; each
    /// message names the method and contains `needle`.
    async fn assert_all_denied(&self, cert_pem: &str, key_pem: &str, needle: &str) {
        for (server, addr) in self.servers() {
            for (m, r) in self.call_all(addr, cert_pem, key_pem).await {
                let e = r.expect_err(&format!("{server} {m} must be refused"));
                assert_eq!(e.code(), Code::PermissionDenied, "{server} {m}: {e:?}");
                let msg = e.message();
                assert!(
                    msg.contains(&format!("{SERVICE}{m}")),
                    "{server} {m}: {msg}"
                );
                assert!(
                    msg.contains(needle),
                    "{server} {m}: {msg:?} lacks {needle:?}"
                );
            }
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        for s in self.servers {
            tokio::time::timeout(std::time::Duration::from_secs(15), s)
                .await
                .expect("server stops")
                .unwrap()
                .unwrap();
        }
        self.agent.shutdown().await;
    }
}

#[test]
fn the_methods_called_here_are_every_clustermesh_rpc() {
    let table: BTreeSet<&str> = ACCESS
        .iter()
        .filter_map(|(m, _)| m.strip_prefix(SERVICE))
        .collect();
    assert_eq!(table, METHODS.into_iter().collect::<BTreeSet<_>>());
}

/// (a) The credential `connect` gives a peer (CN remote-west, role peer) opens east's etcd,
/// read-only, and no RPC of east's apiserver or agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_peer_credential_is_refused_by_every_rpc() {
    let h = Harness::start().await.unwrap();
    let west = ClusterName::new("west").unwrap();
    let cred = h.east.credential_for(&west).await.unwrap();
    let info = mesh_certs::inspect_pem(&cred.cert_pem).unwrap().remove(0);
    assert_eq!(info.subject_cn.as_deref(), Some("remote-west"));
    assert_eq!(info.uris, ["spiffe://east.meshd/peer"]);

    // It is a working credential: it reads east's exported state from etcd.
    let store = EtcdStore::connect(&cred.to_etcd_config()).await.unwrap();
    let listed = store.list_all("mesh/state/", 100).await.unwrap();
    assert!(!listed.kvs.is_empty());

    h.assert_all_denied(&cred.cert_pem, &cred.key_pem, "role peer")
        .await;
    h.stop().await;
}

/// (b) A certificate of the cluster CA without a role (as issued before roles existed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_without_a_role_is_refused_by_every_rpc() {
    let h = Harness::start().await.unwrap();
    let plain = h.issue(&CertRequest::client("root"));
    h.assert_all_denied(&plain.cert_pem, &plain.key_pem, "CN=root carries no role")
        .await;
    // An admin role of another cluster, signed by this CA, is refused too.
    let west_admin = h.issue(&CertRequest::client("root").with_role("west", Role::Admin));
    h.assert_all_denied(
        &west_admin.cert_pem,
        &west_admin.key_pem,
        "is of cluster west, this is cluster east",
    )
    .await;
    h.stop().await;
}

/// (c) meshctl's admin certificate reaches every RPC of both servers: each answers as it
/// would without authorization (the apiserver has no drops to observe; this agent runs
/// without a datapath).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reaches_every_rpc() {
    let h = Harness::start().await.unwrap();
    let admin = h.issue(&CertRequest::client("root").with_role("east", Role::Admin));
    for (server, addr) in h.servers() {
        for (m, r) in h.call_all(addr, &admin.cert_pem, &admin.key_pem).await {
            let expected = match (server, m) {
                ("apiserver", "ObserveDrops") => Some(Code::Unimplemented),
                ("agent", "ObserveDrops") => Some(Code::FailedPrecondition),
                _ => None,
            };
            assert_eq!(
                r.as_ref().err().map(Status::code),
                expected,
                "{server} {m}: {r:?}"
            );
        }
    }
    h.stop().await;
}

/// The in-cluster components' roles: everything they could read in etcd anyway, not the
/// datapath's drops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_apiserver_roles_read_but_do_not_observe_drops() {
    let h = Harness::start().await.unwrap();
    for (cn, role) in [
        ("agent-east", Role::Agent),
        ("apiserver-east", Role::Apiserver),
    ] {
        let cert = h.issue(&CertRequest::client(cn).with_role("east", role));
        for (server, addr) in h.servers() {
            for (m, r) in h.call_all(addr, &cert.cert_pem, &cert.key_pem).await {
                if m == "ObserveDrops" {
                    let e = r.expect_err("drops are for admins");
                    assert_eq!(e.code(), Code::PermissionDenied, "{server} {m} as {role}");
                    assert!(
                        e.message().contains(&format!("role {role}"))
                            && e.message().contains("allowed: admin"),
                        "{}",
                        e.message()
                    );
                } else {
                    r.unwrap_or_else(|e| panic!("{server} {m} as {role}: {e:?}"));
                }
            }
        }
    }
    h.stop().await;
}
