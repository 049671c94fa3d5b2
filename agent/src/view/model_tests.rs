//! Property-style test: seeded random event streams over three clusters, checked after
//! every event against a naive recomputation from the final per-cluster state.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use meshd::events::ClusterEvent;
use meshd::keys::{StateKey, StateKind, StateValue};
use meshd::model::{
    Affinity, ClusterConfig, ClusterName, ClusterService, Identity, IpCacheEntry, NodeAddress,
    NodeAddressType, Protocol,
};

use super::services::{self, ServiceKey};
use super::tests::{
    Value, apply, cn, config, ident, identity_entry, ip, ip_entry, key_of, node, port,
};
use super::{ClusterEntry, MergedView};

const LOCAL: &str = "east";
/// (name, nominal cluster ID). north shares west's ID so identities can conflict; its
/// config sometimes moves to ID 3, which re-evaluates its entries.
const CLUSTERS: [(&str, u32); 3] = [("east", 1), ("west", 2), ("north", 2)];
const SERVICES: [&str; 3] = ["a", "b", "c"];
const NODES: [&str; 3] = ["n1", "n2", "n3"];

/// xorshift64*: small, deterministic, good enough to shuffle events.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

fn pool_ip(r: &mut Rng) -> String {
    format!("198.18.0.{}", 1 + r.below(6))
}

fn random_identity(r: &mut Rng, nominal: u32) -> Identity {
    let bits = if r.chance(70) {
        nominal
    } else {
        1 + r.below(3) as u32
    };
    ident(bits, 256 + r.below(4) as u32)
}

fn random_service(r: &mut Rng, cluster: &str, id: u32) -> ClusterService {
    let name = r.pick(&SERVICES);
    let backends: Vec<(String, bool)> = (0..r.below(4))
        .map(|_| (pool_ip(r), r.chance(70)))
        .collect();
    let refs: Vec<(&str, bool)> = backends.iter().map(|(a, b)| (a.as_str(), *b)).collect();
    let mut s = super::tests::service(cluster, id, name, &refs);
    s.global = r.chance(80);
    s.shared = r.chance(75);
    s.headless = r.chance(20);
    s.affinity = r.pick(&[Affinity::None, Affinity::Local, Affinity::Remote]);
    s.export_created = r
        .chance(60)
        .then(|| time::OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(r.below(3) as i64));
    let all = [
        port("http", 80, Protocol::Tcp),
        port("http", 80, Protocol::Udp),
        port("https", 443, Protocol::Tcp),
        port("dns", 53, Protocol::Udp),
    ];
    s.ports = all.into_iter().filter(|_| r.chance(50)).collect();
    if cluster == LOCAL && r.chance(50) {
        s.frontends = vec![ip("198.19.96.1")];
    }
    s
}

fn random_value(r: &mut Rng, cluster: &str, nominal: u32) -> Value {
    match r.below(4) {
        0 => ip_entry(&pool_ip(r), random_identity(r, nominal)).into(),
        1 => identity_entry(cluster, random_identity(r, nominal), r.pick(&["x", "y"])).into(),
        2 => {
            let mut n = node(cluster, nominal, r.pick(&NODES));
            n.addresses = vec![NodeAddress {
                kind: NodeAddressType::InternalIP,
                ip: ip(r.pick(&["198.19.168.1", "198.19.168.2"])),
            }];
            n.into()
        }
        _ => random_service(r, cluster, nominal).into(),
    }
}

fn random_key(r: &mut Rng, cluster: &ClusterName, nominal: u32) -> StateKey {
    let cluster = cluster.clone();
    match r.below(4) {
        0 => StateKey::Ip {
            cluster,
            ip: ip(&pool_ip(r)),
        },
        1 => StateKey::Identity {
            cluster,
            id: random_identity(r, nominal),
        },
        2 => StateKey::Node {
            cluster,
            name: r.pick(&NODES).to_string(),
        },
        _ => StateKey::Service {
            cluster,
            namespace: "default".into(),
            name: r.pick(&SERVICES).to_string(),
        },
    }
}

/// The naive model: per cluster, the entries present, with the wholesale-replace rule
/// implemented as "remember what was seen since Init, keep only that at InitDone".
#[derive(Default)]
struct Model {
    configs: BTreeMap<ClusterName, ClusterConfig>,
    entries: BTreeMap<ClusterName, BTreeMap<StateKey, StateValue>>,
    listing: BTreeMap<(ClusterName, StateKind), BTreeSet<StateKey>>,
    /// Per claimed key, the clusters in the order their claim was admitted.
    ip_order: BTreeMap<IpAddr, Vec<ClusterName>>,
    id_order: BTreeMap<Identity, Vec<ClusterName>>,
    clusterset_ips: BTreeMap<ServiceKey, IpAddr>,
}

impl Model {
    fn apply(&mut self, ev: &ClusterEvent) {
        match ev {
            ClusterEvent::Config { cluster, config } => {
                self.configs.insert(cluster.clone(), config.clone());
            }
            ClusterEvent::Init { cluster, kind } => {
                self.listing
                    .insert((cluster.clone(), *kind), BTreeSet::new());
            }
            ClusterEvent::Apply {
                cluster,
                key,
                value,
            } => {
                if key.cluster() != cluster {
                    return;
                }
                self.entries
                    .entry(cluster.clone())
                    .or_default()
                    .insert(key.clone(), value.clone());
                if let Some(seen) = self.listing.get_mut(&(cluster.clone(), key.kind())) {
                    seen.insert(key.clone());
                }
            }
            ClusterEvent::Delete { cluster, key } => {
                if let Some(e) = self.entries.get_mut(cluster) {
                    e.remove(key);
                }
            }
            ClusterEvent::InitDone { cluster, kind } => {
                if let Some(seen) = self.listing.remove(&(cluster.clone(), *kind))
                    && let Some(e) = self.entries.get_mut(cluster)
                {
                    e.retain(|k, _| k.kind() != *kind || seen.contains(k));
                }
            }
            ClusterEvent::Drain { cluster } => {
                self.entries.remove(cluster);
                self.configs.remove(cluster);
                self.listing.retain(|(c, _), _| c != cluster);
            }
        }
        let ip_claims = self.ip_claims();
        update_order(&mut self.ip_order, &ip_claims);
        let id_claims = self.id_claims();
        update_order(&mut self.id_order, &id_claims);
    }

    fn admitted(&self, cluster: &ClusterName, id: Identity) -> bool {
        cluster.as_str() == LOCAL
            || self
                .configs
                .get(cluster)
                .is_some_and(|c| id.check_scope(c.id, c.max_connected_clusters).is_ok())
    }

    fn ip_claims(&self) -> BTreeMap<IpAddr, BTreeMap<ClusterName, IpCacheEntry>> {
        let mut out: BTreeMap<IpAddr, BTreeMap<ClusterName, IpCacheEntry>> = BTreeMap::new();
        for (c, entries) in &self.entries {
            for v in entries.values() {
                if let StateValue::Ip(e) = v
                    && self.admitted(c, e.identity)
                {
                    out.entry(e.ip).or_default().insert(c.clone(), e.clone());
                }
            }
        }
        out
    }

    fn id_claims(&self) -> BTreeMap<Identity, BTreeMap<ClusterName, meshd::model::IdentityEntry>> {
        let mut out: BTreeMap<_, BTreeMap<_, _>> = BTreeMap::new();
        for (c, entries) in &self.entries {
            for v in entries.values() {
                if let StateValue::Identity(e) = v
                    && self.admitted(c, e.id)
                {
                    out.entry(e.id).or_default().insert(c.clone(), e.clone());
                }
            }
        }
        out
    }

    fn services(&self) -> BTreeMap<ServiceKey, services::MergedService> {
        let mut defs: BTreeMap<ServiceKey, Vec<&ClusterService>> = BTreeMap::new();
        for entries in self.entries.values() {
            for v in entries.values() {
                if let StateValue::Service(s) = v {
                    defs.entry(ServiceKey::new(&s.namespace, &s.name))
                        .or_default()
                        .push(s);
                }
            }
        }
        defs.into_iter()
            .filter_map(|(k, d)| {
                let ip = self.clusterset_ips.get(&k).copied();
                services::merge(&cn(LOCAL), d, ip).map(|m| (k, m))
            })
            .collect()
    }

    fn counts(&self) -> BTreeMap<(ClusterName, StateKind), usize> {
        let mut out = BTreeMap::new();
        for (c, entries) in &self.entries {
            for k in entries.keys() {
                *out.entry((c.clone(), k.kind())).or_default() += 1;
            }
        }
        out
    }
}

/// Drops clusters that no longer claim a key; appends those that newly do.
fn update_order<K: Ord + Copy, V>(
    order: &mut BTreeMap<K, Vec<ClusterName>>,
    claims: &BTreeMap<K, BTreeMap<ClusterName, V>>,
) {
    order.retain(|k, list| {
        list.retain(|c| claims.get(k).is_some_and(|m| m.contains_key(c)));
        !list.is_empty()
    });
    for (k, m) in claims {
        let list = order.entry(*k).or_default();
        for c in m.keys() {
            if !list.contains(c) {
                list.push(c.clone());
            }
        }
    }
}

/// (key, winner, loser) triples.
type Contests<K> = BTreeSet<(K, ClusterName, ClusterName)>;

/// Winner: the local cluster if it claims, else the first admitted claimant.
fn winners<K: Ord + Copy, V: Clone>(
    order: &BTreeMap<K, Vec<ClusterName>>,
    claims: &BTreeMap<K, BTreeMap<ClusterName, V>>,
) -> (BTreeMap<K, ClusterEntry<V>>, Contests<K>) {
    let mut won = BTreeMap::new();
    let mut lost = BTreeSet::new();
    for (k, m) in claims {
        let local = cn(LOCAL);
        let winner = if m.contains_key(&local) {
            local
        } else {
            order[k][0].clone()
        };
        for c in m.keys().filter(|c| **c != winner) {
            lost.insert((*k, winner.clone(), c.clone()));
        }
        won.insert(
            *k,
            ClusterEntry {
                value: m[&winner].clone(),
                cluster: winner,
            },
        );
    }
    (won, lost)
}

fn unwrap_map<K: Ord + Clone, V: Clone>(m: &BTreeMap<K, Arc<V>>) -> BTreeMap<K, V> {
    m.iter().map(|(k, v)| (k.clone(), (**v).clone())).collect()
}

fn check(view: &MergedView, model: &Model, ctx: &str) {
    let ip_claims = model.ip_claims();
    let (ips, collisions) = winners(&model.ip_order, &ip_claims);
    assert_eq!(unwrap_map(&view.ipcache().entries), ips, "ipcache {ctx}");
    let got: BTreeSet<_> = view
        .collisions()
        .into_iter()
        .map(|c| (c.ip, c.winner, c.loser))
        .collect();
    assert_eq!(got, collisions, "collisions {ctx}");

    let id_claims = model.id_claims();
    let (ids, conflicts) = winners(&model.id_order, &id_claims);
    assert_eq!(
        unwrap_map(&view.identities().entries),
        ids,
        "identities {ctx}"
    );
    let got: BTreeSet<_> = view
        .identity_conflicts()
        .into_iter()
        .map(|c| (c.identity, c.winner, c.loser))
        .collect();
    assert_eq!(got, conflicts, "identity conflicts {ctx}");

    let nodes: BTreeMap<_, _> = model
        .entries
        .iter()
        .flat_map(|(c, e)| e.values().map(move |v| (c, v)))
        .filter_map(|(c, v)| match v {
            StateValue::Node(n) => Some(((c.clone(), n.name.clone()), n.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(unwrap_map(&view.nodes().entries), nodes, "nodes {ctx}");

    let services = model.services();
    assert_eq!(
        unwrap_map(&view.services().entries),
        services,
        "services {ctx}"
    );
    // Independent of the merge code: which services exist and whose backends they use.
    for (k, s) in &services {
        let defs: Vec<&ClusterService> = model
            .entries
            .values()
            .flat_map(|e| e.values())
            .filter_map(|v| match v {
                StateValue::Service(d) if d.namespace == k.namespace && d.name == k.name => Some(d),
                _ => None,
            })
            .collect();
        assert!(
            defs.iter().any(|d| d.global),
            "{k} without a global definition {ctx}"
        );
        let contributing: usize = defs
            .iter()
            .filter(|d| d.global && (d.cluster.as_str() == LOCAL || d.shared))
            .map(|d| d.backends.len())
            .sum();
        assert_eq!(s.backends.len(), contributing, "{k} backends {ctx}");
        assert!(s.active().all(|b| b.ready), "{k} active not ready {ctx}");
    }
    let conflicts: usize = services.values().map(|s| s.conflicts.len()).sum();
    assert_eq!(view.conflicts().len(), conflicts, "conflicts {ctx}");

    let mut counts = view.counts();
    counts.retain(|_, n| *n > 0);
    assert_eq!(counts, model.counts(), "counts {ctx}");
}

fn random_event(r: &mut Rng, north_id: &mut u32) -> Option<ClusterEvent> {
    let (name, nominal) = r.pick(&CLUSTERS);
    let cluster = cn(name);
    let kind = r.pick(&StateKind::ALL);
    let roll = r.below(100);
    Some(match roll {
        0..40 => apply(name, random_value(r, name, nominal)),
        40..52 => ClusterEvent::Delete {
            key: random_key(r, &cluster, nominal),
            cluster,
        },
        52..61 => ClusterEvent::Init { cluster, kind },
        61..70 => ClusterEvent::InitDone { cluster, kind },
        70..72 => ClusterEvent::Drain { cluster },
        72..77 => {
            let id = if name == "north" {
                if r.chance(30) {
                    *north_id = 5 - *north_id;
                }
                *north_id
            } else {
                nominal
            };
            ClusterEvent::Config {
                config: config(name, id),
                cluster,
            }
        }
        77..79 => {
            // A peer speaking for another cluster: refused by the view.
            let (other, other_id) = r.pick(&CLUSTERS);
            let value = random_value(r, other, other_id).0;
            let other = cn(other);
            if other == cluster {
                return None;
            }
            ClusterEvent::Apply {
                key: key_of(&other, &value),
                cluster,
                value,
            }
        }
        _ => return None,
    })
}

#[test]
fn random_streams_match_naive_recomputation() {
    for seed in 1..=24u64 {
        let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut view = MergedView::new(cn(LOCAL));
        let mut model = Model::default();
        let mut north_id = 2;
        let (mut saw_conflict, mut saw_three) = (false, false);
        let services_rx = view.subscribe_services();
        let ipcache_rx = view.subscribe_ipcache();
        for (name, id) in CLUSTERS {
            let ev = ClusterEvent::Config {
                cluster: cn(name),
                config: config(name, id),
            };
            model.apply(&ev);
            view.apply(ev);
        }
        for step in 0..1500 {
            let ctx = format!("(seed {seed}, step {step})");
            if r.chance(3) {
                let k = ServiceKey::new("default", r.pick(&SERVICES));
                let ip = r
                    .chance(70)
                    .then(|| ip(r.pick(&["198.19.0.1", "198.19.0.2"])));
                view.set_clusterset_ip(&k.namespace, &k.name, ip);
                match ip {
                    Some(ip) => model.clusterset_ips.insert(k, ip),
                    None => model.clusterset_ips.remove(&k),
                };
            } else if let Some(ev) = random_event(&mut r, &mut north_id) {
                model.apply(&ev);
                view.apply(ev);
            } else {
                view.publish();
                assert!(!view.has_unpublished());
                assert_eq!(
                    unwrap_map(&services_rx.borrow().entries),
                    unwrap_map(&view.services().entries),
                    "published services {ctx}"
                );
                assert_eq!(
                    unwrap_map(&ipcache_rx.borrow().entries),
                    unwrap_map(&view.ipcache().entries),
                    "published ipcache {ctx}"
                );
            }
            check(&view, &model, &ctx);
            saw_conflict |= !view.conflicts().is_empty();
            saw_three |= view
                .services()
                .entries
                .values()
                .any(|s| s.clusters.len() == 3 && !s.active_backends.is_empty());
        }
        // The streams exercised what they are meant to.
        assert!(view.collisions_total() > 0, "seed {seed}: no collision");
        assert!(!view.rejected().is_empty(), "seed {seed}: nothing rejected");
        assert!(
            view.identity_conflicts_total() > 0,
            "seed {seed}: no identity conflict"
        );
        assert!(saw_conflict, "seed {seed}: no service conflict");
        assert!(saw_three, "seed {seed}: no service merged from 3 clusters");
    }
}
