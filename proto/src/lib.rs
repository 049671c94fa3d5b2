//! mesh-proto: the meshd gRPC API.
//!
//! `.proto` files live in `proto/proto/mesh/v1/`; `build.rs` runs protoc through
//! tonic-prost-build and this crate re-exports the generated client and server code.
//! Servers (apiserver, agent) implement the generated traits; meshctl uses the clients.

#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    missing_debug_implementations
)]
pub mod v1 {
    tonic::include_proto!("mesh.v1");
}
