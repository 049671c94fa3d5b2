//! The one reflector every reader uses: paged list at a revision, watch, relist and sweep.
//!
//! A [`Reflector`] turns a key prefix of a [`KvStore`] into a never-ending sequence of
//! [`Event`]s:
//!
//! ```text
//!   list page 1..n at revision R ──► Init, InitApply(k, v)…, Delete(stale k)…, InitDone
//!   watch from R+1                ──► Apply(k, v) | Delete(k) …
//!   error / compaction / cancel   ──► Err(e) item, backoff (jittered), relist + sweep
//! ```
//!
//! After every relist, keys that were delivered before but did not come back get a
//! synthetic `Delete` (before `InitDone`), so a consumer that only applies `Apply`/
//! `InitApply` and `Delete` always converges to the store's state. Entries whose key or
//! value fails to decode (per the [`Codec`]) are dropped: counted in
//! [`ReflectorMetrics::dropped`] by reason and logged once per key; a key that was
//! delivered and then gets an undecodable value is deleted downstream (its last good
//! value is no longer what the source says). The watch never stops because of bad data.

use std::collections::{HashSet, VecDeque};
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;

use crate::backoff::{Backoff, BackoffConfig};
use crate::keys::{DecodeError, IdentityScope, Key, StateKey, StateKind, StateValue, decode_state};
use crate::kv::{KvError, KvStore, WatchEvent, WatchStream};
use crate::metrics::{DropLabels, ReflectorMetrics, SourceLabels};
use crate::model::ClusterName;

/// One item of a reflector: an event, or an error it will retry after.
pub type Item<C> = Result<Event<<C as Codec>::Key, <C as Codec>::Value>, ReflectorError>;

/// How raw key/value pairs become typed entries.
pub trait Codec: Send + Sync + 'static {
    /// Typed key.
    type Key: Clone + Eq + Hash + Debug + Send + Sync + 'static;
    /// Typed value.
    type Value: Debug + Send + 'static;
    /// Parses and checks a key.
    fn decode_key(&self, key: &[u8]) -> Result<Self::Key, DecodeError>;
    /// Parses and checks the value of an already-decoded key.
    fn decode_value(&self, key: &Self::Key, value: &[u8]) -> Result<Self::Value, DecodeError>;
}

/// One change for a consumer (see the module docs for the order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<K, V> {
    /// A (re)list starts.
    Init,
    /// An entry present at the list revision.
    InitApply(K, V),
    /// The list is complete; stale keys were deleted just before this.
    InitDone,
    /// An entry was created or changed.
    Apply(K, V),
    /// An entry was deleted (or, during a relist, did not come back).
    Delete(K),
}

/// A store error the reflector will retry after `retry_in`.
#[derive(Debug, thiserror::Error)]
#[error("reflector on {prefix:?}: {step} failed (retrying in {retry_in:?}): {source}")]
pub struct ReflectorError {
    /// The prefix being reflected.
    pub prefix: String,
    /// `list` or `watch`.
    pub step: &'static str,
    /// When the reflector will relist.
    pub retry_in: Duration,
    /// The store error.
    #[source]
    pub source: KvError,
}

/// Reflector settings.
#[derive(Debug, Clone)]
pub struct ReflectorConfig {
    /// Keys per list page (default 1000). etcd 3.4 scans the rest of the range to count
    /// it on every page, so very large prefixes list faster with larger pages.
    pub page_size: usize,
    /// Backoff between failed attempts.
    pub backoff: BackoffConfig,
    /// A watch that stayed up this long resets the backoff (default 30 s).
    pub healthy_after: Duration,
    /// Metric labels: whose data this is (e.g. the peer's name).
    pub cluster_label: String,
    /// Metric labels: which kind of data.
    pub kind_label: String,
}

impl Default for ReflectorConfig {
    fn default() -> Self {
        Self {
            page_size: 1000,
            backoff: BackoffConfig::default(),
            healthy_after: Duration::from_secs(30),
            cluster_label: "local".into(),
            kind_label: "raw".into(),
        }
    }
}

enum State {
    /// Start a fresh list.
    List,
    /// Listing at `revision`; next page starts at `next`.
    Listing { revision: i64, next: Vec<u8> },
    /// Open a watch from `revision`.
    Watch { revision: i64 },
    /// Watching.
    Watching { stream: WatchStream, since: Instant },
    /// Waiting before a relist.
    Backoff { until: Instant },
}

/// Reflects one prefix of a store as a sequence of typed events (see module docs).
pub struct Reflector<C: Codec> {
    store: Arc<dyn KvStore>,
    prefix: String,
    codec: C,
    cfg: ReflectorConfig,
    metrics: ReflectorMetrics,
    events_counter: Counter,
    relists_counter: Counter,
    errors_counter: Counter,
    state: State,
    backoff: Backoff,
    /// Keys delivered downstream and not deleted since.
    known: HashSet<C::Key>,
    /// Keys seen by the list in progress.
    seen: HashSet<C::Key>,
    /// Raw keys already logged as bad (log once per key).
    logged: HashSet<Vec<u8>>,
    pending: VecDeque<Event<C::Key, C::Value>>,
    /// Last revision known to be fully delivered.
    revision: i64,
    /// Page size of the list in progress (shrinks when pages do not fit a message).
    page_size: usize,
    /// The last relist was caused by compaction (the next one backs off).
    compacted_once: bool,
    synced_once: bool,
}

impl<C: Codec> std::fmt::Debug for Reflector<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reflector")
            .field("prefix", &self.prefix)
            .field("revision", &self.revision)
            .field("known", &self.known.len())
            .finish_non_exhaustive()
    }
}

/// At most this many bad keys are remembered for log-once (then each is logged again).
const MAX_LOGGED: usize = 100_000;

impl<C: Codec> Reflector<C> {
    /// A reflector over `prefix` of `store`. Nothing happens until it is polled.
    pub fn new(
        store: Arc<dyn KvStore>,
        prefix: impl Into<String>,
        codec: C,
        cfg: ReflectorConfig,
        metrics: ReflectorMetrics,
    ) -> Self {
        let labels = SourceLabels {
            cluster: cfg.cluster_label.clone(),
            kind: cfg.kind_label.clone(),
        };
        let events_counter = metrics.events.get_or_create(&labels).clone();
        let relists_counter = metrics.relists.get_or_create(&labels).clone();
        let errors_counter = metrics.errors.get_or_create(&labels).clone();
        Self {
            store,
            prefix: prefix.into(),
            codec,
            backoff: Backoff::new(cfg.backoff),
            cfg,
            metrics,
            events_counter,
            relists_counter,
            errors_counter,
            state: State::List,
            known: HashSet::new(),
            seen: HashSet::new(),
            logged: HashSet::new(),
            pending: VecDeque::new(),
            revision: 0,
            page_size: 0,
            compacted_once: false,
            synced_once: false,
        }
    }

    /// The prefix reflected.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The last revision fully delivered (0 before the first list).
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Entries currently delivered downstream.
    pub fn len(&self) -> usize {
        self.known.len()
    }

    /// Whether no entries are delivered.
    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// Whether at least one full list completed.
    pub fn has_synced(&self) -> bool {
        self.synced_once
    }

    /// The next event or error. Never ends; cancel-safe (drop the future to stop).
    pub async fn next(&mut self) -> Result<Event<C::Key, C::Value>, ReflectorError> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                self.events_counter.inc();
                return Ok(ev);
            }
            match &mut self.state {
                State::List => {
                    self.state = State::Listing {
                        revision: 0,
                        next: self.prefix.as_bytes().to_vec(),
                    };
                }
                State::Listing { revision, next } => {
                    let (rev, start) = (*revision, next.clone());
                    if rev == 0 {
                        self.page_size = self.cfg.page_size;
                    }
                    let page = match self
                        .store
                        .list_page(&self.prefix, Some(&start), self.page_size, rev)
                        .await
                    {
                        Ok(p) => p,
                        Err(e) => return Err(self.fail("list", e)),
                    };
                    // The store returned a smaller page than asked (values too large for
                    // one message): keep that size for the rest of this list.
                    if page.more && !page.kvs.is_empty() && page.kvs.len() < self.page_size {
                        self.page_size = page.kvs.len();
                    }
                    if rev == 0 {
                        self.relists_counter.inc();
                        self.seen.clear();
                        self.pending.push_back(Event::Init);
                    }
                    let next = page.kvs.last().map(|kv| {
                        let mut n = kv.key.clone();
                        n.push(0);
                        n
                    });
                    for kv in page.kvs {
                        if let Some((k, v)) = self.decode(&kv.key, &kv.value) {
                            self.seen.insert(k.clone());
                            self.pending.push_back(Event::InitApply(k, v));
                        }
                    }
                    match (page.more, next) {
                        (true, Some(next)) => {
                            self.state = State::Listing {
                                revision: page.revision,
                                next,
                            };
                        }
                        _ => self.finish_list(page.revision),
                    }
                }
                State::Watch { revision } => {
                    let from = *revision + 1;
                    match self.store.watch(&self.prefix, from).await {
                        Ok(stream) => {
                            self.state = State::Watching {
                                stream,
                                since: Instant::now(),
                            };
                        }
                        Err(e) => return Err(self.fail("watch", e)),
                    }
                }
                State::Watching { stream, since } => {
                    let since = *since;
                    let item = stream.next().await;
                    match item {
                        Some(Ok(batch)) => {
                            self.compacted_once = false;
                            if since.elapsed() >= self.cfg.healthy_after {
                                self.backoff.reset();
                            }
                            for ev in batch.events {
                                self.apply_watch_event(ev);
                            }
                            self.revision = self.revision.max(batch.revision);
                        }
                        Some(Err(e)) => {
                            if since.elapsed() >= self.cfg.healthy_after {
                                self.backoff.reset();
                            }
                            return Err(self.fail("watch", e));
                        }
                        None => {
                            let e = KvError::Connect {
                                endpoint: String::new(),
                                source: "watch stream ended".into(),
                            };
                            return Err(self.fail("watch", e));
                        }
                    }
                }
                State::Backoff { until } => {
                    tokio::time::sleep_until(*until).await;
                    self.state = State::List;
                }
            }
        }
    }

    /// Consumes the reflector into a stream of events and errors.
    pub fn into_stream(
        self,
    ) -> impl Stream<Item = Result<Event<C::Key, C::Value>, ReflectorError>> + Send
    where
        C::Key: Send,
    {
        futures::stream::unfold(self, |mut r| async move {
            let item = r.next().await;
            Some((item, r))
        })
    }

    /// Like [`Self::into_stream`], with the number of entries delivered after each item
    /// (for status counts).
    pub fn into_stream_with_len(self) -> impl Stream<Item = (Item<C>, usize)> + Send
    where
        C::Key: Send,
    {
        futures::stream::unfold(self, |mut r| async move {
            let item = r.next().await;
            let n = r.len();
            Some(((item, n), r))
        })
    }

    fn finish_list(&mut self, revision: i64) {
        let stale: Vec<C::Key> = self
            .known
            .iter()
            .filter(|k| !self.seen.contains(*k))
            .cloned()
            .collect();
        for k in stale {
            self.pending.push_back(Event::Delete(k));
        }
        std::mem::swap(&mut self.known, &mut self.seen);
        self.seen.clear();
        self.pending.push_back(Event::InitDone);
        self.revision = revision;
        self.synced_once = true;
        self.state = State::Watch { revision };
    }

    fn apply_watch_event(&mut self, ev: WatchEvent) {
        match ev {
            WatchEvent::Put(kv) => match self.decode(&kv.key, &kv.value) {
                Some((k, v)) => {
                    self.known.insert(k.clone());
                    self.pending.push_back(Event::Apply(k, v));
                }
                None => {
                    // The source's current value is unusable: forget the last good one.
                    if let Ok(k) = self.codec.decode_key(&kv.key)
                        && self.known.remove(&k)
                    {
                        self.pending.push_back(Event::Delete(k));
                    }
                }
            },
            WatchEvent::Delete { key, .. } => {
                self.logged.remove(&key);
                if let Ok(k) = self.codec.decode_key(&key)
                    && self.known.remove(&k)
                {
                    self.pending.push_back(Event::Delete(k));
                }
            }
        }
    }

    fn decode(&mut self, key: &[u8], value: &[u8]) -> Option<(C::Key, C::Value)> {
        let res = self
            .codec
            .decode_key(key)
            .and_then(|k| self.codec.decode_value(&k, value).map(|v| (k, v)));
        match res {
            Ok(kv) => {
                if !self.logged.is_empty() {
                    self.logged.remove(key);
                }
                Some(kv)
            }
            Err(e) => {
                self.drop_entry(key, &e);
                None
            }
        }
    }

    fn drop_entry(&mut self, key: &[u8], e: &DecodeError) {
        self.metrics
            .dropped
            .get_or_create(&DropLabels {
                cluster: self.cfg.cluster_label.clone(),
                kind: self.cfg.kind_label.clone(),
                reason: e.reason().as_str().to_owned(),
            })
            .inc();
        if self.logged.len() >= MAX_LOGGED || self.logged.insert(key.to_vec()) {
            tracing::warn!(
                cluster = %self.cfg.cluster_label,
                kind = %self.cfg.kind_label,
                reason = %e.reason(),
                error = %e,
                "dropping entry"
            );
        }
    }

    fn fail(&mut self, step: &'static str, source: KvError) -> ReflectorError {
        self.errors_counter.inc();
        let immediate = matches!(source, KvError::Compacted { .. }) && !self.compacted_once;
        self.compacted_once = matches!(source, KvError::Compacted { .. });
        let retry_in = if immediate {
            Duration::ZERO
        } else {
            self.backoff.next_delay()
        };
        self.seen.clear();
        self.state = State::Backoff {
            until: Instant::now() + retry_in,
        };
        tracing::debug!(prefix = %self.prefix, step, error = %source, ?retry_in, "reflector retrying");
        ReflectorError {
            prefix: self.prefix.clone(),
            step,
            retry_in,
            source,
        }
    }
}

/// Codec for one kind of exported state of one cluster (`mesh/state/<kind>/v1/<cluster>/`
/// or its kvstoremesh mirror under `mesh/cache/`).
#[derive(Debug, Clone)]
pub struct StateCodec {
    /// The kind expected under the prefix.
    pub kind: StateKind,
    /// The cluster expected under the prefix.
    pub cluster: ClusterName,
    /// Whether keys are read from the kvstoremesh cache (`mesh/cache/...`).
    pub cached: bool,
    /// The cluster's ID range, once its cluster-config is known.
    pub scope: Option<IdentityScope>,
}

impl StateCodec {
    /// The prefix this codec reads.
    pub fn prefix(&self) -> String {
        if self.cached {
            crate::keys::cache_prefix(self.kind, &self.cluster)
        } else {
            crate::keys::state_prefix(self.kind, &self.cluster)
        }
    }

    /// Reflector settings labelled for this codec.
    pub fn reflector_config(&self) -> ReflectorConfig {
        ReflectorConfig {
            cluster_label: self.cluster.to_string(),
            kind_label: self.kind.as_str().to_owned(),
            ..ReflectorConfig::default()
        }
    }
}

impl Codec for StateCodec {
    type Key = StateKey;
    type Value = StateValue;

    fn decode_key(&self, key: &[u8]) -> Result<StateKey, DecodeError> {
        let k = Key::parse_bytes(key)?;
        let sk = match (k, self.cached) {
            (Key::State(sk), false) | (Key::Cache(sk), true) => sk,
            _ => {
                return Err(crate::keys::KeyError {
                    key: String::from_utf8_lossy(key).into_owned(),
                    reason: "not an exported-state key",
                }
                .into());
            }
        };
        if sk.kind() != self.kind || *sk.cluster() != self.cluster {
            return Err(crate::keys::KeyError {
                key: String::from_utf8_lossy(key).into_owned(),
                reason: "kind or cluster differs from the prefix",
            }
            .into());
        }
        Ok(sk)
    }

    fn decode_value(&self, key: &StateKey, value: &[u8]) -> Result<StateValue, DecodeError> {
        decode_state(key, value, self.scope)
    }
}

#[cfg(test)]
mod tests;
