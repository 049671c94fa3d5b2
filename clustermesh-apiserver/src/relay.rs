//! Identity relay: the clustermesh endpoint peers dial instead of etcd, so that revoking a
//! peer ends its open watches within seconds.
//!
//! ```text
//!  peer kvstoremesh / agent (client cert CN remote-<peer>, signed by the PEER CA)
//!     │ mTLS, ALPN h2          WebPkiClientVerifier over --relay-client-ca (the peer CA)
//!     ▼
//!  relay listener ── CN policy [`admit`]: only `remote-<cluster>` ──▶ refused (warn log,
//!     │                                                               mesh_relay_refused_total)
//!     │ registry: CN → live connections, each with its own CancellationToken
//!     │ upstream TLS with a client certificate for the SAME CN, minted in memory by the
//!     ▼ RELAY CA (--relay-ca-cert/--relay-ca-key, cached per CN)
//!  etcd (loopback) ◀──── tokio::io::copy_bidirectional ────▶ peer
//!
//!  checker, every --relay-check-interval (1 s): for each CN with live connections, one
//!  range get of `mesh/heartbeat` AS that CN (its minted certificate). Permission denied,
//!  user not found or an authentication failure ⇒ every connection of that CN is cut
//!  (mesh_relay_cuts_total{peer}) and new ones are refused until the user works again.
//! ```
//!
//! Why: etcd (3.4, and 3.6 as well) checks permissions only when a watch is created, so
//! deleting a peer's user leaves the watches it already has open running; nothing inside
//! etcd ends them (user or role deletion, permission revocation, auth off/on, CRLs, token
//! TTLs, keepalives), only closing the connection does. A TLS passthrough cannot tell peers
//! apart (TLS 1.3 encrypts the client certificate), so the relay terminates TLS and knows
//! each connection's CN. It needs no root access to etcd: the checks run as the peer.
//!
//! Peers cannot go around the relay: their certificates are signed by a per-cluster peer CA
//! that only the relay trusts, while etcd trusts the cluster CA (components) and the relay
//! CA (the minted certificates) — a peer certificate presented to etcd directly fails the
//! TLS handshake.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use mesh_certs::{CertError, CertRequest, CertificateAuthority};
use meshd::args::parse_duration;
use meshd::kv::{EtcdConfig, EtcdStore, KvError, KvStore};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rustls::pki_types::ServerName;
use rustls::server::ResolvesServerCert;
use rustls::{ClientConfig, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::bootstrap::{REMOTE_USER_PREFIX, remote_peer};

/// Default period of the revocation check.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// The key every check reads (one exact key every peer role may read).
pub const CHECK_KEY: &str = meshd::keys::HEARTBEAT;
/// The only ALPN protocol the relay offers and forwards (etcd clients speak gRPC).
pub const RELAY_ALPN: &[u8] = b"h2";

/// How long a peer may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long dialing etcd may take.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one check may take before its answer counts as unknown (not as a denial).
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// Validity of minted upstream certificates, and when they are minted again.
const MINTED_VALIDITY: Duration = Duration::from_secs(24 * 60 * 60);
const REMINT_AFTER: Duration = Duration::from_secs(12 * 60 * 60);
/// Pause after a failed `accept` (e.g. out of file descriptors), so it is not a hot loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// etcd's answers that mean "this user may not read any more" (rather than "try again").
const DENIALS: [&str; 5] = [
    "permission denied",
    "user name not found",
    "authentication failed",
    "invalid auth token",
    "role is not granted",
];

/// The relay's command-line flags (flattened into the apiserver's `Args`).
#[derive(Debug, Clone, clap::Args)]
pub struct RelayArgs {
    /// Address of the identity relay: the clustermesh endpoint peers dial instead of etcd
    /// (it ends a revoked peer's open watches). Unset: no relay.
    #[arg(long, env = "MESH_RELAY_LISTEN")]
    pub relay_listen: Option<SocketAddr>,
    /// The etcd the relay forwards to (`https://host:port`; default: the first
    /// --etcd-endpoint). Its server certificate is checked against --etcd-ca and
    /// --etcd-server-name.
    #[arg(long, env = "MESH_RELAY_UPSTREAM")]
    pub relay_upstream: Option<String>,
    /// Server certificate the relay presents to peers (PEM; reloaded when it changes).
    #[arg(long, env = "MESH_RELAY_CERT")]
    pub relay_cert: Option<PathBuf>,
    /// Key of --relay-cert.
    #[arg(long, env = "MESH_RELAY_KEY")]
    pub relay_key: Option<PathBuf>,
    /// CA of the peer credentials (the peer CA): the only client certificates the relay
    /// accepts.
    #[arg(long, env = "MESH_RELAY_CLIENT_CA")]
    pub relay_client_ca: Option<PathBuf>,
    /// Relay CA certificate: signs, in memory, the certificate the relay presents to etcd
    /// for each peer user (etcd must trust it).
    #[arg(long, env = "MESH_RELAY_CA_CERT")]
    pub relay_ca_cert: Option<PathBuf>,
    /// Key of --relay-ca-cert.
    #[arg(long, env = "MESH_RELAY_CA_KEY")]
    pub relay_ca_key: Option<PathBuf>,
    /// How often each peer user with open connections is checked against etcd.
    #[arg(long, env = "MESH_RELAY_CHECK_INTERVAL", value_parser = parse_duration, default_value = "1s")]
    pub relay_check_interval: Duration,
}

/// Why the relay could not be set up, or a connection could not be relayed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A flag the relay needs is missing (retrying does not help).
    #[error("--relay-listen needs {0}")]
    Missing(&'static str),
    /// A file named by a flag could not be read (retrying does not help).
    #[error(transparent)]
    File(#[from] meshd::args::ArgFileError),
    /// TLS material is unusable, or minting an upstream certificate failed.
    #[error("relay TLS: {0}")]
    Certs(#[from] CertError),
    /// The check interval is zero (retrying does not help).
    #[error("--relay-check-interval must be more than 0")]
    ZeroInterval,
    /// The upstream address is not `https://host:port` or `host:port`.
    #[error("relay upstream {0:?} is not https://host:port")]
    Upstream(String),
    /// Dialing etcd failed (retrying may help).
    #[error("relay: dialing etcd at {upstream}: {source}")]
    Dial {
        /// The upstream address.
        upstream: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The checker's etcd client for a CN could not be created.
    #[error("relay: etcd client for {cn}: {source}")]
    CheckClient {
        /// The CN.
        cn: String,
        /// Cause.
        #[source]
        source: KvError,
    },
}

/// Why a peer connection is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The client certificate has no CN (no etcd user).
    #[error("the client certificate has no common name")]
    NoCommonName,
    /// The CN is not `remote-<cluster>`: admins and components use etcd directly.
    #[error(
        "CN {cn:?} is not a peer user: only {REMOTE_USER_PREFIX}<cluster> users may pass the relay"
    )]
    NotAPeer {
        /// The refused CN.
        cn: String,
    },
    /// etcd refuses the user (deleted or without permissions).
    #[error("peer user {cn} is revoked: {reason}")]
    Revoked {
        /// The CN.
        cn: String,
        /// etcd's answer.
        reason: String,
    },
}

impl Refusal {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoCommonName => "no-common-name",
            Refusal::NotAPeer { .. } => "not-a-peer",
            Refusal::Revoked { .. } => "revoked",
        }
    }
}

/// The CN policy: only `remote-<cluster>` (a valid cluster name after the prefix) passes.
pub fn admit(cn: Option<&str>) -> Result<&str, Refusal> {
    let cn = cn.ok_or(Refusal::NoCommonName)?;
    match remote_peer(cn) {
        Ok(_) => Ok(cn),
        Err(_) => Err(Refusal::NotAPeer { cn: cn.to_owned() }),
    }
}

/// Labels naming a peer user.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PeerLabel {
    /// The CN (`remote-<peer>`).
    pub peer: String,
}

/// Labels of a refused connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RefusedLabel {
    /// `handshake`, `no-common-name`, `not-a-peer`, `revoked`, `upstream`.
    pub reason: String,
}

/// The relay's metrics. Cheap to clone (shared families).
#[derive(Debug, Clone, Default)]
pub struct RelayMetrics {
    /// Live relayed connections per peer user.
    pub connections: Family<PeerLabel, Gauge>,
    /// Connections cut because etcd refused their user.
    pub cuts: Family<PeerLabel, Counter>,
    /// Connections refused, by reason.
    pub refused: Family<RefusedLabel, Counter>,
}

impl RelayMetrics {
    /// Registers `mesh_relay_connections`, `mesh_relay_cuts_total`, `mesh_relay_refused_total`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "mesh_relay_connections",
            "Live peer connections through the relay",
            self.connections.clone(),
        );
        registry.register(
            "mesh_relay_cuts",
            "Peer connections cut because etcd no longer accepts their user",
            self.cuts.clone(),
        );
        registry.register(
            "mesh_relay_refused",
            "Peer connections refused by the relay",
            self.refused.clone(),
        );
    }

    fn refused(&self, reason: &str) {
        self.refused
            .get_or_create(&RefusedLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }
}

/// What the relay needs (built by [`RelayConfig::from_args`] or by hand in tests).
#[derive(Debug)]
pub struct RelayConfig {
    /// etcd's `host:port`.
    pub upstream: String,
    /// Name etcd's server certificate is checked against (default: the upstream host).
    pub upstream_server_name: Option<String>,
    /// CA bundle (PEM) that signed etcd's server certificate.
    pub upstream_ca_pem: String,
    /// The peer-facing TLS config ([`server_tls`]).
    pub server_tls: Arc<ServerConfig>,
    /// Mints the upstream certificates; etcd must trust it.
    pub relay_ca: CertificateAuthority,
    /// Period of the revocation check.
    pub check_interval: Duration,
}

/// The peer-facing TLS config: presents `identity`, requires a client certificate signed
/// by `client_ca_pem` (the peer CA), offers only ALPN `h2`.
pub fn server_tls(
    identity: Arc<dyn ResolvesServerCert>,
    client_ca_pem: &str,
) -> Result<Arc<ServerConfig>, CertError> {
    let mut cfg = Arc::unwrap_or_clone(mesh_certs::server_config(identity, client_ca_pem)?);
    cfg.alpn_protocols = vec![RELAY_ALPN.to_vec()];
    Ok(Arc::new(cfg))
}

/// `host:port` of `https://host:port[/]` or `host:port`.
pub fn parse_upstream(s: &str) -> Result<String, RelayError> {
    let rest = s
        .strip_prefix("https://")
        .unwrap_or(s)
        .trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(rest.to_owned())
        }
        _ => Err(RelayError::Upstream(s.to_owned())),
    }
}

fn host_of(upstream: &str) -> &str {
    let host = upstream.rsplit_once(':').map_or(upstream, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

impl RelayConfig {
    /// The relay these flags describe, or `None` when `--relay-listen` is unset. The
    /// upstream defaults to `etcd.endpoints[0]`; etcd's CA and server name come from `etcd`.
    pub fn from_args(
        args: &RelayArgs,
        etcd: &EtcdConfig,
    ) -> Result<Option<(SocketAddr, Self)>, RelayError> {
        let Some(listen) = args.relay_listen else {
            return Ok(None);
        };
        let need =
            |v: &Option<PathBuf>, what: &'static str| v.clone().ok_or(RelayError::Missing(what));
        let cert = need(&args.relay_cert, "--relay-cert")?;
        let key = need(&args.relay_key, "--relay-key")?;
        let client_ca = need(&args.relay_client_ca, "--relay-client-ca")?;
        let ca_cert = need(&args.relay_ca_cert, "--relay-ca-cert")?;
        let ca_key = need(&args.relay_ca_key, "--relay-ca-key")?;
        let upstream = match &args.relay_upstream {
            Some(u) => u.clone(),
            None => etcd
                .endpoints
                .first()
                .cloned()
                .ok_or(RelayError::Missing("--relay-upstream or --etcd-endpoint"))?,
        };
        let upstream_ca_pem = etcd
            .ca_pem
            .clone()
            .ok_or(RelayError::Missing("--etcd-ca"))?;
        let client_ca_pem =
            std::fs::read_to_string(&client_ca).map_err(|source| meshd::args::ArgFileError {
                what: "--relay-client-ca",
                path: client_ca.clone(),
                source,
            })?;
        let identity = mesh_certs::ReloadingCertKey::watch(cert, key)?;
        Ok(Some((
            listen,
            RelayConfig {
                upstream: parse_upstream(&upstream)?,
                upstream_server_name: etcd.tls_server_name.clone(),
                upstream_ca_pem,
                server_tls: server_tls(identity, &client_ca_pem)?,
                relay_ca: CertificateAuthority::from_files(&ca_cert, &ca_key)?,
                check_interval: args.relay_check_interval,
            },
        )))
    }
}

/// What the checker found out about one CN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// etcd answered the check: the user may still read.
    Allowed,
    /// etcd refused the user (its answer).
    Denied(String),
    /// No answer (etcd down, timeout): nothing is cut.
    Unknown(String),
}

/// Whether an etcd error means the user may not read any more.
fn is_denial(e: &KvError) -> bool {
    if matches!(e, KvError::PermissionDenied { .. }) {
        return true;
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    DENIALS.iter().any(|d| text.contains(d))
}

#[derive(Debug, Default)]
struct PeerConns {
    live: HashMap<u64, CancellationToken>,
    revoked: bool,
    /// When a new connection of a revoked CN was last refused, and etcd's answer then: for
    /// one check interval more connections are refused without asking etcd again.
    last_refusal: Option<(Instant, String)>,
}

#[derive(Debug)]
struct Minted {
    at: Instant,
    tls: Arc<ClientConfig>,
    etcd: EtcdConfig,
    store: Option<EtcdStore>,
}

#[derive(Debug)]
struct Inner {
    cfg: RelayConfig,
    server_name: ServerName<'static>,
    metrics: RelayMetrics,
    peers: Mutex<HashMap<String, PeerConns>>,
    minted: Mutex<HashMap<String, Minted>>,
    next_id: AtomicU64,
}

/// The identity relay. Cheap to clone (shared state).
#[derive(Debug, Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Deregisters a connection when its task ends, however it ends.
struct Registered {
    relay: Relay,
    cn: String,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut peers = lock(&self.relay.inner.peers);
        if let Some(p) = peers.get_mut(&self.cn)
            && p.live.remove(&self.id).is_some()
        {
            self.relay
                .inner
                .metrics
                .connections
                .get_or_create(&PeerLabel {
                    peer: self.cn.clone(),
                })
                .dec();
        }
    }
}

impl Relay {
    /// A relay with `cfg`, counting into `metrics`.
    pub fn new(cfg: RelayConfig, metrics: RelayMetrics) -> Result<Self, RelayError> {
        if cfg.check_interval.is_zero() {
            return Err(RelayError::ZeroInterval);
        }
        let name = cfg
            .upstream_server_name
            .clone()
            .unwrap_or_else(|| host_of(&cfg.upstream).to_owned());
        let server_name =
            ServerName::try_from(name.clone()).map_err(|_| RelayError::Upstream(name))?;
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                server_name,
                metrics,
                peers: Mutex::new(HashMap::new()),
                minted: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
            }),
        })
    }

    /// Live connections of `cn`.
    pub fn live_connections(&self, cn: &str) -> usize {
        lock(&self.inner.peers).get(cn).map_or(0, |p| p.live.len())
    }

    /// Serves peers on `listener` and checks their users until `shutdown`; then cuts every
    /// connection and waits for their tasks.
    pub async fn run(self, listener: TcpListener, shutdown: CancellationToken) {
        let mut tasks = JoinSet::new();
        tasks.spawn(self.clone().check_loop(shutdown.clone()));
        let acceptor = TlsAcceptor::from(self.inner.cfg.server_tls.clone());
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(_) = tasks.join_next(), if tasks.len() > 1 => {}
                accepted = listener.accept() => match accepted {
                    Ok((tcp, addr)) => {
                        let span = tracing::info_span!("relay", %addr, cn = tracing::field::Empty);
                        let conn = self.clone().serve(tcp, acceptor.clone(), shutdown.child_token());
                        tasks.spawn(conn.instrument(span));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "relay: accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
            }
        }
        while tasks.join_next().await.is_some() {}
        tracing::info!("relay stopped");
    }

    /// One peer connection: TLS, CN policy, registration, upstream, bytes both ways.
    async fn serve(self, tcp: TcpStream, acceptor: TlsAcceptor, stop: CancellationToken) {
        let _ = tcp.set_nodelay(true);
        let tls = tokio::select! {
            () = stop.cancelled() => return,
            r = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => match r {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::info!(error = %e, "relay: refused connection: TLS handshake failed");
                    self.inner.metrics.refused("handshake");
                    return;
                }
                Err(_) => {
                    tracing::info!("relay: refused connection: TLS handshake timed out");
                    self.inner.metrics.refused("handshake");
                    return;
                }
            },
        };
        let (_, session) = tls.get_ref();
        let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
        let cn = session
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|der| mesh_certs::inspect_der(der).ok())
            .and_then(|info| info.subject_cn);
        let cn = match admit(cn.as_deref()) {
            Ok(cn) => cn.to_owned(),
            Err(refusal) => {
                tracing::warn!(%refusal, "relay: refused connection");
                self.inner.metrics.refused(refusal.reason());
                return;
            }
        };
        tracing::Span::current().record("cn", cn.as_str());
        if let Err(refusal) = self.admit_user(&cn).await {
            // info, not warn: a revoked peer may keep reconnecting (the cut was warned).
            tracing::info!(%refusal, "relay: refused connection");
            self.inner.metrics.refused(refusal.reason());
            return;
        }
        let Some((reg, token)) = self.register(&cn, &stop) else {
            tracing::warn!(cn, "relay: refused connection: peer user was just revoked");
            self.inner.metrics.refused("revoked");
            return;
        };
        let mut upstream = match self.dial(&cn, alpn.as_deref()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "relay: closing peer connection: etcd not reachable");
                self.inner.metrics.refused("upstream");
                return;
            }
        };
        tracing::debug!("relay: connection open");
        let mut tls = tls;
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut tls, &mut upstream) => match r {
                Ok((up, down)) => tracing::debug!(up, down, "relay: connection closed"),
                Err(e) => tracing::debug!(error = %e, "relay: connection ended"),
            },
            () = token.cancelled() => {
                if stop.is_cancelled() {
                    tracing::debug!("relay: connection closed on shutdown");
                } else {
                    tracing::info!("relay: connection cut");
                }
            }
        }
        drop(reg);
    }

    /// A CN marked revoked is admitted again only once etcd answers a check for it (at
    /// most one check per check interval, however often the peer reconnects).
    async fn admit_user(&self, cn: &str) -> Result<(), Refusal> {
        let last = {
            let peers = lock(&self.inner.peers);
            match peers.get(cn) {
                Some(p) if p.revoked => p.last_refusal.clone(),
                _ => return Ok(()),
            }
        };
        let refusal = |reason| Refusal::Revoked {
            cn: cn.to_owned(),
            reason,
        };
        if let Some((at, reason)) = last
            && at.elapsed() < self.inner.cfg.check_interval
        {
            return Err(refusal(reason));
        }
        match self.check(cn).await {
            Verdict::Allowed => {
                if let Some(p) = lock(&self.inner.peers).get_mut(cn) {
                    p.revoked = false;
                    p.last_refusal = None;
                }
                tracing::info!(cn, "relay: peer user accepted by etcd again");
                Ok(())
            }
            Verdict::Denied(reason) | Verdict::Unknown(reason) => {
                if let Some(p) = lock(&self.inner.peers).get_mut(cn) {
                    p.last_refusal = Some((Instant::now(), reason.clone()));
                }
                Err(refusal(reason))
            }
        }
    }

    /// Registers a live connection of `cn` (refused if `cn` is revoked).
    fn register(
        &self,
        cn: &str,
        stop: &CancellationToken,
    ) -> Option<(Registered, CancellationToken)> {
        let mut peers = lock(&self.inner.peers);
        let p = peers.entry(cn.to_owned()).or_default();
        if p.revoked {
            return None;
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let token = stop.child_token();
        p.live.insert(id, token.clone());
        self.inner
            .metrics
            .connections
            .get_or_create(&PeerLabel {
                peer: cn.to_owned(),
            })
            .inc();
        Some((
            Registered {
                relay: self.clone(),
                cn: cn.to_owned(),
                id,
            },
            token,
        ))
    }

    /// Cuts every connection of `cn` and refuses new ones until etcd accepts it again.
    /// Returns how many were cut.
    pub fn cut(&self, cn: &str) -> usize {
        let mut peers = lock(&self.inner.peers);
        let p = peers.entry(cn.to_owned()).or_default();
        p.revoked = true;
        let n = p.live.len();
        for token in p.live.values() {
            token.cancel();
        }
        self.inner
            .metrics
            .cuts
            .get_or_create(&PeerLabel {
                peer: cn.to_owned(),
            })
            .inc_by(n as u64);
        n
    }

    fn live_cns(&self) -> Vec<String> {
        lock(&self.inner.peers)
            .iter()
            .filter(|(_, p)| !p.live.is_empty())
            .map(|(cn, _)| cn.clone())
            .collect()
    }

    /// Every `check_interval`, checks each CN with live connections and cuts the refused.
    async fn check_loop(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.inner.cfg.check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut unknown: HashMap<String, String> = HashMap::new();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let cns = self.live_cns();
            let checks = futures::future::join_all(cns.iter().map(|cn| self.check(cn)));
            let verdicts = tokio::select! {
                () = stop.cancelled() => return,
                v = checks => v,
            };
            for (cn, verdict) in cns.into_iter().zip(verdicts) {
                match verdict {
                    Verdict::Allowed => {
                        unknown.remove(&cn);
                    }
                    Verdict::Denied(reason) => {
                        let n = self.cut(&cn);
                        tracing::warn!(
                            cn,
                            connections = n,
                            reason,
                            "relay: etcd refuses peer user; cut its connections"
                        );
                        unknown.remove(&cn);
                    }
                    Verdict::Unknown(reason) => {
                        if unknown.get(&cn) != Some(&reason) {
                            tracing::warn!(
                                cn,
                                reason,
                                "relay: cannot check peer user (nothing cut)"
                            );
                        }
                        unknown.insert(cn, reason);
                    }
                }
            }
        }
    }

    /// One authenticated read of [`CHECK_KEY`] as `cn`.
    pub async fn check(&self, cn: &str) -> Verdict {
        let store = match self.check_store(cn).await {
            Ok(s) => s,
            Err(e) => return Verdict::Unknown(e.to_string()),
        };
        match tokio::time::timeout(CHECK_TIMEOUT, store.get(CHECK_KEY)).await {
            Err(_) => Verdict::Unknown(format!("no answer within {CHECK_TIMEOUT:?}")),
            Ok(Ok(_)) => Verdict::Allowed,
            Ok(Err(e)) if is_denial(&e) => Verdict::Denied(e.to_string()),
            Ok(Err(e)) => Verdict::Unknown(e.to_string()),
        }
    }

    /// The minted identity of `cn` (minted again when old), as (TLS config, etcd config).
    fn minted(
        &self,
        cn: &str,
    ) -> Result<(Arc<ClientConfig>, Option<EtcdStore>, EtcdConfig), RelayError> {
        let mut minted = lock(&self.inner.minted);
        if let Some(m) = minted.get(cn)
            && m.at.elapsed() < REMINT_AFTER
        {
            return Ok((m.tls.clone(), m.store.clone(), m.etcd.clone()));
        }
        let cfg = &self.inner.cfg;
        let issued = cfg
            .relay_ca
            .issue(&CertRequest::client(cn).with_validity(MINTED_VALIDITY))?;
        let mut tls = Arc::unwrap_or_clone(mesh_certs::client_config(
            &cfg.upstream_ca_pem,
            Some((&issued.cert_pem, &issued.key_pem)),
        )?);
        tls.alpn_protocols = vec![RELAY_ALPN.to_vec()];
        let tls = Arc::new(tls);
        let etcd = EtcdConfig {
            endpoints: vec![format!("https://{}", cfg.upstream)],
            ca_pem: Some(cfg.upstream_ca_pem.clone()),
            cert_pem: Some(issued.cert_pem),
            key_pem: Some(issued.key_pem),
            tls_server_name: cfg.upstream_server_name.clone(),
            user: None,
            connect_timeout: Some(CHECK_TIMEOUT),
            request_timeout: Some(CHECK_TIMEOUT),
        };
        minted.insert(
            cn.to_owned(),
            Minted {
                at: Instant::now(),
                tls: tls.clone(),
                etcd: etcd.clone(),
                store: None,
            },
        );
        Ok((tls, None, etcd))
    }

    /// The checker's etcd client for `cn` (created once per minted certificate).
    async fn check_store(&self, cn: &str) -> Result<EtcdStore, RelayError> {
        let (_, store, etcd) = self.minted(cn)?;
        if let Some(store) = store {
            return Ok(store);
        }
        let store = EtcdStore::connect(&etcd)
            .await
            .map_err(|source| RelayError::CheckClient {
                cn: cn.to_owned(),
                source,
            })?;
        if let Some(m) = lock(&self.inner.minted).get_mut(cn) {
            m.store = Some(store.clone());
        }
        Ok(store)
    }

    /// Dials etcd as `cn`, forwarding the ALPN protocol the peer negotiated.
    async fn dial(
        &self,
        cn: &str,
        alpn: Option<&[u8]>,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, RelayError> {
        let (mut tls, _, _) = self.minted(cn)?;
        if alpn != Some(RELAY_ALPN) {
            let mut c = Arc::unwrap_or_clone(tls);
            c.alpn_protocols = alpn.map(|a| vec![a.to_vec()]).unwrap_or_default();
            tls = Arc::new(c);
        }
        let upstream = &self.inner.cfg.upstream;
        let dial_err = |source| RelayError::Dial {
            upstream: upstream.clone(),
            source,
        };
        let connect = async {
            let tcp = TcpStream::connect(upstream.as_str()).await?;
            let _ = tcp.set_nodelay(true);
            TlsConnector::from(tls)
                .connect(self.inner.server_name.clone(), tcp)
                .await
        };
        match tokio::time::timeout(UPSTREAM_TIMEOUT, connect).await {
            Ok(r) => r.map_err(dial_err),
            Err(_) => Err(dial_err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cn_policy_admits_only_peer_users() {
        assert_eq!(admit(Some("remote-west")), Ok("remote-west"));
        assert_eq!(admit(Some("remote-a1")), Ok("remote-a1"));
        assert_eq!(admit(None), Err(Refusal::NoCommonName));
        for cn in [
            "root",
            "admin-east",
            "apiserver-east",
            "agent-east",
            "remote-",
            "remote-West",
            "remote-we_st",
            "Remote-west",
            "xremote-west",
            "",
        ] {
            let r = admit(Some(cn));
            assert_eq!(r, Err(Refusal::NotAPeer { cn: cn.to_owned() }), "{cn:?}");
        }
        let msg = admit(Some("root")).unwrap_err().to_string();
        assert!(
            msg.contains("\"root\"") && msg.contains("remote-<cluster>"),
            "{msg}"
        );
        assert_eq!(admit(Some("root")).unwrap_err().reason(), "not-a-peer");
    }

    #[test]
    fn upstream_addresses() {
        assert_eq!(
            parse_upstream("https://127.0.0.1:2379").unwrap(),
            "127.0.0.1:2379"
        );
        assert_eq!(
            parse_upstream("https://localhost:2379/").unwrap(),
            "localhost:2379"
        );
        assert_eq!(parse_upstream("[::1]:2379").unwrap(), "[::1]:2379");
        assert!(parse_upstream("https://localhost").is_err());
        assert!(parse_upstream(":2379").is_err());
        assert_eq!(host_of("[::1]:2379"), "::1");
        assert_eq!(host_of("localhost:2379"), "localhost");
    }

    #[test]
    fn denials_are_told_from_outages() {
        let denied = KvError::PermissionDenied {
            op: "get",
            key: CHECK_KEY.into(),
        };
        assert!(is_denial(&denied));
        let not_found = KvError::Request {
            op: "get",
            key: CHECK_KEY.into(),
            source: "etcdserver: user name not found".into(),
        };
        assert!(is_denial(&not_found));
        let down = KvError::Connect {
            endpoint: "https://127.0.0.1:2379".into(),
            source: "connection refused".into(),
        };
        assert!(!is_denial(&down));
    }

    #[test]
    fn cut_marks_revoked_and_counts() {
        let ca = CertificateAuthority::generate("relay-test", Duration::from_secs(3600)).unwrap();
        let server = ca
            .issue(&CertRequest::server("relay", &["localhost"], &[]))
            .unwrap();
        let identity = mesh_certs::static_identity(&server.cert_pem, &server.key_pem).unwrap();
        let cfg = RelayConfig {
            upstream: "127.0.0.1:1".into(),
            upstream_server_name: Some("localhost".into()),
            upstream_ca_pem: ca.cert_pem().to_owned(),
            server_tls: server_tls(identity, ca.cert_pem()).unwrap(),
            relay_ca: ca,
            check_interval: DEFAULT_CHECK_INTERVAL,
        };
        let metrics = RelayMetrics::default();
        let relay = Relay::new(cfg, metrics.clone()).unwrap();
        let stop = CancellationToken::new();
        let (a, ta) = relay.register("remote-x", &stop).unwrap();
        let (_b, tb) = relay.register("remote-x", &stop).unwrap();
        let (_c, tc) = relay.register("remote-y", &stop).unwrap();
        assert_eq!(relay.live_connections("remote-x"), 2);
        drop(a);
        assert_eq!(relay.live_connections("remote-x"), 1);
        assert_eq!(relay.cut("remote-x"), 1);
        assert!(tb.is_cancelled() && !ta.is_cancelled() && !tc.is_cancelled());
        assert!(relay.register("remote-x", &stop).is_none());
        let label = |p: &str| PeerLabel { peer: p.into() };
        assert_eq!(metrics.cuts.get_or_create(&label("remote-x")).get(), 1);
        assert_eq!(
            metrics.connections.get_or_create(&label("remote-y")).get(),
            1
        );
    }
}
