//! The agent's gRPC API (real mTLS) and health/metrics over two real clusters peered through
//! kvstoremesh, the `mesh-agent` binary as a process, and the apiserver's `ListIpCache`.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use clustermesh_apiserver::api::ClusterMeshApi;
use clustermesh_apiserver::export::ExportConfig;
use mesh_agent::api::{self, AgentApi};
use mesh_agent::metrics::{self, AgentMetrics};
use mesh_agent::runtime::PeerAccess;
use mesh_certs::{CertRequest, CertificateAuthority, IssuedCert, Role};
use mesh_proto::server::{ServeError, serve_mtls, server_tls};
use mesh_proto::v1::cluster_mesh_client::ClusterMeshClient;
use mesh_proto::v1::{
    ClusterStatus, GetStatusRequest, ListIdentitiesRequest, ListIpCacheRequest, ListServicesRequest,
};
use mesh_tests::mesh::{TestCluster, connect, supervisor_config};
use mesh_tests::objects::web_cluster;
use mesh_tests::util::{ChildGuard, HttpResponse, free_port, http_get};
use mesh_tests::{bin_path, init_tracing};
use meshd::model::{ClusterName, MaxConnectedClusters};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const CONVERGE: Duration = Duration::from_secs(60);
const CALL: Duration = Duration::from_secs(10);

fn ip(c: u8, i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, c, i)
}

/// A server certificate for 127.0.0.1 / localhost.
fn server_request(cn: &str) -> CertRequest {
    CertRequest::server(cn, &["localhost"], &[IpAddr::V4(Ipv4Addr::LOCALHOST)])
}

/// meshctl's client certificate: role admin of `cluster`.
fn admin_request(cluster: &str) -> CertRequest {
    CertRequest::client("meshctl").with_role(cluster, Role::Admin)
}

/// A tonic client of `addr` trusting `ca`, presenting `identity`.
async fn client(
    addr: SocketAddr,
    ca: &CertificateAuthority,
    identity: &IssuedCert,
) -> anyhow::Result<ClusterMeshClient<Channel>> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.cert_pem()))
        .domain_name("localhost")
        .identity(Identity::from_pem(&identity.cert_pem, &identity.key_pem));
    let channel = Channel::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(CALL)
        .timeout(CALL)
        .connect()
        .await?;
    Ok(ClusterMeshClient::new(channel))
}

fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l == line)
}

/// Polls `f` until it returns `Some` (bounded by [`CONVERGE`]).
async fn eventually<T, F: AsyncFnMut() -> Option<T>>(what: &str, f: F) -> T {
    mesh_tests::util::eventually_some(what, CONVERGE, f).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_api_over_mtls_with_two_clusters() {
    init_tracing();
    let mut east = Box::pin(TestCluster::start("east", 1, web_cluster(1)))
        .await
        .unwrap();
    let mut west = Box::pin(TestCluster::start("west", 2, web_cluster(2)))
        .await
        .unwrap();
    connect(&east, &west).await.unwrap();
    east.start_kvstoremesh();
    west.start_kvstoremesh();
    let agent_metrics = AgentMetrics::default();
    let mut registry = Registry::default();
    agent_metrics.register(&mut registry);
    let agent = east.start_agent_with(PeerAccess::Cached, agent_metrics.reflector.clone());
    let handles = agent.handles();

    // The API over mTLS, health and metrics, on 127.0.0.1:0.
    let ca = CertificateAuthority::generate("east-ca", Duration::from_secs(86_400)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (crt, key) = ca
        .issue(&server_request("mesh-agent"))
        .unwrap()
        .write_files(dir.path(), "agent")
        .unwrap();
    let (tls, _pair) = server_tls(crt, key, ca.cert_pem()).unwrap();
    let grpc_listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let health_listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let (grpc_addr, health_addr) = (
        grpc_listener.local_addr().unwrap(),
        health_listener.local_addr().unwrap(),
    );
    let shutdown = CancellationToken::new();
    let api = AgentApi::new(&supervisor_config(&east.name, east.id), handles.clone());
    let authz = api.authorizer();
    let grpc: tokio::task::JoinHandle<Result<(), ServeError>> = tokio::spawn(serve_mtls(
        grpc_listener,
        tls,
        api.routes(),
        authz,
        shutdown.clone(),
    ));
    let health = tokio::spawn(meshd::health::serve_health(
        health_listener,
        handles.status.clone(),
        api::not_ready_reason,
        Arc::new(registry),
        shutdown.clone(),
    ));
    let follow = tokio::spawn(metrics::follow_status(
        agent_metrics,
        handles.status.clone(),
        shutdown.clone(),
    ));
    let me = ca.issue(&admin_request("east")).unwrap();
    let mut c = client(grpc_addr, &ca, &me).await.unwrap();

    // GetStatus: ready, west ready with its counts.
    let st: ClusterStatus = eventually("the agent to be ready", async || {
        let st = c.get_status(GetStatusRequest {}).await.ok()?.into_inner();
        (st.ready && st.peers.iter().any(|p| p.state == "ready")).then_some(st)
    })
    .await;
    assert_eq!(
        (st.component.as_str(), st.cluster.as_str(), st.cluster_id),
        ("mesh-agent", "east", 1)
    );
    assert_eq!(
        (st.datapath.as_str(), st.max_connected_clusters),
        ("none", 255)
    );
    assert!(
        st.not_ready_reason.is_empty() && st.etcd_reachable,
        "{st:?}"
    );
    assert_eq!(st.export_counts.get("services"), Some(&1), "{st:?}");
    assert_eq!(st.peers.len(), 1, "{st:?}");
    let w = &st.peers[0];
    assert_eq!((w.name.as_str(), w.cluster_id), ("west", 2));
    assert!(w.connected, "{w:?}");
    assert_eq!(w.counts.get("services"), Some(&1), "{w:?}");
    assert!(w.counts.get("ip").is_some_and(|n| *n >= 2), "{w:?}");
    assert!(w.counts.get("identities").is_some_and(|n| *n >= 1), "{w:?}");
    let mut synced = w.synced_kinds.clone();
    synced.sort();
    assert_eq!(synced, ["identities", "ip", "nodes", "services"]);
    assert!(w.cert_not_after_unix > 0, "{w:?}");
    assert!(st.peer_config_errors.is_empty());

    // ListServices: shop/web merged from both clusters.
    let web = eventually("shop/web with both clusters' backends", async || {
        let svcs = c
            .list_services(ListServicesRequest::default())
            .await
            .ok()?
            .into_inner()
            .services;
        let web = svcs
            .into_iter()
            .find(|s| s.namespace == "shop" && s.name == "web")?;
        (web.backends.len() == 4).then_some(web)
    })
    .await;
    let clusters: BTreeSet<&str> = web.clusters.iter().map(String::as_str).collect();
    assert_eq!(clusters, BTreeSet::from(["east", "west"]));
    assert!(web.global && web.conflicts.is_empty(), "{web:?}");
    assert_eq!(web.frontends, [Ipv4Addr::new(198, 19, 1, 10).to_string()]);
    let backends: BTreeSet<(String, String, bool)> = web
        .backends
        .iter()
        .map(|b| (b.cluster.clone(), b.ip.clone(), b.active))
        .collect();
    let want: BTreeSet<(String, String, bool)> = [(1, "east"), (2, "west")]
        .into_iter()
        .flat_map(|(n, c)| [11, 12].map(|i| (c.to_owned(), ip(n, i).to_string(), true)))
        .collect();
    assert_eq!(
        backends, want,
        "affinity none: every ready backend is active"
    );
    for (namespace, cluster, n) in [("shop", "", 1), ("other", "", 0), ("", "west", 1)] {
        let got = c
            .list_services(ListServicesRequest {
                namespace: namespace.into(),
                cluster: cluster.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .services;
        assert_eq!(got.len(), n, "namespace {namespace:?} cluster {cluster:?}");
    }

    // ListIpCache: the cluster filter keeps exactly west's entries.
    let all = c
        .list_ip_cache(ListIpCacheRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    let west_only = c
        .list_ip_cache(ListIpCacheRequest {
            cluster: "west".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let west_ips: BTreeSet<&str> = west_only.iter().map(|e| e.ip.as_str()).collect();
    assert!(
        west_only.iter().all(|e| e.cluster == "west"),
        "{west_only:?}"
    );
    assert_eq!(
        west_ips,
        all.iter()
            .filter(|e| e.cluster == "west")
            .map(|e| e.ip.as_str())
            .collect::<BTreeSet<_>>()
    );
    for i in [11, 12] {
        assert!(
            west_ips.contains(ip(2, i).to_string().as_str()),
            "{west_ips:?}"
        );
        assert!(
            !west_ips.contains(ip(1, i).to_string().as_str()),
            "{west_ips:?}"
        );
    }
    let pod = west_only
        .iter()
        .find(|e| e.ip == ip(2, 11).to_string())
        .unwrap();
    assert_eq!((pod.namespace.as_str(), pod.prefix_len), ("shop", 32));
    assert_eq!(pod.identity >> 16, 2, "identity in west's range: {pod:?}");

    // ListIdentities with a cluster filter.
    let ids = c
        .list_identities(ListIdentitiesRequest {
            cluster: "west".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .identities;
    assert!(!ids.is_empty());
    assert!(
        ids.iter().all(|i| i.cluster == "west" && i.id >> 16 == 2),
        "{ids:?}"
    );

    // Invalid filters.
    let e = c
        .list_ip_cache(ListIpCacheRequest {
            cluster: "West".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e = c
        .list_services(ListServicesRequest {
            namespace: "Not_A_Label".into(),
            cluster: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    // Health and metrics.
    let HttpResponse {
        status: code, body, ..
    } = http_get(health_addr, "/readyz").await.unwrap();
    assert_eq!((code, body.as_str()), (200, "ready"));
    let ready_west = r#"mesh_clustermesh_remote_cluster_readiness_status{peer="west"} 1"#;
    let text = eventually("metrics of west", async || {
        let text = http_get(health_addr, "/metrics").await.ok()?.body;
        has_line(&text, ready_west).then_some(text)
    })
    .await;
    assert!(
        has_line(&text, "mesh_clustermesh_remote_clusters 1"),
        "{text}"
    );
    assert!(
        text.contains(r#"mesh_clustermesh_remote_cluster_entries{peer="west",kind="ip"}"#),
        "{text}"
    );
    assert!(text.contains("mesh_reflector_events_total"), "{text}");

    // Removing west's credential drops its series.
    meshd::peers::remove_peer_file(east.peers_dir.path(), &ClusterName::new("west").unwrap())
        .unwrap();
    let text = eventually("west's series to disappear", async || {
        let text = http_get(health_addr, "/metrics").await.ok()?.body;
        (!text.contains(r#"peer="west""#)).then_some(text)
    })
    .await;
    assert!(
        has_line(&text, "mesh_clustermesh_remote_clusters 0"),
        "{text}"
    );
    let st = c
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(st.peers.is_empty(), "{st:?}");

    // Shutdown: the servers end promptly even with a client connected.
    shutdown.cancel();
    let bound = Duration::from_secs(15);
    tokio::time::timeout(bound, grpc)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    tokio::time::timeout(bound, health)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    follow.await.unwrap();
    drop(c);
    agent.shutdown().await;
    east.stop_kvstoremesh().await;
    west.stop_kvstoremesh().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_agent_binary_becomes_ready_and_stops_on_sigterm() {
    init_tracing();
    let east = Box::pin(TestCluster::start("east", 1, web_cluster(1)))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("etcd-ca.crt"), east.etcd.ca().cert_pem()).unwrap();
    east.etcd
        .ca()
        .issue(&CertRequest::client("root"))
        .unwrap()
        .write_files(d, "etcd-client")
        .unwrap();
    let api_ca = CertificateAuthority::generate("east-ca", Duration::from_secs(3600)).unwrap();
    api_ca.write_files(d, "api-ca").unwrap();
    api_ca
        .issue(&server_request("mesh-agent"))
        .unwrap()
        .write_files(d, "api")
        .unwrap();
    let (grpc, health) = (free_port(), free_port());
    let child = Command::new(bin_path("mesh-agent"))
        .args(["--cluster-name", "east", "--cluster-id", "1"])
        .args([
            "--etcd-endpoint",
            &east.etcd.endpoint(),
            "--etcd-server-name",
            "localhost",
        ])
        .arg("--etcd-ca")
        .arg(d.join("etcd-ca.crt"))
        .arg("--etcd-cert")
        .arg(d.join("etcd-client.crt"))
        .arg("--etcd-key")
        .arg(d.join("etcd-client.key"))
        .arg("--peers-dir")
        .arg(east.peers_dir.path())
        .args(["--peer-access", "cached", "--remote-cache-ttl", "0"])
        .args(["--grpc-listen", &format!("127.0.0.1:{grpc}")])
        .arg("--grpc-cert")
        .arg(d.join("api.crt"))
        .arg("--grpc-key")
        .arg(d.join("api.key"))
        .arg("--grpc-client-ca")
        .arg(d.join("api-ca.crt"))
        .args(["--health-listen", &format!("127.0.0.1:{health}")])
        // No datapath on purpose: `auto` would fail closed without a bpffs.
        .args(["--datapath", "recording"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = ChildGuard(child);
    let health_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, health));

    // Ready once the local cluster is read (no peers configured).
    let deadline = tokio::time::Instant::now() + CONVERGE;
    loop {
        if http_get(health_addr, "/readyz")
            .await
            .is_ok_and(|r| r.status == 200)
        {
            break;
        }
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "mesh-agent exited early"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "mesh-agent never became ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let HttpResponse {
        status: code,
        body: text,
        ..
    } = http_get(health_addr, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(
        has_line(&text, "mesh_clustermesh_remote_clusters 0"),
        "{text}"
    );
    let me = api_ca.issue(&admin_request("east")).unwrap();
    let mut c = client(SocketAddr::from((Ipv4Addr::LOCALHOST, grpc)), &api_ca, &me)
        .await
        .unwrap();
    let st = c
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(st.ready, "{st:?}");
    assert_eq!(
        (st.component.as_str(), st.cluster.as_str()),
        ("mesh-agent", "east")
    );
    let svcs = c
        .list_services(ListServicesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .services;
    assert_eq!(svcs.len(), 1, "{svcs:?}");
    assert_eq!(svcs[0].backends.len(), 2);
    drop(c);

    // SIGTERM: the process exits 0.
    let status = child.terminate(Duration::from_secs(15)).await;
    assert!(status.success(), "exit status {status}");
    assert!(
        TcpStream::connect(health_addr).await.is_err(),
        "health port closed"
    );
}

/// `ListIpCache` is served by the apiserver too: its own exported entries, by IP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_lists_its_exported_ipcache() {
    init_tracing();
    let east = Box::pin(TestCluster::start("east", 1, web_cluster(1)))
        .await
        .unwrap();
    let ca = CertificateAuthority::generate("east-ca", Duration::from_secs(86_400)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (crt, key) = ca
        .issue(&server_request("clustermesh-apiserver"))
        .unwrap()
        .write_files(dir.path(), "api")
        .unwrap();
    let (tls, _pair) = server_tls(crt, key, ca.cert_pem()).unwrap();
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = ExportConfig::new(east.name.clone(), east.id, MaxConnectedClusters::C255);
    let api = ClusterMeshApi::new(cfg, east.exporter.status.clone(), east.store.clone());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(clustermesh_apiserver::api::serve_grpc(
        listener,
        tls,
        api,
        shutdown.clone(),
    ));
    let me = ca.issue(&admin_request("east")).unwrap();
    let mut c = client(addr, &ca, &me).await.unwrap();

    let entries = c
        .list_ip_cache(ListIpCacheRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    let ips: Vec<IpAddr> = entries.iter().map(|e| e.ip.parse().unwrap()).collect();
    let mut sorted = ips.clone();
    sorted.sort();
    assert_eq!(ips, sorted, "ordered by IP");
    for i in [11, 12] {
        assert!(ips.contains(&IpAddr::V4(ip(1, i))), "{entries:?}");
    }
    assert!(
        entries
            .iter()
            .all(|e| e.cluster == "east" && e.identity >> 16 == 1)
    );
    let pod = entries
        .iter()
        .find(|e| e.ip == ip(1, 11).to_string())
        .unwrap();
    assert_eq!(
        (pod.namespace.as_str(), pod.node.as_str()),
        ("shop", "node-1")
    );
    let other = c
        .list_ip_cache(ListIpCacheRequest {
            cluster: "west".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(other.is_empty());
    let e = c
        .list_ip_cache(ListIpCacheRequest {
            cluster: "-x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // Exported services carry their cluster and active backends.
    let svcs = c
        .list_services(ListServicesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .services;
    assert_eq!(svcs.len(), 1);
    assert_eq!(svcs[0].clusters, ["east"]);
    assert!(svcs[0].backends.iter().all(|b| b.active && b.ready));
    drop(c);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
