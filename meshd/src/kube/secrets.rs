//! Peer Secrets: `PeerSecretWatcher` (Secrets → `PeerEvent`s, as the peers directory) and meshctl's write/delete/list.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use futures::StreamExt as _;
use futures::stream::BoxStream;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource as _;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{WatchStreamExt as _, watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{KubeError, PEER_LABEL, PEER_SECRET_KEY, PEER_SECRET_PREFIX};
use crate::model::ClusterName;
use crate::peers::{PeerConfigError, PeerCredential, PeerEvent};

/// Events buffered between the watch task and the stream.
const CHANNEL_CAPACITY: usize = 64;

/// `meshd-peer-<remote>`.
pub fn peer_secret_name(peer: &ClusterName) -> String {
    format!("{PEER_SECRET_PREFIX}{peer}")
}

/// How a Secret is named in errors and in `PeerEvent::Error::path`: `Secret/<ns>/<name>`.
fn secret_path(namespace: &str, name: &str) -> PathBuf {
    PathBuf::from(format!("Secret/{namespace}/{name}"))
}

/// Parses a peer Secret: key `kubeconfig` must hold a valid peer kubeconfig whose cluster
/// is the one the Secret's name (`meshd-peer-<remote>`) says. Errors name the Secret and
/// the field (`data.kubeconfig`, or the kubeconfig field inside it).
pub fn parse_peer_secret(
    namespace: &str,
    secret: &Secret,
) -> Result<PeerCredential, PeerConfigError> {
    let name = secret.metadata.name.as_deref().unwrap_or_default();
    let path = secret_path(namespace, name);
    let invalid = |field: &str, reason: String| PeerConfigError::Field {
        path: path.clone(),
        field: field.to_owned(),
        reason,
    };
    let Some(expected) = name.strip_prefix(PEER_SECRET_PREFIX) else {
        return Err(invalid(
            "metadata.name",
            format!("a peer Secret is named {PEER_SECRET_PREFIX}<remote cluster>"),
        ));
    };
    let text = match secret.data.as_ref().and_then(|d| d.get(PEER_SECRET_KEY)) {
        Some(ByteString(bytes)) => String::from_utf8(bytes.clone())
            .map_err(|_| invalid("data.kubeconfig", "not UTF-8 text".into()))?,
        None => match secret
            .string_data
            .as_ref()
            .and_then(|d| d.get(PEER_SECRET_KEY))
        {
            Some(s) => s.clone(),
            None => {
                return Err(invalid(
                    "data.kubeconfig",
                    "missing: the peer kubeconfig goes under key `kubeconfig`".into(),
                ));
            }
        },
    };
    let key_path = path.join(PEER_SECRET_KEY);
    reject_file_references(&key_path, &text)?;
    let cred = PeerCredential::from_kubeconfig(&key_path, &text)?;
    if cred.name.as_str() != expected {
        return Err(invalid(
            "metadata.name",
            format!(
                "the Secret is for cluster {expected:?} but its kubeconfig is for {:?}",
                cred.name.as_str()
            ),
        ));
    }
    Ok(cred)
}

/// A kubeconfig in a Secret must carry its certificates inline (`*-data`): a file path
/// would be resolved on whichever pod reads it.
fn reject_file_references(path: &std::path::Path, text: &str) -> Result<(), PeerConfigError> {
    let Ok(kc) = kube::config::Kubeconfig::from_yaml(text) else {
        return Ok(()); // from_kubeconfig reports the parse error
    };
    let field = |f: String| PeerConfigError::Field {
        path: path.to_owned(),
        field: f,
        reason: "file references are not allowed in a Secret; use the -data form".into(),
    };
    for (i, c) in kc.clusters.iter().enumerate() {
        if c.cluster
            .as_ref()
            .is_some_and(|c| c.certificate_authority.is_some())
        {
            return Err(field(format!(
                "clusters[{i}].cluster.certificate-authority"
            )));
        }
    }
    for (i, u) in kc.auth_infos.iter().enumerate() {
        let Some(a) = &u.auth_info else { continue };
        if a.client_certificate.is_some() {
            return Err(field(format!("users[{i}].user.client-certificate")));
        }
        if a.client_key.is_some() {
            return Err(field(format!("users[{i}].user.client-key")));
        }
    }
    Ok(())
}

/// Writes (creates or replaces, by server-side apply as `field_manager`) the Secret
/// `meshd-peer-<cred.name>` in `namespace`: label `meshd.io/peer: "true"`, key
/// `kubeconfig` = `cred` in canonical form with user entry `user`.
pub async fn write_peer_secret(
    client: &kube::Client,
    namespace: &str,
    cred: &PeerCredential,
    user: &str,
    field_manager: &str,
) -> Result<Secret, KubeError> {
    let name = peer_secret_name(&cred.name);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                (PEER_LABEL.to_owned(), "true".to_owned()),
                ("meshd.io/cluster".to_owned(), cred.name.to_string()),
            ])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([(
            PEER_SECRET_KEY.to_owned(),
            ByteString(cred.to_kubeconfig_yaml(user).into_bytes()),
        )])),
        ..Secret::default()
    };
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    api.patch(
        &name,
        &PatchParams::apply(field_manager).force(),
        &Patch::Apply(&secret),
    )
    .await
    .map_err(|e| KubeError::api("write", format!("Secret {namespace}/{name}"), e))
}

/// Deletes the Secret `meshd-peer-<peer>`; whether there was one.
pub async fn delete_peer_secret(
    client: &kube::Client,
    namespace: &str,
    peer: &ClusterName,
) -> Result<bool, KubeError> {
    let name = peer_secret_name(peer);
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    match api.delete(&name, &Default::default()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(KubeError::api(
            "delete",
            format!("Secret {namespace}/{name}"),
            e,
        )),
    }
}

/// Every peer Secret of `namespace` (label `meshd.io/peer=true`), by Secret name, parsed.
pub async fn list_peer_secrets(
    client: &kube::Client,
    namespace: &str,
) -> Result<Vec<(String, Result<PeerCredential, PeerConfigError>)>, KubeError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let list = api
        .list(&ListParams::default().labels(&format!("{PEER_LABEL}=true")))
        .await
        .map_err(|e| KubeError::api("list", format!("Secrets in {namespace}"), e))?;
    Ok(list
        .items
        .iter()
        .map(|s| {
            (
                s.metadata.name.clone().unwrap_or_default(),
                parse_peer_secret(namespace, s),
            )
        })
        .collect())
}

/// Watches the peer Secrets of one namespace and reports them as [`PeerEvent`]s, exactly
/// as [`crate::peers::PeerDirWatcher`] reports files: so the same `PeerManager` lifecycle
/// applies.
#[derive(Clone)]
pub struct PeerSecretWatcher {
    client: kube::Client,
    namespace: String,
    reporter: Option<Reporter>,
}

impl std::fmt::Debug for PeerSecretWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSecretWatcher")
            .field("namespace", &self.namespace)
            .field("reporter", &self.reporter)
            .finish_non_exhaustive()
    }
}

impl PeerSecretWatcher {
    /// A watcher of the Secrets labelled `meshd.io/peer=true` in `namespace`.
    pub fn new(client: kube::Client, namespace: impl Into<String>) -> Self {
        Self {
            client,
            namespace: namespace.into(),
            reporter: None,
        }
    }

    /// Also publishes a Warning Event on a Secret that does not parse, as `controller`
    /// (instance `instance`, e.g. the pod name).
    #[must_use]
    pub fn with_events(mut self, controller: &str, instance: Option<String>) -> Self {
        self.reporter = Some(Reporter {
            controller: controller.to_owned(),
            instance,
        });
        self
    }

    /// Starts the watch task (on the current Tokio runtime) and returns its events: the
    /// initial `Upsert`s and `Error`s, one `Synced` after the first full list, then changes.
    /// After a relist (410 Gone, reconnect) a Secret that did not come back is removed. A
    /// broken Secret yields `Error` while its last good credential stays in force. The
    /// stream ends when `shutdown` is cancelled.
    pub fn run(self, shutdown: CancellationToken) -> BoxStream<'static, PeerEvent> {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        tokio::spawn(self.task(tx, shutdown.clone()));
        futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|ev| (ev, rx)) },
        )
        .take_until(shutdown.cancelled_owned())
        .boxed()
    }

    async fn task(self, tx: mpsc::Sender<PeerEvent>, shutdown: CancellationToken) {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let cfg = watcher::Config::default().labels(&format!("{PEER_LABEL}=true"));
        let mut events = watcher(api, cfg).default_backoff().boxed();
        let recorder = self
            .reporter
            .clone()
            .map(|r| Recorder::new(self.client.clone(), r));
        let mut state = SecretState::default();
        loop {
            let ev = tokio::select! {
                () = shutdown.cancelled() => return,
                ev = events.next() => ev,
            };
            let out = match ev {
                None => return,
                Some(Err(e)) => {
                    tracing::warn!(namespace = %self.namespace, error = %e, "watching peer Secrets failed; retrying");
                    continue;
                }
                Some(Ok(ev)) => state.apply(&self.namespace, ev),
            };
            for (ev, secret) in out {
                if let (PeerEvent::Error { error, .. }, Some(rec), Some(secret)) =
                    (&ev, &recorder, secret)
                {
                    let event = Event {
                        type_: EventType::Warning,
                        reason: "InvalidPeerCredential".into(),
                        note: Some(truncate(&error.to_string(), 1000)),
                        action: "LoadPeerCredential".into(),
                        secondary: None,
                    };
                    if let Err(e) = rec.publish(&event, &secret.object_ref(&())).await {
                        tracing::warn!(error = %e, "publishing an Event on a bad peer Secret failed");
                    }
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    r = tx.send(ev) => if r.is_err() { return },
                }
            }
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// What the watcher knows about one Secret.
#[derive(Debug, Default)]
struct Known {
    good: Option<PeerCredential>,
    error: Option<String>,
}

/// Secret watcher events → peer events (single owner, no I/O: unit-tested on synthetic events).
#[derive(Debug, Default)]
pub(crate) struct SecretState {
    secrets: BTreeMap<String, Known>,
    relist: Option<BTreeSet<String>>,
    synced: bool,
}

impl SecretState {
    /// The peer events for one watcher event, each with the Secret it concerns (for Events).
    pub(crate) fn apply(
        &mut self,
        namespace: &str,
        ev: watcher::Event<Secret>,
    ) -> Vec<(PeerEvent, Option<Secret>)> {
        let mut out = Vec::new();
        match ev {
            watcher::Event::Init => self.relist = Some(BTreeSet::new()),
            watcher::Event::InitApply(s) | watcher::Event::Apply(s) => {
                let name = s.metadata.name.clone().unwrap_or_default();
                if let Some(r) = &mut self.relist {
                    r.insert(name.clone());
                }
                let known = self.secrets.entry(name).or_default();
                match parse_peer_secret(namespace, &s) {
                    Ok(cred) => {
                        let changed = known.good.as_ref() != Some(&cred) || known.error.is_some();
                        known.error = None;
                        if changed {
                            known.good = Some(cred.clone());
                            out.push((PeerEvent::Upsert(cred), None));
                        }
                    }
                    Err(error) => {
                        let msg = error.to_string();
                        if known.error.as_deref() != Some(msg.as_str()) {
                            known.error = Some(msg);
                            let path = error.path().to_owned();
                            out.push((PeerEvent::Error { path, error }, Some(s)));
                        }
                    }
                }
            }
            watcher::Event::Delete(s) => {
                let name = s.metadata.name.unwrap_or_default();
                if let Some(r) = &mut self.relist {
                    r.remove(&name);
                }
                out.extend(self.remove(&name));
            }
            watcher::Event::InitDone => {
                let seen = self.relist.take().unwrap_or_default();
                let gone: Vec<String> = self
                    .secrets
                    .keys()
                    .filter(|k| !seen.contains(*k))
                    .cloned()
                    .collect();
                for name in gone {
                    out.extend(self.remove(&name));
                }
                if !self.synced {
                    self.synced = true;
                    out.push((PeerEvent::Synced, None));
                }
            }
        }
        out
    }

    fn remove(&mut self, name: &str) -> Option<(PeerEvent, Option<Secret>)> {
        let known = self.secrets.remove(name)?;
        known.good.map(|c| (PeerEvent::Remove(c.name), None))
    }
}
