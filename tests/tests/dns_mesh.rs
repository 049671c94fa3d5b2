//! The agent's `clusterset.local` DNS fed by a real two-cluster merged view (etcd, exporters,
//! kvstoremesh, ClusterSetIPs), queried with `dig` (UDP and TCP) and hickory-resolver; an
//! answer follows a remote endpoint going unready.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use clustermesh_apiserver::source::{Object, SourceEvent};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use mesh_agent::dns::{Bound, DnsConfig, DnsMetrics, serve};
use mesh_agent::runtime::PeerAccess;
use mesh_tests::mesh::{TestCluster, connect};
use mesh_tests::objects::{endpoint_slice, pod, service, web_cluster};
use tokio_util::sync::CancellationToken;

fn ip(c: u8, i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, c, i)
}

/// West's headless `shop/db`: `db-0` has a hostname, the second endpoint only a pod
/// reference (its DNS name comes from the pod), readiness of the second as given.
fn db_slice(second_ready: bool) -> EndpointSlice {
    let mut s = endpoint_slice("shop", "db-x", "db", &[ip(2, 31), ip(2, 32)]);
    s.endpoints[0].hostname = Some("db-0".into());
    s.endpoints[1].target_ref = Some(ObjectReference {
        kind: Some("Pod".into()),
        name: Some("db-1".into()),
        namespace: Some("shop".into()),
        ..ObjectReference::default()
    });
    if let Some(c) = s.endpoints[1].conditions.as_mut() {
        c.ready = Some(second_ready);
    }
    s
}

fn db(c: u8) -> Vec<Object> {
    let mut svc = service("shop", "db", Ipv4Addr::UNSPECIFIED, true);
    if let Some(spec) = svc.spec.as_mut() {
        spec.cluster_ip = Some("None".into());
        spec.cluster_ips = Some(vec!["None".into()]);
    }
    let node_name = format!("node-{c}");
    vec![
        Object::Pod(Box::new(pod(
            "shop",
            "db-0",
            &[("app", "db")],
            ip(c, 31),
            &node_name,
        ))),
        Object::Pod(Box::new(pod(
            "shop",
            "db-1",
            &[("app", "db")],
            ip(c, 32),
            &node_name,
        ))),
        Object::Service(Box::new(svc)),
        Object::EndpointSlice(Box::new(db_slice(true))),
    ]
}

fn dig(server: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+tries=1", "+time=2"])
        .args(args)
        .output()
        .expect("dig (bind9-dnsutils; scripts/deps installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn short(server: SocketAddr, args: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = dig(server, &[&["+short"], args].concat())
        .lines()
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_answers_from_a_two_cluster_mesh() {
    mesh_tests::init_tracing();
    let mut east = Box::pin(TestCluster::start("east", 1, web_cluster(1)))
        .await
        .unwrap();
    let mut west = Box::pin(TestCluster::start(
        "west",
        2,
        [web_cluster(2), db(2)].concat(),
    ))
    .await
    .unwrap();
    Box::pin(connect(&east, &west)).await.unwrap();
    for c in [&mut east, &mut west] {
        c.start_kvstoremesh();
        c.start_clusterset("198.19.128.0/24").unwrap();
    }
    let agent = east.start_agent(PeerAccess::Cached);
    let stop = CancellationToken::new();
    let (btx, brx) = tokio::sync::oneshot::channel::<Bound>();
    let dns = tokio::spawn(serve(
        DnsConfig::new("127.0.0.1:0".parse().unwrap()),
        agent.handles().services,
        DnsMetrics::default(),
        Some(btx),
        stop.clone(),
    ));
    let server = brx.await.unwrap().udp;

    // The ClusterSetIP of shop/web (allocated from 198.19.128.0/24), then everything else.
    let mut vip = String::new();
    eventually("web's ClusterSetIP in DNS", || {
        vip = short(server, &["web.shop.svc.clusterset.local", "A"])
            .into_iter()
            .next()
            .unwrap_or_default();
        vip.starts_with("198.19.128.")
    })
    .await;
    eventually("west's headless db in DNS", || {
        short(server, &["db.shop.svc.clusterset.local", "A"]) == ["198.18.2.31", "198.18.2.32"]
    })
    .await;
    assert_eq!(
        short(server, &["dns-version.clusterset.local", "TXT"]),
        ["\"1.0.0\""]
    );
    assert_eq!(
        short(server, &["_http._tcp.web.shop.svc.clusterset.local", "SRV"]),
        ["0 100 80 web.shop.svc.clusterset.local."]
    );
    assert_eq!(
        short(server, &["db-0.west.db.shop.svc.clusterset.local", "A"]),
        ["198.18.2.31"]
    );
    assert_eq!(
        short(server, &["db-1.west.db.shop.svc.clusterset.local", "A"]),
        ["198.18.2.32"]
    );
    assert_eq!(
        short(server, &["_http._tcp.db.shop.svc.clusterset.local", "SRV"]),
        [
            "0 100 8080 db-0.west.db.shop.svc.clusterset.local.",
            "0 100 8080 db-1.west.db.shop.svc.clusterset.local."
        ]
    );
    // Over TCP too.
    assert_eq!(
        short(server, &["+tcp", "web.shop.svc.clusterset.local", "A"]),
        [vip.clone()]
    );
    // Negative answers: NXDOMAIN for <cluster>.<svc>… and unknown services, NODATA for AAAA.
    let full = dig(server, &["west.db.shop.svc.clusterset.local", "A"]);
    assert!(full.contains("status: NXDOMAIN"), "{full}");
    let full = dig(server, &["nope.shop.svc.clusterset.local", "A"]);
    assert!(full.contains("status: NXDOMAIN"), "{full}");
    let full = dig(server, &["web.shop.svc.clusterset.local", "AAAA"]);
    assert!(
        full.contains("status: NOERROR") && full.contains("ANSWER: 0") && full.contains("SOA"),
        "{full}"
    );
    let full = dig(server, &["web.shop.svc.clusterset.local", "ANY"]);
    assert!(full.contains("status: NOTIMP"), "{full}");
    let full = dig(server, &["example.org", "A"]);
    assert!(full.contains("status: REFUSED"), "{full}");

    // A remote endpoint goes unready in west: the answer drops it, no restart.
    west.source
        .send(SourceEvent::Apply(Object::EndpointSlice(Box::new(
            db_slice(false),
        ))))
        .await
        .unwrap();
    eventually("db-1 gone from DNS", || {
        short(server, &["db.shop.svc.clusterset.local", "A"]) == ["198.18.2.31"]
    })
    .await;
    let full = dig(server, &["db-1.west.db.shop.svc.clusterset.local", "A"]);
    assert!(full.contains("status: NXDOMAIN"), "{full}");

    stop.cancel();
    dns.await.unwrap().unwrap();
    agent.shutdown().await;
}
