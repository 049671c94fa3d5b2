//! The `KvStore` seam: what meshd needs from etcd, with an etcd and an in-memory implementation.
//!
//! Every reader and writer in meshd goes through [`KvStore`]. [`EtcdStore`] talks to a
//! real etcd (TLS with client certificates, optional user/password); [`MemoryStore`]
//! keeps revisions, history, compaction and leases in memory for unit tests.
//! [`Session`] keeps one lease alive and signals when it is lost.

mod etcd;
mod memory;
mod session;

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

pub use etcd::{EtcdConfig, EtcdStore};
pub use memory::MemoryStore;
pub use session::Session;

/// An etcd lease ID.
pub type LeaseId = i64;

/// A stored key and value with its revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
    /// Revision that created the key.
    pub create_revision: i64,
    /// Revision that last modified the key.
    pub mod_revision: i64,
    /// Lease the key is attached to (0 for none).
    pub lease: LeaseId,
}

/// One page of a ranged read.
#[derive(Debug, Clone, Default)]
pub struct ListPage {
    /// The store revision the page was read at.
    pub revision: i64,
    /// Keys in ascending order.
    pub kvs: Vec<KeyValue>,
    /// Whether more keys follow the last one.
    pub more: bool,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key was created or changed.
    Put(KeyValue),
    /// The key was deleted at `mod_revision`.
    Delete {
        /// The deleted key.
        key: Vec<u8>,
        /// Revision of the deletion.
        mod_revision: i64,
    },
}

/// A batch of watch events, or a progress notification (no events).
#[derive(Debug, Clone, Default)]
pub struct WatchBatch {
    /// Header revision: every change up to here has been delivered when this is a progress
    /// notification or carries events.
    pub revision: i64,
    /// Events in revision order.
    pub events: Vec<WatchEvent>,
}

/// A live watch: batches until an error; the stream ends when the store closes it.
pub type WatchStream = BoxStream<'static, Result<WatchBatch, KvError>>;

/// A comparison in a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist (create revision 0).
    Absent(String),
    /// The key exists with this mod revision.
    ModRevision(String, i64),
    /// The key exists with this exact value.
    Value(String, Vec<u8>),
    /// No key with this prefix exists.
    PrefixAbsent(String),
}

/// An operation in a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Put a value, optionally attached to a lease.
    Put {
        /// Key.
        key: String,
        /// Value.
        value: Vec<u8>,
        /// Lease, if any.
        lease: Option<LeaseId>,
    },
    /// Delete a key.
    Delete(String),
}

/// An etcd-style transaction: if every compare holds, run `success`, else `failure`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    /// Conditions, all of which must hold.
    pub compares: Vec<Compare>,
    /// Operations when they hold.
    pub success: Vec<Op>,
    /// Operations when one does not.
    pub failure: Vec<Op>,
}

/// The result of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether the compares held (and `success` ran).
    pub succeeded: bool,
    /// Store revision after the transaction.
    pub revision: i64,
}

/// What went wrong talking to the store.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// Could not connect or the connection broke. Retrying helps.
    #[error("kvstore {endpoint}: cannot connect: {source}")]
    Connect {
        /// Endpoint(s) tried.
        endpoint: String,
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A request failed. Retrying may help.
    #[error("kvstore {op} {key:?} failed: {source}")]
    Request {
        /// The operation (`get`, `list`, `put`, `txn`, `watch`, ...).
        op: &'static str,
        /// The key or prefix it was for.
        key: String,
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The requested revision was compacted; relist from the current revision.
    #[error("kvstore: revision {requested} was compacted (compacted up to {compact_revision})")]
    Compacted {
        /// The revision asked for.
        requested: i64,
        /// The compaction revision.
        compact_revision: i64,
    },
    /// The server canceled a watch.
    #[error("kvstore: watch on {prefix:?} canceled: {reason}")]
    WatchCanceled {
        /// Watched prefix.
        prefix: String,
        /// Server's reason.
        reason: String,
    },
    /// The user lacks permission. Retrying does not help.
    #[error("kvstore {op} {key:?}: permission denied")]
    PermissionDenied {
        /// The operation.
        op: &'static str,
        /// The key or prefix.
        key: String,
    },
    /// The lease does not exist (expired or revoked).
    #[error("kvstore: lease {0:x} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    /// A configuration error (bad endpoint, bad TLS material). Retrying does not help.
    #[error("kvstore config: {0}")]
    Config(String),
}

impl KvError {
    /// Whether retrying the same call later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Connect { .. }
                | Self::Request { .. }
                | Self::Compacted { .. }
                | Self::WatchCanceled { .. }
        )
    }
}

/// What meshd needs from etcd. All calls are cancel-safe to drop.
#[async_trait]
pub trait KvStore: Send + Sync + std::fmt::Debug + 'static {
    /// Reads one key at the current revision.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, KvError>;

    /// Reads up to `limit` keys with `prefix`, from `start` (inclusive; the prefix itself
    /// when `None`), at `revision` (0 = current). Pages of one listing share a revision.
    async fn list_page(
        &self,
        prefix: &str,
        start: Option<&[u8]>,
        limit: usize,
        revision: i64,
    ) -> Result<ListPage, KvError>;

    /// Writes a key, optionally attached to a lease. Returns the new revision.
    async fn put(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<i64, KvError>;

    /// Deletes a key. Returns whether it existed.
    async fn delete(&self, key: &str) -> Result<bool, KvError>;

    /// Deletes every key with `prefix`. Returns how many existed.
    async fn delete_prefix(&self, prefix: &str) -> Result<u64, KvError>;

    /// Runs a transaction atomically.
    async fn txn(&self, txn: Txn) -> Result<TxnResult, KvError>;

    /// Watches `prefix` from `start_revision` (inclusive).
    async fn watch(&self, prefix: &str, start_revision: i64) -> Result<WatchStream, KvError>;

    /// Grants a lease of `ttl`.
    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, KvError>;

    /// Refreshes a lease once; returns the TTL it now has
    /// ([`KvError::LeaseNotFound`] when it is gone).
    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<Duration, KvError>;

    /// Revokes a lease, deleting its keys.
    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), KvError>;

    /// Creates `key` only if it does not exist. Returns whether it was created.
    async fn create(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<bool, KvError> {
        let r = self
            .txn(Txn {
                compares: vec![Compare::Absent(key.to_owned())],
                success: vec![Op::Put {
                    key: key.to_owned(),
                    value: value.to_vec(),
                    lease,
                }],
                failure: vec![],
            })
            .await?;
        Ok(r.succeeded)
    }

    /// Replaces `key` only if its mod revision is still `expected`. Returns whether it was.
    async fn compare_and_swap(
        &self,
        key: &str,
        expected_mod_revision: i64,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<bool, KvError> {
        let r = self
            .txn(Txn {
                compares: vec![Compare::ModRevision(key.to_owned(), expected_mod_revision)],
                success: vec![Op::Put {
                    key: key.to_owned(),
                    value: value.to_vec(),
                    lease,
                }],
                failure: vec![],
            })
            .await?;
        Ok(r.succeeded)
    }

    /// Deletes `key` only if its mod revision is still `expected`. Returns whether it was.
    async fn compare_and_delete(
        &self,
        key: &str,
        expected_mod_revision: i64,
    ) -> Result<bool, KvError> {
        let r = self
            .txn(Txn {
                compares: vec![Compare::ModRevision(key.to_owned(), expected_mod_revision)],
                success: vec![Op::Delete(key.to_owned())],
                failure: vec![],
            })
            .await?;
        Ok(r.succeeded)
    }

    /// Lists every key with `prefix` at one revision, in pages of `page` keys.
    async fn list_all(&self, prefix: &str, page: usize) -> Result<ListPage, KvError> {
        let mut out = ListPage::default();
        let mut start: Option<Vec<u8>> = None;
        loop {
            let p = self
                .list_page(prefix, start.as_deref(), page, out.revision)
                .await?;
            out.revision = p.revision;
            if let Some(last) = p.kvs.last() {
                let mut next = last.key.clone();
                next.push(0);
                start = Some(next);
            }
            out.kvs.extend(p.kvs);
            if !p.more {
                return Ok(out);
            }
        }
    }
}
