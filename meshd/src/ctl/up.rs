//! `meshctl up` / `meshctl down`: a whole mesh on this machine (DESIGN §8).
//!
//! ```text
//!  up:  per cluster  pki/ (CA, etcd server, root/apiserver/agent/meshctl clients, gRPC servers;
//!                    each with its role SAN; on a running mesh: role-less ones reissued;
//!                    the peer CA, the relay CA and the relay's server certificate)
//!                    etcd (TLS, client-cert auth, auth on) ── bootstrap users/roles
//!       every pair   remote-<A> in B's etcd + <A>/peers/<B>.kubeconfig (B's relay, B's peer CA)
//!       per cluster  clustermesh-apiserver (with the identity relay) + mesh-agent (detached
//!                    with setsid, logs/)
//!       state.json   every PID and port (written after each start), then wait for /readyz
//!  down: SIGTERM exactly the recorded PIDs still running our binaries, 10 s, then SIGKILL
//! ```
//!
//! Trust per cluster, so that revoking a peer ends its open watches (the apiserver's relay
//! cuts them; etcd would not) and no peer can go around the relay:
//!
//! | file in `<cluster>/pki/` | what it is | who trusts it |
//! | --- | --- | --- |
//! | `ca.crt`, `ca.key` | cluster CA: etcd's server cert, root, apiserver, agent, gRPC | etcd, gRPC APIs, meshctl |
//! | `peer-ca.crt`, `peer-ca.key` | peer CA: every `remote-<peer>` credential and `relay.crt` | the relay only (peers verify the relay by it) |
//! | `relay.crt`, `relay.key` | the relay's server certificate (localhost, 127.0.0.1) | peers |
//! | `relay-ca.crt`, `relay-ca.key` | relay CA: the relay mints, in memory, a cert with the peer's CN | etcd |
//! | `etcd-client-ca.crt` | `ca.crt` + `relay-ca.crt`: etcd's `--trusted-ca-file` | — |
//!
//! A peer certificate presented to etcd directly fails the TLS handshake (etcd does not trust
//! the peer CA); the relay accepts only `remote-<cluster>` CNs. The admin kubeconfig's
//! `meshd.io/admin` extension names the relay and the peer CA (`peerEndpoint`), which
//! `meshctl connect` uses.

use std::collections::HashSet;
use std::io::{IsTerminal, Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use mesh_certs::{CertRequest, CertificateAuthority, Role};
use serde::{Deserialize, Serialize};

use super::admin::{self, AdminEntry, AdminExtension, KUBECONFIG_FILE, PeerEndpoint};
use super::{CtlError, Status, certs, connect, etcd_auth, fail, runtime};
use crate::kv::{EtcdConfig, EtcdStore};
use crate::model::{ClusterName, MaxConnectedClusters};

const STATE_FILE: &str = "state.json";
/// Optional file in the examples directory listing the clusters in ID order.
const ORDER_FILE: &str = "clusters";
const ETCD_BIN: &str = "etcd";
const APISERVER_BIN: &str = "clustermesh-apiserver";
const AGENT_BIN: &str = "mesh-agent";
const CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Listening ports per cluster (etcd client and peer, apiserver gRPC and health, agent gRPC,
/// health and DNS, relay).
const PORTS_PER_CLUSTER: usize = 8;
/// etcd's `--trusted-ca-file`: the cluster CA and the relay CA (never the peer CA).
const ETCD_CLIENT_CA: &str = "etcd-client-ca.crt";

/// Arguments of `meshctl up`.
#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Number of clusters: the first N of the examples directory (its `clusters` file gives
    /// the order; IDs are 1..N).
    #[arg(long, default_value_t = 2)]
    pub clusters: u16,
    /// Where certificates, data, logs and state.json live.
    #[arg(long, default_value = ".meshd")]
    pub state_dir: PathBuf,
    /// Directory with one sub-directory of manifests per cluster (sorted names become the
    /// clusters, IDs 1..N).
    #[arg(long, default_value = "deploy/examples")]
    pub examples: PathBuf,
    /// Directory holding clustermesh-apiserver and mesh-agent (default: meshctl's own).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// How long to wait for every agent to become ready, in seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
    /// On failure, leave what was started running (for debugging) instead of stopping it.
    #[arg(long)]
    pub keep_on_failure: bool,
    /// The agents' datapath: `auto` (eBPF when run as root: a bpffs and one cgroup per
    /// cluster for its socket load balancer; recording otherwise, said loudly), `ebpf`
    /// (fail without it) or `recording` (enforce nothing).
    #[arg(long, value_enum, default_value_t = UpDatapath::Auto)]
    pub datapath: UpDatapath,
}

/// `meshctl up --datapath` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UpDatapath {
    /// eBPF as root, else recording.
    Auto,
    /// eBPF or fail.
    Ebpf,
    /// Recording only.
    Recording,
}

/// Arguments of `meshctl down`.
#[derive(Debug, Clone, Args)]
pub struct DownArgs {
    /// The state directory given to `meshctl up`.
    #[arg(long, default_value = ".meshd")]
    pub state_dir: PathBuf,
    /// Also remove the state directory (certificates, data, logs).
    #[arg(long)]
    pub purge: bool,
}

/// One process `up` started.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcState {
    /// `etcd`, `apiserver` or `agent`.
    pub role: String,
    /// The binary's file name, checked against `/proc/<pid>/cmdline` before signalling.
    pub binary: String,
    /// Process ID.
    pub pid: u32,
    /// Log file.
    pub log: PathBuf,
}

/// One cluster of the mesh.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterState {
    /// Cluster name.
    pub name: String,
    /// Cluster ID.
    pub id: u32,
    /// etcd client port (`https://127.0.0.1:<port>`).
    pub etcd_port: u16,
    /// etcd peer port.
    pub etcd_peer_port: u16,
    /// apiserver gRPC port.
    pub apiserver_grpc_port: u16,
    /// apiserver health port (plain HTTP).
    pub apiserver_health_port: u16,
    /// agent gRPC port.
    pub agent_grpc_port: u16,
    /// agent health port (plain HTTP `/readyz`).
    pub agent_health_port: u16,
    /// agent DNS port (UDP and TCP, `clusterset.local`); 0 in states of older versions.
    #[serde(default)]
    pub dns_port: u16,
    /// The apiserver's identity relay (`https://127.0.0.1:<port>`, the endpoint peers dial);
    /// 0 in states of older versions (peers then dial etcd).
    #[serde(default)]
    pub relay_port: u16,
    /// The agent's bpffs pin directory (eBPF datapath only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_dir: Option<PathBuf>,
    /// The cgroup the agent's socket load balancer serves (eBPF datapath only); clients run
    /// in it with `meshctl exec <cluster> -- …`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// The processes, in start order.
    pub processes: Vec<ProcState>,
}

/// `DIR/state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshState {
    /// The state directory (absolute).
    pub state_dir: PathBuf,
    /// The clusters.
    pub clusters: Vec<ClusterState>,
    /// The agents' datapath: `ebpf`, or `recording (<why>)`.
    #[serde(default)]
    pub datapath: String,
    /// A bpffs `up` mounted (unmounted by `down`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bpffs_mount: Option<PathBuf>,
    /// Directory holding every agent's pin directory (removed by `down`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_root: Option<PathBuf>,
    /// The cgroup holding every cluster's cgroup (removed by `down`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_root: Option<PathBuf>,
}

impl MeshState {
    fn all_procs(&self) -> impl Iterator<Item = &ProcState> {
        self.clusters.iter().flat_map(|c| c.processes.iter())
    }

    fn save(&self) -> Result<(), CtlError> {
        let path = self.state_dir.join(STATE_FILE);
        let tmp = self.state_dir.join(".state.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    pub(super) fn load(dir: &Path) -> Result<Option<Self>, CtlError> {
        let path = dir.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(serde_json::from_slice(&b).map_err(|e| {
                fail(format!("{}: not a meshctl state file: {e}", path.display()))
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CtlError::Read { path, source }),
        }
    }
}

/// Whether `pid` is a live (non-zombie) process running `binary` with `state_dir` on its
/// command line — i.e. one we started.
fn is_ours(pid: u32, binary: &str, state_dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 3 (after the parenthesised comm) is the state; Z/X = dead.
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r.trim_start())
            && (rest.starts_with('Z') || rest.starts_with('X'))
        {
            return false;
        }
    }
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let bin_ok = args.first().is_some_and(|a0| {
        Path::new(std::ffi::OsStr::from_bytes(a0))
            .file_name()
            .is_some_and(|n| n == binary)
    });
    let dir = state_dir.as_os_str().as_encoded_bytes();
    let dir_ok = args.iter().any(|a| a.windows(dir.len()).any(|w| w == dir));
    bin_ok && dir_ok
}

fn absolute(p: &Path) -> Result<PathBuf, CtlError> {
    Ok(std::path::absolute(p)?)
}

fn free_ports(n: usize) -> Result<Vec<u16>, CtlError> {
    // Hold every listener until all are picked, so the ports are distinct.
    let mut listeners = Vec::with_capacity(n);
    let mut seen = HashSet::new();
    while listeners.len() < n {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        if seen.insert(l.local_addr()?.port()) {
            listeners.push(l);
        }
    }
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

fn cert_err(context: String) -> impl FnOnce(mesh_certs::CertError) -> CtlError {
    move |source| CtlError::Cert { context, source }
}

fn tail(path: &Path, max: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let start = s.len().saturating_sub(max);
    let start = (start..s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    s[start..].to_owned()
}

/// GET `http://127.0.0.1:<port><path>`: (status code, body).
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let addr = (Ipv4Addr::LOCALHOST, port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let code = resp.split_whitespace().nth(1)?.parse().ok()?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_owned())
        .unwrap_or_default();
    Some((code, body))
}

fn etcd_bin() -> PathBuf {
    std::env::var_os("MESH_ETCD_BIN").map_or_else(|| PathBuf::from("/usr/bin/etcd"), PathBuf::from)
}

/// Starts `bin` detached (own session via `setsid`, which execs in place so the PID is the
/// program's), stdin from /dev/null, stdout+stderr appended to `log`.
fn spawn_detached(bin: &Path, args: &[String], log: &Path) -> Result<Child, CtlError> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    Command::new("setsid")
        .arg(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .spawn()
        .map_err(|e| fail(format!("starting {} (via setsid): {e}", bin.display())))
}

struct Plan {
    name: ClusterName,
    id: u32,
    dir: PathBuf,
    manifests: PathBuf,
    ca: CertificateAuthority,
}

/// The relay's PKI of `p` (see the module docs): peer CA, relay CA, the relay's server
/// certificate (from the peer CA) and etcd's trusted bundle (cluster CA + relay CA).
fn write_relay_pki(p: &Plan, pki: &Path) -> Result<(), CtlError> {
    let name = &p.name;
    let peer_ca =
        CertificateAuthority::generate(&format!("meshd-{name}-peer-ca"), CERT_VALIDITY * 10)
            .map_err(cert_err(format!("creating the peer CA of {name}")))?;
    let relay_ca =
        CertificateAuthority::generate(&format!("meshd-{name}-relay-ca"), CERT_VALIDITY * 10)
            .map_err(cert_err(format!("creating the relay CA of {name}")))?;
    for (ca, stem) in [(&peer_ca, "peer-ca"), (&relay_ca, "relay-ca")] {
        ca.write_files(pki, stem)
            .map_err(cert_err(format!("writing {stem} of {name}")))?;
    }
    let lo = [IpAddr::V4(Ipv4Addr::LOCALHOST)];
    peer_ca
        .issue(
            &CertRequest::server("clustermesh-relay", &["localhost"], &lo)
                .with_validity(CERT_VALIDITY),
        )
        .and_then(|c| c.write_files(pki, "relay").map(|_| ()))
        .map_err(cert_err(format!("issuing the relay certificate of {name}")))?;
    let mut bundle = p.ca.cert_pem().to_owned();
    if !bundle.ends_with('\n') {
        bundle.push('\n');
    }
    bundle.push_str(relay_ca.cert_pem());
    mesh_certs::write_file_atomic(
        &pki.join(ETCD_CLIENT_CA),
        bundle.as_bytes(),
        mesh_certs::FileKind::Public,
    )
    .map_err(cert_err(format!("writing {ETCD_CLIENT_CA} of {name}")))?;
    Ok(())
}

impl Plan {
    fn pki(&self) -> PathBuf {
        self.dir.join("pki")
    }
    fn pki_file(&self, f: &str) -> String {
        self.pki().join(f).display().to_string()
    }
    fn log(&self, role: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{role}.log"))
    }
}

fn root_config(p: &Plan, port: u16) -> Result<EtcdConfig, CtlError> {
    let read = |f: &str| {
        let path = p.pki().join(f);
        std::fs::read_to_string(&path).map_err(|source| CtlError::Read { path, source })
    };
    Ok(EtcdConfig {
        endpoints: vec![format!("https://127.0.0.1:{port}")],
        ca_pem: Some(read("ca.crt")?),
        cert_pem: Some(read("root.crt")?),
        key_pem: Some(read("root.key")?),
        tls_server_name: Some("localhost".into()),
        connect_timeout: Some(Duration::from_secs(2)),
        request_timeout: Some(Duration::from_secs(10)),
        ..EtcdConfig::default()
    })
}

/// The example clusters in ID order: the names listed in `<examples>/clusters` (one per
/// line, `#` comments), or, without that file, the sorted sub-directory names.
fn example_clusters(examples: &Path) -> Result<Vec<(String, PathBuf)>, CtlError> {
    let order = examples.join(ORDER_FILE);
    match std::fs::read_to_string(&order) {
        Ok(text) => {
            let mut out: Vec<(String, PathBuf)> = Vec::new();
            for (n, line) in text.lines().enumerate() {
                let name = line.split('#').next().unwrap_or("").trim();
                if name.is_empty() {
                    continue;
                }
                let dir = examples.join(name);
                let bad = |reason: &str| {
                    fail(format!("{}:{}: {name:?}: {reason}", order.display(), n + 1))
                };
                if !dir.is_dir() {
                    return Err(bad("no such directory next to the file"));
                }
                if out.iter().any(|(o, _)| o == name) {
                    return Err(bad("listed twice"));
                }
                out.push((name.to_owned(), dir));
            }
            return Ok(out);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(CtlError::Read {
                path: order,
                source,
            });
        }
    }
    let rd = std::fs::read_dir(examples).map_err(|source| CtlError::Read {
        path: examples.to_owned(),
        source,
    })?;
    let mut out = Vec::new();
    for e in rd {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type()?.is_dir() && !name.starts_with('.') {
            out.push((name, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// A mesh `up` started before certificates carried roles: reissue (in place) the role-less
/// certificates of each cluster's `pki/`, which the servers reload and meshctl reads anew, so
/// the role-checking gRPC APIs accept them. Says what it changed; silent when nothing.
fn add_missing_roles(
    state_dir: &Path,
    st: &MeshState,
    out: &mut impl Write,
) -> Result<(), CtlError> {
    for c in &st.clusters {
        let pki = state_dir.join(&c.name).join("pki");
        let name = ClusterName::new(c.name.clone()).map_err(|e| {
            fail(format!(
                "{}: cluster {:?}: {e}",
                state_dir.join(STATE_FILE).display(),
                c.name
            ))
        })?;
        for r in certs::reissue_roles(&pki, Some(&name), false)? {
            if matches!(r.action, certs::ReissueAction::Reissued { .. }) {
                writeln!(out, "{r}")?;
            }
        }
    }
    Ok(())
}

/// `meshctl up`.
pub(super) fn up(args: &UpArgs, out: &mut impl Write) -> Result<Status, CtlError> {
    std::fs::create_dir_all(&args.state_dir)?;
    let state_dir = absolute(&args.state_dir)?;
    if let Some(st) = MeshState::load(&state_dir)? {
        let alive: Vec<&ProcState> = st
            .all_procs()
            .filter(|p| is_ours(p.pid, &p.binary, &state_dir))
            .collect();
        let total = st.all_procs().count();
        if total > 0 && alive.len() == total {
            writeln!(out, "mesh already up in {}", state_dir.display())?;
            add_missing_roles(&state_dir, &st, out)?;
            print_summary(&st, out)?;
            return Ok(Status::Ok);
        }
        if !alive.is_empty() {
            return Err(fail(format!(
                "a mesh in {} is partially running ({} of {total} processes); run `meshctl down --state-dir {}` first",
                state_dir.display(),
                alive.len(),
                state_dir.display()
            )));
        }
        // Stale state: nothing of it runs any more; start over.
        for c in &st.clusters {
            let _ = std::fs::remove_dir_all(state_dir.join(&c.name));
        }
        std::fs::remove_file(state_dir.join(STATE_FILE))?;
    }

    // Inputs.
    let examples = example_clusters(&args.examples)?;
    let n = usize::from(args.clusters);
    if n == 0 || n > examples.len() {
        return Err(CtlError::InvalidArg {
            flag: "--clusters",
            value: args.clusters.to_string(),
            reason: format!(
                "must be between 1 and {} (the number of cluster directories in {}: {})",
                examples.len(),
                args.examples.display(),
                examples
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    let bin_dir = match &args.bin_dir {
        Some(d) => absolute(d)?,
        None => std::env::current_exe()?
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| fail("cannot find meshctl's directory; pass --bin-dir"))?,
    };
    let apiserver_bin = bin_dir.join(APISERVER_BIN);
    let agent_bin = bin_dir.join(AGENT_BIN);
    for b in [&apiserver_bin, &agent_bin] {
        if !b.exists() {
            return Err(fail(format!(
                "{} not found; build it (`cargo build --workspace --bins`) or pass --bin-dir",
                b.display()
            )));
        }
    }
    let etcd = etcd_bin();
    if !etcd.exists() {
        return Err(fail(format!(
            "{} not found (install etcd-server or set MESH_ETCD_BIN)",
            etcd.display()
        )));
    }

    // PKI.
    let mut plans = Vec::new();
    for (i, (name, manifests)) in examples.into_iter().take(n).enumerate() {
        let cname = ClusterName::new(name.clone()).map_err(|e| CtlError::InvalidArg {
            flag: "--examples",
            value: name.clone(),
            reason: format!("directory name is not a cluster name: {e}"),
        })?;
        let id = u32::try_from(i + 1).unwrap_or(u32::MAX);
        let dir = state_dir.join(&name);
        // A fresh start: nothing of an earlier run (etcd data with auth on) may remain.
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        for sub in ["pki", "peers", "logs", "data"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let ca = CertificateAuthority::generate(&format!("meshd-{name}-ca"), CERT_VALIDITY * 10)
            .map_err(cert_err(format!("creating the CA of {name}")))?;
        let plan = Plan {
            name: cname,
            id,
            dir,
            manifests: absolute(&manifests)?,
            ca,
        };
        let pki = plan.pki();
        plan.ca
            .write_files(&pki, "ca")
            .map_err(cert_err(format!("writing {}", pki.display())))?;
        let lo = [IpAddr::V4(Ipv4Addr::LOCALHOST)];
        // Each certificate's role (SAN URI spiffe://<cluster>.meshd/<role>) is what the gRPC
        // APIs authorize by; etcd goes by the CN. etcd's own certificate has no role.
        let reqs = [
            (
                "etcd-server",
                CertRequest::server_and_client("etcd", &["localhost"], &lo),
            ),
            // etcd user root, and meshctl's gRPC client (the admin kubeconfig's user).
            (
                "root",
                CertRequest::client("root").with_role(&name, Role::Admin),
            ),
            (
                "apiserver",
                CertRequest::client(&etcd_auth::apiserver_user(&name))
                    .with_role(&name, Role::Apiserver),
            ),
            (
                "agent",
                CertRequest::client(&etcd_auth::agent_user(&name)).with_role(&name, Role::Agent),
            ),
            // A gRPC client certificate for scripts (`meshctl` itself uses `root`).
            (
                "meshctl",
                CertRequest::client("meshctl").with_role(&name, Role::Admin),
            ),
            (
                "apiserver-grpc",
                CertRequest::server("clustermesh-apiserver", &["localhost"], &lo)
                    .with_role(&name, Role::Apiserver),
            ),
            (
                "agent-grpc",
                CertRequest::server("mesh-agent", &["localhost"], &lo)
                    .with_role(&name, Role::Agent),
            ),
        ];
        for (stem, req) in reqs {
            plan.ca
                .issue(&req.with_validity(CERT_VALIDITY))
                .and_then(|c| c.write_files(&pki, stem).map(|_| ()))
                .map_err(cert_err(format!("issuing {stem} for {name}")))?;
        }
        write_relay_pki(&plan, &pki)?;
        plans.push(plan);
    }

    let ports = free_ports(PORTS_PER_CLUSTER * n)?;
    let mut state = MeshState {
        state_dir: state_dir.clone(),
        clusters: plans
            .iter()
            .zip(ports.chunks(PORTS_PER_CLUSTER))
            .map(|(p, pt)| ClusterState {
                name: p.name.to_string(),
                id: p.id,
                etcd_port: pt[0],
                etcd_peer_port: pt[1],
                apiserver_grpc_port: pt[2],
                apiserver_health_port: pt[3],
                agent_grpc_port: pt[4],
                agent_health_port: pt[5],
                dns_port: pt[6],
                relay_port: pt[7],
                pin_dir: None,
                cgroup: None,
                processes: Vec::new(),
            })
            .collect(),
        datapath: String::new(),
        bpffs_mount: None,
        pin_root: None,
        cgroup_root: None,
    };
    // Bad manifests stop `up` before anything runs.
    if let Err(e) = check_manifests(&plans, &state, &apiserver_bin) {
        for p in &plans {
            let _ = std::fs::remove_dir_all(&p.dir);
        }
        let _ = std::fs::remove_file(state_dir.join(STATE_FILE));
        return Err(e);
    }
    state.save()?;
    if let Err(e) = setup_datapath(args.datapath, &mut state, out) {
        teardown_datapath(&state, out);
        let _ = std::fs::remove_file(state_dir.join(STATE_FILE));
        return Err(e);
    }
    state.save()?;

    let rt = runtime()?;
    let mut children: Vec<(usize, Child)> = Vec::new();
    let result = rt
        .block_on(start_all(
            &plans,
            &mut state,
            &mut children,
            &etcd,
            &apiserver_bin,
            &agent_bin,
            out,
        ))
        .and_then(|()| {
            wait_ready(
                &state,
                &mut children,
                Duration::from_secs(args.timeout_secs),
                out,
            )
        });
    if let Err(e) = result {
        if args.keep_on_failure {
            writeln!(
                out,
                "meshctl up failed; what started keeps running as recorded in {} (stop it with `meshctl down --state-dir {}`)",
                state_dir.join(STATE_FILE).display(),
                state_dir.display()
            )?;
        } else {
            // Nothing half-done: stop what was started; keep the logs for the post-mortem.
            let (stopped, _) = stop_recorded(&state, &state_dir, out)?;
            drop(children);
            teardown_datapath(&state, out);
            std::fs::remove_file(state_dir.join(STATE_FILE))?;
            writeln!(
                out,
                "meshctl up failed; stopped the {stopped} process(es) it had started (logs kept under {})",
                state_dir.display()
            )?;
        }
        return Err(e);
    }
    writeln!(out, "mesh is up")?;
    print_summary(&state, out)?;
    Ok(Status::Ok)
}

#[allow(clippy::too_many_arguments)]
async fn start_all(
    plans: &[Plan],
    state: &mut MeshState,
    children: &mut Vec<(usize, Child)>,
    etcd: &Path,
    apiserver_bin: &Path,
    agent_bin: &Path,
    out: &mut impl Write,
) -> Result<(), CtlError> {
    // etcd per cluster, then auth bootstrap.
    for (i, p) in plans.iter().enumerate() {
        let cs = state.clusters[i].clone();
        let client = format!("https://127.0.0.1:{}", cs.etcd_port);
        let peer = format!("http://127.0.0.1:{}", cs.etcd_peer_port);
        let member = format!("meshd-{}", p.name);
        let a: Vec<String> = vec![
            "--name".into(),
            member.clone(),
            "--data-dir".into(),
            p.dir.join("data").join("etcd").display().to_string(),
            "--listen-client-urls".into(),
            client.clone(),
            "--advertise-client-urls".into(),
            client.clone(),
            "--listen-peer-urls".into(),
            peer.clone(),
            "--initial-advertise-peer-urls".into(),
            peer.clone(),
            "--initial-cluster".into(),
            format!("{member}={peer}"),
            "--cert-file".into(),
            p.pki_file("etcd-server.crt"),
            "--key-file".into(),
            p.pki_file("etcd-server.key"),
            "--trusted-ca-file".into(),
            p.pki_file(ETCD_CLIENT_CA),
            "--client-cert-auth".into(),
            "--logger".into(),
            "zap".into(),
            "--log-level".into(),
            "warn".into(),
        ];
        let log = p.log("etcd");
        let mut child = spawn_detached(etcd, &a, &log)?;
        record(state, i, "etcd", ETCD_BIN, child.id(), log.clone())?;
        writeln!(
            out,
            "{}: etcd started (pid {}) on {client}",
            p.name,
            child.id()
        )?;
        let cfg = root_config(p, cs.etcd_port)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let store = loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(fail(format!(
                    "{}: etcd exited with {st} during start-up; log {}:\n{}",
                    p.name,
                    log.display(),
                    tail(&log, 2000)
                )));
            }
            if let Ok(store) = EtcdStore::connect(&cfg).await
                && store.client().status().await.is_ok()
            {
                break store;
            }
            if Instant::now() > deadline {
                return Err(fail(format!(
                    "{}: etcd on {client} not ready after 30 s; log {}:\n{}",
                    p.name,
                    log.display(),
                    tail(&log, 2000)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        children.push((i, child));
        etcd_auth::bootstrap(&store.client(), p.name.as_str())
            .await
            .map_err(fail)?;
    }

    // Every pair, through the admin kubeconfig (the same path as `meshctl connect`).
    let kubeconfig = write_admin_kubeconfigs(plans, state)?;
    writeln!(out, "admin kubeconfig: {}", kubeconfig.display())?;
    let admins = admin::load(&[kubeconfig])?;
    let mut sides = Vec::with_capacity(admins.len());
    for a in &admins {
        sides.push(connect::open(a).await?);
    }
    for (i, a) in sides.iter().enumerate() {
        for b in &sides[i + 1..] {
            connect::connect_pair(a, b, CERT_VALIDITY).await?;
            writeln!(out, "{} <-> {}: connected", a.admin.name(), b.admin.name())?;
        }
    }

    // apiserver + agent per cluster.
    for (i, p) in plans.iter().enumerate() {
        let cs = state.clusters[i].clone();
        let log = p.log("apiserver");
        let child = spawn_detached(apiserver_bin, &apiserver_args(p, &cs), &log)?;
        record(state, i, "apiserver", APISERVER_BIN, child.id(), log)?;
        writeln!(
            out,
            "{}: clustermesh-apiserver started (pid {})",
            p.name,
            child.id()
        )?;
        children.push((i, child));

        let log = p.log("agent");
        let child = spawn_detached(agent_bin, &agent_args(p, &cs), &log)?;
        record(state, i, "agent", AGENT_BIN, child.id(), log)?;
        writeln!(out, "{}: mesh-agent started (pid {})", p.name, child.id())?;
        children.push((i, child));
    }
    Ok(())
}

/// Flags both the apiserver and the agent of `p` take: cluster, etcd (client certificate
/// `<stem>.crt`), peers dir, gRPC server certificate `<stem>-grpc.crt`.
fn common_args(p: &Plan, cs: &ClusterState, stem: &str) -> Vec<String> {
    vec![
        "--cluster-name".into(),
        p.name.to_string(),
        "--cluster-id".into(),
        p.id.to_string(),
        "--etcd-endpoint".into(),
        format!("https://127.0.0.1:{}", cs.etcd_port),
        "--etcd-ca".into(),
        p.pki_file("ca.crt"),
        "--etcd-cert".into(),
        p.pki_file(&format!("{stem}.crt")),
        "--etcd-key".into(),
        p.pki_file(&format!("{stem}.key")),
        "--etcd-server-name".into(),
        "localhost".into(),
        "--peers-dir".into(),
        p.dir.join("peers").display().to_string(),
        "--grpc-cert".into(),
        p.pki_file(&format!("{stem}-grpc.crt")),
        "--grpc-key".into(),
        p.pki_file(&format!("{stem}-grpc.key")),
        "--grpc-client-ca".into(),
        p.pki_file("ca.crt"),
    ]
}

fn apiserver_args(p: &Plan, cs: &ClusterState) -> Vec<String> {
    let mut a = common_args(p, cs, "apiserver");
    a.extend([
        "--manifests".into(),
        p.manifests.display().to_string(),
        "--clusterset-cidr".into(),
        format!("198.19.{}.0/24", 128 + (p.id % 128)),
        "--grpc-listen".into(),
        format!("127.0.0.1:{}", cs.apiserver_grpc_port),
        "--health-listen".into(),
        format!("127.0.0.1:{}", cs.apiserver_health_port),
    ]);
    if cs.relay_port != 0 {
        a.extend([
            "--relay-listen".into(),
            format!("127.0.0.1:{}", cs.relay_port),
            "--relay-cert".into(),
            p.pki_file("relay.crt"),
            "--relay-key".into(),
            p.pki_file("relay.key"),
            "--relay-client-ca".into(),
            p.pki_file("peer-ca.crt"),
            "--relay-ca-cert".into(),
            p.pki_file("relay-ca.crt"),
            "--relay-ca-key".into(),
            p.pki_file("relay-ca.key"),
        ]);
    }
    a
}

fn agent_args(p: &Plan, cs: &ClusterState) -> Vec<String> {
    let mut a = common_args(p, cs, "agent");
    a.extend([
        "--peer-access".into(),
        "cached".into(),
        "--grpc-listen".into(),
        format!("127.0.0.1:{}", cs.agent_grpc_port),
        "--health-listen".into(),
        format!("127.0.0.1:{}", cs.agent_health_port),
        "--dns-listen".into(),
        format!("127.0.0.1:{}", cs.dns_port),
    ]);
    match (&cs.pin_dir, &cs.cgroup) {
        (Some(pin), Some(cg)) => a.extend([
            "--datapath".into(),
            "ebpf".into(),
            "--bpf-pin-dir".into(),
            pin.display().to_string(),
            "--cgroup".into(),
            cg.display().to_string(),
        ]),
        _ => a.extend(["--datapath".into(), "recording".into()]),
    }
    a
}

/// A short stable tag of the state directory, naming its cgroup and pin directories.
fn state_tag(state_dir: &Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    state_dir.hash(&mut h);
    format!("{:08x}", h.finish() & 0xffff_ffff)
}

/// Prepares the eBPF datapath when asked and possible: a bpffs (the host's at /sys/fs/bpf,
/// else one mounted in the state directory) and a cgroup per cluster under the cgroup2
/// mount. Records everything in `state` for `down`.
fn setup_datapath(
    choice: UpDatapath,
    state: &mut MeshState,
    out: &mut impl Write,
) -> Result<(), CtlError> {
    let recording = |state: &mut MeshState, why: String| {
        state.datapath = format!("recording ({why})");
    };
    if choice == UpDatapath::Recording {
        recording(state, "--datapath recording".into());
        return Ok(());
    }
    let prepared = (|| -> Result<(), String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("not root: eBPF needs CAP_BPF and CAP_NET_ADMIN".into());
        }
        let cg2 =
            crate::mounts::mount_point("cgroup2").ok_or("no cgroup2 mount in /proc/mounts")?;
        let tag = state_tag(&state.state_dir);
        let host_bpffs = Path::new("/sys/fs/bpf");
        let pin_root = if crate::mounts::is_mount_point(host_bpffs, "bpf") {
            host_bpffs.join("meshd-up").join(&tag)
        } else {
            let dir = state.state_dir.join("bpffs");
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("creating {}: {e}", dir.display()))?;
            let o = Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(&dir)
                .output()
                .map_err(|e| format!("running mount: {e}"))?;
            if !o.status.success() {
                return Err(format!(
                    "mounting a bpffs at {}: {}",
                    dir.display(),
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
            }
            state.bpffs_mount = Some(dir.clone());
            dir.join("meshd")
        };
        state.pin_root = Some(pin_root.clone());
        let cg_root = cg2.join(format!("meshd-up-{tag}"));
        state.cgroup_root = Some(cg_root.clone());
        for c in &mut state.clusters {
            let cg = cg_root.join(&c.name);
            std::fs::create_dir_all(&cg)
                .map_err(|e| format!("creating cgroup {}: {e}", cg.display()))?;
            c.cgroup = Some(cg);
            c.pin_dir = Some(pin_root.join(&c.name));
        }
        state.datapath = "ebpf".into();
        Ok(())
    })();
    match (prepared, choice) {
        (Ok(()), _) => Ok(()),
        (Err(why), UpDatapath::Ebpf) => Err(fail(format!("--datapath ebpf: {why}"))),
        (Err(why), _) => {
            teardown_datapath(state, out);
            for c in &mut state.clusters {
                c.cgroup = None;
                c.pin_dir = None;
            }
            recording(state, why);
            Ok(())
        }
    }
}

/// Undoes [`setup_datapath`] once the agents are stopped: unpins every map and link
/// (detaching the programs), removes the cgroups, unmounts a bpffs `up` mounted.
fn teardown_datapath(st: &MeshState, out: &mut impl Write) {
    if let Some(pins) = &st.pin_root
        && pins.exists()
        && let Err(e) = std::fs::remove_dir_all(pins)
    {
        let _ = writeln!(out, "removing pinned BPF objects {}: {e}", pins.display());
    }
    if let Some(root) = &st.cgroup_root {
        for c in &st.clusters {
            if let Some(cg) = &c.cgroup
                && cg.exists()
                && let Err(e) = std::fs::remove_dir(cg)
            {
                let _ = writeln!(
                    out,
                    "removing cgroup {}: {e} (processes still in it?)",
                    cg.display()
                );
            }
        }
        if root.exists() {
            let _ = std::fs::remove_dir(root);
        }
    }
    if let Some(mnt) = &st.bpffs_mount
        && crate::mounts::is_mount_point(mnt, "bpf")
    {
        match Command::new("umount").arg(mnt).output() {
            Ok(o) if o.status.success() => {
                let _ = std::fs::remove_dir(mnt);
            }
            Ok(o) => {
                let _ = writeln!(
                    out,
                    "unmounting {}: {}",
                    mnt.display(),
                    String::from_utf8_lossy(&o.stderr).trim()
                );
            }
            Err(e) => {
                let _ = writeln!(out, "running umount {}: {e}", mnt.display());
            }
        }
    }
}

/// Runs `clustermesh-apiserver --check` on every cluster's manifests before anything starts.
fn check_manifests(
    plans: &[Plan],
    state: &MeshState,
    apiserver_bin: &Path,
) -> Result<(), CtlError> {
    for (p, cs) in plans.iter().zip(&state.clusters) {
        let mut a = apiserver_args(p, cs);
        a.push("--check".into());
        let o = Command::new(apiserver_bin)
            .args(&a)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| fail(format!("running {} --check: {e}", apiserver_bin.display())))?;
        if !o.status.success() {
            let text = String::from_utf8_lossy(&o.stderr);
            let text = text.trim().trim_start_matches("Error: ");
            return Err(fail(format!(
                "cluster {}: the manifests in {} do not load:\n{text}",
                p.name,
                p.manifests.display()
            )));
        }
    }
    Ok(())
}

/// Writes `<state>/kubeconfig` (every cluster) and `<state>/<c>/admin.kubeconfig` (one each).
fn write_admin_kubeconfigs(plans: &[Plan], state: &MeshState) -> Result<PathBuf, CtlError> {
    let mode = MaxConnectedClusters::from_u32(255).map_err(|e| fail(e.to_string()))?;
    let entries: Vec<AdminEntry> = plans
        .iter()
        .zip(&state.clusters)
        .map(|(p, cs)| AdminEntry {
            name: p.name.clone(),
            cluster_id: u16::try_from(p.id).unwrap_or(u16::MAX),
            max_connected_clusters: mode,
            server: format!("https://127.0.0.1:{}", cs.etcd_port),
            tls_server_name: Some("localhost".into()),
            ca_file: p.pki().join("ca.crt"),
            cert_file: p.pki().join("root.crt"),
            key_file: p.pki().join("root.key"),
            ext: AdminExtension {
                peers_dir: p.dir.join("peers"),
                ca_key: p.pki().join("ca.key"),
                apiserver_grpc: Some(format!("127.0.0.1:{}", cs.apiserver_grpc_port)),
                agent_grpc: Some(format!("127.0.0.1:{}", cs.agent_grpc_port)),
                peer_endpoint: (cs.relay_port != 0).then(|| PeerEndpoint {
                    server: format!("https://127.0.0.1:{}", cs.relay_port),
                    peer_ca: p.pki().join("peer-ca.crt"),
                    peer_ca_key: p.pki().join("peer-ca.key"),
                }),
            },
        })
        .collect();
    for (e, p) in entries.iter().zip(plans) {
        admin::write_kubeconfig(&p.dir.join("admin.kubeconfig"), std::slice::from_ref(e))?;
    }
    let path = state.state_dir.join(KUBECONFIG_FILE);
    admin::write_kubeconfig(&path, &entries)?;
    Ok(path)
}

fn record(
    state: &mut MeshState,
    cluster: usize,
    role: &str,
    binary: &str,
    pid: u32,
    log: PathBuf,
) -> Result<(), CtlError> {
    state.clusters[cluster].processes.push(ProcState {
        role: role.into(),
        binary: binary.into(),
        pid,
        log,
    });
    state.save()
}

fn wait_ready(
    state: &MeshState,
    children: &mut [(usize, Child)],
    timeout: Duration,
    out: &mut impl Write,
) -> Result<(), CtlError> {
    let n = state.clusters.len() as u64;
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(n);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {pos}/{len} agents ready {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.enable_steady_tick(Duration::from_millis(120));
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let deadline = Instant::now() + timeout;
    loop {
        // A process that died is fatal.
        for (i, child) in children.iter_mut() {
            if let Ok(Some(st)) = child.try_wait() {
                let pid = child.id();
                let p = state.clusters[*i].processes.iter().find(|p| p.pid == pid);
                bar.finish_and_clear();
                let (role, log) = p.map_or(("process".into(), PathBuf::new()), |p| {
                    (p.role.clone(), p.log.clone())
                });
                return Err(fail(format!(
                    "{}: {role} (pid {pid}) exited with {st}; log {}:\n{}",
                    state.clusters[*i].name,
                    log.display(),
                    tail(&log, 3000)
                )));
            }
        }
        let mut not_ready = Vec::new();
        for c in &state.clusters {
            match http_get(c.agent_health_port, "/readyz") {
                Some((200, _)) => {}
                Some((code, body)) => not_ready.push(format!("{} ({code}: {body})", c.name)),
                None => not_ready.push(format!("{} (no answer)", c.name)),
            }
        }
        bar.set_position(n - not_ready.len() as u64);
        if not_ready.is_empty() {
            bar.finish_and_clear();
            return Ok(());
        }
        bar.set_message(format!("waiting for {}", not_ready.join(", ")));
        if Instant::now() > deadline {
            bar.finish_and_clear();
            writeln!(
                out,
                "timed out after {} s waiting for agents: {}",
                timeout.as_secs(),
                not_ready.join("; ")
            )?;
            for c in &state.clusters {
                for p in c.processes.iter().filter(|p| p.role != "etcd") {
                    writeln!(out, "--- {} {} ({}):", c.name, p.role, p.log.display())?;
                    writeln!(out, "{}", tail(&p.log, 1500))?;
                }
            }
            return Err(fail(format!(
                "agents not ready after {} s: {}; processes left running (see {}; stop with `meshctl down --state-dir {}`)",
                timeout.as_secs(),
                not_ready.join("; "),
                state.state_dir.join(STATE_FILE).display(),
                state.state_dir.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn print_summary(st: &MeshState, out: &mut impl Write) -> Result<(), CtlError> {
    writeln!(out, "state: {}", st.state_dir.join(STATE_FILE).display())?;
    for c in &st.clusters {
        let ready = match http_get(c.agent_health_port, "/readyz") {
            Some((200, _)) => "ready".to_owned(),
            Some((code, body)) => format!("not ready ({code}: {body})"),
            None => "not answering".to_owned(),
        };
        writeln!(out, "cluster {} (id {}): agent {ready}", c.name, c.id)?;
        writeln!(out, "  etcd       https://127.0.0.1:{}", c.etcd_port)?;
        if c.relay_port != 0 {
            writeln!(
                out,
                "  relay      https://127.0.0.1:{} (what peers dial)",
                c.relay_port
            )?;
        }
        writeln!(
            out,
            "  apiserver  grpc 127.0.0.1:{}  health http://127.0.0.1:{}/readyz",
            c.apiserver_grpc_port, c.apiserver_health_port
        )?;
        writeln!(
            out,
            "  agent      grpc 127.0.0.1:{}  health http://127.0.0.1:{}/readyz  dns 127.0.0.1:{}",
            c.agent_grpc_port, c.agent_health_port, c.dns_port
        )?;
        if let Some(cg) = &c.cgroup {
            writeln!(
                out,
                "  cgroup     {} (socket load balancing for `meshctl exec {}`)",
                cg.display(),
                c.name
            )?;
        }
        for p in &c.processes {
            writeln!(
                out,
                "  {:<10} pid {:<8} log {}",
                p.role,
                p.pid,
                p.log.display()
            )?;
        }
    }
    let dir = st.state_dir.display();
    let first = st.clusters.first().map_or("east", |c| c.name.as_str());
    let second = st.clusters.get(1).map_or("west", |c| c.name.as_str());
    writeln!(
        out,
        "admin kubeconfig: {}",
        st.state_dir.join(KUBECONFIG_FILE).display()
    )?;
    if st.datapath == "ebpf" {
        writeln!(
            out,
            "datapath: {} (pinned under {}; programs attached to each cluster's cgroup)",
            super::output::good("eBPF"),
            st.pin_root.as_deref().unwrap_or(Path::new("?")).display()
        )?;
    } else if !st.datapath.is_empty() {
        writeln!(
            out,
            "datapath: {} — nothing is enforced or load-balanced in the kernel",
            super::output::warn(&format!(
                "RECORDING {}",
                st.datapath.trim_start_matches("recording ")
            ))
        )?;
    }
    writeln!(out, "try:")?;
    writeln!(out, "  meshctl status --state-dir {dir}")?;
    if let Some(c) = st.clusters.first()
        && c.dns_port != 0
    {
        writeln!(
            out,
            "  dig @127.0.0.1 -p {} web.shop.svc.clusterset.local     # DNS of {}'s agent",
            c.dns_port, c.name
        )?;
        writeln!(
            out,
            "  meshctl exec {} --state-dir {dir} -- sh   # connect() to service VIPs is translated by {}'s agent",
            c.name, c.name
        )?;
    }
    writeln!(out, "  meshctl services --state-dir {dir}")?;
    writeln!(
        out,
        "  meshctl identities --state-dir {dir} --cluster {first}"
    )?;
    writeln!(out, "  meshctl diagnose --state-dir {dir}")?;
    writeln!(
        out,
        "  meshctl disconnect {first} {second} --state-dir {dir} --wait"
    )?;
    writeln!(
        out,
        "  meshctl connect {first} {second} --state-dir {dir} --wait"
    )?;
    writeln!(out, "  meshctl down --state-dir {dir} --purge")?;
    Ok(())
}

/// `meshctl down`.
pub(super) fn down(args: &DownArgs, out: &mut impl Write) -> Result<Status, CtlError> {
    let state_dir = absolute(&args.state_dir)?;
    let Some(st) = MeshState::load(&state_dir)? else {
        writeln!(
            out,
            "no mesh recorded in {} (no {STATE_FILE}); nothing to stop",
            state_dir.display()
        )?;
        return Ok(Status::Ok);
    };
    let (stopped, killed) = stop_recorded(&st, &state_dir, out)?;
    writeln!(
        out,
        "stopped {stopped} process(es) ({killed} killed) recorded in {}",
        state_dir.join(STATE_FILE).display()
    )?;
    teardown_datapath(&st, out);
    if args.purge {
        // Give killed processes a moment to go, then remove everything.
        std::thread::sleep(Duration::from_millis(if killed > 0 { 500 } else { 0 }));
        std::fs::remove_dir_all(&state_dir)?;
        writeln!(out, "removed {}", state_dir.display())?;
    }
    Ok(Status::Ok)
}

/// SIGTERM every recorded process that is still ours (agents and apiservers first, etcd
/// last), wait up to 10 s, SIGKILL the rest. Returns (signalled, killed).
fn stop_recorded(
    st: &MeshState,
    state_dir: &Path,
    out: &mut impl Write,
) -> Result<(usize, usize), CtlError> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    // Agents and apiservers first, etcd last.
    let mut procs: Vec<&ProcState> = st.all_procs().collect();
    procs.sort_by_key(|p| p.role == "etcd");
    let signal = |p: &ProcState, sig: Signal| -> bool {
        let Ok(pid) = i32::try_from(p.pid) else {
            return false;
        };
        is_ours(p.pid, &p.binary, state_dir) && kill(Pid::from_raw(pid), sig).is_ok()
    };
    let mut stopping: Vec<&ProcState> = Vec::new();
    for p in procs {
        if signal(p, Signal::SIGTERM) {
            stopping.push(p);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline
        && stopping
            .iter()
            .any(|p| is_ours(p.pid, &p.binary, state_dir))
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut killed = 0;
    for p in &stopping {
        if signal(p, Signal::SIGKILL) {
            killed += 1;
            writeln!(
                out,
                "{} (pid {}) did not stop in 10 s; killed",
                p.role, p.pid
            )?;
        }
    }
    Ok((stopping.len(), killed))
}

/// Arguments of `meshctl exec`.
#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:
  meshctl exec east -- sh
  meshctl exec west --state-dir /tmp/mesh -- python3 client.py")]
pub struct ExecArgs {
    /// The cluster whose cgroup the command runs in.
    pub cluster: String,
    /// The state directory given to `meshctl up`.
    #[arg(long, default_value = ".meshd")]
    pub state_dir: PathBuf,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// `meshctl exec`: runs a command inside a cluster's cgroup, so that its agent's socket
/// load balancer translates its connections to ClusterIPs and ClusterSetIPs.
pub(super) fn exec(args: &ExecArgs, out: &mut impl Write) -> Result<Status, CtlError> {
    let state_dir = absolute(&args.state_dir)?;
    let st = MeshState::load(&state_dir)?.ok_or_else(|| {
        fail(format!(
            "no mesh recorded in {} (no {STATE_FILE}); start one with `meshctl up`",
            state_dir.display()
        ))
    })?;
    let c = st
        .clusters
        .iter()
        .find(|c| c.name == args.cluster)
        .ok_or_else(|| CtlError::InvalidArg {
            flag: "CLUSTER",
            value: args.cluster.clone(),
            reason: format!(
                "not a cluster of the mesh in {} ({})",
                state_dir.display(),
                st.clusters
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })?;
    let (program, rest) = args
        .command
        .split_first()
        .ok_or_else(|| fail("no command given after --"))?;
    let status = match &c.cgroup {
        Some(cg) => {
            // The shell moves itself into the cgroup, then becomes the command.
            Command::new("sh")
                .arg("-c")
                .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
                .arg(cg)
                .arg(program)
                .args(rest)
                .status()
        }
        None => {
            writeln!(
                out,
                "meshctl: the datapath of {} is {}; running without socket load balancing",
                c.name,
                if st.datapath.is_empty() {
                    "unknown"
                } else {
                    &st.datapath
                }
            )?;
            out.flush()?;
            Command::new(program).args(rest).status()
        }
    }
    .map_err(|e| fail(format!("running {program}: {e}")))?;
    Ok(Status::Exit(
        status
            .code()
            .and_then(|c| u8::try_from(c).ok())
            .unwrap_or(1),
    ))
}
