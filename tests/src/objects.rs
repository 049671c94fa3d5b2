//! Builders of Kubernetes objects for tests and benchmarks (addresses in 198.18.0.0/15).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Node, NodeAddress, NodeSpec, NodeStatus, Pod, PodIP, PodSpec,
    PodStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

fn meta(ns: Option<&str>, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        namespace: ns.map(str::to_owned),
        name: Some(name.to_owned()),
        labels: (!labels.is_empty()).then(|| {
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>()
        }),
        ..ObjectMeta::default()
    }
}

/// The `i`-th address of 198.18.0.0/15 (wraps within it).
pub fn test_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (i % (1 << 17)))
}

/// A running pod with one IP, a node and a named port.
pub fn pod(ns: &str, name: &str, labels: &[(&str, &str)], ip: Ipv4Addr, node: &str) -> Pod {
    Pod {
        metadata: meta(Some(ns), name, labels),
        spec: Some(PodSpec {
            node_name: Some(node.to_owned()),
            containers: vec![Container {
                name: "main".into(),
                ports: Some(vec![ContainerPort {
                    name: Some("http".into()),
                    container_port: 8080,
                    protocol: Some("TCP".into()),
                    ..ContainerPort::default()
                }]),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.to_string()),
            pod_ips: Some(vec![PodIP { ip: ip.to_string() }]),
            host_ip: Some("198.19.255.1".into()),
            ..PodStatus::default()
        }),
    }
}

/// A node with an InternalIP and a pod CIDR.
pub fn node(name: &str, ip: Ipv4Addr, cidr: &str) -> Node {
    Node {
        metadata: meta(None, name, &[]),
        spec: Some(NodeSpec {
            pod_cidr: Some(cidr.to_owned()),
            pod_cidrs: Some(vec![cidr.to_owned()]),
            ..NodeSpec::default()
        }),
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: ip.to_string(),
            }]),
            ..NodeStatus::default()
        }),
    }
}

/// A ClusterIP service on port 80 → 8080, global when `global`.
pub fn service(ns: &str, name: &str, cluster_ip: Ipv4Addr, global: bool) -> Service {
    let mut m = meta(Some(ns), name, &[]);
    if global {
        m.annotations = Some(BTreeMap::from([(
            "service.meshd.io/global".to_owned(),
            "true".to_owned(),
        )]));
    }
    Service {
        metadata: m,
        spec: Some(ServiceSpec {
            cluster_ip: Some(cluster_ip.to_string()),
            cluster_ips: Some(vec![cluster_ip.to_string()]),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// An EndpointSlice for service `svc` with ready endpoints at `ips`.
pub fn endpoint_slice(ns: &str, name: &str, svc: &str, ips: &[Ipv4Addr]) -> EndpointSlice {
    EndpointSlice {
        metadata: meta(Some(ns), name, &[("kubernetes.io/service-name", svc)]),
        address_type: "IPv4".into(),
        endpoints: ips
            .iter()
            .map(|ip| Endpoint {
                addresses: vec![ip.to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    ..EndpointConditions::default()
                }),
                node_name: Some("node-1".into()),
                ..Endpoint::default()
            })
            .collect(),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..EndpointPort::default()
        }]),
    }
}

/// Pod `i` of cluster `c`: 198.18.<c>.<i> (inside node `node-<c>`'s pod CIDR).
pub fn pod_ip(c: u8, i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, c, i)
}

/// Node `node-<c>` (address 198.19.0.<c>, pods 198.18.<c>.0/24) and its pods `p-<c>-<i>`
/// in `default` (`app=a<i mod 4>`) for every `i` in `range`.
pub fn node_with_pods(
    c: u8,
    range: std::ops::Range<u8>,
) -> Vec<clustermesh_apiserver::source::Object> {
    use clustermesh_apiserver::source::Object;
    let mut v = vec![Object::Node(Box::new(node(
        &format!("node-{c}"),
        Ipv4Addr::new(198, 19, 0, c),
        &format!("198.18.{c}.0/24"),
    )))];
    for i in range {
        v.push(Object::Pod(Box::new(pod(
            "default",
            &format!("p-{c}-{i}"),
            &[("app", &format!("a{}", i % 4))],
            pod_ip(c, i),
            &format!("node-{c}"),
        ))));
    }
    v
}

/// Cluster `c`'s small standard state: node `node-<c>` (pods 198.18.<c>.0/24), two
/// `app=web` pods `web-<c>-0/1` at 198.18.<c>.11 and .12, and the global service `shop/web`
/// (ClusterIP 198.19.<c>.10, port 80 → 8080) with its EndpointSlice.
pub fn web_cluster(c: u8) -> Vec<clustermesh_apiserver::source::Object> {
    use clustermesh_apiserver::source::Object;
    let node_name = format!("node-{c}");
    let pods = [Ipv4Addr::new(198, 18, c, 11), Ipv4Addr::new(198, 18, c, 12)];
    let mut v = vec![Object::Node(Box::new(node(
        &node_name,
        Ipv4Addr::new(198, 19, 0, c),
        &format!("198.18.{c}.0/24"),
    )))];
    for (i, a) in pods.iter().enumerate() {
        v.push(Object::Pod(Box::new(pod(
            "shop",
            &format!("web-{c}-{i}"),
            &[("app", "web")],
            *a,
            &node_name,
        ))));
    }
    v.push(Object::Service(Box::new(service(
        "shop",
        "web",
        Ipv4Addr::new(198, 19, c, 10),
        true,
    ))));
    v.push(Object::EndpointSlice(Box::new(endpoint_slice(
        "shop", "web-x", "web", &pods,
    ))));
    v
}
