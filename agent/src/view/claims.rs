//! Keys that several clusters can claim (identities, endpoint IPs): local first, else first come.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::hash::Hash;
use std::sync::Arc;

use meshd::model::ClusterName;
use tokio::sync::watch;

use super::snapshot::{ClusterEntry, Publisher, Snapshot};

/// All claimants of every key, and the published winners.
///
/// Per key, claimants are kept in order: the local cluster's claim (if any) first, then
/// remote claims in the order they were accepted. The first claimant wins and is the
/// one published; when it goes away the next one takes over.
pub(super) struct ClaimIndex<K, T> {
    claims: HashMap<K, Vec<Arc<ClusterEntry<T>>>>,
    /// Keys with more than one claimant.
    contested: BTreeSet<K>,
    /// How many times a claim landed on a key another cluster already claimed.
    contests_total: u64,
    out: Publisher<K, ClusterEntry<T>>,
}

impl<K, T> fmt::Debug for ClaimIndex<K, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClaimIndex")
            .field("keys", &self.claims.len())
            .field("contested", &self.contested.len())
            .field("contests_total", &self.contests_total)
            .field("out", &self.out)
            .finish()
    }
}

/// A new contest: `loser` claimed a key `winner` holds.
#[derive(Debug)]
pub(super) struct Contest<'a> {
    pub(super) winner: &'a ClusterName,
    pub(super) loser: &'a ClusterName,
}

impl<K: Copy + Ord + Hash, T> ClaimIndex<K, T> {
    pub(super) fn new() -> Self {
        Self {
            claims: HashMap::new(),
            contested: BTreeSet::new(),
            contests_total: 0,
            out: Publisher::new(),
        }
    }

    /// Adds or replaces `value.cluster`'s claim on `key`. Returns the contest this
    /// creates, if the key was already claimed by another cluster.
    pub(super) fn upsert(
        &mut self,
        key: K,
        value: Arc<ClusterEntry<T>>,
        is_local: bool,
    ) -> Option<Contest<'_>> {
        let list = self.claims.entry(key).or_default();
        if let Some(pos) = list.iter().position(|c| c.cluster == value.cluster) {
            if pos == 0 {
                self.out.insert(key, Arc::clone(&value));
            }
            list[pos] = value;
            return None;
        }
        let pos = if is_local {
            list.insert(0, value);
            0
        } else {
            list.push(value);
            list.len() - 1
        };
        if pos == 0 {
            self.out.insert(key, Arc::clone(&list[0]));
        }
        if list.len() < 2 {
            return None;
        }
        self.contested.insert(key);
        self.contests_total += 1;
        // The new claim either displaced the winner (local) or queued behind it.
        let (winner, loser) = if pos == 0 {
            (&list[0].cluster, &list[1].cluster)
        } else {
            (&list[0].cluster, &list[pos].cluster)
        };
        Some(Contest { winner, loser })
    }

    /// Withdraws `cluster`'s claim on `key`; the next claimant takes over if it won.
    pub(super) fn remove(&mut self, key: K, cluster: &ClusterName) {
        let Some(list) = self.claims.get_mut(&key) else {
            return;
        };
        let Some(pos) = list.iter().position(|c| c.cluster == *cluster) else {
            return;
        };
        list.remove(pos);
        if list.len() < 2 {
            self.contested.remove(&key);
        }
        match list.first() {
            None => {
                self.claims.remove(&key);
                self.out.remove(&key);
            }
            Some(next) if pos == 0 => self.out.insert(key, Arc::clone(next)),
            Some(_) => {}
        }
    }

    /// Every (key, winner, loser) triple, in key order.
    pub(super) fn contests(&self) -> impl Iterator<Item = (K, &ClusterName, &ClusterName)> + '_ {
        self.contested.iter().flat_map(move |k| {
            let list = self.claims.get(k).map(Vec::as_slice).unwrap_or_default();
            let winner = list.first().map(|w| &w.cluster);
            list.iter()
                .skip(1)
                .filter_map(move |l| winner.map(|w| (*k, w, &l.cluster)))
        })
    }

    pub(super) fn contests_total(&self) -> u64 {
        self.contests_total
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<Arc<Snapshot<K, ClusterEntry<T>>>> {
        self.out.subscribe()
    }

    pub(super) fn is_dirty(&self) -> bool {
        self.out.is_dirty()
    }

    pub(super) fn publisher(&mut self) -> &mut Publisher<K, ClusterEntry<T>> {
        &mut self.out
    }

    pub(super) fn current(&self) -> &Snapshot<K, ClusterEntry<T>> {
        self.out.current()
    }
}
