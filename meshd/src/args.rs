//! Command-line groups shared by the meshd binaries (flattened into each binary's `Args`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::kv::EtcdConfig;
use crate::model::{ClusterId, ClusterName, MaxConnectedClusters, ModelError};

/// Which cluster a process belongs to.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// Name of this cluster (RFC 1123 label, at most 32 characters).
    #[arg(long, env = "MESH_CLUSTER_NAME")]
    pub cluster_name: ClusterName,
    /// Numeric ID of this cluster (1-255, or 1-511 with --max-connected-clusters 511).
    #[arg(long, env = "MESH_CLUSTER_ID")]
    pub cluster_id: u32,
    /// Mesh size: 255 or 511. Every cluster of a mesh must use the same value.
    #[arg(long, env = "MESH_MAX_CONNECTED_CLUSTERS", default_value_t = 255)]
    pub max_connected_clusters: u32,
}

impl ClusterArgs {
    /// Validates the ID against the mode.
    pub fn resolve(&self) -> Result<(ClusterName, ClusterId, MaxConnectedClusters), ModelError> {
        let mode = MaxConnectedClusters::from_u32(self.max_connected_clusters)?;
        let id = ClusterId::new(self.cluster_id, mode)?;
        Ok((self.cluster_name.clone(), id, mode))
    }
}

/// How to reach an etcd with client certificates.
#[derive(Debug, Clone, clap::Args)]
pub struct EtcdArgs {
    /// etcd endpoint(s), e.g. https://127.0.0.1:2379 (comma-separated or repeated).
    #[arg(
        long = "etcd-endpoint",
        env = "MESH_ETCD_ENDPOINTS",
        value_delimiter = ',',
        required = true
    )]
    pub endpoints: Vec<String>,
    /// CA bundle (PEM) that signed etcd's server certificate.
    #[arg(long = "etcd-ca", env = "MESH_ETCD_CA")]
    pub ca: PathBuf,
    /// Client certificate (PEM); its CN is the etcd user.
    #[arg(long = "etcd-cert", env = "MESH_ETCD_CERT")]
    pub cert: PathBuf,
    /// Client key (PEM).
    #[arg(long = "etcd-key", env = "MESH_ETCD_KEY")]
    pub key: PathBuf,
    /// Server name to verify etcd's certificate against (default: the endpoint host).
    #[arg(long = "etcd-server-name", env = "MESH_ETCD_SERVER_NAME")]
    pub server_name: Option<String>,
}

/// A file named on the command line could not be read.
#[derive(Debug, thiserror::Error)]
#[error("reading {what} {path}: {source}")]
pub struct ArgFileError {
    /// What the file is (e.g. `--etcd-ca`).
    pub what: &'static str,
    /// The path.
    pub path: PathBuf,
    /// Cause.
    #[source]
    pub source: std::io::Error,
}

fn read(what: &'static str, path: &Path) -> Result<String, ArgFileError> {
    std::fs::read_to_string(path).map_err(|source| ArgFileError {
        what,
        path: path.to_owned(),
        source,
    })
}

impl EtcdArgs {
    /// Reads the files into a store configuration.
    pub fn load(&self) -> Result<EtcdConfig, ArgFileError> {
        Ok(EtcdConfig {
            endpoints: self.endpoints.clone(),
            ca_pem: Some(read("--etcd-ca", &self.ca)?),
            cert_pem: Some(read("--etcd-cert", &self.cert)?),
            key_pem: Some(read("--etcd-key", &self.key)?),
            tls_server_name: self.server_name.clone(),
            user: None,
            connect_timeout: Some(Duration::from_secs(5)),
            request_timeout: Some(Duration::from_secs(15)),
        })
    }
}

/// Parses durations like `15s`, `500ms`, `5m`, `1h` (for `value_parser`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?}: missing unit (ms, s, m, h)"))?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("{s:?}: not a number"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        other => Err(format!("{s:?}: unknown unit {other:?} (ms, s, m, h)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("x5s").is_err());
    }

    #[test]
    fn cluster_args_validate() {
        let a = ClusterArgs {
            cluster_name: ClusterName::new("east").unwrap(),
            cluster_id: 300,
            max_connected_clusters: 255,
        };
        assert!(a.resolve().unwrap_err().to_string().contains("300"));
        let a = ClusterArgs {
            max_connected_clusters: 511,
            ..a
        };
        assert_eq!(a.resolve().unwrap().1.get(), 300);
    }
}

/// Per-peer quotas (see [`crate::trust::PeerLimits`]; the defaults fit a peer of 5,000
/// nodes and 500,000 pods).
#[derive(Debug, Clone, clap::Args)]
pub struct PeerLimitArgs {
    /// Identities accepted per peer.
    #[arg(long, env = "MESH_PEER_MAX_IDENTITIES", default_value_t = 65_536)]
    pub peer_max_identities: usize,
    /// ipcache entries (endpoint IPs) accepted per peer.
    #[arg(long, env = "MESH_PEER_MAX_IPS", default_value_t = 1_000_000)]
    pub peer_max_ips: usize,
    /// Nodes accepted per peer.
    #[arg(long, env = "MESH_PEER_MAX_NODES", default_value_t = 10_000)]
    pub peer_max_nodes: usize,
    /// Services accepted per peer (this also bounds the ClusterSetIPs a peer can take).
    #[arg(long, env = "MESH_PEER_MAX_SERVICES", default_value_t = 50_000)]
    pub peer_max_services: usize,
    /// Largest value accepted from a peer, in bytes.
    #[arg(long, env = "MESH_PEER_MAX_VALUE_BYTES", default_value_t = 1 << 20)]
    pub peer_max_value_bytes: usize,
    /// Bytes of values held per peer.
    #[arg(long, env = "MESH_PEER_MAX_BYTES", default_value_t = 512 << 20)]
    pub peer_max_bytes: u64,
}

impl PeerLimitArgs {
    /// The limits these flags set.
    pub fn limits(&self) -> crate::trust::PeerLimits {
        crate::trust::PeerLimits {
            max_identities: self.peer_max_identities,
            max_ips: self.peer_max_ips,
            max_nodes: self.peer_max_nodes,
            max_services: self.peer_max_services,
            max_value_bytes: self.peer_max_value_bytes,
            max_total_bytes: self.peer_max_bytes,
            ..crate::trust::PeerLimits::default()
        }
    }
}
