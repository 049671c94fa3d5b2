//! Plain-HTTP health and metrics of the apiserver: `/healthz`, `/readyz`, `/metrics` (axum).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::api::SHUTDOWN_GRACE;
use crate::export::ExportStatus;

/// Content type of `/metrics` (OpenMetrics text, as prometheus-client encodes it).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Why the apiserver is not ready, or `None` when it is (the first full export is done).
pub fn not_ready_reason(status: &ExportStatus) -> Option<String> {
    if status.ready {
        return None;
    }
    Some(match &status.last_error {
        Some(e) => format!("waiting for the first full export; last error: {e}"),
        None => "waiting for the first full export".to_owned(),
    })
}

#[derive(Debug, Clone)]
struct HealthState {
    status: watch::Receiver<ExportStatus>,
    registry: Arc<Registry>,
}

/// The health and metrics routes (for embedding; [`serve_health`] serves them).
pub fn router(status: watch::Receiver<ExportStatus>, registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(HealthState { status, registry })
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(s): State<HealthState>) -> Response {
    let reason = not_ready_reason(&s.status.borrow());
    match reason {
        None => (StatusCode::OK, "ready").into_response(),
        Some(r) => (StatusCode::SERVICE_UNAVAILABLE, r).into_response(),
    }
}

async fn metrics(State(s): State<HealthState>) -> Response {
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

/// Serves `/healthz` (200 "ok"), `/readyz` (200 "ready" once `status.ready`, else 503 with
/// the reason) and `/metrics` (the registry, OpenMetrics text) on `listener` until
/// `shutdown`; then waits for open connections, at most [`SHUTDOWN_GRACE`].
pub async fn serve_health(
    listener: TcpListener,
    status: watch::Receiver<ExportStatus>,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving health and metrics (HTTP)");
    }
    let server = axum::serve(listener, router(status, registry))
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
    use super::*;

    #[test]
    fn readiness_reasons() {
        let mut s = ExportStatus::default();
        assert_eq!(
            not_ready_reason(&s).as_deref(),
            Some("waiting for the first full export")
        );
        s.last_error = Some("etcd: connection refused".into());
        assert!(
            not_ready_reason(&s)
                .unwrap()
                .contains("etcd: connection refused")
        );
        s.ready = true;
        assert_eq!(not_ready_reason(&s), None);
    }
}
