//! What the directory currently contributes, per file and per object, and the diff a
//! rescan produces.
//!
//! Every file keeps the objects it contributes (its last clean parse, plus the good
//! documents of later broken versions). Every object has one owner file: the first file
//! that defined it (in path order at start); another file defining it gets an error and
//! takes over only when the owner drops it. A rescan first installs the new version of
//! every changed file, then resolves each object those files had or have, comparing the
//! value in force before with the one in force after: that yields the minimal
//! `Apply`/`Delete` set, with no spurious delete when an object moves between files.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};

use super::parse::{self, Located};
use crate::source::{ObjectRef, SourceError, SourceEvent};

/// Directories nested deeper than this are not read (guards against pathological trees).
const MAX_DEPTH: usize = 32;

/// One file's contribution.
#[derive(Debug)]
struct FileState {
    /// Hash of the content last read.
    hash: u64,
    /// Objects in force from this file (owned or shadowed by another file's definition).
    objects: BTreeMap<ObjectRef, Located>,
}

/// The state of a manifest directory.
#[derive(Debug)]
pub(super) struct DirState {
    root: PathBuf,
    /// How the root is named in locations: its last path component.
    display_root: PathBuf,
    /// By path relative to the root.
    files: BTreeMap<PathBuf, FileState>,
    /// The file whose definition of each object is in force.
    owners: BTreeMap<ObjectRef, PathBuf>,
    /// Last read error per file or subdirectory, reported once until it changes.
    read_errors: BTreeMap<PathBuf, String>,
}

/// The root directory itself could not be listed.
#[derive(Debug, thiserror::Error)]
#[error("cannot read manifest directory {dir}: {source}")]
pub(super) struct RootError {
    dir: String,
    #[source]
    source: io::Error,
}

impl RootError {
    /// As a source error.
    pub(super) fn to_source_error(&self) -> SourceError {
        SourceError {
            location: self.dir.clone(),
            message: format!("cannot read the manifest directory: {}", self.source),
        }
    }
}

/// What a directory listing found.
#[derive(Debug, Default)]
struct Listing {
    /// Manifest files, relative to the root, sorted.
    files: BTreeSet<PathBuf>,
    /// Subdirectories that could not be read: their known files are kept as they are.
    unreadable: Vec<(PathBuf, io::Error)>,
}

/// A new version of one file: its hash and parse, or `None` when it is gone.
type Update = Option<(u64, parse::Parsed)>;

impl DirState {
    /// Empty state for `root`.
    pub(super) fn new(root: PathBuf) -> Self {
        let display_root = root.file_name().map_or_else(|| root.clone(), PathBuf::from);
        Self {
            root,
            display_root,
            files: BTreeMap::new(),
            owners: BTreeMap::new(),
            read_errors: BTreeMap::new(),
        }
    }

    /// The directory.
    pub(super) fn root(&self) -> &Path {
        &self.root
    }

    /// How the root is named in locations.
    pub(super) fn display_root(&self) -> &Path {
        &self.display_root
    }

    /// Reads the directory and returns the events for what changed since the last scan:
    /// `Apply`s, then `Delete`s, then `Error`s. Only files whose content changed are parsed.
    pub(super) fn rescan(&mut self) -> Result<Vec<SourceEvent>, RootError> {
        let listing = self.list().map_err(|source| RootError {
            dir: self.root.display().to_string(),
            source,
        })?;
        let mut errors = Vec::new();
        for (dir, e) in &listing.unreadable {
            self.read_error(dir, format!("cannot read directory: {e}"), &mut errors);
        }
        let mut updates = Vec::new();
        for rel in &listing.files {
            if let Some(update) = self.read_file(rel, &mut errors) {
                updates.push((rel.clone(), update));
            }
        }
        let gone = self.files.keys().filter(|rel| {
            !listing.files.contains(*rel)
                && !listing
                    .unreadable
                    .iter()
                    .any(|(dir, _)| rel.starts_with(dir))
        });
        updates.extend(gone.map(|rel| (rel.clone(), None)));
        self.read_errors.retain(|p, _| {
            listing.files.contains(p) || listing.unreadable.iter().any(|(d, _)| d == p)
        });
        Ok(self.apply(updates, errors))
    }

    /// The new version of `rel`, or `None` when it did not change or cannot be read.
    fn read_file(&mut self, rel: &Path, errors: &mut Vec<SourceError>) -> Option<Update> {
        let bytes = match std::fs::read(self.root.join(rel)) {
            Ok(bytes) => bytes,
            // Removed since the listing.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.read_errors.remove(rel);
                return self.files.contains_key(rel).then_some(None);
            }
            Err(e) => {
                self.read_error(rel, format!("cannot read file: {e}"), errors);
                return None;
            }
        };
        let hash = content_hash(&bytes);
        let known = self.files.get(rel).map(|f| f.hash);
        if self.read_errors.remove(rel).is_none() && known == Some(hash) {
            return None;
        }
        let display = self.display_root.join(rel);
        let parsed = match String::from_utf8(bytes) {
            Ok(text) => parse::parse_text(&display, &text),
            Err(e) => parse::Parsed {
                objects: Vec::new(),
                errors: vec![SourceError {
                    location: display.display().to_string(),
                    message: format!("not UTF-8 text: {e}"),
                }],
            },
        };
        Some(Some((hash, parsed)))
    }

    /// Reports a read problem once (until it changes); the file's objects stay in force.
    fn read_error(&mut self, rel: &Path, message: String, errors: &mut Vec<SourceError>) {
        if self.read_errors.get(rel) == Some(&message) {
            return;
        }
        errors.push(SourceError {
            location: self.display_root.join(rel).display().to_string(),
            message: message.clone(),
        });
        self.read_errors.insert(rel.to_owned(), message);
    }

    /// Installs the new file versions, then resolves every object they had or have.
    fn apply(
        &mut self,
        updates: Vec<(PathBuf, Update)>,
        mut errors: Vec<SourceError>,
    ) -> Vec<SourceEvent> {
        // Old objects of changed files that are no longer in force from them.
        let mut displaced: BTreeMap<PathBuf, BTreeMap<ObjectRef, Located>> = BTreeMap::new();
        let mut affected = BTreeSet::new();
        let mut changed = Vec::new();
        for (rel, update) in updates {
            let mut old = self
                .files
                .remove(&rel)
                .map(|f| f.objects)
                .unwrap_or_default();
            affected.extend(old.keys().cloned());
            if let Some((hash, parsed)) = update {
                let objects = merge(parsed, &mut old, &mut errors);
                affected.extend(objects.keys().cloned());
                self.files.insert(rel.clone(), FileState { hash, objects });
                changed.push(rel.clone());
            }
            displaced.insert(rel, old);
        }
        let mut applies = Vec::new();
        let mut deletes = Vec::new();
        for r in affected {
            let owner = self.resolve(&r, &changed, &mut errors);
            let before = self.owners.get(&r).and_then(|o| {
                displaced
                    .get(o)
                    .and_then(|m| m.get(&r))
                    .or_else(|| self.located(o, &r))
            });
            let after = owner.as_ref().and_then(|o| self.located(o, &r));
            match (before, after) {
                (Some(_), None) => deletes.push(SourceEvent::Delete(r.clone())),
                (before, Some(now)) if before.map(|b| &b.object) != Some(&now.object) => {
                    applies.push(SourceEvent::Apply(now.object.clone()));
                }
                _ => {}
            }
            match owner {
                Some(owner) => self.owners.insert(r, owner),
                None => self.owners.remove(&r),
            };
        }
        deletes.reverse();
        applies
            .into_iter()
            .chain(deletes)
            .chain(errors.into_iter().map(SourceEvent::Error))
            .collect()
    }

    /// The file whose definition of `r` is in force now: the previous owner while it
    /// still has one, else the first file (in path order) that has one. A changed file
    /// defining `r` that is not the owner gets an error.
    fn resolve(
        &self,
        r: &ObjectRef,
        changed: &[PathBuf],
        errors: &mut Vec<SourceError>,
    ) -> Option<PathBuf> {
        let owner = match self.owners.get(r) {
            Some(owner) if self.located(owner, r).is_some() => Some(owner.clone()),
            _ => self
                .files
                .iter()
                .find(|(_, f)| f.objects.contains_key(r))
                .map(|(p, _)| p.clone()),
        };
        let first = owner.as_ref().and_then(|o| self.located(o, r));
        for rel in changed.iter().filter(|rel| Some(*rel) != owner.as_ref()) {
            if let (Some(dup), Some(first)) = (self.located(rel, r), first) {
                errors.push(SourceError {
                    location: dup.location.clone(),
                    message: format!(
                        "{r} is already defined at {}; this definition is ignored while that one exists",
                        first.location
                    ),
                });
            }
        }
        owner
    }

    fn located(&self, file: &Path, r: &ObjectRef) -> Option<&Located> {
        self.files.get(file)?.objects.get(r)
    }

    fn list(&self) -> io::Result<Listing> {
        let mut listing = Listing::default();
        let entries = std::fs::read_dir(&self.root)?;
        self.list_entries(entries, Path::new(""), 0, &mut listing);
        Ok(listing)
    }

    fn list_entries(&self, entries: std::fs::ReadDir, rel: &Path, depth: usize, out: &mut Listing) {
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => return out.unreadable.push((rel.to_owned(), e)),
            };
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if is_ignored_name(name) {
                continue;
            }
            let path = rel.join(name);
            // Symlinked files are followed; symlinked directories are not (no loops).
            let Ok(file_type) = entry.file_type() else {
                continue;
            };
            if file_type.is_dir() && depth < MAX_DEPTH {
                match std::fs::read_dir(entry.path()) {
                    Ok(sub) => self.list_entries(sub, &path, depth + 1, out),
                    Err(e) => out.unreadable.push((path, e)),
                }
            } else if is_manifest_name(name) && (file_type.is_file() || entry.path().is_file()) {
                out.files.insert(path);
            }
        }
    }
}

/// Hidden files and directories, editor swap and backup files.
pub(super) fn is_ignored_name(name: &str) -> bool {
    name.starts_with('.')
        || name.ends_with('~')
        || name.ends_with(".swp")
        || name.ends_with(".swx")
        || name.starts_with('#')
}

/// The objects a new version of a file contributes: all of its good documents, plus,
/// when it has errors, the objects of the previous version it does not redefine (taken
/// out of `old`, which keeps what they displace).
fn merge(
    parsed: parse::Parsed,
    old: &mut BTreeMap<ObjectRef, Located>,
    errors: &mut Vec<SourceError>,
) -> BTreeMap<ObjectRef, Located> {
    let clean = parsed.errors.is_empty();
    errors.extend(parsed.errors);
    let mut objects: BTreeMap<ObjectRef, Located> = parsed
        .objects
        .into_iter()
        .map(|l| (l.object.object_ref(), l))
        .collect();
    if !clean {
        // What the last good version exported stays until the file parses cleanly.
        for (r, l) in std::mem::take(old) {
            match objects.entry(r) {
                Entry::Occupied(redefined) => {
                    old.insert(redefined.key().clone(), l);
                }
                Entry::Vacant(kept) => {
                    kept.insert(l);
                }
            }
        }
    }
    objects
}

fn is_manifest_name(name: &str) -> bool {
    Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"))
}

fn content_hash(bytes: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}
