//! Where a cluster keeps its peer credentials: a peers directory (standalone) or Secrets
//! `meshd-peer-<remote>` in the meshd namespace (Kubernetes); what `connect`/`disconnect` write.

use std::path::{Path, PathBuf};

use super::CtlError;
use crate::model::ClusterName;
use crate::peers::{PeerCredential, remove_peer_file, write_peer_file};

/// A cluster's peer credential store.
#[derive(Clone)]
pub(super) enum PeerStore {
    /// `<dir>/<peer>.kubeconfig` files.
    Dir(PathBuf),
    /// Secrets in a namespace of the cluster's Kubernetes API.
    Secrets {
        /// Client of the cluster's API server.
        client: kube::Client,
        /// The meshd namespace.
        namespace: String,
    },
}

impl std::fmt::Debug for PeerStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dir(d) => write!(f, "Dir({})", d.display()),
            Self::Secrets { namespace, .. } => write!(f, "Secrets({namespace})"),
        }
    }
}

/// Every `*.kubeconfig` credential in `dir` (a missing directory has none), in name order;
/// files that do not parse are errors naming the file and field.
pub(super) fn read_dir(dir: &Path) -> Result<Vec<Result<PeerCredential, String>>, CtlError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CtlError::Read {
                path: dir.to_owned(),
                source,
            });
        }
    };
    let mut paths: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "kubeconfig"))
        .collect();
    paths.sort();
    let mut out = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path).map_err(|source| CtlError::Read {
            path: path.clone(),
            source,
        })?;
        out.push(PeerCredential::from_kubeconfig(&path, &text).map_err(|e| super::error_chain(&e)));
    }
    Ok(out)
}

fn kube_err(e: &crate::kube::KubeError) -> CtlError {
    CtlError::Up(super::error_chain(e))
}

impl PeerStore {
    /// Where the credential for `peer` lives, for messages.
    pub(super) fn location(&self, peer: &ClusterName) -> String {
        match self {
            Self::Dir(d) => d
                .join(PeerCredential::file_name(peer))
                .display()
                .to_string(),
            Self::Secrets { namespace, .. } => {
                format!("Secret {namespace}/{}", crate::kube::peer_secret_name(peer))
            }
        }
    }

    /// Every credential there (ones that do not parse as errors naming where).
    pub(super) async fn list(&self) -> Result<Vec<Result<PeerCredential, String>>, CtlError> {
        match self {
            Self::Dir(dir) => read_dir(dir),
            Self::Secrets { client, namespace } => {
                Ok(crate::kube::list_peer_secrets(client, namespace)
                    .await
                    .map_err(|e| kube_err(&e))?
                    .into_iter()
                    .map(|(name, r)| {
                        r.map_err(|e| {
                            format!("Secret {namespace}/{name}: {}", super::error_chain(&e))
                        })
                    })
                    .collect())
            }
        }
    }

    /// Writes the credential; returns where.
    pub(super) async fn write(
        &self,
        cred: &PeerCredential,
        user: &str,
    ) -> Result<String, CtlError> {
        match self {
            Self::Dir(dir) => write_peer_file(dir, cred, user)
                .map(|p| p.display().to_string())
                .map_err(|source| CtlError::Read {
                    path: dir.join(PeerCredential::file_name(&cred.name)),
                    source,
                }),
            Self::Secrets { client, namespace } => {
                crate::kube::write_peer_secret(client, namespace, cred, user, "meshctl")
                    .await
                    .map_err(|e| kube_err(&e))?;
                Ok(self.location(&cred.name))
            }
        }
    }

    /// Removes the credential for `peer`; whether there was one.
    pub(super) async fn remove(&self, peer: &ClusterName) -> Result<bool, CtlError> {
        match self {
            Self::Dir(dir) => remove_peer_file(dir, peer).map_err(|source| CtlError::Read {
                path: dir.join(PeerCredential::file_name(peer)),
                source,
            }),
            Self::Secrets { client, namespace } => {
                crate::kube::delete_peer_secret(client, namespace, peer)
                    .await
                    .map_err(|e| kube_err(&e))
            }
        }
    }
}
