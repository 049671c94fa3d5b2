//! Checks of the fields meshd uses, each problem named by its field path.

use std::collections::BTreeSet;
use std::fmt::Display;
use std::net::IpAddr;
use std::str::FromStr;

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use meshd::model::{Affinity, Label, LabelSource};

pub(super) use crate::export::derive::{
    AFFINITY_ANNOTATION, GLOBAL_ANNOTATION, SERVICE_NAME_LABEL, SHARED_ANNOTATION,
};

/// Problems found in one object, each as `path: message`.
#[derive(Debug, Default)]
pub(super) struct Issues(Vec<String>);

impl Issues {
    fn add(&mut self, path: impl Display, message: impl Display) {
        self.0.push(format!("{path}: {message}"));
    }

    /// The collected problems.
    pub(super) fn into_vec(self) -> Vec<String> {
        self.0
    }
}

/// How an object's name is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NameRule {
    /// RFC 1123 label (namespaces, services, service exports).
    Label,
    /// RFC 1123 subdomain (pods, nodes, endpoint slices, policies).
    Subdomain,
}

/// RFC 1123 label (at most 63 characters).
pub(super) fn is_dns_label(s: &str) -> bool {
    mesh_certs::names::is_dns_label(s, 63)
}

pub(super) use mesh_certs::names::is_dns_subdomain;

fn name_ok(rule: NameRule, name: &str) -> bool {
    match rule {
        NameRule::Label => is_dns_label(name),
        NameRule::Subdomain => is_dns_subdomain(name),
    }
}

fn name_problem(rule: NameRule, name: &str) -> String {
    match rule {
        NameRule::Label => format!(
            "{name:?} is not an RFC 1123 label (at most 63 lowercase alphanumerics or '-', \
             starting and ending alphanumeric)"
        ),
        NameRule::Subdomain => format!(
            "{name:?} is not an RFC 1123 subdomain (dot-separated lowercase labels, at most 253 characters)"
        ),
    }
}

fn check_dns(issues: &mut Issues, path: impl Display, rule: NameRule, value: &str) {
    if !name_ok(rule, value) {
        issues.add(path, name_problem(rule, value));
    }
}

/// Name, namespace (already defaulted for namespaced kinds) and labels.
pub(super) fn metadata(issues: &mut Issues, meta: &ObjectMeta, rule: NameRule) {
    match meta.name.as_deref() {
        None | Some("") => issues.add("metadata.name", "required"),
        Some(name) => check_dns(issues, "metadata.name", rule, name),
    }
    if let Some(ns) = meta.namespace.as_deref() {
        check_dns(issues, "metadata.namespace", NameRule::Label, ns);
    }
    for (key, value) in meta.labels.iter().flatten() {
        if let Err(e) = Label::new(LabelSource::K8s, key.as_str(), value.as_str()) {
            issues.add(format_args!("metadata.labels[{key:?}]"), e);
        }
    }
}

fn check_ip(issues: &mut Issues, path: impl Display, value: &str) -> Option<IpAddr> {
    match IpAddr::from_str(value) {
        Ok(ip) => Some(ip),
        Err(_) => {
            issues.add(path, format_args!("{value:?} is not an IP address"));
            None
        }
    }
}

fn check_cidr(issues: &mut Issues, path: impl Display, value: &str) {
    let ok = value.split_once('/').is_some_and(|(ip, len)| {
        let max = match IpAddr::from_str(ip) {
            Ok(IpAddr::V4(_)) => 32,
            Ok(IpAddr::V6(_)) => 128,
            Err(_) => return false,
        };
        len.parse::<u8>().is_ok_and(|len| len <= max)
    });
    if !ok {
        issues.add(
            path,
            format_args!("{value:?} is not a CIDR (address/prefix-length)"),
        );
    }
}

fn check_port(issues: &mut Issues, path: impl Display, port: i32) {
    if !(1..=65535).contains(&port) {
        issues.add(path, format_args!("{port} is not in 1..65535"));
    }
}

fn check_protocol(issues: &mut Issues, path: impl Display, protocol: Option<&str>) {
    if let Some(p) = protocol
        && !matches!(p, "TCP" | "UDP" | "SCTP")
    {
        issues.add(path, format_args!("{p:?} is not TCP, UDP or SCTP"));
    }
}

/// IANA service name (container port names, named target ports): at most 15 lowercase
/// alphanumerics or '-', at least one letter, no leading, trailing or double '-'.
fn check_port_name(issues: &mut Issues, path: impl Display, name: &str) {
    let ok = is_dns_label(name)
        && name.len() <= 15
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.contains("--");
    if !ok {
        issues.add(
            path,
            format_args!("{name:?} is not a valid port name (IANA service name: at most 15 lowercase alphanumerics or '-', with a letter)"),
        );
    }
}

fn check_bool_annotation(issues: &mut Issues, meta: &ObjectMeta, key: &str) {
    if let Some(v) = meta.annotations.as_ref().and_then(|a| a.get(key))
        && !matches!(v.as_str(), "true" | "false")
    {
        issues.add(
            format_args!("metadata.annotations[{key:?}]"),
            format_args!("{v:?} is not \"true\" or \"false\""),
        );
    }
}

/// A service: type, cluster IPs, ports and the meshd annotations.
pub(super) fn service(issues: &mut Issues, svc: &Service) {
    check_bool_annotation(issues, &svc.metadata, GLOBAL_ANNOTATION);
    check_bool_annotation(issues, &svc.metadata, SHARED_ANNOTATION);
    if let Some(v) = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(AFFINITY_ANNOTATION))
        && let Err(e) = Affinity::from_str(v)
    {
        issues.add(
            format_args!("metadata.annotations[{AFFINITY_ANNOTATION:?}]"),
            e,
        );
    }
    let Some(spec) = &svc.spec else {
        issues.add("spec", "required");
        return;
    };
    if let Some(t) = spec.type_.as_deref()
        && !matches!(
            t,
            "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
        )
    {
        issues.add(
            "spec.type",
            format_args!("{t:?} is not ClusterIP, NodePort, LoadBalancer or ExternalName"),
        );
    }
    let cluster_ip = |issues: &mut Issues, path: &str, ip: &str| {
        if !matches!(ip, "" | "None") {
            check_ip(issues, path, ip);
        }
    };
    if let Some(ip) = spec.cluster_ip.as_deref() {
        cluster_ip(issues, "spec.clusterIP", ip);
    }
    for (i, ip) in spec.cluster_ips.iter().flatten().enumerate() {
        cluster_ip(issues, &format!("spec.clusterIPs[{i}]"), ip);
    }
    if let (Some(ip), Some(first)) = (
        spec.cluster_ip.as_deref(),
        spec.cluster_ips.as_ref().and_then(|ips| ips.first()),
    ) && ip != first
    {
        issues.add(
            "spec.clusterIPs[0]",
            format_args!("{first:?} differs from spec.clusterIP {ip:?}"),
        );
    }
    service_ports(issues, spec.ports.as_deref().unwrap_or_default());
}

fn service_ports(issues: &mut Issues, ports: &[k8s_openapi::api::core::v1::ServicePort]) {
    let mut names = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        check_port(issues, format_args!("spec.ports[{i}].port"), p.port);
        check_protocol(
            issues,
            format_args!("spec.ports[{i}].protocol"),
            p.protocol.as_deref(),
        );
        match &p.target_port {
            Some(IntOrString::Int(port)) => {
                check_port(issues, format_args!("spec.ports[{i}].targetPort"), *port);
            }
            Some(IntOrString::String(name)) => {
                check_port_name(issues, format_args!("spec.ports[{i}].targetPort"), name);
            }
            None => {}
        }
        match p.name.as_deref() {
            Some(name) if !name.is_empty() => {
                check_dns(
                    issues,
                    format_args!("spec.ports[{i}].name"),
                    NameRule::Label,
                    name,
                );
                if !names.insert(name) {
                    issues.add(
                        format_args!("spec.ports[{i}].name"),
                        format_args!("duplicate port name {name:?}"),
                    );
                }
            }
            _ if ports.len() > 1 => {
                issues.add(
                    format_args!("spec.ports[{i}].name"),
                    "required when a service has more than one port",
                );
            }
            _ => {}
        }
    }
}

/// An endpoint slice: address type, addresses, ports and the service-name label.
pub(super) fn endpoint_slice(issues: &mut Issues, slice: &EndpointSlice) {
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL));
    match service {
        None => issues.add(
            format_args!("metadata.labels[{SERVICE_NAME_LABEL:?}]"),
            "required (the slice's service)",
        ),
        Some(name) => check_dns(
            issues,
            format_args!("metadata.labels[{SERVICE_NAME_LABEL:?}]"),
            NameRule::Label,
            name,
        ),
    }
    let family = slice.address_type.as_str();
    if !matches!(family, "IPv4" | "IPv6" | "FQDN") {
        issues.add(
            "addressType",
            format_args!("{family:?} is not IPv4, IPv6 or FQDN"),
        );
    }
    for (i, ep) in slice.endpoints.iter().enumerate() {
        if ep.addresses.is_empty() {
            issues.add(
                format_args!("endpoints[{i}].addresses"),
                "at least one address is required",
            );
        }
        for (j, addr) in ep.addresses.iter().enumerate() {
            endpoint_address(
                issues,
                family,
                &format!("endpoints[{i}].addresses[{j}]"),
                addr,
            );
        }
        if let Some(h) = ep.hostname.as_deref() {
            check_dns(
                issues,
                format_args!("endpoints[{i}].hostname"),
                NameRule::Label,
                h,
            );
        }
        if let Some(n) = ep.node_name.as_deref() {
            check_dns(
                issues,
                format_args!("endpoints[{i}].nodeName"),
                NameRule::Subdomain,
                n,
            );
        }
    }
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        if let Some(port) = p.port {
            check_port(issues, format_args!("ports[{i}].port"), port);
        }
        check_protocol(
            issues,
            format_args!("ports[{i}].protocol"),
            p.protocol.as_deref(),
        );
        if let Some(name) = p.name.as_deref().filter(|n| !n.is_empty()) {
            check_dns(
                issues,
                format_args!("ports[{i}].name"),
                NameRule::Label,
                name,
            );
        }
    }
}

fn endpoint_address(issues: &mut Issues, family: &str, path: &str, addr: &str) {
    match family {
        "IPv4" | "IPv6" => {
            let ip = check_ip(issues, path, addr);
            let wrong = match ip {
                Some(IpAddr::V4(_)) => family == "IPv6",
                Some(IpAddr::V6(_)) => family == "IPv4",
                None => false,
            };
            if wrong {
                issues.add(
                    path,
                    format_args!("{addr:?} is not an {family} address (addressType)"),
                );
            }
        }
        "FQDN" => check_dns(issues, path, NameRule::Subdomain, addr),
        _ => {}
    }
}

/// A pod: node, hostname, container ports and status IPs.
pub(super) fn pod(issues: &mut Issues, pod: &Pod) {
    if let Some(spec) = &pod.spec {
        if let Some(n) = spec.node_name.as_deref() {
            check_dns(issues, "spec.nodeName", NameRule::Subdomain, n);
        }
        if let Some(h) = spec.hostname.as_deref() {
            check_dns(issues, "spec.hostname", NameRule::Label, h);
        }
        if let Some(s) = spec.subdomain.as_deref() {
            check_dns(issues, "spec.subdomain", NameRule::Label, s);
        }
        for (i, c) in spec.containers.iter().enumerate() {
            for (j, p) in c.ports.iter().flatten().enumerate() {
                let path = format!("spec.containers[{i}].ports[{j}]");
                check_port(
                    issues,
                    format_args!("{path}.containerPort"),
                    p.container_port,
                );
                check_protocol(
                    issues,
                    format_args!("{path}.protocol"),
                    p.protocol.as_deref(),
                );
                if let Some(name) = p.name.as_deref() {
                    check_port_name(issues, format_args!("{path}.name"), name);
                }
            }
        }
    }
    let Some(status) = &pod.status else { return };
    if let Some(phase) = status.phase.as_deref()
        && !matches!(
            phase,
            "Pending" | "Running" | "Succeeded" | "Failed" | "Unknown"
        )
    {
        issues.add(
            "status.phase",
            format_args!("{phase:?} is not Pending, Running, Succeeded, Failed or Unknown"),
        );
    }
    let pod_ip = status
        .pod_ip
        .as_deref()
        .and_then(|ip| check_ip(issues, "status.podIP", ip));
    for (i, ip) in status.pod_ips.iter().flatten().enumerate() {
        let parsed = check_ip(issues, format_args!("status.podIPs[{i}].ip"), &ip.ip);
        if i == 0
            && let (Some(first), Some(pod_ip)) = (parsed, pod_ip)
            && first != pod_ip
        {
            issues.add(
                "status.podIPs[0].ip",
                format_args!("{first} differs from status.podIP {pod_ip}"),
            );
        }
    }
    if let Some(ip) = status.host_ip.as_deref() {
        check_ip(issues, "status.hostIP", ip);
    }
    for (i, ip) in status.host_ips.iter().flatten().enumerate() {
        check_ip(issues, format_args!("status.hostIPs[{i}].ip"), &ip.ip);
    }
}

/// A node: pod CIDRs and addresses.
pub(super) fn node(issues: &mut Issues, node: &Node) {
    if let Some(spec) = &node.spec {
        if let Some(cidr) = spec.pod_cidr.as_deref() {
            check_cidr(issues, "spec.podCIDR", cidr);
        }
        for (i, cidr) in spec.pod_cidrs.iter().flatten().enumerate() {
            check_cidr(issues, format_args!("spec.podCIDRs[{i}]"), cidr);
        }
    }
    let addresses = node.status.as_ref().and_then(|s| s.addresses.as_deref());
    for (i, a) in addresses.unwrap_or_default().iter().enumerate() {
        let path = format!("status.addresses[{i}].address");
        match a.type_.as_str() {
            "InternalIP" | "ExternalIP" => {
                check_ip(issues, path, &a.address);
            }
            "Hostname" | "InternalDNS" | "ExternalDNS" => {
                check_dns(issues, path, NameRule::Subdomain, &a.address);
            }
            other => issues.add(
                format_args!("status.addresses[{i}].type"),
                format_args!(
                    "{other:?} is not InternalIP, ExternalIP, Hostname, InternalDNS or ExternalDNS"
                ),
            ),
        }
    }
}
