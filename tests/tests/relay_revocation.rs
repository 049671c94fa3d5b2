//! The apiserver's identity relay on a real etcd (TLS, client-cert auth, auth on): deleting a
//! peer's etcd user cuts the watch that peer already has open within 5 s (etcd itself would
//! keep serving it), other peers keep every event, and CNs that are not peer users, or peer
//! certificates presented to etcd directly, are refused.
//!
//! The measured bound is printed: `cargo nextest run -p mesh-tests --test relay_revocation
//! --no-capture`.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use clustermesh_apiserver::bootstrap::{add_remote_user, revoke_remote_user};
use clustermesh_apiserver::relay::{
    self, PeerLabel, RefusedLabel, Relay, RelayConfig, RelayMetrics,
};
use futures::StreamExt;
use mesh_certs::{CertRequest, CertificateAuthority};
use mesh_tests::util::eventually;
use mesh_tests::{EtcdGuard, init_tracing};
use meshd::kv::{EtcdConfig, EtcdStore, KvStore, WatchEvent};
use meshd::model::ClusterName;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The requirement: a revoked peer stops receiving updates within this.
const BOUND: Duration = Duration::from_secs(5);
/// How long the test waits for anything before it fails.
const WAIT: Duration = Duration::from_secs(20);
const PREFIX: &str = "mesh/state/relay-test/";

struct Setup {
    etcd: EtcdGuard,
    peer_ca: CertificateAuthority,
    relay: Relay,
    endpoint: String,
    metrics: RelayMetrics,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Setup {
    async fn start() -> Self {
        init_tracing();
        let relay_ca =
            CertificateAuthority::generate("mesh-test-relay-ca", Duration::from_secs(86_400))
                .unwrap();
        let etcd = EtcdGuard::start_trusting(&[relay_ca.cert_pem()])
            .await
            .unwrap();
        let peer_ca =
            CertificateAuthority::generate("mesh-test-peer-ca", Duration::from_secs(86_400))
                .unwrap();
        // The peer CA signs the peer credentials and the relay's server certificate (the
        // peer kubeconfig carries it); etcd does not trust it.
        let server = peer_ca
            .issue(&CertRequest::server(
                "relay",
                &["localhost"],
                &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            ))
            .unwrap();
        let identity = mesh_certs::static_identity(&server.cert_pem, &server.key_pem).unwrap();
        let cfg = RelayConfig {
            upstream: relay::parse_upstream(&etcd.endpoint()).unwrap(),
            upstream_server_name: Some("localhost".into()),
            upstream_ca_pem: etcd.ca().cert_pem().to_owned(),
            server_tls: relay::server_tls(identity, peer_ca.cert_pem()).unwrap(),
            relay_ca,
            check_interval: relay::DEFAULT_CHECK_INTERVAL,
        };
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let endpoint = format!(
            "https://127.0.0.1:{}",
            listener.local_addr().unwrap().port()
        );
        let metrics = RelayMetrics::default();
        let relay = Relay::new(cfg, metrics.clone()).unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(relay.clone().run(listener, stop.clone()));
        Self {
            etcd,
            peer_ca,
            relay,
            endpoint,
            metrics,
            stop,
            task,
        }
    }

    /// A client config for `cn` with a certificate of `issuer`, dialing `endpoint` whose
    /// certificate `server_ca` signed.
    fn client(
        &self,
        endpoint: &str,
        server_ca: &CertificateAuthority,
        issuer: &CertificateAuthority,
        cn: &str,
    ) -> EtcdConfig {
        let cert = issuer.issue(&CertRequest::client(cn)).unwrap();
        EtcdConfig {
            endpoints: vec![endpoint.to_owned()],
            ca_pem: Some(server_ca.cert_pem().to_owned()),
            cert_pem: Some(cert.cert_pem),
            key_pem: Some(cert.key_pem),
            tls_server_name: Some("localhost".into()),
            connect_timeout: Some(Duration::from_secs(2)),
            request_timeout: Some(Duration::from_secs(5)),
            ..EtcdConfig::default()
        }
    }

    /// A peer `cn` (peer CA) through the relay.
    async fn peer(&self, cn: &str) -> EtcdStore {
        EtcdStore::connect(&self.client(&self.endpoint, &self.peer_ca, &self.peer_ca, cn))
            .await
            .unwrap()
    }

    fn refused(&self, reason: &str) -> u64 {
        self.metrics
            .refused
            .get_or_create(&RefusedLabel {
                reason: reason.into(),
            })
            .get()
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the relay stops on shutdown")
            .unwrap();
    }
}

#[derive(Debug)]
enum Seen {
    Event(i64),
    End(Instant, String),
}

/// Watches [`PREFIX`] from `from` and reports every put revision, then the end.
fn watch(store: EtcdStore, from: i64) -> mpsc::UnboundedReceiver<Seen> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = match store.watch(PREFIX, from).await {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Seen::End(Instant::now(), format!("watch refused: {e}")));
                return;
            }
        };
        loop {
            match stream.next().await {
                Some(Ok(batch)) => {
                    for ev in batch.events {
                        if let WatchEvent::Put(kv) = ev {
                            let _ = tx.send(Seen::Event(kv.mod_revision));
                        }
                    }
                }
                Some(Err(e)) => {
                    let _ = tx.send(Seen::End(Instant::now(), e.to_string()));
                    return;
                }
                None => {
                    let _ = tx.send(Seen::End(Instant::now(), "stream closed".into()));
                    return;
                }
            }
        }
    });
    rx
}

/// Waits until `rx` has delivered every revision of `want` (failing on an end).
async fn wait_for(
    rx: &mut mpsc::UnboundedReceiver<Seen>,
    seen: &mut BTreeSet<i64>,
    want: &BTreeSet<i64>,
) {
    tokio::time::timeout(WAIT, async {
        while !want.is_subset(seen) {
            match rx.recv().await {
                Some(Seen::Event(rev)) => {
                    seen.insert(rev);
                }
                other => panic!("watch ended before revisions {want:?} arrived: {other:?}"),
            }
        }
    })
    .await
    .expect("events arrive within the wait");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_peer_loses_its_open_watch_within_5s() {
    let s = Box::pin(Setup::start()).await;
    let root = s.etcd.root_store().await.unwrap();
    for peer in ["x", "y"] {
        add_remote_user(&root.client(), &ClusterName::new(peer).unwrap())
            .await
            .unwrap();
    }
    let mut written = BTreeSet::new();
    let first = root.put(&format!("{PREFIX}0"), b"0", None).await.unwrap();
    written.insert(first);

    let (x, y) = (s.peer("remote-x").await, s.peer("remote-y").await);
    let (mut x_rx, mut y_rx) = (watch(x.clone(), first), watch(y, first));
    let (mut x_seen, mut y_seen) = (BTreeSet::new(), BTreeSet::new());
    for i in 1..=3 {
        written.insert(root.put(&format!("{PREFIX}{i}"), b"v", None).await.unwrap());
    }
    wait_for(&mut x_rx, &mut x_seen, &written).await;
    wait_for(&mut y_rx, &mut y_seen, &written).await;
    assert_eq!(s.relay.live_connections("remote-x"), 1);
    assert_eq!(s.relay.live_connections("remote-y"), 1);

    // Revoke remote-x, and keep writing while waiting for its watch to end.
    assert!(
        revoke_remote_user(&root.client(), &ClusterName::new("x").unwrap())
            .await
            .unwrap()
    );
    let deleted = Instant::now();
    let mut i = 100;
    let (ended, reason) = tokio::time::timeout(WAIT, async {
        loop {
            written.insert(root.put(&format!("{PREFIX}{i}"), b"v", None).await.unwrap());
            i += 1;
            tokio::select! {
                seen = x_rx.recv() => match seen {
                    Some(Seen::Event(rev)) => { x_seen.insert(rev); }
                    Some(Seen::End(at, reason)) => break (at, reason),
                    None => panic!("watcher of remote-x vanished"),
                },
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    })
    .await
    .expect("the revoked peer's watch ends");
    let took = ended.duration_since(deleted);
    println!(
        "relay revocation: the open watch of remote-x ended {took:?} after its etcd user was deleted ({reason})"
    );
    assert!(took <= BOUND, "cut after {took:?}, more than {BOUND:?}");
    let cut_at_revision = *written.last().unwrap();
    let label = PeerLabel {
        peer: "remote-x".into(),
    };
    assert_eq!(s.metrics.cuts.get_or_create(&label).get(), 1);
    assert_eq!(s.relay.live_connections("remote-x"), 0);

    // Nothing written after the cut reaches remote-x: its watch is over, and a new one
    // (the client reconnects through the relay) is refused.
    for j in 0..5 {
        written.insert(
            root.put(&format!("{PREFIX}after-{j}"), b"v", None)
                .await
                .unwrap(),
        );
    }
    assert!(
        x_rx.recv().await.is_none(),
        "the ended watcher reports nothing more"
    );
    assert!(x_seen.iter().all(|rev| *rev <= cut_at_revision));
    let refused_before = s.refused("revoked");
    let mut again = watch(x, cut_at_revision + 1);
    match tokio::time::timeout(WAIT, again.recv()).await.unwrap() {
        Some(Seen::End(_, reason)) => println!("a new watch of remote-x: {reason}"),
        other => panic!("a revoked peer's new watch must fail, got {other:?}"),
    }
    assert!(s.refused("revoked") > refused_before);

    // remote-y received every event, before and after the cut, on the same connection.
    wait_for(&mut y_rx, &mut y_seen, &written).await;
    assert_eq!(y_seen, written);
    assert_eq!(s.relay.live_connections("remote-y"), 1);
    assert_eq!(
        s.metrics
            .cuts
            .get_or_create(&PeerLabel {
                peer: "remote-y".into()
            })
            .get(),
        0
    );

    // Once the user exists again, remote-x is admitted again.
    add_remote_user(&root.client(), &ClusterName::new("x").unwrap())
        .await
        .unwrap();
    // (The relay asks etcd again at most once per check interval.)
    let x = s.peer("remote-x").await;
    eventually(
        "a peer user that exists again is admitted again",
        WAIT,
        async || matches!(x.get(&format!("{PREFIX}0")).await, Ok(Some(_))),
    )
    .await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_refuses_non_peers_and_etcd_refuses_peer_certificates() {
    let s = Box::pin(Setup::start()).await;
    let root = s.etcd.root_store().await.unwrap();
    add_remote_user(&root.client(), &ClusterName::new("x").unwrap())
        .await
        .unwrap();
    root.put(&format!("{PREFIX}k"), b"v", None).await.unwrap();

    // A peer through the relay reads.
    let x = s.peer("remote-x").await;
    assert!(x.get(&format!("{PREFIX}k")).await.unwrap().is_some());

    // root with a peer-CA certificate: the relay refuses the CN.
    let root_via_relay = s.peer("root").await;
    let e = root_via_relay
        .get(&format!("{PREFIX}k"))
        .await
        .expect_err("root must not pass the relay");
    println!("root through the relay: {e}");
    // The client can see the refusal before the relay's task has counted it.
    eventually("the relay counts the refusal", WAIT, async || {
        s.refused("not-a-peer") >= 1
    })
    .await;
    assert_eq!(s.refused("not-a-peer"), 1);

    // root with the cluster CA's certificate: the relay does not accept that CA at all.
    let cluster_root = EtcdStore::connect(&s.client(&s.endpoint, &s.peer_ca, s.etcd.ca(), "root"))
        .await
        .unwrap();
    cluster_root
        .get(&format!("{PREFIX}k"))
        .await
        .expect_err("a cluster-CA certificate must not pass the relay");
    eventually("the relay counts the failed handshake", WAIT, async || {
        s.refused("handshake") >= 1
    })
    .await;
    assert!(s.refused("handshake") >= 1);

    // A peer certificate presented to etcd directly fails: etcd does not trust the peer CA.
    let direct =
        EtcdStore::connect(&s.client(&s.etcd.endpoint(), s.etcd.ca(), &s.peer_ca, "remote-x"))
            .await
            .unwrap();
    let e = direct
        .get(&format!("{PREFIX}k"))
        .await
        .expect_err("a peer certificate must not open etcd directly");
    println!("peer certificate straight to etcd: {e}");
    s.stop().await;
}
