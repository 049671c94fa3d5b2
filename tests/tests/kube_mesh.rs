//! Two clusters in Kubernetes mode, each its own in-process API server + real etcd +
//! exporter on the Kubernetes source + kvstoremesh and agent reading peer Secrets: objects
//! created through one API reach the other cluster's agent; peer Secrets written through
//! the API (as `meshctl connect --context` does) make both ready; a malformed Secret is
//! reported as an Event and in status and leaves the other peer alone; deleting the Secret
//! disconnects.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, PostParams};
use mesh_agent::runtime::ViewHandles;
use mesh_tests::init_tracing;
use mesh_tests::kube_cluster::{
    KubeCluster, MESHD_NAMESPACE, connect_by_context, create_with_status,
};
use mesh_tests::objects::{endpoint_slice, pod, service, test_ip};
use serde_json::json;

const CONVERGE: Duration = Duration::from_secs(60);

async fn wait_for(what: &str, h: &ViewHandles, f: impl Fn(&ViewHandles) -> bool) {
    let deadline = tokio::time::Instant::now() + CONVERGE;
    while !f(h) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; status: {:#?}",
            *h.status.borrow()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn active(h: &ViewHandles, ns: &str, name: &str) -> BTreeSet<(String, IpAddr)> {
    let snap = h.services.borrow().clone();
    snap.service(ns, name)
        .map(|s| s.active().map(|b| (b.cluster.to_string(), b.ip)).collect())
        .unwrap_or_default()
}

/// A namespace `shop` with a global service `web` and one pod, created through the API.
async fn create_web(c: &KubeCluster, ip: std::net::Ipv4Addr, cluster_ip: std::net::Ipv4Addr) {
    let pp = PostParams::default();
    let client = c.client.clone();
    let _ = Api::<Namespace>::all(client.clone())
        .create(
            &pp,
            &serde_json::from_value(json!({"metadata": {"name": "shop"}})).unwrap(),
        )
        .await;
    let name = format!("web-{}", c.name);
    create_with_status(
        &Api::<Pod>::namespaced(client.clone(), "shop"),
        &pod("shop", &name, &[("app", "web")], ip, "node-1"),
    )
    .await
    .unwrap();
    Api::<Service>::namespaced(client.clone(), "shop")
        .create(&pp, &service("shop", "web", cluster_ip, true))
        .await
        .unwrap();
    Api::<EndpointSlice>::namespaced(client, "shop")
        .create(
            &pp,
            &endpoint_slice("shop", &format!("web-{}", c.name), "web", &[ip]),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_mesh_two_clusters_through_the_api() {
    init_tracing();
    let (east, west) = tokio::join!(KubeCluster::start("east", 1), KubeCluster::start("west", 2));
    let (east, west) = (east.unwrap(), west.unwrap());
    let (east_ip, west_ip) = (test_ip(101), test_ip(201));
    create_web(&east, east_ip, test_ip(1001)).await;
    create_web(&west, west_ip, test_ip(2001)).await;

    // Before peering, each agent sees only its own backend.
    let eh = east.agent.handles();
    let wh = west.agent.handles();
    wait_for("east's own backend", &eh, |h| {
        active(h, "shop", "web") == BTreeSet::from([("east".to_owned(), east_ip.into())])
    })
    .await;

    connect_by_context(&east, &west).await.unwrap();
    let both = BTreeSet::from([
        ("east".to_owned(), IpAddr::from(east_ip)),
        ("west".to_owned(), IpAddr::from(west_ip)),
    ]);
    for h in [&eh, &wh] {
        wait_for("both backends in each agent", h, |h| {
            active(h, "shop", "web") == both
        })
        .await;
        wait_for("agent ready with its peer", h, |h| {
            let s = h.status.borrow();
            s.ready && s.peers.len() == 1
        })
        .await;
    }
    let mut ks = east.kvstoremesh_status.clone();
    tokio::time::timeout(CONVERGE, ks.wait_for(|p| p.len() == 1 && p[0].is_ready()))
        .await
        .expect("east's kvstoremesh ready with west")
        .unwrap();
    let cached = east
        .store
        .get(&format!("mesh/cache/ip/v1/west/{west_ip}"))
        .await
        .unwrap();
    assert!(cached.is_some(), "west's pod is mirrored into east's etcd");

    // A change through west's API reaches east's agent.
    let new_ip = test_ip(202);
    let pp = PostParams::default();
    create_with_status(
        &Api::<Pod>::namespaced(west.client.clone(), "shop"),
        &pod("shop", "web-west-2", &[("app", "web")], new_ip, "node-1"),
    )
    .await
    .unwrap();
    Api::<EndpointSlice>::namespaced(west.client.clone(), "shop")
        .create(&pp, &endpoint_slice("shop", "web-west-2", "web", &[new_ip]))
        .await
        .unwrap();
    wait_for("west's second backend in east", &eh, |h| {
        active(h, "shop", "web").contains(&("west".to_owned(), new_ip.into()))
    })
    .await;

    // A malformed peer Secret: a Warning Event on it and an error in status; west stays.
    let bogus: Secret = serde_json::from_value(json!({
        "metadata": {"name": "meshd-peer-south", "labels": {"meshd.io/peer": "true"}},
        "data": {"kubeconfig": "bm90IGEga3ViZWNvbmZpZw=="},
    }))
    .unwrap();
    Api::<Secret>::namespaced(east.client.clone(), MESHD_NAMESPACE)
        .create(&pp, &bogus)
        .await
        .unwrap();
    wait_for("the bad Secret in the agent's status", &eh, |h| {
        h.status
            .borrow()
            .peer_errors
            .iter()
            .any(|(path, e)| path.contains("meshd-peer-south") && e.contains("kubeconfig"))
    })
    .await;
    let events: Api<kube::api::DynamicObject> = Api::namespaced_with(
        east.client.clone(),
        MESHD_NAMESPACE,
        &kube::api::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk("events.k8s.io", "v1", "Event"),
            "events",
        ),
    );
    let deadline = tokio::time::Instant::now() + CONVERGE;
    loop {
        let list = events.list(&ListParams::default()).await.unwrap();
        let found = list.items.iter().any(|e| {
            e.data["reason"] == "InvalidPeerCredential"
                && e.data["regarding"]["name"] == "meshd-peer-south"
                && e.data["type"] == "Warning"
        });
        if found {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no Event: {list:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    {
        let s = eh.status.borrow();
        assert!(s.ready, "west is unaffected: {s:#?}");
        assert_eq!(s.peers.len(), 1);
    }

    // Deleting the peer Secret disconnects: west's backends leave east's view.
    assert!(
        meshd::kube::delete_peer_secret(&east.client, MESHD_NAMESPACE, &west.name)
            .await
            .unwrap()
    );
    wait_for("west drained from east", &eh, |h| {
        active(h, "shop", "web") == BTreeSet::from([("east".to_owned(), east_ip.into())])
    })
    .await;
    let listed = meshd::kube::list_peer_secrets(&east.client, MESHD_NAMESPACE)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].1.is_err(), "only the bad Secret is left");
}
