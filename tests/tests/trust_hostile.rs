//! A hostile peer against kvstoremesh and the agent on real etcd (TLS, auth): west writes
//! into its own etcd with its apiserver credential — prefix claims /0–/31, addresses
//! outside every range, on the local cluster's and a third peer's pod CIDRs, a node
//! claiming other clusters' pod CIDRs, a service with foreign backends, a flood past the
//! IP quota and an oversized value. Every one is refused and counted by reason; the
//! local etcd's cache never receives them (nor more than the quota); east's and north's
//! data and west's good data keep flowing.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};
use mesh_agent::runtime::{PeerAccess, ViewHandles};
use mesh_tests::init_tracing;
use mesh_tests::mesh::{TestCluster, connect};
use mesh_tests::util::eventually;
use meshd::keys::{Key, StateKey, StateKind, encode};
use meshd::kv::{EtcdStore, KvStore};
use meshd::metrics::TrustMetrics;
use meshd::model::{
    Backend, ClusterId, ClusterService, Identity, IpCacheEntry, MaxConnectedClusters, NodeAddress,
    NodeAddressType,
};
use meshd::trust::PeerLimits;

const CONVERGE: Duration = Duration::from_secs(60);
const M: MaxConnectedClusters = MaxConnectedClusters::C255;
const MAX_IPS: usize = 100;

use mesh_tests::objects::{node_with_pods as pods, pod_ip as ip};

fn view_ips(h: &ViewHandles) -> BTreeMap<IpAddr, String> {
    h.ipcache
        .borrow()
        .entries
        .iter()
        .map(|(ip, e)| (*ip, e.cluster.to_string()))
        .collect()
}

fn entry(a: Ipv4Addr, prefix_len: u8, id: Identity) -> IpCacheEntry {
    IpCacheEntry {
        ip: a.into(),
        prefix_len,
        identity: id,
        host_ip: None,
        node: None,
        namespace: None,
        pod: None,
        named_ports: Default::default(),
    }
}

struct Hostile {
    store: EtcdStore,
    west: meshd::model::ClusterName,
    id: Identity,
}

impl Hostile {
    async fn ip(&self, e: &IpCacheEntry) {
        let key = Key::State(StateKey::Ip {
            cluster: self.west.clone(),
            ip: e.ip,
        });
        self.store
            .put(&key.to_string(), &encode(e), None)
            .await
            .unwrap();
    }

    async fn claim(&self, a: Ipv4Addr, prefix_len: u8) {
        self.ip(&entry(a, prefix_len, self.id)).await;
    }
}

async fn scenario(access: PeerAccess, check: impl AsyncFnOnce(&TestCluster, &ViewHandles)) {
    init_tracing();
    let mut east = Box::pin(TestCluster::start("east", 1, pods(1, 10..12)))
        .await
        .unwrap();
    let west = Box::pin(TestCluster::start("west", 2, pods(2, 10..20)))
        .await
        .unwrap();
    let north = Box::pin(TestCluster::start("north", 3, pods(3, 10..15)))
        .await
        .unwrap();
    connect(&east, &west).await.unwrap();
    connect(&east, &north).await.unwrap();
    let limits = PeerLimits {
        max_ips: MAX_IPS,
        max_value_bytes: 4096,
        ..PeerLimits::default()
    };
    let trust = TrustMetrics::default();
    if access == PeerAccess::Cached {
        east.start_kvstoremesh_with(limits, trust.clone());
    }
    // In cached mode the refusals are kvstoremesh's; the agent (its own process in a real
    // deployment) counts into its own families.
    let agent_trust = match access {
        PeerAccess::Cached => TrustMetrics::default(),
        PeerAccess::Direct => trust.clone(),
    };
    let agent = east.start_agent_with_limits(access, limits, agent_trust);
    let h = agent.handles();
    eventually("every pod of the three clusters", CONVERGE, async || {
        view_ips(&h).len() == 2 + 10 + 5
    })
    .await;

    let cfg = west
        .etcd
        .config_for(&clustermesh_apiserver::bootstrap::apiserver_user(
            &west.name,
        ))
        .unwrap();
    let hostile = Hostile {
        store: EtcdStore::connect(&cfg).await.unwrap(),
        west: west.name.clone(),
        id: Identity::cluster_scoped(ClusterId::new(2, M).unwrap(), 300, M).unwrap(),
    };
    // Prefix claims: /1 to /31 inside west's own CIDR, and the two halves of IPv4.
    for p in 1..=31u8 {
        hostile.claim(ip(2, 100 + p), p).await;
    }
    hostile.claim(Ipv4Addr::new(0, 0, 0, 0), 1).await;
    hostile.claim(Ipv4Addr::new(128, 0, 0, 0), 1).await;
    // /0 does not even parse as an ipcache entry (dropped by the reflector).
    hostile.claim(ip(2, 99), 0).await;
    // Host claims outside every range, on east's CIDR and on north's CIDR.
    hostile.claim(Ipv4Addr::new(198, 19, 200, 5), 32).await;
    hostile.claim(ip(1, 50), 32).await;
    hostile.claim(ip(3, 50), 32).await;
    // A node claiming east's and north's pod CIDRs (and its own).
    let evil = meshd::model::Node {
        name: "evil".into(),
        cluster: west.name.clone(),
        cluster_id: west.id,
        addresses: vec![NodeAddress {
            kind: NodeAddressType::InternalIP,
            ip: Ipv4Addr::new(198, 19, 0, 99).into(),
        }],
        pod_cidrs: vec![
            "198.18.1.0/24".parse().unwrap(),
            "198.18.3.0/25".parse().unwrap(),
            "198.18.2.0/24".parse().unwrap(),
        ],
    };
    let nkey = Key::State(StateKey::Node {
        cluster: west.name.clone(),
        name: "evil".into(),
    });
    hostile
        .store
        .put(&nkey.to_string(), &encode(&evil), None)
        .await
        .unwrap();
    // A global service whose backends are west's, east's and north's pods.
    let mut svc = ClusterService::new(west.name.clone(), west.id, "default", "evil");
    svc.global = true;
    for b in [ip(2, 10), ip(1, 10), ip(3, 10)] {
        svc.backends.insert(
            b.into(),
            Backend {
                ports: vec![],
                ready: true,
                hostname: None,
                node: None,
                zone: None,
            },
        );
    }
    let skey = Key::State(StateKey::Service {
        cluster: west.name.clone(),
        namespace: "default".into(),
        name: "evil".into(),
    });
    hostile
        .store
        .put(&skey.to_string(), &encode(&svc), None)
        .await
        .unwrap();
    // An oversized value on an address west owns.
    let mut big = entry(ip(2, 98), 32, hostile.id);
    big.pod = Some("x".repeat(10_000));
    hostile.ip(&big).await;
    // A good new pod, then a flood past the quota.
    hostile.claim(ip(2, 200), 32).await;
    eventually("west's good new pod", CONVERGE, async || {
        view_ips(&h).contains_key(&IpAddr::V4(ip(2, 200)))
    })
    .await;
    let flood = Ipv4Net::new(ip(2, 0), 24).unwrap();
    for a in flood.hosts().take(150) {
        hostile.claim(a, 32).await;
    }
    // Good data still flows for keys west already has: a pod goes away.
    hostile
        .store
        .delete(
            &Key::State(StateKey::Ip {
                cluster: west.name.clone(),
                ip: ip(2, 19).into(),
            })
            .to_string(),
        )
        .await
        .unwrap();
    eventually("west's deleted pod gone", CONVERGE, async || {
        !view_ips(&h).contains_key(&IpAddr::V4(ip(2, 19)))
    })
    .await;

    let view = view_ips(&h);
    // Every west entry the agent holds is a host in west's own CIDR.
    let west_net: IpNet = "198.18.2.0/24".parse().unwrap();
    for (a, c) in &view {
        if c == "west" {
            assert!(west_net.contains(a), "west holds {a}");
        }
    }
    assert!(view.values().filter(|c| *c == "west").count() <= MAX_IPS);
    // East's and north's pods are theirs.
    for i in 10..12 {
        assert_eq!(
            view.get(&IpAddr::V4(ip(1, i))).map(String::as_str),
            Some("east")
        );
    }
    for i in 10..15 {
        assert_eq!(
            view.get(&IpAddr::V4(ip(3, i))).map(String::as_str),
            Some("north")
        );
    }
    for a in [
        ip(1, 50),
        ip(3, 50),
        Ipv4Addr::new(198, 19, 200, 5),
        ip(2, 98),
    ] {
        assert!(!view.contains_key(&IpAddr::V4(a)), "{a} admitted");
    }
    // The service keeps only west's own backend.
    eventually(
        "the evil service with its own backend only",
        CONVERGE,
        async || {
            h.services
                .borrow()
                .service("default", "evil")
                .is_some_and(|s| {
                    s.active().map(|b| b.ip).collect::<Vec<_>>() == vec![IpAddr::V4(ip(2, 10))]
                })
        },
    )
    .await;
    // Counted by reason (kvstoremesh's guard in cached mode, the agent's in direct mode).
    assert_eq!(trust.refused_total("west", "prefix-not-host"), 33);
    assert_eq!(trust.refused_total("west", "address-not-owned"), 1);
    assert_eq!(trust.refused_total("west", "address-of-local"), 1);
    assert_eq!(trust.refused_total("west", "address-of-peer"), 1);
    assert_eq!(trust.refused_total("west", "backend-not-owned"), 2);
    assert_eq!(trust.refused_total("west", "value-too-large"), 1);
    assert!(trust.refused_total("west", "quota-entries") > 0);
    assert_eq!(
        trust
            .range_conflicts
            .get_or_create(&meshd::metrics::ClusterLabel {
                cluster: "west".into()
            })
            .get(),
        2,
        "east's and north's CIDRs claimed by west's node"
    );
    check(&east, &h).await;
    agent.shutdown().await;
    drop((east, west, north));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_hostile_peer_through_kvstoremesh_never_reaches_the_local_etcd() {
    Box::pin(scenario(
        PeerAccess::Cached,
        async |east: &TestCluster, _h: &ViewHandles| {
            // The local etcd's cache of west holds only host entries west owns, within quota.
            let prefix = meshd::keys::cache_prefix(StateKind::Ip, &"west".parse().unwrap());
            let kvs = east.store.list_all(&prefix, 1000).await.unwrap().kvs;
            assert!(kvs.len() <= MAX_IPS, "{} cached", kvs.len());
            let west_net: IpNet = "198.18.2.0/24".parse().unwrap();
            for kv in kvs {
                let e: IpCacheEntry = serde_json::from_slice(&kv.value).unwrap();
                assert!(
                    e.prefix_len == 32 && west_net.contains(&e.ip),
                    "cached {e:?}"
                );
                assert!(kv.value.len() < 4096);
            }
            // The cached node of west lost the CIDRs it does not own.
            let node = east
                .store
                .get("mesh/cache/nodes/v1/west/evil")
                .await
                .unwrap()
                .expect("west's node cached");
            let n: meshd::model::Node = serde_json::from_slice(&node.value).unwrap();
            assert_eq!(n.pod_cidrs, vec!["198.18.2.0/24".parse::<IpNet>().unwrap()]);
        },
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_hostile_peer_read_directly_is_refused_by_the_agent() {
    Box::pin(scenario(
        PeerAccess::Direct,
        async |_east: &TestCluster, h: &ViewHandles| {
            // The agent's status names west degraded (ip) with its two refused claims.
            eventually(
                "west degraded with two range conflicts in the agent's status",
                CONVERGE,
                async || {
                    h.status.borrow().peers.iter().any(|p| {
                        p.name.as_str() == "west"
                            && p.trust.as_ref().is_some_and(|t| {
                                t.degraded == vec![StateKind::Ip]
                                    && t.conflicts
                                        .iter()
                                        .filter(|c| c.claimant.as_str() == "west")
                                        .count()
                                        == 2
                            })
                    })
                },
            )
            .await;
        },
    ))
    .await;
}
