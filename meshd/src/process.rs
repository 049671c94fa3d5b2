//! Process plumbing shared by the meshd binaries: logging, crypto provider, signals.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Why a process ended badly.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The tokio runtime or signal handlers could not be set up.
    #[error("setting up the runtime: {0}")]
    Runtime(#[from] std::io::Error),
    /// Another rustls crypto provider was installed first.
    #[error("a rustls crypto provider other than ring was already installed")]
    Crypto,
    /// The main task failed.
    #[error(transparent)]
    Failed(Box<dyn std::error::Error + Send + Sync>),
    /// The main task panicked.
    #[error("the main task panicked")]
    Panicked,
    /// Shutdown did not finish in time.
    #[error("shutdown took longer than {0:?}")]
    Deadline(Duration),
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
}

/// Installs ring as the process-wide rustls provider, so a dependency that enabled another
/// provider fails loudly instead of making the choice ambiguous.
pub fn install_crypto_provider() -> Result<(), ProcessError> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| ProcessError::Crypto)
}

/// Runs `main` on a multi-thread runtime until it returns or SIGTERM/SIGINT arrives; then
/// cancels the token it was given and waits up to `deadline` for it to finish.
pub fn run_until_signal<F, Fut, E>(main: F, deadline: Duration) -> Result<(), ProcessError>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        let mut run = tokio::spawn(main(shutdown.clone()));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let finished = |r: Result<Result<(), E>, tokio::task::JoinError>| match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ProcessError::Failed(Box::new(e))),
            Err(_) => Err(ProcessError::Panicked),
        };
        tokio::select! {
            r = &mut run => return finished(r),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        }
        shutdown.cancel();
        match tokio::time::timeout(deadline, run).await {
            Ok(r) => finished(r),
            Err(_) => Err(ProcessError::Deadline(deadline)),
        }
    })
}

/// The long-running parts of a process: when any one ends (done or failed), the others
/// are asked to stop; `join` returns the first failure.
#[derive(Debug)]
pub struct Components<E> {
    tasks: tokio::task::JoinSet<Result<(), E>>,
    stop: CancellationToken,
}

impl<E: std::fmt::Display + Send + 'static> Components<E> {
    /// Components stopped together through `stop`.
    pub fn new(stop: CancellationToken) -> Self {
        Self {
            tasks: tokio::task::JoinSet::new(),
            stop,
        }
    }

    /// The token every component must watch.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Runs a component; its end stops the others.
    pub fn spawn(&mut self, component: impl Future<Output = Result<(), E>> + Send + 'static) {
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            let r = component.await;
            stop.cancel();
            r
        });
    }

    /// Waits for every component; returns the first failure.
    pub async fn join(mut self) -> Result<(), E> {
        let mut first_err = None;
        while let Some(res) = self.tasks.join_next().await {
            match res {
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "component failed; shutting down");
                    first_err.get_or_insert(e);
                }
                Err(e) if e.is_panic() => {
                    tracing::error!("component panicked; shutting down");
                    self.stop.cancel();
                }
                _ => {}
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// Binds a TCP listener, naming what it is for in the error.
pub async fn bind(
    what: &'static str,
    addr: std::net::SocketAddr,
) -> Result<tokio::net::TcpListener, BindError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { what, addr, source })
}

/// A listener could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("binding {what} on {addr}: {source}")]
pub struct BindError {
    /// Which listener.
    pub what: &'static str,
    /// The address.
    pub addr: std::net::SocketAddr,
    /// Cause.
    #[source]
    pub source: std::io::Error,
}
