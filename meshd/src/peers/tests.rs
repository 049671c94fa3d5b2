//! Tests for peer credentials (parsing, canonical form, files) and the peers directory watcher.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use mesh_certs::{CertRequest, CertificateAuthority};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::model::{ClusterId, ClusterName, MaxConnectedClusters};

struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
    /// A key that does not belong to `cert_pem`.
    other_key_pem: String,
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let ca = CertificateAuthority::generate("east-ca", Duration::from_secs(3600 * 24)).unwrap();
        let leaf = ca.issue(&CertRequest::client("remote-west")).unwrap();
        let other = ca.issue(&CertRequest::client("remote-south")).unwrap();
        Pki {
            ca_pem: ca.cert_pem().to_owned(),
            cert_pem: leaf.cert_pem,
            key_pem: leaf.key_pem,
            other_key_pem: other.key_pem,
        }
    })
}

fn cred(name: &str, id: u32) -> PeerCredential {
    let p = pki();
    PeerCredential {
        name: ClusterName::new(name).unwrap(),
        cluster_id: ClusterId::new(id, MaxConnectedClusters::C255).unwrap(),
        max_connected_clusters: MaxConnectedClusters::C255,
        server: "https://127.0.0.1:2379".into(),
        ca_pem: p.ca_pem.clone(),
        cert_pem: p.cert_pem.clone(),
        key_pem: p.key_pem.clone(),
        tls_server_name: Some("clustermesh.east.mesh".into()),
    }
}

fn east_yaml() -> String {
    cred("east", 2).to_kubeconfig_yaml("remote-west")
}

fn parse(path: &str, text: &str) -> Result<PeerCredential, PeerConfigError> {
    PeerCredential::from_kubeconfig(Path::new(path), text)
}

/// Parses `text` as `peers/east.kubeconfig`, expects a field error and returns its message.
fn field_error(text: &str, field: &str) -> String {
    let err = parse("peers/east.kubeconfig", text).unwrap_err();
    assert_eq!(err.path(), Path::new("peers/east.kubeconfig"), "{err}");
    assert_eq!(err.field(), Some(field), "{err}");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("peers/east.kubeconfig: {field}: ")),
        "{msg}"
    );
    assert!(!msg.contains("PRIVATE KEY"), "{msg}");
    msg
}

fn b64(s: &str) -> String {
    super::base64::encode(s.as_bytes())
}

#[test]
fn peers_round_trip() {
    for c in [
        cred("east", 2),
        PeerCredential {
            tls_server_name: None,
            server: "https://[::1]:32379".into(),
            cluster_id: ClusterId::new(300, MaxConnectedClusters::C511).unwrap(),
            max_connected_clusters: MaxConnectedClusters::C511,
            ..cred("east", 2)
        },
    ] {
        let yaml = c.to_kubeconfig_yaml("remote-west");
        let back = parse("peers/east.kubeconfig", &yaml).unwrap();
        assert_eq!(back, c, "{yaml}");
    }
}

#[test]
fn peers_canonical_form() {
    let yaml = east_yaml();
    let kc = kube_client::config::Kubeconfig::from_yaml(&yaml).unwrap();
    assert_eq!(kc.clusters.len(), 1);
    assert_eq!(kc.clusters[0].name, "east");
    let cluster = kc.clusters[0].cluster.as_ref().unwrap();
    assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:2379"));
    assert_eq!(
        cluster.tls_server_name.as_deref(),
        Some("clustermesh.east.mesh")
    );
    assert_eq!(
        cluster.certificate_authority_data.as_deref(),
        Some(b64(&pki().ca_pem).as_str())
    );
    assert_eq!(kc.auth_infos.len(), 1);
    assert_eq!(kc.auth_infos[0].name, "remote-west");
    assert_eq!(kc.contexts.len(), 1);
    assert_eq!(kc.contexts[0].name, "east");
    let ctx = kc.contexts[0].context.as_ref().unwrap();
    assert_eq!(ctx.cluster, "east");
    assert_eq!(ctx.user.as_deref(), Some("remote-west"));
    let ext = &ctx.extensions.as_ref().unwrap()[0];
    assert_eq!(ext.name, CLUSTER_EXTENSION);
    assert_eq!(
        ext.extension,
        serde_json::json!({"clusterId": 2, "maxConnectedClusters": 255})
    );
    assert_eq!(kc.current_context.as_deref(), Some("east"));
    // Base64 values are single-line plain scalars.
    assert!(!yaml.contains('>') && !yaml.contains('|'), "{yaml}");
}

#[test]
fn peers_accessors() {
    let c = cred("east", 2);
    let etcd = c.to_etcd_config();
    assert_eq!(etcd.endpoints, vec!["https://127.0.0.1:2379".to_owned()]);
    assert_eq!(etcd.ca_pem.as_deref(), Some(c.ca_pem.as_str()));
    assert_eq!(etcd.cert_pem.as_deref(), Some(c.cert_pem.as_str()));
    assert_eq!(etcd.key_pem.as_deref(), Some(c.key_pem.as_str()));
    assert_eq!(
        etcd.tls_server_name.as_deref(),
        Some("clustermesh.east.mesh")
    );
    let not_after = c.cert_not_after().unwrap();
    assert!(not_after > time::OffsetDateTime::now_utc() + time::Duration::days(300));
    assert_eq!(
        PeerCredential::file_name(&ClusterName::new("east").unwrap()),
        "east.kubeconfig"
    );
    let debug = format!("{c:?}");
    assert!(
        debug.contains("east") && debug.contains("<redacted>"),
        "{debug}"
    );
    assert!(!debug.contains("PRIVATE") && !debug.contains(&b64(&c.key_pem)[..20]));
    let broken = PeerCredential {
        cert_pem: "nope".into(),
        ..c
    };
    assert_eq!(broken.cert_not_after(), None);
}

#[test]
fn peers_bad_yaml() {
    let err = parse("peers/east.kubeconfig", "clusters: [\n  - name: x\n").unwrap_err();
    assert!(matches!(err, PeerConfigError::Parse { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.starts_with("peers/east.kubeconfig: not a valid kubeconfig: "),
        "{msg}"
    );
    for (text, what) in [
        ("", "empty document"),
        ("# nothing\n", "empty document"),
        (
            "---\nkind: Config\n---\nkind: Config\n",
            "expected one YAML document, found 2",
        ),
    ] {
        let msg = parse("peers/east.kubeconfig", text)
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            format!("peers/east.kubeconfig: not a valid kubeconfig: {what}")
        );
    }
    // A type error deep inside the user entry must not echo the file.
    let yaml = east_yaml().replace("client-key-data: ", "client-key-data:\n      nested: ");
    let err = parse("peers/east.kubeconfig", &yaml).unwrap_err();
    assert!(
        !err.to_string().contains(&b64(&pki().key_pem)[..40]),
        "{err}"
    );
}

#[test]
fn peers_counts_of_entries() {
    let yaml = east_yaml();
    let two_contexts = yaml.replace(
        "contexts:\n",
        "contexts:\n- name: other\n  context:\n    cluster: east\n    user: remote-west\n",
    );
    let msg = field_error(&two_contexts, "contexts");
    assert!(
        msg.ends_with("expected exactly one context, found 2"),
        "{msg}"
    );

    let no_users = yaml
        .lines()
        .filter(|l| !l.contains("client-") && !l.contains("- name: remote-west") && *l != "  user:")
        .map(|l| if l == "users:" { "users: []" } else { l })
        .collect::<Vec<_>>()
        .join("\n");
    let msg = field_error(&no_users, "users");
    assert!(
        msg.ends_with("expected exactly one user, found none"),
        "{msg}"
    );

    let dangling = yaml.replace("    cluster: east", "    cluster: north");
    let msg = field_error(&dangling, "contexts[0].context.cluster");
    assert!(
        msg.contains("\"north\" does not name the cluster entry \"east\""),
        "{msg}"
    );

    let dangling = yaml.replace("    user: remote-west", "    user: nobody");
    field_error(&dangling, "contexts[0].context.user");

    let current = yaml.replace("current-context: east", "current-context: west");
    field_error(&current, "current-context");
}

#[test]
fn peers_extension() {
    let yaml = east_yaml();
    let missing = yaml.replace("name: meshd.io/cluster", "name: example.com/other");
    let msg = field_error(&missing, "contexts[0].context.extensions[meshd.io/cluster]");
    assert!(msg.contains("missing"), "{msg}");

    let zero = yaml.replace("clusterId: 2", "clusterId: 0");
    let msg = parse("peers/east.kubeconfig", &zero)
        .unwrap_err()
        .to_string();
    assert_eq!(
        msg,
        "peers/east.kubeconfig: contexts[0].context.extensions[meshd.io/cluster].clusterId: \
         0 is not a valid cluster ID (must be 1..=255 with maxConnectedClusters 255)"
    );

    let big = yaml.replace("clusterId: 2", "clusterId: 300");
    let msg = field_error(
        &big,
        "contexts[0].context.extensions[meshd.io/cluster].clusterId",
    );
    assert!(msg.contains("300 is not a valid cluster ID"), "{msg}");

    let big_511 = big.replace("maxConnectedClusters: 255", "maxConnectedClusters: 511");
    let c = parse("peers/east.kubeconfig", &big_511).unwrap();
    assert_eq!(c.cluster_id.get(), 300);
    assert_eq!(c.max_connected_clusters, MaxConnectedClusters::C511);

    let mode = yaml.replace("maxConnectedClusters: 255", "maxConnectedClusters: 256");
    let msg = field_error(
        &mode,
        "contexts[0].context.extensions[meshd.io/cluster].maxConnectedClusters",
    );
    assert!(msg.ends_with("256 is not 255 or 511"), "{msg}");

    let text_id = yaml.replace("clusterId: 2", "clusterId: two");
    field_error(
        &text_id,
        "contexts[0].context.extensions[meshd.io/cluster].clusterId",
    );
}

#[test]
fn peers_server() {
    let yaml = east_yaml();
    let http = yaml.replace("https://127.0.0.1:2379", "http://127.0.0.1:2379");
    let msg = field_error(&http, "clusters[0].cluster.server");
    assert!(
        msg.ends_with("\"http://127.0.0.1:2379\" must be https (https://host:port)"),
        "{msg}"
    );

    let no_port = yaml.replace("https://127.0.0.1:2379", "https://127.0.0.1");
    field_error(&no_port, "clusters[0].cluster.server");

    let insecure = yaml.replace(
        "  cluster:\n",
        "  cluster:\n    insecure-skip-tls-verify: true\n",
    );
    field_error(&insecure, "clusters[0].cluster.insecure-skip-tls-verify");
}

#[test]
fn peers_pem_data() {
    let p = pki();
    let yaml = east_yaml();
    let bad_b64 = yaml.replace(&b64(&p.key_pem), "not*base64!");
    let msg = field_error(&bad_b64, "users[0].user.client-key-data");
    assert!(msg.contains(": not base64"), "{msg}");

    let not_pem = yaml.replace(&b64(&p.ca_pem), &b64("hello"));
    let msg = field_error(&not_pem, "clusters[0].cluster.certificate-authority-data");
    assert!(msg.contains("not a PEM certificate"), "{msg}");

    let truncated = &p.cert_pem[..p.cert_pem.len() / 2];
    let broken_cert = yaml.replace(&b64(&p.cert_pem), &b64(truncated));
    field_error(&broken_cert, "users[0].user.client-certificate-data");

    let broken_key = yaml.replace(
        &b64(&p.key_pem),
        &b64("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
    );
    let msg = field_error(&broken_key, "users[0].user.client-key-data");
    assert!(msg.contains("not a PEM private key"), "{msg}");

    let wrong_key = yaml.replace(&b64(&p.key_pem), &b64(&p.other_key_pem));
    let msg = field_error(&wrong_key, "users[0].user.client-key-data");
    assert!(msg.contains("does not belong to the certificate"), "{msg}");

    let no_ca = yaml
        .lines()
        .filter(|l| !l.contains("certificate-authority-data"))
        .collect::<Vec<_>>()
        .join("\n");
    let msg = field_error(&no_ca, "clusters[0].cluster.certificate-authority-data");
    assert!(msg.ends_with("missing"), "{msg}");
}

#[test]
fn peers_file_stem_must_match_context() {
    let msg = parse("peers/west.kubeconfig", &east_yaml())
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with(
            "peers/west.kubeconfig: contexts[0].name: \"east\" does not match the file name"
        ),
        "{msg}"
    );
    // Names that are not `<peer>.kubeconfig` (e.g. a Secret) skip the check.
    assert!(parse("secret/meshd-peer-east", &east_yaml()).is_ok());
}

#[test]
fn peers_file_path_variants() {
    let p = pki();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("peers");
    std::fs::create_dir_all(dir.join("tls")).unwrap();
    std::fs::write(dir.join("tls/ca.crt"), &p.ca_pem).unwrap();
    std::fs::write(dir.join("tls/client.crt"), &p.cert_pem).unwrap();
    let abs_key = tmp.path().join("client.key");
    std::fs::write(&abs_key, &p.key_pem).unwrap();
    let yaml = east_yaml()
        .replace(
            &format!("certificate-authority-data: {}", b64(&p.ca_pem)),
            "certificate-authority: tls/ca.crt",
        )
        .replace(
            &format!("client-certificate-data: {}", b64(&p.cert_pem)),
            "client-certificate: tls/client.crt",
        )
        .replace(
            &format!("client-key-data: {}", b64(&p.key_pem)),
            &format!("client-key: {}", abs_key.display()),
        );
    assert!(!yaml.contains("-data"), "{yaml}");
    let path = dir.join("east.kubeconfig");
    let c = PeerCredential::from_kubeconfig(&path, &yaml).unwrap();
    assert_eq!(c, cred("east", 2));

    // Missing referenced file: the field and the resolved path are named.
    let missing = yaml.replace("tls/client.crt", "tls/nope.crt");
    let err = PeerCredential::from_kubeconfig(&path, &missing).unwrap_err();
    assert_eq!(err.field(), Some("users[0].user.client-certificate"));
    assert!(
        err.to_string()
            .contains(&dir.join("tls/nope.crt").display().to_string()),
        "{err}"
    );

    // Both variants at once are ambiguous.
    let both = yaml.replace(
        "certificate-authority: tls/ca.crt",
        &format!(
            "certificate-authority: tls/ca.crt\n    certificate-authority-data: {}",
            b64(&p.ca_pem)
        ),
    );
    let err = PeerCredential::from_kubeconfig(&path, &both).unwrap_err();
    assert_eq!(
        err.field(),
        Some("clusters[0].cluster.certificate-authority")
    );
}

#[test]
fn peers_write_and_remove_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("peers");
    let c = cred("east", 2);
    let path = write_peer_file(&dir, &c, "remote-west").unwrap();
    assert_eq!(path, dir.join("east.kubeconfig"));
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(PeerCredential::from_kubeconfig(&path, &text).unwrap(), c);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // Overwrite in place, no temp files left behind.
    write_peer_file(&dir, &c, "remote-west").unwrap();
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["east.kubeconfig".to_owned()]);
    assert!(write_peer_file(&dir, &c, " ").is_err());

    assert!(remove_peer_file(&dir, &c.name).unwrap());
    assert!(!remove_peer_file(&dir, &c.name).unwrap());
    assert!(!path.exists());
}

// ---- watcher ----

const WAIT: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(800);

async fn next(events: &mut BoxStream<'static, PeerEvent>) -> PeerEvent {
    tokio::time::timeout(WAIT, events.next())
        .await
        .expect("timed out waiting for a peer event")
        .expect("peer event stream ended")
}

async fn assert_quiet(events: &mut BoxStream<'static, PeerEvent>) {
    if let Ok(ev) = tokio::time::timeout(QUIET, events.next()).await {
        panic!("expected no event, got {ev:?}");
    }
}

fn upserted(ev: PeerEvent) -> PeerCredential {
    match ev {
        PeerEvent::Upsert(c) => c,
        other => panic!("expected Upsert, got {other:?}"),
    }
}

/// Writes a file atomically, like any careful writer (and like `write_peer_file`).
fn put(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.test-tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

fn watcher(dir: PathBuf) -> PeerDirWatcher {
    PeerDirWatcher::new(dir).with_debounce(Duration::from_millis(50))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_watcher_lifecycle() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    write_peer_file(&dir, &cred("west", 3), "remote-local").unwrap();
    write_peer_file(&dir, &cred("east", 2), "remote-local").unwrap();
    // Not peer files: hidden, temp, other suffix, and a directory.
    put(&dir, ".hidden.kubeconfig", "garbage: [");
    put(&dir, "east.kubeconfig.tmp", "garbage: [");
    std::fs::create_dir(dir.join("sub.kubeconfig")).unwrap();

    let shutdown = CancellationToken::new();
    let mut events = watcher(dir.clone()).run(shutdown.clone());
    assert_eq!(upserted(next(&mut events).await), cred("east", 2));
    assert_eq!(upserted(next(&mut events).await), cred("west", 3));
    assert!(matches!(next(&mut events).await, PeerEvent::Synced));
    assert_quiet(&mut events).await;

    // Ignored files changing: nothing.
    put(&dir, ".west.kubeconfig.swp", "garbage");
    put(&dir, "west.kubeconfig~", "garbage");
    assert_quiet(&mut events).await;

    // Identical rewrite (even with another user name): nothing.
    write_peer_file(&dir, &cred("east", 2), "remote-other").unwrap();
    assert_quiet(&mut events).await;

    // Content change: Upsert.
    let moved = PeerCredential {
        server: "https://198.18.0.2:32379".into(),
        ..cred("east", 2)
    };
    write_peer_file(&dir, &moved, "remote-local").unwrap();
    assert_eq!(upserted(next(&mut events).await), moved);

    // Malformed rewrite: Error, no Remove; other peers unaffected.
    put(&dir, "east.kubeconfig", "clusters: [");
    match next(&mut events).await {
        PeerEvent::Error { path, error } => {
            assert_eq!(path, dir.join("east.kubeconfig"));
            assert!(matches!(error, PeerConfigError::Parse { .. }), "{error}");
        }
        other => panic!("expected Error, got {other:?}"),
    }
    assert_quiet(&mut events).await;

    // Fixed (to the credential already in force): Upsert again.
    write_peer_file(&dir, &moved, "remote-local").unwrap();
    assert_eq!(upserted(next(&mut events).await), moved);

    // A stem/context mismatch is an error for that file only.
    put(
        &dir,
        "north.kubeconfig",
        &cred("south", 9).to_kubeconfig_yaml("u"),
    );
    match next(&mut events).await {
        PeerEvent::Error { path, error } => {
            assert_eq!(path, dir.join("north.kubeconfig"));
            assert_eq!(error.field(), Some("contexts[0].name"));
        }
        other => panic!("expected Error, got {other:?}"),
    }
    std::fs::remove_file(dir.join("north.kubeconfig")).unwrap();
    assert_quiet(&mut events).await;

    // Delete: Remove.
    assert!(remove_peer_file(&dir, &ClusterName::new("west").unwrap()).unwrap());
    match next(&mut events).await {
        PeerEvent::Remove(name) => assert_eq!(name.as_str(), "west"),
        other => panic!("expected Remove, got {other:?}"),
    }

    // Shutdown ends the stream.
    shutdown.cancel();
    let end = tokio::time::timeout(WAIT, events.next()).await.unwrap();
    assert!(end.is_none(), "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_watcher_directory_missing_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("peers");
    let shutdown = CancellationToken::new();
    let mut events = watcher(dir.clone()).run(shutdown.clone());
    match next(&mut events).await {
        PeerEvent::Error { path, error } => {
            assert_eq!(path, dir);
            assert!(matches!(error, PeerConfigError::Io { .. }), "{error}");
        }
        other => panic!("expected Error, got {other:?}"),
    }
    assert!(matches!(next(&mut events).await, PeerEvent::Synced));

    // The directory appears (polled while missing), then is watched.
    write_peer_file(&dir, &cred("east", 2), "remote-local").unwrap();
    assert_eq!(upserted(next(&mut events).await), cred("east", 2));
    write_peer_file(&dir, &cred("west", 3), "remote-local").unwrap();
    assert_eq!(upserted(next(&mut events).await), cred("west", 3));

    // The whole directory goes away: Error, then every peer is removed.
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(matches!(next(&mut events).await, PeerEvent::Error { .. }));
    let mut removed = Vec::new();
    for _ in 0..2 {
        match next(&mut events).await {
            PeerEvent::Remove(name) => removed.push(name.to_string()),
            other => panic!("expected Remove, got {other:?}"),
        }
    }
    assert_eq!(removed, ["east", "west"]);

    // And comes back: the new directory is watched again.
    write_peer_file(&dir, &cred("east", 2), "remote-local").unwrap();
    assert_eq!(upserted(next(&mut events).await), cred("east", 2));
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_watcher_periodic_rescan_reads_referenced_files() {
    // Referenced PEM files outside the directory are not watched; the rescan picks them up.
    let p = pki();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("peers");
    let tls = tmp.path().join("tls");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&tls).unwrap();
    std::fs::write(tls.join("ca.crt"), &p.ca_pem).unwrap();
    let yaml = east_yaml().replace(
        &format!("certificate-authority-data: {}", b64(&p.ca_pem)),
        &format!("certificate-authority: {}", tls.join("ca.crt").display()),
    );
    put(&dir, "east.kubeconfig", &yaml);

    let shutdown = CancellationToken::new();
    let mut events = watcher(dir.clone())
        .with_rescan_interval(Duration::from_millis(300))
        .run(shutdown.clone());
    assert_eq!(upserted(next(&mut events).await), cred("east", 2));
    assert!(matches!(next(&mut events).await, PeerEvent::Synced));
    assert_quiet(&mut events).await;

    let other_ca = CertificateAuthority::generate("other-ca", Duration::from_secs(3600)).unwrap();
    let bundle = format!("{}{}", p.ca_pem, other_ca.cert_pem());
    std::fs::write(tls.join("ca.crt"), &bundle).unwrap();
    let c = upserted(next(&mut events).await);
    assert_eq!(c.ca_pem, bundle);
    shutdown.cancel();
}
