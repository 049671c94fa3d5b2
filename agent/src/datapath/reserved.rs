//! Reserved identities of node addresses in the ipcache: `host` for this machine's own
//! addresses, `remote-node` for every other node's (the local cluster's other nodes and
//! every peer's, as the peer guard admitted them), so that `fromEntities: [host]` and
//! `[remote-node]` match in the kernel as they do in `PolicyEngine::trace`.
//!
//! Anything else without an ipcache entry stays `world` (the program's default). An
//! endpoint's own entry wins over a node entry for the same address.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use meshd::model::ReservedIdentity;

use crate::view::NodesSnapshot;

/// The ipcache entries (`/32` → identity, cluster ID) of node addresses: `host` for the
/// addresses in `host` (this machine's, found by the interface resolver), `remote-node`
/// for the addresses of every node of `nodes`; `local_id` is this cluster's ID.
pub fn node_entries(
    nodes: &NodesSnapshot,
    host: &HashSet<Ipv4Addr>,
    local_id: u16,
) -> HashMap<Ipv4Net, (u32, u16)> {
    let host_id = ReservedIdentity::Host.identity().get();
    let remote_id = ReservedIdentity::RemoteNode.identity().get();
    let mut out = HashMap::new();
    for node in nodes.entries.values() {
        for a in &node.addresses {
            let IpAddr::V4(v4) = a.ip else { continue };
            if host.contains(&v4) {
                continue;
            }
            out.insert(Ipv4Net::from(v4), (remote_id, node.cluster_id.get()));
        }
    }
    for a in host {
        out.insert(Ipv4Net::from(*a), (host_id, local_id));
    }
    out
}

/// This machine's own IPv4 addresses (`/32 host LOCAL` entries of `/proc/net/fib_trie`'s
/// local table), loopback excluded.
pub fn parse_fib_trie_local(text: &str) -> HashSet<Ipv4Addr> {
    let mut out = HashSet::new();
    let mut last: Option<Ipv4Addr> = None;
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix("|-- ") {
            last = rest.trim().parse().ok();
        } else if t.starts_with("/32 host LOCAL")
            && let Some(ip) = last
            && !ip.is_loopback()
        {
            out.insert(ip);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use meshd::model::{
        ClusterId, ClusterName, MaxConnectedClusters, Node, NodeAddress, NodeAddressType,
    };

    use super::*;

    fn node(cluster: &str, id: u32, name: &str, ip: &str) -> ((ClusterName, String), Arc<Node>) {
        let c = ClusterName::new(cluster).unwrap();
        (
            (c.clone(), name.to_owned()),
            Arc::new(Node {
                name: name.into(),
                cluster: c,
                cluster_id: ClusterId::new(id, MaxConnectedClusters::C255).unwrap(),
                addresses: vec![NodeAddress {
                    kind: NodeAddressType::InternalIP,
                    ip: ip.parse().unwrap(),
                }],
                pod_cidrs: vec![],
            }),
        )
    }

    #[test]
    fn host_is_this_machine_and_every_other_node_is_remote_node() {
        let mut snap = NodesSnapshot::default();
        for (k, v) in [
            node("east", 1, "e1", "198.18.0.1"),
            node("east", 1, "e2", "198.18.0.9"),
            node("west", 2, "w1", "198.18.0.2"),
        ] {
            snap.entries.insert(k, v);
        }
        let host: HashSet<Ipv4Addr> = [
            "198.18.0.1".parse().unwrap(),
            "198.18.255.1".parse().unwrap(),
        ]
        .into_iter()
        .collect();
        let e = node_entries(&snap, &host, 1);
        let get = |s: &str| {
            e.get(&Ipv4Net::from(s.parse::<Ipv4Addr>().unwrap()))
                .copied()
        };
        assert_eq!(get("198.18.0.1"), Some((1, 1)), "this node: host");
        assert_eq!(
            get("198.18.255.1"),
            Some((1, 1)),
            "any address of this machine: host"
        );
        assert_eq!(
            get("198.18.0.9"),
            Some((6, 1)),
            "another node of the cluster"
        );
        assert_eq!(get("198.18.0.2"), Some((6, 2)), "a peer's node");
        assert_eq!(e.len(), 4);
    }

    #[test]
    fn fib_trie_local_addresses() {
        let text = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 198.18.0.0\n        /16 link UNICAST\nLocal:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 127.0.0.1\n        /32 host LOCAL\n     |-- 198.18.0.1\n        /32 host LOCAL\n     |-- 198.18.255.255\n        /32 link BROADCAST\n";
        let got = parse_fib_trie_local(text);
        assert_eq!(got, ["198.18.0.1".parse().unwrap()].into_iter().collect());
    }
}
