//! `PeerConfigError`: why a peer kubeconfig (or the peers directory) is unusable, naming the file and the field.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A peer credential that cannot be used. Every variant names the file; [`Self::Field`] also
/// names the offending field in kubeconfig notation (`users[0].user.client-key-data`).
///
/// Messages never contain key material. Retrying without changing the file does not help.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PeerConfigError {
    /// The file (or the peers directory) could not be read.
    #[error("{}: {action}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was attempted, e.g. `read` or `read directory`.
        action: &'static str,
        /// The I/O error (shared so that events can be cloned).
        #[source]
        source: Arc<io::Error>,
    },
    /// The text is not a YAML kubeconfig at all.
    #[error("{}: not a valid kubeconfig: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The YAML error, without a snippet of the input.
        message: String,
    },
    /// One field is missing, superfluous or invalid.
    #[error("{}: {field}: {reason}", path.display())]
    Field {
        /// The file.
        path: PathBuf,
        /// The field, e.g. `clusters[0].cluster.server`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The directory watch could not be set up (the periodic rescan still runs).
    #[error("{}: watch directory: {message}", path.display())]
    Watch {
        /// The directory.
        path: PathBuf,
        /// The notify error.
        message: String,
    },
}

impl PeerConfigError {
    /// The file (or directory) the error is about.
    pub fn path(&self) -> &Path {
        match self {
            Self::Io { path, .. }
            | Self::Parse { path, .. }
            | Self::Field { path, .. }
            | Self::Watch { path, .. } => path,
        }
    }

    /// The field the error is about, for [`Self::Field`].
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Field { field, .. } => Some(field),
            _ => None,
        }
    }

    pub(crate) fn io(path: &Path, action: &'static str, source: io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            action,
            source: Arc::new(source),
        }
    }

    pub(crate) fn invalid(
        path: &Path,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self::Field {
            path: path.to_owned(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// An error and its sources as one line (`a: b: c`).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let msg = src.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = src.source();
    }
    s
}
