//! Syncer unit tests on the recording datapath: diffs only, reconcile, endpoints, policy.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};

use meshd::model::{
    Affinity, BackendPort, ClusterName, Identity, IpCacheEntry, MaxConnectedClusters,
    Protocol as L4, ServicePort,
};

use super::super::iface::{HostInterface, InterfaceResolver};
use super::super::{
    Backend, Change, Datapath, Direction, PolicyRule, Protocol, RecordingDatapath, ServiceKey,
    Verdict,
};
use super::*;
use crate::view::{ClusterEntry, MergedBackend, MergedService, Snapshot};

const M: MaxConnectedClusters = MaxConnectedClusters::C255;

fn cn(s: &str) -> ClusterName {
    ClusterName::new(s).unwrap()
}

fn v4(c: u8, i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, c, i)
}

fn ident(cluster: u32, local: u32) -> Identity {
    Identity::from_raw(cluster << 16 | local).unwrap()
}

#[derive(Debug, Clone, Default)]
struct FakeRoutes(
    Arc<Mutex<HashMap<Ipv4Addr, HostInterface>>>,
    Arc<Mutex<std::collections::HashSet<Ipv4Addr>>>,
);

impl FakeRoutes {
    fn set(&self, ip: Ipv4Addr, name: &str, ifindex: u32) {
        self.0.lock().unwrap().insert(
            ip,
            HostInterface {
                name: name.into(),
                ifindex,
            },
        );
    }
    fn remove(&self, ip: Ipv4Addr) {
        self.0.lock().unwrap().remove(&ip);
    }
}

impl InterfaceResolver for FakeRoutes {
    fn scan(&mut self) -> HashMap<Ipv4Addr, HostInterface> {
        self.0.lock().unwrap().clone()
    }

    fn host_addresses(&mut self) -> std::collections::HashSet<Ipv4Addr> {
        self.1.lock().unwrap().clone()
    }
}

fn backend(cluster: &str, ip: Ipv4Addr) -> MergedBackend {
    MergedBackend {
        cluster: cn(cluster),
        ip: IpAddr::V4(ip),
        ports: vec![
            BackendPort {
                name: "http".into(),
                port: 8080,
                protocol: L4::Tcp,
            },
            BackendPort {
                name: "dns".into(),
                port: 5353,
                protocol: L4::Udp,
            },
        ],
        hostname: None,
        node: None,
        zone: None,
        ready: true,
    }
}

fn web(backends: Vec<MergedBackend>) -> MergedService {
    let active = (0..backends.len()).collect();
    MergedService {
        namespace: "shop".into(),
        name: "web".into(),
        headless: false,
        ports: vec![
            ServicePort {
                name: "dns".into(),
                port: 53,
                protocol: L4::Udp,
            },
            ServicePort {
                name: "http".into(),
                port: 80,
                protocol: L4::Tcp,
            },
        ],
        frontends_local: vec![IpAddr::V4(Ipv4Addr::new(198, 19, 1, 10))],
        clusterset_ip: Some(IpAddr::V4(Ipv4Addr::new(198, 19, 128, 1))),
        backends,
        active_backends: active,
        affinity: Affinity::None,
        conflicts: vec![],
        clusters: vec![cn("east"), cn("west")],
    }
}

fn services(list: Vec<MergedService>) -> Arc<ServicesSnapshot> {
    Arc::new(Snapshot {
        generation: 1,
        entries: list.into_iter().map(|s| (s.key(), Arc::new(s))).collect(),
    })
}

fn ipc(cluster: &str, ip: Ipv4Addr, id: Identity) -> Arc<ClusterEntry<IpCacheEntry>> {
    Arc::new(ClusterEntry {
        cluster: cn(cluster),
        value: IpCacheEntry {
            ip: IpAddr::V4(ip),
            prefix_len: 32,
            identity: id,
            host_ip: None,
            node: None,
            namespace: Some("shop".into()),
            pod: None,
            named_ports: BTreeMap::new(),
        },
    })
}

fn ipcache(list: &[(&str, Ipv4Addr, Identity)]) -> Arc<IpCacheSnapshot> {
    Arc::new(Snapshot {
        generation: 1,
        entries: list
            .iter()
            .map(|(c, ip, id)| (IpAddr::V4(*ip), ipc(c, *ip, *id)))
            .collect(),
    })
}

fn syncer(dp: RecordingDatapath, routes: &FakeRoutes) -> Syncer {
    Syncer::new(
        Box::new(dp),
        None,
        Box::new(routes.clone()),
        SyncConfig::new(cn("east"), M),
        DatapathMetrics::default(),
    )
}

fn key(vip: Ipv4Addr, port: u16, proto: Protocol) -> ServiceKey {
    ServiceKey { vip, port, proto }
}

fn svc_view(s: &Syncer) -> BTreeMap<ServiceKey, Vec<Backend>> {
    let snap = s.datapath().snapshot().unwrap();
    MapState::from_snapshot(&snap)
        .services
        .into_iter()
        .collect()
}

#[test]
fn writes_services_ipcache_and_endpoints_then_only_differences() {
    let routes = FakeRoutes::default();
    routes.set(v4(1, 11), "veth-a", 7);
    let mut s = syncer(RecordingDatapath::new(), &routes);
    let east = ident(1, 300);
    let west = ident(2, 400);
    let svc = web(vec![backend("east", v4(1, 11)), backend("west", v4(2, 11))]);
    s.update_services(services(vec![svc.clone()]));
    s.update_ipcache(ipcache(&[
        ("east", v4(1, 11), east),
        ("west", v4(2, 11), west),
    ]));
    s.rescan_interfaces();
    // 2 VIPs × 2 ports, 2 ipcache entries, 1 endpoint.
    assert_eq!(s.reconcile().unwrap(), 7);

    let both = |port| {
        vec![
            Backend {
                ip: v4(1, 11),
                port,
            },
            Backend {
                ip: v4(2, 11),
                port,
            },
        ]
    };
    let cip = Ipv4Addr::new(198, 19, 1, 10);
    let csip = Ipv4Addr::new(198, 19, 128, 1);
    let want: BTreeMap<_, _> = [
        (key(cip, 80, Protocol::Tcp), both(8080)),
        (key(cip, 53, Protocol::Udp), both(5353)),
        (key(csip, 80, Protocol::Tcp), both(8080)),
        (key(csip, 53, Protocol::Udp), both(5353)),
    ]
    .into_iter()
    .collect();
    assert_eq!(svc_view(&s), want);
    let snap = s.datapath().snapshot().unwrap();
    let state = MapState::from_snapshot(&snap);
    assert_eq!(
        state.ipcache.get(&"198.18.2.11/32".parse().unwrap()),
        Some(&(west.get(), 2))
    );
    let ep = state.endpoints.get(&v4(1, 11)).unwrap();
    assert_eq!(
        (ep.endpoint_id, ep.identity, ep.ifindex),
        (east.get(), east.get(), 7)
    );
    assert!(!ep.enforce_ingress && !ep.enforce_egress);
    assert_eq!(s.datapath().attached_interfaces(), ["veth-a"]);

    // The same view again (new Arcs, equal values): nothing to write.
    s.update_services(services(vec![svc]));
    assert_eq!(s.flush().unwrap(), 0);

    // West's backend goes: only the service entries change.
    s.update_services(services(vec![web(vec![backend("east", v4(1, 11))])]));
    assert_eq!(s.flush().unwrap(), 4);
    assert!(
        svc_view(&s)
            .values()
            .all(|b| b.len() == 1 && b[0].ip == v4(1, 11))
    );

    // The local pod goes: endpoint and ipcache entry removed, interface detached.
    s.update_ipcache(ipcache(&[("west", v4(2, 11), west)]));
    assert_eq!(s.flush().unwrap(), 2);
    assert!(s.datapath().attached_interfaces().is_empty());
    assert!(s.datapath().snapshot().unwrap().endpoints.is_empty());
}

fn nodes(list: &[(&str, u32, &str, Ipv4Addr)]) -> Arc<crate::view::NodesSnapshot> {
    let mut snap = crate::view::NodesSnapshot::default();
    for (cluster, id, name, ip) in list {
        snap.entries.insert(
            (cn(cluster), (*name).to_owned()),
            Arc::new(meshd::model::Node {
                name: (*name).to_owned(),
                cluster: cn(cluster),
                cluster_id: meshd::model::ClusterId::new(*id, M).unwrap(),
                addresses: vec![meshd::model::NodeAddress {
                    kind: meshd::model::NodeAddressType::InternalIP,
                    ip: IpAddr::V4(*ip),
                }],
                pod_cidrs: vec![],
            }),
        );
    }
    snap.generation = 1;
    Arc::new(snap)
}

#[test]
fn node_addresses_get_host_and_remote_node_and_endpoints_win() {
    let routes = FakeRoutes::default();
    let mut s = syncer(RecordingDatapath::new(), &routes);
    let host = Ipv4Addr::new(198, 18, 0, 1);
    routes.1.lock().unwrap().insert(host);
    s.rescan_interfaces();
    s.update_nodes(nodes(&[
        ("east", 1, "e1", host),
        ("east", 1, "e2", Ipv4Addr::new(198, 18, 0, 9)),
        ("west", 2, "w1", Ipv4Addr::new(198, 18, 0, 2)),
    ]));
    s.reconcile().unwrap();
    let ipc = |s: &Syncer| MapState::from_snapshot(&s.datapath().snapshot().unwrap()).ipcache;
    let get = |m: &HashMap<ipnet::Ipv4Net, (u32, u16)>, ip: &str| {
        m.get(&format!("{ip}/32").parse().unwrap()).copied()
    };
    let m = ipc(&s);
    assert_eq!(get(&m, "198.18.0.1"), Some((1, 0)), "this machine: host");
    assert_eq!(
        get(&m, "198.18.0.9"),
        Some((6, 1)),
        "another local node: remote-node"
    );
    assert_eq!(
        get(&m, "198.18.0.2"),
        Some((6, 2)),
        "a peer's node: remote-node"
    );

    // An endpoint on a node address wins; when it goes, the node entry returns.
    let pod = ident(2, 400);
    s.update_ipcache(ipcache(&[("west", Ipv4Addr::new(198, 18, 0, 2), pod)]));
    s.flush().unwrap();
    assert_eq!(get(&ipc(&s), "198.18.0.2"), Some((pod.get(), 2)));
    s.update_ipcache(ipcache(&[]));
    s.flush().unwrap();
    assert_eq!(get(&ipc(&s), "198.18.0.2"), Some((6, 2)));

    // The peer's node goes away: its entry too; a host address that goes stops being host.
    s.update_nodes(nodes(&[("east", 1, "e1", host)]));
    routes.1.lock().unwrap().clear();
    s.rescan_interfaces();
    s.flush().unwrap();
    let m = ipc(&s);
    assert_eq!(get(&m, "198.18.0.2"), None);
    assert_eq!(
        get(&m, "198.18.0.1"),
        Some((6, 1)),
        "now just a node of this cluster"
    );
}

#[test]
fn reconcile_removes_stale_entries_and_leaves_live_ones() {
    let routes = FakeRoutes::default();
    routes.set(v4(1, 11), "veth-a", 7);
    let east = ident(1, 300);
    let cip = Ipv4Addr::new(198, 19, 1, 10);
    // What a previous agent left: one live service (same backends), one stale service,
    // a live and a stale ipcache entry, a live endpoint (enforcing ingress: kept while
    // policy is not managed) and a stale one, and a policy entry.
    let mut pinned = RecordingDatapath::new();
    let live = key(cip, 80, Protocol::Tcp);
    let stale = key(Ipv4Addr::new(198, 19, 9, 9), 80, Protocol::Tcp);
    let be = Backend {
        ip: v4(1, 11),
        port: 8080,
    };
    let rule = PolicyRule {
        endpoint_id: east.get(),
        identity: 0,
        port: 80,
        proto: 6,
        direction: Direction::Ingress,
    };
    pinned
        .apply(&[
            Change::UpsertService {
                key: live,
                backends: vec![be],
            },
            Change::UpsertService {
                key: stale,
                backends: vec![be],
            },
            Change::UpsertIpcache {
                prefix: "198.18.1.11/32".parse().unwrap(),
                identity: east.get(),
                cluster_id: 1,
            },
            Change::UpsertIpcache {
                prefix: "198.18.1.99/32".parse().unwrap(),
                identity: east.get(),
                cluster_id: 1,
            },
            Change::UpsertEndpoint(super::super::Endpoint {
                ip: v4(1, 11),
                endpoint_id: east.get(),
                identity: east.get(),
                ifindex: 7,
                enforce_ingress: true,
                enforce_egress: false,
            }),
            Change::UpsertEndpoint(super::super::Endpoint {
                ip: v4(1, 99),
                endpoint_id: east.get(),
                identity: east.get(),
                ifindex: 8,
                enforce_ingress: false,
                enforce_egress: false,
            }),
            Change::UpsertPolicy {
                rule,
                verdict: Verdict::Allow,
                rule_id: 1,
            },
        ])
        .unwrap();
    let mut s = syncer(pinned, &routes);
    let mut svc = web(vec![backend("east", v4(1, 11))]);
    svc.clusterset_ip = None;
    svc.ports.retain(|p| p.port == 80);
    s.update_services(services(vec![svc]));
    s.update_ipcache(ipcache(&[("east", v4(1, 11), east)]));
    s.rescan_interfaces();
    // Exactly three deletes: the stale service, ipcache entry and endpoint.
    assert_eq!(s.reconcile().unwrap(), 3);
    let snap = s.datapath().snapshot().unwrap();
    let state = MapState::from_snapshot(&snap);
    assert_eq!(
        state.services.keys().copied().collect::<Vec<_>>(),
        [live],
        "stale service removed"
    );
    assert_eq!(state.ipcache.len(), 1);
    assert_eq!(state.endpoints.len(), 1);
    assert!(state.endpoints[&v4(1, 11)].enforce_ingress, "flags kept");
    assert_eq!(state.policy.len(), 1, "policy left alone while unmanaged");
    // The live service kept its backend id and slot: no backend rewritten.
    assert_eq!(snap.backends.len(), 1);

    // The policy engine's first snapshot takes over policy and enforcement.
    let mut rules = BTreeMap::new();
    let rule2 = PolicyRule { port: 81, ..rule };
    rules.insert(
        rule2,
        PolicyAction {
            verdict: Verdict::Allow,
            rule_id: 2,
        },
    );
    s.update_policy(Arc::new(PolicySnapshot {
        generation: 1,
        enforce: BTreeMap::from([(
            east.get(),
            Enforcement {
                ingress: true,
                egress: true,
            },
        )]),
        rules,
    }));
    // rule2 in, rule out, endpoint flags changed.
    assert_eq!(s.flush().unwrap(), 3);
    let state = MapState::from_snapshot(&s.datapath().snapshot().unwrap());
    assert_eq!(state.policy.keys().copied().collect::<Vec<_>>(), [rule2]);
    let ep = state.endpoints[&v4(1, 11)];
    assert!(ep.enforce_ingress && ep.enforce_egress);
}

#[test]
fn endpoints_follow_their_interface() {
    let routes = FakeRoutes::default();
    let east = ident(1, 300);
    let mut s = syncer(RecordingDatapath::new(), &routes);
    s.update_ipcache(ipcache(&[("east", v4(1, 11), east)]));
    s.rescan_interfaces();
    s.reconcile().unwrap();
    assert!(
        s.datapath().snapshot().unwrap().endpoints.is_empty(),
        "no interface, no endpoint"
    );
    routes.set(v4(1, 11), "veth-a", 7);
    s.rescan_interfaces();
    assert_eq!(s.flush().unwrap(), 1);
    assert_eq!(s.datapath().attached_interfaces(), ["veth-a"]);
    // The pod is recreated behind another veth.
    routes.set(v4(1, 11), "veth-b", 9);
    s.rescan_interfaces();
    assert_eq!(s.flush().unwrap(), 1);
    assert_eq!(s.datapath().attached_interfaces(), ["veth-b"]);
    routes.remove(v4(1, 11));
    s.rescan_interfaces();
    assert_eq!(s.flush().unwrap(), 1);
    assert!(s.datapath().attached_interfaces().is_empty());
}

#[test]
fn frontends_skip_headless_ipv6_and_unmatched_ports() {
    let mut svc = web(vec![backend("east", v4(1, 11))]);
    svc.frontends_local.push("2001:db8::1".parse().unwrap());
    svc.ports.push(ServicePort {
        name: "metrics".into(),
        port: 9090,
        protocol: L4::Tcp,
    });
    let f = frontends(&svc);
    // 2 IPv4 VIPs × 3 ports; the metrics port has no backend port.
    assert_eq!(f.len(), 6);
    assert!(
        f.iter()
            .filter(|(k, _)| k.port == 9090)
            .all(|(_, b)| b.is_empty())
    );
    svc.headless = true;
    assert!(frontends(&svc).is_empty());
}

#[test]
fn status_describes_the_mode() {
    let s = Syncer::new(
        Box::new(RecordingDatapath::new()),
        Some("permission denied".into()),
        Box::new(FakeRoutes::default()),
        SyncConfig::new(cn("east"), M),
        DatapathMetrics::default(),
    );
    assert_eq!(
        s.handles().status.borrow().describe(),
        "recording (permission denied)"
    );
    assert_eq!(DatapathStatus::default().describe(), "none");
}
