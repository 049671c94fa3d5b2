//! `meshctl connect/disconnect --context A --destination-context B` (Kubernetes mode) as the
//! real binary against two clusters, each with its own in-process Kubernetes API server,
//! real etcd, exporter, kvstoremesh and agent: Secrets written through the API, both sides
//! ready, refusals, and a disconnect that deletes the Secrets, revokes the users and drains.

use std::time::Duration;

use mesh_agent::runtime::ViewHandles;
use mesh_tests::bin_path;
use mesh_tests::init_tracing;
use mesh_tests::kube_cluster::{KubeCluster, MESHD_NAMESPACE};
use mesh_tests::meshctl::text;
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
