//! The `clusterset.local` name index: every name the zone holds and its records, built from
//! one services snapshot of the merged view (MCS DNS specification 1.0.0).
//!
//! ```text
//!  ServicesSnapshot ─► for each global service
//!     ClusterSetIP service   <svc>.<ns>.svc.Z            A/AAAA = ClusterSetIP
//!                            _<port>._<proto>.<svc>...    SRV 0 100 <port> <svc>.<ns>.svc.Z   (named ports)
//!     headless service       <svc>.<ns>.svc.Z            A/AAAA = ready endpoints, all clusters (capped)
//!                            <host>.<cluster>.<svc>...    A/AAAA = that endpoint
//!                            _<port>._<proto>.<svc>...    SRV 0 100 <port> <host>.<cluster>.<svc>...  per endpoint
//!     zone apex              SOA, NS, dns-version TXT "1.0.0"
//!  ─► HashMap<LowerName, records by type>; a name is present only if it has records
//! ```
//!
//! Names without records are absent, so `<cluster>.<svc>.<ns>.svc.Z`, `<ns>.svc.Z` and
//! `_tcp.<svc>…` answer NXDOMAIN, as the MCS specification requires for the first.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::rr::rdata::{A, AAAA, NS, SOA, SRV, TXT};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordSet, RecordType};

use crate::view::{MergedService, ServicesSnapshot};
use meshd::model::Protocol;

/// The zone.
pub const ZONE: &str = "clusterset.local.";
/// The MCS DNS specification version served in `dns-version.<zone>` TXT.
pub const DNS_VERSION: &str = "1.0.0";

/// Knobs of the index.
#[derive(Debug, Clone)]
pub struct IndexConfig {
    /// TTL of every record (the SOA minimum too, so negative answers are cached as long).
    pub ttl: u32,
    /// Most A (or AAAA) records in the answer for a headless service name; further ready
    /// endpoints are left out (sorted by cluster precedence, then IP). Keeps a UDP answer
    /// within 512 bytes without EDNS for small caps and bounds the work per query.
    pub max_headless_answers: usize,
    /// Address for the zone's NS glue (`ns.dns.<zone>` A/AAAA), normally the listen IP.
    pub ns_address: Option<IpAddr>,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            ttl: 5,
            max_headless_answers: 64,
            ns_address: None,
        }
    }
}

/// Records of one name, by type.
#[derive(Debug, Default)]
pub struct NameRecords {
    sets: Vec<Arc<RecordSet>>,
}

impl NameRecords {
    /// The record set of `rtype`, if the name has one.
    pub fn get(&self, rtype: RecordType) -> Option<&Arc<RecordSet>> {
        self.sets.iter().find(|s| s.record_type() == rtype)
    }

    /// Every record set of the name.
    pub fn all(&self) -> &[Arc<RecordSet>] {
        &self.sets
    }
}

/// Every name of the zone.
#[derive(Debug)]
pub struct DnsIndex {
    origin: LowerName,
    names: HashMap<LowerName, NameRecords>,
    /// Generation of the snapshot it was built from.
    pub generation: u64,
}

/// What a name holds.
#[derive(Debug)]
pub enum Answer<'a> {
    /// The name has records of the type.
    Records(&'a Arc<RecordSet>),
    /// The name exists but has no records of the type (NODATA).
    NoData,
    /// No such name (NXDOMAIN).
    NxDomain,
    /// The name is not in the zone.
    NotInZone,
}

/// Collects records per name and type while building.
struct Builder {
    ttl: u32,
    sets: HashMap<(LowerName, RecordType), RecordSet>,
}

impl Builder {
    fn add(&mut self, name: &Name, rdata: RData) {
        let rtype = rdata.record_type();
        self.sets
            .entry((LowerName::new(name), rtype))
            .or_insert_with(|| RecordSet::new(name.clone(), rtype, self.ttl))
            .insert(Record::from_rdata(name.clone(), self.ttl, rdata), 0);
    }

    fn addr(&mut self, name: &Name, ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) => self.add(name, RData::A(A(v4))),
            IpAddr::V6(v6) => self.add(name, RData::AAAA(AAAA(v6))),
        }
    }
}

fn proto_label(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "_tcp",
        Protocol::Udp => "_udp",
        Protocol::Sctp => "_sctp",
    }
}

/// `label.parent`, or `None` when `label` is not a valid DNS label (names from peers are
/// untrusted; such a service or endpoint simply gets no record).
fn child(parent: &Name, label: &str) -> Option<Name> {
    Name::from_labels([label.as_bytes()])
        .ok()
        .and_then(|l| l.append_domain(parent).ok())
        .filter(|_| !label.is_empty() && label.len() <= 63)
}

/// The per-endpoint host label: the endpoint's hostname (the exporter fills in the pod name
/// when the EndpointSlice has none), else the IP with dashes (`198-18-1-11`).
fn host_label(hostname: Option<&str>, ip: IpAddr) -> String {
    match hostname {
        Some(h) if !h.is_empty() => h.to_ascii_lowercase(),
        _ => ip.to_string().replace(['.', ':'], "-"),
    }
}

impl DnsIndex {
    /// Builds the index from a services snapshot.
    pub fn build(services: &ServicesSnapshot, cfg: &IndexConfig) -> Self {
        let origin = Name::from_ascii(ZONE).unwrap_or_else(|_| Name::root());
        let mut b = Builder {
            ttl: cfg.ttl,
            sets: HashMap::new(),
        };
        // Apex: SOA (minimum = TTL, so NXDOMAIN/NODATA are cached as briefly as answers), NS.
        let ns_name = child(&origin, "dns")
            .and_then(|d| child(&d, "ns"))
            .unwrap_or_else(|| origin.clone());
        let hostmaster = child(&origin, "hostmaster").unwrap_or_else(|| origin.clone());
        let serial = u32::try_from(services.generation % u64::from(u32::MAX)).unwrap_or(0);
        b.add(
            &origin,
            RData::SOA(SOA::new(
                ns_name.clone(),
                hostmaster,
                serial,
                60,
                10,
                3600,
                cfg.ttl,
            )),
        );
        b.add(&origin, RData::NS(NS(ns_name.clone())));
        if let Some(ip) = cfg.ns_address {
            b.addr(&ns_name, ip);
        }
        if let Some(v) = child(&origin, "dns-version") {
            b.add(&v, RData::TXT(TXT::new(vec![DNS_VERSION.to_owned()])));
        }
        let svc_zone = child(&origin, "svc").unwrap_or_else(|| origin.clone());
        for s in services.entries.values() {
            add_service(&mut b, &svc_zone, s, cfg);
        }
        let mut names: HashMap<LowerName, NameRecords> = HashMap::new();
        for ((name, _), set) in b.sets {
            names.entry(name).or_default().sets.push(Arc::new(set));
        }
        Self {
            origin: LowerName::new(&origin),
            names,
            generation: services.generation,
        }
    }

    /// The zone apex.
    pub fn origin(&self) -> &LowerName {
        &self.origin
    }

    /// Number of names.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the index holds no names (never: the apex is always there).
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Total records.
    pub fn records(&self) -> usize {
        self.names
            .values()
            .flat_map(|n| n.sets.iter())
            .map(|s| s.records_without_rrsigs().count())
            .sum()
    }

    /// What `name` holds for `rtype`.
    pub fn lookup(&self, name: &LowerName, rtype: RecordType) -> Answer<'_> {
        if !self.origin.zone_of(name) {
            return Answer::NotInZone;
        }
        match self.names.get(name) {
            None => Answer::NxDomain,
            Some(n) => n.get(rtype).map_or(Answer::NoData, Answer::Records),
        }
    }
}

fn add_service(b: &mut Builder, svc_zone: &Name, s: &MergedService, cfg: &IndexConfig) {
    let Some(ns) = child(svc_zone, &s.namespace) else {
        return;
    };
    let Some(name) = child(&ns, &s.name) else {
        return;
    };
    if s.headless {
        // Every ready endpoint of every cluster (not affinity-filtered: DNS clients choose).
        let ready: Vec<_> = s.backends.iter().filter(|e| e.ready).collect();
        // A headless service with no ready endpoints has no name (NXDOMAIN).
        for e in ready.iter().take(cfg.max_headless_answers) {
            b.addr(&name, e.ip);
        }
        for e in &ready {
            let Some(host) = child(&name, e.cluster.as_str())
                .and_then(|c| child(&c, &host_label(e.hostname.as_deref(), e.ip)))
            else {
                continue;
            };
            b.addr(&host, e.ip);
            for p in s.ports.iter().filter(|p| !p.name.is_empty()) {
                let Some(srv) = child(&name, proto_label(p.protocol))
                    .and_then(|t| child(&t, &format!("_{}", p.name)))
                else {
                    continue;
                };
                // The endpoint's port for this named port, else the service port.
                let port = e
                    .ports
                    .iter()
                    .find(|bp| bp.name == p.name && bp.protocol == p.protocol)
                    .map_or(p.port, |bp| bp.port);
                b.add(&srv, RData::SRV(SRV::new(0, 100, port, host.clone())));
            }
        }
    } else {
        // ClusterSetIP services: the VIP, no per-endpoint names.
        let Some(ip) = s.clusterset_ip else {
            return;
        };
        b.addr(&name, ip);
        for p in s.ports.iter().filter(|p| !p.name.is_empty()) {
            if let Some(srv) = child(&name, proto_label(p.protocol))
                .and_then(|t| child(&t, &format!("_{}", p.name)))
            {
                b.add(&srv, RData::SRV(SRV::new(0, 100, p.port, name.clone())));
            }
        }
    }
}
