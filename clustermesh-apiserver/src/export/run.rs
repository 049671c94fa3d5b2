//! The exporter's event loop: source events, flushes with retry, heartbeat, identity GC,
//! lease loss, graceful shutdown.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use meshd::backoff::{Backoff, BackoffConfig};
use meshd::kv::{KvStore, Session};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{ExportConfig, ExportError, ExportMetrics, ExportStatus, Exporter};
use crate::source::{Source, SourceEvent};

/// Applies queued events in order; a failed one stays at the front for the retry.
async fn apply_queue(
    exporter: &mut Exporter,
    queue: &mut VecDeque<SourceEvent>,
) -> Result<(), ExportError> {
    if let Err(e) = exporter.prepare(queue.iter()).await {
        // Not fatal: each pod then allocates on its own.
        tracing::debug!(error = %e, "batched identity allocation failed");
    }
    while let Some(ev) = queue.pop_front() {
        if let Err(r) = exporter.handle(ev).await {
            queue.push_front(r.event);
            return Err(r.error);
        }
    }
    exporter.finish_batch().await
}

/// Source events applied before a flush (bounds the latency of a big burst).
const MAX_BATCH: usize = 10_000;
/// How long shutdown may spend writing what is pending.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);

/// Runs the export of one cluster until `shutdown`; `status` receives every update.
pub async fn run(
    store: Arc<dyn KvStore>,
    cfg: ExportConfig,
    source: Box<dyn Source>,
    metrics: ExportMetrics,
    status: watch::Sender<ExportStatus>,
    shutdown: CancellationToken,
) -> Result<(), ExportError> {
    let cluster = cfg.cluster.to_string();
    let store_err = |step: &'static str| {
        let cluster = cluster.clone();
        move |source| ExportError::Store {
            cluster,
            step,
            source,
        }
    };
    let mut session = Session::start(store.clone(), cfg.lease_ttl)
        .await
        .map_err(store_err("start lease session"))?;
    let mut exporter = Exporter::new(store.clone(), cfg.clone(), session.lease(), metrics).await?;
    // Mirror the exporter's status into the caller's channel.
    let mut inner = exporter.status();
    let forward = tokio::spawn({
        let status = status.clone();
        async move {
            while inner.changed().await.is_ok() {
                let s = inner.borrow_and_update().clone();
                status.send_replace(s);
            }
        }
    });
    exporter.write_cluster_config().await?;
    exporter.heartbeat().await?;

    let mut events = source.run(shutdown.child_token());
    let mut heartbeat = tokio::time::interval(cfg.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut gc = tokio::time::interval(cfg.gc_interval);
    gc.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = Backoff::new(BackoffConfig::default());
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut marked = false;
    let mut lost = session.lost();
    let mut queue = VecDeque::new();

    let result = loop {
        let retry = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            ev = events.next(), if queue.len() < MAX_BATCH => {
                let Some(ev) = ev else { break Ok(()) };
                queue.push_back(ev);
                while queue.len() < MAX_BATCH {
                    match events.next().now_or_never() {
                        Some(Some(ev)) => queue.push_back(ev),
                        _ => break,
                    }
                }
                if retry_at.is_none() {
                    retry_at = Some(tokio::time::Instant::now());
                }
            }
            () = retry => {
                retry_at = None;
                if let Err(e) = apply_queue(&mut exporter, &mut queue).await {
                    tracing::warn!(error = %e, "export step failed; retrying");
                    retry_at = Some(tokio::time::Instant::now() + backoff.next_delay());
                    continue;
                }
                match exporter.flush().await {
                    Ok(_) => {
                        backoff.reset();
                        if exporter.source_synced() && !marked {
                            match exporter.mark_synced().await {
                                Ok(()) => marked = true,
                                Err(e) => {
                                    tracing::warn!(error = %e, "writing synced markers failed; retrying");
                                    retry_at = Some(tokio::time::Instant::now() + backoff.next_delay());
                                }
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "flush failed; retrying");
                        retry_at = Some(tokio::time::Instant::now() + backoff.next_delay());
                    }
                }
            }
            _ = heartbeat.tick() => {
                if let Err(e) = exporter.heartbeat().await {
                    tracing::warn!(error = %e, "heartbeat failed");
                }
            }
            _ = gc.tick() => {
                if let Err(e) = exporter.allocator_mut().gc().await {
                    tracing::warn!(error = %e, "identity GC failed");
                }
            }
            () = lost.cancelled() => {
                tracing::warn!("lease lost; starting a new session");
                match Session::start(store.clone(), cfg.lease_ttl).await {
                    Ok(s) => {
                        let lease = s.lease();
                        session = s;
                        lost = session.lost();
                        if let Err(e) = exporter.restore_lease(lease).await {
                            tracing::warn!(error = %e, "restoring identity references failed");
                        }
                        retry_at = Some(tokio::time::Instant::now());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "new lease session failed; retrying");
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                }
            }
        }
    };
    // Graceful shutdown: apply and write what is pending (bounded), then end the session.
    let finish = async {
        apply_queue(&mut exporter, &mut queue).await?;
        exporter.flush().await
    };
    match tokio::time::timeout(SHUTDOWN_FLUSH, finish).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "final flush failed"),
        Err(_) => tracing::warn!("final flush timed out"),
    }
    if let Err(e) = session.close().await {
        tracing::warn!(error = %e, "closing the lease session failed");
    }
    forward.abort();
    result
}
