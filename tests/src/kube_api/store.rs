//! The API server's storage: typed-less objects per resource, one resourceVersion counter,
//! a bounded change history for watches (410 Gone below it), selectors and patches.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

/// One served resource: `group/version`, plural, kind, scope, status subresource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceDef {
    /// API group ("" for core).
    pub group: String,
    /// Version.
    pub version: String,
    /// Plural (URL segment).
    pub plural: String,
    /// Kind.
    pub kind: String,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// Whether `.status` is a subresource (main-resource writes leave it alone).
    pub status: bool,
}

impl ResourceDef {
    fn new(group: &str, version: &str, plural: &str, kind: &str, namespaced: bool) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
            kind: kind.into(),
            namespaced,
            status: true,
        }
    }

    /// `apiVersion` of objects of this resource.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Storage key: versions of one group/plural share their objects (like a CRD that
    /// serves several versions).
    fn storage(&self) -> (String, String) {
        (self.group.clone(), self.plural.clone())
    }
}

/// Every resource meshd reads or writes.
pub fn default_resources() -> Vec<ResourceDef> {
    let mcs = "multicluster.x-k8s.io";
    let mut v = vec![
        ResourceDef::new("", "v1", "namespaces", "Namespace", false),
        ResourceDef::new("", "v1", "nodes", "Node", false),
        ResourceDef::new("", "v1", "services", "Service", true),
        ResourceDef::new("", "v1", "pods", "Pod", true),
        ResourceDef::new("", "v1", "secrets", "Secret", true),
        ResourceDef::new("", "v1", "configmaps", "ConfigMap", true),
        ResourceDef::new("", "v1", "events", "Event", true),
        ResourceDef::new("events.k8s.io", "v1", "events", "Event", true),
        ResourceDef::new(
            "discovery.k8s.io",
            "v1",
            "endpointslices",
            "EndpointSlice",
            true,
        ),
        ResourceDef::new(mcs, "v1alpha1", "serviceexports", "ServiceExport", true),
        ResourceDef::new(mcs, "v1beta1", "serviceexports", "ServiceExport", true),
        ResourceDef::new(mcs, "v1alpha1", "serviceimports", "ServiceImport", true),
        ResourceDef::new(mcs, "v1beta1", "serviceimports", "ServiceImport", true),
        ResourceDef::new(
            "meshd.io",
            "v1alpha1",
            "meshnetworkpolicies",
            "MeshNetworkPolicy",
            true,
        ),
        ResourceDef::new(
            "about.k8s.io",
            "v1alpha1",
            "clusterproperties",
            "ClusterProperty",
            false,
        ),
        ResourceDef::new(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
        ),
    ];
    for r in &mut v {
        if matches!(
            r.kind.as_str(),
            "Secret" | "ConfigMap" | "Event" | "EndpointSlice" | "ClusterProperty"
        ) {
            r.status = false;
        }
    }
    v
}

/// A change, as watches deliver it.
#[derive(Debug, Clone)]
pub struct Change {
    /// Global resourceVersion of the change.
    pub rv: u64,
    /// Storage key of the resource.
    storage: (String, String),
    /// `ADDED`, `MODIFIED` or `DELETED`.
    pub kind: &'static str,
    /// The object after the change (before it, for `DELETED`; with the deletion's rv).
    pub object: Value,
    /// The object before the change (selector transitions).
    pub old: Option<Value>,
}

/// An API error: HTTP code, reason, message (rendered as a `Status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// `NotFound`, `AlreadyExists`, `Conflict`, `Expired`, `BadRequest`, …
    pub reason: &'static str,
    /// Human-readable message.
    pub message: String,
}

impl ApiError {
    pub(crate) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    /// The `Status` object.
    pub fn status(&self) -> Value {
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        })
    }
}

/// Label and field selectors of a list or watch.
#[derive(Debug, Clone, Default)]
pub struct Selectors {
    labels: Vec<Requirement>,
    fields: Vec<(String, bool, String)>,
}

#[derive(Debug, Clone)]
enum Requirement {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    NotExists(String),
}

impl Selectors {
    /// Parses `labelSelector` (equality-based: `k=v`, `k==v`, `k!=v`, `k`, `!k`) and
    /// `fieldSelector` (`metadata.name`, `metadata.namespace` with `=`/`!=`).
    pub fn parse(label: Option<&str>, field: Option<&str>) -> Result<Self, ApiError> {
        let mut s = Self::default();
        for term in label
            .unwrap_or("")
            .split(',')
            .filter(|t| !t.trim().is_empty())
        {
            let t = term.trim();
            let req = if let Some((k, v)) = t.split_once("!=") {
                Requirement::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                Requirement::Eq(k.trim().into(), v.trim().into())
            } else if let Some(k) = t.strip_prefix('!') {
                Requirement::NotExists(k.trim().into())
            } else if t.contains(' ') || t.contains('(') {
                return Err(ApiError::new(
                    400,
                    "BadRequest",
                    format!(
                        "unsupported label selector term {t:?} (set-based selectors are not implemented)"
                    ),
                ));
            } else {
                Requirement::Exists(t.into())
            };
            s.labels.push(req);
        }
        for term in field
            .unwrap_or("")
            .split(',')
            .filter(|t| !t.trim().is_empty())
        {
            let (k, eq, v) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (k, true, v)
            } else {
                return Err(ApiError::new(
                    400,
                    "BadRequest",
                    format!("invalid field selector {term:?}"),
                ));
            };
            if !matches!(k.trim(), "metadata.name" | "metadata.namespace") {
                return Err(ApiError::new(
                    400,
                    "BadRequest",
                    format!("field label not supported: {}", k.trim()),
                ));
            }
            s.fields.push((k.trim().into(), eq, v.trim().into()));
        }
        Ok(s)
    }

    /// Whether `obj` matches.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|r| match r {
            Requirement::Eq(k, v) => label(k) == Some(v.as_str()),
            Requirement::Ne(k, v) => label(k) != Some(v.as_str()),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::NotExists(k) => label(k).is_none(),
        });
        labels_ok
            && self.fields.iter().all(|(k, eq, v)| {
                let actual = match k.as_str() {
                    "metadata.name" => meta_str(obj, "name"),
                    _ => meta_str(obj, "namespace"),
                };
                (actual == v.as_str()) == *eq
            })
    }
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// Namespace and name of an object.
pub type ObjKey = (String, String);

/// The whole store (behind one mutex in the server).
#[derive(Debug)]
pub struct Store {
    resources: Vec<ResourceDef>,
    objects: HashMap<(String, String), BTreeMap<ObjKey, Value>>,
    history: Vec<Change>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    /// Last resourceVersion handed out.
    rv: u64,
    uid: u64,
    max_history: usize,
    changes: broadcast::Sender<Change>,
}

impl Store {
    /// A store serving `resources`, keeping at most `max_history` changes for watches.
    pub fn new(resources: Vec<ResourceDef>, max_history: usize) -> Self {
        Self {
            resources,
            objects: HashMap::new(),
            history: Vec::new(),
            compacted: 0,
            rv: 1,
            uid: 0,
            max_history,
            changes: broadcast::channel(4096).0,
        }
    }

    /// The resource served at `group/version/plural`.
    pub fn resource(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceDef> {
        self.resources
            .iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
    }

    /// A resource by `apiVersion` and kind.
    pub fn resource_for_kind(&self, api_version: &str, kind: &str) -> Option<ResourceDef> {
        self.resources
            .iter()
            .find(|r| r.api_version() == api_version && r.kind == kind)
            .cloned()
    }

    /// Stops serving a resource version (e.g. a CRD version not installed).
    pub fn unserve(&mut self, group: &str, version: &str, plural: &str) {
        self.resources
            .retain(|r| !(r.group == group && r.version == version && r.plural == plural));
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Forgets every change so far: a watch from any resourceVersion handed out until now
    /// gets 410 (a list afterwards returns a version that can be watched).
    pub fn compact(&mut self) {
        self.rv += 1;
        self.compacted = self.rv;
        self.history.clear();
    }

    /// Deletes an object as if the deletion had been compacted away before any watch saw
    /// it: no watch event; only a relist (after 410) shows it is gone.
    pub fn delete_unobserved(&mut self, res: &ResourceDef, key: &ObjKey) -> Result<(), ApiError> {
        self.objects
            .get_mut(&res.storage())
            .and_then(|o| o.remove(key))
            .ok_or_else(|| not_found(res, key))?;
        self.compact();
        Ok(())
    }

    /// Subscribes to changes, returning the retained changes after `from` (410 if they
    /// are no longer retained).
    pub fn watch_from(
        &self,
        from: u64,
    ) -> Result<(Vec<Change>, broadcast::Receiver<Change>), ApiError> {
        if from < self.compacted {
            return Err(gone(from, self.compacted));
        }
        let backlog = self
            .history
            .iter()
            .filter(|c| c.rv > from)
            .cloned()
            .collect();
        Ok((backlog, self.changes.subscribe()))
    }

    /// Subscribes to changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Whether a change concerns `res` (in `namespace`, if given).
    pub fn change_matches(res: &ResourceDef, namespace: Option<&str>, c: &Change) -> bool {
        c.storage == res.storage()
            && namespace.is_none_or(|ns| meta_str(&c.object, "namespace") == ns)
    }

    /// Lists objects (sorted by namespace/name) after `after`, at most `limit`.
    pub fn list(
        &self,
        res: &ResourceDef,
        namespace: Option<&str>,
        selectors: &Selectors,
        after: Option<&ObjKey>,
        limit: Option<usize>,
    ) -> (Vec<Value>, Option<ObjKey>) {
        let mut items = Vec::new();
        let Some(objs) = self.objects.get(&res.storage()) else {
            return (items, None);
        };
        let range = objs.iter().filter(|(k, _)| after.is_none_or(|a| *k > a));
        for (k, obj) in range {
            if namespace.is_some_and(|ns| k.0 != ns) || !selectors.matches(obj) {
                continue;
            }
            if limit.is_some_and(|l| items.len() >= l) {
                // More remain: continue after the last returned key.
                let last = items.last().map(|o: &Value| {
                    (
                        meta_str(o, "namespace").to_owned(),
                        meta_str(o, "name").to_owned(),
                    )
                });
                return (
                    items.into_iter().map(|o| as_version(o, res)).collect(),
                    last,
                );
            }
            items.push(obj.clone());
        }
        (
            items.into_iter().map(|o| as_version(o, res)).collect(),
            None,
        )
    }

    /// The compaction point (for continue-token expiry).
    pub fn compacted(&self) -> u64 {
        self.compacted
    }

    /// One object.
    pub fn get(&self, res: &ResourceDef, key: &ObjKey) -> Result<Value, ApiError> {
        self.objects
            .get(&res.storage())
            .and_then(|o| o.get(key))
            .map(|o| as_version(o.clone(), res))
            .ok_or_else(|| not_found(res, key))
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(&mut self, res: &ResourceDef, kind: &'static str, object: Value, old: Option<Value>) {
        let change = Change {
            rv: self.rv,
            storage: res.storage(),
            kind,
            object,
            old,
        };
        self.history.push(change.clone());
        if self.history.len() > self.max_history {
            let drop = self.history.len() - self.max_history;
            self.compacted = self.history[drop - 1].rv;
            self.history.drain(..drop);
        }
        let _ = self.changes.send(change);
    }

    fn namespace_exists(&self, ns: &str) -> bool {
        self.objects
            .get(&(String::new(), "namespaces".to_owned()))
            .is_some_and(|o| o.contains_key(&(String::new(), ns.to_owned())))
    }

    /// Creates an object (namespace taken from the URL for namespaced resources).
    pub fn create(
        &mut self,
        res: &ResourceDef,
        namespace: Option<&str>,
        mut obj: Value,
    ) -> Result<Value, ApiError> {
        let Some(map) = obj.as_object_mut() else {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "the body is not a JSON object",
            ));
        };
        let meta = map
            .entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()));
        let Some(meta) = meta.as_object_mut() else {
            return Err(ApiError::new(
                400,
                "BadRequest",
                "metadata is not an object",
            ));
        };
        let mut name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        if name.is_empty()
            && let Some(prefix) = meta.get("generateName").and_then(Value::as_str)
        {
            name = format!("{prefix}{:05x}", self.uid + 1);
        }
        if name.is_empty() {
            return Err(ApiError::new(
                422,
                "Invalid",
                "metadata.name: Required value",
            ));
        }
        let ns = if res.namespaced {
            let body_ns = meta.get("namespace").and_then(Value::as_str).unwrap_or("");
            let ns = namespace.unwrap_or(body_ns);
            if ns.is_empty() {
                return Err(ApiError::new(400, "BadRequest", "namespace is required"));
            }
            if !body_ns.is_empty() && body_ns != ns {
                return Err(ApiError::new(
                    400,
                    "BadRequest",
                    "the namespace of the object does not match the namespace on the request",
                ));
            }
            ns.to_owned()
        } else {
            String::new()
        };
        let key = (ns.clone(), name.clone());
        if self
            .objects
            .get(&res.storage())
            .is_some_and(|o| o.contains_key(&key))
        {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", res.plural),
            ));
        }
        if res.namespaced && !self.namespace_exists(&ns) {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!("namespaces \"{ns}\" not found"),
            ));
        }
        self.uid += 1;
        let rv = self.next_rv();
        meta.insert("name".into(), name.into());
        if res.namespaced {
            meta.insert("namespace".into(), ns.into());
        } else {
            meta.remove("namespace");
        }
        meta.insert(
            "uid".into(),
            format!("00000000-0000-0000-0000-{:012}", self.uid).into(),
        );
        meta.insert("resourceVersion".into(), rv.to_string().into());
        meta.insert("generation".into(), 1.into());
        meta.entry("creationTimestamp")
            .or_insert_with(|| now().into());
        map.insert("apiVersion".into(), res.api_version().into());
        map.insert("kind".into(), res.kind.clone().into());
        self.objects
            .entry(res.storage())
            .or_default()
            .insert(key, obj.clone());
        self.record(res, "ADDED", obj.clone(), None);
        Ok(obj)
    }

    /// Replaces an object (or only its status, for `status`); a `resourceVersion` in the
    /// body must match (409 Conflict otherwise).
    pub fn replace(
        &mut self,
        res: &ResourceDef,
        key: &ObjKey,
        mut obj: Value,
        status: bool,
    ) -> Result<Value, ApiError> {
        let current = self.get(res, key)?;
        let body_rv = obj
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        if !body_rv.is_empty() && body_rv != meta_str(&current, "resourceVersion") {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
                    res.plural, key.1
                ),
            ));
        }
        if status {
            let mut next = current.clone();
            next["status"] = obj.get("status").cloned().unwrap_or(Value::Null);
            obj = next;
        } else {
            if res.status {
                match current.get("status") {
                    Some(s) => obj["status"] = s.clone(),
                    None => {
                        if let Some(m) = obj.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
            }
            // Server-owned metadata stays.
            for f in [
                "uid",
                "creationTimestamp",
                "generation",
                "namespace",
                "name",
            ] {
                if let Some(v) = current.pointer(&format!("/metadata/{f}")) {
                    obj["metadata"][f] = v.clone();
                }
            }
        }
        self.update(res, key, current, obj, status)
    }

    /// Applies a JSON merge patch (RFC 7386) to an object or its status; `create` makes a
    /// missing object from the patch (server-side apply).
    pub fn patch(
        &mut self,
        res: &ResourceDef,
        key: &ObjKey,
        patch: &Value,
        status: bool,
        create: bool,
    ) -> Result<Value, ApiError> {
        let current = match self.get(res, key) {
            Ok(c) => c,
            Err(e) if create && e.code == 404 => {
                let mut obj = patch.clone();
                obj["metadata"]["name"] = key.1.clone().into();
                let ns = (!key.0.is_empty()).then_some(key.0.as_str());
                return self.create(res, ns, obj);
            }
            Err(e) => return Err(e),
        };
        let mut next = current.clone();
        if status {
            if let Some(s) = patch.get("status") {
                merge(&mut next["status"], s);
            }
        } else {
            merge(&mut next, patch);
            if res.status {
                match current.get("status") {
                    Some(s) => next["status"] = s.clone(),
                    None => {
                        if let Some(m) = next.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
            }
        }
        for f in ["uid", "creationTimestamp", "namespace", "name"] {
            if let Some(v) = current.pointer(&format!("/metadata/{f}")) {
                next["metadata"][f] = v.clone();
            }
        }
        self.update(res, key, current, next, status)
    }

    fn update(
        &mut self,
        res: &ResourceDef,
        key: &ObjKey,
        current: Value,
        mut next: Value,
        status: bool,
    ) -> Result<Value, ApiError> {
        next["apiVersion"] = res.api_version().into();
        next["kind"] = res.kind.clone().into();
        // A write that changes nothing is a no-op (no new resourceVersion, no event).
        let mut cmp = next.clone();
        cmp["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
        cmp["metadata"]["generation"] = current["metadata"]["generation"].clone();
        if cmp == current {
            return Ok(current);
        }
        let spec_changed = !status && {
            let strip = |v: &Value| {
                let mut v = v.clone();
                if let Some(m) = v.as_object_mut() {
                    m.remove("metadata");
                    m.remove("status");
                }
                v
            };
            strip(&next) != strip(&current)
        };
        let generation = current
            .pointer("/metadata/generation")
            .and_then(Value::as_u64)
            .unwrap_or(1);
        let rv = self.next_rv();
        next["metadata"]["resourceVersion"] = rv.to_string().into();
        next["metadata"]["generation"] = (generation + u64::from(spec_changed)).into();
        self.objects
            .entry(res.storage())
            .or_default()
            .insert(key.clone(), next.clone());
        self.record(res, "MODIFIED", next.clone(), Some(current));
        Ok(next)
    }

    /// Deletes an object; returns it as it was (with the deletion's resourceVersion).
    pub fn delete(&mut self, res: &ResourceDef, key: &ObjKey) -> Result<Value, ApiError> {
        let removed = self
            .objects
            .get_mut(&res.storage())
            .and_then(|o| o.remove(key))
            .ok_or_else(|| not_found(res, key))?;
        let rv = self.next_rv();
        let mut obj = removed.clone();
        obj["metadata"]["resourceVersion"] = rv.to_string().into();
        self.record(res, "DELETED", obj.clone(), Some(removed));
        // Deleting a namespace deletes what is in it.
        if res.group.is_empty() && res.plural == "namespaces" {
            let ns = key.1.clone();
            let resources = self.resources.clone();
            let mut seen = Vec::new();
            for r in resources.iter().filter(|r| r.namespaced) {
                if seen.contains(&r.storage()) {
                    continue;
                }
                seen.push(r.storage());
                let keys: Vec<ObjKey> = self
                    .objects
                    .get(&r.storage())
                    .map(|o| o.keys().filter(|k| k.0 == ns).cloned().collect())
                    .unwrap_or_default();
                for k in keys {
                    let _ = self.delete(r, &k);
                }
            }
        }
        Ok(as_version(obj, res))
    }
}

/// The object as `res`'s version presents it.
pub fn as_version(mut obj: Value, res: &ResourceDef) -> Value {
    obj["apiVersion"] = res.api_version().into();
    obj
}

/// JSON merge patch (RFC 7386).
pub fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            if let Some(t) = target.as_object_mut() {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn not_found(res: &ResourceDef, key: &ObjKey) -> ApiError {
    let group = if res.group.is_empty() {
        String::new()
    } else {
        format!(".{}", res.group)
    };
    ApiError::new(
        404,
        "NotFound",
        format!("{}{group} \"{}\" not found", res.plural, key.1),
    )
}

/// 410 Gone for a resourceVersion below the compaction point.
pub fn gone(rv: u64, compacted: u64) -> ApiError {
    ApiError::new(
        410,
        "Expired",
        format!("too old resource version: {rv} ({compacted})"),
    )
}

fn now() -> String {
    let t = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
