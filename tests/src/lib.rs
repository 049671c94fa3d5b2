//! mesh-tests: the end-to-end harness and tests of meshd.
//!
//! ```text
//!  EtcdGuard ── real etcd-server process on 127.0.0.1 (TLS, client-cert auth, auth on)
//!      │        own CA (mesh-certs), root user bootstrapped, stop/restart/compact
//!      └──► EtcdConfig per user ──► meshd::kv::EtcdStore ──► reflector / exporters under test
//! ```
//!
//! Tests live in `tests/tests/*.rs`; benchmarks are `--release` binaries in `src/bin/`.
//! Every guard cleans up on drop, even when a test panics: processes are killed by PID,
//! data directories removed. etcd is started through `setpriv --pdeathsig KILL` so it
//! also dies if the test process is killed outright.

pub mod etcd;
pub mod exporter;
pub mod kube_api;
pub mod kube_cluster;
pub mod lab;
pub mod mesh;
pub mod meshctl;
pub mod mirror;
pub mod objects;
pub mod util;

pub use etcd::EtcdGuard;
pub use mirror::Mirror;

/// Installs a test-friendly tracing subscriber once (honours `RUST_LOG`).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Path of a workspace binary built next to the test executable (`target/<profile>/`).
///
/// `scripts/test` builds every binary before running the tests; when one is missing this
/// panics with the command to run.
pub fn bin_path(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    path
}
