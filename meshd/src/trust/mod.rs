//! Trust boundaries: a peer speaks only for itself, within its quotas.
//!
//! ```text
//!  supervisors (local + peers) ── ClusterEvent ──► PeerGuard::apply ──► consumers
//!  (guard.rs: the books; judge.rs: the rules for one entry; ranges.rs: ownership)
//!       local cluster: passed through; its nodes' ranges are recorded     (merged view,
//!       peer: quota (entries per kind, bytes per value, total bytes)        kvstoremesh's
//!             ipcache entry: a host prefix on an address the peer owns      cache writer)
//!             service: backends the peer does not own are left out
//!             node: pod CIDRs / addresses not granted are left out
//!  batch end ──► PeerGuard::settle: ranges rebuilt (ranges.rs) when nodes or IDs
//!       changed; entries of clusters whose ranges changed are re-judged; held InitDones
//!       are released
//! ```
//!
//! Address ownership (see [`ranges`]): every cluster owns the pod CIDRs and addresses its
//! nodes advertise, claims taken local cluster first, then peers by ascending cluster
//! ID; a claim overlapping another cluster's granted range is refused as a whole and
//! reported as a [`RangeConflict`]. A peer's ipcache entry must be a host prefix (/32,
//! /128) on an address the peer owns; a claim on an address of the local cluster or of
//! another peer, on no one's address, or on a special address (unspecified, loopback,
//! multicast, link-local) is refused. Until the local cluster's and the peer's own nodes
//! have been listed, the peer's IPs and services are *pending* (held, not passed, not
//! counted as refused) and its `InitDone`s for them are held, so consumers never see a
//! partial judgement as complete.
//!
//! Quotas ([`PeerLimits`]): a new entry past its kind's limit, a value over the size
//! limit or a change past the total byte limit is refused and the peer is *degraded* for
//! that kind until a complete list fits again; what was admitted stays.
//!
//! Every refusal is counted by (peer, kind, reason) in [`crate::metrics::TrustMetrics`]
//! and logged once per key (quota refusals once as the peer becomes degraded).
//!
//! Memory: an admitted ipcache entry's value, and a service passed on whole, are moved
//! downstream, not copied; the guard keeps what judging needs (address and prefix length;
//! a service's backend addresses), sizes and stamps. Pending and refused entries, services
//! with backends left out, and nodes are kept whole. So an ipcache entry withdrawn because
//! its range went to another cluster, or a whole-passed service that loses a backend when
//! the peer's ranges shrink, cannot be redone from the guard: [`PeerGuard::take_relists`]
//! then names the peer, and the owner restarts that peer's supervisor (a relist; consumers
//! replace its entries wholesale). Ranges that only grow never cause a relist.

mod guard;
mod judge;
pub mod ranges;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;

pub use guard::PeerGuard;
pub use ranges::{CidrLimits, Ownership, RangeConflict, RangeRefusal};

use crate::keys::StateKind;
use crate::model::ClusterName;

/// Why a peer's entry (or part of one) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refusal {
    /// An ipcache prefix that is not a single address.
    PrefixNotHost,
    /// An address inside no range the peer's nodes advertise.
    AddressNotOwned,
    /// An address the local cluster owns.
    AddressOfLocal,
    /// An address another peer owns.
    AddressOfPeer,
    /// Unspecified, loopback, multicast, broadcast or link-local.
    SpecialAddress,
    /// A service backend on an address the peer does not own (the backend is left out).
    BackendNotOwned,
    /// A new entry past the kind's entry limit.
    QuotaEntries,
    /// A change past the peer's total byte limit.
    QuotaBytes,
    /// A value larger than the per-value limit.
    ValueTooLarge,
}

impl Refusal {
    /// Every reason.
    pub const ALL: [Self; 9] = [
        Self::PrefixNotHost,
        Self::AddressNotOwned,
        Self::AddressOfLocal,
        Self::AddressOfPeer,
        Self::SpecialAddress,
        Self::BackendNotOwned,
        Self::QuotaEntries,
        Self::QuotaBytes,
        Self::ValueTooLarge,
    ];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PrefixNotHost => "prefix-not-host",
            Self::AddressNotOwned => "address-not-owned",
            Self::AddressOfLocal => "address-of-local",
            Self::AddressOfPeer => "address-of-peer",
            Self::SpecialAddress => "special-address",
            Self::BackendNotOwned => "backend-not-owned",
            Self::QuotaEntries => "quota-entries",
            Self::QuotaBytes => "quota-bytes",
            Self::ValueTooLarge => "value-too-large",
        }
    }

    /// Whether the refusal is a quota's (the peer is degraded).
    pub fn is_quota(self) -> bool {
        matches!(
            self,
            Self::QuotaEntries | Self::QuotaBytes | Self::ValueTooLarge
        )
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Per-peer limits. The defaults fit a peer of 5,000 nodes and 500,000 pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerLimits {
    /// Identities per peer (a cluster's own range holds at most 65,280).
    pub max_identities: usize,
    /// ipcache entries per peer.
    pub max_ips: usize,
    /// Nodes per peer.
    pub max_nodes: usize,
    /// Services per peer.
    pub max_services: usize,
    /// Largest value accepted, in bytes of its JSON encoding.
    pub max_value_bytes: usize,
    /// Total bytes of a peer's values held at once.
    pub max_total_bytes: u64,
    /// Widest pod CIDR a node may advertise.
    pub cidr: CidrLimits,
}

impl Default for PeerLimits {
    /// 65,536 identities, 1,000,000 IPs, 10,000 nodes, 50,000 services, 1 MiB per value
    /// (etcd refuses requests over 1.5 MiB by default), 512 MiB in all, pod CIDRs no
    /// wider than /16 (IPv4) and /48 (IPv6).
    fn default() -> Self {
        Self {
            max_identities: 65_536,
            max_ips: 1_000_000,
            max_nodes: 10_000,
            max_services: 50_000,
            max_value_bytes: 1 << 20,
            max_total_bytes: 512 << 20,
            cidr: CidrLimits::default(),
        }
    }
}

impl PeerLimits {
    /// The entry limit of `kind`.
    pub fn max_entries(&self, kind: StateKind) -> usize {
        match kind {
            StateKind::Identities => self.max_identities,
            StateKind::Ip => self.max_ips,
            StateKind::Nodes => self.max_nodes,
            StateKind::Services => self.max_services,
        }
    }
}

/// What the guard holds and refused of one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTrust {
    /// The peer.
    pub cluster: ClusterName,
    /// Kinds over quota (their excess refused).
    pub degraded: Vec<StateKind>,
    /// Refusals since the peer was first seen, by reason.
    pub refused: BTreeMap<Refusal, u64>,
    /// Entries held per kind (admitted, pending and refused-but-kept).
    pub entries: BTreeMap<StateKind, usize>,
    /// Bytes of the values held.
    pub bytes: u64,
    /// IPs and services waiting for the ranges they are judged against.
    pub pending: usize,
    /// The local cluster's or the peer's nodes have not been listed yet.
    pub waiting_for_ranges: bool,
    /// Range claims refused where this peer is the claimant or the holder.
    pub conflicts: Vec<RangeConflict>,
}
