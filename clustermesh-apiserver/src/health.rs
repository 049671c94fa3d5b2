//! Plain-HTTP health and metrics of the apiserver: `/healthz`, `/readyz`, `/metrics` (axum).
//!
//! The server is [`meshd::health`], shared with the agent; this module supplies the
//! apiserver's readiness rule (the first full export is done).

use std::sync::Arc;

use axum::Router;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::export::ExportStatus;

pub use meshd::health::METRICS_CONTENT_TYPE;

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

/// The health and metrics routes (for embedding; [`serve_health`] serves them).
pub fn router(status: watch::Receiver<ExportStatus>, registry: Arc<Registry>) -> Router {
    meshd::health::router(status, not_ready_reason, registry)
}

/// Serves `/healthz` (200 "ok"), `/readyz` (200 "ready" once `status.ready`, else 503 with
/// the reason) and `/metrics` (the registry, OpenMetrics text) on `listener` until
/// `shutdown`; then waits for open connections, at most
/// [`meshd::health::SHUTDOWN_GRACE`].
pub async fn serve_health(
    listener: TcpListener,
    status: watch::Receiver<ExportStatus>,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    meshd::health::serve_health(listener, status, not_ready_reason, registry, shutdown).await
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
