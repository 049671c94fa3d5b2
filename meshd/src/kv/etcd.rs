//! `KvStore` over a real etcd (etcd-client; TLS with client certificates).

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare as EtcdCompare, CompareOp, ConnectOptions, DeleteOptions,
    GetOptions, Identity as TlsIdentity, PutOptions, TlsOptions, Txn as EtcdTxn, TxnOp,
    WatchOptions,
};

use super::{
    Compare, KeyValue, KvError, KvStore, LeaseId, ListPage, Op, Txn, TxnResult, WatchBatch,
    WatchEvent, WatchStream,
};
use crate::keys::prefix_end;

/// How to reach an etcd cluster.
#[derive(Clone, Default)]
pub struct EtcdConfig {
    /// Endpoints, e.g. `https://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// CA bundle (PEM) that signed the server certificate.
    pub ca_pem: Option<String>,
    /// Client certificate (PEM); its CN is the etcd user when client-cert auth is on.
    pub cert_pem: Option<String>,
    /// Client key (PEM).
    pub key_pem: Option<String>,
    /// Name to verify the server certificate against (defaults to the endpoint host).
    pub tls_server_name: Option<String>,
    /// User name and password (instead of, or in addition to, the certificate CN).
    pub user: Option<(String, String)>,
    /// Connect timeout (default 5 s).
    pub connect_timeout: Option<Duration>,
    /// Per-request timeout for unary calls (default none: watches are long-lived).
    pub request_timeout: Option<Duration>,
}

impl std::fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.ca_pem.is_some())
            .field("client_cert", &self.cert_pem.is_some())
            .field("tls_server_name", &self.tls_server_name)
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish_non_exhaustive()
    }
}

/// A `KvStore` backed by etcd. Cheap to clone (one shared HTTP/2 channel).
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    endpoints: String,
    request_timeout: Option<Duration>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

fn boxed(e: etcd_client::Error) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(e)
}

/// Classifies an etcd-client error for `op` on `key`.
fn map_err(op: &'static str, key: &str, e: etcd_client::Error) -> KvError {
    if let etcd_client::Error::GRpcStatus(status) = &e {
        let msg = status.message();
        if msg.contains("required revision has been compacted") {
            return KvError::Compacted {
                requested: 0,
                compact_revision: 0,
            };
        }
        if msg.contains("requested lease not found") {
            return KvError::LeaseNotFound(0);
        }
        if status.code() == tonic::Code::PermissionDenied || msg.contains("permission denied") {
            return KvError::PermissionDenied {
                op,
                key: key.to_owned(),
            };
        }
        if status.code() == tonic::Code::Unavailable {
            return KvError::Connect {
                endpoint: String::new(),
                source: boxed(e),
            };
        }
    }
    if matches!(e, etcd_client::Error::TransportError(_)) {
        return KvError::Connect {
            endpoint: String::new(),
            source: boxed(e),
        };
    }
    KvError::Request {
        op,
        key: key.to_owned(),
        source: boxed(e),
    }
}

/// Whether a request failed because the response exceeded the gRPC message size limit.
fn is_too_large(e: &KvError) -> bool {
    matches!(e, KvError::Request { source, .. }
        if source.to_string().contains("message length too large"))
}

fn kv_from(kv: etcd_client::proto::PbKeyValue) -> KeyValue {
    KeyValue {
        key: kv.key,
        value: kv.value,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        lease: kv.lease,
    }
}

fn kv_from_ref(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: kv.key().to_vec(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    }
}

impl EtcdStore {
    /// Connects (lazily: the first request dials) with TLS when a CA is given.
    pub async fn connect(cfg: &EtcdConfig) -> Result<Self, KvError> {
        if cfg.endpoints.is_empty() {
            return Err(KvError::Config("no etcd endpoints".into()));
        }
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(cfg.connect_timeout.unwrap_or(Duration::from_secs(5)))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if let Some(ca) = &cfg.ca_pem {
            let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
            match (&cfg.cert_pem, &cfg.key_pem) {
                (Some(c), Some(k)) => tls = tls.identity(TlsIdentity::from_pem(c, k)),
                (None, None) => {}
                _ => {
                    return Err(KvError::Config(
                        "client certificate and key must be given together".into(),
                    ));
                }
            }
            if let Some(name) = &cfg.tls_server_name {
                tls = tls.domain_name(name.clone());
            }
            opts = opts.with_tls(tls);
        }
        if let Some((u, p)) = &cfg.user {
            opts = opts.with_user(u.clone(), p.clone());
        }
        let endpoints = cfg.endpoints.join(",");
        let client = Client::connect(&cfg.endpoints, Some(opts))
            .await
            .map_err(|e| match e {
                etcd_client::Error::InvalidArgs(m) => KvError::Config(m),
                etcd_client::Error::InvalidUri(u) => KvError::Config(u.to_string()),
                e => KvError::Connect {
                    endpoint: endpoints.clone(),
                    source: boxed(e),
                },
            })?;
        Ok(Self {
            client,
            endpoints,
            request_timeout: cfg.request_timeout,
        })
    }

    /// The underlying etcd-client (for admin calls outside the seam: auth, compaction).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The endpoints this store talks to.
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        key: &str,
        f: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, KvError> {
        let r = match self.request_timeout {
            Some(t) => tokio::time::timeout(t, f)
                .await
                .map_err(|_| KvError::Request {
                    op,
                    key: key.to_owned(),
                    source: format!("timed out after {t:?}").into(),
                })?,
            None => f.await,
        };
        r.map_err(|e| {
            let mut err = map_err(op, key, e);
            if let KvError::Connect { endpoint, .. } = &mut err {
                endpoint.clone_from(&self.endpoints);
            }
            err
        })
    }
}

fn compare(c: &Compare) -> EtcdCompare {
    match c {
        Compare::Absent(k) => EtcdCompare::create_revision(k.as_str(), CompareOp::Equal, 0),
        Compare::ModRevision(k, r) => EtcdCompare::mod_revision(k.as_str(), CompareOp::Equal, *r),
        Compare::Value(k, v) => EtcdCompare::value(k.as_str(), CompareOp::Equal, v.clone()),
        // Over a range, etcd compares every key; an empty range compares a zero KeyValue,
        // so "create revision == 0 over the prefix" holds exactly when no key exists.
        Compare::PrefixAbsent(p) => {
            EtcdCompare::create_revision(p.as_str(), CompareOp::Equal, 0).with_prefix()
        }
    }
}

fn op(o: &Op) -> TxnOp {
    match o {
        Op::Put { key, value, lease } => TxnOp::put(
            key.as_str(),
            value.clone(),
            lease.map(|l| PutOptions::new().with_lease(l)),
        ),
        Op::Delete(key) => TxnOp::delete(key.as_str(), None),
    }
}

#[async_trait]
impl KvStore for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, KvError> {
        let mut c = self.client.clone();
        let mut resp = self.timed("get", key, c.get(key, None)).await?;
        Ok(resp.take_kvs().first().map(kv_from_ref))
    }

    async fn list_page(
        &self,
        prefix: &str,
        start: Option<&[u8]>,
        limit: usize,
        revision: i64,
    ) -> Result<ListPage, KvError> {
        let from = start.unwrap_or(prefix.as_bytes()).to_vec();
        let end = prefix_end(prefix.as_bytes());
        let mut limit = limit.max(1);
        loop {
            let mut c = self.client.clone();
            let opts = GetOptions::new()
                .with_range(end.clone())
                .with_limit(limit as i64)
                .with_revision(revision);
            match self
                .timed("list", prefix, c.get(from.clone(), Some(opts)))
                .await
            {
                Ok(resp) => {
                    let more = resp.more();
                    let mut pb = resp.0;
                    let rev = pb.header.as_ref().map_or(0, |h| h.revision);
                    return Ok(ListPage {
                        revision: if revision == 0 { rev } else { revision },
                        kvs: std::mem::take(&mut pb.kvs)
                            .into_iter()
                            .map(kv_from)
                            .collect(),
                        more,
                    });
                }
                Err(KvError::Compacted { .. }) => {
                    return Err(KvError::Compacted {
                        requested: revision,
                        compact_revision: 0,
                    });
                }
                // A page of large values exceeded the gRPC message limit: smaller pages.
                Err(e) if limit > 1 && is_too_large(&e) => {
                    limit /= 2;
                    tracing::debug!(prefix, limit, "list page too large; halving");
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn put(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<i64, KvError> {
        let mut c = self.client.clone();
        let opts = lease.map(|l| PutOptions::new().with_lease(l));
        let resp = self
            .timed("put", key, c.put(key, value, opts))
            .await
            .map_err(|e| match (e, lease) {
                (KvError::LeaseNotFound(_), Some(l)) => KvError::LeaseNotFound(l),
                (e, _) => e,
            })?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    async fn delete(&self, key: &str) -> Result<bool, KvError> {
        let mut c = self.client.clone();
        let resp = self.timed("delete", key, c.delete(key, None)).await?;
        Ok(resp.deleted() > 0)
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, KvError> {
        let mut c = self.client.clone();
        let resp = self
            .timed(
                "delete",
                prefix,
                c.delete(prefix, Some(DeleteOptions::new().with_prefix())),
            )
            .await?;
        Ok(resp.deleted().max(0) as u64)
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, KvError> {
        let first = match txn.compares.first() {
            Some(
                Compare::Absent(k)
                | Compare::ModRevision(k, _)
                | Compare::Value(k, _)
                | Compare::PrefixAbsent(k),
            ) => k.clone(),
            None => String::new(),
        };
        let t = EtcdTxn::new()
            .when(txn.compares.iter().map(compare).collect::<Vec<_>>())
            .and_then(txn.success.iter().map(op).collect::<Vec<_>>())
            .or_else(txn.failure.iter().map(op).collect::<Vec<_>>());
        let mut c = self.client.clone();
        let resp = self.timed("txn", &first, c.txn(t)).await?;
        Ok(TxnResult {
            succeeded: resp.succeeded(),
            revision: resp.header().map_or(0, |h| h.revision()),
        })
    }

    async fn watch(&self, prefix: &str, start_revision: i64) -> Result<WatchStream, KvError> {
        let mut c = self.client.clone();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(start_revision)
            .with_progress_notify();
        // The watch call itself is not bounded by the request timeout beyond creation.
        let ws = self
            .timed("watch", prefix, c.watch(prefix, Some(opts)))
            .await?;
        let (sender, responses) = ws.split();
        let state = EtcdWatch {
            _sender: sender,
            responses,
            prefix: prefix.to_owned(),
            start_revision,
            endpoints: self.endpoints.clone(),
            done: false,
        };
        Ok(Box::pin(futures::stream::unfold(
            state,
            |mut s| async move {
                let item = s.next_batch().await?;
                Some((item, s))
            },
        )))
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, KvError> {
        let mut c = self.client.clone();
        let secs = ttl.as_secs().max(1) as i64;
        let resp = self
            .timed("lease-grant", "", c.lease_grant(secs, None))
            .await?;
        Ok(resp.id())
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<Duration, KvError> {
        let mut c = self.client.clone();
        let fut = async move {
            let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            stream.message().await
        };
        match self.timed("lease-keepalive", "", fut).await? {
            Some(r) if r.ttl() > 0 => Ok(Duration::from_secs(r.ttl() as u64)),
            _ => Err(KvError::LeaseNotFound(lease)),
        }
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), KvError> {
        let mut c = self.client.clone();
        self.timed("lease-revoke", "", c.lease_revoke(lease))
            .await
            .map_err(|e| match e {
                KvError::LeaseNotFound(_) => KvError::LeaseNotFound(lease),
                e => e,
            })?;
        Ok(())
    }
}

struct EtcdWatch {
    /// Kept alive: dropping the request side ends the server-side watch.
    _sender: etcd_client::WatchRequestSender,
    responses: etcd_client::WatchResponseStream,
    prefix: String,
    start_revision: i64,
    endpoints: String,
    done: bool,
}

impl EtcdWatch {
    async fn next_batch(&mut self) -> Option<Result<WatchBatch, KvError>> {
        if self.done {
            return None;
        }
        loop {
            let resp = match self.responses.message().await {
                Ok(Some(r)) => r,
                Ok(None) => {
                    self.done = true;
                    return Some(Err(KvError::Connect {
                        endpoint: self.endpoints.clone(),
                        source: "watch stream closed by server".into(),
                    }));
                }
                Err(e) => {
                    self.done = true;
                    let mut err = map_err("watch", &self.prefix, e);
                    if let KvError::Connect { endpoint, .. } = &mut err {
                        endpoint.clone_from(&self.endpoints);
                    }
                    return Some(Err(err));
                }
            };
            if resp.canceled() {
                self.done = true;
                return Some(Err(if resp.compact_revision() > 0 {
                    KvError::Compacted {
                        requested: self.start_revision,
                        compact_revision: resp.compact_revision(),
                    }
                } else {
                    KvError::WatchCanceled {
                        prefix: self.prefix.clone(),
                        reason: resp.cancel_reason().to_owned(),
                    }
                }));
            }
            if resp.compact_revision() > 0 {
                self.done = true;
                return Some(Err(KvError::Compacted {
                    requested: self.start_revision,
                    compact_revision: resp.compact_revision(),
                }));
            }
            if resp.created() && resp.events().is_empty() {
                // The creation ack's header is the store revision at creation, not a
                // promise that older events were delivered; skip it.
                continue;
            }
            let mut pb = resp.0;
            let revision = pb.header.as_ref().map_or(0, |h| h.revision);
            let events = std::mem::take(&mut pb.events)
                .into_iter()
                .filter_map(|ev| {
                    let kv = ev.kv?;
                    Some(if ev.r#type == 1 {
                        WatchEvent::Delete {
                            mod_revision: kv.mod_revision,
                            key: kv.key,
                        }
                    } else {
                        WatchEvent::Put(kv_from(kv))
                    })
                })
                .collect();
            return Some(Ok(WatchBatch { revision, events }));
        }
    }
}
