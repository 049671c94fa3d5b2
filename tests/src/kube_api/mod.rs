//! An in-process Kubernetes API server for tests: the protocol kube-rs speaks, over mTLS.
//!
//! ```text
//!  kube::Client (kubeconfig: CA + client cert) ──HTTPS (rustls, HTTP/1.1)──► axum handler
//!     list  ?limit&continue&labelSelector&fieldSelector  → {kind: XList, metadata.resourceVersion}
//!     watch ?watch=1&resourceVersion&allowWatchBookmarks → chunked JSON lines: ADDED, MODIFIED,
//!           DELETED, BOOKMARK; ERROR 410 Expired when the version was compacted away
//!     get / create / replace / merge+apply patch / delete, `/status` subresource
//!  Store: objects per group/plural as JSON, one resourceVersion counter, bounded history
//! ```
//!
//! Resources: core Namespaces, Nodes, Services, Pods, Secrets, ConfigMaps, Events;
//! discovery.k8s.io EndpointSlices; events.k8s.io Events; the custom resources
//! ServiceExport and ServiceImport (multicluster.x-k8s.io v1alpha1 and v1beta1, one storage),
//! MeshNetworkPolicy (meshd.io/v1alpha1), ClusterProperty (about.k8s.io/v1alpha1) and CRDs
//! themselves. No admission, defaulting, validation, RBAC, discovery or protobuf.

mod http;
pub mod store;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use mesh_certs::{CertRequest, CertificateAuthority};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub use store::{ApiError, ResourceDef};

use http::Shared;
use store::Store;

/// A running test API server; stops when dropped.
#[derive(Debug)]
pub struct KubeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    ca: CertificateAuthority,
    dir: tempfile::TempDir,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// Settings of a test API server.
#[derive(Debug, Clone)]
pub struct KubeApiConfig {
    /// Changes kept for watches; a watch from an older resourceVersion gets 410.
    pub max_history: usize,
    /// BOOKMARK interval for watches that allow bookmarks.
    pub bookmark_interval: Duration,
    /// Served resources.
    pub resources: Vec<ResourceDef>,
}

impl Default for KubeApiConfig {
    fn default() -> Self {
        Self {
            max_history: 10_000,
            bookmark_interval: Duration::from_millis(500),
            resources: store::default_resources(),
        }
    }
}

impl KubeApiServer {
    /// Starts a server with the default settings on `127.0.0.1:0`.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(KubeApiConfig::default()).await
    }

    /// Starts a server.
    pub async fn start_with(cfg: KubeApiConfig) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("mesh-kube-api-")
            .tempdir()?;
        let ca = CertificateAuthority::generate("mesh-test-kube-ca", Duration::from_secs(86_400))?;
        let server = ca.issue(&CertRequest::server(
            "kube-apiserver",
            &["localhost", "kubernetes.default.svc"],
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
        ))?;
        let mut tls = (*mesh_certs::server_config_from_pem(
            &server.cert_pem,
            &server.key_pem,
            ca.cert_pem(),
        )?)
        .clone();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("binding the test API server")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(cfg.resources, cfg.max_history)),
            requests: Mutex::new(Vec::new()),
            watches: Mutex::new(CancellationToken::new()),
            bookmark_interval: cfg.bookmark_interval,
        });
        let router = axum::Router::new()
            .fallback(http::handle)
            .with_state(shared.clone());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                let mut conns = tokio::task::JoinSet::new();
                loop {
                    let (tcp, _) = tokio::select! {
                        () = shutdown.cancelled() => break,
                        a = listener.accept() => match a {
                            Ok(a) => a,
                            Err(_) => continue,
                        },
                        Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                    };
                    let (acceptor, router) = (acceptor.clone(), router.clone());
                    conns.spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let _ = auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tls), TowerToHyperService::new(router))
                            .await;
                    });
                }
                conns.abort_all();
            }
        });
        Ok(Self {
            addr,
            shared,
            ca,
            dir,
            shutdown,
            task: Some(task),
        })
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The CA of the server certificate (it also signs client certificates).
    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// A kubeconfig with one context `context` (user `<context>-admin`, client certificate).
    pub fn kubeconfig_yaml(&self, context: &str) -> anyhow::Result<String> {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let client = self.ca.issue(&CertRequest::client("admin"))?;
        Ok(format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: {context}\n  cluster:\n    server: {url}\n    certificate-authority-data: {ca}\nusers:\n- name: {context}-admin\n  user:\n    client-certificate-data: {cert}\n    client-key-data: {key}\ncontexts:\n- name: {context}\n  context:\n    cluster: {context}\n    user: {context}-admin\ncurrent-context: {context}\n",
            url = self.url(),
            ca = b64(self.ca.cert_pem()),
            cert = b64(&client.cert_pem),
            key = b64(&client.key_pem),
        ))
    }

    /// Writes [`Self::kubeconfig_yaml`] into the server's temp dir; returns the path.
    pub fn write_kubeconfig(&self, context: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join(format!("{context}.kubeconfig"));
        std::fs::write(&path, self.kubeconfig_yaml(context)?)?;
        Ok(path)
    }

    /// The server's temp dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A kube client for this server.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let kc = kube::config::Kubeconfig::from_yaml(&self.kubeconfig_yaml("test")?)?;
        let cfg =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?;
        Ok(kube::Client::try_from(cfg)?)
    }

    fn store<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        let mut s = self
            .shared
            .store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut s)
    }

    /// Creates or merges an object given with `apiVersion` and `kind` (no HTTP round trip).
    pub fn apply(&self, obj: &Value) -> Result<Value, ApiError> {
        let (res, key) = self.locate(obj)?;
        self.store(|s| s.patch(&res, &key, obj, false, true))
    }

    /// Replaces an object's status.
    pub fn set_status(&self, obj: &Value) -> Result<Value, ApiError> {
        let (res, key) = self.locate(obj)?;
        self.store(|s| s.patch(&res, &key, obj, true, false))
    }

    /// Deletes an object named by `apiVersion`, `kind`, namespace and name.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let res = self.resource(api_version, kind)?;
        let ns = if res.namespaced { namespace } else { "" };
        self.store(|s| s.delete(&res, &(ns.to_owned(), name.to_owned())))
    }

    /// One object, if present.
    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let res = self.resource(api_version, kind).ok()?;
        let ns = if res.namespaced { namespace } else { "" };
        self.store(|s| s.get(&res, &(ns.to_owned(), name.to_owned())).ok())
    }

    /// Every object of a kind (all namespaces).
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let Ok(res) = self.resource(api_version, kind) else {
            return Vec::new();
        };
        self.store(|s| {
            s.list(&res, None, &store::Selectors::default(), None, None)
                .0
        })
    }

    fn resource(&self, api_version: &str, kind: &str) -> Result<ResourceDef, ApiError> {
        self.store(|s| s.resource_for_kind(api_version, kind))
            .ok_or_else(|| {
                ApiError::new(
                    404,
                    "NotFound",
                    format!("{api_version} {kind} is not served"),
                )
            })
    }

    fn locate(&self, obj: &Value) -> Result<(ResourceDef, store::ObjKey), ApiError> {
        let s = |p: &str| obj.pointer(p).and_then(Value::as_str).unwrap_or("");
        let res = self.resource(s("/apiVersion"), s("/kind"))?;
        let ns = if res.namespaced {
            match s("/metadata/namespace") {
                "" => "default",
                ns => ns,
            }
        } else {
            ""
        };
        Ok((res, (ns.to_owned(), s("/metadata/name").to_owned())))
    }

    /// Stops serving one resource version (a CRD version that is not installed).
    pub fn unserve(&self, group: &str, version: &str, plural: &str) {
        self.store(|s| s.unserve(group, version, plural));
    }

    /// Deletes an object without any watch seeing it (the deletion is compacted away): only
    /// a relist after the 410 of the next watch shows it. Watches are closed so that they
    /// resume (and get the 410) at once.
    pub fn delete_unobserved(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<(), ApiError> {
        let res = self.resource(api_version, kind)?;
        let ns = if res.namespaced { namespace } else { "" };
        self.store(|s| s.delete_unobserved(&res, &(ns.to_owned(), name.to_owned())))?;
        self.close_watches();
        Ok(())
    }

    /// Forgets the change history: watches resuming from an older version get 410.
    pub fn compact(&self) {
        self.store(Store::compact);
    }

    /// Ends every open watch (clients re-watch from their last resourceVersion).
    pub fn close_watches(&self) {
        let mut w = self
            .shared
            .watches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        w.cancel();
        *w = CancellationToken::new();
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.store(|s| s.resource_version())
    }

    /// Every request so far (`METHOD path?decoded-query`).
    pub fn requests(&self) -> Vec<String> {
        self.shared
            .requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }
}

impl Drop for KubeApiServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.close_watches();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}
