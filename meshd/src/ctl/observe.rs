//! `meshctl observe`: packets an agent's policy programs dropped, streamed over its gRPC API.
//!
//! ```text
//!  admin kubeconfig ─► agent of --cluster ─► ObserveDrops(follow) ─► per event one line
//!      (table) or one JSON object per line (json) or one YAML document (yaml); --limit N
//! ```

use std::io::Write;
use std::time::Duration;

use clap::Args;
use mesh_proto::v1 as pb;
use mesh_proto::v1::cluster_mesh_client::ClusterMeshClient;
use serde::Serialize;
use tonic::transport::Channel;

use super::admin::{self, KubeconfigArgs};
use super::output::{OutputFormat, bad, warn};
use super::{CtlError, Status, runtime};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Arguments of `meshctl observe`.
#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:
  meshctl observe                         # the drops the agent remembers, then exit
  meshctl observe --cluster east --follow # and every new drop as it happens
  meshctl observe --follow --limit 10 -o json | jq .source.labels
  meshctl observe --from west             # only drops involving cluster west")]
pub struct ObserveArgs {
    /// Which kubeconfig(s) name the clusters.
    #[command(flatten)]
    pub kube: KubeconfigArgs,
    /// Whose agent to ask (default: the first cluster).
    #[arg(long)]
    pub cluster: Option<String>,
    /// Only drops whose source or destination belongs to this cluster.
    #[arg(long)]
    pub from: Option<String>,
    /// Keep streaming new drops (until Ctrl-C, or --limit).
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Stop after this many events.
    #[arg(long)]
    pub limit: Option<u64>,
    /// Output format: one line per event (table), one JSON object per line (json) or
    /// one YAML document per event (yaml).
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct PeerReport {
    ip: String,
    port: u32,
    identity: u32,
    cluster: String,
    labels: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct DropReport {
    time_unix_ms: i64,
    time: String,
    source: PeerReport,
    destination: PeerReport,
    protocol: String,
    direction: String,
    reason: String,
    interface: String,
}

fn peer(p: Option<pb::FlowPeer>) -> PeerReport {
    let p = p.unwrap_or_default();
    PeerReport {
        ip: p.ip,
        port: p.port,
        identity: p.identity,
        cluster: p.cluster,
        labels: p.labels,
    }
}

fn report(e: pb::DropEvent) -> DropReport {
    let time =
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(e.time_unix_ms) * 1_000_000)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default();
    DropReport {
        time_unix_ms: e.time_unix_ms,
        time,
        source: peer(e.source),
        destination: peer(e.destination),
        protocol: e.protocol,
        direction: e.direction,
        reason: e.reason,
        interface: e.interface,
    }
}

/// `cluster/ip:port (labels without the cluster and namespace labels)`.
fn side(p: &PeerReport) -> String {
    let labels: Vec<&str> = p
        .labels
        .iter()
        .map(String::as_str)
        .filter(|l| !l.starts_with("mesh:io.meshd.cluster=") && !l.contains("pod.namespace="))
        .collect();
    let cluster = if p.cluster.is_empty() {
        String::new()
    } else {
        format!("{}/", p.cluster)
    };
    format!(
        "{cluster}{}:{} [{} {}]",
        p.ip,
        p.port,
        p.identity,
        labels.join(",")
    )
}

fn write_event(out: &mut impl Write, format: OutputFormat, r: &DropReport) -> Result<(), CtlError> {
    match format {
        OutputFormat::Table => writeln!(
            out,
            "{}  {}  {} -> {}  {} {}  {}",
            r.time,
            bad(&format!("DROPPED ({})", r.reason)),
            side(&r.source),
            side(&r.destination),
            r.protocol,
            r.direction,
            r.interface
        )?,
        OutputFormat::Json => {
            serde_json::to_writer(&mut *out, r)?;
            writeln!(out)?;
        }
        OutputFormat::Yaml => {
            let text = serde_saphyr::to_string(r)
                .map_err(|e| CtlError::Up(format!("encoding YAML output: {e}")))?;
            writeln!(out, "---")?;
            out.write_all(text.as_bytes())?;
            if !text.ends_with('\n') {
                writeln!(out)?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

async fn connect(
    tls: tonic::transport::ClientTlsConfig,
    addr: &str,
) -> Result<ClusterMeshClient<Channel>, String> {
    let channel = Channel::from_shared(format!("https://{addr}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| super::error_chain(&e))?
        .connect_timeout(CONNECT_TIMEOUT)
        .connect()
        .await
        .map_err(|e| super::error_chain(&e))?;
    Ok(ClusterMeshClient::new(channel))
}

/// `meshctl observe`.
pub(super) fn observe(args: &ObserveArgs, out: &mut impl Write) -> Result<Status, CtlError> {
    let admins = admin::load(&args.kube.files())?;
    let c = match args.cluster.as_deref() {
        Some(name) => admin::select(&admins, name)?,
        None => admins
            .first()
            .ok_or_else(|| CtlError::Up("the admin kubeconfig names no cluster".into()))?,
    };
    let Some(addr) = c.ext.agent_grpc.clone() else {
        writeln!(
            out,
            "{}: {} names no agent gRPC address (agentGrpc in {})",
            c.name(),
            c.whence(),
            admin::ADMIN_EXTENSION
        )?;
        return Ok(Status::Problems);
    };
    let rt = runtime()?;
    rt.block_on(async {
        let mut client = match connect(c.grpc_tls(), &addr).await {
            Ok(cl) => cl,
            Err(e) => {
                writeln!(
                    out,
                    "{}: agent {} at {addr}: {e}",
                    c.name(),
                    bad("UNREACHABLE")
                )?;
                return Ok(Status::Problems);
            }
        };
        let stream = client
            .observe_drops(pb::ObserveDropsRequest {
                cluster: args.from.clone().unwrap_or_default(),
                follow: args.follow,
            })
            .await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(s) => {
                writeln!(out, "{}: {}: {}", c.name(), s.code(), s.message())?;
                return Ok(Status::Problems);
            }
        };
        let mut n = 0u64;
        if args.output == OutputFormat::Table && !args.follow {
            writeln!(out, "recent drops seen by the agent of {}:", c.name())?;
        }
        while args.limit.is_none_or(|l| n < l) {
            match stream.message().await {
                Ok(Some(e)) => {
                    write_event(out, args.output, &report(e))?;
                    n += 1;
                }
                Ok(None) => break,
                Err(s) => {
                    writeln!(
                        out,
                        "{}: stream ended: {}: {}",
                        c.name(),
                        s.code(),
                        s.message()
                    )?;
                    return Ok(Status::Problems);
                }
            }
        }
        if n == 0 && args.output == OutputFormat::Table {
            writeln!(out, "{}", warn("no drops"))?;
        }
        Ok::<_, CtlError>(Status::Ok)
    })
}
