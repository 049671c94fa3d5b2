//! Property: after any sequence of identity, policy and endpoint adds/removes (and identity
//! relists), the incremental engine's state — and the state obtained by applying only its
//! diffs, endpoint removals and moves included — equals a from-scratch computation
//! (`meshd::policy::reference::compute`).

use std::collections::BTreeMap;

use meshd::model::{ClusterName, Identity, Labels, MeshNetworkPolicy};
use meshd::policy::reference::{PolicyState, compute};
use meshd::policy::{EndpointId, PolicyEngine, PolicyRef};
use proptest::prelude::*;

const CLUSTERS: &[&str] = &["east", "west"];
const NAMESPACES: &[&str] = &["shop", "billing"];
const APPS: &[&str] = &["web", "db", "api"];

/// Peer selectors: plain, namespace-naming, cluster-naming, expressions, empty.
const PEERS: &[&str] = &[
    r#"{}"#,
    r#"{"matchLabels":{"app":"web"}}"#,
    r#"{"matchLabels":{"app":"db"}}"#,
    r#"{"matchLabels":{"app":"web","io.meshd.cluster":"west"}}"#,
    r#"{"matchLabels":{"io.kubernetes.pod.namespace":"billing"}}"#,
    r#"{"matchExpressions":[{"key":"io.meshd.cluster","operator":"In","values":["east","west"]},{"key":"app","operator":"NotIn","values":["db"]}]}"#,
    r#"{"matchExpressions":[{"key":"tier","operator":"Exists"}]}"#,
    r#"{"matchExpressions":[{"key":"tier","operator":"DoesNotExist"},{"key":"io.kubernetes.pod.namespace","operator":"Exists"},{"key":"io.meshd.cluster","operator":"Exists"}]}"#,
];
const SUBJECTS: &[&str] = &[
    r#"{}"#,
    r#"{"matchLabels":{"app":"db"}}"#,
    r#"{"matchLabels":{"app":"web"}}"#,
    r#"{"matchExpressions":[{"key":"tier","operator":"In","values":["front"]}]}"#,
];
const ENTITIES: &[&str] = &["world", "host", "remote-node", "cluster", "all"];
const PORTS: &[&str] = &[
    r#"{"port":80,"protocol":"TCP"}"#,
    r#"{"port":53}"#,
    r#"{"port":8000,"endPort":8003,"protocol":"UDP"}"#,
    r#"{"port":80,"endPort":81}"#,
    r#"{"port":1,"endPort":65535,"protocol":"SCTP"}"#,
];

#[derive(Debug, Clone)]
enum Op {
    UpsertIdentity(u32, Labels),
    RemoveIdentity(u32),
    UpsertPolicy(MeshNetworkPolicy),
    RemovePolicy(String, String),
    UpsertEndpoint(u32, u32),
    RemoveEndpoint(u32),
    /// Replace the whole identity table (a relist).
    SyncIdentities(Vec<(u32, Labels)>),
}

fn labels() -> impl Strategy<Value = Labels> {
    (
        0..CLUSTERS.len(),
        0..NAMESPACES.len(),
        0..APPS.len(),
        any::<bool>(),
    )
        .prop_map(|(c, n, a, tier)| {
            let mut v = vec![
                format!("mesh:io.meshd.cluster={}", CLUSTERS[c]),
                format!("k8s:io.kubernetes.pod.namespace={}", NAMESPACES[n]),
                format!("k8s:app={}", APPS[a]),
            ];
            if tier {
                v.push("k8s:tier=front".into());
            }
            Labels::parse(v.iter().map(String::as_str)).unwrap()
        })
}

fn rule() -> impl Strategy<Value = String> {
    (
        proptest::sample::subsequence((0..PEERS.len()).collect::<Vec<_>>(), 0..=2),
        proptest::sample::subsequence((0..ENTITIES.len()).collect::<Vec<_>>(), 0..=2),
        proptest::sample::subsequence((0..PORTS.len()).collect::<Vec<_>>(), 0..=2),
    )
        .prop_map(|(peers, ents, ports)| {
            let join = |ix: &[usize], from: &[&str], quote: bool| {
                ix.iter()
                    .map(|i| {
                        if quote {
                            format!("\"{}\"", from[*i])
                        } else {
                            from[*i].to_owned()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            };
            // Empty rules are invalid: they exercise the "rejected, previous stays" path.
            format!(
                r#"{{"fromEndpoints":[{}],"fromEntities":[{}],"toPorts":[{}]}}"#,
                join(&peers, PEERS, false),
                join(&ents, ENTITIES, true),
                join(&ports, PORTS, false)
            )
        })
}

fn rules() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(proptest::collection::vec(rule(), 0..3).prop_map(|r| r.join(",")))
}

fn policy() -> impl Strategy<Value = MeshNetworkPolicy> {
    (
        0..3usize,
        0..NAMESPACES.len(),
        0..SUBJECTS.len(),
        rules(),
        rules(),
    )
        .prop_map(|(name, ns, subj, ing, eg)| {
            let mut spec = format!(r#"{{"endpointSelector":{}"#, SUBJECTS[subj]);
            if let Some(r) = ing {
                spec.push_str(&format!(r#","ingress":[{r}]"#));
            }
            if let Some(r) = eg {
                // Egress uses toEndpoints/toEntities.
                let r = r
                    .replace("fromEndpoints", "toEndpoints")
                    .replace("fromEntities", "toEntities");
                spec.push_str(&format!(r#","egress":[{r}]"#));
            }
            spec.push('}');
            MeshNetworkPolicy {
                namespace: NAMESPACES[ns].into(),
                name: format!("p{name}"),
                spec: serde_json::from_str(&spec).unwrap_or_else(|e| panic!("{spec}: {e}")),
            }
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..8u32, labels()).prop_map(|(i, l)| Op::UpsertIdentity(i, l)),
        1 => (0..8u32).prop_map(Op::RemoveIdentity),
        3 => policy().prop_map(Op::UpsertPolicy),
        1 => (0..3usize, 0..NAMESPACES.len()).prop_map(|(n, ns)| Op::RemovePolicy(NAMESPACES[ns].into(), format!("p{n}"))),
        2 => (0..5u32, 0..8u32).prop_map(|(e, i)| Op::UpsertEndpoint(e, i)),
        1 => (0..5u32).prop_map(Op::RemoveEndpoint),
        1 => proptest::collection::vec((0..8u32, labels()), 0..6).prop_map(Op::SyncIdentities),
    ]
}

fn ident(i: u32) -> Identity {
    Identity::from_raw(0x1_0100 + i).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn policy_incremental_equals_from_scratch(ops in proptest::collection::vec(op(), 1..40)) {
        let local = ClusterName::new("east").unwrap();
        let mut engine = PolicyEngine::new(local.clone());
        // The model: inputs as they stand (policies: the valid versions in force).
        let mut identities: BTreeMap<Identity, Labels> = BTreeMap::new();
        let mut policies: BTreeMap<PolicyRef, MeshNetworkPolicy> = BTreeMap::new();
        let mut endpoints: BTreeMap<EndpointId, Identity> = BTreeMap::new();
        let mut applied = PolicyState::default();
        let mut diffs = Vec::new();
        for (step, op) in ops.iter().enumerate() {
            match op.clone() {
                Op::UpsertIdentity(i, l) => {
                    engine.upsert_identity(ident(i), l.clone()).unwrap();
                    identities.insert(ident(i), l);
                }
                Op::RemoveIdentity(i) => {
                    prop_assert_eq!(engine.remove_identity(ident(i)), identities.remove(&ident(i)).is_some());
                }
                Op::UpsertPolicy(p) => {
                    let key = PolicyRef::new(p.namespace.clone(), p.name.clone());
                    let valid = p.validate().is_ok();
                    prop_assert_eq!(engine.upsert_policy(p.clone()).is_ok(), valid);
                    if valid {
                        policies.insert(key, p);
                    }
                }
                Op::RemovePolicy(ns, name) => {
                    let key = PolicyRef::new(ns, name);
                    prop_assert_eq!(engine.remove_policy(&key), policies.remove(&key).is_some());
                }
                Op::UpsertEndpoint(e, i) => {
                    engine.upsert_endpoint(EndpointId(e), ident(i));
                    endpoints.insert(EndpointId(e), ident(i));
                }
                Op::SyncIdentities(ids) => {
                    identities = ids.into_iter().map(|(i, l)| (ident(i), l)).collect();
                    engine.sync_identities(identities.iter().map(|(i, l)| (*i, l)));
                }
                Op::RemoveEndpoint(e) => {
                    prop_assert_eq!(engine.remove_endpoint(EndpointId(e)), endpoints.remove(&EndpointId(e)).is_some());
                }
            }
            // Interleave batching: drain after most steps, sometimes let changes pile up.
            if step % 3 != 1 || step + 1 == ops.len() {
                engine.drain_diffs(&mut diffs);
                if let Err(e) = applied.apply(&diffs) {
                    return Err(TestCaseError::fail(format!("step {step} {op:?}: {e}")));
                }
                diffs.clear();
                let pol: Vec<MeshNetworkPolicy> = policies.values().cloned().collect();
                let want = compute(&local, &identities, &pol, &endpoints);
                prop_assert_eq!(&engine.state(), &want, "engine state after step {} {:?}", step, op);
                prop_assert_eq!(&applied, &want, "applied diffs after step {} {:?}", step, op);
            }
        }
    }
}
