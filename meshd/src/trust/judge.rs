//! How the guard judges a peer's entries: host prefixes on owned addresses, backends the
//! peer owns, nodes without refused ranges, and value sizes for the quotas.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

use super::Refusal;
use super::guard::Verdict;
use super::ranges::{Ownership, is_special};
use crate::keys::StateValue;
use crate::model::{ClusterName, ClusterService, Node};

/// About the bytes `value` takes in etcd (its JSON encoding), estimated from its
/// variable-length parts plus a fixed allowance per field: within a small factor of the
/// encoding, without serializing (this runs for every peer event).
pub(super) fn encoded_len(value: &StateValue) -> usize {
    fn opt(s: &Option<String>) -> usize {
        s.as_ref().map_or(0, |s| s.len() + 12)
    }
    match value {
        StateValue::Identity(e) => {
            24 + e
                .labels
                .iter()
                .map(|l| l.key.len() + l.value.len() + 12)
                .sum::<usize>()
        }
        StateValue::Ip(e) => {
            96 + opt(&e.node)
                + opt(&e.namespace)
                + opt(&e.pod)
                + e.named_ports.keys().map(|k| k.len() + 36).sum::<usize>()
        }
        StateValue::Node(n) => {
            64 + n.name.len()
                + n.cluster.as_str().len()
                + 48 * (n.addresses.len() + n.pod_cidrs.len())
        }
        StateValue::Service(s) => {
            160 + s.cluster.as_str().len()
                + s.namespace.len()
                + s.name.len()
                + 44 * s.frontends.len()
                + s.ports.iter().map(|p| p.name.len() + 44).sum::<usize>()
                + s.backends
                    .values()
                    .map(|b| {
                        72 + opt(&b.hostname)
                            + opt(&b.node)
                            + opt(&b.zone)
                            + b.ports.iter().map(|p| p.name.len() + 44).sum::<usize>()
                    })
                    .sum::<usize>()
        }
    }
}

/// Judges a peer's ipcache entry: a host prefix on an address the peer owns.
pub(super) fn judge_ip(
    own: &Ownership,
    local: &ClusterName,
    cluster: &ClusterName,
    ip: IpAddr,
    prefix_len: u8,
) -> Verdict {
    let host = if ip.is_ipv4() { 32 } else { 128 };
    if prefix_len != host {
        return Verdict::Refused(Refusal::PrefixNotHost);
    }
    match address_check(own, local, cluster, ip) {
        Ok(()) => Verdict::Admitted,
        Err(r) => Verdict::Refused(r),
    }
}

/// Whether `cluster` owns `ip` (a pod address inside its granted pod CIDRs, or one of its
/// node addresses), and if not, why.
pub(super) fn address_check(
    own: &Ownership,
    local: &ClusterName,
    cluster: &ClusterName,
    ip: IpAddr,
) -> Result<(), Refusal> {
    if is_special(ip) {
        return Err(Refusal::SpecialAddress);
    }
    match own.owner(ip) {
        Some((owner, _)) if owner == cluster => Ok(()),
        Some((owner, _)) if owner == local => Err(Refusal::AddressOfLocal),
        Some(_) => Err(Refusal::AddressOfPeer),
        None => Err(Refusal::AddressNotOwned),
    }
}

/// The backends of `s` that `cluster` does not own.
pub(super) fn refused_backends(
    own: &Ownership,
    local: &ClusterName,
    cluster: &ClusterName,
    s: &ClusterService,
) -> BTreeSet<IpAddr> {
    s.backends
        .keys()
        .filter(|ip| address_check(own, local, cluster, **ip).is_err())
        .copied()
        .collect()
}

/// `node` without the ranges `refused` says were not granted.
pub(super) fn sanitize(node: &Node, refused: impl Fn(IpNet) -> bool) -> Node {
    let mut n = node.clone();
    n.pod_cidrs.retain(|c| !refused(c.trunc()));
    n.addresses.retain(|a| !refused(IpNet::from(a.ip)));
    n
}

/// `s` without the backends in `refused`.
pub(super) fn filtered(s: &ClusterService, refused: &BTreeSet<IpAddr>) -> ClusterService {
    let mut out = s.clone();
    if !refused.is_empty() {
        out.backends.retain(|ip, _| !refused.contains(ip));
    }
    out
}
