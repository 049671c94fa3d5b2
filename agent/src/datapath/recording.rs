//! An in-memory datapath holding exactly what the kernel maps would (tests, unprivileged runs).

use std::collections::{BTreeSet, HashMap};

use mesh_ebpf::{
    DropEvent, EndpointValue, IpcacheKey, IpcacheValue, Lb4Backend, Lb4Key, Lb4Service, PolicyKey,
    PolicyValue,
};

use super::{Change, Datapath, DatapathError, DatapathMode, MapOp, Planner, VerdictCounters};

/// The recording datapath: the planner's writes applied to in-memory maps.
#[derive(Debug, Default)]
pub struct RecordingDatapath {
    planner: Planner,
    /// `mesh_lb4_svc`.
    pub services: HashMap<Lb4Key, Lb4Service>,
    /// `mesh_lb4_be`.
    pub backends: HashMap<u32, Lb4Backend>,
    /// `mesh_ipcache4`.
    pub ipcache: HashMap<IpcacheKey, IpcacheValue>,
    /// `mesh_endpoints`.
    pub endpoints: HashMap<u32, EndpointValue>,
    /// `mesh_policy`.
    pub policy: HashMap<PolicyKey, PolicyValue>,
    /// Every write, in order.
    pub log: Vec<MapOp>,
    /// Counters `counters()` reports (tests set them).
    pub counters: VerdictCounters,
    /// Events `take_drop_events()` hands out (tests push them).
    pub drops: Vec<DropEvent>,
    interfaces: BTreeSet<String>,
}

impl RecordingDatapath {
    /// Empty maps.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts from existing map contents the way `AyaDatapath` starts from pinned maps:
    /// bookkeeping rebuilt, unreachable entries removed, nothing else touched.
    pub fn from_maps(
        services: HashMap<Lb4Key, Lb4Service>,
        backends: HashMap<u32, Lb4Backend>,
    ) -> Self {
        let (planner, garbage) = Planner::from_maps(
            services.iter().map(|(k, v)| (*k, *v)),
            backends.iter().map(|(k, v)| (*k, *v)),
        );
        let mut dp = Self {
            planner,
            services,
            backends,
            ..Self::default()
        };
        for op in garbage {
            dp.write(op);
        }
        dp
    }

    /// The services with their backends, as the planner tracks them.
    pub fn service_view(
        &self,
    ) -> std::collections::BTreeMap<super::ServiceKey, Vec<super::Backend>> {
        self.planner.services()
    }

    fn write(&mut self, op: MapOp) {
        match op {
            MapOp::SvcPut(k, v) => {
                self.services.insert(k, v);
            }
            MapOp::SvcDel(k) => {
                self.services.remove(&k);
            }
            MapOp::BackendPut(k, v) => {
                self.backends.insert(k, v);
            }
            MapOp::BackendDel(k) => {
                self.backends.remove(&k);
            }
            MapOp::IpcachePut(k, v) => {
                self.ipcache.insert(k, v);
            }
            MapOp::IpcacheDel(k) => {
                self.ipcache.remove(&k);
            }
            MapOp::EndpointPut(k, v) => {
                self.endpoints.insert(k, v);
            }
            MapOp::EndpointDel(k) => {
                self.endpoints.remove(&k);
            }
            MapOp::PolicyPut(k, v) => {
                self.policy.insert(k, v);
            }
            MapOp::PolicyDel(k) => {
                self.policy.remove(&k);
            }
        }
        self.log.push(op);
    }
}

impl Datapath for RecordingDatapath {
    fn mode(&self) -> DatapathMode {
        DatapathMode::Recording
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
            self.write(op);
        }
        Ok(())
    }

    fn counters(&self) -> Result<VerdictCounters, DatapathError> {
        Ok(self.counters)
    }

    fn take_drop_events(&mut self) -> Vec<DropEvent> {
        std::mem::take(&mut self.drops)
    }

    fn attach_interface(&mut self, ifname: &str) -> Result<(), DatapathError> {
        self.interfaces.insert(ifname.to_owned());
        Ok(())
    }

    fn detach_interface(&mut self, ifname: &str) -> Result<(), DatapathError> {
        self.interfaces.remove(ifname);
        Ok(())
    }

    fn snapshot(&self) -> Result<super::MapSnapshot, DatapathError> {
        Ok(super::MapSnapshot {
            services: self.services.clone(),
            backends: self.backends.clone(),
            ipcache: self.ipcache.clone(),
            endpoints: self.endpoints.clone(),
            policy: self.policy.clone(),
        })
    }

    fn attached_interfaces(&self) -> Vec<String> {
        self.interfaces.iter().cloned().collect()
    }
}
