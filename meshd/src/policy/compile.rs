//! Compiling a validated policy: scoped selectors, entities as selectors, expanded ports.

use crate::model::{
    CLUSTER_LABEL, ClusterName, Entity, LabelSelector, MeshNetworkPolicy, NAMESPACE_LABEL,
    PortRule, ReservedIdentity,
};

use super::Direction;

/// Where a compiled peer came from (for traces).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PeerOrigin {
    /// `fromEndpoints[i]` / `toEndpoints[i]`.
    Endpoints(usize),
    /// `fromEntities[i]` / `toEntities[i]`.
    Entity(usize, Entity),
    /// The rule names no peer: any peer.
    Implicit,
}

/// A peer of a rule before it is registered with the selector cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PeerSpec {
    /// The wildcard identity.
    Any,
    /// Identities matching a (scoped) selector.
    Selector(LabelSelector),
}

/// One rule, compiled.
#[derive(Debug, Clone)]
pub(crate) struct RuleSpec {
    /// Peers, with where each came from.
    pub(crate) peers: Vec<(PeerSpec, PeerOrigin)>,
    /// Expanded `(port, proto)` pairs (0 = any); never empty.
    pub(crate) ports: Vec<(u16, u8)>,
}

/// A policy, compiled for one local cluster.
#[derive(Debug, Clone)]
pub(crate) struct CompiledSpec {
    /// Which local endpoints the policy selects.
    pub(crate) subject: LabelSelector,
    /// Rules per direction (`Direction::index`); `Some` makes the direction default-deny.
    pub(crate) dirs: [Option<Vec<RuleSpec>>; 2],
}

fn ns_key() -> String {
    format!("k8s:{NAMESPACE_LABEL}")
}

fn cluster_key() -> String {
    format!("mesh:{CLUSTER_LABEL}")
}

/// Sorts expressions and their values so equal selectors share one cache entry.
pub(crate) fn normalize(mut s: LabelSelector) -> LabelSelector {
    for e in &mut s.match_expressions {
        e.values.sort();
        e.values.dedup();
    }
    s.match_expressions.sort();
    s.match_expressions.dedup();
    s
}

/// The selector of a reserved identity (`reserved:<name>` present).
fn reserved_selector(r: ReservedIdentity) -> LabelSelector {
    let mut s = LabelSelector::default();
    s.match_labels
        .insert(format!("reserved:{}", r.name()), String::new());
    s
}

/// An entity as peers.
pub(crate) fn entity_peers(e: Entity, local: &ClusterName) -> Vec<PeerSpec> {
    match e {
        Entity::All => vec![PeerSpec::Any],
        Entity::World => vec![PeerSpec::Selector(reserved_selector(
            ReservedIdentity::World,
        ))],
        Entity::Host => vec![PeerSpec::Selector(reserved_selector(
            ReservedIdentity::Host,
        ))],
        Entity::RemoteNode => vec![PeerSpec::Selector(reserved_selector(
            ReservedIdentity::RemoteNode,
        ))],
        Entity::Cluster => {
            let mut local_sel = LabelSelector::default();
            local_sel
                .match_labels
                .insert(cluster_key(), local.as_str().to_owned());
            let mut v = vec![PeerSpec::Selector(local_sel)];
            v.extend(
                [
                    ReservedIdentity::Host,
                    ReservedIdentity::Unmanaged,
                    ReservedIdentity::Health,
                    ReservedIdentity::Init,
                    ReservedIdentity::KubeApiserver,
                ]
                .into_iter()
                .map(|r| PeerSpec::Selector(reserved_selector(r))),
            );
            v
        }
    }
}

/// A peer selector scoped to the policy's namespace and the local cluster unless it names
/// the namespace or cluster label.
pub(crate) fn scope_peer(
    sel: &LabelSelector,
    namespace: &str,
    local: &ClusterName,
) -> LabelSelector {
    let mut s = sel.clone();
    if !s.mentions(NAMESPACE_LABEL) {
        s.match_labels.insert(ns_key(), namespace.to_owned());
    }
    if !s.mentions(CLUSTER_LABEL) {
        s.match_labels
            .insert(cluster_key(), local.as_str().to_owned());
    }
    normalize(s)
}

/// The endpoint selector, always within the policy's namespace and the local cluster.
pub(crate) fn scope_subject(
    sel: &LabelSelector,
    namespace: &str,
    local: &ClusterName,
) -> LabelSelector {
    let mut s = sel.clone();
    s.match_labels.insert(ns_key(), namespace.to_owned());
    s.match_labels
        .insert(cluster_key(), local.as_str().to_owned());
    normalize(s)
}

/// Expands port rules into datapath `(port, proto)` pairs (see the module docs).
pub(crate) fn expand_ports(ports: &[PortRule]) -> Vec<(u16, u8)> {
    if ports.is_empty() {
        return vec![(0, 0)];
    }
    let mut out = Vec::new();
    for p in ports {
        let protos: &[u8] = match p.protocol.number() {
            0 => &[6, 17, 132],
            n => &[n][..],
        };
        if p.is_all_ports() {
            let proto = p.protocol.number();
            out.push((0, proto));
            continue;
        }
        for port in p.range() {
            for &proto in protos {
                out.push((port, proto));
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

fn rule(
    namespace: &str,
    local: &ClusterName,
    selectors: &[LabelSelector],
    entities: &[Entity],
    ports: &[PortRule],
) -> RuleSpec {
    let mut peers = Vec::new();
    for (i, s) in selectors.iter().enumerate() {
        peers.push((
            PeerSpec::Selector(scope_peer(s, namespace, local)),
            PeerOrigin::Endpoints(i),
        ));
    }
    for (i, e) in entities.iter().enumerate() {
        for p in entity_peers(*e, local) {
            peers.push((p, PeerOrigin::Entity(i, *e)));
        }
    }
    if peers.is_empty() {
        peers.push((PeerSpec::Any, PeerOrigin::Implicit));
    }
    RuleSpec {
        peers,
        ports: expand_ports(ports),
    }
}

/// Compiles a policy that passed [`MeshNetworkPolicy::validate`].
pub(crate) fn compile(p: &MeshNetworkPolicy, local: &ClusterName) -> CompiledSpec {
    let ns = p.namespace.as_str();
    let ingress = p.spec.ingress.as_ref().map(|rules| {
        rules
            .iter()
            .map(|r| rule(ns, local, &r.from_endpoints, &r.from_entities, &r.to_ports))
            .collect()
    });
    let egress = p.spec.egress.as_ref().map(|rules| {
        rules
            .iter()
            .map(|r| rule(ns, local, &r.to_endpoints, &r.to_entities, &r.to_ports))
            .collect()
    });
    CompiledSpec {
        subject: scope_subject(&p.spec.endpoint_selector, ns, local),
        dirs: [ingress, egress],
    }
}

/// The field name of a peer in a rule of `dir` (for traces and status).
pub(crate) fn peer_field(dir: Direction, origin: PeerOrigin) -> String {
    let (eps, ents) = match dir {
        Direction::Ingress => ("fromEndpoints", "fromEntities"),
        Direction::Egress => ("toEndpoints", "toEntities"),
    };
    match origin {
        PeerOrigin::Endpoints(i) => format!("{eps}[{i}]"),
        PeerOrigin::Entity(i, e) => format!("{ents}[{i}] ({})", e.as_str()),
        PeerOrigin::Implicit => "any peer (the rule names none)".to_owned(),
    }
}
