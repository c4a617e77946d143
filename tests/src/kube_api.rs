//! A fake Kubernetes API server speaking the real list/watch wire protocol with real API JSON,
//! for the kube source's tests (no API server can be installed here): collections at
//! `/api/v1/<plural>` and `/apis/<group>/<version>/<plural>`, lists with a resourceVersion,
//! watches (`?watch=true&resourceVersion=N`) streaming ADDED/MODIFIED/DELETED events after N,
//! BOOKMARK events every second when asked, `410 Gone` (an ERROR event with an `Expired`
//! Status) for a resourceVersion older than the last compaction, and connections the test
//! can drop. One store, served on any number of listeners (one per node namespace).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use anyhow::{anyhow, bail, Result};
use bytes::Bytes;
use http_body::Frame;
use hyper::{service::service_fn, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};

use crate::netns::Netns;

/// `(kind, group, version, plural, namespaced)` of the kinds served.
const KINDS: [(&str, &str, &str, &str, bool); 9] = [
    ("Namespace", "", "v1", "namespaces", false),
    ("Pod", "", "v1", "pods", true),
    ("Service", "", "v1", "services", true),
    (
        "EndpointSlice",
        "discovery.k8s.io",
        "v1",
        "endpointslices",
        true,
    ),
    (
        "NetworkPolicy",
        "networking.k8s.io",
        "v1",
        "networkpolicies",
        true,
    ),
    (
        "VirtualService",
        "networking.istio.io",
        "v1",
        "virtualservices",
        true,
    ),
    (
        "DestinationRule",
        "networking.istio.io",
        "v1",
        "destinationrules",
        true,
    ),
    (
        "PeerAuthentication",
        "security.istio.io",
        "v1",
        "peerauthentications",
        true,
    ),
    (
        "AuthorizationPolicy",
        "security.istio.io",
        "v1",
        "authorizationpolicies",
        true,
    ),
];

fn collection(kind: &str) -> Option<(String, String, bool)> {
    let (_, group, version, plural, namespaced) = KINDS.iter().find(|k| k.0 == kind)?;
    let (path, api_version) = if group.is_empty() {
        (format!("/api/{version}/{plural}"), version.to_string())
    } else {
        (
            format!("/apis/{group}/{version}/{plural}"),
            format!("{group}/{version}"),
        )
    };
    Some((path, api_version, *namespaced))
}

#[derive(Default)]
struct Inner {
    /// The last resourceVersion given out.
    rv: u64,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    /// Objects by (collection path, namespace, name).
    objects: BTreeMap<(String, String, String), Value>,
    /// Every change: (resourceVersion, collection path, event type, object).
    history: Vec<(u64, String, &'static str, Value)>,
    /// Bumped to end every open watch.
    epoch: u64,
    /// Requests served, by kind of request (`list`, `watch`, `gone`) and collection.
    requests: BTreeMap<(&'static str, String), u64>,
    /// While set, watches are refused with 503 (the client retries with backoff).
    paused: bool,
}

/// The fake API server's store and listeners; stopped on drop.
pub struct FakeApi {
    inner: Arc<Mutex<Inner>>,
    changed: Arc<tokio::sync::Notify>,
    listeners: Vec<(
        tokio::sync::oneshot::Sender<()>,
        std::thread::JoinHandle<()>,
    )>,
}

impl Default for FakeApi {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeApi {
    /// An empty store, not yet listening.
    pub fn new() -> FakeApi {
        FakeApi {
            inner: Arc::new(Mutex::new(Inner {
                rv: 100,
                ..Inner::default()
            })),
            changed: Arc::new(tokio::sync::Notify::new()),
            listeners: Vec::new(),
        }
    }

    /// Serves on `127.0.0.1:port` inside `ns`; returns the URL as seen from there.
    pub fn listen_in(&mut self, ns: &Netns, port: u16) -> Result<String> {
        let listener = ns.run(move || {
            let l = std::net::TcpListener::bind(("127.0.0.1", port))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?;
        self.serve(listener)?;
        Ok(format!("http://127.0.0.1:{port}"))
    }

    /// Serves on a free port of this namespace's loopback; returns the URL.
    pub fn listen_here(&mut self) -> Result<String> {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        self.serve(listener)?;
        Ok(format!("http://127.0.0.1:{port}"))
    }

    fn serve(&mut self, listener: std::net::TcpListener) -> Result<()> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (inner, changed) = (self.inner.clone(), self.changed.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                tokio::pin!(stopped);
                loop {
                    tokio::select! {
                        _ = &mut stopped => return,
                        accepted = listener.accept() => {
                            let Ok((stream, _)) = accepted else { continue };
                            let (inner, changed) = (inner.clone(), changed.clone());
                            tokio::spawn(async move {
                                let service = service_fn(move |req| {
                                    let (inner, changed) = (inner.clone(), changed.clone());
                                    async move { Ok::<_, Infallible>(handle(req, &inner, &changed)) }
                                });
                                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            });
                        }
                    }
                }
            });
        });
        self.listeners.push((stop, thread));
        Ok(())
    }

    /// Creates or replaces every resource of multi-document YAML (as a user's
    /// `kubectl apply`), each with a new resourceVersion.
    pub fn apply_yaml(&self, yaml: &str) -> Result<()> {
        use serde::Deserialize;
        for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
            let value = serde_yaml_ng::Value::deserialize(doc)?;
            if value.is_null() {
                continue;
            }
            let json: Value = serde_json::to_value(value)?;
            self.apply(json)?;
        }
        Ok(())
    }

    /// Creates or replaces one resource (each item of a `List`).
    pub fn apply(&self, mut object: Value) -> Result<()> {
        let kind = object["kind"]
            .as_str()
            .ok_or_else(|| anyhow!("no kind in {object}"))?
            .to_string();
        if kind == "List" {
            for item in object["items"].as_array().cloned().unwrap_or_default() {
                self.apply(item)?;
            }
            return Ok(());
        }
        let (path, api_version, namespaced) =
            collection(&kind).ok_or_else(|| anyhow!("kind {kind} is not served"))?;
        let name = object["metadata"]["name"]
            .as_str()
            .ok_or_else(|| anyhow!("no name in {object}"))?
            .to_string();
        let namespace = if namespaced {
            object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        let mut inner = self.inner.lock().unwrap();
        inner.rv += 1;
        let rv = inner.rv;
        object["apiVersion"] = json!(api_version);
        let meta = &mut object["metadata"];
        meta["resourceVersion"] = json!(rv.to_string());
        if namespaced {
            meta["namespace"] = json!(namespace);
        }
        if meta.get("uid").is_none() {
            meta["uid"] = json!(format!("uid-{kind}-{namespace}-{name}"));
        }
        let key = (path.clone(), namespace, name);
        let event = if inner.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        inner.objects.insert(key, object.clone());
        inner.history.push((rv, path, event, object));
        drop(inner);
        self.changed.notify_waiters();
        Ok(())
    }

    /// Deletes a resource (`namespace` empty for Namespaces).
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<()> {
        let (path, _, _) = collection(kind).ok_or_else(|| anyhow!("kind {kind}"))?;
        let mut inner = self.inner.lock().unwrap();
        let key = (path.clone(), namespace.to_string(), name.to_string());
        let Some(mut object) = inner.objects.remove(&key) else {
            bail!("no {kind} {namespace}/{name}");
        };
        inner.rv += 1;
        let rv = inner.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        inner.history.push((rv, path, "DELETED", object));
        drop(inner);
        self.changed.notify_waiters();
        Ok(())
    }

    /// Ends every open watch (as an API server restart or a load balancer does).
    pub fn drop_watches(&self) {
        self.inner.lock().unwrap().epoch += 1;
        self.changed.notify_waiters();
    }

    /// Forgets the history up to now: a watch from an older resourceVersion gets 410 Gone
    /// and the client has to list again. Also ends every open watch.
    pub fn compact(&self) {
        let mut inner = self.inner.lock().unwrap();
        inner.compacted = inner.rv;
        inner.history.clear();
        inner.epoch += 1;
        drop(inner);
        self.changed.notify_waiters();
    }

    /// Requests served by kind (`list`, `watch`, `gone`), all collections.
    pub fn requests(&self, what: &str) -> u64 {
        let inner = self.inner.lock().unwrap();
        inner
            .requests
            .iter()
            .filter(|((w, _), _)| *w == what)
            .map(|(_, n)| n)
            .sum()
    }

    /// Requests of a kind (`list`, `watch`, `gone`) for the collection of `kind` (`Pod`).
    pub fn requests_for(&self, what: &str, kind: &str) -> u64 {
        let Some((path, _, _)) = collection(kind) else {
            return 0;
        };
        let inner = self.inner.lock().unwrap();
        inner
            .requests
            .iter()
            .filter(|((w, p), _)| *w == what && *p == path)
            .map(|(_, n)| n)
            .sum()
    }

    /// Refuses new watches (503) while set and ends the open ones: changes made meanwhile
    /// reach the clients only when they watch again (or, after [`FakeApi::compact`], list).
    pub fn pause_watches(&self, paused: bool) {
        let mut inner = self.inner.lock().unwrap();
        inner.paused = paused;
        inner.epoch += 1;
        drop(inner);
        self.changed.notify_waiters();
    }

    /// A kubeconfig pointing at `url`, written to `path`.
    pub fn kubeconfig(url: &str, path: &std::path::Path) -> Result<()> {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"{url}\"}}}}]\nusers: [{{name: fake, user: {{}}}}]\ncontexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\ncurrent-context: fake\n"
            ),
        )?;
        Ok(())
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        for (stop, thread) in self.listeners.drain(..) {
            let _ = stop.send(());
            self.changed.notify_waiters();
            let _ = thread.join();
        }
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn reply(status: u16, value: Value) -> Response<Body> {
    use http_body_util::BodyExt;
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(Bytes::from(value.to_string())).boxed())
        .unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn handle(
    req: Request<hyper::body::Incoming>,
    inner: &Arc<Mutex<Inner>>,
    changed: &Arc<tokio::sync::Notify>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let Some((kind, _, _, _, _)) = KINDS
        .iter()
        .find(|k| collection(k.0).is_some_and(|(p, _, _)| p == path))
    else {
        return reply(
            404,
            status(404, "NotFound", &format!("no collection at {path}")),
        );
    };
    let (_, api_version, _) = collection(kind).unwrap();
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    if !watch {
        let mut state = inner.lock().unwrap();
        *state.requests.entry(("list", path.clone())).or_default() += 1;
        let items: Vec<Value> = state
            .objects
            .iter()
            .filter(|((p, _, _), _)| *p == path)
            .map(|(_, v)| v.clone())
            .collect();
        return reply(
            200,
            json!({"apiVersion": api_version, "kind": format!("{kind}List"),
                   "metadata": {"resourceVersion": state.rv.to_string()}, "items": items}),
        );
    }
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(64);
    let (inner, changed) = (inner.clone(), changed.clone());
    let kind = kind.to_string();
    let epoch = {
        let mut state = inner.lock().unwrap();
        if state.paused {
            return reply(
                503,
                status(503, "ServiceUnavailable", "watches paused by the test"),
            );
        }
        if from < state.compacted {
            *state.requests.entry(("gone", path.clone())).or_default() += 1;
            let event = json!({"type": "ERROR", "object": status(410, "Expired",
                &format!("too old resource version: {from} ({})", state.compacted))});
            let _ = sender.try_send(Bytes::from(format!("{event}\n")));
            drop(sender);
            return stream_reply(receiver);
        }
        *state.requests.entry(("watch", path.clone())).or_default() += 1;
        state.epoch
    };
    tokio::spawn(async move {
        let mut sent = from;
        loop {
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (events, rv, ended) = {
                let state = inner.lock().unwrap();
                let events: Vec<(u64, Value)> = state
                    .history
                    .iter()
                    .filter(|(rv, p, _, _)| *rv > sent && *p == path)
                    .map(|(rv, _, kind, object)| (*rv, json!({"type": kind, "object": object})))
                    .collect();
                (events, state.rv, state.epoch != epoch)
            };
            if ended {
                return; // the connection drops mid-watch
            }
            for (rv, event) in events {
                sent = rv;
                if sender
                    .send(Bytes::from(format!("{event}\n")))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if tokio::time::timeout(Duration::from_secs(1), notified)
                .await
                .is_err()
                && bookmarks
            {
                sent = sent.max(rv);
                let bookmark = json!({"type": "BOOKMARK", "object": {"kind": kind,
                    "apiVersion": api_version, "metadata": {"resourceVersion": rv.to_string()}}});
                if sender
                    .send(Bytes::from(format!("{bookmark}\n")))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    });
    stream_reply(receiver)
}

fn stream_reply(receiver: tokio::sync::mpsc::Receiver<Bytes>) -> Response<Body> {
    use http_body_util::BodyExt;
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Channel(receiver).boxed())
        .unwrap()
}

/// A streamed body fed by a channel.
struct Channel(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for Channel {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}
