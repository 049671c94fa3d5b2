//! The clustermesh-apiserver binary as a process: bootstrapped etcd, its own etcd user,
//! manifests, gRPC and health endpoints, and graceful shutdown on SIGTERM.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::Duration;

use clustermesh_apiserver::bootstrap;
use mesh_certs::{CertRequest, CertificateAuthority};
use mesh_tests::util::{ChildGuard, free_port, http_get};
use mesh_tests::{EtcdGuard, bin_path, init_tracing};
use meshd::keys;
use meshd::kv::KvStore;
use meshd::model::ClusterName;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_as_its_own_etcd_user_and_shuts_down_gracefully_on_sigterm() {
    init_tracing();
    let etcd = EtcdGuard::start().await.unwrap();
    let root = etcd.root_store().await.unwrap();
    let east = ClusterName::new("east").unwrap();
    let report = bootstrap::bootstrap(&root.client(), &east).await.unwrap();
    assert!(!report.is_unchanged());

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("etcd-ca.crt"), etcd.ca().cert_pem()).unwrap();
    etcd.ca()
        .issue(&CertRequest::client(&bootstrap::apiserver_user(&east)))
        .unwrap()
        .write_files(d, "etcd-client")
        .unwrap();
    let api_ca = CertificateAuthority::generate("east-ca", Duration::from_secs(3600)).unwrap();
    api_ca.write_files(d, "api-ca").unwrap();
    api_ca
        .issue(&CertRequest::server(
            "apiserver",
            &["localhost"],
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
        ))
        .unwrap()
        .write_files(d, "api")
        .unwrap();
    let (grpc, health) = (free_port(), free_port());
    let manifests =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/east");
    let child = Command::new(bin_path("clustermesh-apiserver"))
        .args(["--cluster-name", "east", "--cluster-id", "1"])
        .args([
            "--etcd-endpoint",
            &etcd.endpoint(),
            "--etcd-server-name",
            "localhost",
        ])
        .arg("--etcd-ca")
        .arg(d.join("etcd-ca.crt"))
        .arg("--etcd-cert")
        .arg(d.join("etcd-client.crt"))
        .arg("--etcd-key")
        .arg(d.join("etcd-client.key"))
        .arg("--manifests")
        .arg(&manifests)
        .args(["--grpc-listen", &format!("127.0.0.1:{grpc}")])
        .arg("--grpc-cert")
        .arg(d.join("api.crt"))
        .arg("--grpc-key")
        .arg(d.join("api.key"))
        .arg("--grpc-client-ca")
        .arg(d.join("api-ca.crt"))
        .args(["--health-listen", &format!("127.0.0.1:{health}")])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = ChildGuard(child);
    let health_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, health));

    // Ready once the first export is complete.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if http_get(health_addr, "/readyz")
            .await
            .is_ok_and(|r| r.status == 200)
        {
            break;
        }
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "apiserver exited early"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "apiserver never became ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = http_get(health_addr, "/metrics").await.unwrap();
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.body.contains("mesh_export_entries"),
        "{}",
        metrics.body
    );
    assert_eq!(
        root.list_all("mesh/state/ip/v1/east/", 100)
            .await
            .unwrap()
            .kvs
            .len(),
        7
    );
    let refs = format!("{}east/", keys::IDENTITY_REFS_PREFIX);
    assert!(!root.list_all(&refs, 100).await.unwrap().kvs.is_empty());

    // SIGTERM: the process exits 0 and closes its lease (identity references vanish).
    let status = child.terminate(Duration::from_secs(15)).await;
    assert!(status.success(), "exit status {status}");
    assert!(
        root.list_all(&refs, 100).await.unwrap().kvs.is_empty(),
        "lease closed"
    );
    assert_eq!(
        root.list_all("mesh/state/ip/v1/east/", 100)
            .await
            .unwrap()
            .kvs
            .len(),
        7,
        "export stays"
    );
}
