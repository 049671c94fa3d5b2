//! Address ownership: which cluster owns which address, from the pod CIDRs and addresses
//! every cluster's nodes advertise, with contested ranges resolved by one rule.
//!
//! Claims are taken in the priority order the caller gives (the guard: the local cluster
//! first, then peers' claims by when they were first seen, then by cluster ID), and a
//! claim that overlaps a range already granted to *another* cluster is refused as a
//! whole (a conflict, reported with both parties).
//! Overlaps within one cluster are fine. The granted ranges are kept as disjoint
//! intervals per address family, so an owner lookup is one binary search.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::{ClusterName, Node};

/// Why a claimed range or address was not granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RangeRefusal {
    /// Overlaps a range granted to another cluster (local cluster or a peer with a lower ID).
    Conflict,
    /// A pod CIDR wider than the limit (`/16` IPv4, `/48` IPv6 by default).
    TooWide,
    /// Unspecified, loopback, multicast, broadcast or link-local.
    Special,
}

impl RangeRefusal {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Conflict => "cidr-conflict",
            Self::TooWide => "cidr-too-wide",
            Self::Special => "special-address",
        }
    }
}

/// A claim that was not granted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RangeConflict {
    /// The range claimed (a node address as a host prefix).
    pub range: IpNet,
    /// Who claimed it.
    pub claimant: ClusterName,
    /// The node that advertised it.
    pub node: String,
    /// Why it was refused.
    pub reason: RangeRefusal,
    /// For a conflict: the cluster holding an overlapping range.
    pub holder: Option<ClusterName>,
}

impl fmt::Display for RangeConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of {}/{} refused ({})",
            self.range,
            self.claimant,
            self.node,
            self.reason.as_str()
        )?;
        if let Some(h) = &self.holder {
            write!(f, ": overlaps a range of {h}")?;
        }
        Ok(())
    }
}

/// How an address is owned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnedAs {
    /// Inside a pod CIDR of one of the owner's nodes.
    Pod,
    /// One of the owner's node addresses.
    Node,
}

/// The narrowest pod CIDRs a node may advertise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CidrLimits {
    /// Shortest IPv4 prefix length accepted for a pod CIDR.
    pub min_prefix_v4: u8,
    /// Shortest IPv6 prefix length accepted for a pod CIDR.
    pub min_prefix_v6: u8,
}

impl Default for CidrLimits {
    /// `/16` for IPv4 (65,536 pod addresses per node) and `/48` for IPv6.
    fn default() -> Self {
        Self {
            min_prefix_v4: 16,
            min_prefix_v6: 48,
        }
    }
}

/// Interval key: (family, first address).
type Start = (u8, u128);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Granted {
    end: u128,
    owner: usize,
    as_node: bool,
}

/// Who owns which addresses. Built with [`Ownership::build`]; see the module doc.
#[derive(Debug, Default, Clone)]
pub struct Ownership {
    owners: Vec<ClusterName>,
    intervals: BTreeMap<Start, Granted>,
    conflicts: Vec<RangeConflict>,
}

/// One range a node advertises: a pod CIDR, or one of its addresses as a host prefix.
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    /// The claiming cluster.
    pub cluster: &'a ClusterName,
    /// The node advertising it.
    pub node: &'a str,
    /// The range (a pod CIDR truncated to its network, or an address's host prefix).
    pub range: IpNet,
    /// A node address rather than a pod CIDR.
    pub is_address: bool,
}

/// Every range `node` claims.
pub fn claims_of(node: &Node) -> impl Iterator<Item = Claim<'_>> {
    let cidrs = node.pod_cidrs.iter().map(move |c| Claim {
        cluster: &node.cluster,
        node: &node.name,
        range: c.trunc(),
        is_address: false,
    });
    let addresses = node.addresses.iter().map(move |a| Claim {
        cluster: &node.cluster,
        node: &node.name,
        range: IpNet::from(a.ip),
        is_address: true,
    });
    cidrs.chain(addresses)
}

fn bounds(net: &IpNet) -> (Start, u128) {
    match net {
        IpNet::V4(n) => (
            (4, u128::from(u32::from(n.network()))),
            u128::from(u32::from(n.broadcast())),
        ),
        IpNet::V6(n) => ((6, u128::from(n.network())), u128::from(n.broadcast())),
    }
}

fn point(ip: IpAddr) -> Start {
    match ip {
        IpAddr::V4(v4) => (4, u128::from(u32::from(v4))),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => (4, u128::from(u32::from(v4))),
            None => (6, u128::from(v6)),
        },
    }
}

/// Whether an address can never be an endpoint's or a node's own.
pub fn is_special(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_link_local()
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_special(IpAddr::V4(v4)),
            None => {
                v6.is_unspecified()
                    || v6.is_loopback()
                    || v6.is_multicast()
                    || v6.is_unicast_link_local()
            }
        },
    }
}

impl Ownership {
    /// Grants `claims`, taken in the order given (the guard orders them: the local
    /// cluster's first, then peers' by when the claim was first seen, then by cluster ID).
    pub fn build<'a>(claims: impl IntoIterator<Item = Claim<'a>>, limits: CidrLimits) -> Self {
        let mut o = Self::default();
        let mut index: std::collections::HashMap<&ClusterName, usize> = Default::default();
        for c in claims {
            let idx = *index.entry(c.cluster).or_insert_with(|| {
                o.owners.push(c.cluster.clone());
                o.owners.len() - 1
            });
            let min = match c.range {
                IpNet::V4(_) => limits.min_prefix_v4,
                IpNet::V6(_) => limits.min_prefix_v6,
            };
            if c.is_address {
                if is_special(c.range.addr()) {
                    o.refuse(c.range, idx, c.node, RangeRefusal::Special, None);
                } else {
                    o.grant(c.range, idx, c.node, true);
                }
            } else if c.range.prefix_len() < min {
                o.refuse(c.range, idx, c.node, RangeRefusal::TooWide, None);
            } else if is_special(c.range.network()) || is_special(c.range.broadcast()) {
                o.refuse(c.range, idx, c.node, RangeRefusal::Special, None);
            } else {
                o.grant(c.range, idx, c.node, false);
            }
        }
        o.conflicts.sort();
        o.conflicts.dedup();
        o
    }

    fn refuse(
        &mut self,
        range: IpNet,
        idx: usize,
        node: &str,
        reason: RangeRefusal,
        holder: Option<usize>,
    ) {
        self.conflicts.push(RangeConflict {
            range,
            claimant: self.owners[idx].clone(),
            node: node.to_owned(),
            reason,
            holder: holder.map(|h| self.owners[h].clone()),
        });
    }

    /// Grants `net` to `idx` unless it overlaps another owner's interval; merges it with
    /// the owner's own overlapping intervals.
    fn grant(&mut self, net: IpNet, idx: usize, node: &str, as_node: bool) {
        let (start, end) = bounds(&net);
        let fam = start.0;
        // Intervals are disjoint: walk back from the last one starting at or before `end`.
        let mut overlapping = Vec::new();
        for (s, g) in self.intervals.range((fam, 0)..=(fam, end)).rev() {
            if g.end < start.1 {
                break;
            }
            if g.owner != idx {
                let holder = g.owner;
                self.refuse(net, idx, node, RangeRefusal::Conflict, Some(holder));
                return;
            }
            overlapping.push((*s, *g));
        }
        if overlapping.is_empty() {
            self.intervals.insert(
                start,
                Granted {
                    end,
                    owner: idx,
                    as_node,
                },
            );
            return;
        }
        // Same owner: widen. A node address inside the owner's pod CIDR stays "pod".
        let mut lo = start.1;
        let mut hi = end;
        let mut node_only = as_node;
        for (s, g) in overlapping {
            self.intervals.remove(&s);
            lo = lo.min(s.1);
            hi = hi.max(g.end);
            node_only &= g.as_node;
        }
        self.intervals.insert(
            (fam, lo),
            Granted {
                end: hi,
                owner: idx,
                as_node: node_only,
            },
        );
    }

    /// The cluster owning `ip`, if any.
    pub fn owner(&self, ip: IpAddr) -> Option<(&ClusterName, OwnedAs)> {
        let p = point(ip);
        let (_, g) = self.intervals.range((p.0, 0)..=p).next_back()?;
        (g.end >= p.1).then(|| {
            (
                &self.owners[g.owner],
                if g.as_node {
                    OwnedAs::Node
                } else {
                    OwnedAs::Pod
                },
            )
        })
    }

    /// Claims that were not granted, sorted.
    pub fn conflicts(&self) -> &[RangeConflict] {
        &self.conflicts
    }

    /// The intervals granted to each cluster as `(family, first, last)`, sorted, adjacent
    /// and overlapping ones merged (one pass), for finding the clusters whose ranges
    /// changed, and whether they only grew, between two builds.
    pub fn granted(&self) -> std::collections::HashMap<ClusterName, Vec<(u8, u128, u128)>> {
        let mut per: Vec<Vec<(u8, u128, u128)>> = self.owners.iter().map(|_| Vec::new()).collect();
        for (s, g) in &self.intervals {
            let list = &mut per[g.owner];
            match list.last_mut() {
                Some(last) if last.0 == s.0 && last.2.checked_add(1) == Some(s.1) => {
                    last.2 = g.end;
                }
                _ => list.push((s.0, s.1, g.end)),
            }
        }
        self.owners.iter().cloned().zip(per).collect()
    }
}

/// Whether every interval of `old` lies inside one interval of `new` (both as
/// [`Ownership::granted`] returns them): the ranges only grew.
pub fn covers(new: &[(u8, u128, u128)], old: &[(u8, u128, u128)]) -> bool {
    old.iter().all(|&(f, s, e)| {
        let i = new.partition_point(|&(nf, ns, _)| (nf, ns) <= (f, s));
        i > 0 && {
            let (nf, _, ne) = new[i - 1];
            nf == f && ne >= e
        }
    })
}
