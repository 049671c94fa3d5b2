//! Three clusters on one machine (real etcd with TLS + auth each, exporters, kvstoremesh),
//! and agents of one cluster reading peers through the cache and directly.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use clustermesh_apiserver::source::{Object, SourceEvent};
use mesh_agent::runtime::{Agent, PeerAccess, ViewHandles};
use mesh_tests::init_tracing;
use mesh_tests::mesh::{TestCluster, connect};
use mesh_tests::objects::{endpoint_slice, node, pod, service};
use meshd::model::ClusterName;

const CONVERGE: Duration = Duration::from_secs(60);

fn ip(c: u8, i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, c, i)
}

/// A cluster's objects: `pods` web pods behind three global services that differ only in
/// affinity, plus `extra` objects.
fn cluster_objects(c: u8, pods: u8, extra: Vec<Object>) -> Vec<Object> {
    let mut v = vec![Object::Node(Box::new(node(
        &format!("node-{c}"),
        Ipv4Addr::new(198, 19, 0, c),
        &format!("198.18.{c}.0/24"),
    )))];
    let ips: Vec<Ipv4Addr> = (0..pods).map(|i| ip(c, 11 + i)).collect();
    for (i, a) in ips.iter().enumerate() {
        v.push(Object::Pod(Box::new(pod(
            "shop",
            &format!("web-{c}-{i}"),
            &[("app", "web")],
            *a,
            &format!("node-{c}"),
        ))));
    }
    for affinity in ["none", "local", "remote"] {
        let name = format!("web-{affinity}");
        let mut s = service("shop", &name, Ipv4Addr::new(198, 19, c, 10), true);
        s.metadata
            .annotations
            .get_or_insert_default()
            .insert("service.meshd.io/affinity".into(), affinity.into());
        v.push(Object::Service(Box::new(s)));
        v.push(Object::EndpointSlice(Box::new(endpoint_slice(
            "shop",
            &format!("{name}-x"),
            &name,
            &ips,
        ))));
    }
    v.extend(extra);
    v
}

fn invoices() -> Vec<Object> {
    vec![
        Object::Pod(Box::new(pod(
            "billing",
            "invoices-0",
            &[("app", "invoices")],
            ip(3, 21),
            "node-3",
        ))),
        Object::Service(Box::new(service(
            "billing",
            "invoices",
            Ipv4Addr::new(198, 19, 3, 21),
            true,
        ))),
        Object::EndpointSlice(Box::new(endpoint_slice(
            "billing",
            "invoices-x",
            "invoices",
            &[ip(3, 21)],
        ))),
    ]
}

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

fn active(h: &ViewHandles, ns: &str, name: &str) -> BTreeSet<(String, IpAddr)> {
    let snap = h.services.borrow().clone();
    snap.service(ns, name)
        .map(|s| s.active().map(|b| (b.cluster.to_string(), b.ip)).collect())
        .unwrap_or_default()
}

/// IP → cluster of every entry the view holds.
fn ipcache(h: &ViewHandles) -> BTreeMap<IpAddr, String> {
    let snap = h.ipcache.borrow().clone();
    snap.entries
        .iter()
        .map(|(ip, e)| (*ip, e.cluster.to_string()))
        .collect()
}

async fn mesh3() -> (TestCluster, TestCluster, TestCluster) {
    let east = TestCluster::start("east", 1, cluster_objects(1, 2, vec![]))
        .await
        .unwrap();
    let west = TestCluster::start("west", 2, cluster_objects(2, 2, vec![]))
        .await
        .unwrap();
    let north = TestCluster::start("north", 3, cluster_objects(3, 1, invoices()))
        .await
        .unwrap();
    connect(&east, &west).await.unwrap();
    connect(&east, &north).await.unwrap();
    connect(&west, &north).await.unwrap();
    (east, west, north)
}

async fn check_merged(agent: &Agent, east: &TestCluster) {
    let h = agent.handles();
    wait_for("agent ready", &h, |h| h.status.borrow().ready).await;
    wait_for("all backends", &h, |h| {
        active(h, "shop", "web-none").len() == 5
    })
    .await;
    let local: BTreeSet<_> = [ip(1, 11), ip(1, 12)]
        .into_iter()
        .map(|a| ("east".to_owned(), IpAddr::V4(a)))
        .collect();
    assert_eq!(active(&h, "shop", "web-local"), local, "affinity local");
    let remote = active(&h, "shop", "web-remote");
    assert_eq!(remote.len(), 3, "affinity remote: {remote:?}");
    assert!(remote.iter().all(|(c, _)| c != "east"));
    // Remote-only service: present, with north's backend.
    assert_eq!(
        active(&h, "billing", "invoices"),
        BTreeSet::from([("north".to_owned(), IpAddr::V4(ip(3, 21)))])
    );
    // The ipcache is the union of the three clusters' pods.
    let want: BTreeMap<IpAddr, String> = [
        (ip(1, 11), "east"),
        (ip(1, 12), "east"),
        (ip(2, 11), "west"),
        (ip(2, 12), "west"),
        (ip(3, 11), "north"),
        (ip(3, 21), "north"),
    ]
    .into_iter()
    .map(|(a, c)| (IpAddr::V4(a), c.to_owned()))
    .collect();
    wait_for("ipcache union", &h, |h| ipcache(h) == want).await;

    // A local fallback: east's backends of web-local become unready → remote ones are used.
    east.source
        .send(SourceEvent::Apply(Object::EndpointSlice(Box::new({
            let mut s = endpoint_slice("shop", "web-local-x", "web-local", &[ip(1, 11), ip(1, 12)]);
            for e in &mut s.endpoints {
                e.conditions.get_or_insert_default().ready = Some(false);
            }
            s
        }))))
        .await
        .unwrap();
    wait_for("affinity local falls back to remote", &h, |h| {
        let a = active(h, "shop", "web-local");
        a.len() == 3 && a.iter().all(|(c, _)| c != "east")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clusters_merged_through_kvstoremesh() {
    init_tracing();
    let (mut east, mut west, mut north) = Box::pin(mesh3()).await;
    east.start_kvstoremesh();
    west.start_kvstoremesh();
    north.start_kvstoremesh();
    east.start_clusterset("198.19.128.0/20").unwrap();
    let agent = east.start_agent(PeerAccess::Cached);
    check_merged(&agent, &east).await;
    // The remote-only service has a ClusterSetIP in east (allocated by east's apiserver
    // from what kvstoremesh mirrored), so east's users can reach it.
    let h = agent.handles();
    wait_for("ClusterSetIP of billing/invoices", &h, |h| {
        let snap = h.services.borrow().clone();
        snap.service("billing", "invoices")
            .and_then(|s| s.clusterset_ip)
            .is_some_and(|ip| {
                "198.19.128.0/20"
                    .parse::<ipnet::IpNet>()
                    .unwrap()
                    .contains(&ip)
            })
    })
    .await;

    // A backend added in west's source reaches east's agent through west's etcd and
    // east's cache.
    west.source
        .send(SourceEvent::Apply(Object::EndpointSlice(Box::new(
            endpoint_slice(
                "shop",
                "web-none-x",
                "web-none",
                &[ip(2, 11), ip(2, 12), ip(2, 13)],
            ),
        ))))
        .await
        .unwrap();
    let h = agent.handles();
    wait_for("new west backend", &h, |h| {
        active(h, "shop", "web-none").len() == 6
    })
    .await;

    // Removing north's credential from east drains exactly north's data.
    meshd::peers::remove_peer_file(east.peers_dir.path(), &ClusterName::new("north").unwrap())
        .unwrap();
    wait_for("north drained", &h, |h| {
        let ips = ipcache(h);
        !ips.values().any(|c| c == "north") && ips.values().any(|c| c == "west")
    })
    .await;
    assert!(active(&h, "billing", "invoices").is_empty());
    agent.shutdown().await;
    east.stop_kvstoremesh().await;
    west.stop_kvstoremesh().await;
    north.stop_kvstoremesh().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clusters_merged_reading_peers_directly() {
    init_tracing();
    let (east, _west, _north) = Box::pin(mesh3()).await;
    let agent = east.start_agent(PeerAccess::Direct);
    check_merged(&agent, &east).await;
    agent.shutdown().await;
}
