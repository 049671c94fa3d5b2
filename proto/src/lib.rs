//! mesh-proto: the meshd gRPC API.
//!
//! ```text
//!  proto/mesh/v1/*.proto ─build.rs (tonic-prost-build)─► v1 (messages, clients, server traits)
//!  servers (apiserver, agent): impl v1::cluster_mesh_server::ClusterMesh
//!      ─► filter (shared request validation) ─► server::serve_mtls (TLS accept loop,
//!         hot-reloaded certificate from server::server_tls, every call authorized by the
//!         caller certificate's role: server::authz, graceful shutdown)
//!  meshctl: v1::cluster_mesh_client
//! ```

pub mod filter;
pub mod server;

#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    missing_debug_implementations
)]
pub mod v1 {
    tonic::include_proto!("mesh.v1");
}
