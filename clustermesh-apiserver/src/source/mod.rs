//! Sources of cluster state: the objects the exporter turns into the key schema.
//!
//! A source yields [`SourceEvent`]s: `Apply` for an object that appeared or changed,
//! `Delete` for one that went away, `Synced` once the first full load is complete (the
//! exporter writes nothing before it), and `Error` for input problems it could not apply
//! (the source keeps going; objects from the last good input stay in force).

mod channel;
pub mod kube;
pub mod manifest;

pub use channel::ChannelSource;

use std::fmt;

use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use meshd::model::MeshNetworkPolicy;

/// A `ServiceExport` (multicluster.x-k8s.io v1alpha1 or v1beta1): the service of the same
/// namespace/name is exported to the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceExport {
    /// Namespace.
    pub namespace: String,
    /// Name (the exported service's name).
    pub name: String,
    /// `metadata.creationTimestamp`, used for MCS conflict resolution.
    pub created: Option<time::OffsetDateTime>,
}

/// One object of a cluster.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    /// A namespace.
    Namespace(Box<Namespace>),
    /// A service.
    Service(Box<Service>),
    /// An endpoint slice (discovery.k8s.io/v1).
    EndpointSlice(Box<EndpointSlice>),
    /// A pod.
    Pod(Box<Pod>),
    /// A node.
    Node(Box<Node>),
    /// An MCS service export.
    ServiceExport(ServiceExport),
    /// A meshd network policy.
    Policy(MeshNetworkPolicy),
}

/// Kinds of objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    /// Namespace.
    Namespace,
    /// Service.
    Service,
    /// EndpointSlice.
    EndpointSlice,
    /// Pod.
    Pod,
    /// Node.
    Node,
    /// ServiceExport.
    ServiceExport,
    /// MeshNetworkPolicy.
    Policy,
}

/// Identifies one object: kind, namespace (empty for cluster-scoped kinds), name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    /// Kind.
    pub kind: ObjectKind,
    /// Namespace ("" for Namespace and Node).
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{:?} {}", self.kind, self.name)
        } else {
            write!(f, "{:?} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

impl Object {
    /// The object's reference.
    pub fn object_ref(&self) -> ObjectRef {
        fn meta(
            m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
        ) -> (String, String) {
            (
                m.namespace.clone().unwrap_or_default(),
                m.name.clone().unwrap_or_default(),
            )
        }
        let (kind, (namespace, name)) = match self {
            Self::Namespace(o) => (ObjectKind::Namespace, (String::new(), meta(&o.metadata).1)),
            Self::Service(o) => (ObjectKind::Service, meta(&o.metadata)),
            Self::EndpointSlice(o) => (ObjectKind::EndpointSlice, meta(&o.metadata)),
            Self::Pod(o) => (ObjectKind::Pod, meta(&o.metadata)),
            Self::Node(o) => (ObjectKind::Node, (String::new(), meta(&o.metadata).1)),
            Self::ServiceExport(o) => (
                ObjectKind::ServiceExport,
                (o.namespace.clone(), o.name.clone()),
            ),
            Self::Policy(o) => (ObjectKind::Policy, (o.namespace.clone(), o.name.clone())),
        };
        ObjectRef {
            kind,
            namespace,
            name,
        }
    }
}

/// An input problem: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{location}: {message}")]
pub struct SourceError {
    /// Where (e.g. `deploy/examples/east/web.yaml document 2, field spec.ports[0].port`).
    pub location: String,
    /// What is wrong.
    pub message: String,
}

/// What a source reports.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceEvent {
    /// An object appeared or changed.
    Apply(Object),
    /// An object went away.
    Delete(ObjectRef),
    /// The first full load is complete.
    Synced,
    /// Input that could not be applied; earlier good state stays in force.
    Error(SourceError),
}

/// A source of cluster state: a manifest directory or the Kubernetes API.
pub trait Source: Send + 'static {
    /// Starts the source; the stream ends only when the source is shut down.
    fn run(
        self: Box<Self>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> BoxStream<'static, SourceEvent>;
}
