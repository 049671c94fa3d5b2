//! Supervisor tests over the in-memory store (a kvstoremesh-style cache of one peer).

use std::time::Duration;

use super::*;
use crate::keys::{StateKey, encode, encode_time};
use crate::kv::MemoryStore;
use crate::model::{Capabilities, Identity, IpCacheEntry};

fn name(s: &str) -> ClusterName {
    ClusterName::new(s).unwrap()
}

fn cid(n: u32) -> ClusterId {
    ClusterId::new(n, MaxConnectedClusters::C255).unwrap()
}

/// Writes what kvstoremesh would mirror for peer `west` (ID `id`) with `n` IPs.
async fn seed(store: &MemoryStore, id: u32, n: u32, heartbeat: time::OffsetDateTime) {
    let west = name("west");
    let cfg = ClusterConfig {
        id: cid(id),
        name: west.clone(),
        max_connected_clusters: MaxConnectedClusters::C255,
        capabilities: Capabilities::default(),
    };
    store
        .put(
            &Key::CacheClusterConfig(west.clone()).to_string(),
            &encode(&cfg),
            None,
        )
        .await
        .unwrap();
    store
        .put(
            &Key::CacheHeartbeat(west.clone()).to_string(),
            &encode_time(heartbeat),
            None,
        )
        .await
        .unwrap();
    for kind in StateKind::ALL {
        let k = Key::CacheSynced {
            cluster: west.clone(),
            kind,
        };
        store.put(&k.to_string(), b"x", None).await.unwrap();
    }
    for i in 0..n {
        put_ip(store, id, i).await;
    }
}

async fn put_ip(store: &MemoryStore, id: u32, i: u32) {
    let ip: std::net::IpAddr = [198, 18, 2, i as u8].into();
    let m = MaxConnectedClusters::C255;
    let e = IpCacheEntry {
        ip,
        prefix_len: 32,
        identity: Identity::cluster_scoped(cid(id), 300, m).unwrap(),
        host_ip: None,
        node: None,
        namespace: None,
        pod: None,
        named_ports: Default::default(),
    };
    let k = Key::Cache(StateKey::Ip {
        cluster: name("west"),
        ip,
    });
    store.put(&k.to_string(), &encode(&e), None).await.unwrap();
}

fn cfg() -> SupervisorConfig {
    let mut c = SupervisorConfig::new(name("east"), cid(1), MaxConnectedClusters::C255);
    c.heartbeat_check = Duration::from_secs(1);
    c.sync_timeout = Duration::from_secs(5);
    c
}

fn spawn(
    store: &MemoryStore,
    cfg: SupervisorConfig,
    ids: &IdRegistry,
) -> (RemoteCluster, mpsc::Receiver<ClusterEvent>) {
    let (tx, rx) = mpsc::channel(1024);
    let r = RemoteCluster::spawn(
        name("west"),
        ClusterSource::Cached(Arc::new(store.clone())),
        cfg,
        ids.clone(),
        ReflectorMetrics::default(),
        tx,
    );
    (r, rx)
}

async fn wait_state(r: &RemoteCluster, want: PeerState) -> PeerStatus {
    let mut rx = r.subscribe();
    tokio::time::timeout(Duration::from_secs(120), rx.wait_for(|s| s.state == want))
        .await
        .unwrap_or_else(|_| panic!("never reached {want}: {:?}", r.status()))
        .unwrap()
        .clone()
}

/// Receives events until `pred` matches one (bounded); returns all received.
async fn until(
    rx: &mut mpsc::Receiver<ClusterEvent>,
    pred: impl Fn(&ClusterEvent) -> bool,
) -> Vec<ClusterEvent> {
    let mut out = Vec::new();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(120), rx.recv())
            .await
            .expect("event in time")
            .expect("sink open");
        let stop = pred(&ev);
        out.push(ev);
        if stop {
            return out;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn connects_lists_and_follows_then_drains_on_stop() {
    let store = MemoryStore::new();
    seed(&store, 2, 3, time::OffsetDateTime::now_utc()).await;
    let ids = IdRegistry::default();
    let (r, mut rx) = spawn(&store, cfg(), &ids);
    let first = until(&mut rx, |e| matches!(e, ClusterEvent::Config { .. })).await;
    assert!(matches!(&first[0], ClusterEvent::Config { config, .. } if config.id == cid(2)));
    let st = wait_state(&r, PeerState::Ready).await;
    assert_eq!(st.synced.len(), 4);
    assert_eq!(st.counts.get("ip"), Some(&3));
    assert!(st.connected);
    put_ip(&store, 2, 9).await;
    let nine: std::net::IpAddr = [198, 18, 2, 9].into();
    let evs = until(
        &mut rx,
        |e| matches!(e, ClusterEvent::Apply { key: StateKey::Ip { ip, .. }, .. } if *ip == nine),
    )
    .await;
    assert!(evs.iter().any(|e| matches!(
        e,
        ClusterEvent::InitDone {
            kind: StateKind::Ip,
            ..
        }
    )));
    r.stop().await;
    let rest = until(&mut rx, |e| matches!(e, ClusterEvent::Drain { .. })).await;
    assert!(
        matches!(rest.last(), Some(ClusterEvent::Drain { cluster }) if *cluster == name("west"))
    );
    assert!(ids.0.lock().unwrap().is_empty(), "ID claim released");
}

#[tokio::test(start_paused = true)]
async fn refuses_our_id_and_a_clashing_peer() {
    let store = MemoryStore::new();
    seed(&store, 1, 1, time::OffsetDateTime::now_utc()).await;
    let ids = IdRegistry::default();
    let (r, _rx) = spawn(&store, cfg(), &ids);
    let st = wait_state(&r, PeerState::Refused).await;
    assert!(st.last_error.unwrap().contains("is ours"));
    r.stop().await;

    let store = MemoryStore::new();
    seed(&store, 5, 1, time::OffsetDateTime::now_utc()).await;
    ids.claim(cid(5), &name("north")).unwrap();
    let (r, _rx) = spawn(&store, cfg(), &ids);
    let st = wait_state(&r, PeerState::Refused).await;
    assert!(
        st.last_error
            .unwrap()
            .contains("already used by connected peer north")
    );
    // The other peer goes away: the next attempt succeeds.
    ids.release(&name("north"));
    wait_state(&r, PeerState::Ready).await;
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn mode_mismatch_is_refused() {
    let store = MemoryStore::new();
    seed(&store, 2, 1, time::OffsetDateTime::now_utc()).await;
    let mut c = cfg();
    c.mode = MaxConnectedClusters::C511;
    c.local_id = ClusterId::new(1, MaxConnectedClusters::C511).unwrap();
    let (r, _rx) = spawn(&store, c, &IdRegistry::default());
    let st = wait_state(&r, PeerState::Refused).await;
    assert!(st.last_error.unwrap().contains("max-connected-clusters"));
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn stale_heartbeat_fails_and_reconnect_relists() {
    let store = MemoryStore::new();
    seed(
        &store,
        2,
        2,
        time::OffsetDateTime::now_utc() - time::Duration::minutes(10),
    )
    .await;
    let (r, mut rx) = spawn(&store, cfg(), &IdRegistry::default());
    let st = wait_state(&r, PeerState::Backoff).await;
    assert!(
        st.last_error.unwrap().contains("heartbeat"),
        "stale at connect"
    );
    assert!(st.failures >= 1 && st.last_failure.is_some());
    // Fresh heartbeat: it connects and lists; the consumer sees Init for every kind.
    store
        .put(
            &Key::CacheHeartbeat(name("west")).to_string(),
            &encode_time(time::OffsetDateTime::now_utc()),
            None,
        )
        .await
        .unwrap();
    wait_state(&r, PeerState::Ready).await;
    let evs = until(&mut rx, |e| {
        matches!(
            e,
            ClusterEvent::InitDone {
                kind: StateKind::Services,
                ..
            }
        )
    })
    .await;
    assert!(evs.iter().any(|e| matches!(
        e,
        ClusterEvent::Init {
            kind: StateKind::Ip,
            ..
        }
    )));
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn unreachable_past_the_cache_ttl_drains() {
    let store = MemoryStore::new();
    seed(&store, 2, 2, time::OffsetDateTime::now_utc()).await;
    let mut c = cfg();
    c.cache_ttl = Duration::from_secs(30);
    let (r, mut rx) = spawn(&store, c, &IdRegistry::default());
    wait_state(&r, PeerState::Ready).await;
    // Every request fails from now on: the data stays for 30 s, then is drained once.
    store.fail_next(usize::MAX);
    store.break_watches();
    let start = tokio::time::Instant::now();
    until(&mut rx, |e| matches!(e, ClusterEvent::Drain { .. })).await;
    assert!(start.elapsed() >= Duration::from_secs(30));
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn stop_keep_data_does_not_drain() {
    let store = MemoryStore::new();
    seed(&store, 2, 1, time::OffsetDateTime::now_utc()).await;
    let (r, mut rx) = spawn(&store, cfg(), &IdRegistry::default());
    wait_state(&r, PeerState::Ready).await;
    r.stop_keep_data().await;
    let mut rest = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        rest.push(ev);
    }
    assert!(
        !rest.iter().any(|e| matches!(e, ClusterEvent::Drain { .. })),
        "{rest:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_cache_ttl_counts_from_the_latest_outage() {
    let store = MemoryStore::new();
    seed(&store, 2, 2, time::OffsetDateTime::now_utc()).await;
    let mut c = cfg();
    c.cache_ttl = Duration::from_secs(30);
    let (r, mut rx) = spawn(&store, c, &IdRegistry::default());
    wait_state(&r, PeerState::Ready).await;
    // A 20 s outage (shorter than the TTL), then recovery.
    store.fail_next(usize::MAX);
    store.break_watches();
    wait_state(&r, PeerState::Backoff).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    store.fail_next(0);
    wait_state(&r, PeerState::Ready).await;
    // A second outage: the data must stay for a full TTL from its start.
    while rx.try_recv().is_ok() {}
    store.fail_next(usize::MAX);
    store.break_watches();
    let start = tokio::time::Instant::now();
    let evs = until(&mut rx, |e| matches!(e, ClusterEvent::Drain { .. })).await;
    assert!(
        start.elapsed() >= Duration::from_secs(30),
        "drained {:?} into the second outage: {evs:?}",
        start.elapsed()
    );
    r.stop().await;
}
