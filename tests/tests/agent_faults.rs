//! Fault tests of the agent's view of its peers: peer etcd restarts with changes in
//! between, compaction under a live watch, credential removal and re-adding, a cluster-ID
//! clash, and a hostile peer writing bad entries into its own etcd.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use clustermesh_apiserver::source::{Object, ObjectKind, ObjectRef, SourceEvent};
use mesh_agent::runtime::{PeerAccess, ViewHandles};
use mesh_tests::init_tracing;
use mesh_tests::mesh::{TestCluster, connect};
use meshd::keys::{Key, StateKey, StateKind, encode};
use meshd::kv::KvStore;
use meshd::metrics::ReflectorMetrics;
use meshd::model::{
    ClusterId, ClusterName, Identity, IdentityEntry, IpCacheEntry, Labels, MaxConnectedClusters,
};
use meshd::remote::PeerState;

const CONVERGE: Duration = Duration::from_secs(60);

use mesh_tests::objects::{node_with_pods as pods, pod_ip as ip};

fn pod_obj(c: u8, i: u8) -> Object {
    pods(c, i..i + 1).pop().expect("one pod")
}

/// IP → (cluster, identity) as the agent sees it.
fn view_ips(h: &ViewHandles) -> BTreeMap<IpAddr, (String, u32)> {
    let snap = h.ipcache.borrow().clone();
    snap.entries
        .iter()
        .map(|(ip, e)| (*ip, (e.cluster.to_string(), e.value.identity.get())))
        .collect()
}

/// IP → (cluster, identity) that the clusters' etcds export.
async fn exported_ips(clusters: &[&TestCluster]) -> Option<BTreeMap<IpAddr, (String, u32)>> {
    let mut out = BTreeMap::new();
    for c in clusters {
        let prefix = meshd::keys::state_prefix(StateKind::Ip, &c.name);
        let all = c.store.list_all(&prefix, 1000).await.ok()?;
        for kv in all.kvs {
            let e: IpCacheEntry = serde_json::from_slice(&kv.value).ok()?;
            out.insert(e.ip, (c.name.to_string(), e.identity.get()));
        }
    }
    Some(out)
}

/// Waits until the agent's ipcache equals the union of the clusters' exports; on timeout
/// reports stale and missing counts.
async fn converged(h: &ViewHandles, clusters: &[&TestCluster], what: &str) {
    let deadline = tokio::time::Instant::now() + CONVERGE;
    loop {
        let have = view_ips(h);
        if let Some(want) = exported_ips(clusters).await {
            if have == want {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                let stale = have
                    .iter()
                    .filter(|(k, v)| want.get(*k) != Some(*v))
                    .count();
                let missing = want
                    .iter()
                    .filter(|(k, v)| have.get(*k) != Some(*v))
                    .count();
                panic!(
                    "{what}: not converged: {stale} stale, {missing} missing; status {:#?}",
                    *h.status.borrow()
                );
            }
        } else {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: etcd unreadable"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A small deterministic generator for the random changes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_etcd_restarted_20_times_with_changes_in_between() {
    init_tracing();
    let east = Box::pin(TestCluster::start("east", 1, pods(1, 10..20)))
        .await
        .unwrap();
    let mut west = Box::pin(TestCluster::start("west", 2, pods(2, 10..40)))
        .await
        .unwrap();
    connect(&east, &west).await.unwrap();
    let metrics = ReflectorMetrics::default();
    let agent = east.start_agent_with(PeerAccess::Direct, metrics.clone());
    let h = agent.handles();
    converged(&h, &[&east, &west], "initial").await;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..20 {
        west.etcd.kill();
        // Changes while the peer's etcd is down land once it is back (the exporter retries).
        for _ in 0..5 {
            let i = 10 + (rng.next() % 40) as u8;
            let ev = if rng.next().is_multiple_of(3) {
                SourceEvent::Delete(ObjectRef {
                    kind: ObjectKind::Pod,
                    namespace: "default".into(),
                    name: format!("p-2-{i}"),
                })
            } else {
                SourceEvent::Apply(pod_obj(2, i))
            };
            west.source.send(ev).await.unwrap();
        }
        Box::pin(west.etcd.restart()).await.unwrap();
        converged(&h, &[&east, &west], &format!("round {round}")).await;
    }
    // Restarts broke west's watches and were recovered by relisting (two restarts inside
    // one backoff window share a relist, so not necessarily one per round).
    let relists = metrics
        .relists
        .get_or_create(&meshd::metrics::SourceLabels {
            cluster: "west".into(),
            kind: "ip".into(),
        })
        .get();
    assert!(relists >= 10, "only {relists} relists of west's ipcache");
    assert!(h.status.borrow().peers[0].is_ready());
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_under_a_live_watch_and_credential_churn() {
    init_tracing();
    let east = Box::pin(TestCluster::start("east", 1, pods(1, 10..12)))
        .await
        .unwrap();
    let west = Box::pin(TestCluster::start("west", 2, pods(2, 10..30)))
        .await
        .unwrap();
    connect(&east, &west).await.unwrap();
    let agent = east.start_agent(PeerAccess::Direct);
    let h = agent.handles();
    converged(&h, &[&east, &west], "initial").await;

    // Many changes, then compaction of west's history while the agent watches it.
    for i in 30..80u8 {
        west.source
            .send(SourceEvent::Apply(pod_obj(2, i)))
            .await
            .unwrap();
    }
    for i in 10..20u8 {
        west.source
            .send(SourceEvent::Delete(ObjectRef {
                kind: ObjectKind::Pod,
                namespace: "default".into(),
                name: format!("p-2-{i}"),
            }))
            .await
            .unwrap();
    }
    let rev = west.etcd.revision().await.unwrap();
    west.etcd.compact(rev).await.unwrap();
    converged(&h, &[&east, &west], "after compaction").await;

    // Credential removed: west's data drains; re-added: it comes back.
    let west_name = ClusterName::new("west").unwrap();
    meshd::peers::remove_peer_file(east.peers_dir.path(), &west_name).unwrap();
    converged(&h, &[&east], "west removed").await;
    connect(&east, &west).await.unwrap();
    converged(&h, &[&east, &west], "west re-added").await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_a_clashing_cluster_id_is_refused() {
    init_tracing();
    let east = Box::pin(TestCluster::start("east", 1, pods(1, 10..12)))
        .await
        .unwrap();
    let west = Box::pin(TestCluster::start("west", 2, pods(2, 10..15)))
        .await
        .unwrap();
    // "south" claims west's ID.
    let south = Box::pin(TestCluster::start("south", 2, pods(4, 10..15)))
        .await
        .unwrap();
    connect(&east, &west).await.unwrap();
    let agent = east.start_agent(PeerAccess::Direct);
    let h = agent.handles();
    converged(&h, &[&east, &west], "west first").await;
    connect(&east, &south).await.unwrap();
    let deadline = tokio::time::Instant::now() + CONVERGE;
    loop {
        let st = h.status.borrow().clone();
        if let Some(s) = st.peers.iter().find(|p| p.name.as_str() == "south")
            && s.state == PeerState::Refused
        {
            let err = s.last_error.clone().unwrap();
            assert!(err.contains("already used by connected peer west"), "{err}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "south not refused: {st:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !h.status.borrow().ready,
        "a refused peer keeps the agent not ready"
    );
    converged(&h, &[&east, &west], "south's data is not served").await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peer_entries_are_dropped_counted_and_good_data_served() {
    init_tracing();
    let east = Box::pin(TestCluster::start("east", 1, pods(1, 10..12)))
        .await
        .unwrap();
    let west = Box::pin(TestCluster::start("west", 2, pods(2, 10..20)))
        .await
        .unwrap();
    connect(&east, &west).await.unwrap();
    let metrics = ReflectorMetrics::default();
    let agent = east.start_agent_with(PeerAccess::Direct, metrics.clone());
    let h = agent.handles();
    converged(&h, &[&east, &west], "initial").await;

    // West's own apiserver credentials write bad entries straight into west's etcd.
    let cfg = west
        .etcd
        .config_for(&clustermesh_apiserver::bootstrap::apiserver_user(
            &west.name,
        ))
        .unwrap();
    let hostile = meshd::kv::EtcdStore::connect(&cfg).await.unwrap();
    let m = MaxConnectedClusters::C255;
    let wname = west.name.clone();
    let ipkey = |a: Ipv4Addr| {
        Key::State(StateKey::Ip {
            cluster: wname.clone(),
            ip: a.into(),
        })
        .to_string()
    };
    let entry = |a: Ipv4Addr, id: Identity| {
        encode(&IpCacheEntry {
            ip: a.into(),
            prefix_len: 32,
            identity: id,
            host_ip: None,
            node: None,
            namespace: None,
            pod: None,
            named_ports: Default::default(),
        })
    };
    let west_id = Identity::cluster_scoped(ClusterId::new(2, m).unwrap(), 300, m).unwrap();
    let east_id = Identity::cluster_scoped(ClusterId::new(1, m).unwrap(), 300, m).unwrap();
    // 1. An identity outside west's range (east's cluster bits).
    hostile
        .put(&ipkey(ip(2, 100)), &entry(ip(2, 100), east_id), None)
        .await
        .unwrap();
    // 2. A value that does not parse.
    hostile
        .put(&ipkey(ip(2, 101)), b"{\"ip\":", None)
        .await
        .unwrap();
    // 3. An identity whose labels name another cluster.
    let foreign = IdentityEntry {
        id: Identity::cluster_scoped(ClusterId::new(2, m).unwrap(), 999, m).unwrap(),
        labels: Labels::parse(["k8s:app=evil", "mesh:io.meshd.cluster=east"]).unwrap(),
    };
    let idkey = Key::State(StateKey::Identity {
        cluster: wname.clone(),
        id: foreign.id,
    })
    .to_string();
    hostile.put(&idkey, &encode(&foreign), None).await.unwrap();
    // 4. An IP that collides with one of east's pods.
    hostile
        .put(&ipkey(ip(1, 10)), &entry(ip(1, 10), west_id), None)
        .await
        .unwrap();
    // Meanwhile a good change still flows.
    hostile
        .put(&ipkey(ip(2, 200)), &entry(ip(2, 200), west_id), None)
        .await
        .unwrap();

    let deadline = tokio::time::Instant::now() + CONVERGE;
    loop {
        let ips = view_ips(&h);
        if ips.contains_key(&IpAddr::V4(ip(2, 200))) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "good entry never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ips = view_ips(&h);
    assert!(
        !ips.contains_key(&IpAddr::V4(ip(2, 100))),
        "out-of-range identity accepted"
    );
    assert!(
        !ips.contains_key(&IpAddr::V4(ip(2, 101))),
        "unparseable entry accepted"
    );
    assert_eq!(
        ips.get(&IpAddr::V4(ip(1, 10))).map(|(c, _)| c.as_str()),
        Some("east"),
        "the local entry wins a collision"
    );
    let ids = h.identities.borrow().clone();
    assert!(
        !ids.entries.contains_key(&foreign.id),
        "foreign-labelled identity accepted"
    );
    assert_eq!(metrics.dropped_total("west", "identity-out-of-range"), 1);
    assert_eq!(metrics.dropped_total("west", "bad-value"), 1);
    assert_eq!(metrics.dropped_total("west", "foreign-cluster"), 1);
    // West's good data is all there (ip(1,10) excluded: east's own pod holds it).
    assert_eq!(ips.values().filter(|(c, _)| c == "west").count(), 11);
    agent.shutdown().await;
}
