//! Identity-based policy: `MeshNetworkPolicy` specs + identities → per-endpoint allow entries.
//!
//! ```text
//!  MeshNetworkPolicy ──validate + compile (scoping, entities, port expansion)──┐
//!                                                                             ▼
//!  identities (local + remote) ──► SelectorCache: distinct selector → matching identities
//!     upsert/remove                 (label-indexed: an event evaluates only candidate selectors)
//!                                                                             │ users of a selector
//!  local endpoints (id, identity) ─► PolicyEngine: per local identity, refcounted entries
//!                                    (peer, port, proto, direction) ─► net PolicyDiffs per endpoint
//!                                                                             │
//!                     agent syncer: PolicyDiff → datapath Change::{UpsertPolicy, DeletePolicy,
//!                                   UpsertEndpoint{enforce_*}}     meshctl: PolicyEngine::trace
//! ```
//!
//! The engine is a synchronous single-writer struct (no locks, no `.await`): the agent feeds
//! it from the merged view's identity snapshots ([`PolicyEngine::sync_identities`]), the
//! local policies and the local endpoints, then drains [`PolicyDiff`]s into the datapath.
//! `meshctl policy trace` builds one from the same inputs and calls [`PolicyEngine::trace`].
//!
//! # Semantics
//!
//! - A policy selects the endpoints of **its namespace in the local cluster** that match
//!   `endpointSelector` (`{}` selects the whole namespace).
//! - An endpoint selected by at least one policy whose `ingress` field is present is
//!   **default-deny for ingress** (same for egress). `ingress: []` therefore denies all
//!   ingress. Directions without rules stay open. Rules are **additive** allow-lists; there
//!   are no deny rules.
//! - A peer selector (`fromEndpoints`/`toEndpoints`) matches in the **policy's namespace**
//!   unless it names `io.kubernetes.pod.namespace` (any source, in `matchLabels` or
//!   `matchExpressions`), and in the **local cluster only** unless it names
//!   `io.meshd.cluster`. `{}` therefore means "every endpoint of this namespace, this cluster".
//! - Entities: `world`, `host`, `remote-node` are the reserved identities 2, 1, 6;
//!   `cluster` is every identity whose `mesh:io.meshd.cluster` is the local cluster plus the
//!   local reserved identities host, unmanaged, health, init and kube-apiserver; `all` is the
//!   datapath's wildcard identity 0 (everything, known or not).
//! - A rule with `toPorts` but no peers allows those ports from/to **any** peer (identity 0);
//!   a rule with peers but no `toPorts` allows every port and protocol. An empty rule is
//!   rejected (Kubernetes and Cilium disagree on what it means).
//! - Reserved identities are matched by selectors through their `reserved:<name>` label,
//!   like any other identity (the engine seeds them).
//! - An invalid policy is rejected as a whole; the previously valid version with the same
//!   namespace/name stays in force ([`PolicyEngine::rejected`] says why).
//!
//! # Entries and the datapath
//!
//! One [`PolicyEntry`] = `(endpoint, peer identity, port, proto, direction)` allow, which
//! maps one-to-one onto the datapath's `PolicyRule { endpoint_id, identity, port, proto,
//! direction }` with `Verdict::Allow` (identity 0, port 0, proto 0 are wildcards, exactly as
//! the tc program looks them up: `(port, proto)`, then `(0, proto)`, then `(0, 0)`, first
//! with the peer's identity, then with identity 0). Hence:
//! - no `toPorts` → one entry `(port 0, proto 0)`;
//! - `port` with protocol `TCP`/`UDP`/`SCTP` → `(port, 6|17|132)`;
//! - `port` with `ANY` → three entries `(port, 6)`, `(port, 17)`, `(port, 132)` — the
//!   datapath never looks up `(port, 0)`;
//! - `port`..`endPort` → one entry per port (per protocol); validation caps a range at
//!   [`crate::model::MAX_PORT_RANGE`] ports, except `1-65535`, which becomes port 0.
//!
//! Entries are reference-counted per local identity (two rules allowing the same thing
//! make one entry) and fanned out to every endpoint with that identity; only net changes
//! leave the engine. [`PolicyDiff::Enforcement`] carries the endpoint's default-deny flags
//! (the datapath's `Endpoint::{enforce_ingress, enforce_egress}`); a new endpoint starts at
//! `(false, false)` and gets a diff only when that differs; a removed (or moved) endpoint
//! gets a `Revoke` per entry and, if it was enforcing, `Enforcement { false, false }`.

mod cache;
mod compile;
#[cfg(test)]
mod crd_tests;
mod engine;
pub mod reference;
mod trace;

use std::fmt;

use crate::model::{
    Identity, Label, LabelSource, Labels, PolicyProtocol, PolicyValidationError, ReservedIdentity,
};

pub use engine::{PolicyEngine, PolicyStats};
pub use reference::PolicyState;
pub use trace::{DirectionTrace, Trace, TraceDecision, trace_mesh};

/// Errors of the policy engine. Retrying never helps: the input is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The policy failed validation; the previous valid version (if any) stays in force.
    #[error("policy rejected")]
    Invalid(#[from] PolicyValidationError),
    /// Reserved identities are built in and never come from a cluster.
    #[error("identity {0} is reserved: reserved identities are built into the engine")]
    ReservedIdentity(Identity),
}

/// `namespace/name` of a policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl PolicyRef {
    /// Builds a reference.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The datapath's id of a local endpoint (the `endpoint_id` its policy entries name). The
/// agent assigns it (one per pod/IP) and registers it with its identity via
/// [`PolicyEngine::upsert_endpoint`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId(pub u32);

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Policy direction, from the local endpoint's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Traffic to the endpoint.
    Ingress,
    /// Traffic from the endpoint.
    Egress,
}

impl Direction {
    /// Both directions, ingress first.
    pub const BOTH: [Self; 2] = [Self::Ingress, Self::Egress];

    /// `"ingress"` or `"egress"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Self::Ingress => 0,
            Self::Egress => 1,
        }
    }
}

/// The remote side of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    /// Any identity (the datapath's identity 0).
    Any,
    /// One identity (local, remote or reserved).
    Identity(Identity),
}

impl Peer {
    /// The datapath value: 0 for any.
    pub fn raw(self) -> u32 {
        match self {
            Self::Any => 0,
            Self::Identity(i) => i.get(),
        }
    }

    fn from_raw(raw: u32) -> Self {
        Identity::from_raw(raw).map_or(Self::Any, Self::Identity)
    }
}

/// One allow entry of a local endpoint; maps 1:1 onto the datapath's `PolicyRule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyEntry {
    /// The local endpoint.
    pub endpoint: EndpointId,
    /// The peer identity (0 = any).
    pub peer: Peer,
    /// Destination port, host order; 0 = any.
    pub port: u16,
    /// IANA protocol number (6 TCP, 17 UDP, 132 SCTP); 0 = any.
    pub proto: u8,
    /// Direction.
    pub direction: Direction,
}

/// A net change the engine asks of the datapath.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyDiff {
    /// Add the entry (`Change::UpsertPolicy { verdict: Allow, .. }`).
    Allow(PolicyEntry),
    /// Remove the entry (`Change::DeletePolicy`).
    Revoke(PolicyEntry),
    /// The endpoint's default-deny flags changed (`Endpoint::enforce_*`).
    Enforcement {
        /// The endpoint.
        endpoint: EndpointId,
        /// Default-deny ingress.
        ingress: bool,
        /// Default-deny egress.
        egress: bool,
    },
}

/// A concrete transport protocol (what a trace asks about).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TransportProtocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl TransportProtocol {
    /// IANA number.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => PolicyProtocol::Tcp.number(),
            Self::Udp => PolicyProtocol::Udp.number(),
            Self::Sctp => PolicyProtocol::Sctp.number(),
        }
    }

    /// Parses `TCP`/`UDP`/`SCTP` (any case).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_uppercase().as_str() {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }
}

/// The label set of a reserved identity (`reserved:<name>`), as the engine seeds it and as
/// a trace names, e.g., the world.
pub fn reserved_labels(r: ReservedIdentity) -> Labels {
    Labels::new(vec![Label {
        source: LabelSource::Reserved,
        key: r.name().to_owned(),
        value: String::new(),
    }])
    .expect("one label is a valid set")
}

/// Packs an entry key (peer, port, proto, direction) into a u64 for cheap hashing.
pub(crate) fn pack(peer: u32, port: u16, proto: u8, dir: Direction) -> u64 {
    u64::from(peer) << 32 | u64::from(port) << 16 | u64::from(proto) << 8 | dir.index() as u64
}

/// The inverse of [`pack`], naming `endpoint`.
pub(crate) fn unpack(endpoint: EndpointId, key: u64) -> PolicyEntry {
    PolicyEntry {
        endpoint,
        peer: Peer::from_raw((key >> 32) as u32),
        port: (key >> 16) as u16,
        proto: (key >> 8) as u8,
        direction: if key & 1 == 0 {
            Direction::Ingress
        } else {
            Direction::Egress
        },
    }
}
