//! `EtcdGuard`: a real etcd process with TLS, client-cert auth and auth on, cleaned up on drop.

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use etcd_client::{CompactionOptions, UserAddOptions};
use mesh_certs::{CertRequest, CertificateAuthority};
use meshd::kv::{EtcdConfig, EtcdStore, KvStore};

/// The etcd binary (Debian `etcd-server`); override with `MESH_ETCD_BIN`.
fn etcd_bin() -> PathBuf {
    std::env::var_os("MESH_ETCD_BIN").map_or_else(|| PathBuf::from("/usr/bin/etcd"), PathBuf::from)
}

fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a free port")?;
    Ok(l.local_addr()?.port())
}

/// A running etcd on loopback, owned by a test.
#[derive(Debug)]
pub struct EtcdGuard {
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    ca: CertificateAuthority,
}

impl EtcdGuard {
    /// Starts etcd with TLS, `--client-cert-auth`, a `root` user and auth enabled.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_trusting(&[]).await
    }

    /// [`EtcdGuard::start`], with etcd also accepting client certificates of the CAs in
    /// `extra_client_cas` (PEM; e.g. a relay CA) besides its own CA.
    pub async fn start_trusting(extra_client_cas: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("mesh-etcd-")
            .tempdir()
            .context("creating the etcd temp dir")?;
        let ca = CertificateAuthority::generate("mesh-test-etcd-ca", Duration::from_secs(86_400))?;
        let server = ca.issue(&CertRequest::server_and_client(
            "etcd",
            &["localhost"],
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
        ))?;
        server.write_files(dir.path(), "server")?;
        let mut trusted = ca.cert_pem().to_owned();
        for extra in extra_client_cas {
            if !trusted.ends_with('\n') {
                trusted.push('\n');
            }
            trusted.push_str(extra);
        }
        std::fs::write(dir.path().join("ca.crt"), trusted)?;
        let mut g = Self {
            dir,
            client_port: 0,
            peer_port: 0,
            child: None,
            ca,
        };
        let mut last_err = None;
        // Ports are picked by binding :0 and releasing; retry if another process races us.
        for _ in 0..3 {
            g.client_port = free_port()?;
            g.peer_port = free_port()?;
            let _ = std::fs::remove_dir_all(g.dir.path().join("data"));
            match g.spawn_and_wait().await {
                Ok(()) => {
                    g.bootstrap_auth().await?;
                    return Ok(g);
                }
                Err(e) => {
                    g.kill();
                    last_err = Some(e);
                }
            }
        }
        bail!("etcd did not start: {last_err:?}")
    }

    /// The client URL.
    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.client_port)
    }

    /// The CA that signed etcd's server certificate and accepts client certificates.
    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// The directory holding data and certificates.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The PID of the running etcd, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A store config authenticating as `user` (a client certificate with CN = user).
    pub fn config_for(&self, user: &str) -> anyhow::Result<EtcdConfig> {
        let cert = self.ca.issue(&CertRequest::client(user))?;
        Ok(EtcdConfig {
            endpoints: vec![self.endpoint()],
            ca_pem: Some(self.ca.cert_pem().to_owned()),
            cert_pem: Some(cert.cert_pem),
            key_pem: Some(cert.key_pem),
            tls_server_name: Some("localhost".into()),
            connect_timeout: Some(Duration::from_secs(2)),
            request_timeout: Some(Duration::from_secs(10)),
            ..EtcdConfig::default()
        })
    }

    /// A store authenticated as `root`.
    pub async fn root_store(&self) -> anyhow::Result<EtcdStore> {
        Ok(EtcdStore::connect(&self.config_for("root")?).await?)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("etcd.log"))?;
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let client = self.endpoint();
        let child = Command::new("setpriv")
            .arg("--pdeathsig")
            .arg("KILL")
            .arg("--")
            .arg(etcd_bin())
            .args(["--name", "mesh-test"])
            .arg("--data-dir")
            .arg(d.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("mesh-test={peer}")])
            .arg("--cert-file")
            .arg(d.join("server.crt"))
            .arg("--key-file")
            .arg(d.join("server.key"))
            .arg("--trusted-ca-file")
            .arg(d.join("ca.crt"))
            .arg("--client-cert-auth")
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {}", etcd_bin().display()))?;
        self.child = Some(child);
        Ok(())
    }

    async fn spawn_and_wait(&mut self) -> anyhow::Result<()> {
        self.spawn()?;
        let cfg = self.config_for("root")?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let log =
                    std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
                bail!("etcd exited with {status} during start-up: {}", tail(&log));
            }
            if let Ok(store) = EtcdStore::connect(&cfg).await
                && store.client().status().await.is_ok()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("etcd on {} not ready after 20 s", self.endpoint());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn bootstrap_auth(&self) -> anyhow::Result<()> {
        let mut c = self.root_store().await?.client();
        c.user_add("root", "", Some(UserAddOptions::new().with_no_pwd()))
            .await
            .context("adding the root user")?;
        c.user_grant_role("root", "root")
            .await
            .context("granting root the root role")?;
        c.auth_enable().await.context("enabling auth")?;
        Ok(())
    }

    /// Kills etcd (SIGKILL) and waits for it, keeping data and ports.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same data dir and ports.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn_and_wait().await {
                Ok(()) => return Ok(()),
                // The old listener may linger for a moment.
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "etcd restart failed; retrying");
                    self.kill();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Compacts the store's history up to `revision` (physically).
    pub async fn compact(&self, revision: i64) -> anyhow::Result<()> {
        let mut c = self.root_store().await?.client();
        c.compact(revision, Some(CompactionOptions::new().with_physical()))
            .await
            .context("compacting")?;
        Ok(())
    }

    /// The current store revision.
    pub async fn revision(&self) -> anyhow::Result<i64> {
        let store = self.root_store().await?;
        Ok(store
            .list_page("mesh/heartbeat", None, 1, 0)
            .await?
            .revision)
    }
}

fn tail(s: &str) -> &str {
    let start = s.len().saturating_sub(2000);
    let start = (start..s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    &s[start..]
}

impl Drop for EtcdGuard {
    fn drop(&mut self) {
        self.kill();
    }
}
