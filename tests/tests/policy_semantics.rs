//! Table-driven semantics of `MeshNetworkPolicy` in the engine: namespace scoping, local
//! cluster default, entities, port ranges and protocols, default-deny per direction,
//! additive rules, rejection keeping the previous version. Every verdict is checked twice:
//! by a datapath-style lookup in the computed entries and by `trace`, which must agree.

use std::collections::BTreeSet;

use meshd::model::{ClusterName, Identity, Labels, MeshNetworkPolicy, ReservedIdentity};
use meshd::policy::{
    Direction, EndpointId, Peer, PolicyEngine, PolicyEntry, PolicyError, PolicyRef, TraceDecision,
    TransportProtocol, reserved_labels, trace_mesh,
};

/// Named identities: (name, id, labels). `east` is the local cluster.
const IDS: &[(&str, u32, &[&str])] = &[
    (
        "db",
        0x1_0100,
        &[
            "k8s:app=db",
            "k8s:io.kubernetes.pod.namespace=shop",
            "mesh:io.meshd.cluster=east",
        ],
    ),
    (
        "web",
        0x1_0101,
        &[
            "k8s:app=web",
            "k8s:io.kubernetes.pod.namespace=shop",
            "mesh:io.meshd.cluster=east",
        ],
    ),
    (
        "billing-web",
        0x1_0102,
        &[
            "k8s:app=web",
            "k8s:io.kubernetes.pod.namespace=billing",
            "mesh:io.meshd.cluster=east",
        ],
    ),
    (
        "west-web",
        0x2_0100,
        &[
            "k8s:app=web",
            "k8s:io.kubernetes.pod.namespace=shop",
            "mesh:io.meshd.cluster=west",
        ],
    ),
    (
        "west-db",
        0x2_0101,
        &[
            "k8s:app=db",
            "k8s:io.kubernetes.pod.namespace=shop",
            "mesh:io.meshd.cluster=west",
        ],
    ),
    (
        "north-invoices",
        0x3_0100,
        &[
            "k8s:app=invoices",
            "k8s:io.kubernetes.pod.namespace=billing",
            "mesh:io.meshd.cluster=north",
        ],
    ),
];

/// Local endpoints: (endpoint id, identity name).
const ENDPOINTS: &[(u32, &str)] = &[(1, "db"), (2, "web"), (3, "billing-web")];

fn labels_of(name: &str) -> Labels {
    match name {
        "world" => reserved_labels(ReservedIdentity::World),
        "host" => reserved_labels(ReservedIdentity::Host),
        "remote-node" => reserved_labels(ReservedIdentity::RemoteNode),
        _ => Labels::parse(
            IDS.iter()
                .find(|(n, _, _)| *n == name)
                .unwrap_or_else(|| panic!("no identity {name}"))
                .2
                .iter()
                .copied(),
        )
        .unwrap(),
    }
}

fn id_of(name: &str) -> Identity {
    match name {
        "world" => ReservedIdentity::World.identity(),
        "host" => ReservedIdentity::Host.identity(),
        "remote-node" => ReservedIdentity::RemoteNode.identity(),
        _ => Identity::from_raw(IDS.iter().find(|(n, _, _)| *n == name).unwrap().1).unwrap(),
    }
}

fn ep_of(name: &str) -> EndpointId {
    EndpointId(ENDPOINTS.iter().find(|(_, n)| *n == name).unwrap().0)
}

fn policy(ns: &str, name: &str, spec: &str) -> MeshNetworkPolicy {
    MeshNetworkPolicy {
        namespace: ns.into(),
        name: name.into(),
        spec: serde_json::from_str(spec).unwrap_or_else(|e| panic!("{ns}/{name}: {e}")),
    }
}

fn engine(policies: &[(&str, &str, &str)]) -> PolicyEngine {
    let mut e = PolicyEngine::new(ClusterName::new("east").unwrap());
    for (name, id, labels) in IDS {
        let _ = name;
        e.upsert_identity(
            Identity::from_raw(*id).unwrap(),
            Labels::parse(labels.iter().copied()).unwrap(),
        )
        .unwrap();
    }
    for (ep, name) in ENDPOINTS {
        e.upsert_endpoint(EndpointId(*ep), id_of(name));
    }
    for (ns, name, spec) in policies {
        e.upsert_policy(policy(ns, name, spec)).unwrap();
    }
    e
}

/// The datapath's lookup: enforcement flag, then (peer|0) × ((port, proto), (0, proto), (0, 0)).
fn datapath_allows(
    e: &PolicyEngine,
    ep: EndpointId,
    dir: Direction,
    peer: Identity,
    port: u16,
    proto: u8,
) -> bool {
    let (ing, eg) = e.enforcement(ep);
    let enforced = match dir {
        Direction::Ingress => ing,
        Direction::Egress => eg,
    };
    if !enforced {
        return true;
    }
    let entries: BTreeSet<PolicyEntry> = e.endpoint_entries(ep).into_iter().collect();
    [Peer::Identity(peer), Peer::Any].into_iter().any(|p| {
        [(port, proto), (0, proto), (0, 0)]
            .into_iter()
            .any(|(port, proto)| {
                entries.contains(&PolicyEntry {
                    endpoint: ep,
                    peer: p,
                    port,
                    proto,
                    direction: dir,
                })
            })
    })
}

/// (endpoint, direction, peer, port, proto, allowed)
type Check = (
    &'static str,
    Direction,
    &'static str,
    u16,
    &'static str,
    bool,
);

struct Case {
    name: &'static str,
    policies: &'static [(&'static str, &'static str, &'static str)],
    checks: &'static [Check],
}

use Direction::{Egress as E, Ingress as I};

const DB_ALLOW_WEB: (&str, &str, &str) = (
    "shop",
    "db-allow-web",
    r#"{"endpointSelector":{"matchLabels":{"app":"db"}},
        "ingress":[{"fromEndpoints":[{"matchLabels":{"app":"web"}}],"toPorts":[{"port":5432,"protocol":"TCP"}]}]}"#,
);

const CASES: &[Case] = &[
    Case {
        name: "no policy: everything allowed",
        policies: &[],
        checks: &[
            ("db", I, "west-web", 1, "UDP", true),
            ("db", E, "world", 443, "TCP", true),
        ],
    },
    Case {
        name: "peer selector: policy namespace, local cluster only, port and protocol exact",
        policies: &[DB_ALLOW_WEB],
        checks: &[
            ("db", I, "web", 5432, "TCP", true),
            ("db", I, "web", 5433, "TCP", false),
            ("db", I, "web", 5432, "UDP", false),
            ("db", I, "west-web", 5432, "TCP", false),
            ("db", I, "billing-web", 5432, "TCP", false),
            ("db", I, "world", 5432, "TCP", false),
            // Ingress rules only: egress stays open; web is not selected at all.
            ("db", E, "world", 443, "TCP", true),
            ("web", I, "world", 80, "TCP", true),
        ],
    },
    Case {
        name: "naming the cluster label reaches remote clusters (and only those named)",
        policies: &[(
            "shop",
            "p",
            r#"{"endpointSelector":{"matchLabels":{"app":"db"}},
                "ingress":[{"fromEndpoints":[{"matchLabels":{"app":"web","io.meshd.cluster":"west"}}]}]}"#,
        )],
        checks: &[
            ("db", I, "west-web", 5432, "TCP", true),
            ("db", I, "west-web", 9, "SCTP", true),
            ("db", I, "web", 5432, "TCP", false),
        ],
    },
    Case {
        name: "matchExpressions on the cluster label",
        policies: &[(
            "shop",
            "p",
            r#"{"endpointSelector":{"matchLabels":{"app":"db"}},
                "ingress":[{"fromEndpoints":[{"matchLabels":{"app":"web"},
                  "matchExpressions":[{"key":"io.meshd.cluster","operator":"In","values":["east","west"]}]}]}]}"#,
        )],
        checks: &[
            ("db", I, "web", 1, "TCP", true),
            ("db", I, "west-web", 1, "TCP", true),
            ("db", I, "west-db", 1, "TCP", false),
            ("db", I, "billing-web", 1, "TCP", false),
        ],
    },
    Case {
        name: "naming the namespace label leaves the policy's namespace (still local cluster)",
        policies: &[(
            "shop",
            "p",
            r#"{"endpointSelector":{"matchLabels":{"app":"db"}},
                "ingress":[{"fromEndpoints":[{"matchLabels":{"k8s:io.kubernetes.pod.namespace":"billing"}}]}]}"#,
        )],
        checks: &[
            ("db", I, "billing-web", 1, "TCP", true),
            ("db", I, "web", 1, "TCP", false),
            ("db", I, "north-invoices", 1, "TCP", false),
        ],
    },
    Case {
        name: "default deny per direction: egress: [] denies all egress, ingress untouched",
        policies: &[(
            "shop",
            "deny-egress",
            r#"{"endpointSelector":{},"egress":[]}"#,
        )],
        checks: &[
            ("db", E, "web", 80, "TCP", false),
            ("web", E, "world", 443, "TCP", false),
            ("db", I, "web", 80, "TCP", true),
            // Another namespace is not selected.
            ("billing-web", E, "world", 443, "TCP", true),
        ],
    },
    Case {
        name: "rules and policies are additive",
        policies: &[
            DB_ALLOW_WEB,
            (
                "shop",
                "db-allow-invoices",
                r#"{"endpointSelector":{"matchLabels":{"app":"db"}},
                    "ingress":[{"fromEndpoints":[{"matchLabels":{"app":"invoices","io.meshd.cluster":"north","io.kubernetes.pod.namespace":"billing"}}],
                                "toPorts":[{"port":8080,"protocol":"TCP"}]},
                               {"fromEntities":["host"]}]}"#,
            ),
        ],
        checks: &[
            ("db", I, "web", 5432, "TCP", true),
            ("db", I, "north-invoices", 8080, "TCP", true),
            ("db", I, "north-invoices", 5432, "TCP", false),
            ("db", I, "web", 8080, "TCP", false),
            ("db", I, "host", 22, "TCP", true),
        ],
    },
    Case {
        name: "entities world, host, remote-node",
        policies: &[(
            "shop",
            "p",
            r#"{"endpointSelector":{"matchLabels":{"app":"web"}},
                "ingress":[{"fromEntities":["world","remote-node"],"toPorts":[{"port":443,"protocol":"TCP"}]}],
                "egress":[{"toEntities":["host"]}]}"#,
        )],
        checks: &[
            ("web", I, "world", 443, "TCP", true),
            ("web", I, "remote-node", 443, "TCP", true),
            ("web", I, "host", 443, "TCP", false),
            ("web", I, "west-web", 443, "TCP", false),
            ("web", E, "host", 10250, "TCP", true),
            ("web", E, "world", 443, "TCP", false),
        ],
    },
    Case {
        name: "entity cluster: the local cluster (any namespace) and the host, not remote clusters",
        policies: &[(
            "shop",
            "p",
            r#"{"endpointSelector":{},"ingress":[{"fromEntities":["cluster"]}]}"#,
        )],
        checks: &[
            ("db", I, "web", 1, "TCP", true),
            ("db", I, "billing-web", 1, "UDP", true),
            ("db", I, "host", 1, "TCP", true),
            ("db", I, "west-web", 1, "TCP", false),
            ("db", I, "remote-node", 1, "TCP", false),
            ("db", I, "world", 1, "TCP", false),
        ],
    },
    Case {
        name: "entity all: anything, remote and unknown included",
        policies: &[(
            "shop",
            "p",
            r#"{"endpointSelector":{},"egress":[{"toEntities":["all"],"toPorts":[{"port":53,"protocol":"UDP"}]}]}"#,
        )],
        checks: &[
            ("web", E, "north-invoices", 53, "UDP", true),
            ("web", E, "world", 53, "UDP", true),
            ("web", E, "world", 53, "TCP", false),
        ],
    },
    Case {
        name: "port ranges and ANY protocol",
        policies: &[(
            "shop",
            "p",
            r#"{"endpointSelector":{"matchLabels":{"app":"db"}},
                "ingress":[{"fromEndpoints":[{}],"toPorts":[{"port":8000,"endPort":8010,"protocol":"TCP"},{"port":53}]}]}"#,
        )],
        checks: &[
            ("db", I, "web", 8000, "TCP", true),
            ("db", I, "web", 8005, "TCP", true),
            ("db", I, "web", 8010, "TCP", true),
            ("db", I, "web", 8011, "TCP", false),
            ("db", I, "web", 7999, "TCP", false),
            ("db", I, "web", 8005, "UDP", false),
            ("db", I, "web", 53, "UDP", true),
            ("db", I, "web", 53, "TCP", true),
            ("db", I, "web", 53, "SCTP", true),
            ("db", I, "billing-web", 53, "UDP", false),
        ],
    },
    Case {
        name: "full range 1-65535 is any port; toPorts without peers is any peer",
        policies: &[(
            "shop",
            "p",
            r#"{"endpointSelector":{"matchLabels":{"app":"db"}},
                "ingress":[{"toPorts":[{"port":1,"endPort":65535,"protocol":"UDP"}]}]}"#,
        )],
        checks: &[
            ("db", I, "north-invoices", 40000, "UDP", true),
            ("db", I, "world", 1, "UDP", true),
            ("db", I, "web", 40000, "TCP", false),
        ],
    },
    Case {
        name: "a policy only selects endpoints of its own namespace",
        policies: &[(
            "billing",
            "p",
            r#"{"endpointSelector":{"matchLabels":{"app":"db"}},"ingress":[]}"#,
        )],
        checks: &[("db", I, "web", 5432, "TCP", true)],
    },
    Case {
        name: "endpointSelector naming another cluster selects nothing here",
        policies: &[(
            "shop",
            "p",
            r#"{"endpointSelector":{"matchLabels":{"io.meshd.cluster":"west"}},"ingress":[]}"#,
        )],
        checks: &[
            ("db", I, "web", 5432, "TCP", true),
            ("web", I, "web", 1, "TCP", true),
        ],
    },
];

fn proto_of(s: &str) -> TransportProtocol {
    TransportProtocol::parse(s).unwrap()
}

#[test]
fn semantics_table() {
    for case in CASES {
        let e = engine(case.policies);
        for &(ep, dir, peer, port, proto, want) in case.checks {
            let got = datapath_allows(
                &e,
                ep_of(ep),
                dir,
                id_of(peer),
                port,
                proto_of(proto).number(),
            );
            assert_eq!(
                got,
                want,
                "case {:?}: {ep} {} {peer} {port}/{proto}: entries {:?}",
                case.name,
                dir.as_str(),
                e.endpoint_entries(ep_of(ep))
            );
            let t = e.trace_direction(&labels_of(ep), &labels_of(peer), dir, port, proto_of(proto));
            assert_eq!(
                t.allowed(),
                want,
                "case {:?}: trace disagrees: {t}",
                case.name
            );
        }
    }
}

#[test]
fn trace_names_policy_and_rule() {
    let e = engine(&[
        DB_ALLOW_WEB,
        (
            "shop",
            "db-dns",
            r#"{"endpointSelector":{"matchLabels":{"app":"db"}},"ingress":[{"fromEntities":["world"],"toPorts":[{"port":53}]}]}"#,
        ),
    ]);
    let t = e.trace(
        &labels_of("web"),
        &labels_of("db"),
        5432,
        TransportProtocol::Tcp,
    );
    assert!(t.allowed(), "{t}");
    assert_eq!(t.egress.decision, TraceDecision::NoPolicy);
    assert_eq!(
        t.ingress.decision,
        TraceDecision::Allowed {
            policy: PolicyRef::new("shop", "db-allow-web"),
            rule: "ingress[0]".into(),
            peer: "fromEndpoints[0]".into(),
        }
    );
    let t = e.trace(
        &labels_of("world"),
        &labels_of("db"),
        53,
        TransportProtocol::Udp,
    );
    assert!(t.allowed(), "{t}");
    assert_eq!(t.egress.decision, TraceDecision::NotLocal);
    let TraceDecision::Allowed {
        policy: by, peer, ..
    } = &t.ingress.decision
    else {
        panic!("{t}")
    };
    assert_eq!(
        (by.name.as_str(), peer.as_str()),
        ("db-dns", "fromEntities[0] (world)")
    );

    let t = e.trace(
        &labels_of("west-web"),
        &labels_of("db"),
        5432,
        TransportProtocol::Tcp,
    );
    assert!(!t.allowed());
    assert_eq!(
        t.ingress.decision,
        TraceDecision::DefaultDeny {
            selected_by: vec![
                PolicyRef::new("shop", "db-allow-web"),
                PolicyRef::new("shop", "db-dns")
            ]
        }
    );
    let text = t.to_string();
    assert!(
        text.starts_with("DENIED")
            && text.contains("default deny (selected by shop/db-allow-web, shop/db-dns"),
        "{text}"
    );

    // Across clusters: west's egress policy denies, east's ingress allows.
    let mut west = PolicyEngine::new(ClusterName::new("west").unwrap());
    west.upsert_policy(policy(
        "shop",
        "web-egress",
        r#"{"endpointSelector":{"matchLabels":{"app":"web"}},"egress":[]}"#,
    ))
    .unwrap();
    let e2 = engine(&[(
        "shop",
        "db-from-west",
        r#"{"endpointSelector":{"matchLabels":{"app":"db"}},"ingress":[{"fromEndpoints":[{"matchLabels":{"io.meshd.cluster":"west"}}]}]}"#,
    )]);
    let t = trace_mesh(
        &[&e2, &west],
        &labels_of("west-web"),
        &labels_of("db"),
        5432,
        TransportProtocol::Tcp,
    );
    assert!(t.ingress.allowed() && !t.egress.allowed(), "{t}");
    assert_eq!(t.egress.cluster.as_str(), "west");
}

#[test]
fn rejected_policy_keeps_previous_version() {
    let mut e = engine(&[DB_ALLOW_WEB]);
    let db = ep_of("db");
    let before = e.endpoint_entries(db);
    assert!(!before.is_empty());
    let _ = e.take_diffs();
    let bad = policy(
        "shop",
        "db-allow-web",
        r#"{"endpointSelector":{"matchLabels":{"app":"db"}},"ingress":[{"toPorts":[{"port":90,"endPort":80}]}]}"#,
    );
    let err = e.upsert_policy(bad).unwrap_err();
    let PolicyError::Invalid(v) = &err else {
        panic!("{err}")
    };
    assert_eq!(v.policy, "shop/db-allow-web");
    assert_eq!(v.field, "spec.ingress[0].toPorts[0].endPort");
    assert_eq!(e.endpoint_entries(db), before);
    assert!(e.take_diffs().is_empty());
    assert_eq!(
        e.rejected().keys().collect::<Vec<_>>(),
        [&PolicyRef::new("shop", "db-allow-web")]
    );
    assert_eq!(
        e.policies_for_endpoint(db),
        [PolicyRef::new("shop", "db-allow-web")]
    );
    // A valid version clears the rejection; removal revokes everything.
    e.upsert_policy(policy(DB_ALLOW_WEB.0, DB_ALLOW_WEB.1, DB_ALLOW_WEB.2))
        .unwrap();
    assert!(e.rejected().is_empty());
    assert!(e.remove_policy(&PolicyRef::new("shop", "db-allow-web")));
    assert!(e.endpoint_entries(db).is_empty());
    assert_eq!(e.enforcement(db), (false, false));
}

#[test]
fn remote_identity_changes_only_touch_what_it_matches() {
    let mut e = engine(&[(
        "shop",
        "db-from-west",
        r#"{"endpointSelector":{"matchLabels":{"app":"db"}},
            "ingress":[{"fromEndpoints":[{"matchLabels":{"app":"web","io.meshd.cluster":"west"}}],"toPorts":[{"port":5432,"protocol":"TCP"}]}]}"#,
    )]);
    let _ = e.take_diffs();
    let new = Identity::from_raw(0x2_0200).unwrap();
    let labels = Labels::parse([
        "k8s:app=web",
        "k8s:io.kubernetes.pod.namespace=shop",
        "mesh:io.meshd.cluster=west",
        "k8s:pod-template-hash=x",
    ])
    .unwrap();
    e.upsert_identity(new, labels).unwrap();
    let diffs = e.take_diffs();
    let want = meshd::policy::PolicyDiff::Allow(PolicyEntry {
        endpoint: ep_of("db"),
        peer: Peer::Identity(new),
        port: 5432,
        proto: 6,
        direction: Direction::Ingress,
    });
    assert_eq!(diffs, [want]);
    // An identity no selector matches changes nothing.
    e.upsert_identity(
        Identity::from_raw(0x2_0201).unwrap(),
        Labels::parse(["k8s:app=other", "mesh:io.meshd.cluster=west"]).unwrap(),
    )
    .unwrap();
    assert!(e.take_diffs().is_empty());
    assert!(e.remove_identity(new));
    let meshd::policy::PolicyDiff::Allow(entry) = want else {
        unreachable!()
    };
    assert_eq!(e.take_diffs(), [meshd::policy::PolicyDiff::Revoke(entry)]);
    // Reserved identities are built in.
    assert!(
        e.upsert_identity(ReservedIdentity::World.identity(), Labels::default())
            .is_err()
    );
}
