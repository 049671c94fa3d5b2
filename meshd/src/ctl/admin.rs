//! Admin kubeconfigs: how meshctl addresses a cluster (its etcd as `root`, its CA, its peers
//! directory and the gRPC endpoints of its apiserver and agent).
//!
//! ```text
//!  --kubeconfig a.kubeconfig:b.kubeconfig  (default .meshd/kubeconfig, written by `up`)
//!     one context per cluster ── cluster: etcd server + CA ── user: root client cert/key
//!        extensions: meshd.io/cluster {clusterId, maxConnectedClusters}
//!                    meshd.io/admin   {peersDir, caKey, apiserverGrpc, agentGrpc,
//!                                      peerEndpoint {server, peerCa, peerCaKey}}
//!     ─► ClusterAdmin per context (names unique across all files)
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use kube_client::config::{
    AuthInfo, Cluster, Context, Kubeconfig, NamedAuthInfo, NamedCluster, NamedContext,
    NamedExtension,
};
use mesh_certs::CertificateAuthority;
use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use super::CtlError;
use crate::kv::{EtcdConfig, EtcdStore};
use crate::model::{ClusterName, MaxConnectedClusters};
use crate::peers::{CLUSTER_EXTENSION, PeerCredential};

/// Name of the context extension with meshctl's admin facts about a cluster.
pub const ADMIN_EXTENSION: &str = "meshd.io/admin";
/// Where `meshctl up` (default state dir) writes the admin kubeconfig of its clusters.
pub const DEFAULT_KUBECONFIG: &str = ".meshd/kubeconfig";
/// File name of the admin kubeconfig inside a `meshctl up` state directory.
pub const KUBECONFIG_FILE: &str = "kubeconfig";

/// Which admin kubeconfig(s) name the clusters.
#[derive(Debug, Clone, Args)]
pub struct KubeconfigArgs {
    /// Admin kubeconfig(s), one context per cluster (`meshctl up` writes
    /// `<state-dir>/kubeconfig`). Repeat the flag or separate files with ':'.
    #[arg(
        long = "kubeconfig",
        env = "MESHCTL_KUBECONFIG",
        value_delimiter = ':',
        default_value = DEFAULT_KUBECONFIG
    )]
    pub kubeconfig: Vec<PathBuf>,
    /// Shortcut for `--kubeconfig <DIR>/kubeconfig` of a `meshctl up` state directory.
    #[arg(long, conflicts_with = "kubeconfig")]
    pub state_dir: Option<PathBuf>,
}

impl KubeconfigArgs {
    /// The kubeconfig files to read.
    pub fn files(&self) -> Vec<PathBuf> {
        match &self.state_dir {
            Some(dir) => vec![dir.join(KUBECONFIG_FILE)],
            None => self.kubeconfig.clone(),
        }
    }
}

/// The `meshd.io/admin` context extension.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdminExtension {
    /// Directory the cluster's apiserver and agents watch for peer kubeconfigs.
    pub peers_dir: PathBuf,
    /// The cluster CA's private key (PEM), to sign peers' client certificates.
    pub ca_key: PathBuf,
    /// `host:port` of the apiserver's mTLS gRPC API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apiserver_grpc: Option<String>,
    /// `host:port` of the agent's mTLS gRPC API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_grpc: Option<String>,
    /// What peers of this cluster are given: the identity relay and the peer CA. Absent:
    /// peers get the etcd server itself and certificates of the cluster CA (no relay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_endpoint: Option<PeerEndpoint>,
}

/// The clustermesh endpoint peers dial (`meshd.io/admin` `peerEndpoint`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerEndpoint {
    /// `https://host:port` of the apiserver's identity relay: the `server` of every peer
    /// kubeconfig of this cluster.
    pub server: String,
    /// The peer CA certificate (PEM): it signs the peer credentials and the relay's server
    /// certificate; only the relay trusts it (etcd does not).
    pub peer_ca: PathBuf,
    /// The peer CA's key.
    pub peer_ca_key: PathBuf,
}

/// One cluster as an admin kubeconfig context describes it.
#[derive(Debug, Clone)]
pub struct ClusterAdmin {
    /// Name, ID, mode, etcd endpoint, CA and the `root` client certificate.
    pub cred: PeerCredential,
    /// Paths (absolute) and endpoints.
    pub ext: AdminExtension,
    /// The kubeconfig file it came from.
    pub file: PathBuf,
}

impl ClusterAdmin {
    /// The cluster's name.
    pub fn name(&self) -> &ClusterName {
        &self.cred.name
    }

    /// `context <name> in <file>`, for messages.
    pub fn whence(&self) -> String {
        format!("context {} in {}", self.cred.name, self.file.display())
    }

    /// The cluster CA, with its key (checked to belong to the CA certificate in the context).
    pub fn ca(&self) -> Result<CertificateAuthority, CtlError> {
        let key = std::fs::read_to_string(&self.ext.ca_key).map_err(|source| CtlError::Read {
            path: self.ext.ca_key.clone(),
            source,
        })?;
        CertificateAuthority::from_pem(&self.cred.ca_pem, &key).map_err(|source| CtlError::Cert {
            context: format!(
                "CA key {} does not fit the CA certificate of {}",
                self.ext.ca_key.display(),
                self.whence()
            ),
            source,
        })
    }

    /// The peer CA (with its key) and the relay endpoint, when the cluster runs a relay.
    pub fn peer_ca(&self) -> Result<Option<(CertificateAuthority, String)>, CtlError> {
        let Some(pe) = &self.ext.peer_endpoint else {
            return Ok(None);
        };
        let ca =
            CertificateAuthority::from_files(&pe.peer_ca, &pe.peer_ca_key).map_err(|source| {
                CtlError::Cert {
                    context: format!(
                        "the peer CA {} / {} of {}",
                        pe.peer_ca.display(),
                        pe.peer_ca_key.display(),
                        self.whence()
                    ),
                    source,
                }
            })?;
        Ok(Some((ca, pe.server.clone())))
    }

    /// etcd client configuration as `root`, with short timeouts for interactive use.
    pub fn etcd_config(&self) -> EtcdConfig {
        EtcdConfig {
            connect_timeout: Some(Duration::from_secs(3)),
            request_timeout: Some(Duration::from_secs(10)),
            ..self.cred.to_etcd_config()
        }
    }

    /// Connects to the cluster's etcd as `root` and checks it answers.
    pub async fn etcd(&self) -> Result<etcd_client::Client, CtlError> {
        let store = EtcdStore::connect(&self.etcd_config())
            .await
            .map_err(|e| self.unreachable(&e))?;
        let mut client = store.client();
        client.status().await.map_err(|e| self.unreachable(&e))?;
        Ok(client)
    }

    fn unreachable(&self, e: &(dyn std::error::Error + 'static)) -> CtlError {
        CtlError::Up(format!(
            "cannot reach the etcd of {} at {} ({}): {}",
            self.cred.name,
            self.cred.server,
            self.whence(),
            super::error_chain(e)
        ))
    }

    /// mTLS client config for the cluster's gRPC APIs (the context's CA and client
    /// certificate; server name from `tls-server-name`, else `localhost`).
    pub fn grpc_tls(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.cred.ca_pem))
            .identity(Identity::from_pem(&self.cred.cert_pem, &self.cred.key_pem))
            .domain_name(
                self.cred
                    .tls_server_name
                    .clone()
                    .unwrap_or_else(|| "localhost".into()),
            )
    }

    /// The peers configured for this cluster: every credential in its peers directory
    /// (files that do not parse are returned as errors naming the file).
    pub fn configured_peers(&self) -> Result<Vec<Result<PeerCredential, String>>, CtlError> {
        super::peerstore::read_dir(&self.ext.peers_dir)
    }
}

/// Reads every context of `files`. Context names must be unique across files.
pub fn load(files: &[PathBuf]) -> Result<Vec<ClusterAdmin>, CtlError> {
    let mut out: Vec<ClusterAdmin> = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).map_err(|source| CtlError::Read {
            path: file.clone(),
            source,
        })?;
        let contexts = PeerCredential::contexts_from_kubeconfig(file, &text)
            .map_err(|e| CtlError::Up(format!("admin kubeconfig: {}", super::error_chain(&e))))?;
        for (xi, (cred, exts)) in contexts.into_iter().enumerate() {
            if let Some(other) = out.iter().find(|a| a.cred.name == cred.name) {
                return Err(CtlError::Up(format!(
                    "cluster {} is defined twice: in {} and in {}",
                    cred.name,
                    other.file.display(),
                    file.display()
                )));
            }
            let ext = admin_extension(file, xi, &exts)?;
            out.push(ClusterAdmin {
                cred,
                ext,
                file: file.clone(),
            });
        }
    }
    Ok(out)
}

fn admin_extension(
    file: &Path,
    xi: usize,
    exts: &[NamedExtension],
) -> Result<AdminExtension, CtlError> {
    let field = format!("contexts[{xi}].context.extensions[{ADMIN_EXTENSION}]");
    let bad = |reason: String| CtlError::Up(format!("{}: {field}: {reason}", file.display()));
    let ext = exts
        .iter()
        .find(|e| e.name == ADMIN_EXTENSION)
        .ok_or_else(|| {
            bad("missing (needs {peersDir, caKey}; is this an admin kubeconfig written by `meshctl up`?)".into())
        })?;
    let mut ext: AdminExtension =
        serde_json::from_value(ext.extension.clone()).map_err(|e| bad(e.to_string()))?;
    let base = file.parent().unwrap_or(Path::new("."));
    let mut paths = vec![&mut ext.peers_dir, &mut ext.ca_key];
    if let Some(pe) = &mut ext.peer_endpoint {
        paths.extend([&mut pe.peer_ca, &mut pe.peer_ca_key]);
    }
    for p in paths {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
    Ok(ext)
}

/// The cluster named `name` among `all`, or an error listing the names there are.
pub fn select<'a>(all: &'a [ClusterAdmin], name: &str) -> Result<&'a ClusterAdmin, CtlError> {
    all.iter()
        .find(|a| a.cred.name.as_str() == name)
        .ok_or_else(|| {
            let names: Vec<&str> = all.iter().map(|a| a.cred.name.as_str()).collect();
            let files: Vec<String> = all
                .iter()
                .map(|a| a.file.display().to_string())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            CtlError::Up(format!(
                "no cluster {name:?} in {} (clusters there: {})",
                if files.is_empty() {
                    "the admin kubeconfig".to_owned()
                } else {
                    files.join(", ")
                },
                if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                }
            ))
        })
}

/// One cluster's context in an admin kubeconfig `meshctl up` writes (file references, no
/// inline key material).
#[derive(Debug, Clone)]
pub struct AdminEntry {
    /// Cluster name (context, cluster entry).
    pub name: ClusterName,
    /// Cluster ID.
    pub cluster_id: u16,
    /// Mesh mode.
    pub max_connected_clusters: MaxConnectedClusters,
    /// etcd endpoint `https://host:port`.
    pub server: String,
    /// Server name to verify.
    pub tls_server_name: Option<String>,
    /// CA certificate file.
    pub ca_file: PathBuf,
    /// `root` client certificate file.
    pub cert_file: PathBuf,
    /// `root` client key file.
    pub key_file: PathBuf,
    /// The admin extension.
    pub ext: AdminExtension,
}

/// Writes (atomically, mode 0600) an admin kubeconfig with one context per entry; the first
/// entry is the current context.
pub fn write_kubeconfig(path: &Path, entries: &[AdminEntry]) -> Result<(), CtlError> {
    let s = |p: &Path| p.display().to_string();
    let mut kc = Kubeconfig {
        api_version: Some("v1".into()),
        kind: Some("Config".into()),
        current_context: entries.first().map(|e| e.name.to_string()),
        ..Kubeconfig::default()
    };
    for e in entries {
        let user = format!("root@{}", e.name);
        kc.clusters.push(NamedCluster {
            name: e.name.to_string(),
            cluster: Some(Cluster {
                server: Some(e.server.clone()),
                certificate_authority: Some(s(&e.ca_file)),
                tls_server_name: e.tls_server_name.clone(),
                ..Cluster::default()
            }),
            ..NamedCluster::default()
        });
        kc.auth_infos.push(NamedAuthInfo {
            name: user.clone(),
            auth_info: Some(AuthInfo {
                client_certificate: Some(s(&e.cert_file)),
                client_key: Some(s(&e.key_file)),
                ..AuthInfo::default()
            }),
            ..NamedAuthInfo::default()
        });
        kc.contexts.push(NamedContext {
            name: e.name.to_string(),
            context: Some(Context {
                cluster: e.name.to_string(),
                user: Some(user),
                extensions: Some(vec![
                    NamedExtension {
                        name: CLUSTER_EXTENSION.into(),
                        extension: serde_json::json!({
                            "clusterId": e.cluster_id,
                            "maxConnectedClusters": e.max_connected_clusters.get(),
                        }),
                    },
                    NamedExtension {
                        name: ADMIN_EXTENSION.into(),
                        extension: serde_json::to_value(&e.ext)?,
                    },
                ]),
                ..Context::default()
            }),
            ..NamedContext::default()
        });
    }
    let yaml = serde_saphyr::to_string(&kc)
        .map_err(|e| CtlError::Up(format!("encoding {}: {e}", path.display())))?;
    mesh_certs::write_file_atomic(path, yaml.as_bytes(), mesh_certs::FileKind::Secret).map_err(
        |source| CtlError::Cert {
            context: format!("writing {}", path.display()),
            source,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_certs::CertRequest;

    fn entry(dir: &Path, name: &str, id: u16) -> AdminEntry {
        let ca = CertificateAuthority::generate(&format!("{name}-ca"), Duration::from_secs(3600))
            .unwrap();
        let pki = dir.join(name);
        ca.write_files(&pki, "ca").unwrap();
        ca.issue(&CertRequest::client("root").with_role(name, mesh_certs::Role::Admin))
            .unwrap()
            .write_files(&pki, "root")
            .unwrap();
        AdminEntry {
            name: ClusterName::new(name).unwrap(),
            cluster_id: id,
            max_connected_clusters: MaxConnectedClusters::from_u32(255).unwrap(),
            server: "https://127.0.0.1:2379".into(),
            tls_server_name: Some("localhost".into()),
            ca_file: pki.join("ca.crt"),
            cert_file: pki.join("root.crt"),
            key_file: pki.join("root.key"),
            ext: AdminExtension {
                peers_dir: PathBuf::from(format!("{name}/peers")),
                ca_key: pki.join("ca.key"),
                apiserver_grpc: Some("127.0.0.1:1".into()),
                agent_grpc: None,
                peer_endpoint: None,
            },
        }
    }

    #[test]
    fn admin_kubeconfig_round_trip_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kubeconfig");
        let mut east = entry(dir.path(), "east", 1);
        east.ext.peer_endpoint = Some(PeerEndpoint {
            server: "https://127.0.0.1:2380".into(),
            peer_ca: PathBuf::from("east/ca.crt"),
            peer_ca_key: PathBuf::from("east/ca.key"),
        });
        write_kubeconfig(&file, &[east, entry(dir.path(), "west", 2)]).unwrap();
        let all = load(std::slice::from_ref(&file)).unwrap();
        let names: Vec<&str> = all.iter().map(|a| a.name().as_str()).collect();
        assert_eq!(names, ["east", "west"]);
        let west = select(&all, "west").unwrap();
        assert_eq!(west.cred.cluster_id.get(), 2);
        // Relative paths resolve against the kubeconfig's directory.
        assert_eq!(west.ext.peers_dir, dir.path().join("west/peers"));
        assert_eq!(west.ext.agent_grpc, None);
        west.ca().unwrap();
        assert!(west.peer_ca().unwrap().is_none());
        // The peer endpoint round-trips; its relative paths resolve like the others.
        let east = select(&all, "east").unwrap();
        let pe = east.ext.peer_endpoint.as_ref().unwrap();
        assert_eq!(pe.peer_ca_key, dir.path().join("east/ca.key"));
        let (_, server) = east.peer_ca().unwrap().unwrap();
        assert_eq!(server, "https://127.0.0.1:2380");
        let e = select(&all, "north").unwrap_err().to_string();
        assert!(e.contains("clusters there: east, west"), "{e}");

        // The same cluster in two files is refused.
        let e = load(&[file.clone(), file.clone()]).unwrap_err().to_string();
        assert!(e.contains("defined twice"), "{e}");

        // A peer kubeconfig is not an admin kubeconfig.
        let text = std::fs::read_to_string(&file).unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, text.replace(ADMIN_EXTENSION, "example.com/other")).unwrap();
        let e = load(&[plain]).unwrap_err().to_string();
        assert!(e.contains("meshd.io/admin") && e.contains("missing"), "{e}");

        // A CA key that does not belong to the CA is named.
        let mut bad = entry(dir.path(), "north", 3);
        bad.ext.ca_key = dir.path().join("east/ca.key");
        let f2 = dir.path().join("k2");
        write_kubeconfig(&f2, &[bad]).unwrap();
        let e = load(&[f2]).unwrap()[0].ca().unwrap_err().to_string();
        assert!(e.contains("does not fit the CA certificate"), "{e}");
    }
}
