//! The pure part of a destination: the DestinationRule merge (Istio's precedence, subsets,
//! traffic policy per port) into a [`Policy`], and the balancing keys. No runtime state.

use super::*;

/// Unlimited, as Envoy's defaults are (2^32 - 1).
pub(super) const UNLIMITED: usize = u32::MAX as usize;

/// Istio's default upstream connect timeout.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Envoy's default longest ejection.
pub(super) const MAX_EJECTION: Duration = Duration::from_secs(300);

/// Istio's default idle timeout of upstream HTTP connections.
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// How to pick an endpoint.
#[derive(Clone, Debug, PartialEq)]
pub enum Balancer {
    /// In turn.
    RoundRobin,
    /// The fewer active requests of two random picks (Istio's default).
    LeastRequest,
    /// Uniformly at random.
    Random,
    /// The address the client dialled; for a Service VIP, as kube-proxy would (random).
    Passthrough,
    /// Consistent hashing on a request attribute.
    Hash(HashOn),
}

/// What consistent hashing hashes.
#[derive(Clone, Debug, PartialEq)]
pub enum HashOn {
    /// A request header.
    Header(String),
    /// A cookie (generated with this TTL when absent and a TTL is set).
    Cookie(HttpCookie),
    /// The client's address.
    SourceIp,
    /// A query parameter.
    Query(String),
}

/// Outlier detection settings with Istio's defaults applied.
#[derive(Clone, Debug, PartialEq)]
pub struct Outlier {
    /// 5xx (and local failures) in a row before ejection; 0 disables.
    pub consecutive_5xx: u32,
    /// 502/503/504 (and local failures) in a row before ejection; 0 disables.
    pub consecutive_gateway: u32,
    /// Sweep interval: an ejection multiplier decays by one per healthy interval.
    pub interval: Duration,
    /// Ejection time, times the number of ejections.
    pub base_ejection: Duration,
    /// Most of the endpoints that may be ejected at once, percent (at least one may be).
    pub max_ejection_percent: u32,
    /// Below this healthy share, percent, ejections are ignored.
    pub min_health_percent: u32,
}

impl Outlier {
    pub(super) fn from(o: &OutlierDetection) -> Outlier {
        Outlier {
            consecutive_5xx: o.consecutive_5xx_errors.unwrap_or(5),
            consecutive_gateway: o.consecutive_gateway_errors.unwrap_or(0),
            interval: o.interval.map_or(Duration::from_secs(10), |d| d.0),
            base_ejection: o
                .base_ejection_time
                .map_or(Duration::from_secs(30), |d| d.0),
            max_ejection_percent: o.max_ejection_percent.unwrap_or(10).clamp(0, 100) as u32,
            min_health_percent: o.min_health_percent.unwrap_or(0).clamp(0, 100) as u32,
        }
    }
}

/// The effective traffic policy of one destination.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Endpoint choice.
    pub balancer: Balancer,
    /// `tcp.maxConnections`.
    pub max_connections: usize,
    /// `tcp.connectTimeout`.
    pub connect_timeout: Duration,
    /// `http.http1MaxPendingRequests`.
    pub max_pending: usize,
    /// `http.http2MaxRequests`: concurrent requests.
    pub max_requests: usize,
    /// `http.maxRequestsPerConnection` (0: unlimited).
    pub max_requests_per_connection: usize,
    /// `http.maxRetries`: concurrent retries.
    pub max_retries: usize,
    /// `http.idleTimeout`.
    pub idle_timeout: Duration,
    /// `http.useClientProtocol`.
    pub use_client_protocol: bool,
    /// `http.h2UpgradePolicy: UPGRADE`.
    pub h2_upgrade: bool,
    /// Outlier detection, when set.
    pub outlier: Option<Outlier>,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            balancer: Balancer::LeastRequest,
            max_connections: UNLIMITED,
            connect_timeout: CONNECT_TIMEOUT,
            max_pending: UNLIMITED,
            max_requests: UNLIMITED,
            max_requests_per_connection: 0,
            max_retries: UNLIMITED,
            idle_timeout: IDLE_TIMEOUT,
            use_client_protocol: false,
            h2_upgrade: false,
            outlier: None,
        }
    }
}

pub(super) fn limit(value: Option<i32>) -> Option<usize> {
    value.filter(|v| *v > 0).map(|v| v as usize)
}

impl Policy {
    pub(super) fn from(
        lb: Option<&LoadBalancerSettings>,
        pool: Option<&ConnectionPoolSettings>,
        outlier: Option<&OutlierDetection>,
    ) -> Policy {
        let mut p = Policy::default();
        if let Some(lb) = lb {
            if let Some(hash) = &lb.consistent_hash {
                let on = if let Some(header) = &hash.http_header_name {
                    Some(HashOn::Header(header.to_ascii_lowercase()))
                } else if let Some(cookie) = &hash.http_cookie {
                    Some(HashOn::Cookie(cookie.clone()))
                } else if hash.use_source_ip {
                    Some(HashOn::SourceIp)
                } else {
                    hash.http_query_parameter_name.clone().map(HashOn::Query)
                };
                if let Some(on) = on {
                    p.balancer = Balancer::Hash(on);
                }
            } else if let Some(simple) = &lb.simple {
                p.balancer = match simple {
                    SimpleLb::RoundRobin => Balancer::RoundRobin,
                    SimpleLb::Random => Balancer::Random,
                    SimpleLb::Passthrough => Balancer::Passthrough,
                    SimpleLb::LeastRequest | SimpleLb::LeastConn | SimpleLb::Unspecified => {
                        Balancer::LeastRequest
                    }
                };
            }
        }
        if let Some(pool) = pool {
            if let Some(tcp) = &pool.tcp {
                p.max_connections = limit(tcp.max_connections).unwrap_or(UNLIMITED);
                if let Some(t) = tcp.connect_timeout {
                    p.connect_timeout = t.0;
                }
            }
            if let Some(http) = &pool.http {
                p.max_pending = limit(http.http1_max_pending_requests).unwrap_or(UNLIMITED);
                p.max_requests = limit(http.http2_max_requests).unwrap_or(UNLIMITED);
                p.max_requests_per_connection =
                    limit(http.max_requests_per_connection).unwrap_or(0);
                p.max_retries = limit(http.max_retries).unwrap_or(UNLIMITED);
                if let Some(t) = http.idle_timeout {
                    p.idle_timeout = t.0;
                }
                p.use_client_protocol = http.use_client_protocol;
                p.h2_upgrade = http.h2_upgrade_policy == H2UpgradePolicy::Upgrade;
            }
        }
        p.outlier = outlier.map(Outlier::from);
        p
    }
}

/// The pieces of a traffic policy Istio merges field by field.
#[derive(Clone, Default)]
pub(super) struct Pieces<'a> {
    pub(super) lb: Option<&'a LoadBalancerSettings>,
    pub(super) pool: Option<&'a ConnectionPoolSettings>,
    pub(super) outlier: Option<&'a OutlierDetection>,
}

impl<'a> Pieces<'a> {
    /// Applies `policy` over these, then its settings for `port`.
    pub(super) fn apply(&mut self, policy: Option<&'a TrafficPolicy>, port: u16) {
        let Some(policy) = policy else { return };
        if policy.load_balancer.is_some() {
            self.lb = policy.load_balancer.as_ref();
        }
        if policy.connection_pool.is_some() {
            self.pool = policy.connection_pool.as_ref();
        }
        if policy.outlier_detection.is_some() {
            self.outlier = policy.outlier_detection.as_ref();
        }
        if let Some(level) = policy
            .port_level_settings
            .iter()
            .find(|l| l.port == u32::from(port))
        {
            if level.load_balancer.is_some() {
                self.lb = level.load_balancer.as_ref();
            }
            if level.connection_pool.is_some() {
                self.pool = level.connection_pool.as_ref();
            }
            if level.outlier_detection.is_some() {
                self.outlier = level.outlier_detection.as_ref();
            }
        }
    }
}

/// The DestinationRules that apply to `host` for a client in `client_ns` with `client_labels`,
/// merged as Istio merges them: `(traffic policy, subsets, names)`.
pub fn destination_rule<'s>(
    state: &'s State,
    host: &str,
    client_ns: &str,
    client_labels: &Labels,
) -> Option<(Option<&'s TrafficPolicy>, Vec<&'s Subset>, String)> {
    let candidates: Vec<&Ref<DestinationRuleSpec>> = match state.destination_rules.get(host) {
        Some(list) => list.iter().collect(),
        None => {
            let mut wildcards: Vec<_> = state
                .destination_rules
                .iter()
                .filter(|(p, _)| p.starts_with('*') && semantics::host_matches(p, host))
                .collect();
            wildcards.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
            wildcards.into_iter().next()?.1.iter().collect()
        }
    };
    let candidates: Vec<_> = candidates
        .into_iter()
        .filter(|r| crate::http::route::visible(&r.0.spec.export_to, r.0.namespace(), client_ns))
        .filter(|r| {
            r.0.spec
                .workload_selector
                .as_ref()
                .is_none_or(|s| r.0.namespace() == client_ns && s.matches(client_labels))
        })
        .collect();
    let service_ns = host.split('.').nth(1).unwrap_or("");
    let chosen_ns = [client_ns, service_ns, state.mesh.root_namespace.as_str()]
        .into_iter()
        .find(|ns| candidates.iter().any(|r| r.0.namespace() == *ns))?;
    let chosen: Vec<_> = candidates
        .into_iter()
        .filter(|r| r.0.namespace() == chosen_ns)
        .collect();
    let policy = chosen.iter().find_map(|r| r.0.spec.traffic_policy.as_ref());
    let mut subsets: Vec<&Subset> = Vec::new();
    for rule in &chosen {
        for subset in &rule.0.spec.subsets {
            if !subsets.iter().any(|s| s.name == subset.name) {
                subsets.push(subset);
            }
        }
    }
    let names = chosen
        .iter()
        .map(|r| r.0.metadata.qualified())
        .collect::<Vec<_>>()
        .join(",");
    Some((policy, subsets, names))
}

/// Why a destination cannot be used.
#[derive(Debug, PartialEq, Eq)]
pub enum Unroutable {
    /// The route names a subset no DestinationRule defines (Envoy: no cluster, 503 NC).
    NoSubset(String),
}

/// The effective policy and subset labels of `subset` of `host` at `port`.
pub fn effective(
    state: &State,
    host: &str,
    subset: Option<&str>,
    port: u16,
    client_ns: &str,
    client_labels: &Labels,
) -> Result<(Policy, Option<Labels>), Unroutable> {
    let Some((policy, subsets, _)) = destination_rule(state, host, client_ns, client_labels) else {
        return match subset {
            Some(name) => Err(Unroutable::NoSubset(name.to_string())),
            None => Ok((Policy::default(), None)),
        };
    };
    let mut pieces = Pieces::default();
    pieces.apply(policy, port);
    let labels = match subset {
        None => None,
        Some(name) => {
            let Some(found) = subsets.iter().find(|s| s.name == name) else {
                return Err(Unroutable::NoSubset(name.to_string()));
            };
            pieces.apply(found.traffic_policy.as_ref(), port);
            Some(found.labels.clone())
        }
    };
    Ok((Policy::from(pieces.lb, pieces.pool, pieces.outlier), labels))
}

/// The endpoints of `target` whose pods have every label of `subset`.
pub fn subset_endpoints(
    state: &State,
    target: &ServiceTarget,
    subset: Option<&Labels>,
) -> Vec<SocketAddrV4> {
    let Some(labels) = subset else {
        return target.endpoints.clone();
    };
    target
        .endpoints
        .iter()
        .copied()
        .filter(|e| {
            state
                .workloads
                .get(e.ip())
                .is_some_and(|w| labels_match(&w.labels, labels))
        })
        .collect()
}

/// A stable hash of a consistent-hash key.
pub fn hash_key(text: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// The client address as a hash key.
pub fn hash_ip(ip: Ipv4Addr) -> u64 {
    hash_key(&ip.octets())
}
