//! The aya datapath: loads the mesh-ebpf objects with pinned maps, attaches programs, writes maps.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::Key as LpmKey;
use aya::maps::{HashMap, LpmTrie, MapData, MapError, PerCpuArray, RingBuf};
use aya::programs::links::CgroupAttachMode;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{self, SchedClassifierLinkId, TcAttachType};
use aya::programs::{CgroupSockAddr, ProgramError, SchedClassifier};
use aya::util::KernelVersion;
use aya::{Ebpf, EbpfLoader};
use mesh_ebpf::{
    Counter, DropEvent, EndpointValue, IpcacheKey, IpcacheValue, Lb4Backend, Lb4Key, Lb4Service,
    PolicyKey, PolicyValue, map, prog,
};
use tracing::{info, warn};

use super::{Change, Datapath, DatapathError, DatapathMode, MapOp, Planner, VerdictCounters};

/// Where the aya datapath pins its maps and attaches its socket programs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AyaConfig {
    /// bpffs directory for this agent's pinned maps (created if missing; must be on a
    /// bpffs mount). Default `/sys/fs/bpf/meshd`.
    pub pin_dir: PathBuf,
    /// cgroup v2 directory the socket-LB programs attach to; `None` = the cgroup2
    /// mount point from `/proc/mounts`. Default `None`.
    pub cgroup: Option<PathBuf>,
    /// Attach the socket-LB programs at all. Default `true`.
    pub socket_lb: bool,
}

impl Default for AyaConfig {
    fn default() -> Self {
        Self {
            pin_dir: PathBuf::from("/sys/fs/bpf/meshd"),
            cgroup: None,
            socket_lb: true,
        }
    }
}

/// The cgroup2 mount point, from `/proc/mounts` (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_mount() -> Result<PathBuf, DatapathError> {
    meshd::mounts::mount_point("cgroup2").ok_or_else(|| DatapathError::Io {
        what: "finding the cgroup2 mount".into(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no cgroup2 in /proc/mounts"),
    })
}

/// The real datapath.
///
/// Maps are pinned by name in `pin_dir`; program links (kernels with cgroup and TCX
/// links, >= 6.6) are pinned in `pin_dir/links/<what>@<generation>` (bpffs forbids dots in names). Dropping the
/// datapath (or the agent dying) therefore leaves programs, links and maps in place and
/// traffic keeps flowing; the next `open` with the same `pin_dir` reuses the maps
/// without flushing, attaches its own programs and only then unpins the previous
/// generation's links. Both generations use the same maps, so the overlap is harmless
/// (a translated address is no VIP any more; the verdicts agree). `uninstall` removes
/// every link.
pub struct AyaDatapath {
    config: AyaConfig,
    sock: Ebpf,
    policy: Ebpf,
    svc: HashMap<MapData, Lb4Key, Lb4Service>,
    backends: HashMap<MapData, u32, Lb4Backend>,
    ipcache: LpmTrie<MapData, u32, IpcacheValue>,
    endpoints: HashMap<MapData, u32, EndpointValue>,
    policy_map: HashMap<MapData, PolicyKey, PolicyValue>,
    verdicts: PerCpuArray<MapData, Counter>,
    drops: RingBuf<MapData>,
    planner: Planner,
    tc_links: BTreeMap<String, [TcHold; 2]>,
    cgroup: Option<PathBuf>,
    generation: String,
    pin_links: bool,
}

/// Who keeps a tc link alive: a pin in bpffs, or the loaded object (no link pinning).
#[derive(Debug)]
enum TcHold {
    Pinned(PathBuf),
    Owned(&'static str, SchedClassifierLinkId),
}

impl fmt::Debug for AyaDatapath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AyaDatapath")
            .field("config", &self.config)
            .field("cgroup", &self.cgroup)
            .field("interfaces", &self.tc_links.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn map_err(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |e| DatapathError::Map {
        map,
        op,
        source: Box::new(e),
    }
}

fn prog_err(program: &'static str, op: String) -> impl FnOnce(ProgramError) -> DatapathError {
    move |e| DatapathError::Program {
        program,
        op,
        source: Box::new(e),
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let m = ebpf
        .take_map(name)
        .ok_or(DatapathError::Missing { kind: "map", name })?;
    T::try_from(m).map_err(map_err(name, "opening"))
}

/// Deleting what is already gone is success: deletes are idempotent.
fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc_enoent()) => {
            Ok(())
        }
        Err(MapError::KeyNotFound) => Ok(()),
        r => r,
    }
}

const fn libc_enoent() -> i32 {
    2
}

impl AyaDatapath {
    /// Loads both objects (maps pinned by name under `config.pin_dir`, existing pins
    /// reused as they are), loads every program, attaches the socket-LB programs to the
    /// cgroup, and rebuilds the service bookkeeping from the maps. Entries no lookup can
    /// reach (slots beyond a service's count, unreferenced backends) are removed;
    /// nothing else is touched.
    pub fn open(config: AyaConfig) -> Result<Self, DatapathError> {
        std::fs::create_dir_all(&config.pin_dir).map_err(|source| DatapathError::Io {
            what: format!("creating pin directory {}", config.pin_dir.display()),
            source,
        })?;
        let load = |object: &'static str, bytes: &[u8]| {
            EbpfLoader::new()
                .default_map_pin_directory(&config.pin_dir)
                .load(bytes)
                .map_err(|e| DatapathError::Load {
                    object,
                    source: Box::new(e),
                })
        };
        let mut sock = load("sock_lb", mesh_ebpf::SOCK_LB_OBJ)?;
        let mut policy = load("policy", mesh_ebpf::POLICY_OBJ)?;

        for name in prog::SOCK_LB {
            sock_prog(&mut sock, name)?
                .load()
                .map_err(prog_err(name, "loading".into()))?;
        }
        for name in [prog::FROM_ENDPOINT, prog::TO_ENDPOINT] {
            tc_prog(&mut policy, name)?
                .load()
                .map_err(prog_err(name, "loading".into()))?;
        }

        let svc: HashMap<MapData, Lb4Key, Lb4Service> = take(&mut sock, map::LB4_SERVICES)?;
        let backends: HashMap<MapData, u32, Lb4Backend> = take(&mut sock, map::LB4_BACKENDS)?;
        let svc_entries = svc
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(map::LB4_SERVICES, "reading"))?;
        let be_entries = backends
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(map::LB4_BACKENDS, "reading"))?;
        let reused = svc_entries.len() + be_entries.len();
        let (planner, garbage) = Planner::from_maps(svc_entries, be_entries);

        let mut dp = Self {
            sock,
            ipcache: take(&mut policy, map::IPCACHE4)?,
            endpoints: take(&mut policy, map::ENDPOINTS)?,
            policy_map: take(&mut policy, map::POLICY)?,
            verdicts: take(&mut policy, map::VERDICTS)?,
            drops: take(&mut policy, map::DROPS)?,
            policy,
            svc,
            backends,
            planner,
            tc_links: BTreeMap::new(),
            cgroup: None,
            generation: format!(
                "{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
            ),
            pin_links: KernelVersion::current()
                .is_ok_and(|v| v.code() >= KernelVersion::new(6, 6, 0).code()),
            config,
        };
        if dp.pin_links {
            std::fs::create_dir_all(dp.links_dir()).map_err(|source| DatapathError::Io {
                what: format!("creating {}", dp.links_dir().display()),
                source,
            })?;
        }
        if !garbage.is_empty() {
            warn!(
                entries = garbage.len(),
                "removing unreachable service-map entries left in the pinned maps"
            );
        }
        for op in garbage {
            dp.write(op)?;
        }
        if dp.config.socket_lb {
            let dir = match &dp.config.cgroup {
                Some(d) => d.clone(),
                None => cgroup2_mount()?,
            };
            dp.attach_cgroup(&dir)?;
            dp.cgroup = Some(dir);
        }
        // The new programs are in place: retire the previous generation's socket links.
        for name in prog::SOCK_LB {
            dp.retire(&format!("cg-{name}"), false)?;
        }
        info!(pin_dir = %dp.config.pin_dir.display(), reused_lb_entries = reused, cgroup = ?dp.cgroup, "eBPF datapath loaded");
        Ok(dp)
    }

    /// The drop-event ring buffer's fd: readable when events are queued (wrap it in
    /// `tokio::io::unix::AsyncFd` and call `take_drop_events` on readiness).
    pub fn drop_events_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd as _;
        self.drops.as_fd()
    }

    /// The cgroup the socket-LB programs are attached to.
    pub fn cgroup(&self) -> Option<&Path> {
        self.cgroup.as_deref()
    }

    /// The bookkeeping's view of the service maps.
    pub fn services(&self) -> std::collections::BTreeMap<super::ServiceKey, Vec<super::Backend>> {
        self.planner.services()
    }

    fn attach_cgroup(&mut self, dir: &Path) -> Result<(), DatapathError> {
        for name in prog::SOCK_LB {
            let cg = std::fs::File::open(dir).map_err(|source| DatapathError::Io {
                what: format!("opening cgroup {}", dir.display()),
                source,
            })?;
            // aya attaches with bpf_link_create where the kernel has it (>= 5.7); such
            // links ignore the mode and always stack (a restarting agent can attach
            // before the old one detaches). BPF_F_ALLOW_MULTI itself makes
            // bpf_link_create fail with EINVAL, hence `Single`.
            let pin_links = self.pin_links;
            let p = sock_prog(&mut self.sock, name)?;
            let id = p.attach(cg, CgroupAttachMode::Single).map_err(prog_err(
                name,
                format!("attaching to cgroup {}", dir.display()),
            ))?;
            if pin_links {
                let link = p
                    .take_link(id)
                    .map_err(prog_err(name, "taking the cgroup link".into()))?;
                let fd = FdLink::try_from(link).map_err(|e| DatapathError::Link {
                    what: format!("{name} on {} is not a bpf_link", dir.display()),
                    source: Box::new(e),
                })?;
                self.pin(fd, &format!("cg-{name}"))?;
            }
        }
        Ok(())
    }

    fn links_dir(&self) -> PathBuf {
        self.config.pin_dir.join("links")
    }

    fn pin(&self, link: FdLink, key: &str) -> Result<PathBuf, DatapathError> {
        let path = self.links_dir().join(format!("{key}@{}", self.generation));
        link.pin(&path).map_err(|e| DatapathError::Link {
            what: format!("pinning {}", path.display()),
            source: Box::new(e),
        })?;
        Ok(path)
    }

    /// Unpins (and so detaches) the links pinned under `key`: those of other generations,
    /// or all of them with `all`.
    fn retire(&self, key: &str, all: bool) -> Result<(), DatapathError> {
        let dir = self.links_dir();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        let prefix = format!("{key}@");
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(generation) = name.strip_prefix(&prefix) else {
                continue;
            };
            if !all && generation == self.generation {
                continue;
            }
            let path = e.path();
            let link = PinnedLink::from_pin(&path).map_err(|e| DatapathError::Link {
                what: format!("opening pinned link {}", path.display()),
                source: Box::new(e),
            })?;
            // Dropping the last reference detaches the link.
            drop(link.unpin().map_err(|source| DatapathError::Io {
                what: format!("unpinning {}", path.display()),
                source,
            })?);
        }
        Ok(())
    }

    /// Detaches everything this pin dir keeps attached (socket programs, every
    /// interface's tc links, also those of earlier generations). The maps stay pinned.
    pub fn uninstall(mut self) -> Result<(), DatapathError> {
        let interfaces: Vec<String> = self.tc_links.keys().cloned().collect();
        for i in interfaces {
            self.detach_interface(&i)?;
        }
        let dir = self.links_dir();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            let keys: std::collections::BTreeSet<String> = entries
                .flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.rsplit_once('@').map(|(k, _)| k.to_owned())
                })
                .collect();
            for k in keys {
                self.retire(&k, true)?;
            }
        }
        Ok(())
    }

    fn attach_tc(
        &mut self,
        ifname: &str,
        name: &'static str,
        hook: TcAttachType,
        dir: &str,
    ) -> Result<TcHold, DatapathError> {
        let pin_links = self.pin_links;
        let p = tc_prog(&mut self.policy, name)?;
        let id = p
            .attach(ifname, hook)
            .map_err(prog_err(name, format!("attaching to {ifname} {dir}")))?;
        if !pin_links {
            return Ok(TcHold::Owned(name, id));
        }
        let link = p
            .take_link(id)
            .map_err(prog_err(name, format!("taking the {ifname} {dir} link")))?;
        let fd = FdLink::try_from(link).map_err(|e| DatapathError::Link {
            what: format!("{name} on {ifname} {dir} is not a TCX link"),
            source: Box::new(e),
        })?;
        Ok(TcHold::Pinned(self.pin(fd, &tc_key(ifname, name))?))
    }

    fn release_tc(&mut self, ifname: &str, hold: TcHold) {
        let r = match hold {
            TcHold::Owned(name, id) => tc_prog(&mut self.policy, name)
                .and_then(|p| p.detach(id).map_err(prog_err(name, "detaching".into()))),
            TcHold::Pinned(path) => PinnedLink::from_pin(&path)
                .map_err(|e| DatapathError::Link {
                    what: format!("opening pinned link {}", path.display()),
                    source: Box::new(e),
                })
                .and_then(|l| {
                    l.unpin().map(drop).map_err(|source| DatapathError::Io {
                        what: format!("unpinning {}", path.display()),
                        source,
                    })
                }),
        };
        // An interface that is already gone took its links with it.
        if let Err(e) = r {
            warn!(interface = ifname, error = %e, "detaching tc program (interface gone?)");
        }
    }

    fn write(&mut self, op: MapOp) -> Result<(), DatapathError> {
        match op {
            MapOp::SvcPut(k, v) => self
                .svc
                .insert(k, v, 0)
                .map_err(map_err(map::LB4_SERVICES, "insert")),
            MapOp::SvcDel(k) => {
                ignore_missing(self.svc.remove(&k)).map_err(map_err(map::LB4_SERVICES, "delete"))
            }
            MapOp::BackendPut(k, v) => self
                .backends
                .insert(k, v, 0)
                .map_err(map_err(map::LB4_BACKENDS, "insert")),
            MapOp::BackendDel(k) => ignore_missing(self.backends.remove(&k))
                .map_err(map_err(map::LB4_BACKENDS, "delete")),
            MapOp::IpcachePut(k, v) => self
                .ipcache
                .insert(&LpmKey::new(k.prefixlen, k.address), v, 0)
                .map_err(map_err(map::IPCACHE4, "insert")),
            MapOp::IpcacheDel(k) => {
                ignore_missing(self.ipcache.remove(&LpmKey::new(k.prefixlen, k.address)))
                    .map_err(map_err(map::IPCACHE4, "delete"))
            }
            MapOp::EndpointPut(k, v) => self
                .endpoints
                .insert(k, v, 0)
                .map_err(map_err(map::ENDPOINTS, "insert")),
            MapOp::EndpointDel(k) => {
                ignore_missing(self.endpoints.remove(&k)).map_err(map_err(map::ENDPOINTS, "delete"))
            }
            MapOp::PolicyPut(k, v) => self
                .policy_map
                .insert(k, v, 0)
                .map_err(map_err(map::POLICY, "insert")),
            MapOp::PolicyDel(k) => {
                ignore_missing(self.policy_map.remove(&k)).map_err(map_err(map::POLICY, "delete"))
            }
        }
    }

    fn resync_planner(&mut self) {
        let svc: Vec<_> = self.svc.iter().filter_map(Result::ok).collect();
        let be: Vec<_> = self.backends.iter().filter_map(Result::ok).collect();
        let (planner, garbage) = Planner::from_maps(svc, be);
        self.planner = planner;
        for op in garbage {
            if let Err(e) = self.write(op) {
                warn!(error = %e, "cleaning up after a failed batch");
            }
        }
    }
}

fn is_eexist(e: &(dyn std::error::Error + 'static)) -> bool {
    has_io_kind(e, std::io::ErrorKind::AlreadyExists)
}

/// Whether an `io::Error` of `kind` is somewhere in the source chain.
pub(super) fn has_io_kind(e: &(dyn std::error::Error + 'static), kind: std::io::ErrorKind) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == kind
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The pin name of an interface's tc link; bpffs refuses names with dots (`eth0.100`).
fn tc_key(ifname: &str, prog: &str) -> String {
    format!("tc-{}-{prog}", ifname.replace('.', "%"))
}

fn sock_prog<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, DatapathError> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(prog_err(name, "type check".into()))
}

fn tc_prog<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(prog_err(name, "type check".into()))
}

impl Datapath for AyaDatapath {
    fn mode(&self) -> DatapathMode {
        DatapathMode::Ebpf
    }

    fn apply(&mut self, changes: &[Change]) -> Result<(), DatapathError> {
        // A batch that cannot fail is planned in place (no copy of the planner per call);
        // one that might is planned on a copy, so a rejected batch leaves no trace.
        let ops = if self.planner.may_fail(changes) {
            let mut planner = self.planner.clone();
            let ops = planner.plan(changes)?;
            self.planner = planner;
            ops
        } else {
            self.planner.plan(changes)?
        };
        for op in ops {
            if let Err(e) = self.write(op) {
                // The planner ran ahead of the maps: rebuild it from what is there.
                self.resync_planner();
                return Err(e);
            }
        }
        Ok(())
    }

    fn counters(&self) -> Result<VerdictCounters, DatapathError> {
        let mut out = VerdictCounters::default();
        for (i, slot) in out.by_verdict.iter_mut().enumerate() {
            let per_cpu = self
                .verdicts
                .get(&(i as u32), 0)
                .map_err(map_err(map::VERDICTS, "reading"))?;
            for c in per_cpu.iter() {
                slot.0 += c.packets;
                slot.1 += c.bytes;
            }
        }
        Ok(out)
    }

    fn take_drop_events(&mut self) -> Vec<DropEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.drops.next() {
            match DropEvent::from_bytes(&item) {
                Some(ev) => out.push(ev),
                None => warn!(len = item.len(), "drop event of unexpected size"),
            }
        }
        out
    }

    fn drop_events_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(AyaDatapath::drop_events_fd(self))
    }

    fn attach_interface(&mut self, ifname: &str) -> Result<(), DatapathError> {
        if self.tc_links.contains_key(ifname) {
            return Ok(());
        }
        match tc::qdisc_add_clsact(ifname) {
            Ok(()) | Err(tc::TcError::AlreadyAttached) => {}
            // Netlink says "Exclusivity flag on" (EEXIST) when clsact is already there.
            Err(e) if is_eexist(&e) => {}
            Err(source) => {
                return Err(DatapathError::Qdisc {
                    interface: ifname.to_owned(),
                    source,
                });
            }
        }
        // tc ingress = what the endpoint sends; tc egress = what it receives.
        let mut held = Vec::with_capacity(2);
        for (name, hook, dir) in [
            (prog::FROM_ENDPOINT, TcAttachType::Ingress, "ingress"),
            (prog::TO_ENDPOINT, TcAttachType::Egress, "egress"),
        ] {
            match self.attach_tc(ifname, name, hook, dir) {
                Ok(h) => held.push(h),
                Err(e) => {
                    for h in held {
                        self.release_tc(ifname, h);
                    }
                    return Err(e);
                }
            }
        }
        let [from, to]: [TcHold; 2] = held
            .try_into()
            .map_err(|_| DatapathError::Invalid("two tc hooks".into()))?;
        // The new programs are in place: retire an earlier generation's links.
        for name in [prog::FROM_ENDPOINT, prog::TO_ENDPOINT] {
            self.retire(&tc_key(ifname, name), false)?;
        }
        self.tc_links.insert(ifname.to_owned(), [from, to]);
        Ok(())
    }

    fn detach_interface(&mut self, ifname: &str) -> Result<(), DatapathError> {
        if let Some(holds) = self.tc_links.remove(ifname) {
            for h in holds {
                self.release_tc(ifname, h);
            }
        }
        // Also the links an earlier agent generation left for this interface.
        for name in [prog::FROM_ENDPOINT, prog::TO_ENDPOINT] {
            self.retire(&tc_key(ifname, name), true)?;
        }
        Ok(())
    }

    fn snapshot(&self) -> Result<super::MapSnapshot, DatapathError> {
        fn all<K, V>(
            name: &'static str,
            it: impl Iterator<Item = Result<(K, V), MapError>>,
        ) -> Result<std::collections::HashMap<K, V>, DatapathError>
        where
            K: std::hash::Hash + Eq,
        {
            it.collect::<Result<_, _>>()
                .map_err(map_err(name, "reading"))
        }
        Ok(super::MapSnapshot {
            services: all(map::LB4_SERVICES, self.svc.iter())?,
            backends: all(map::LB4_BACKENDS, self.backends.iter())?,
            ipcache: all(
                map::IPCACHE4,
                self.ipcache.iter().map(|r| {
                    r.map(|(k, v)| {
                        (
                            IpcacheKey {
                                prefixlen: k.prefix_len(),
                                address: k.data(),
                            },
                            v,
                        )
                    })
                }),
            )?,
            endpoints: all(map::ENDPOINTS, self.endpoints.iter())?,
            policy: all(map::POLICY, self.policy_map.iter())?,
        })
    }

    fn attached_interfaces(&self) -> Vec<String> {
        self.tc_links.keys().cloned().collect()
    }
}
