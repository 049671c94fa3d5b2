//! MCS status write-back: `ServiceExport` conditions and `ServiceImport`s (KEP-1645).
//!
//! ```text
//!  local etcd: mesh/state/services/v1/<local>/…  (this cluster's exports)
//!              mesh/cache/services/v1/<peer>/…   (peers', mirrored by kvstoremesh)
//!              mesh/clusterset-ips/v1/…          (ClusterSetIPs)
//!   ─► per global service: participating clusters by precedence (oldest export first,
//!      then name), type and ports of the winner, conflicts
//!   ─► ServiceImport <ns>/<name> (type, ports, ips) in every namespace that exists here,
//!      server-side applied; imports of services no longer global are deleted
//!   ─► ServiceExport <ns>/<name> status conditions: Valid (NoService), Ready (Pending),
//!      Conflict (PortConflict / TypeConflict / NoConflicts), merge-patched on /status
//! ```
//!
//! It runs every `interval` (and needs no watch: every input is a cheap prefix read), so a
//! write that failed is simply made again on the next round.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use meshd::keys::{self, CACHE_PREFIX, Key, STATE_PREFIX, StateKind, StateValue, decode_state};
use meshd::kv::KvStore;
use meshd::model::{ClusterName, ClusterService, Protocol};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// API group of the Multi-Cluster Services API.
pub const MCS_GROUP: &str = "multicluster.x-k8s.io";
/// Field manager of our server-side applies and status patches.
const MANAGER: &str = "clustermesh-apiserver";
/// Label on the ServiceImports we manage.
const MANAGED_BY: &str = "app.kubernetes.io/managed-by";

/// One global service as the mesh sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshService {
    /// Participating clusters in precedence order.
    pub clusters: Vec<ClusterName>,
    /// Headless (per the cluster with precedence).
    pub headless: bool,
    /// Ports: the winner's, plus the others' that do not conflict.
    pub ports: Vec<(String, u16, Protocol)>,
    /// The ClusterSetIP, if allocated.
    pub ip: Option<IpAddr>,
    /// Conflicts: (reason, message naming the clusters).
    pub conflicts: Vec<(&'static str, String)>,
}

/// Merges the exports of every cluster per MCS rules (precedence: oldest export, then name).
pub fn merge(
    services: &[ClusterService],
    ips: &BTreeMap<(String, String), IpAddr>,
) -> BTreeMap<(String, String), MeshService> {
    let mut by_key: BTreeMap<(String, String), Vec<&ClusterService>> = BTreeMap::new();
    for s in services.iter().filter(|s| s.global) {
        by_key
            .entry((s.namespace.clone(), s.name.clone()))
            .or_default()
            .push(s);
    }
    let mut out = BTreeMap::new();
    for (key, mut v) in by_key {
        v.sort_by(|a, b| {
            (
                a.export_created.is_none(),
                a.export_created,
                a.cluster.as_str(),
            )
                .cmp(&(
                    b.export_created.is_none(),
                    b.export_created,
                    b.cluster.as_str(),
                ))
        });
        let winner = v[0];
        let mut conflicts = Vec::new();
        let other_type: Vec<&str> = v[1..]
            .iter()
            .filter(|s| s.headless != winner.headless)
            .map(|s| s.cluster.as_str())
            .collect();
        if !other_type.is_empty() {
            conflicts.push((
                "TypeConflict",
                format!(
                    "type {} of {} (oldest export) is used; {} differ",
                    if winner.headless {
                        "Headless"
                    } else {
                        "ClusterSetIP"
                    },
                    winner.cluster,
                    other_type.join(", ")
                ),
            ));
        }
        let mut ports: Vec<(String, u16, Protocol)> = winner
            .ports
            .iter()
            .map(|p| (p.name.clone(), p.port, p.protocol))
            .collect();
        let mut port_conflicts = BTreeSet::new();
        for s in &v[1..] {
            for p in &s.ports {
                match ports.iter().find(|(n, _, _)| *n == p.name) {
                    Some((_, port, proto)) if *port == p.port && *proto == p.protocol => {}
                    Some(_) => {
                        port_conflicts.insert(format!("{} ({})", s.cluster, p.name));
                    }
                    None => ports.push((p.name.clone(), p.port, p.protocol)),
                }
            }
        }
        if !port_conflicts.is_empty() {
            conflicts.push((
                "PortConflict",
                format!(
                    "ports of {} (oldest export) are used; {} differ",
                    winner.cluster,
                    port_conflicts.into_iter().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        ports.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        out.insert(
            key.clone(),
            MeshService {
                clusters: v.iter().map(|s| s.cluster.clone()).collect(),
                headless: winner.headless,
                ports,
                ip: ips.get(&key).copied(),
                conflicts,
            },
        );
    }
    out
}

/// Every key under `prefix`, page by page at one revision.
async fn list_all(
    store: &dyn KvStore,
    prefix: &str,
) -> Result<Vec<meshd::kv::KeyValue>, meshd::kv::KvError> {
    let mut out = Vec::new();
    let mut start: Option<Vec<u8>> = None;
    let mut revision = 0;
    loop {
        let page = store
            .list_page(prefix, start.as_deref(), 1000, revision)
            .await?;
        revision = page.revision;
        let more = page.more;
        if let Some(last) = page.kvs.last() {
            let mut next = last.key.clone();
            next.push(0);
            start = Some(next);
        }
        out.extend(page.kvs);
        if !more {
            return Ok(out);
        }
    }
}

/// Reads every cluster's services (own and mirrored) and the ClusterSetIPs from `store`.
async fn read(
    store: &dyn KvStore,
) -> Result<(Vec<ClusterService>, BTreeMap<(String, String), IpAddr>), meshd::kv::KvError> {
    let mut services = Vec::new();
    for prefix in [
        format!("{STATE_PREFIX}{}/", StateKind::Services),
        format!("{CACHE_PREFIX}{}/", StateKind::Services),
    ] {
        for kv in list_all(store, &prefix).await? {
            let sk = match Key::parse_bytes(&kv.key) {
                Ok(Key::State(sk) | Key::Cache(sk)) => sk,
                _ => continue,
            };
            if let Ok(StateValue::Service(s)) = decode_state(&sk, &kv.value, None) {
                services.push(s);
            }
        }
    }
    let mut ips = BTreeMap::new();
    for kv in list_all(store, "mesh/clusterset-ips/v1/").await? {
        let k = String::from_utf8_lossy(&kv.key).into_owned();
        if let Ok(Key::ClusterSetIp { namespace, name }) = Key::parse(&k)
            && let Ok(e) = keys::decode_json::<keys::ClusterSetIpEntry>(&k, &kv.value)
        {
            ips.insert((namespace, name), e.ip);
        }
    }
    Ok((services, ips))
}

fn resource(version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(MCS_GROUP, version, kind), plural)
}

/// The MCS version the API serves for `plural` (v1beta1, else v1alpha1), if any.
async fn served(client: &Client, kind: &str, plural: &str) -> Option<ApiResource> {
    for v in ["v1beta1", "v1alpha1"] {
        let ar = resource(v, kind, plural);
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        if api.list(&ListParams::default().limit(1)).await.is_ok() {
            return Some(ar);
        }
    }
    None
}

fn condition(
    kind: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> serde_json::Value {
    json!({
        "type": kind,
        "status": if ok { "True" } else { "False" },
        "reason": reason,
        "message": message,
        "observedGeneration": generation.unwrap_or(0),
        "lastTransitionTime": time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
    })
}

/// One round: ServiceImports and ServiceExport conditions for the current state.
pub async fn reconcile(
    client: &Client,
    store: &dyn KvStore,
    local: &ClusterName,
) -> Result<(), String> {
    let (services, ips) = read(store).await.map_err(|e| e.to_string())?;
    let merged = merge(&services, &ips);
    let namespaces: BTreeSet<String> = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing Namespaces: {e}"))?
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();

    if let Some(ar) = served(client, "ServiceImport", "serviceimports").await {
        let pp = PatchParams::apply(MANAGER).force();
        for ((ns, name), s) in merged.iter().filter(|((ns, _), _)| namespaces.contains(ns)) {
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
            let body = json!({
                "apiVersion": ar.api_version,
                "kind": "ServiceImport",
                "metadata": {"name": name, "namespace": ns, "labels": {MANAGED_BY: "meshd"}},
                "spec": {
                    "type": if s.headless { "Headless" } else { "ClusterSetIP" },
                    "ports": s.ports.iter().map(|(n, port, proto)| {
                        let mut p = json!({"port": port, "protocol": proto.to_string()});
                        if !n.is_empty() { p["name"] = json!(n); }
                        p
                    }).collect::<Vec<_>>(),
                    "ips": s.ip.filter(|_| !s.headless).map(|ip| vec![ip.to_string()]).unwrap_or_default(),
                },
            });
            api.patch(name, &pp, &Patch::Apply(&body))
                .await
                .map_err(|e| format!("applying ServiceImport {ns}/{name}: {e}"))?;
        }
        // Imports we made for services that are no longer global.
        let all: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        let ours = all
            .list(&ListParams::default().labels(&format!("{MANAGED_BY}=meshd")))
            .await
            .map_err(|e| format!("listing ServiceImports: {e}"))?;
        for imp in ours.items {
            let (Some(ns), Some(name)) =
                (imp.metadata.namespace.clone(), imp.metadata.name.clone())
            else {
                continue;
            };
            if !merged.contains_key(&(ns.clone(), name.clone())) {
                let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
                let _ = api.delete(&name, &DeleteParams::default()).await;
            }
        }
    }

    if let Some(ar) = served(client, "ServiceExport", "serviceexports").await {
        let all: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        let exports = all
            .list(&ListParams::default())
            .await
            .map_err(|e| format!("listing ServiceExports: {e}"))?;
        let ours: BTreeSet<(String, String)> = services
            .iter()
            .filter(|s| s.cluster == *local)
            .map(|s| (s.namespace.clone(), s.name.clone()))
            .collect();
        for ex in exports.items {
            let (Some(ns), Some(name)) = (ex.metadata.namespace.clone(), ex.metadata.name.clone())
            else {
                continue;
            };
            let key = (ns.clone(), name.clone());
            let generation = ex.metadata.generation;
            let exported = ours.contains(&key);
            let mut conds = vec![if exported {
                condition(
                    "Valid",
                    true,
                    "Valid",
                    "the Service is exported to the mesh",
                    generation,
                )
            } else {
                condition(
                    "Valid",
                    false,
                    "NoService",
                    "no Service of this name is exported from this cluster",
                    generation,
                )
            }];
            let m = merged.get(&key);
            conds.push(match m {
                Some(s) if exported && s.clusters.contains(local) => condition(
                    "Ready",
                    true,
                    "Ready",
                    &format!(
                        "part of the global service of {}",
                        s.clusters
                            .iter()
                            .map(ClusterName::as_str)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    generation,
                ),
                _ => condition("Ready", false, "Pending", "not exported yet", generation),
            });
            conds.push(match m.and_then(|s| s.conflicts.first()) {
                Some((reason, msg)) => condition("Conflict", true, reason, msg, generation),
                None => condition("Conflict", false, "NoConflicts", "no conflicts", generation),
            });
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
            api.patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": {"conditions": conds}})),
            )
            .await
            .map_err(|e| format!("patching ServiceExport {ns}/{name} status: {e}"))?;
        }
    }
    Ok(())
}

/// Runs [`reconcile`] every `interval` until `shutdown`; failures are logged and retried.
pub async fn run(
    client: Client,
    store: Arc<dyn KvStore>,
    local: ClusterName,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = reconcile(&client, &*store, &local).await {
            tracing::warn!(error = %e, "MCS status write-back failed; retrying");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshd::model::{ClusterId, MaxConnectedClusters, ServicePort};

    fn svc(
        cluster: &str,
        id: u32,
        created: i64,
        headless: bool,
        proto: Protocol,
    ) -> ClusterService {
        ClusterService {
            global: true,
            headless,
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: proto,
            }],
            export_created: Some(time::OffsetDateTime::from_unix_timestamp(created).unwrap()),
            ..ClusterService::new(
                ClusterName::new(cluster).unwrap(),
                ClusterId::new(id, MaxConnectedClusters::C255).unwrap(),
                "shop",
                "web",
            )
        }
    }

    #[test]
    fn the_oldest_export_decides_and_conflicts_name_the_others() {
        let key = ("shop".to_owned(), "web".to_owned());
        let ips = BTreeMap::from([(key.clone(), IpAddr::from([198, 19, 128, 1]))]);
        // west exported first: its UDP port and its type win over east's.
        let m = merge(
            &[
                svc("east", 1, 2_000, true, Protocol::Tcp),
                svc("west", 2, 1_000, false, Protocol::Udp),
            ],
            &ips,
        );
        let s = &m[&key];
        assert_eq!(
            s.clusters,
            [
                ClusterName::new("west").unwrap(),
                ClusterName::new("east").unwrap()
            ]
        );
        assert!(!s.headless);
        assert_eq!(s.ports, [("http".to_owned(), 80, Protocol::Udp)]);
        assert_eq!(s.ip, Some(IpAddr::from([198, 19, 128, 1])));
        let reasons: Vec<&str> = s.conflicts.iter().map(|(r, _)| *r).collect();
        assert_eq!(reasons, ["TypeConflict", "PortConflict"]);
        assert!(s.conflicts.iter().all(|(_, m)| m.contains("east")));
        // Agreeing exports: no conflict; a non-global service is not merged at all.
        let mut local = svc("east", 1, 5, false, Protocol::Tcp);
        local.name = "db".into();
        local.global = false;
        let m = merge(
            &[
                svc("east", 1, 1, false, Protocol::Tcp),
                svc("west", 2, 2, false, Protocol::Tcp),
                local,
            ],
            &BTreeMap::new(),
        );
        assert_eq!(m.len(), 1);
        assert!(m[&key].conflicts.is_empty());
    }
}
