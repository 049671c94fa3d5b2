//! Serving gRPC over mTLS with hot-reloaded certificates and per-role authorization, shared by the apiserver and the agent.
//!
//! ```text
//!  TcpListener ─accept─► spawned handshake (tokio-rustls, ≤ HANDSHAKE_TIMEOUT) ─► channel
//!                                                                                 │
//!  tonic Server::serve_with_incoming_shutdown(Authorized(routes, authz), …)     ◄┘
//! ```
//!
//! The server certificate is resolved per handshake from the [`rustls::ServerConfig`]'s
//! resolver; built by [`server_tls`] that is a [`ReloadingCertKey`], so rotated files are
//! served to new connections without a restart (tonic's own `ServerTlsConfig` takes a fixed
//! identity, hence our own acceptor). Client certificates must chain to the given CA.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mesh_certs::{CertError, ReloadingCertKey};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

pub mod authz;

pub use authz::{ACCESS, Authorized, Authorizer, allowed_roles};

/// How long one TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for open connections to finish before returning anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// TLS handshakes in flight at most; further connections wait in the listen backlog.
const MAX_HANDSHAKES: usize = 256;
/// Handshaken connections queued for tonic.
const QUEUE: usize = 64;

/// Why serving a gRPC API failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The TLS material could not be loaded or watched (retrying helps only once the
    /// files are fixed).
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

/// A server TLS config: `cert_path`/`key_path` are watched and reloaded on change
/// ([`ReloadingCertKey`]); clients must present a certificate signed by `client_ca_pem`.
/// Returns the config and the reloading pair (for its generation/info).
pub fn server_tls(
    cert_path: PathBuf,
    key_path: PathBuf,
    client_ca_pem: &str,
) -> Result<(Arc<rustls::ServerConfig>, Arc<ReloadingCertKey>), ServeError> {
    let pair = ReloadingCertKey::watch(cert_path, key_path).map_err(|source| ServeError::Tls {
        step: "load and watch the server certificate",
        source,
    })?;
    let config = mesh_certs::server_config(pair.clone(), client_ca_pem).map_err(|source| {
        ServeError::Tls {
            step: "build the server TLS config",
            source,
        }
    })?;
    Ok((config, pair))
}

/// Serves `routes` on `listener` over mTLS (`tls`, e.g. from [`server_tls`]) until
/// `shutdown`, letting through only the calls `authz` allows (the role in the client
/// certificate, per method: [`ACCESS`]).
///
/// Each accepted connection is TLS-handshaken in its own task (bounded by
/// [`HANDSHAKE_TIMEOUT`]; failures are logged at debug and do not stop the server) and
/// handed to tonic. On `shutdown` the listener is closed, open connections are asked to
/// finish (HTTP/2 GOAWAY) and the call returns when they have, or after [`SHUTDOWN_GRACE`].
pub async fn serve_mtls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    routes: Routes,
    authz: Authorizer,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, cluster = authz.cluster(), "serving the gRPC API (mTLS, authorized by role)");
    }
    let (tx, rx) = mpsc::channel::<TlsStream<TcpStream>>(QUEUE);
    let stop_accepting = shutdown.child_token();
    let accept = accept_loop(listener, TlsAcceptor::from(tls), tx, stop_accepting.clone());
    let incoming =
        tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, std::convert::Infallible>);
    let server = tonic::transport::Server::builder().serve_with_incoming_shutdown(
        Authorized::new(routes.prepare(), authz),
        incoming,
        shutdown.clone().cancelled_owned(),
    );
    let serve = async {
        let grace = async {
            shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        let result = tokio::select! {
            r = server => r.map_err(|source| ServeError::Serve { source }),
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
