//! `trace`: would the engine allow a flow, and which policy and rule decided it.
//!
//! A trace evaluates the same compiled policies and selectors the engine uses, on label
//! sets instead of identities, and matches ports exactly as the datapath looks them up
//! (`(port, proto)`, `(0, proto)`, `(0, 0)`), so its answer is the answer of the maps.

use std::fmt;

use crate::model::{ClusterName, Labels};

use super::compile::peer_field;
use super::engine::PeerRef;
use super::{Direction, PolicyEngine, PolicyRef, TransportProtocol};

/// What decided one direction of a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceDecision {
    /// The endpoint is not in this engine's cluster: its own cluster's agents decide.
    NotLocal,
    /// No policy with rules in this direction selects the endpoint: allowed.
    NoPolicy,
    /// Allowed by the first matching rule (policies by namespace/name, rules in order).
    Allowed {
        /// The policy.
        policy: PolicyRef,
        /// The rule, e.g. `ingress[1]`.
        rule: String,
        /// The peer that matched, e.g. `fromEndpoints[0]` or `fromEntities[0] (world)`.
        peer: String,
    },
    /// Selected by these policies (with rules in this direction), none of which allows it.
    DefaultDeny {
        /// The selecting policies.
        selected_by: Vec<PolicyRef>,
    },
}

/// One direction of a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectionTrace {
    /// Which direction (egress: at the source, ingress: at the destination).
    pub direction: Direction,
    /// The cluster whose engine answered.
    pub cluster: ClusterName,
    /// The decision.
    pub decision: TraceDecision,
}

impl DirectionTrace {
    /// Whether this direction lets the flow through (a non-local endpoint is not
    /// enforced here).
    pub fn allowed(&self) -> bool {
        !matches!(self.decision, TraceDecision::DefaultDeny { .. })
    }
}

/// A flow traced at both ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// At the source (its egress policies).
    pub egress: DirectionTrace,
    /// At the destination (its ingress policies).
    pub ingress: DirectionTrace,
}

impl Trace {
    /// Whether both ends let the flow through.
    pub fn allowed(&self) -> bool {
        self.egress.allowed() && self.ingress.allowed()
    }
}

impl fmt::Display for DirectionTrace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.direction.as_str();
        match &self.decision {
            TraceDecision::NotLocal => {
                write!(
                    f,
                    "{d}: not an endpoint of {}: not enforced there",
                    self.cluster
                )
            }
            TraceDecision::NoPolicy => {
                write!(f, "{d}: allowed: no policy selects the endpoint for {d}")
            }
            TraceDecision::Allowed { policy, rule, peer } => {
                write!(f, "{d}: allowed by {policy} {rule} ({peer})")
            }
            TraceDecision::DefaultDeny { selected_by } => {
                write!(f, "{d}: denied: default deny (selected by ")?;
                for (i, p) in selected_by.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{p}")?;
                }
                f.write_str("; no rule allows this peer and port)")
            }
        }
    }
}

impl fmt::Display for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", if self.allowed() { "ALLOWED" } else { "DENIED" })?;
        writeln!(f, "  {}", self.egress)?;
        write!(f, "  {}", self.ingress)
    }
}

/// Whether a rule's expanded ports admit `port/proto` the way the datapath looks it up.
fn port_matches(ports: &[(u16, u8)], port: u16, proto: u8) -> bool {
    ports
        .iter()
        .any(|&(p, pr)| (p == port && pr == proto) || (p == 0 && (pr == proto || pr == 0)))
}

impl PolicyEngine {
    /// Traces one direction at `endpoint` (which must carry this cluster's
    /// `mesh:io.meshd.cluster` label) for traffic with `peer` to/from `port/proto`.
    pub fn trace_direction(
        &self,
        endpoint: &Labels,
        peer: &Labels,
        direction: Direction,
        port: u16,
        proto: TransportProtocol,
    ) -> DirectionTrace {
        let decision = if endpoint.cluster() != Some(self.local_cluster().as_str()) {
            TraceDecision::NotLocal
        } else {
            self.decide(endpoint, peer, direction, port, proto.number())
        };
        DirectionTrace {
            direction,
            cluster: self.local_cluster().clone(),
            decision,
        }
    }

    fn decide(
        &self,
        endpoint: &Labels,
        peer: &Labels,
        direction: Direction,
        port: u16,
        proto: u8,
    ) -> TraceDecision {
        let d = direction.index();
        let cache = self.cache();
        let mut selected_by = Vec::new();
        for pol in self.compiled() {
            if !cache.entry(pol.subject).selector.matches(endpoint) {
                continue;
            }
            let Some(rules) = &pol.dirs[d] else { continue };
            selected_by.push(pol.key.clone());
            for (ri, r) in rules.iter().enumerate() {
                if !port_matches(&r.ports, port, proto) {
                    continue;
                }
                for (p, origin) in &r.peers {
                    let ok = match p {
                        PeerRef::Any => true,
                        PeerRef::Selector(s) => cache.entry(*s).selector.matches(peer),
                    };
                    if ok {
                        return TraceDecision::Allowed {
                            policy: pol.key.clone(),
                            rule: format!("{}[{ri}]", direction.as_str()),
                            peer: peer_field(direction, *origin),
                        };
                    }
                }
            }
        }
        if selected_by.is_empty() {
            TraceDecision::NoPolicy
        } else {
            TraceDecision::DefaultDeny { selected_by }
        }
    }

    /// Traces a flow `from` → `to` with this engine at both ends (an end outside this
    /// cluster is [`TraceDecision::NotLocal`]; use [`trace_mesh`] across clusters).
    pub fn trace(&self, from: &Labels, to: &Labels, port: u16, proto: TransportProtocol) -> Trace {
        Trace {
            egress: self.trace_direction(from, to, Direction::Egress, port, proto),
            ingress: self.trace_direction(to, from, Direction::Ingress, port, proto),
        }
    }
}

/// Traces a flow across clusters: egress by the engine of `from`'s cluster, ingress by the
/// engine of `to`'s cluster (`NotLocal` from the first engine when a cluster has none, e.g.
/// the world).
///
/// # Panics
/// If `engines` is empty.
pub fn trace_mesh(
    engines: &[&PolicyEngine],
    from: &Labels,
    to: &Labels,
    port: u16,
    proto: TransportProtocol,
) -> Trace {
    let pick = |l: &Labels| {
        engines
            .iter()
            .find(|e| Some(e.local_cluster().as_str()) == l.cluster())
            .unwrap_or(&engines[0])
    };
    Trace {
        egress: pick(from).trace_direction(from, to, Direction::Egress, port, proto),
        ingress: pick(to).trace_direction(to, from, Direction::Ingress, port, proto),
    }
}
