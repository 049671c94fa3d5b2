//! `ReloadingCertKey`: a certificate + key pair on disk, watched with notify and swapped in without restart.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::tls::load_certified_key;
use crate::{CertError, CertInfo, files};

/// Default quiet period after the last file event before a reload is attempted.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(250);

/// One loaded pair.
struct Loaded {
    cert_bytes: Vec<u8>,
    key_bytes: Vec<u8>,
    certified: Arc<CertifiedKey>,
    info: CertInfo,
    generation: u64,
}

/// A certificate chain + private key kept in two files, served to rustls and reloaded when the
/// files change.
///
/// * [`ReloadingCertKey::watch`] watches the files' parent directories (so atomic renames,
///   including Kubernetes' `..data` symlink swaps, are seen), waits for a quiet period
///   (debounce), then reloads. A new pair that fails to parse, or whose key does not match its
///   certificate (e.g. only one of the two files written so far), is logged with
///   `tracing::warn!` and the previous pair stays in use; the next file event retries.
/// * [`ReloadingCertKey::reload`] reloads explicitly and returns the error instead.
/// * Implements rustls' [`ResolvesServerCert`] and [`ResolvesClientCert`]: every new handshake
///   uses the current pair; established connections are not touched.
/// * [`ReloadingCertKey::generation`] starts at 1 and increases by one each time a different
///   pair is installed; [`ReloadingCertKey::current_info`] tells its serial, subject and expiry.
///
/// Dropping the last `Arc` stops the watcher and its thread.
pub struct ReloadingCertKey {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<Loaded>>,
    /// Serialises reloads (watcher thread vs explicit calls) so generations are never skipped.
    reload_lock: Mutex<()>,
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Kept alive for its side effect; dropping it ends the event stream and the reload thread.
    watcher: Mutex<Option<RecommendedWatcher>>,
}

impl fmt::Debug for ReloadingCertKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cur = self.loaded();
        f.debug_struct("ReloadingCertKey")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .field("generation", &cur.generation)
            .field("subject", &cur.info.subject)
            .field("serial_hex", &cur.info.serial_hex)
            .field("not_after", &cur.info.not_after)
            .field("reload_failures", &self.reload_failures())
            .field("watching", &self.is_watching())
            .finish_non_exhaustive()
    }
}

impl ReloadingCertKey {
    /// Load the pair now (failing if it is unusable) and start watching both files with the
    /// default debounce ([`DEFAULT_DEBOUNCE`]).
    pub fn watch(cert_path: PathBuf, key_path: PathBuf) -> Result<Arc<Self>, CertError> {
        Self::watch_with_debounce(cert_path, key_path, DEFAULT_DEBOUNCE)
    }

    /// [`ReloadingCertKey::watch`] with a custom debounce period.
    pub fn watch_with_debounce(
        cert_path: PathBuf,
        key_path: PathBuf,
        debounce: Duration,
    ) -> Result<Arc<Self>, CertError> {
        let this = Self::load(cert_path, key_path)?;

        let (tx, rx) = std::sync::mpsc::channel::<notify::Result<Event>>();
        let first_dir = parent_dir(&this.cert_path);
        let mut watcher = notify::recommended_watcher(tx).map_err(|source| CertError::Watch {
            path: first_dir.clone(),
            source,
        })?;
        let mut dirs = vec![first_dir];
        let key_dir = parent_dir(&this.key_path);
        if !dirs.contains(&key_dir) {
            dirs.push(key_dir);
        }
        for dir in &dirs {
            watcher
                .watch(dir, RecursiveMode::NonRecursive)
                .map_err(|source| CertError::Watch {
                    path: dir.clone(),
                    source,
                })?;
        }

        let names: Vec<OsString> = [&this.cert_path, &this.key_path]
            .iter()
            .filter_map(|p| p.file_name().map(OsString::from))
            .collect();
        let weak = Arc::downgrade(&this);
        std::thread::Builder::new()
            .name("mesh-certs-reload".to_owned())
            .spawn(move || watch_loop(&weak, &rx, &names, debounce))
            .map_err(|e| CertError::Watch {
                path: dirs[0].clone(),
                source: notify::Error::io(e),
            })?;
        *this.watcher.lock().unwrap_or_else(PoisonError::into_inner) = Some(watcher);
        tracing::debug!(cert = %this.cert_path.display(), key = %this.key_path.display(), "watching certificate files");
        // Catch a change that happened between the initial load and the watch being set up.
        if let Err(e) = this.reload() {
            tracing::warn!(
                cert = %this.cert_path.display(),
                error = %error_chain(&e),
                "certificate reload failed; keeping the previous certificate"
            );
        }
        Ok(this)
    }

    /// Load the pair now without watching; call [`ReloadingCertKey::reload`] to pick up changes.
    pub fn load(cert_path: PathBuf, key_path: PathBuf) -> Result<Arc<Self>, CertError> {
        let loaded = read_pair(&cert_path, &key_path, 1)?;
        warn_if_not_valid(&cert_path, &loaded.info);
        Ok(Arc::new(ReloadingCertKey {
            cert_path,
            key_path,
            current: RwLock::new(Arc::new(loaded)),
            reload_lock: Mutex::new(()),
            failures: AtomicU64::new(0),
            last_error: Mutex::new(None),
            watcher: Mutex::new(None),
        }))
    }

    /// Re-read both files. If they differ from the pair in use and are valid, install them
    /// (generation + 1); if they are unchanged, do nothing. On error the previous pair is kept,
    /// [`ReloadingCertKey::reload_failures`] is incremented and the error is returned.
    pub fn reload(&self) -> Result<(), CertError> {
        match self.reload_inner() {
            Ok(Some(info)) => {
                tracing::info!(
                    cert = %self.cert_path.display(),
                    subject = %info.subject,
                    serial = %info.serial_hex,
                    not_after = %info.not_after,
                    generation = self.generation(),
                    "reloaded certificate"
                );
                warn_if_not_valid(&self.cert_path, &info);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                *self
                    .last_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(error_chain(&e));
                Err(e)
            }
        }
    }

    /// Returns the new pair's info if a different pair was installed.
    fn reload_inner(&self) -> Result<Option<CertInfo>, CertError> {
        let _serial = self
            .reload_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let cert_bytes = files::read(&self.cert_path)?;
        let key_bytes = files::read(&self.key_path)?;
        let cur = self.loaded();
        if cur.cert_bytes == cert_bytes && cur.key_bytes == key_bytes {
            return Ok(None);
        }
        let next = load_bytes(
            cert_bytes,
            key_bytes,
            &self.cert_path,
            &self.key_path,
            cur.generation + 1,
        )?;
        let info = next.info.clone();
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(next);
        Ok(Some(info))
    }

    fn loaded(&self) -> Arc<Loaded> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The rustls key currently served.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.loaded().certified.clone()
    }

    /// What the current (leaf) certificate says: serial, subject, SANs, expiry, ...
    pub fn current_info(&self) -> CertInfo {
        self.loaded().info.clone()
    }

    /// 1 for the pair loaded at start, +1 for each different pair installed since.
    pub fn generation(&self) -> u64 {
        self.loaded().generation
    }

    /// How many reload attempts (watched or explicit) failed so far.
    pub fn reload_failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The error of the most recent failed reload, with its causes, if any failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether a file watcher is running (created by [`ReloadingCertKey::watch`]).
    pub fn is_watching(&self) -> bool {
        self.watcher
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// The certificate file.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The key file.
    pub fn key_path(&self) -> &Path {
        &self.key_path
    }
}

impl ResolvesServerCert for ReloadingCertKey {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for ReloadingCertKey {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn read_pair(cert_path: &Path, key_path: &Path, generation: u64) -> Result<Loaded, CertError> {
    let cert_bytes = files::read(cert_path)?;
    let key_bytes = files::read(key_path)?;
    load_bytes(cert_bytes, key_bytes, cert_path, key_path, generation)
}

fn load_bytes(
    cert_bytes: Vec<u8>,
    key_bytes: Vec<u8>,
    cert_path: &Path,
    key_path: &Path,
    generation: u64,
) -> Result<Loaded, CertError> {
    let (certified, info) = load_certified_key(
        &cert_bytes,
        &key_bytes,
        &cert_path.display().to_string(),
        &key_path.display().to_string(),
    )?;
    Ok(Loaded {
        cert_bytes,
        key_bytes,
        certified,
        info,
        generation,
    })
}

fn warn_if_not_valid(cert_path: &Path, info: &CertInfo) {
    if !info.is_valid_now() {
        tracing::warn!(
            cert = %cert_path.display(),
            not_before = %info.not_before,
            not_after = %info.not_after,
            "certificate in use is outside its validity period"
        );
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(cause) = cur {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        cur = cause.source();
    }
    s
}

/// Whether a directory event may concern our pair: a create/modify/remove (or close-after-write)
/// of a file with one of our names, or of a Kubernetes-style `..data` entry, or an overflow.
fn is_relevant(names: &[OsString], event: &notify::Result<Event>) -> bool {
    let Ok(event) = event else {
        return true;
    };
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
        EventKind::Access(_) => return false,
        _ => {}
    }
    if event.need_rescan() || event.paths.is_empty() {
        return true;
    }
    event.paths.iter().any(|p| {
        p.file_name().is_some_and(|n| {
            names.iter().any(|ours| ours == n) || n.to_string_lossy().starts_with("..")
        })
    })
}

/// Longest wait for a quiet period before reloading anyway, in multiples of the debounce.
const MAX_DEBOUNCE_FACTOR: u32 = 10;

fn watch_loop(
    weak: &Weak<ReloadingCertKey>,
    rx: &Receiver<notify::Result<Event>>,
    names: &[OsString],
    debounce: Duration,
) {
    loop {
        // Wait for a relevant event; a closed channel means the watcher (and its owner) is gone.
        loop {
            match rx.recv() {
                Ok(ev) if is_relevant(names, &ev) => break,
                Ok(_) => {}
                Err(_) => return,
            }
        }
        // Debounce: wait until no relevant event arrived for `debounce`, bounded overall.
        let hard_deadline = Instant::now() + debounce * MAX_DEBOUNCE_FACTOR;
        let mut deadline = Instant::now() + debounce;
        loop {
            let now = Instant::now();
            let until = deadline.min(hard_deadline);
            if now >= until {
                break;
            }
            match rx.recv_timeout(until - now) {
                Ok(ev) if is_relevant(names, &ev) => deadline = Instant::now() + debounce,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        let Some(this) = weak.upgrade() else {
            return;
        };
        if let Err(e) = this.reload() {
            tracing::warn!(
                cert = %this.cert_path.display(),
                key = %this.key_path.display(),
                error = %error_chain(&e),
                generation = this.generation(),
                "certificate reload failed; keeping the previous certificate"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use notify::event::{CreateKind, ModifyKind, RenameMode};

    use super::*;

    fn ev(kind: EventKind, path: &str) -> notify::Result<Event> {
        Ok(Event::new(kind).add_path(PathBuf::from(path)))
    }

    #[test]
    fn relevant_events() {
        let names = vec![OsString::from("tls.crt"), OsString::from("tls.key")];
        let rename = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        assert!(is_relevant(&names, &ev(rename, "/d/tls.crt")));
        assert!(is_relevant(&names, &ev(rename, "/d/tls.key")));
        // Kubernetes secret volumes swap the `..data` symlink
        assert!(is_relevant(&names, &ev(rename, "/d/..data")));
        assert!(is_relevant(
            &names,
            &ev(EventKind::Create(CreateKind::File), "/d/tls.crt")
        ));
        assert!(is_relevant(
            &names,
            &ev(
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                "/d/tls.key"
            )
        ));
        // our own reads, temp files and unrelated files do not trigger reloads
        assert!(!is_relevant(
            &names,
            &ev(
                EventKind::Access(AccessKind::Open(AccessMode::Any)),
                "/d/tls.crt"
            )
        ));
        assert!(!is_relevant(&names, &ev(rename, "/d/.tls.crt.tmp.1.2")));
        assert!(!is_relevant(&names, &ev(rename, "/d/other.crt")));
        // errors and rescans do
        assert!(is_relevant(&names, &Err(notify::Error::generic("boom"))));
        assert!(is_relevant(&names, &Ok(Event::new(EventKind::Any))));
    }
}
