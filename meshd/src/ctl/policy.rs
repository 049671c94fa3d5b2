//! `meshctl policy list|trace`: the agent's policy engine (`meshd::policy`), fed from a
//! cluster's etcd exactly as the agent feeds it.
//!
//! ```text
//!  admin kubeconfig ─► cluster etcd (root): mesh/policies/v1/<c>/   (local policies)
//!                                           mesh/state/identities + mesh/cache/identities
//!                                           mesh/state/ip/v1/<c>/   (local endpoints)
//!  ─► PolicyEngine per cluster ─► list: per endpoint, policies in force, default-deny, rejected
//!                              ─► trace: egress at the source's cluster, ingress at the
//!                                 destination's (trace_mesh), with the deciding policy and rule
//! ```

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;

use clap::{Args, Subcommand};
use serde::Serialize;

use super::admin::{self, ClusterAdmin, KubeconfigArgs};
use super::output::{OutputFormat, bad, emit, good, warn};
use super::{CtlError, Status, fail, runtime};
use crate::keys::{
    self, CACHE_PREFIX, Key, POLICY_PREFIX, STATE_PREFIX, StateKind, StateValue, decode_state,
};
use crate::model::{ClusterName, Identity, IpCacheEntry, Labels, MeshNetworkPolicy};
use crate::policy::{
    EndpointId, PolicyEngine, PolicyRef, TraceDecision, TransportProtocol, trace_mesh,
};

/// `meshctl policy` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum PolicyCommand {
    /// Per local endpoint: the policies selecting it, default-deny per direction, entries;
    /// and the policies rejected (with why).
    #[command(after_help = "Examples:
  meshctl policy list
  meshctl policy list --cluster east -o json")]
    List(ListArgs),
    /// Would a connection be allowed? Names the policy and rule that decided, at each end.
    #[command(after_help = "Examples:
  meshctl policy trace --from west/shop/web-5d8f7-x2 --to east/shop/db-0 --port 5432/TCP
  meshctl policy trace --from west/shop/app=web --to east/shop/app=db --port 5432/tcp -o json")]
    Trace(TraceArgs),
}

/// Arguments of `meshctl policy list`.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Which kubeconfig(s) name the clusters.
    #[command(flatten)]
    pub kube: KubeconfigArgs,
    /// Only this cluster (default: every cluster of the kubeconfig).
    #[arg(long)]
    pub cluster: Option<String>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// Arguments of `meshctl policy trace`.
#[derive(Debug, Clone, Args)]
pub struct TraceArgs {
    /// Which kubeconfig(s) name the clusters.
    #[command(flatten)]
    pub kube: KubeconfigArgs,
    /// Source: `<cluster>/<namespace>/<pod>` or `<cluster>/<namespace>/<key=value,…>`.
    #[arg(long)]
    pub from: String,
    /// Destination, same forms.
    #[arg(long)]
    pub to: String,
    /// Destination port and protocol, e.g. `5432/TCP` (protocol defaults to TCP).
    #[arg(long)]
    pub port: String,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// Runs `meshctl policy …`.
pub(super) fn run(cmd: &PolicyCommand, out: &mut impl Write) -> Result<Status, CtlError> {
    match cmd {
        PolicyCommand::List(a) => list(a, out),
        PolicyCommand::Trace(a) => trace(a, out),
    }
}

/// One cluster's engine and what it was built from.
struct Loaded {
    engine: PolicyEngine,
    /// Local endpoints: IP → ipcache entry.
    endpoints: BTreeMap<IpAddr, IpCacheEntry>,
    /// Policies that did not parse from etcd at all (key, error).
    undecodable: Vec<(String, String)>,
}

async fn prefix(
    client: &mut etcd_client::Client,
    prefix: &str,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>, CtlError> {
    let resp = client
        .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .map_err(|e| fail(format!("reading {prefix}: {}", super::error_chain(&e))))?;
    Ok(resp
        .kvs()
        .iter()
        .map(|kv| (kv.key().to_vec(), kv.value().to_vec()))
        .collect())
}

/// Builds the engine of `c` from its etcd: every identity it knows (its own and its peers'
/// through kvstoremesh's cache), its policies, its endpoints.
async fn load(c: &ClusterAdmin) -> Result<Loaded, CtlError> {
    let mut client = c.etcd().await?;
    let name = c.name().clone();
    let mut engine = PolicyEngine::new(name.clone());
    let mut labels: BTreeMap<Identity, Labels> = BTreeMap::new();
    for p in [
        format!("{STATE_PREFIX}{}/", StateKind::Identities),
        format!("{CACHE_PREFIX}{}/", StateKind::Identities),
    ] {
        for (k, v) in prefix(&mut client, &p).await? {
            let sk = match Key::parse_bytes(&k) {
                Ok(Key::State(sk) | Key::Cache(sk)) => sk,
                _ => continue,
            };
            if let Ok(StateValue::Identity(e)) = decode_state(&sk, &v, None) {
                labels.insert(e.id, e.labels);
            }
        }
    }
    engine.sync_identities(labels.iter().map(|(i, l)| (*i, l)));
    let mut undecodable = Vec::new();
    for (k, v) in prefix(&mut client, &format!("{POLICY_PREFIX}{name}/")).await? {
        let key = String::from_utf8_lossy(&k).into_owned();
        match keys::decode_json::<MeshNetworkPolicy>(&key, &v) {
            // Invalid policies are kept by the engine as rejected, with the reason.
            Ok(p) => {
                let _ = engine.upsert_policy(p);
            }
            Err(e) => undecodable.push((key, e.to_string())),
        }
    }
    let mut endpoints = BTreeMap::new();
    for (k, v) in prefix(&mut client, &keys::state_prefix(StateKind::Ip, &name)).await? {
        let Ok(Key::State(sk)) = Key::parse_bytes(&k) else {
            continue;
        };
        if let Ok(StateValue::Ip(e)) = decode_state(&sk, &v, None)
            && !e.identity.is_reserved()
        {
            engine.upsert_endpoint(EndpointId(e.identity.get()), e.identity);
            endpoints.insert(e.ip, e);
        }
    }
    Ok(Loaded {
        engine,
        endpoints,
        undecodable,
    })
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct EndpointReport {
    ip: IpAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<String>,
    identity: u32,
    policies: Vec<String>,
    default_deny_ingress: bool,
    default_deny_egress: bool,
    entries: usize,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ClusterPolicies {
    cluster: String,
    in_force: Vec<String>,
    rejected: Vec<String>,
    endpoints: Vec<EndpointReport>,
}

fn list(args: &ListArgs, out: &mut impl Write) -> Result<Status, CtlError> {
    let admins = admin::load(&args.kube.files())?;
    let chosen: Vec<&ClusterAdmin> = match &args.cluster {
        Some(n) => vec![admin::select(&admins, n)?],
        None => admins.iter().collect(),
    };
    let rt = runtime()?;
    let mut report = Vec::new();
    for c in chosen {
        let l = rt.block_on(load(c))?;
        let mut rejected: Vec<String> = l
            .engine
            .rejected()
            .iter()
            .map(|(k, e)| format!("{k}: {e}"))
            .collect();
        rejected.extend(l.undecodable.iter().map(|(k, e)| format!("{k}: {e}")));
        report.push(ClusterPolicies {
            cluster: c.name().to_string(),
            in_force: l
                .engine
                .policies()
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect(),
            rejected,
            endpoints: l
                .endpoints
                .values()
                .map(|e| {
                    let ep = EndpointId(e.identity.get());
                    let (ingress, egress) = l.engine.enforcement(ep);
                    EndpointReport {
                        ip: e.ip,
                        pod: e.pod.clone(),
                        namespace: e.namespace.clone(),
                        identity: e.identity.get(),
                        policies: l
                            .engine
                            .policies_for_endpoint(ep)
                            .iter()
                            .map(PolicyRef::to_string)
                            .collect(),
                        default_deny_ingress: ingress,
                        default_deny_egress: egress,
                        entries: l.engine.endpoint_entries(ep).len(),
                    }
                })
                .collect(),
        });
    }
    emit(out, args.output, &report, |out| {
        for c in &report {
            writeln!(
                out,
                "cluster {}: {} polic(ies) in force{}",
                c.cluster,
                c.in_force.len(),
                if c.in_force.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", c.in_force.join(", "))
                }
            )?;
            for r in &c.rejected {
                writeln!(out, "  {} {r}", warn("rejected"))?;
            }
            writeln!(
                out,
                "  {:<15} {:<28} {:>9}  {:<14} {:>7}  POLICIES",
                "ENDPOINT", "POD", "IDENTITY", "DEFAULT-DENY", "ENTRIES"
            )?;
            for e in &c.endpoints {
                let deny = match (e.default_deny_ingress, e.default_deny_egress) {
                    (true, true) => "ingress+egress",
                    (true, false) => "ingress",
                    (false, true) => "egress",
                    (false, false) => "-",
                };
                let pod = match (&e.namespace, &e.pod) {
                    (Some(ns), Some(p)) => format!("{ns}/{p}"),
                    _ => "-".into(),
                };
                writeln!(
                    out,
                    "  {:<15} {:<28} {:>9}  {:<14} {:>7}  {}",
                    e.ip.to_string(),
                    pod,
                    e.identity,
                    deny,
                    e.entries,
                    if e.policies.is_empty() {
                        "-".to_owned()
                    } else {
                        e.policies.join(", ")
                    }
                )?;
            }
        }
        Ok::<(), std::io::Error>(())
    })?;
    Ok(if report.iter().any(|c| !c.rejected.is_empty()) {
        Status::Problems
    } else {
        Status::Ok
    })
}

/// `<cluster>/<namespace>/<pod | k=v,…>`, resolved to a label set with the cluster's engine.
fn endpoint_labels(
    spec: &str,
    flag: &'static str,
    l: &Loaded,
    cluster: &ClusterName,
) -> Result<Labels, CtlError> {
    let bad_arg = |reason: String| CtlError::InvalidArg {
        flag,
        value: spec.to_owned(),
        reason,
    };
    let mut parts = spec.splitn(3, '/');
    let (Some(_), Some(ns), Some(what)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad_arg(
            "expected <cluster>/<namespace>/<pod or key=value,…>".into(),
        ));
    };
    if what.contains('=') {
        let mut items = vec![
            format!("k8s:io.kubernetes.pod.namespace={ns}"),
            format!("mesh:io.meshd.cluster={cluster}"),
        ];
        for kv in what.split(',') {
            if !kv.contains('=') {
                return Err(bad_arg(format!("{kv:?} is not key=value")));
            }
            items.push(format!("k8s:{kv}"));
        }
        return Labels::parse(items.iter().map(String::as_str)).map_err(|e| bad_arg(e.to_string()));
    }
    let e = l
        .endpoints
        .values()
        .find(|e| e.namespace.as_deref() == Some(ns) && e.pod.as_deref() == Some(what))
        .ok_or_else(|| {
            bad_arg(format!(
                "no pod {ns}/{what} among the {} endpoints cluster {cluster} exports",
                l.endpoints.len()
            ))
        })?;
    l.engine
        .identity_labels(e.identity)
        .cloned()
        .ok_or_else(|| {
            bad_arg(format!(
                "identity {} of {ns}/{what} is unknown",
                e.identity.get()
            ))
        })
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct TraceReport {
    allowed: bool,
    from: String,
    to: String,
    port: u16,
    protocol: String,
    egress: DirectionReport,
    ingress: DirectionReport,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct DirectionReport {
    allowed: bool,
    decision: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    selected_by: Vec<String>,
    text: String,
}

fn direction(d: &crate::policy::DirectionTrace) -> DirectionReport {
    let (decision, policy, rule, peer, selected_by) = match &d.decision {
        TraceDecision::NotLocal => ("not-local", None, None, None, Vec::new()),
        TraceDecision::NoPolicy => ("no-policy", None, None, None, Vec::new()),
        TraceDecision::Allowed { policy, rule, peer } => (
            "allowed",
            Some(policy.to_string()),
            Some(rule.clone()),
            Some(peer.clone()),
            Vec::new(),
        ),
        TraceDecision::DefaultDeny { selected_by } => (
            "default-deny",
            None,
            None,
            None,
            selected_by.iter().map(PolicyRef::to_string).collect(),
        ),
    };
    DirectionReport {
        allowed: d.allowed(),
        decision,
        policy,
        rule,
        peer,
        selected_by,
        text: d.to_string(),
    }
}

fn trace(args: &TraceArgs, out: &mut impl Write) -> Result<Status, CtlError> {
    let admins = admin::load(&args.kube.files())?;
    let (port_s, proto_s) = args.port.split_once('/').unwrap_or((&args.port, "TCP"));
    let port: u16 = port_s.parse().map_err(|_| CtlError::InvalidArg {
        flag: "--port",
        value: args.port.clone(),
        reason: "expected <port>[/TCP|UDP|SCTP], port 1-65535".into(),
    })?;
    let proto = TransportProtocol::parse(proto_s).ok_or_else(|| CtlError::InvalidArg {
        flag: "--port",
        value: args.port.clone(),
        reason: format!("{proto_s:?} is not TCP, UDP or SCTP"),
    })?;
    let cluster_of = |spec: &str, flag: &'static str| -> Result<&ClusterAdmin, CtlError> {
        let c = spec.split('/').next().unwrap_or_default();
        admin::select(&admins, c).map_err(|e| CtlError::InvalidArg {
            flag,
            value: spec.to_owned(),
            reason: e.to_string(),
        })
    };
    let (fc, tc) = (
        cluster_of(&args.from, "--from")?,
        cluster_of(&args.to, "--to")?,
    );
    let rt = runtime()?;
    let lf = rt.block_on(load(fc))?;
    let lt = if tc.name() == fc.name() {
        None
    } else {
        Some(rt.block_on(load(tc))?)
    };
    let lt_ref = lt.as_ref().unwrap_or(&lf);
    let from = endpoint_labels(&args.from, "--from", &lf, fc.name())?;
    let to = endpoint_labels(&args.to, "--to", lt_ref, tc.name())?;
    let engines: Vec<&PolicyEngine> = match &lt {
        Some(t) => vec![&lf.engine, &t.engine],
        None => vec![&lf.engine],
    };
    let t = trace_mesh(&engines, &from, &to, port, proto);
    let report = TraceReport {
        allowed: t.allowed(),
        from: args.from.clone(),
        to: args.to.clone(),
        port,
        protocol: format!("{proto:?}").to_uppercase(),
        egress: direction(&t.egress),
        ingress: direction(&t.ingress),
    };
    emit(out, args.output, &report, |out| {
        writeln!(
            out,
            "{} {} → {} {}/{}",
            if report.allowed {
                good("ALLOWED")
            } else {
                bad("DENIED")
            },
            report.from,
            report.to,
            report.port,
            report.protocol
        )?;
        writeln!(out, "  {}", report.egress.text)?;
        writeln!(out, "  {}", report.ingress.text)
    })?;
    Ok(if report.allowed {
        Status::Ok
    } else {
        Status::Problems
    })
}
