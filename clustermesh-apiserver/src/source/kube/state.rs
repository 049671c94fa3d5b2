//! `Tracker`: per-kind watcher events → `SourceEvent`s (decode as manifests do, sweep after a relist, one `Synced`).

use std::collections::HashSet;

use kube::api::DynamicObject;
use kube::runtime::watcher;

use crate::source::{ObjectKind, ObjectRef, SourceError, SourceEvent};

/// What a kind's watch task reports.
#[derive(Debug)]
pub(super) enum KindMsg {
    /// The resource is served at this `apiVersion` (sent before its events).
    Served(String),
    /// The resource is not served (an optional CRD that is not installed).
    Absent,
    /// A watcher event.
    Event(Box<watcher::Event<DynamicObject>>),
    /// A watch or list error (the watcher retries with backoff).
    Error(String),
}

/// One watched kind.
#[derive(Debug)]
struct KindState {
    object_kind: ObjectKind,
    kind: &'static str,
    namespaced: bool,
    api_version: Option<String>,
    /// Objects applied (or known but currently invalid) as the consumer sees them.
    known: HashSet<ObjectRef>,
    /// Objects seen since the last `Init` (a relist in progress).
    relist: Option<HashSet<ObjectRef>>,
    synced: bool,
    absent_reported: bool,
}

/// Turns the watch messages of every kind into the source's events.
#[derive(Debug)]
pub(super) struct Tracker {
    kinds: Vec<KindState>,
    synced_sent: bool,
}

impl Tracker {
    /// A tracker for `kinds`: `(object kind, Kubernetes kind, namespaced)`, indexed as given.
    pub(super) fn new(kinds: &[(ObjectKind, &'static str, bool)]) -> Self {
        Self {
            kinds: kinds
                .iter()
                .map(|&(object_kind, kind, namespaced)| KindState {
                    object_kind,
                    kind,
                    namespaced,
                    api_version: None,
                    known: HashSet::new(),
                    relist: None,
                    synced: false,
                    absent_reported: false,
                })
                .collect(),
            synced_sent: false,
        }
    }

    /// Applies one message of kind `i`; returns the events to emit, in order.
    pub(super) fn handle(&mut self, i: usize, msg: KindMsg) -> Vec<SourceEvent> {
        let mut out = Vec::new();
        let Some(k) = self.kinds.get_mut(i) else {
            return out;
        };
        match msg {
            KindMsg::Served(v) => {
                k.api_version = Some(v);
                k.absent_reported = false;
            }
            KindMsg::Absent => {
                for r in k.known.drain() {
                    out.push(SourceEvent::Delete(r));
                }
                k.relist = None;
                k.synced = true;
                if !k.absent_reported {
                    k.absent_reported = true;
                    out.push(SourceEvent::Error(SourceError {
                        location: format!("Kubernetes API, kind {}", k.kind),
                        message: format!(
                            "not served (CRD not installed?): no {} objects are exported until it is",
                            k.kind
                        ),
                    }));
                }
            }
            KindMsg::Error(message) => out.push(SourceEvent::Error(SourceError {
                location: format!("Kubernetes API, watch of {}", k.kind),
                message,
            })),
            KindMsg::Event(ev) => match *ev {
                watcher::Event::Init => k.relist = Some(HashSet::new()),
                watcher::Event::InitApply(o) | watcher::Event::Apply(o) => k.apply(&o, &mut out),
                watcher::Event::Delete(o) => {
                    let r = k.object_ref(&o);
                    if let Some(relist) = &mut k.relist {
                        relist.remove(&r);
                    }
                    if k.known.remove(&r) {
                        out.push(SourceEvent::Delete(r));
                    }
                }
                watcher::Event::InitDone => {
                    let seen = k.relist.take().unwrap_or_default();
                    let mut gone: Vec<ObjectRef> = k.known.difference(&seen).cloned().collect();
                    gone.sort();
                    for r in gone {
                        k.known.remove(&r);
                        out.push(SourceEvent::Delete(r));
                    }
                    k.synced = true;
                }
            },
        }
        if !self.synced_sent && self.kinds.iter().all(|k| k.synced) {
            self.synced_sent = true;
            out.push(SourceEvent::Synced);
        }
        out
    }
}

impl KindState {
    fn object_ref(&self, o: &DynamicObject) -> ObjectRef {
        let namespace = if self.namespaced {
            o.metadata
                .namespace
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "default".to_owned())
        } else {
            String::new()
        };
        ObjectRef {
            kind: self.object_kind,
            namespace,
            name: o.metadata.name.clone().unwrap_or_default(),
        }
    }

    fn apply(&mut self, o: &DynamicObject, out: &mut Vec<SourceEvent>) {
        let r = self.object_ref(o);
        if let Some(relist) = &mut self.relist {
            relist.insert(r.clone());
        }
        let mut value = match serde_json::to_value(o) {
            Ok(v) => v,
            Err(e) => {
                out.push(self.error(&r, &e.to_string()));
                return;
            }
        };
        value["apiVersion"] = self.api_version.clone().unwrap_or_default().into();
        value["kind"] = self.kind.into();
        match crate::source::manifest::decode_object(&value) {
            Ok(object) => {
                self.known.insert(r);
                out.push(SourceEvent::Apply(object));
            }
            // The last good version (if any) stays in force, as with a bad manifest.
            Err(problems) => {
                for p in problems {
                    out.push(self.error(&r, &p));
                }
            }
        }
    }

    fn error(&self, r: &ObjectRef, message: &str) -> SourceEvent {
        let name = if r.namespace.is_empty() {
            r.name.clone()
        } else {
            format!("{}/{}", r.namespace, r.name)
        };
        SourceEvent::Error(SourceError {
            location: format!("Kubernetes {} {name}", self.kind),
            message: message.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Object;

    fn svc(name: &str, port: i64) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "shop", "resourceVersion": "1"},
            "spec": {"clusterIP": "198.18.0.10", "ports": [{"port": port, "protocol": "TCP"}]}
        }))
        .unwrap()
    }

    fn tracker() -> Tracker {
        let mut t = Tracker::new(&[(ObjectKind::Service, "Service", true)]);
        assert!(t.handle(0, KindMsg::Served("v1".into())).is_empty());
        t
    }

    fn names(evs: &[SourceEvent]) -> Vec<String> {
        evs.iter()
            .map(|e| match e {
                SourceEvent::Apply(Object::Service(s)) => {
                    format!("apply {}", s.metadata.name.clone().unwrap_or_default())
                }
                SourceEvent::Apply(o) => format!("apply {}", o.object_ref()),
                SourceEvent::Delete(r) => format!("delete {}", r.name),
                SourceEvent::Synced => "synced".into(),
                SourceEvent::Error(e) => format!("error {}: {}", e.location, e.message),
            })
            .collect()
    }

    #[test]
    fn relist_sweeps_what_did_not_come_back_and_syncs_once() {
        let mut t = tracker();
        let mut evs = t.handle(0, KindMsg::Event(Box::new(watcher::Event::Init)));
        evs.extend(t.handle(
            0,
            KindMsg::Event(Box::new(watcher::Event::InitApply(svc("a", 80)))),
        ));
        evs.extend(t.handle(
            0,
            KindMsg::Event(Box::new(watcher::Event::InitApply(svc("b", 80)))),
        ));
        evs.extend(t.handle(0, KindMsg::Event(Box::new(watcher::Event::InitDone))));
        assert_eq!(names(&evs), ["apply a", "apply b", "synced"]);
        // A 410 relist: b is gone.
        let mut evs = t.handle(0, KindMsg::Event(Box::new(watcher::Event::Init)));
        evs.extend(t.handle(
            0,
            KindMsg::Event(Box::new(watcher::Event::InitApply(svc("a", 81)))),
        ));
        evs.extend(t.handle(0, KindMsg::Event(Box::new(watcher::Event::InitDone))));
        assert_eq!(names(&evs), ["apply a", "delete b"]);
    }

    #[test]
    fn an_invalid_update_keeps_the_last_good_object() {
        let mut t = tracker();
        t.handle(0, KindMsg::Event(Box::new(watcher::Event::Init)));
        t.handle(
            0,
            KindMsg::Event(Box::new(watcher::Event::InitApply(svc("a", 80)))),
        );
        t.handle(0, KindMsg::Event(Box::new(watcher::Event::InitDone)));
        let evs = t.handle(
            0,
            KindMsg::Event(Box::new(watcher::Event::Apply(svc("a", 70000)))),
        );
        assert_eq!(evs.len(), 1);
        assert!(
            names(&evs)[0].starts_with("error Kubernetes Service shop/a: spec.ports[0].port"),
            "{evs:?}"
        );
        // Still known: a relist without it deletes it; a delete event deletes it.
        let evs = t.handle(
            0,
            KindMsg::Event(Box::new(watcher::Event::Delete(svc("a", 70000)))),
        );
        assert_eq!(names(&evs), ["delete a"]);
    }

    #[test]
    fn an_absent_optional_kind_counts_as_synced_and_is_reported_once() {
        let mut t = Tracker::new(&[
            (ObjectKind::Service, "Service", true),
            (ObjectKind::Policy, "MeshNetworkPolicy", true),
        ]);
        let evs = t.handle(1, KindMsg::Absent);
        assert_eq!(evs.len(), 1);
        assert!(t.handle(1, KindMsg::Absent).is_empty());
        t.handle(0, KindMsg::Served("v1".into()));
        t.handle(0, KindMsg::Event(Box::new(watcher::Event::Init)));
        let evs = t.handle(0, KindMsg::Event(Box::new(watcher::Event::InitDone)));
        assert_eq!(names(&evs), ["synced"]);
    }
}
