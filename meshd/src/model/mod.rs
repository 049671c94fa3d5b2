//! The meshd data model: clusters, identities, labels, selectors, endpoints, nodes, services.

mod cluster;
mod endpoint;
mod identity;
mod labels;
mod node;
mod policy;
mod selector;
mod service;

pub use cluster::{
    Capabilities, ClusterConfig, ClusterId, ClusterName, MaxConnectedClusters, ModelError,
};
pub use endpoint::{IpCacheEntry, NamedPort};
pub use identity::{Identity, IdentityEntry, ReservedIdentity};
pub use labels::{CLUSTER_LABEL, Label, LabelSource, Labels, NAMESPACE_LABEL};
pub use node::{Node, NodeAddress, NodeAddressType};
pub use policy::{
    EgressRule, Entity, IngressRule, MAX_PORT_RANGE, MeshNetworkPolicy, MeshNetworkPolicySpec,
    POLICY_API_VERSION, POLICY_KIND, PolicyProtocol, PolicyValidationError, PortRule,
};
pub use selector::{LabelSelector, LabelSelectorRequirement, SelectorOperator};
pub use service::{Affinity, Backend, BackendPort, ClusterService, Protocol, ServicePort};

/// RFC 1123 DNS label: lowercase alphanumerics and '-', starting and ending alphanumeric.
pub(crate) fn is_dns_label(s: &str, max_len: usize) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= max_len
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// RFC 1123 DNS subdomain (dot-separated DNS labels), at most 253 characters.
pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(|l| is_dns_label(l, 63))
}
