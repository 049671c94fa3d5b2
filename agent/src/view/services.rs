//! Global services merged across clusters: precedence, MCS conflict rules, ports, affinity.

use std::fmt;
use std::net::IpAddr;

use meshd::model::{Affinity, BackendPort, ClusterName, ClusterService, ServicePort};

/// A service's namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
}

impl ServiceKey {
    /// Builds a key.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One backend of a merged service, with the cluster it lives in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedBackend {
    /// Cluster of the backend.
    pub cluster: ClusterName,
    /// Backend IP.
    pub ip: IpAddr,
    /// Ports it serves.
    pub ports: Vec<BackendPort>,
    /// Pod hostname (headless per-endpoint DNS names).
    pub hostname: Option<String>,
    /// Node hosting it.
    pub node: Option<String>,
    /// Topology zone.
    pub zone: Option<String>,
    /// Whether it is ready.
    pub ready: bool,
}

/// A global service as this agent uses it: every participating cluster merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedService {
    /// Namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// Headless, as decided by the cluster with precedence (oldest export).
    pub headless: bool,
    /// Union of the participating clusters' ports, sorted; a conflicting port keeps the
    /// definition of the cluster with precedence.
    pub ports: Vec<ServicePort>,
    /// ClusterIPs of the local cluster's service (empty if it has none, or is not global).
    pub frontends_local: Vec<IpAddr>,
    /// The ClusterSetIP, once the caller fed it with [`super::MergedView::set_clusterset_ip`].
    pub clusterset_ip: Option<IpAddr>,
    /// Every backend the agent may use, from all contributing clusters, ordered as
    /// `clusters` and by IP within a cluster. Ready or not.
    pub backends: Vec<MergedBackend>,
    /// Indexes into `backends` of those in use after affinity (ready only); see
    /// [`MergedService::active`].
    pub active_backends: Vec<usize>,
    /// The affinity in force (the local service's, else that of the cluster with
    /// precedence).
    pub affinity: Affinity,
    /// Human-readable conflicts between the clusters' definitions (empty when none).
    pub conflicts: Vec<String>,
    /// Participating clusters in precedence order: MCS exports oldest first (ties by
    /// name), then annotation-only exports by name.
    pub clusters: Vec<ClusterName>,
}

impl MergedService {
    /// The backends in use after affinity.
    pub fn active(&self) -> impl Iterator<Item = &MergedBackend> + '_ {
        self.active_backends
            .iter()
            .filter_map(|&i| self.backends.get(i))
    }

    /// The service's key.
    pub fn key(&self) -> ServiceKey {
        ServiceKey::new(&self.namespace, &self.name)
    }
}

fn port_str(p: &ServicePort) -> String {
    if p.name.is_empty() {
        format!("{}/{}", p.port, p.protocol)
    } else {
        format!("{}/{} ({})", p.port, p.protocol, p.name)
    }
}

/// Merges the definitions of one service from every cluster that has it.
///
/// `members` are all clusters' services under the key, global or not; `None` when no
/// cluster takes part (no global definition).
pub(super) fn merge<'a>(
    local: &ClusterName,
    members: impl IntoIterator<Item = &'a ClusterService>,
    clusterset_ip: Option<IpAddr>,
) -> Option<MergedService> {
    let mut parts: Vec<&ClusterService> = members.into_iter().filter(|s| s.global).collect();
    // Precedence: MCS exports oldest first, then annotation-only ones; ties by name.
    parts.sort_by(|a, b| {
        (a.export_created.is_none(), a.export_created, &a.cluster).cmp(&(
            b.export_created.is_none(),
            b.export_created,
            &b.cluster,
        ))
    });
    let primary = *parts.first()?;
    let local_part = parts.iter().copied().find(|s| s.cluster == *local);
    let mut conflicts = Vec::new();

    // Headless: the cluster with precedence decides.
    for s in &parts[1..] {
        if s.headless != primary.headless {
            conflicts.push(format!(
                "headless: cluster {} has headless={}, using headless={} from cluster {} (oldest export)",
                s.cluster, s.headless, primary.headless, primary.cluster
            ));
        }
    }

    // Affinity: a per-consumer routing preference, so the local definition decides.
    let (affinity, affinity_from) = match local_part {
        Some(l) => (l.affinity, l),
        None => (primary.affinity, primary),
    };
    for s in &parts {
        if s.affinity != affinity {
            conflicts.push(format!(
                "affinity: cluster {} has {}, using {} from cluster {}",
                s.cluster,
                meshd::wire::affinity(s.affinity),
                meshd::wire::affinity(affinity),
                affinity_from.cluster
            ));
        }
    }

    let ports = merge_ports(&parts, &mut conflicts);

    let mut backends = Vec::new();
    for s in &parts {
        // A remote cluster that does not share contributes no backends.
        if s.cluster != *local && !s.shared {
            continue;
        }
        backends.extend(s.backends.iter().map(|(ip, b)| MergedBackend {
            cluster: s.cluster.clone(),
            ip: *ip,
            ports: b.ports.clone(),
            hostname: b.hostname.clone(),
            node: b.node.clone(),
            zone: b.zone.clone(),
            ready: b.ready,
        }));
    }
    let active_backends = select_active(local, affinity, &backends);

    Some(MergedService {
        namespace: primary.namespace.clone(),
        name: primary.name.clone(),
        headless: primary.headless,
        ports,
        frontends_local: local_part.map(|l| l.frontends.clone()).unwrap_or_default(),
        clusterset_ip,
        backends,
        active_backends,
        affinity,
        conflicts,
        clusters: parts.iter().map(|s| s.cluster.clone()).collect(),
    })
}

/// Union of ports in precedence order. A port number belongs to the first cluster that
/// defines it (all of that cluster's definitions of the number are kept, e.g. 53/TCP
/// and 53/UDP); a later cluster's different definition of the number, or a port name
/// reused for another number/protocol, is a conflict and is dropped.
fn merge_ports(parts: &[&ClusterService], conflicts: &mut Vec<String>) -> Vec<ServicePort> {
    let mut out: Vec<(ServicePort, &ClusterName)> = Vec::new();
    for s in parts {
        for p in &s.ports {
            if out.iter().any(|(q, _)| q == p) {
                continue;
            }
            let clash = out.iter().find(|(q, owner)| {
                *owner != &s.cluster
                    && (q.port == p.port || (!p.name.is_empty() && q.name == p.name))
            });
            if let Some((q, owner)) = clash {
                conflicts.push(format!(
                    "port {}: cluster {} has {}, using {} from cluster {}",
                    p.port,
                    s.cluster,
                    port_str(p),
                    port_str(q),
                    owner
                ));
                continue;
            }
            out.push((p.clone(), &s.cluster));
        }
    }
    let mut ports: Vec<ServicePort> = out.into_iter().map(|(p, _)| p).collect();
    ports.sort();
    ports
}

/// Indexes of the ready backends in use under `affinity`.
fn select_active(
    local: &ClusterName,
    affinity: Affinity,
    backends: &[MergedBackend],
) -> Vec<usize> {
    let ready = |want_local: Option<bool>| -> Vec<usize> {
        backends
            .iter()
            .enumerate()
            .filter(|(_, b)| b.ready && want_local.is_none_or(|l| (b.cluster == *local) == l))
            .map(|(i, _)| i)
            .collect()
    };
    match affinity {
        Affinity::None => ready(None),
        Affinity::Local => {
            let l = ready(Some(true));
            if l.is_empty() { ready(Some(false)) } else { l }
        }
        Affinity::Remote => {
            let r = ready(Some(false));
            if r.is_empty() { ready(Some(true)) } else { r }
        }
    }
}
