//! The aya datapath: loads the mesh-ebpf objects with pinned maps, attaches programs, writes maps.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::Key as LpmKey;
use aya::maps::{HashMap, LpmTrie, MapData, MapError, PerCpuArray, RingBuf};
use aya::programs::links::CgroupAttachMode;
use aya::programs::tc::{self, SchedClassifierLinkId, TcAttachType};
use aya::programs::{CgroupSockAddr, ProgramError, SchedClassifier};
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
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(|source| DatapathError::Io {
        what: "reading /proc/mounts".into(),
        source,
    })?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .ok_or_else(|| DatapathError::Io {
            what: "finding the cgroup2 mount".into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no cgroup2 in /proc/mounts"),
        })
}

/// The real datapath. Dropping it detaches every program it attached (the links belong
/// to the loaded objects); the pinned maps stay, and the next `open` with the same
/// `pin_dir` reuses them without flushing.
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
    tc_links: BTreeMap<String, (SchedClassifierLinkId, SchedClassifierLinkId)>,
    cgroup: Option<PathBuf>,
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
            config,
        };
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
        info!(pin_dir = %dp.config.pin_dir.display(), reused_lb_entries = reused, cgroup = ?dp.cgroup, "eBPF datapath loaded");
        Ok(dp)
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
            sock_prog(&mut self.sock, name)?
                .attach(cg, CgroupAttachMode::Single)
                .map_err(prog_err(
                    name,
                    format!("attaching to cgroup {}", dir.display()),
                ))?;
        }
        Ok(())
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
        let mut planner = self.planner.clone();
        let ops = planner.plan(changes)?;
        self.planner = planner;
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

    fn attach_interface(&mut self, ifname: &str) -> Result<(), DatapathError> {
        if self.tc_links.contains_key(ifname) {
            return Ok(());
        }
        match tc::qdisc_add_clsact(ifname) {
            Ok(()) | Err(tc::TcError::AlreadyAttached) => {}
            Err(source) => {
                return Err(DatapathError::Qdisc {
                    interface: ifname.to_owned(),
                    source,
                });
            }
        }
        // tc ingress = what the endpoint sends; tc egress = what it receives.
        let from = tc_prog(&mut self.policy, prog::FROM_ENDPOINT)?
            .attach(ifname, TcAttachType::Ingress)
            .map_err(prog_err(
                prog::FROM_ENDPOINT,
                format!("attaching to {ifname} ingress"),
            ))?;
        let to = match tc_prog(&mut self.policy, prog::TO_ENDPOINT)?
            .attach(ifname, TcAttachType::Egress)
        {
            Ok(l) => l,
            Err(e) => {
                let _ = tc_prog(&mut self.policy, prog::FROM_ENDPOINT)?.detach(from);
                return Err(prog_err(
                    prog::TO_ENDPOINT,
                    format!("attaching to {ifname} egress"),
                )(e));
            }
        };
        self.tc_links.insert(ifname.to_owned(), (from, to));
        Ok(())
    }

    fn detach_interface(&mut self, ifname: &str) -> Result<(), DatapathError> {
        let Some((from, to)) = self.tc_links.remove(ifname) else {
            return Ok(());
        };
        // An interface that is already gone took its links with it.
        let r1 = tc_prog(&mut self.policy, prog::FROM_ENDPOINT)?.detach(from);
        let r2 = tc_prog(&mut self.policy, prog::TO_ENDPOINT)?.detach(to);
        for (name, r) in [(prog::FROM_ENDPOINT, r1), (prog::TO_ENDPOINT, r2)] {
            if let Err(e) = r {
                warn!(interface = ifname, program = name, error = %e, "detaching (interface gone?)");
            }
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
