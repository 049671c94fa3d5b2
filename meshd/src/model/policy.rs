//! `MeshNetworkPolicy` (meshd.io/v1alpha1): the spec as written by users, and its validation.
//!
//! Parsing rejects unknown fields (every struct is `deny_unknown_fields`, entities and
//! protocols are closed enums). [`MeshNetworkPolicy::validate`] checks names, selectors,
//! rules and ports and names the policy and the failing field
//! (`shop/db: spec.ingress[0].toPorts[1].endPort: ...`). The semantics (default-deny per
//! direction, namespace and local-cluster scoping of peer selectors, entities, port
//! expansion) are applied by [`crate::policy`].

use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};

use super::{LabelSelector, ModelError};

/// API group/version of the policy kind.
pub const POLICY_API_VERSION: &str = "meshd.io/v1alpha1";
/// Kind name.
pub const POLICY_KIND: &str = "MeshNetworkPolicy";
/// Most ports one `port`..`endPort` range may span, unless it is the whole 1–65535 range
/// (which means "any port"). Ranges expand to one datapath entry per port.
pub const MAX_PORT_RANGE: u32 = 1024;

/// A policy's spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshNetworkPolicySpec {
    /// Endpoints (in the policy's namespace, in the local cluster) the policy applies to.
    /// The empty selector selects every endpoint of the namespace.
    pub endpoint_selector: LabelSelector,
    /// Ingress allow rules; present (even `[]`) makes selected endpoints default-deny ingress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<IngressRule>>,
    /// Egress allow rules; present (even `[]`) makes selected endpoints default-deny egress.
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
    /// Outside the mesh (reserved identity `world`).
    World,
    /// The local host (reserved identity `host`).
    Host,
    /// Nodes other than this one, of any cluster (reserved identity `remote-node`).
    RemoteNode,
    /// Every endpoint of the local cluster, plus the local host and the local reserved
    /// identities `unmanaged`, `health`, `init`, `kube-apiserver`.
    Cluster,
    /// Everything (the datapath's wildcard identity).
    All,
}

impl Entity {
    /// The name used in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::World => "world",
            Self::Host => "host",
            Self::RemoteNode => "remote-node",
            Self::Cluster => "cluster",
            Self::All => "all",
        }
    }
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

impl PolicyProtocol {
    /// The IANA protocol number; 0 for `ANY`.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Sctp => 132,
            Self::Any => 0,
        }
    }

    /// The protocol with IANA number `n` (0 = `ANY`).
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            0 => Some(Self::Any),
            6 => Some(Self::Tcp),
            17 => Some(Self::Udp),
            132 => Some(Self::Sctp),
            _ => None,
        }
    }
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

impl PortRule {
    /// The inclusive port range.
    pub fn range(&self) -> RangeInclusive<u16> {
        self.port..=self.end_port.unwrap_or(self.port)
    }

    /// Whether the rule covers every port (1–65535).
    pub fn is_all_ports(&self) -> bool {
        self.port == 1 && self.end_port == Some(u16::MAX)
    }
}

/// A policy that failed validation: which policy, which field, why. Retrying never helps.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("MeshNetworkPolicy {policy}: {field}: {reason}")]
pub struct PolicyValidationError {
    /// `namespace/name`.
    pub policy: String,
    /// The failing field, e.g. `spec.ingress[0].toPorts[1].endPort`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

/// A failing field (path below `spec`) and the reason.
type FieldError = (String, String);

fn check_ports(path: &str, ports: &[PortRule]) -> Result<(), FieldError> {
    for (j, p) in ports.iter().enumerate() {
        if p.port == 0 {
            return Err((
                format!("{path}.toPorts[{j}].port"),
                "must be 1-65535".into(),
            ));
        }
        if let Some(end) = p.end_port {
            if end < p.port {
                return Err((
                    format!("{path}.toPorts[{j}].endPort"),
                    format!("{end} is below port {}", p.port),
                ));
            }
            let span = u32::from(end) - u32::from(p.port) + 1;
            if span > MAX_PORT_RANGE && !p.is_all_ports() {
                return Err((
                    format!("{path}.toPorts[{j}].endPort"),
                    format!(
                        "range {}-{end} spans {span} ports; at most {MAX_PORT_RANGE} are allowed \
                         (1-65535, or no toPorts at all, means every port)",
                        p.port
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn check_rule(
    path: &str,
    peers_field: &str,
    entities_field: &str,
    selectors: &[LabelSelector],
    entities: &[Entity],
    ports: &[PortRule],
) -> Result<(), FieldError> {
    if selectors.is_empty() && entities.is_empty() && ports.is_empty() {
        return Err((
            path.to_owned(),
            format!(
                "empty rule: name {peers_field}, {entities_field} or toPorts (an empty rule \
                 means allow-all in Kubernetes but deny-all in Cilium, so meshd refuses to \
                 guess; use {entities_field}: [all] to allow everything, or an empty rule \
                 list to deny everything)"
            ),
        ));
    }
    for (j, s) in selectors.iter().enumerate() {
        s.validate()
            .map_err(|e| (format!("{path}.{peers_field}[{j}]"), e.to_string()))?;
    }
    check_ports(path, ports)
}

impl MeshNetworkPolicySpec {
    /// Checks selectors, rules and ports; the error names the field below `spec` (e.g.
    /// `ingress[0].toPorts[1].endPort: 70 is below port 80`).
    pub fn validate(&self) -> Result<(), ModelError> {
        self.check().map_err(|(field, reason)| ModelError::Field {
            field: "policy",
            reason: format!("{field}: {reason}"),
        })
    }

    fn check(&self) -> Result<(), FieldError> {
        self.endpoint_selector
            .validate()
            .map_err(|e| ("endpointSelector".to_owned(), e.to_string()))?;
        for (i, r) in self.ingress.iter().flatten().enumerate() {
            check_rule(
                &format!("ingress[{i}]"),
                "fromEndpoints",
                "fromEntities",
                &r.from_endpoints,
                &r.from_entities,
                &r.to_ports,
            )?;
        }
        for (i, r) in self.egress.iter().flatten().enumerate() {
            check_rule(
                &format!("egress[{i}]"),
                "toEndpoints",
                "toEntities",
                &r.to_endpoints,
                &r.to_entities,
                &r.to_ports,
            )?;
        }
        Ok(())
    }
}

/// A policy as stored: where it lives plus its spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshNetworkPolicy {
    /// Namespace of the policy.
    pub namespace: String,
    /// Name of the policy.
    pub name: String,
    /// The spec.
    pub spec: MeshNetworkPolicySpec,
}

impl MeshNetworkPolicy {
    /// Checks the namespace (RFC 1123 label), the name (RFC 1123 subdomain) and the spec;
    /// the error names the policy and the field.
    pub fn validate(&self) -> Result<(), PolicyValidationError> {
        let err = |field: String, reason: String| PolicyValidationError {
            policy: format!("{}/{}", self.namespace, self.name),
            field,
            reason,
        };
        if !super::is_dns_label(&self.namespace, 63) {
            return Err(err(
                "metadata.namespace".into(),
                format!("{:?} is not an RFC 1123 label", self.namespace),
            ));
        }
        if !super::is_dns_subdomain(&self.name) {
            return Err(err(
                "metadata.name".into(),
                format!("{:?} is not an RFC 1123 subdomain", self.name),
            ));
        }
        self.spec
            .check()
            .map_err(|(field, reason)| err(format!("spec.{field}"), reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(spec: &str) -> MeshNetworkPolicy {
        MeshNetworkPolicy {
            namespace: "shop".into(),
            name: "p".into(),
            spec: serde_json::from_str(spec).unwrap(),
        }
    }

    #[test]
    fn parses_and_validates() {
        let spec: MeshNetworkPolicySpec = serde_json::from_str(
            r#"{"endpointSelector":{"matchLabels":{"app":"db"}},
                "ingress":[{"fromEndpoints":[{"matchLabels":{"app":"web","io.meshd.cluster":"west"}}],
                            "fromEntities":["remote-node","world"],
                            "toPorts":[{"port":5432,"protocol":"TCP"},{"port":8000,"endPort":8010,"protocol":"SCTP"}]}],
                "egress":[{"toEntities":["cluster"]}]}"#,
        )
        .unwrap();
        spec.validate().unwrap();
        let bad: MeshNetworkPolicySpec = serde_json::from_str(
            r#"{"endpointSelector":{},"ingress":[{"toPorts":[{"port":80,"endPort":70}]}]}"#,
        )
        .unwrap();
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains("ingress[0].toPorts[0].endPort"), "{e}");
        for unknown in [
            r#"{"endpointSelector":{},"ingres":[]}"#,
            r#"{"endpointSelector":{},"ingress":[{"fromEntity":["world"]}]}"#,
            r#"{"endpointSelector":{},"ingress":[{"fromEntities":["galaxy"]}]}"#,
            r#"{"endpointSelector":{},"ingress":[{"toPorts":[{"port":1,"protocol":"ICMP"}]}]}"#,
            r#"{"endpointSelector":{},"ingress":[{"toPorts":[{"port":1,"proto":"TCP"}]}]}"#,
            r#"{"endpointSelector":{},"ingress":[{"toPorts":[{"port":70000}]}]}"#,
        ] {
            assert!(
                serde_json::from_str::<MeshNetworkPolicySpec>(unknown).is_err(),
                "{unknown}"
            );
        }
    }

    #[test]
    fn errors_name_policy_and_field() {
        let cases = [
            (
                r#"{"endpointSelector":{},"ingress":[{"toPorts":[{"port":0}]}]}"#,
                "MeshNetworkPolicy shop/p: spec.ingress[0].toPorts[0].port: must be 1-65535",
            ),
            (
                r#"{"endpointSelector":{},"egress":[{"toEntities":["all"]},{}]}"#,
                "MeshNetworkPolicy shop/p: spec.egress[1]: empty rule",
            ),
            (
                r#"{"endpointSelector":{},"ingress":[{"toPorts":[{"port":1000,"endPort":3000}]}]}"#,
                "spec.ingress[0].toPorts[0].endPort: range 1000-3000 spans 2001 ports",
            ),
            (
                r#"{"endpointSelector":{"matchLabels":{"foo:app":"x"}}}"#,
                "spec.endpointSelector: invalid label selector",
            ),
            (
                r#"{"endpointSelector":{},"egress":[{"toEndpoints":[{},{"matchExpressions":[{"key":"a","operator":"In"}]}]}]}"#,
                "spec.egress[0].toEndpoints[1]: invalid label selector: matchExpressions[0] (a)",
            ),
        ];
        for (spec, want) in cases {
            let e = policy(spec).validate().unwrap_err().to_string();
            assert!(e.contains(want), "{spec}: {e}");
        }
        // The whole range is fine (it means any port), as is an empty deny-all list.
        policy(r#"{"endpointSelector":{},"ingress":[{"toPorts":[{"port":1,"endPort":65535}]}]}"#)
            .validate()
            .unwrap();
        policy(r#"{"endpointSelector":{},"ingress":[]}"#)
            .validate()
            .unwrap();
        let mut p = policy(r#"{"endpointSelector":{}}"#);
        p.name = "Bad_Name".into();
        let e = p.validate().unwrap_err();
        assert_eq!(e.field, "metadata.name");
    }
}
