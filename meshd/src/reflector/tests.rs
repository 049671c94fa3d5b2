//! Reflector unit tests over the in-memory store with paused time.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::keys::{Key, encode};
use crate::kv::MemoryStore;
use crate::model::{ClusterId, Identity, IpCacheEntry, MaxConnectedClusters};

fn east() -> ClusterName {
    ClusterName::new("east").unwrap()
}

fn ip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i))
}

fn key(i: u32) -> String {
    Key::State(StateKey::Ip {
        cluster: east(),
        ip: ip(i),
    })
    .to_string()
}

fn value(i: u32, local: u32) -> Vec<u8> {
    let m = MaxConnectedClusters::C255;
    encode(&IpCacheEntry {
        ip: ip(i),
        prefix_len: 32,
        identity: Identity::cluster_scoped(ClusterId::new(1, m).unwrap(), local, m).unwrap(),
        host_ip: None,
        node: None,
        namespace: None,
        pod: None,
        named_ports: Default::default(),
    })
}

fn codec() -> StateCodec {
    let m = MaxConnectedClusters::C255;
    StateCodec {
        kind: StateKind::Ip,
        cluster: east(),
        cached: false,
        scope: Some(IdentityScope {
            cluster_id: ClusterId::new(1, m).unwrap(),
            mode: m,
        }),
    }
}

fn reflector(store: &MemoryStore, page: usize) -> (Reflector<StateCodec>, ReflectorMetrics) {
    let metrics = ReflectorMetrics::default();
    let c = codec();
    let cfg = ReflectorConfig {
        page_size: page,
        ..c.reflector_config()
    };
    (
        Reflector::new(Arc::new(store.clone()), c.prefix(), c, cfg, metrics.clone()),
        metrics,
    )
}

/// A consumer's view: IP → identity.
type View = BTreeMap<IpAddr, u32>;

fn apply(view: &mut View, ev: &Event<StateKey, StateValue>) {
    match ev {
        Event::InitApply(_, StateValue::Ip(e)) | Event::Apply(_, StateValue::Ip(e)) => {
            view.insert(e.ip, e.identity.get());
        }
        Event::Delete(StateKey::Ip { ip, .. }) => {
            view.remove(ip);
        }
        _ => {}
    }
}

async fn store_view(store: &MemoryStore) -> View {
    let all = store.list_all(&codec().prefix(), 1000).await.unwrap();
    let c = codec();
    all.kvs
        .iter()
        .filter_map(|kv| {
            let k = c.decode_key(&kv.key).ok()?;
            match c.decode_value(&k, &kv.value).ok()? {
                StateValue::Ip(e) => Some((e.ip, e.identity.get())),
                _ => None,
            }
        })
        .collect()
}

/// Pulls events until the view equals the store (bounded by `max` events).
async fn converge(r: &mut Reflector<StateCodec>, view: &mut View, store: &MemoryStore) {
    let want = store_view(store).await;
    for _ in 0..100_000 {
        if *view == want
            && r.pending.is_empty()
            && matches!(r.state, State::Watch { .. } | State::Watching { .. })
        {
            return;
        }
        let ev = tokio::time::timeout(Duration::from_secs(120), r.next())
            .await
            .expect("reflector made progress");
        if let Ok(ev) = ev {
            apply(view, &ev);
        }
    }
    panic!(
        "did not converge: view {} keys, store {} keys",
        view.len(),
        want.len()
    );
}

#[tokio::test(start_paused = true)]
async fn list_in_pages_then_watch() {
    let store = MemoryStore::new();
    for i in 0..25 {
        store.put(&key(i), &value(i, 300), None).await.unwrap();
    }
    let (mut r, _) = reflector(&store, 10);
    assert_eq!(r.next().await.unwrap(), Event::Init);
    let mut n = 0;
    loop {
        match r.next().await.unwrap() {
            Event::InitApply(..) => n += 1,
            Event::InitDone => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(n, 25);
    assert!(r.has_synced());
    store.put(&key(3), &value(3, 400), None).await.unwrap();
    store.delete(&key(4)).await.unwrap();
    match r.next().await.unwrap() {
        Event::Apply(StateKey::Ip { ip: got, .. }, StateValue::Ip(e)) => {
            assert_eq!(got, ip(3));
            assert_eq!(e.identity.get() & 0xffff, 400);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(
        r.next().await.unwrap(),
        Event::Delete(StateKey::Ip { ip: got, .. }) if got == ip(4)
    ));
    assert_eq!(r.len(), 24);
}

#[tokio::test(start_paused = true)]
async fn compaction_relists_and_sweeps() {
    let store = MemoryStore::new();
    for i in 0..50 {
        store.put(&key(i), &value(i, 300), None).await.unwrap();
    }
    let (mut r, metrics) = reflector(&store, 7);
    let mut view = View::new();
    converge(&mut r, &mut view, &store).await;
    // Break the watch, change things while it is down, compact past the watch revision.
    store.break_watches();
    for i in 0..10 {
        store.delete(&key(i)).await.unwrap();
    }
    for i in 50..60 {
        store.put(&key(i), &value(i, 301), None).await.unwrap();
    }
    store.compact(store.revision());
    converge(&mut r, &mut view, &store).await;
    assert_eq!(view.len(), 50);
    let relists = metrics
        .relists
        .get_or_create(&SourceLabels {
            cluster: "east".into(),
            kind: "ip".into(),
        })
        .get();
    assert_eq!(relists, 2);
}

#[tokio::test(start_paused = true)]
async fn compacted_watch_start_relists() {
    let store = MemoryStore::new();
    store.put(&key(1), &value(1, 300), None).await.unwrap();
    let (mut r, _) = reflector(&store, 100);
    let mut view = View::new();
    converge(&mut r, &mut view, &store).await;
    store.put(&key(2), &value(2, 300), None).await.unwrap();
    store.delete(&key(1)).await.unwrap();
    // Compaction while the watch is open: the memory store ends the watch with Compacted
    // only for watches behind the compaction point, so break it as etcd would.
    store.compact(store.revision());
    store.break_watches();
    let err = loop {
        match r.next().await {
            Err(e) => break e,
            Ok(ev) => apply(&mut view, &ev),
        }
    };
    assert_eq!(err.step, "watch");
    converge(&mut r, &mut view, &store).await;
    assert_eq!(view.keys().copied().collect::<Vec<_>>(), vec![ip(2)]);
}

#[tokio::test(start_paused = true)]
async fn errors_are_items_and_back_off() {
    let store = MemoryStore::new();
    store.put(&key(1), &value(1, 300), None).await.unwrap();
    store.fail_next(3);
    let (mut r, _) = reflector(&store, 100);
    let start = Instant::now();
    for _ in 0..3 {
        let e = r.next().await.unwrap_err();
        assert_eq!(e.step, "list");
        assert!(e.retry_in > Duration::ZERO);
        assert!(e.to_string().contains("injected failure"), "{e}");
    }
    let mut view = View::new();
    converge(&mut r, &mut view, &store).await;
    // Three jittered delays of 100-200, 200-400, 400-800 ms elapsed (paused clock).
    assert!(start.elapsed() >= Duration::from_millis(350));
    assert_eq!(view.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn bad_entries_dropped_counted_and_watch_goes_on() {
    let store = MemoryStore::new();
    let prefix = codec().prefix();
    store.put(&key(1), &value(1, 300), None).await.unwrap();
    store
        .put(&format!("{prefix}not-an-ip"), b"{}", None)
        .await
        .unwrap();
    store.put(&key(2), b"{garbage", None).await.unwrap();
    // Identity of cluster 2 under cluster east (ID 1).
    let foreign = encode(&IpCacheEntry {
        identity: Identity::from_raw(2 << 16 | 300).unwrap(),
        ..serde_json::from_slice::<IpCacheEntry>(&value(3, 300)).unwrap()
    });
    store.put(&key(3), &foreign, None).await.unwrap();
    let (mut r, metrics) = reflector(&store, 100);
    let mut view = View::new();
    converge(&mut r, &mut view, &store).await;
    assert_eq!(view.len(), 1);
    assert_eq!(metrics.dropped_total("east", "bad-key"), 1);
    assert_eq!(metrics.dropped_total("east", "bad-value"), 1);
    assert_eq!(metrics.dropped_total("east", "identity-out-of-range"), 1);
    // A good key turning bad is deleted downstream; the watch continues.
    store.put(&key(1), b"[]", None).await.unwrap();
    store.put(&key(5), &value(5, 300), None).await.unwrap();
    assert!(matches!(r.next().await.unwrap(), Event::Delete(_)));
    assert!(matches!(r.next().await.unwrap(), Event::Apply(..)));
    assert_eq!(metrics.dropped_total("east", "bad-value"), 2);
}
