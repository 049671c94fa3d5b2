//! ipcache entries: which identity an IP (or prefix) has and where it lives.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::{Identity, ModelError, Protocol};

/// A named container port, as exported with the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NamedPort {
    /// Port number.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
}

/// `mesh/state/ip/v1/<cluster>/<ip>`: one endpoint IP of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpCacheEntry {
    /// The endpoint IP.
    pub ip: IpAddr,
    /// Prefix length (32 / 128 for a single address).
    pub prefix_len: u8,
    /// The endpoint's security identity.
    pub identity: Identity,
    /// IP of the node that hosts the endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<IpAddr>,
    /// Name of the node that hosts the endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Namespace of the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Pod name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Named ports of the pod's containers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub named_ports: BTreeMap<String, NamedPort>,
}

impl IpCacheEntry {
    /// Checks the prefix length against the address family.
    pub fn validate(&self) -> Result<(), ModelError> {
        let max = if self.ip.is_ipv4() { 32 } else { 128 };
        if self.prefix_len == 0 || self.prefix_len > max {
            return Err(ModelError::Field {
                field: "ipcache prefixLen",
                reason: format!("{} is not 1..={max} for {}", self.prefix_len, self.ip),
            });
        }
        Ok(())
    }
}
