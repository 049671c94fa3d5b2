//! Cluster names, cluster IDs, the max-connected-clusters mode and the cluster-config value.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A value of the model that failed validation. Retrying never helps: the input is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// A cluster name is not an RFC 1123 label of at most 32 characters.
    #[error(
        "invalid cluster name {0:?}: must be a lowercase RFC 1123 label of at most 32 characters"
    )]
    ClusterName(String),
    /// A cluster ID is 0 or above the mesh's maximum.
    #[error("invalid cluster ID {id}: must be 1..={max} (max-connected-clusters {max})")]
    ClusterId {
        /// The rejected ID.
        id: u32,
        /// The highest ID the mode allows.
        max: u16,
    },
    /// max-connected-clusters is neither 255 nor 511.
    #[error("invalid max-connected-clusters {0}: must be 255 or 511")]
    MaxConnectedClusters(u32),
    /// An identity is out of range for what it claims to be.
    #[error("invalid identity {id}: {reason}")]
    Identity {
        /// The rejected numeric identity.
        id: u32,
        /// Why it is out of range.
        reason: String,
    },
    /// A label does not have the `source:key=value` form or a valid key/value.
    #[error("invalid label {label:?}: {reason}")]
    Label {
        /// The rejected label text.
        label: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A label selector is malformed.
    #[error("invalid label selector: {0}")]
    Selector(String),
    /// A field of a model value is malformed.
    #[error("invalid {field}: {reason}")]
    Field {
        /// Which field (e.g. `service port`).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// A cluster's name: an RFC 1123 label (`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`), at most 32 chars.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ClusterName(String);

impl ClusterName {
    /// Longest allowed cluster name.
    pub const MAX_LEN: usize = 32;

    /// Validates and wraps a cluster name.
    pub fn new(name: impl Into<String>) -> Result<Self, ModelError> {
        let name = name.into();
        if super::is_dns_label(&name, Self::MAX_LEN) {
            Ok(Self(name))
        } else {
            Err(ModelError::ClusterName(name))
        }
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ClusterName {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl<'de> Deserialize<'de> for ClusterName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl AsRef<str> for ClusterName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// How many clusters a mesh can connect; fixes the cluster-ID range and the identity layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MaxConnectedClusters {
    /// IDs 1–255, identities `cluster_id << 16 | local` with local 256–65535.
    #[default]
    C255,
    /// IDs 1–511, identities `cluster_id << 15 | local` with local 256–32767.
    C511,
}

impl MaxConnectedClusters {
    /// The number as configured (255 or 511).
    pub fn get(self) -> u16 {
        match self {
            Self::C255 => 255,
            Self::C511 => 511,
        }
    }

    /// Parses the configured number.
    pub fn from_u32(n: u32) -> Result<Self, ModelError> {
        match n {
            255 => Ok(Self::C255),
            511 => Ok(Self::C511),
            other => Err(ModelError::MaxConnectedClusters(other)),
        }
    }

    /// Bits the cluster ID is shifted by inside a cluster-scoped identity.
    pub fn cluster_shift(self) -> u32 {
        match self {
            Self::C255 => 16,
            Self::C511 => 15,
        }
    }

    /// Highest local identity number (the lowest is 256).
    pub fn max_local(self) -> u32 {
        (1 << self.cluster_shift()) - 1
    }
}

impl fmt::Display for MaxConnectedClusters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.get())
    }
}

impl FromStr for MaxConnectedClusters {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let n: u32 = s
            .parse()
            .map_err(|_| ModelError::MaxConnectedClusters(u32::MAX))?;
        Self::from_u32(n)
    }
}

impl Serialize for MaxConnectedClusters {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u16(self.get())
    }
}

impl<'de> Deserialize<'de> for MaxConnectedClusters {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::from_u32(u32::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// A cluster's numeric ID: 1–255, or 1–511 with max-connected-clusters 511. Never 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClusterId(u16);

impl ClusterId {
    /// Validates an ID against the mesh mode.
    pub fn new(id: u32, mode: MaxConnectedClusters) -> Result<Self, ModelError> {
        if id == 0 || id > u32::from(mode.get()) {
            return Err(ModelError::ClusterId {
                id,
                max: mode.get(),
            });
        }
        Ok(Self(id as u16))
    }

    /// The numeric value.
    pub fn get(self) -> u16 {
        self.0
    }

    /// Whether this ID fits the given mode (an ID read with one mode and used with another).
    pub fn fits(self, mode: MaxConnectedClusters) -> bool {
        self.0 >= 1 && self.0 <= mode.get()
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What a cluster's exporter supports, advertised in its cluster-config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Capabilities {
    /// The exporter writes `mesh/synced/<cluster>/<kind>` markers.
    pub synced_canaries: bool,
    /// This etcd holds a kvstoremesh cache of peers (`mesh/cache/...`).
    pub cached: bool,
    /// Services are exported with MCS `ServiceExport` as well as the global annotation.
    pub service_exports: bool,
}

/// `mesh/cluster-config/<cluster>`: who a cluster is and how its mesh is configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterConfig {
    /// The cluster's numeric ID.
    pub id: ClusterId,
    /// The cluster's name.
    pub name: ClusterName,
    /// The mesh mode; every cluster of a mesh must agree.
    pub max_connected_clusters: MaxConnectedClusters,
    /// What the exporter supports.
    #[serde(default)]
    pub capabilities: Capabilities,
}

impl ClusterConfig {
    /// Checks the ID against the declared mode.
    pub fn validate(&self) -> Result<(), ModelError> {
        ClusterId::new(u32::from(self.id.get()), self.max_connected_clusters).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names() {
        for ok in ["a", "east", "west-1", "0", "a-b-c", &"x".repeat(32)] {
            assert!(ClusterName::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "East", "a_b", "a.b", &"x".repeat(33), "é"] {
            let err = ClusterName::new(bad).unwrap_err();
            assert!(err.to_string().contains("invalid cluster name"), "{bad}");
        }
    }

    #[test]
    fn cluster_ids_per_mode() {
        assert!(ClusterId::new(0, MaxConnectedClusters::C255).is_err());
        assert!(ClusterId::new(1, MaxConnectedClusters::C255).is_ok());
        assert!(ClusterId::new(255, MaxConnectedClusters::C255).is_ok());
        assert!(ClusterId::new(256, MaxConnectedClusters::C255).is_err());
        assert!(ClusterId::new(511, MaxConnectedClusters::C511).is_ok());
        assert!(ClusterId::new(512, MaxConnectedClusters::C511).is_err());
        let e = ClusterId::new(300, MaxConnectedClusters::C255).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid cluster ID 300: must be 1..=255 (max-connected-clusters 255)"
        );
    }

    #[test]
    fn cluster_config_json() {
        let cfg: ClusterConfig = serde_json::from_str(
            r#"{"id":3,"name":"east","maxConnectedClusters":255,"capabilities":{"syncedCanaries":true}}"#,
        )
        .unwrap();
        assert_eq!(cfg.id.get(), 3);
        assert!(cfg.capabilities.synced_canaries && !cfg.capabilities.cached);
        assert!(
            serde_json::from_str::<ClusterConfig>(
                r#"{"id":3,"name":"East","maxConnectedClusters":255}"#
            )
            .is_err()
        );
        assert!(
            serde_json::from_str::<ClusterConfig>(
                r#"{"id":3,"name":"east","maxConnectedClusters":256}"#
            )
            .is_err()
        );
        let cfg: ClusterConfig =
            serde_json::from_str(r#"{"id":300,"name":"east","maxConnectedClusters":255}"#).unwrap();
        assert!(cfg.validate().is_err());
    }
}
