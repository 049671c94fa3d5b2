//! The agent's `mesh.v1.ClusterMesh` gRPC API: status and the merged view, read from `ViewHandles`.
//!
//! ```text
//!  ViewHandles ─ status ─────► GetStatus (ready, why not, every peer)
//!              ─ services ───► ListServices  (merged across clusters)
//!              ─ identities ─► ListIdentities (all clusters)
//!              ─ ipcache ────► ListIpCache    (the winning entry per IP)
//!  SyncHandles ─ status ───────► GetStatus.datapath ("ebpf" / "recording (<why>)"), readiness
//!              ─ drops ────────► ObserveDrops (server stream; identities → labels, clusters)
//!  AgentApi ─routes─► mesh_proto::server::serve_mtls (shared with the apiserver; every call
//!                     authorized by the caller certificate's role)
//! ```
//!
//! Every call reads the latest published snapshot (an `Arc`, cloned out of the watch
//! channel before any conversion), so calls never hold up the view's writer.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use mesh_proto::v1 as pb;
use mesh_proto::v1::cluster_mesh_server::{ClusterMesh, ClusterMeshServer};
use meshd::model::{ClusterId, ClusterName, IdentityEntry, IpCacheEntry, MaxConnectedClusters};
use meshd::remote::{PeerStatus, SupervisorConfig};
use tokio::sync::watch;
use tonic::service::Routes;
use tonic::{Request, Response, Status};

use crate::datapath::sync::{DatapathStatus, SyncHandles, reason_name};
use crate::datapath::{DatapathMode, DropEvent};
use crate::runtime::{AgentStatus, ViewHandles};
use crate::view::{ClusterEntry, IdentitiesSnapshot, MergedService};

/// The component name reported by `GetStatus`.
pub const COMPONENT: &str = "mesh-agent";
/// The datapath reported by `GetStatus` when the agent runs without a syncer.
pub const DATAPATH: &str = "none";

/// The `ClusterMesh` service of one agent.
#[derive(Debug, Clone)]
pub struct AgentApi {
    cluster: ClusterName,
    cluster_id: ClusterId,
    mode: MaxConnectedClusters,
    handles: ViewHandles,
    datapath: Option<SyncHandles>,
    policy: Option<watch::Receiver<crate::policy::PolicyStatus>>,
}

/// What readiness is computed from: the sources and the datapath.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Readiness {
    /// The agent's sources.
    pub agent: AgentStatus,
    /// The datapath (`None`: the agent runs without one).
    pub datapath: Option<DatapathStatus>,
}

/// Why the agent is not ready: a source, or a datapath not reconciled yet (or failing).
pub fn readiness_reason(r: &Readiness) -> Option<String> {
    if let Some(why) = not_ready_reason(&r.agent) {
        return Some(why);
    }
    let dp = r.datapath.as_ref()?;
    if let (Some(DatapathMode::Recording), Some(why)) = (dp.mode, &dp.fallback_reason) {
        return Some(format!(
            "not ready: the RECORDING datapath runs as a fallback ({why}): no policy or load balancing is enforced"
        ));
    }
    if !dp.reconciled {
        return Some(match &dp.last_error {
            Some(e) => format!("not ready: datapath not reconciled yet (last error: {e})"),
            None => "not ready: datapath not reconciled with the view yet".to_owned(),
        });
    }
    if let Some(e) = &dp.last_error {
        return Some(format!(
            "not ready: the datapath is not enforcing the view (last write failed: {e})"
        ));
    }
    None
}

/// A `Readiness` watch and the task that keeps it following both inputs (run it; it
/// ends on `stop` or when an input closes).
pub fn readiness(
    mut agent: watch::Receiver<AgentStatus>,
    mut datapath: watch::Receiver<DatapathStatus>,
    stop: tokio_util::sync::CancellationToken,
) -> (
    watch::Receiver<Readiness>,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (tx, rx) = watch::channel(Readiness::default());
    let task = async move {
        loop {
            let next = Readiness {
                agent: agent.borrow_and_update().clone(),
                datapath: Some(datapath.borrow_and_update().clone()),
            };
            tx.send_if_modified(|r| {
                let changed = *r != next;
                *r = next;
                changed
            });
            tokio::select! {
                () = stop.cancelled() => break,
                r = agent.changed() => if r.is_err() { break },
                r = datapath.changed() => if r.is_err() { break },
            }
        }
    };
    (rx, task)
}

impl AgentApi {
    /// An API for the agent of `cfg.local`, answering from `handles`.
    pub fn new(cfg: &SupervisorConfig, handles: ViewHandles) -> Self {
        Self {
            cluster: cfg.local.clone(),
            cluster_id: cfg.local_id,
            mode: cfg.mode,
            handles,
            datapath: None,
            policy: None,
        }
    }

    /// Reports the policies in force and rejected in `GetStatus`.
    pub fn with_policy(mut self, status: watch::Receiver<crate::policy::PolicyStatus>) -> Self {
        self.policy = Some(status);
        self
    }

    /// Reports the datapath in `GetStatus` and streams its drops.
    pub fn with_datapath(mut self, handles: SyncHandles) -> Self {
        self.datapath = Some(handles);
        self
    }

    /// The tonic service wrapping this API.
    pub fn into_service(self) -> ClusterMeshServer<Self> {
        ClusterMeshServer::new(self)
    }

    /// The gRPC routes serving this API (for [`mesh_proto::server::serve_mtls`]).
    pub fn routes(self) -> Routes {
        Routes::new(self.into_service())
    }

    /// What authorizes calls to this API (for [`mesh_proto::server::serve_mtls`]): roles of
    /// this agent's cluster, per [`mesh_proto::server::ACCESS`].
    pub fn authorizer(&self) -> mesh_proto::server::Authorizer {
        mesh_proto::server::Authorizer::new(self.cluster.as_str())
    }

    /// IDs of the clusters the agent knows (its own and every peer whose config was read).
    fn cluster_ids(&self) -> HashMap<ClusterName, u32> {
        let status = self.handles.status.borrow();
        status
            .peers
            .iter()
            .filter_map(|p| Some((p.name.clone(), u32::from(p.cluster_id?.get()))))
            .chain([(self.cluster.clone(), u32::from(self.cluster_id.get()))])
            .collect()
    }
}

#[tonic::async_trait]
impl ClusterMesh for AgentApi {
    async fn get_status(
        &self,
        _request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        let status = self.handles.status.borrow().clone();
        let mut out = status_to_proto(&status, &self.cluster, self.cluster_id, self.mode);
        if let Some(p) = &self.policy {
            let p = p.borrow();
            out.policies_in_force.clone_from(&p.in_force);
            out.policies_rejected = p
                .rejected
                .iter()
                .map(|(k, why)| format!("{k}: {why}"))
                .collect();
            out.policy_entries = p.entries as u64;
        }
        if let Some(dp) = &self.datapath {
            let r = Readiness {
                agent: status,
                datapath: Some(dp.status.borrow().clone()),
            };
            out.datapath = r
                .datapath
                .as_ref()
                .map(DatapathStatus::describe)
                .unwrap_or_default();
            let why = readiness_reason(&r);
            out.ready = why.is_none();
            out.not_ready_reason = why.unwrap_or_default();
        }
        Ok(Response::new(out))
    }

    type ObserveDropsStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<pb::DropEvent, Status>> + Send + 'static>,
    >;

    async fn observe_drops(
        &self,
        request: Request<pb::ObserveDropsRequest>,
    ) -> Result<Response<Self::ObserveDropsStream>, Status> {
        let req = request.into_inner();
        let filter = validate("", &req.cluster)?;
        let Some(dp) = &self.datapath else {
            return Err(Status::failed_precondition(
                "this agent runs without a datapath",
            ));
        };
        let (recent, rx) = dp.subscribe_drops();
        let state = DropStream {
            recent: recent.into(),
            follow: req.follow,
            rx,
            identities: self.handles.identities.clone(),
            status: self.handles.status.clone(),
            local: (self.cluster.clone(), self.cluster_id),
            ifnames: HashMap::new(),
            filter,
        };
        let stream = futures::stream::unfold(state, |mut st| async move {
            while let Some(ev) = st.recent.pop_front() {
                let out = st.convert(&ev);
                if st.selects(&out) {
                    return Some((Ok(out), st));
                }
            }
            if !st.follow {
                return None;
            }
            loop {
                match st.rx.recv().await {
                    Ok(ev) => {
                        let out = st.convert(&ev);
                        if st.selects(&out) {
                            return Some((Ok(out), st));
                        }
                    }
                    // A slow reader skips what it missed.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(missed = n, "drop observer lagging");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_services(
        &self,
        request: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        let req = request.into_inner();
        let filter = validate(&req.namespace, &req.cluster)?;
        let ids = self.cluster_ids();
        let snap = self.handles.services.borrow().clone();
        let services = snap
            .entries
            .values()
            .filter(|s| {
                filter
                    .namespace
                    .as_ref()
                    .is_none_or(|ns| *ns == s.namespace)
            })
            .filter(|s| {
                filter
                    .cluster
                    .as_ref()
                    .is_none_or(|c| s.clusters.contains(c))
            })
            .map(|s| {
                let id = s.clusters.first().and_then(|c| ids.get(c)).copied();
                merged_service_to_proto(s, id.unwrap_or(0))
            })
            .collect();
        Ok(Response::new(pb::ListServicesResponse { services }))
    }

    async fn list_identities(
        &self,
        request: Request<pb::ListIdentitiesRequest>,
    ) -> Result<Response<pb::ListIdentitiesResponse>, Status> {
        let filter = validate("", &request.into_inner().cluster)?;
        let snap = self.handles.identities.borrow().clone();
        let mut identities: Vec<pb::Identity> = snap
            .entries
            .values()
            .filter(|e| filter.selects(&e.cluster))
            .map(|e| identity_to_proto(&e.value, &e.cluster))
            .collect();
        identities.sort_by(|a, b| (&a.cluster, a.id).cmp(&(&b.cluster, b.id)));
        Ok(Response::new(pb::ListIdentitiesResponse { identities }))
    }

    async fn list_ip_cache(
        &self,
        request: Request<pb::ListIpCacheRequest>,
    ) -> Result<Response<pb::ListIpCacheResponse>, Status> {
        let filter = validate("", &request.into_inner().cluster)?;
        let snap = self.handles.ipcache.borrow().clone();
        let mut entries: Vec<(&ClusterName, IpAddr, pb::IpCacheEntry)> = snap
            .entries
            .iter()
            .filter(|(_, e)| filter.selects(&e.cluster))
            .map(|(ip, e)| (&e.cluster, *ip, ip_cache_entry_to_proto(e)))
            .collect();
        entries.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        Ok(Response::new(pb::ListIpCacheResponse {
            entries: entries.into_iter().map(|(_, _, e)| e).collect(),
        }))
    }
}

/// One `ObserveDrops` stream's state.
struct DropStream {
    recent: std::collections::VecDeque<DropEvent>,
    follow: bool,
    rx: tokio::sync::broadcast::Receiver<DropEvent>,
    identities: watch::Receiver<std::sync::Arc<IdentitiesSnapshot>>,
    status: watch::Receiver<AgentStatus>,
    local: (ClusterName, ClusterId),
    ifnames: HashMap<u32, String>,
    filter: Filter,
}

impl DropStream {
    fn selects(&self, ev: &pb::DropEvent) -> bool {
        let Some(c) = &self.filter.cluster else {
            return true;
        };
        [&ev.source, &ev.destination]
            .into_iter()
            .flatten()
            .any(|p| p.cluster == c.as_str())
    }

    fn convert(&mut self, ev: &DropEvent) -> pb::DropEvent {
        let ids = self.identities.borrow().clone();
        let names: HashMap<u16, String> = {
            let st = self.status.borrow();
            st.peers
                .iter()
                .filter_map(|p| Some((p.cluster_id?.get(), p.name.to_string())))
                .chain([(self.local.1.get(), self.local.0.to_string())])
                .collect()
        };
        let ifindex = ev.ifindex;
        let interface = self
            .ifnames
            .entry(ifindex)
            .or_insert_with(|| interface_name(ifindex).unwrap_or_else(|| ifindex.to_string()))
            .clone();
        drop_to_proto(ev, &ids, &names, interface, wall_time(ev.timestamp_ns))
    }
}

/// The wall-clock time of a kernel `bpf_ktime_get_ns()` stamp (CLOCK_MONOTONIC): now minus
/// the event's age on the monotonic clock.
fn wall_time(ktime_ns: u64) -> time::OffsetDateTime {
    let now = time::OffsetDateTime::now_utc();
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => {
            let mono = u64::try_from(ts.tv_sec())
                .unwrap_or(0)
                .saturating_mul(1_000_000_000)
                .saturating_add(u64::try_from(ts.tv_nsec()).unwrap_or(0));
            now - std::time::Duration::from_nanos(mono.saturating_sub(ktime_ns))
        }
        Err(_) => now,
    }
}

/// The name of interface `ifindex` (`/sys/class/net/*/ifindex`).
fn interface_name(ifindex: u32) -> Option<String> {
    std::fs::read_dir("/sys/class/net")
        .ok()?
        .flatten()
        .find_map(|e| {
            let idx: u32 = std::fs::read_to_string(e.path().join("ifindex"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            (idx == ifindex).then(|| e.file_name().to_string_lossy().into_owned())
        })
}

/// A drop event with identities resolved to labels and clusters. `cluster_names`: ID → name.
pub fn drop_to_proto(
    ev: &DropEvent,
    identities: &IdentitiesSnapshot,
    cluster_names: &HashMap<u16, String>,
    interface: String,
    now: time::OffsetDateTime,
) -> pb::DropEvent {
    let peer = |ip: std::net::Ipv4Addr, port: u16, id: u32| {
        let identity = meshd::model::Identity::from_raw(id).ok();
        let entry = identity.and_then(|i| identities.get(&i));
        let (labels, cluster) = match (entry, identity.and_then(|i| i.reserved())) {
            (Some(e), _) => (
                e.value.labels.iter().map(ToString::to_string).collect(),
                e.cluster.to_string(),
            ),
            (None, Some(r)) => (vec![format!("reserved:{}", r.name())], String::new()),
            (None, None) => (Vec::new(), String::new()),
        };
        pb::FlowPeer {
            ip: ip.to_string(),
            port: u32::from(port),
            identity: id,
            labels,
            cluster,
        }
    };
    let mut source = peer(ev.src(), ev.src_port(), ev.src_identity);
    let mut destination = peer(ev.dst(), ev.dst_port(), ev.dst_identity);
    // The remote side's cluster from the ipcache when its identity is not known here.
    let remote = if ev.direction == mesh_ebpf::direction::INGRESS {
        &mut source
    } else {
        &mut destination
    };
    if remote.cluster.is_empty()
        && let Some(n) = cluster_names.get(&ev.remote_cluster_id)
    {
        remote.cluster = n.clone();
    }
    pb::DropEvent {
        time_unix_ms: i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(0),
        source: Some(source),
        destination: Some(destination),
        protocol: match ev.proto {
            6 => "TCP".to_owned(),
            17 => "UDP".to_owned(),
            1 => "ICMP".to_owned(),
            n => n.to_string(),
        },
        direction: if ev.direction == mesh_ebpf::direction::INGRESS {
            "ingress"
        } else {
            "egress"
        }
        .to_owned(),
        reason: reason_name(ev.reason).to_owned(),
        interface,
    }
}

/// Validated filters of a list request.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Filter {
    namespace: Option<String>,
    cluster: Option<ClusterName>,
}

impl Filter {
    /// Whether the cluster filter selects `cluster`.
    fn selects(&self, cluster: &ClusterName) -> bool {
        self.cluster.as_ref().is_none_or(|c| c == cluster)
    }
}

/// Checks the filters of a list request (empty = no filter): a namespace must be an
/// RFC 1123 label, a cluster a valid cluster name; otherwise `INVALID_ARGUMENT`.
fn validate(namespace: &str, cluster: &str) -> Result<Filter, Status> {
    Ok(Filter {
        namespace: mesh_proto::filter::namespace(namespace)?,
        cluster: mesh_proto::filter::cluster(cluster, ClusterName::new)?,
    })
}

/// Why the agent is not ready, or `None` when it is: which sources are not ready and why.
pub fn not_ready_reason(status: &AgentStatus) -> Option<String> {
    if status.ready {
        return None;
    }
    let mut parts = Vec::new();
    match &status.local {
        None => parts.push("local cluster: not started".to_owned()),
        Some(l) if !l.is_ready() => parts.push(format!("local cluster {}", describe(l))),
        Some(_) => {}
    }
    parts.extend(
        status
            .peers
            .iter()
            .filter(|p| !p.is_ready())
            .map(|p| format!("peer {}", describe(p))),
    );
    if parts.is_empty() {
        // Every source is ready: only the first read of the peers directory is missing.
        parts.push("the peers directory has not been read yet".to_owned());
    }
    Some(format!("not ready: {}", parts.join("; ")))
}

/// `<name>: <state>[ (last error: …)]`.
fn describe(p: &PeerStatus) -> String {
    match &p.last_error {
        Some(e) => format!("{}: {} (last error: {e})", p.name, p.state),
        None => format!("{}: {}", p.name, p.state),
    }
}

/// The agent's status as `ClusterStatus`: the local cluster's supervisor fills the
/// etcd/count fields, every peer a `PeerStatus`.
pub fn status_to_proto(
    status: &AgentStatus,
    cluster: &ClusterName,
    cluster_id: ClusterId,
    mode: MaxConnectedClusters,
) -> pb::ClusterStatus {
    let local = status.local.as_ref();
    let expiry: HashMap<&str, i64> = status
        .peer_cert_not_after
        .iter()
        .filter_map(|(name, t)| Some((name.as_str(), (*t)?)))
        .collect();
    pb::ClusterStatus {
        component: COMPONENT.to_owned(),
        cluster: cluster.to_string(),
        cluster_id: u32::from(cluster_id.get()),
        max_connected_clusters: u32::from(mode.get()),
        ready: status.ready,
        not_ready_reason: not_ready_reason(status).unwrap_or_default(),
        etcd_reachable: local.is_some_and(|l| l.connected),
        export_counts: local
            .map(|l| l.counts.clone())
            .unwrap_or_default()
            .into_iter()
            .collect(),
        synced_kinds: local.map_or_else(Vec::new, |l| {
            l.synced.iter().map(|k| k.as_str().to_owned()).collect()
        }),
        last_error: local.and_then(|l| l.last_error.clone()).unwrap_or_default(),
        errors: local.map_or(0, |l| l.failures),
        peers: status
            .peers
            .iter()
            .map(|p| peer_to_proto(p, expiry.get(p.name.as_str()).copied()))
            .collect(),
        datapath: DATAPATH.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        peer_config_errors: status
            .peer_errors
            .iter()
            .map(|(file, e)| format!("{file}: {e}"))
            .collect(),
        ..pb::ClusterStatus::default()
    }
}

/// One peer's supervisor status as `PeerStatus` (`cert_not_after`: Unix seconds).
pub fn peer_to_proto(p: &PeerStatus, cert_not_after: Option<i64>) -> pb::PeerStatus {
    p.to_proto(cert_not_after)
}

/// A merged service as `Service`; `cluster_id` is that of the cluster with precedence
/// (0 when unknown).
pub fn merged_service_to_proto(s: &MergedService, cluster_id: u32) -> pb::Service {
    let active: BTreeSet<usize> = s.active_backends.iter().copied().collect();
    pb::Service {
        cluster: s
            .clusters
            .first()
            .map(ToString::to_string)
            .unwrap_or_default(),
        cluster_id,
        namespace: s.namespace.clone(),
        name: s.name.clone(),
        global: true,
        shared: !s.backends.is_empty(),
        affinity: meshd::wire::affinity(s.affinity).to_owned(),
        headless: s.headless,
        frontends: s.frontends_local.iter().map(IpAddr::to_string).collect(),
        ports: s
            .ports
            .iter()
            .map(|p| meshd::wire::port(&p.name, p.port, p.protocol))
            .collect(),
        backends: s
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| pb::Backend {
                ip: b.ip.to_string(),
                ports: b
                    .ports
                    .iter()
                    .map(|p| meshd::wire::port(&p.name, p.port, p.protocol))
                    .collect(),
                ready: b.ready,
                hostname: b.hostname.clone().unwrap_or_default(),
                node: b.node.clone().unwrap_or_default(),
                zone: b.zone.clone().unwrap_or_default(),
                cluster: b.cluster.to_string(),
                active: active.contains(&i),
            })
            .collect(),
        cluster_set_ip: s.clusterset_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        export_created_unix: 0,
        clusters: s.clusters.iter().map(ToString::to_string).collect(),
        conflicts: s.conflicts.clone(),
    }
}

/// An identity of `cluster` as `Identity`.
pub fn identity_to_proto(e: &IdentityEntry, cluster: &ClusterName) -> pb::Identity {
    meshd::wire::identity(e, cluster)
}

/// The ipcache entry the agent uses for an IP as `IpCacheEntry`.
pub fn ip_cache_entry_to_proto(e: &ClusterEntry<IpCacheEntry>) -> pb::IpCacheEntry {
    meshd::wire::ip_cache_entry(&e.value, &e.cluster)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use meshd::model::{Affinity, BackendPort, Identity, Labels, Protocol, ServicePort};
    use meshd::remote::PeerState;

    use super::*;
    use crate::view::MergedBackend;

    fn name(s: &str) -> ClusterName {
        ClusterName::new(s).unwrap()
    }

    fn peer(n: &str, state: PeerState, err: Option<&str>) -> PeerStatus {
        let mut p = PeerStatus::new(&name(n));
        p.state = state;
        p.last_error = err.map(str::to_owned);
        p
    }

    #[test]
    fn filters_are_validated() {
        assert_eq!(validate("", "").unwrap(), Filter::default());
        let f = validate("prod", "west").unwrap();
        assert_eq!(f.namespace.as_deref(), Some("prod"));
        assert!(f.selects(&name("west")) && !f.selects(&name("east")));
        for (ns, c, what) in [("Prod", "", "namespace"), ("", "West", "cluster")] {
            let e = validate(ns, c).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains(what), "{}", e.message());
        }
    }

    #[test]
    fn readiness_names_the_sources_that_are_not_ready() {
        let mut st = AgentStatus::default();
        assert_eq!(
            not_ready_reason(&st).as_deref(),
            Some("not ready: local cluster: not started")
        );
        st.local = Some(peer("east", PeerState::Ready, None));
        st.peers = vec![
            peer("north", PeerState::Ready, None),
            peer("west", PeerState::Backoff, Some("connection refused")),
            peer("south", PeerState::WaitingForSync, None),
        ];
        let r = not_ready_reason(&st).unwrap();
        assert_eq!(
            r,
            "not ready: peer west: backoff (last error: connection refused); \
             peer south: waiting-for-sync"
        );
        st.peers.truncate(1);
        assert!(not_ready_reason(&st).unwrap().contains("peers directory"));
        st.ready = true;
        assert_eq!(not_ready_reason(&st), None);
    }

    #[test]
    fn readiness_is_false_while_the_datapath_does_not_enforce_the_view() {
        let agent = AgentStatus {
            ready: true,
            ..AgentStatus::default()
        };
        let dp = |mode, fallback: Option<&str>, reconciled, err: Option<&str>| Readiness {
            agent: agent.clone(),
            datapath: Some(DatapathStatus {
                mode: Some(mode),
                fallback_reason: fallback.map(str::to_owned),
                reconciled,
                last_error: err.map(str::to_owned),
                ..DatapathStatus::default()
            }),
        };
        assert_eq!(
            readiness_reason(&dp(DatapathMode::Ebpf, None, true, None)),
            None
        );
        // Recording on purpose (--datapath recording): nothing to enforce, ready.
        assert_eq!(
            readiness_reason(&dp(DatapathMode::Recording, None, true, None)),
            None
        );
        // Recording as a fallback: never ready.
        let why = readiness_reason(&dp(
            DatapathMode::Recording,
            Some("no bpffs mounted at /x"),
            true,
            None,
        ))
        .unwrap();
        assert!(why.contains("fallback (no bpffs mounted at /x)"), "{why}");
        // Not reconciled yet, or a failed write after it: not ready.
        assert!(
            readiness_reason(&dp(DatapathMode::Ebpf, None, false, None))
                .unwrap()
                .contains("not reconciled")
        );
        let why = readiness_reason(&dp(DatapathMode::Ebpf, None, true, Some("E2BIG"))).unwrap();
        assert!(
            why.contains("not enforcing the view (last write failed: E2BIG)"),
            "{why}"
        );
    }

    #[test]
    fn status_conversion() {
        let m = MaxConnectedClusters::C255;
        let mut west = peer("west", PeerState::Ready, Some("old"));
        west.cluster_id = Some(ClusterId::new(2, m).unwrap());
        west.connected = true;
        west.counts = BTreeMap::from([("ip".to_owned(), 3)]);
        west.synced = vec![meshd::keys::StateKind::Ip];
        west.failures = 2;
        west.last_failure = Some(time::OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap());
        let mut local = peer("east", PeerState::Ready, None);
        local.connected = true;
        local.counts = BTreeMap::from([("services".to_owned(), 1)]);
        let st = AgentStatus {
            local: Some(local),
            peers: vec![west],
            peer_cert_not_after: vec![("west".into(), Some(1_800_000_000))],
            peer_errors: vec![("/peers/x.kubeconfig".into(), "bad yaml".into())],
            ready: true,
        };
        let p = status_to_proto(&st, &name("east"), ClusterId::new(1, m).unwrap(), m);
        assert_eq!(
            (p.component.as_str(), p.datapath.as_str()),
            (COMPONENT, "none")
        );
        assert!(p.ready && p.not_ready_reason.is_empty() && p.etcd_reachable);
        assert_eq!(p.export_counts.get("services"), Some(&1));
        assert_eq!(p.peer_config_errors, ["/peers/x.kubeconfig: bad yaml"]);
        let w = &p.peers[0];
        assert_eq!(
            (w.name.as_str(), w.cluster_id, w.state.as_str()),
            ("west", 2, "ready")
        );
        assert_eq!(w.synced_kinds, ["ip"]);
        assert_eq!(w.counts.get("ip"), Some(&3));
        assert_eq!((w.failures, w.last_failure_unix_ms), (2, 1_700_000_000_000));
        assert_eq!(w.cert_not_after_unix, 1_800_000_000);
    }

    #[test]
    fn merged_service_conversion() {
        let backend = |c: &str, ip: &str, ready| MergedBackend {
            cluster: name(c),
            ip: ip.parse().unwrap(),
            ports: vec![BackendPort {
                name: "http".into(),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
            hostname: None,
            node: Some("n1".into()),
            zone: None,
            ready,
        };
        let s = MergedService {
            namespace: "shop".into(),
            name: "web".into(),
            headless: false,
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Tcp,
            }],
            frontends_local: vec!["198.18.0.1".parse().unwrap()],
            clusterset_ip: Some("198.19.0.1".parse().unwrap()),
            backends: vec![
                backend("east", "198.18.1.1", true),
                backend("west", "198.18.2.1", true),
                backend("west", "198.18.2.2", false),
            ],
            active_backends: vec![0],
            affinity: Affinity::Local,
            conflicts: vec!["headless: …".into()],
            clusters: vec![name("west"), name("east")],
        };
        let p = merged_service_to_proto(&s, 2);
        assert_eq!((p.cluster.as_str(), p.cluster_id), ("west", 2));
        assert_eq!(p.clusters, ["west", "east"]);
        assert_eq!(p.conflicts.len(), 1);
        assert_eq!(
            (p.affinity.as_str(), p.cluster_set_ip.as_str()),
            ("local", "198.19.0.1")
        );
        let b: Vec<_> = p
            .backends
            .iter()
            .map(|b| (b.cluster.as_str(), b.ready, b.active))
            .collect();
        assert_eq!(
            b,
            [
                ("east", true, true),
                ("west", true, false),
                ("west", false, false)
            ]
        );

        let e = ClusterEntry {
            cluster: name("west"),
            value: IpCacheEntry {
                ip: "198.18.2.1".parse().unwrap(),
                prefix_len: 32,
                identity: Identity::from_raw(131_328).unwrap(),
                host_ip: None,
                node: Some("n1".into()),
                namespace: Some("shop".into()),
                pod: Some("web-0".into()),
                named_ports: BTreeMap::new(),
            },
        };
        let p = ip_cache_entry_to_proto(&e);
        assert_eq!(
            (p.cluster.as_str(), p.identity, p.host_ip.as_str()),
            ("west", 131_328, "")
        );
        let i = identity_to_proto(
            &IdentityEntry {
                id: Identity::from_raw(131_328).unwrap(),
                labels: Labels::parse(["k8s:app=web"]).unwrap(),
            },
            &name("west"),
        );
        assert_eq!((i.id, i.labels.len()), (131_328, 1));
    }
}
