//! `meshctl connect/disconnect --context A --destination-context B` (Kubernetes mode) as the
//! real binary against two clusters, each with its own in-process Kubernetes API server,
//! real etcd, exporter, kvstoremesh and agent: Secrets written through the API, both sides
//! ready, refusals, and a disconnect that deletes the Secrets, revokes the users and drains.
//! With the identity relay installed (Secret `meshd-peer-ca`, Service port `relay`), peers
//! are given the relay and peer-CA credentials (which etcd itself refuses), and a revoked
//! peer's open watch ends within 5 s of `meshctl disconnect --context` (the figure is
//! printed: `--no-capture`).

use std::time::{Duration, Instant};

use futures::StreamExt;
use mesh_agent::runtime::ViewHandles;
use mesh_tests::bin_path;
use mesh_tests::init_tracing;
use mesh_tests::kube_cluster::{KubeCluster, MESHD_NAMESPACE, RunningRelay};
use mesh_tests::meshctl::text;
use meshd::kv::{EtcdStore, KvStore};
use meshd::peers::PeerCredential;
use serde_json::Value;

const CONVERGE: Duration = Duration::from_secs(60);

async fn wait_for(what: &str, h: &ViewHandles, f: impl Fn(&ViewHandles) -> bool) {
    let deadline = tokio::time::Instant::now() + CONVERGE;
    while !f(h) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; status: {:#?}",
            *h.status.borrow()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs meshctl off the runtime (the API servers it talks to live in this process).
async fn meshctl(args: Vec<String>) -> std::process::Output {
    let bin = bin_path("meshctl");
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin)
            .args(&args)
            .env_remove("KUBECONFIG")
            .output()
            .expect("meshctl")
    })
    .await
    .expect("join")
}

async fn users(c: &KubeCluster) -> Vec<String> {
    c.etcd
        .root_store()
        .await
        .expect("root store")
        .client()
        .user_list()
        .await
        .expect("user list")
        .users()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_meshctl_connect_by_context() {
    init_tracing();
    let east = Box::pin(KubeCluster::start("east", 1)).await.unwrap();
    let west = Box::pin(KubeCluster::start("west", 2)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (fe, fw) = (dir.path().join("east.yaml"), dir.path().join("west.yaml"));
    std::fs::write(&fe, east.api.kubeconfig_yaml("kind-east").unwrap()).unwrap();
    std::fs::write(&fw, west.api.kubeconfig_yaml("kind-west").unwrap()).unwrap();
    let files = format!("{}:{}", fe.display(), fw.display());
    let args = |cmd: &str, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            cmd,
            "--context",
            "kind-east",
            "--destination-context",
            "kind-west",
            "--kube-config",
            &files,
            "--namespace",
            MESHD_NAMESPACE,
            // The test etcd's certificate names localhost (the chart's names the Service).
            "--tls-server-name",
            "localhost",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        v.extend(extra.iter().map(|s| (*s).to_owned()));
        v
    };

    let out = meshctl(args(
        "connect",
        &["--wait", "--timeout", "60s", "-o", "json"],
    ))
    .await;
    assert!(out.status.success(), "connect:\n{}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["settled"], Value::Bool(true), "{v:#}");
    let steps = v["steps"].to_string();
    assert!(
        steps.contains("Secret meshd/meshd-peer-west")
            && steps.contains("Secret meshd/meshd-peer-east"),
        "{v:#}"
    );
    for c in [&east, &west] {
        let h = c.agent.handles();
        wait_for("agent ready with its peer", &h, |h| {
            let s = h.status.borrow();
            s.ready && s.peers.len() == 1
        })
        .await;
    }
    assert!(users(&west).await.contains(&"remote-east".to_owned()));
    assert!(users(&east).await.contains(&"remote-west".to_owned()));

    // Connecting again is refused, naming the Secret.
    let out = meshctl(args("connect", &[])).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already connected") && err.contains("meshd-peer-west"),
        "{}",
        text(&out)
    );
    // An unknown context is named with the files searched.
    let mut bad = args("connect", &[]);
    bad[2] = "kind-nowhere".into();
    let out = meshctl(bad).await;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no context \"kind-nowhere\""),
        "{}",
        text(&out)
    );

    // Disconnect: Secrets gone, users revoked, the agents drain the peer.
    let out = meshctl(args("disconnect", &["--wait", "--timeout", "60s"])).await;
    assert!(out.status.success(), "disconnect:\n{}", text(&out));
    for c in [&east, &west] {
        let secrets = meshd::kube::list_peer_secrets(&c.client, MESHD_NAMESPACE)
            .await
            .unwrap();
        assert!(secrets.is_empty(), "{} still has peer Secrets", c.name);
        let h = c.agent.handles();
        wait_for("peer drained", &h, |h| h.status.borrow().peers.is_empty()).await;
    }
    assert!(!users(&west).await.contains(&"remote-east".to_owned()));
    assert!(!users(&east).await.contains(&"remote-west".to_owned()));
}

/// The arguments of `meshctl <cmd> --context kind-east --destination-context kind-west`.
fn pair_args(cmd: &str, files: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        cmd,
        "--context",
        "kind-east",
        "--destination-context",
        "kind-west",
        "--kube-config",
        files,
        "--namespace",
        MESHD_NAMESPACE,
        // The test etcd's and relay's certificates name localhost (the chart's name the
        // Service).
        "--tls-server-name",
        "localhost",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    v.extend(extra.iter().map(|s| (*s).to_owned()));
    v
}

fn relay(c: &KubeCluster) -> &RunningRelay {
    c.relay.as_ref().expect("relay")
}

/// The credential `c` holds in its peer Secret for `peer`.
async fn peer_secret(c: &KubeCluster, peer: &str) -> PeerCredential {
    meshd::kube::list_peer_secrets(&c.client, MESHD_NAMESPACE)
        .await
        .expect("list peer Secrets")
        .into_iter()
        .find(|(name, _)| name.ends_with(&format!("meshd-peer-{peer}")))
        .unwrap_or_else(|| panic!("{} has no peer Secret for {peer}", c.name))
        .1
        .expect("valid peer Secret")
}

/// Watches `mesh/state/` with `cred` on its own task (open when this returns); the
/// receiver gets the moment the watch ended and why.
async fn watch_until_end(
    cred: &PeerCredential,
) -> tokio::sync::oneshot::Receiver<(Instant, String)> {
    let store = EtcdStore::connect(&cred.to_etcd_config())
        .await
        .expect("peer store through the relay");
    let mut stream = store.watch("mesh/state/", 0).await.expect("watch opens");
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _keep = store;
        let why = loop {
            match stream.next().await {
                Some(Ok(_)) => {}
                Some(Err(e)) => break e.to_string(),
                None => break "stream closed".to_owned(),
            }
        };
        let _ = tx.send((Instant::now(), why));
    });
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_meshctl_connect_through_the_identity_relay() {
    init_tracing();
    let east = Box::pin(KubeCluster::start_with_relay("east", 1))
        .await
        .unwrap();
    let west = Box::pin(KubeCluster::start_with_relay("west", 2))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (fe, fw) = (dir.path().join("east.yaml"), dir.path().join("west.yaml"));
    std::fs::write(&fe, east.api.kubeconfig_yaml("kind-east").unwrap()).unwrap();
    std::fs::write(&fw, west.api.kubeconfig_yaml("kind-west").unwrap()).unwrap();
    let files = format!("{}:{}", fe.display(), fw.display());

    let out = meshctl(pair_args(
        "connect",
        &files,
        &["--wait", "--timeout", "60s"],
    ))
    .await;
    assert!(out.status.success(), "connect:\n{}", text(&out));
    for c in [&east, &west] {
        let h = c.agent.handles();
        wait_for("agent ready with its peer through the relay", &h, |h| {
            let s = h.status.borrow();
            s.ready && s.peers.len() == 1
        })
        .await;
    }

    // Each side's peer Secret names the other's relay and carries a peer-CA credential...
    let east_reads_west = peer_secret(&east, "west").await;
    assert_eq!(east_reads_west.server, relay(&west).endpoint);
    assert_eq!(east_reads_west.ca_pem, relay(&west).peer_ca.cert_pem());
    let west_reads_east = peer_secret(&west, "east").await;
    assert_eq!(west_reads_east.server, relay(&east).endpoint);
    // ...which the relay serves (kvstoremesh's connection is live there)...
    assert!(relay(&west).relay.live_connections("remote-east") >= 1);
    // ...and etcd itself refuses: the peer CA is not among the CAs it trusts.
    let mut direct = east_reads_west.to_etcd_config();
    direct.endpoints = vec![west.etcd.endpoint()];
    direct.ca_pem = Some(west.etcd.ca().cert_pem().to_owned());
    direct.connect_timeout = Some(Duration::from_secs(2));
    direct.request_timeout = Some(Duration::from_secs(2));
    let bypass = match EtcdStore::connect(&direct).await {
        Ok(s) => s.get("mesh/heartbeat").await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(bypass.is_err(), "a peer certificate reads etcd directly");

    // A watch opened with the credential before the disconnect ends within 5 s of the
    // revocation.
    let watch = watch_until_end(&east_reads_west).await;
    let disconnect = tokio::spawn(meshctl(pair_args(
        "disconnect",
        &files,
        &["--wait", "--timeout", "60s"],
    )));
    // The last moment remote-east still existed in west's etcd: a lower bound of the
    // revocation time, so the measured figure is an upper bound.
    let mut root = west.etcd.root_store().await.unwrap().client();
    let deadline = Instant::now() + CONVERGE;
    let mut still_there = Instant::now();
    loop {
        let now = Instant::now();
        let users = root.user_list().await.expect("user list").users().to_vec();
        if !users.contains(&"remote-east".to_owned()) {
            break;
        }
        still_there = now;
        assert!(
            now < deadline,
            "remote-east not revoked within {CONVERGE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (ended, why) = tokio::time::timeout(Duration::from_secs(30), watch)
        .await
        .expect("the revoked credential's watch ends")
        .expect("watch task");
    let took = ended.saturating_duration_since(still_there);
    println!(
        "kube disconnect: the revoked peer's open watch through the relay ended within {took:?} of the revocation ({why})"
    );
    assert!(
        took <= Duration::from_secs(5),
        "the revoked credential's watch ran {took:?} after the revocation"
    );
    let out = disconnect.await.expect("disconnect task");
    assert!(out.status.success(), "disconnect:\n{}", text(&out));
    for c in [&east, &west] {
        let h = c.agent.handles();
        wait_for("peer drained", &h, |h| h.status.borrow().peers.is_empty()).await;
    }
    // The relay holds no connection of the revoked user any more.
    mesh_tests::util::eventually(
        "remote-east no longer connected to west's relay",
        CONVERGE,
        async || relay(&west).relay.live_connections("remote-east") == 0,
    )
    .await;
}
