//! The apiserver exporting the sample cluster `east` from its manifest directory into real
//! etcd: key-by-key expectations, live file edits, malformed manifests.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clustermesh_apiserver::export::ExportConfig;
use clustermesh_apiserver::source::manifest::ManifestSource;
use mesh_tests::exporter::RunningExporter;
use mesh_tests::{EtcdGuard, init_tracing};
use meshd::keys::{self, Key, StateKey};
use meshd::kv::KvStore;
use meshd::model::{
    Affinity, ClusterId, ClusterName, ClusterService, IdentityEntry, IpCacheEntry,
    MaxConnectedClusters, MeshNetworkPolicy,
};

const READY: Duration = Duration::from_secs(60);

fn examples(cluster: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(cluster)
}

/// Copies a sample cluster into a temp dir the test may edit.
fn copy_example(cluster: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&examples(cluster), dir.path());
    dir
}

fn copy_tree(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// Writes a file atomically (as editors and `kubectl` tooling do).
fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

fn east() -> ClusterName {
    ClusterName::new("east").unwrap()
}

fn start(store: &Arc<dyn KvStore>, dir: &Path) -> RunningExporter {
    let m = MaxConnectedClusters::C255;
    let cfg = ExportConfig::new(east(), ClusterId::new(1, m).unwrap(), m);
    let source = ManifestSource::new(dir.to_owned()).with_debounce(Duration::from_millis(50));
    RunningExporter::start(store.clone(), cfg, Box::new(source))
}

async fn keys_under(store: &dyn KvStore, prefix: &str) -> BTreeSet<String> {
    store
        .list_all(prefix, 1000)
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| String::from_utf8(kv.key).unwrap())
        .collect()
}

async fn get<T: serde::de::DeserializeOwned>(store: &dyn KvStore, key: &Key) -> Option<T> {
    let kv = store.get(&key.to_string()).await.unwrap()?;
    Some(serde_json::from_slice(&kv.value).unwrap())
}

fn ip_key(ip: &str) -> Key {
    Key::State(StateKey::Ip {
        cluster: east(),
        ip: ip.parse().unwrap(),
    })
}

fn svc_key(ns: &str, name: &str) -> Key {
    Key::State(StateKey::Service {
        cluster: east(),
        namespace: ns.into(),
        name: name.into(),
    })
}

async fn eventually<F: AsyncFn() -> bool>(what: &str, f: F) {
    mesh_tests::util::eventually(what, Duration::from_secs(20), async || f().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_cluster_east_is_exported_key_by_key() {
    init_tracing();
    let etcd = EtcdGuard::start().await.unwrap();
    let store: Arc<dyn KvStore> = Arc::new(etcd.root_store().await.unwrap());
    let mut ex = start(&store, &examples("east"));
    let status = ex.wait_ready(READY).await.unwrap();
    assert_eq!(status.errors, 0, "{:?}", status.last_error);

    let ips = keys_under(&*store, "mesh/state/ip/").await;
    let want: BTreeSet<String> = ["11", "12", "21", "31", "32", "41", "51"]
        .iter()
        .map(|i| format!("mesh/state/ip/v1/east/198.18.1.{i}"))
        .collect();
    assert_eq!(ips, want);
    assert_eq!(
        keys_under(&*store, "mesh/state/nodes/").await,
        BTreeSet::from(["mesh/state/nodes/v1/east/east-node-1".to_owned()])
    );
    let services: BTreeSet<String> = ["shop/cart", "shop/db", "shop/search", "shop/web"]
        .iter()
        .map(|s| format!("mesh/state/services/v1/east/{s}"))
        .collect();
    assert_eq!(
        keys_under(&*store, "mesh/state/services/").await,
        services,
        "payments/ledger is local-only"
    );
    assert_eq!(
        keys_under(&*store, keys::POLICY_PREFIX).await,
        BTreeSet::from(["mesh/policies/v1/east/shop/db-allow-web".to_owned()])
    );
    let synced: BTreeSet<String> = ["identities", "ip", "nodes", "services"]
        .iter()
        .map(|k| format!("mesh/synced/east/{k}"))
        .collect();
    assert_eq!(keys_under(&*store, keys::SYNCED_PREFIX).await, synced);
    assert!(
        store
            .get("mesh/cluster-config/east")
            .await
            .unwrap()
            .is_some()
    );
    assert!(store.get(keys::HEARTBEAT).await.unwrap().is_some());

    // Identities: one per distinct label set (web, cart, db, search, ledger); the per-pod
    // statefulset labels of db-0/db-1 are filtered out, so they share one identity.
    let ids = store
        .list_all("mesh/state/identities/v1/east/", 100)
        .await
        .unwrap();
    let entries: Vec<IdentityEntry> = ids
        .kvs
        .iter()
        .map(|kv| serde_json::from_slice(&kv.value).unwrap())
        .collect();
    assert_eq!(entries.len(), 5, "{entries:?}");
    for e in &entries {
        assert_eq!(e.labels.cluster(), Some("east"));
        assert!(e.labels.iter().all(|l| l.key != "pod-template-hash"));
        assert_eq!(e.id.cluster_id(MaxConnectedClusters::C255), 1);
    }
    let db0: IpCacheEntry = get(&*store, &ip_key("198.18.1.31")).await.unwrap();
    let db1: IpCacheEntry = get(&*store, &ip_key("198.18.1.32")).await.unwrap();
    assert_eq!(db0.identity, db1.identity);
    assert_eq!(db0.namespace.as_deref(), Some("shop"));
    assert_eq!(db0.pod.as_deref(), Some("db-0"));
    assert_eq!(db0.node.as_deref(), Some("east-node-1"));

    let web: ClusterService = get(&*store, &svc_key("shop", "web")).await.unwrap();
    assert!(web.global && web.shared && !web.headless);
    assert_eq!(
        web.frontends,
        vec!["198.19.1.10".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(web.backends.len(), 2);
    assert_eq!(
        (web.ports[0].name.as_str(), web.ports[0].port),
        ("http", 80)
    );
    assert!(
        web.backends
            .values()
            .all(|b| b.ports[0].port == 8080 && b.ready)
    );
    let db: ClusterService = get(&*store, &svc_key("shop", "db")).await.unwrap();
    assert!(db.headless && db.frontends.is_empty());
    assert_eq!(db.affinity, Affinity::Local);
    let hostnames: BTreeSet<_> = db
        .backends
        .values()
        .filter_map(|b| b.hostname.clone())
        .collect();
    assert_eq!(
        hostnames,
        BTreeSet::from(["db-0".to_owned(), "db-1".to_owned()])
    );
    let cart: ClusterService = get(&*store, &svc_key("shop", "cart")).await.unwrap();
    assert!(cart.global, "exported with a ServiceExport");
    assert!(cart.export_created.is_some());
    let search: ClusterService = get(&*store, &svc_key("shop", "search")).await.unwrap();
    assert!(!search.shared);
    let policy: MeshNetworkPolicy = get(
        &*store,
        &Key::Policy {
            cluster: east(),
            namespace: "shop".into(),
            name: "db-allow-web".into(),
        },
    )
    .await
    .unwrap();
    assert_eq!(policy.spec.ingress.unwrap()[0].from_endpoints.len(), 2);
    ex.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_edits_additions_and_removals_are_followed() {
    init_tracing();
    let etcd = EtcdGuard::start().await.unwrap();
    let store: Arc<dyn KvStore> = Arc::new(etcd.root_store().await.unwrap());
    let dir = copy_example("east");
    let mut ex = start(&store, dir.path());
    ex.wait_ready(READY).await.unwrap();
    let before: IpCacheEntry = get(&*store, &ip_key("198.18.1.11")).await.unwrap();

    // Edit: one web pod moves to version v2 → a new identity for its IP only.
    let shop = dir.path().join("shop.yaml");
    let text = std::fs::read_to_string(&shop).unwrap();
    let edited = text.replacen(
        "    version: v1\n  name: web-7d9f8b6c5-2xkqp",
        "    version: v2\n  name: web-7d9f8b6c5-2xkqp",
        1,
    );
    assert_ne!(edited, text, "the sample changed; update this test");
    write(&shop, &edited);
    eventually("web pod identity changes", async || {
        let e: IpCacheEntry = get(&*store, &ip_key("198.18.1.11")).await.unwrap();
        e.identity != before.identity
    })
    .await;
    let other: IpCacheEntry = get(&*store, &ip_key("198.18.1.12")).await.unwrap();
    assert_eq!(other.identity, before.identity);

    // Add: a new file with a global service and its pod.
    write(
        &dir.path().join("extra.yaml"),
        r#"
apiVersion: v1
kind: Service
metadata: {name: extra, namespace: shop, annotations: {service.meshd.io/global: "true"}}
spec:
  clusterIP: 198.19.1.99
  ports: [{name: http, port: 80, protocol: TCP}]
---
apiVersion: v1
kind: Pod
metadata: {name: extra-1, namespace: shop, labels: {app: extra}}
spec: {nodeName: east-node-1, containers: [{name: main, image: x}]}
status: {phase: Running, podIP: 198.18.1.99, hostIP: 198.18.0.1}
"#,
    );
    eventually("extra service and pod", async || {
        store
            .get(&svc_key("shop", "extra").to_string())
            .await
            .unwrap()
            .is_some()
            && store
                .get(&ip_key("198.18.1.99").to_string())
                .await
                .unwrap()
                .is_some()
    })
    .await;

    // Remove: payments.yaml goes away → ledger's pod IP goes away.
    std::fs::remove_file(dir.path().join("payments.yaml")).unwrap();
    eventually("ledger pod removed", async || {
        store
            .get(&ip_key("198.18.1.41").to_string())
            .await
            .unwrap()
            .is_none()
    })
    .await;
    std::fs::remove_file(dir.path().join("extra.yaml")).unwrap();
    eventually("extra removed", async || {
        store
            .get(&svc_key("shop", "extra").to_string())
            .await
            .unwrap()
            .is_none()
    })
    .await;
    ex.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_manifest_keeps_the_rest_and_the_old_good_data() {
    init_tracing();
    let etcd = EtcdGuard::start().await.unwrap();
    let store: Arc<dyn KvStore> = Arc::new(etcd.root_store().await.unwrap());
    let dir = copy_example("east");
    // A bad document from the start: the rest of the directory is still exported.
    write(
        &dir.path().join("broken.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken, namespace: shop}\nspec: {ports: [{port: http}]}\n",
    );
    let mut ex = start(&store, dir.path());
    let status = ex.wait_ready(READY).await.unwrap();
    assert!(status.errors >= 1);
    let err = status.last_error.unwrap();
    assert!(
        err.contains("broken.yaml") && err.contains("spec.ports[0].port"),
        "{err}"
    );
    assert_eq!(keys_under(&*store, "mesh/state/ip/").await.len(), 7);

    // Break payments.yaml (invalid YAML): the ledger pod exported from the previous good
    // version stays; a later good edit elsewhere is still applied.
    let payments = dir.path().join("payments.yaml");
    let good = std::fs::read_to_string(&payments).unwrap();
    write(&payments, &format!("{good}\n---\nkind: [unclosed\n"));
    let errors_before = ex.status.borrow().errors;
    eventually("error reported", async || {
        ex.status.borrow().errors > errors_before
    })
    .await;
    let err = ex.status.borrow().last_error.clone().unwrap();
    assert!(err.contains("payments.yaml"), "{err}");
    assert!(
        store
            .get(&ip_key("198.18.1.41").to_string())
            .await
            .unwrap()
            .is_some()
    );
    std::fs::remove_file(dir.path().join("broken.yaml")).unwrap();
    let shop = dir.path().join("shop.yaml");
    let text = std::fs::read_to_string(&shop).unwrap();
    write(&shop, &text.replace("198.18.1.51", "198.18.1.52"));
    eventually("search pod moved", async || {
        store
            .get(&ip_key("198.18.1.52").to_string())
            .await
            .unwrap()
            .is_some()
            && store
                .get(&ip_key("198.18.1.51").to_string())
                .await
                .unwrap()
                .is_none()
    })
    .await;
    assert!(
        store
            .get(&ip_key("198.18.1.41").to_string())
            .await
            .unwrap()
            .is_some()
    );
    ex.stop().await.unwrap();
}
