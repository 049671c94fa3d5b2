//! The peers directory on disk: writing and removing `<peer>.kubeconfig` files, and scanning them.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::error::PeerConfigError;
use super::{FILE_SUFFIX, PeerCredential};
use crate::model::ClusterName;

/// Largest peer kubeconfig the scanner reads.
const MAX_FILE: u64 = 1 << 20;

/// Writes `cred` as `<dir>/<peer>.kubeconfig` in canonical form (user entry named `user`),
/// atomically: a hidden temp file in `dir`, created with mode 0600 (it holds a private key),
/// written, fsynced and renamed over the target. Creates `dir` if missing. Returns the path.
pub fn write_peer_file(dir: &Path, cred: &PeerCredential, user: &str) -> io::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    if user.trim().is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "peer kubeconfig user name is empty",
        ));
    }
    fs::create_dir_all(dir)?;
    let name = PeerCredential::file_name(&cred.name);
    let path = dir.join(&name);
    let tmp = dir.join(format!(
        ".{name}.tmp.{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let yaml = cred.to_kubeconfig_yaml(user);
    let result = (|| {
        let mut file = create_secret(&tmp)?;
        file.write_all(yaml.as_bytes())?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, &path)?;
        // Make the rename durable; best effort (not every filesystem lets a directory be opened).
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| path)
}

fn create_secret(path: &Path) -> io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)
}

/// Removes `<dir>/<peer>.kubeconfig`. Returns whether there was one.
pub fn remove_peer_file(dir: &Path, peer: &ClusterName) -> io::Result<bool> {
    match fs::remove_file(dir.join(PeerCredential::file_name(peer))) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether a directory entry is a peer credential: `<something>.kubeconfig`, not hidden.
/// Everything else (temp files, editor backups, `..data` symlinks of mounted Secrets) is ignored.
pub(crate) fn is_peer_file_name(name: &str) -> bool {
    !name.starts_with('.') && name.len() > FILE_SUFFIX.len() && name.ends_with(FILE_SUFFIX)
}

/// One peer file as read by [`scan_dir`].
#[derive(Debug)]
pub(crate) struct ScannedFile {
    /// File name inside the directory (the key of the watcher's state).
    pub(crate) file_name: String,
    /// `dir/file_name`, as named in errors.
    pub(crate) path: PathBuf,
    /// The parsed credential or why it is unusable.
    pub(crate) result: Result<PeerCredential, PeerConfigError>,
}

/// Outcome of reading the peers directory.
#[derive(Debug)]
pub(crate) enum DirScan {
    /// The directory does not exist.
    Missing(PeerConfigError),
    /// The directory exists but cannot be listed.
    Unreadable(PeerConfigError),
    /// Every peer file, sorted by name.
    Files(Vec<ScannedFile>),
}

/// Lists and parses every peer file of `dir` (non-recursive). Files that vanish while being
/// read count as absent; symlinks are followed; directories and other non-files are ignored.
pub(crate) fn scan_dir(dir: &Path) -> DirScan {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return DirScan::Missing(PeerConfigError::io(dir, "read directory", e));
        }
        Err(e) => return DirScan::Unreadable(PeerConfigError::io(dir, "read directory", e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => return DirScan::Unreadable(PeerConfigError::io(dir, "read directory", e)),
        };
        let Some(file_name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !is_peer_file_name(&file_name) {
            continue;
        }
        let path = dir.join(&file_name);
        let result = match read_file(&path) {
            Ok(Some(text)) => PeerCredential::from_kubeconfig(&path, &text),
            Ok(None) => continue,
            Err(e) => Err(e),
        };
        files.push(ScannedFile {
            file_name,
            path,
            result,
        });
    }
    files.sort_by(|a, b| a.file_name.cmp(&b.file_name));
    DirScan::Files(files)
}

/// The file's text; `None` if it is gone or not a regular file.
fn read_file(path: &Path) -> Result<Option<String>, PeerConfigError> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(PeerConfigError::io(path, "read", e)),
    };
    if !meta.is_file() {
        return Ok(None);
    }
    if meta.len() > MAX_FILE {
        return Err(PeerConfigError::io(
            path,
            "read",
            io::Error::new(io::ErrorKind::InvalidData, "larger than 1 MiB"),
        ));
    }
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(PeerConfigError::io(path, "read", e)),
    }
}
