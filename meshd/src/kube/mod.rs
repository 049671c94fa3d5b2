//! Kubernetes mode helpers shared by the apiserver, the agent and meshctl: clients from
//! kubeconfigs, peer Secrets, and what a meshd installation publishes in its namespace.
//!
//! ```text
//!  kubeconfig (file + context) or in-cluster ──client_from_kubeconfig──► kube::Client
//!     │
//!     ├─ Secrets meshd-peer-<remote> (label meshd.io/peer=true, key kubeconfig)
//!     │     PeerSecretWatcher: watcher (list+watch, 410 → relist, backoff)
//!     │        → PeerCredential::from_kubeconfig → Stream<PeerEvent> (as the peers dir)
//!     │        malformed → PeerEvent::Error + a Warning Event on the Secret
//!     │     write_peer_secret / delete_peer_secret / list_peer_secrets (meshctl)
//!     └─ ConfigMap meshd-config (cluster name, ID, mode), Secret meshd-ca (CA cert + key),
//!        Secret meshd-peer-ca (peer CA, when the identity relay runs),
//!        Service clustermesh-apiserver (NodePort / LoadBalancer address of the etcd port,
//!        and of the relay port peers dial when there is one)
//!           read_cluster_config / read_ca / read_peer_ca / clustermesh_endpoint
//!           (meshctl connect --context)
//! ```

mod client;
mod cluster;
mod secrets;

#[cfg(test)]
mod tests;

pub use client::{client_from_kubeconfig, client_from_kubeconfig_yaml};
pub use cluster::{
    ClusterMeshEndpoint, MeshdClusterConfig, clustermesh_endpoint, read_ca, read_cluster_config,
    read_peer_ca,
};
pub use secrets::{
    PeerSecretWatcher, delete_peer_secret, list_peer_secrets, parse_peer_secret, peer_secret_name,
    write_peer_secret,
};

/// Label every peer Secret carries (value `"true"`).
pub const PEER_LABEL: &str = "meshd.io/peer";
/// Prefix of peer Secret names: `meshd-peer-<remote>`.
pub const PEER_SECRET_PREFIX: &str = "meshd-peer-";
/// Key of the kubeconfig in a peer Secret.
pub const PEER_SECRET_KEY: &str = "kubeconfig";
/// ConfigMap with this cluster's meshd settings (keys [`CONFIG_CLUSTER_NAME`], …).
pub const CONFIG_MAP: &str = "meshd-config";
/// ConfigMap key: cluster name.
pub const CONFIG_CLUSTER_NAME: &str = "cluster-name";
/// ConfigMap key: cluster ID.
pub const CONFIG_CLUSTER_ID: &str = "cluster-id";
/// ConfigMap key: `max-connected-clusters` (255 or 511; default 255).
pub const CONFIG_MAX_CONNECTED_CLUSTERS: &str = "max-connected-clusters";
/// Secret with the cluster's CA (keys `ca.crt`, `ca.key`), which signs peers' client certs.
pub const CA_SECRET: &str = "meshd-ca";
/// Secret with the cluster's peer CA (keys `ca.crt`, `ca.key`), present when the
/// apiserver runs the identity relay: it signs peers' client certificates and the relay's
/// server certificate; only the relay trusts it (etcd does not).
pub const PEER_CA_SECRET: &str = "meshd-peer-ca";
/// Service exposing the clustermesh-apiserver's etcd (and identity relay) to other clusters.
pub const APISERVER_SERVICE: &str = "clustermesh-apiserver";
/// Name of the etcd port of [`APISERVER_SERVICE`] (etcd itself: agents, meshctl as root;
/// peers too on installs without a relay).
pub const ETCD_PORT_NAME: &str = "etcd";
/// Name of the identity relay's port of [`APISERVER_SERVICE`]: what peers dial.
pub const RELAY_PORT_NAME: &str = "relay";

/// A Kubernetes operation of meshd that failed. Each variant names the object.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KubeError {
    /// The kubeconfig could not be read or used.
    #[error("kubeconfig {what}: {message}")]
    Kubeconfig {
        /// The file (or "in-cluster").
        what: String,
        /// What is wrong.
        message: String,
    },
    /// An API call failed (retrying may help unless it is a 4xx).
    #[error("{action} {object}: {source}")]
    Api {
        /// What was attempted (`read`, `write`, `delete`, `list`).
        action: &'static str,
        /// The object (`Secret meshd/meshd-peer-west`).
        object: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// An object is missing (the chart not installed, or another namespace).
    #[error("{object} not found{hint}")]
    NotFound {
        /// The object.
        object: String,
        /// What to check.
        hint: String,
    },
    /// An object exists but a field is missing or invalid.
    #[error("{object}: {field}: {reason}")]
    Invalid {
        /// The object.
        object: String,
        /// The field (`data.cluster-id`, `spec.type`).
        field: String,
        /// What is wrong.
        reason: String,
    },
}

impl KubeError {
    pub(crate) fn api(
        action: &'static str,
        object: impl Into<String>,
        source: kube::Error,
    ) -> Self {
        match source {
            kube::Error::Api(s) if s.code == 404 => Self::NotFound {
                object: object.into(),
                hint: String::new(),
            },
            source => Self::Api {
                action,
                object: object.into(),
                source,
            },
        }
    }

    pub(crate) fn invalid(
        object: impl Into<String>,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self::Invalid {
            object: object.into(),
            field: field.into(),
            reason: reason.into(),
        }
    }
}
