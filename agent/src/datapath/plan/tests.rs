//! Planner and recording-datapath unit tests: map contents and write order.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use mesh_ebpf::{Lb4Backend, Lb4Key, Lb4Service};

use super::super::{
    Backend, Change, Datapath, DatapathError, Direction, Endpoint, PolicyRule, Protocol,
    RecordingDatapath, ServiceKey, Verdict,
};
use super::MapOp;

fn svc(last: u8, port: u16) -> ServiceKey {
    ServiceKey {
        vip: Ipv4Addr::new(198, 19, 0, last),
        port,
        proto: Protocol::Tcp,
    }
}

fn be(last: u8) -> Backend {
    Backend {
        ip: Ipv4Addr::new(198, 18, 0, last),
        port: 8080,
    }
}

fn upsert(key: ServiceKey, backends: &[Backend]) -> Change {
    Change::UpsertService {
        key,
        backends: backends.to_vec(),
    }
}

/// The backend each slot of `key` resolves to, read from the raw maps as the program does.
fn resolve(dp: &RecordingDatapath, key: ServiceKey) -> Option<Vec<Backend>> {
    let k = |slot| Lb4Key::new(key.vip, key.port, key.proto.number(), slot);
    let master = dp.services.get(&k(0))?;
    Some(
        (1..=master.count)
            .map(|slot| {
                let id = dp.services[&k(slot)].backend_id;
                let b = dp.backends[&id];
                Backend {
                    ip: b.ip(),
                    port: b.port(),
                }
            })
            .collect(),
    )
}

fn position(log: &[MapOp], pred: impl Fn(&MapOp) -> bool) -> usize {
    log.iter().position(pred).expect("op present")
}

#[test]
fn a_new_service_writes_backends_then_slots_then_the_master_entry() {
    let mut dp = RecordingDatapath::new();
    dp.apply(&[upsert(svc(1, 80), &[be(1), be(2)])]).unwrap();
    assert_eq!(resolve(&dp, svc(1, 80)), Some(vec![be(1), be(2)]));
    let log = &dp.log;
    assert_eq!(log.len(), 5, "{log:?}");
    let last_backend = log
        .iter()
        .rposition(|o| matches!(o, MapOp::BackendPut(..)))
        .unwrap();
    let first_slot = position(
        log,
        |o| matches!(o, MapOp::SvcPut(k, _) if k.backend_slot > 0),
    );
    let master = position(
        log,
        |o| matches!(o, MapOp::SvcPut(k, _) if k.backend_slot == 0),
    );
    assert!(last_backend < first_slot && first_slot < master, "{log:?}");
    let MapOp::SvcPut(k, v) = log[master] else {
        unreachable!()
    };
    assert_eq!((k.ip(), k.port(), k.proto), (svc(1, 80).vip, 80, 6));
    assert_eq!(v.count, 2);
}

#[test]
fn the_same_service_again_writes_nothing() {
    let mut dp = RecordingDatapath::new();
    dp.apply(&[upsert(svc(1, 80), &[be(1), be(2)])]).unwrap();
    let n = dp.log.len();
    dp.apply(&[upsert(svc(1, 80), &[be(1), be(2)])]).unwrap();
    assert_eq!(dp.log.len(), n, "no-op upsert wrote {:?}", &dp.log[n..]);
}

#[test]
fn shrinking_lowers_the_count_before_removing_slots_and_backends() {
    let mut dp = RecordingDatapath::new();
    dp.apply(&[upsert(svc(1, 80), &[be(1), be(2), be(3)])])
        .unwrap();
    let n = dp.log.len();
    dp.apply(&[upsert(svc(1, 80), &[be(3)])]).unwrap();
    assert_eq!(resolve(&dp, svc(1, 80)), Some(vec![be(3)]));
    let ops = &dp.log[n..];
    let master = position(
        ops,
        |o| matches!(o, MapOp::SvcPut(k, v) if k.backend_slot == 0 && v.count == 1),
    );
    let first_del = position(ops, |o| matches!(o, MapOp::SvcDel(_)));
    let first_be_del = position(ops, |o| matches!(o, MapOp::BackendDel(_)));
    assert!(master < first_del && first_del < first_be_del, "{ops:?}");
    assert_eq!(dp.services.len(), 2, "master + one slot");
    assert_eq!(dp.backends.len(), 1, "unused backends deleted");
}

#[test]
fn a_backend_shared_by_two_services_lives_until_the_last_one_goes() {
    let mut dp = RecordingDatapath::new();
    dp.apply(&[
        upsert(svc(1, 80), &[be(1)]),
        upsert(svc(2, 80), &[be(1), be(2)]),
    ])
    .unwrap();
    assert_eq!(dp.backends.len(), 2, "one id per backend address");
    dp.apply(&[Change::DeleteService(svc(1, 80))]).unwrap();
    assert_eq!(resolve(&dp, svc(2, 80)), Some(vec![be(1), be(2)]));
    assert_eq!(resolve(&dp, svc(1, 80)), None);
    dp.apply(&[Change::DeleteService(svc(2, 80))]).unwrap();
    assert!(dp.services.is_empty() && dp.backends.is_empty(), "{dp:?}");
}

#[test]
fn an_empty_backend_list_keeps_a_master_entry_with_count_zero() {
    let mut dp = RecordingDatapath::new();
    dp.apply(&[upsert(svc(1, 53), &[be(1)]), upsert(svc(1, 53), &[])])
        .unwrap();
    assert_eq!(resolve(&dp, svc(1, 53)), Some(vec![]));
    assert!(dp.backends.is_empty());
}

#[test]
fn a_batch_that_cannot_be_represented_leaves_the_maps_alone() {
    let mut dp = RecordingDatapath::new();
    let many: Vec<Backend> = (0..=u32::from(u16::MAX))
        .map(|i| Backend {
            ip: Ipv4Addr::from(0xc612_0000 + i),
            port: 80,
        })
        .collect();
    let err = dp
        .apply(&[upsert(svc(1, 80), &[be(1)]), upsert(svc(2, 80), &many)])
        .unwrap_err();
    assert!(matches!(err, DatapathError::Invalid(_)), "{err}");
    assert!(dp.services.is_empty() && dp.log.is_empty());
}

#[test]
fn restart_rebuilds_from_the_maps_and_removes_only_unreachable_entries() {
    let mut first = RecordingDatapath::new();
    first
        .apply(&[
            upsert(svc(1, 80), &[be(1), be(2)]),
            upsert(svc(2, 80), &[be(2)]),
        ])
        .unwrap();
    let mut services = first.services.clone();
    let mut backends = first.backends.clone();
    // Junk a crashed agent could leave: a slot beyond the count, an unreferenced backend,
    // and a service whose slot 1 is missing.
    let k = |s: ServiceKey, slot| Lb4Key::new(s.vip, s.port, 6, slot);
    services.insert(
        k(svc(1, 80), 3),
        Lb4Service {
            backend_id: 1,
            count: 0,
            flags: 0,
        },
    );
    backends.insert(99, Lb4Backend::new(Ipv4Addr::new(198, 18, 9, 9), 1, 6));
    services.insert(
        k(svc(3, 80), 0),
        Lb4Service {
            backend_id: 0,
            count: 2,
            flags: 0,
        },
    );
    services.insert(
        k(svc(3, 80), 2),
        Lb4Service {
            backend_id: 1,
            count: 0,
            flags: 0,
        },
    );

    let mut dp = RecordingDatapath::from_maps(services, backends);
    assert_eq!(
        dp.services, first.services,
        "valid entries untouched, junk removed"
    );
    assert_eq!(dp.backends, first.backends);
    assert_eq!(dp.service_view().len(), 2);
    // The rebuilt bookkeeping continues where the old one stopped: no id reuse, no rewrite.
    let n = dp.log.len();
    dp.apply(&[upsert(svc(1, 80), &[be(1), be(2)])]).unwrap();
    assert_eq!(dp.log.len(), n);
    dp.apply(&[upsert(svc(4, 80), &[be(7)])]).unwrap();
    let new_ids: Vec<u32> = dp.log[n..]
        .iter()
        .filter_map(|o| match o {
            MapOp::BackendPut(id, _) => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(new_ids.len(), 1);
    assert!(!first.backends.contains_key(&new_ids[0]));
    dp.apply(&[Change::DeleteService(svc(1, 80))]).unwrap();
    assert_eq!(
        resolve(&dp, svc(2, 80)),
        Some(vec![be(2)]),
        "shared backend kept"
    );
}

#[test]
fn ipcache_endpoint_and_policy_entries_use_the_raw_layouts() {
    let mut dp = RecordingDatapath::new();
    dp.apply(&[
        Change::UpsertIpcache {
            prefix: "198.18.5.7/24".parse().unwrap(),
            identity: 77,
            cluster_id: 4,
        },
        Change::UpsertEndpoint(Endpoint {
            ip: Ipv4Addr::new(198, 18, 5, 10),
            endpoint_id: 3,
            identity: 78,
            ifindex: 12,
            enforce_ingress: true,
            enforce_egress: false,
        }),
        Change::UpsertPolicy {
            rule: PolicyRule {
                endpoint_id: 3,
                identity: 77,
                port: 5432,
                proto: 6,
                direction: Direction::Ingress,
            },
            verdict: Verdict::Allow,
            rule_id: 9,
        },
    ])
    .unwrap();
    let (k, v) = dp.ipcache.iter().next().unwrap();
    assert_eq!(
        (k.prefixlen, k.address.to_ne_bytes()),
        (24, [198, 18, 5, 0])
    );
    assert_eq!((v.identity, v.cluster_id), (77, 4));
    let ep = dp.endpoints[&u32::from_ne_bytes([198, 18, 5, 10])];
    assert_eq!(
        (ep.endpoint_id, ep.identity, ep.ifindex, ep.flags),
        (3, 78, 12, mesh_ebpf::EP_F_ENFORCE_INGRESS)
    );
    let (pk, pv) = dp.policy.iter().next().unwrap();
    assert_eq!(
        pk.dport.to_ne_bytes(),
        [0x15, 0x38],
        "5432 in network order"
    );
    assert_eq!(
        (pk.direction, pv.action, pv.rule_id),
        (mesh_ebpf::direction::INGRESS, mesh_ebpf::action::ALLOW, 9)
    );

    dp.apply(&[
        Change::DeleteIpcache("198.18.5.0/24".parse().unwrap()),
        Change::DeleteEndpoint(Ipv4Addr::new(198, 18, 5, 10)),
        Change::DeletePolicy(PolicyRule {
            endpoint_id: 3,
            identity: 77,
            port: 5432,
            proto: 6,
            direction: Direction::Ingress,
        }),
    ])
    .unwrap();
    assert!(dp.ipcache.is_empty() && dp.endpoints.is_empty() && dp.policy.is_empty());
    let snap = dp.snapshot().unwrap();
    assert_eq!(snap, Default::default());
    assert_eq!(dp.mode().as_str(), "recording");
    let _: HashMap<_, _> = snap.services;
}
