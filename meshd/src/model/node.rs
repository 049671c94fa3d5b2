//! Nodes of a cluster: addresses and pod CIDRs.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{ClusterId, ClusterName};

/// Kind of node address (as in Kubernetes `NodeAddress.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NodeAddressType {
    /// Reachable inside the cluster network.
    InternalIP,
    /// Reachable from outside.
    ExternalIP,
}

/// One node address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeAddress {
    /// Kind of address.
    #[serde(rename = "type")]
    pub kind: NodeAddressType,
    /// The address.
    pub ip: IpAddr,
}

/// `mesh/state/nodes/v1/<cluster>/<node>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    /// Node name (DNS subdomain).
    pub name: String,
    /// Cluster the node belongs to.
    pub cluster: ClusterName,
    /// That cluster's ID.
    pub cluster_id: ClusterId,
    /// Node addresses.
    #[serde(default)]
    pub addresses: Vec<NodeAddress>,
    /// Pod CIDRs allocated to the node.
    #[serde(default)]
    pub pod_cidrs: Vec<IpNet>,
}
