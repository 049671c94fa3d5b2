//! `meshctl status` / `services` / `peers`: ask the components `meshctl up` started, over
//! their mTLS gRPC API (`mesh.v1.ClusterMesh`).
//!
//! ```text
//!  state.json ─► per cluster: pki/ca.crt + pki/meshctl.{crt,key} (issued from pki/ca.key
//!                when an older `up` did not write them)
//!             ─► apiserver GetStatus ─┐
//!             ─► agent     GetStatus ─┴─► table | json, verdict (exit 0 only when all ready)
//!  services:     agent ListServices (merged) ─► per service: ClusterSetIP, backends per cluster
//! ```

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use mesh_proto::v1 as pb;
use mesh_proto::v1::cluster_mesh_client::ClusterMeshClient;
use serde::Serialize;
use tonic::transport::{Channel, ClientTlsConfig};

use super::admin::{self, ClusterAdmin, KubeconfigArgs};
use super::certs::parse_validity;
use super::output::{OutputFormat, bad, emit, good, warn};
use super::{CtlError, Status, runtime};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(500);
/// A client certificate expiring sooner than this is flagged.
const CERT_WARN: Duration = Duration::from_secs(30 * 24 * 3600);

/// Arguments of `meshctl status`.
#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:
  meshctl status
  meshctl status --wait --timeout 2m      # exit 0 once everything is ready
  meshctl status -o json | jq .verdict")]
pub struct StatusArgs {
    /// Which kubeconfig(s) name the clusters.
    #[command(flatten)]
    pub kube: KubeconfigArgs,
    /// Poll until everything is ready (or --timeout passes).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait polls, e.g. 60s, 2m.
    #[arg(long, default_value = "60s", value_parser = parse_validity)]
    pub timeout: Duration,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// Arguments of `meshctl services`.
#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:
  meshctl services
  meshctl services --cluster west -o yaml")]
pub struct ServicesArgs {
    /// Which kubeconfig(s) name the clusters.
    #[command(flatten)]
    pub kube: KubeconfigArgs,
    /// Whose agent to ask (default: the first cluster).
    #[arg(long)]
    pub cluster: Option<String>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// Arguments of `meshctl identities`.
#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:
  meshctl identities
  meshctl identities --cluster west --from east -o json")]
pub struct IdentitiesArgs {
    /// Which kubeconfig(s) name the clusters.
    #[command(flatten)]
    pub kube: KubeconfigArgs,
    /// Whose agent to ask (default: the first cluster).
    #[arg(long)]
    pub cluster: Option<String>,
    /// Only identities of this cluster.
    #[arg(long)]
    pub from: Option<String>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// Arguments of `meshctl peers`.
#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:
  meshctl peers
  meshctl peers -o json")]
pub struct PeersArgs {
    /// Which kubeconfig(s) name the clusters.
    #[command(flatten)]
    pub kube: KubeconfigArgs,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// What one component answered (or why it did not).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct ComponentReport {
    address: String,
    reachable: bool,
    /// Connection or call error; empty when reachable.
    #[serde(skip_serializing_if = "String::is_empty")]
    error: String,
    ready: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    not_ready_reason: String,
    etcd_reachable: bool,
    export_counts: BTreeMap<String, u64>,
    synced_kinds: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    last_error: String,
    errors: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    version: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    datapath: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    peer_config_errors: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    policies_in_force: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    policies_rejected: Vec<String>,
    policy_entries: u64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct PeerReport {
    name: String,
    cluster_id: u32,
    state: String,
    connected: bool,
    ready: bool,
    synced_kinds: Vec<String>,
    counts: BTreeMap<String, u64>,
    failures: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    last_error: String,
    last_failure_unix_ms: i64,
    /// Client certificate expiry, Unix seconds; 0 when unknown.
    cert_not_after_unix: i64,
    /// Whole days until that expiry (negative: expired); absent when unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    cert_days_left: Option<i64>,
    cert_expiry_warning: bool,
    /// Kinds over the peer's quota (excess refused), from the agent's and kvstoremesh's
    /// peer guards.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    degraded_kinds: Vec<String>,
    /// Entries refused by reason (the larger of the agent's and kvstoremesh's counts).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    refused: BTreeMap<String, u64>,
    /// Range claims refused where the peer is claimant or holder.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    range_conflicts: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct ClusterReport {
    name: String,
    id: u32,
    ready: bool,
    /// Why the cluster is not ready; empty when it is.
    problems: Vec<String>,
    apiserver: ComponentReport,
    agent: ComponentReport,
    peers: Vec<PeerReport>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct MeshReport {
    kubeconfig: Vec<PathBuf>,
    ready: bool,
    verdict: String,
    clusters: Vec<ClusterReport>,
}

async fn client(tls: &ClientTlsConfig, addr: &str) -> Result<ClusterMeshClient<Channel>, String> {
    let channel = Channel::from_shared(format!("https://{addr}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls.clone())
        .map_err(|e| super::error_chain(&e))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .connect()
        .await
        .map_err(|e| super::error_chain(&e))?;
    Ok(ClusterMeshClient::new(channel))
}

/// The address of a component from the admin kubeconfig, or why there is none.
fn address(c: &ClusterAdmin, what: &str, addr: Option<&str>) -> Result<String, String> {
    addr.map(str::to_owned).ok_or_else(|| {
        format!(
            "{} names no {what} gRPC address ({what}Grpc in {})",
            c.whence(),
            admin::ADMIN_EXTENSION
        )
    })
}

async fn get_status(
    tls: &ClientTlsConfig,
    addr: &Result<String, String>,
) -> Result<pb::ClusterStatus, String> {
    let mut c = client(tls, addr.as_ref()?).await?;
    c.get_status(pb::GetStatusRequest {})
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| format!("{}: {}", s.code(), s.message()))
}

/// The agent of `--cluster` (default: the first cluster) and a connected client.
async fn agent_of<'a>(
    admins: &'a [ClusterAdmin],
    cluster: Option<&str>,
) -> Result<(&'a ClusterAdmin, Result<ClusterMeshClient<Channel>, String>), CtlError> {
    let c = match cluster {
        Some(name) => admin::select(admins, name)?,
        None => admins
            .first()
            .ok_or_else(|| CtlError::Up("the admin kubeconfig names no cluster".into()))?,
    };
    let addr = address(c, "agent", c.ext.agent_grpc.as_deref());
    let client = match addr {
        Ok(a) => client(&c.grpc_tls(), &a)
            .await
            .map_err(|e| format!("agent of {} at {a}: {e}", c.name())),
        Err(e) => Err(e),
    };
    Ok((c, client))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn component(address: String, r: &Result<pb::ClusterStatus, String>) -> ComponentReport {
    match r {
        Ok(s) => ComponentReport {
            address,
            reachable: true,
            error: String::new(),
            ready: s.ready,
            not_ready_reason: s.not_ready_reason.clone(),
            etcd_reachable: s.etcd_reachable,
            export_counts: s.export_counts.clone().into_iter().collect(),
            synced_kinds: s.synced_kinds.clone(),
            last_error: s.last_error.clone(),
            errors: s.errors,
            version: s.version.clone(),
            datapath: s.datapath.clone(),
            peer_config_errors: s.peer_config_errors.clone(),
            policies_in_force: s.policies_in_force.clone(),
            policies_rejected: s.policies_rejected.clone(),
            policy_entries: s.policy_entries,
        },
        Err(e) => ComponentReport {
            address,
            reachable: false,
            error: e.clone(),
            ready: false,
            not_ready_reason: String::new(),
            etcd_reachable: false,
            export_counts: BTreeMap::new(),
            synced_kinds: Vec::new(),
            last_error: String::new(),
            errors: 0,
            version: String::new(),
            datapath: String::new(),
            peer_config_errors: Vec::new(),
            policies_in_force: Vec::new(),
            policies_rejected: Vec::new(),
            policy_entries: 0,
        },
    }
}

fn peer(p: &pb::PeerStatus, now: i64) -> PeerReport {
    let days =
        (p.cert_not_after_unix > 0).then(|| (p.cert_not_after_unix - now).div_euclid(86_400));
    let warn_secs = i64::try_from(CERT_WARN.as_secs()).unwrap_or(i64::MAX);
    PeerReport {
        name: p.name.clone(),
        cluster_id: p.cluster_id,
        state: p.state.clone(),
        connected: p.connected,
        ready: p.state == "ready" && p.connected,
        synced_kinds: p.synced_kinds.clone(),
        counts: p.counts.clone().into_iter().collect(),
        failures: p.failures,
        last_error: p.last_error.clone(),
        last_failure_unix_ms: p.last_failure_unix_ms,
        cert_not_after_unix: p.cert_not_after_unix,
        cert_days_left: days,
        cert_expiry_warning: p.cert_not_after_unix > 0 && p.cert_not_after_unix - now < warn_secs,
        degraded_kinds: Vec::new(),
        refused: BTreeMap::new(),
        range_conflicts: Vec::new(),
    }
    .with_trust(p)
}

impl PeerReport {
    /// Adds what a peer guard (the agent's, or kvstoremesh's in the apiserver) reports.
    fn with_trust(mut self, p: &pb::PeerStatus) -> Self {
        for k in &p.degraded_kinds {
            if !self.degraded_kinds.contains(k) {
                self.degraded_kinds.push(k.clone());
            }
        }
        for (reason, n) in &p.refused {
            let e = self.refused.entry(reason.clone()).or_default();
            *e = (*e).max(*n);
        }
        for c in &p.range_conflicts {
            if !self.range_conflicts.contains(c) {
                self.range_conflicts.push(c.clone());
            }
        }
        self
    }
}

async fn cluster_report(c: &ClusterAdmin) -> ClusterReport {
    let tls = c.grpc_tls();
    let api_addr = address(c, "apiserver", c.ext.apiserver_grpc.as_deref());
    let agent_addr = address(c, "agent", c.ext.agent_grpc.as_deref());
    let (api, agent) = tokio::join!(get_status(&tls, &api_addr), get_status(&tls, &agent_addr));
    let now = unix_now();
    // The agent's peers, with what kvstoremesh (in the apiserver) refused of each: in the
    // default cached mode the agent only sees what kvstoremesh let through.
    let peers: Vec<PeerReport> = agent
        .as_ref()
        .map(|s| {
            s.peers
                .iter()
                .map(|p| {
                    let mirrored = api
                        .as_ref()
                        .ok()
                        .and_then(|a| a.peers.iter().find(|k| k.name == p.name));
                    let r = peer(p, now);
                    match mirrored {
                        Some(k) => r.with_trust(k),
                        None => r,
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let apiserver = component(api_addr.unwrap_or_default(), &api);
    let agent = component(agent_addr.unwrap_or_default(), &agent);

    let mut problems = Vec::new();
    for (what, r) in [("apiserver", &apiserver), ("agent", &agent)] {
        if !r.reachable {
            problems.push(format!("{what} unreachable: {}", r.error));
        } else if !r.ready {
            problems.push(format!("{what} not ready: {}", r.not_ready_reason));
        }
    }
    if apiserver.reachable && !apiserver.etcd_reachable {
        problems.push("apiserver cannot reach etcd".into());
    }
    // The peers this cluster should have: the credentials in its peers directory.
    let configured = match c.configured_peers() {
        Ok(v) => v,
        Err(e) => {
            problems.push(super::error_chain(&e));
            Vec::new()
        }
    };
    let mut expected = Vec::new();
    for p in configured {
        match p {
            Ok(p) => expected.push(p.name.to_string()),
            Err(e) => problems.push(format!("unusable peer kubeconfig: {e}")),
        }
    }
    if agent.reachable {
        for other in &expected {
            match peers.iter().find(|p| &p.name == other) {
                None => problems.push(format!("peer {other} configured but not seen by the agent")),
                Some(p) if !p.ready => problems.push(format!(
                    "peer {} {}{}",
                    p.name,
                    p.state,
                    if p.connected { "" } else { ", not connected" }
                )),
                Some(_) => {}
            }
        }
        for e in &agent.peer_config_errors {
            problems.push(format!("peer config rejected: {e}"));
        }
    }
    ClusterReport {
        name: c.name().to_string(),
        id: u32::from(c.cred.cluster_id.get()),
        ready: problems.is_empty(),
        problems,
        apiserver,
        agent,
        peers,
    }
}

/// What the peer guards (the agent's and kvstoremesh's) report of one peer.
#[derive(Debug, Clone)]
pub(super) struct PeerTrustSummary {
    /// The peer.
    pub(super) peer: String,
    /// Kinds over quota.
    pub(super) degraded_kinds: Vec<String>,
    /// Refusals by reason.
    pub(super) refused: BTreeMap<String, u64>,
    /// Range claims refused.
    pub(super) range_conflicts: Vec<String>,
}

/// The peer guards' findings for `c`'s peers; `Err` when neither component answered.
pub(super) async fn peer_trust(c: &ClusterAdmin) -> Result<Vec<PeerTrustSummary>, String> {
    let r = cluster_report(c).await;
    if !r.agent.reachable && !r.apiserver.reachable {
        return Err(format!(
            "agent ({}) and apiserver ({}) unreachable",
            r.agent.error, r.apiserver.error
        ));
    }
    Ok(r.peers
        .into_iter()
        .map(|p| PeerTrustSummary {
            peer: p.name,
            degraded_kinds: p.degraded_kinds,
            refused: p.refused,
            range_conflicts: p.range_conflicts,
        })
        .collect())
}

async fn mesh_report(admins: &[ClusterAdmin], files: Vec<PathBuf>) -> MeshReport {
    let clusters = futures::future::join_all(admins.iter().map(cluster_report)).await;
    let not_ready: Vec<&str> = clusters
        .iter()
        .filter(|c| !c.ready)
        .map(|c| c.name.as_str())
        .collect();
    let ready = not_ready.is_empty() && !clusters.is_empty();
    let verdict = if ready {
        format!("READY: all {} cluster(s) ready", clusters.len())
    } else if clusters.is_empty() {
        "NOT READY: no clusters in the admin kubeconfig".to_owned()
    } else {
        format!(
            "NOT READY: {} of {} cluster(s) not ready ({})",
            not_ready.len(),
            clusters.len(),
            not_ready.join(", ")
        )
    };
    MeshReport {
        kubeconfig: files,
        ready,
        verdict,
        clusters,
    }
}

fn counts(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "-".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

fn cert_text(p: &PeerReport) -> String {
    match p.cert_days_left {
        None => "cert expiry unknown".into(),
        Some(d) if d < 0 => "cert EXPIRED".into(),
        Some(d) if p.cert_expiry_warning => {
            format!("cert expires in {d} d ({})", warn("WARNING: < 30 d"))
        }
        Some(d) => format!("cert expires in {d} d"),
    }
}

fn write_peer(out: &mut impl Write, p: &PeerReport, indent: &str) -> std::io::Result<()> {
    writeln!(
        out,
        "{indent}peer {} (id {}): {}{}  synced {}  counts {}  failures {}  {}",
        p.name,
        p.cluster_id,
        p.state,
        if p.connected {
            ", connected"
        } else {
            ", not connected"
        },
        list(&p.synced_kinds),
        counts(&p.counts),
        p.failures,
        cert_text(p)
    )?;
    if !p.last_error.is_empty() {
        writeln!(out, "{indent}  last error: {}", p.last_error)?;
    }
    if !p.degraded_kinds.is_empty() {
        writeln!(
            out,
            "{indent}  {}",
            warn(&format!(
                "DEGRADED: over its quota for {} (the excess is refused)",
                p.degraded_kinds.join(", ")
            ))
        )?;
    }
    if !p.refused.is_empty() {
        writeln!(out, "{indent}  refused: {}", counts(&p.refused))?;
    }
    for c in &p.range_conflicts {
        writeln!(out, "{indent}  {}", warn(&format!("range conflict: {c}")))?;
    }
    Ok(())
}

fn write_component(out: &mut impl Write, what: &str, r: &ComponentReport) -> std::io::Result<()> {
    if !r.reachable {
        return writeln!(
            out,
            "  {what:<10} {}  {}: {}",
            r.address,
            bad("UNREACHABLE"),
            r.error
        );
    }
    let ready = if r.ready {
        "ready".to_owned()
    } else {
        format!("NOT READY ({})", r.not_ready_reason)
    };
    write!(out, "  {what:<10} {}  {ready}", r.address)?;
    write!(
        out,
        "  etcd {}",
        if r.etcd_reachable {
            "reachable"
        } else {
            "UNREACHABLE"
        }
    )?;
    if r.datapath.starts_with("recording") {
        write!(
            out,
            "  datapath {}",
            warn(&format!("{} — NOTHING ENFORCED", r.datapath.to_uppercase()))
        )?;
    } else if !r.datapath.is_empty() {
        write!(out, "  datapath {}", r.datapath)?;
    }
    if !r.version.is_empty() {
        write!(out, "  version {}", r.version)?;
    }
    writeln!(out)?;
    if what == "apiserver" {
        writeln!(out, "    exports {}", counts(&r.export_counts))?;
    }
    writeln!(
        out,
        "    synced {}  errors {}",
        list(&r.synced_kinds),
        r.errors
    )?;
    if !r.last_error.is_empty() {
        writeln!(out, "    last error: {}", r.last_error)?;
    }
    for e in &r.peer_config_errors {
        writeln!(out, "    rejected peer config: {e}")?;
    }
    if what == "agent" && (!r.policies_in_force.is_empty() || !r.policies_rejected.is_empty()) {
        writeln!(
            out,
            "    policies {} in force ({}), {} entries",
            r.policies_in_force.len(),
            list(&r.policies_in_force),
            r.policy_entries
        )?;
    }
    for e in &r.policies_rejected {
        writeln!(out, "    {} policy {e}", warn("rejected"))?;
    }
    Ok(())
}

fn write_table(out: &mut impl Write, r: &MeshReport) -> std::io::Result<()> {
    for c in &r.clusters {
        writeln!(
            out,
            "cluster {} (id {}): {}",
            c.name,
            c.id,
            if c.ready {
                good("ready")
            } else {
                bad("NOT READY")
            }
        )?;
        write_component(out, "apiserver", &c.apiserver)?;
        write_component(out, "agent", &c.agent)?;
        for p in &c.peers {
            write_peer(out, p, "    ")?;
        }
        for p in &c.problems {
            writeln!(out, "  problem: {p}")?;
        }
    }
    let verdict = if r.ready {
        good(&r.verdict)
    } else {
        bad(&r.verdict)
    };
    writeln!(out, "{verdict}")
}

fn load(kube: &KubeconfigArgs) -> Result<(Vec<ClusterAdmin>, Vec<PathBuf>), CtlError> {
    let files = kube.files();
    Ok((admin::load(&files)?, files))
}

/// `meshctl status`.
pub(super) fn status(args: &StatusArgs, out: &mut impl Write) -> Result<Status, CtlError> {
    let (admins, files) = load(&args.kube)?;
    let rt = runtime()?;
    let deadline = Instant::now() + args.timeout;
    let report = rt.block_on(async {
        loop {
            let r = mesh_report(&admins, files.clone()).await;
            if r.ready || !args.wait || Instant::now() >= deadline {
                break r;
            }
            tokio::time::sleep(POLL).await;
        }
    });
    emit(out, args.output, &report, |out| {
        write_table(out, &report)?;
        if args.wait && !report.ready {
            writeln!(out, "(gave up waiting after {:?})", args.timeout)?;
        }
        Ok::<(), std::io::Error>(())
    })?;
    Ok(if report.ready {
        Status::Ok
    } else {
        Status::Problems
    })
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct PeersOfCluster {
    cluster: String,
    agent_reachable: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    error: String,
    peers: Vec<PeerReport>,
    rejected_peer_configs: Vec<String>,
}

/// `meshctl peers`.
pub(super) fn peers(args: &PeersArgs, out: &mut impl Write) -> Result<Status, CtlError> {
    let (admins, files) = load(&args.kube)?;
    let report = runtime()?.block_on(mesh_report(&admins, files));
    let list: Vec<PeersOfCluster> = report
        .clusters
        .iter()
        .map(|c| PeersOfCluster {
            cluster: c.name.clone(),
            agent_reachable: c.agent.reachable,
            error: c.agent.error.clone(),
            peers: c.peers.clone(),
            rejected_peer_configs: c.agent.peer_config_errors.clone(),
        })
        .collect();
    emit(out, args.output, &list, |out| {
        for c in &list {
            if !c.agent_reachable {
                writeln!(
                    out,
                    "{}: agent {}: {}",
                    c.cluster,
                    bad("UNREACHABLE"),
                    c.error
                )?;
                continue;
            }
            writeln!(out, "{}: {} peer(s)", c.cluster, c.peers.len())?;
            for p in &c.peers {
                write_peer(out, p, "  ")?;
            }
            for e in &c.rejected_peer_configs {
                writeln!(out, "  rejected peer config: {e}")?;
            }
        }
        Ok::<(), std::io::Error>(())
    })?;
    let all_peers_ready = list.iter().all(|c| {
        c.agent_reachable && c.rejected_peer_configs.is_empty() && c.peers.iter().all(|p| p.ready)
    });
    Ok(if all_peers_ready {
        Status::Ok
    } else {
        Status::Problems
    })
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct IdentityReport {
    id: u32,
    cluster: String,
    labels: Vec<String>,
}

/// `meshctl identities`.
pub(super) fn identities(args: &IdentitiesArgs, out: &mut impl Write) -> Result<Status, CtlError> {
    let (admins, _) = load(&args.kube)?;
    let resp = runtime()?.block_on(async {
        let (c, client) = agent_of(&admins, args.cluster.as_deref()).await?;
        let r = match client {
            Ok(mut client) => client
                .list_identities(pb::ListIdentitiesRequest {
                    cluster: args.from.clone().unwrap_or_default(),
                })
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| format!("{}: {}", s.code(), s.message())),
            Err(e) => Err(e),
        };
        Ok::<_, CtlError>((c.name().to_string(), r))
    })?;
    let (cluster, resp) = resp;
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            writeln!(out, "{cluster}: agent {}: {e}", bad("UNREACHABLE"))?;
            return Ok(Status::Problems);
        }
    };
    let ids: Vec<IdentityReport> = resp
        .identities
        .into_iter()
        .map(|i| IdentityReport {
            id: i.id,
            cluster: i.cluster,
            labels: i.labels,
        })
        .collect();
    emit(out, args.output, &ids, |out| {
        writeln!(
            out,
            "identities known to the agent of {cluster} ({}):",
            ids.len()
        )?;
        writeln!(out, "{:>10}  {:<12}  LABELS", "ID", "CLUSTER")?;
        for i in &ids {
            writeln!(
                out,
                "{:>10}  {:<12}  {}",
                i.id,
                i.cluster,
                i.labels.join(" ")
            )?;
        }
        Ok::<(), std::io::Error>(())
    })?;
    Ok(Status::Ok)
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct ClusterBackends {
    cluster: String,
    active: usize,
    total: usize,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceReport {
    namespace: String,
    name: String,
    cluster_set_ip: String,
    affinity: String,
    headless: bool,
    clusters: Vec<String>,
    backends: Vec<ClusterBackends>,
    conflicts: Vec<String>,
}

fn service_report(s: &pb::Service) -> ServiceReport {
    let mut order: Vec<String> = s.clusters.clone();
    for b in &s.backends {
        if !order.contains(&b.cluster) {
            order.push(b.cluster.clone());
        }
    }
    let backends = order
        .iter()
        .map(|c| {
            let of: Vec<&pb::Backend> = s.backends.iter().filter(|b| &b.cluster == c).collect();
            ClusterBackends {
                cluster: c.clone(),
                active: of.iter().filter(|b| b.active).count(),
                total: of.len(),
            }
        })
        .collect();
    ServiceReport {
        namespace: s.namespace.clone(),
        name: s.name.clone(),
        cluster_set_ip: s.cluster_set_ip.clone(),
        affinity: s.affinity.clone(),
        headless: s.headless,
        clusters: s.clusters.clone(),
        backends,
        conflicts: s.conflicts.clone(),
    }
}

/// `meshctl services`.
pub(super) fn services(args: &ServicesArgs, out: &mut impl Write) -> Result<Status, CtlError> {
    let (admins, _) = load(&args.kube)?;
    let (cluster, resp) = runtime()?.block_on(async {
        let (c, client) = agent_of(&admins, args.cluster.as_deref()).await?;
        let r = match client {
            Ok(mut client) => client
                .list_services(pb::ListServicesRequest::default())
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| format!("{}: {}", s.code(), s.message())),
            Err(e) => Err(e),
        };
        Ok::<_, CtlError>((c.name().to_string(), r))
    })?;
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            writeln!(out, "{cluster}: agent {}: {e}", bad("UNREACHABLE"))?;
            return Ok(Status::Problems);
        }
    };
    let services: Vec<ServiceReport> = resp.services.iter().map(service_report).collect();
    emit(out, args.output, &services, |out| {
        writeln!(
            out,
            "global services seen by the agent of {cluster} ({}):",
            services.len()
        )?;
        for s in &services {
            let ip = if s.cluster_set_ip.is_empty() {
                "<none>"
            } else {
                s.cluster_set_ip.as_str()
            };
            writeln!(
                out,
                "{}/{}  clusterset-ip {ip}  affinity {}{}",
                s.namespace,
                s.name,
                s.affinity,
                if s.headless { "  headless" } else { "" }
            )?;
            let per: Vec<String> = s
                .backends
                .iter()
                .map(|b| format!("{} {}/{}", b.cluster, b.active, b.total))
                .collect();
            writeln!(out, "  backends (active/total): {}", list(&per))?;
            for c in &s.conflicts {
                writeln!(out, "  conflict: {}", warn(c))?;
            }
        }
        Ok::<(), std::io::Error>(())
    })?;
    Ok(Status::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_cert_expiry_warns_under_30_days() {
        let now = 1_000_000_000;
        let p = |not_after| pb::PeerStatus {
            name: "west".into(),
            state: "ready".into(),
            connected: true,
            cert_not_after_unix: not_after,
            ..Default::default()
        };
        let soon = peer(&p(now + 10 * 86_400), now);
        assert!(soon.ready && soon.cert_expiry_warning);
        assert_eq!(soon.cert_days_left, Some(10));
        assert!(cert_text(&soon).contains("WARNING"));
        let later = peer(&p(now + 40 * 86_400), now);
        assert!(!later.cert_expiry_warning);
        let unknown = peer(&p(0), now);
        assert!(!unknown.cert_expiry_warning && unknown.cert_days_left.is_none());
        assert!(cert_text(&peer(&p(now - 1), now)).contains("EXPIRED"));
    }

    #[test]
    fn peer_guard_findings_of_agent_and_kvstoremesh_are_merged_and_shown() {
        let agent = pb::PeerStatus {
            name: "west".into(),
            state: "ready".into(),
            connected: true,
            refused: [("prefix-not-host".to_owned(), 2)].into_iter().collect(),
            ..Default::default()
        };
        let kvstoremesh = pb::PeerStatus {
            name: "west".into(),
            degraded_kinds: vec!["ip".into()],
            refused: [
                ("prefix-not-host".to_owned(), 33),
                ("address-of-local".to_owned(), 1),
            ]
            .into_iter()
            .collect(),
            range_conflicts: vec![
                "198.18.1.0/24 of west/evil refused (cidr-conflict): overlaps a range of east"
                    .into(),
            ],
            ..Default::default()
        };
        let r = peer(&agent, 0).with_trust(&kvstoremesh);
        assert_eq!(r.degraded_kinds, vec!["ip"]);
        assert_eq!(r.refused["prefix-not-host"], 33);
        assert_eq!(r.refused["address-of-local"], 1);
        let mut out = Vec::new();
        write_peer(&mut out, &r, "  ").unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("DEGRADED: over its quota for ip"), "{text}");
        assert!(
            text.contains("refused: address-of-local=1 prefix-not-host=33"),
            "{text}"
        );
        assert!(
            text.contains("range conflict: 198.18.1.0/24 of west/evil"),
            "{text}"
        );
    }

    #[test]
    fn service_backends_are_counted_per_cluster() {
        let b = |cluster: &str, active| pb::Backend {
            cluster: cluster.into(),
            active,
            ..Default::default()
        };
        let s = pb::Service {
            namespace: "shop".into(),
            name: "web".into(),
            clusters: vec!["east".into(), "west".into()],
            backends: vec![b("east", true), b("east", false), b("west", true)],
            ..Default::default()
        };
        let r = service_report(&s);
        let got: Vec<(&str, usize, usize)> = r
            .backends
            .iter()
            .map(|b| (b.cluster.as_str(), b.active, b.total))
            .collect();
        assert_eq!(got, [("east", 1, 2), ("west", 1, 1)]);
    }
}
