//! `meshctl connect` / `disconnect`: peer two clusters through their admin kubeconfigs
//! (DESIGN §6).
//!
//! ```text
//!  connect A B   reach both etcds as root (TCP, then TLS against the context's CA: a
//!                mismatch is named as such) ─► checks: not the same cluster, IDs differ,
//!                maxConnectedClusters equal, each etcd's cluster-config agrees with its
//!                context, not already connected, no ID clash with either side's peers
//!                ─► remote-A in B's etcd, remote-B in A's, client certs signed by the
//!                owning side's peer CA (its cluster CA without `peerEndpoint`)
//!                ─► A/peers/B.kubeconfig, B/peers/A.kubeconfig (server: B's relay, CA:
//!                B's peer CA; B's etcd without `peerEndpoint`)
//!                (a failure undoes what was done, in reverse) ─► --wait: both agents
//!                report each other ready
//!  --context A --destination-context B (Kubernetes): the same, reading each cluster's
//!                ConfigMap meshd-config, Secret meshd-ca, Service clustermesh-apiserver
//!                (root through its `etcd` port) and, when it runs the relay, Secret
//!                meshd-peer-ca + the Service's `relay` port (peers get those); peer
//!                files are Secrets meshd-peer-<remote>
//!  disconnect    remove both peer files (apiservers and agents drain the peer), revoke
//!                both users (each relay cuts the revoked user's open connections within
//!                about a second) ─► --wait: neither agent lists the other
//! ```

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use etcd_client::Client;
use mesh_certs::{CertRequest, CertificateAuthority, Role};
use mesh_proto::v1 as pb;
use mesh_proto::v1::cluster_mesh_client::ClusterMeshClient;
use serde::Serialize;
use tonic::transport::Channel;

use super::admin::{self, ClusterAdmin, KubeconfigArgs};
use super::certs::parse_validity;
use super::etcd_auth;
use super::output::{OutputFormat, emit};
use super::peerstore::PeerStore;
use super::{CtlError, Status, fail, runtime};
use crate::keys::{Key, decode_cluster_config};
use crate::peers::PeerCredential;

const POLL: Duration = Duration::from_millis(250);
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The two clusters of `connect`/`disconnect`: names in the admin kubeconfig, or
/// Kubernetes contexts.
#[derive(Debug, Clone, Args)]
pub struct PairArgs {
    /// One cluster (a context of the admin kubeconfig).
    #[arg(required_unless_present = "context")]
    pub a: Option<String>,
    /// The other cluster.
    #[arg(required_unless_present = "context")]
    pub b: Option<String>,
    /// Kubernetes mode: the kubeconfig context of one cluster (instead of the two names).
    #[arg(long, requires = "destination_context", conflicts_with_all = ["a", "b"])]
    pub context: Option<String>,
    /// Kubernetes mode: the kubeconfig context of the other cluster.
    #[arg(long, requires = "context")]
    pub destination_context: Option<String>,
    /// Kubernetes mode: kubeconfig file(s) holding the contexts (':'-separated, like
    /// $KUBECONFIG).
    #[arg(
        long = "kube-config",
        env = "KUBECONFIG",
        value_delimiter = ':',
        default_value = "~/.kube/config"
    )]
    pub kube_config: Vec<PathBuf>,
    /// Kubernetes mode: the namespace meshd is installed in.
    #[arg(long, default_value = "meshd")]
    pub namespace: String,
    /// Kubernetes mode: the name to verify the clustermesh etcd's certificate (and the
    /// identity relay's) against (default `clustermesh-apiserver.<namespace>.svc`, the
    /// chart's certificates).
    #[arg(long)]
    pub tls_server_name: Option<String>,

    /// Which kubeconfig(s) name the clusters.
    #[command(flatten)]
    pub kube: KubeconfigArgs,
}

/// Arguments of `meshctl connect`.
#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:
  meshctl connect east west --wait
  meshctl connect east north --kubeconfig a/kubeconfig:b/kubeconfig -o json
  meshctl connect --context kind-east --destination-context kind-west --wait   # Kubernetes")]
pub struct ConnectArgs {
    /// The two clusters.
    #[command(flatten)]
    pub pair: PairArgs,
    /// Wait until both agents report each other connected and synced.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits, e.g. 60s, 2m.
    #[arg(long, default_value = "60s", value_parser = parse_validity)]
    pub timeout: Duration,
    /// Validity of the peer client certificates, e.g. 365d, 90d.
    #[arg(long, default_value = "365d", value_parser = parse_validity)]
    pub validity: Duration,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// Arguments of `meshctl disconnect`.
#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:
  meshctl disconnect east west --wait
  meshctl disconnect --context kind-east --destination-context kind-west   # Kubernetes")]
pub struct DisconnectArgs {
    /// The two clusters.
    #[command(flatten)]
    pub pair: PairArgs,
    /// Wait until neither agent lists the other any more.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "60s", value_parser = parse_validity)]
    pub timeout: Duration,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct PairReport {
    clusters: [String; 2],
    /// `connected` or `disconnected`.
    result: &'static str,
    steps: Vec<String>,
    waited: bool,
    /// With --wait: whether the agents got there in time.
    #[serde(skip_serializing_if = "Option::is_none")]
    settled: Option<bool>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    waiting_for: Vec<String>,
}

/// One side of a pair, opened: its etcd as root, its CA, where its peer credentials live.
pub(super) struct Side {
    pub(super) admin: ClusterAdmin,
    etcd: Client,
    ca: CertificateAuthority,
    /// The peer CA and the relay endpoint peers are given (`peerEndpoint`), if any.
    peer: Option<(CertificateAuthority, String)>,
    peers: PeerStore,
}

/// TCP then TLS to the context's etcd endpoint, so that "nothing listens" and "the server
/// is not signed by the CA you gave" are told apart from later etcd errors.
async fn probe(admin: &ClusterAdmin) -> Result<(), CtlError> {
    let server = &admin.cred.server;
    let hostport = server.strip_prefix("https://").unwrap_or(server);
    let hostport = hostport.trim_end_matches('/');
    let host = hostport
        .rsplit_once(':')
        .map_or(hostport, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let tcp = tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(hostport))
        .await
        .map_err(|_| {
            fail(format!(
                "cannot reach the etcd of {} at {server} ({}): no answer within {} s",
                admin.name(),
                admin.whence(),
                PROBE_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| {
            fail(format!(
                "cannot reach the etcd of {} at {server} ({}): {e}",
                admin.name(),
                admin.whence()
            ))
        })?;
    let config = mesh_certs::client_config(
        &admin.cred.ca_pem,
        Some((&admin.cred.cert_pem, &admin.cred.key_pem)),
    )
    .map_err(|source| CtlError::Cert {
        context: format!("TLS settings of {}", admin.whence()),
        source,
    })?;
    let name = admin
        .cred
        .tls_server_name
        .clone()
        .unwrap_or_else(|| host.to_owned());
    let server_name = rustls::pki_types::ServerName::try_from(name.clone())
        .map_err(|e| fail(format!("{}: server name {name:?}: {e}", admin.whence())))?;
    let tls = tokio_rustls::TlsConnector::from(config);
    match tokio::time::timeout(PROBE_TIMEOUT, tls.connect(server_name, tcp)).await {
        Err(_) => Err(fail(format!(
            "TLS handshake with the etcd of {} at {server} timed out ({})",
            admin.name(),
            admin.whence()
        ))),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => {
            let detail = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .cloned();
            Err(fail(match detail {
                Some(rustls::Error::InvalidCertificate(why)) => format!(
                    "CA mismatch: the etcd of {} at {server} presented a certificate the CA in {} does not accept ({why:?})",
                    admin.name(),
                    admin.whence()
                ),
                _ => format!(
                    "TLS handshake with the etcd of {} at {server} failed ({}): {e}",
                    admin.name(),
                    admin.whence()
                ),
            }))
        }
    }
}

/// Reaches `admin`'s etcd as root and loads its CA.
pub(super) async fn open(admin: &ClusterAdmin) -> Result<Side, CtlError> {
    let ca = admin.ca()?;
    probe(admin).await?;
    let peer = admin.peer_ca()?;
    let etcd = admin.etcd().await?;
    Ok(Side {
        admin: admin.clone(),
        etcd,
        ca,
        peer,
        peers: PeerStore::Dir(admin.ext.peers_dir.clone()),
    })
}

/// Kubernetes mode: reads a cluster's meshd installation through its API (`context` of one of
/// `files`): config, CA, the clustermesh endpoint, and the peer CA and relay port when the
/// apiserver runs the identity relay; then reaches its etcd (the Service's `etcd` port) as
/// `root` with a short-lived certificate from that CA.
async fn open_kube(
    files: &[PathBuf],
    context: &str,
    namespace: &str,
    tls_server_name: Option<&str>,
) -> Result<Side, CtlError> {
    let kerr =
        |e: &crate::kube::KubeError| fail(format!("context {context}: {}", super::error_chain(e)));
    let mut found = None;
    for f in files {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        if kube_client::config::Kubeconfig::from_yaml(&text)
            .is_ok_and(|kc| kc.contexts.iter().any(|c| c.name == context))
        {
            found = Some((f.clone(), text));
            break;
        }
    }
    let (file, text) = found.ok_or_else(|| {
        fail(format!(
            "no context {context:?} in {}",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    let what = file.display().to_string();
    let client = crate::kube::client_from_kubeconfig_yaml(&what, &text, Some(context))
        .await
        .map_err(|e| kerr(&e))?;
    let config = crate::kube::read_cluster_config(&client, namespace)
        .await
        .map_err(|e| kerr(&e))?;
    let (ca_pem, ca_key) = crate::kube::read_ca(&client, namespace)
        .await
        .map_err(|e| kerr(&e))?;
    let endpoint = crate::kube::clustermesh_endpoint(&client, namespace, None)
        .await
        .map_err(|e| kerr(&e))?;
    let ca = CertificateAuthority::from_pem(&ca_pem, &ca_key).map_err(|source| CtlError::Cert {
        context: format!("the CA of context {context} (Secret {namespace}/meshd-ca)"),
        source,
    })?;
    let peer_ca = crate::kube::read_peer_ca(&client, namespace)
        .await
        .map_err(|e| kerr(&e))?;
    let peer = kube_peer_endpoint(context, namespace, peer_ca, endpoint.relay_url())?;
    let root = ca
        .issue(
            &CertRequest::client("root")
                .with_role(config.name.as_str(), Role::Admin)
                .with_validity(Duration::from_secs(3600)),
        )
        .map_err(|source| CtlError::Cert {
            context: format!("issuing a root client certificate for context {context}"),
            source,
        })?;
    let admin = ClusterAdmin {
        cred: PeerCredential {
            name: config.name,
            cluster_id: config.id,
            max_connected_clusters: config.max_connected_clusters,
            server: endpoint.url(),
            ca_pem,
            cert_pem: root.cert_pem,
            key_pem: root.key_pem,
            tls_server_name: Some(
                tls_server_name.map_or_else(|| endpoint.tls_server_name.clone(), str::to_owned),
            ),
        },
        ext: super::admin::AdminExtension {
            peers_dir: PathBuf::new(),
            ca_key: PathBuf::new(),
            apiserver_grpc: None,
            agent_grpc: None,
            peer_endpoint: None,
        },
        file,
    };
    probe(&admin).await?;
    let etcd = admin.etcd().await?;
    Ok(Side {
        admin,
        etcd,
        ca,
        peer,
        peers: PeerStore::Secrets {
            client,
            namespace: namespace.to_owned(),
        },
    })
}

/// What peers of a Kubernetes cluster are given: with the peer CA (Secret `meshd-peer-ca`)
/// and the Service's `relay` port, credentials of the peer CA for the relay; with neither
/// (installs before the relay, or the relay off), `None`: the cluster CA and etcd's port, as
/// before. One without the other is refused: a relay port without the peer CA cannot be
/// given credentials it accepts, and a peer CA without a relay port has nothing to reach.
fn kube_peer_endpoint(
    context: &str,
    namespace: &str,
    peer_ca: Option<(String, String)>,
    relay_url: Option<String>,
) -> Result<Option<(CertificateAuthority, String)>, CtlError> {
    let secret = crate::kube::PEER_CA_SECRET;
    let service = crate::kube::APISERVER_SERVICE;
    match (peer_ca, relay_url) {
        (None, None) => Ok(None),
        (Some((cert, key)), Some(relay)) => {
            let ca =
                CertificateAuthority::from_pem(&cert, &key).map_err(|source| CtlError::Cert {
                    context: format!(
                        "the peer CA of context {context} (Secret {namespace}/{secret})"
                    ),
                    source,
                })?;
            Ok(Some((ca, relay)))
        }
        (None, Some(_)) => Err(fail(format!(
            "context {context}: Service {namespace}/{service} has a relay port but Secret \
             {namespace}/{secret} (the peer CA the relay trusts) does not exist: create it \
             (see the chart README) or install with relay.enabled=false"
        ))),
        (Some(_), None) => Err(fail(format!(
            "context {context}: Secret {namespace}/{secret} exists but Service \
             {namespace}/{service} has no relay port: upgrade the chart (relay.enabled=true) \
             or delete the Secret to peer through etcd directly"
        ))),
    }
}

async fn has_user(side: &Side, user: &str) -> Result<bool, CtlError> {
    let mut c = side.etcd.clone();
    let list = c.user_list().await.map_err(|e| {
        fail(format!(
            "listing the etcd users of {}: {}",
            side.admin.name(),
            super::error_chain(&e)
        ))
    })?;
    Ok(list.users().iter().any(|u| u == user))
}

/// Everything that must hold before `a` and `b` are linked; changes nothing.
async fn check_pair(a: &Side, b: &Side) -> Result<(), CtlError> {
    let (ca, cb) = (&a.admin.cred, &b.admin.cred);
    if ca.name == cb.name {
        return Err(fail(format!(
            "cannot connect {} to itself",
            a.admin.whence()
        )));
    }
    if ca.cluster_id == cb.cluster_id {
        return Err(fail(format!(
            "ID clash: cluster ID {} is used by both {} ({}) and {} ({}); cluster IDs must be unique in a mesh",
            ca.cluster_id,
            ca.name,
            a.admin.whence(),
            cb.name,
            b.admin.whence()
        )));
    }
    if ca.max_connected_clusters != cb.max_connected_clusters {
        return Err(fail(format!(
            "{} runs with maxConnectedClusters {} but {} with {}; every cluster of a mesh must use the same value",
            ca.name,
            ca.max_connected_clusters.get(),
            cb.name,
            cb.max_connected_clusters.get()
        )));
    }
    for (s, o) in [(a, b), (b, a)] {
        let (me, other) = (&s.admin.cred, &o.admin.cred);
        // What the running apiserver says about itself must agree with the context.
        let key = Key::ClusterConfig(me.name.clone()).to_string();
        let mut c = s.etcd.clone();
        let resp = c.get(key.as_str(), None).await.map_err(|e| {
            fail(format!(
                "reading {key} from the etcd of {}: {}",
                me.name,
                super::error_chain(&e)
            ))
        })?;
        if let Some(kv) = resp.kvs().first() {
            let cfg = decode_cluster_config(&me.name, kv.value())
                .map_err(|e| fail(format!("{key} in the etcd of {}: {e}", me.name)))?;
            if cfg.id != me.cluster_id || cfg.max_connected_clusters != me.max_connected_clusters {
                return Err(fail(format!(
                    "{} says cluster {} has ID {} (maxConnectedClusters {}), but its apiserver runs with ID {} ({}) per {key}",
                    s.admin.whence(),
                    me.name,
                    me.cluster_id,
                    me.max_connected_clusters.get(),
                    cfg.id,
                    cfg.max_connected_clusters.get()
                )));
            }
        }
        for peer in s.peers.list().await?.into_iter().flatten() {
            if peer.name == other.name {
                return Err(fail(format!(
                    "{} and {} are already connected ({} exists); run `meshctl disconnect {} {}` first",
                    me.name,
                    other.name,
                    s.peers.location(&other.name),
                    me.name,
                    other.name
                )));
            }
            if peer.cluster_id == other.cluster_id {
                return Err(fail(format!(
                    "ID clash: {} is already connected to {} with cluster ID {}, the ID of {}",
                    me.name, peer.name, peer.cluster_id, other.name
                )));
            }
        }
        let user = etcd_auth::remote_user(other.name.as_str());
        if has_user(s, &user).await? {
            return Err(fail(format!(
                "the etcd of {} already has user {user} (a connection to {} half made or half removed); run `meshctl disconnect {} {}` to clean up",
                me.name, other.name, me.name, other.name
            )));
        }
    }
    Ok(())
}

enum Undo {
    User {
        side: usize,
        user: String,
    },
    Peer {
        side: usize,
        peer: crate::model::ClusterName,
    },
}

/// Checks and links `a` and `b` both ways; on failure undoes what it did. Returns the steps
/// taken, for output.
pub(super) async fn connect_pair(
    a: &Side,
    b: &Side,
    validity: Duration,
) -> Result<Vec<String>, CtlError> {
    check_pair(a, b).await?;
    let sides = [a, b];
    let mut done: Vec<Undo> = Vec::new();
    let mut steps = Vec::new();
    let result: Result<(), CtlError> = async {
        // `reader` reads `owner`: user remote-<reader> in owner's etcd, cert from owner's CA.
        for (reader, owner) in [(0usize, 1usize), (1, 0)] {
            let (r, o) = (sides[reader], sides[owner]);
            let user = etcd_auth::remote_user(r.admin.name().as_str());
            etcd_auth::add_remote_user(&o.etcd, r.admin.name().as_str())
                .await
                .map_err(|e| fail(format!("{}: {e}", o.admin.name())))?;
            done.push(Undo::User {
                side: owner,
                user: user.clone(),
            });
            steps.push(format!("created etcd user {user} in {}", o.admin.name()));
            // Role peer: opens owner's etcd (read-only, by the CN) through owner's relay when
            // it has one (then the peer CA signs it, which etcd itself does not trust);
            // every gRPC API refuses it.
            let (issuer, server, ca_pem) = match &o.peer {
                Some((peer_ca, relay)) => (peer_ca, relay.clone(), peer_ca.cert_pem().to_owned()),
                None => (
                    &o.ca,
                    o.admin.cred.server.clone(),
                    o.admin.cred.ca_pem.clone(),
                ),
            };
            let cert = issuer
                .issue(
                    &CertRequest::client(&user)
                        .with_role(o.admin.name().as_str(), Role::Peer)
                        .with_validity(validity),
                )
                .map_err(|source| CtlError::Cert {
                    context: format!("issuing {user} from the CA of {}", o.admin.name()),
                    source,
                })?;
            let oc = &o.admin.cred;
            let cred = PeerCredential {
                name: oc.name.clone(),
                cluster_id: oc.cluster_id,
                max_connected_clusters: oc.max_connected_clusters,
                server,
                ca_pem,
                cert_pem: cert.cert_pem,
                key_pem: cert.key_pem,
                tls_server_name: oc.tls_server_name.clone(),
            };
            let path = r.peers.write(&cred, &user).await?;
            done.push(Undo::Peer {
                side: reader,
                peer: oc.name.clone(),
            });
            steps.push(format!("wrote {path}"));
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        for u in done.into_iter().rev() {
            match u {
                Undo::User { side, user } => {
                    let _ = sides[side].etcd.clone().user_delete(user.as_str()).await;
                }
                Undo::Peer { side, peer } => {
                    let _ = sides[side].peers.remove(&peer).await;
                }
            }
        }
        return Err(e);
    }
    Ok(steps)
}

/// Removes both credentials and revokes both users. Errors if there was nothing to remove.
async fn disconnect_pair(a: &Side, b: &Side) -> Result<Vec<String>, CtlError> {
    if a.admin.name() == b.admin.name() {
        return Err(fail(format!(
            "{} cannot be disconnected from itself",
            a.admin.name()
        )));
    }
    let mut steps = Vec::new();
    // Files first: apiservers and agents stop reading the peer before its user goes.
    for (s, o) in [(a, b), (b, a)] {
        if s.peers.remove(o.admin.name()).await? {
            steps.push(format!("removed {}", s.peers.location(o.admin.name())));
        }
    }
    for (s, o) in [(a, b), (b, a)] {
        let user = etcd_auth::remote_user(o.admin.name().as_str());
        if has_user(s, &user).await? {
            s.etcd
                .clone()
                .user_delete(user.as_str())
                .await
                .map_err(|e| {
                    fail(format!(
                        "revoking etcd user {user} in {}: {}",
                        s.admin.name(),
                        super::error_chain(&e)
                    ))
                })?;
            steps.push(format!("revoked etcd user {user} in {}", s.admin.name()));
        }
    }
    if steps.is_empty() {
        return Err(fail(format!(
            "{} and {} are not connected (no peer files, no remote users)",
            a.admin.name(),
            b.admin.name()
        )));
    }
    Ok(steps)
}

async fn agent_client(admin: &ClusterAdmin) -> Result<ClusterMeshClient<Channel>, String> {
    let addr = admin
        .ext
        .agent_grpc
        .as_deref()
        .ok_or("the admin kubeconfig names no agent (agentGrpc)")?;
    let channel = Channel::from_shared(format!("https://{addr}"))
        .map_err(|e| e.to_string())?
        .tls_config(admin.grpc_tls())
        .map_err(|e| super::error_chain(&e))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| super::error_chain(&e))?;
    Ok(ClusterMeshClient::new(channel))
}

/// What `admin`'s agent says about `peer`: `None` when it does not list it.
async fn agent_peer(admin: &ClusterAdmin, peer: &str) -> Result<Option<pb::PeerStatus>, String> {
    let mut c = agent_client(admin).await?;
    let st = c
        .get_status(pb::GetStatusRequest {})
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?
        .into_inner();
    Ok(st.peers.into_iter().find(|p| p.name == peer))
}

/// Polls both agents until `done` holds for each side's view of the other; returns what is
/// still awaited when the time is up (empty: settled).
async fn wait_pair(
    a: &ClusterAdmin,
    b: &ClusterAdmin,
    timeout: Duration,
    what: &str,
    done: impl Fn(&Option<pb::PeerStatus>) -> bool,
) -> Vec<String> {
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new_spinner();
        b.enable_steady_tick(Duration::from_millis(120));
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let deadline = Instant::now() + timeout;
    loop {
        let mut waiting = Vec::new();
        for (s, o) in [(a, b), (b, a)] {
            match agent_peer(s, o.name().as_str()).await {
                Ok(p) if done(&p) => {}
                Ok(Some(p)) => waiting.push(format!(
                    "agent of {} sees {} {}{}",
                    s.name(),
                    o.name(),
                    p.state,
                    if p.last_error.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", p.last_error)
                    }
                )),
                Ok(None) => waiting.push(format!(
                    "agent of {} does not list {} yet",
                    s.name(),
                    o.name()
                )),
                Err(e) => waiting.push(format!("agent of {} unreachable: {e}", s.name())),
            }
        }
        if waiting.is_empty() || Instant::now() >= deadline {
            bar.finish_and_clear();
            return waiting;
        }
        bar.set_message(format!("waiting until {what}: {}", waiting.join("; ")));
        tokio::time::sleep(POLL).await;
    }
}

fn write_report(out: &mut impl Write, r: &PairReport) -> std::io::Result<()> {
    for s in &r.steps {
        writeln!(out, "  {s}")?;
    }
    match r.settled {
        Some(true) => writeln!(
            out,
            "{} {} and {}: {}",
            super::output::good("OK"),
            r.clusters[0],
            r.clusters[1],
            r.result
        ),
        Some(false) => {
            writeln!(
                out,
                "{} {} and {}: {}, but still waiting for:",
                super::output::bad("TIMEOUT"),
                r.clusters[0],
                r.clusters[1],
                r.result
            )?;
            for w in &r.waiting_for {
                writeln!(out, "  - {w}")?;
            }
            Ok(())
        }
        None => writeln!(
            out,
            "{} and {}: {} (run with --wait, or `meshctl status`, to see them settle)",
            r.clusters[0], r.clusters[1], r.result
        ),
    }
}

/// The two sides a command names: admin-kubeconfig clusters, or Kubernetes contexts.
async fn open_pair(p: &PairArgs) -> Result<(Side, Side), CtlError> {
    if let (Some(ca), Some(cb)) = (&p.context, &p.destination_context) {
        let files: Vec<PathBuf> = p.kube_config.iter().map(|f| expand_home(f)).collect();
        let tls = p.tls_server_name.as_deref();
        let a = open_kube(&files, ca, &p.namespace, tls).await?;
        let b = open_kube(&files, cb, &p.namespace, tls).await?;
        return Ok((a, b));
    }
    let (Some(na), Some(nb)) = (&p.a, &p.b) else {
        return Err(fail(
            "name two clusters (or --context and --destination-context)",
        ));
    };
    let admins = admin::load(&p.kube.files())?;
    let a = open(admin::select(&admins, na)?).await?;
    let b = open(admin::select(&admins, nb)?).await?;
    Ok((a, b))
}

fn expand_home(p: &std::path::Path) -> PathBuf {
    match (p.strip_prefix("~"), std::env::var_os("HOME")) {
        (Ok(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => p.to_owned(),
    }
}

/// Kubernetes mode's `--wait`: each side's kvstoremesh has mirrored the other (`present`) or
/// dropped its mirror (`!present`), read from the side's etcd.
async fn wait_mirrors(a: &Side, b: &Side, timeout: Duration, present: bool) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut waiting = Vec::new();
        for (s, o) in [(a, b), (b, a)] {
            let mut c = s.etcd.clone();
            for kind in crate::keys::StateKind::ALL {
                let key = crate::keys::Key::CacheSynced {
                    cluster: o.admin.name().clone(),
                    kind,
                }
                .to_string();
                let there = c
                    .get(key.as_str(), None)
                    .await
                    .is_ok_and(|r| !r.kvs().is_empty());
                if there != present {
                    waiting.push(format!(
                        "{}'s kvstoremesh {} {} {kind}",
                        s.admin.name(),
                        if present {
                            "has not mirrored"
                        } else {
                            "still mirrors"
                        },
                        o.admin.name()
                    ));
                }
            }
        }
        if waiting.is_empty() || Instant::now() >= deadline {
            return waiting;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `meshctl connect`.
pub(super) fn connect(args: &ConnectArgs, out: &mut impl Write) -> Result<Status, CtlError> {
    runtime()?.block_on(async {
        let (sa, sb) = Box::pin(open_pair(&args.pair)).await?;
        let steps = connect_pair(&sa, &sb, args.validity).await?;
        let waiting = match (args.wait, args.pair.context.is_some()) {
            (false, _) => None,
            (true, true) => Some(wait_mirrors(&sa, &sb, args.timeout, true).await),
            (true, false) => Some(
                wait_pair(
                    &sa.admin,
                    &sb.admin,
                    args.timeout,
                    "both agents report each other ready",
                    |p| {
                        p.as_ref()
                            .is_some_and(|p| p.connected && p.state == "ready")
                    },
                )
                .await,
            ),
        };
        finish(
            args.output,
            out,
            [&sa.admin, &sb.admin],
            "connected",
            steps,
            waiting,
        )
    })
}

/// `meshctl disconnect`.
pub(super) fn disconnect(args: &DisconnectArgs, out: &mut impl Write) -> Result<Status, CtlError> {
    runtime()?.block_on(async {
        let (sa, sb) = Box::pin(open_pair(&args.pair)).await?;
        let steps = disconnect_pair(&sa, &sb).await?;
        let waiting = match (args.wait, args.pair.context.is_some()) {
            (false, _) => None,
            (true, true) => Some(wait_mirrors(&sa, &sb, args.timeout, false).await),
            (true, false) => Some(
                wait_pair(
                    &sa.admin,
                    &sb.admin,
                    args.timeout,
                    "neither agent lists the other",
                    |p| p.is_none(),
                )
                .await,
            ),
        };
        finish(
            args.output,
            out,
            [&sa.admin, &sb.admin],
            "disconnected",
            steps,
            waiting,
        )
    })
}

fn finish(
    format: OutputFormat,
    out: &mut impl Write,
    pair: [&ClusterAdmin; 2],
    result: &'static str,
    steps: Vec<String>,
    waiting: Option<Vec<String>>,
) -> Result<Status, CtlError> {
    let report = PairReport {
        clusters: pair.map(|c| c.name().to_string()),
        result,
        steps,
        waited: waiting.is_some(),
        settled: waiting.as_ref().map(Vec::is_empty),
        waiting_for: waiting.unwrap_or_default(),
    };
    emit(out, format, &report, |out| write_report(out, &report))?;
    Ok(if report.settled == Some(false) {
        Status::Problems
    } else {
        Status::Ok
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_peers_get_the_relay_only_with_the_peer_ca() {
        let ca =
            CertificateAuthority::generate("meshd-east-ca", Duration::from_secs(3600)).expect("CA");
        let pem = || Some((ca.cert_pem().to_owned(), ca.key_pem().to_owned()));
        let relay = || Some("https://198.18.0.1:32381".to_owned());
        // Installs before the relay: the cluster CA and etcd, as before.
        assert!(
            kube_peer_endpoint("k", "meshd", None, None)
                .unwrap()
                .is_none()
        );
        // Both: peer credentials from the peer CA, for the relay.
        let (peer_ca, server) = kube_peer_endpoint("k", "meshd", pem(), relay())
            .unwrap()
            .expect("relay");
        assert_eq!(server, "https://198.18.0.1:32381");
        assert_eq!(peer_ca.cert_pem(), ca.cert_pem());
        // One without the other, or a broken Secret: refused, naming what is missing.
        let e = kube_peer_endpoint("k", "meshd", None, relay())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("meshd/meshd-peer-ca") && e.contains("relay port"),
            "{e}"
        );
        let e = kube_peer_endpoint("k", "meshd", pem(), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("has no relay port"), "{e}");
        let bad = Some(("not pem".to_owned(), "not pem".to_owned()));
        let e = kube_peer_endpoint("k", "meshd", bad, relay())
            .unwrap_err()
            .to_string();
        assert!(e.contains("peer CA of context k"), "{e}");
    }
}
