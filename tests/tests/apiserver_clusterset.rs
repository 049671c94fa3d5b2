//! ClusterSetIP allocation against real etcd: two replicas, local and remote-only services.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use clustermesh_apiserver::clusterset::{
    self, CLUSTERSET_PREFIX, ClusterSetConfig, ClusterSetError, ClusterSetMetrics,
};
use mesh_tests::{EtcdGuard, init_tracing};
use meshd::keys::{self, ClusterSetIpEntry, Key, StateKey};
use meshd::kv::KvStore;
use meshd::model::{ClusterId, ClusterName, ClusterService, MaxConnectedClusters};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const CIDR: &str = "198.19.128.0/20";
/// Network and broadcast addresses of [`CIDR`].
const NETWORK: Ipv4Addr = Ipv4Addr::new(198, 19, 128, 0);
const BROADCAST: Ipv4Addr = Ipv4Addr::new(198, 19, 143, 255);

fn service(cluster: &str, id: u32, name: &str, global: bool) -> ClusterService {
    ClusterService {
        global,
        ..ClusterService::new(
            ClusterName::new(cluster).unwrap(),
            ClusterId::new(id, MaxConnectedClusters::C255).unwrap(),
            "default",
            name,
        )
    }
}

fn service_key(cached: bool, cluster: &str, name: &str) -> String {
    let sk = StateKey::Service {
        cluster: ClusterName::new(cluster).unwrap(),
        namespace: "default".into(),
        name: name.into(),
    };
    if cached {
        Key::Cache(sk).to_string()
    } else {
        Key::State(sk).to_string()
    }
}

/// Writes global service `svc-<i>`: local to east (i % 3 == 0), only in the cache of peer
/// west (i % 3 == 1, remote-only), or both (i % 3 == 2); plus one non-global service of
/// each cluster per ten.
async fn write_services(store: &dyn KvStore, range: std::ops::Range<u32>) {
    for i in range {
        let name = format!("svc-{i}");
        if i % 3 != 1 {
            let v = keys::encode(&service("east", 1, &name, true));
            store
                .put(&service_key(false, "east", &name), &v, None)
                .await
                .unwrap();
        }
        if !i.is_multiple_of(3) {
            let v = keys::encode(&service("west", 2, &name, true));
            store
                .put(&service_key(true, "west", &name), &v, None)
                .await
                .unwrap();
        }
        if i.is_multiple_of(10) {
            let local = format!("local-{i}");
            let v = keys::encode(&service("east", 1, &local, false));
            store
                .put(&service_key(false, "east", &local), &v, None)
                .await
                .unwrap();
            let peer = format!("peer-local-{i}");
            let v = keys::encode(&service("west", 2, &peer, false));
            store
                .put(&service_key(true, "west", &peer), &v, None)
                .await
                .unwrap();
        }
    }
}

/// Both key sets: `ns/name` → (address, mod revision) and address → `ns/name`.
type Snapshot = (BTreeMap<String, (IpAddr, i64)>, BTreeMap<IpAddr, String>);

async fn snapshot(store: &dyn KvStore) -> Snapshot {
    let all = store.list_all(CLUSTERSET_PREFIX, 1000).await.unwrap();
    let mut names = BTreeMap::new();
    let mut ips = BTreeMap::new();
    for kv in all.kvs {
        let e: ClusterSetIpEntry = serde_json::from_slice(&kv.value).unwrap();
        let owner = format!("{}/{}", e.namespace, e.name);
        match Key::parse_bytes(&kv.key).unwrap() {
            Key::ClusterSetIp { namespace, name } => {
                assert_eq!(owner, format!("{namespace}/{name}"));
                assert!(names.insert(owner, (e.ip, kv.mod_revision)).is_none());
            }
            Key::ClusterSetIpByIp(ip) => {
                assert_eq!(e.ip, ip);
                assert!(ips.insert(ip, owner).is_none());
            }
            other => panic!("unexpected key {other}"),
        }
    }
    (names, ips)
}

/// Asserts the two key sets are a bijection of global names onto CIDR addresses.
fn assert_bijection((names, ips): &Snapshot, expected: &[String]) {
    let mut want: Vec<String> = expected.iter().map(|n| format!("default/{n}")).collect();
    want.sort();
    let have: Vec<String> = names.keys().cloned().collect();
    assert_eq!(have, want, "exactly the global services have a name key");
    assert_eq!(ips.len(), names.len(), "one by-ip key per name key");
    for (name, (ip, _)) in names {
        let IpAddr::V4(v4) = ip else {
            panic!("{name} → {ip} is not IPv4")
        };
        assert!(
            *v4 > NETWORK && *v4 < BROADCAST,
            "{name} → {ip} is not a usable address of {CIDR}"
        );
        assert_eq!(
            ips.get(ip),
            Some(name),
            "{ip} does not point back at {name}"
        );
    }
}

async fn eventually<F: AsyncFn() -> bool>(what: &str, f: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Replica {
    metrics: ClusterSetMetrics,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ClusterSetError>>,
}

impl Replica {
    fn start(store: Arc<dyn KvStore>, grace: Duration) -> Self {
        let mut cfg = ClusterSetConfig::new(CIDR.parse().unwrap());
        cfg.grace = grace;
        cfg.gc_interval = Duration::from_millis(500);
        let metrics = cfg.metrics.clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(clusterset::run(store, cfg, shutdown.clone()));
        Self {
            metrics,
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_allocate_a_bijection_for_fifty_global_services() {
    init_tracing();
    let etcd = EtcdGuard::start().await.unwrap();
    let store: Arc<dyn KvStore> = Arc::new(etcd.root_store().await.unwrap());
    let names: Vec<String> = (0..50).map(|i| format!("svc-{i}")).collect();
    // Half before the replicas start (initial list), half after (watch).
    write_services(&*store, 0..25).await;
    let a = Replica::start(store.clone(), Duration::from_secs(300));
    let b = Replica::start(store.clone(), Duration::from_secs(300));
    write_services(&*store, 25..50).await;

    eventually("50 name keys and 50 by-ip keys", async || {
        let (n, i) = snapshot(&*store).await;
        n.len() >= 50 && i.len() >= 50
    })
    .await;
    let first = snapshot(&*store).await;
    assert_bijection(&first, &names);
    eventually("both replicas see 50 allocations", async || {
        a.metrics.allocated() == 50 && b.metrics.allocated() == 50
    })
    .await;
    // Each name was created exactly once, by one replica or the other.
    assert_eq!(
        a.metrics.allocations.get() + b.metrics.allocations.get(),
        50
    );
    assert_eq!(a.metrics.exhausted() + b.metrics.exhausted(), 0);
    assert_eq!(a.metrics.repairs.get() + b.metrics.repairs.get(), 0);

    // Several GC passes later nothing moved (same addresses, same revisions).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(snapshot(&*store).await, first);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_release_after_the_grace_and_keep_the_rest() {
    init_tracing();
    let etcd = EtcdGuard::start().await.unwrap();
    let store: Arc<dyn KvStore> = Arc::new(etcd.root_store().await.unwrap());
    let mut names: Vec<String> = (0..30).map(|i| format!("svc-{i}")).collect();
    write_services(&*store, 0..30).await;
    let grace = Duration::from_secs(2);
    let a = Replica::start(store.clone(), grace);
    let b = Replica::start(store.clone(), grace);
    eventually("30 ClusterSetIPs", async || {
        snapshot(&*store).await.0.len() == 30
    })
    .await;
    let before = snapshot(&*store).await;
    assert_bijection(&before, &names);

    // svc-0..4 disappear from every cluster; svc-5 flaps within the grace.
    for i in 0..6u32 {
        let name = format!("svc-{i}");
        store
            .delete(&service_key(false, "east", &name))
            .await
            .unwrap();
        store
            .delete(&service_key(true, "west", &name))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    write_services(&*store, 5..6).await;
    names.drain(0..5);
    eventually("25 ClusterSetIPs", async || {
        snapshot(&*store).await.0.len() == 25
    })
    .await;
    let after = snapshot(&*store).await;
    assert_bijection(&after, &names);
    for (name, v) in &after.0 {
        assert_eq!(before.0.get(name), Some(v), "{name} changed");
    }
    assert_eq!(a.metrics.releases.get() + b.metrics.releases.get(), 5);
    a.stop().await;
    b.stop().await;
}
