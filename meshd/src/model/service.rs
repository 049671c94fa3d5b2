//! Cluster services as exported to the mesh: frontends, ports, backends, global flags.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{ClusterId, ClusterName, ModelError};

/// L4 protocol of a port.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    /// TCP (the default, as in Kubernetes).
    #[default]
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// The IANA protocol number (6, 17, 132).
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Sctp => 132,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        })
    }
}

impl FromStr for Protocol {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "TCP" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            "SCTP" => Ok(Self::Sctp),
            other => Err(ModelError::Field {
                field: "protocol",
                reason: format!("{other:?} is not TCP, UDP or SCTP"),
            }),
        }
    }
}

/// Which backends a global service uses while both local and remote ones exist
/// (`service.meshd.io/affinity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Affinity {
    /// All backends of all clusters.
    #[default]
    None,
    /// Local backends while any is ready; remote ones otherwise.
    Local,
    /// Remote backends while any is ready; local ones otherwise.
    Remote,
}

impl FromStr for Affinity {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" | "" => Ok(Self::None),
            "local" => Ok(Self::Local),
            "remote" => Ok(Self::Remote),
            other => Err(ModelError::Field {
                field: "service.meshd.io/affinity",
                reason: format!("{other:?} is not local, remote or none"),
            }),
        }
    }
}

/// A service port (frontend side).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// Port name (may be empty for a single unnamed port).
    #[serde(default)]
    pub name: String,
    /// Frontend port.
    pub port: u16,
    /// Protocol.
    #[serde(default)]
    pub protocol: Protocol,
}

/// A backend port (target side), named after the service port it serves.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendPort {
    /// Name of the service port this serves.
    #[serde(default)]
    pub name: String,
    /// Backend port.
    pub port: u16,
    /// Protocol.
    #[serde(default)]
    pub protocol: Protocol,
}

/// One backend of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    /// Ports the backend serves.
    #[serde(default)]
    pub ports: Vec<BackendPort>,
    /// Whether the endpoint is ready.
    #[serde(default)]
    pub ready: bool,
    /// Pod hostname (headless per-endpoint DNS names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Node hosting the backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Topology zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

/// `mesh/state/services/v1/<cluster>/<ns>/<name>`: a service a cluster offers to the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterService {
    /// Cluster offering the service.
    pub cluster: ClusterName,
    /// That cluster's ID.
    pub cluster_id: ClusterId,
    /// Namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// Annotated global or exported with a ServiceExport.
    #[serde(default)]
    pub global: bool,
    /// Whether this cluster's backends are offered to the mesh (`service.meshd.io/shared`).
    #[serde(default = "default_true")]
    pub shared: bool,
    /// Backend affinity.
    #[serde(default)]
    pub affinity: Affinity,
    /// Headless (no ClusterIP; DNS answers per endpoint).
    #[serde(default)]
    pub headless: bool,
    /// The service's cluster-local frontend IPs (ClusterIPs).
    #[serde(default)]
    pub frontends: Vec<IpAddr>,
    /// Service ports.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// Backends by IP.
    #[serde(default)]
    pub backends: BTreeMap<IpAddr, Backend>,
    /// When the ServiceExport was created (RFC 3339), for MCS conflict resolution.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub export_created: Option<time::OffsetDateTime>,
}

fn default_true() -> bool {
    true
}

impl ClusterService {
    /// A service of `cluster` with no frontends, ports or backends: not global, shared,
    /// no affinity, not headless (fill in the rest with struct update syntax).
    pub fn new(
        cluster: ClusterName,
        cluster_id: ClusterId,
        namespace: impl Into<String>,
        name: impl Into<String>,
    ) -> Self {
        Self {
            cluster,
            cluster_id,
            namespace: namespace.into(),
            name: name.into(),
            global: false,
            shared: true,
            affinity: Affinity::None,
            headless: false,
            frontends: Vec::new(),
            ports: Vec::new(),
            backends: BTreeMap::new(),
            export_created: None,
        }
    }

    /// Checks names and ports.
    pub fn validate(&self) -> Result<(), ModelError> {
        for (field, v) in [
            ("service namespace", &self.namespace),
            ("service name", &self.name),
        ] {
            if !super::is_dns_label(v, 63) {
                return Err(ModelError::Field {
                    field,
                    reason: format!("{v:?} is not an RFC 1123 label"),
                });
            }
        }
        let bad_port = self.ports.iter().map(|p| p.port).chain(
            self.backends
                .values()
                .flat_map(|b| b.ports.iter().map(|p| p.port)),
        );
        if bad_port.into_iter().any(|p| p == 0) {
            return Err(ModelError::Field {
                field: "service port",
                reason: "port 0 is not a valid port".into(),
            });
        }
        Ok(())
    }
}
