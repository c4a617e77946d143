//! DestinationRule semantics for one destination (host, subset, port), as Istio applies them
//! on the client side: which rule applies (the client's namespace first, then the Service's,
//! then the root namespace; rules of one namespace for one host merge: subsets from all, the
//! traffic policy of the oldest), the effective traffic policy (rule, then its
//! `portLevelSettings`, then the subset's, then the subset's port level, each replacing whole
//! fields), and the runtime state that enforces it: load balancing, outlier detection and
//! the connection-pool limits. Limits count everything this node proxy sends to the
//! destination (per client proxy, as in Istio). The merge is pure ([`policy`]); this module
//! holds the per-destination and per-endpoint runtime.

use std::{
    collections::{HashMap, HashSet},
    hash::{Hash, Hasher},
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        atomic::{AtomicU32, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use crate::{
    config::{
        model::Labels,
        networking::{
            ConnectionPoolSettings, DestinationRuleSpec, H2UpgradePolicy, HttpCookie,
            LoadBalancerSettings, OutlierDetection, SimpleLb, Subset, TrafficPolicy,
        },
        semantics,
        values::labels_match,
    },
    state::{Ref, ServiceTarget, State},
};

pub mod policy;

pub use self::policy::*;

/// Identifies one destination's runtime state.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct ClusterKey {
    /// The client's namespace (DestinationRules are chosen for it).
    pub client_ns: String,
    /// Host FQDN.
    pub host: String,
    /// Subset name.
    pub subset: Option<String>,
    /// Service port.
    pub port: u16,
    /// The client's labels (hashed) when a DestinationRule for the host has a
    /// `workloadSelector`, so clients it selects and others do not share a policy; else 0.
    pub selector: u64,
}

/// Per-endpoint state kept across config changes: load, outlier bookkeeping, and the HTTP
/// connections to it (by client address; see `upstream`).
#[derive(Default)]
pub struct EndpointState {
    /// Requests in flight (LEAST_REQUEST).
    pub active: AtomicUsize,
    health: Mutex<Health>,
    /// Idle and live upstream connections.
    pub conns: Mutex<crate::http::upstream::Conns>,
}

#[derive(Default)]
struct Health {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
}

/// The runtime state of one destination.
pub struct Cluster {
    /// Its key.
    pub key: ClusterKey,
    view: Mutex<Arc<View>>,
    endpoints: Mutex<HashMap<SocketAddrV4, Arc<EndpointState>>>,
    cursor: AtomicUsize,
    /// Upstream connections open.
    pub connections: AtomicUsize,
    /// Requests waiting for a connection.
    pub pending: AtomicUsize,
    /// Requests in flight.
    pub requests: AtomicUsize,
    /// Retries in flight.
    pub retries: AtomicUsize,
    /// Signalled when a connection or a request slot frees up.
    pub freed: tokio::sync::Notify,
    /// Ejections done (for `/debug`).
    pub ejected_total: AtomicU32,
}

/// What a cluster balances over under one snapshot.
pub struct View {
    /// Snapshot generation.
    pub generation: u64,
    /// Effective policy.
    pub policy: Policy,
    /// Endpoints of the subset, in a stable order.
    pub endpoints: Vec<SocketAddrV4>,
    /// Why the destination cannot be used (a subset no DestinationRule defines).
    pub error: Option<String>,
}

impl Cluster {
    fn new(key: ClusterKey) -> Cluster {
        Cluster {
            key,
            view: Mutex::new(Arc::new(View {
                generation: u64::MAX,
                policy: Policy::default(),
                endpoints: Vec::new(),
                error: None,
            })),
            endpoints: Mutex::new(HashMap::new()),
            cursor: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            retries: AtomicUsize::new(0),
            freed: tokio::sync::Notify::new(),
            ejected_total: AtomicU32::new(0),
        }
    }

    /// The view for `generation`, rebuilt by `build` when the snapshot changed.
    pub fn view(&self, generation: u64, build: impl FnOnce() -> View) -> Arc<View> {
        let mut view = self.view.lock().unwrap_or_else(|e| e.into_inner());
        if view.generation != generation {
            let built = Arc::new(build());
            let mut endpoints = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
            endpoints.retain(|addr, _| built.endpoints.contains(addr));
            *view = built;
        }
        view.clone()
    }

    /// The state of `endpoint`.
    pub fn endpoint(&self, endpoint: SocketAddrV4) -> Arc<EndpointState> {
        self.endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(endpoint)
            .or_default()
            .clone()
    }

    /// Picks an endpoint, avoiding `tried` when another is available and ejected endpoints
    /// unless too few are healthy. `hash` is the consistent-hash key, when the balancer uses
    /// one.
    pub fn pick(
        &self,
        view: &View,
        tried: &HashSet<SocketAddrV4>,
        hash: Option<u64>,
        original: Option<SocketAddrV4>,
    ) -> Option<SocketAddrV4> {
        if view.endpoints.is_empty() {
            return None;
        }
        if view.policy.balancer == Balancer::Passthrough {
            if let Some(addr) = original.filter(|a| view.endpoints.contains(a)) {
                return Some(addr);
            }
        }
        let now = Instant::now();
        let healthy: Vec<SocketAddrV4> = match &view.policy.outlier {
            Some(outlier) => {
                // One lock for the whole list; an endpoint without state was never ejected.
                let states = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
                let healthy: Vec<_> = view
                    .endpoints
                    .iter()
                    .copied()
                    .filter(|e| !states.get(e).is_some_and(|s| s.is_ejected(now)))
                    .collect();
                drop(states);
                let share = healthy.len() * 100 / view.endpoints.len();
                if healthy.is_empty() || share < outlier.min_health_percent as usize {
                    view.endpoints.clone()
                } else {
                    healthy
                }
            }
            None => view.endpoints.clone(),
        };
        let fresh: Vec<SocketAddrV4> = healthy
            .iter()
            .copied()
            .filter(|e| !tried.contains(e))
            .collect();
        let choices = if fresh.is_empty() { &healthy } else { &fresh };
        let n = choices.len();
        Some(match &view.policy.balancer {
            Balancer::RoundRobin => choices[self.cursor.fetch_add(1, Ordering::Relaxed) % n],
            Balancer::Random | Balancer::Passthrough => choices[fastrand::usize(..n)],
            Balancer::LeastRequest => {
                let a = choices[fastrand::usize(..n)];
                let b = choices[fastrand::usize(..n)];
                let states = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
                let load = |e: SocketAddrV4| {
                    states
                        .get(&e)
                        .map_or(0, |s| s.active.load(Ordering::Relaxed))
                };
                if load(b) < load(a) {
                    b
                } else {
                    a
                }
            }
            Balancer::Hash(_) => {
                let key = hash.unwrap_or_else(|| fastrand::u64(..));
                // Rendezvous hashing: the endpoint with the highest score for this key; only
                // the keys of an endpoint that goes away move.
                *choices
                    .iter()
                    .max_by_key(|e| {
                        let mut h = std::collections::hash_map::DefaultHasher::new();
                        (key, **e).hash(&mut h);
                        h.finish()
                    })
                    .unwrap_or(&choices[0])
            }
        })
    }

    /// Records the outcome of a request to `endpoint`: `status` (0 for a local failure:
    /// connect error, reset, timeout). May eject it.
    pub fn outcome(&self, view: &View, endpoint: SocketAddrV4, status: u16) {
        let Some(outlier) = &view.policy.outlier else {
            return;
        };
        let state = self.endpoint(endpoint);
        let now = Instant::now();
        let mut health = state.health.lock().unwrap_or_else(|e| e.into_inner());
        let error = status == 0 || status >= 500;
        let gateway = status == 0 || matches!(status, 502..=504);
        if !error {
            health.consecutive_5xx = 0;
            health.consecutive_gateway = 0;
            return;
        }
        health.consecutive_5xx += 1;
        if gateway {
            health.consecutive_gateway += 1;
        } else {
            health.consecutive_gateway = 0;
        }
        let trip = (outlier.consecutive_5xx > 0
            && health.consecutive_5xx >= outlier.consecutive_5xx)
            || (outlier.consecutive_gateway > 0
                && health.consecutive_gateway >= outlier.consecutive_gateway);
        if !trip || health.ejected_until.is_some_and(|t| t > now) {
            return;
        }
        drop(health);
        // maxEjectionPercent: at least one endpoint may always be ejected.
        let ejected = view
            .endpoints
            .iter()
            .filter(|e| **e != endpoint && self.endpoint(**e).is_ejected(now))
            .count();
        let total = view.endpoints.len();
        if ejected > 0 && (ejected + 1) * 100 > outlier.max_ejection_percent as usize * total {
            return;
        }
        let mut health = state.health.lock().unwrap_or_else(|e| e.into_inner());
        // The multiplier decays by one for each interval spent healthy since the last return.
        if let Some(returned) = health.ejected_until {
            let healthy_for = now.saturating_duration_since(returned);
            let decay = (healthy_for.as_millis() / outlier.interval.as_millis().max(1)) as u32;
            health.ejections = health.ejections.saturating_sub(decay);
        }
        health.ejections += 1;
        // Envoy caps an ejection at max_ejection_time (default 300 s).
        let time = outlier
            .base_ejection
            .checked_mul(health.ejections)
            .unwrap_or(MAX_EJECTION)
            .min(MAX_EJECTION.max(outlier.base_ejection));
        health.ejected_until = Some(now + time);
        health.consecutive_5xx = 0;
        health.consecutive_gateway = 0;
        self.ejected_total.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            host = %self.key.host,
            subset = self.key.subset.as_deref().unwrap_or("-"),
            %endpoint,
            ejections = health.ejections,
            "outlier detection: endpoint ejected"
        );
    }

    /// Ejected endpoints, for `/debug`.
    pub fn ejected(&self) -> Vec<SocketAddrV4> {
        let now = Instant::now();
        let endpoints = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = endpoints
            .iter()
            .filter(|(_, s)| s.is_ejected(now))
            .map(|(a, _)| *a)
            .collect();
        out.sort();
        out
    }

    /// Drops idle upstream connections older than the policy's idle timeout.
    pub fn reap(&self) {
        let idle = self
            .view
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .policy
            .idle_timeout;
        let endpoints: Vec<_> = self
            .endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for endpoint in endpoints {
            endpoint
                .conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .reap(idle);
        }
    }
}

impl EndpointState {
    fn is_ejected(&self, now: Instant) -> bool {
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ejected_until
            .is_some_and(|t| t > now)
    }
}

/// Every destination's runtime state on this node.
#[derive(Default)]
pub struct Clusters {
    map: Mutex<HashMap<ClusterKey, Arc<Cluster>>>,
}

impl Clusters {
    /// The cluster for `key`, created on first use.
    pub fn get(&self, key: &ClusterKey) -> Arc<Cluster> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(key) {
            return c.clone();
        }
        let cluster = Arc::new(Cluster::new(key.clone()));
        map.insert(key.clone(), cluster.clone());
        cluster
    }

    /// Closes idle connections every second; forgets destinations that no longer exist.
    pub fn spawn_reaper(self: &Arc<Self>, state: Arc<arc_swap::ArcSwap<State>>) {
        let clusters = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(clusters) = clusters.upgrade() else {
                    return;
                };
                let state = state.load();
                let list: Vec<Arc<Cluster>> = {
                    let mut map = clusters.map.lock().unwrap_or_else(|e| e.into_inner());
                    map.retain(|key, c| {
                        Arc::strong_count(c) > 1 || state.services_by_host.contains_key(&key.host)
                    });
                    map.values().cloned().collect()
                };
                for cluster in list {
                    cluster.reap();
                }
            }
        });
    }

    /// `(host, subset, port, connections, ejected endpoints)` for `/debug/state`.
    pub fn snapshot(&self) -> Vec<serde_json::Value> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = map
            .values()
            .map(|c| {
                serde_json::json!({
                    "host": c.key.host,
                    "subset": c.key.subset,
                    "port": c.key.port,
                    "connections": c.connections.load(Ordering::Relaxed),
                    "requests": c.requests.load(Ordering::Relaxed),
                    "ejected": c.ejected().iter().map(ToString::to_string).collect::<Vec<_>>(),
                })
            })
            .collect();
        out.sort_by_key(|v| v.to_string());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_str, semantics::Mesh};

    fn state(extra: &str) -> State {
        let base = r#"
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Service
metadata: {name: web-app}
spec: {clusterIP: 100.66.0.10, selector: {app: web-app}, ports: [{name: http, port: 8080}]}
"#;
        let mut text = base.to_string();
        for (i, version) in ["v1", "v1", "v2"].iter().enumerate() {
            text.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: w{i}, labels: {{app: web-app, version: {version}}}}}\nspec: {{nodeName: n1}}\nstatus: {{podIP: 100.65.0.{}, conditions: [{{type: Ready, status: \"True\"}}]}}\n",
                10 + i
            ));
        }
        text.push_str(extra);
        State::build(
            &parse_str("t.yaml", &text).unwrap(),
            "n1",
            &Mesh::default(),
            1,
        )
    }

    const HOST: &str = "web-app.default.svc.cluster.local";

    #[test]
    fn subset_and_port_level_settings_override_whole_fields() {
        let state = state(
            r#"
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web-app}
spec:
  host: web-app
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool: {tcp: {maxConnections: 100}, http: {http1MaxPendingRequests: 7}}
    portLevelSettings:
    - port: {number: 8080}
      loadBalancer: {simple: RANDOM}
  subsets:
  - {name: v1, labels: {version: v1}}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      connectionPool: {tcp: {maxConnections: 3}}
      outlierDetection: {consecutive5xxErrors: 2}
"#,
        );
        let no = Labels::new();
        let (top, labels) = effective(&state, HOST, None, 8080, "default", &no).unwrap();
        assert_eq!(top.balancer, Balancer::Random, "port level wins");
        assert_eq!((top.max_connections, top.max_pending), (100, 7));
        assert!(labels.is_none());
        let (other_port, _) = effective(&state, HOST, None, 9090, "default", &no).unwrap();
        assert_eq!(other_port.balancer, Balancer::RoundRobin);
        let (v2, labels) = effective(&state, HOST, Some("v2"), 8080, "default", &no).unwrap();
        // The subset's connectionPool replaces the rule's whole connectionPool.
        assert_eq!((v2.max_connections, v2.max_pending), (3, UNLIMITED));
        assert_eq!(v2.outlier.as_ref().unwrap().consecutive_5xx, 2);
        assert_eq!(v2.outlier.as_ref().unwrap().max_ejection_percent, 10);
        let target = state.services.values().next().unwrap();
        assert_eq!(
            subset_endpoints(&state, target, labels.as_ref()),
            ["100.65.0.12:8080".parse::<SocketAddrV4>().unwrap()]
        );
        assert_eq!(
            effective(&state, HOST, Some("v9"), 8080, "default", &no),
            Err(Unroutable::NoSubset("v9".into()))
        );
    }

    #[test]
    fn the_client_namespace_rule_wins_and_rules_of_one_namespace_merge() {
        let state = state(
            r#"
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: a, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {host: web-app, trafficPolicy: {loadBalancer: {simple: RANDOM}}, subsets: [{name: v1, labels: {version: v1}}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: b, creationTimestamp: "2026-02-01T00:00:00Z"}
spec: {host: web-app, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}, subsets: [{name: v2, labels: {version: v2}}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mine, namespace: client}
spec: {host: web-app.default.svc.cluster.local, trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: X-User}}}}
"#,
        );
        let no = Labels::new();
        let (p, _) = effective(&state, HOST, Some("v2"), 8080, "default", &no).unwrap();
        assert_eq!(p.balancer, Balancer::Random, "the oldest rule's policy");
        let (_, names) = (0, destination_rule(&state, HOST, "default", &no).unwrap().2);
        assert_eq!(names, "default/a,default/b");
        let (p, _) = effective(&state, HOST, None, 8080, "client", &no).unwrap();
        assert_eq!(p.balancer, Balancer::Hash(HashOn::Header("x-user".into())));
    }

    fn view(policy: Policy) -> View {
        View {
            generation: 1,
            policy,
            error: None,
            endpoints: (10..13)
                .map(|i| SocketAddrV4::new(Ipv4Addr::new(100, 65, 0, i), 8080))
                .collect(),
        }
    }

    #[test]
    fn outlier_detection_ejects_respects_the_cap_and_returns() {
        let cluster = Cluster::new(ClusterKey {
            client_ns: "default".into(),
            host: HOST.into(),
            subset: None,
            port: 8080,
            selector: 0,
        });
        let view = view(Policy {
            balancer: Balancer::RoundRobin,
            outlier: Some(Outlier {
                consecutive_5xx: 5,
                consecutive_gateway: 0,
                interval: Duration::from_secs(30),
                base_ejection: Duration::from_millis(200),
                max_ejection_percent: 50,
                min_health_percent: 0,
            }),
            ..Policy::default()
        });
        let [a, b, _c] = [view.endpoints[0], view.endpoints[1], view.endpoints[2]];
        for _ in 0..4 {
            cluster.outcome(&view, a, 500);
        }
        cluster.outcome(&view, a, 200);
        cluster.outcome(&view, a, 500);
        assert!(cluster.ejected().is_empty(), "a success resets the count");
        for _ in 0..4 {
            cluster.outcome(&view, a, 503);
        }
        assert_eq!(cluster.ejected(), [a]);
        let none = HashSet::new();
        for _ in 0..20 {
            assert_ne!(cluster.pick(&view, &none, None, None), Some(a));
        }
        // A second one would exceed 50% of three.
        for _ in 0..5 {
            cluster.outcome(&view, b, 500);
        }
        assert_eq!(cluster.ejected(), [a]);
        std::thread::sleep(Duration::from_millis(250));
        assert!(cluster.ejected().is_empty());
        // Ejected again soon: twice as long.
        for _ in 0..5 {
            cluster.outcome(&view, a, 500);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(cluster.ejected(), [a], "the second ejection lasts 400 ms");
    }

    #[test]
    fn retries_avoid_tried_endpoints_and_hashing_is_sticky() {
        let cluster = Cluster::new(ClusterKey {
            client_ns: "default".into(),
            host: HOST.into(),
            subset: None,
            port: 8080,
            selector: 0,
        });
        let rr = view(Policy {
            balancer: Balancer::RoundRobin,
            ..Policy::default()
        });
        let tried: HashSet<_> = [rr.endpoints[0], rr.endpoints[1]].into();
        for _ in 0..5 {
            assert_eq!(cluster.pick(&rr, &tried, None, None), Some(rr.endpoints[2]));
        }
        let hashed = view(Policy {
            balancer: Balancer::Hash(HashOn::SourceIp),
            ..Policy::default()
        });
        let key = hash_ip(Ipv4Addr::new(100, 65, 0, 2));
        let first = cluster.pick(&hashed, &HashSet::new(), Some(key), None);
        for _ in 0..10 {
            assert_eq!(
                cluster.pick(&hashed, &HashSet::new(), Some(key), None),
                first
            );
        }
    }
}
