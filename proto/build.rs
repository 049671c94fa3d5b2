//! Generates the tonic/prost code of `proto/mesh/v1/*.proto` (needs `protoc`).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(
            &[
                "proto/mesh/v1/health.proto",
                "proto/mesh/v1/clustermesh.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
