//! The Kubernetes source against the in-process API server: the same objects through the
//! manifest source and the Kubernetes source give the same etcd keys and values; live
//! changes; a watch that gets 410 Gone relists and sweeps; the API server's protocol.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clustermesh_apiserver::export::ExportConfig;
use clustermesh_apiserver::source::kube::{KubeSource, KubeSourceConfig};
use clustermesh_apiserver::source::manifest::ManifestSource;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use mesh_tests::exporter::RunningExporter;
use mesh_tests::kube_api::KubeApiServer;
use mesh_tests::{EtcdGuard, init_tracing};
use meshd::kv::KvStore;
use meshd::model::{ClusterId, ClusterName, MaxConnectedClusters};
use serde_json::{Value, json};

const READY: Duration = Duration::from_secs(60);

fn examples(cluster: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/examples")
        .join(cluster)
}

/// Every document of every manifest under `dir` (recursively), as JSON.
fn documents(dir: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            out.extend(documents(&path));
        } else if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
            out.extend(docs.into_iter().filter(|d| !d.is_null()));
        }
    }
    out
}

/// Loads a sample cluster into the API server (namespaces first, as a real API requires).
fn load(server: &KubeApiServer, cluster: &str) {
    let mut docs = documents(&examples(cluster));
    docs.sort_by_key(|d| d["kind"] != "Namespace");
    for d in docs {
        server.apply(&d).unwrap_or_else(|e| panic!("{e:?} for {d}"));
    }
}

const KINDS: &[(&str, &str)] = &[
    ("v1", "Namespace"),
    ("v1", "Node"),
    ("v1", "Service"),
    ("v1", "Pod"),
    ("discovery.k8s.io/v1", "EndpointSlice"),
    ("multicluster.x-k8s.io/v1alpha1", "ServiceExport"),
    ("meshd.io/v1alpha1", "MeshNetworkPolicy"),
];

/// Writes what the API server holds as manifests (one JSON document per object).
fn dump(server: &KubeApiServer, dir: &Path) {
    for (api_version, kind) in KINDS {
        let docs: Vec<String> = server
            .list(api_version, kind)
            .iter()
            .map(|o| format!("---\n{}\n", serde_json::to_string(o).unwrap()))
            .collect();
        std::fs::write(dir.join(format!("{kind}.yaml")), docs.concat()).unwrap();
    }
}

fn east() -> ClusterName {
    ClusterName::new("east").unwrap()
}

fn export_config() -> ExportConfig {
    let m = MaxConnectedClusters::C255;
    let mut cfg = ExportConfig::new(east(), ClusterId::new(1, m).unwrap(), m);
    cfg.heartbeat_interval = Duration::from_secs(1);
    cfg
}

/// `mesh/state/` and `mesh/cluster-config/` with identity numbers replaced by their labels
/// (numbers depend on the order objects arrive in).
async fn normalized(store: &dyn KvStore) -> BTreeMap<String, Value> {
    let kvs = store.list_all("mesh/", 10_000).await.unwrap().kvs;
    let mut labels: HashMap<u64, String> = HashMap::new();
    let mut raw = BTreeMap::new();
    for kv in kvs {
        let key = String::from_utf8(kv.key).unwrap();
        if !(key.starts_with("mesh/state/") || key.starts_with("mesh/cluster-config/")) {
            continue;
        }
        let value: Value = serde_json::from_slice(&kv.value).unwrap();
        if key.starts_with("mesh/state/identities/")
            && let Some(id) = value["id"].as_u64()
        {
            labels.insert(id, value["labels"].to_string());
        }
        raw.insert(key, value);
    }
    raw.into_iter()
        .map(|(k, mut v)| {
            if k.starts_with("mesh/state/identities/") {
                let l = labels[&v["id"].as_u64().unwrap()].clone();
                v["id"] = l.clone().into();
                (format!("mesh/state/identities/v1/east/{l}"), v)
            } else {
                if let Some(id) = v.get("identity").and_then(Value::as_u64) {
                    v["identity"] = labels.get(&id).cloned().unwrap_or_default().into();
                }
                (k, v)
            }
        })
        .collect()
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + READY;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_source_matches_manifest_source() {
    init_tracing();
    let server = KubeApiServer::start().await.unwrap();
    load(&server, "east");
    let dir = tempfile::tempdir().unwrap();
    dump(&server, dir.path());

    let (etcd_m, etcd_k) = tokio::join!(EtcdGuard::start(), EtcdGuard::start());
    let (etcd_m, etcd_k) = (etcd_m.unwrap(), etcd_k.unwrap());
    let store_m: Arc<dyn KvStore> = Arc::new(etcd_m.root_store().await.unwrap());
    let store_k: Arc<dyn KvStore> = Arc::new(etcd_k.root_store().await.unwrap());
    let mut manifests = RunningExporter::start(
        store_m.clone(),
        export_config(),
        Box::new(ManifestSource::new(dir.path().to_owned())),
    );
    let client = server.client().await.unwrap();
    let mut kube = RunningExporter::start(
        store_k.clone(),
        export_config(),
        Box::new(KubeSource::new(client, KubeSourceConfig::default())),
    );
    let (a, b) = tokio::join!(manifests.wait_ready(READY), kube.wait_ready(READY));
    a.unwrap();
    b.unwrap();

    let from_manifests = normalized(store_m.as_ref()).await;
    let from_kube = normalized(store_k.as_ref()).await;
    assert!(
        from_manifests
            .keys()
            .any(|k| k.starts_with("mesh/state/ip/"))
            && from_manifests
                .keys()
                .any(|k| k.starts_with("mesh/state/services/"))
            && from_manifests
                .keys()
                .any(|k| k.starts_with("mesh/state/nodes/")),
        "the sample exports endpoints, services and nodes: {:?}",
        from_manifests.keys().collect::<Vec<_>>()
    );
    for (k, v) in &from_manifests {
        assert_eq!(from_kube.get(k), Some(v), "{k}");
    }
    assert_eq!(
        from_manifests.keys().collect::<Vec<_>>(),
        from_kube.keys().collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_source_follows_changes_and_relists_after_410() {
    init_tracing();
    let server = KubeApiServer::start().await.unwrap();
    load(&server, "east");
    let etcd = EtcdGuard::start().await.unwrap();
    let store: Arc<dyn KvStore> = Arc::new(etcd.root_store().await.unwrap());
    let client = server.client().await.unwrap();
    let mut exporter = RunningExporter::start(
        store.clone(),
        export_config(),
        Box::new(KubeSource::new(client.clone(), KubeSourceConfig::default())),
    );
    exporter.wait_ready(READY).await.unwrap();
    let ips = async || -> Vec<String> {
        store
            .list_all("mesh/state/ip/v1/east/", 1000)
            .await
            .unwrap()
            .kvs
            .into_iter()
            .map(|kv| String::from_utf8(kv.key).unwrap())
            .collect()
    };
    let pods = server.list("v1", "Pod");
    let (first, second) = (&pods[0], &pods[1]);
    let ip_of = |p: &Value| {
        format!(
            "mesh/state/ip/v1/east/{}",
            p["status"]["podIP"].as_str().unwrap()
        )
    };
    assert!(ips().await.contains(&ip_of(first)));

    // A delete through the API (kube client, HTTP) reaches etcd through the watch.
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client.clone(),
        first["metadata"]["namespace"].as_str().unwrap(),
        &kube::api::ApiResource::erase::<k8s_openapi::api::core::v1::Pod>(&()),
    );
    api.delete(
        first["metadata"]["name"].as_str().unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    wait_for("the deleted pod's IP to leave etcd", async || {
        !ips().await.contains(&ip_of(first))
    })
    .await;

    // A delete no watch sees (compacted away): the watches resume, get 410 Gone, relist,
    // and the sweep deletes the pod.
    let lists_before = pod_lists(&server);
    server
        .delete_unobserved(
            "v1",
            "Pod",
            second["metadata"]["namespace"].as_str().unwrap(),
            second["metadata"]["name"].as_str().unwrap(),
        )
        .unwrap();
    wait_for("the relist to sweep the pod's IP", async || {
        !ips().await.contains(&ip_of(second))
    })
    .await;
    assert!(
        pod_lists(&server) > lists_before,
        "the 410 was followed by a relist: {:?}",
        server.requests()
    );
    // Everything else is still there.
    let remaining: Vec<String> = server
        .list("v1", "Pod")
        .iter()
        .filter(|p| p["status"]["podIP"].is_string())
        .map(ip_of)
        .collect();
    let now = ips().await;
    for ip in &remaining {
        assert!(now.contains(ip), "{ip} survived the relist: {now:?}");
    }
}

fn pod_lists(server: &KubeApiServer) -> usize {
    server
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/pods") && !r.contains("watch=true"))
        .count()
}

/// The API server speaks what kube-rs expects: paged lists with resourceVersion, watch
/// events with bookmarks, 410 for an expired version, the status subresource, conflicts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_api_server_protocol() {
    init_tracing();
    let server = KubeApiServer::start().await.unwrap();
    let client = server.client().await.unwrap();
    let nss: Api<Namespace> = Api::all(client.clone());
    for n in ["a", "b", "c"] {
        nss.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": n}})).unwrap(),
        )
        .await
        .unwrap();
    }
    // Paging: limit 2 → continue token → the rest, one resourceVersion.
    let page = nss.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(page.items.len(), 2);
    let token = page.metadata.continue_.clone().unwrap();
    let rest = nss
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 1);
    assert!(rest.metadata.continue_.as_deref().unwrap_or("").is_empty());
    let rv = page.metadata.resource_version.clone().unwrap();

    // Watch from the list's version: ADDED for a new object, then a BOOKMARK.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "a");
    let mut w = nss
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "d"}})).unwrap(),
    )
    .await
    .unwrap();
    match w.next().await.unwrap().unwrap() {
        WatchEvent::Added(n) => assert_eq!(n.metadata.name.as_deref(), Some("d")),
        other => panic!("expected ADDED, got {other:?}"),
    }
    assert!(matches!(
        w.next().await.unwrap().unwrap(),
        WatchEvent::Bookmark(_)
    ));

    // An expired version: one ERROR event with 410 (what the watcher relists on).
    server.compact();
    let mut w = nss
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match w.next().await.unwrap().unwrap() {
        WatchEvent::Error(e) => assert_eq!(e.code, 410),
        other => panic!("expected ERROR 410, got {other:?}"),
    }

    // Secrets: create, conflict on a stale replace, apply, label selector.
    let s: Secret = serde_json::from_value(json!({
        "metadata": {"name": "meshd-peer-x", "labels": {"meshd.io/peer": "true"}},
        "stringData": {"k": "v"}
    }))
    .unwrap();
    let created = secrets.create(&PostParams::default(), &s).await.unwrap();
    let mut stale = created.clone();
    secrets
        .patch(
            "meshd-peer-x",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await
        .unwrap();
    stale.metadata.labels = None;
    let err = secrets
        .replace("meshd-peer-x", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409),
        "{err}"
    );
    let listed = secrets
        .list(&ListParams::default().labels("meshd.io/peer=true"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    assert!(
        secrets
            .list(&ListParams::default().labels("meshd.io/peer=false"))
            .await
            .unwrap()
            .items
            .is_empty()
    );

    // Status subresource of a custom resource: a main-resource write keeps status; a
    // status write changes only status.
    let ar = kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("multicluster.x-k8s.io", "v1alpha1", "ServiceExport"),
        "serviceexports",
    );
    let exports: Api<kube::api::DynamicObject> = Api::namespaced_with(client.clone(), "a", &ar);
    let se: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
        "metadata": {"name": "web"}, "status": {"conditions": [{"type": "bogus"}]}
    }))
    .unwrap();
    let se = exports.create(&PostParams::default(), &se).await.unwrap();
    assert_eq!(
        se.data.get("status"),
        None,
        "status is not set on create of the main resource"
    );
    exports
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": [{"type": "Valid", "status": "True"}]}})),
        )
        .await
        .unwrap();
    let got = exports.get("web").await.unwrap();
    assert_eq!(got.data["status"]["conditions"][0]["type"], "Valid");
    // A missing namespace is NotFound, like a real API server.
    let e = Api::<Secret>::namespaced(client, "nope")
        .create(&PostParams::default(), &s)
        .await
        .unwrap_err();
    assert!(matches!(e, kube::Error::Api(ref s) if s.code == 404), "{e}");
}
