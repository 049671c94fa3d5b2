//! Tests of parsing (sample clusters, bad documents) and of the watching source.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::BoxStream;
use tokio_util::sync::CancellationToken;

use super::{ManifestSource, parse_file};
use crate::source::{Object, ObjectKind, ObjectRef, Source, SourceError, SourceEvent};

// ---------------------------------------------------------------------------------------
// Parsing

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

fn manifest_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            manifest_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            out.push(path);
        }
    }
}

fn parse_cluster(cluster: &str) -> (Vec<Object>, Vec<SourceError>) {
    let root = examples();
    let mut files = Vec::new();
    manifest_files(&root.join(cluster), &mut files);
    assert!(!files.is_empty(), "no manifests for {cluster}");
    let (mut objects, mut errors) = (Vec::new(), Vec::new());
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let (o, e) = parse_file(file.strip_prefix(&root).unwrap(), &text);
        objects.extend(o);
        errors.extend(e);
    }
    (objects, errors)
}

fn counts(objects: &[Object]) -> BTreeMap<ObjectKind, usize> {
    let mut counts = BTreeMap::new();
    for o in objects {
        *counts.entry(o.object_ref().kind).or_default() += 1;
    }
    counts
}

fn find<'a>(objects: &'a [Object], kind: ObjectKind, ns: &str, name: &str) -> &'a Object {
    objects
        .iter()
        .find(|o| o.object_ref() == oref(kind, ns, name))
        .unwrap_or_else(|| panic!("{kind:?} {ns}/{name} missing"))
}

fn oref(kind: ObjectKind, namespace: &str, name: &str) -> ObjectRef {
    ObjectRef {
        kind,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    }
}

#[test]
fn sample_clusters_parse_cleanly() {
    use ObjectKind::*;
    let expected = |ns, svc, pods, slices| {
        BTreeMap::from([
            (Namespace, ns),
            (Service, svc),
            (EndpointSlice, slices),
            (Pod, pods),
            (Node, 1),
            (ServiceExport, 1),
            (Policy, 1),
        ])
    };
    let (east, errors) = parse_cluster("east");
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(counts(&east), expected(3, 5, 7, 5));
    let (west, errors) = parse_cluster("west");
    assert!(errors.is_empty(), "{errors:#?}");
    assert_eq!(counts(&west), expected(3, 6, 10, 6));

    // Spot checks: the List items of west/default.yaml, the headless db, exports, policies.
    find(&west, Service, "default", "internal");
    let Object::Service(db) = find(&east, Service, "shop", "db") else {
        unreachable!()
    };
    let spec = db.spec.as_ref().unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    let Object::ServiceExport(export) = find(&west, ServiceExport, "shop", "cart") else {
        unreachable!()
    };
    assert_eq!(
        export.created.map(|t| t.unix_timestamp()),
        Some(unix_seconds("2026-11-20T09:07:30Z"))
    );
    let Object::Policy(policy) = find(&east, Policy, "shop", "db-allow-web") else {
        unreachable!()
    };
    assert_eq!(
        policy.spec.ingress.as_ref().unwrap()[0]
            .from_endpoints
            .len(),
        2
    );
    let ready: Vec<bool> = west
        .iter()
        .filter_map(|o| match o {
            Object::EndpointSlice(s) if s.metadata.name.as_deref() == Some("web-p3l8d") => Some(
                s.endpoints
                    .iter()
                    .map(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false))
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(ready, [true, true, false]);
}

#[test]
fn small_sample_clusters_parse_cleanly() {
    use ObjectKind::*;
    let order = std::fs::read_to_string(examples().join("clusters")).unwrap();
    let names: Vec<&str> = order
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(names.len(), 8, "deploy/examples/clusters lists 8 clusters");
    for name in &names[2..] {
        let (objects, errors) = parse_cluster(name);
        assert!(errors.is_empty(), "{name}: {errors:#?}");
        assert_eq!(
            counts(&objects),
            BTreeMap::from([
                (Namespace, 2),
                (Service, 1),
                (EndpointSlice, 1),
                (Pod, 2),
                (Node, 1)
            ]),
            "{name}"
        );
        let expected = ManifestSource::new(examples().join(name)).check();
        assert_eq!(expected, Ok(7), "{name}");
    }
}

#[test]
fn check_reports_every_bad_document_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        examples().join("north/nodes.yaml"),
        dir.path().join("nodes.yaml"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("broken.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\nspec:\n  ports:\n  - port: \"eighty\"\n",
    )
    .unwrap();
    let errors = ManifestSource::new(dir.path().to_owned())
        .check()
        .unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(errors[0].location.contains("broken.yaml"), "{errors:#?}");
    let missing = ManifestSource::new(dir.path().join("nope"))
        .check()
        .unwrap_err();
    assert_eq!(missing.len(), 1);
    assert!(missing[0].location.contains("nope"), "{missing:#?}");
}

fn unix_seconds(rfc3339: &str) -> i64 {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .unwrap()
        .unix_timestamp()
}

const BAD: &str = r#"# a file with good and bad documents
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  ports:
  - port: http
---
# an empty document: skipped, but counted
---
apiVersion: v1
kind: Pod
metadata:
  namespace: shop
spec:
  containers: []
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1
spec:
  containers: []
status:
  podIP: 198.18.1.300
---
apiVersion: meshd.io/v1alpha1
kind: MeshNetworkPolicy
metadata:
  name: p1
  namespace: shop
spec:
  endpointSelector: {}
  ingres: []
---
apiVersion: meshd.io/v1alpha1
kind: MeshNetworkPolicy
metadata:
  name: p2
  namespace: shop
spec:
  endpointSelector: {}
  ingress:
  - toPorts:
    - port: 80
      endPort: 70
---
apiVersion: v1
kind: Pod
metadata:
  name: web-2
  namespace: shop
spec:
  containers: []
status:
  podIP: 198.18.1.12
---
apiVersion: v1
kind: Pod
metadata: {name: [unclosed
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Node
  metadata:
    name: node-1
- apiVersion: v1
  kind: Node
  metadata:
    name: Node_2
---
apiVersion: v1
kind: Pod
metadata:
  name: web-2
  namespace: shop
spec:
  containers: []
"#;

#[test]
fn bad_documents_are_reported_and_good_ones_kept() {
    let (objects, errors) = parse_file(Path::new("east/bad.yaml"), BAD);
    let refs: Vec<String> = objects.iter().map(|o| o.object_ref().to_string()).collect();
    assert_eq!(refs, ["Namespace shop", "Pod shop/web-2", "Node node-1"]);
    let got: Vec<(&str, &str)> = errors
        .iter()
        .map(|e| (e.location.as_str(), e.message.as_str()))
        .collect();
    let want: &[(&str, &str)] = &[
        (
            "east/bad.yaml document 2 (Deployment shop/web)",
            "unsupported apiVersion \"apps/v1\" kind \"Deployment\"",
        ),
        (
            "east/bad.yaml document 3 (Service shop/web)",
            "spec.ports[0].port: invalid type: string \"http\", expected i32",
        ),
        ("east/bad.yaml document 5 (Pod)", "metadata.name: required"),
        (
            "east/bad.yaml document 6 (Pod default/web-1)",
            "status.podIP: \"198.18.1.300\" is not an IP address",
        ),
        (
            "east/bad.yaml document 7 (MeshNetworkPolicy shop/p1)",
            "spec.ingres: unknown field `ingres`",
        ),
        (
            "east/bad.yaml document 8 (MeshNetworkPolicy shop/p2)",
            "spec.ingress[0].toPorts[0].endPort: 70 is below port 80",
        ),
        ("east/bad.yaml document 10", "invalid YAML at line "),
        (
            "east/bad.yaml document 11 items[1] (Node Node_2)",
            "metadata.name: \"Node_2\" is not an RFC 1123 subdomain",
        ),
        (
            "east/bad.yaml document 12 (Pod shop/web-2)",
            "Pod shop/web-2 is already defined at east/bad.yaml document 9 (Pod shop/web-2)",
        ),
    ];
    assert_eq!(got.len(), want.len(), "{errors:#?}");
    for ((location, message), (want_location, want_message)) in got.iter().zip(want) {
        assert_eq!(location, want_location, "{errors:#?}");
        assert!(
            message.starts_with(want_message),
            "{location}: {message:?} does not start with {want_message:?}"
        );
    }
}

#[test]
fn yaml_errors_name_the_file_line() {
    let text = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: [b\n";
    let (objects, errors) = parse_file(Path::new("x.yaml"), text);
    assert_eq!(objects.len(), 1);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].location, "x.yaml document 2");
    assert!(
        errors[0].message.starts_with("invalid YAML at line 9"),
        "{}",
        errors[0].message
    );
}

#[test]
fn defaults_and_edge_documents() {
    let text = "---\n# leading separator and comment\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  containers: []\n---\nnull\n---\n- a\n";
    let (objects, errors) = parse_file(Path::new("e.yaml"), text);
    assert_eq!(objects.len(), 1);
    assert_eq!(
        objects[0].object_ref(),
        oref(ObjectKind::Pod, "default", "p")
    );
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].location, "e.yaml document 4");
    assert_eq!(errors[0].message, "expected a mapping, found a sequence");
}

// ---------------------------------------------------------------------------------------
// Watching

const STEP: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(600);

fn namespace(name: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n")
}

fn pod(name: &str, ip: &str, version: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  labels:\n    app: web\n    version: {version}\nspec:\n  containers: []\nstatus:\n  podIP: {ip}\n"
    )
}

fn service(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  clusterIP: 198.19.1.10\n  ports:\n  - port: 80\n"
    )
}

fn docs(docs: &[String]) -> String {
    docs.join("---\n")
}

/// Writes atomically (temp file + rename), as editors and `kubectl` tooling do.
fn put(dir: &Path, rel: &str, text: &str) {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().unwrap().to_str().unwrap()
    ));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
}

struct Running {
    stream: BoxStream<'static, SourceEvent>,
    shutdown: CancellationToken,
}

impl Running {
    fn start(dir: &Path) -> Self {
        let shutdown = CancellationToken::new();
        let source = ManifestSource::new(dir.to_owned()).with_debounce(Duration::from_millis(50));
        let stream = Box::new(source).run(shutdown.clone());
        Self { stream, shutdown }
    }

    /// The initial load: everything up to `Synced`.
    async fn initial(&mut self) -> Vec<SourceEvent> {
        let mut events = Vec::new();
        loop {
            let event = tokio::time::timeout(STEP, self.stream.next())
                .await
                .expect("no Synced in time")
                .expect("stream ended");
            if event == SourceEvent::Synced {
                return events;
            }
            events.push(event);
        }
    }

    /// The events of one change: waits for the first, then until the stream is quiet.
    async fn batch(&mut self) -> Vec<SourceEvent> {
        let first = tokio::time::timeout(STEP, self.stream.next())
            .await
            .expect("no event in time")
            .expect("stream ended");
        let mut events = vec![first];
        while let Ok(Some(event)) = tokio::time::timeout(QUIET, self.stream.next()).await {
            events.push(event);
        }
        events
    }

    async fn assert_quiet(&mut self) {
        if let Ok(event) = tokio::time::timeout(QUIET * 2, self.stream.next()).await {
            panic!("unexpected event {event:?}");
        }
    }
}

fn applied(events: &[SourceEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            SourceEvent::Apply(o) => Some(o.object_ref().to_string()),
            _ => None,
        })
        .collect()
}

fn deleted(events: &[SourceEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            SourceEvent::Delete(r) => Some(r.to_string()),
            _ => None,
        })
        .collect()
}

fn errors(events: &[SourceEvent]) -> Vec<&SourceError> {
    events
        .iter()
        .filter_map(|e| match e {
            SourceEvent::Error(e) => Some(e),
            _ => None,
        })
        .collect()
}

fn version_of(event: &SourceEvent) -> Option<&str> {
    match event {
        SourceEvent::Apply(Object::Pod(p)) => p
            .metadata
            .labels
            .as_ref()?
            .get("version")
            .map(String::as_str),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_applies_only_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("east");
    put(
        &root,
        "a.yaml",
        &docs(&[
            namespace("shop"),
            pod("web-1", "198.18.1.11", "v1"),
            pod("web-2", "198.18.1.12", "v1"),
        ]),
    );
    put(&root, "sub/b.yaml", &service("web"));
    put(&root, ".hidden/c.yaml", &namespace("hidden"));
    put(&root, "notes.txt", "not a manifest");
    let mut run = Running::start(&root);

    let initial = run.initial().await;
    assert_eq!(
        applied(&initial),
        [
            "Namespace shop",
            "Service shop/web",
            "Pod shop/web-1",
            "Pod shop/web-2"
        ]
    );
    assert_eq!(initial.len(), 4, "{initial:?}");

    // Edit: one pod's label changes -> exactly one Apply.
    put(
        &root,
        "a.yaml",
        &docs(&[
            namespace("shop"),
            pod("web-1", "198.18.1.11", "v2"),
            pod("web-2", "198.18.1.12", "v1"),
        ]),
    );
    let events = run.batch().await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(applied(&events), ["Pod shop/web-1"]);
    assert_eq!(version_of(&events[0]), Some("v2"));

    // Touching a file without changing it, or writing ignored files -> nothing.
    put(&root, "sub/b.yaml", &service("web"));
    put(&root, "a.yaml.swp", "garbage");
    put(&root, ".x.yaml", "garbage: [");
    run.assert_quiet().await;

    // Add a file -> Applies.
    put(
        &root,
        "sub/deeper/c.yml",
        &docs(&[service("api"), pod("api-1", "198.18.1.21", "v1")]),
    );
    let events = run.batch().await;
    assert_eq!(applied(&events), ["Service shop/api", "Pod shop/api-1"]);
    assert_eq!(events.len(), 2, "{events:?}");

    // Remove a file -> Deletes.
    std::fs::remove_file(root.join("sub/b.yaml")).unwrap();
    let events = run.batch().await;
    assert_eq!(
        events,
        [SourceEvent::Delete(oref(
            ObjectKind::Service,
            "shop",
            "web"
        ))]
    );

    // Break the file: web-2's document is invalid, web-1 changes -> the Apply of web-1 and
    // an Error, but no Delete of web-2 (nor of anything else).
    let broken = docs(&[
        namespace("shop"),
        pod("web-1", "198.18.1.11", "v3"),
        pod("web-2", "198.18.1.312", "v1"),
    ]);
    put(&root, "a.yaml", &broken);
    let events = run.batch().await;
    assert_eq!(applied(&events), ["Pod shop/web-1"]);
    assert!(deleted(&events).is_empty(), "{events:?}");
    let errs = errors(&events);
    assert_eq!(errs.len(), 1, "{events:?}");
    assert_eq!(errs[0].location, "east/a.yaml document 3 (Pod shop/web-2)");
    assert!(
        errs[0].message.starts_with("status.podIP:"),
        "{}",
        errs[0].message
    );

    // Break it worse (invalid YAML, web-1 and the namespace gone from the text) -> errors only.
    put(
        &root,
        "a.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: [\n",
    );
    let events = run.batch().await;
    assert!(
        applied(&events).is_empty() && deleted(&events).is_empty(),
        "{events:?}"
    );
    assert_eq!(errors(&events).len(), 1, "{events:?}");

    // Fix it with web-2 really gone -> Delete of web-2 only; web-1 unchanged since v3.
    put(
        &root,
        "a.yaml",
        &docs(&[namespace("shop"), pod("web-1", "198.18.1.11", "v3")]),
    );
    let events = run.batch().await;
    assert_eq!(
        events,
        [SourceEvent::Delete(oref(ObjectKind::Pod, "shop", "web-2"))]
    );

    run.shutdown.cancel();
    let end = tokio::time::timeout(STEP, run.stream.next()).await.unwrap();
    assert!(end.is_none(), "stream must end on shutdown, got {end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_an_object_between_files_never_deletes_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("west");
    put(
        &root,
        "a.yaml",
        &docs(&[namespace("shop"), pod("web-1", "198.18.2.11", "v1")]),
    );
    put(&root, "b.yaml", &namespace("billing"));
    let mut run = Running::start(&root);
    assert_eq!(
        applied(&run.initial().await),
        ["Namespace billing", "Namespace shop", "Pod shop/web-1"]
    );

    // Step 1: b.yaml also defines web-1 (changed) -> a duplicate error; a.yaml's stays in force.
    put(
        &root,
        "b.yaml",
        &docs(&[namespace("billing"), pod("web-1", "198.18.2.11", "v2")]),
    );
    let events = run.batch().await;
    let errs = errors(&events);
    assert_eq!(errs.len(), 1, "{events:?}");
    assert_eq!(errs[0].location, "west/b.yaml document 2 (Pod shop/web-1)");
    assert!(
        errs[0].message.contains("west/a.yaml document 2"),
        "{}",
        errs[0].message
    );
    assert_eq!(events.len(), 1, "{events:?}");

    // Step 2: a.yaml drops it -> b.yaml's version takes over: an Apply, no Delete.
    put(&root, "a.yaml", &namespace("shop"));
    let events = run.batch().await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(applied(&events), ["Pod shop/web-1"]);
    assert_eq!(version_of(&events[0]), Some("v2"));

    // b.yaml owns it now: removing b.yaml deletes it.
    std::fs::remove_file(root.join("b.yaml")).unwrap();
    let mut events = run.batch().await;
    events.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(deleted(&events), ["Namespace billing", "Pod shop/web-1"]);

    // A move within one rescan (rename of the file) produces no event at all.
    std::fs::rename(root.join("a.yaml"), root.join("c.yaml")).unwrap();
    run.assert_quiet().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_directory_is_reported_and_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("east");
    put(
        &root,
        "a.yaml",
        &docs(&[namespace("shop"), pod("web-1", "198.18.1.11", "v1")]),
    );
    let mut run = Running::start(&root);
    assert_eq!(run.initial().await.len(), 2);

    std::fs::remove_dir_all(&root).unwrap();
    let events = run.batch().await;
    assert!(!errors(&events).is_empty(), "{events:?}");
    assert!(
        applied(&events).is_empty() && deleted(&events).is_empty(),
        "{events:?}"
    );
    assert_eq!(errors(&events)[0].location, "east");

    // Back with one change: watched again, and only the difference is reported.
    put(
        &root,
        "a.yaml",
        &docs(&[namespace("shop"), pod("web-1", "198.18.1.11", "v2")]),
    );
    let events = run.batch().await;
    assert_eq!(applied(&events), ["Pod shop/web-1"], "{events:?}");
    assert!(deleted(&events).is_empty(), "{events:?}");

    // And changes are picked up again (the new watcher works).
    put(&root, "b.yaml", &namespace("billing"));
    let events = run.batch().await;
    assert_eq!(applied(&events), ["Namespace billing"], "{events:?}");
}

#[tokio::test]
async fn a_missing_directory_delays_synced() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("later");
    let mut run = Running::start(&root);
    let first = tokio::time::timeout(STEP, run.stream.next())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(first, SourceEvent::Error(_)), "{first:?}");
    // The directory appears with its file at once (a rename), so the source cannot see it
    // empty in between.
    let staging = dir.path().join(".staging");
    put(&staging, "a.yaml", &namespace("shop"));
    std::fs::rename(&staging, &root).unwrap();
    let initial = run.initial().await;
    assert_eq!(applied(&initial), ["Namespace shop"], "{initial:?}");
}
