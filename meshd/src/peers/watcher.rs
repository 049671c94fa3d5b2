//! `PeerDirWatcher`: a peers directory as a stream of `PeerEvent`s (notify + debounce + periodic rescan).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::PeerCredential;
use super::error::{PeerConfigError, chain};
use super::files::{DirScan, ScannedFile, scan_dir};
use crate::model::ClusterName;

/// How long the directory must be quiet after a change before it is rescanned.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(150);
/// Full rescan interval, the safety net for missed notifications.
pub const DEFAULT_RESCAN_INTERVAL: Duration = Duration::from_secs(30);
/// How often a missing (or unwatchable) directory is looked for.
const MISSING_DIR_POLL: Duration = Duration::from_secs(1);
/// A burst of changes delays the rescan by at most this many debounce periods.
const MAX_DEBOUNCE_PERIODS: u32 = 10;
/// Events buffered between the background task and the stream.
const CHANNEL_CAPACITY: usize = 64;

/// A change in the set of peer credentials.
#[derive(Debug, Clone)]
pub enum PeerEvent {
    /// A peer file appeared or its credential changed (or it became valid again after an
    /// [`PeerEvent::Error`], even if the credential equals the one in force).
    Upsert(PeerCredential),
    /// A peer file disappeared (also: the whole directory disappeared).
    Remove(ClusterName),
    /// A peer file (or the directory) is unusable. The peer's last good credential stays in
    /// force: no [`PeerEvent::Remove`] follows. Reported once per distinct error. Deleting a
    /// broken file sends [`PeerEvent::Remove`] only if the peer had a good credential.
    Error {
        /// The file, or the directory for directory-level errors.
        path: PathBuf,
        /// What is wrong.
        error: PeerConfigError,
    },
    /// The initial scan is complete (sent exactly once, also when the directory is missing).
    Synced,
}

/// Watches a peers directory (`<peer>.kubeconfig` files, non-recursive; hidden files and
/// anything not ending in `.kubeconfig` are ignored) and reports changes as [`PeerEvent`]s.
#[derive(Debug, Clone)]
pub struct PeerDirWatcher {
    dir: PathBuf,
    debounce: Duration,
    rescan_interval: Duration,
}

impl PeerDirWatcher {
    /// A watcher for `dir` with [`DEFAULT_DEBOUNCE`] and [`DEFAULT_RESCAN_INTERVAL`].
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            debounce: DEFAULT_DEBOUNCE,
            rescan_interval: DEFAULT_RESCAN_INTERVAL,
        }
    }

    /// Sets the quiet period after a change before rescanning.
    pub fn with_debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
    }

    /// Sets the periodic full-rescan interval (at least 10 ms).
    pub fn with_rescan_interval(mut self, interval: Duration) -> Self {
        self.rescan_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// The watched directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts the background task (on the current Tokio runtime; panics outside one, like
    /// `tokio::spawn`) and returns its events: the initial [`PeerEvent::Upsert`]s and
    /// [`PeerEvent::Error`]s, one [`PeerEvent::Synced`], then changes as they happen.
    /// The stream ends when `shutdown` is cancelled; dropping it stops the task too.
    pub fn run(self, shutdown: CancellationToken) -> BoxStream<'static, PeerEvent> {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let (signal_tx, signal_rx) = mpsc::channel(1);
        let task = Task {
            cfg: self,
            tx,
            shutdown: shutdown.clone(),
            signal_tx,
            watch: None,
            state: State::default(),
            dir_error: None,
            watch_error: None,
        };
        tokio::spawn(task.run(signal_rx));
        futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|ev| (ev, rx)) },
        )
        .take_until(shutdown.cancelled_owned())
        .boxed()
    }
}

/// An armed notify watch and the identity of the directory it watches.
struct DirWatch {
    _watcher: RecommendedWatcher,
    id: Option<(u64, u64)>,
}

/// What the watcher knows about one peer file.
#[derive(Debug, Default)]
struct FileState {
    /// The credential in force (the last good parse).
    good: Option<PeerCredential>,
    /// The last reported error, while the file is broken.
    error: Option<String>,
}

/// Per-file state keyed by file name; turns scans into events.
#[derive(Debug, Default)]
struct State {
    files: BTreeMap<String, FileState>,
}

impl State {
    /// Applies a successful directory scan; returns the events it implies, in order.
    fn apply(&mut self, scanned: Vec<ScannedFile>) -> Vec<PeerEvent> {
        let mut events = Vec::new();
        let mut seen = BTreeSet::new();
        for f in scanned {
            seen.insert(f.file_name.clone());
            let st = self.files.entry(f.file_name).or_default();
            match f.result {
                Ok(cred) => {
                    let changed = st.good.as_ref() != Some(&cred) || st.error.is_some();
                    st.error = None;
                    if changed {
                        st.good = Some(cred.clone());
                        events.push(PeerEvent::Upsert(cred));
                    }
                }
                Err(error) => {
                    let msg = error.to_string();
                    if st.error.as_deref() != Some(msg.as_str()) {
                        st.error = Some(msg);
                        events.push(PeerEvent::Error {
                            path: f.path,
                            error,
                        });
                    }
                }
            }
        }
        let gone: Vec<String> = self
            .files
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for name in gone {
            if let Some(FileState { good: Some(c), .. }) = self.files.remove(&name) {
                events.push(PeerEvent::Remove(c.name));
            }
        }
        events
    }

    /// The directory is gone: every peer is removed.
    fn clear(&mut self) -> Vec<PeerEvent> {
        std::mem::take(&mut self.files)
            .into_values()
            .filter_map(|st| st.good.map(|c| PeerEvent::Remove(c.name)))
            .collect()
    }
}

struct Task {
    cfg: PeerDirWatcher,
    tx: mpsc::Sender<PeerEvent>,
    shutdown: CancellationToken,
    /// Given to notify: "something changed" (capacity 1, so bursts coalesce).
    signal_tx: mpsc::Sender<()>,
    watch: Option<DirWatch>,
    state: State,
    /// Last reported directory-level error, so that it is reported once.
    dir_error: Option<String>,
    /// Last reported watch setup error.
    watch_error: Option<String>,
}

impl Task {
    async fn run(mut self, mut signal_rx: mpsc::Receiver<()>) {
        if !self.refresh().await || !self.emit(PeerEvent::Synced).await {
            return;
        }
        loop {
            let poll = if self.watch.is_some() {
                self.cfg.rescan_interval
            } else {
                self.cfg.rescan_interval.min(MISSING_DIR_POLL)
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = self.tx.closed() => return,
                _ = signal_rx.recv() => {
                    if !self.debounce(&mut signal_rx).await {
                        return;
                    }
                }
                _ = tokio::time::sleep(poll) => {}
            }
            if !self.refresh().await {
                return;
            }
        }
    }

    /// Waits until no change arrived for one debounce period (bounded); false on shutdown.
    async fn debounce(&self, signal_rx: &mut mpsc::Receiver<()>) -> bool {
        let deadline = tokio::time::Instant::now() + self.cfg.debounce * MAX_DEBOUNCE_PERIODS;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return false,
                _ = tokio::time::sleep(self.cfg.debounce) => return true,
                _ = tokio::time::sleep_until(deadline) => return true,
                _ = signal_rx.recv() => {}
            }
        }
    }

    /// Re-arms the watch if needed, rescans and emits what changed; false if the consumer is
    /// gone or shutdown was requested.
    async fn refresh(&mut self) -> bool {
        let dir = self.cfg.dir.clone();
        let watch = self.watch.take();
        let signal = self.signal_tx.clone();
        let joined =
            tokio::task::spawn_blocking(move || refresh_blocking(&dir, watch, signal)).await;
        let Ok((watch, watch_error, scan)) = joined else {
            // The blocking task panicked or was cancelled; try again on the next tick.
            return true;
        };
        self.watch = watch;

        let mut events = Vec::new();
        match watch_error {
            Some(e) => {
                let msg = e.to_string();
                if self.watch_error.as_deref() != Some(msg.as_str()) {
                    self.watch_error = Some(msg);
                    events.push(PeerEvent::Error {
                        path: self.cfg.dir.clone(),
                        error: e,
                    });
                }
            }
            None if self.watch.is_some() => self.watch_error = None,
            None => {}
        }
        match scan {
            DirScan::Missing(e) => {
                if self.is_new_dir_error(&e) {
                    events.push(PeerEvent::Error {
                        path: self.cfg.dir.clone(),
                        error: e,
                    });
                }
                events.extend(self.state.clear());
            }
            DirScan::Unreadable(e) => {
                if self.is_new_dir_error(&e) {
                    events.push(PeerEvent::Error {
                        path: self.cfg.dir.clone(),
                        error: e,
                    });
                }
            }
            DirScan::Files(files) => {
                self.dir_error = None;
                events.extend(self.state.apply(files));
            }
        }
        for ev in events {
            if !self.emit(ev).await {
                return false;
            }
        }
        true
    }

    fn is_new_dir_error(&mut self, e: &PeerConfigError) -> bool {
        let msg = e.to_string();
        if self.dir_error.as_deref() == Some(msg.as_str()) {
            return false;
        }
        self.dir_error = Some(msg);
        true
    }

    async fn emit(&self, ev: PeerEvent) -> bool {
        match &ev {
            PeerEvent::Upsert(c) => tracing::debug!(peer = %c.name, "peer credential upserted"),
            PeerEvent::Remove(n) => tracing::debug!(peer = %n, "peer credential removed"),
            PeerEvent::Error { error, .. } => {
                tracing::debug!(error = %chain(error), "peer credential error")
            }
            PeerEvent::Synced => {
                tracing::debug!(dir = %self.cfg.dir.display(), "peers directory synced")
            }
        }
        tokio::select! {
            _ = self.shutdown.cancelled() => false,
            r = self.tx.send(ev) => r.is_ok(),
        }
    }
}

type Refreshed = (Option<DirWatch>, Option<PeerConfigError>, DirScan);

/// Arms (or re-arms, if the directory was replaced) the notify watch, then scans. The watch
/// goes first so that no change between scan and watch is missed.
fn refresh_blocking(dir: &Path, watch: Option<DirWatch>, signal: mpsc::Sender<()>) -> Refreshed {
    let mut watch_error = None;
    let watch = match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            let id = dir_id(&meta);
            match watch {
                Some(w) if w.id == id => Some(w),
                _ => match start_watch(dir, signal) {
                    Ok(w) => Some(DirWatch { _watcher: w, id }),
                    Err(e) => {
                        watch_error = Some(e);
                        None
                    }
                },
            }
        }
        _ => None,
    };
    (watch, watch_error, scan_dir(dir))
}

#[cfg(unix)]
fn dir_id(meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    Some((meta.dev(), meta.ino()))
}

#[cfg(not(unix))]
fn dir_id(_meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    None
}

fn start_watch(
    dir: &Path,
    signal: mpsc::Sender<()>,
) -> Result<RecommendedWatcher, PeerConfigError> {
    let werr = |e: notify::Error| PeerConfigError::Watch {
        path: dir.to_owned(),
        message: e.to_string(),
    };
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<Event>| {
        if res.as_ref().map_or(true, is_relevant) {
            // Full means a rescan is already pending; closed means the task is gone.
            let _ = signal.try_send(());
        }
    })
    .map_err(werr)?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .map_err(werr)?;
    Ok(watcher)
}

/// Everything but plain accesses (our own reads open files, which must not trigger rescans);
/// closing a file that was open for writing counts.
fn is_relevant(ev: &Event) -> bool {
    ev.need_rescan()
        || match ev.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
            EventKind::Access(_) => false,
            _ => true,
        }
}
