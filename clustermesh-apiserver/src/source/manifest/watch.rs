//! The background task: initial load, then watch the directory, debounce bursts of
//! changes and rescan (only files whose content changed are parsed).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;

use super::state::{DirState, is_ignored_name};
use crate::source::{SourceError, SourceEvent};

/// How often an unreadable directory or a failed watcher is retried.
const RETRY: Duration = Duration::from_secs(1);
/// Full rescan as a safety net against lost notifications (cheap: unchanged files are skipped).
const RESYNC: Duration = Duration::from_secs(60);
/// Longest a burst of changes may delay a rescan, as a multiple of the debounce.
const MAX_SETTLE_FACTOR: u32 = 10;
/// Notifications buffered between the watcher thread and the task (more are coalesced).
const SIGNAL_BUFFER: usize = 64;

/// What the watcher thread tells the task.
#[derive(Debug)]
enum Signal {
    /// Something in the directory changed.
    Changed,
    /// The watcher reported an error.
    Failed(String),
}

/// The task's state.
#[derive(Debug)]
struct Task {
    /// `None` only while a rescan runs on the blocking pool.
    state: Option<DirState>,
    root: PathBuf,
    display_root: String,
    debounce: Duration,
    tx: mpsc::Sender<SourceEvent>,
    shutdown: CancellationToken,
    signal_tx: mpsc::Sender<Signal>,
    signal_rx: mpsc::Receiver<Signal>,
    watcher: Option<RecommendedWatcher>,
    /// Directory and watcher problems reported since the last good rescan with a
    /// watcher, so a retry loop does not repeat them.
    reported: BTreeSet<String>,
}

/// Whether the task goes on.
type Flow = Result<(), Stop>;

/// The task ends: shut down, the consumer went away, or the state was lost.
#[derive(Debug)]
struct Stop;

/// Runs the source until `shutdown` is cancelled or the receiver is dropped.
pub(super) async fn run(
    state: DirState,
    debounce: Duration,
    tx: mpsc::Sender<SourceEvent>,
    shutdown: CancellationToken,
) {
    let (signal_tx, signal_rx) = mpsc::channel(SIGNAL_BUFFER);
    let mut task = Task {
        root: state.root().to_owned(),
        display_root: state.display_root().display().to_string(),
        state: Some(state),
        debounce,
        tx,
        shutdown,
        signal_tx,
        signal_rx,
        watcher: None,
        reported: BTreeSet::new(),
    };
    if task.initial_load().await.is_ok() {
        let _ = task.watch().await;
    }
    tracing::debug!(dir = %task.root.display(), "manifest source stopped");
}

impl Task {
    /// Watches, then loads every file until the directory can be read; then `Synced`.
    async fn initial_load(&mut self) -> Flow {
        loop {
            self.ensure_watcher().await?;
            if self.rescan().await? {
                return self.send(SourceEvent::Synced).await;
            }
            self.pause(RETRY).await?;
        }
    }

    async fn watch(&mut self) -> Flow {
        let mut resync = tokio::time::interval_at(Instant::now() + RESYNC, RESYNC);
        loop {
            let watching = self.watcher.is_some();
            tokio::select! {
                () = self.shutdown.cancelled() => return Err(Stop),
                signal = self.signal_rx.recv() => {
                    if let Some(signal) = signal {
                        self.on_signal(signal).await?;
                    }
                    self.settle().await?;
                    self.rescan().await?;
                }
                () = sleep(RETRY), if !watching => {
                    if self.ensure_watcher().await? {
                        self.rescan().await?;
                    }
                }
                _ = resync.tick() => {
                    self.rescan().await?;
                }
            }
        }
    }

    /// Waits until no change arrived for the debounce time (bounded).
    async fn settle(&mut self) -> Flow {
        let deadline = Instant::now() + self.debounce * MAX_SETTLE_FACTOR;
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return Err(Stop),
                () = sleep(self.debounce) => return Ok(()),
                () = sleep_until(deadline) => return Ok(()),
                signal = self.signal_rx.recv() => {
                    if let Some(signal) = signal {
                        self.on_signal(signal).await?;
                    }
                }
            }
        }
    }

    async fn on_signal(&mut self, signal: Signal) -> Flow {
        match signal {
            Signal::Changed => Ok(()),
            Signal::Failed(message) => {
                let message = format!("watching the directory failed: {message}");
                self.send_error(message).await
            }
        }
    }

    /// Starts the watcher if there is none; `Ok(false)` when that failed (reported once).
    async fn ensure_watcher(&mut self) -> Result<bool, Stop> {
        if self.watcher.is_some() {
            return Ok(true);
        }
        match start_watcher(&self.root, self.signal_tx.clone()) {
            Ok(watcher) => {
                self.watcher = Some(watcher);
                Ok(true)
            }
            Err(e) => {
                let message = format!("cannot watch the directory (retrying): {e}");
                self.report_problem(message).await?;
                Ok(false)
            }
        }
    }

    /// Rescans and sends the events; `Ok(false)` when the directory could not be read
    /// (reported once; the watcher is dropped so it is set up again when it returns).
    async fn rescan(&mut self) -> Result<bool, Stop> {
        let Some(mut state) = self.state.take() else {
            return Err(Stop);
        };
        let joined = tokio::task::spawn_blocking(move || {
            let result = state.rescan();
            (state, result)
        })
        .await;
        let (state, result) = match joined {
            Ok(done) => done,
            Err(e) => {
                let message = format!("rescan task failed, source stopped: {e}");
                tracing::error!(dir = %self.root.display(), "{message}");
                let _ = self.send_error(message).await;
                return Err(Stop);
            }
        };
        self.state = Some(state);
        match result {
            Ok(events) => {
                if self.watcher.is_some() {
                    self.reported.clear();
                }
                for event in events {
                    self.send(event).await?;
                }
                Ok(true)
            }
            Err(e) => {
                self.watcher = None;
                let SourceError { message, .. } = e.to_source_error();
                self.report_problem(format!("{message} (retrying)")).await?;
                Ok(false)
            }
        }
    }

    async fn report_problem(&mut self, message: String) -> Flow {
        if self.reported.contains(&message) {
            return Ok(());
        }
        tracing::warn!(dir = %self.root.display(), "{message}");
        self.reported.insert(message.clone());
        self.send_error(message).await
    }

    async fn send_error(&self, message: String) -> Flow {
        let location = self.display_root.clone();
        self.send(SourceEvent::Error(SourceError { location, message }))
            .await
    }

    async fn send(&self, event: SourceEvent) -> Flow {
        tokio::select! {
            sent = self.tx.send(event) => sent.map_err(|_| Stop),
            () = self.shutdown.cancelled() => Err(Stop),
        }
    }

    async fn pause(&self, duration: Duration) -> Flow {
        tokio::select! {
            () = sleep(duration) => Ok(()),
            () = self.shutdown.cancelled() => Err(Stop),
        }
    }
}

/// Watches `root` recursively; relevant notifications become signals (coalesced when the
/// buffer is full: a pending signal already guarantees a later rescan).
fn start_watcher(root: &Path, signals: mpsc::Sender<Signal>) -> notify::Result<RecommendedWatcher> {
    let filter_root = root.to_owned();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let signal = match res {
            Ok(event) if !is_relevant(&filter_root, &event) => return,
            Ok(_) => Signal::Changed,
            Err(e) => Signal::Failed(e.to_string()),
        };
        let _ = signals.try_send(signal);
    })?;
    watcher.watch(root, RecursiveMode::Recursive)?;
    Ok(watcher)
}

/// Reads (our own rescans cause them) and changes to ignored files do not matter.
fn is_relevant(root: &Path, event: &notify::Event) -> bool {
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
        EventKind::Access(_) => return false,
        _ => {}
    }
    event.need_rescan()
        || event.paths.is_empty()
        || event.paths.iter().any(|p| !is_ignored_path(root, p))
}

fn is_ignored_path(root: &Path, path: &Path) -> bool {
    path.strip_prefix(root).is_ok_and(|rel| {
        rel.components()
            .any(|c| c.as_os_str().to_str().is_some_and(is_ignored_name))
    })
}
