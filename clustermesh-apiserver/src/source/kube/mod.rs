//! Kubernetes source: kube-rs watchers on the cluster's API server feed the same
//! [`SourceEvent`]s as the manifest directory.
//!
//! ```text
//!  API server ──watcher (list pages + watch, 410 → relist, backoff)── one task per kind
//!     Namespace, Service, EndpointSlice, Pod, Node            (core kinds, always)
//!     ServiceExport multicluster.x-k8s.io v1beta1 | v1alpha1  (optional CRD, probed)
//!     MeshNetworkPolicy meshd.io/v1alpha1                     (optional CRD, probed)
//!        │ KindMsg::{Served, Absent, Event, Error}
//!        ▼
//!  Tracker: DynamicObject → JSON (apiVersion/kind set) → manifest decode + validation
//!        → Apply / Error; after each relist, Delete for what did not come back;
//!        one Synced once every kind listed (an absent CRD counts as listed, empty)
//!        ▼
//!  BoxStream<SourceEvent> ──► exporter (the same path as the manifest source)
//! ```
//!
//! Objects are decoded by the manifest source's decoder, so the same object through either
//! source gives the same [`crate::source::Object`] and therefore the same etcd keys and
//! values. An object that fails validation is reported (`Kubernetes <Kind> ns/name: …`)
//! and its last good version stays in force. An optional CRD that is not installed is
//! reported once and probed again every [`KubeSourceConfig::crd_recheck`].

pub mod cluster;
mod state;
pub mod status;

use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::BoxStream;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use self::state::{KindMsg, Tracker};
use super::{ObjectKind, Source, SourceEvent};

/// Events buffered between the background task and the stream's consumer.
const EVENT_BUFFER: usize = 1024;

/// Settings of the Kubernetes source.
#[derive(Debug, Clone)]
pub struct KubeSourceConfig {
    /// How often a CRD that is not installed (ServiceExport, MeshNetworkPolicy) is looked for
    /// again. Default 30 s.
    pub crd_recheck: Duration,
    /// Watcher settings (page size, bookmarks, timeouts). Default: kube's defaults.
    pub watcher: watcher::Config,
}

impl Default for KubeSourceConfig {
    fn default() -> Self {
        Self {
            crd_recheck: Duration::from_secs(30),
            watcher: watcher::Config::default(),
        }
    }
}

/// The cluster's Kubernetes API as the source of its state.
#[derive(Clone)]
pub struct KubeSource {
    client: Client,
    cfg: KubeSourceConfig,
}

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl KubeSource {
    /// A source reading through `client`.
    pub fn new(client: Client, cfg: KubeSourceConfig) -> Self {
        Self { client, cfg }
    }
}

/// One watched kind: the versions to try, in order of preference.
#[derive(Debug, Clone)]
struct Watched {
    object_kind: ObjectKind,
    kind: &'static str,
    plural: &'static str,
    group: &'static str,
    versions: &'static [&'static str],
    namespaced: bool,
    optional: bool,
}

const WATCHED: &[Watched] = &[
    Watched {
        object_kind: ObjectKind::Namespace,
        kind: "Namespace",
        plural: "namespaces",
        group: "",
        versions: &["v1"],
        namespaced: false,
        optional: false,
    },
    Watched {
        object_kind: ObjectKind::Service,
        kind: "Service",
        plural: "services",
        group: "",
        versions: &["v1"],
        namespaced: true,
        optional: false,
    },
    Watched {
        object_kind: ObjectKind::EndpointSlice,
        kind: "EndpointSlice",
        plural: "endpointslices",
        group: "discovery.k8s.io",
        versions: &["v1"],
        namespaced: true,
        optional: false,
    },
    Watched {
        object_kind: ObjectKind::Pod,
        kind: "Pod",
        plural: "pods",
        group: "",
        versions: &["v1"],
        namespaced: true,
        optional: false,
    },
    Watched {
        object_kind: ObjectKind::Node,
        kind: "Node",
        plural: "nodes",
        group: "",
        versions: &["v1"],
        namespaced: false,
        optional: false,
    },
    Watched {
        object_kind: ObjectKind::ServiceExport,
        kind: "ServiceExport",
        plural: "serviceexports",
        group: status::MCS_GROUP,
        versions: &["v1beta1", "v1alpha1"],
        namespaced: true,
        optional: true,
    },
    Watched {
        object_kind: ObjectKind::Policy,
        kind: meshd::model::POLICY_KIND,
        plural: "meshnetworkpolicies",
        group: "meshd.io",
        versions: &["v1alpha1"],
        namespaced: true,
        optional: true,
    },
];

/// The `ApiResource` of `group/version` `kind` with `plural`.
pub(crate) fn api_resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// The first version of `w` the API server serves (`None`: none is).
async fn served_version(client: &Client, w: &Watched) -> Result<Option<ApiResource>, kube::Error> {
    for version in w.versions {
        let ar = api_resource(w.group, version, w.kind, w.plural);
        if !w.optional {
            return Ok(Some(ar));
        }
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        match api.list_metadata(&ListParams::default().limit(1)).await {
            Ok(_) => return Ok(Some(ar)),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

async fn watch_kind(
    client: Client,
    w: Watched,
    i: usize,
    cfg: KubeSourceConfig,
    tx: mpsc::Sender<(usize, KindMsg)>,
    shutdown: CancellationToken,
) {
    let send = |msg| {
        let tx = tx.clone();
        async move { tx.send((i, msg)).await.is_ok() }
    };
    let mut backoff = meshd::backoff::Backoff::new(meshd::backoff::BackoffConfig::default());
    let ar = loop {
        let (msg, wait) = match served_version(&client, &w).await {
            Ok(Some(ar)) => break ar,
            Ok(None) => (KindMsg::Absent, cfg.crd_recheck),
            Err(e) => (
                KindMsg::Error(format!("probing {}: {e}", w.plural)),
                backoff.next_delay(),
            ),
        };
        if !send(msg).await {
            return;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    };
    if !send(KindMsg::Served(ar.api_version.clone())).await {
        return;
    }
    let api: Api<DynamicObject> = Api::all_with(client, &ar);
    let mut events = watcher(api, cfg.watcher).default_backoff().boxed();
    loop {
        let ev = tokio::select! {
            () = shutdown.cancelled() => return,
            ev = events.next() => ev,
        };
        let msg = match ev {
            Some(Ok(ev)) => KindMsg::Event(Box::new(ev)),
            Some(Err(e)) => KindMsg::Error(e.to_string()),
            None => return,
        };
        if !send(msg).await {
            return;
        }
    }
}

async fn run(
    client: Client,
    cfg: KubeSourceConfig,
    out: mpsc::Sender<SourceEvent>,
    shutdown: CancellationToken,
) {
    let (tx, mut rx) = mpsc::channel(EVENT_BUFFER);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, w) in WATCHED.iter().enumerate() {
        tasks.spawn(watch_kind(
            client.clone(),
            w.clone(),
            i,
            cfg.clone(),
            tx.clone(),
            shutdown.clone(),
        ));
    }
    drop(tx);
    let kinds: Vec<_> = WATCHED
        .iter()
        .map(|w| (w.object_kind, w.kind, w.namespaced))
        .collect();
    let mut tracker = Tracker::new(&kinds);
    loop {
        let (i, msg) = tokio::select! {
            () = shutdown.cancelled() => break,
            m = rx.recv() => match m {
                Some(m) => m,
                None => break,
            },
        };
        for ev in tracker.handle(i, msg) {
            tokio::select! {
                () = shutdown.cancelled() => break,
                r = out.send(ev) => if r.is_err() { break },
            }
        }
    }
    tasks.shutdown().await;
}

impl Source for KubeSource {
    fn run(self: Box<Self>, shutdown: CancellationToken) -> BoxStream<'static, SourceEvent> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            let error = super::SourceError {
                location: "Kubernetes source".to_owned(),
                message: "must be started inside a tokio runtime".to_owned(),
            };
            return futures::stream::iter([SourceEvent::Error(error)]).boxed();
        };
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        runtime.spawn(run(self.client, self.cfg, tx, shutdown.clone()));
        tokio_stream::wrappers::ReceiverStream::new(rx)
            .take_until(shutdown.cancelled_owned())
            .boxed()
    }
}
