//! Conversions from the model to the gRPC wire types (`mesh.v1`), shared by every server
//! and by meshctl: one definition of each mapping.

use mesh_proto::v1 as pb;

use crate::model::{Affinity, ClusterName, IdentityEntry, IpCacheEntry, Protocol};

/// A port as `mesh.v1.Port`.
pub fn port(name: &str, number: u16, protocol: Protocol) -> pb::Port {
    pb::Port {
        name: name.to_owned(),
        port: u32::from(number),
        protocol: protocol.to_string(),
    }
}

/// The annotation spelling of an affinity (`none`, `local`, `remote`).
pub fn affinity(a: Affinity) -> &'static str {
    match a {
        Affinity::None => "none",
        Affinity::Local => "local",
        Affinity::Remote => "remote",
    }
}

/// An identity of `cluster` as `mesh.v1.Identity`.
pub fn identity(e: &IdentityEntry, cluster: &ClusterName) -> pb::Identity {
    pb::Identity {
        id: e.id.get(),
        cluster: cluster.to_string(),
        labels: e.labels.iter().map(ToString::to_string).collect(),
    }
}

/// An ipcache entry of `cluster` as `mesh.v1.IpCacheEntry`.
pub fn ip_cache_entry(e: &IpCacheEntry, cluster: &ClusterName) -> pb::IpCacheEntry {
    pb::IpCacheEntry {
        ip: e.ip.to_string(),
        prefix_len: u32::from(e.prefix_len),
        identity: e.identity.get(),
        cluster: cluster.to_string(),
        host_ip: e.host_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        node: e.node.clone().unwrap_or_default(),
        namespace: e.namespace.clone().unwrap_or_default(),
        pod: e.pod.clone().unwrap_or_default(),
    }
}
