//! Security identities: reserved IDs and the cluster-scoped bit layout (DESIGN §3).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{ClusterId, Labels, MaxConnectedClusters, ModelError};

/// A numeric security identity (24 bits used).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Identity(u32);

/// The reserved identities, the same in every cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ReservedIdentity {
    /// The local host.
    Host = 1,
    /// Anything outside the mesh.
    World = 2,
    /// Endpoints not managed by meshd.
    Unmanaged = 3,
    /// Health-check endpoints.
    Health = 4,
    /// Endpoints whose identity is not resolved yet.
    Init = 5,
    /// Nodes other than this one: the local cluster's other nodes and every peer's.
    RemoteNode = 6,
    /// The Kubernetes API server.
    KubeApiserver = 7,
}

impl ReservedIdentity {
    /// Every reserved identity.
    pub const ALL: [Self; 7] = [
        Self::Host,
        Self::World,
        Self::Unmanaged,
        Self::Health,
        Self::Init,
        Self::RemoteNode,
        Self::KubeApiserver,
    ];

    /// The identity's label value (`reserved:<name>`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::World => "world",
            Self::Unmanaged => "unmanaged",
            Self::Health => "health",
            Self::Init => "init",
            Self::RemoteNode => "remote-node",
            Self::KubeApiserver => "kube-apiserver",
        }
    }

    /// The numeric identity.
    pub fn identity(self) -> Identity {
        Identity(self as u32)
    }
}

impl Identity {
    /// Highest value that fits in the 24 bits used.
    pub const MAX: u32 = 0x00ff_ffff;
    /// Lowest local number of a cluster-scoped identity.
    pub const MIN_LOCAL: u32 = 256;

    /// Wraps a raw value, checking only that it is non-zero and fits 24 bits.
    pub fn from_raw(id: u32) -> Result<Self, ModelError> {
        if id == 0 || id > Self::MAX {
            return Err(ModelError::Identity {
                id,
                reason: "must be 1..=16777215 (24 bits)".into(),
            });
        }
        Ok(Self(id))
    }

    /// Builds a cluster-scoped identity from a cluster ID and a local number.
    pub fn cluster_scoped(
        cluster: ClusterId,
        local: u32,
        mode: MaxConnectedClusters,
    ) -> Result<Self, ModelError> {
        if !cluster.fits(mode) {
            return Err(ModelError::Identity {
                id: local,
                reason: format!("cluster ID {cluster} does not fit max-connected-clusters {mode}"),
            });
        }
        if !(Self::MIN_LOCAL..=mode.max_local()).contains(&local) {
            return Err(ModelError::Identity {
                id: local,
                reason: format!(
                    "local identity must be {}..={} with max-connected-clusters {mode}",
                    Self::MIN_LOCAL,
                    mode.max_local()
                ),
            });
        }
        Ok(Self(
            u32::from(cluster.get()) << mode.cluster_shift() | local,
        ))
    }

    /// The raw value.
    pub fn get(self) -> u32 {
        self.0
    }

    /// Whether this is one of the reserved identities 1–255.
    pub fn is_reserved(self) -> bool {
        self.0 < Self::MIN_LOCAL
    }

    /// The cluster ID bits (0 for reserved identities).
    pub fn cluster_id(self, mode: MaxConnectedClusters) -> u32 {
        self.0 >> mode.cluster_shift()
    }

    /// The local number within its cluster.
    pub fn local(self, mode: MaxConnectedClusters) -> u32 {
        self.0 & mode.max_local()
    }

    /// Accepts the identity only if it is cluster-scoped to `cluster` (DESIGN §3: an
    /// identity received from cluster C whose cluster bits are not C's ID is rejected).
    pub fn check_scope(
        self,
        cluster: ClusterId,
        mode: MaxConnectedClusters,
    ) -> Result<(), ModelError> {
        if self.is_reserved() {
            return Err(ModelError::Identity {
                id: self.0,
                reason: "reserved identities are not exported by clusters".into(),
            });
        }
        let got = self.cluster_id(mode);
        if got != u32::from(cluster.get()) {
            return Err(ModelError::Identity {
                id: self.0,
                reason: format!("cluster bits say cluster ID {got}, expected {cluster}"),
            });
        }
        if self.local(mode) < Self::MIN_LOCAL {
            return Err(ModelError::Identity {
                id: self.0,
                reason: format!(
                    "local part {} is below {}",
                    self.local(mode),
                    Self::MIN_LOCAL
                ),
            });
        }
        Ok(())
    }

    /// The reserved identity this is, if any.
    pub fn reserved(self) -> Option<ReservedIdentity> {
        ReservedIdentity::ALL
            .into_iter()
            .find(|r| *r as u32 == self.0)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// `mesh/state/identities/v1/<cluster>/<id>`: an identity and the label set it stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityEntry {
    /// The identity.
    pub id: Identity,
    /// The label set, sorted.
    pub labels: Labels,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cid(n: u32, m: MaxConnectedClusters) -> ClusterId {
        ClusterId::new(n, m).unwrap()
    }

    #[test]
    fn layout_255() {
        let m = MaxConnectedClusters::C255;
        let id = Identity::cluster_scoped(cid(3, m), 256, m).unwrap();
        assert_eq!(id.get(), 3 << 16 | 256);
        assert_eq!(id.cluster_id(m), 3);
        assert_eq!(id.local(m), 256);
        let top = Identity::cluster_scoped(cid(255, m), 65535, m).unwrap();
        assert_eq!(top.get(), Identity::MAX);
        assert!(Identity::cluster_scoped(cid(3, m), 255, m).is_err());
        assert!(Identity::cluster_scoped(cid(3, m), 65536, m).is_err());
        assert!(id.check_scope(cid(3, m), m).is_ok());
        let e = id.check_scope(cid(4, m), m).unwrap_err().to_string();
        assert!(e.contains("expected 4"), "{e}");
    }

    #[test]
    fn layout_511() {
        let m = MaxConnectedClusters::C511;
        let id = Identity::cluster_scoped(cid(300, m), 32767, m).unwrap();
        assert_eq!(id.get(), 300 << 15 | 32767);
        assert_eq!(id.cluster_id(m), 300);
        assert_eq!(id.local(m), 32767);
        assert!(Identity::cluster_scoped(cid(300, m), 32768, m).is_err());
        assert_eq!(
            Identity::cluster_scoped(cid(511, m), 32767, m)
                .unwrap()
                .get(),
            Identity::MAX
        );
        // A 511-mode cluster ID does not fit a 255 mesh.
        assert!(Identity::cluster_scoped(cid(300, m), 300, MaxConnectedClusters::C255).is_err());
    }

    #[test]
    fn reserved() {
        assert_eq!(ReservedIdentity::World.identity().get(), 2);
        assert!(Identity::from_raw(7).unwrap().is_reserved());
        assert_eq!(
            Identity::from_raw(6).unwrap().reserved(),
            Some(ReservedIdentity::RemoteNode)
        );
        assert!(Identity::from_raw(0).is_err());
        assert!(Identity::from_raw(1 << 24).is_err());
        let m = MaxConnectedClusters::C255;
        assert!(
            Identity::from_raw(2)
                .unwrap()
                .check_scope(cid(1, m), m)
                .is_err()
        );
    }
}
