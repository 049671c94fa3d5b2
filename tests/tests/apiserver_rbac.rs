//! etcd RBAC of DESIGN §5 against a real etcd (TLS, `--client-cert-auth`, auth on): the
//! apiserver bootstrap, what `apiserver-<cluster>` and `remote-<peer>` may do, revocation,
//! foreign CAs and unknown users.

use std::time::Duration;

use clustermesh_apiserver::bootstrap::{
    APISERVER_ROLE, Access, Change, KeyPermission, REMOTE_ROLE, ROOT_ROLE, ROOT_USER,
    add_remote_user, admin_user, apiserver_user, auth_is_enabled, bootstrap, list_remote_users,
    remote_permissions, remote_user, revoke_remote_user,
};
use etcd_client::{Client, Permission, PermissionType};
use futures::StreamExt;
use mesh_certs::{CertRequest, CertificateAuthority};
use mesh_tests::{EtcdGuard, init_tracing};
use meshd::keys::{CLUSTER_CONFIG_PREFIX, HEARTBEAT, STATE_PREFIX, SYNCED_PREFIX};
use meshd::kv::{Compare, EtcdConfig, EtcdStore, KvError, KvStore, Op, Txn, WatchStream};
use meshd::model::ClusterName;

/// Bound for one watch event to arrive (polling, not synchronization by sleep).
const EVENT_WAIT: Duration = Duration::from_secs(10);
/// How long an existing watch is observed for events after its user was deleted.
const REVOKED_WATCH_WAIT: Duration = Duration::from_secs(3);

/// The cancel reason of a watch etcd 3.4 refuses (the Go error string of the gRPC status).
const WATCH_DENIED: &str =
    "rpc error: code = PermissionDenied desc = etcdserver: permission denied";

const STATE_KEY: &str = "mesh/state/identities/v1/east/65792";
const CONFIG_KEY: &str = "mesh/cluster-config/east";
const SYNCED_KEY: &str = "mesh/synced/east/services";
const CACHE_KEY: &str = "mesh/cache/nodes/v1/west/n1";
const POLICY_KEY: &str = "mesh/policies/v1/east/default/deny-all";
const INDEX_KEY: &str = "mesh/identity-index/v1/east/k8s:app=web";
const REFS_KEY: &str = "mesh/identity-refs/v1/east/65792/n1";
const CLUSTERSET_KEY: &str = "mesh/clusterset-ips/v1/default/web";
const HEARTBEAT2: &str = "mesh/heartbeat2";

fn east() -> ClusterName {
    ClusterName::new("east").unwrap()
}

fn west() -> ClusterName {
    ClusterName::new("west").unwrap()
}

async fn root_client(g: &EtcdGuard) -> Client {
    g.root_store().await.unwrap().client()
}

async fn store(cfg: &EtcdConfig) -> EtcdStore {
    EtcdStore::connect(cfg).await.unwrap()
}

async fn store_for(g: &EtcdGuard, user: &str) -> EtcdStore {
    store(&g.config_for(user).unwrap()).await
}

/// A started etcd with `east` bootstrapped and the peer user `remote-west`.
async fn bootstrapped() -> (EtcdGuard, Client) {
    init_tracing();
    let g = Box::pin(EtcdGuard::start()).await.unwrap();
    let root = root_client(&g).await;
    bootstrap(&root, &east()).await.unwrap();
    assert!(add_remote_user(&root, &west()).await.unwrap());
    (g, root)
}

#[track_caller]
fn assert_denied<T: std::fmt::Debug>(r: Result<T, KvError>, what: &str) {
    match r {
        Err(KvError::PermissionDenied { .. }) => {}
        other => panic!("{what}: expected PermissionDenied, got {other:?}"),
    }
}

/// The raw permissions of `role` as etcd stores them: (type, key, range end), sorted.
async fn raw_permissions(root: &Client, role: &str) -> Vec<(i32, Vec<u8>, Vec<u8>)> {
    let mut c = root.clone();
    let mut v: Vec<_> = c
        .role_get(role)
        .await
        .unwrap()
        .permissions()
        .iter()
        .map(|p| (p.get_type(), p.key().to_vec(), p.range_end().to_vec()))
        .collect();
    v.sort();
    v
}

fn raw(t: PermissionType, key: &str, end: &str) -> (i32, Vec<u8>, Vec<u8>) {
    (t as i32, key.as_bytes().to_vec(), end.as_bytes().to_vec())
}

async fn user_roles(root: &Client, user: &str) -> Vec<String> {
    let mut c = root.clone();
    let mut v = c.user_get(user).await.unwrap().roles().to_vec();
    v.sort();
    v
}

/// The revision a watch must start from to see every later change.
async fn next_revision(root: &EtcdStore) -> i64 {
    root.list_page(HEARTBEAT, None, 1, 0)
        .await
        .unwrap()
        .revision
        + 1
}

/// Waits (bounded) for the watch to report a put of `key`.
async fn wait_for_put(w: &mut WatchStream, key: &str, within: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let next = tokio::time::timeout_at(deadline, w.next())
            .await
            .map_err(|_| format!("no put of {key} within {within:?}"))?;
        match next {
            Some(Ok(batch)) => {
                if batch.events.iter().any(
                    |e| matches!(e, meshd::kv::WatchEvent::Put(kv) if kv.key == key.as_bytes()),
                ) {
                    return Ok(());
                }
            }
            Some(Err(e)) => return Err(format!("watch failed: {e:?}")),
            None => return Err("watch ended".into()),
        }
    }
}

/// Asserts that a watch of `prefix` is refused: etcd 3.4 accepts the stream and then
/// cancels the watch with reason "permission denied" (the store's `WatchCanceled`).
async fn assert_watch_denied(s: &EtcdStore, prefix: &str, from: i64) {
    let mut w = s.watch(prefix, from).await.unwrap();
    let first = tokio::time::timeout(EVENT_WAIT, w.next())
        .await
        .unwrap_or_else(|_| panic!("watch {prefix}: neither canceled nor delivered"));
    match first {
        Some(Err(KvError::WatchCanceled { reason, .. })) if reason == WATCH_DENIED => {}
        other => panic!("watch {prefix}: expected cancel with {WATCH_DENIED:?}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_is_idempotent_exact_and_repairs_drift() {
    init_tracing();
    let g = Box::pin(EtcdGuard::start()).await.unwrap();
    let root = root_client(&g).await;
    let mut c = root.clone();

    // Emulate a fresh etcd: auth off, no users (EtcdGuard enables auth with a root user).
    c.auth_disable().await.unwrap();
    c.user_delete(ROOT_USER).await.unwrap();
    assert!(c.user_list().await.unwrap().users().is_empty());
    assert!(!auth_is_enabled(&root).await.unwrap());

    let first = bootstrap(&root, &east()).await.unwrap();
    let granted = |role: &str, permission: KeyPermission| Change::PermissionGranted {
        role: role.into(),
        permission,
    };
    let role_granted = |user: &str, role: &str| Change::RoleGranted {
        user: user.into(),
        role: role.into(),
    };
    let mut expected = vec![
        Change::UserAdded("root".into()),
        role_granted("root", "root"),
        Change::UserAdded("admin-east".into()),
        role_granted("admin-east", "root"),
        Change::RoleAdded("mesh-apiserver".into()),
        granted(
            "mesh-apiserver",
            KeyPermission::prefix(Access::ReadWrite, "mesh/"),
        ),
        Change::RoleAdded("mesh-remote".into()),
    ];
    for p in remote_permissions() {
        expected.push(granted("mesh-remote", p));
    }
    expected.extend([
        Change::RoleAdded("mesh-agent".into()),
        granted("mesh-agent", KeyPermission::prefix(Access::Read, "mesh/")),
        Change::UserAdded("apiserver-east".into()),
        role_granted("apiserver-east", "mesh-apiserver"),
        Change::UserAdded("agent-east".into()),
        role_granted("agent-east", "mesh-agent"),
        Change::AuthEnabled,
    ]);
    assert_eq!(first.changes, expected);
    assert!(auth_is_enabled(&root).await.unwrap());

    let second = bootstrap(&root, &east()).await.unwrap();
    assert!(
        second.is_unchanged(),
        "second run changed {:?}",
        second.changes
    );

    // Exactly the permissions of the design, read back from etcd (literal bytes).
    assert_eq!(
        raw_permissions(&root, APISERVER_ROLE).await,
        vec![raw(PermissionType::Readwrite, "mesh/", "mesh0")]
    );
    let mut want_remote = vec![
        raw(PermissionType::Read, "mesh/state/", "mesh/state0"),
        raw(
            PermissionType::Read,
            "mesh/cluster-config/",
            "mesh/cluster-config0",
        ),
        raw(PermissionType::Read, "mesh/synced/", "mesh/synced0"),
        raw(PermissionType::Read, "mesh/heartbeat", ""),
    ];
    want_remote.sort();
    assert_eq!(raw_permissions(&root, REMOTE_ROLE).await, want_remote);
    assert_eq!(user_roles(&root, "root").await, vec![ROOT_ROLE]);
    assert_eq!(user_roles(&root, "admin-east").await, vec![ROOT_ROLE]);
    assert_eq!(
        user_roles(&root, "apiserver-east").await,
        vec![APISERVER_ROLE]
    );

    // etcd-client's own builders produce the same ranges (with_prefix / single key).
    c.role_add("scratch").await.unwrap();
    c.role_grant_permission("scratch", Permission::read(STATE_PREFIX).with_prefix())
        .await
        .unwrap();
    c.role_grant_permission("scratch", Permission::read(HEARTBEAT))
        .await
        .unwrap();
    let mut scratch = vec![
        raw(PermissionType::Read, "mesh/state/", "mesh/state0"),
        raw(PermissionType::Read, "mesh/heartbeat", ""),
    ];
    scratch.sort();
    assert_eq!(raw_permissions(&root, "scratch").await, scratch);

    // Drift: extra permissions, a widened type, an extra role on the apiserver user.
    c.role_grant_permission(REMOTE_ROLE, Permission::read(CACHE_KEY).with_prefix())
        .await
        .unwrap();
    c.role_grant_permission(REMOTE_ROLE, Permission::read(HEARTBEAT2))
        .await
        .unwrap();
    c.role_grant_permission(
        REMOTE_ROLE,
        Permission::read_write(STATE_PREFIX).with_prefix(),
    )
    .await
    .unwrap();
    c.user_grant_role("apiserver-east", REMOTE_ROLE)
        .await
        .unwrap();
    assert_eq!(raw_permissions(&root, REMOTE_ROLE).await.len(), 6);

    let repair = bootstrap(&root, &east()).await.unwrap();
    let revoked = |permission: KeyPermission| Change::PermissionRevoked {
        role: REMOTE_ROLE.into(),
        permission,
    };
    for change in [
        revoked(KeyPermission::prefix(Access::ReadWrite, STATE_PREFIX)),
        granted(
            REMOTE_ROLE,
            KeyPermission::prefix(Access::Read, STATE_PREFIX),
        ),
        revoked(KeyPermission::prefix(Access::Read, CACHE_KEY)),
        revoked(KeyPermission::key(Access::Read, HEARTBEAT2)),
        Change::RoleRevoked {
            user: "apiserver-east".into(),
            role: REMOTE_ROLE.into(),
        },
    ] {
        assert!(
            repair.changes.contains(&change),
            "{change} missing in {:?}",
            repair.changes
        );
    }
    assert_eq!(repair.changes.len(), 5, "{:?}", repair.changes);
    assert_eq!(raw_permissions(&root, REMOTE_ROLE).await, want_remote);
    assert_eq!(
        user_roles(&root, "apiserver-east").await,
        vec![APISERVER_ROLE]
    );
    assert!(bootstrap(&root, &east()).await.unwrap().is_unchanged());

    // Already bootstrapped but auth off: only auth is enabled.
    c.auth_disable().await.unwrap();
    let reenabled = bootstrap(&root, &east()).await.unwrap();
    assert_eq!(reenabled.changes, vec![Change::AuthEnabled]);
    assert!(auth_is_enabled(&root).await.unwrap());
    // Auth really is on: an unknown user is refused.
    assert_denied(
        store_for(&g, "nobody").await.get(STATE_KEY).await,
        "unknown user after re-enable",
    );

    // Remote users: idempotent add, listing, revoke.
    assert!(add_remote_user(&root, &west()).await.unwrap());
    assert!(!add_remote_user(&root, &west()).await.unwrap());
    assert_eq!(
        user_roles(&root, &remote_user(&west())).await,
        vec![REMOTE_ROLE]
    );
    assert_eq!(list_remote_users(&root).await.unwrap(), vec!["remote-west"]);
    assert!(revoke_remote_user(&root, &west()).await.unwrap());
    assert!(!revoke_remote_user(&root, &west()).await.unwrap());
    assert!(list_remote_users(&root).await.unwrap().is_empty());
    assert_eq!(admin_user(&east()), "admin-east");
    assert_eq!(apiserver_user(&east()), "apiserver-east");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_user_reads_and_writes_mesh_only() {
    let (g, _root) = bootstrapped().await;
    let s = store_for(&g, &apiserver_user(&east())).await;

    for key in [
        STATE_KEY,
        CACHE_KEY,
        HEARTBEAT,
        CONFIG_KEY,
        SYNCED_KEY,
        POLICY_KEY,
        INDEX_KEY,
        CLUSTERSET_KEY,
    ] {
        s.put(key, b"v1", None).await.unwrap();
        assert_eq!(s.get(key).await.unwrap().unwrap().value, b"v1", "{key}");
        assert!(s.delete(key).await.unwrap(), "{key}");
        assert!(s.get(key).await.unwrap().is_none(), "{key}");
    }
    s.put(STATE_KEY, b"v2", None).await.unwrap();
    assert_eq!(s.list_all("mesh/", 10).await.unwrap().kvs.len(), 1);
    assert!(s.create(CLUSTERSET_KEY, b"ip", None).await.unwrap());
    assert!(!s.create(CLUSTERSET_KEY, b"ip", None).await.unwrap());
    let lease = s.lease_grant(Duration::from_secs(30)).await.unwrap();
    s.put(HEARTBEAT, b"now", Some(lease)).await.unwrap();

    assert_denied(s.put("other/x", b"v", None).await, "put other/x");
    assert_denied(s.get("other/x").await, "get other/x");
    assert_denied(s.delete("other/x").await, "delete other/x");
    assert_denied(s.list_page("other/", None, 10, 0).await, "list other/");
    // `mesh/` is a prefix with its slash: `mesh` and `meshx/...` are outside it.
    assert_denied(s.put("mesh", b"v", None).await, "put mesh");
    assert_denied(s.put("meshx/a", b"v", None).await, "put meshx/a");
    assert_denied(
        s.txn(Txn {
            compares: vec![Compare::Absent(STATE_KEY.into())],
            success: vec![Op::Put {
                key: "other/y".into(),
                value: b"v".to_vec(),
                lease: None,
            }],
            failure: vec![],
        })
        .await,
        "txn writing other/y",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_user_reads_only_what_a_peer_needs() {
    let (g, root) = bootstrapped().await;
    let rs = g.root_store().await.unwrap();
    for key in [
        STATE_KEY,
        CONFIG_KEY,
        SYNCED_KEY,
        HEARTBEAT,
        CACHE_KEY,
        POLICY_KEY,
        INDEX_KEY,
        REFS_KEY,
        CLUSTERSET_KEY,
        HEARTBEAT2,
        "other/x",
    ] {
        rs.put(key, key.as_bytes(), None).await.unwrap();
    }
    let s = store_for(&g, &remote_user(&west())).await;

    // Allowed: get, prefix list and watch of the three prefixes; get of the heartbeat.
    for (prefix, key) in [
        (STATE_PREFIX, STATE_KEY),
        (CLUSTER_CONFIG_PREFIX, CONFIG_KEY),
        (SYNCED_PREFIX, SYNCED_KEY),
    ] {
        assert_eq!(s.get(key).await.unwrap().unwrap().value, key.as_bytes());
        let page = s.list_all(prefix, 10).await.unwrap();
        assert_eq!(page.kvs.len(), 1, "{prefix}");
        assert_eq!(page.kvs[0].key, key.as_bytes());

        let from = next_revision(&rs).await;
        let mut w = s.watch(prefix, from).await.unwrap();
        let new_key = format!("{prefix}east/watched");
        rs.put(&new_key, b"w", None).await.unwrap();
        wait_for_put(&mut w, &new_key, EVENT_WAIT).await.unwrap();
    }
    // A narrower prefix inside an allowed one is allowed too.
    assert_eq!(
        s.list_all("mesh/state/identities/v1/east/", 10)
            .await
            .unwrap()
            .kvs
            .len(),
        1
    );
    assert_eq!(
        s.get(HEARTBEAT).await.unwrap().unwrap().value,
        b"mesh/heartbeat"
    );

    // Denied reads.
    for key in [
        CACHE_KEY,
        POLICY_KEY,
        INDEX_KEY,
        REFS_KEY,
        CLUSTERSET_KEY,
        HEARTBEAT2,
        "other/x",
        "mesh",
    ] {
        assert_denied(s.get(key).await, &format!("get {key}"));
    }
    for prefix in [
        "mesh/",
        "mesh/cache/",
        "mesh/policies/",
        "mesh/identity-index/",
        // The heartbeat is a single key: a prefix read of it covers `mesh/heartbeat2`.
        HEARTBEAT,
    ] {
        assert_denied(
            s.list_page(prefix, None, 10, 0).await,
            &format!("list {prefix}"),
        );
    }
    let from = next_revision(&rs).await;
    for prefix in ["mesh/", "mesh/cache/", HEARTBEAT] {
        assert_watch_denied(&s, prefix, from).await;
    }

    // Denied writes, also to keys it may read.
    for key in [
        STATE_KEY, CONFIG_KEY, SYNCED_KEY, HEARTBEAT, CACHE_KEY, "other/x",
    ] {
        assert_denied(s.put(key, b"evil", None).await, &format!("put {key}"));
        assert_denied(s.delete(key).await, &format!("delete {key}"));
    }
    assert_denied(s.delete_prefix(STATE_PREFIX).await, "delete prefix");
    assert_denied(
        s.create("mesh/state/identities/v1/west/65792", b"x", None)
            .await,
        "txn create",
    );
    assert_denied(
        s.txn(Txn {
            compares: vec![Compare::Value(STATE_KEY.into(), STATE_KEY.into())],
            success: vec![Op::Delete(STATE_KEY.into())],
            failure: vec![],
        })
        .await,
        "txn delete",
    );
    // Nothing changed.
    for key in [STATE_KEY, CONFIG_KEY, SYNCED_KEY, HEARTBEAT, CACHE_KEY] {
        assert_eq!(rs.get(key).await.unwrap().unwrap().value, key.as_bytes());
    }
    assert_eq!(list_remote_users(&root).await.unwrap(), vec!["remote-west"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_remote_user_is_refused() {
    let (g, root) = bootstrapped().await;
    let rs = g.root_store().await.unwrap();
    rs.put(STATE_KEY, b"v", None).await.unwrap();
    let cfg = g.config_for(&remote_user(&west())).unwrap();
    let existing = store(&cfg).await;
    assert!(existing.get(STATE_KEY).await.unwrap().is_some());
    let from = next_revision(&rs).await;
    let mut w = existing.watch(STATE_PREFIX, from).await.unwrap();
    rs.put("mesh/state/before", b"v", None).await.unwrap();
    wait_for_put(&mut w, "mesh/state/before", EVENT_WAIT)
        .await
        .unwrap();

    assert!(revoke_remote_user(&root, &west()).await.unwrap());

    // The existing connection's next request, and a new connection with the very same
    // certificate, are refused.
    assert_denied(existing.get(STATE_KEY).await, "existing connection");
    let fresh = store(&cfg).await;
    assert_denied(
        fresh.get(STATE_KEY).await,
        "new connection, same certificate",
    );
    assert_denied(fresh.list_page(STATE_PREFIX, None, 10, 0).await, "list");
    assert_watch_denied(&fresh, STATE_PREFIX, next_revision(&rs).await).await;

    // A watch opened before the revocation: etcd 3.4 checks permissions only when a watch
    // is created, so it keeps delivering (see the module docs of `bootstrap`).
    rs.put("mesh/state/after", b"v", None).await.unwrap();
    let after = wait_for_put(&mut w, "mesh/state/after", REVOKED_WATCH_WAIT).await;
    assert_eq!(
        after,
        Ok(()),
        "etcd 3.4 behaviour changed: an existing watch no longer delivers after revocation"
    );

    // Re-adding the user restores access for the same certificate.
    assert!(add_remote_user(&root, &west()).await.unwrap());
    assert!(fresh.get(STATE_KEY).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_ca_certificate_is_refused() {
    let (g, _root) = bootstrapped().await;
    let legit = store_for(&g, &remote_user(&west())).await;
    assert!(legit.get(STATE_KEY).await.unwrap().is_none());

    let foreign = CertificateAuthority::generate("foreign-ca", Duration::from_secs(3600)).unwrap();
    let cert = foreign.issue(&CertRequest::client("remote-west")).unwrap();
    let mut cfg = g.config_for("remote-west").unwrap();
    cfg.cert_pem = Some(cert.cert_pem);
    cfg.key_pem = Some(cert.key_pem);
    let s = EtcdStore::connect(&cfg).await.unwrap();
    // etcd rejects the handshake; the client sees the connection die, which the store maps
    // to `Request` (observed: "transport error" / BadCertificate alert, or Cancelled
    // "operation was canceled" / connection closed), not `Connect` and not `PermissionDenied`.
    for attempt in 0..2 {
        match s.get(STATE_KEY).await {
            Err(KvError::Request { .. } | KvError::Connect { .. }) => {}
            other => panic!("foreign CA, attempt {attempt}: expected refusal, got {other:?}"),
        }
    }
    // The refusal is etcd's certificate check (bounded polling: etcd logs asynchronously).
    let deadline = tokio::time::Instant::now() + EVENT_WAIT;
    let wanted =
        "tls: failed to verify client certificate: x509: certificate signed by unknown authority";
    loop {
        let log = std::fs::read_to_string(g.dir().join("etcd.log")).unwrap();
        if log.contains(wanted) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "etcd did not log {wanted:?}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_user_is_refused() {
    let (g, _root) = bootstrapped().await;
    let rs = g.root_store().await.unwrap();
    rs.put(STATE_KEY, b"v", None).await.unwrap();
    let legit = store_for(&g, &remote_user(&west())).await;
    assert!(legit.get(STATE_KEY).await.unwrap().is_some());

    let s = store_for(&g, "remote-nobody").await;
    assert_denied(s.get(STATE_KEY).await, "get");
    assert_denied(s.get(HEARTBEAT).await, "get heartbeat");
    assert_denied(s.list_page(STATE_PREFIX, None, 10, 0).await, "list");
    assert_denied(s.put(STATE_KEY, b"x", None).await, "put");
    assert_watch_denied(&s, STATE_PREFIX, next_revision(&rs).await).await;
}
