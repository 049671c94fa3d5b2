//! Atomic file writes (temp file in the same directory, fsync, rename) and file reads with context.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::CertError;

/// Permission bits for certificates (public) and private keys (owner only).
const CERT_MODE: u32 = 0o644;
const KEY_MODE: u32 = 0o600;

/// Whether a file holds secret material (written with mode 0600) or public material (0644).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A certificate or other public data: mode 0644.
    Public,
    /// A private key: mode 0600, from the moment the temp file is created.
    Secret,
}

/// Write `contents` to `path` atomically: a uniquely named temp file in the same directory is
/// created (with the final permissions already set), written, fsynced and renamed over `path`.
/// Readers (and [`crate::ReloadingCertKey`]) see either the old or the new content, never a mix.
/// The parent directory is created if missing.
pub fn write_file_atomic(path: &Path, contents: &[u8], kind: FileKind) -> Result<(), CertError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let err = |source| CertError::WriteFile {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| {
        err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "path has no file name",
        ))
    })?;
    fs::create_dir_all(&dir).map_err(err)?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}.{}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = open_new(&tmp, kind)?;
        file.write_all(contents)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        // Make the rename durable; not all filesystems allow opening a directory, so best effort.
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err)
}

fn open_new(path: &Path, kind: FileKind) -> std::io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(match kind {
            FileKind::Public => CERT_MODE,
            FileKind::Secret => KEY_MODE,
        });
    }
    #[cfg(not(unix))]
    let _ = (kind, CERT_MODE, KEY_MODE);
    opts.open(path)
}

/// Write a certificate PEM and its key PEM as `<dir>/<stem>.crt` and `<dir>/<stem>.key`.
/// The key is written first, so a watcher that sees the new certificate also finds its key.
pub(crate) fn write_pair(
    dir: &Path,
    stem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<(PathBuf, PathBuf), CertError> {
    let cert_path = dir.join(format!("{stem}.crt"));
    let key_path = dir.join(format!("{stem}.key"));
    write_file_atomic(&key_path, key_pem.as_bytes(), FileKind::Secret)?;
    write_file_atomic(&cert_path, cert_pem.as_bytes(), FileKind::Public)?;
    Ok((cert_path, key_path))
}

/// Read a whole file, naming it in the error.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    fs::read(path).map_err(|source| CertError::ReadFile {
        path: path.to_owned(),
        source,
    })
}

/// Read a whole UTF-8 text file, naming it in the error.
pub(crate) fn read_string(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| CertError::ReadFile {
        path: path.to_owned(),
        source,
    })
}
