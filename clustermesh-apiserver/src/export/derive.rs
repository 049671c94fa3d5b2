//! Pure derivations: Kubernetes objects → labels, ipcache entries, nodes, cluster services.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node as K8sNode, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use meshd::model::{
    Affinity, Backend, BackendPort, CLUSTER_LABEL, ClusterId, ClusterName, ClusterService, Label,
    LabelSource, Labels, NAMESPACE_LABEL, NamedPort, Node, NodeAddress, NodeAddressType, Protocol,
    ServicePort,
};

use crate::source::ServiceExport;

/// Annotation that makes a service global.
pub const GLOBAL_ANNOTATION: &str = "service.meshd.io/global";
/// Annotation that keeps local backends out of the mesh when "false".
pub const SHARED_ANNOTATION: &str = "service.meshd.io/shared";
/// Annotation choosing backend affinity.
pub const AFFINITY_ANNOTATION: &str = "service.meshd.io/affinity";
/// Label of an EndpointSlice naming its service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What the exporter needs of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// Security labels (pod labels + namespace + cluster).
    pub labels: Labels,
    /// Pod IPs (empty when the pod has none or uses the host network).
    pub ips: Vec<IpAddr>,
    /// Node IP.
    pub host_ip: Option<IpAddr>,
    /// Node name.
    pub node: Option<String>,
    /// Named container ports.
    pub named_ports: BTreeMap<String, NamedPort>,
}

/// A problem in one field of an object (reported, never fatal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted field path.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn ferr(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

fn protocol(p: Option<&str>, field: &str) -> Result<Protocol, FieldError> {
    p.unwrap_or("TCP")
        .parse()
        .map_err(|e: meshd::model::ModelError| ferr(field, e.to_string()))
}

fn port(n: i32, field: &str) -> Result<u16, FieldError> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ferr(field, format!("{n} is not a port (1-65535)")))
}

/// Pod labels that differ per pod or per rollout and would give every pod its own
/// identity; they are left out of security labels (as Cilium's default label filter does).
pub const EXCLUDED_POD_LABELS: &[&str] = &[
    "pod-template-hash",
    "pod-template-generation",
    "controller-revision-hash",
    "controller-uid",
    "job-name",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/controller-uid",
    "batch.kubernetes.io/job-name",
    "batch.kubernetes.io/job-completion-index",
];

/// Derives a pod's security labels: its Kubernetes labels plus the namespace and cluster
/// labels (which a pod cannot set itself).
pub fn pod_labels(pod: &Pod, cluster: &ClusterName) -> Result<Labels, FieldError> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut labels = vec![
        Label::cluster(cluster),
        Label::new(LabelSource::K8s, NAMESPACE_LABEL, ns)
            .map_err(|e| ferr("metadata.namespace", e.to_string()))?,
    ];
    for (k, v) in pod.metadata.labels.iter().flatten() {
        if k == CLUSTER_LABEL || k == NAMESPACE_LABEL || EXCLUDED_POD_LABELS.contains(&k.as_str()) {
            continue;
        }
        labels.push(
            Label::new(LabelSource::K8s, k.as_str(), v.as_str())
                .map_err(|e| ferr(format!("metadata.labels[{k}]"), e.to_string()))?,
        );
    }
    Labels::new(labels).map_err(|e| ferr("metadata.labels", e.to_string()))
}

/// Derives a pod's labels and addresses. Pods that have finished (Succeeded/Failed) or use
/// the host network export no IPs.
pub fn pod_info(pod: &Pod, cluster: &ClusterName) -> Result<PodInfo, FieldError> {
    let labels = pod_labels(pod, cluster)?;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let finished = matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let mut ips = Vec::new();
    if !finished && !host_network {
        let listed = status.and_then(|s| s.pod_ips.as_ref());
        let texts: Vec<&str> = match listed {
            Some(list) if !list.is_empty() => list.iter().map(|p| p.ip.as_str()).collect(),
            _ => status
                .and_then(|s| s.pod_ip.as_deref())
                .into_iter()
                .collect(),
        };
        for (i, t) in texts.iter().enumerate() {
            let ip: IpAddr = t.parse().map_err(|_| {
                ferr(
                    format!("status.podIPs[{i}].ip"),
                    format!("{t:?} is not an IP"),
                )
            })?;
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
    }
    let host_ip = match status.and_then(|s| s.host_ip.as_deref()) {
        Some(t) => Some(
            t.parse()
                .map_err(|_| ferr("status.hostIP", format!("{t:?} is not an IP")))?,
        ),
        None => None,
    };
    let mut named_ports = BTreeMap::new();
    for (ci, c) in spec
        .map(|s| s.containers.as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        for (pi, p) in c.ports.iter().flatten().enumerate() {
            if let Some(name) = &p.name {
                let path = format!("spec.containers[{ci}].ports[{pi}]");
                named_ports.insert(
                    name.clone(),
                    NamedPort {
                        port: port(p.container_port, &format!("{path}.containerPort"))?,
                        protocol: protocol(p.protocol.as_deref(), &format!("{path}.protocol"))?,
                    },
                );
            }
        }
    }
    Ok(PodInfo {
        labels,
        ips,
        host_ip,
        node: spec.and_then(|s| s.node_name.clone()),
        named_ports,
    })
}

/// Derives the exported node.
pub fn node(n: &K8sNode, cluster: &ClusterName, cluster_id: ClusterId) -> Result<Node, FieldError> {
    let mut addresses = Vec::new();
    for (i, a) in n
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .enumerate()
    {
        let kind = match a.type_.as_str() {
            "InternalIP" => NodeAddressType::InternalIP,
            "ExternalIP" => NodeAddressType::ExternalIP,
            _ => continue,
        };
        let ip = a.address.parse().map_err(|_| {
            ferr(
                format!("status.addresses[{i}].address"),
                format!("{:?} is not an IP", a.address),
            )
        })?;
        addresses.push(NodeAddress { kind, ip });
    }
    let spec = n.spec.as_ref();
    let cidrs: Vec<&String> = match spec.and_then(|s| s.pod_cidrs.as_ref()) {
        Some(v) if !v.is_empty() => v.iter().collect(),
        _ => spec.and_then(|s| s.pod_cidr.as_ref()).into_iter().collect(),
    };
    let mut pod_cidrs = Vec::new();
    for (i, c) in cidrs.iter().enumerate() {
        let net: IpNet = c.parse().map_err(|_| {
            ferr(
                format!("spec.podCIDRs[{i}]"),
                format!("{c:?} is not a CIDR"),
            )
        })?;
        pod_cidrs.push(net);
    }
    Ok(Node {
        name: n.metadata.name.clone().unwrap_or_default(),
        cluster: cluster.clone(),
        cluster_id,
        addresses,
        pod_cidrs,
    })
}

/// Whether a service is offered to the mesh (annotated global or exported).
pub fn is_global(svc: &Service, export: Option<&ServiceExport>) -> bool {
    export.is_some()
        || svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(GLOBAL_ANNOTATION))
            .is_some_and(|v| v == "true")
}

/// Derives the exported service from the service, its endpoint slices and its export.
pub fn cluster_service<'a>(
    svc: &Service,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    export: Option<&ServiceExport>,
    cluster: &ClusterName,
    cluster_id: ClusterId,
) -> Result<ClusterService, FieldError> {
    let ann = svc.metadata.annotations.as_ref();
    let get = |k: &str| ann.and_then(|a| a.get(k)).map(String::as_str);
    let shared = match get(SHARED_ANNOTATION) {
        None | Some("true") => true,
        Some("false") => false,
        Some(other) => {
            return Err(ferr(
                format!("metadata.annotations[{SHARED_ANNOTATION}]"),
                format!("{other:?} is not \"true\" or \"false\""),
            ));
        }
    };
    let affinity: Affinity =
        get(AFFINITY_ANNOTATION)
            .unwrap_or("")
            .parse()
            .map_err(|e: meshd::model::ModelError| {
                ferr(
                    format!("metadata.annotations[{AFFINITY_ANNOTATION}]"),
                    e.to_string(),
                )
            })?;
    let spec = svc.spec.as_ref();
    let cluster_ips: Vec<&String> = match spec.and_then(|s| s.cluster_ips.as_ref()) {
        Some(v) if !v.is_empty() => v.iter().collect(),
        _ => spec
            .and_then(|s| s.cluster_ip.as_ref())
            .into_iter()
            .collect(),
    };
    let headless = cluster_ips.iter().any(|ip| ip.as_str() == "None");
    let mut frontends = Vec::new();
    if !headless {
        for (i, t) in cluster_ips.iter().enumerate() {
            if t.is_empty() {
                continue;
            }
            frontends.push(t.parse().map_err(|_| {
                ferr(
                    format!("spec.clusterIPs[{i}]"),
                    format!("{t:?} is not an IP"),
                )
            })?);
        }
    }
    let mut ports = Vec::new();
    for (i, p) in spec
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .enumerate()
    {
        ports.push(ServicePort {
            name: p.name.clone().unwrap_or_default(),
            port: port(p.port, &format!("spec.ports[{i}].port"))?,
            protocol: protocol(p.protocol.as_deref(), &format!("spec.ports[{i}].protocol"))?,
        });
    }
    let mut backends = BTreeMap::new();
    for slice in slices {
        let sname = slice.metadata.name.as_deref().unwrap_or("");
        let mut bports = Vec::new();
        for (i, p) in slice.ports.iter().flatten().enumerate() {
            let Some(n) = p.port else { continue };
            bports.push(BackendPort {
                name: p.name.clone().unwrap_or_default(),
                port: port(n, &format!("EndpointSlice {sname} ports[{i}].port"))?,
                protocol: protocol(
                    p.protocol.as_deref(),
                    &format!("EndpointSlice {sname} ports[{i}].protocol"),
                )?,
            });
        }
        bports.sort();
        for (ei, ep) in slice.endpoints.iter().enumerate() {
            // Kubernetes: a nil `ready` means unknown and should be treated as ready.
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            let terminating = ep
                .conditions
                .as_ref()
                .and_then(|c| c.terminating)
                .unwrap_or(false);
            if !ready || terminating {
                continue;
            }
            for (ai, a) in ep.addresses.iter().enumerate() {
                let ip: IpAddr = a.parse().map_err(|_| {
                    ferr(
                        format!("EndpointSlice {sname} endpoints[{ei}].addresses[{ai}]"),
                        format!("{a:?} is not an IP"),
                    )
                })?;
                backends.insert(
                    ip,
                    Backend {
                        ports: bports.clone(),
                        ready: true,
                        hostname: endpoint_hostname(ep),
                        node: ep.node_name.clone(),
                        zone: ep.zone.clone(),
                    },
                );
            }
        }
    }
    Ok(ClusterService {
        cluster: cluster.clone(),
        cluster_id,
        namespace: svc
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: svc.metadata.name.clone().unwrap_or_default(),
        global: is_global(svc, export),
        shared,
        affinity,
        headless,
        frontends,
        ports,
        backends,
        export_created: export.and_then(|e| e.created),
    })
}

/// The per-endpoint DNS host label of an endpoint: its `hostname`, else the name of the pod
/// its `targetRef` names (MCS DNS: `<hostname>.<clusterid>.<svc>.<ns>.svc.clusterset.local`).
fn endpoint_hostname(ep: &k8s_openapi::api::discovery::v1::Endpoint) -> Option<String> {
    ep.hostname.clone().or_else(|| {
        ep.target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| r.name.clone())
    })
}
