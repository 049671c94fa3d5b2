//! Peer credentials: kubeconfig files that say how to reach a remote cluster's clustermesh etcd.
//!
//! ```text
//!  <peers-dir>/<remote>.kubeconfig ──notify (debounced) + 30 s rescan──► PeerDirWatcher
//!        ▲                                        │ PeerCredential::from_kubeconfig (validate)
//!        │ write_peer_file / remove_peer_file     ▼
//!   meshctl connect / disconnect        Stream<PeerEvent>: Upsert / Remove / Error / Synced
//!                                                 │ PeerCredential::to_etcd_config
//!                                                 ▼
//!                                       remote-cluster supervision (EtcdStore per peer)
//! ```
//!
//! A credential (DESIGN §6) is one cluster entry (`server` = `https://host:port` of the remote
//! etcd, its CA), one user (client certificate + key; the CN is the etcd user
//! `remote-<local>`), and one context named after the remote cluster whose
//! `meshd.io/cluster` extension carries `{clusterId, maxConnectedClusters}`.
//! [`PeerCredential::from_kubeconfig`] validates all of it and names the file and the field in
//! every [`PeerConfigError`]; [`PeerCredential::to_kubeconfig_yaml`] writes the canonical form.
//! [`PeerDirWatcher`] compares parsed credentials, so rewriting a file unchanged yields no
//! event, and a broken file yields [`PeerEvent::Error`] while the last good credential of that
//! peer stays in force. On Kubernetes the same text comes from the `kubeconfig` key of the
//! Secret `meshd-peer-<remote>`; parse it with `from_kubeconfig` and a descriptive path.

mod base64;
mod credential;
mod error;
mod files;
mod watcher;

#[cfg(test)]
mod tests;

pub use credential::PeerCredential;
pub use error::PeerConfigError;
pub use files::{remove_peer_file, write_peer_file};
pub use watcher::{DEFAULT_DEBOUNCE, DEFAULT_RESCAN_INTERVAL, PeerDirWatcher, PeerEvent};

/// Name of the context extension that carries the remote cluster's ID and mesh mode.
pub const CLUSTER_EXTENSION: &str = "meshd.io/cluster";

/// Suffix of peer credential files in a peers directory (`<remote>.kubeconfig`).
pub const FILE_SUFFIX: &str = ".kubeconfig";
