//! Cluster-scoped identity allocation with etcd transactions, shared by apiserver replicas.
//!
//! Three keys per identity (see `meshd::keys`):
//! - `mesh/state/identities/v1/<cluster>/<id>` → `{id, labels}`: the exported identity;
//! - `mesh/identity-index/v1/<cluster>/<labels>` → `{id}`: at most one ID per label set;
//! - `mesh/identity-refs/v1/<cluster>/<id>/<replica>`: a replica uses the identity
//!   (attached to that replica's lease, so a dead replica's references vanish).
//!
//! A new identity is created by one transaction that requires both the index key and
//! the identity key to be absent, so two allocators can never give one label set two IDs
//! or one ID two label sets. Using an existing identity puts a reference under the
//! condition that the identity key is unchanged; garbage collection deletes an identity
//! only if no reference exists (a prefix compare) and it is unchanged, after it has been
//! seen unreferenced for a grace period. The two conditions serialize use and release.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use meshd::keys::{self, IDENTITY_INDEX_PREFIX, IDENTITY_REFS_PREFIX, Key, StateKey};
use meshd::kv::{Compare, KvError, KvStore, LeaseId, Op, Txn};
use meshd::model::{ClusterId, ClusterName, Identity, IdentityEntry, Labels, MaxConnectedClusters};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Allocator settings.
#[derive(Debug, Clone)]
pub struct AllocatorConfig {
    /// The cluster.
    pub cluster: ClusterName,
    /// Its ID.
    pub cluster_id: ClusterId,
    /// The mesh mode (identity layout).
    pub mode: MaxConnectedClusters,
    /// This replica's name (RFC 1123 subdomain), used in reference keys.
    pub owner: String,
    /// How long an identity must stay unreferenced before it is deleted (default 5 min).
    pub gc_grace: Duration,
}

/// Why an allocation failed.
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    /// The store failed; retrying later helps.
    #[error("identity allocation for cluster {cluster}: {step}: {source}")]
    Store {
        /// Cluster.
        cluster: String,
        /// Which step.
        step: &'static str,
        /// Cause.
        #[source]
        source: KvError,
    },
    /// Every local identity number is taken.
    #[error("identity allocation for cluster {0}: no free identity left")]
    Exhausted(String),
    /// Contention did not settle within the attempt budget; retrying later helps.
    #[error("identity allocation for {labels}: still conflicting after {attempts} attempts")]
    Contended {
        /// The label set.
        labels: String,
        /// Attempts made.
        attempts: u32,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct IndexValue {
    id: Identity,
}

#[derive(Debug)]
struct Used {
    id: Identity,
    refs: usize,
}

/// An identity as last seen in etcd.
#[derive(Debug, Clone, Copy)]
struct Known {
    id: Identity,
    index_rev: i64,
    master_rev: i64,
}

/// Allocates and releases identities for one replica (single owner: `&mut self`).
///
/// It caches what etcd holds (label set → identity with revisions, taken numbers) so a
/// reference costs one transaction; a failed transaction re-reads just the keys involved.
#[derive(Debug)]
pub struct IdentityAllocator {
    store: std::sync::Arc<dyn KvStore>,
    cfg: AllocatorConfig,
    lease: LeaseId,
    used: HashMap<Labels, Used>,
    known: HashMap<Labels, Known>,
    /// Local numbers known to be taken in etcd.
    taken: BTreeSet<u32>,
    next_hint: u32,
    /// Identities seen unreferenced: since when, at which mod revision.
    unreferenced: HashMap<Identity, (Instant, i64)>,
    allocations: u64,
}

const MAX_ATTEMPTS: u32 = 64;
/// Identities created per transaction (3 puts and 2 compares each; etcd allows 128 ops).
const CREATE_BATCH: usize = 40;
/// References put per transaction (1 put and 2 compares each).
const REF_BATCH: usize = 60;

impl IdentityAllocator {
    /// Creates an allocator whose references are attached to `lease`, loading what etcd
    /// holds for the cluster.
    pub async fn new(
        store: std::sync::Arc<dyn KvStore>,
        cfg: AllocatorConfig,
        lease: LeaseId,
    ) -> Result<Self, AllocError> {
        let mut a = Self {
            store,
            cfg,
            lease,
            used: HashMap::new(),
            known: HashMap::new(),
            taken: BTreeSet::new(),
            next_hint: Identity::MIN_LOCAL,
            unreferenced: HashMap::new(),
            allocations: 0,
        };
        a.load().await?;
        Ok(a)
    }

    fn err(&self, step: &'static str) -> impl FnOnce(KvError) -> AllocError + '_ {
        move |source| AllocError::Store {
            cluster: self.cfg.cluster.to_string(),
            step,
            source,
        }
    }

    fn identities_prefix(&self) -> String {
        keys::state_prefix(keys::StateKind::Identities, &self.cfg.cluster)
    }

    fn master_key(&self, id: Identity) -> String {
        Key::State(StateKey::Identity {
            cluster: self.cfg.cluster.clone(),
            id,
        })
        .to_string()
    }

    fn index_key(&self, labels: &Labels) -> String {
        Key::IdentityIndex {
            cluster: self.cfg.cluster.clone(),
            labels: labels.clone(),
        }
        .to_string()
    }

    fn ref_key(&self, id: Identity) -> String {
        Key::IdentityRef {
            cluster: self.cfg.cluster.clone(),
            id,
            owner: self.cfg.owner.clone(),
        }
        .to_string()
    }

    fn refs_prefix(&self, id: Identity) -> String {
        format!("{IDENTITY_REFS_PREFIX}{}/{id}/", self.cfg.cluster)
    }

    /// Reads every identity and index entry of the cluster into the cache.
    async fn load(&mut self) -> Result<(), AllocError> {
        let masters = self
            .store
            .list_all(&self.identities_prefix(), 5000)
            .await
            .map_err(self.err("list identities"))?;
        let index = self
            .store
            .list_all(
                &format!("{IDENTITY_INDEX_PREFIX}{}/", self.cfg.cluster),
                5000,
            )
            .await
            .map_err(self.err("list identity index"))?;
        let mut master_revs = HashMap::new();
        self.taken.clear();
        for kv in &masters.kvs {
            if let Ok(Key::State(StateKey::Identity { id, .. })) = Key::parse_bytes(&kv.key) {
                self.taken.insert(id.local(self.cfg.mode));
                master_revs.insert(id, kv.mod_revision);
            }
        }
        self.known.clear();
        for kv in &index.kvs {
            let (Ok(Key::IdentityIndex { labels, .. }), Ok(v)) = (
                Key::parse_bytes(&kv.key),
                serde_json::from_slice::<IndexValue>(&kv.value),
            ) else {
                continue;
            };
            if let Some(master_rev) = master_revs.get(&v.id) {
                self.known.insert(
                    labels,
                    Known {
                        id: v.id,
                        index_rev: kv.mod_revision,
                        master_rev: *master_rev,
                    },
                );
            }
        }
        Ok(())
    }

    /// Re-reads the keys of one label set (after a failed transaction).
    async fn refresh_one(
        &mut self,
        labels: &Labels,
        candidate: Option<u32>,
    ) -> Result<(), AllocError> {
        self.known.remove(labels);
        if let Some(local) = candidate {
            let id = Identity::cluster_scoped(self.cfg.cluster_id, local, self.cfg.mode)
                .map_err(|_| AllocError::Exhausted(self.cfg.cluster.to_string()))?;
            if self
                .store
                .get(&self.master_key(id))
                .await
                .map_err(self.err("read identity"))?
                .is_some()
            {
                self.taken.insert(local);
            }
        }
        let index_key = self.index_key(labels);
        let Some(index) = self
            .store
            .get(&index_key)
            .await
            .map_err(self.err("read index"))?
        else {
            return Ok(());
        };
        let Ok(v) = serde_json::from_slice::<IndexValue>(&index.value) else {
            tracing::warn!(key = %index_key, "repairing unreadable identity index entry");
            self.store
                .compare_and_delete(&index_key, index.mod_revision)
                .await
                .map_err(self.err("repair index"))?;
            return Ok(());
        };
        self.taken.insert(v.id.local(self.cfg.mode));
        match self
            .store
            .get(&self.master_key(v.id))
            .await
            .map_err(self.err("read identity"))?
        {
            Some(m) => {
                self.known.insert(
                    labels.clone(),
                    Known {
                        id: v.id,
                        index_rev: index.mod_revision,
                        master_rev: m.mod_revision,
                    },
                );
            }
            None => {
                // An index entry without its identity (GC deletes both at once, so this
                // is damage): remove it so the label set can be allocated afresh.
                self.store
                    .compare_and_delete(&index_key, index.mod_revision)
                    .await
                    .map_err(self.err("repair index"))?;
            }
        }
        Ok(())
    }

    /// Identities created by this allocator since start.
    pub fn allocations(&self) -> u64 {
        self.allocations
    }

    /// Distinct label sets in use by this replica.
    pub fn in_use(&self) -> usize {
        self.used.len()
    }

    /// The identity of a label set already acquired by this replica.
    pub fn lookup(&self, labels: &Labels) -> Option<Identity> {
        self.used.get(labels).map(|u| u.id)
    }

    /// Takes one reference to the identity of `labels`, allocating it if needed.
    pub async fn acquire(&mut self, labels: &Labels) -> Result<Identity, AllocError> {
        if let Some(u) = self.used.get_mut(labels) {
            u.refs += 1;
            return Ok(u.id);
        }
        let id = self.reference(labels).await?;
        self.used.insert(labels.clone(), Used { id, refs: 1 });
        Ok(id)
    }

    /// Drops one reference. The replica's etcd reference goes with the last one, at the
    /// next [`Self::sweep`] (so a label set that is released and taken again within one
    /// batch costs no etcd round trip).
    pub fn release(&mut self, labels: &Labels) {
        if let Some(u) = self.used.get_mut(labels) {
            u.refs = u.refs.saturating_sub(1);
        }
    }

    /// References many label sets at once (batched transactions), so that the following
    /// `acquire` calls find them; a batch that conflicts falls back to one at a time.
    /// Label sets referenced here and never acquired are dropped by [`Self::sweep`].
    pub async fn prefetch<'a>(
        &mut self,
        labels: impl IntoIterator<Item = &'a Labels>,
    ) -> Result<(), AllocError> {
        let mut existing = Vec::new();
        let mut new = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for l in labels {
            if self.used.contains_key(l) || !seen.insert(l) {
                continue;
            }
            match self.known.get(l) {
                Some(_) => existing.push(l.clone()),
                None => new.push(l.clone()),
            }
        }
        for chunk in existing.chunks(REF_BATCH) {
            self.reference_batch(chunk).await?;
        }
        for chunk in new.chunks(CREATE_BATCH) {
            self.create_batch(chunk).await?;
        }
        Ok(())
    }

    async fn reference_batch(&mut self, chunk: &[Labels]) -> Result<(), AllocError> {
        let mut txn = Txn::default();
        for l in chunk {
            let Some(k) = self.known.get(l).copied() else {
                continue;
            };
            txn.compares
                .push(Compare::ModRevision(self.master_key(k.id), k.master_rev));
            txn.compares
                .push(Compare::ModRevision(self.index_key(l), k.index_rev));
            txn.success.push(Op::Put {
                key: self.ref_key(k.id),
                value: Vec::new(),
                lease: Some(self.lease),
            });
        }
        let r = self
            .store
            .txn(txn)
            .await
            .map_err(self.err("reference identities"))?;
        for l in chunk {
            let id = if r.succeeded {
                match self.known.get(l) {
                    Some(k) => k.id,
                    None => self.reference(l).await?,
                }
            } else {
                self.reference(l).await?
            };
            self.used.insert(l.clone(), Used { id, refs: 0 });
        }
        Ok(())
    }

    async fn create_batch(&mut self, chunk: &[Labels]) -> Result<(), AllocError> {
        let mut txn = Txn::default();
        let mut planned = Vec::with_capacity(chunk.len());
        for l in chunk {
            let local = self.free_local()?;
            self.taken.insert(local);
            let id = Identity::cluster_scoped(self.cfg.cluster_id, local, self.cfg.mode)
                .map_err(|_| AllocError::Exhausted(self.cfg.cluster.to_string()))?;
            self.push_create(&mut txn, l, id);
            planned.push((l.clone(), id));
        }
        let r = self
            .store
            .txn(txn)
            .await
            .map_err(self.err("create identities"))?;
        if r.succeeded {
            self.allocations += planned.len() as u64;
            for (l, id) in planned {
                self.known.insert(
                    l.clone(),
                    Known {
                        id,
                        index_rev: r.revision,
                        master_rev: r.revision,
                    },
                );
                self.used.insert(l, Used { id, refs: 0 });
            }
            return Ok(());
        }
        // Someone else created some of them or took some numbers: one at a time.
        for (l, id) in planned {
            self.taken.remove(&id.local(self.cfg.mode));
            self.refresh_one(&l, Some(id.local(self.cfg.mode))).await?;
            let id = self.reference(&l).await?;
            self.used.insert(l, Used { id, refs: 0 });
        }
        Ok(())
    }

    fn push_create(&self, txn: &mut Txn, labels: &Labels, id: Identity) {
        let index_key = self.index_key(labels);
        let master = self.master_key(id);
        txn.compares.push(Compare::Absent(index_key.clone()));
        txn.compares.push(Compare::Absent(master.clone()));
        txn.success.push(Op::Put {
            key: index_key,
            value: keys::encode(&IndexValue { id }),
            lease: None,
        });
        txn.success.push(Op::Put {
            key: master,
            value: keys::encode(&IdentityEntry {
                id,
                labels: labels.clone(),
            }),
            lease: None,
        });
        txn.success.push(Op::Put {
            key: self.ref_key(id),
            value: Vec::new(),
            lease: Some(self.lease),
        });
    }

    /// Deletes this replica's references to label sets no longer used (released, or
    /// prefetched and never acquired), in batched transactions.
    pub async fn sweep(&mut self) -> Result<(), AllocError> {
        let unused: Vec<(Labels, Identity)> = self
            .used
            .iter()
            .filter(|(_, u)| u.refs == 0)
            .map(|(l, u)| (l.clone(), u.id))
            .collect();
        for chunk in unused.chunks(REF_BATCH) {
            let txn = Txn {
                success: chunk
                    .iter()
                    .map(|(_, id)| Op::Delete(self.ref_key(*id)))
                    .collect(),
                ..Txn::default()
            };
            self.store
                .txn(txn)
                .await
                .map_err(self.err("delete references"))?;
            for (l, _) in chunk {
                self.used.remove(l);
            }
        }
        Ok(())
    }

    /// Puts this replica's reference on the identity of `labels` (allocating it if no
    /// identity exists), under the transaction rules in the module docs.
    async fn reference(&mut self, labels: &Labels) -> Result<Identity, AllocError> {
        for _ in 0..MAX_ATTEMPTS {
            if let Some(k) = self.known.get(labels).copied() {
                let txn = Txn {
                    compares: vec![
                        Compare::ModRevision(self.master_key(k.id), k.master_rev),
                        Compare::ModRevision(self.index_key(labels), k.index_rev),
                    ],
                    success: vec![Op::Put {
                        key: self.ref_key(k.id),
                        value: Vec::new(),
                        lease: Some(self.lease),
                    }],
                    failure: vec![],
                };
                let r = self
                    .store
                    .txn(txn)
                    .await
                    .map_err(self.err("reference identity"))?;
                if r.succeeded {
                    return Ok(k.id);
                }
                self.refresh_one(labels, None).await?;
                continue;
            }
            let local = self.free_local()?;
            let id = Identity::cluster_scoped(self.cfg.cluster_id, local, self.cfg.mode)
                .map_err(|_| AllocError::Exhausted(self.cfg.cluster.to_string()))?;
            let mut txn = Txn::default();
            self.push_create(&mut txn, labels, id);
            let r = self
                .store
                .txn(txn)
                .await
                .map_err(self.err("create identity"))?;
            self.taken.insert(local);
            if r.succeeded {
                self.allocations += 1;
                self.known.insert(
                    labels.clone(),
                    Known {
                        id,
                        index_rev: r.revision,
                        master_rev: r.revision,
                    },
                );
                tracing::debug!(%id, %labels, "allocated identity");
                return Ok(id);
            }
            // Someone else took the number or the label set: learn which.
            self.taken.remove(&local);
            self.refresh_one(labels, Some(local)).await?;
        }
        Err(AllocError::Contended {
            labels: labels.to_string(),
            attempts: MAX_ATTEMPTS,
        })
    }

    fn free_local(&mut self) -> Result<u32, AllocError> {
        let max = self.cfg.mode.max_local();
        let mut candidate = self.next_hint.clamp(Identity::MIN_LOCAL, max);
        for _ in 0..=(max - Identity::MIN_LOCAL) {
            let next = if candidate == max {
                Identity::MIN_LOCAL
            } else {
                candidate + 1
            };
            if !self.taken.contains(&candidate) {
                self.next_hint = next;
                return Ok(candidate);
            }
            candidate = next;
        }
        Err(AllocError::Exhausted(self.cfg.cluster.to_string()))
    }

    /// Re-creates this replica's references under a new lease (after the old one was
    /// lost). Returns the label sets whose identity changed (their users must re-export).
    pub async fn restore(&mut self, lease: LeaseId) -> Result<Vec<Labels>, AllocError> {
        self.lease = lease;
        self.load().await?;
        let mut changed = Vec::new();
        let labels: Vec<Labels> = self.used.keys().cloned().collect();
        for l in labels {
            let old = self.used.get(&l).map(|u| u.id);
            let id = self.reference(&l).await?;
            if let Some(u) = self.used.get_mut(&l) {
                u.id = id;
            }
            if old != Some(id) {
                changed.push(l);
            }
        }
        Ok(changed)
    }

    /// One garbage-collection pass: deletes identities that have had no reference from
    /// any replica for the grace period. Returns how many were deleted.
    pub async fn gc(&mut self) -> Result<usize, AllocError> {
        let masters = self
            .store
            .list_all(&self.identities_prefix(), 5000)
            .await
            .map_err(self.err("list identities"))?;
        let refs = self
            .store
            .list_all(
                &format!("{IDENTITY_REFS_PREFIX}{}/", self.cfg.cluster),
                5000,
            )
            .await
            .map_err(self.err("list references"))?;
        let referenced: BTreeSet<Identity> = refs
            .kvs
            .iter()
            .filter_map(|kv| match Key::parse_bytes(&kv.key) {
                Ok(Key::IdentityRef { id, .. }) => Some(id),
                _ => None,
            })
            .collect();
        let in_use: BTreeSet<Identity> = self.used.values().map(|u| u.id).collect();
        let now = Instant::now();
        let mut seen = HashMap::new();
        let mut deleted = 0;
        for kv in &masters.kvs {
            let Ok(Key::State(StateKey::Identity { id, .. })) = Key::parse_bytes(&kv.key) else {
                continue;
            };
            if referenced.contains(&id) || in_use.contains(&id) {
                continue;
            }
            let since = match self.unreferenced.get(&id) {
                Some((t, rev)) if *rev == kv.mod_revision => *t,
                _ => now,
            };
            if now.duration_since(since) < self.cfg.gc_grace {
                seen.insert(id, (since, kv.mod_revision));
                continue;
            }
            let entry = serde_json::from_slice::<IdentityEntry>(&kv.value).ok();
            let mut success = vec![Op::Delete(self.master_key(id))];
            if let Some(e) = &entry {
                success.push(Op::Delete(self.index_key(&e.labels)));
            }
            let txn = Txn {
                compares: vec![
                    Compare::PrefixAbsent(self.refs_prefix(id)),
                    Compare::ModRevision(self.master_key(id), kv.mod_revision),
                ],
                success,
                failure: vec![],
            };
            let r = self
                .store
                .txn(txn)
                .await
                .map_err(self.err("delete identity"))?;
            if r.succeeded {
                deleted += 1;
                self.taken.remove(&id.local(self.cfg.mode));
                if let Some(e) = entry {
                    self.known.remove(&e.labels);
                }
                tracing::debug!(%id, "released unused identity");
            }
        }
        self.unreferenced = seen;
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use meshd::kv::MemoryStore;

    use super::*;

    fn cfg(owner: &str) -> AllocatorConfig {
        let mode = MaxConnectedClusters::C255;
        AllocatorConfig {
            cluster: ClusterName::new("east").unwrap(),
            cluster_id: ClusterId::new(3, mode).unwrap(),
            mode,
            owner: owner.into(),
            gc_grace: Duration::from_secs(60),
        }
    }

    fn labels(app: &str) -> Labels {
        Labels::parse([
            format!("k8s:app={app}").as_str(),
            "k8s:io.kubernetes.pod.namespace=default",
            "mesh:io.meshd.cluster=east",
        ])
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn allocates_reuses_and_collects() {
        let store: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
        let lease = store.lease_grant(Duration::from_secs(3600)).await.unwrap();
        let mut a = IdentityAllocator::new(store.clone(), cfg("a"), lease)
            .await
            .unwrap();
        let web = a.acquire(&labels("web")).await.unwrap();
        assert_eq!(web.cluster_id(MaxConnectedClusters::C255), 3);
        assert_eq!(web.local(MaxConnectedClusters::C255), 256);
        assert_eq!(a.acquire(&labels("web")).await.unwrap(), web);
        let db = a.acquire(&labels("db")).await.unwrap();
        assert_ne!(db, web);
        // A second replica gets the same IDs for the same label sets.
        let mut b = IdentityAllocator::new(store.clone(), cfg("b"), lease)
            .await
            .unwrap();
        assert_eq!(b.acquire(&labels("db")).await.unwrap(), db);
        // db is released by both; after the grace period it is deleted, web is kept.
        a.release(&labels("db"));
        a.sweep().await.unwrap();
        b.release(&labels("db"));
        b.sweep().await.unwrap();
        assert_eq!(a.gc().await.unwrap(), 0, "grace period not over");
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(a.gc().await.unwrap(), 1);
        let master = Key::State(StateKey::Identity {
            cluster: ClusterName::new("east").unwrap(),
            id: db,
        })
        .to_string();
        assert!(store.get(&master).await.unwrap().is_none());
        assert!(
            store
                .get(&a.index_key(&labels("db")))
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(a.acquire(&labels("web")).await.unwrap(), web);
    }

    #[tokio::test(start_paused = true)]
    async fn prefetch_batches_and_agrees_with_single_allocation() {
        let store: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
        let lease = store.lease_grant(Duration::from_secs(3600)).await.unwrap();
        let mut a = IdentityAllocator::new(store.clone(), cfg("a"), lease)
            .await
            .unwrap();
        let sets: Vec<Labels> = (0..100).map(|i| labels(&format!("app-{i}"))).collect();
        // b allocates a few first, so a's batch conflicts and falls back.
        let mut b = IdentityAllocator::new(store.clone(), cfg("b"), lease)
            .await
            .unwrap();
        let b5 = b.acquire(&sets[5]).await.unwrap();
        a.prefetch(sets.iter()).await.unwrap();
        let mut ids = std::collections::HashSet::new();
        for s in &sets {
            assert!(ids.insert(a.acquire(s).await.unwrap()));
        }
        assert_eq!(a.lookup(&sets[5]), Some(b5));
        // A prefetched set never acquired is swept.
        a.prefetch([&labels("unused")]).await.unwrap();
        a.sweep().await.unwrap();
        assert_eq!(a.in_use(), 100);
        let all = store
            .list_all("mesh/state/identities/v1/east/", 1000)
            .await
            .unwrap();
        assert_eq!(all.kvs.len(), 101);
    }

    #[tokio::test(start_paused = true)]
    async fn lost_lease_references_let_gc_run_and_restore_reallocates() {
        let store: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
        let l1 = store.lease_grant(Duration::from_secs(3600)).await.unwrap();
        let mut a = IdentityAllocator::new(store.clone(), cfg("a"), l1)
            .await
            .unwrap();
        let web = a.acquire(&labels("web")).await.unwrap();
        store.lease_revoke(l1).await.unwrap();
        let l2 = store.lease_grant(Duration::from_secs(3600)).await.unwrap();
        let mut b = IdentityAllocator::new(store.clone(), cfg("b"), l2)
            .await
            .unwrap();
        b.gc().await.unwrap();
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(
            b.gc().await.unwrap(),
            1,
            "unreferenced after the lease loss"
        );
        let changed = a.restore(l2).await.unwrap();
        assert_eq!(
            changed,
            vec![labels("web")],
            "the identity was collected: {web}"
        );
        let now = a.lookup(&labels("web")).unwrap();
        assert_ne!(now, web);
        assert_eq!(b.acquire(&labels("web")).await.unwrap(), now);
    }
}
