//! What a meshd installation publishes in its namespace: config, CA, and the clustermesh endpoint peers dial.

use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret, Service, ServicePort};
use kube::api::{Api, ListParams};

use super::{
    APISERVER_SERVICE, CA_SECRET, CONFIG_CLUSTER_ID, CONFIG_CLUSTER_NAME, CONFIG_MAP,
    CONFIG_MAX_CONNECTED_CLUSTERS, ETCD_PORT_NAME, KubeError, PEER_CA_SECRET, RELAY_PORT_NAME,
};
use crate::model::{ClusterId, ClusterName, MaxConnectedClusters};

/// A cluster's meshd settings (ConfigMap `meshd-config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshdClusterConfig {
    /// Namespace meshd is installed in.
    pub namespace: String,
    /// Cluster name.
    pub name: ClusterName,
    /// Cluster ID.
    pub id: ClusterId,
    /// Mesh size.
    pub max_connected_clusters: MaxConnectedClusters,
}

/// Reads ConfigMap `meshd-config` of `namespace`: `cluster-name`, `cluster-id` and
/// `max-connected-clusters` (default 255), validated.
pub async fn read_cluster_config(
    client: &kube::Client,
    namespace: &str,
) -> Result<MeshdClusterConfig, KubeError> {
    let object = format!("ConfigMap {namespace}/{CONFIG_MAP}");
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let cm = api.get(CONFIG_MAP).await.map_err(|e| match KubeError::api("read", &object, e) {
        KubeError::NotFound { object, .. } => KubeError::NotFound {
            object,
            hint: " (is meshd installed in this namespace? `helm install meshd deploy/helm/meshd -n <ns>`)".into(),
        },
        e => e,
    })?;
    let data = cm.data.unwrap_or_default();
    let get = |key: &str| {
        data.get(key)
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    let field = |key: &str| format!("data.{key}");
    let name = get(CONFIG_CLUSTER_NAME)
        .ok_or_else(|| KubeError::invalid(&object, field(CONFIG_CLUSTER_NAME), "missing"))?;
    let name = ClusterName::new(&name)
        .map_err(|e| KubeError::invalid(&object, field(CONFIG_CLUSTER_NAME), e.to_string()))?;
    let mode = match get(CONFIG_MAX_CONNECTED_CLUSTERS) {
        None => MaxConnectedClusters::C255,
        Some(v) => v
            .parse::<u32>()
            .map_err(|e| e.to_string())
            .and_then(|n| MaxConnectedClusters::from_u32(n).map_err(|e| e.to_string()))
            .map_err(|r| KubeError::invalid(&object, field(CONFIG_MAX_CONNECTED_CLUSTERS), r))?,
    };
    let id = get(CONFIG_CLUSTER_ID)
        .ok_or_else(|| KubeError::invalid(&object, field(CONFIG_CLUSTER_ID), "missing"))?;
    let id = id
        .parse::<u32>()
        .map_err(|e| e.to_string())
        .and_then(|n| ClusterId::new(n, mode).map_err(|e| e.to_string()))
        .map_err(|r| KubeError::invalid(&object, field(CONFIG_CLUSTER_ID), r))?;
    Ok(MeshdClusterConfig {
        namespace: namespace.to_owned(),
        name,
        id,
        max_connected_clusters: mode,
    })
}

/// The cluster CA (Secret `meshd-ca`, keys `ca.crt` and `ca.key`): `(cert PEM, key PEM)`.
pub async fn read_ca(
    client: &kube::Client,
    namespace: &str,
) -> Result<(String, String), KubeError> {
    read_ca_secret(client, namespace, CA_SECRET).await
}

/// The peer CA (Secret `meshd-peer-ca`, keys `ca.crt` and `ca.key`) of an installation that
/// runs the identity relay: `(cert PEM, key PEM)`; `None` when the Secret does not exist
/// (installs before the relay, or with the relay off).
pub async fn read_peer_ca(
    client: &kube::Client,
    namespace: &str,
) -> Result<Option<(String, String)>, KubeError> {
    match read_ca_secret(client, namespace, PEER_CA_SECRET).await {
        Ok(ca) => Ok(Some(ca)),
        Err(KubeError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

async fn read_ca_secret(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<(String, String), KubeError> {
    let object = format!("Secret {namespace}/{name}");
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let s = api
        .get(name)
        .await
        .map_err(|e| KubeError::api("read", &object, e))?;
    let data = s.data.unwrap_or_default();
    let get = |key: &str| {
        data.get(key)
            .ok_or_else(|| KubeError::invalid(&object, format!("data.{key}"), "missing"))
            .and_then(|b| {
                String::from_utf8(b.0.clone())
                    .map_err(|_| KubeError::invalid(&object, format!("data.{key}"), "not PEM text"))
            })
    };
    Ok((get("ca.crt")?, get("ca.key")?))
}

/// Where peers reach a cluster's clustermesh etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterMeshEndpoint {
    /// Host (IP address or DNS name) reachable from other clusters.
    pub host: String,
    /// Port of etcd (the Service port named `etcd`, else the first).
    pub port: u16,
    /// Port of the identity relay (the Service port named `relay`), the endpoint peers dial;
    /// `None` on installs without a relay (peers then dial [`ClusterMeshEndpoint::port`]).
    pub relay_port: Option<u16>,
    /// `NodePort` or `LoadBalancer`.
    pub service_type: String,
    /// Name the etcd server certificate is checked against
    /// (`clustermesh-apiserver.<namespace>.svc`, in the chart's certificate; the relay's
    /// certificate names it too).
    pub tls_server_name: String,
}

impl ClusterMeshEndpoint {
    /// `https://host:port` of etcd (IPv6 hosts bracketed): root access, and the peer
    /// kubeconfig's `server` on installs without a relay.
    pub fn url(&self) -> String {
        self.url_of(self.port)
    }

    /// `https://host:port` of the identity relay, when the Service has a `relay` port.
    pub fn relay_url(&self) -> Option<String> {
        self.relay_port.map(|p| self.url_of(p))
    }

    fn url_of(&self, port: u16) -> String {
        if self.host.contains(':') {
            format!("https://[{}]:{port}", self.host)
        } else {
            format!("https://{}:{port}", self.host)
        }
    }
}

/// The address of Service `service` (default [`APISERVER_SERVICE`]) in `namespace` as
/// other clusters reach it: `LoadBalancer` → its first ingress IP/hostname and the
/// service port; `NodePort` → a ready node's ExternalIP (else InternalIP) and the node
/// port. The etcd port is the one named `etcd` (else the first); the relay port the one
/// named `relay` (if any). `ClusterIP` is refused.
pub async fn clustermesh_endpoint(
    client: &kube::Client,
    namespace: &str,
    service: Option<&str>,
) -> Result<ClusterMeshEndpoint, KubeError> {
    let name = service.unwrap_or(APISERVER_SERVICE);
    let object = format!("Service {namespace}/{name}");
    let api: Api<Service> = Api::namespaced(client.clone(), namespace);
    let svc = api
        .get(name)
        .await
        .map_err(|e| KubeError::api("read", &object, e))?;
    let spec = svc.spec.clone().unwrap_or_default();
    let service_type = spec.type_.clone().unwrap_or_else(|| "ClusterIP".into());
    let (port, relay_port) = service_ports(
        &object,
        &service_type,
        &spec.ports.clone().unwrap_or_default(),
    )?;
    let tls_server_name = format!("{name}.{namespace}.svc");
    let host = match service_type.as_str() {
        "LoadBalancer" => svc
            .status
            .and_then(|s| s.load_balancer)
            .and_then(|lb| lb.ingress)
            .unwrap_or_default()
            .iter()
            .find_map(|i| i.ip.clone().or_else(|| i.hostname.clone()))
            .ok_or_else(|| {
                KubeError::invalid(
                    &object,
                    "status.loadBalancer.ingress",
                    "no address assigned yet (retry when the load balancer is provisioned)",
                )
            })?,
        _ => {
            let nodes: Api<Node> = Api::all(client.clone());
            let list = nodes
                .list(&ListParams::default())
                .await
                .map_err(|e| KubeError::api("list", "Nodes", e))?;
            node_address(&list.items).ok_or_else(|| {
                KubeError::invalid(
                    "Nodes",
                    "status.addresses",
                    "no ready node with an ExternalIP or InternalIP",
                )
            })?
        }
    };
    Ok(ClusterMeshEndpoint {
        host,
        port,
        relay_port,
        service_type,
        tls_server_name,
    })
}

/// The ports other clusters dial on a Service of `service_type`: `(etcd, relay)`. etcd is
/// the port named `etcd` (else the first), the relay the one named `relay` (if any);
/// `LoadBalancer` → the service ports, `NodePort` → the node ports (which must be
/// allocated); any other type is refused.
pub(crate) fn service_ports(
    object: &str,
    service_type: &str,
    ports: &[ServicePort],
) -> Result<(u16, Option<u16>), KubeError> {
    let etcd = ports
        .iter()
        .find(|p| p.name.as_deref() == Some(ETCD_PORT_NAME))
        .or_else(|| ports.first())
        .ok_or_else(|| KubeError::invalid(object, "spec.ports", "no ports"))?;
    let relay = ports
        .iter()
        .find(|p| p.name.as_deref() == Some(RELAY_PORT_NAME));
    let pick = |p: &ServicePort| -> Result<u16, KubeError> {
        let which = p.name.as_deref().unwrap_or("0");
        let (n, field) = match service_type {
            "LoadBalancer" => (p.port, format!("spec.ports[{which}].port")),
            _ => (
                p.node_port.ok_or_else(|| {
                    KubeError::invalid(
                        object,
                        format!("spec.ports[{which}].nodePort"),
                        "not allocated",
                    )
                })?,
                format!("spec.ports[{which}].nodePort"),
            ),
        };
        u16::try_from(n)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| KubeError::invalid(object, field, format!("invalid port {n}")))
    };
    match service_type {
        "LoadBalancer" | "NodePort" => Ok((pick(etcd)?, relay.map(pick).transpose()?)),
        other => Err(KubeError::invalid(
            object,
            "spec.type",
            format!(
                "{other} is not reachable from other clusters: install with service.type NodePort or LoadBalancer"
            ),
        )),
    }
}

/// A ready node's ExternalIP, else InternalIP (nodes in name order; the first wins).
pub(crate) fn node_address(nodes: &[Node]) -> Option<String> {
    let ready = |n: &&Node| {
        n.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_none_or(|c| {
                c.iter()
                    .find(|c| c.type_ == "Ready")
                    .is_none_or(|c| c.status == "True")
            })
    };
    let mut nodes: Vec<&Node> = nodes.iter().filter(ready).collect();
    nodes.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    for kind in ["ExternalIP", "InternalIP"] {
        for n in &nodes {
            let addr = n
                .status
                .as_ref()
                .and_then(|s| s.addresses.as_ref())
                .and_then(|a| a.iter().find(|a| a.type_ == kind));
            if let Some(a) = addr {
                return Some(a.address.clone());
            }
        }
    }
    None
}
