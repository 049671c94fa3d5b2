//! Unit tests of the merged view on synthetic event streams.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use meshd::events::ClusterEvent;
use meshd::keys::{StateKey, StateKind, StateValue};
use meshd::model::{
    Affinity, Backend, BackendPort, Capabilities, ClusterConfig, ClusterId, ClusterName,
    ClusterService, Identity, IdentityEntry, IpCacheEntry, Labels, MaxConnectedClusters, Node,
    Protocol, ServicePort,
};

use super::{Collision, IdentityConflict, MergedService, MergedView, RejectReason};

pub(super) const MODE: MaxConnectedClusters = MaxConnectedClusters::C255;

pub(super) fn cn(s: &str) -> ClusterName {
    ClusterName::new(s).unwrap()
}

pub(super) fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub(super) fn config(name: &str, id: u32) -> ClusterConfig {
    ClusterConfig {
        id: ClusterId::new(id, MODE).unwrap(),
        name: cn(name),
        max_connected_clusters: MODE,
        capabilities: Capabilities::default(),
    }
}

pub(super) fn ident(cluster_id: u32, local: u32) -> Identity {
    Identity::cluster_scoped(ClusterId::new(cluster_id, MODE).unwrap(), local, MODE).unwrap()
}

pub(super) fn identity_entry(cluster: &str, id: Identity, app: &str) -> IdentityEntry {
    let labels = [
        format!("k8s:app={app}"),
        format!("mesh:io.meshd.cluster={cluster}"),
    ];
    IdentityEntry {
        id,
        labels: Labels::parse(labels.iter().map(String::as_str)).unwrap(),
    }
}

pub(super) fn ip_entry(addr: &str, identity: Identity) -> IpCacheEntry {
    let ip = ip(addr);
    IpCacheEntry {
        ip,
        prefix_len: if ip.is_ipv4() { 32 } else { 128 },
        identity,
        host_ip: None,
        node: None,
        namespace: None,
        pod: None,
        named_ports: Default::default(),
    }
}

pub(super) fn node(cluster: &str, id: u32, name: &str) -> Node {
    Node {
        name: name.into(),
        cluster: cn(cluster),
        cluster_id: ClusterId::new(id, MODE).unwrap(),
        addresses: vec![],
        pod_cidrs: vec![],
    }
}

pub(super) fn backend(ready: bool) -> Backend {
    Backend {
        ports: vec![BackendPort {
            name: "http".into(),
            port: 8080,
            protocol: Protocol::Tcp,
        }],
        ready,
        hostname: None,
        node: None,
        zone: None,
    }
}

pub(super) fn port(name: &str, port: u16, protocol: Protocol) -> ServicePort {
    ServicePort {
        name: name.into(),
        port,
        protocol,
    }
}

/// A global, shared, non-headless service with one port and the given backends.
pub(super) fn service(
    cluster: &str,
    id: u32,
    name: &str,
    backends: &[(&str, bool)],
) -> ClusterService {
    ClusterService {
        cluster: cn(cluster),
        cluster_id: ClusterId::new(id, MODE).unwrap(),
        namespace: "default".into(),
        name: name.into(),
        global: true,
        shared: true,
        affinity: Affinity::None,
        headless: false,
        frontends: vec![],
        ports: vec![port("http", 80, Protocol::Tcp)],
        backends: backends.iter().map(|(a, r)| (ip(a), backend(*r))).collect(),
        export_created: None,
    }
}

pub(super) fn key_of(cluster: &ClusterName, v: &StateValue) -> StateKey {
    let cluster = cluster.clone();
    match v {
        StateValue::Identity(e) => StateKey::Identity { cluster, id: e.id },
        StateValue::Ip(e) => StateKey::Ip { cluster, ip: e.ip },
        StateValue::Node(n) => StateKey::Node {
            cluster,
            name: n.name.clone(),
        },
        StateValue::Service(s) => StateKey::Service {
            cluster,
            namespace: s.namespace.clone(),
            name: s.name.clone(),
        },
    }
}

pub(super) fn apply(cluster: &str, value: impl Into<Value>) -> ClusterEvent {
    let value = value.into().0;
    let cluster = cn(cluster);
    ClusterEvent::Apply {
        key: key_of(&cluster, &value),
        cluster,
        value,
    }
}

/// Any model value, for [`apply`].
pub(super) struct Value(pub(super) StateValue);

impl From<IdentityEntry> for Value {
    fn from(v: IdentityEntry) -> Self {
        Self(StateValue::Identity(v))
    }
}
impl From<IpCacheEntry> for Value {
    fn from(v: IpCacheEntry) -> Self {
        Self(StateValue::Ip(v))
    }
}
impl From<Node> for Value {
    fn from(v: Node) -> Self {
        Self(StateValue::Node(v))
    }
}
impl From<ClusterService> for Value {
    fn from(v: ClusterService) -> Self {
        Self(StateValue::Service(v))
    }
}

fn delete_ip(cluster: &str, addr: &str) -> ClusterEvent {
    ClusterEvent::Delete {
        cluster: cn(cluster),
        key: StateKey::Ip {
            cluster: cn(cluster),
            ip: ip(addr),
        },
    }
}

fn init(cluster: &str, kind: StateKind) -> ClusterEvent {
    ClusterEvent::Init {
        cluster: cn(cluster),
        kind,
    }
}

fn init_done(cluster: &str, kind: StateKind) -> ClusterEvent {
    ClusterEvent::InitDone {
        cluster: cn(cluster),
        kind,
    }
}

fn cfg_event(name: &str, id: u32) -> ClusterEvent {
    ClusterEvent::Config {
        cluster: cn(name),
        config: config(name, id),
    }
}

/// A view of local cluster `east` (ID 1) with configs for `west` (2) and `north` (3).
fn view() -> MergedView {
    let mut v = MergedView::new(cn("east"));
    for (name, id) in [("east", 1), ("west", 2), ("north", 3)] {
        v.apply(cfg_event(name, id));
    }
    v
}

fn merged(v: &MergedView, name: &str) -> Arc<MergedService> {
    v.services()
        .service("default", name)
        .unwrap_or_else(|| panic!("service default/{name} missing"))
        .clone()
}

fn active_ips(s: &MergedService) -> BTreeSet<IpAddr> {
    s.active().map(|b| b.ip).collect()
}

fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
    list.iter().map(|s| ip(s)).collect()
}

#[test]
fn global_service_merged_across_three_clusters_with_affinity() {
    let mut v = view();
    let mut east = service(
        "east",
        1,
        "web",
        &[("198.18.1.1", true), ("198.18.1.2", false)],
    );
    east.frontends = vec![ip("198.19.96.10")];
    v.apply(apply("east", east.clone()));
    v.apply(apply(
        "west",
        service("west", 2, "web", &[("198.18.2.1", true)]),
    ));
    v.apply(apply(
        "north",
        service(
            "north",
            3,
            "web",
            &[("198.18.3.1", true), ("198.18.3.2", true)],
        ),
    ));

    let s = merged(&v, "web");
    assert_eq!(s.clusters, vec![cn("east"), cn("north"), cn("west")]);
    assert_eq!(s.frontends_local, vec![ip("198.19.96.10")]);
    assert_eq!(s.backends.len(), 5);
    assert_eq!(s.affinity, Affinity::None);
    assert!(s.conflicts.is_empty(), "{:?}", s.conflicts);
    // none: every ready backend of every cluster.
    assert_eq!(
        active_ips(&s),
        ips(&["198.18.1.1", "198.18.2.1", "198.18.3.1", "198.18.3.2"])
    );

    // local: only the local ready backend while it exists...
    east.affinity = Affinity::Local;
    v.apply(apply("east", east.clone()));
    let s = merged(&v, "web");
    assert_eq!(s.affinity, Affinity::Local);
    assert_eq!(active_ips(&s), ips(&["198.18.1.1"]));
    // ...and the remote ones once no local backend is ready.
    east.backends.get_mut(&ip("198.18.1.1")).unwrap().ready = false;
    v.apply(apply("east", east.clone()));
    assert_eq!(
        active_ips(&merged(&v, "web")),
        ips(&["198.18.2.1", "198.18.3.1", "198.18.3.2"])
    );

    // remote: the remote ready backends while any exists...
    east.affinity = Affinity::Remote;
    east.backends.get_mut(&ip("198.18.1.1")).unwrap().ready = true;
    v.apply(apply("east", east.clone()));
    assert_eq!(
        active_ips(&merged(&v, "web")),
        ips(&["198.18.2.1", "198.18.3.1", "198.18.3.2"])
    );
    // ...and the local ones when no remote backend is ready.
    v.apply(apply(
        "west",
        service("west", 2, "web", &[("198.18.2.1", false)]),
    ));
    v.apply(apply(
        "north",
        service("north", 3, "web", &[("198.18.3.1", false)]),
    ));
    let s = merged(&v, "web");
    assert_eq!(active_ips(&s), ips(&["198.18.1.1"]));
    assert_eq!(s.backends.len(), 4);
    // Nothing ready anywhere: nothing active.
    east.backends.get_mut(&ip("198.18.1.1")).unwrap().ready = false;
    v.apply(apply("east", east));
    assert!(merged(&v, "web").active_backends.is_empty());
}

#[test]
fn affinity_comes_from_the_oldest_export_without_a_local_service() {
    let mut v = view();
    let t = |s: i64| time::OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(s);
    let mut west = service("west", 2, "web", &[("198.18.2.1", true)]);
    west.export_created = Some(t(200));
    west.affinity = Affinity::Remote;
    let mut north = service("north", 3, "web", &[("198.18.3.1", true)]);
    north.export_created = Some(t(100));
    north.affinity = Affinity::None;
    v.apply(apply("west", west));
    v.apply(apply("north", north));
    let s = merged(&v, "web");
    assert_eq!(s.clusters, vec![cn("north"), cn("west")]);
    assert_eq!(s.affinity, Affinity::None);
    assert_eq!(s.conflicts.len(), 1, "{:?}", s.conflicts);
    assert!(s.conflicts[0].starts_with("affinity"), "{:?}", s.conflicts);
    assert_eq!(active_ips(&s), ips(&["198.18.2.1", "198.18.3.1"]));
}

#[test]
fn non_global_and_unshared_remotes_excluded_remote_only_service_reachable() {
    let mut v = view();
    v.apply(apply(
        "east",
        service("east", 1, "web", &[("198.18.1.1", true)]),
    ));
    let mut west = service("west", 2, "web", &[("198.18.2.1", true)]);
    west.global = false;
    v.apply(apply("west", west));
    let mut north = service("north", 3, "web", &[("198.18.3.1", true)]);
    north.shared = false;
    v.apply(apply("north", north));
    let s = merged(&v, "web");
    // west is not global: not part of it at all; north takes part without backends.
    assert_eq!(s.clusters, vec![cn("east"), cn("north")]);
    assert_eq!(
        s.backends.iter().map(|b| b.ip).collect::<Vec<_>>(),
        vec![ip("198.18.1.1")]
    );

    // The local shared:false service still contributes its backends locally.
    let mut east = service("east", 1, "web", &[("198.18.1.1", true)]);
    east.shared = false;
    v.apply(apply("east", east));
    assert_eq!(active_ips(&merged(&v, "web")), ips(&["198.18.1.1"]));

    // A local non-global service is ignored: "api" is merged from west alone.
    let mut east_api = service("east", 1, "api", &[("198.18.1.7", true)]);
    east_api.global = false;
    east_api.frontends = vec![ip("198.19.96.7")];
    v.apply(apply("east", east_api));
    v.apply(apply(
        "west",
        service("west", 2, "api", &[("198.18.2.7", true)]),
    ));
    let s = merged(&v, "api");
    assert_eq!(s.clusters, vec![cn("west")]);
    assert!(s.frontends_local.is_empty());
    assert_eq!(active_ips(&s), ips(&["198.18.2.7"]));

    // Only non-global definitions: no merged service.
    let mut only_local = service("east", 1, "private", &[("198.18.1.9", true)]);
    only_local.global = false;
    v.apply(apply("east", only_local));
    assert!(v.services().service("default", "private").is_none());

    // A remote-only service is present, reachable through its ClusterSetIP.
    v.apply(apply(
        "west",
        service("west", 2, "db", &[("198.18.2.5", true)]),
    ));
    let s = merged(&v, "db");
    assert!(s.frontends_local.is_empty());
    assert_eq!(s.clusterset_ip, None);
    v.set_clusterset_ip("default", "db", Some(ip("198.19.0.5")));
    assert_eq!(merged(&v, "db").clusterset_ip, Some(ip("198.19.0.5")));
    assert_eq!(active_ips(&merged(&v, "db")), ips(&["198.18.2.5"]));
    v.set_clusterset_ip("default", "db", None);
    assert_eq!(merged(&v, "db").clusterset_ip, None);
    // An IP known before the service shows up once it does.
    v.set_clusterset_ip("default", "cache", Some(ip("198.19.0.6")));
    assert!(v.services().service("default", "cache").is_none());
    v.apply(apply(
        "north",
        service("north", 3, "cache", &[("198.18.3.6", true)]),
    ));
    assert_eq!(merged(&v, "cache").clusterset_ip, Some(ip("198.19.0.6")));
}

#[test]
fn wholesale_replace_after_relist_and_drain() {
    let mut v = view();
    v.apply(init("west", StateKind::Ip));
    for a in ["198.18.2.1", "198.18.2.2", "198.18.2.3"] {
        v.apply(apply("west", ip_entry(a, ident(2, 300))));
    }
    v.apply(init_done("west", StateKind::Ip));
    v.apply(init("west", StateKind::Services));
    v.apply(apply(
        "west",
        service("west", 2, "web", &[("198.18.2.1", true)]),
    ));
    v.apply(apply(
        "west",
        service("west", 2, "db", &[("198.18.2.2", true)]),
    ));
    v.apply(init_done("west", StateKind::Services));
    v.apply(apply("west", node("west", 2, "w1")));
    v.apply(apply("north", ip_entry("198.18.3.1", ident(3, 300))));
    v.apply(apply("north", node("north", 3, "n1")));
    v.apply(apply(
        "north",
        service("north", 3, "web", &[("198.18.3.1", true)]),
    ));
    assert_eq!(v.ipcache().len(), 4);

    // A relist returning a subset (one of them changed): stale entries stay until
    // InitDone, then go.
    v.apply(init("west", StateKind::Ip));
    v.apply(apply("west", ip_entry("198.18.2.1", ident(2, 300))));
    v.apply(apply("west", ip_entry("198.18.2.3", ident(2, 301))));
    assert!(v.ipcache().get(&ip("198.18.2.2")).is_some());
    // InitDone of another kind sweeps nothing of this one.
    v.apply(init("west", StateKind::Nodes));
    v.apply(init_done("west", StateKind::Nodes));
    assert!(v.ipcache().get(&ip("198.18.2.2")).is_some());
    assert!(
        v.nodes().get(&(cn("west"), "w1".into())).is_none(),
        "w1 was not relisted"
    );
    v.apply(init_done("west", StateKind::Ip));
    let west_ips: BTreeSet<IpAddr> = v
        .ipcache()
        .entries
        .iter()
        .filter(|(_, e)| e.cluster == cn("west"))
        .map(|(ip, _)| *ip)
        .collect();
    assert_eq!(west_ips, ips(&["198.18.2.1", "198.18.2.3"]));
    assert_eq!(
        v.ipcache().get(&ip("198.18.2.3")).unwrap().value.identity,
        ident(2, 301)
    );
    // An InitDone without its Init sweeps nothing.
    v.apply(init_done("west", StateKind::Ip));
    assert_eq!(v.ipcache().len(), 3);

    // Drain removes exactly one cluster, everywhere.
    v.apply(ClusterEvent::Drain {
        cluster: cn("north"),
    });
    assert_eq!(v.ipcache().len(), 2);
    assert!(
        v.ipcache()
            .entries
            .values()
            .all(|e| e.cluster == cn("west"))
    );
    assert!(v.nodes().is_empty());
    assert_eq!(merged(&v, "web").clusters, vec![cn("west")]);
    assert!(v.config(&cn("north")).is_none());
    assert!(v.config(&cn("west")).is_some());
    assert!(!v.counts().keys().any(|(c, _)| *c == cn("north")));

    // A reconnect (Init again) with fewer services sweeps the rest.
    v.apply(init("west", StateKind::Services));
    v.apply(apply(
        "west",
        service("west", 2, "db", &[("198.18.2.2", true)]),
    ));
    v.apply(init_done("west", StateKind::Services));
    assert!(v.services().service("default", "web").is_none());
    assert!(v.services().service("default", "db").is_some());
    // An Init interrupted by another Init: only the second listing counts.
    v.apply(init("west", StateKind::Ip));
    v.apply(apply("west", ip_entry("198.18.2.9", ident(2, 300))));
    v.apply(init("west", StateKind::Ip));
    v.apply(apply("west", ip_entry("198.18.2.1", ident(2, 300))));
    v.apply(init_done("west", StateKind::Ip));
    assert_eq!(
        v.ipcache().entries.keys().copied().collect::<BTreeSet<_>>(),
        ips(&["198.18.2.1"])
    );
    assert_eq!(v.counts()[&(cn("west"), StateKind::Ip)], 1);
    assert_eq!(v.counts()[&(cn("west"), StateKind::Services)], 1);
    assert_eq!(v.counts()[&(cn("west"), StateKind::Nodes)], 0);
}

#[test]
fn remote_identities_must_be_in_range_pending_until_config() {
    let mut v = view();
    // west is cluster 2: an identity with cluster bits 3 is refused, for identities and
    // for ipcache entries alike.
    v.apply(apply("west", identity_entry("west", ident(3, 300), "web")));
    v.apply(apply("west", ip_entry("198.18.2.1", ident(3, 300))));
    assert!(v.identities().is_empty());
    assert!(v.ipcache().is_empty());
    assert_eq!(
        v.rejected()[&(cn("west"), RejectReason::IdentityOutOfScope)],
        2
    );
    v.apply(apply("west", identity_entry("west", ident(2, 300), "web")));
    assert_eq!(
        v.identities().get(&ident(2, 300)).unwrap().cluster,
        cn("west")
    );
    // Labels naming another cluster: a peer speaking for someone else.
    v.apply(apply("west", identity_entry("east", ident(2, 301), "web")));
    assert!(v.identities().get(&ident(2, 301)).is_none());
    assert_eq!(v.rejected()[&(cn("west"), RejectReason::ForeignCluster)], 1);
    // A key of another cluster in west's stream.
    v.apply(ClusterEvent::Apply {
        cluster: cn("west"),
        key: StateKey::Ip {
            cluster: cn("north"),
            ip: ip("198.18.3.1"),
        },
        value: StateValue::Ip(ip_entry("198.18.3.1", ident(3, 300))),
    });
    assert_eq!(v.rejected()[&(cn("west"), RejectReason::ForeignCluster)], 2);
    assert!(v.ipcache().is_empty());

    // south has no config yet: its entries are held, not shown, until it arrives.
    v.apply(apply("south", identity_entry("south", ident(4, 256), "db")));
    v.apply(apply("south", ip_entry("198.18.4.1", ident(4, 256))));
    assert!(v.identities().get(&ident(4, 256)).is_none());
    assert!(v.ipcache().get(&ip("198.18.4.1")).is_none());
    assert_eq!(v.counts()[&(cn("south"), StateKind::Identities)], 1);
    v.apply(cfg_event("south", 4));
    assert_eq!(
        v.identities().get(&ident(4, 256)).unwrap().cluster,
        cn("south")
    );
    assert_eq!(
        v.ipcache().get(&ip("198.18.4.1")).unwrap().value.identity,
        ident(4, 256)
    );
    // A config change that puts them out of range withdraws them.
    v.apply(cfg_event("south", 5));
    assert!(v.identities().get(&ident(4, 256)).is_none());
    assert!(v.ipcache().get(&ip("198.18.4.1")).is_none());
    assert_eq!(
        v.rejected()[&(cn("south"), RejectReason::IdentityOutOfScope)],
        2
    );
    // A config under another cluster's name is refused.
    v.apply(ClusterEvent::Config {
        cluster: cn("south"),
        config: config("west", 4),
    });
    assert_eq!(v.config(&cn("south")).unwrap().id.get(), 5);
}

#[test]
fn identity_conflicts_first_claim_wins_local_first() {
    let mut v = view();
    // north misconfigured with west's cluster ID: both can claim 2/300.
    v.apply(cfg_event("north", 2));
    v.apply(apply("west", identity_entry("west", ident(2, 300), "web")));
    v.apply(apply("north", identity_entry("north", ident(2, 300), "db")));
    let winner = v.identities().get(&ident(2, 300)).unwrap().clone();
    assert_eq!(winner.cluster, cn("west"));
    assert_eq!(
        winner
            .value
            .labels
            .get(meshd::model::LabelSource::K8s, "app"),
        Some("web")
    );
    assert_eq!(
        v.identity_conflicts(),
        vec![IdentityConflict {
            identity: ident(2, 300),
            winner: cn("west"),
            loser: cn("north"),
        }]
    );
    assert_eq!(v.identity_conflicts_total(), 1);
    // The winner goes: the other claim takes over, the conflict is gone.
    v.apply(ClusterEvent::Delete {
        cluster: cn("west"),
        key: StateKey::Identity {
            cluster: cn("west"),
            id: ident(2, 300),
        },
    });
    assert_eq!(
        v.identities().get(&ident(2, 300)).unwrap().cluster,
        cn("north")
    );
    assert!(v.identity_conflicts().is_empty());

    // The local cluster's claim displaces an earlier remote one.
    v.apply(cfg_event("south", 1));
    v.apply(apply("south", identity_entry("south", ident(1, 500), "x")));
    v.apply(apply("east", identity_entry("east", ident(1, 500), "y")));
    assert_eq!(
        v.identities().get(&ident(1, 500)).unwrap().cluster,
        cn("east")
    );
    assert_eq!(
        v.identity_conflicts(),
        vec![IdentityConflict {
            identity: ident(1, 500),
            winner: cn("east"),
            loser: cn("south"),
        }]
    );
    assert_eq!(v.identity_conflicts_total(), 2);
}

#[test]
fn ipcache_collisions_local_wins_and_loser_takes_over() {
    let mut v = view();
    let a = "198.18.0.1";
    v.apply(apply("west", ip_entry(a, ident(2, 300))));
    assert!(v.collisions().is_empty());
    v.apply(apply("east", ip_entry(a, ident(1, 300))));
    v.apply(apply("north", ip_entry(a, ident(3, 300))));
    let e = v.ipcache().get(&ip(a)).unwrap().clone();
    assert_eq!(
        (e.cluster.clone(), e.value.identity),
        (cn("east"), ident(1, 300))
    );
    let coll = |w: &str, l: &str| Collision {
        ip: ip(a),
        winner: cn(w),
        loser: cn(l),
    };
    assert_eq!(
        v.collisions(),
        vec![coll("east", "west"), coll("east", "north")]
    );
    assert_eq!(v.collisions_total(), 2);
    // A loser's update does not change what is used.
    v.apply(apply("west", ip_entry(a, ident(2, 301))));
    assert!(Arc::ptr_eq(v.ipcache().get(&ip(a)).unwrap(), &e));

    // The local winner goes: the first remote claimant (west) takes over, with its
    // latest value.
    v.apply(delete_ip("east", a));
    let e = v.ipcache().get(&ip(a)).unwrap();
    assert_eq!(
        (e.cluster.clone(), e.value.identity),
        (cn("west"), ident(2, 301))
    );
    assert_eq!(v.collisions(), vec![coll("west", "north")]);
    v.apply(delete_ip("west", a));
    assert_eq!(v.ipcache().get(&ip(a)).unwrap().cluster, cn("north"));
    assert!(v.collisions().is_empty());
    assert_eq!(v.collisions_total(), 2);
    v.apply(delete_ip("north", a));
    assert!(v.ipcache().is_empty());

    // Between remotes, the first one wins regardless of name.
    let b = "198.18.0.2";
    v.apply(apply("west", ip_entry(b, ident(2, 300))));
    v.apply(apply("north", ip_entry(b, ident(3, 300))));
    assert_eq!(v.ipcache().get(&ip(b)).unwrap().cluster, cn("west"));
    // Draining the winner hands the IP over too.
    v.apply(ClusterEvent::Drain {
        cluster: cn("west"),
    });
    assert_eq!(v.ipcache().get(&ip(b)).unwrap().cluster, cn("north"));
    assert!(v.collisions().is_empty());

    // Service frontends are not endpoint IPs: no collision.
    let mut east = service("east", 1, "web", &[]);
    east.frontends = vec![ip("198.18.0.9")];
    v.apply(apply("east", east));
    v.apply(apply("north", ip_entry("198.18.0.9", ident(3, 300))));
    assert!(v.collisions().is_empty());
    assert_eq!(
        v.ipcache().get(&ip("198.18.0.9")).unwrap().cluster,
        cn("north")
    );
}

#[test]
fn mcs_conflicts_resolved_by_oldest_export() {
    let mut v = view();
    let t = |s: i64| time::OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(s);
    let mut east = service("east", 1, "web", &[("198.18.1.1", true)]);
    east.export_created = Some(t(300));
    let mut west = service("west", 2, "web", &[("198.18.2.1", true)]);
    west.export_created = Some(t(100));
    west.headless = true;
    west.ports.push(port("https", 443, Protocol::Tcp));
    let mut north = service("north", 3, "web", &[("198.18.3.1", true)]);
    north.export_created = Some(t(200));
    north.ports = vec![
        port("http", 80, Protocol::Udp),
        port("metrics", 9090, Protocol::Tcp),
    ];
    v.apply(apply("east", east.clone()));
    v.apply(apply("north", north.clone()));
    v.apply(apply("west", west.clone()));

    let s = merged(&v, "web");
    assert_eq!(s.clusters, vec![cn("west"), cn("north"), cn("east")]);
    assert!(s.headless, "the oldest export (west) is headless");
    assert_eq!(
        s.ports,
        vec![
            port("http", 80, Protocol::Tcp),
            port("https", 443, Protocol::Tcp),
            port("metrics", 9090, Protocol::Tcp),
        ]
    );
    let headless: Vec<_> = s
        .conflicts
        .iter()
        .filter(|c| c.starts_with("headless"))
        .collect();
    assert_eq!(headless.len(), 2, "{:?}", s.conflicts);
    assert!(
        s.conflicts
            .iter()
            .any(|c| c.starts_with("port 80: cluster north")),
        "{:?}",
        s.conflicts
    );
    assert_eq!(s.conflicts.len(), 3, "{:?}", s.conflicts);
    let reported = v.conflicts();
    assert_eq!(reported.len(), 3);
    assert!(
        reported
            .iter()
            .all(|c| c.service.to_string() == "default/web")
    );

    // The oldest export goes: north decides now, east's port 80/TCP conflicts with it.
    v.apply(ClusterEvent::Delete {
        cluster: cn("west"),
        key: StateKey::Service {
            cluster: cn("west"),
            namespace: "default".into(),
            name: "web".into(),
        },
    });
    let s = merged(&v, "web");
    assert!(!s.headless);
    assert_eq!(s.clusters, vec![cn("north"), cn("east")]);
    assert_eq!(
        s.ports,
        vec![
            port("http", 80, Protocol::Udp),
            port("metrics", 9090, Protocol::Tcp)
        ]
    );
    assert_eq!(s.conflicts.len(), 1, "{:?}", s.conflicts);
    assert!(
        s.conflicts[0].contains("using 80/UDP (http) from cluster north"),
        "{:?}",
        s.conflicts
    );

    // Equal export times: the cluster name decides; no conflict left once they agree.
    north.export_created = Some(t(300));
    north.ports = east.ports;
    v.apply(apply("north", north));
    let s = merged(&v, "web");
    assert_eq!(s.clusters, vec![cn("east"), cn("north")]);
    assert!(s.conflicts.is_empty(), "{:?}", s.conflicts);
    assert!(v.conflicts().is_empty());
    // Annotation-only definitions come after every export, whatever their name.
    let mut alpha = service("west", 2, "web", &[]);
    alpha.headless = true;
    v.apply(apply("west", alpha));
    let s = merged(&v, "web");
    assert_eq!(s.clusters, vec![cn("east"), cn("north"), cn("west")]);
    assert!(!s.headless);
    assert_eq!(v.conflicts().len(), 1);
}

#[test]
fn subscribers_see_new_snapshots_only_for_changed_kinds() {
    let mut v = view();
    let mut svc = v.subscribe_services();
    let ids = v.subscribe_identities();
    let mut ipc = v.subscribe_ipcache();
    let mut nodes = v.subscribe_nodes();
    v.publish();
    assert!(!svc.has_changed().unwrap() && !ids.has_changed().unwrap());
    assert!(!ipc.has_changed().unwrap() && !nodes.has_changed().unwrap());
    let svc0 = svc.borrow_and_update().clone();
    let nodes0 = nodes.borrow_and_update().clone();

    // A batch of ipcache changes: one new snapshot, nothing for the other kinds.
    v.apply(apply("west", ip_entry("198.18.2.1", ident(2, 300))));
    v.apply(apply("west", ip_entry("198.18.2.2", ident(2, 300))));
    assert!(
        !ipc.has_changed().unwrap(),
        "nothing is sent before publish"
    );
    assert!(v.has_unpublished());
    v.publish();
    assert!(!v.has_unpublished());
    assert!(ipc.has_changed().unwrap());
    let ipc1 = ipc.borrow_and_update().clone();
    assert_eq!((ipc1.generation, ipc1.len()), (1, 2));
    assert!(!svc.has_changed().unwrap() && !ids.has_changed().unwrap());
    assert!(!nodes.has_changed().unwrap());
    assert!(Arc::ptr_eq(&svc0, &svc.borrow()));
    assert!(Arc::ptr_eq(&nodes0, &nodes.borrow()));

    // Re-applying identical values (a relist) publishes nothing.
    v.apply(init("west", StateKind::Ip));
    v.apply(apply("west", ip_entry("198.18.2.1", ident(2, 300))));
    v.apply(apply("west", ip_entry("198.18.2.2", ident(2, 300))));
    v.apply(init_done("west", StateKind::Ip));
    v.publish();
    assert!(!ipc.has_changed().unwrap());

    // A service change: services only; the untouched ipcache entry is shared by value.
    v.apply(apply(
        "west",
        service("west", 2, "web", &[("198.18.2.1", true)]),
    ));
    v.apply(apply("west", ip_entry("198.18.2.2", ident(2, 301))));
    v.publish();
    assert!(svc.has_changed().unwrap());
    assert_eq!(svc.borrow_and_update().generation, 1);
    let ipc2 = ipc.borrow_and_update().clone();
    assert_eq!(ipc2.generation, 2);
    assert!(Arc::ptr_eq(
        ipc1.get(&ip("198.18.2.1")).unwrap(),
        ipc2.get(&ip("198.18.2.1")).unwrap()
    ));
    // The old snapshot is unchanged.
    assert_eq!(
        ipc1.get(&ip("198.18.2.2")).unwrap().value.identity,
        ident(2, 300)
    );
    assert!(!ids.has_changed().unwrap() && !nodes.has_changed().unwrap());
    // A service update that changes nothing merged (a non-global peer) is not sent.
    let mut other = service("north", 3, "web", &[("198.18.3.1", true)]);
    other.global = false;
    v.apply(apply("north", other));
    v.publish();
    assert!(!svc.has_changed().unwrap());
    // Late subscribers get the latest published state.
    assert_eq!(v.subscribe_ipcache().borrow().generation, 2);
}
