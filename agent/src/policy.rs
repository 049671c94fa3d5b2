//! The agent's policy task: local `MeshNetworkPolicy`s from etcd + the merged view's identities
//! and local endpoints → the shared engine (`meshd::policy`) → policy snapshots for the syncer.
//!
//! ```text
//!  etcd mesh/policies/v1/<local>/ ─ reflector ─┐
//!  view identities (every cluster) ────────────┼─► PolicyEngine (single writer, no await inside)
//!  view ipcache: local IPs → their identities ─┘      │ net PolicyDiffs
//!                                                      ▼
//!        rules / enforce maps (kept here) ─► Arc<PolicySnapshot> on a watch ─► datapath syncer
//!        PolicyStatus (in force, rejected + why, counts) ─► gRPC status / meshctl policy list
//! ```
//!
//! The datapath's endpoint id of a local endpoint is its security identity (one policy entry
//! set per identity, shared by every pod with it), so the engine's endpoints are the distinct
//! identities of the local cluster's ipcache entries. A snapshot is published after each
//! batch of inputs; it is a copy of the current rule map (the syncer diffs consecutive
//! snapshots), so a burst costs one copy per batch, not per event.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use meshd::keys::{DecodeError, Key, KeyError, POLICY_PREFIX, decode_json};
use meshd::kv::KvStore;
use meshd::metrics::ReflectorMetrics;
use meshd::model::{ClusterName, Identity, MeshNetworkPolicy};
use meshd::policy::{self, EndpointId, PolicyDiff, PolicyEngine, PolicyRef};
use meshd::reflector::{Codec, Event, Reflector, ReflectorConfig};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::datapath::sync::{Enforcement, PolicyAction, PolicySnapshot};
use crate::datapath::{Direction, PolicyRule, Verdict};
use crate::view::{IdentitiesSnapshot, IpCacheSnapshot};

/// Longest a burst of inputs is gathered before a snapshot is published.
const BATCH_WINDOW: Duration = Duration::from_millis(50);

/// What the policy task reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyStatus {
    /// Policies in force (valid), `namespace/name`.
    pub in_force: Vec<String>,
    /// Rejected policies and why (the previous valid version, if any, stays in force).
    pub rejected: Vec<(String, String)>,
    /// Local endpoints (identities) the engine knows.
    pub endpoints: usize,
    /// Policy entries in the last snapshot.
    pub entries: usize,
    /// Whether the policies have been listed once.
    pub synced: bool,
}

/// Codec of `mesh/policies/v1/<cluster>/<ns>/<name>`.
#[derive(Debug, Clone)]
struct PolicyCodec {
    local: ClusterName,
}

impl Codec for PolicyCodec {
    type Key = PolicyRef;
    type Value = MeshNetworkPolicy;

    fn decode_key(&self, key: &[u8]) -> Result<PolicyRef, DecodeError> {
        match Key::parse_bytes(key)? {
            Key::Policy {
                cluster,
                namespace,
                name,
            } if cluster == self.local => Ok(PolicyRef::new(namespace, name)),
            _ => Err(KeyError {
                key: String::from_utf8_lossy(key).into_owned(),
                reason: "not a policy key of the local cluster",
            }
            .into()),
        }
    }

    fn decode_value(
        &self,
        key: &PolicyRef,
        value: &[u8],
    ) -> Result<MeshNetworkPolicy, DecodeError> {
        let k = Key::Policy {
            cluster: self.local.clone(),
            namespace: key.namespace.clone(),
            name: key.name.clone(),
        };
        let p: MeshNetworkPolicy = decode_json(&k, value)?;
        if p.namespace != key.namespace || p.name != key.name {
            return Err(DecodeError::Mismatch {
                key: k.to_string(),
                field: "namespace/name",
                expected: key.to_string(),
                found: format!("{}/{}", p.namespace, p.name),
            });
        }
        Ok(p)
    }
}

/// The engine plus the datapath-shaped state built from its diffs.
struct State {
    engine: PolicyEngine,
    rules: BTreeMap<PolicyRule, PolicyAction>,
    enforce: BTreeMap<u32, Enforcement>,
    endpoints: BTreeSet<Identity>,
    policies: BTreeSet<PolicyRef>,
    diffs: Vec<PolicyDiff>,
    generation: u64,
}

fn rule(e: &policy::PolicyEntry) -> PolicyRule {
    PolicyRule {
        endpoint_id: e.endpoint.0,
        identity: e.peer.raw(),
        port: e.port,
        proto: e.proto,
        direction: match e.direction {
            policy::Direction::Ingress => Direction::Ingress,
            policy::Direction::Egress => Direction::Egress,
        },
    }
}

impl State {
    fn new(local: ClusterName) -> Self {
        Self {
            engine: PolicyEngine::new(local),
            rules: BTreeMap::new(),
            enforce: BTreeMap::new(),
            endpoints: BTreeSet::new(),
            policies: BTreeSet::new(),
            diffs: Vec::new(),
            generation: 0,
        }
    }

    fn identities(&mut self, snap: &IdentitiesSnapshot) {
        self.engine
            .sync_identities(snap.entries.iter().map(|(id, e)| (*id, &e.value.labels)));
    }

    fn endpoints(&mut self, snap: &IpCacheSnapshot) {
        let local = self.engine.local_cluster().clone();
        let want: BTreeSet<Identity> = snap
            .entries
            .values()
            .filter(|e| e.cluster == local && !e.value.identity.is_reserved())
            .map(|e| e.value.identity)
            .collect();
        for gone in self.endpoints.difference(&want) {
            self.engine.remove_endpoint(EndpointId(gone.get()));
        }
        for new in want.difference(&self.endpoints) {
            self.engine.upsert_endpoint(EndpointId(new.get()), *new);
        }
        self.endpoints = want;
    }

    fn policy(
        &mut self,
        ev: Event<PolicyRef, MeshNetworkPolicy>,
        listed: &mut Option<BTreeSet<PolicyRef>>,
    ) {
        match ev {
            Event::Init => *listed = Some(BTreeSet::new()),
            Event::InitApply(k, p) | Event::Apply(k, p) => {
                if let Some(l) = listed.as_mut() {
                    l.insert(k.clone());
                }
                // An invalid policy is recorded by the engine as rejected; the previous
                // valid version stays in force.
                if let Err(e) = self.engine.upsert_policy(p) {
                    tracing::warn!(policy = %k, error = %e, "policy rejected");
                }
                self.policies.insert(k);
            }
            Event::Delete(k) => {
                self.engine.remove_policy(&k);
                self.policies.remove(&k);
            }
            Event::InitDone => {
                // A relist: whatever was not listed again is gone.
                if let Some(seen) = listed.take() {
                    let gone: Vec<PolicyRef> = self.policies.difference(&seen).cloned().collect();
                    for k in gone {
                        self.engine.remove_policy(&k);
                        self.policies.remove(&k);
                    }
                }
            }
        }
    }

    /// Folds the engine's diffs into the rule and enforcement maps; whether anything changed.
    fn fold(&mut self) -> bool {
        self.diffs.clear();
        self.engine.drain_diffs(&mut self.diffs);
        if self.diffs.is_empty() {
            return false;
        }
        for d in &self.diffs {
            match d {
                PolicyDiff::Allow(e) => {
                    self.rules.insert(
                        rule(e),
                        PolicyAction {
                            verdict: Verdict::Allow,
                            rule_id: 0,
                        },
                    );
                }
                PolicyDiff::Revoke(e) => {
                    self.rules.remove(&rule(e));
                }
                PolicyDiff::Enforcement {
                    endpoint,
                    ingress,
                    egress,
                } => {
                    if *ingress || *egress {
                        self.enforce.insert(
                            endpoint.0,
                            Enforcement {
                                ingress: *ingress,
                                egress: *egress,
                            },
                        );
                    } else {
                        self.enforce.remove(&endpoint.0);
                    }
                }
            }
        }
        true
    }

    fn snapshot(&mut self) -> Arc<PolicySnapshot> {
        self.generation += 1;
        Arc::new(PolicySnapshot {
            generation: self.generation,
            enforce: self.enforce.clone(),
            rules: self.rules.clone(),
        })
    }

    fn status(&self, synced: bool) -> PolicyStatus {
        let rejected = self.engine.rejected();
        PolicyStatus {
            in_force: self
                .engine
                .policies()
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect(),
            rejected: rejected
                .iter()
                .map(|(k, e)| (k.to_string(), e.to_string()))
                .collect(),
            endpoints: self.endpoints.len(),
            entries: self.rules.len(),
            synced,
        }
    }
}

/// Handles of a running policy task.
#[derive(Debug, Clone)]
pub struct PolicyHandles {
    /// Snapshots for the datapath syncer (generation 0 until policies were listed once).
    pub snapshots: watch::Receiver<Arc<PolicySnapshot>>,
    /// Status for the API.
    pub status: watch::Receiver<PolicyStatus>,
}

/// Starts the policy task; it ends with `shutdown`.
pub fn start(
    store: Arc<dyn KvStore>,
    local: ClusterName,
    mut identities: watch::Receiver<Arc<IdentitiesSnapshot>>,
    mut ipcache: watch::Receiver<Arc<IpCacheSnapshot>>,
    metrics: ReflectorMetrics,
    shutdown: CancellationToken,
) -> (PolicyHandles, tokio::task::JoinHandle<()>) {
    let (snap_tx, snapshots) = watch::channel(Arc::new(PolicySnapshot::default()));
    let (status_tx, status) = watch::channel(PolicyStatus::default());
    let prefix = format!("{POLICY_PREFIX}{local}/");
    let reflector = Reflector::new(
        store,
        prefix,
        PolicyCodec {
            local: local.clone(),
        },
        ReflectorConfig {
            cluster_label: local.to_string(),
            kind_label: "policies".into(),
            ..ReflectorConfig::default()
        },
        metrics,
    );
    let task = tokio::spawn(async move {
        let mut st = State::new(local);
        let mut stream = Box::pin(reflector.into_stream());
        let mut listed: Option<BTreeSet<PolicyRef>> = None;
        let mut synced = false;
        {
            let i = identities.borrow_and_update().clone();
            st.identities(&i);
            let c = ipcache.borrow_and_update().clone();
            st.endpoints(&c);
        }
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                changed = identities.changed() => {
                    if changed.is_err() { break; }
                    let i = identities.borrow_and_update().clone();
                    st.identities(&i);
                }
                changed = ipcache.changed() => {
                    if changed.is_err() { break; }
                    let c = ipcache.borrow_and_update().clone();
                    st.endpoints(&c);
                }
                item = stream.next() => match item {
                    Some(Ok(ev)) => {
                        let done = matches!(ev, Event::InitDone);
                        st.policy(ev, &mut listed);
                        synced |= done;
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "policy reflector retrying");
                        continue;
                    }
                    None => break,
                },
            }
            // Gather what else arrives in a short window, then publish once.
            let window = tokio::time::sleep(BATCH_WINDOW);
            tokio::pin!(window);
            loop {
                tokio::select! {
                    biased;
                    () = &mut window => break,
                    item = stream.next() => match item {
                        Some(Ok(ev)) => {
                            let done = matches!(ev, Event::InitDone);
                            st.policy(ev, &mut listed);
                            synced |= done;
                        }
                        _ => break,
                    },
                }
            }
            // Until the policies were listed once, nothing is published: the syncer keeps
            // the pinned policy of a previous run in force.
            if synced && (st.fold() || st.generation == 0) {
                let snap = st.snapshot();
                let _ = snap_tx.send(snap);
            }
            let status = st.status(synced);
            status_tx.send_if_modified(|s| {
                if *s == status {
                    false
                } else {
                    *s = status;
                    true
                }
            });
        }
    });
    (PolicyHandles { snapshots, status }, task)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshd::kv::MemoryStore;
    use meshd::model::{IdentityEntry, IpCacheEntry, Labels};

    use crate::view::ClusterEntry;

    fn cn(s: &str) -> ClusterName {
        ClusterName::new(s).unwrap()
    }

    fn labels(cluster: &str, app: &str) -> Labels {
        let v = [
            format!("k8s:app={app}"),
            "k8s:io.kubernetes.pod.namespace=shop".to_owned(),
            format!("mesh:io.meshd.cluster={cluster}"),
        ];
        Labels::parse(v.iter().map(String::as_str)).unwrap()
    }

    fn identities(v: &[(u32, &str, &str)]) -> Arc<IdentitiesSnapshot> {
        let mut s = IdentitiesSnapshot {
            generation: 1,
            ..IdentitiesSnapshot::default()
        };
        for (id, cluster, app) in v {
            let id = Identity::from_raw(*id).unwrap();
            s.entries.insert(
                id,
                Arc::new(ClusterEntry {
                    cluster: cn(cluster),
                    value: IdentityEntry {
                        id,
                        labels: labels(cluster, app),
                    },
                }),
            );
        }
        Arc::new(s)
    }

    fn ipcache(v: &[(&str, u32, &str)]) -> Arc<IpCacheSnapshot> {
        let mut s = IpCacheSnapshot {
            generation: 1,
            ..IpCacheSnapshot::default()
        };
        for (ip, id, cluster) in v {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            s.entries.insert(
                ip,
                Arc::new(ClusterEntry {
                    cluster: cn(cluster),
                    value: IpCacheEntry {
                        ip,
                        prefix_len: 32,
                        identity: Identity::from_raw(*id).unwrap(),
                        host_ip: None,
                        node: None,
                        namespace: Some("shop".into()),
                        pod: None,
                        named_ports: BTreeMap::new(),
                    },
                }),
            );
        }
        Arc::new(s)
    }

    #[tokio::test]
    async fn policy_task_publishes_entries_for_local_endpoints() {
        let store: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
        let policy: MeshNetworkPolicy = serde_json::from_value(serde_json::json!({
            "namespace": "shop", "name": "db-allow-api",
            "spec": {
                "endpointSelector": {"matchLabels": {"app": "db"}},
                "ingress": [{
                    "fromEndpoints": [{"matchLabels": {"app": "api", "io.meshd.cluster": "west"}}],
                    "toPorts": [{"port": 5432, "protocol": "TCP"}]
                }]
            }
        }))
        .unwrap();
        let key = Key::Policy {
            cluster: cn("east"),
            namespace: "shop".into(),
            name: "db-allow-api".into(),
        };
        store
            .put(
                &key.to_string(),
                &serde_json::to_vec(&policy).unwrap(),
                None,
            )
            .await
            .unwrap();
        // east: db (65537) local; west: api (131073), web (131074).
        let (_itx, irx) = watch::channel(identities(&[
            (65537, "east", "db"),
            (131_073, "west", "api"),
            (131_074, "west", "web"),
        ]));
        let (_ctx, crx) = watch::channel(ipcache(&[
            ("198.18.1.31", 65537, "east"),
            ("198.18.2.21", 131_073, "west"),
        ]));
        let stop = CancellationToken::new();
        let (mut h, task) = start(
            store,
            cn("east"),
            irx,
            crx,
            ReflectorMetrics::default(),
            stop.clone(),
        );
        let snap = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                h.snapshots.changed().await.unwrap();
                let s = h.snapshots.borrow_and_update().clone();
                if !s.rules.is_empty() {
                    return s;
                }
            }
        })
        .await
        .expect("a snapshot with rules");
        assert_eq!(
            snap.enforce.get(&65537),
            Some(&Enforcement {
                ingress: true,
                egress: false
            })
        );
        let rules: Vec<&PolicyRule> = snap.rules.keys().collect();
        assert_eq!(
            rules,
            [&PolicyRule {
                endpoint_id: 65537,
                identity: 131_073,
                port: 5432,
                proto: 6,
                direction: Direction::Ingress
            }]
        );
        let status = h.status.borrow().clone();
        assert_eq!(status.in_force, ["shop/db-allow-api"]);
        assert!(status.synced && status.rejected.is_empty());
        stop.cancel();
        task.await.unwrap();
    }
}
