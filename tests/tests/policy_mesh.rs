//! Policy across a 3-cluster mesh (real etcd with TLS + auth each, exporters, an agent of
//! `east` reading its peers directly): east's policy, exported to east's etcd, admits
//! `app=api` pods of `north`; a pod added in north becomes allowed in east's computed
//! entries (through north's etcd and east's merged view), and deleting it revokes them.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use clustermesh_apiserver::source::{Object, ObjectKind, ObjectRef, SourceEvent};
use mesh_agent::runtime::{PeerAccess, ViewHandles};
use mesh_tests::init_tracing;
use mesh_tests::mesh::{TestCluster, connect};
use mesh_tests::objects::{node, pod};
use meshd::kv::KvStore;
use meshd::model::{Identity, MeshNetworkPolicy};
use meshd::policy::{
    Direction, EndpointId, Peer, PolicyEngine, PolicyEntry, PolicyRef, PolicyState, TraceDecision,
    TransportProtocol,
};

const CONVERGE: Duration = Duration::from_secs(60);

fn ip(c: u8, i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, c, i)
}

fn objects(c: u8, pods: &[(&str, &str)]) -> Vec<Object> {
    let mut v = vec![Object::Node(Box::new(node(
        &format!("node-{c}"),
        Ipv4Addr::new(198, 19, 0, c),
        &format!("198.18.{c}.0/24"),
    )))];
    for (i, (name, app)) in pods.iter().enumerate() {
        v.push(Object::Pod(Box::new(pod(
            "shop",
            name,
            &[("app", app)],
            ip(c, 11 + i as u8),
            &format!("node-{c}"),
        ))));
    }
    v
}

fn db_policy() -> MeshNetworkPolicy {
    MeshNetworkPolicy {
        namespace: "shop".into(),
        name: "db-allow-north-api".into(),
        spec: serde_json::from_str(
            r#"{"endpointSelector":{"matchLabels":{"app":"db"}},
                "ingress":[{"fromEndpoints":[{"matchLabels":{"app":"api","io.meshd.cluster":"north"}}],
                            "toPorts":[{"port":5432,"protocol":"TCP"}]}]}"#,
        )
        .unwrap(),
    }
}

/// What an agent syncer does: feed the engine from east's view and east's policies, drain
/// the diffs into a datapath model.
struct Syncer {
    engine: PolicyEngine,
    applied: PolicyState,
}

impl Syncer {
    async fn sync(&mut self, h: &ViewHandles, store: &dyn KvStore) {
        let ids = h.identities.borrow().clone();
        self.engine
            .sync_identities(ids.entries.iter().map(|(id, e)| (*id, &e.value.labels)));
        let page = store.list_all("mesh/policies/v1/east/", 100).await.unwrap();
        for kv in &page.kvs {
            let p: MeshNetworkPolicy = serde_json::from_slice(&kv.value).unwrap();
            self.engine.upsert_policy(p).unwrap();
        }
        // Local endpoints: east's ipcache entries, endpoint id = last octet.
        let ipc = h.ipcache.borrow().clone();
        for (addr, e) in &ipc.entries {
            if let (IpAddr::V4(a), "east") = (addr, e.cluster.as_str()) {
                self.engine
                    .upsert_endpoint(EndpointId(u32::from(a.octets()[3])), e.value.identity);
            }
        }
        let diffs = self.engine.take_diffs();
        self.applied.apply(&diffs).unwrap();
        assert_eq!(self.applied, self.engine.state(), "diffs and state agree");
    }
}

fn identity_of(h: &ViewHandles, addr: Ipv4Addr) -> Option<Identity> {
    h.ipcache
        .borrow()
        .get(&IpAddr::V4(addr))
        .map(|e| e.value.identity)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_follows_remote_pod_across_three_clusters() {
    init_tracing();
    let mut east_objects = objects(1, &[("db-0", "db"), ("web-0", "web")]);
    east_objects.push(Object::Policy(db_policy()));
    let east = TestCluster::start("east", 1, east_objects).await.unwrap();
    let west = TestCluster::start("west", 2, objects(2, &[("web-0", "web")]))
        .await
        .unwrap();
    // Short identity GC so north's deleted pod's identity goes away within the test.
    let north = TestCluster::start_with("north", 3, objects(3, &[("other-0", "other")]), |c| {
        c.gc_interval = Duration::from_millis(500);
        c.gc_grace = Duration::from_secs(1);
    })
    .await
    .unwrap();
    connect(&east, &west).await.unwrap();
    connect(&east, &north).await.unwrap();
    connect(&west, &north).await.unwrap();
    let agent = east.start_agent(PeerAccess::Direct);
    let h = agent.handles();
    let mut s = Syncer {
        engine: PolicyEngine::new(east.name.clone()),
        applied: PolicyState::default(),
    };
    let db = EndpointId(11);
    let deadline = tokio::time::Instant::now() + CONVERGE;
    let wait = async |what: &str, s: &mut Syncer, f: &dyn Fn(&Syncer, &ViewHandles) -> bool| {
        loop {
            s.sync(&h, east.store.as_ref()).await;
            if f(s, &h) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; stats {:?}; status {:#?}",
                s.engine.stats(),
                *h.status.borrow()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };

    // East's db is selected (default-deny ingress) and nothing is allowed yet: north has
    // no api pod, west's web is not named.
    wait("east db selected, west and north seen", &mut s, &|s, h| {
        s.engine.enforcement(db) == (true, false)
            && identity_of(h, ip(2, 11)).is_some()
            && identity_of(h, ip(3, 11)).is_some()
    })
    .await;
    assert!(s.engine.endpoint_entries(db).is_empty());
    assert_eq!(
        s.engine.policies_for_endpoint(db),
        [PolicyRef::new("shop", "db-allow-north-api")]
    );
    assert_eq!(
        s.engine.enforcement(EndpointId(12)),
        (false, false),
        "web is not selected"
    );

    // A pod added in north with app=api: its new identity is allowed into east's db.
    north
        .source
        .send(SourceEvent::Apply(Object::Pod(Box::new(pod(
            "shop",
            "api-0",
            &[("app", "api")],
            ip(3, 21),
            "node-3",
        )))))
        .await
        .unwrap();
    wait("north's api identity allowed", &mut s, &|s, h| {
        identity_of(h, ip(3, 21)).is_some_and(|id| {
            s.engine.endpoint_entries(db)
                == [PolicyEntry {
                    endpoint: db,
                    peer: Peer::Identity(id),
                    port: 5432,
                    proto: 6,
                    direction: Direction::Ingress,
                }]
        })
    })
    .await;
    let api = identity_of(&h, ip(3, 21)).unwrap();
    assert_eq!(api.cluster_id(meshd::model::MaxConnectedClusters::C255), 3);
    // The same engine answers a trace with the policy and rule.
    let ids = h.identities.borrow().clone();
    let labels = |id: Identity| ids.get(&id).unwrap().value.labels.clone();
    let db_id = identity_of(&h, ip(1, 11)).unwrap();
    let t = s
        .engine
        .trace(&labels(api), &labels(db_id), 5432, TransportProtocol::Tcp);
    assert_eq!(
        t.ingress.decision,
        TraceDecision::Allowed {
            policy: PolicyRef::new("shop", "db-allow-north-api"),
            rule: "ingress[0]".into(),
            peer: "fromEndpoints[0]".into(),
        },
        "{t}"
    );
    let west_web = identity_of(&h, ip(2, 11)).unwrap();
    assert!(
        !s.engine
            .trace(
                &labels(west_web),
                &labels(db_id),
                5432,
                TransportProtocol::Tcp
            )
            .allowed()
    );

    // Deleting the pod: north's allocator frees the identity, east's view drops it, the
    // entry is revoked (and nothing else changes).
    north
        .source
        .send(SourceEvent::Delete(ObjectRef {
            kind: ObjectKind::Pod,
            namespace: "shop".into(),
            name: "api-0".into(),
        }))
        .await
        .unwrap();
    wait("north's api identity revoked", &mut s, &|s, h| {
        !h.identities.borrow().entries.contains_key(&api)
            && s.engine.endpoint_entries(db).is_empty()
    })
    .await;
    assert_eq!(s.engine.enforcement(db), (true, false));
    assert_eq!(s.engine.stats().endpoints, 2, "east's db and web");
    agent.shutdown().await;
}
