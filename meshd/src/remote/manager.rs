//! `PeerManager`: one supervisor per peer credential, started, restarted and stopped as
//! the peers directory (or Secret set) changes.

use std::collections::BTreeMap;
use std::path::PathBuf;

use tokio::sync::mpsc;

use super::{ClusterSource, IdRegistry, PeerStatus, RemoteCluster, SupervisorConfig};
use crate::events::ClusterEvent;
use crate::metrics::ReflectorMetrics;
use crate::model::ClusterName;
use crate::peers::{PeerCredential, PeerEvent};

/// How the manager reaches each peer's data.
pub type SourceFor = Box<dyn Fn(&PeerCredential) -> ClusterSource + Send + Sync>;

/// A peer as the manager knows it.
#[derive(Debug)]
struct Peer {
    credential: PeerCredential,
    cluster: RemoteCluster,
}

/// Supervises every peer of a credential set (single owner; see module docs).
pub struct PeerManager {
    cfg: SupervisorConfig,
    ids: IdRegistry,
    metrics: ReflectorMetrics,
    sink: mpsc::Sender<ClusterEvent>,
    source_for: SourceFor,
    peers: BTreeMap<ClusterName, Peer>,
    /// Credential files that do not parse (the previous good credential stays in force).
    errors: BTreeMap<PathBuf, String>,
    synced: bool,
}

impl std::fmt::Debug for PeerManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerManager")
            .field("peers", &self.peers.keys().collect::<Vec<_>>())
            .field("errors", &self.errors)
            .finish_non_exhaustive()
    }
}

impl PeerManager {
    /// A manager sending every peer's events to `sink`; `source_for` decides whether a
    /// peer is read directly or from the local kvstoremesh cache.
    pub fn new(
        cfg: SupervisorConfig,
        metrics: ReflectorMetrics,
        sink: mpsc::Sender<ClusterEvent>,
        source_for: SourceFor,
    ) -> Self {
        Self {
            cfg,
            ids: IdRegistry::default(),
            metrics,
            sink,
            source_for,
            peers: BTreeMap::new(),
            errors: BTreeMap::new(),
            synced: false,
        }
    }

    fn spawn(&self, cred: &PeerCredential) -> RemoteCluster {
        RemoteCluster::spawn(
            cred.name.clone(),
            (self.source_for)(cred),
            self.cfg.clone(),
            self.ids.clone(),
            self.metrics.clone(),
            self.sink.clone(),
        )
    }

    /// Applies one credential change.
    pub async fn handle(&mut self, ev: PeerEvent) {
        match ev {
            PeerEvent::Upsert(cred) => {
                self.errors.retain(|p, _| !names_peer(p, &cred.name));
                if cred.name == self.cfg.local {
                    tracing::warn!(peer = %cred.name, "ignoring a peer credential for this cluster itself");
                    return;
                }
                match self.peers.remove(&cred.name) {
                    Some(old) if old.credential == cred => {
                        self.peers.insert(cred.name.clone(), old);
                    }
                    Some(old) => {
                        tracing::info!(peer = %cred.name, "peer credential changed; restarting its supervisor");
                        old.cluster.stop_keep_data().await;
                        let cluster = self.spawn(&cred);
                        self.peers.insert(
                            cred.name.clone(),
                            Peer {
                                credential: cred,
                                cluster,
                            },
                        );
                    }
                    None => {
                        tracing::info!(peer = %cred.name, server = %cred.server, "peer added");
                        let cluster = self.spawn(&cred);
                        self.peers.insert(
                            cred.name.clone(),
                            Peer {
                                credential: cred,
                                cluster,
                            },
                        );
                    }
                }
            }
            PeerEvent::Remove(name) => {
                self.errors.retain(|p, _| !names_peer(p, &name));
                if let Some(old) = self.peers.remove(&name) {
                    tracing::info!(peer = %name, "peer removed; draining its data");
                    old.cluster.stop().await;
                }
            }
            PeerEvent::Error { path, error } => {
                tracing::warn!(path = %path.display(), %error, "peer credential rejected; the previous one stays in force");
                self.errors.insert(path, error.to_string());
            }
            PeerEvent::Synced => self.synced = true,
        }
    }

    /// Restarts `name`'s supervisor, keeping its data: it reconnects and relists, and
    /// consumers replace that peer's entries wholesale (the peer guard asks for this when
    /// it needs entries back that it does not keep).
    pub async fn relist(&mut self, name: &ClusterName) {
        let Some(old) = self.peers.remove(name) else {
            return;
        };
        tracing::info!(peer = %name, "relisting the peer");
        old.cluster.stop_keep_data().await;
        let cluster = self.spawn(&old.credential);
        self.peers.insert(
            name.clone(),
            Peer {
                credential: old.credential,
                cluster,
            },
        );
    }

    /// Whether the initial set of credentials was read.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// Status of every peer.
    pub fn statuses(&self) -> Vec<PeerStatus> {
        self.peers.values().map(|p| p.cluster.status()).collect()
    }

    /// Status of every peer together with its client certificate's expiry.
    pub fn statuses_with_expiry(&self) -> Vec<(PeerStatus, Option<time::OffsetDateTime>)> {
        self.peers
            .values()
            .map(|p| (p.cluster.status(), p.credential.cert_not_after()))
            .collect()
    }

    /// Credential files currently rejected, with the reason.
    pub fn errors(&self) -> &BTreeMap<PathBuf, String> {
        &self.errors
    }

    /// Stops every supervisor keeping the data (process shutdown).
    pub async fn shutdown(mut self) {
        for (_, p) in std::mem::take(&mut self.peers) {
            p.cluster.stop_keep_data().await;
        }
    }
}

/// Whether an error path is about `peer`: `<dir>/<peer>.kubeconfig`, or a path through the
/// peer's Secret (`Secret/<ns>/meshd-peer-<peer>[/kubeconfig]`).
fn names_peer(path: &std::path::Path, peer: &ClusterName) -> bool {
    let secret = format!("meshd-peer-{peer}");
    path.file_stem().and_then(|s| s.to_str()) == Some(peer.as_str())
        || path.components().any(|c| c.as_os_str() == secret.as_str())
}
