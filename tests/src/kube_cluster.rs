//! `KubeCluster`: one cluster in Kubernetes mode — its own test API server, real etcd, the
//! exporter on the Kubernetes source, kvstoremesh and an agent reading peer Secrets, and
//! optionally ([`KubeCluster::start_with_relay`]) the apiserver's identity relay in front of
//! etcd, installed as the Helm chart does (Secret `meshd-peer-ca`, Service port `relay`) —
//! and `connect_by_context`, the steps `meshctl connect --context` takes, through
//! `meshd::kube`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use clustermesh_apiserver::bootstrap;
use clustermesh_apiserver::export::ExportConfig;
use clustermesh_apiserver::kvstoremesh::{self, KvStoreMeshConfig};
use clustermesh_apiserver::relay::{self, Relay, RelayConfig, RelayMetrics};
use clustermesh_apiserver::source::kube::{KubeSource, KubeSourceConfig};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Secret, Service};
use kube::api::{Api, PostParams};
use mesh_agent::runtime::{Agent, AgentConfig, PeerAccess};
use mesh_certs::{CertRequest, CertificateAuthority, Role};
use meshd::kube::PeerSecretWatcher;
use meshd::kv::{EtcdConfig, EtcdStore, KvStore};
use meshd::metrics::ReflectorMetrics;
use meshd::model::{ClusterId, ClusterName, MaxConnectedClusters};
use meshd::peers::PeerCredential;
use meshd::remote::PeerStatus;
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::EtcdGuard;
use crate::exporter::RunningExporter;
use crate::kube_api::KubeApiServer;
use crate::mesh::supervisor_config;

/// Namespace meshd is "installed" in.
pub const MESHD_NAMESPACE: &str = "meshd";

/// One cluster in Kubernetes mode.
pub struct KubeCluster {
    /// Name.
    pub name: ClusterName,
    /// ID.
    pub id: ClusterId,
    /// Its Kubernetes API.
    pub api: KubeApiServer,
    /// A client of it.
    pub client: kube::Client,
    /// Its etcd.
    pub etcd: EtcdGuard,
    /// Root store of its etcd.
    pub store: Arc<dyn KvStore>,
    /// The exporter (Kubernetes source).
    pub exporter: RunningExporter,
    /// kvstoremesh's view of its peers.
    pub kvstoremesh_status: watch::Receiver<Vec<PeerStatus>>,
    /// The agent (peers from Secrets, read through the kvstoremesh cache).
    pub agent: Agent,
    /// The identity relay peers dial (with [`KubeCluster::start_with_relay`]).
    pub relay: Option<RunningRelay>,
    shutdown: CancellationToken,
    kvstoremesh: Option<tokio::task::JoinHandle<()>>,
}

impl KubeCluster {
    /// Starts the API server (with what the Helm chart installs: namespace `meshd`,
    /// ConfigMap `meshd-config`, Secret `meshd-ca`, NodePort Service
    /// `clustermesh-apiserver` on a node at 127.0.0.1), etcd, the exporter, kvstoremesh and
    /// an agent. No relay: what installs before the relay have (peers dial etcd).
    pub async fn start(name: &str, id: u32) -> anyhow::Result<Self> {
        Box::pin(Self::start_inner(name, id, false)).await
    }

    /// [`KubeCluster::start`] with the identity relay, as the Helm chart installs it
    /// (`relay.enabled`): etcd trusts its CA and a relay CA (never the peer CA), the relay
    /// runs in-process in front of etcd (peer CA as its client CA, a server certificate of
    /// the peer CA for localhost), Secret `meshd-peer-ca` holds the peer CA and Service
    /// `clustermesh-apiserver` has a `relay` port whose node port is the relay's.
    pub async fn start_with_relay(name: &str, id: u32) -> anyhow::Result<Self> {
        Box::pin(Self::start_inner(name, id, true)).await
    }

    async fn start_inner(name: &str, id: u32, with_relay: bool) -> anyhow::Result<Self> {
        let name = ClusterName::new(name)?;
        let id = ClusterId::new(id, MaxConnectedClusters::C255)?;
        let api = KubeApiServer::start().await?;
        let client = api.client().await?;
        let shutdown = CancellationToken::new();
        let relay_ca = if with_relay {
            Some(CertificateAuthority::generate(
                &format!("meshd-{name}-relay-ca"),
                Duration::from_secs(86_400),
            )?)
        } else {
            None
        };
        let extra: Vec<&str> = relay_ca
            .iter()
            .map(CertificateAuthority::cert_pem)
            .collect();
        let etcd = Box::pin(EtcdGuard::start_trusting(&extra)).await?;
        let root = etcd.root_store().await?;
        Box::pin(bootstrap::bootstrap(&root.client(), &name)).await?;
        let store: Arc<dyn KvStore> = Arc::new(root);
        let relay = match relay_ca {
            Some(relay_ca) => Some(RunningRelay::start(&name, &etcd, relay_ca, &shutdown).await?),
            None => None,
        };
        install(&client, &name, id, &etcd, relay.as_ref()).await?;

        let mut cfg = ExportConfig::new(name.clone(), id, MaxConnectedClusters::C255);
        cfg.heartbeat_interval = Duration::from_secs(1);
        let source = KubeSource::new(client.clone(), KubeSourceConfig::default());
        let mut exporter = RunningExporter::start(store.clone(), cfg, Box::new(source));
        Box::pin(exporter.wait_ready(Duration::from_secs(60))).await?;

        let (tx, kvstoremesh_status) = watch::channel(Vec::new());
        let kcfg = KvStoreMeshConfig {
            supervisor: supervisor_config(&name, id),
            peers_dir: std::path::PathBuf::new(),
            heartbeat_mirror: Duration::from_millis(200),
            limits: meshd::trust::PeerLimits::default(),
            trust_metrics: meshd::metrics::TrustMetrics::default(),
        };
        let peers = PeerSecretWatcher::new(client.clone(), MESHD_NAMESPACE)
            .with_events("clustermesh-apiserver", Some("apiserver-0".into()))
            .run(shutdown.child_token());
        let kvstoremesh = tokio::spawn({
            let (store, shutdown) = (store.clone(), shutdown.clone());
            async move {
                if let Err(e) = kvstoremesh::run_with_peers(
                    store,
                    kcfg,
                    ReflectorMetrics::default(),
                    tx,
                    peers,
                    shutdown,
                )
                .await
                {
                    tracing::error!(error = %e, "kvstoremesh failed");
                }
            }
        });
        let mut supervisor = supervisor_config(&name, id);
        supervisor.heartbeat_timeout = Duration::from_secs(30);
        let agent = Agent::start_with_peers(
            AgentConfig {
                supervisor,
                peers_dir: std::path::PathBuf::new(),
                access: PeerAccess::Cached,
                limits: meshd::trust::PeerLimits::default(),
                trust_metrics: meshd::metrics::TrustMetrics::default(),
            },
            store.clone(),
            ReflectorMetrics::default(),
            PeerSecretWatcher::new(client.clone(), MESHD_NAMESPACE).run(shutdown.child_token()),
        );
        Ok(Self {
            name,
            id,
            api,
            client,
            etcd,
            store,
            exporter,
            kvstoremesh_status,
            agent,
            relay,
            shutdown,
            kvstoremesh: Some(kvstoremesh),
        })
    }
}

/// The apiserver's identity relay, run in-process in front of a test etcd.
pub struct RunningRelay {
    /// `https://127.0.0.1:<port>`: what peers dial.
    pub endpoint: String,
    /// The port (the Service's `relay` node port).
    pub port: u16,
    /// The peer CA: signs peer credentials and the relay's server certificate; etcd does not
    /// trust it.
    pub peer_ca: CertificateAuthority,
    /// The relay (live connections per peer user).
    pub relay: Relay,
    /// Its metrics.
    pub metrics: RelayMetrics,
}

impl std::fmt::Debug for RunningRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningRelay")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl RunningRelay {
    async fn start(
        name: &ClusterName,
        etcd: &EtcdGuard,
        relay_ca: CertificateAuthority,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Self> {
        let peer_ca = CertificateAuthority::generate(
            &format!("meshd-{name}-peer-ca"),
            Duration::from_secs(86_400),
        )?;
        let server = peer_ca.issue(&CertRequest::server(
            "clustermesh-relay",
            &["localhost"],
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
        ))?;
        let identity = mesh_certs::static_identity(&server.cert_pem, &server.key_pem)?;
        let cfg = RelayConfig {
            upstream: relay::parse_upstream(&etcd.endpoint())?,
            upstream_server_name: Some("localhost".into()),
            upstream_ca_pem: etcd.ca().cert_pem().to_owned(),
            server_tls: relay::server_tls(identity, peer_ca.cert_pem())?,
            relay_ca,
            check_interval: relay::DEFAULT_CHECK_INTERVAL,
        };
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let port = listener.local_addr()?.port();
        let metrics = RelayMetrics::default();
        let relay = Relay::new(cfg, metrics.clone())?;
        tokio::spawn(relay.clone().run(listener, shutdown.child_token()));
        Ok(Self {
            endpoint: format!("https://127.0.0.1:{port}"),
            port,
            peer_ca,
            relay,
            metrics,
        })
    }
}

/// Creates what a meshd installation publishes in its namespace.
async fn install(
    client: &kube::Client,
    name: &ClusterName,
    id: ClusterId,
    etcd: &EtcdGuard,
    relay: Option<&RunningRelay>,
) -> anyhow::Result<()> {
    let pp = PostParams::default();
    Api::<Namespace>::all(client.clone())
        .create(
            &pp,
            &serde_json::from_value(json!({"metadata": {"name": MESHD_NAMESPACE}}))?,
        )
        .await?;
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": meshd::kube::CONFIG_MAP},
        "data": {"cluster-name": name.as_str(), "cluster-id": id.get().to_string(),
                 "max-connected-clusters": "255"},
    }))?;
    Api::<ConfigMap>::namespaced(client.clone(), MESHD_NAMESPACE)
        .create(&pp, &cm)
        .await?;
    let ca = etcd.ca();
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": meshd::kube::CA_SECRET},
        "data": {"ca.crt": b64(ca.cert_pem()), "ca.key": b64(ca.key_pem())},
    }))?;
    Api::<Secret>::namespaced(client.clone(), MESHD_NAMESPACE)
        .create(&pp, &secret)
        .await?;
    let port: u16 = etcd
        .endpoint()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_default();
    let mut ports =
        vec![json!({"name": "etcd", "port": 2379, "targetPort": "etcd", "nodePort": port})];
    if let Some(r) = relay {
        ports.push(
            json!({"name": "relay", "port": 2381, "targetPort": "relay", "nodePort": r.port}),
        );
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": meshd::kube::PEER_CA_SECRET},
            "data": {"ca.crt": b64(r.peer_ca.cert_pem()), "ca.key": b64(r.peer_ca.key_pem())},
        }))?;
        Api::<Secret>::namespaced(client.clone(), MESHD_NAMESPACE)
            .create(&pp, &secret)
            .await?;
    }
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": meshd::kube::APISERVER_SERVICE},
        "spec": {"type": "NodePort", "selector": {"app": "clustermesh-apiserver"},
                 "ports": ports},
    }))?;
    Api::<Service>::namespaced(client.clone(), MESHD_NAMESPACE)
        .create(&pp, &svc)
        .await?;
    // Pods of cluster ID n get `test_ip` addresses inside the /25 this node advertises
    // (n = 1: 198.18.0.0/25, n = 2: 198.18.0.128/25, ...); a peer may claim only those.
    let cidr = ipnet::Ipv4Net::new(crate::objects::test_ip((u32::from(id.get()) - 1) * 128), 25)?;
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": "node-1"},
        "spec": {"podCIDR": cidr.to_string(), "podCIDRs": [cidr.to_string()]},
        "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }))?;
    create_with_status(&Api::<Node>::all(client.clone()), &node).await?;
    Ok(())
}

/// Creates `obj`, then writes its `.status` through the status subresource (the API
/// server ignores status on create, as a real one does; kubelets and controllers set it).
pub async fn create_with_status<K>(api: &Api<K>, obj: &K) -> anyhow::Result<K>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let created = api.create(&PostParams::default(), obj).await?;
    let status = serde_json::to_value(obj)?
        .get("status")
        .cloned()
        .filter(|s| !s.is_null());
    let Some(status) = status else {
        return Ok(created);
    };
    let name = created.meta().name.clone().unwrap_or_default();
    Ok(api
        .patch_status(
            &name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({ "status": status })),
        )
        .await?)
}

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// The credential with which `reader` reads `of`, made the way `meshctl connect --context`
/// does it, through `of`'s Kubernetes API only: cluster config, CA and clustermesh
/// endpoint from `meshd::kube`; etcd reached at that endpoint as `root` with a certificate
/// from that CA; user `remote-<reader>` created; a client certificate for it issued (by the
/// peer CA, for the relay, when `of` runs one).
pub async fn credential_by_context(
    of: &kube::Client,
    reader: &ClusterName,
) -> anyhow::Result<PeerCredential> {
    let config = meshd::kube::read_cluster_config(of, MESHD_NAMESPACE).await?;
    let (ca_pem, ca_key) = meshd::kube::read_ca(of, MESHD_NAMESPACE).await?;
    let endpoint = meshd::kube::clustermesh_endpoint(of, MESHD_NAMESPACE, None).await?;
    let ca = CertificateAuthority::from_pem(&ca_pem, &ca_key)?;
    // The test etcd's certificate names localhost and 127.0.0.1 (the chart's names the
    // Service: endpoint.tls_server_name).
    let tls_server_name = match endpoint.host.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) if ip == Ipv4Addr::LOCALHOST => Some("localhost".to_owned()),
        _ => Some(endpoint.tls_server_name.clone()),
    };
    let root =
        ca.issue(&CertRequest::client("root").with_role(config.name.as_str(), Role::Admin))?;
    let etcd = EtcdStore::connect(&EtcdConfig {
        endpoints: vec![endpoint.url()],
        ca_pem: Some(ca_pem.clone()),
        cert_pem: Some(root.cert_pem),
        key_pem: Some(root.key_pem),
        tls_server_name: tls_server_name.clone(),
        connect_timeout: Some(Duration::from_secs(3)),
        request_timeout: Some(Duration::from_secs(10)),
        ..EtcdConfig::default()
    })
    .await?;
    bootstrap::add_remote_user(&etcd.client(), reader).await?;
    // With the identity relay, the peer CA signs the credential and the relay is its server.
    let peer = match (
        meshd::kube::read_peer_ca(of, MESHD_NAMESPACE).await?,
        endpoint.relay_url(),
    ) {
        (Some((cert, key)), Some(relay)) => {
            Some((CertificateAuthority::from_pem(&cert, &key)?, relay))
        }
        _ => None,
    };
    let (issuer, server, server_ca) = match &peer {
        Some((peer_ca, relay)) => (peer_ca, relay.clone(), peer_ca.cert_pem().to_owned()),
        None => (&ca, endpoint.url(), ca_pem),
    };
    let cert = issuer.issue(
        &CertRequest::client(&bootstrap::remote_user(reader))
            .with_role(config.name.as_str(), Role::Peer),
    )?;
    Ok(PeerCredential {
        name: config.name,
        cluster_id: config.id,
        max_connected_clusters: config.max_connected_clusters,
        server,
        ca_pem: server_ca,
        cert_pem: cert.cert_pem,
        key_pem: cert.key_pem,
        tls_server_name,
    })
}

/// Peers `a` and `b` both ways through their Kubernetes APIs: reads each side's install,
/// creates the etcd users and writes both peer Secrets (what `meshctl connect --context
/// A --destination-context B` does).
pub async fn connect_by_context(a: &KubeCluster, b: &KubeCluster) -> anyhow::Result<()> {
    let a_reads_b = credential_by_context(&b.client, &a.name).await?;
    let b_reads_a = credential_by_context(&a.client, &b.name).await?;
    meshd::kube::write_peer_secret(
        &a.client,
        MESHD_NAMESPACE,
        &a_reads_b,
        &bootstrap::remote_user(&a.name),
        "meshctl",
    )
    .await?;
    meshd::kube::write_peer_secret(
        &b.client,
        MESHD_NAMESPACE,
        &b_reads_a,
        &bootstrap::remote_user(&b.name),
        "meshctl",
    )
    .await?;
    Ok(())
}

/// Labels as a map (test object helper).
pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

impl std::fmt::Debug for KubeCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeCluster")
            .field("name", &self.name)
            .field("api", &self.api.url())
            .field("etcd", &self.etcd.endpoint())
            .finish_non_exhaustive()
    }
}

impl Drop for KubeCluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.kvstoremesh.take() {
            t.abort();
        }
    }
}
