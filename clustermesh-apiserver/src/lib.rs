//! clustermesh-apiserver: turns one cluster's state into the meshd key schema.
//!
//! Data flow (being built by the apiserver issue): a source (manifest directory or
//! Kubernetes watchers) → identity allocation (etcd transactions) → exporter writing
//! `mesh/state/...`, `mesh/cluster-config/...`, `mesh/heartbeat` and `mesh/synced/...`
//! into the cluster's etcd through the `meshd` `KvStore`; kvstoremesh mirrors peers
//! into `mesh/cache/...`; the etcd bootstrap creates TLS material, users and roles.

pub mod allocator;
pub mod api;
pub mod app;
pub mod bootstrap;
pub mod clusterset;
pub mod export;
pub mod health;
pub mod kvstoremesh;
pub mod source;
