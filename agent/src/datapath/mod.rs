//! The datapath seam: a `Datapath` trait over the eBPF maps, with aya and recording implementations.
//!
//! ```text
//!  sync::Syncer (merged view + policy snapshots, iface:: host interfaces)
//!      ──apply(&[Change]) / attach_interface──► dyn Datapath
//!      Change ──plan::Planner──► Vec<MapOp> (ordered raw map writes, mesh-ebpf layouts)
//!          ├─ AyaDatapath: writes the pinned kernel maps (`ebpf` module)
//!          └─ RecordingDatapath: keeps the same maps in memory (`recording` module)
//! ```
//!
//! Both implementations run the same [`plan::Planner`], so the recording datapath holds
//! exactly what the kernel maps would: unit tests check map contents without root.

mod ebpf;
pub mod iface;
pub mod plan;
mod recording;
pub mod reserved;
pub mod sync;

use std::collections::HashMap;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
pub use mesh_ebpf::{self as abi, DropEvent};

pub use self::ebpf::{AyaConfig, AyaDatapath, cgroup2_mount};
pub use self::plan::{MapOp, Planner};
pub use self::recording::RecordingDatapath;

/// Which datapath an agent runs (reported in status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatapathMode {
    /// Real BPF programs and maps.
    Ebpf,
    /// Nothing reaches the kernel: unit tests and unprivileged runs.
    Recording,
}

impl DatapathMode {
    /// `"ebpf"` or `"recording"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::Recording => "recording",
        }
    }
}

/// Transport protocol of a service or policy entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// IANA protocol number.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => mesh_ebpf::PROTO_TCP,
            Self::Udp => mesh_ebpf::PROTO_UDP,
        }
    }
}

/// A service frontend: ClusterIP or ClusterSetIP, port and protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// The virtual IP.
    pub vip: Ipv4Addr,
    /// The service port.
    pub port: u16,
    /// The protocol.
    pub proto: Protocol,
}

/// A backend address of a service (same protocol as the service).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// Backend address.
    pub ip: Ipv4Addr,
    /// Backend port.
    pub port: u16,
}

/// Policy direction, from the endpoint's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Traffic to the endpoint.
    Ingress,
    /// Traffic from the endpoint.
    Egress,
}

impl Direction {
    fn raw(self) -> u8 {
        match self {
            Self::Ingress => mesh_ebpf::direction::INGRESS,
            Self::Egress => mesh_ebpf::direction::EGRESS,
        }
    }
}

/// A local endpoint as the policy program sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// The endpoint's IPv4 address (the map key).
    pub ip: Ipv4Addr,
    /// The id policy entries name.
    pub endpoint_id: u32,
    /// The endpoint's identity (reported in drop events).
    pub identity: u32,
    /// Host-side interface index; packets of this address on another interface are
    /// dropped. 0 = not checked.
    pub ifindex: u32,
    /// Default-deny traffic to the endpoint.
    pub enforce_ingress: bool,
    /// Default-deny traffic from the endpoint.
    pub enforce_egress: bool,
}

/// The key of one policy entry. `identity` 0, `port` 0 and `proto` 0 are wildcards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyRule {
    /// Local endpoint id.
    pub endpoint_id: u32,
    /// Remote identity; 0 = any.
    pub identity: u32,
    /// Destination port; 0 = any.
    pub port: u16,
    /// IP protocol number; 0 = any.
    pub proto: u8,
    /// Direction.
    pub direction: Direction,
}

/// What a policy entry does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Allow (and track the flow so replies pass).
    Allow,
    /// Drop, even if a wildcard entry would allow.
    Deny,
}

/// One change to the datapath; `Datapath::apply` takes a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Create or replace a service with exactly these backends (affinity already
    /// resolved: the slots are what connections pick from at random). An empty list
    /// keeps the service with no backend, which refuses connects.
    UpsertService {
        /// Frontend.
        key: ServiceKey,
        /// Backends.
        backends: Vec<Backend>,
    },
    /// Remove a service (and every backend no other service uses).
    DeleteService(ServiceKey),
    /// Map a prefix to an identity.
    UpsertIpcache {
        /// Prefix (a /32 for an endpoint).
        prefix: Ipv4Net,
        /// Its identity.
        identity: u32,
        /// Its cluster.
        cluster_id: u16,
    },
    /// Forget a prefix.
    DeleteIpcache(Ipv4Net),
    /// Add or replace a local endpoint.
    UpsertEndpoint(Endpoint),
    /// Remove a local endpoint (its traffic is no longer checked).
    DeleteEndpoint(Ipv4Addr),
    /// Add or replace a policy entry.
    UpsertPolicy {
        /// Key.
        rule: PolicyRule,
        /// Allow or deny.
        verdict: Verdict,
        /// Opaque id for observability.
        rule_id: u32,
    },
    /// Remove a policy entry.
    DeletePolicy(PolicyRule),
}

/// Per-verdict totals over all CPUs, indexed by `mesh_ebpf::verdict::*`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerdictCounters {
    /// (packets, bytes) per verdict.
    pub by_verdict: [(u64, u64); mesh_ebpf::verdict::MAX as usize],
}

impl VerdictCounters {
    /// Packets counted for `verdict`.
    pub fn packets(&self, verdict: u32) -> u64 {
        self.by_verdict.get(verdict as usize).map_or(0, |c| c.0)
    }
}

/// The contents of the configuration maps, raw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapSnapshot {
    /// `mesh_lb4_svc`.
    pub services: HashMap<abi::Lb4Key, abi::Lb4Service>,
    /// `mesh_lb4_be`.
    pub backends: HashMap<u32, abi::Lb4Backend>,
    /// `mesh_ipcache4`.
    pub ipcache: HashMap<abi::IpcacheKey, abi::IpcacheValue>,
    /// `mesh_endpoints` (key: IPv4, network order).
    pub endpoints: HashMap<u32, abi::EndpointValue>,
    /// `mesh_policy`.
    pub policy: HashMap<abi::PolicyKey, abi::PolicyValue>,
}

/// Errors of the datapath. `retryable` says whether trying the same call again may help.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// Loading a BPF object (verifier, map creation or pinning).
    #[error("loading BPF object {object}")]
    Load {
        /// Which object.
        object: &'static str,
        /// Cause.
        #[source]
        source: Box<aya::EbpfError>,
    },
    /// The object lacks a program or map this agent expects (a build mismatch).
    #[error("BPF object has no {kind} named {name}")]
    Missing {
        /// `"program"` or `"map"`.
        kind: &'static str,
        /// Its name.
        name: &'static str,
    },
    /// A map read or write failed.
    #[error("BPF map {map}: {op}")]
    Map {
        /// Map name.
        map: &'static str,
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// Loading, attaching or detaching a program failed.
    #[error("BPF program {program}: {op}")]
    Program {
        /// Program name.
        program: &'static str,
        /// What was being done (names the cgroup or interface).
        op: String,
        /// Cause.
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// Pinning, opening or converting a program link.
    #[error("BPF link: {what}")]
    Link {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Adding the clsact qdisc failed.
    #[error("adding clsact on {interface}")]
    Qdisc {
        /// Interface.
        interface: String,
        /// Cause.
        #[source]
        source: aya::programs::tc::TcError,
    },
    /// File-system work (pin directory, cgroup directory, /proc/mounts).
    #[error("{what}")]
    Io {
        /// What failed.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A change the maps cannot represent.
    #[error("invalid change: {0}")]
    Invalid(String),
    /// Every backend id is in use.
    #[error("backend ids exhausted")]
    BackendIdsExhausted,
}

impl DatapathError {
    /// Whether retrying the same operation may succeed (transient kernel/file errors).
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            Self::Map { .. } | Self::Io { .. } | Self::Qdisc { .. }
        )
    }
}

/// Opens the aya datapath; when the kernel refuses for lack of privilege (EPERM/EACCES
/// anywhere in the cause chain) opens the recording datapath instead and returns the
/// refusal with it, so the caller can say loudly (log and status) that nothing is
/// enforced. Any other failure (a verifier rejection, a missing bpffs) is an error: a
/// broken datapath must not pass for an unprivileged one.
pub fn open_or_record(
    config: AyaConfig,
) -> Result<(Box<dyn Datapath>, Option<DatapathError>), DatapathError> {
    match AyaDatapath::open(config) {
        Ok(dp) => Ok((Box::new(dp), None)),
        Err(e) if ebpf::has_io_kind(&e, std::io::ErrorKind::PermissionDenied) => {
            tracing::warn!(
                error = %e,
                "no BPF privileges: running the RECORDING datapath; no load balancing or policy is enforced"
            );
            Ok((Box::new(RecordingDatapath::new()), Some(e)))
        }
        Err(e) => Err(e),
    }
}

/// The datapath seam (CONVENTIONS 13): the syncer writes through it, status reads it.
pub trait Datapath: Send + std::fmt::Debug {
    /// `Ebpf` or `Recording`.
    fn mode(&self) -> DatapathMode;

    /// Applies a batch in order. On error, the changes before the failing one are
    /// applied; the implementation resynchronises its bookkeeping from the maps.
    fn apply(&mut self, changes: &[Change]) -> Result<(), DatapathError>;

    /// Sums the per-CPU verdict counters.
    fn counters(&self) -> Result<VerdictCounters, DatapathError>;

    /// Drains the drop events queued in the ring buffer.
    fn take_drop_events(&mut self) -> Vec<DropEvent>;

    /// A descriptor that polls readable when drop events are queued (`None`: poll
    /// `take_drop_events` periodically instead).
    fn drop_events_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }

    /// Attaches the policy programs to an endpoint's host-side interface (both hooks).
    fn attach_interface(&mut self, ifname: &str) -> Result<(), DatapathError>;

    /// Detaches them again; a no-op for an interface not attached.
    fn detach_interface(&mut self, ifname: &str) -> Result<(), DatapathError>;

    /// Reads every service, backend, ipcache, endpoint and policy entry (the input of a
    /// reconcile against the view, and of tests).
    fn snapshot(&self) -> Result<MapSnapshot, DatapathError>;

    /// Interfaces currently attached, sorted.
    fn attached_interfaces(&self) -> Vec<String>;

    /// One-change convenience: `apply(&[Change::UpsertService{..}])`.
    fn upsert_service(
        &mut self,
        key: ServiceKey,
        backends: Vec<Backend>,
    ) -> Result<(), DatapathError> {
        self.apply(&[Change::UpsertService { key, backends }])
    }

    /// One-change convenience: `apply(&[Change::DeleteService(..)])`.
    fn delete_service(&mut self, key: ServiceKey) -> Result<(), DatapathError> {
        self.apply(&[Change::DeleteService(key)])
    }
}
