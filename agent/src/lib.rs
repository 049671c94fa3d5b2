//! mesh-agent: the per-node meshd agent.
//!
//! ```text
//!  peer kubeconfigs (files) or peer Secrets ─► one supervisor per peer (the `meshd`
//!  reflector over the local kvstoremesh cache or the peer's etcd) ─► [`runtime`]:
//!  single-writer merged indexes ([`view`]: services, backends, ipcache, identities, nodes)
//!    ├─► [`policy`]: local MeshNetworkPolicies + identities + endpoints ─► policy snapshots
//!    ├─► [`datapath`]: syncer ─► eBPF maps and programs (aya), or the recording datapath
//!    ├─► [`dns`]: `clusterset.local` (hickory)
//!    └─► [`api`]: mTLS gRPC (status, services, identities, ipcache, drop stream) and
//!        health/metrics, for `meshctl`
//! ```

pub mod api;
pub mod app;
pub mod datapath;
pub mod dns;
pub mod metrics;
pub mod policy;
pub mod runtime;
pub mod view;
