//! The apiserver's gRPC API (mTLS, hot-reloaded server certificate) and its health/metrics
//! endpoints against real etcd and a running exporter.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clustermesh_apiserver::api::{ApiError, ClusterMeshApi, serve_grpc, server_tls};
use clustermesh_apiserver::export::ExportConfig;
use clustermesh_apiserver::health::{METRICS_CONTENT_TYPE, serve_health};
use clustermesh_apiserver::source::{ChannelSource, Object, SourceEvent};
use mesh_certs::{CertRequest, CertificateAuthority, IssuedCert, Role};
use mesh_proto::v1::cluster_mesh_client::ClusterMeshClient;
use mesh_proto::v1::{ClusterStatus, GetStatusRequest, ListIdentitiesRequest, ListServicesRequest};
use mesh_tests::exporter::RunningExporter;
use mesh_tests::objects::{endpoint_slice, node, pod, service, test_ip};
use mesh_tests::{EtcdGuard, init_tracing};
use meshd::keys::{self, ClusterSetIpEntry, Key};
use meshd::kv::KvStore;
use meshd::model::{ClusterId, ClusterName, MaxConnectedClusters};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const READY: Duration = Duration::from_secs(60);
const CALL: Duration = Duration::from_secs(10);

fn cfg() -> ExportConfig {
    let m = MaxConnectedClusters::C255;
    ExportConfig::new(
        ClusterName::new("east").unwrap(),
        ClusterId::new(1, m).unwrap(),
        m,
    )
}

/// 2 nodes, 6 pods over 3 label sets, 3 services (default/web and prod/api global,
/// default/internal not) with 2 backends each.
fn objects() -> Vec<Object> {
    let mut v = Vec::new();
    for n in 0..2 {
        v.push(Object::Node(Box::new(node(
            &format!("node-{n}"),
            test_ip(60_000 + n),
            &format!("198.18.{}.0/24", 100 + n),
        ))));
    }
    for i in 0..6u32 {
        let app = format!("app-{}", i % 3);
        v.push(Object::Pod(Box::new(pod(
            "default",
            &format!("pod-{i}"),
            &[("app", &app)],
            test_ip(1_000 + i),
            &format!("node-{}", i % 2),
        ))));
    }
    for (s, (ns, name, global)) in [
        ("default", "web", true),
        ("prod", "api", true),
        ("default", "internal", false),
    ]
    .into_iter()
    .enumerate()
    {
        let s = s as u32;
        v.push(Object::Service(Box::new(service(
            ns,
            name,
            test_ip(70_000 + s),
            global,
        ))));
        v.push(Object::EndpointSlice(Box::new(endpoint_slice(
            ns,
            &format!("{name}-abc"),
            name,
            &[test_ip(1_000 + 2 * s), test_ip(1_001 + 2 * s)],
        ))));
    }
    v
}

/// etcd, an exporter fed through a channel, the gRPC API and the health server.
struct Harness {
    etcd: EtcdGuard,
    store: Arc<dyn KvStore>,
    exporter: RunningExporter,
    tx: mpsc::Sender<SourceEvent>,
    ca: CertificateAuthority,
    /// The certificate the server started with.
    server_cert: IssuedCert,
    /// A client certificate of the cluster CA.
    client_cert: IssuedCert,
    dir: tempfile::TempDir,
    grpc_addr: SocketAddr,
    health_addr: SocketAddr,
    shutdown: CancellationToken,
    grpc: JoinHandle<Result<(), ApiError>>,
    health: JoinHandle<std::io::Result<()>>,
}

fn server_request() -> CertRequest {
    CertRequest::server(
        "clustermesh-apiserver",
        &["localhost"],
        &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
    )
    .with_role("east", Role::Apiserver)
}

impl Harness {
    async fn start() -> anyhow::Result<Self> {
        init_tracing();
        let etcd = Box::pin(EtcdGuard::start()).await?;
        let store: Arc<dyn KvStore> = Arc::new(etcd.root_store().await?);
        let (tx, src) = ChannelSource::new(1024);
        let exporter = RunningExporter::start(store.clone(), cfg(), Box::new(src));
        let mut registry = Registry::default();
        exporter.metrics.register(&mut registry);

        let ca = CertificateAuthority::generate("east-ca", Duration::from_secs(86_400))?;
        let dir = tempfile::Builder::new().prefix("mesh-api-").tempdir()?;
        let server_cert = ca.issue(&server_request())?;
        let (crt, key) = server_cert.write_files(dir.path(), "server")?;
        let client_cert =
            ca.issue(&CertRequest::client("meshctl").with_role("east", Role::Admin))?;
        let (tls, _pair) = server_tls(crt, key, ca.cert_pem())?;

        let grpc_listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let health_listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let grpc_addr = grpc_listener.local_addr()?;
        let health_addr = health_listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let api = ClusterMeshApi::new(cfg(), exporter.status.clone(), store.clone());
        let grpc = tokio::spawn(serve_grpc(grpc_listener, tls, api, shutdown.clone()));
        let health = tokio::spawn(serve_health(
            health_listener,
            exporter.status.clone(),
            Arc::new(registry),
            shutdown.clone(),
        ));
        Ok(Self {
            etcd,
            store,
            exporter,
            tx,
            ca,
            server_cert,
            client_cert,
            dir,
            grpc_addr,
            health_addr,
            shutdown,
            grpc,
            health,
        })
    }

    /// Sends every object and `Synced`, then waits for the first full export.
    async fn feed_and_wait(&mut self) -> anyhow::Result<()> {
        for o in objects() {
            self.tx.send(SourceEvent::Apply(o)).await?;
        }
        self.tx.send(SourceEvent::Synced).await?;
        self.exporter.wait_ready(READY).await?;
        Ok(())
    }

    /// A tonic client trusting `ca_pem`, presenting `identity` (if any).
    async fn client(
        &self,
        ca_pem: &str,
        identity: Option<&IssuedCert>,
    ) -> anyhow::Result<ClusterMeshClient<Channel>> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca_pem))
            .domain_name("localhost");
        if let Some(id) = identity {
            tls = tls.identity(Identity::from_pem(&id.cert_pem, &id.key_pem));
        }
        let channel = Channel::from_shared(format!("https://{}", self.grpc_addr))?
            .tls_config(tls)?
            .connect_timeout(CALL)
            .timeout(CALL)
            .connect()
            .await?;
        Ok(ClusterMeshClient::new(channel))
    }

    /// A client with a certificate of the cluster CA.
    async fn good_client(&self) -> anyhow::Result<ClusterMeshClient<Channel>> {
        self.client(self.ca.cert_pem(), Some(&self.client_cert))
            .await
    }

    async fn status_as(
        &self,
        ca_pem: &str,
        identity: Option<&IssuedCert>,
    ) -> anyhow::Result<ClusterStatus> {
        let call = async {
            let mut c = self.client(ca_pem, identity).await?;
            Ok(c.get_status(GetStatusRequest {}).await?.into_inner())
        };
        tokio::time::timeout(CALL, call)
            .await
            .context("GetStatus timed out")?
    }

    /// The serial of the certificate a fresh TLS connection is served.
    async fn served_serial(&self) -> anyhow::Result<String> {
        let config = mesh_certs::client_config(
            self.ca.cert_pem(),
            Some((&self.client_cert.cert_pem, &self.client_cert.key_pem)),
        )?;
        let tcp = TcpStream::connect(self.grpc_addr).await?;
        let name = ServerName::try_from("localhost".to_owned())?;
        let tls = tokio::time::timeout(CALL, TlsConnector::from(config).connect(name, tcp))
            .await
            .context("TLS handshake timed out")??;
        let der = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .context("the server presented no certificate")?;
        Ok(mesh_certs::inspect_der(der)?.serial_hex)
    }

    /// Cancels the servers and checks both end promptly and close their ports.
    async fn shutdown(self) -> anyhow::Result<()> {
        let started = tokio::time::Instant::now();
        self.shutdown.cancel();
        let bound = Duration::from_secs(15);
        tokio::time::timeout(bound, self.grpc)
            .await
            .context("gRPC server did not stop")???;
        tokio::time::timeout(bound, self.health)
            .await
            .context("health server did not stop")???;
        let took = started.elapsed();
        assert!(
            took < clustermesh_apiserver::api::SHUTDOWN_GRACE,
            "shutdown took {took:?} (open connections were not closed gracefully)"
        );
        assert!(
            TcpStream::connect(self.grpc_addr).await.is_err(),
            "gRPC port still open"
        );
        assert!(
            TcpStream::connect(self.health_addr).await.is_err(),
            "health port still open"
        );
        self.exporter.stop().await?;
        drop(self.etcd);
        Ok(())
    }
}

/// One HTTP/1.1 GET: (status code, header block, body).
async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String, String)> {
    let r = mesh_tests::util::http_get(addr, path).await?;
    Ok((r.status, r.head, r.body))
}

/// Polls `f` until it holds (bounded).
async fn eventually<F: AsyncFnMut() -> bool>(what: &str, f: F) {
    mesh_tests::util::eventually(what, Duration::from_secs(30), f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_services_identities_and_health_over_mtls() {
    let mut h = Harness::start().await.unwrap();

    // Before the source's first full load: alive, not ready.
    let (code, _, body) = http_get(h.health_addr, "/healthz").await.unwrap();
    assert_eq!((code, body.as_str()), (200, "ok"));
    let (code, _, body) = http_get(h.health_addr, "/readyz").await.unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("waiting for the first full export"), "{body}");
    let mut client = h.good_client().await.unwrap();
    let st = client
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!st.ready);
    assert!(st.not_ready_reason.contains("first full export"), "{st:?}");

    h.feed_and_wait().await.unwrap();
    let (code, _, body) = http_get(h.health_addr, "/readyz").await.unwrap();
    assert_eq!((code, body.as_str()), (200, "ready"));

    // GetStatus mirrors the exporter.
    let st = client
        .get_status(GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let exported = h.exporter.status.borrow().clone();
    assert!(st.ready, "{st:?}");
    assert!(st.not_ready_reason.is_empty());
    assert!(st.etcd_reachable);
    assert_eq!(st.component, "clustermesh-apiserver");
    assert_eq!(
        (
            st.cluster.as_str(),
            st.cluster_id,
            st.max_connected_clusters
        ),
        ("east", 1, 255)
    );
    assert!(!st.version.is_empty());
    assert_eq!(
        st.export_counts,
        exported
            .counts
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    );
    assert_eq!(st.export_counts.get("services"), Some(&2));
    assert_eq!(st.export_counts.get("identities"), Some(&3));
    assert_eq!(st.export_counts.get("ip"), Some(&6));
    assert_eq!(st.export_counts.get("nodes"), Some(&2));
    let mut synced = st.synced_kinds.clone();
    synced.sort();
    assert_eq!(synced, ["identities", "ip", "nodes", "services"]);

    // A ClusterSetIP and an entry that does not decode, written next to the export.
    let csip = Key::ClusterSetIp {
        namespace: "default".into(),
        name: "web".into(),
    }
    .to_string();
    let entry = ClusterSetIpEntry {
        namespace: "default".into(),
        name: "web".into(),
        ip: "198.19.0.10".parse().unwrap(),
    };
    h.store
        .put(&csip, &keys::encode(&entry), None)
        .await
        .unwrap();
    h.store
        .put("mesh/state/services/v1/east/default/broken", b"{", None)
        .await
        .unwrap();

    // ListServices: the global services exported, with backends.
    let services = client
        .list_services(ListServicesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .services;
    let names: Vec<_> = services
        .iter()
        .map(|s| format!("{}/{}", s.namespace, s.name))
        .collect();
    assert_eq!(names, ["default/web", "prod/api"]);
    for s in &services {
        assert_eq!((s.cluster.as_str(), s.cluster_id), ("east", 1));
        assert!(s.global);
        assert_eq!(s.ports.len(), 1);
        assert_eq!((s.ports[0].port, s.ports[0].protocol.as_str()), (80, "TCP"));
        assert_eq!(s.backends.len(), 2, "{s:?}");
        for b in &s.backends {
            assert!(b.ready);
            assert_eq!(b.cluster, "east");
            assert_eq!(b.ports[0].port, 8080);
        }
    }
    assert_eq!(services[0].cluster_set_ip, "198.19.0.10");
    assert_eq!(services[1].cluster_set_ip, "");
    let mut backend_ips: Vec<_> = services[0].backends.iter().map(|b| b.ip.clone()).collect();
    backend_ips.sort();
    assert_eq!(
        backend_ips,
        [test_ip(1_000).to_string(), test_ip(1_001).to_string()]
    );

    // Filters.
    let prod = client
        .list_services(ListServicesRequest {
            namespace: "prod".into(),
            cluster: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .services;
    assert_eq!(prod.len(), 1);
    assert_eq!(prod[0].name, "api");
    let west = client
        .list_services(ListServicesRequest {
            namespace: String::new(),
            cluster: "west".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .services;
    assert!(west.is_empty());
    for (namespace, cluster) in [("Not_A_Label", ""), ("a/b", ""), ("", "East")] {
        let e = client
            .list_services(ListServicesRequest {
                namespace: namespace.into(),
                cluster: cluster.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    }

    // ListIdentities: one per label set, in east's ID range.
    let ids = client
        .list_identities(ListIdentitiesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .identities;
    assert_eq!(ids.len(), 3, "{ids:?}");
    let mut apps: Vec<_> = ids
        .iter()
        .map(|i| {
            assert_eq!(i.cluster, "east");
            assert_eq!(i.id >> 16, 1, "identity {} outside cluster 1", i.id);
            assert!(i.labels.contains(&"mesh:io.meshd.cluster=east".to_owned()));
            i.labels
                .iter()
                .find(|l| l.starts_with("k8s:app="))
                .cloned()
                .unwrap()
        })
        .collect();
    apps.sort();
    assert_eq!(apps, ["k8s:app=app-0", "k8s:app=app-1", "k8s:app=app-2"]);
    let e = client
        .list_identities(ListIdentitiesRequest {
            cluster: "-bad".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    // Metrics.
    let (code, head, body) = http_get(h.health_addr, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("content-type: {METRICS_CONTENT_TYPE}")),
        "{head}"
    );
    assert!(
        body.contains(r#"mesh_export_entries{kind="services"} 2"#),
        "{body}"
    );
    assert!(body.contains(r#"mesh_export_entries{kind="identities"} 3"#));
    assert!(body.contains("mesh_export_etcd_latency_seconds_count"));

    // Shutdown with a client connection still open.
    h.shutdown().await.unwrap();
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_cluster_ca_certificate_are_refused() {
    let mut h = Harness::start().await.unwrap();
    h.feed_and_wait().await.unwrap();

    // A connection that never handshakes does not hold up others.
    let _idle = TcpStream::connect(h.grpc_addr).await.unwrap();

    let other_ca = CertificateAuthority::generate("other-ca", Duration::from_secs(86_400)).unwrap();
    let foreign = other_ca
        .issue(&CertRequest::client("meshctl").with_role("east", Role::Admin))
        .unwrap();
    let e = h
        .status_as(h.ca.cert_pem(), Some(&foreign))
        .await
        .expect_err("a client certificate of another CA must be refused");
    assert_refused_by_tls(&e);
    let e = h
        .status_as(h.ca.cert_pem(), None)
        .await
        .expect_err("a client without a certificate must be refused");
    assert_refused_by_tls(&e);

    // The server keeps serving clients of its CA.
    let st = h
        .status_as(h.ca.cert_pem(), Some(&h.client_cert))
        .await
        .unwrap();
    assert!(st.ready);
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_server_certificate_is_served_without_restart() {
    let h = Harness::start().await.unwrap();
    let first = h.server_cert.info().unwrap().serial_hex;
    assert_eq!(h.served_serial().await.unwrap(), first);
    let mut client = h.good_client().await.unwrap();
    client.get_status(GetStatusRequest {}).await.unwrap();

    // Rotate: same CA, new certificate and key, written over the files in place.
    let next = h.ca.issue(&server_request()).unwrap();
    let want = next.info().unwrap().serial_hex;
    assert_ne!(want, first);
    write_pair(&next, h.dir.path());
    eventually("the new certificate to be served", async || {
        h.served_serial().await.is_ok_and(|s| s == want)
    })
    .await;

    // New connections work with it; the connection opened before still works too.
    let st = h
        .status_as(h.ca.cert_pem(), Some(&h.client_cert))
        .await
        .unwrap();
    assert_eq!(st.cluster, "east");
    client.get_status(GetStatusRequest {}).await.unwrap();
    drop(client);
    h.shutdown().await.unwrap();
}

/// The call failed at the transport (TLS handshake alert or closed connection), never
/// reaching the service. With TLS 1.3 the client may see the server's alert or only the
/// closed connection, depending on timing.
fn assert_refused_by_tls(e: &anyhow::Error) {
    let text = format!("{e:#}");
    assert!(
        e.chain().any(|c| c.is::<tonic::transport::Error>()) || text.contains("transport error"),
        "{text}"
    );
    assert!(
        [
            "UnknownCA",
            "CertificateRequired",
            "connection closed",
            "reset",
            "broken pipe"
        ]
        .iter()
        .any(|s| text.contains(s)),
        "{text}"
    );
}

fn write_pair(cert: &IssuedCert, dir: &Path) {
    cert.write_files(dir, "server").unwrap();
}
