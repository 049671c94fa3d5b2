//! MCS status write-back against two clusters with their own in-process Kubernetes API
//! servers and real etcd: ServiceImports for the global service in both clusters, and the
//! ServiceExport conditions Valid / Ready / Conflict (a port conflict, decided by the older
//! export) and Valid=False NoService for an export without a Service.

use std::time::Duration;

use clustermesh_apiserver::source::kube::status::{MCS_GROUP, reconcile};
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use mesh_tests::init_tracing;
use mesh_tests::kube_cluster::{KubeCluster, connect_by_context};
use mesh_tests::objects::service;
use serde_json::{Value, json};

const CONVERGE: Duration = Duration::from_secs(60);

fn ar(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(MCS_GROUP, "v1beta1", kind), plural)
}

/// Namespace `shop`, Service `web` (80/`proto`, named `http`, not annotated) and a
/// ServiceExport for it, plus a ServiceExport `ghost` without a Service.
async fn export_web(c: &KubeCluster, proto: &str, ghost: bool) {
    let pp = PostParams::default();
    let _ = Api::<Namespace>::all(c.client.clone())
        .create(
            &pp,
            &serde_json::from_value(json!({"metadata": {"name": "shop"}})).unwrap(),
        )
        .await;
    let mut svc = service(
        "shop",
        "web",
        std::net::Ipv4Addr::new(198, 19, 50, 10),
        false,
    );
    if let Some(p) = svc.spec.as_mut().and_then(|s| s.ports.as_mut()) {
        p[0].protocol = Some(proto.into());
    }
    Api::<Service>::namespaced(c.client.clone(), "shop")
        .create(&pp, &svc)
        .await
        .unwrap();
    let exports: Api<DynamicObject> = Api::namespaced_with(
        c.client.clone(),
        "shop",
        &ar("ServiceExport", "serviceexports"),
    );
    let mut names = vec!["web"];
    if ghost {
        names.push("ghost");
    }
    for n in names {
        exports
            .create(
                &pp,
                &DynamicObject::new(n, &ar("ServiceExport", "serviceexports")),
            )
            .await
            .unwrap();
    }
}

fn cond<'a>(obj: &'a DynamicObject, kind: &str) -> Option<&'a Value> {
    obj.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_mcs_status_imports_and_export_conditions() {
    init_tracing();
    let east = Box::pin(KubeCluster::start("east", 1)).await.unwrap();
    let west = Box::pin(KubeCluster::start("west", 2)).await.unwrap();
    export_web(&east, "TCP", true).await;
    // Export timestamps have second precision: west's export is the younger one.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    export_web(&west, "UDP", false).await;
    connect_by_context(&east, &west).await.unwrap();

    let deadline = tokio::time::Instant::now() + CONVERGE;
    let (imports, exports) = loop {
        for c in [&east, &west] {
            if let Err(e) = reconcile(&c.client, &*c.store, &c.name).await {
                eprintln!("{}: {e}", c.name);
            }
        }
        let imp: Api<DynamicObject> = Api::namespaced_with(
            east.client.clone(),
            "shop",
            &ar("ServiceImport", "serviceimports"),
        );
        let exp: Api<DynamicObject> = Api::namespaced_with(
            east.client.clone(),
            "shop",
            &ar("ServiceExport", "serviceexports"),
        );
        let web_import = imp.get_opt("web").await.unwrap();
        let web_export = exp.get("web").await.unwrap();
        let conflicted = cond(&web_export, "Conflict").is_some_and(|c| c["status"] == "True");
        if let Some(i) = web_import
            && conflicted
        {
            break (i, exp);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no ServiceImport / conflict yet: {:#?}",
            web_export.data
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };

    // The import: type and the ports of the older export (east's 80/TCP).
    assert_eq!(
        imports.data["spec"]["type"], "ClusterSetIP",
        "{:#?}",
        imports.data
    );
    assert_eq!(
        imports.data["spec"]["ports"],
        json!([{"name": "http", "port": 80, "protocol": "TCP"}]),
        "{:#?}",
        imports.data
    );
    // Conditions on east's export: valid, ready, and the port conflict naming west.
    let web = exports.get("web").await.unwrap();
    assert_eq!(cond(&web, "Valid").unwrap()["status"], "True");
    assert_eq!(cond(&web, "Ready").unwrap()["status"], "True");
    let c = cond(&web, "Conflict").unwrap();
    assert_eq!(c["reason"], "PortConflict", "{c}");
    assert!(c["message"].as_str().unwrap().contains("west"), "{c}");
    // An export without a Service.
    let ghost = exports.get("ghost").await.unwrap();
    let v = cond(&ghost, "Valid").unwrap();
    assert_eq!(
        (&v["status"], &v["reason"]),
        (&json!("False"), &json!("NoService"))
    );
    assert_eq!(cond(&ghost, "Ready").unwrap()["reason"], "Pending");
    // West imports it too.
    let imp: Api<DynamicObject> = Api::namespaced_with(
        west.client.clone(),
        "shop",
        &ar("ServiceImport", "serviceimports"),
    );
    assert!(imp.get_opt("web").await.unwrap().is_some());
}
