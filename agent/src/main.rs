//! mesh-agent binary: parses arguments, sets up logging and signals, runs `app`.

use std::time::Duration;

use clap::Parser;
use mesh_agent::app::{self, Args};
use tokio_util::sync::CancellationToken;

/// How long shutdown may take after SIGTERM before the process exits anyway.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        let mut run = tokio::spawn(app::run(args, shutdown.clone()));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = &mut run => return Ok(r??),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        }
        shutdown.cancel();
        match tokio::time::timeout(SHUTDOWN_DEADLINE, run).await {
            Ok(r) => Ok(r??),
            Err(_) => anyhow::bail!("shutdown took longer than {SHUTDOWN_DEADLINE:?}"),
        }
    })
}
