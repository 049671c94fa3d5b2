//! Manifest-directory source (standalone mode): a directory of Kubernetes YAML manifests
//! stands in for a cluster's API server.
//!
//! Data flow: every `*.yaml`/`*.yml` file under the directory (recursively; hidden and
//! editor temp files ignored) is split into YAML documents; each document is parsed into a
//! JSON value, dispatched on `apiVersion`/`kind` (a `v1 List` contributes its `items`),
//! decoded into the typed object ([`Object`]) and validated (names, IPs, ports, meshd
//! annotations, policy spec), with errors naming `file document N (Kind ns/name)` and the
//! field. Documents are numbered from 1, as YAML counts them.
//!
//! [`ManifestSource::run`] spawns a task that loads every file (`Apply` per object,
//! `Error` per problem, then `Synced`), then watches the directory with `notify`,
//! debounces bursts, rescans and parses only files whose content changed. Per file it
//! keeps what the file contributes: a file that parses cleanly replaces its objects
//! (`Apply` for new or changed ones, `Delete` for gone ones); a file with any error only
//! adds or updates its good documents (no `Delete` until it parses cleanly again); a
//! removed file deletes its objects. Each object has one owner file (the first to define
//! it); a second definition is reported and takes over only when the owner drops it, so
//! moving an object between files never deletes it. Events go through a bounded channel;
//! the stream ends when the shutdown token is cancelled.

mod jsonpath;
mod parse;
mod state;
#[cfg(test)]
mod tests;
mod validate;
mod watch;

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::BoxStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Object, Source, SourceError, SourceEvent};

/// Default quiet time after a change before the directory is rescanned.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(150);

/// Longest accepted debounce (longer settings are clamped).
pub const MAX_DEBOUNCE: Duration = Duration::from_secs(60);

/// Events buffered between the background task and the stream's consumer.
const EVENT_BUFFER: usize = 1024;

/// A directory of Kubernetes manifests as the source of a cluster's state.
#[derive(Debug, Clone)]
pub struct ManifestSource {
    dir: PathBuf,
    debounce: Duration,
}

impl ManifestSource {
    /// A source reading `dir` (and its subdirectories).
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            debounce: DEFAULT_DEBOUNCE,
        }
    }

    /// Sets how long the directory must be quiet after a change before it is rescanned
    /// (default [`DEFAULT_DEBOUNCE`], at most [`MAX_DEBOUNCE`]; a burst of changes delays
    /// a rescan by at most ten times this).
    #[must_use]
    pub fn with_debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce.min(MAX_DEBOUNCE);
        self
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads and parses the whole directory once, as the first load of [`Source::run`]
    /// would: the number of objects, or every error (a missing or unreadable directory is
    /// one error).
    pub fn check(&self) -> Result<usize, Vec<SourceError>> {
        let mut state = state::DirState::new(self.dir.clone());
        let events = state.rescan().map_err(|e| vec![e.to_source_error()])?;
        let mut objects = 0;
        let mut errors = Vec::new();
        for event in events {
            match event {
                SourceEvent::Apply(_) => objects += 1,
                SourceEvent::Error(e) => errors.push(e),
                SourceEvent::Delete(_) | SourceEvent::Synced => {}
            }
        }
        if errors.is_empty() {
            Ok(objects)
        } else {
            Err(errors)
        }
    }
}

impl Source for ManifestSource {
    fn run(self: Box<Self>, shutdown: CancellationToken) -> BoxStream<'static, SourceEvent> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            let error = SourceError {
                location: self.dir.display().to_string(),
                message: "the manifest source must be started inside a tokio runtime".to_owned(),
            };
            return futures::stream::iter([SourceEvent::Error(error)]).boxed();
        };
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let state = state::DirState::new(self.dir);
        runtime.spawn(watch::run(state, self.debounce, tx, shutdown.clone()));
        futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|event| (event, rx))
        })
        .take_until(shutdown.cancelled_owned())
        .boxed()
    }
}

/// Parses one manifest file: every YAML document of `text`, in order. `path` only names
/// the file in error locations (`<path> document N (Kind ns/name)`, N counted from 1).
///
/// A bad document yields one or more [`SourceError`]s and no object; the other documents
/// still parse. An object defined twice in the file is reported at its second definition
/// (the first wins). Namespaced objects without a namespace get `default`.
pub fn parse_file(path: &Path, text: &str) -> (Vec<Object>, Vec<SourceError>) {
    let parsed = parse::parse_text(path, text);
    let objects = parsed.objects.into_iter().map(|l| l.object).collect();
    (objects, parsed.errors)
}

/// Decodes one object (JSON with `apiVersion` and `kind`) the way a manifest document is
/// decoded and validated; errors are messages naming the field.
pub(crate) fn decode_object(value: &serde_json::Value) -> Result<Object, Vec<String>> {
    parse::decode_value(value)
}
