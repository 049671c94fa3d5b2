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

pub(crate) use mesh_certs::names::{is_dns_label, is_dns_subdomain};
