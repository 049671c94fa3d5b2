//! The CRD in `deploy/crds/` agrees with the Rust types (field names, enums, kind, group).

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::model::{
    EgressRule, Entity, IngressRule, LabelSelector, LabelSelectorRequirement,
    MeshNetworkPolicySpec, POLICY_API_VERSION, POLICY_KIND, PolicyProtocol, PortRule,
    SelectorOperator,
};

const CRD: &str = include_str!("../../../deploy/crds/meshnetworkpolicies.meshd.io.yaml");

fn keys(v: &Value) -> BTreeSet<String> {
    v["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("no properties in {v}"))
        .keys()
        .cloned()
        .collect()
}

fn json_keys<T: serde::Serialize>(t: &T) -> BTreeSet<String> {
    serde_json::to_value(t)
        .unwrap()
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

fn enum_of(v: &Value) -> BTreeSet<String> {
    v["enum"]
        .as_array()
        .unwrap_or_else(|| panic!("no enum in {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

fn names<T: serde::Serialize>(all: &[T]) -> BTreeSet<String> {
    all.iter()
        .map(|t| {
            serde_json::to_value(t)
                .unwrap()
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

#[test]
fn crd_matches_the_rust_types() {
    let crd: Value = serde_saphyr::from_str(CRD).unwrap();
    let (group, version) = POLICY_API_VERSION.split_once('/').unwrap();
    assert_eq!(crd["spec"]["group"], json!(group));
    assert_eq!(crd["spec"]["names"]["kind"], json!(POLICY_KIND));
    let v = &crd["spec"]["versions"][0];
    assert_eq!(v["name"], json!(version));
    let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"];

    let port = PortRule {
        port: 1,
        end_port: Some(2),
        protocol: PolicyProtocol::Tcp,
    };
    let sel = LabelSelector {
        match_labels: [("a".to_owned(), "b".to_owned())].into(),
        match_expressions: vec![LabelSelectorRequirement {
            key: "a".into(),
            operator: SelectorOperator::In,
            values: vec!["b".into()],
        }],
    };
    let ingress = IngressRule {
        from_endpoints: vec![sel.clone()],
        from_entities: vec![Entity::World],
        to_ports: vec![port],
    };
    let egress = EgressRule {
        to_endpoints: vec![sel.clone()],
        to_entities: vec![Entity::World],
        to_ports: vec![port],
    };
    let full = MeshNetworkPolicySpec {
        endpoint_selector: sel.clone(),
        ingress: Some(vec![ingress.clone()]),
        egress: Some(vec![egress.clone()]),
    };
    assert_eq!(keys(spec), json_keys(&full));
    let ing = &spec["properties"]["ingress"]["items"];
    let eg = &spec["properties"]["egress"]["items"];
    assert_eq!(keys(ing), json_keys(&ingress));
    assert_eq!(keys(eg), json_keys(&egress));
    for (rule, peers, ents) in [
        (ing, "fromEndpoints", "fromEntities"),
        (eg, "toEndpoints", "toEntities"),
    ] {
        let selector = &rule["properties"][peers]["items"];
        assert_eq!(keys(selector), json_keys(&sel));
        let expr = &selector["properties"]["matchExpressions"]["items"];
        assert_eq!(keys(expr), json_keys(&sel.match_expressions[0]));
        assert_eq!(
            enum_of(&expr["properties"]["operator"]),
            names(&[
                SelectorOperator::In,
                SelectorOperator::NotIn,
                SelectorOperator::Exists,
                SelectorOperator::DoesNotExist
            ])
        );
        assert_eq!(
            enum_of(&rule["properties"][ents]["items"]),
            names(&[
                Entity::World,
                Entity::Host,
                Entity::RemoteNode,
                Entity::Cluster,
                Entity::All
            ])
        );
        let p = &rule["properties"]["toPorts"]["items"];
        assert_eq!(keys(p), json_keys(&port));
        assert_eq!(
            enum_of(&p["properties"]["protocol"]),
            names(&[
                PolicyProtocol::Tcp,
                PolicyProtocol::Udp,
                PolicyProtocol::Sctp,
                PolicyProtocol::Any
            ])
        );
        assert_eq!(
            p["properties"]["protocol"]["default"],
            serde_json::to_value(PolicyProtocol::default()).unwrap()
        );
    }
    assert_eq!(
        keys(&spec["properties"]["endpointSelector"]),
        json_keys(&sel)
    );
    // Structural schema: no $ref anywhere.
    assert!(
        CRD.lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .all(|l| !l.contains("$ref") && !l.contains("definitions"))
    );
}
