//! meshctl command logic (the binary in `src/bin/meshctl.rs` only parses and calls `run`).

pub mod admin;
mod certs;
mod connect;
mod diagnose;
mod etcd_auth;
mod observe;
mod output;
mod peerstore;
mod policy;
mod status;
mod up;

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub use certs::{CertsCommand, UsageArg, parse_validity, parse_window};
pub use connect::{ConnectArgs, DisconnectArgs, PairArgs};
pub use diagnose::DiagnoseArgs;
pub use output::OutputFormat;
pub use policy::PolicyCommand;
pub use status::{IdentitiesArgs, PeersArgs, ServicesArgs, StatusArgs};
pub use up::{ClusterState, DownArgs, ExecArgs, MeshState, ProcState, UpArgs, UpDatapath};

/// meshctl: run and inspect a meshd mesh.
#[derive(Debug, Parser)]
#[command(
    name = "meshctl",
    version,
    about,
    after_help = "Examples:
  meshctl up --clusters 3                 # a local mesh under .meshd/
  meshctl status --wait                   # every cluster and peer ready?
  meshctl services                        # global services merged by an agent
  meshctl disconnect east west --wait     # unpeer two clusters
  meshctl connect east west --wait        # and peer them again
  meshctl diagnose                        # named checks with hints
  meshctl down --purge                    # stop it all, remove .meshd/

Colour is used on terminals unless NO_COLOR is set."
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// meshctl subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a whole mesh on this machine (etcd, apiserver and agent per cluster).
    Up(UpArgs),
    /// Stop everything `meshctl up` started (exactly the recorded processes).
    Down(DownArgs),
    /// Run a command in a `meshctl up` cluster's cgroup (its agent's socket load balancing).
    Exec(ExecArgs),
    /// Peer two clusters: etcd users and client certificates both ways, peer kubeconfigs.
    Connect(ConnectArgs),
    /// Unpeer two clusters: remove both peer kubeconfigs, revoke both etcd users.
    Disconnect(DisconnectArgs),
    /// Create cluster CAs, issue certificates and inspect certificate files.
    Certs {
        /// What to do with certificates.
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Readiness of every component of a `meshctl up` mesh, with peers and certificate expiry.
    Status(StatusArgs),
    /// Global services merged by an agent: ClusterSetIP, affinity, backends per cluster.
    Services(ServicesArgs),
    /// Per cluster, the peers its agent is connected to.
    Peers(PeersArgs),
    /// Security identities an agent knows (local and remote), with their labels.
    Identities(IdentitiesArgs),
    /// MeshNetworkPolicies: what is in force per endpoint, and why a flow is allowed or not.
    Policy {
        /// What to do.
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Packets an agent's policy programs dropped, with identities, labels and clusters.
    Observe(observe::ObserveArgs),
    /// Named checks of every cluster (mTLS, certificates, IDs, sync markers, heartbeat,
    /// clocks, peer logins, CIDR overlaps), each with a hint; exit 2 when one fails.
    Diagnose(DiagnoseArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(after_help = "Examples:
  meshctl completion bash > /etc/bash_completion.d/meshctl
  meshctl completion zsh > \"${fpath[1]}/_meshctl\"
  meshctl completion fish > ~/.config/fish/completions/meshctl.fish")]
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the version.
    Version,
}

/// How a command that ran to completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Everything is fine (exit code 0).
    Ok,
    /// The command ran, but found problems, e.g. expired or unverifiable certificates
    /// (exit code [`Status::PROBLEMS_EXIT_CODE`]).
    Problems,
    /// Pass on a child's exit code (`meshctl exec`).
    Exit(u8),
}

impl Status {
    /// Exit code for [`Status::Problems`].
    pub const PROBLEMS_EXIT_CODE: u8 = 2;

    /// The process exit code for this status.
    pub fn exit_code(self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::Problems => Self::PROBLEMS_EXIT_CODE,
            Status::Exit(code) => code,
        }
    }
}

/// What went wrong running a command.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Writing output failed.
    #[error("writing output: {0}")]
    Io(#[from] std::io::Error),
    /// `certs init` would overwrite an existing CA.
    #[error("CA file {path} already exists; pass --force to replace the CA")]
    CaExists {
        /// The existing file.
        path: PathBuf,
    },
    /// `certs issue` would overwrite an existing certificate or key.
    #[error("{path} already exists; pass --force to overwrite it")]
    FileExists {
        /// The existing file.
        path: PathBuf,
    },
    /// The CA to issue from is not there.
    #[error("CA {what} {path} not found; create the CA first with `meshctl certs init --dir {dir}`", dir = .dir.display())]
    CaMissing {
        /// `certificate` or `key`.
        what: &'static str,
        /// The missing file.
        path: PathBuf,
        /// The directory given with --dir.
        dir: PathBuf,
    },
    /// An `--ip` value is not an IP address.
    #[error("--ip {value:?} is not an IP address: {source}")]
    InvalidIp {
        /// The value as given.
        value: String,
        /// The parse error.
        #[source]
        source: std::net::AddrParseError,
    },
    /// A command-line value is unusable.
    #[error("{flag} {value:?}: {reason}")]
    InvalidArg {
        /// The flag, e.g. `--name`.
        flag: &'static str,
        /// The value as given.
        value: String,
        /// Why it is rejected.
        reason: String,
    },
    /// Reading an input file failed.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file does not hold PEM certificates.
    #[error("{path}: {reason}")]
    BadPem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A certificate operation failed.
    #[error("{context}: {source}")]
    Cert {
        /// What was being done, naming the file(s).
        context: String,
        /// The mesh-certs error.
        #[source]
        source: mesh_certs::CertError,
    },
    /// `meshctl up` / `down` could not do its job.
    #[error("{0}")]
    Up(String),
    /// Encoding JSON output failed.
    #[error("encoding JSON output: {0}")]
    Json(#[from] serde_json::Error),
}

/// Runs a parsed command, writing its output to `out`.
///
/// `Ok(Status::Problems)` means the command ran but found something a script should react to
/// (see [`Status`]); errors mean it could not do its job.
pub fn run(cli: &Cli, out: &mut impl Write) -> Result<Status, CtlError> {
    match &cli.command {
        Command::Up(args) => up::up(args, out),
        Command::Down(args) => up::down(args, out),
        Command::Exec(args) => up::exec(args, out),
        Command::Connect(args) => connect::connect(args, out),
        Command::Disconnect(args) => connect::disconnect(args, out),
        Command::Certs { command } => certs::run(command, out),
        Command::Status(args) => status::status(args, out),
        Command::Services(args) => status::services(args, out),
        Command::Peers(args) => status::peers(args, out),
        Command::Identities(args) => status::identities(args, out),
        Command::Policy { command } => policy::run(command, out),
        Command::Observe(args) => observe::observe(args, out),
        Command::Diagnose(args) => diagnose::diagnose(args, out),
        Command::Completion { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut cmd, "meshctl", out);
            Ok(Status::Ok)
        }
        Command::Version => {
            writeln!(out, "meshctl {}", env!("CARGO_PKG_VERSION"))?;
            Ok(Status::Ok)
        }
    }
}

/// A current-thread runtime for one command's async work.
fn runtime() -> Result<tokio::runtime::Runtime, CtlError> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// A command failure with a message that names what and where.
fn fail(msg: impl Into<String>) -> CtlError {
    CtlError::Up(msg.into())
}

/// `err` followed by its `source()` chain, joined with `": "`, skipping causes whose text the
/// previous message already contains.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cur = e.source();
    }
    text
}
