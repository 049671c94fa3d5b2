//! `meshctl connect` / `disconnect` end to end on a three-cluster `meshctl up` mesh, and the
//! refusals (ID clash, unreachable cluster, CA mismatch, bad manifests) that must leave
//! nothing half-done.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use mesh_tests::meshctl::{MeshGuard, examples_dir, meshctl, meshctl_env, procs_with, text};
use meshd::ctl::admin::{self, ClusterAdmin};
use meshd::kv::{EtcdStore, KvStore};
use meshd::peers::PeerCredential;
use serde_json::Value;

fn guard(prefix: &str) -> MeshGuard {
    MeshGuard {
        dir: tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("temp dir"),
    }
}

fn up(dir: &Path, clusters: &str, examples: &Path) {
    let out = meshctl(
        &[
            "up",
            "--clusters",
            clusters,
            "--examples",
            examples.to_str().expect("utf-8"),
        ],
        dir,
    );
    assert!(out.status.success(), "meshctl up failed:\n{}", text(&out));
}

fn json(o: &std::process::Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", text(o)))
}

/// Clusters with at least one backend of `ns/name`, as `cluster`'s agent merges it.
fn backend_clusters(dir: &Path, cluster: &str, ns: &str, name: &str) -> BTreeSet<String> {
    let o = meshctl(&["services", "--cluster", cluster, "-o", "json"], dir);
    assert!(o.status.success(), "services:\n{}", text(&o));
    json(&o)
        .as_array()
        .expect("array")
        .iter()
        .filter(|s| s["namespace"] == ns && s["name"] == name)
        .flat_map(|s| s["backends"].as_array().cloned().unwrap_or_default())
        .filter(|b| b["total"].as_u64().unwrap_or(0) > 0)
        .filter_map(|b| b["cluster"].as_str().map(str::to_owned))
        .collect()
}

fn wait_backends(dir: &Path, cluster: &str, want: &[&str]) {
    let want: BTreeSet<String> = want.iter().map(|s| (*s).to_owned()).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = backend_clusters(dir, cluster, "shop", "web");
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{cluster}: shop/web backends from {got:?}, want {want:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn admins(dir: &Path) -> Vec<ClusterAdmin> {
    admin::load(&[dir.join("kubeconfig")]).expect("admin kubeconfig")
}

fn runtime() -> tokio::runtime::Runtime {
    meshd::process::install_crypto_provider().expect("crypto provider");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Reads `mesh/cluster-config/<peer>` from the peer's etcd with a peer credential.
fn read_with(rt: &tokio::runtime::Runtime, cred: &PeerCredential) -> Result<bool, String> {
    rt.block_on(async {
        let store = EtcdStore::connect(&cred.to_etcd_config())
            .await
            .map_err(|e| e.to_string())?;
        let key = format!("mesh/cluster-config/{}", cred.name);
        store
            .client()
            .get(key, None)
            .await
            .map(|r| !r.kvs().is_empty())
            .map_err(|e| e.to_string())
    })
}

/// Watches `mesh/state/` with `cred` on its own thread (the watch is open when this
/// returns); the receiver gets the moment the watch ended and why.
fn watch_until_end(cred: &PeerCredential) -> std::sync::mpsc::Receiver<(Instant, String)> {
    let (open_tx, open_rx) = std::sync::mpsc::channel();
    let (end_tx, end_rx) = std::sync::mpsc::channel();
    let cfg = cred.to_etcd_config();
    std::thread::spawn(move || {
        // The crypto provider is installed already (by the caller's `runtime()`).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let store = EtcdStore::connect(&cfg).await.expect("peer store");
            let mut stream = store.watch("mesh/state/", 0).await.expect("watch opens");
            let _ = open_tx.send(());
            let why = loop {
                match stream.next().await {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break e.to_string(),
                    None => break "stream closed".to_owned(),
                }
            };
            let _ = end_tx.send((Instant::now(), why));
        });
    });
    open_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the peer watch opens");
    end_rx
}

fn etcd_users(rt: &tokio::runtime::Runtime, a: &ClusterAdmin) -> Vec<String> {
    rt.block_on(async {
        let mut c = a.etcd().await.expect("etcd as root");
        c.user_list().await.expect("user list").users().to_vec()
    })
}

fn peer_files(dir: &Path, cluster: &str) -> BTreeSet<String> {
    std::fs::read_dir(dir.join(cluster).join("peers"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn connect_and_disconnect_three_clusters() {
    let g = guard("meshctl-connect-");
    let dir = g.dir.path().to_owned();
    up(&dir, "3", &examples_dir());

    // Every cluster sees both others ready.
    let st = meshctl(
        &["status", "--wait", "--timeout", "90s", "-o", "json"],
        &dir,
    );
    assert!(st.status.success(), "status:\n{}", text(&st));
    let v = json(&st);
    for c in v["clusters"].as_array().expect("clusters") {
        let peers: BTreeSet<&str> = c["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .filter(|p| p["state"] == "ready" && p["connected"] == Value::Bool(true))
            .filter_map(|p| p["name"].as_str())
            .collect();
        assert_eq!(peers.len(), 2, "{c:#}");
    }
    for c in ["east", "west", "north"] {
        wait_backends(&dir, c, &["east", "west", "north"]);
    }

    // The credential east uses to read west works before the disconnect...
    let rt = runtime();
    let path = dir.join("east/peers/west.kubeconfig");
    let old =
        PeerCredential::from_kubeconfig(&path, &std::fs::read_to_string(&path).expect("peer file"))
            .expect("peer credential");
    assert_eq!(read_with(&rt, &old), Ok(true));
    // It goes through west's identity relay, not to west's etcd.
    let adm = admins(&dir);
    assert_ne!(old.server, adm[1].cred.server, "peers dial the relay");
    // A watch opened with it before the disconnect must end within 5 s of the revocation.
    let watch = watch_until_end(&old);

    let disconnect = {
        let dir = dir.clone();
        std::thread::spawn(move || {
            meshctl(
                &["disconnect", "east", "west", "--wait", "-o", "json"],
                &dir,
            )
        })
    };
    // The last moment remote-east still existed in west's etcd: a lower bound of the
    // revocation time, so the measured figure is an upper bound.
    let still_there = rt.block_on(async {
        let mut c = adm[1].etcd().await.expect("west's etcd as root");
        let mut last = Instant::now();
        let deadline = last + Duration::from_secs(60);
        loop {
            let now = Instant::now();
            let users = c.user_list().await.expect("user list").users().to_vec();
            if !users.contains(&"remote-east".to_owned()) {
                return last;
            }
            last = now;
            assert!(now < deadline, "remote-east not revoked within 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let (ended, why) = watch
        .recv_timeout(Duration::from_secs(30))
        .expect("the revoked credential's watch ends");
    let took = ended.saturating_duration_since(still_there);
    println!(
        "disconnect: the revoked credential's open watch ended within {took:?} of the revocation ({why})"
    );
    assert!(
        took <= Duration::from_secs(5),
        "the revoked credential's watch ran {took:?} after the revocation"
    );
    let dc = disconnect.join().expect("disconnect thread");
    assert!(dc.status.success(), "disconnect:\n{}", text(&dc));
    assert_eq!(json(&dc)["settled"], Value::Bool(true), "{}", text(&dc));

    // ...and is refused after it (by etcd, or already by the relay, which closes a revoked
    // user's connections); both sides drained the other.
    let refused = read_with(&rt, &old);
    assert!(
        matches!(&refused, Err(e) if e.contains("user name not found") || e.contains("permission denied") || e.contains("authentication failed") || e.contains("transport error") || e.contains("connection closed")),
        "revoked credential still reads: {refused:?}"
    );
    wait_backends(&dir, "east", &["east", "north"]);
    wait_backends(&dir, "west", &["west", "north"]);
    wait_backends(&dir, "north", &["east", "west", "north"]);
    assert_eq!(
        peer_files(&dir, "east"),
        BTreeSet::from(["north.kubeconfig".to_owned()])
    );
    let (east, west) = (&adm[0], &adm[1]);
    assert!(!etcd_users(&rt, west).contains(&"remote-east".to_owned()));
    assert!(!etcd_users(&rt, east).contains(&"remote-west".to_owned()));

    // The mesh without that pair is still healthy (status expects the configured peers).
    let st = meshctl(&["status", "-o", "json"], &dir);
    assert!(
        st.status.success(),
        "status after disconnect:\n{}",
        text(&st)
    );

    // Disconnecting again is refused clearly.
    let again = meshctl(&["disconnect", "east", "west"], &dir);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("are not connected"),
        "{}",
        text(&again)
    );

    // Reconnect: both sides ready again, backends back.
    let cn = meshctl(
        &["connect", "east", "west", "--wait", "--timeout", "60s"],
        &dir,
    );
    assert!(cn.status.success(), "connect:\n{}", text(&cn));
    assert!(
        String::from_utf8_lossy(&cn.stdout).contains("OK east and west: connected"),
        "{}",
        text(&cn)
    );
    wait_backends(&dir, "east", &["east", "west", "north"]);
    let twice = meshctl(&["connect", "east", "west"], &dir);
    assert!(!twice.status.success());
    assert!(
        String::from_utf8_lossy(&twice.stderr).contains("already connected"),
        "{}",
        text(&twice)
    );

    // Diagnose passes on a healthy mesh.
    let dg = meshctl(&["diagnose"], &dir);
    assert!(dg.status.success(), "diagnose:\n{}", text(&dg));
    assert!(
        String::from_utf8_lossy(&dg.stdout).contains(" 0 failed"),
        "{}",
        text(&dg)
    );

    // down leaves no process, no listening port and no file behind.
    let state: Value =
        serde_json::from_slice(&std::fs::read(dir.join("state.json")).expect("state.json"))
            .expect("state json");
    let ports: Vec<u16> = state["clusters"]
        .as_array()
        .expect("clusters")
        .iter()
        .flat_map(|c| {
            [
                "etcdPort",
                "etcdPeerPort",
                "apiserverGrpcPort",
                "apiserverHealthPort",
                "agentGrpcPort",
                "agentHealthPort",
                "relayPort",
            ]
            .map(|k| c[k].as_u64().and_then(|p| u16::try_from(p).ok()).expect(k))
        })
        .collect();
    let down = meshctl(&["down", "--purge"], &dir);
    assert!(down.status.success(), "down:\n{}", text(&down));
    let needle = dir.display().to_string();
    for bin in ["etcd", "clustermesh-apiserver", "mesh-agent"] {
        assert!(procs_with(bin, &needle).is_empty(), "{bin} left running");
    }
    for p in ports {
        assert!(
            TcpListener::bind(("127.0.0.1", p)).is_ok(),
            "port {p} still bound after down"
        );
    }
    assert!(!dir.exists(), "down --purge left {}", dir.display());
}

#[test]
fn connect_refusals_leave_nothing_half_done() {
    let ga = guard("meshctl-refuse-a-");
    let gb = guard("meshctl-refuse-b-");
    let (a, b) = (ga.dir.path().to_owned(), gb.dir.path().to_owned());
    up(&a, "2", &examples_dir());
    // A second mesh whose only cluster, south, also gets ID 1 (like east).
    let ex = tempfile::tempdir().expect("examples");
    let src = examples_dir().join("south");
    std::fs::create_dir(ex.path().join("south")).expect("mkdir");
    for f in std::fs::read_dir(&src).expect("south").flatten() {
        std::fs::copy(f.path(), ex.path().join("south").join(f.file_name())).expect("copy");
    }
    up(&b, "1", ex.path());
    let both = format!(
        "{}:{}",
        a.join("kubeconfig").display(),
        b.join("kubeconfig").display()
    );
    let rt = runtime();
    let before_east = peer_files(&a, "east");
    let users_before = etcd_users(&rt, &admins(&a)[0]);

    // ID clash.
    let o = meshctl_env(&["connect", "east", "south", "--kubeconfig", &both], &[]);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("ID clash") && err.contains("ID 1"), "{err}");

    // Unreachable: the same cluster behind a port nothing listens on.
    let bad = b.join("unreachable.kubeconfig");
    let free = TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let text_b = std::fs::read_to_string(b.join("kubeconfig")).expect("kubeconfig");
    let re_port = text_b
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .expect("server line")
        .to_owned();
    std::fs::write(
        &bad,
        text_b.replace(&re_port, &format!("https://127.0.0.1:{free}")),
    )
    .expect("write");
    let o = meshctl_env(
        &[
            "connect",
            "west",
            "south",
            "--kubeconfig",
            &format!("{}:{}", a.join("kubeconfig").display(), bad.display()),
        ],
        &[],
    );
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cannot reach the etcd of south") && err.contains(&free.to_string()),
        "{err}"
    );

    // CA mismatch: south's context trusting (and signing with) west's CA.
    let mismatch = b.join("mismatch.kubeconfig");
    let mut text_m = String::new();
    for l in text_b.lines() {
        let t = l.trim_start();
        let indent = &l[..l.len() - t.len()];
        if t.starts_with("certificate-authority: ") {
            text_m += &format!(
                "{indent}certificate-authority: {}\n",
                a.join("west/pki/ca.crt").display()
            );
        } else if t.starts_with("caKey: ") {
            text_m += &format!("{indent}caKey: {}\n", a.join("west/pki/ca.key").display());
        } else {
            text_m += l;
            text_m.push('\n');
        }
    }
    std::fs::write(&mismatch, text_m).expect("write");
    let o = meshctl_env(
        &[
            "connect",
            "east",
            "south",
            "--kubeconfig",
            &format!("{}:{}", a.join("kubeconfig").display(), mismatch.display()),
        ],
        &[],
    );
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("CA mismatch"),
        "{}",
        text(&o)
    );

    // Unknown cluster.
    let o = meshctl(&["connect", "east", "nowhere"], &a);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no cluster \"nowhere\""),
        "{}",
        text(&o)
    );

    // Nothing changed on either side.
    assert_eq!(peer_files(&a, "east"), before_east);
    assert!(peer_files(&b, "south").is_empty());
    assert_eq!(etcd_users(&rt, &admins(&a)[0]), users_before);
    assert!(
        !etcd_users(&rt, &admins(&b)[0])
            .iter()
            .any(|u| u.starts_with("remote-")),
        "south got a remote user"
    );
}

#[test]
fn up_with_a_broken_manifest_starts_nothing() {
    let g = guard("meshctl-broken-");
    let dir = g.dir.path().to_owned();
    let ex = tempfile::tempdir().expect("examples");
    for c in ["east", "west"] {
        let to = ex.path().join(c);
        std::fs::create_dir(&to).expect("mkdir");
        for f in std::fs::read_dir(examples_dir().join(c))
            .expect("example")
            .flatten()
        {
            if f.path().is_file() {
                std::fs::copy(f.path(), to.join(f.file_name())).expect("copy");
            }
        }
    }
    std::fs::write(
        ex.path().join("west/broken.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: x\n  namespace: shop\nspec:\n  ports:\n  - port: \"eighty\"\n",
    )
    .expect("write");
    let o = meshctl(
        &["up", "--examples", ex.path().to_str().expect("utf-8")],
        &dir,
    );
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cluster west")
            && err.contains("broken.yaml")
            && err.contains("spec.ports[0].port"),
        "{err}"
    );
    assert!(!dir.join("state.json").exists(), "state.json left behind");
    let needle = dir.display().to_string();
    for bin in ["etcd", "clustermesh-apiserver", "mesh-agent"] {
        assert!(procs_with(bin, &needle).is_empty(), "{bin} started");
    }
}
