//! meshd core: the model, the key schema, the store seam and the reflector that every
//! meshd binary shares.
//!
//! ```text
//!  etcd ──(EtcdStore: KvStore)──► Reflector<Codec> ──► Event stream ──► indexes / exporters
//!            ▲     list pages at one revision, watch rev+1, relist + sweep on failure
//!            └── writers: KvStore::put / txn (create-if-absent, CAS), leases via Session
//! ```
//!
//! - [`model`]: validated types (cluster names/IDs, identities, labels, selectors,
//!   ipcache entries, nodes, services, cluster config).
//! - [`keys`]: the one definition of every etcd key and its JSON value codec.
//! - [`kv`]: the [`kv::KvStore`] trait, [`kv::EtcdStore`], [`kv::MemoryStore`] and lease
//!   [`kv::Session`]s.
//! - [`reflector`]: list + watch + relist/sweep with backoff, as a stream of
//!   [`reflector::Event`]s; undecodable entries are dropped and counted.
//! - [`policy`]: the `MeshNetworkPolicy` engine (selector cache, incremental per-endpoint
//!   allow entries as diffs for the datapath, `trace`), shared by the agent and meshctl.
//! - [`kube`]: Kubernetes mode — clients from kubeconfigs, the peer Secret watcher
//!   (`PeerEvent`s like the peers directory), and meshctl's reads/writes of a meshd
//!   installation (config, CA, clustermesh Service address, peer Secrets).
//! - [`peers`], [`remote`]: peer kubeconfig credentials and the per-peer supervisors.
//! - [`trust`]: the peer guard between supervisors and consumers — address ownership
//!   from nodes' pod CIDRs, host-prefix claims only, backends a peer owns, quotas.
//! - [`ctl`]: the `meshctl` commands; [`mounts`]: cgroup2/bpffs mount points.
//! - [`backoff`], [`metrics`]: shared retry policy and Prometheus counters.
//! - [`health`]: the plain-HTTP `/healthz`, `/readyz`, `/metrics` server every binary runs.
//!
//! The core knows no gRPC server, no aya and no DNS; binaries and the agent/apiserver
//! crates build on it. `meshctl` lives in `src/bin/meshctl.rs` with its logic in [`ctl`].

pub mod args;
pub mod backoff;
pub mod ctl;
pub mod events;
pub mod health;
pub mod keys;
pub mod kube;
pub mod kv;
pub mod metrics;
pub mod model;
pub mod mounts;
pub mod peers;
pub mod policy;
pub mod process;
pub mod reflector;
pub mod remote;
pub mod trust;
pub mod wire;
