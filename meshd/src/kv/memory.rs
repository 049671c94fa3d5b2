//! In-memory `KvStore` with revisions, history, compaction, leases and fault injection (tests).

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{
    Compare, KeyValue, KvError, KvStore, LeaseId, ListPage, Op, Txn, TxnResult, WatchBatch,
    WatchEvent, WatchStream,
};
use crate::keys::prefix_end;

#[derive(Debug, Clone)]
struct Version {
    mod_revision: i64,
    create_revision: i64,
    /// `None` is a deletion.
    value: Option<Vec<u8>>,
    lease: LeaseId,
}

#[derive(Debug)]
struct Lease {
    ttl: Duration,
    deadline: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    revision: i64,
    compacted: i64,
    keys: BTreeMap<Vec<u8>, Vec<Version>>,
    log: Vec<(i64, WatchEvent)>,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
    /// Bumped to break every open watch (simulates a reconnect).
    generation: u64,
    /// The next this-many requests fail with a connection error.
    fail_requests: usize,
}

/// An in-memory store for unit tests: MVCC revisions, paged lists at a revision,
/// watches from a revision, compaction, leases (expiring on tokio time), and faults.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
    notify: Arc<watch::Sender<i64>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

fn live(versions: &[Version], at: i64) -> Option<&Version> {
    versions
        .iter()
        .rev()
        .find(|v| v.mod_revision <= at)
        .filter(|v| v.value.is_some())
}

fn kv(key: &[u8], v: &Version) -> KeyValue {
    KeyValue {
        key: key.to_vec(),
        value: v.value.clone().unwrap_or_default(),
        create_revision: v.create_revision,
        mod_revision: v.mod_revision,
        lease: v.lease,
    }
}

impl Inner {
    fn current(&self, key: &[u8]) -> Option<&Version> {
        self.keys.get(key).and_then(|vs| live(vs, self.revision))
    }

    fn put_at(&mut self, rev: i64, key: &[u8], value: Vec<u8>, lease: LeaseId) {
        let create_revision = self.current(key).map_or(rev, |v| v.create_revision);
        let v = Version {
            mod_revision: rev,
            create_revision,
            value: Some(value),
            lease,
        };
        self.log.push((rev, WatchEvent::Put(kv(key, &v))));
        self.keys.entry(key.to_vec()).or_default().push(v);
    }

    fn delete_at(&mut self, rev: i64, key: &[u8]) -> bool {
        if self.current(key).is_none() {
            return false;
        }
        self.log.push((
            rev,
            WatchEvent::Delete {
                key: key.to_vec(),
                mod_revision: rev,
            },
        ));
        if let Some(vs) = self.keys.get_mut(key) {
            vs.push(Version {
                mod_revision: rev,
                create_revision: 0,
                value: None,
                lease: 0,
            });
        }
        true
    }

    fn expire_leases(&mut self) {
        let now = Instant::now();
        let expired: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.revoke(id);
        }
    }

    fn revoke(&mut self, id: LeaseId) -> bool {
        if self.leases.remove(&id).is_none() {
            return false;
        }
        let keys: Vec<Vec<u8>> = self
            .keys
            .iter()
            .filter(|(_, vs)| live(vs, self.revision).is_some_and(|v| v.lease == id))
            .map(|(k, _)| k.clone())
            .collect();
        if !keys.is_empty() {
            let rev = self.revision + 1;
            for k in &keys {
                self.delete_at(rev, k);
            }
            self.revision = rev;
        }
        true
    }

    fn check(&mut self, op: &'static str, key: &str) -> Result<(), KvError> {
        self.expire_leases();
        if self.fail_requests > 0 {
            self.fail_requests -= 1;
            return Err(KvError::Request {
                op,
                key: key.to_owned(),
                source: "injected failure".into(),
            });
        }
        Ok(())
    }

    fn holds(&self, c: &Compare) -> bool {
        match c {
            Compare::Absent(k) => self.current(k.as_bytes()).is_none(),
            Compare::ModRevision(k, r) => self
                .current(k.as_bytes())
                .is_some_and(|v| v.mod_revision == *r),
            Compare::Value(k, val) => self
                .current(k.as_bytes())
                .is_some_and(|v| v.value.as_deref() == Some(val.as_slice())),
            Compare::PrefixAbsent(p) => {
                let end = prefix_end(p.as_bytes());
                !self
                    .keys
                    .range::<[u8], _>((Bound::Included(p.as_bytes()), Bound::Excluded(&end[..])))
                    .any(|(_, vs)| live(vs, self.revision).is_some())
            }
        }
    }
}

impl MemoryStore {
    /// An empty store at revision 1 (like a fresh etcd).
    pub fn new() -> Self {
        let inner = Inner {
            revision: 1,
            next_lease: 0x1000,
            ..Default::default()
        };
        Self {
            inner: Arc::new(Mutex::new(inner)),
            notify: Arc::new(watch::channel(1).0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock only happens in a failing test.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self, rev: i64) {
        self.notify.send_replace(rev);
    }

    /// Current revision.
    pub fn revision(&self) -> i64 {
        self.lock().revision
    }

    /// Discards history up to `revision`; watches and lists before it get `Compacted`.
    pub fn compact(&self, revision: i64) {
        let mut g = self.lock();
        let revision = revision.min(g.revision);
        g.compacted = g.compacted.max(revision);
        let c = g.compacted;
        g.log.retain(|(r, _)| *r > c);
        for vs in g.keys.values_mut() {
            // Keep the newest version at or below the compaction point.
            if let Some(pos) = vs.iter().rposition(|v| v.mod_revision <= c) {
                vs.drain(..pos);
            }
        }
        g.keys
            .retain(|_, vs| !(vs.len() == 1 && vs[0].value.is_none() && vs[0].mod_revision <= c));
        drop(g);
        self.bump(revision);
    }

    /// Breaks every open watch with a connection error (as when etcd restarts).
    pub fn break_watches(&self) {
        let mut g = self.lock();
        g.generation += 1;
        let rev = g.revision;
        drop(g);
        self.bump(rev);
    }

    /// Makes the next `n` requests fail with a request error.
    pub fn fail_next(&self, n: usize) {
        self.lock().fail_requests = n;
    }

    /// Number of live keys.
    pub fn len(&self) -> usize {
        let g = self.lock();
        g.keys
            .values()
            .filter(|vs| live(vs, g.revision).is_some())
            .count()
    }

    /// Whether the store has no live keys.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl KvStore for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, KvError> {
        let mut g = self.lock();
        g.check("get", key)?;
        Ok(g.current(key.as_bytes()).map(|v| kv(key.as_bytes(), v)))
    }

    async fn list_page(
        &self,
        prefix: &str,
        start: Option<&[u8]>,
        limit: usize,
        revision: i64,
    ) -> Result<ListPage, KvError> {
        let mut g = self.lock();
        g.check("list", prefix)?;
        let at = if revision == 0 { g.revision } else { revision };
        if at < g.compacted {
            return Err(KvError::Compacted {
                requested: at,
                compact_revision: g.compacted,
            });
        }
        let end = prefix_end(prefix.as_bytes());
        let from = start.unwrap_or(prefix.as_bytes()).to_vec();
        let mut kvs = Vec::new();
        let mut more = false;
        for (k, vs) in g
            .keys
            .range::<Vec<u8>, _>((Bound::Included(from), Bound::Excluded(end)))
        {
            if let Some(v) = live(vs, at) {
                if kvs.len() == limit.max(1) {
                    more = true;
                    break;
                }
                kvs.push(kv(k, v));
            }
        }
        Ok(ListPage {
            revision: at,
            kvs,
            more,
        })
    }

    async fn put(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<i64, KvError> {
        let rev = {
            let mut g = self.lock();
            g.check("put", key)?;
            if let Some(l) = lease
                && !g.leases.contains_key(&l)
            {
                return Err(KvError::LeaseNotFound(l));
            }
            let rev = g.revision + 1;
            g.put_at(rev, key.as_bytes(), value.to_vec(), lease.unwrap_or(0));
            g.revision = rev;
            rev
        };
        self.bump(rev);
        Ok(rev)
    }

    async fn delete(&self, key: &str) -> Result<bool, KvError> {
        let (existed, rev) = {
            let mut g = self.lock();
            g.check("delete", key)?;
            let rev = g.revision + 1;
            let existed = g.delete_at(rev, key.as_bytes());
            if existed {
                g.revision = rev;
            }
            (existed, g.revision)
        };
        self.bump(rev);
        Ok(existed)
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, KvError> {
        let (n, rev) = {
            let mut g = self.lock();
            g.check("delete", prefix)?;
            let end = prefix_end(prefix.as_bytes());
            let at = g.revision;
            let keys: Vec<Vec<u8>> = g
                .keys
                .range::<[u8], _>((
                    Bound::Included(prefix.as_bytes()),
                    Bound::Excluded(&end[..]),
                ))
                .filter(|(_, vs)| live(vs, at).is_some())
                .map(|(k, _)| k.clone())
                .collect();
            let rev = g.revision + 1;
            for k in &keys {
                g.delete_at(rev, k);
            }
            if !keys.is_empty() {
                g.revision = rev;
            }
            (keys.len() as u64, g.revision)
        };
        self.bump(rev);
        Ok(n)
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, KvError> {
        let (succeeded, rev) = {
            let mut g = self.lock();
            g.check("txn", "")?;
            let succeeded = txn.compares.iter().all(|c| g.holds(c));
            let ops = if succeeded {
                &txn.success
            } else {
                &txn.failure
            };
            for op in ops {
                if let Op::Put { lease: Some(l), .. } = op
                    && !g.leases.contains_key(l)
                {
                    return Err(KvError::LeaseNotFound(*l));
                }
            }
            let rev = g.revision + 1;
            let mut changed = false;
            for op in ops {
                match op {
                    Op::Put { key, value, lease } => {
                        g.put_at(rev, key.as_bytes(), value.clone(), lease.unwrap_or(0));
                        changed = true;
                    }
                    Op::Delete(key) => changed |= g.delete_at(rev, key.as_bytes()),
                }
            }
            if changed {
                g.revision = rev;
            }
            (succeeded, g.revision)
        };
        self.bump(rev);
        Ok(TxnResult {
            succeeded,
            revision: rev,
        })
    }

    async fn watch(&self, prefix: &str, start_revision: i64) -> Result<WatchStream, KvError> {
        let generation = {
            let mut g = self.lock();
            g.check("watch", prefix)?;
            g.generation
        };
        let state = WatchState {
            store: self.clone(),
            prefix: prefix.as_bytes().to_vec(),
            next: start_revision,
            generation,
            rx: self.notify.subscribe(),
            done: false,
        };
        Ok(Box::pin(futures::stream::unfold(
            state,
            |mut s| async move {
                let item = s.next_batch().await?;
                Some((item, s))
            },
        )))
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, KvError> {
        let mut g = self.lock();
        g.check("lease-grant", "")?;
        g.next_lease += 1;
        let id = g.next_lease;
        g.leases.insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + ttl,
            },
        );
        Ok(id)
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<Duration, KvError> {
        let mut g = self.lock();
        g.check("lease-keepalive", "")?;
        let l = g
            .leases
            .get_mut(&lease)
            .ok_or(KvError::LeaseNotFound(lease))?;
        l.deadline = Instant::now() + l.ttl;
        Ok(l.ttl)
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), KvError> {
        let rev = {
            let mut g = self.lock();
            g.check("lease-revoke", "")?;
            if !g.revoke(lease) {
                return Err(KvError::LeaseNotFound(lease));
            }
            g.revision
        };
        self.bump(rev);
        Ok(())
    }
}

struct WatchState {
    store: MemoryStore,
    prefix: Vec<u8>,
    next: i64,
    generation: u64,
    rx: watch::Receiver<i64>,
    done: bool,
}

impl WatchState {
    async fn next_batch(&mut self) -> Option<Result<WatchBatch, KvError>> {
        if self.done {
            return None;
        }
        loop {
            {
                let mut g = self.store.lock();
                g.expire_leases();
                if g.generation != self.generation {
                    self.done = true;
                    return Some(Err(KvError::Connect {
                        endpoint: "memory".into(),
                        source: "watch stream broken".into(),
                    }));
                }
                if self.next <= g.compacted {
                    self.done = true;
                    return Some(Err(KvError::Compacted {
                        requested: self.next,
                        compact_revision: g.compacted,
                    }));
                }
                if self.next <= g.revision {
                    let from = g.log.partition_point(|(r, _)| *r < self.next);
                    let events: Vec<WatchEvent> = g.log[from..]
                        .iter()
                        .filter(|(_, e)| {
                            let k = match e {
                                WatchEvent::Put(kv) => &kv.key,
                                WatchEvent::Delete { key, .. } => key,
                            };
                            k.starts_with(&self.prefix)
                        })
                        .map(|(_, e)| e.clone())
                        .collect();
                    self.next = g.revision + 1;
                    if !events.is_empty() {
                        return Some(Ok(WatchBatch {
                            revision: g.revision,
                            events,
                        }));
                    }
                }
            }
            if self.rx.changed().await.is_err() {
                return None;
            }
        }
    }
}
