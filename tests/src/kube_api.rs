//! A fake Kubernetes API server speaking the real list/watch wire protocol with real API JSON,
//! for the kube source's tests (no API server can be installed here): collections at
//! `/api/v1/<plural>` and `/apis/<group>/<version>/<plural>`, lists with a resourceVersion,
//! watches (`?watch=true&resourceVersion=N`) streaming ADDED/MODIFIED/DELETED events after N,
//! BOOKMARK events every second when asked, `410 Gone` (an ERROR event with an `Expired`
//! Status) for a resourceVersion older than the last compaction, and connections the test
//! can drop. One store, served on any number of listeners (one per node namespace).
//!
//! It also issues ServiceAccount tokens as the API server's TokenRequest does (JWTs signed
//! with ES256 by a key of its own, with `aud`, `exp`, and the `kubernetes.io` claims naming
//! the service account and the bound pod) and reviews them for real at
//! `POST /apis/authentication.k8s.io/v1/tokenreviews`: the signature, the expiry, the
//! audiences asked for, and that the bound pod still exists with the token's UID (so a token
//! stops validating when its pod is deleted).

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
const KINDS: [(&str, &str, &str, &str, bool); 10] = [
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
    ("Telemetry", "telemetry.istio.io", "v1", "telemetries", true),
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

/// The key tokens are signed with.
struct TokenKey(ring::signature::EcdsaKeyPair);

/// The issuer of the tokens.
const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// The fake API server's store and listeners; stopped on drop.
pub struct FakeApi {
    inner: Arc<Mutex<Inner>>,
    key: Arc<TokenKey>,
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
            key: Arc::new(TokenKey::generate()),
        }
    }

    /// A token for service account `namespace/account`, bound to pod `pod` of that namespace
    /// (by the UID the store holds now) when given, for `audiences`, expiring `lifetime_s`
    /// seconds from now (negative: already expired).
    pub fn token(
        &self,
        namespace: &str,
        account: &str,
        pod: Option<&str>,
        audiences: &[&str],
        lifetime_s: i64,
    ) -> Result<String> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs() as i64;
        let mut k8s = json!({"namespace": namespace,
            "serviceaccount": {"name": account, "uid": format!("uid-sa-{namespace}-{account}")}});
        if let Some(pod) = pod {
            let uid = self
                .get("Pod", namespace, pod)
                .and_then(|p| p["metadata"]["uid"].as_str().map(String::from))
                .ok_or_else(|| anyhow!("no pod {namespace}/{pod} to bind a token to"))?;
            k8s["pod"] = json!({"name": pod, "uid": uid});
        }
        let claims = json!({"aud": audiences, "exp": now + lifetime_s, "iat": now, "nbf": now,
            "iss": ISSUER, "sub": format!("system:serviceaccount:{namespace}:{account}"),
            "kubernetes.io": k8s});
        Ok(self.key.sign(&claims))
    }

    /// One object of the store.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let (path, _, _) = collection(kind)?;
        let inner = self.inner.lock().unwrap();
        inner
            .objects
            .get(&(path, namespace.to_string(), name.to_string()))
            .cloned()
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
        let (inner, changed, key) = (self.inner.clone(), self.changed.clone(), self.key.clone());
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
                            let (inner, changed, key) = (inner.clone(), changed.clone(), key.clone());
                            tokio::spawn(async move {
                                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                                    let (inner, changed, key) = (inner.clone(), changed.clone(), key.clone());
                                    async move {
                                        if req.method() == hyper::Method::POST && req.uri().path() == TOKEN_REVIEWS {
                                            return Ok::<_, Infallible>(review(req, &inner, &key).await);
                                        }
                                        Ok::<_, Infallible>(handle(req, &inner, &changed))
                                    }
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

/// Where TokenReviews are created.
const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl TokenKey {
    fn generate() -> TokenKey {
        use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("P-256 key");
        TokenKey(
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
                .expect("P-256 key"),
        )
    }

    /// A JWT (ES256) of `claims`.
    fn sign(&self, claims: &Value) -> String {
        let head = b64url(
            json!({"alg": "ES256", "kid": "fake", "typ": "JWT"})
                .to_string()
                .as_bytes(),
        );
        let body = b64url(claims.to_string().as_bytes());
        let input = format!("{head}.{body}");
        let signature = self
            .0
            .sign(&ring::rand::SystemRandom::new(), input.as_bytes())
            .expect("signing");
        format!("{input}.{}", b64url(signature.as_ref()))
    }

    /// The claims of `token` if its signature is this key's.
    fn verify(&self, token: &str) -> Result<Value, String> {
        use base64::Engine;
        use ring::signature::KeyPair;
        let parts: Vec<&str> = token.split('.').collect();
        let [head, body, signature] = parts[..] else {
            return Err("not a JWT".into());
        };
        let decode = |part: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|e| format!("bad base64: {e}"))
        };
        let public = ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            self.0.public_key().as_ref(),
        );
        public
            .verify(format!("{head}.{body}").as_bytes(), &decode(signature)?)
            .map_err(|_| "invalid signature".to_string())?;
        serde_json::from_slice(&decode(body)?).map_err(|e| format!("bad claims: {e}"))
    }
}

/// `POST tokenreviews`: reviews the token as the API server does.
async fn review(
    req: Request<hyper::body::Incoming>,
    inner: &Arc<Mutex<Inner>>,
    key: &TokenKey,
) -> Response<Body> {
    use http_body_util::BodyExt;
    let Ok(body) = req.into_body().collect().await else {
        return reply(400, status(400, "BadRequest", "unreadable body"));
    };
    let Ok(review) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
        return reply(400, status(400, "BadRequest", "not JSON"));
    };
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_else(|| vec![ISSUER.to_string()]);
    let decided = (|| -> Result<Value, String> {
        let claims = key.verify(token)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs() as i64;
        if claims["exp"].as_i64().unwrap_or(0) <= now {
            return Err("token has expired".into());
        }
        let audiences: Vec<String> = claims["aud"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let both: Vec<&String> = audiences.iter().filter(|a| wanted.contains(a)).collect();
        if both.is_empty() {
            return Err(format!(
                "token audiences {audiences:?} is invalid for the target audiences {wanted:?}"
            ));
        }
        let k8s = &claims["kubernetes.io"];
        let namespace = k8s["namespace"].as_str().unwrap_or_default();
        let mut extra = json!({});
        if let Some(pod) = k8s.get("pod") {
            let (name, uid) = (
                pod["name"].as_str().unwrap_or_default(),
                pod["uid"].as_str().unwrap_or_default(),
            );
            let state = inner.lock().unwrap();
            let held = state
                .objects
                .get(&(
                    "/api/v1/pods".to_string(),
                    namespace.to_string(),
                    name.to_string(),
                ))
                .and_then(|p| p["metadata"]["uid"].as_str().map(String::from));
            if held.as_deref() != Some(uid) {
                return Err(format!(
                    "pod \"{name}\" not found or its UID is not {uid}: the token is no longer valid"
                ));
            }
            extra = json!({"authentication.kubernetes.io/pod-name": [name],
                           "authentication.kubernetes.io/pod-uid": [uid]});
        }
        Ok(json!({"authenticated": true, "audiences": both,
            "user": {"username": claims["sub"], "uid": k8s["serviceaccount"]["uid"],
                     "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{namespace}"), "system:authenticated"],
                     "extra": extra}}))
    })();
    inner
        .lock()
        .unwrap()
        .requests
        .entry(("review", TOKEN_REVIEWS.to_string()))
        .and_modify(|n| *n += 1)
        .or_insert(1);
    let status = decided.unwrap_or_else(|error| json!({"authenticated": false, "error": error}));
    reply(
        201,
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
               "metadata": {}, "spec": review["spec"], "status": status}),
    )
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
