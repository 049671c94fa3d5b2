//! The exporter against real etcd: concurrent replicas, restart without churn, incremental
//! changes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use clustermesh_apiserver::export::ExportConfig;
use clustermesh_apiserver::source::{ChannelSource, Object, ObjectKind, ObjectRef, SourceEvent};
use futures::StreamExt;
use mesh_tests::exporter::RunningExporter;
use mesh_tests::objects::{endpoint_slice, node, pod, service, test_ip};
use mesh_tests::{EtcdGuard, init_tracing};
use meshd::keys::{self, Key, StateKey, StateKind};
use meshd::kv::{KvStore, WatchEvent};
use meshd::model::{
    ClusterId, ClusterName, ClusterService, IdentityEntry, IpCacheEntry, MaxConnectedClusters,
};

const READY: Duration = Duration::from_secs(60);

fn cfg(replica: &str) -> ExportConfig {
    let m = MaxConnectedClusters::C255;
    let mut c = ExportConfig::new(
        ClusterName::new("east").unwrap(),
        ClusterId::new(1, m).unwrap(),
        m,
    );
    c.replica = replica.into();
    c
}

/// 300 pods over 60 label sets, 3 nodes, 10 services (5 global) with slices.
fn objects() -> Vec<Object> {
    let mut v = Vec::new();
    for n in 0..3 {
        v.push(Object::Node(Box::new(node(
            &format!("node-{n}"),
            test_ip(60_000 + n),
            &format!("198.18.{}.0/24", 100 + n),
        ))));
    }
    for i in 0..300u32 {
        let app = format!("app-{}", i % 60);
        v.push(Object::Pod(Box::new(pod(
            "default",
            &format!("pod-{i}"),
            &[("app", &app)],
            test_ip(1_000 + i),
            &format!("node-{}", i % 3),
        ))));
    }
    for s in 0..10u32 {
        let name = format!("svc-{s}");
        v.push(Object::Service(Box::new(service(
            "default",
            &name,
            test_ip(70_000 + s),
            s % 2 == 0,
        ))));
        v.push(Object::EndpointSlice(Box::new(endpoint_slice(
            "default",
            &format!("{name}-abc"),
            &name,
            &[test_ip(1_000 + s), test_ip(1_100 + s)],
        ))));
    }
    v
}

async fn feed(tx: &tokio::sync::mpsc::Sender<SourceEvent>, objs: Vec<Object>) {
    for o in objs {
        tx.send(SourceEvent::Apply(o)).await.unwrap();
    }
    tx.send(SourceEvent::Synced).await.unwrap();
}

async fn snapshot(store: &dyn KvStore, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    store
        .list_all(prefix, 1000)
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| (String::from_utf8(kv.key).unwrap(), kv.value))
        .collect()
}

/// Polls until `f` holds for the store (bounded).
async fn eventually<F: AsyncFn() -> bool>(what: &str, f: F) {
    mesh_tests::util::eventually(what, Duration::from_secs(30), async || f().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_give_one_label_set_two_ids() {
    init_tracing();
    let etcd = EtcdGuard::start().await.unwrap();
    let store: Arc<dyn KvStore> = Arc::new(etcd.root_store().await.unwrap());
    let (tx_a, src_a) = ChannelSource::new(1024);
    let (tx_b, src_b) = ChannelSource::new(1024);
    let mut a = RunningExporter::start(store.clone(), cfg("replica-a"), Box::new(src_a));
    let mut b = RunningExporter::start(store.clone(), cfg("replica-b"), Box::new(src_b));
    let objs = objects();
    let mut reversed = objs.clone();
    reversed.reverse();
    tokio::join!(feed(&tx_a, objs), feed(&tx_b, reversed));
    a.wait_ready(READY).await.unwrap();
    b.wait_ready(READY).await.unwrap();

    let east = ClusterName::new("east").unwrap();
    let ids = snapshot(&*store, &keys::state_prefix(StateKind::Identities, &east)).await;
    let index = snapshot(&*store, &format!("{}east/", keys::IDENTITY_INDEX_PREFIX)).await;
    assert_eq!(ids.len(), 60, "one identity per label set");
    assert_eq!(index.len(), 60);
    let mut by_labels = HashMap::new();
    for (k, v) in &ids {
        let e: IdentityEntry = serde_json::from_slice(v).unwrap();
        assert!(k.ends_with(&format!("/{}", e.id)));
        assert!(
            by_labels.insert(e.labels.clone(), e.id).is_none(),
            "label set {} has two identities",
            e.labels
        );
    }
    // Every ipcache entry carries the identity of its pod's label set, whoever wrote it.
    eventually("300 ipcache entries", async || {
        snapshot(&*store, &keys::state_prefix(StateKind::Ip, &east))
            .await
            .len()
            == 300
    })
    .await;
    for (_, v) in snapshot(&*store, &keys::state_prefix(StateKind::Ip, &east)).await {
        let e: IpCacheEntry = serde_json::from_slice(&v).unwrap();
        assert!(by_labels.values().any(|id| *id == e.identity));
    }
    // Both replicas hold references.
    let refs = snapshot(&*store, &format!("{}east/", keys::IDENTITY_REFS_PREFIX)).await;
    assert_eq!(refs.len(), 120);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_an_unchanged_source_writes_nothing() {
    init_tracing();
    let etcd = EtcdGuard::start().await.unwrap();
    let store: Arc<dyn KvStore> = Arc::new(etcd.root_store().await.unwrap());
    let (tx, src) = ChannelSource::new(1024);
    let mut first = RunningExporter::start(store.clone(), cfg("replica-a"), Box::new(src));
    feed(&tx, objects()).await;
    first.wait_ready(READY).await.unwrap();
    let east = ClusterName::new("east").unwrap();
    eventually("services exported", async || {
        snapshot(&*store, &keys::state_prefix(StateKind::Services, &east))
            .await
            .len()
            == 5
    })
    .await;
    first.stop().await.unwrap();
    let before = snapshot(&*store, "mesh/").await;

    // Watch everything from now on, then restart with the same objects.
    let rev = etcd.revision().await.unwrap();
    let mut watch = store.watch("mesh/", rev + 1).await.unwrap();
    let (tx, src) = ChannelSource::new(1024);
    let mut second = RunningExporter::start(store.clone(), cfg("replica-a"), Box::new(src));
    feed(&tx, objects()).await;
    second.wait_ready(READY).await.unwrap();
    second.stop().await.unwrap();
    // A marker write after the stop bounds the events to read.
    store.put("mesh/test-end", b"", None).await.unwrap();
    let mut churn = Vec::new();
    'outer: while let Some(batch) = watch.next().await {
        for ev in batch.unwrap().events {
            let key = match &ev {
                WatchEvent::Put(kv) => String::from_utf8_lossy(&kv.key).into_owned(),
                WatchEvent::Delete { key, .. } => String::from_utf8_lossy(key).into_owned(),
            };
            if key == "mesh/test-end" {
                break 'outer;
            }
            // The heartbeat changes by design; identity references are leased per run.
            if key == keys::HEARTBEAT || key.starts_with(keys::IDENTITY_REFS_PREFIX) {
                continue;
            }
            churn.push(key);
        }
    }
    assert!(
        churn.is_empty(),
        "restart rewrote {} keys: {:?}",
        churn.len(),
        &churn[..churn.len().min(10)]
    );
    let mut after = snapshot(&*store, "mesh/").await;
    after.remove("mesh/test-end");
    let strip = |m: &BTreeMap<String, Vec<u8>>| -> Vec<String> {
        m.keys()
            .filter(|k| *k != keys::HEARTBEAT && !k.starts_with(keys::IDENTITY_REFS_PREFIX))
            .cloned()
            .collect()
    };
    assert_eq!(strip(&before), strip(&after));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_are_exported_incrementally_and_stale_keys_removed_at_start() {
    init_tracing();
    let etcd = EtcdGuard::start().await.unwrap();
    let store: Arc<dyn KvStore> = Arc::new(etcd.root_store().await.unwrap());
    let east = ClusterName::new("east").unwrap();
    // A leftover from an earlier run that the source no longer has.
    let stale = Key::State(StateKey::Ip {
        cluster: east.clone(),
        ip: test_ip(99_999).into(),
    })
    .to_string();
    store.put(&stale, b"{}", None).await.unwrap();
    let (tx, src) = ChannelSource::new(1024);
    let mut ex = RunningExporter::start(store.clone(), cfg("replica-a"), Box::new(src));
    feed(&tx, objects()).await;
    let status = ex.wait_ready(READY).await.unwrap();
    assert_eq!(status.synced.len(), 4);
    assert!(
        store.get(&stale).await.unwrap().is_none(),
        "stale key swept"
    );
    for kind in StateKind::ALL {
        let k = Key::Synced {
            cluster: east.clone(),
            kind,
        }
        .to_string();
        assert!(store.get(&k).await.unwrap().is_some(), "{k}");
    }
    let cfg_key = Key::ClusterConfig(east.clone()).to_string();
    let cc = keys::decode_cluster_config(&east, &store.get(&cfg_key).await.unwrap().unwrap().value)
        .unwrap();
    assert_eq!(cc.id.get(), 1);
    assert!(store.get(keys::HEARTBEAT).await.unwrap().is_some());

    // A label change moves the pod to another identity.
    let ip_key = Key::State(StateKey::Ip {
        cluster: east.clone(),
        ip: test_ip(1_000).into(),
    })
    .to_string();
    let before: IpCacheEntry =
        serde_json::from_slice(&store.get(&ip_key).await.unwrap().unwrap().value).unwrap();
    tx.send(SourceEvent::Apply(Object::Pod(Box::new(pod(
        "default",
        "pod-0",
        &[("app", "brand-new")],
        test_ip(1_000),
        "node-0",
    )))))
    .await
    .unwrap();
    eventually("identity change", async || {
        let e: IpCacheEntry =
            serde_json::from_slice(&store.get(&ip_key).await.unwrap().unwrap().value).unwrap();
        e.identity != before.identity
    })
    .await;
    // Deleting the pod deletes its entry; a service that stops being global goes away.
    tx.send(SourceEvent::Delete(ObjectRef {
        kind: ObjectKind::Pod,
        namespace: "default".into(),
        name: "pod-0".into(),
    }))
    .await
    .unwrap();
    tx.send(SourceEvent::Apply(Object::Service(Box::new(service(
        "default",
        "svc-0",
        test_ip(70_000),
        false,
    )))))
    .await
    .unwrap();
    let svc_key = Key::State(StateKey::Service {
        cluster: east.clone(),
        namespace: "default".into(),
        name: "svc-0".into(),
    })
    .to_string();
    eventually("pod and service removed", async || {
        store.get(&ip_key).await.unwrap().is_none() && store.get(&svc_key).await.unwrap().is_none()
    })
    .await;
    // The remaining global service carries its ready backends and ports.
    let k = Key::State(StateKey::Service {
        cluster: east.clone(),
        namespace: "default".into(),
        name: "svc-2".into(),
    })
    .to_string();
    let s: ClusterService =
        serde_json::from_slice(&store.get(&k).await.unwrap().unwrap().value).unwrap();
    assert!(s.global && s.shared && !s.headless);
    assert_eq!(s.backends.len(), 2);
    assert_eq!(s.ports[0].port, 80);
    assert_eq!(s.frontends, vec![std::net::IpAddr::from(test_ip(70_002))]);
    ex.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_identities_are_collected_after_the_grace_period_on_real_etcd() {
    use clustermesh_apiserver::allocator::{AllocatorConfig, IdentityAllocator};
    use meshd::model::Labels;
    init_tracing();
    let etcd = EtcdGuard::start().await.unwrap();
    let store: Arc<dyn KvStore> = Arc::new(etcd.root_store().await.unwrap());
    let m = MaxConnectedClusters::C255;
    let cfg = |owner: &str| AllocatorConfig {
        cluster: ClusterName::new("east").unwrap(),
        cluster_id: ClusterId::new(1, m).unwrap(),
        mode: m,
        owner: owner.into(),
        gc_grace: Duration::from_millis(300),
    };
    let lease = store.lease_grant(Duration::from_secs(60)).await.unwrap();
    let mut a = IdentityAllocator::new(store.clone(), cfg("a"), lease)
        .await
        .unwrap();
    let mut b = IdentityAllocator::new(store.clone(), cfg("b"), lease)
        .await
        .unwrap();
    let l = |app: &str| {
        Labels::parse([
            format!("k8s:app={app}").as_str(),
            "mesh:io.meshd.cluster=east",
        ])
        .unwrap()
    };
    let web = a.acquire(&l("web")).await.unwrap();
    let db = a.acquire(&l("db")).await.unwrap();
    assert_eq!(b.acquire(&l("db")).await.unwrap(), db);
    a.release(&l("db"));
    a.sweep().await.unwrap();
    // db is still referenced by b; web by a: nothing may be collected, however long.
    assert_eq!(b.gc().await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(b.gc().await.unwrap(), 0, "referenced identities survive GC");
    // Once b lets go too, db goes after the grace period (the prefix compare on real etcd
    // sees that no reference is left), web stays.
    b.release(&l("db"));
    b.sweep().await.unwrap();
    assert_eq!(b.gc().await.unwrap(), 0, "grace period starts now");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(b.gc().await.unwrap(), 1);
    let ids = snapshot(&*store, "mesh/state/identities/v1/east/").await;
    assert_eq!(ids.len(), 1);
    assert!(ids.keys().next().unwrap().ends_with(&format!("/{web}")));
    assert!(
        snapshot(&*store, &format!("{}east/", keys::IDENTITY_INDEX_PREFIX))
            .await
            .len()
            == 1
    );
}
