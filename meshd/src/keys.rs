//! The etcd key schema of DESIGN §4: every key, its format and parse, and the value codecs.
//!
//! This is the only place that knows how keys are spelled. `Key::parse(k.to_string())`
//! round-trips for every key (property-tested below); anything else is a [`KeyError`].
//! Values are JSON; [`decode_state`] checks that a value agrees with the key it was
//! read under (same cluster, same name/IP/ID) and, given the peer's cluster config,
//! that its identities are inside that cluster's range.

use std::fmt;
use std::net::IpAddr;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::model::{
    ClusterConfig, ClusterId, ClusterName, ClusterService, Identity, IdentityEntry, IpCacheEntry,
    Labels, MaxConnectedClusters, ModelError, Node,
};

/// Every key starts with this.
pub const ROOT: &str = "mesh/";
/// The heartbeat key.
pub const HEARTBEAT: &str = "mesh/heartbeat";
/// Prefix of all cluster-config keys.
pub const CLUSTER_CONFIG_PREFIX: &str = "mesh/cluster-config/";
/// Prefix of all synced markers.
pub const SYNCED_PREFIX: &str = "mesh/synced/";
/// Prefix of all exported state.
pub const STATE_PREFIX: &str = "mesh/state/";
/// Prefix of the kvstoremesh cache.
pub const CACHE_PREFIX: &str = "mesh/cache/";
/// Prefix of exported policies.
pub const POLICY_PREFIX: &str = "mesh/policies/v1/";
/// Prefix of the identity allocator's label-set index.
pub const IDENTITY_INDEX_PREFIX: &str = "mesh/identity-index/v1/";
/// Prefix of the identity allocator's per-replica references.
pub const IDENTITY_REFS_PREFIX: &str = "mesh/identity-refs/v1/";
const VERSION: &str = "v1";

/// The kinds of exported state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StateKind {
    /// `identities`
    Identities,
    /// `ip`
    Ip,
    /// `nodes`
    Nodes,
    /// `services`
    Services,
}

impl StateKind {
    /// Every kind, in export order.
    pub const ALL: [Self; 4] = [Self::Identities, Self::Ip, Self::Nodes, Self::Services];

    /// The path segment.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Identities => "identities",
            Self::Ip => "ip",
            Self::Nodes => "nodes",
            Self::Services => "services",
        }
    }

    /// Parses a path segment.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for StateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A key of one exported object; the same suffix is used under `state/` and `cache/`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StateKey {
    /// `identities/v1/<cluster>/<id>`
    Identity {
        /// Owning cluster.
        cluster: ClusterName,
        /// The identity.
        id: Identity,
    },
    /// `ip/v1/<cluster>/<ip>`
    Ip {
        /// Owning cluster.
        cluster: ClusterName,
        /// The endpoint IP.
        ip: IpAddr,
    },
    /// `nodes/v1/<cluster>/<node>`
    Node {
        /// Owning cluster.
        cluster: ClusterName,
        /// Node name.
        name: String,
    },
    /// `services/v1/<cluster>/<ns>/<name>`
    Service {
        /// Owning cluster.
        cluster: ClusterName,
        /// Namespace.
        namespace: String,
        /// Service name.
        name: String,
    },
}

impl StateKey {
    /// The kind of object.
    pub fn kind(&self) -> StateKind {
        match self {
            Self::Identity { .. } => StateKind::Identities,
            Self::Ip { .. } => StateKind::Ip,
            Self::Node { .. } => StateKind::Nodes,
            Self::Service { .. } => StateKind::Services,
        }
    }

    /// The cluster that owns the object.
    pub fn cluster(&self) -> &ClusterName {
        match self {
            Self::Identity { cluster, .. }
            | Self::Ip { cluster, .. }
            | Self::Node { cluster, .. }
            | Self::Service { cluster, .. } => cluster,
        }
    }

    fn fmt_suffix(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Identity { id, .. } => write!(f, "{id}"),
            Self::Ip { ip, .. } => write!(f, "{ip}"),
            Self::Node { name, .. } => f.write_str(name),
            Self::Service {
                namespace, name, ..
            } => write!(f, "{namespace}/{name}"),
        }
    }

    /// Parses `<cluster>/<rest...>` for `kind`.
    fn parse_tail(kind: StateKind, tail: &str) -> Result<Self, &'static str> {
        let (cluster, rest) = tail.split_once('/').ok_or("missing object name")?;
        let cluster = ClusterName::new(cluster).map_err(|_| "invalid cluster name")?;
        match kind {
            StateKind::Identities => {
                let id = parse_canonical_u32(rest).ok_or("identity is not a decimal number")?;
                let id = Identity::from_raw(id).map_err(|_| "identity out of 24-bit range")?;
                Ok(Self::Identity { cluster, id })
            }
            StateKind::Ip => {
                let ip: IpAddr = rest.parse().map_err(|_| "not an IP address")?;
                if ip.to_string() != rest {
                    return Err("IP address not in canonical form");
                }
                Ok(Self::Ip { cluster, ip })
            }
            StateKind::Nodes => {
                if !crate::model::is_dns_subdomain(rest) {
                    return Err("node name is not an RFC 1123 subdomain");
                }
                Ok(Self::Node {
                    cluster,
                    name: rest.to_owned(),
                })
            }
            StateKind::Services => {
                let (ns, name) = rest.split_once('/').ok_or("missing service name")?;
                if !crate::model::is_dns_label(ns, 63) || !crate::model::is_dns_label(name, 63) {
                    return Err("namespace or service name is not an RFC 1123 label");
                }
                Ok(Self::Service {
                    cluster,
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                })
            }
        }
    }
}

/// Splits `<kind>/v1/<rest>`.
fn versioned(tail: &str) -> Result<(StateKind, &str), &'static str> {
    let (kind, tail) = tail.split_once('/').ok_or("missing kind")?;
    let kind = StateKind::parse(kind).ok_or("unknown kind")?;
    let tail = tail
        .strip_prefix("v1/")
        .ok_or("unknown or missing version segment")?;
    Ok((kind, tail))
}

fn parse_canonical_u32(s: &str) -> Option<u32> {
    if s.is_empty() || (s.len() > 1 && s.starts_with('0')) || !s.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    s.parse().ok()
}

/// Every key of the schema.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// `mesh/cluster-config/<cluster>`
    ClusterConfig(ClusterName),
    /// `mesh/heartbeat`
    Heartbeat,
    /// `mesh/synced/<cluster>/<kind>`
    Synced {
        /// Cluster whose export is complete.
        cluster: ClusterName,
        /// Kind that is complete.
        kind: StateKind,
    },
    /// `mesh/state/<kind>/v1/<cluster>/...`
    State(StateKey),
    /// `mesh/cache/<kind>/v1/<remote>/...` (kvstoremesh mirror of a peer's state)
    Cache(StateKey),
    /// `mesh/cache/cluster-config/<remote>` (mirrored cluster-config of a peer)
    CacheClusterConfig(ClusterName),
    /// `mesh/cache/synced/<remote>/<kind>` (kvstoremesh finished mirroring that kind)
    CacheSynced {
        /// The mirrored peer.
        cluster: ClusterName,
        /// Kind that is complete.
        kind: StateKind,
    },
    /// `mesh/cache/heartbeat/<remote>` (kvstoremesh's copy of the peer's heartbeat)
    CacheHeartbeat(ClusterName),
    /// `mesh/clusterset-ips/v1/<ns>/<name>`
    ClusterSetIp {
        /// Namespace of the global service.
        namespace: String,
        /// Name of the global service.
        name: String,
    },
    /// `mesh/clusterset-ips/by-ip/<ip>`
    ClusterSetIpByIp(IpAddr),
    /// `mesh/policies/v1/<cluster>/<ns>/<name>` (local agents only; peers cannot read it)
    Policy {
        /// Cluster of the policy.
        cluster: ClusterName,
        /// Namespace.
        namespace: String,
        /// Policy name.
        name: String,
    },
    /// `mesh/identity-index/v1/<cluster>/<labels joined by ';'>`: label set → identity,
    /// the allocator's uniqueness guard (private to the cluster).
    IdentityIndex {
        /// Owning cluster.
        cluster: ClusterName,
        /// The label set.
        labels: Labels,
    },
    /// `mesh/identity-refs/v1/<cluster>/<id>/<owner>`: `owner` (an apiserver replica)
    /// uses identity `id`; leased, so a dead replica's references vanish.
    IdentityRef {
        /// Owning cluster.
        cluster: ClusterName,
        /// The identity.
        id: Identity,
        /// The replica holding the reference.
        owner: String,
    },
}

/// A key that is not part of the schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key {key:?} does not parse: {reason}")]
pub struct KeyError {
    /// The offending key (lossy UTF-8).
    pub key: String,
    /// What is wrong.
    pub reason: &'static str,
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ClusterConfig(c) => write!(f, "{CLUSTER_CONFIG_PREFIX}{c}"),
            Self::Heartbeat => f.write_str(HEARTBEAT),
            Self::Synced { cluster, kind } => write!(f, "{SYNCED_PREFIX}{cluster}/{kind}"),
            Self::State(s) => {
                write!(f, "{STATE_PREFIX}{}/{VERSION}/{}/", s.kind(), s.cluster())?;
                s.fmt_suffix(f)
            }
            Self::Cache(s) => {
                write!(f, "{CACHE_PREFIX}{}/{VERSION}/{}/", s.kind(), s.cluster())?;
                s.fmt_suffix(f)
            }
            Self::CacheClusterConfig(c) => write!(f, "{CACHE_PREFIX}cluster-config/{c}"),
            Self::CacheSynced { cluster, kind } => {
                write!(f, "{CACHE_PREFIX}synced/{cluster}/{kind}")
            }
            Self::CacheHeartbeat(c) => write!(f, "{CACHE_PREFIX}heartbeat/{c}"),
            Self::ClusterSetIp { namespace, name } => {
                write!(f, "mesh/clusterset-ips/{VERSION}/{namespace}/{name}")
            }
            Self::ClusterSetIpByIp(ip) => write!(f, "mesh/clusterset-ips/by-ip/{ip}"),
            Self::Policy {
                cluster,
                namespace,
                name,
            } => write!(f, "{POLICY_PREFIX}{cluster}/{namespace}/{name}"),
            Self::IdentityIndex { cluster, labels } => {
                write!(f, "{IDENTITY_INDEX_PREFIX}{cluster}/")?;
                for (i, l) in labels.iter().enumerate() {
                    if i > 0 {
                        f.write_str(";")?;
                    }
                    write!(f, "{l}")?;
                }
                Ok(())
            }
            Self::IdentityRef { cluster, id, owner } => {
                write!(f, "{IDENTITY_REFS_PREFIX}{cluster}/{id}/{owner}")
            }
        }
    }
}

impl Key {
    /// Parses a raw etcd key.
    pub fn parse_bytes(key: &[u8]) -> Result<Self, KeyError> {
        let s = std::str::from_utf8(key).map_err(|_| KeyError {
            key: String::from_utf8_lossy(key).into_owned(),
            reason: "not UTF-8",
        })?;
        Self::parse(s)
    }

    /// Parses a key.
    pub fn parse(key: &str) -> Result<Self, KeyError> {
        Self::parse_inner(key).map_err(|reason| KeyError {
            key: key.to_owned(),
            reason,
        })
    }

    fn parse_inner(key: &str) -> Result<Self, &'static str> {
        let rest = key.strip_prefix(ROOT).ok_or("does not start with mesh/")?;
        if rest == "heartbeat" {
            return Ok(Self::Heartbeat);
        }
        let (head, tail) = rest.split_once('/').ok_or("unknown key")?;
        let cluster = |s: &str| ClusterName::new(s).map_err(|_| "invalid cluster name");
        let synced = |tail: &str| -> Result<(ClusterName, StateKind), &'static str> {
            let (c, k) = tail.split_once('/').ok_or("missing kind")?;
            Ok((cluster(c)?, StateKind::parse(k).ok_or("unknown kind")?))
        };
        match head {
            "cluster-config" => Ok(Self::ClusterConfig(cluster(tail)?)),
            "synced" => synced(tail).map(|(cluster, kind)| Self::Synced { cluster, kind }),
            "state" => {
                let (kind, tail) = versioned(tail)?;
                StateKey::parse_tail(kind, tail).map(Self::State)
            }
            "cache" => {
                if let Some(c) = tail.strip_prefix("cluster-config/") {
                    return Ok(Self::CacheClusterConfig(cluster(c)?));
                }
                if let Some(c) = tail.strip_prefix("heartbeat/") {
                    return Ok(Self::CacheHeartbeat(cluster(c)?));
                }
                if let Some(t) = tail.strip_prefix("synced/") {
                    return synced(t).map(|(cluster, kind)| Self::CacheSynced { cluster, kind });
                }
                let (kind, tail) = versioned(tail)?;
                StateKey::parse_tail(kind, tail).map(Self::Cache)
            }
            "clusterset-ips" => {
                if let Some(ip) = tail.strip_prefix("by-ip/") {
                    let parsed: IpAddr = ip.parse().map_err(|_| "not an IP address")?;
                    if parsed.to_string() != ip {
                        return Err("IP address not in canonical form");
                    }
                    return Ok(Self::ClusterSetIpByIp(parsed));
                }
                let tail = tail.strip_prefix("v1/").ok_or("unknown version segment")?;
                let (ns, name) = tail.split_once('/').ok_or("missing service name")?;
                if !crate::model::is_dns_label(ns, 63) || !crate::model::is_dns_label(name, 63) {
                    return Err("namespace or service name is not an RFC 1123 label");
                }
                Ok(Self::ClusterSetIp {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                })
            }
            "policies" => {
                let tail = tail.strip_prefix("v1/").ok_or("unknown version segment")?;
                let (c, rest) = tail.split_once('/').ok_or("missing namespace")?;
                let (ns, name) = rest.split_once('/').ok_or("missing policy name")?;
                if !crate::model::is_dns_label(ns, 63) || !crate::model::is_dns_subdomain(name) {
                    return Err("namespace or policy name is not valid");
                }
                Ok(Self::Policy {
                    cluster: cluster(c)?,
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                })
            }
            "identity-index" => {
                let tail = tail.strip_prefix("v1/").ok_or("unknown version segment")?;
                let (c, labels) = tail.split_once('/').ok_or("missing label set")?;
                let labels = Labels::parse(labels.split(';').filter(|s| !s.is_empty()))
                    .map_err(|_| "invalid label set")?;
                if labels.is_empty() {
                    return Err("empty label set");
                }
                Ok(Self::IdentityIndex {
                    cluster: cluster(c)?,
                    labels,
                })
            }
            "identity-refs" => {
                let tail = tail.strip_prefix("v1/").ok_or("unknown version segment")?;
                let (c, rest) = tail.split_once('/').ok_or("missing identity")?;
                let (id, owner) = rest.split_once('/').ok_or("missing owner")?;
                let id = parse_canonical_u32(id).ok_or("identity is not a decimal number")?;
                let id = Identity::from_raw(id).map_err(|_| "identity out of 24-bit range")?;
                if !crate::model::is_dns_subdomain(owner) {
                    return Err("owner is not an RFC 1123 subdomain");
                }
                Ok(Self::IdentityRef {
                    cluster: cluster(c)?,
                    id,
                    owner: owner.to_owned(),
                })
            }
            _ => Err("unknown key"),
        }
    }
}

/// `mesh/state/<kind>/v1/<cluster>/`: where one cluster exports one kind.
pub fn state_prefix(kind: StateKind, cluster: &ClusterName) -> String {
    format!("{STATE_PREFIX}{kind}/{VERSION}/{cluster}/")
}

/// `mesh/cache/<kind>/v1/<remote>/`: where kvstoremesh mirrors one peer's kind.
pub fn cache_prefix(kind: StateKind, remote: &ClusterName) -> String {
    format!("{CACHE_PREFIX}{kind}/{VERSION}/{remote}/")
}

/// `mesh/cache/<kind>/v1/`: where kvstoremesh mirrors one kind of every peer.
pub fn cache_kind_prefix(kind: StateKind) -> String {
    format!("{CACHE_PREFIX}{kind}/{VERSION}/")
}

/// The exclusive end of a prefix range (etcd `range_end` for a prefix).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Why a key/value pair read from the store was dropped (the metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// The key does not parse, or is not of the kind/cluster of the prefix.
    BadKey,
    /// The value is not valid JSON for the kind.
    BadValue,
    /// The value parses but fails validation.
    InvalidValue,
    /// The value names another cluster than its key.
    ForeignCluster,
    /// The value disagrees with its key (other name, IP or identity).
    Mismatch,
    /// An identity outside the cluster's range.
    IdentityOutOfRange,
}

impl DropReason {
    /// Every reason.
    pub const ALL: [Self; 6] = [
        Self::BadKey,
        Self::BadValue,
        Self::InvalidValue,
        Self::ForeignCluster,
        Self::Mismatch,
        Self::IdentityOutOfRange,
    ];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadKey => "bad-key",
            Self::BadValue => "bad-value",
            Self::InvalidValue => "invalid-value",
            Self::ForeignCluster => "foreign-cluster",
            Self::Mismatch => "mismatch",
            Self::IdentityOutOfRange => "identity-out-of-range",
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A key/value pair from the store that cannot be accepted.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The key is not a schema key, or not one the reader expects here.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The value is not JSON of the expected shape.
    #[error("value of {key} does not parse: {source}")]
    Json {
        /// The key.
        key: String,
        /// The JSON error (names line/column and field).
        #[source]
        source: serde_json::Error,
    },
    /// The value parses but is invalid.
    #[error("value of {key} is invalid: {source}")]
    Invalid {
        /// The key.
        key: String,
        /// The validation error.
        #[source]
        source: ModelError,
    },
    /// The value names another cluster.
    #[error("value of {key} names cluster {found:?}, not {expected:?}")]
    ForeignCluster {
        /// The key.
        key: String,
        /// The cluster of the key.
        expected: String,
        /// The cluster named in the value.
        found: String,
    },
    /// The value disagrees with its key.
    #[error("value of {key} has {field} {found:?}, but the key says {expected:?}")]
    Mismatch {
        /// The key.
        key: String,
        /// Which field disagrees.
        field: &'static str,
        /// What the key says.
        expected: String,
        /// What the value says.
        found: String,
    },
    /// An identity outside the owning cluster's range.
    #[error("value of {key}: {source}")]
    IdentityOutOfRange {
        /// The key.
        key: String,
        /// Which check failed.
        #[source]
        source: ModelError,
    },
}

impl DecodeError {
    /// The metric label for this error.
    pub fn reason(&self) -> DropReason {
        match self {
            Self::Key(_) => DropReason::BadKey,
            Self::Json { .. } => DropReason::BadValue,
            Self::Invalid { .. } => DropReason::InvalidValue,
            Self::ForeignCluster { .. } => DropReason::ForeignCluster,
            Self::Mismatch { .. } => DropReason::Mismatch,
            Self::IdentityOutOfRange { .. } => DropReason::IdentityOutOfRange,
        }
    }
}

/// An exported object, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateValue {
    /// An identity and its labels.
    Identity(IdentityEntry),
    /// An ipcache entry.
    Ip(IpCacheEntry),
    /// A node.
    Node(Node),
    /// A service.
    Service(ClusterService),
}

/// The owning cluster's ID and mode, for identity range checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentityScope {
    /// The cluster's ID.
    pub cluster_id: ClusterId,
    /// The mesh mode.
    pub mode: MaxConnectedClusters,
}

impl IdentityScope {
    /// The scope of a cluster config.
    pub fn of(cfg: &ClusterConfig) -> Self {
        Self {
            cluster_id: cfg.id,
            mode: cfg.max_connected_clusters,
        }
    }
}

/// A hash of a stored value, for writers that compare what etcd holds with what they want
/// without keeping a second copy of every value (in-process only; not stable across
/// builds).
pub fn value_hash(v: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

/// Serializes a value of the schema.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain structs into memory cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// Deserializes a value read under `key`.
pub fn decode_json<T: DeserializeOwned>(
    key: &impl fmt::Display,
    value: &[u8],
) -> Result<T, DecodeError> {
    serde_json::from_slice(value).map_err(|source| DecodeError::Json {
        key: key.to_string(),
        source,
    })
}

fn mismatch(
    key: &StateKey,
    field: &'static str,
    expected: impl fmt::Display,
    found: impl fmt::Display,
) -> DecodeError {
    DecodeError::Mismatch {
        key: Key::State(key.clone()).to_string(),
        field,
        expected: expected.to_string(),
        found: found.to_string(),
    }
}

fn foreign(key: &StateKey, found: &str) -> DecodeError {
    DecodeError::ForeignCluster {
        key: Key::State(key.clone()).to_string(),
        expected: key.cluster().to_string(),
        found: found.to_owned(),
    }
}

fn check_identity(
    key: &StateKey,
    id: Identity,
    scope: Option<IdentityScope>,
) -> Result<(), DecodeError> {
    match scope {
        Some(s) => {
            id.check_scope(s.cluster_id, s.mode)
                .map_err(|source| DecodeError::IdentityOutOfRange {
                    key: Key::State(key.clone()).to_string(),
                    source,
                })
        }
        None => Ok(()),
    }
}

fn check_cluster_id(
    key: &StateKey,
    id: ClusterId,
    scope: Option<IdentityScope>,
) -> Result<(), DecodeError> {
    match scope {
        Some(s) if s.cluster_id != id => Err(mismatch(key, "clusterId", s.cluster_id, id)),
        _ => Ok(()),
    }
}

/// Decodes the value of an exported object and checks it against its key (and, with a
/// scope, against the owning cluster's ID range).
pub fn decode_state(
    key: &StateKey,
    value: &[u8],
    scope: Option<IdentityScope>,
) -> Result<StateValue, DecodeError> {
    let k = || Key::State(key.clone());
    match key {
        StateKey::Identity { cluster, id } => {
            let e: IdentityEntry = decode_json(&k(), value)?;
            if e.id != *id {
                return Err(mismatch(key, "id", id, e.id));
            }
            match e.labels.cluster() {
                Some(c) if c == cluster.as_str() => {}
                Some(c) => return Err(foreign(key, c)),
                None => {
                    return Err(DecodeError::Invalid {
                        key: k().to_string(),
                        source: ModelError::Field {
                            field: "identity labels",
                            reason: "missing mesh:io.meshd.cluster".into(),
                        },
                    });
                }
            }
            check_identity(key, e.id, scope)?;
            Ok(StateValue::Identity(e))
        }
        StateKey::Ip { ip, .. } => {
            let e: IpCacheEntry = decode_json(&k(), value)?;
            if e.ip != *ip {
                return Err(mismatch(key, "ip", ip, e.ip));
            }
            e.validate().map_err(|source| DecodeError::Invalid {
                key: k().to_string(),
                source,
            })?;
            check_identity(key, e.identity, scope)?;
            Ok(StateValue::Ip(e))
        }
        StateKey::Node { cluster, name } => {
            let n: Node = decode_json(&k(), value)?;
            if n.cluster != *cluster {
                return Err(foreign(key, n.cluster.as_str()));
            }
            if n.name != *name {
                return Err(mismatch(key, "name", name, &n.name));
            }
            check_cluster_id(key, n.cluster_id, scope)?;
            Ok(StateValue::Node(n))
        }
        StateKey::Service {
            cluster,
            namespace,
            name,
        } => {
            let s: ClusterService = decode_json(&k(), value)?;
            if s.cluster != *cluster {
                return Err(foreign(key, s.cluster.as_str()));
            }
            if s.namespace != *namespace {
                return Err(mismatch(key, "namespace", namespace, &s.namespace));
            }
            if s.name != *name {
                return Err(mismatch(key, "name", name, &s.name));
            }
            s.validate().map_err(|source| DecodeError::Invalid {
                key: k().to_string(),
                source,
            })?;
            check_cluster_id(key, s.cluster_id, scope)?;
            Ok(StateValue::Service(s))
        }
    }
}

/// Encodes a heartbeat or synced-marker value (RFC 3339).
pub fn encode_time(t: time::OffsetDateTime) -> Vec<u8> {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
        .into_bytes()
}

/// Decodes a heartbeat or synced-marker value (RFC 3339).
pub fn decode_time(key: &Key, value: &[u8]) -> Result<time::OffsetDateTime, DecodeError> {
    let invalid = |reason: String| DecodeError::Invalid {
        key: key.to_string(),
        source: ModelError::Field {
            field: "timestamp",
            reason,
        },
    };
    let s = std::str::from_utf8(value).map_err(|_| invalid("not UTF-8".into()))?;
    time::OffsetDateTime::parse(s.trim(), &time::format_description::well_known::Rfc3339)
        .map_err(|e| invalid(format!("{s:?} is not RFC 3339: {e}")))
}

/// Value of `mesh/clusterset-ips/v1/<ns>/<name>` and `mesh/clusterset-ips/by-ip/<ip>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSetIpEntry {
    /// Namespace of the global service.
    pub namespace: String,
    /// Name of the global service.
    pub name: String,
    /// The ClusterSetIP.
    pub ip: IpAddr,
}

/// Decodes a cluster-config value and checks it names the cluster of its key.
pub fn decode_cluster_config(
    cluster: &ClusterName,
    value: &[u8],
) -> Result<ClusterConfig, DecodeError> {
    let key = Key::ClusterConfig(cluster.clone());
    let cfg: ClusterConfig = decode_json(&key, value)?;
    if cfg.name != *cluster {
        return Err(DecodeError::ForeignCluster {
            key: key.to_string(),
            expected: cluster.to_string(),
            found: cfg.name.to_string(),
        });
    }
    cfg.validate().map_err(|source| DecodeError::Invalid {
        key: key.to_string(),
        source,
    })?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cluster() -> impl Strategy<Value = ClusterName> {
        "[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?".prop_map(|s| ClusterName::new(s).unwrap())
    }
    fn label() -> impl Strategy<Value = String> {
        "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?"
    }
    fn ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(IpAddr::from),
            any::<[u16; 8]>().prop_map(IpAddr::from),
        ]
    }
    fn kind() -> impl Strategy<Value = StateKind> {
        prop_oneof![
            Just(StateKind::Identities),
            Just(StateKind::Ip),
            Just(StateKind::Nodes),
            Just(StateKind::Services)
        ]
    }
    fn state_key() -> impl Strategy<Value = StateKey> {
        prop_oneof![
            (cluster(), 1u32..=Identity::MAX).prop_map(|(cluster, id)| StateKey::Identity {
                cluster,
                id: Identity::from_raw(id).unwrap()
            }),
            (cluster(), ip()).prop_map(|(cluster, ip)| StateKey::Ip { cluster, ip }),
            (cluster(), proptest::collection::vec(label(), 1..4)).prop_map(|(cluster, parts)| {
                StateKey::Node {
                    cluster,
                    name: parts.join("."),
                }
            }),
            (cluster(), label(), label()).prop_map(|(cluster, namespace, name)| {
                StateKey::Service {
                    cluster,
                    namespace,
                    name,
                }
            }),
        ]
    }
    fn key() -> impl Strategy<Value = Key> {
        prop_oneof![
            cluster().prop_map(Key::ClusterConfig),
            Just(Key::Heartbeat),
            (cluster(), kind()).prop_map(|(cluster, kind)| Key::Synced { cluster, kind }),
            state_key().prop_map(Key::State),
            state_key().prop_map(Key::Cache),
            cluster().prop_map(Key::CacheClusterConfig),
            cluster().prop_map(Key::CacheHeartbeat),
            (cluster(), kind()).prop_map(|(cluster, kind)| Key::CacheSynced { cluster, kind }),
            (label(), label()).prop_map(|(namespace, name)| Key::ClusterSetIp { namespace, name }),
            ip().prop_map(Key::ClusterSetIpByIp),
            (cluster(), label(), proptest::collection::vec(label(), 1..4)).prop_map(
                |(cluster, namespace, parts)| Key::Policy {
                    cluster,
                    namespace,
                    name: parts.join(".")
                }
            ),
            (
                cluster(),
                proptest::collection::btree_map(label(), label(), 1..5)
            )
                .prop_map(|(cluster, m)| {
                    let mut v: Vec<String> =
                        m.iter().map(|(k, v)| format!("k8s:{k}={v}")).collect();
                    v.push(format!("mesh:io.meshd.cluster={cluster}"));
                    Key::IdentityIndex {
                        labels: Labels::parse(v.iter().map(String::as_str)).unwrap(),
                        cluster,
                    }
                }),
            (cluster(), 1u32..=Identity::MAX, label()).prop_map(|(cluster, id, owner)| {
                Key::IdentityRef {
                    cluster,
                    id: Identity::from_raw(id).unwrap(),
                    owner,
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn every_key_round_trips(k in key()) {
            let s = k.to_string();
            prop_assert!(s.starts_with(ROOT));
            prop_assert_eq!(Key::parse(&s).unwrap(), k);
        }

        #[test]
        fn arbitrary_text_never_panics(s in "mesh/[a-z0-9/:.\\-]{0,60}") {
            let _ = Key::parse(&s);
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = Key::parse_bytes(&b);
            let k = StateKey::Ip { cluster: ClusterName::new("east").unwrap(), ip: [198, 18, 0, 1].into() };
            let _ = decode_state(&k, &b, None);
        }
    }

    #[test]
    fn known_spellings() {
        let east = ClusterName::new("east").unwrap();
        let cases = [
            (Key::ClusterConfig(east.clone()), "mesh/cluster-config/east"),
            (Key::Heartbeat, "mesh/heartbeat"),
            (
                Key::Synced {
                    cluster: east.clone(),
                    kind: StateKind::Services,
                },
                "mesh/synced/east/services",
            ),
            (
                Key::State(StateKey::Identity {
                    cluster: east.clone(),
                    id: Identity::from_raw(65792).unwrap(),
                }),
                "mesh/state/identities/v1/east/65792",
            ),
            (
                Key::State(StateKey::Ip {
                    cluster: east.clone(),
                    ip: "198.18.0.5".parse().unwrap(),
                }),
                "mesh/state/ip/v1/east/198.18.0.5",
            ),
            (
                Key::Cache(StateKey::Service {
                    cluster: east.clone(),
                    namespace: "default".into(),
                    name: "web".into(),
                }),
                "mesh/cache/services/v1/east/default/web",
            ),
            (
                Key::ClusterSetIpByIp("198.19.0.1".parse().unwrap()),
                "mesh/clusterset-ips/by-ip/198.19.0.1",
            ),
        ];
        for (k, s) in cases {
            assert_eq!(k.to_string(), s);
            assert_eq!(Key::parse(s).unwrap(), k);
        }
        assert_eq!(state_prefix(StateKind::Ip, &east), "mesh/state/ip/v1/east/");
    }

    #[test]
    fn bad_keys_are_errors() {
        for bad in [
            "",
            "mesh/",
            "other/heartbeat",
            "mesh/state/ip/v2/east/198.18.0.1",
            "mesh/state/ip/v1/East/198.18.0.1",
            "mesh/state/ip/v1/east/198.18.0.300",
            "mesh/state/ip/v1/east/::0:1",
            "mesh/state/identities/v1/east/0065792",
            "mesh/state/identities/v1/east/0",
            "mesh/state/identities/v1/east/99999999",
            "mesh/state/services/v1/east/default",
            "mesh/state/pods/v1/east/x",
            "mesh/synced/east/pods",
        ] {
            let e = Key::parse(bad).unwrap_err();
            assert!(e.to_string().contains("does not parse"), "{bad}: {e}");
        }
        assert_eq!(
            Key::parse_bytes(b"mesh/\xff").unwrap_err().reason,
            "not UTF-8"
        );
    }

    #[test]
    fn values_checked_against_keys() {
        let east = ClusterName::new("east").unwrap();
        let m = MaxConnectedClusters::C255;
        let scope = IdentityScope {
            cluster_id: ClusterId::new(1, m).unwrap(),
            mode: m,
        };
        let ipk = StateKey::Ip {
            cluster: east.clone(),
            ip: "198.18.0.5".parse().unwrap(),
        };
        let good = br#"{"ip":"198.18.0.5","prefixLen":32,"identity":65792}"#;
        assert!(matches!(
            decode_state(&ipk, good, Some(scope)).unwrap(),
            StateValue::Ip(_)
        ));
        let other_ip = br#"{"ip":"198.18.0.6","prefixLen":32,"identity":65792}"#;
        assert_eq!(
            decode_state(&ipk, other_ip, Some(scope))
                .unwrap_err()
                .reason(),
            DropReason::Mismatch
        );
        let foreign_id = br#"{"ip":"198.18.0.5","prefixLen":32,"identity":131328}"#;
        assert_eq!(
            decode_state(&ipk, foreign_id, Some(scope))
                .unwrap_err()
                .reason(),
            DropReason::IdentityOutOfRange
        );
        assert_eq!(
            decode_state(&ipk, b"{not json", Some(scope))
                .unwrap_err()
                .reason(),
            DropReason::BadValue
        );
        let bad_prefix = br#"{"ip":"198.18.0.5","prefixLen":33,"identity":65792}"#;
        assert_eq!(
            decode_state(&ipk, bad_prefix, Some(scope))
                .unwrap_err()
                .reason(),
            DropReason::InvalidValue
        );
        let nk = StateKey::Node {
            cluster: east.clone(),
            name: "n1".into(),
        };
        let foreign_node = br#"{"name":"n1","cluster":"west","clusterId":1}"#;
        let e = decode_state(&nk, foreign_node, Some(scope)).unwrap_err();
        assert_eq!(e.reason(), DropReason::ForeignCluster);
        assert!(e.to_string().contains("names cluster \"west\""), "{e}");
        let idk = StateKey::Identity {
            cluster: east.clone(),
            id: Identity::from_raw(65792).unwrap(),
        };
        let foreign_labels = br#"{"id":65792,"labels":["mesh:io.meshd.cluster=west"]}"#;
        assert_eq!(
            decode_state(&idk, foreign_labels, Some(scope))
                .unwrap_err()
                .reason(),
            DropReason::ForeignCluster
        );
        let ok = br#"{"id":65792,"labels":["k8s:app=web","mesh:io.meshd.cluster=east"]}"#;
        assert!(decode_state(&idk, ok, Some(scope)).is_ok());
        let cfg = decode_cluster_config(
            &east,
            br#"{"id":1,"name":"west","maxConnectedClusters":255}"#,
        )
        .unwrap_err();
        assert_eq!(cfg.reason(), DropReason::ForeignCluster);
    }
}
