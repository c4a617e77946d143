//! The Kubernetes API as a config source (`mesh-node run --kube`): one kube-runtime watcher
//! per kind of the model (every namespace; pods of every node, which routing needs), each
//! keeping its objects as the API serves them, fed through the same decoder as the file
//! source (`config::load::parse_objects`) into the same snapshot builder.
//!
//! - The first snapshot is built once every kind finished its initial list: mesh-node is
//!   not ready before.
//! - Watch errors back off exponentially (kube-runtime's default backoff); a dropped
//!   connection resumes the watch from the last resource version (kept fresh by bookmarks);
//!   a `410 Gone` (expired resource version) makes the watcher list again, and the relisted
//!   set replaces the kind's objects whole, so objects deleted meanwhile go and memory does
//!   not grow over relists.
//! - An invalid object never weakens what is in force: an object that was valid keeps its
//!   last valid version until it is fixed or deleted; an AuthorizationPolicy that was never
//!   valid denies everything to the workloads it selects, a PeerAuthentication that was never
//!   valid requires mTLS (fail closed); other kinds are left out (a VirtualService with a bad
//!   field routes as if it were absent). Each is logged. `managedFields` are dropped on
//!   arrival.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::StreamExt;
use kube::{
    api::{Api, ApiResource, DynamicObject, GroupVersionKind},
    runtime::{watcher, WatchStreamExt},
    Client,
};

use crate::{
    config::{self, semantics::Mesh, Resources},
    reload::Publisher,
    state::State,
};

/// The kinds watched: `(group, version, kind, plural)`.
pub const KINDS: [(&str, &str, &str, &str); 10] = [
    ("", "v1", "Namespace", "namespaces"),
    ("", "v1", "Pod", "pods"),
    ("", "v1", "Service", "services"),
    ("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices"),
    (
        "networking.k8s.io",
        "v1",
        "NetworkPolicy",
        "networkpolicies",
    ),
    (
        "networking.istio.io",
        "v1",
        "VirtualService",
        "virtualservices",
    ),
    (
        "networking.istio.io",
        "v1",
        "DestinationRule",
        "destinationrules",
    ),
    (
        "security.istio.io",
        "v1",
        "PeerAuthentication",
        "peerauthentications",
    ),
    (
        "security.istio.io",
        "v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
    ),
    ("telemetry.istio.io", "v1", "Telemetry", "telemetries"),
];

/// Changes are gathered this long before a snapshot is built.
const SETTLE: Duration = Duration::from_millis(50);

/// Every watched object, by kind and `namespace/name`, as JSON.
#[derive(Default)]
pub struct Store {
    objects: Mutex<BTreeMap<&'static str, BTreeMap<String, serde_json::Value>>>,
    /// Diagnostics logged already (each is logged once while it lasts).
    logged: Mutex<BTreeSet<String>>,
    /// The last version of each object that decoded, by `Kind namespace/name`.
    last_good: Mutex<BTreeMap<String, serde_json::Value>>,
    synced: Mutex<BTreeSet<&'static str>>,
    changed: tokio::sync::Notify,
}

impl Store {
    fn with<R>(
        &self,
        f: impl FnOnce(&mut BTreeMap<&'static str, BTreeMap<String, serde_json::Value>>) -> R,
    ) -> R {
        f(&mut self.objects.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Whether every kind has finished its initial list.
    pub fn synced(&self) -> bool {
        self.synced.lock().unwrap_or_else(|e| e.into_inner()).len() == KINDS.len()
    }

    /// Objects held (for tests and `/debug`).
    pub fn len(&self) -> usize {
        self.with(|o| o.values().map(BTreeMap::len).sum())
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decodes every object held into resources (see the module's notes on invalid
    /// objects); returns the diagnostics of the objects as they are.
    pub fn resources(&self) -> (Resources, Vec<config::Diagnostic>) {
        // Copy under the lock, convert outside it.
        let objects: Vec<(String, &'static str, serde_json::Value)> = self.with(|objects| {
            objects
                .iter()
                .flat_map(|(kind, list)| {
                    list.iter()
                        .map(move |(key, json)| (format!("{kind} {key}"), *kind, json.clone()))
                })
                .collect()
        });
        let decode = |docs: Vec<(String, serde_json::Value)>| {
            let docs = docs.into_iter().filter_map(|(position, json)| {
                Some((position, serde_yaml_ng::to_value(json).ok()?))
            });
            config::load::parse_objects("kube", docs)
        };
        let (resources, diagnostics) = decode(
            objects
                .iter()
                .map(|(p, _, j)| (p.clone(), j.clone()))
                .collect(),
        );
        let failed: BTreeSet<&str> = diagnostics
            .iter()
            .filter(|d| d.severity == config::Severity::Error)
            .map(|d| d.document.as_str())
            .collect();
        let mut last_good = self.last_good.lock().unwrap_or_else(|e| e.into_inner());
        last_good.retain(|position, _| objects.iter().any(|(p, _, _)| p == position));
        if failed.is_empty() {
            for (position, _, json) in &objects {
                last_good.insert(position.clone(), json.clone());
            }
            return (resources, diagnostics);
        }
        let mut substituted = Vec::with_capacity(objects.len());
        for (position, kind, json) in objects {
            if !failed.contains(position.as_str()) {
                last_good.insert(position.clone(), json.clone());
                substituted.push((position, json));
            } else if let Some(good) = last_good.get(&position) {
                substituted.push((position, good.clone()));
            } else if let Some(closed) = fail_closed(kind, &json) {
                substituted.push((position, closed));
            }
        }
        drop(last_good);
        let (resources, _) = decode(substituted);
        (resources, diagnostics)
    }
}

/// The stand-in for a security object that was never valid: an AuthorizationPolicy that
/// denies everything to what it selects (the whole namespace when its selector is broken too),
/// a PeerAuthentication that requires mTLS.
fn fail_closed(kind: &str, json: &serde_json::Value) -> Option<serde_json::Value> {
    let meta = serde_json::json!({
        "name": json["metadata"]["name"],
        "namespace": json["metadata"]["namespace"],
    });
    let selector = json["spec"]["selector"]["matchLabels"]
        .as_object()
        .filter(|labels| labels.values().all(serde_json::Value::is_string))
        .map(|labels| serde_json::json!({"matchLabels": labels}));
    let mut spec = match kind {
        "AuthorizationPolicy" => serde_json::json!({"action": "DENY", "rules": [{}]}),
        "PeerAuthentication" => serde_json::json!({"mtls": {"mode": "STRICT"}}),
        _ => return None,
    };
    if let Some(selector) = selector {
        spec["selector"] = selector;
    }
    tracing::error!(
        kind,
        name = %json["metadata"]["name"],
        namespace = %json["metadata"]["namespace"],
        "invalid and never valid: enforced fail closed until fixed ({})",
        if kind == "AuthorizationPolicy" { "everything denied to the workloads it selects" } else { "mTLS required" }
    );
    Some(serde_json::json!({
        "apiVersion": json["apiVersion"],
        "kind": kind,
        "metadata": meta,
        "spec": spec,
    }))
}

/// The key and JSON of an object as the decoder wants it: `apiVersion` and `kind` set (list
/// items may lack them), `managedFields` dropped.
fn to_json(obj: DynamicObject, ar: &ApiResource) -> Option<(String, serde_json::Value)> {
    let key = format!(
        "{}/{}",
        obj.metadata.namespace.as_deref().unwrap_or(""),
        obj.metadata.name.as_deref()?
    );
    let mut json = serde_json::to_value(&obj).ok()?;
    let map = json.as_object_mut()?;
    map.insert("apiVersion".into(), ar.api_version.clone().into());
    map.insert("kind".into(), ar.kind.clone().into());
    if let Some(meta) = map.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("managedFields");
    }
    Some((key, json))
}

/// Starts one watcher task per kind, filling `store`.
pub fn spawn_watchers(client: Client, store: Arc<Store>) {
    for (group, version, kind, plural) in KINDS {
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let ar = ApiResource::from_gvk_with_plural(&gvk, plural);
        let api = Api::<DynamicObject>::all_with(client.clone(), &ar);
        let store = store.clone();
        tokio::spawn(async move {
            let mut stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .boxed();
            let mut relist: Option<BTreeMap<String, serde_json::Value>> = None;
            while let Some(event) = stream.next().await {
                match event {
                    Ok(watcher::Event::Init) => relist = Some(BTreeMap::new()),
                    Ok(watcher::Event::InitApply(obj)) => {
                        if let (Some(list), Some((key, json))) = (&mut relist, to_json(obj, &ar)) {
                            list.insert(key, json);
                        }
                    }
                    Ok(watcher::Event::InitDone) => {
                        let fresh = relist.take().unwrap_or_default();
                        let count = fresh.len();
                        store.with(|o| o.insert(kind, fresh));
                        store
                            .synced
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(kind);
                        tracing::info!(kind, count, "kube: listed");
                        store.changed.notify_one();
                    }
                    Ok(watcher::Event::Apply(obj)) => {
                        if let Some((key, json)) = to_json(obj, &ar) {
                            store.with(|o| o.entry(kind).or_default().insert(key, json));
                            store.changed.notify_one();
                        }
                    }
                    Ok(watcher::Event::Delete(obj)) => {
                        if let Some((key, _)) = to_json(obj, &ar) {
                            store.with(|o| o.entry(kind).or_default().remove(&key));
                            store.changed.notify_one();
                        }
                    }
                    Err(err) => tracing::warn!(kind, "kube watch: {err} (retrying with backoff)"),
                }
            }
        });
    }
}

/// Connects to the API server (the kubeconfig at `kubeconfig`, else in-cluster credentials
/// or `$KUBECONFIG`), starts the watchers and waits for every kind's first list (API errors
/// are retried with backoff meanwhile): the store and the first resources.
pub async fn start(
    kubeconfig: Option<&std::path::Path>,
) -> anyhow::Result<(Arc<Store>, Resources)> {
    let client = client(kubeconfig).await?;
    let store = Arc::new(Store::default());
    spawn_watchers(client, store.clone());
    let resources = initial_sync(&store).await;
    tracing::info!(objects = store.len(), "kube: initial sync done");
    Ok((store, resources))
}

/// A client of the API server: with `kubeconfig`, or in-cluster credentials, else
/// `$KUBECONFIG`, else ~/.kube/config.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<Client> {
    use anyhow::Context;
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    tracing::info!(api = %config.cluster_url, "kube: using the API server");
    Ok(Client::try_from(config)?)
}

/// Waits until every kind is listed, then returns the first resources.
pub async fn initial_sync(store: &Store) -> Resources {
    loop {
        let notified = store.changed.notified();
        if store.synced() {
            let (resources, diagnostics) = store.resources();
            log_new(
                &diagnostics,
                &mut store.logged.lock().unwrap_or_else(|e| e.into_inner()),
            );
            return resources;
        }
        notified.await;
    }
}

/// Logs the diagnostics not logged before; returns how many errors are new.
fn log_new(diagnostics: &[config::Diagnostic], seen: &mut BTreeSet<String>) -> usize {
    let mut new_errors = 0;
    let now: BTreeSet<String> = diagnostics.iter().map(ToString::to_string).collect();
    for d in diagnostics {
        let text = d.to_string();
        if seen.contains(&text) {
            continue;
        }
        if d.severity == config::Severity::Error {
            new_errors += 1;
            tracing::error!("kube: invalid resource: {text}");
        } else {
            tracing::warn!("kube: {text}");
        }
    }
    *seen = now;
    new_errors
}

/// After the initial sync: every change becomes the next snapshot generation (changes are
/// gathered for a moment first), sent to the datapath like a file reload.
pub async fn reconcile(store: Arc<Store>, node: String, mesh: Mesh, publisher: Publisher) {
    loop {
        store.changed.notified().await;
        tokio::time::sleep(SETTLE).await;
        let generation = publisher.state.load().generation + 1;
        // Decoding the whole cluster and building the snapshot is CPU work: off the proxy's
        // worker threads.
        let (store2, node2, mesh2) = (store.clone(), node.clone(), mesh.clone());
        let built = tokio::task::spawn_blocking(move || {
            let (resources, diagnostics) = store2.resources();
            let new = log_new(
                &diagnostics,
                &mut store2.logged.lock().unwrap_or_else(|e| e.into_inner()),
            );
            (State::build(&resources, &node2, &mesh2, generation), new)
        })
        .await;
        let Ok((next, new_errors)) = built else {
            tracing::error!("kube: building the snapshot failed; the last one keeps serving");
            continue;
        };
        if new_errors > 0 {
            publisher.metrics.rejected.inc_by(new_errors as u64);
        }
        tracing::debug!(generation, "kube: config applied");
        if !publisher.publish(Arc::new(next)) {
            return;
        }
    }
}
