//! The HTTP side: URL routing (`/api/v1/...`, `/apis/<group>/<version>/...`), list with
//! `limit`/`continue`, chunked watch streams with bookmarks, writes, `Status` errors.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::store::{ApiError, Change, ObjKey, ResourceDef, Selectors, Store, gone};

/// State shared by every request.
#[derive(Debug)]
pub(super) struct Shared {
    /// The objects.
    pub(super) store: Mutex<Store>,
    /// `METHOD path?query` of every request, in order.
    pub(super) requests: Mutex<Vec<String>>,
    /// Cancelled (and replaced) to end every open watch.
    pub(super) watches: Mutex<CancellationToken>,
    /// How often watches with `allowWatchBookmarks` get a BOOKMARK.
    pub(super) bookmark_interval: Duration,
}

/// What a URL addresses.
#[derive(Debug)]
struct Target {
    res: ResourceDef,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn route(store: &Store, path: &str) -> Result<Target, ApiError> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!("no route for {path}"),
            ));
        }
    };
    let find = |plural: &str| {
        store.resource(group, version, plural).cloned().ok_or_else(|| {
            ApiError::new(
                404,
                "NotFound",
                format!("the server could not find the requested resource ({group}/{version} {plural})"),
            )
        })
    };
    let t = |res, namespace: Option<&str>, name: Option<&str>, status| Target {
        res,
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
        status,
    };
    Ok(match rest {
        ["namespaces", ns, plural] if *plural != "status" => {
            t(find(plural)?, Some(ns), None, false)
        }
        ["namespaces", ns, plural, name] => t(find(plural)?, Some(ns), Some(name), false),
        ["namespaces", ns, plural, name, "status"] => t(find(plural)?, Some(ns), Some(name), true),
        [plural] => t(find(plural)?, None, None, false),
        [plural, name] => t(find(plural)?, None, Some(name), false),
        [plural, name, "status"] => t(find(plural)?, None, Some(name), true),
        _ => {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!("no route for {path}"),
            ));
        }
    })
}

fn error_response(e: &ApiError) -> Response {
    json_response(
        StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &e.status(),
    )
}

fn json_response(code: StatusCode, v: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(v).unwrap_or_default(),
    )
        .into_response()
}

/// `application/x-www-form-urlencoded` query decoding.
fn query(q: Option<&str>) -> Vec<(String, String)> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The one handler: every request goes through here.
pub(super) async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let raw_query = parts.uri.query().map(str::to_owned);
    if let Ok(mut log) = shared.requests.lock() {
        log.push(match &raw_query {
            Some(q) => format!("{} {path}?{}", parts.method, decode(q)),
            None => format!("{} {path}", parts.method),
        });
    }
    let q = query(raw_query.as_deref());
    let param = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = match axum::body::to_bytes(body, 16 << 20).await {
        Ok(b) => b,
        Err(e) => return error_response(&ApiError::new(400, "BadRequest", e.to_string())),
    };
    let target = {
        let Ok(store) = shared.store.lock() else {
            return error_response(&ApiError::new(500, "InternalError", "store poisoned"));
        };
        route(&store, &path)
    };
    let target = match target {
        Ok(t) => t,
        Err(e) => return error_response(&e),
    };
    let watch = matches!(param("watch"), Some("true" | "1"));
    // With a status subresource, writes to the main resource ignore `.status`.
    let body = if target.res.status && !target.status && parts.method != Method::PUT {
        match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(mut m)) => {
                m.remove("status");
                Bytes::from(serde_json::to_vec(&m).unwrap_or_default())
            }
            _ => body,
        }
    } else {
        body
    };
    let result = match (&parts.method, &target.name) {
        (&Method::GET, None) if watch => return start_watch(&shared, &target, param),
        (&Method::GET, None) => list(&shared, &target, param),
        (&Method::GET, Some(name)) => {
            with_store(&shared, |s| s.get(&target.res, &key(&target, name))).ok200()
        }
        (&Method::POST, None) => parse(&body)
            .and_then(|obj| {
                with_store(&shared, |s| {
                    s.create(&target.res, target.namespace.as_deref(), obj)
                })
            })
            .map(|v| (StatusCode::CREATED, v)),
        (&Method::PUT, Some(name)) => parse(&body)
            .and_then(|obj| {
                with_store(&shared, |s| {
                    s.replace(&target.res, &key(&target, name), obj, target.status)
                })
            })
            .map(|v| (StatusCode::OK, v)),
        (&Method::PATCH, Some(name)) => {
            let create = content_type.starts_with("application/apply-patch");
            if content_type.starts_with("application/json-patch") {
                Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    "JSON patch is not implemented by the test API server",
                ))
            } else {
                parse(&body).and_then(|patch| {
                    with_store(&shared, |s| {
                        s.patch(
                            &target.res,
                            &key(&target, name),
                            &patch,
                            target.status,
                            create,
                        )
                    })
                })
            }
            .map(|v| (StatusCode::OK, v))
        }
        (&Method::DELETE, Some(name)) => {
            with_store(&shared, |s| s.delete(&target.res, &key(&target, name)))
                .map(|v| (StatusCode::OK, v))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{} is not supported on {path}", parts.method),
        )),
    };
    match result {
        Ok((code, v)) => json_response(code, &v),
        Err(e) => error_response(&e),
    }
}

fn key(t: &Target, name: &str) -> ObjKey {
    (
        if t.res.namespaced {
            t.namespace.clone().unwrap_or_default()
        } else {
            String::new()
        },
        name.to_owned(),
    )
}

fn parse(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(400, "BadRequest", format!("the body is not JSON: {e}")))
}

fn with_store<T>(
    shared: &Shared,
    f: impl FnOnce(&mut Store) -> Result<T, ApiError>,
) -> Result<T, ApiError> {
    let mut store = shared
        .store
        .lock()
        .map_err(|_| ApiError::new(500, "InternalError", "store poisoned"))?;
    f(&mut store)
}

trait WithCode {
    fn ok200(self) -> Result<(StatusCode, Value), ApiError>;
}

impl WithCode for Result<Value, ApiError> {
    fn ok200(self) -> Result<(StatusCode, Value), ApiError> {
        self.map(|v| (StatusCode::OK, v))
    }
}

fn list<'a>(
    shared: &Shared,
    t: &Target,
    param: impl Fn(&str) -> Option<&'a str>,
) -> Result<(StatusCode, Value), ApiError> {
    let selectors = Selectors::parse(param("labelSelector"), param("fieldSelector"))?;
    let limit = param("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    with_store(shared, |s| {
        let (rv, after) = match param("continue").filter(|c| !c.is_empty()) {
            Some(token) => {
                let mut it = token.splitn(3, '/');
                let (Some(rv), Some(ns), Some(name)) = (it.next(), it.next(), it.next()) else {
                    return Err(ApiError::new(400, "BadRequest", "invalid continue token"));
                };
                let rv: u64 = rv
                    .parse()
                    .map_err(|_| ApiError::new(400, "BadRequest", "invalid continue token"))?;
                if rv < s.compacted() {
                    return Err(gone(rv, s.compacted()));
                }
                (rv, Some((ns.to_owned(), name.to_owned())))
            }
            None => (s.resource_version(), None),
        };
        let ns = t.res.namespaced.then_some(t.namespace.as_deref()).flatten();
        let (items, more) = s.list(&t.res, ns, &selectors, after.as_ref(), limit);
        let mut metadata = json!({ "resourceVersion": rv.to_string() });
        if let Some((ns, name)) = more {
            metadata["continue"] = format!("{rv}/{ns}/{name}").into();
        }
        Ok(json!({
            "kind": format!("{}List", t.res.kind),
            "apiVersion": t.res.api_version(),
            "metadata": metadata,
            "items": items,
        }))
    })
    .ok200()
}

fn line(v: &Value) -> Bytes {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

fn event(kind: &str, object: &Value) -> Bytes {
    line(&json!({ "type": kind, "object": object }))
}

/// What one watch delivers for one change, after selector transitions.
fn filter(t: &Target, sel: &Selectors, c: &Change) -> Option<(&'static str, Value)> {
    let ns = t.res.namespaced.then_some(t.namespace.as_deref()).flatten();
    if !Store::change_matches(&t.res, ns, c) {
        return None;
    }
    let now = sel.matches(&c.object);
    let before = c.old.as_ref().is_some_and(|o| sel.matches(o));
    let kind = match (c.kind, before, now) {
        ("ADDED", _, true) => "ADDED",
        ("MODIFIED", true, true) => "MODIFIED",
        ("MODIFIED", false, true) => "ADDED",
        ("MODIFIED", true, false) => "DELETED",
        ("DELETED", true, _) => "DELETED",
        _ => return None,
    };
    Some((kind, super::store::as_version(c.object.clone(), &t.res)))
}

fn start_watch<'a>(
    shared: &Arc<Shared>,
    t: &Target,
    param: impl Fn(&str) -> Option<&'a str>,
) -> Response {
    let sel = match Selectors::parse(param("labelSelector"), param("fieldSelector")) {
        Ok(s) => s,
        Err(e) => return error_response(&e),
    };
    let bookmarks = matches!(param("allowWatchBookmarks"), Some("true" | "1"));
    let timeout = param("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let from = param("resourceVersion").unwrap_or("");
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let cancel = match shared.watches.lock() {
        Ok(c) => c.clone(),
        Err(_) => return error_response(&ApiError::new(500, "InternalError", "poisoned")),
    };
    // Backlog and subscription under one lock, so that no change falls in between.
    let setup: Result<(Vec<Bytes>, broadcast::Receiver<Change>, u64), ApiError> =
        with_store(shared, |s| {
            if from.is_empty() || from == "0" {
                let ns = t.res.namespaced.then_some(t.namespace.as_deref()).flatten();
                let (items, _) = s.list(&t.res, ns, &sel, None, None);
                let lines = items.iter().map(|o| event("ADDED", o)).collect();
                Ok((lines, s.subscribe(), s.resource_version()))
            } else {
                let from: u64 = from.parse().map_err(|_| {
                    ApiError::new(
                        400,
                        "BadRequest",
                        format!("invalid resourceVersion {from:?}"),
                    )
                })?;
                match s.watch_from(from) {
                    Ok((backlog, rx)) => {
                        let last = backlog.last().map_or(from, |c| c.rv);
                        let lines = backlog
                            .iter()
                            .filter_map(|c| filter(t, &sel, c))
                            .map(|(k, o)| event(k, &o))
                            .collect();
                        Ok((lines, rx, last))
                    }
                    // A real API server answers an expired watch with 200 and one ERROR event.
                    Err(e) if e.code == 410 => {
                        Ok((vec![event("ERROR", &e.status())], s.subscribe(), u64::MAX))
                    }
                    Err(e) => Err(e),
                }
            }
        });
    let (initial, mut changes, mut last) = match setup {
        Ok(s) => s,
        Err(e) => return error_response(&e),
    };
    let target = Target {
        res: t.res.clone(),
        namespace: t.namespace.clone(),
        name: None,
        status: false,
    };
    let interval = shared.bookmark_interval;
    tokio::spawn(async move {
        for l in initial {
            if tx.send(l).await.is_err() {
                return;
            }
        }
        if last == u64::MAX {
            return; // expired: the ERROR event ends the watch
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(interval);
        tick.tick().await;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = &mut deadline => return,
                () = tx.closed() => return,
                _ = tick.tick(), if bookmarks => {
                    let bm = json!({
                        "kind": target.res.kind, "apiVersion": target.res.api_version(),
                        "metadata": { "resourceVersion": last.to_string() },
                    });
                    if tx.send(event("BOOKMARK", &bm)).await.is_err() {
                        return;
                    }
                }
                c = changes.recv() => match c {
                    Ok(c) if c.rv <= last => {}
                    Ok(c) => {
                        last = c.rv;
                        if let Some((k, o)) = filter(&target, &sel, &c)
                            && tx.send(event(k, &o)).await.is_err()
                        {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = tx.send(event("ERROR", &gone(last, last).status())).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}
