//! mesh-agent: the per-node meshd agent.
//!
//! Data flow (filled in by the agent, datapath, policy and DNS issues):
//! peer kubeconfigs → one supervisor per peer (the `meshd` reflector over the local
//! kvstoremesh cache or the peer's etcd) → single-writer merged indexes (services,
//! backends, ipcache, identities, nodes) → consumers: the eBPF datapath syncer
//! (aya), the `clusterset.local` DNS server (hickory), policy computation, and the
//! gRPC status API used by `meshctl status`.

pub mod api;
pub mod app;
pub mod datapath;
pub mod dns;
pub mod metrics;
pub mod policy;
pub mod runtime;
pub mod view;
