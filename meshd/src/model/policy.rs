//! `MeshNetworkPolicy` (meshd.io/v1alpha1): the spec as written by users.
//!
//! Parsing rejects unknown fields; [`MeshNetworkPolicySpec::validate`] checks selectors
//! and ports and names the failing field. Semantics (default-deny per direction, local
//! cluster unless the cluster label is named) are applied by the agent's policy engine.

use serde::{Deserialize, Serialize};

use super::{LabelSelector, ModelError};

/// API group/version of the policy kind.
pub const POLICY_API_VERSION: &str = "meshd.io/v1alpha1";
/// Kind name.
pub const POLICY_KIND: &str = "MeshNetworkPolicy";

/// A policy's spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshNetworkPolicySpec {
    /// Endpoints (in the policy's namespace) the policy applies to.
    pub endpoint_selector: LabelSelector,
    /// Ingress allow rules; present (even empty) makes selected endpoints default-deny ingress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<IngressRule>>,
    /// Egress allow rules; present (even empty) makes selected endpoints default-deny egress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<EgressRule>>,
}

/// Who may connect to the selected endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressRule {
    /// Peer endpoints by labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_endpoints: Vec<LabelSelector>,
    /// Peer entities.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_entities: Vec<Entity>,
    /// Allowed ports (all when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_ports: Vec<PortRule>,
}

/// Where the selected endpoints may connect.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressRule {
    /// Peer endpoints by labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_endpoints: Vec<LabelSelector>,
    /// Peer entities.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_entities: Vec<Entity>,
    /// Allowed ports (all when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_ports: Vec<PortRule>,
}

/// Well-known peer groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Entity {
    /// Outside the mesh.
    World,
    /// The local host.
    Host,
    /// Nodes of other clusters.
    RemoteNode,
    /// Every endpoint of the local cluster.
    Cluster,
    /// Everything.
    All,
}

/// Port protocol in a policy (`ANY` matches TCP, UDP and SCTP).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum PolicyProtocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
    /// Any of them.
    #[default]
    Any,
}

/// One allowed port or port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortRule {
    /// Port (1–65535).
    pub port: u16,
    /// Optional inclusive end of a range (≥ port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<u16>,
    /// Protocol (default ANY).
    #[serde(default)]
    pub protocol: PolicyProtocol,
}

impl MeshNetworkPolicySpec {
    /// Checks selectors and ports; the error names the field (e.g. `ingress[0].toPorts[1].endPort`).
    pub fn validate(&self) -> Result<(), ModelError> {
        let field = |path: String, e: ModelError| ModelError::Field {
            field: "policy",
            reason: format!("{path}: {e}"),
        };
        self.endpoint_selector
            .validate()
            .map_err(|e| field("endpointSelector".into(), e))?;
        let ports = |path: &str, ports: &[PortRule]| -> Result<(), ModelError> {
            for (j, p) in ports.iter().enumerate() {
                if p.port == 0 {
                    return Err(ModelError::Field {
                        field: "policy",
                        reason: format!("{path}.toPorts[{j}].port: must be 1-65535"),
                    });
                }
                if let Some(end) = p.end_port
                    && end < p.port
                {
                    return Err(ModelError::Field {
                        field: "policy",
                        reason: format!(
                            "{path}.toPorts[{j}].endPort: {end} is below port {}",
                            p.port
                        ),
                    });
                }
            }
            Ok(())
        };
        for (i, r) in self.ingress.iter().flatten().enumerate() {
            for (j, s) in r.from_endpoints.iter().enumerate() {
                s.validate()
                    .map_err(|e| field(format!("ingress[{i}].fromEndpoints[{j}]"), e))?;
            }
            ports(&format!("ingress[{i}]"), &r.to_ports)?;
        }
        for (i, r) in self.egress.iter().flatten().enumerate() {
            for (j, s) in r.to_endpoints.iter().enumerate() {
                s.validate()
                    .map_err(|e| field(format!("egress[{i}].toEndpoints[{j}]"), e))?;
            }
            ports(&format!("egress[{i}]"), &r.to_ports)?;
        }
        Ok(())
    }
}

/// A policy as stored: where it lives plus its spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshNetworkPolicy {
    /// Namespace of the policy.
    pub namespace: String,
    /// Name of the policy.
    pub name: String,
    /// The spec.
    pub spec: MeshNetworkPolicySpec,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_validates() {
        let spec: MeshNetworkPolicySpec = serde_json::from_str(
            r#"{"endpointSelector":{"matchLabels":{"app":"db"}},
                "ingress":[{"fromEndpoints":[{"matchLabels":{"app":"web","io.meshd.cluster":"west"}}],
                            "toPorts":[{"port":5432,"protocol":"TCP"}]}]}"#,
        )
        .unwrap();
        spec.validate().unwrap();
        let bad: MeshNetworkPolicySpec = serde_json::from_str(
            r#"{"endpointSelector":{},"ingress":[{"toPorts":[{"port":80,"endPort":70}]}]}"#,
        )
        .unwrap();
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("ingress[0].toPorts[0].endPort"), "{e}");
        assert!(
            serde_json::from_str::<MeshNetworkPolicySpec>(r#"{"endpointSelector":{},"ingres":[]}"#)
                .is_err()
        );
    }
}
