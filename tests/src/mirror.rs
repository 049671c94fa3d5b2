//! `Mirror`: a reflector consumer task that keeps a map, for comparing against the store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshd::kv::KvStore;
use meshd::reflector::{Codec, Event, Reflector};

/// Counters of what a mirror has seen.
#[derive(Debug, Default)]
pub struct MirrorStats {
    /// Events applied.
    pub events: AtomicU64,
    /// Error items seen.
    pub errors: AtomicU64,
    /// `InitDone` items seen.
    pub init_done: AtomicU64,
}

type Map<C> = HashMap<<C as Codec>::Key, <C as Codec>::Value>;

/// A consumer that applies every reflector event to a map (aborted on drop).
#[derive(Debug)]
pub struct Mirror<C: Codec> {
    map: Arc<Mutex<Map<C>>>,
    stats: Arc<MirrorStats>,
    task: tokio::task::JoinHandle<()>,
}

impl<C> Mirror<C>
where
    C: Codec,
    C::Value: Clone + PartialEq,
{
    /// Spawns the consumer.
    pub fn spawn(reflector: Reflector<C>) -> Self {
        Self::spawn_seeded(reflector, Map::<C>::new())
    }

    /// Spawns the consumer of a reflector whose first events the caller already applied
    /// to `seed`.
    pub fn spawn_seeded(mut reflector: Reflector<C>, seed: Map<C>) -> Self {
        let map = Arc::new(Mutex::new(seed));
        let stats = Arc::new(MirrorStats::default());
        let (m, s) = (map.clone(), stats.clone());
        let task = tokio::spawn(async move {
            loop {
                match reflector.next().await {
                    Ok(ev) => {
                        s.events.fetch_add(1, Ordering::Relaxed);
                        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
                        match ev {
                            Event::InitApply(k, v) | Event::Apply(k, v) => {
                                g.insert(k, v);
                            }
                            Event::Delete(k) => {
                                g.remove(&k);
                            }
                            Event::InitDone => {
                                s.init_done.fetch_add(1, Ordering::Relaxed);
                            }
                            Event::Init => {}
                        }
                    }
                    Err(e) => {
                        s.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(error = %e, "mirror: reflector error");
                    }
                }
            }
        });
        Self { map, stats, task }
    }

    /// A copy of the current map.
    pub fn snapshot(&self) -> Map<C> {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Counters.
    pub fn stats(&self) -> &MirrorStats {
        &self.stats
    }

    /// Waits until the map equals what `store` holds under `prefix` (decoded with `codec`),
    /// polling for up to `timeout`. Returns (stale, missing-or-different) counts on timeout.
    pub async fn wait_converged(
        &self,
        store: &dyn KvStore,
        prefix: &str,
        codec: &C,
        timeout: Duration,
    ) -> Result<usize, (usize, usize)> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let want = store_snapshot(store, prefix, codec).await;
            if let Some(want) = want {
                let have = self.snapshot();
                let stale = have.keys().filter(|k| !want.contains_key(*k)).count();
                let missing = want
                    .iter()
                    .filter(|(k, v)| have.get(*k) != Some(*v))
                    .count();
                if stale == 0 && missing == 0 {
                    return Ok(want.len());
                }
                if tokio::time::Instant::now() > deadline {
                    return Err((stale, missing));
                }
            } else if tokio::time::Instant::now() > deadline {
                return Err((usize::MAX, usize::MAX));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl<C: Codec> Drop for Mirror<C> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Everything under `prefix` that `codec` accepts, read at one revision; `None` if the
/// store cannot be read right now.
pub async fn store_snapshot<C: Codec>(
    store: &dyn KvStore,
    prefix: &str,
    codec: &C,
) -> Option<Map<C>> {
    let all = store.list_all(prefix, 5000).await.ok()?;
    Some(
        all.kvs
            .iter()
            .filter_map(|kv| {
                let k = codec.decode_key(&kv.key).ok()?;
                let v = codec.decode_value(&k, &kv.value).ok()?;
                Some((k, v))
            })
            .collect(),
    )
}
