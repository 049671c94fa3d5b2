//! Read-only snapshots of the merged indexes and the copy-on-write publisher behind them.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use meshd::model::ClusterName;
use tokio::sync::watch;

/// A value together with the cluster it was accepted from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterEntry<T> {
    /// The cluster that exported the value (the winner, where clusters compete).
    pub cluster: ClusterName,
    /// The value as the cluster exported it.
    pub value: T,
}

/// One published, immutable state of an index.
///
/// Values are `Arc`s shared with the index and with older and newer snapshots, so a
/// snapshot costs one pointer per entry, never a deep copy.
#[derive(Debug)]
pub struct Snapshot<K, V> {
    /// Incremented each time the index publishes this kind (0: nothing published yet).
    pub generation: u64,
    /// The entries, in key order.
    pub entries: BTreeMap<K, Arc<V>>,
}

impl<K, V> Default for Snapshot<K, V> {
    fn default() -> Self {
        Self {
            generation: 0,
            entries: BTreeMap::new(),
        }
    }
}

impl<K: Clone, V> Clone for Snapshot<K, V> {
    fn clone(&self) -> Self {
        Self {
            generation: self.generation,
            entries: self.entries.clone(),
        }
    }
}

impl<K: Ord, V> Snapshot<K, V> {
    /// The entry under `key`.
    pub fn get(&self, key: &K) -> Option<&Arc<V>> {
        self.entries.get(key)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The index-side end of one snapshot kind: the current (unpublished) state, the watch
/// sender, and whether anything changed since the last publish.
///
/// Changes go through [`Arc::make_mut`]: the first change after a publish copies the map
/// of `Arc`s once (the watch channel still holds the published one); later changes in the
/// same batch are in place.
pub(super) struct Publisher<K, V> {
    current: Arc<Snapshot<K, V>>,
    tx: watch::Sender<Arc<Snapshot<K, V>>>,
    dirty: bool,
}

impl<K, V> fmt::Debug for Publisher<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("generation", &self.current.generation)
            .field("entries", &self.current.entries.len())
            .field("dirty", &self.dirty)
            .field("subscribers", &self.tx.receiver_count())
            .finish()
    }
}

impl<K: Ord + Clone, V> Publisher<K, V> {
    pub(super) fn new() -> Self {
        let current = Arc::new(Snapshot::default());
        let (tx, _) = watch::channel(Arc::clone(&current));
        Self {
            current,
            tx,
            dirty: false,
        }
    }

    /// The current state, including unpublished changes.
    pub(super) fn current(&self) -> &Snapshot<K, V> {
        &self.current
    }

    pub(super) fn get(&self, key: &K) -> Option<&Arc<V>> {
        self.current.entries.get(key)
    }

    pub(super) fn insert(&mut self, key: K, value: Arc<V>) {
        Arc::make_mut(&mut self.current).entries.insert(key, value);
        self.dirty = true;
    }

    pub(super) fn remove(&mut self, key: &K) {
        if self.current.entries.contains_key(key) {
            Arc::make_mut(&mut self.current).entries.remove(key);
            self.dirty = true;
        }
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<Arc<Snapshot<K, V>>> {
        self.tx.subscribe()
    }

    pub(super) fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Sends the current state if it changed since the last publish.
    pub(super) fn publish(&mut self) -> bool {
        if !self.dirty {
            return false;
        }
        Arc::make_mut(&mut self.current).generation += 1;
        self.tx.send_replace(Arc::clone(&self.current));
        self.dirty = false;
        true
    }
}
