//! ClusterSetIP allocation: one stable virtual IP per global service, from `--clusterset-cidr`.
//!
//! ```text
//!  mesh/state/services/v1/<cluster>/<ns>/<name> ─Reflector(ServiceCodec)─┐ Event<StateKey, global>
//!  mesh/cache/services/v1/<peer>/<ns>/<name>    ─Reflector(ServiceCodec)─┤ (Init, InitApply…,
//!                                                                        ▼  InitDone, Apply, Delete)
//!  ClusterSetAllocator::apply: per (ns, name), the (source, cluster) pairs defining it global
//!     ├─ first definition ──► pending ──► sync(): create-if-absent txn writing both keys
//!     └─ last one gone ─────► orphaned since t ──► gc(): after `grace`, delete txn (mod revs)
//!  gc() every `gc_interval`: relist mesh/clusterset-ips/ (other replicas' work, repairs)
//!                                                                        ▼
//!  mesh/clusterset-ips/v1/<ns>/<name> + mesh/clusterset-ips/by-ip/<ip> ──► agents (DNS, eBPF)
//! ```
//!
//! Every service that is global in *any* cluster gets an address, including services that
//! exist only in a peer (they are seen through the kvstoremesh cache): the agent makes such
//! a service reachable locally through its ClusterSetIP alone.
//!
//! **Stability rule.** Once a name has an address it keeps it while any cluster defines it
//! as global, and for `grace` (default 5 min) after the last definition disappeared: a peer
//! that flaps (disconnect, relist, cache TTL) must not change the address clients resolved.
//! An existing `v1/<ns>/<name>` key is always kept, never overwritten. A relist of the
//! reflectors that shows the same services changes nothing: the reflector only emits
//! deletes for keys that did not come back, and a name that loses its definitions only
//! starts its grace clock. Nothing is released before both reflectors completed a list.
//!
//! **Why both keys are written in one transaction.** The name key answers "which IP has
//! this service", the by-ip key "which service has this IP"; each key is unique in etcd, so
//! creating both together under `Absent(name) ∧ Absent(by-ip)` makes the pair a bijection
//! that concurrent replicas cannot break: a replica that races for the same name or the
//! same IP fails its transaction, re-reads and retries (bounded). Releasing deletes both
//! under their mod revisions, so only the exact pair that was seen idle for the grace
//! period goes, never a pair just re-created by another replica. There is never a moment
//! where one key exists without the other.
//!
//! Addresses are picked with a hint pointer over the known-taken set (no randomness); the
//! network address and, for IPv4, the broadcast address are never handed out. An exhausted
//! CIDR is logged and counted, and the waiting names are retried after each GC pass. After
//! a change of the CIDR, addresses outside it are kept while their names are in use (the
//! stability rule wins); new names get addresses of the new CIDR.
//!
//! Damage (a name key without its by-ip key, a by-ip key whose name does not point back,
//! an unreadable value) can only come from outside this module; the GC pass repairs it
//! under mod-revision conditions and counts it.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use ipnet::IpNet;
use meshd::backoff::{Backoff, BackoffConfig};
use meshd::keys::{
    self, ClusterSetIpEntry, DecodeError, Key, KeyError, StateKey, StateKind, StateValue,
};
use meshd::kv::{Compare, KvError, KvStore, Op, Txn};
use meshd::metrics::ReflectorMetrics;
use meshd::model::ClusterName;
use meshd::reflector::{Codec, Event, Item, Reflector, ReflectorConfig};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Prefix of every ClusterSetIP key (name keys and by-ip keys).
pub const CLUSTERSET_PREFIX: &str = "mesh/clusterset-ips/";
/// Prefix of the name keys `mesh/clusterset-ips/v1/<ns>/<name>`.
pub const CLUSTERSET_NAMES_PREFIX: &str = "mesh/clusterset-ips/v1/";
/// Prefix of the address keys `mesh/clusterset-ips/by-ip/<ip>`.
pub const CLUSTERSET_BY_IP_PREFIX: &str = "mesh/clusterset-ips/by-ip/";
/// Services exported by this cluster's apiserver, every cluster.
pub const STATE_SERVICES_PREFIX: &str = "mesh/state/services/v1/";
/// Peers' services mirrored by kvstoremesh, every peer.
pub const CACHE_SERVICES_PREFIX: &str = "mesh/cache/services/v1/";

/// Tries per name before a contended allocation is given up (and retried later).
const MAX_ATTEMPTS: u32 = 32;
/// Events applied before pending names are allocated (bounds latency under a burst).
const MAX_BATCH: usize = 5000;
/// Keys per page when listing the ClusterSetIP prefix.
const LIST_PAGE: usize = 5000;

/// Where a service definition was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceSource {
    /// `mesh/state/services/v1/…`: exported by this cluster's apiserver.
    State,
    /// `mesh/cache/services/v1/…`: peers' services mirrored by kvstoremesh.
    Cache,
}

impl ServiceSource {
    /// Both sources.
    pub const ALL: [Self; 2] = [Self::State, Self::Cache];

    /// The prefix reflected for this source (services of every cluster).
    pub fn prefix(self) -> &'static str {
        match self {
            Self::State => STATE_SERVICES_PREFIX,
            Self::Cache => CACHE_SERVICES_PREFIX,
        }
    }

    /// `state` or `cache`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::State => "state",
            Self::Cache => "cache",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::State => 0,
            Self::Cache => 1,
        }
    }
}

impl fmt::Display for ServiceSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Codec of the services of every cluster under one source prefix.
///
/// The key is the `StateKey::Service { cluster, namespace, name }` of the entry; the value
/// is whether the service is global (decoded and checked with [`keys::decode_state`], no
/// identity scope needed; the rest of the value is dropped right away).
#[derive(Debug, Clone, Copy)]
pub struct ServiceCodec {
    /// Which prefix the keys come from.
    pub source: ServiceSource,
}

impl ServiceCodec {
    /// Reflector settings labelled for this codec.
    pub fn reflector_config(&self) -> ReflectorConfig {
        ReflectorConfig {
            cluster_label: "all".into(),
            kind_label: format!("clusterset-{}-services", self.source),
            ..ReflectorConfig::default()
        }
    }
}

impl Codec for ServiceCodec {
    type Key = StateKey;
    type Value = bool;

    fn decode_key(&self, key: &[u8]) -> Result<StateKey, DecodeError> {
        match (Key::parse_bytes(key)?, self.source) {
            (Key::State(sk), ServiceSource::State) | (Key::Cache(sk), ServiceSource::Cache)
                if sk.kind() == StateKind::Services =>
            {
                Ok(sk)
            }
            _ => Err(KeyError {
                key: String::from_utf8_lossy(key).into_owned(),
                reason: "not a service key of this prefix",
            }
            .into()),
        }
    }

    fn decode_value(&self, key: &StateKey, value: &[u8]) -> Result<bool, DecodeError> {
        match keys::decode_state(key, value, None)? {
            StateValue::Service(s) => Ok(s.global),
            _ => Err(KeyError {
                key: Key::State(key.clone()).to_string(),
                reason: "not a service key",
            }
            .into()),
        }
    }
}

/// Metrics and status counters of the allocator (cheap to clone; shared).
#[derive(Debug, Clone, Default)]
pub struct ClusterSetMetrics {
    /// Names with a ClusterSetIP, as last seen by this replica.
    pub allocated: Gauge,
    /// Addresses created by this replica.
    pub allocations: Counter,
    /// Addresses released by this replica after the grace period.
    pub releases: Counter,
    /// Allocation attempts that found the CIDR exhausted.
    pub exhausted: Counter,
    /// Transactions that lost a race with another replica.
    pub conflicts: Counter,
    /// Damaged keys repaired (a name key without its by-ip key, or the reverse).
    pub repairs: Counter,
}

impl ClusterSetMetrics {
    /// Registers under `mesh_clusterset_*`.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "mesh_clusterset_allocated",
            "Global services with a ClusterSetIP",
            self.allocated.clone(),
        );
        r.register(
            "mesh_clusterset_allocations",
            "ClusterSetIPs created by this replica",
            self.allocations.clone(),
        );
        r.register(
            "mesh_clusterset_releases",
            "ClusterSetIPs released by this replica after the grace period",
            self.releases.clone(),
        );
        r.register(
            "mesh_clusterset_exhausted",
            "Allocation attempts that found the ClusterSet CIDR exhausted",
            self.exhausted.clone(),
        );
        r.register(
            "mesh_clusterset_conflicts",
            "ClusterSetIP transactions that lost a race with another replica",
            self.conflicts.clone(),
        );
        r.register(
            "mesh_clusterset_repairs",
            "Damaged ClusterSetIP keys repaired",
            self.repairs.clone(),
        );
    }

    /// Names with a ClusterSetIP (status).
    pub fn allocated(&self) -> u64 {
        u64::try_from(self.allocated.get()).unwrap_or(0)
    }

    /// Allocation attempts that found the CIDR exhausted (status).
    pub fn exhausted(&self) -> u64 {
        self.exhausted.get()
    }
}

/// Allocator settings.
#[derive(Debug, Clone)]
pub struct ClusterSetConfig {
    /// The ClusterSet CIDR (`--clusterset-cidr`), IPv4 or IPv6.
    pub cidr: IpNet,
    /// How long a name keeps its address after its last definition disappeared (5 min).
    pub grace: Duration,
    /// Period of the GC pass (relist, repairs, releases, retry of waiting names) (30 s).
    pub gc_interval: Duration,
    /// Names created per transaction (2 compares and 2 puts each; etcd allows 128) (32).
    pub create_batch: usize,
    /// Status counters, shared with whoever reports them.
    pub metrics: ClusterSetMetrics,
    /// Metrics of the two service reflectors run by [`run`].
    pub reflector_metrics: ReflectorMetrics,
}

impl ClusterSetConfig {
    /// Defaults for `cidr`: 5 min grace, GC every 30 s, 32 creates per transaction.
    pub fn new(cidr: IpNet) -> Self {
        Self {
            cidr,
            grace: Duration::from_secs(300),
            gc_interval: Duration::from_secs(30),
            create_batch: 32,
            metrics: ClusterSetMetrics::default(),
            reflector_metrics: ReflectorMetrics::default(),
        }
    }
}

/// Why a ClusterSetIP step failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterSetError {
    /// The store failed; retrying later helps unless the error says otherwise.
    #[error("clusterset-ip allocation: {step}: {source}")]
    Store {
        /// Which step.
        step: &'static str,
        /// Cause.
        #[source]
        source: KvError,
    },
    /// Contention did not settle within the attempt budget; retrying later helps.
    #[error(
        "clusterset-ip allocation for {namespace}/{name}: still conflicting after {attempts} attempts"
    )]
    Contended {
        /// Namespace of the service.
        namespace: String,
        /// Name of the service.
        name: String,
        /// Attempts made.
        attempts: u32,
    },
    /// The configured CIDR cannot be used.
    #[error("clusterset-ip CIDR {cidr}: {reason}")]
    Cidr {
        /// The CIDR.
        cidr: IpNet,
        /// What is wrong.
        reason: &'static str,
    },
}

impl ClusterSetError {
    /// Whether retrying the same step later can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Store { source, .. } => source.is_retryable(),
            Self::Contended { .. } => true,
            Self::Cidr { .. } => false,
        }
    }
}

fn store_err(step: &'static str) -> impl FnOnce(KvError) -> ClusterSetError {
    move |source| ClusterSetError::Store { step, source }
}

/// The usable addresses of the CIDR as offsets from its network address.
#[derive(Debug, Clone, Copy)]
struct Pool {
    cidr: IpNet,
    base: u128,
    /// First usable offset (1: never the network address).
    first: u128,
    /// Last usable offset (IPv4: never the broadcast address).
    last: u128,
}

impl Pool {
    fn new(cidr: IpNet) -> Result<Self, ClusterSetError> {
        let cidr = cidr.trunc();
        let host_bits = u32::from(cidr.max_prefix_len() - cidr.prefix_len());
        let span_last = if host_bits >= 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        };
        let last = match cidr {
            IpNet::V4(_) => span_last.saturating_sub(1),
            IpNet::V6(_) => span_last,
        };
        if last < 1 {
            return Err(ClusterSetError::Cidr {
                cidr,
                reason: "has no usable address (the network and IPv4 broadcast addresses are never handed out)",
            });
        }
        Ok(Self {
            cidr,
            base: to_u128(cidr.network()),
            first: 1,
            last,
        })
    }

    /// The offset of `ip`, when it is a usable address of the pool.
    fn offset(&self, ip: IpAddr) -> Option<u128> {
        if !self.cidr.contains(&ip) {
            return None;
        }
        let off = to_u128(ip).checked_sub(self.base)?;
        (self.first..=self.last).contains(&off).then_some(off)
    }

    fn ip(&self, off: u128) -> IpAddr {
        let v = self.base + off;
        match self.cidr {
            // An offset of an IPv4 pool keeps the value within 32 bits.
            IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from_bits(v as u32)),
            IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from_bits(v)),
        }
    }

    /// Usable addresses.
    fn size(&self) -> u128 {
        self.last - self.first + 1
    }

    fn next(&self, off: u128) -> u128 {
        if off >= self.last {
            self.first
        } else {
            off + 1
        }
    }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(a.to_bits()),
        IpAddr::V6(a) => a.to_bits(),
    }
}

/// A global service's name, cluster-independent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct SvcName {
    namespace: String,
    name: String,
}

impl SvcName {
    fn key(&self) -> String {
        format!("{CLUSTERSET_NAMES_PREFIX}{}/{}", self.namespace, self.name)
    }

    fn entry(&self, ip: IpAddr) -> ClusterSetIpEntry {
        ClusterSetIpEntry {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            ip,
        }
    }
}

impl fmt::Display for SvcName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

fn ip_key(ip: IpAddr) -> String {
    format!("{CLUSTERSET_BY_IP_PREFIX}{ip}")
}

/// A name's address as last seen in etcd, with the mod revisions of both keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Allocation {
    ip: IpAddr,
    name_rev: i64,
    ip_rev: i64,
}

/// Outcome of re-reading a name after a lost race.
enum Refresh {
    /// Nothing under the name: allocate (again). `learned`: the address tried turned out
    /// to be taken (the known-taken set grew, which bounds the retries).
    Free {
        /// The tried address is taken.
        learned: bool,
    },
    /// The name has an address (adopted).
    Adopted,
    /// The name key exists but is damaged; the next GC pass repairs it.
    Blocked,
}

/// Allocates and releases ClusterSetIPs (single owner: `&mut self`; see the module docs).
///
/// Feed it service events with [`Self::apply`] (no I/O), then call [`Self::sync`] to
/// allocate what became pending, and [`Self::gc`] periodically. Several replicas may run
/// one each on the same store.
#[derive(Debug)]
pub struct ClusterSetAllocator {
    store: Arc<dyn KvStore>,
    cfg: ClusterSetConfig,
    pool: Pool,
    /// (ns, name) → the (source, cluster) pairs where it is defined as global.
    defs: HashMap<SvcName, Vec<(ServiceSource, ClusterName)>>,
    /// Names with an address in etcd, as last seen.
    allocated: HashMap<SvcName, Allocation>,
    /// Pool offsets known to be taken in etcd (by a name key or a by-ip key).
    taken: BTreeSet<u128>,
    /// Where the next free-address search starts.
    hint: u128,
    /// Defined names that need an address.
    pending: BTreeSet<SvcName>,
    /// Defined names waiting for the next GC pass (CIDR exhausted, or damaged keys).
    deferred: BTreeSet<SvcName>,
    /// Allocated names with no definition: since when, at which name-key revision.
    orphaned: HashMap<SvcName, (Instant, i64)>,
    /// Addresses a defined name had before another replica released it (tried first).
    prefer: HashMap<SvcName, IpAddr>,
    /// Which sources completed at least one list.
    synced: [bool; 2],
}

impl ClusterSetAllocator {
    /// An allocator over `store`, loading what `mesh/clusterset-ips/` holds.
    pub async fn new(
        store: Arc<dyn KvStore>,
        cfg: ClusterSetConfig,
    ) -> Result<Self, ClusterSetError> {
        let pool = Pool::new(cfg.cidr)?;
        let mut a = Self {
            store,
            hint: pool.first,
            pool,
            cfg,
            defs: HashMap::new(),
            allocated: HashMap::new(),
            taken: BTreeSet::new(),
            pending: BTreeSet::new(),
            deferred: BTreeSet::new(),
            orphaned: HashMap::new(),
            prefer: HashMap::new(),
            synced: [false; 2],
        };
        a.reload().await?;
        Ok(a)
    }

    /// The address of a name, as last seen (whether or not it is still defined).
    pub fn lookup(&self, namespace: &str, name: &str) -> Option<IpAddr> {
        self.allocated
            .get(&SvcName {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })
            .map(|a| a.ip)
    }

    /// Names with an address, as last seen.
    pub fn allocated(&self) -> usize {
        self.allocated.len()
    }

    /// Allocation attempts that found the CIDR exhausted.
    pub fn exhausted_events(&self) -> u64 {
        self.cfg.metrics.exhausted()
    }

    /// Names defined as global by at least one cluster.
    pub fn defined(&self) -> usize {
        self.defs.len()
    }

    /// Whether [`Self::sync`] has names to allocate.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Whether both sources completed a list (releases wait for this).
    pub fn is_synced(&self) -> bool {
        self.synced.iter().all(|s| *s)
    }

    /// The shared counters.
    pub fn metrics(&self) -> &ClusterSetMetrics {
        &self.cfg.metrics
    }

    fn set_gauge(&self) {
        let n = i64::try_from(self.allocated.len()).unwrap_or(i64::MAX);
        self.cfg.metrics.allocated.set(n);
    }

    /// Applies one reflector event (no I/O). A name that gains its first global definition
    /// becomes pending; one that loses its last starts its grace clock.
    pub fn apply(&mut self, source: ServiceSource, ev: Event<StateKey, bool>) {
        match ev {
            Event::Init => {}
            Event::InitDone => self.synced[source.index()] = true,
            Event::InitApply(key, global) | Event::Apply(key, global) => {
                if global {
                    self.define(source, key);
                } else {
                    self.undefine(source, key);
                }
            }
            Event::Delete(key) => self.undefine(source, key),
        }
    }

    fn define(&mut self, source: ServiceSource, key: StateKey) {
        let StateKey::Service {
            cluster,
            namespace,
            name,
        } = key
        else {
            return;
        };
        let svc = SvcName { namespace, name };
        if let Some(defs) = self.defs.get_mut(&svc) {
            if !defs.iter().any(|(s, c)| *s == source && *c == cluster) {
                defs.push((source, cluster));
            }
            return;
        }
        self.orphaned.remove(&svc);
        if !self.allocated.contains_key(&svc) && !self.deferred.contains(&svc) {
            self.pending.insert(svc.clone());
        }
        self.defs.insert(svc, vec![(source, cluster)]);
    }

    fn undefine(&mut self, source: ServiceSource, key: StateKey) {
        let StateKey::Service {
            cluster,
            namespace,
            name,
        } = key
        else {
            return;
        };
        let svc = SvcName { namespace, name };
        let Some(defs) = self.defs.get_mut(&svc) else {
            return;
        };
        defs.retain(|(s, c)| !(*s == source && *c == cluster));
        if !defs.is_empty() {
            return;
        }
        self.defs.remove(&svc);
        self.pending.remove(&svc);
        self.deferred.remove(&svc);
        if let Some(a) = self.allocated.get(&svc) {
            tracing::debug!(service = %svc, ip = %a.ip, "global service gone; keeping its ClusterSetIP for the grace period");
            let rev = a.name_rev;
            self.orphaned.insert(svc, (Instant::now(), rev));
        }
    }

    /// Allocates an address for every pending name (batched create transactions; a batch
    /// that conflicts falls back to one name at a time with re-reads). On error the names
    /// not done stay pending.
    pub async fn sync(&mut self) -> Result<(), ClusterSetError> {
        let exhausted_before = self.cfg.metrics.exhausted();
        let batch_size = self.cfg.create_batch.clamp(1, 60);
        let mut result = Ok(());
        while result.is_ok() {
            let mut batch = Vec::with_capacity(batch_size.min(self.pending.len()));
            while batch.len() < batch_size {
                let Some(svc) = self.pending.pop_first() else {
                    break;
                };
                if self.defs.contains_key(&svc) && !self.allocated.contains_key(&svc) {
                    batch.push(svc);
                }
            }
            if batch.is_empty() {
                break;
            }
            result = self.create_batch(&batch).await;
            if result.is_err() {
                for svc in batch {
                    if self.defs.contains_key(&svc)
                        && !self.allocated.contains_key(&svc)
                        && !self.deferred.contains(&svc)
                    {
                        self.pending.insert(svc);
                    }
                }
            }
        }
        let exhausted = self.cfg.metrics.exhausted() - exhausted_before;
        if exhausted > 0 {
            tracing::error!(
                cidr = %self.pool.cidr,
                waiting = self.deferred.len(),
                allocated = self.allocated.len(),
                "ClusterSet CIDR exhausted: global services are left without a ClusterSetIP"
            );
        }
        self.set_gauge();
        result
    }

    fn push_create(txn: &mut Txn, svc: &SvcName, ip: IpAddr) {
        let name_key = svc.key();
        let ip_key = ip_key(ip);
        let value = keys::encode(&svc.entry(ip));
        txn.compares.push(Compare::Absent(name_key.clone()));
        txn.compares.push(Compare::Absent(ip_key.clone()));
        txn.success.push(Op::Put {
            key: name_key,
            value: value.clone(),
            lease: None,
        });
        txn.success.push(Op::Put {
            key: ip_key,
            value,
            lease: None,
        });
    }

    fn record(&mut self, svc: &SvcName, ip: IpAddr, revision: i64) {
        tracing::debug!(service = %svc, %ip, "allocated ClusterSetIP");
        self.prefer.remove(svc);
        self.cfg.metrics.allocations.inc();
        self.allocated.insert(
            svc.clone(),
            Allocation {
                ip,
                name_rev: revision,
                ip_rev: revision,
            },
        );
    }

    /// No free address: count it and wait for the next GC pass.
    fn starve(&mut self, svc: &SvcName) {
        self.cfg.metrics.exhausted.inc();
        self.deferred.insert(svc.clone());
    }

    /// The address to try for `svc`: the one it had before, if still free, else the next
    /// free one after the hint.
    fn pick(&mut self, svc: &SvcName) -> Option<u128> {
        if let Some(off) = self.prefer.get(svc).and_then(|ip| self.pool.offset(*ip))
            && !self.taken.contains(&off)
        {
            return Some(off);
        }
        let taken = u128::try_from(self.taken.len()).unwrap_or(u128::MAX);
        if taken >= self.pool.size() {
            return None;
        }
        // Every taken offset is inside the pool and fewer than its size are taken, so this
        // finds a free one within `taken + 1` steps.
        let mut candidate = self.hint.clamp(self.pool.first, self.pool.last);
        while self.taken.contains(&candidate) {
            candidate = self.pool.next(candidate);
        }
        self.hint = self.pool.next(candidate);
        Some(candidate)
    }

    async fn create_batch(&mut self, batch: &[SvcName]) -> Result<(), ClusterSetError> {
        let mut txn = Txn::default();
        let mut planned = Vec::with_capacity(batch.len());
        for svc in batch {
            match self.pick(svc) {
                Some(off) => {
                    self.taken.insert(off);
                    let ip = self.pool.ip(off);
                    Self::push_create(&mut txn, svc, ip);
                    planned.push((svc, off));
                }
                None => self.starve(svc),
            }
        }
        if planned.is_empty() {
            return Ok(());
        }
        // On a store error the offsets stay marked taken (the write may have happened);
        // the next GC pass relearns the truth.
        let r = self
            .store
            .txn(txn)
            .await
            .map_err(store_err("create ClusterSetIPs"))?;
        if r.succeeded {
            for (svc, off) in planned {
                self.record(svc, self.pool.ip(off), r.revision);
            }
            return Ok(());
        }
        // Another replica allocated some of these names or took some of these addresses.
        self.cfg.metrics.conflicts.inc();
        for (_, off) in &planned {
            self.taken.remove(off);
        }
        for (svc, off) in planned {
            match self.refresh(svc, off).await? {
                Refresh::Adopted => {}
                Refresh::Blocked => {
                    self.deferred.insert(svc.clone());
                }
                Refresh::Free { .. } => self.ensure_one(svc).await?,
            }
        }
        Ok(())
    }

    /// Allocates one name, re-reading after each lost race. A race lost to an address
    /// another replica just took adds that address to the known-taken set (progress,
    /// bounded by what etcd holds); races that teach nothing are bounded by `MAX_ATTEMPTS`.
    async fn ensure_one(&mut self, svc: &SvcName) -> Result<(), ClusterSetError> {
        let mut fruitless = 0;
        while fruitless < MAX_ATTEMPTS {
            if self.allocated.contains_key(svc) {
                return Ok(());
            }
            let Some(off) = self.pick(svc) else {
                self.starve(svc);
                return Ok(());
            };
            let ip = self.pool.ip(off);
            let mut txn = Txn::default();
            Self::push_create(&mut txn, svc, ip);
            self.taken.insert(off);
            let r = self
                .store
                .txn(txn)
                .await
                .map_err(store_err("create ClusterSetIP"))?;
            if r.succeeded {
                self.record(svc, ip, r.revision);
                return Ok(());
            }
            self.cfg.metrics.conflicts.inc();
            self.taken.remove(&off);
            match self.refresh(svc, off).await? {
                Refresh::Free { learned: true } => {}
                Refresh::Free { learned: false } => fruitless += 1,
                Refresh::Adopted => return Ok(()),
                Refresh::Blocked => {
                    self.deferred.insert(svc.clone());
                    return Ok(());
                }
            }
        }
        Err(ClusterSetError::Contended {
            namespace: svc.namespace.clone(),
            name: svc.name.clone(),
            attempts: MAX_ATTEMPTS,
        })
    }

    /// Re-reads a name, and if it has no key the address it tried, after a lost race.
    async fn refresh(
        &mut self,
        svc: &SvcName,
        candidate: u128,
    ) -> Result<Refresh, ClusterSetError> {
        let name_key = svc.key();
        let Some(kv) = self
            .store
            .get(&name_key)
            .await
            .map_err(store_err("read name key"))?
        else {
            let learned = self
                .store
                .get(&ip_key(self.pool.ip(candidate)))
                .await
                .map_err(store_err("read by-ip key"))?
                .is_some();
            if learned {
                self.taken.insert(candidate);
            }
            return Ok(Refresh::Free { learned });
        };
        let entry = match serde_json::from_slice::<ClusterSetIpEntry>(&kv.value) {
            Ok(e) if e.namespace == svc.namespace && e.name == svc.name => e,
            _ => return Ok(Refresh::Blocked),
        };
        if let Some(off) = self.pool.offset(entry.ip) {
            self.taken.insert(off);
        }
        let by_ip = self
            .store
            .get(&ip_key(entry.ip))
            .await
            .map_err(store_err("read by-ip key"))?;
        let Some(by_ip) = by_ip.filter(|b| {
            serde_json::from_slice::<ClusterSetIpEntry>(&b.value).is_ok_and(|e| {
                e.namespace == svc.namespace && e.name == svc.name && e.ip == entry.ip
            })
        }) else {
            return Ok(Refresh::Blocked);
        };
        tracing::debug!(service = %svc, ip = %entry.ip, "adopted ClusterSetIP allocated elsewhere");
        self.prefer.remove(svc);
        self.allocated.insert(
            svc.clone(),
            Allocation {
                ip: entry.ip,
                name_rev: kv.mod_revision,
                ip_rev: by_ip.mod_revision,
            },
        );
        Ok(Refresh::Adopted)
    }

    /// Relists `mesh/clusterset-ips/` at one revision, repairs damage, and rebuilds the
    /// view of what is allocated (learning other replicas' work).
    async fn reload(&mut self) -> Result<(), ClusterSetError> {
        let list = self
            .store
            .list_all(CLUSTERSET_PREFIX, LIST_PAGE)
            .await
            .map_err(store_err("list ClusterSetIPs"))?;
        let mut names: HashMap<SvcName, (IpAddr, i64)> = HashMap::new();
        let mut by_ip: HashMap<IpAddr, (SvcName, i64)> = HashMap::new();
        // Keys to delete (under their mod revision) and by-ip keys to write back.
        let mut broken: Vec<(String, i64)> = Vec::new();
        let mut missing: Vec<(SvcName, IpAddr, i64)> = Vec::new();
        for kv in list.kvs {
            let value = serde_json::from_slice::<ClusterSetIpEntry>(&kv.value);
            match Key::parse_bytes(&kv.key) {
                Ok(Key::ClusterSetIp { namespace, name }) => match value {
                    Ok(e) if e.namespace == namespace && e.name == name => {
                        names.insert(SvcName { namespace, name }, (e.ip, kv.mod_revision));
                    }
                    _ => broken.push((SvcName { namespace, name }.key(), kv.mod_revision)),
                },
                Ok(Key::ClusterSetIpByIp(ip)) => match value {
                    Ok(e) if e.ip == ip => {
                        let owner = SvcName {
                            namespace: e.namespace,
                            name: e.name,
                        };
                        by_ip.insert(ip, (owner, kv.mod_revision));
                    }
                    _ => broken.push((ip_key(ip), kv.mod_revision)),
                },
                _ => {
                    tracing::debug!(key = %String::from_utf8_lossy(&kv.key), "ignoring unknown key")
                }
            }
        }
        let mut allocated = HashMap::with_capacity(names.len());
        let mut taken = BTreeSet::new();
        for (svc, (ip, name_rev)) in names {
            if let Some(off) = self.pool.offset(ip) {
                taken.insert(off);
            }
            match by_ip.get(&ip) {
                Some((owner, ip_rev)) if *owner == svc => {
                    let ip_rev = *ip_rev;
                    allocated.insert(
                        svc,
                        Allocation {
                            ip,
                            name_rev,
                            ip_rev,
                        },
                    );
                }
                // The address belongs to another name: this name key is the damaged one.
                Some(_) => broken.push((svc.key(), name_rev)),
                None => missing.push((svc, ip, name_rev)),
            }
        }
        for (ip, (owner, ip_rev)) in &by_ip {
            if let Some(off) = self.pool.offset(*ip) {
                taken.insert(off);
            }
            if allocated
                .get(owner)
                .is_none_or(|a: &Allocation| a.ip != *ip)
            {
                broken.push((ip_key(*ip), *ip_rev));
            }
        }
        self.repair(&mut allocated, broken, missing).await?;

        let old = std::mem::replace(&mut self.allocated, allocated);
        self.taken = taken;
        for (svc, a) in old {
            if !self.allocated.contains_key(&svc) && self.defs.contains_key(&svc) {
                self.prefer.insert(svc, a.ip);
            }
        }
        self.prefer.retain(|svc, _| self.defs.contains_key(svc));
        let now = Instant::now();
        let old_orphaned = std::mem::take(&mut self.orphaned);
        for (svc, a) in &self.allocated {
            if self.defs.contains_key(svc) {
                continue;
            }
            let since = match old_orphaned.get(svc) {
                Some((t, rev)) if *rev == a.name_rev => *t,
                _ => now,
            };
            self.orphaned.insert(svc.clone(), (since, a.name_rev));
        }
        for svc in self.defs.keys() {
            if !self.allocated.contains_key(svc) && !self.deferred.contains(svc) {
                self.pending.insert(svc.clone());
            }
        }
        self.set_gauge();
        Ok(())
    }

    /// Repairs what [`Self::reload`] found damaged: writes back a name key's missing
    /// by-ip key, deletes keys that have no valid counterpart (the name is reallocated).
    async fn repair(
        &mut self,
        allocated: &mut HashMap<SvcName, Allocation>,
        broken: Vec<(String, i64)>,
        missing: Vec<(SvcName, IpAddr, i64)>,
    ) -> Result<(), ClusterSetError> {
        for (svc, ip, name_rev) in missing {
            tracing::warn!(service = %svc, %ip, "repairing a ClusterSetIP without its by-ip key");
            let ip_key = ip_key(ip);
            let txn = Txn {
                compares: vec![
                    Compare::Absent(ip_key.clone()),
                    Compare::ModRevision(svc.key(), name_rev),
                ],
                success: vec![Op::Put {
                    key: ip_key,
                    value: keys::encode(&svc.entry(ip)),
                    lease: None,
                }],
                failure: vec![],
            };
            let r = self
                .store
                .txn(txn)
                .await
                .map_err(store_err("repair by-ip key"))?;
            self.cfg.metrics.repairs.inc();
            if r.succeeded {
                allocated.insert(
                    svc,
                    Allocation {
                        ip,
                        name_rev,
                        ip_rev: r.revision,
                    },
                );
            }
        }
        for (key, rev) in broken {
            tracing::warn!(%key, "deleting a damaged or unpaired ClusterSetIP key");
            self.store
                .compare_and_delete(&key, rev)
                .await
                .map_err(store_err("delete damaged key"))?;
            self.cfg.metrics.repairs.inc();
        }
        Ok(())
    }

    /// One GC pass: relists the ClusterSetIPs (learning other replicas' allocations and
    /// releases, repairing damage), releases names that have had no definition for the
    /// grace period (only once both sources are synced), and makes names waiting for an
    /// address pending again. Returns how many addresses were released.
    pub async fn gc(&mut self) -> Result<usize, ClusterSetError> {
        self.reload().await?;
        let mut released = 0;
        if self.is_synced() {
            let now = Instant::now();
            let expired: Vec<SvcName> = self
                .orphaned
                .iter()
                .filter(|(_, (since, _))| now.duration_since(*since) >= self.cfg.grace)
                .map(|(svc, _)| svc.clone())
                .collect();
            for svc in expired {
                if self.release(&svc).await? {
                    released += 1;
                }
            }
        }
        self.pending.append(&mut self.deferred);
        self.set_gauge();
        Ok(released)
    }

    /// Deletes both keys of `svc` if they are still exactly what was seen.
    async fn release(&mut self, svc: &SvcName) -> Result<bool, ClusterSetError> {
        let Some(a) = self.allocated.get(svc).copied() else {
            self.orphaned.remove(svc);
            return Ok(false);
        };
        let name_key = svc.key();
        let ip_key = ip_key(a.ip);
        let txn = Txn {
            compares: vec![
                Compare::ModRevision(name_key.clone(), a.name_rev),
                Compare::ModRevision(ip_key.clone(), a.ip_rev),
            ],
            success: vec![Op::Delete(name_key), Op::Delete(ip_key)],
            failure: vec![],
        };
        let r = self
            .store
            .txn(txn)
            .await
            .map_err(store_err("release ClusterSetIP"))?;
        if !r.succeeded {
            // Changed meanwhile (another replica released or re-created it): the next
            // reload sees what is there and restarts the clock if needed.
            self.cfg.metrics.conflicts.inc();
            return Ok(false);
        }
        tracing::info!(service = %svc, ip = %a.ip, "released ClusterSetIP after the grace period");
        self.allocated.remove(svc);
        self.orphaned.remove(svc);
        if let Some(off) = self.pool.offset(a.ip) {
            self.taken.remove(&off);
        }
        self.cfg.metrics.releases.inc();
        Ok(true)
    }
}

fn service_events(
    store: &Arc<dyn KvStore>,
    source: ServiceSource,
    metrics: &ReflectorMetrics,
) -> impl futures::Stream<Item = (ServiceSource, Item<ServiceCodec>)> + Send + use<> {
    let codec = ServiceCodec { source };
    Reflector::new(
        store.clone(),
        source.prefix(),
        codec,
        codec.reflector_config(),
        metrics.clone(),
    )
    .into_stream()
    .map(move |item| (source, item))
}

fn handle(alloc: &mut ClusterSetAllocator, source: ServiceSource, item: Item<ServiceCodec>) {
    match item {
        Ok(ev) => alloc.apply(source, ev),
        Err(e) => tracing::warn!(error = %e, %source, "service reflector retrying"),
    }
}

/// Runs ClusterSetIP allocation until `shutdown`: loads the allocator, reflects the
/// services of every cluster from `mesh/state/services/v1/` and `mesh/cache/services/v1/`,
/// allocates on new global services and runs a GC pass every `gc_interval`.
///
/// Store errors are retried with backoff. Returns an error only when the configuration
/// cannot work (a CIDR without usable addresses, or a store error retrying cannot fix while
/// starting, such as a permission denied).
pub async fn run(
    store: Arc<dyn KvStore>,
    cfg: ClusterSetConfig,
    shutdown: CancellationToken,
) -> Result<(), ClusterSetError> {
    let mut backoff = Backoff::new(BackoffConfig::default());
    let gc_interval = cfg.gc_interval.max(Duration::from_millis(100));
    let reflector_metrics = cfg.reflector_metrics.clone();
    let mut alloc = loop {
        match ClusterSetAllocator::new(store.clone(), cfg.clone()).await {
            Ok(a) => break a,
            Err(e) if !e.is_retryable() => return Err(e),
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, ?delay, "loading ClusterSetIPs failed; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    };
    backoff.reset();
    let mut events = pin!(futures::stream::select(
        service_events(&store, ServiceSource::State, &reflector_metrics),
        service_events(&store, ServiceSource::Cache, &reflector_metrics),
    ));
    let mut gc = tokio::time::interval_at(Instant::now() + gc_interval, gc_interval);
    gc.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retry_at: Option<Instant> = None;
    loop {
        let retry = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            item = events.next() => {
                // The reflectors never end; treat an end like a shutdown anyway.
                let Some((source, item)) = item else { return Ok(()) };
                handle(&mut alloc, source, item);
                for _ in 1..MAX_BATCH {
                    match events.next().now_or_never() {
                        Some(Some((source, item))) => handle(&mut alloc, source, item),
                        _ => break,
                    }
                }
                if alloc.has_pending() && retry_at.is_none() {
                    retry_at = Some(Instant::now());
                }
            }
            () = retry => {
                retry_at = None;
                match alloc.sync().await {
                    Ok(()) => backoff.reset(),
                    Err(e) => {
                        let delay = backoff.next_delay();
                        tracing::warn!(error = %e, ?delay, "ClusterSetIP allocation failed; retrying");
                        retry_at = Some(Instant::now() + delay);
                    }
                }
            }
            _ = gc.tick() => {
                match alloc.gc().await {
                    Ok(n) if n > 0 => tracing::debug!(released = n, "ClusterSetIP GC pass"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "ClusterSetIP GC pass failed"),
                }
                if alloc.has_pending() && retry_at.is_none() {
                    retry_at = Some(Instant::now());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use meshd::kv::MemoryStore;
    use meshd::model::{ClusterId, ClusterService, MaxConnectedClusters};

    use super::*;

    fn cfg(cidr: &str) -> ClusterSetConfig {
        let mut c = ClusterSetConfig::new(cidr.parse().unwrap());
        c.grace = Duration::from_secs(60);
        c.gc_interval = Duration::from_secs(10);
        c
    }

    fn key(cluster: &str, name: &str) -> StateKey {
        StateKey::Service {
            cluster: ClusterName::new(cluster).unwrap(),
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn up(cluster: &str, name: &str) -> Event<StateKey, bool> {
        Event::Apply(key(cluster, name), true)
    }

    fn down(cluster: &str, name: &str) -> Event<StateKey, bool> {
        Event::Delete(key(cluster, name))
    }

    /// A full list of one source: `Init`, `InitApply` per entry, `InitDone`.
    fn list(a: &mut ClusterSetAllocator, source: ServiceSource, entries: &[(&str, &str, bool)]) {
        a.apply(source, Event::Init);
        for (cluster, name, global) in entries {
            a.apply(source, Event::InitApply(key(cluster, name), *global));
        }
        a.apply(source, Event::InitDone);
    }

    fn service(cluster: &str, id: u32, name: &str, global: bool) -> ClusterService {
        ClusterService {
            global,
            ..ClusterService::new(
                ClusterName::new(cluster).unwrap(),
                ClusterId::new(id, MaxConnectedClusters::C255).unwrap(),
                "default",
                name,
            )
        }
    }

    fn memory() -> (MemoryStore, Arc<dyn KvStore>) {
        let m = MemoryStore::new();
        (m.clone(), Arc::new(m))
    }

    /// Reads every ClusterSetIP key, asserts names and addresses form a bijection, and
    /// returns `ns/name` → (address, name-key mod revision).
    async fn bijection(store: &dyn KvStore) -> BTreeMap<String, (IpAddr, i64)> {
        try_bijection(store)
            .await
            .expect("listing the ClusterSetIPs")
    }

    /// [`bijection`], or `None` when the listing fails (injected faults).
    async fn try_bijection(store: &dyn KvStore) -> Option<BTreeMap<String, (IpAddr, i64)>> {
        let all = store.list_all(CLUSTERSET_PREFIX, 1000).await.ok()?;
        let mut names = BTreeMap::new();
        let mut ips = BTreeMap::new();
        for kv in all.kvs {
            let e: ClusterSetIpEntry = serde_json::from_slice(&kv.value).unwrap();
            let owner = format!("{}/{}", e.namespace, e.name);
            match Key::parse_bytes(&kv.key).unwrap() {
                Key::ClusterSetIp { namespace, name } => {
                    assert_eq!(owner, format!("{namespace}/{name}"));
                    let dup = names.insert(owner, (e.ip, kv.mod_revision));
                    assert!(dup.is_none(), "one name key per name");
                }
                Key::ClusterSetIpByIp(ip) => {
                    assert_eq!(e.ip, ip);
                    assert!(ips.insert(ip, owner).is_none(), "{ip} owned twice");
                }
                other => panic!("unexpected key {other}"),
            }
        }
        assert_eq!(
            names.len(),
            ips.len(),
            "names {names:?} vs addresses {ips:?}"
        );
        for (n, (ip, _)) in &names {
            assert_eq!(ips.get(ip), Some(n), "{n} → {ip} has no matching by-ip key");
        }
        Some(names)
    }

    fn ip_of(map: &BTreeMap<String, (IpAddr, i64)>, name: &str) -> IpAddr {
        map.get(&format!("default/{name}"))
            .unwrap_or_else(|| panic!("default/{name} has no ClusterSetIP in {map:?}"))
            .0
    }

    #[test]
    fn pool_never_hands_out_network_or_broadcast() {
        let p = Pool::new("198.19.0.0/30".parse().unwrap()).unwrap();
        assert_eq!(p.size(), 2);
        assert_eq!(p.ip(p.first), "198.19.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(p.ip(p.last), "198.19.0.2".parse::<IpAddr>().unwrap());
        for outside in ["198.19.0.0", "198.19.0.3", "198.19.0.4", "fd00::1"] {
            assert_eq!(p.offset(outside.parse().unwrap()), None, "{outside}");
        }
        assert_eq!(p.next(p.last), p.first);
        // Host bits in the configured CIDR are ignored.
        let p = Pool::new("198.19.0.6/30".parse().unwrap()).unwrap();
        assert_eq!(p.ip(p.first), "198.19.0.5".parse::<IpAddr>().unwrap());
        assert_eq!(p.offset("198.19.0.4".parse().unwrap()), None);
        assert_eq!(p.offset("198.19.0.7".parse().unwrap()), None);
        for none in ["198.19.0.0/31", "198.19.0.1/32", "fd00::1/128"] {
            let e = Pool::new(none.parse().unwrap()).unwrap_err();
            assert!(!e.is_retryable());
            assert!(e.to_string().contains("no usable address"), "{e}");
        }
        // IPv6: only the network address is excluded.
        let p = Pool::new("fd00::/126".parse().unwrap()).unwrap();
        assert_eq!(p.size(), 3);
        assert_eq!(p.ip(p.last), "fd00::3".parse::<IpAddr>().unwrap());
        let p = Pool::new("::/0".parse().unwrap()).unwrap();
        assert_eq!(p.size(), u128::MAX);
        assert_eq!(p.offset("::".parse().unwrap()), None);
        assert_eq!(p.ip(p.last), IpAddr::V6(Ipv6Addr::from_bits(u128::MAX)));
    }

    #[test]
    fn prefixes_agree_with_the_key_schema() {
        let k = key("east", "web");
        assert!(
            Key::State(k.clone())
                .to_string()
                .starts_with(STATE_SERVICES_PREFIX)
        );
        assert!(Key::Cache(k).to_string().starts_with(CACHE_SERVICES_PREFIX));
        let svc = SvcName {
            namespace: "default".into(),
            name: "web".into(),
        };
        let name_key = Key::ClusterSetIp {
            namespace: "default".into(),
            name: "web".into(),
        };
        assert_eq!(svc.key(), name_key.to_string());
        assert!(svc.key().starts_with(CLUSTERSET_NAMES_PREFIX));
        let ip: IpAddr = "198.19.0.1".parse().unwrap();
        assert_eq!(ip_key(ip), Key::ClusterSetIpByIp(ip).to_string());
        assert!(ip_key(ip).starts_with(CLUSTERSET_BY_IP_PREFIX));
        assert!(CLUSTERSET_NAMES_PREFIX.starts_with(CLUSTERSET_PREFIX));
        assert!(CLUSTERSET_BY_IP_PREFIX.starts_with(CLUSTERSET_PREFIX));
    }

    #[test]
    fn codec_reads_services_of_any_cluster() {
        let state = ServiceCodec {
            source: ServiceSource::State,
        };
        let cache = ServiceCodec {
            source: ServiceSource::Cache,
        };
        let east = Key::State(key("east", "web")).to_string();
        let west = Key::Cache(key("west", "web")).to_string();
        assert_eq!(
            state.decode_key(east.as_bytes()).unwrap(),
            key("east", "web")
        );
        assert_eq!(
            cache.decode_key(west.as_bytes()).unwrap(),
            key("west", "web")
        );
        assert!(state.decode_key(west.as_bytes()).is_err());
        assert!(cache.decode_key(east.as_bytes()).is_err());
        assert!(
            state
                .decode_key(b"mesh/state/nodes/v1/east/node-1")
                .is_err()
        );
        let k = key("west", "web");
        let v = keys::encode(&service("west", 2, "web", true));
        assert!(cache.decode_value(&k, &v).unwrap());
        let v = keys::encode(&service("west", 2, "web", false));
        assert!(!cache.decode_value(&k, &v).unwrap());
        // A value naming another cluster than its key is rejected.
        let v = keys::encode(&service("east", 1, "web", true));
        assert_eq!(
            cache.decode_value(&k, &v).unwrap_err().reason(),
            keys::DropReason::ForeignCluster
        );
        assert!(cache.decode_value(&k, b"{nope").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn allocates_for_local_and_remote_only_global_services() {
        let (_, store) = memory();
        let mut a = ClusterSetAllocator::new(store.clone(), cfg("198.19.0.0/24"))
            .await
            .unwrap();
        list(&mut a, ServiceSource::State, &[("east", "web", true)]);
        // `db` exists only in the cache of peer west.
        list(&mut a, ServiceSource::Cache, &[("west", "db", true)]);
        assert!(a.has_pending());
        a.sync().await.unwrap();
        let m = bijection(&*store).await;
        assert_eq!(m.len(), 2);
        let cidr: IpNet = "198.19.0.0/24".parse().unwrap();
        for n in ["web", "db"] {
            let ip = ip_of(&m, n);
            assert!(cidr.contains(&ip) && ip != cidr.network() && ip != cidr.broadcast());
            assert_eq!(a.lookup("default", n), Some(ip));
        }
        assert_eq!(a.allocated(), 2);
        assert_eq!(a.metrics().allocated(), 2);
        assert!(!a.has_pending());
    }

    #[tokio::test(start_paused = true)]
    async fn non_global_services_get_none() {
        let (_, store) = memory();
        let mut a = ClusterSetAllocator::new(store.clone(), cfg("198.19.0.0/24"))
            .await
            .unwrap();
        list(&mut a, ServiceSource::State, &[("east", "api", false)]);
        list(&mut a, ServiceSource::Cache, &[("west", "api", false)]);
        a.sync().await.unwrap();
        a.gc().await.unwrap();
        assert!(bijection(&*store).await.is_empty());
        assert_eq!(a.defined(), 0);
        // Becoming global allocates; becoming local again starts the grace clock.
        a.apply(ServiceSource::State, up("east", "api"));
        a.sync().await.unwrap();
        let ip = a.lookup("default", "api").unwrap();
        a.apply(
            ServiceSource::State,
            Event::Apply(key("east", "api"), false),
        );
        assert_eq!(a.gc().await.unwrap(), 0);
        assert_eq!(a.lookup("default", "api"), Some(ip));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(a.gc().await.unwrap(), 1);
        assert!(bijection(&*store).await.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn relists_and_flaps_within_the_grace_keep_the_ip() {
        let (mem, store) = memory();
        let mut a = ClusterSetAllocator::new(store.clone(), cfg("198.19.0.0/24"))
            .await
            .unwrap();
        list(&mut a, ServiceSource::State, &[("east", "web", true)]);
        list(&mut a, ServiceSource::Cache, &[("west", "web", true)]);
        a.sync().await.unwrap();
        let before = bijection(&*store).await;
        let rev = mem.revision();

        // A relist showing the same services writes nothing.
        list(&mut a, ServiceSource::State, &[("east", "web", true)]);
        list(&mut a, ServiceSource::Cache, &[("west", "web", true)]);
        a.sync().await.unwrap();
        a.gc().await.unwrap();
        assert_eq!(mem.revision(), rev);

        // A relist of the cache where west's copy did not come back (synthetic delete):
        // east still defines it.
        a.apply(ServiceSource::Cache, Event::Init);
        a.apply(ServiceSource::Cache, down("west", "web"));
        a.apply(ServiceSource::Cache, Event::InitDone);
        tokio::time::advance(Duration::from_secs(120)).await;
        assert_eq!(a.gc().await.unwrap(), 0);
        assert_eq!(mem.revision(), rev);

        // The last definition flaps away and back within the grace period.
        a.apply(ServiceSource::State, down("east", "web"));
        tokio::time::advance(Duration::from_secs(40)).await;
        assert_eq!(a.gc().await.unwrap(), 0);
        a.apply(ServiceSource::Cache, up("west", "web"));
        a.sync().await.unwrap();
        tokio::time::advance(Duration::from_secs(40)).await;
        assert_eq!(a.gc().await.unwrap(), 0);
        assert_eq!(mem.revision(), rev);
        assert_eq!(bijection(&*store).await, before);

        // Another flap: the clock restarts from zero each time.
        a.apply(ServiceSource::Cache, down("west", "web"));
        tokio::time::advance(Duration::from_secs(50)).await;
        a.gc().await.unwrap();
        a.apply(ServiceSource::Cache, up("west", "web"));
        tokio::time::advance(Duration::from_secs(50)).await;
        a.apply(ServiceSource::Cache, down("west", "web"));
        tokio::time::advance(Duration::from_secs(50)).await;
        assert_eq!(a.gc().await.unwrap(), 0, "only 50 s without a definition");
        assert_eq!(bijection(&*store).await, before);
    }

    #[tokio::test(start_paused = true)]
    async fn released_after_the_grace_and_only_once_synced() {
        let (_, store) = memory();
        let mut a = ClusterSetAllocator::new(store.clone(), cfg("198.19.0.0/24"))
            .await
            .unwrap();
        a.apply(ServiceSource::State, up("east", "web"));
        a.sync().await.unwrap();
        a.apply(ServiceSource::State, down("east", "web"));
        tokio::time::advance(Duration::from_secs(120)).await;
        // Neither source has completed a list: nothing is released.
        assert!(!a.is_synced());
        assert_eq!(a.gc().await.unwrap(), 0);
        list(&mut a, ServiceSource::State, &[]);
        list(&mut a, ServiceSource::Cache, &[]);
        assert!(a.is_synced());
        assert_eq!(a.gc().await.unwrap(), 1);
        assert!(bijection(&*store).await.is_empty());
        assert_eq!(a.lookup("default", "web"), None);
        assert_eq!(a.metrics().releases.get(), 1);
        assert_eq!(a.metrics().allocated(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn existing_allocations_are_kept_and_damage_repaired() {
        let (mem, store) = memory();
        let entry = |name: &str, ip: &str| {
            keys::encode(&ClusterSetIpEntry {
                namespace: "default".into(),
                name: name.into(),
                ip: ip.parse().unwrap(),
            })
        };
        let put = |k: String, v: Vec<u8>| {
            let store = store.clone();
            async move { store.put(&k, &v, None).await.unwrap() }
        };
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let name_key = |n: &str| format!("{CLUSTERSET_NAMES_PREFIX}default/{n}");
        // A valid pair, a name without its by-ip key, a dangling by-ip key, a broken value.
        put(name_key("web"), entry("web", "198.19.0.77")).await;
        put(ip_key(ip("198.19.0.77")), entry("web", "198.19.0.77")).await;
        put(name_key("lonely"), entry("lonely", "198.19.0.80")).await;
        put(ip_key(ip("198.19.0.90")), entry("ghost", "198.19.0.90")).await;
        put(name_key("bad"), b"{not json".to_vec()).await;
        let mut a = ClusterSetAllocator::new(store.clone(), cfg("198.19.0.0/24"))
            .await
            .unwrap();
        assert_eq!(a.lookup("default", "web"), Some(ip("198.19.0.77")));
        assert_eq!(a.lookup("default", "lonely"), Some(ip("198.19.0.80")));
        assert_eq!(a.metrics().repairs.get(), 3);
        let m = bijection(&*store).await;
        assert_eq!(m.len(), 2, "{m:?}");
        // Defining existing names writes nothing; `bad` gets a fresh address.
        let rev = mem.revision();
        list(
            &mut a,
            ServiceSource::State,
            &[("east", "web", true), ("east", "lonely", true)],
        );
        a.sync().await.unwrap();
        assert_eq!(mem.revision(), rev);
        a.apply(ServiceSource::State, up("east", "bad"));
        a.sync().await.unwrap();
        let m = bijection(&*store).await;
        assert_eq!(m.len(), 3);
        assert_eq!(ip_of(&m, "web"), ip("198.19.0.77"));
    }

    #[tokio::test(start_paused = true)]
    async fn two_allocators_interleaved_never_disagree() {
        let (_, store) = memory();
        let mut c = cfg("198.19.0.0/26");
        c.create_batch = 4;
        let mut a = ClusterSetAllocator::new(store.clone(), c.clone())
            .await
            .unwrap();
        let mut b = ClusterSetAllocator::new(store.clone(), c).await.unwrap();
        let names: Vec<String> = (0..40).map(|i| format!("svc-{i}")).collect();
        for s in ServiceSource::ALL {
            a.apply(s, Event::Init);
            b.apply(s, Event::Init);
        }
        for i in 0..names.len() {
            // Same events, opposite orders; half local, half remote-only.
            let ev = |n: usize| {
                let cluster = if n.is_multiple_of(2) { "east" } else { "west" };
                let source = if n.is_multiple_of(2) {
                    ServiceSource::State
                } else {
                    ServiceSource::Cache
                };
                (source, Event::InitApply(key(cluster, &names[n]), true))
            };
            let (s, e) = ev(i);
            a.apply(s, e);
            let (s, e) = ev(names.len() - 1 - i);
            b.apply(s, e);
            if i.is_multiple_of(3) {
                a.sync().await.unwrap();
                b.sync().await.unwrap();
            }
        }
        for s in ServiceSource::ALL {
            a.apply(s, Event::InitDone);
            b.apply(s, Event::InitDone);
        }
        b.sync().await.unwrap();
        a.sync().await.unwrap();
        let m = bijection(&*store).await;
        assert_eq!(m.len(), 40);
        for n in &names {
            assert_eq!(a.lookup("default", n), Some(ip_of(&m, n)), "{n}");
            assert_eq!(b.lookup("default", n), Some(ip_of(&m, n)), "{n}");
        }
        assert!(
            a.metrics().conflicts.get() + b.metrics().conflicts.get() > 0,
            "the orders were meant to race"
        );
        // GC passes on both change nothing.
        a.gc().await.unwrap();
        b.gc().await.unwrap();
        assert_eq!(bijection(&*store).await, m);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_allocators_never_disagree() {
        for round in 0..3 {
            let (_, store) = memory();
            let mut c = cfg("198.19.0.0/24");
            c.create_batch = 8 + round * 8;
            let names: Vec<String> = (0..150).map(|i| format!("svc-{i}")).collect();
            let mut tasks = Vec::new();
            for replica in 0..2 {
                let store = store.clone();
                let c = c.clone();
                let mut order = names.clone();
                if replica == 1 {
                    order.reverse();
                }
                tasks.push(tokio::spawn(async move {
                    let mut a = ClusterSetAllocator::new(store, c).await.unwrap();
                    for chunk in order.chunks(25) {
                        for n in chunk {
                            a.apply(ServiceSource::Cache, up("west", n));
                        }
                        a.sync().await.unwrap();
                    }
                    a
                }));
            }
            let mut replicas = Vec::new();
            for t in tasks {
                replicas.push(t.await.unwrap());
            }
            let m = bijection(&*store).await;
            assert_eq!(m.len(), 150, "round {round}");
            for a in &mut replicas {
                a.gc().await.unwrap();
                for n in &names {
                    assert_eq!(a.lookup("default", n), Some(ip_of(&m, n)), "{n}");
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn cidr_exhaustion_is_reported_and_recovers() {
        let (_, store) = memory();
        let mut a = ClusterSetAllocator::new(store.clone(), cfg("198.19.0.0/30"))
            .await
            .unwrap();
        list(
            &mut a,
            ServiceSource::State,
            &[
                ("east", "a", true),
                ("east", "b", true),
                ("east", "c", true),
            ],
        );
        list(&mut a, ServiceSource::Cache, &[]);
        a.sync().await.unwrap();
        assert_eq!(a.allocated(), 2);
        assert_eq!(a.exhausted_events(), 1);
        assert_eq!(a.lookup("default", "c"), None);
        assert!(
            !a.has_pending(),
            "waits for the next GC pass, no busy retry"
        );
        let m = bijection(&*store).await;
        let used: BTreeSet<IpAddr> = m.values().map(|(ip, _)| *ip).collect();
        let expected: BTreeSet<IpAddr> = ["198.19.0.1", "198.19.0.2"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(used, expected);
        // Still exhausted at the next pass: counted again.
        a.gc().await.unwrap();
        a.sync().await.unwrap();
        assert_eq!(a.exhausted_events(), 2);
        // `a` goes away; after the grace its address is free and `c` gets it.
        let freed = a.lookup("default", "a").unwrap();
        a.apply(ServiceSource::State, down("east", "a"));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(a.gc().await.unwrap(), 1);
        a.sync().await.unwrap();
        assert_eq!(a.lookup("default", "c"), Some(freed));
        assert_eq!(bijection(&*store).await.len(), 2);
    }

    async fn eventually<F: AsyncFn() -> bool>(what: &str, f: F) {
        for _ in 0..600 {
            if f().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test(start_paused = true)]
    async fn run_allocates_and_survives_relists_flaps_and_errors() {
        let (mem, store) = memory();
        let put_svc = async |cached: bool, cluster: &str, id: u32, name: &str, global: bool| {
            let sk = key(cluster, name);
            let k = if cached {
                Key::Cache(sk)
            } else {
                Key::State(sk)
            };
            let v = keys::encode(&service(cluster, id, name, global));
            store.put(&k.to_string(), &v, None).await.unwrap();
        };
        put_svc(false, "east", 1, "web", true).await;
        put_svc(false, "east", 1, "internal", false).await;
        put_svc(true, "west", 2, "db", true).await;
        let c = cfg("198.19.0.0/24");
        let metrics = c.metrics.clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(store.clone(), c, shutdown.clone()));
        eventually("two ClusterSetIPs", async || {
            bijection(&*store).await.len() == 2
        })
        .await;
        let before = bijection(&*store).await;
        assert!(!before.contains_key("default/internal"));

        // Relist after a broken watch, then after a compaction: nothing changes.
        mem.break_watches();
        tokio::time::sleep(Duration::from_secs(15)).await;
        mem.compact(mem.revision());
        mem.break_watches();
        tokio::time::sleep(Duration::from_secs(15)).await;
        assert_eq!(bijection(&*store).await, before);

        // Store errors are retried.
        put_svc(true, "west", 2, "cache", true).await;
        mem.fail_next(3);
        eventually("the third ClusterSetIP", async || {
            try_bijection(&*store).await.is_some_and(|m| m.len() == 3)
        })
        .await;

        // `web` flaps away and back within the grace: same address, no write.
        let web_key = Key::State(key("east", "web")).to_string();
        store.delete(&web_key).await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        put_svc(false, "east", 1, "web", true).await;
        tokio::time::sleep(Duration::from_secs(90)).await;
        let now = bijection(&*store).await;
        assert_eq!(now.get("default/web"), before.get("default/web"));

        // `db` disappears for good: released after the grace and the next GC pass.
        let db_key = Key::Cache(key("west", "db")).to_string();
        store.delete(&db_key).await.unwrap();
        tokio::time::sleep(Duration::from_secs(50)).await;
        assert!(bijection(&*store).await.contains_key("default/db"));
        tokio::time::sleep(Duration::from_secs(30)).await;
        let now = bijection(&*store).await;
        assert!(!now.contains_key("default/db"), "{now:?}");
        assert_eq!(metrics.allocated(), 2);
        assert_eq!(metrics.exhausted(), 0);

        shutdown.cancel();
        task.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn run_rejects_a_cidr_without_addresses() {
        let (_, store) = memory();
        let e = run(store, cfg("198.19.0.1/32"), CancellationToken::new())
            .await
            .unwrap_err();
        assert!(matches!(e, ClusterSetError::Cidr { .. }), "{e}");
    }
}
