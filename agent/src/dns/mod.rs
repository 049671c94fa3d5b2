//! DNS for global services: an authoritative `clusterset.local` server (MCS DNS
//! specification 1.0.0) answering from the merged view, forwarding other names upstream.
//!
//! ```text
//!  MergedView ─ services watch ─► rebuild DnsIndex (on every published change) ─► swap Arc
//!  UDP/TCP (hickory Server) ─► MeshDnsHandler: ANY → NOTIMP, class ≠ IN → REFUSED
//!                           ─► Catalog ─ clusterset.local. ─► ClustersetZone (index lookup)
//!                                      └ .  (when --dns-upstream) ─► ForwardZoneHandler
//!                                        (hickory-resolver with its cache); no upstream → REFUSED
//! ```
//!
//! Malformed packets get FORMERR from hickory's server loop, several questions FORMERR, other
//! opcodes NOTIMP (the catalog). Queries never touch etcd: a lookup is one hash probe in the
//! current index.

pub mod index;
#[cfg(test)]
mod tests;
pub mod zone;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, LowerName, Name, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::resolver::config::{ConnectionConfig, NameServerConfig};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::forwarder::{ForwardConfig, ForwardZoneHandler};
use hickory_server::zone_handler::{Catalog, MessageResponseBuilder, ZoneHandler};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::view::ServicesSnapshot;
use index::{DnsIndex, IndexConfig};
use zone::{ClustersetZone, SharedIndex};

/// How long a TCP connection may idle.
const TCP_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest TCP response.
const TCP_RESPONSE_BUFFER: usize = 65_535;

/// DNS server settings.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// UDP and TCP listen address.
    pub listen: SocketAddr,
    /// Record TTL (also the negative-caching TTL).
    pub ttl: u32,
    /// Upstream servers for names outside the zone (empty: REFUSED).
    pub upstreams: Vec<SocketAddr>,
    /// Cap on addresses in a headless service's answer.
    pub max_headless_answers: usize,
}

impl DnsConfig {
    /// Defaults with `listen`.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            ttl: 5,
            upstreams: Vec::new(),
            max_headless_answers: IndexConfig::default().max_headless_answers,
        }
    }

    fn index_config(&self) -> IndexConfig {
        IndexConfig {
            ttl: self.ttl,
            max_headless_answers: self.max_headless_answers,
            ns_address: (!self.listen.ip().is_unspecified()).then(|| self.listen.ip()),
        }
    }
}

/// Why the DNS server could not run.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// Binding a socket failed.
    #[error("binding DNS {what} on {addr}: {source}")]
    Bind {
        /// `UDP` or `TCP`.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The forwarder could not be built.
    #[error("DNS upstream forwarder: {0}")]
    Forwarder(String),
    /// The server loop failed.
    #[error("DNS server: {0}")]
    Server(String),
}

/// Query outcomes by response code.
#[derive(Debug, Clone, Default)]
pub struct DnsMetrics {
    responses: Family<Vec<(&'static str, &'static str)>, Counter>,
}

impl DnsMetrics {
    /// Registers `mesh_dns_responses_total{rcode}`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "mesh_dns_responses",
            "DNS responses sent, by response code",
            self.responses.clone(),
        );
    }

    fn count(&self, code: ResponseCode) {
        let label = match code {
            ResponseCode::NoError => "NOERROR",
            ResponseCode::NXDomain => "NXDOMAIN",
            ResponseCode::FormErr => "FORMERR",
            ResponseCode::NotImp => "NOTIMP",
            ResponseCode::Refused => "REFUSED",
            ResponseCode::ServFail => "SERVFAIL",
            _ => "OTHER",
        };
        self.responses.get_or_create(&vec![("rcode", label)]).inc();
    }
}

/// Our request handler: protocol checks the catalog does not make, then the catalog.
pub struct MeshDnsHandler {
    catalog: Catalog,
    metrics: DnsMetrics,
}

impl std::fmt::Debug for MeshDnsHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshDnsHandler").finish_non_exhaustive()
    }
}

impl MeshDnsHandler {
    /// A handler over the zone in `index`, forwarding the rest to `upstreams`.
    pub fn new(
        index: SharedIndex,
        upstreams: &[SocketAddr],
        metrics: DnsMetrics,
    ) -> Result<Self, DnsError> {
        let zone = ClustersetZone::new(index);
        let mut catalog = Catalog::new();
        let origin = zone.origin().clone();
        catalog.upsert(origin, vec![Arc::new(zone) as Arc<dyn ZoneHandler>]);
        if !upstreams.is_empty() {
            let name_servers = upstreams
                .iter()
                .map(|a| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = a.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = a.port();
                    NameServerConfig::new(a.ip(), true, vec![udp, tcp])
                })
                .collect();
            let fwd = ForwardZoneHandler::builder_tokio(ForwardConfig {
                name_servers,
                options: None,
            })
            .with_origin(Name::root())
            .build()
            .map_err(DnsError::Forwarder)?;
            catalog.upsert(
                LowerName::new(&Name::root()),
                vec![Arc::new(fwd) as Arc<dyn ZoneHandler>],
            );
        }
        Ok(Self { catalog, metrics })
    }

    async fn refuse<R: ResponseHandler>(
        request: &Request,
        code: ResponseCode,
        mut response_handle: R,
    ) -> ResponseInfo {
        let response =
            MessageResponseBuilder::new(&request.queries, None).error_msg(&request.metadata, code);
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(error) => {
                tracing::debug!(%error, "failed to send a DNS error response");
                let mut metadata = Metadata::new(
                    request.metadata.id,
                    MessageType::Response,
                    request.metadata.op_code,
                );
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for MeshDnsHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        let early = if request.metadata.message_type == MessageType::Query
            && request.metadata.op_code == OpCode::Query
        {
            match request.queries.queries() {
                [q] if q.query_type() == RecordType::ANY => Some(ResponseCode::NotImp),
                // No zone transfers of a zone that is computed from the mesh.
                [q] if matches!(q.query_type(), RecordType::AXFR | RecordType::IXFR) => {
                    Some(ResponseCode::Refused)
                }
                [q] if q.query_class() != DNSClass::IN => Some(ResponseCode::Refused),
                _ => None,
            }
        } else {
            None
        };
        let info = match early {
            Some(code) => Self::refuse(request, code, response_handle).await,
            None => {
                self.catalog
                    .handle_request::<R, T>(request, response_handle)
                    .await
            }
        };
        self.metrics.count(info.response_code);
        info
    }
}

/// A running DNS server's address (the bound one, when port 0 was asked for).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// UDP address.
    pub udp: SocketAddr,
    /// TCP address.
    pub tcp: SocketAddr,
}

/// Binds UDP and TCP on `cfg.listen`, then serves from `services` until `shutdown`.
/// `bound` receives the addresses once the sockets are bound.
pub async fn serve(
    cfg: DnsConfig,
    mut services: watch::Receiver<Arc<ServicesSnapshot>>,
    metrics: DnsMetrics,
    bound: Option<tokio::sync::oneshot::Sender<Bound>>,
    shutdown: CancellationToken,
) -> Result<(), DnsError> {
    let icfg = cfg.index_config();
    let first = services.borrow_and_update().clone();
    let index: SharedIndex = Arc::new(RwLock::new(Arc::new(DnsIndex::build(&first, &icfg))));
    let handler = MeshDnsHandler::new(index.clone(), &cfg.upstreams, metrics)?;
    let udp = tokio::net::UdpSocket::bind(cfg.listen)
        .await
        .map_err(|source| DnsError::Bind {
            what: "UDP",
            addr: cfg.listen,
            source,
        })?;
    // Same port for TCP (a port-0 request takes the UDP socket's port).
    let tcp_addr = udp.local_addr().map_err(|source| DnsError::Bind {
        what: "UDP",
        addr: cfg.listen,
        source,
    })?;
    let tcp = tokio::net::TcpListener::bind(tcp_addr)
        .await
        .map_err(|source| DnsError::Bind {
            what: "TCP",
            addr: tcp_addr,
            source,
        })?;
    if let Some(tx) = bound {
        let _ = tx.send(Bound {
            udp: tcp_addr,
            tcp: tcp_addr,
        });
    }
    tracing::info!(listen = %tcp_addr, upstreams = ?cfg.upstreams, "DNS for clusterset.local serving");
    let mut server = hickory_server::Server::new(handler);
    server.register_socket(udp);
    server.register_listener(tcp, TCP_TIMEOUT, TCP_RESPONSE_BUFFER);

    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = services.changed() => {
                if changed.is_err() {
                    // The view is gone: keep answering from the last index until shutdown.
                    shutdown.cancelled().await;
                    break;
                }
                let snap = services.borrow_and_update().clone();
                // Building can take a while for large views; do it off the reactor.
                let icfg = icfg.clone();
                let built = tokio::task::spawn_blocking(move || DnsIndex::build(&snap, &icfg))
                    .await
                    .map_err(|e| DnsError::Server(e.to_string()))?;
                let new = Arc::new(built);
                match index.write() {
                    Ok(mut g) => *g = new,
                    Err(poisoned) => *poisoned.into_inner() = new,
                }
            }
        }
    }
    server
        .shutdown_gracefully()
        .await
        .map_err(|e| DnsError::Server(e.to_string()))
}
