//! clustermesh-apiserver: turns one cluster's state into the meshd key schema.
//!
//! Data flow: a [`source`] (manifest directory or Kubernetes watchers) → identity
//! allocation ([`allocator`], etcd transactions) → [`export`] writing `mesh/state/...`,
//! `mesh/cluster-config/...`, `mesh/policies/...`, `mesh/heartbeat` and `mesh/synced/...`
//! into the cluster's etcd through the `meshd` `KvStore`; [`kvstoremesh`] mirrors peers
//! (peer kubeconfig files or Secrets) into `mesh/cache/...`; [`clusterset`] allocates
//! ClusterSetIPs; [`bootstrap`] creates etcd users and roles; [`api`] serves mTLS gRPC;
//! [`relay`] is the endpoint peers dial instead of etcd (mTLS in, the same CN out to etcd,
//! connections of a revoked peer user cut within seconds); in Kubernetes mode the MCS status (ServiceImports, ServiceExport conditions) is written
//! back from what etcd holds.

pub mod allocator;
pub mod api;
pub mod app;
pub mod bootstrap;
pub mod clusterset;
pub mod export;
pub mod health;
pub mod kvstoremesh;
pub mod relay;
pub mod source;
