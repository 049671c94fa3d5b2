//! Plain-HTTP health and metrics of a meshd process: `/healthz`, `/readyz`, `/metrics` (axum).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Content type of `/metrics` (OpenMetrics text, as prometheus-client encodes it).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// How long shutdown waits for open connections to finish before returning anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why a status is not ready (`None`: ready), shown by `/readyz`.
pub type NotReady<T> = fn(&T) -> Option<String>;

struct HealthState<T> {
    status: watch::Receiver<T>,
    not_ready: NotReady<T>,
    registry: Arc<Registry>,
}

// Manual: a derive would require `T: Clone`.
impl<T> Clone for HealthState<T> {
    fn clone(&self) -> Self {
        Self {
            status: self.status.clone(),
            not_ready: self.not_ready,
            registry: self.registry.clone(),
        }
    }
}

/// The health and metrics routes (for embedding; [`serve_health`] serves them).
pub fn router<T: Send + Sync + 'static>(
    status: watch::Receiver<T>,
    not_ready: NotReady<T>,
    registry: Arc<Registry>,
) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz::<T>))
        .route("/metrics", get(metrics::<T>))
        .with_state(HealthState {
            status,
            not_ready,
            registry,
        })
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz<T>(State(s): State<HealthState<T>>) -> Response {
    // The borrow ends before the response is built.
    let reason = (s.not_ready)(&s.status.borrow());
    match reason {
        None => (StatusCode::OK, "ready").into_response(),
        Some(r) => (StatusCode::SERVICE_UNAVAILABLE, r).into_response(),
    }
}

async fn metrics<T>(State(s): State<HealthState<T>>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &s.registry) {
        Ok(()) => ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], body).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "encoding metrics failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding metrics failed: {e}"),
            )
                .into_response()
        }
    }
}

/// Serves `/healthz` (200 "ok"), `/readyz` (200 "ready" while `not_ready(status)` is
/// `None`, else 503 with the reason) and `/metrics` (the registry, OpenMetrics text) on
/// `listener` until `shutdown`; then waits for open connections, at most
/// [`SHUTDOWN_GRACE`].
pub async fn serve_health<T: Send + Sync + 'static>(
    listener: TcpListener,
    status: watch::Receiver<T>,
    not_ready: NotReady<T>,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving health and metrics (HTTP)");
    }
    let server = axum::serve(listener, router(status, not_ready, registry))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let grace = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        r = server => r,
        () = grace => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "health connections still open after the shutdown grace period; returning");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.unwrap();
        let code = buf.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = buf.split_once("\r\n\r\n").unwrap().1.to_owned();
        (code, body)
    }

    fn reason(ready: &bool) -> Option<String> {
        (!*ready).then(|| "still starting".to_owned())
    }

    #[tokio::test]
    async fn readiness_follows_the_status_and_shutdown_closes_the_port() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let mut registry = Registry::default();
        let g = prometheus_client::metrics::gauge::Gauge::<i64>::default();
        g.set(7);
        registry.register("mesh_test_gauge", "A test gauge", g);
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve_health(
            listener,
            rx,
            reason,
            Arc::new(registry),
            shutdown.clone(),
        ));
        assert_eq!(get(addr, "/healthz").await, (200, "ok".to_owned()));
        assert_eq!(
            get(addr, "/readyz").await,
            (503, "still starting".to_owned())
        );
        tx.send_replace(true);
        assert_eq!(get(addr, "/readyz").await, (200, "ready".to_owned()));
        let (code, body) = get(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(body.contains("mesh_test_gauge 7"), "{body}");
        shutdown.cancel();
        server.await.unwrap().unwrap();
        assert!(TcpStream::connect(addr).await.is_err());
    }
}
