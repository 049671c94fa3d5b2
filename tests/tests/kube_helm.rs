//! The Helm chart `deploy/helm/meshd`: rendered with a small Rust pass over the Go-template
//! subset the chart uses (helm is not installable here), every object and CRD parses into
//! k8s-openapi types and serializes back to exactly what was rendered (no unknown or
//! misspelled fields), for several value sets; key properties are checked.

use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/meshd")
}

/// Renders the Go-template subset the chart uses: `{{ .Path }}`, `{{ .Path | quote }}`,
/// `{{ if .Path }}`, `{{ if eq .Path "lit" }}`, `{{ else }}`, `{{ end }}`, with `{{-`/`-}}`
/// whitespace trimming. Anything else is an error, so the chart stays in the subset.
fn render(template: &str, ctx: &Value) -> Result<String, String> {
    let mut out = String::new();
    let mut stack: Vec<bool> = Vec::new();
    let mut rest = template;
    let mut trim_next = false;
    while let Some(start) = rest.find("{{") {
        let mut text = &rest[..start];
        if trim_next {
            text = text.trim_start();
        }
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or("unclosed {{")?;
        let mut action = &after[..end];
        if let Some(a) = action.strip_prefix('-') {
            text = text.trim_end();
            action = a;
        }
        trim_next = false;
        if let Some(a) = action.strip_suffix('-') {
            trim_next = true;
            action = a;
        }
        let active = stack.iter().all(|b| *b);
        if active {
            out.push_str(text);
        }
        let action = action.trim();
        if let Some(cond) = action.strip_prefix("if ") {
            stack.push(active && condition(cond.trim(), ctx)?);
        } else if action == "else" {
            let last = stack.pop().ok_or("else without if")?;
            let outer = stack.iter().all(|b| *b);
            stack.push(outer && !last);
        } else if action == "end" {
            stack.pop().ok_or("end without if")?;
        } else if active {
            out.push_str(&expression(action, ctx)?);
        }
        rest = &after[end + 2..];
    }
    if !stack.is_empty() {
        return Err("if without end".into());
    }
    out.push_str(if trim_next { rest.trim_start() } else { rest });
    Ok(out)
}

fn lookup<'a>(path: &str, ctx: &'a Value) -> Result<&'a Value, String> {
    let path = path
        .strip_prefix('.')
        .ok_or_else(|| format!("unsupported expression {path:?}"))?;
    path.split('.')
        .try_fold(ctx, |v, k| v.get(k))
        .ok_or_else(|| format!("no value .{path}"))
}

fn format(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn expression(action: &str, ctx: &Value) -> Result<String, String> {
    let (path, quote) = match action.split_once('|') {
        Some((p, f)) if f.trim() == "quote" => (p.trim(), true),
        Some((_, f)) => return Err(format!("unsupported function {f:?}")),
        None => (action, false),
    };
    let s = format(lookup(path, ctx)?);
    Ok(if quote {
        serde_json::to_string(&s).unwrap()
    } else {
        s
    })
}

fn condition(cond: &str, ctx: &Value) -> Result<bool, String> {
    if let Some(rest) = cond.strip_prefix("eq ") {
        let (path, lit) = rest
            .trim()
            .split_once(' ')
            .ok_or_else(|| format!("bad eq {cond:?}"))?;
        let lit: String = serde_json::from_str(lit.trim()).map_err(|e| e.to_string())?;
        return Ok(format(lookup(path, ctx)?) == lit);
    }
    let v = lookup(cond, ctx)?;
    Ok(match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    })
}

/// JSON merge of `patch` into `base`.
fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, p) => *b = p.clone(),
    }
}

/// Removes nulls and empty objects/arrays that serialization may drop or add.
fn normalize(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for x in m.values_mut() {
                normalize(x);
            }
            m.retain(|_, x| !x.is_null());
        }
        Value::Array(a) => a.iter_mut().for_each(normalize),
        // Schema bounds are f64 in k8s-openapi: compare numbers by value.
        Value::Number(n) => {
            if let Some(f) = n.as_f64().and_then(serde_json::Number::from_f64) {
                *n = f;
            }
        }
        _ => {}
    }
}

fn roundtrip<T: DeserializeOwned + Serialize>(doc: &Value, what: &str) -> T {
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{what}: does not parse: {e}\n{doc:#}"));
    let mut back = serde_json::to_value(&typed).unwrap();
    let mut orig = doc.clone();
    normalize(&mut back);
    normalize(&mut orig);
    assert_eq!(
        back, orig,
        "{what}: fields lost in the round trip (unknown or misspelled)"
    );
    typed
}

#[derive(Default, Debug)]
struct Rendered {
    deployments: Vec<Deployment>,
    daemonsets: Vec<DaemonSet>,
    services: Vec<Service>,
    configmaps: Vec<ConfigMap>,
    cluster_roles: Vec<ClusterRole>,
    roles: Vec<Role>,
    crds: Vec<CustomResourceDefinition>,
    objects: usize,
}

fn render_chart(overrides: &Value) -> Rendered {
    let values_text = std::fs::read_to_string(chart().join("values.yaml")).unwrap();
    let mut values: Value = serde_saphyr::from_str(&values_text).unwrap();
    merge(&mut values, overrides);
    let chart_meta: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(chart().join("Chart.yaml")).unwrap())
            .unwrap();
    let ctx = json!({
        "Values": values,
        "Release": {"Name": "meshd", "Namespace": "meshd"},
        "Chart": {"AppVersion": chart_meta["appVersion"], "Version": chart_meta["version"]},
    });
    let mut r = Rendered::default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart().join("templates"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let crd_files = std::fs::read_dir(chart().join("crds"))
        .unwrap()
        .map(|e| e.unwrap().path());
    for path in files.iter().cloned().chain(crd_files) {
        let text = std::fs::read_to_string(&path).unwrap();
        let rendered = if path.parent().unwrap().ends_with("templates") {
            render(&text, &ctx).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        } else {
            text // crds/ are not templated (Helm installs them as they are)
        };
        let docs: Vec<Value> = serde_saphyr::from_multiple(&rendered)
            .unwrap_or_else(|e| panic!("{}: invalid YAML: {e}\n{rendered}", path.display()));
        for doc in docs.into_iter().filter(|d| !d.is_null()) {
            let what = format!(
                "{} {} {}",
                path.file_name().unwrap().to_string_lossy(),
                doc["kind"],
                doc["metadata"]["name"]
            );
            assert!(doc["metadata"]["name"].is_string(), "{what}: no name");
            r.objects += 1;
            match doc["kind"].as_str().unwrap_or_default() {
                "Deployment" => r.deployments.push(roundtrip(&doc, &what)),
                "DaemonSet" => r.daemonsets.push(roundtrip(&doc, &what)),
                "Service" => r.services.push(roundtrip(&doc, &what)),
                "ConfigMap" => r.configmaps.push(roundtrip(&doc, &what)),
                "ServiceAccount" => drop(roundtrip::<ServiceAccount>(&doc, &what)),
                "ClusterRole" => r.cluster_roles.push(roundtrip(&doc, &what)),
                "ClusterRoleBinding" => drop(roundtrip::<ClusterRoleBinding>(&doc, &what)),
                "Role" => r.roles.push(roundtrip(&doc, &what)),
                "RoleBinding" => drop(roundtrip::<RoleBinding>(&doc, &what)),
                "CustomResourceDefinition" => r.crds.push(roundtrip(&doc, &what)),
                other => panic!("{what}: unexpected kind {other}"),
            }
        }
    }
    r
}

#[test]
fn kube_helm_chart_renders_valid_objects() {
    let r = render_chart(&json!({"cluster": {"name": "east", "id": 3}}));
    assert_eq!(r.deployments.len(), 1);
    assert_eq!(r.daemonsets.len(), 1);
    assert_eq!(r.crds.len(), 1, "MCS CRDs are off by default");

    // The ConfigMap meshctl reads, with the keys meshd::kube reads.
    let data = r.configmaps[0].data.clone().unwrap();
    assert_eq!(
        r.configmaps[0].metadata.name.as_deref(),
        Some(meshd::kube::CONFIG_MAP)
    );
    assert_eq!(data[meshd::kube::CONFIG_CLUSTER_NAME], "east");
    assert_eq!(data[meshd::kube::CONFIG_CLUSTER_ID], "3");
    assert_eq!(data[meshd::kube::CONFIG_MAX_CONNECTED_CLUSTERS], "255");

    // NodePort Service with the etcd port meshd::kube looks for.
    let svc = &r.services[0];
    assert_eq!(
        svc.metadata.name.as_deref(),
        Some(meshd::kube::APISERVER_SERVICE)
    );
    let spec = svc.spec.clone().unwrap();
    assert_eq!(spec.type_.as_deref(), Some("NodePort"));
    assert_eq!(
        spec.ports.unwrap()[0].name.as_deref(),
        Some(meshd::kube::ETCD_PORT_NAME)
    );

    // The apiserver: etcd as a native sidecar with TLS and client-cert auth; Kubernetes
    // source, peer Secrets, etcd bootstrap.
    let pod = r.deployments[0]
        .spec
        .clone()
        .unwrap()
        .template
        .spec
        .unwrap();
    let etcd = &pod.init_containers.unwrap()[0];
    assert_eq!(etcd.restart_policy.as_deref(), Some("Always"));
    let etcd_args = etcd.args.clone().unwrap();
    assert!(etcd_args.contains(&"--client-cert-auth".to_owned()));
    assert!(etcd_args.iter().any(|a| a.starts_with("--cert-file=")));
    let args = pod.containers[0].args.clone().unwrap();
    for want in [
        "--source=kubernetes",
        "--peer-secrets-namespace=meshd",
        "--cluster-id=3",
        "--etcd-bootstrap-cert=/var/lib/meshd/certs/root.crt",
    ] {
        assert!(args.contains(&want.to_owned()), "{want} in {args:?}");
    }

    // The agent: privileged, host network, bpffs (bidirectional) and cgroup from the host.
    let agent = r.daemonsets[0].spec.clone().unwrap().template.spec.unwrap();
    assert_eq!(agent.host_network, Some(true));
    let c = &agent.containers[0];
    assert_eq!(c.security_context.clone().unwrap().privileged, Some(true));
    // Fail closed: the agent runs eBPF or does not start (no silent recording fallback).
    let agent_args = c.args.clone().unwrap();
    assert!(
        agent_args.contains(&"--datapath=ebpf".to_owned()),
        "{agent_args:?}"
    );
    assert!(
        !agent_args
            .iter()
            .any(|a| a.starts_with("--datapath-fallback"))
    );
    let mounts = c.volume_mounts.clone().unwrap();
    let bpf = mounts
        .iter()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .unwrap();
    assert_eq!(bpf.mount_propagation.as_deref(), Some("Bidirectional"));
    assert!(mounts.iter().any(|m| m.mount_path == "/sys/fs/cgroup"));
    let host_paths: Vec<String> = agent
        .volumes
        .unwrap()
        .iter()
        .filter_map(|v| v.host_path.as_ref().map(|h| h.path.clone()))
        .collect();
    assert_eq!(host_paths, ["/sys/fs/bpf", "/sys/fs/cgroup"]);

    // Least privilege: cluster-wide writes only to ServiceExport status and ServiceImports;
    // Secrets only read, in the release namespace.
    for role in &r.cluster_roles {
        for rule in role.rules.clone().unwrap() {
            let resources = rule.resources.clone().unwrap_or_default();
            let writes = rule
                .verbs
                .iter()
                .any(|v| !matches!(v.as_str(), "get" | "list" | "watch"));
            if writes {
                assert!(
                    resources.iter().all(|r| matches!(
                        r.as_str(),
                        "serviceexports/status" | "serviceimports" | "serviceimports/status"
                    )),
                    "cluster-wide writes only for MCS status: {resources:?}"
                );
            }
            assert!(!resources.contains(&"secrets".to_owned()));
        }
    }
    let peers = &r.roles[0];
    assert_eq!(peers.metadata.namespace.as_deref(), Some("meshd"));
    let secret_rule = peers
        .rules
        .clone()
        .unwrap()
        .into_iter()
        .find(|r| r.resources.clone().unwrap_or_default() == ["secrets"])
        .unwrap();
    assert_eq!(secret_rule.verbs, ["get", "list", "watch"]);

    // The chart's CRD is deploy/crds' file, unchanged.
    assert_eq!(
        std::fs::read_to_string(chart().join("crds/meshnetworkpolicies.meshd.io.yaml")).unwrap(),
        std::fs::read_to_string(chart().join("../../crds/meshnetworkpolicies.meshd.io.yaml"))
            .unwrap(),
        "deploy/helm/meshd/crds/ must be a copy of deploy/crds/ (cp deploy/crds/*.yaml deploy/helm/meshd/crds/)"
    );
}

#[test]
fn kube_helm_chart_value_variants() {
    let r = render_chart(&json!({
        "cluster": {"name": "west", "id": 2},
        "service": {"type": "LoadBalancer", "nodePort": 31000},
        "agent": {"enabled": false, "dnsListen": "169.254.20.10:53"},
        "mcs": {"installCRDs": true},
        "apiserver": {"clustersetCIDR": "198.18.128.0/20"},
    }));
    assert!(r.daemonsets.is_empty(), "agent disabled");
    assert_eq!(
        r.crds.len(),
        3,
        "MeshNetworkPolicy + ServiceExport + ServiceImport"
    );
    let spec = r.services[0].spec.clone().unwrap();
    assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(
        spec.ports.unwrap()[0].node_port,
        None,
        "nodePort only with NodePort"
    );
    let pod = r.deployments[0]
        .spec
        .clone()
        .unwrap()
        .template
        .spec
        .unwrap();
    let env = pod.containers[0].env.clone().unwrap();
    assert!(env.iter().any(|e| e.name == "MESH_CLUSTERSET_CIDR"));

    let r = render_chart(&json!({"cluster": {"name": "east"}, "service": {"nodePort": 32379}}));
    let port = &r.services[0].spec.clone().unwrap().ports.unwrap()[0];
    assert_eq!(port.node_port, Some(32379));
    assert!(r.objects > 10);
}

/// The volumes of `pod` that `container` mounts, with the Secret and keys each gives it.
fn secret_keys_of(
    pod: &k8s_openapi::api::core::v1::PodSpec,
    container: &Container,
) -> Vec<(String, String)> {
    let volumes = pod.volumes.clone().unwrap_or_default();
    let mut out = Vec::new();
    for m in container.volume_mounts.clone().unwrap_or_default() {
        let Some(secret) = volumes
            .iter()
            .find(|v| v.name == m.name)
            .and_then(|v| v.secret.clone())
        else {
            continue;
        };
        let name = secret.secret_name.clone().unwrap_or_default();
        match secret.items {
            Some(items) => out.extend(items.into_iter().map(|i| (name.clone(), i.key))),
            None => out.push((name, "*".to_owned())),
        }
    }
    out
}

fn arg<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .find_map(|a| a.strip_prefix(flag).and_then(|v| v.strip_prefix('=')))
}

/// The identity relay (relay.enabled, the default): the apiserver runs it with the peer CA as
/// its only client CA and the relay CA from a Secret only it mounts; etcd trusts the bundle
/// (cluster CA + relay CA) and never sees a key of the relay Secret; the Service's `relay`
/// port targets the relay while `etcd` (agents, meshctl's root access) targets etcd.
#[test]
fn kube_helm_chart_wires_the_identity_relay() {
    let r = render_chart(&json!({"cluster": {"name": "east", "id": 3},
                                 "service": {"nodePort": 32379, "relayNodePort": 32381}}));
    let pod = r.deployments[0]
        .spec
        .clone()
        .unwrap()
        .template
        .spec
        .unwrap();
    let etcd = pod.init_containers.clone().unwrap()[0].clone();
    let apiserver = pod.containers[0].clone();
    let (etcd_args, args) = (etcd.args.clone().unwrap(), apiserver.args.clone().unwrap());

    // Relay flags: listening on the container port the Service targets; the peer CA is its
    // client CA; the relay CA mints etcd certificates; upstream is the loopback etcd.
    let relay_port = apiserver
        .ports
        .clone()
        .unwrap()
        .into_iter()
        .find(|p| p.name.as_deref() == Some("relay"))
        .expect("apiserver container port relay")
        .container_port;
    assert_eq!(
        arg(&args, "--relay-listen"),
        Some(format!("0.0.0.0:{relay_port}").as_str())
    );
    for (flag, file) in [
        ("--relay-cert", "relay.crt"),
        ("--relay-key", "relay.key"),
        ("--relay-client-ca", "peer-ca.crt"),
        ("--relay-ca-cert", "relay-ca.crt"),
        ("--relay-ca-key", "relay-ca.key"),
    ] {
        assert_eq!(
            arg(&args, flag),
            Some(format!("/var/lib/meshd/relay/{file}").as_str()),
            "{flag} in {args:?}"
        );
    }
    assert_eq!(arg(&args, "--relay-check-interval"), Some("1s"));
    assert_eq!(
        arg(&args, "--etcd-endpoint"),
        Some("https://127.0.0.1:2379")
    );

    // etcd trusts the bundle from the relay Secret, and nothing else of it.
    assert_eq!(
        arg(&etcd_args, "--trusted-ca-file"),
        Some("/var/lib/meshd/etcd-client-ca/etcd-client-ca.crt")
    );
    let etcd_keys = secret_keys_of(&pod, &etcd);
    assert!(
        etcd_keys.contains(&("meshd-relay".to_owned(), "etcd-client-ca.crt".to_owned())),
        "{etcd_keys:?}"
    );
    let etcd_relay_keys: Vec<&String> = etcd_keys
        .iter()
        .filter(|(s, _)| s == "meshd-relay")
        .map(|(_, k)| k)
        .collect();
    assert_eq!(
        etcd_relay_keys,
        ["etcd-client-ca.crt"],
        "etcd sees only the bundle"
    );

    // The relay CA key (and the relay's own key) only in the apiserver container; the peer
    // CA Secret (with its key) mounted nowhere.
    let api_keys = secret_keys_of(&pod, &apiserver);
    for key in [
        "relay.crt",
        "relay.key",
        "peer-ca.crt",
        "relay-ca.crt",
        "relay-ca.key",
    ] {
        assert!(
            api_keys.contains(&("meshd-relay".to_owned(), key.to_owned())),
            "{key} in {api_keys:?}"
        );
    }
    let agent = r.daemonsets[0].spec.clone().unwrap().template.spec.unwrap();
    let mut everyone = vec![(pod.clone(), etcd.clone())];
    everyone.extend(agent.containers.iter().map(|c| (agent.clone(), c.clone())));
    for (p, c) in &everyone {
        let keys = secret_keys_of(p, c);
        assert!(
            !keys
                .iter()
                .any(|(s, k)| s == "meshd-relay" && (k.ends_with(".key") || k == "*")),
            "{} must not mount a key of the relay Secret: {keys:?}",
            c.name
        );
    }
    everyone.push((pod, apiserver));
    for (p, c) in &everyone {
        assert!(
            !secret_keys_of(p, c)
                .iter()
                .any(|(s, _)| s == "meshd-peer-ca"),
            "{} must not mount the peer CA",
            c.name
        );
    }

    // Service: `relay` targets the relay (peers), `etcd` targets etcd (agents, meshctl root).
    let ports = r.services[0].spec.clone().unwrap().ports.unwrap();
    let port = |name: &str| {
        ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("Service port {name}"))
            .clone()
    };
    let relay = port(meshd::kube::RELAY_PORT_NAME);
    assert_eq!(relay.target_port, Some(IntOrString::String("relay".into())));
    assert_eq!(relay.node_port, Some(32381));
    let etcd_port = port(meshd::kube::ETCD_PORT_NAME);
    assert_eq!(
        etcd_port.target_port,
        Some(IntOrString::String("etcd".into()))
    );
    assert_eq!(etcd_port.node_port, Some(32379));
    assert!(
        etcd.ports
            .unwrap()
            .iter()
            .any(|p| p.name.as_deref() == Some("etcd") && p.container_port == 2379)
    );
    // The agents reach etcd through the etcd port, in-cluster.
    let agent_args = agent.containers[0].args.clone().unwrap();
    assert_eq!(
        arg(&agent_args, "--etcd-endpoint"),
        Some("https://clustermesh-apiserver.meshd.svc:2379")
    );

    // relay.enabled false: what installs before the relay had.
    let r = render_chart(&json!({"cluster": {"name": "east"}, "relay": {"enabled": false}}));
    let pod = r.deployments[0]
        .spec
        .clone()
        .unwrap()
        .template
        .spec
        .unwrap();
    let args = pod.containers[0].args.clone().unwrap();
    assert!(!args.iter().any(|a| a.starts_with("--relay")), "{args:?}");
    let etcd_args = pod.init_containers.unwrap()[0].args.clone().unwrap();
    assert_eq!(
        arg(&etcd_args, "--trusted-ca-file"),
        Some("/var/lib/meshd/ca/ca.crt")
    );
    let names: Vec<String> = r.services[0]
        .spec
        .clone()
        .unwrap()
        .ports
        .unwrap()
        .into_iter()
        .filter_map(|p| p.name)
        .collect();
    assert_eq!(names, ["etcd"]);
    assert!(
        !pod.volumes.unwrap().iter().any(|v| v
            .secret
            .as_ref()
            .and_then(|s| s.secret_name.as_deref())
            == Some("meshd-relay"))
    );
}

#[test]
fn kube_helm_renderer_subset() {
    let ctx = json!({"Values": {"a": "x", "n": 0, "t": true, "m": {}}});
    assert_eq!(
        render(
            "k: {{ .Values.a | quote }}\n{{- if .Values.t }}\nyes{{- else }}\nno{{- end }}\n",
            &ctx
        )
        .unwrap(),
        "k: \"x\"\nyes\n"
    );
    assert_eq!(
        render("{{- if .Values.n }}a{{ else }}b{{ end }}", &ctx).unwrap(),
        "b"
    );
    assert!(render("{{ .Values.a | upper }}", &ctx).is_err());
    assert!(render("{{ .Values.missing }}", &ctx).is_err());
    assert!(render("{{ if .Values.t }}", &ctx).is_err());
}
