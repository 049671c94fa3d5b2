//! Turns `Change`s into ordered raw map writes; owns backend-id allocation and service slots.

use std::collections::{BTreeMap, HashMap};

use mesh_ebpf::{
    EndpointValue, IpcacheKey, IpcacheValue, Lb4Backend, Lb4Key, Lb4Service, PolicyKey, PolicyValue,
};

use super::{Backend, Change, DatapathError, Endpoint, Protocol, ServiceKey, Verdict};

/// One write to one map, in the raw `mesh-ebpf` layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapOp {
    /// `mesh_lb4_svc[k] = v`.
    SvcPut(Lb4Key, Lb4Service),
    /// `delete mesh_lb4_svc[k]`.
    SvcDel(Lb4Key),
    /// `mesh_lb4_be[id] = v`.
    BackendPut(u32, Lb4Backend),
    /// `delete mesh_lb4_be[id]`.
    BackendDel(u32),
    /// `mesh_ipcache4[k] = v`.
    IpcachePut(IpcacheKey, IpcacheValue),
    /// `delete mesh_ipcache4[k]`.
    IpcacheDel(IpcacheKey),
    /// `mesh_endpoints[ip] = v` (key network order).
    EndpointPut(u32, EndpointValue),
    /// `delete mesh_endpoints[ip]`.
    EndpointDel(u32),
    /// `mesh_policy[k] = v`.
    PolicyPut(PolicyKey, PolicyValue),
    /// `delete mesh_policy[k]`.
    PolicyDel(PolicyKey),
}

type BackendAddr = (Backend, Protocol);

/// Backend ids and service slots as they are in the maps.
///
/// Write order keeps every lookup the programs make valid at each step: new backends
/// before the slots naming them, slots before the master entry that counts them, the
/// master entry shrinks before surplus slots go, backends go last.
#[derive(Debug, Default, Clone)]
pub struct Planner {
    services: BTreeMap<ServiceKey, Vec<u32>>,
    ids: HashMap<BackendAddr, u32>,
    addrs: HashMap<u32, BackendAddr>,
    refs: HashMap<u32, u32>,
    next_id: u32,
}

fn proto_of(raw: u8) -> Option<Protocol> {
    match raw {
        mesh_ebpf::PROTO_TCP => Some(Protocol::Tcp),
        mesh_ebpf::PROTO_UDP => Some(Protocol::Udp),
        _ => None,
    }
}

fn svc_key(key: &ServiceKey, slot: u16) -> Lb4Key {
    Lb4Key::new(key.vip, key.port, key.proto.number(), slot)
}

impl Planner {
    /// An empty planner (empty maps).
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds the bookkeeping from existing map contents (pinned maps after a restart)
    /// and returns the writes that remove unreachable entries: slots beyond their
    /// service's count or of a service without master entry, and backends no slot names.
    pub fn from_maps(
        services: impl IntoIterator<Item = (Lb4Key, Lb4Service)>,
        backends: impl IntoIterator<Item = (u32, Lb4Backend)>,
    ) -> (Self, Vec<MapOp>) {
        let mut p = Self::new();
        let mut garbage = Vec::new();
        for (id, be) in backends {
            match proto_of(be.proto) {
                Some(proto) if id != 0 => {
                    let addr = (
                        Backend {
                            ip: be.ip(),
                            port: be.port(),
                        },
                        proto,
                    );
                    p.ids.insert(addr, id);
                    p.addrs.insert(id, addr);
                    p.next_id = p.next_id.max(id);
                }
                _ => garbage.push(MapOp::BackendDel(id)),
            }
        }
        let mut masters = BTreeMap::new();
        let mut slots = Vec::new();
        for (k, v) in services {
            let Some(proto) = proto_of(k.proto) else {
                garbage.push(MapOp::SvcDel(k));
                continue;
            };
            let key = ServiceKey {
                vip: k.ip(),
                port: k.port(),
                proto,
            };
            if k.backend_slot == 0 {
                masters.insert(key, v.count);
            } else {
                slots.push((key, k, v));
            }
        }
        for (key, count) in &masters {
            p.services.insert(*key, vec![0; usize::from(*count)]);
        }
        for (key, raw, v) in slots {
            let slot = usize::from(raw.backend_slot);
            match p.services.get_mut(&key) {
                Some(ids) if slot <= ids.len() && p.addrs.contains_key(&v.backend_id) => {
                    ids[slot - 1] = v.backend_id;
                    *p.refs.entry(v.backend_id).or_default() += 1;
                }
                _ => garbage.push(MapOp::SvcDel(raw)),
            }
        }
        // A service missing one of its slots would make connects fail at random:
        // treat it as having lost every backend until the syncer rewrites it.
        let broken: Vec<ServiceKey> = p
            .services
            .iter()
            .filter(|(_, ids)| ids.contains(&0))
            .map(|(k, _)| *k)
            .collect();
        for key in broken {
            let ids = p.services.remove(&key).unwrap_or_default();
            garbage.push(MapOp::SvcDel(svc_key(&key, 0)));
            for (i, id) in ids.iter().enumerate() {
                if *id != 0 {
                    garbage.push(MapOp::SvcDel(svc_key(&key, slot_no(i))));
                    p.release(*id, &mut garbage);
                }
            }
        }
        let unused: Vec<u32> = p
            .addrs
            .keys()
            .filter(|id| !p.refs.contains_key(id))
            .copied()
            .collect();
        for id in unused {
            if let Some(addr) = p.addrs.remove(&id) {
                p.ids.remove(&addr);
            }
            garbage.push(MapOp::BackendDel(id));
        }
        (p, garbage)
    }

    /// The services this planner believes are in the maps, with their backends.
    pub fn services(&self) -> BTreeMap<ServiceKey, Vec<Backend>> {
        self.services
            .iter()
            .map(|(k, ids)| {
                let backends = ids
                    .iter()
                    .filter_map(|id| self.addrs.get(id).map(|a| a.0))
                    .collect();
                (*k, backends)
            })
            .collect()
    }

    /// Plans a batch. The planner's state advances as if every op succeeded.
    /// Whether planning `changes` could fail part-way (only by running out of backend ids,
    /// when the batch may need more than are left). Callers plan on a copy only then, so
    /// the common case costs no copy of the planner.
    pub fn may_fail(&self, changes: &[Change]) -> bool {
        let new: usize = changes
            .iter()
            .map(|c| match c {
                Change::UpsertService { backends, .. } => backends.len(),
                _ => 0,
            })
            .sum();
        self.addrs.len().saturating_add(new) >= (u32::MAX - 1) as usize
    }

    /// Map writes turning the current state into the one after `changes`. On `Err` the
    /// planner may be part-way: plan on a copy when [`Planner::may_fail`] says so.
    pub fn plan(&mut self, changes: &[Change]) -> Result<Vec<MapOp>, DatapathError> {
        let mut ops = Vec::new();
        for c in changes {
            self.plan_one(c, &mut ops)?;
        }
        Ok(ops)
    }

    fn plan_one(&mut self, c: &Change, ops: &mut Vec<MapOp>) -> Result<(), DatapathError> {
        match c {
            Change::UpsertService { key, backends } => self.upsert_service(key, backends, ops)?,
            Change::DeleteService(key) => {
                if let Some(old) = self.services.remove(key) {
                    ops.push(MapOp::SvcDel(svc_key(key, 0)));
                    for i in 0..old.len() {
                        ops.push(MapOp::SvcDel(svc_key(key, slot_no(i))));
                    }
                    for id in old {
                        self.release(id, ops);
                    }
                }
            }
            Change::UpsertIpcache {
                prefix,
                identity,
                cluster_id,
            } => ops.push(MapOp::IpcachePut(
                IpcacheKey::new(prefix.network(), u32::from(prefix.prefix_len())),
                IpcacheValue {
                    identity: *identity,
                    cluster_id: *cluster_id,
                    flags: 0,
                },
            )),
            Change::DeleteIpcache(prefix) => ops.push(MapOp::IpcacheDel(IpcacheKey::new(
                prefix.network(),
                u32::from(prefix.prefix_len()),
            ))),
            Change::UpsertEndpoint(ep) => ops.push(endpoint_put(ep)),
            Change::DeleteEndpoint(ip) => {
                ops.push(MapOp::EndpointDel(mesh_ebpf::layout::endpoint_key(*ip)))
            }
            Change::UpsertPolicy {
                rule,
                verdict,
                rule_id,
            } => ops.push(MapOp::PolicyPut(
                policy_key(rule),
                PolicyValue {
                    action: match verdict {
                        Verdict::Allow => mesh_ebpf::action::ALLOW,
                        Verdict::Deny => mesh_ebpf::action::DENY,
                    },
                    pad: [0; 3],
                    rule_id: *rule_id,
                },
            )),
            Change::DeletePolicy(rule) => ops.push(MapOp::PolicyDel(policy_key(rule))),
        }
        Ok(())
    }

    fn upsert_service(
        &mut self,
        key: &ServiceKey,
        backends: &[Backend],
        ops: &mut Vec<MapOp>,
    ) -> Result<(), DatapathError> {
        let count = u16::try_from(backends.len()).map_err(|_| {
            DatapathError::Invalid(format!(
                "service {}:{} has {} backends, at most {} fit",
                key.vip,
                key.port,
                backends.len(),
                u16::MAX
            ))
        })?;
        let old = self.services.get(key).cloned();
        let mut new_ids = Vec::with_capacity(backends.len());
        for b in backends {
            let addr = (*b, key.proto);
            let id = match self.ids.get(&addr) {
                Some(id) => *id,
                None => {
                    let id = self.alloc()?;
                    self.ids.insert(addr, id);
                    self.addrs.insert(id, addr);
                    ops.push(MapOp::BackendPut(
                        id,
                        Lb4Backend::new(b.ip, b.port, key.proto.number()),
                    ));
                    id
                }
            };
            *self.refs.entry(id).or_default() += 1;
            new_ids.push(id);
        }
        let old_ids = old.clone().unwrap_or_default();
        for (i, id) in new_ids.iter().enumerate() {
            if old_ids.get(i) != Some(id) {
                ops.push(MapOp::SvcPut(
                    svc_key(key, slot_no(i)),
                    Lb4Service {
                        backend_id: *id,
                        count: 0,
                        flags: 0,
                    },
                ));
            }
        }
        if old.is_none() || old_ids.len() != new_ids.len() {
            ops.push(MapOp::SvcPut(
                svc_key(key, 0),
                Lb4Service {
                    backend_id: 0,
                    count,
                    flags: 0,
                },
            ));
        }
        for i in new_ids.len()..old_ids.len() {
            ops.push(MapOp::SvcDel(svc_key(key, slot_no(i))));
        }
        for id in old_ids {
            self.release(id, ops);
        }
        self.services.insert(*key, new_ids);
        Ok(())
    }

    fn alloc(&mut self) -> Result<u32, DatapathError> {
        // Ids are never 0; there are u32::MAX - 1 of them.
        if self.addrs.len() >= (u32::MAX - 1) as usize {
            return Err(DatapathError::BackendIdsExhausted);
        }
        loop {
            self.next_id = self.next_id.wrapping_add(1);
            if self.next_id != 0 && !self.addrs.contains_key(&self.next_id) {
                return Ok(self.next_id);
            }
        }
    }

    fn release(&mut self, id: u32, ops: &mut Vec<MapOp>) {
        let Some(n) = self.refs.get_mut(&id) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            self.refs.remove(&id);
            if let Some(addr) = self.addrs.remove(&id) {
                self.ids.remove(&addr);
            }
            ops.push(MapOp::BackendDel(id));
        }
    }
}

fn slot_no(index: usize) -> u16 {
    // Callers bound the slot count to u16::MAX.
    u16::try_from(index + 1).unwrap_or(u16::MAX)
}

fn endpoint_put(ep: &Endpoint) -> MapOp {
    let mut flags = 0;
    if ep.enforce_ingress {
        flags |= mesh_ebpf::EP_F_ENFORCE_INGRESS;
    }
    if ep.enforce_egress {
        flags |= mesh_ebpf::EP_F_ENFORCE_EGRESS;
    }
    MapOp::EndpointPut(
        mesh_ebpf::layout::endpoint_key(ep.ip),
        EndpointValue {
            endpoint_id: ep.endpoint_id,
            identity: ep.identity,
            ifindex: ep.ifindex,
            flags,
            pad: 0,
        },
    )
}

fn policy_key(r: &super::PolicyRule) -> PolicyKey {
    PolicyKey::new(
        r.endpoint_id,
        r.identity,
        r.port,
        r.proto,
        r.direction.raw(),
    )
}

#[cfg(test)]
mod tests;
