//! Tests of the peer Secret state machine and node address choice (synthetic objects, no I/O).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeStatus, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::watcher::Event;
use mesh_certs::{CertRequest, CertificateAuthority};

use super::secrets::SecretState;
use super::*;
use crate::model::{ClusterId, MaxConnectedClusters};
use crate::peers::{PeerCredential, PeerEvent};

fn cred(name: &str, id: u32) -> PeerCredential {
    let ca = CertificateAuthority::generate("ca", Duration::from_secs(3600)).unwrap();
    let leaf = ca.issue(&CertRequest::client("remote-east")).unwrap();
    PeerCredential {
        name: crate::model::ClusterName::new(name).unwrap(),
        cluster_id: ClusterId::new(id, MaxConnectedClusters::C255).unwrap(),
        max_connected_clusters: MaxConnectedClusters::C255,
        server: "https://198.18.0.1:32379".into(),
        ca_pem: ca.cert_pem().to_owned(),
        cert_pem: leaf.cert_pem,
        key_pem: leaf.key_pem,
        tls_server_name: Some("clustermesh-apiserver.meshd.svc".into()),
    }
}

fn secret(name: &str, kubeconfig: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("meshd".into()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            "kubeconfig".to_owned(),
            ByteString(kubeconfig.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    }
}

fn kinds(evs: &[(PeerEvent, Option<Secret>)]) -> Vec<String> {
    evs.iter()
        .map(|(e, _)| match e {
            PeerEvent::Upsert(c) => format!("upsert {}", c.name),
            PeerEvent::Remove(n) => format!("remove {n}"),
            PeerEvent::Error { error, .. } => format!("error {error}"),
            PeerEvent::Synced => "synced".into(),
        })
        .collect()
}

#[test]
fn secrets_follow_the_peers_directory_lifecycle() {
    let west = cred("west", 2);
    let north = cred("north", 3);
    let mut st = SecretState::default();
    let mut evs = st.apply("meshd", Event::Init);
    evs.extend(st.apply(
        "meshd",
        Event::InitApply(secret(
            "meshd-peer-west",
            &west.to_kubeconfig_yaml("remote-east"),
        )),
    ));
    evs.extend(st.apply(
        "meshd",
        Event::InitApply(secret(
            "meshd-peer-north",
            &north.to_kubeconfig_yaml("remote-east"),
        )),
    ));
    evs.extend(st.apply("meshd", Event::InitDone));
    assert_eq!(kinds(&evs), ["upsert west", "upsert north", "synced"]);

    // Unchanged: nothing. Broken: an error naming the Secret and field, with the Secret
    // (for the Event); the good credential stays (no remove).
    let evs = st.apply(
        "meshd",
        Event::Apply(secret(
            "meshd-peer-west",
            &west.to_kubeconfig_yaml("remote-east"),
        )),
    );
    assert!(evs.is_empty());
    let broken = west
        .to_kubeconfig_yaml("remote-east")
        .replace("client-key-data: ", "client-key-data: x");
    let evs = st.apply("meshd", Event::Apply(secret("meshd-peer-west", &broken)));
    let k = kinds(&evs);
    assert_eq!(k.len(), 1);
    assert!(
        k[0].starts_with(
            "error Secret/meshd/meshd-peer-west/kubeconfig: users[0].user.client-key-data"
        ),
        "{k:?}"
    );
    assert!(evs[0].1.is_some());
    // Reported once.
    assert!(
        st.apply("meshd", Event::Apply(secret("meshd-peer-west", &broken)))
            .is_empty()
    );

    // A relist (410) where north did not come back removes it; west is healed.
    let mut evs = st.apply("meshd", Event::Init);
    evs.extend(st.apply(
        "meshd",
        Event::InitApply(secret(
            "meshd-peer-west",
            &west.to_kubeconfig_yaml("remote-east"),
        )),
    ));
    evs.extend(st.apply("meshd", Event::InitDone));
    assert_eq!(kinds(&evs), ["upsert west", "remove north"]);

    let evs = st.apply("meshd", Event::Delete(secret("meshd-peer-west", "")));
    assert_eq!(kinds(&evs), ["remove west"]);
}

#[test]
fn secret_name_key_and_file_references_are_checked() {
    let west = cred("west", 2);
    let yaml = west.to_kubeconfig_yaml("remote-east");
    let e = parse_peer_secret("meshd", &secret("meshd-peer-north", &yaml)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Secret/meshd/meshd-peer-north: metadata.name: the Secret is for cluster \"north\" but its kubeconfig is for \"west\""
    );
    let e = parse_peer_secret("meshd", &secret("peer-west", &yaml)).unwrap_err();
    assert_eq!(e.field(), Some("metadata.name"));
    let mut s = secret("meshd-peer-west", &yaml);
    s.data = None;
    let e = parse_peer_secret("meshd", &s).unwrap_err();
    assert_eq!(e.field(), Some("data.kubeconfig"));
    let files = yaml.replacen(
        "client-key-data: ",
        "client-key: /etc/passwd\n    x-data: ",
        1,
    );
    let e = parse_peer_secret("meshd", &secret("meshd-peer-west", &files)).unwrap_err();
    assert_eq!(e.field(), Some("users[0].user.client-key"), "{e}");
    assert_eq!(peer_secret_name(&west.name), "meshd-peer-west");
}

fn node(name: &str, ready: bool, addrs: &[(&str, &str)]) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        status: Some(NodeStatus {
            addresses: Some(
                addrs
                    .iter()
                    .map(|(t, a)| NodeAddress {
                        type_: (*t).into(),
                        address: (*a).into(),
                    })
                    .collect(),
            ),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..NodeCondition::default()
            }]),
            ..NodeStatus::default()
        }),
        ..Node::default()
    }
}

#[test]
fn node_port_address_prefers_ready_external_ips() {
    let nodes = [
        node("a", false, &[("ExternalIP", "198.18.9.1")]),
        node("c", true, &[("InternalIP", "198.18.0.3")]),
        node(
            "b",
            true,
            &[("InternalIP", "198.18.0.2"), ("ExternalIP", "198.18.9.2")],
        ),
    ];
    assert_eq!(cluster::node_address(&nodes).as_deref(), Some("198.18.9.2"));
    assert_eq!(
        cluster::node_address(&nodes[..2]).as_deref(),
        Some("198.18.0.3")
    );
    assert_eq!(cluster::node_address(&nodes[..1]), None);
}

fn port(name: &str, port: i32, node_port: Option<i32>) -> k8s_openapi::api::core::v1::ServicePort {
    k8s_openapi::api::core::v1::ServicePort {
        name: Some(name.to_owned()),
        port,
        node_port,
        ..Default::default()
    }
}

#[test]
fn service_ports_find_etcd_and_the_relay() {
    let o = "Service meshd/clustermesh-apiserver";
    // The chart with the relay: etcd (agents, root) and relay (peers).
    let both = [
        port("etcd", 2379, Some(32379)),
        port("relay", 2381, Some(32381)),
    ];
    assert_eq!(
        cluster::service_ports(o, "NodePort", &both).unwrap(),
        (32379, Some(32381))
    );
    assert_eq!(
        cluster::service_ports(o, "LoadBalancer", &both).unwrap(),
        (2379, Some(2381))
    );
    // Installs before the relay: one port (named etcd, or the first), no relay.
    assert_eq!(
        cluster::service_ports(o, "NodePort", &[port("client", 2379, Some(30001))]).unwrap(),
        (30001, None)
    );
    // A relay node port not allocated yet, a ClusterIP Service: named errors.
    let e = cluster::service_ports(
        o,
        "NodePort",
        &[port("etcd", 2379, Some(32379)), port("relay", 2381, None)],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("spec.ports[relay].nodePort") && e.contains("not allocated"),
        "{e}"
    );
    let e = cluster::service_ports(o, "ClusterIP", &both)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not reachable from other clusters"), "{e}");
    assert!(cluster::service_ports(o, "NodePort", &[]).is_err());

    let ep = ClusterMeshEndpoint {
        host: "fd00::1".into(),
        port: 32379,
        relay_port: Some(32381),
        service_type: "NodePort".into(),
        tls_server_name: "clustermesh-apiserver.meshd.svc".into(),
    };
    assert_eq!(ep.url(), "https://[fd00::1]:32379");
    assert_eq!(ep.relay_url().as_deref(), Some("https://[fd00::1]:32381"));
    let old = ClusterMeshEndpoint {
        relay_port: None,
        host: "198.18.0.1".into(),
        ..ep
    };
    assert_eq!(old.relay_url(), None);
    assert_eq!(old.url(), "https://198.18.0.1:32379");
}
