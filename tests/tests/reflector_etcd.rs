//! The reflector against a real etcd (TLS, client-cert auth, auth on): paging, live
//! changes, compaction, etcd restarts and malformed data.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use mesh_tests::{EtcdGuard, Mirror, init_tracing};
use meshd::keys::{IdentityScope, Key, StateKey, StateKind, encode};
use meshd::kv::{EtcdStore, KvStore, Op, Txn};
use meshd::metrics::ReflectorMetrics;
use meshd::model::{ClusterId, ClusterName, Identity, IpCacheEntry, MaxConnectedClusters};
use meshd::reflector::{Event, Reflector, ReflectorConfig, StateCodec};

const CONVERGE: Duration = Duration::from_secs(120);

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
        host_ip: Some(IpAddr::V4(Ipv4Addr::new(198, 19, 0, 1))),
        node: Some("node-1".into()),
        namespace: Some("default".into()),
        pod: Some(format!("pod-{i}")),
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

fn reflector(store: &EtcdStore, metrics: &ReflectorMetrics) -> Reflector<StateCodec> {
    let c = codec();
    let cfg = ReflectorConfig {
        page_size: 500,
        backoff: meshd::backoff::BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        },
        ..c.reflector_config()
    };
    Reflector::new(Arc::new(store.clone()), c.prefix(), c, cfg, metrics.clone())
}

/// Writes keys `range` in transactions of up to 100 puts (etcd's default max ops is 128).
async fn put_many(store: &EtcdStore, range: std::ops::Range<u32>, local: u32) {
    let ids: Vec<u32> = range.collect();
    for chunk in ids.chunks(100) {
        let success = chunk
            .iter()
            .map(|i| Op::Put {
                key: key(*i),
                value: value(*i, local),
                lease: None,
            })
            .collect();
        store
            .txn(Txn {
                success,
                ..Txn::default()
            })
            .await
            .unwrap();
    }
}

async fn converge(mirror: &Mirror<StateCodec>, store: &EtcdStore) -> usize {
    let c = codec();
    match mirror
        .wait_converged(store, &c.prefix(), &c, CONVERGE)
        .await
    {
        Ok(n) => n,
        Err((stale, missing)) => panic!("did not converge: {stale} stale, {missing} missing"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_10k_in_pages_then_follows_10k_live_changes() {
    init_tracing();
    let etcd = EtcdGuard::start().await.unwrap();
    let store = etcd.root_store().await.unwrap();
    put_many(&store, 0..10_000, 300).await;
    let metrics = ReflectorMetrics::default();
    let mut r = reflector(&store, &metrics);
    // The initial list arrives as Init, 10k InitApply, InitDone, from 20 pages.
    assert_eq!(r.next().await.unwrap(), Event::Init);
    let mut seed = HashMap::new();
    loop {
        match r.next().await.unwrap() {
            Event::InitApply(k, v) => {
                seed.insert(k, v);
            }
            Event::InitDone => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seed.len(), 10_000);
    let mirror = Mirror::spawn_seeded(r, seed);
    // 10k live changes: 5k updates, 2.5k deletes, 2.5k creates.
    put_many(&store, 0..5_000, 301).await;
    let deletes: Vec<u32> = (5_000..7_500).collect();
    for chunk in deletes.chunks(100) {
        let success = chunk.iter().map(|i| Op::Delete(key(*i))).collect();
        store
            .txn(Txn {
                success,
                ..Txn::default()
            })
            .await
            .unwrap();
    }
    put_many(&store, 10_000..12_500, 302).await;
    assert_eq!(converge(&mirror, &store).await, 10_000);
    assert_eq!(mirror.stats().errors.load(Ordering::Relaxed), 0);
    assert_eq!(
        mirror.stats().init_done.load(Ordering::Relaxed),
        0,
        "no relist needed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_past_the_watch_revision_relists_and_sweeps() {
    init_tracing();
    let etcd = EtcdGuard::start().await.unwrap();
    let store = etcd.root_store().await.unwrap();
    put_many(&store, 0..2_000, 300).await;
    let metrics = ReflectorMetrics::default();
    let mut r = reflector(&store, &metrics);
    let mut seen = HashMap::new();
    loop {
        match r.next().await.unwrap() {
            Event::InitApply(k, v) => {
                seen.insert(k, v);
            }
            Event::InitDone => break,
            _ => {}
        }
    }
    assert_eq!(seen.len(), 2_000);
    // The reflector has listed at revision R and will watch from R+1. Before it does,
    // delete and add keys and compact history past R: the watch must be refused and
    // the reflector must relist and delete what is gone.
    for i in 0..500 {
        store.delete(&key(i)).await.unwrap();
    }
    put_many(&store, 2_000..2_300, 300).await;
    let rev = etcd.revision().await.unwrap();
    etcd.compact(rev).await.unwrap();
    let mut deleted = HashSet::new();
    let mut compacted_error = false;
    loop {
        match r.next().await {
            Err(e) => {
                assert!(
                    matches!(e.source, meshd::kv::KvError::Compacted { .. }),
                    "unexpected error {e}"
                );
                compacted_error = true;
            }
            Ok(Event::Delete(k)) => {
                deleted.insert(k);
            }
            Ok(Event::InitApply(k, v)) => {
                seen.insert(k, v);
            }
            Ok(Event::InitDone) => break,
            Ok(_) => {}
        }
    }
    assert!(
        compacted_error,
        "the watch from a compacted revision must fail"
    );
    assert_eq!(deleted.len(), 500, "every deleted key is swept");
    for k in &deleted {
        seen.remove(k);
    }
    assert_eq!(seen.len(), 1_800);
    let relists = metrics
        .relists
        .get_or_create(&meshd::metrics::SourceLabels {
            cluster: "east".into(),
            kind: "ip".into(),
        })
        .get();
    assert_eq!(relists, 2);
    // And it keeps following live changes afterwards.
    let mirror = Mirror::spawn_seeded(r, seen);
    put_many(&store, 3_000..3_100, 300).await;
    store.delete(&key(600)).await.unwrap();
    assert_eq!(converge(&mirror, &store).await, 1_899);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_killed_while_keys_change_then_restarted_converges() {
    init_tracing();
    let mut etcd = EtcdGuard::start().await.unwrap();
    let store = etcd.root_store().await.unwrap();
    put_many(&store, 0..1_000, 300).await;
    let metrics = ReflectorMetrics::default();
    let mirror = Mirror::spawn(reflector(&store, &metrics));
    converge(&mirror, &store).await;

    // A writer that keeps changing keys (puts, deletes), ignoring errors while etcd is down.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i: u32 = 0;
            let mut ok = 0u32;
            while !stop.load(Ordering::Relaxed) && i < 100_000 {
                let k = i % 2_000;
                let r = if i.is_multiple_of(3) {
                    store.delete(&key(k)).await.map(|_| ())
                } else {
                    store
                        .put(&key(k), &value(k, 300 + i % 7), None)
                        .await
                        .map(|_| ())
                };
                ok += u32::from(r.is_ok());
                if r.is_err() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                i += 1;
            }
            ok
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    etcd.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    etcd.restart().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(writes > 0);
    let n = converge(&mirror, &store).await;
    assert!(n > 0);
    assert!(
        mirror.stats().errors.load(Ordering::Relaxed) >= 1,
        "the outage was seen"
    );
    assert!(
        mirror.stats().init_done.load(Ordering::Relaxed) >= 2,
        "the reflector relisted after the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_entries_are_dropped_and_counted() {
    init_tracing();
    let etcd = EtcdGuard::start().await.unwrap();
    let store = etcd.root_store().await.unwrap();
    let prefix = codec().prefix();
    put_many(&store, 0..2_000, 300).await;
    // 1000 bad entries: 250 bad keys, 250 bad JSON, 250 foreign identities, 250 mismatched IPs.
    let mut bad = Vec::new();
    for i in 0..250u32 {
        bad.push((format!("{prefix}not-an-ip-{i}"), value(i, 300)));
        bad.push((key(10_000 + i), b"{\"ip\":".to_vec()));
        let m = MaxConnectedClusters::C255;
        let mut foreign: IpCacheEntry = serde_json::from_slice(&value(20_000 + i, 300)).unwrap();
        foreign.identity = Identity::cluster_scoped(ClusterId::new(9, m).unwrap(), 300, m).unwrap();
        bad.push((key(20_000 + i), encode(&foreign)));
        bad.push((key(30_000 + i), value(30_001 + i, 300)));
    }
    for chunk in bad.chunks(100) {
        let success = chunk
            .iter()
            .map(|(k, v)| Op::Put {
                key: k.clone(),
                value: v.clone(),
                lease: None,
            })
            .collect();
        store
            .txn(Txn {
                success,
                ..Txn::default()
            })
            .await
            .unwrap();
    }
    let metrics = ReflectorMetrics::default();
    let mirror = Mirror::spawn(reflector(&store, &metrics));
    assert_eq!(converge(&mirror, &store).await, 2_000);
    // The good entries can all be in before the list reaches the bad keys (`not-an-ip-…`
    // sorts after every address): wait for the list itself to be done with them.
    let reasons = ["bad-key", "bad-value", "identity-out-of-range", "mismatch"];
    mesh_tests::util::eventually("the list reaches the bad keys", CONVERGE, async || {
        reasons
            .iter()
            .all(|r| metrics.dropped_total("east", r) >= 250)
    })
    .await;
    for reason in reasons {
        assert_eq!(metrics.dropped_total("east", reason), 250, "{reason}");
    }
    // Live bad writes are dropped too, and the watch goes on.
    store.put(&key(1), b"null", None).await.unwrap();
    store
        .put(&key(5_000), &value(5_000, 300), None)
        .await
        .unwrap();
    assert_eq!(converge(&mirror, &store).await, 2_000);
    assert_eq!(metrics.dropped_total("east", "bad-value"), 251);
    assert_eq!(mirror.stats().errors.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_enforces_tls_users_and_permissions() {
    init_tracing();
    let etcd = EtcdGuard::start().await.unwrap();
    let root = etcd.root_store().await.unwrap();
    root.put("mesh/heartbeat", b"now", None).await.unwrap();
    // A client certificate from another CA is refused at the TLS layer.
    let other =
        mesh_certs::CertificateAuthority::generate("other", Duration::from_secs(3600)).unwrap();
    let cert = other
        .issue(&mesh_certs::CertRequest::client("root"))
        .unwrap();
    let mut cfg = etcd.config_for("root").unwrap();
    cfg.cert_pem = Some(cert.cert_pem);
    cfg.key_pem = Some(cert.key_pem);
    let res = match EtcdStore::connect(&cfg).await {
        Ok(s) => s.get("mesh/heartbeat").await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(res.is_err(), "a foreign-CA client must be refused");
    // A valid certificate for a user that does not exist is refused by auth.
    let nobody = EtcdStore::connect(&etcd.config_for("nobody").unwrap()).await;
    let res = match nobody {
        Ok(s) => s.get("mesh/heartbeat").await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(res.is_err(), "an unknown user must be refused");
    // A read-only user can read and watch but not write.
    let mut c = root.client();
    c.role_add("mesh-read").await.unwrap();
    c.role_grant_permission(
        "mesh-read",
        etcd_client::Permission::read("mesh/").with_prefix(),
    )
    .await
    .unwrap();
    c.user_add(
        "remote-west",
        "",
        Some(etcd_client::UserAddOptions::new().with_no_pwd()),
    )
    .await
    .unwrap();
    c.user_grant_role("remote-west", "mesh-read").await.unwrap();
    let reader = EtcdStore::connect(&etcd.config_for("remote-west").unwrap())
        .await
        .unwrap();
    assert!(reader.get("mesh/heartbeat").await.unwrap().is_some());
    let mut w = reader.watch("mesh/", 1).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.events.len(), 1);
    let err = reader.put("mesh/heartbeat", b"x", None).await.unwrap_err();
    assert!(
        matches!(err, meshd::kv::KvError::PermissionDenied { .. }),
        "{err}"
    );
}

#[test]
fn etcd_guard_cleans_up_when_a_test_panics() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // The guard lives on this thread (setpriv's parent-death signal follows the thread).
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(async {
            let etcd = EtcdGuard::start().await.unwrap();
            tx.send((etcd.pid().unwrap(), etcd.dir().to_path_buf()))
                .unwrap();
            panic!("simulated test failure");
        })
    }));
    assert!(res.is_err());
    let (pid, dir) = rx.recv().unwrap();
    // setpriv execs etcd, so the PID we killed is etcd itself.
    let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
    assert!(!alive, "etcd (pid {pid}) still running after the panic");
    assert!(!dir.exists(), "{} still exists", dir.display());
}
