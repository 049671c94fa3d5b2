//! Real TLS on 127.0.0.1: mTLS acceptance/refusal and certificate rotation with ReloadingCertKey.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mesh_certs::{
    CertError, CertRequest, CertificateAuthority, FileKind, IssuedCert, ReloadingCertKey,
    client_config, client_config_with_resolver, inspect_der, server_config, server_config_from_pem,
    write_file_atomic,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};

const DAY: Duration = Duration::from_secs(24 * 60 * 60);
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Generous bound for any single network operation on a loaded 2-core machine.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound for waiting on the file watcher.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An echo server: completes the TLS handshake, echoes one byte, closes.
struct Server {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn spawn_server(config: Arc<rustls::ServerConfig>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(config);
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut byte = [0u8; 1];
                if tls.read_exact(&mut byte).await.is_ok() {
                    let _ = tls.write_all(&byte).await;
                    let _ = tls.flush().await;
                }
                let _ = tls.shutdown().await;
            });
        }
    });
    Server { addr, task }
}

/// Connect, check that one byte round-trips, return the server certificate's serial.
///
/// Session resumption is turned off: a resumed TLS 1.3 session carries the certificate of the
/// original handshake, so a rotated server certificate only shows in full handshakes.
async fn round_trip(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<String, BoxError> {
    let mut config = (*config).clone();
    config.resumption = rustls::client::Resumption::disabled();
    let config = Arc::new(config);
    tokio::time::timeout(IO_TIMEOUT, async move {
        let tcp = TcpStream::connect(addr).await?;
        let connector = TlsConnector::from(config);
        let mut tls = connector
            .connect(ServerName::try_from("localhost")?, tcp)
            .await?;
        let serial = {
            let certs = tls
                .get_ref()
                .1
                .peer_certificates()
                .ok_or("no peer certificate")?;
            inspect_der(certs.first().ok_or("empty peer chain")?)?.serial_hex
        };
        tls.write_all(&[42]).await?;
        tls.flush().await?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await?;
        if byte != [42] {
            return Err(format!("echoed {byte:?}").into());
        }
        Ok::<_, BoxError>(serial)
    })
    .await?
}

/// The server's alert names the reason. In TLS 1.3 the client learns of the refusal only on its
/// first read; should the server's TCP reset overtake the alert, accept the reset as a refusal.
fn refused_with(err: &BoxError, alert: &str) -> bool {
    let msg = err.to_string();
    msg.contains(alert) || msg.contains("reset by peer")
}

fn serial(cert: &IssuedCert) -> String {
    cert.info().unwrap().serial_hex
}

fn server_cert(ca: &CertificateAuthority) -> IssuedCert {
    ca.issue(&CertRequest::server(
        "apiserver-east",
        &["localhost"],
        &[LOCALHOST],
    ))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_accepts_own_ca_clients_and_refuses_others() {
    let ca1 = CertificateAuthority::generate("meshd-ca-east", 10 * DAY).unwrap();
    let ca2 = CertificateAuthority::generate("meshd-ca-west", 10 * DAY).unwrap();
    let server = server_cert(&ca1);
    let config = server_config_from_pem(&server.cert_pem, &server.key_pem, ca1.cert_pem()).unwrap();
    let srv = spawn_server(config).await;

    // CA1 client: accepted, and the byte comes back
    let good = ca1.issue(&CertRequest::client("remote-west")).unwrap();
    let cfg = client_config(ca1.cert_pem(), Some((&good.cert_pem, &good.key_pem))).unwrap();
    let seen = round_trip(srv.addr, cfg)
        .await
        .expect("CA1 client must be accepted");
    assert_eq!(seen, serial(&server));

    // CA2 client (same CN): refused during the handshake or on the first read
    let foreign = ca2.issue(&CertRequest::client("remote-west")).unwrap();
    let cfg = client_config(ca1.cert_pem(), Some((&foreign.cert_pem, &foreign.key_pem))).unwrap();
    let err = round_trip(srv.addr, cfg)
        .await
        .expect_err("CA2 client must be refused");
    assert!(refused_with(&err, "UnknownCA"), "CA2 client refused: {err}");

    // no client certificate: refused
    let cfg = client_config(ca1.cert_pem(), None).unwrap();
    let err = round_trip(srv.addr, cfg)
        .await
        .expect_err("anonymous client must be refused");
    assert!(
        refused_with(&err, "CertificateRequired"),
        "anonymous client refused: {err}"
    );

    // a client that trusts only CA2 does not accept the CA1 server
    let cfg = client_config(ca2.cert_pem(), Some((&foreign.cert_pem, &foreign.key_pem))).unwrap();
    let err = round_trip(srv.addr, cfg)
        .await
        .expect_err("server from the wrong CA must be refused");
    assert!(
        err.to_string().contains("UnknownIssuer"),
        "wrong server CA refused: {err}"
    );

    // a client identity from files through ReloadingCertKey (as a ResolvesClientCert)
    let dir = tempfile::tempdir().unwrap();
    let (crt, key) = good.write_files(dir.path(), "remote-west").unwrap();
    let identity = ReloadingCertKey::load(crt, key).unwrap();
    assert!(!identity.is_watching());
    let cfg = client_config_with_resolver(ca1.cert_pem(), identity).unwrap();
    round_trip(srv.addr, cfg)
        .await
        .expect("file-based client identity must be accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_is_picked_up_and_garbage_is_ignored() {
    let ca = CertificateAuthority::generate("meshd-ca-east", 10 * DAY).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert_a = server_cert(&ca);
    let (crt, key) = cert_a.write_files(dir.path(), "server").unwrap();

    let reloading = ReloadingCertKey::watch(crt.clone(), key.clone()).unwrap();
    assert!(reloading.is_watching());
    assert_eq!(reloading.generation(), 1);
    assert_eq!(reloading.current_info().serial_hex, serial(&cert_a));
    let debug = format!("{reloading:?}");
    assert!(!debug.contains("PRIVATE KEY"), "{debug}");

    let config = server_config(reloading.clone(), ca.cert_pem()).unwrap();
    let srv = spawn_server(config).await;
    let client = ca.issue(&CertRequest::client("remote-west")).unwrap();
    let client_cfg =
        client_config(ca.cert_pem(), Some((&client.cert_pem, &client.key_pem))).unwrap();

    assert_eq!(
        round_trip(srv.addr, client_cfg.clone()).await.unwrap(),
        serial(&cert_a)
    );

    // rotate: new certificate B from the same CA, written atomically over the same files
    let cert_b = server_cert(&ca);
    assert_ne!(serial(&cert_a), serial(&cert_b));
    cert_b.write_files(dir.path(), "server").unwrap();

    let deadline = tokio::time::Instant::now() + RELOAD_TIMEOUT;
    loop {
        let seen = round_trip(srv.addr, client_cfg.clone()).await.unwrap();
        if seen == serial(&cert_b) {
            break;
        }
        assert_eq!(seen, serial(&cert_a), "neither A nor B");
        assert!(
            tokio::time::Instant::now() < deadline,
            "certificate B not served within {RELOAD_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(reloading.generation(), 2);
    assert_eq!(reloading.current_info().serial_hex, serial(&cert_b));

    // garbage in the certificate file (plain, non-atomic write): the watcher fails to load it,
    // and B keeps being served
    let failures = reloading.reload_failures();
    std::fs::write(&crt, b"this is not a certificate\n").unwrap();
    let deadline = tokio::time::Instant::now() + RELOAD_TIMEOUT;
    while reloading.reload_failures() == failures {
        assert!(
            tokio::time::Instant::now() < deadline,
            "watcher did not try to load the garbage within {RELOAD_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reloading.last_error().unwrap().contains("server.crt"));
    assert_eq!(
        round_trip(srv.addr, client_cfg.clone()).await.unwrap(),
        serial(&cert_b)
    );
    assert_eq!(reloading.generation(), 2);
    let err = reloading.reload().unwrap_err();
    assert!(matches!(err, CertError::NoCertificate { .. }), "{err}");

    // a half-rotated pair (new cert, old key) is refused too
    let cert_c = server_cert(&ca);
    write_file_atomic(&crt, cert_c.cert_pem.as_bytes(), FileKind::Public).unwrap();
    let err = reloading.reload().unwrap_err();
    assert!(matches!(err, CertError::Invalid { .. }), "{err}");
    assert_eq!(
        round_trip(srv.addr, client_cfg.clone()).await.unwrap(),
        serial(&cert_b)
    );

    // completing the pair recovers
    write_file_atomic(&key, cert_c.key_pem.as_bytes(), FileKind::Secret).unwrap();
    let deadline = tokio::time::Instant::now() + RELOAD_TIMEOUT;
    while round_trip(srv.addr, client_cfg.clone()).await.unwrap() != serial(&cert_c) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "certificate C not served within {RELOAD_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(reloading.generation(), 3);
}

#[test]
fn explicit_reload_without_watcher() {
    let ca = CertificateAuthority::generate("meshd-ca-east", 10 * DAY).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let a = server_cert(&ca);
    let (crt, key) = a.write_files(dir.path(), "server").unwrap();
    let r = ReloadingCertKey::load(crt, key).unwrap();
    assert_eq!(r.generation(), 1);

    r.reload().unwrap(); // unchanged files: nothing happens
    assert_eq!(r.generation(), 1);
    assert_eq!(r.reload_failures(), 0);

    let b = server_cert(&ca);
    b.write_files(dir.path(), "server").unwrap();
    r.reload().unwrap();
    assert_eq!(r.generation(), 2);
    assert_eq!(r.current_info().serial_hex, serial(&b));

    // missing file: error names it, previous kept
    std::fs::remove_file(r.key_path()).unwrap();
    let err = r.reload().unwrap_err();
    assert!(matches!(err, CertError::ReadFile { .. }), "{err}");
    assert!(err.to_string().contains("server.key"), "{err}");
    assert_eq!(r.current_info().serial_hex, serial(&b));
    assert_eq!(r.reload_failures(), 1);

    // ReloadingCertKey::load on an unusable pair fails up front
    let err =
        ReloadingCertKey::load(r.cert_path().to_owned(), r.key_path().to_owned()).unwrap_err();
    assert!(matches!(err, CertError::ReadFile { .. }), "{err}");
}
