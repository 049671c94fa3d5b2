//! A lease session: keeps one lease alive and signals when it is lost.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{KvError, KvStore, LeaseId};

/// One lease kept alive by a background task.
///
/// `lost()` is cancelled when the lease is gone (expired or revoked, or the store was
/// unreachable for longer than the TTL); keys written with [`Session::lease`] are gone
/// with it and the owner must re-create them under a new session. Dropping the session
/// stops the keepalive (the lease then expires); [`Session::close`] revokes it at once.
#[derive(Debug)]
pub struct Session {
    store: Arc<dyn KvStore>,
    lease: LeaseId,
    ttl: Duration,
    lost: CancellationToken,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Session {
    /// Grants a lease of `ttl` and starts keeping it alive.
    pub async fn start(store: Arc<dyn KvStore>, ttl: Duration) -> Result<Self, KvError> {
        let lease = store.lease_grant(ttl).await?;
        let lost = CancellationToken::new();
        let stop = CancellationToken::new();
        let task = tokio::spawn(keep_alive(
            store.clone(),
            lease,
            ttl,
            lost.clone(),
            stop.clone(),
        ));
        Ok(Self {
            store,
            lease,
            ttl,
            lost,
            stop,
            task,
        })
    }

    /// The lease ID to attach keys to.
    pub fn lease(&self) -> LeaseId {
        self.lease
    }

    /// The lease TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Cancelled once the lease is lost.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Whether the lease is known to be lost.
    pub fn is_lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    /// Stops the keepalive and revokes the lease (deleting its keys).
    pub async fn close(self) -> Result<(), KvError> {
        self.stop.cancel();
        if self.lost.is_cancelled() {
            return Ok(());
        }
        match self.store.lease_revoke(self.lease).await {
            Ok(()) | Err(KvError::LeaseNotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
}

async fn keep_alive(
    store: Arc<dyn KvStore>,
    lease: LeaseId,
    ttl: Duration,
    lost: CancellationToken,
    stop: CancellationToken,
) {
    let period = (ttl / 3).max(Duration::from_millis(100));
    let retry = (ttl / 10).max(Duration::from_millis(50));
    let mut expires = Instant::now() + ttl;
    let mut wait = period;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        match store.lease_keep_alive(lease).await {
            Ok(remaining) => {
                expires = Instant::now() + remaining;
                wait = period;
            }
            Err(KvError::LeaseNotFound(_)) => {
                tracing::warn!(
                    lease = format_args!("{lease:x}"),
                    "lease lost: expired or revoked"
                );
                lost.cancel();
                return;
            }
            Err(e) => {
                if Instant::now() >= expires {
                    tracing::warn!(lease = format_args!("{lease:x}"), error = %e, "lease lost: store unreachable past the TTL");
                    lost.cancel();
                    return;
                }
                tracing::debug!(error = %e, "lease keepalive failed; retrying");
                wait = retry;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::MemoryStore;

    #[tokio::test(start_paused = true)]
    async fn keeps_alive_then_signals_loss_on_revoke() {
        let mem = MemoryStore::new();
        let store: Arc<dyn KvStore> = Arc::new(mem.clone());
        let s = Session::start(store.clone(), Duration::from_secs(3))
            .await
            .unwrap();
        store
            .put("mesh/heartbeat", b"x", Some(s.lease()))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!s.is_lost());
        assert!(store.get("mesh/heartbeat").await.unwrap().is_some());
        store.lease_revoke(s.lease()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), s.lost().cancelled())
            .await
            .expect("loss signalled");
        assert!(store.get("mesh/heartbeat").await.unwrap().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn close_revokes_and_drop_lets_it_expire() {
        let mem = MemoryStore::new();
        let store: Arc<dyn KvStore> = Arc::new(mem.clone());
        let s = Session::start(store.clone(), Duration::from_secs(3))
            .await
            .unwrap();
        store.put("a", b"1", Some(s.lease())).await.unwrap();
        s.close().await.unwrap();
        assert!(store.get("a").await.unwrap().is_none());

        let s = Session::start(store.clone(), Duration::from_secs(3))
            .await
            .unwrap();
        store.put("b", b"1", Some(s.lease())).await.unwrap();
        drop(s);
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(store.get("b").await.unwrap().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn unreachable_past_ttl_is_loss() {
        let mem = MemoryStore::new();
        let store: Arc<dyn KvStore> = Arc::new(mem.clone());
        let s = Session::start(store.clone(), Duration::from_secs(3))
            .await
            .unwrap();
        mem.fail_next(usize::MAX);
        tokio::time::timeout(Duration::from_secs(10), s.lost().cancelled())
            .await
            .expect("loss signalled");
    }
}
