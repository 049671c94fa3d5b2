//! `RunningExporter`: a clustermesh-apiserver export loop running in the test's runtime.

use std::sync::Arc;
use std::time::Duration;

use clustermesh_apiserver::export::{self, ExportConfig, ExportMetrics, ExportStatus};
use clustermesh_apiserver::source::Source;
use meshd::kv::KvStore;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// An export loop; stopped (gracefully) by [`RunningExporter::stop`] or aborted on drop.
#[derive(Debug)]
pub struct RunningExporter {
    /// Status updates.
    pub status: watch::Receiver<ExportStatus>,
    /// Metrics of this exporter.
    pub metrics: ExportMetrics,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), export::ExportError>>>,
}

impl RunningExporter {
    /// Starts exporting `source` into `store`.
    pub fn start(store: Arc<dyn KvStore>, cfg: ExportConfig, source: Box<dyn Source>) -> Self {
        let (tx, status) = watch::channel(ExportStatus::default());
        let shutdown = CancellationToken::new();
        let metrics = ExportMetrics::default();
        let task = tokio::spawn(export::run(
            store,
            cfg,
            source,
            metrics.clone(),
            tx,
            shutdown.clone(),
        ));
        Self {
            status,
            metrics,
            shutdown,
            task: Some(task),
        }
    }

    /// Waits until the first full export is done and nothing is pending.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<ExportStatus> {
        let mut rx = self.status.clone();
        match tokio::time::timeout(timeout, rx.wait_for(|s| s.ready)).await {
            Ok(r) => Ok(r?.clone()),
            Err(_) => anyhow::bail!(
                "exporter not ready after {timeout:?}: {:?}",
                *self.status.borrow()
            ),
        }
    }

    /// Stops gracefully (final flush, lease closed) and returns the loop's result.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            t.await??;
        }
        Ok(())
    }
}

impl Drop for RunningExporter {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}
