//! `DestinationRule` (`networking.istio.io` v1alpha3, v1beta1, v1): subsets and traffic
//! policies (load balancing, connection pool, outlier detection, TLS, tunnel).

use std::collections::{BTreeMap, BTreeSet};

use serde_yaml_ng::Value;

use super::{check_export_to, check_host, check_port, PortSelector};
use crate::decode::{string_enum, Cx, Decode, Fields};
use crate::values::{Duration, Labels, WorkloadSelector};

/// `DestinationRule.spec`.
#[derive(Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct DestinationRuleSpec {
    /// The Service host it applies to.
    pub host: String,
    /// Policy for all subsets.
    pub traffic_policy: Option<TrafficPolicy>,
    /// Named subsets (label sets of endpoints).
    pub subsets: Vec<Subset>,
    /// Visibility.
    pub export_to: Vec<String>,
    /// Workloads it applies to (sidecar-scoped rules).
    pub workload_selector: Option<WorkloadSelector>,
}

impl Decode for DestinationRuleSpec {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let spec = DestinationRuleSpec {
                host: f.req("host"),
                traffic_policy: f.opt("trafficPolicy"),
                subsets: f.list("subsets"),
                export_to: f.list("exportTo"),
                workload_selector: f.opt("workloadSelector"),
            };
            if !spec.host.is_empty() {
                if let Err(why) = check_host(&spec.host) {
                    f.error_at("host", why);
                }
            }
            let mut names = BTreeSet::new();
            for (i, subset) in spec.subsets.iter().enumerate() {
                if !subset.name.is_empty() && !names.insert(subset.name.as_str()) {
                    f.error_item(
                        "subsets",
                        i,
                        format!("subset {:?} is defined twice", subset.name),
                    );
                }
            }
            check_export_to(f, &spec.export_to);
            spec
        })
    }
}

/// `Subset`.
#[derive(Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct Subset {
    /// Name, referenced by routes.
    pub name: String,
    /// Endpoint labels (added to the Service's selector).
    pub labels: Labels,
    /// Policy overriding the rule's.
    pub traffic_policy: Option<TrafficPolicy>,
}

impl Decode for Subset {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let s = Subset {
                name: f.req("name"),
                labels: f.map("labels"),
                traffic_policy: f.opt("trafficPolicy"),
            };
            if !s.name.is_empty() && check_host(&s.name).is_err() || s.name.contains('.') {
                f.error_at(
                    "name",
                    format!("{:?} is not a valid subset name (a DNS label)", s.name),
                );
            }
            s
        })
    }
}

/// `TrafficPolicy`.
#[derive(Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct TrafficPolicy {
    /// Load balancing.
    pub load_balancer: Option<LoadBalancerSettings>,
    /// Connection pool limits.
    pub connection_pool: Option<ConnectionPoolSettings>,
    /// Passive health checking.
    pub outlier_detection: Option<OutlierDetection>,
    /// Upstream TLS (recorded; the mesh's own mTLS is HBONE).
    pub tls: Option<ClientTlsSettings>,
    /// Per-port overrides.
    pub port_level_settings: Vec<PortTrafficPolicy>,
    /// Tunnel through a proxy (recorded).
    pub tunnel: Option<TunnelSettings>,
    /// PROXY protocol version to send upstream (recorded).
    #[schemars(with = "Option<crate::schema::ProxyProtocol>")]
    pub proxy_protocol: Option<ProxyProtocolVersion>,
}

impl Decode for TrafficPolicy {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let policy = TrafficPolicy {
                load_balancer: f.opt("loadBalancer"),
                connection_pool: f.opt("connectionPool"),
                outlier_detection: f.opt("outlierDetection"),
                tls: f.opt("tls"),
                port_level_settings: f.list("portLevelSettings"),
                tunnel: f.opt("tunnel"),
                proxy_protocol: f.opt::<ProxyProtocol>("proxyProtocol").map(|p| p.0),
            };
            if f.has("tunnel") && f.has("proxyProtocol") {
                f.error_at("proxyProtocol", "cannot be combined with tunnel");
            }
            policy
        })
    }
}

string_enum! {
    /// `TrafficPolicy.TunnelSettings.protocol`.
    TunnelProtocol {
        /// HTTP CONNECT.
        Connect = "CONNECT",
        /// HTTP POST.
        Post = "POST",
    }
}

/// `TrafficPolicy.TunnelSettings`.
#[derive(Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct TunnelSettings {
    /// CONNECT (default) or POST.
    pub protocol: TunnelProtocol,
    /// Host to tunnel to.
    pub target_host: String,
    /// Port to tunnel to.
    pub target_port: u32,
}

impl Decode for TunnelSettings {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let t = TunnelSettings {
                protocol: f.opt("protocol").unwrap_or_default(),
                target_host: f.req("targetHost"),
                target_port: f.req("targetPort"),
            };
            if f.has("targetPort") {
                check_port(f, "targetPort", Some(t.target_port));
            }
            t
        })
    }
}

string_enum! {
    /// `TrafficPolicy.ProxyProtocol.version`.
    ProxyProtocolVersion {
        /// Text header.
        V1 = "V1",
        /// Binary header.
        V2 = "V2",
    }
}

struct ProxyProtocol(ProxyProtocolVersion);

impl Decode for ProxyProtocol {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            ProxyProtocol(f.opt("version").unwrap_or_default())
        })
    }
}

/// `TrafficPolicy.PortTrafficPolicy`.
#[derive(Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct PortTrafficPolicy {
    /// The port.
    #[schemars(with = "crate::schema::PortSelector")]
    pub port: u32,
    /// Load balancing.
    pub load_balancer: Option<LoadBalancerSettings>,
    /// Connection pool limits.
    pub connection_pool: Option<ConnectionPoolSettings>,
    /// Passive health checking.
    pub outlier_detection: Option<OutlierDetection>,
    /// Upstream TLS.
    pub tls: Option<ClientTlsSettings>,
}

impl Decode for PortTrafficPolicy {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let port = f.opt::<PortSelector>("port").map(|p| p.number);
            if port.is_none() {
                f.error_at("port", "required field is missing");
            }
            PortTrafficPolicy {
                port: port.unwrap_or_default(),
                load_balancer: f.opt("loadBalancer"),
                connection_pool: f.opt("connectionPool"),
                outlier_detection: f.opt("outlierDetection"),
                tls: f.opt("tls"),
            }
        })
    }
}

string_enum! {
    /// `LoadBalancerSettings.simple`.
    SimpleLb {
        /// Istio's default (LEAST_REQUEST).
        Unspecified = "UNSPECIFIED",
        /// Deprecated alias of LEAST_REQUEST.
        LeastConn = "LEAST_CONN",
        /// Random.
        Random = "RANDOM",
        /// Forward to the original destination.
        Passthrough = "PASSTHROUGH",
        /// Round robin.
        RoundRobin = "ROUND_ROBIN",
        /// Fewest outstanding requests (power of two choices).
        LeastRequest = "LEAST_REQUEST",
    }
}

/// `LoadBalancerSettings`.
#[derive(Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct LoadBalancerSettings {
    /// Simple policy.
    pub simple: Option<SimpleLb>,
    /// Session affinity.
    pub consistent_hash: Option<ConsistentHash>,
    /// Slow start window.
    pub warmup_duration_secs: Option<Duration>,
    /// Locality weighting and failover (recorded; one cluster has one locality here).
    pub locality_lb_setting: Option<LocalityLbSetting>,
}

impl Decode for LoadBalancerSettings {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let lb = LoadBalancerSettings {
                simple: f.opt("simple"),
                consistent_hash: f.opt("consistentHash"),
                warmup_duration_secs: f.opt("warmupDurationSecs"),
                locality_lb_setting: f.opt("localityLbSetting"),
            };
            if lb.simple == Some(SimpleLb::LeastConn) {
                f.warn_at(
                    "simple",
                    "LEAST_CONN is deprecated by Istio; use LEAST_REQUEST",
                );
            }
            if f.has("simple") && f.has("consistentHash") {
                f.cx()
                    .error("use either simple or consistentHash, not both");
            }
            lb
        })
    }
}

/// `LocalityLoadBalancerSetting`.
#[derive(Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct LocalityLbSetting {
    /// Traffic shares from a locality to others (`region/zone/subzone` patterns).
    pub distribute: Vec<LocalityDistribute>,
    /// Failover from a region to another.
    pub failover: Vec<LocalityFailover>,
    /// Labels ordering failover priority.
    pub failover_priority: Vec<String>,
    /// Enable or disable locality load balancing.
    pub enabled: Option<bool>,
}

impl Decode for LocalityLbSetting {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let l = LocalityLbSetting {
                distribute: f.list("distribute"),
                failover: f.list("failover"),
                failover_priority: f.list("failoverPriority"),
                enabled: f.opt("enabled"),
            };
            if f.has("distribute") && f.has("failover") {
                f.error_at("failover", "cannot be combined with distribute");
            }
            l
        })
    }
}

/// `LocalityLoadBalancerSetting.Distribute`.
#[derive(Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct LocalityDistribute {
    /// Originating locality.
    pub from: String,
    /// Destination localities and their weights (summing to 100).
    pub to: BTreeMap<String, u32>,
}

impl Decode for LocalityDistribute {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let d = LocalityDistribute {
                from: f.req("from"),
                to: f.map("to"),
            };
            let sum: u32 = d.to.values().sum();
            if f.has("to") && sum != 100 {
                f.error_at("to", format!("weights must sum to 100, not {sum}"));
            }
            d
        })
    }
}

/// `LocalityLoadBalancerSetting.Failover`.
#[derive(Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct LocalityFailover {
    /// Region traffic fails over from.
    pub from: String,
    /// Region it fails over to.
    pub to: String,
}

impl Decode for LocalityFailover {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| LocalityFailover {
            from: f.req("from"),
            to: f.req("to"),
        })
    }
}

/// `LoadBalancerSettings.ConsistentHashLB`.
#[derive(Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
#[schemars(transform = crate::schema::consistent_hash_extras)]
pub struct ConsistentHash {
    /// Hash on this request header.
    pub http_header_name: Option<String>,
    /// Hash on this cookie.
    pub http_cookie: Option<HttpCookie>,
    /// Hash on the source IP.
    pub use_source_ip: bool,
    /// Hash on this query parameter.
    pub http_query_parameter_name: Option<String>,
    /// Ring size of the ring hash (`ringHash.minimumRingSize`, or the deprecated
    /// `minimumRingSize`).
    pub minimum_ring_size: Option<u64>,
    /// Maglev table size (`maglev.tableSize`).
    pub maglev_table_size: Option<u64>,
}

impl Decode for ConsistentHash {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            f.deprecated("minimumRingSize", "use ringHash: {minimumRingSize: N}");
            let legacy_ring: Option<u64> = f.opt("minimumRingSize");
            let ring = f.opt::<RingHash>("ringHash").map(|r| r.0);
            let maglev = f.opt::<Maglev>("maglev").map(|m| m.0);
            let algorithms = ["minimumRingSize", "ringHash", "maglev"]
                .into_iter()
                .filter(|k| f.has(k))
                .count();
            if algorithms > 1 {
                f.cx()
                    .error("use only one of ringHash, maglev and minimumRingSize");
            }
            let h = ConsistentHash {
                http_header_name: f.opt("httpHeaderName"),
                http_cookie: f.opt("httpCookie"),
                use_source_ip: f.flag("useSourceIp"),
                http_query_parameter_name: f.opt("httpQueryParameterName"),
                minimum_ring_size: ring.flatten().or(legacy_ring),
                maglev_table_size: maglev.flatten(),
            };
            let keys = [
                "httpHeaderName",
                "httpCookie",
                "useSourceIp",
                "httpQueryParameterName",
            ]
            .into_iter()
            .filter(|k| f.has(k))
            .count();
            if keys != 1 {
                f.cx().error(
                    "consistentHash needs exactly one of httpHeaderName, httpCookie, \
                     useSourceIp or httpQueryParameterName",
                );
            }
            h
        })
    }
}

struct RingHash(Option<u64>);

impl Decode for RingHash {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| RingHash(f.opt("minimumRingSize")))
    }
}

struct Maglev(Option<u64>);

impl Decode for Maglev {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| Maglev(f.opt("tableSize")))
    }
}

/// `ConsistentHashLB.HTTPCookie`.
#[derive(Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct HttpCookie {
    /// Cookie name.
    pub name: String,
    /// Cookie path.
    pub path: Option<String>,
    /// Lifetime of a generated cookie; 0 makes a session cookie.
    #[schemars(with = "Option<crate::values::Duration>")]
    pub ttl: Option<std::time::Duration>,
}

impl Decode for HttpCookie {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            // Unlike other durations, a cookie TTL of 0 is allowed (a session cookie).
            let ttl = f
                .opt::<String>("ttl")
                .and_then(|ttl| match Duration::parse(&ttl) {
                    Ok(d) => Some(d.0),
                    Err(why) => {
                        f.error_at("ttl", why);
                        None
                    }
                });
            HttpCookie {
                name: f.req("name"),
                path: f.opt("path"),
                ttl,
            }
        })
    }
}

/// `ConnectionPoolSettings`.
#[derive(Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct ConnectionPoolSettings {
    /// TCP limits.
    pub tcp: Option<TcpSettings>,
    /// HTTP limits.
    pub http: Option<HttpSettings>,
}

impl Decode for ConnectionPoolSettings {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| ConnectionPoolSettings {
            tcp: f.opt("tcp"),
            http: f.opt("http"),
        })
    }
}

/// `ConnectionPoolSettings.TCPSettings`.
#[derive(Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct TcpSettings {
    /// Maximum connections to a destination host.
    pub max_connections: Option<i32>,
    /// Connect timeout (Istio's default 10s).
    pub connect_timeout: Option<Duration>,
    /// Close connections older than this.
    pub max_connection_duration: Option<Duration>,
    /// Close idle connections after this.
    pub idle_timeout: Option<Duration>,
    /// Keepalive probes.
    pub tcp_keepalive: Option<TcpKeepalive>,
}

impl Decode for TcpSettings {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let t = TcpSettings {
                max_connections: f.opt("maxConnections"),
                connect_timeout: f.opt("connectTimeout"),
                max_connection_duration: f.opt("maxConnectionDuration"),
                idle_timeout: f.opt("idleTimeout"),
                tcp_keepalive: f.opt("tcpKeepalive"),
            };
            non_negative(f, "maxConnections", t.max_connections);
            t
        })
    }
}

fn non_negative(f: &mut Fields<'_, '_>, key: &str, value: Option<i32>) {
    if value.is_some_and(|v| v < 0) {
        f.error_at(key, "must not be negative");
    }
}

/// `TCPSettings.TcpKeepalive`.
#[derive(Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct TcpKeepalive {
    /// Probes before the connection is dead.
    pub probes: Option<u32>,
    /// Idle time before probing.
    pub time: Option<Duration>,
    /// Interval between probes.
    pub interval: Option<Duration>,
}

impl Decode for TcpKeepalive {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| TcpKeepalive {
            probes: f.opt("probes"),
            time: f.opt("time"),
            interval: f.opt("interval"),
        })
    }
}

string_enum! {
    /// `HTTPSettings.h2UpgradePolicy`.
    H2UpgradePolicy {
        /// The mesh default.
        Default = "DEFAULT",
        /// Keep HTTP/1.1.
        DoNotUpgrade = "DO_NOT_UPGRADE",
        /// Upgrade to HTTP/2.
        Upgrade = "UPGRADE",
    }
}

/// `ConnectionPoolSettings.HTTPSettings`.
#[derive(Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct HttpSettings {
    /// Pending requests allowed while waiting for a connection.
    pub http1_max_pending_requests: Option<i32>,
    /// Concurrent requests to a destination.
    pub http2_max_requests: Option<i32>,
    /// Requests per connection (1 disables keep-alive).
    pub max_requests_per_connection: Option<i32>,
    /// Concurrent retries.
    pub max_retries: Option<i32>,
    /// Idle timeout of upstream connections.
    pub idle_timeout: Option<Duration>,
    /// HTTP/2 upgrade.
    pub h2_upgrade_policy: H2UpgradePolicy,
    /// Use the client's protocol upstream.
    pub use_client_protocol: bool,
    /// Concurrent streams per HTTP/2 connection.
    pub max_concurrent_streams: Option<i32>,
}

impl Decode for HttpSettings {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let h = HttpSettings {
                http1_max_pending_requests: f.opt("http1MaxPendingRequests"),
                http2_max_requests: f.opt("http2MaxRequests"),
                max_requests_per_connection: f.opt("maxRequestsPerConnection"),
                max_retries: f.opt("maxRetries"),
                idle_timeout: f.opt("idleTimeout"),
                h2_upgrade_policy: f.opt("h2UpgradePolicy").unwrap_or_default(),
                use_client_protocol: f.flag("useClientProtocol"),
                max_concurrent_streams: f.opt("maxConcurrentStreams"),
            };
            non_negative(f, "http1MaxPendingRequests", h.http1_max_pending_requests);
            non_negative(f, "http2MaxRequests", h.http2_max_requests);
            non_negative(f, "maxRequestsPerConnection", h.max_requests_per_connection);
            non_negative(f, "maxRetries", h.max_retries);
            non_negative(f, "maxConcurrentStreams", h.max_concurrent_streams);
            h
        })
    }
}

/// `OutlierDetection`.
#[derive(Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
#[schemars(transform = crate::schema::outlier_extras)]
pub struct OutlierDetection {
    /// Tell local-origin failures from upstream errors.
    pub split_external_local_origin_errors: bool,
    /// Local-origin failures before ejection.
    pub consecutive_local_origin_failures: Option<u32>,
    /// 502/503/504 (and connect errors) before ejection.
    pub consecutive_gateway_errors: Option<u32>,
    /// 5xx (and connect errors) before ejection.
    pub consecutive_5xx_errors: Option<u32>,
    /// Analysis sweep interval (default 10s).
    pub interval: Option<Duration>,
    /// Minimum ejection time (default 30s).
    pub base_ejection_time: Option<Duration>,
    /// Most of the hosts that may be ejected, in percent (default 10).
    pub max_ejection_percent: Option<i32>,
    /// Disable ejection below this healthy share, in percent.
    pub min_health_percent: Option<i32>,
}

impl Decode for OutlierDetection {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            f.deprecated("consecutiveErrors", "use consecutive5xxErrors");
            let legacy: Option<u32> = f.opt("consecutiveErrors");
            let o = OutlierDetection {
                split_external_local_origin_errors: f.flag("splitExternalLocalOriginErrors"),
                consecutive_local_origin_failures: f.opt("consecutiveLocalOriginFailures"),
                consecutive_gateway_errors: f.opt("consecutiveGatewayErrors"),
                consecutive_5xx_errors: f.opt::<u32>("consecutive5xxErrors").or(legacy),
                interval: f.opt("interval"),
                base_ejection_time: f.opt("baseEjectionTime"),
                max_ejection_percent: f.opt("maxEjectionPercent"),
                min_health_percent: f.opt("minHealthPercent"),
            };
            let split_known = !f.failed("splitExternalLocalOriginErrors");
            if o.consecutive_local_origin_failures.is_some()
                && !o.split_external_local_origin_errors
                && split_known
            {
                f.error_at(
                    "consecutiveLocalOriginFailures",
                    "needs splitExternalLocalOriginErrors: true",
                );
            }
            for (key, value) in [
                ("maxEjectionPercent", o.max_ejection_percent),
                ("minHealthPercent", o.min_health_percent),
            ] {
                if value.is_some_and(|v| !(0..=100).contains(&v)) {
                    f.error_at(key, "must be between 0 and 100");
                }
            }
            o
        })
    }
}

string_enum! {
    /// `ClientTLSSettings.mode`.
    ClientTlsMode {
        /// Plain text.
        Disable = "DISABLE",
        /// TLS to the upstream.
        Simple = "SIMPLE",
        /// mTLS with given certificates.
        Mutual = "MUTUAL",
        /// mTLS with the mesh's certificates.
        IstioMutual = "ISTIO_MUTUAL",
    }
}

/// `ClientTLSSettings` (accepted and recorded).
#[derive(Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct ClientTlsSettings {
    /// Mode.
    pub mode: ClientTlsMode,
    /// SNI.
    pub sni: Option<String>,
    /// Expected SANs.
    pub subject_alt_names: Vec<String>,
    /// Secret name with the credentials.
    pub credential_name: Option<String>,
    /// Skip verification.
    pub insecure_skip_verify: Option<bool>,
    /// Client certificate file (MUTUAL).
    pub client_certificate: Option<String>,
    /// Private key file (MUTUAL).
    pub private_key: Option<String>,
    /// CA certificates file.
    pub ca_certificates: Option<String>,
    /// Certificate revocation list file.
    pub ca_crl: Option<String>,
}

impl Decode for ClientTlsSettings {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let files = ["clientCertificate", "privateKey", "caCertificates", "caCrl"];
            let t = ClientTlsSettings {
                mode: f.opt("mode").unwrap_or_default(),
                sni: f.opt("sni"),
                subject_alt_names: f.list("subjectAltNames"),
                credential_name: f.opt("credentialName"),
                insecure_skip_verify: f.opt("insecureSkipVerify"),
                client_certificate: f.opt("clientCertificate"),
                private_key: f.opt("privateKey"),
                ca_certificates: f.opt("caCertificates"),
                ca_crl: f.opt("caCrl"),
            };
            if t.mode == ClientTlsMode::IstioMutual
                && (files.iter().any(|k| f.has(k)) || f.has("credentialName"))
            {
                f.error_at(
                    "mode",
                    "ISTIO_MUTUAL uses the mesh's certificates; remove the certificate fields",
                );
            }
            if t.mode == ClientTlsMode::Mutual
                && t.credential_name.is_none()
                && !(f.has("clientCertificate") && f.has("privateKey"))
            {
                f.error_at(
                    "mode",
                    "MUTUAL needs clientCertificate and privateKey, or credentialName",
                );
            }
            t
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::errors;
    use super::*;

    #[test]
    fn outlier_detection_warns_about_fields_istio_does_not_have() {
        let found = errors::<OutlierDetection>(
            "{consecutive5xxErrors: 5, interval: 30s, baseEjectionTime: 30s, maxEjectionPercent: 50, minRequestVolume: 5}",
        );
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(found[0].starts_with("minRequestVolume: unknown field"));
        let found = errors::<OutlierDetection>("{consecutiveErrors: 5, maxEjectionPercent: 150}");
        assert_eq!(
            found,
            [
                "consecutiveErrors: deprecated by Istio; use consecutive5xxErrors",
                "maxEjectionPercent: must be between 0 and 100"
            ]
        );
    }

    #[test]
    fn every_traffic_policy_field_is_checked_and_recorded() {
        let yaml = r#"
loadBalancer:
  consistentHash: {httpCookie: {name: s, path: /, ttl: 0s}, ringHash: {minimumRingSize: 1024}}
  localityLbSetting: {distribute: [{from: r1/*, to: {r1/*: 80, r2/*: 20}}]}
tls: {mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem, caCertificates: /ca.pem}
tunnel: {targetHost: egress, targetPort: 3128}
"#;
        let value: Value = serde_yaml_ng::from_str(yaml).unwrap();
        let mut cx = Cx::default();
        let policy = TrafficPolicy::decode(&value, &mut cx).unwrap();
        assert!(cx.into_findings().is_empty());
        let lb = policy.load_balancer.unwrap();
        let hash = lb.consistent_hash.unwrap();
        let cookie = hash.http_cookie.unwrap();
        assert_eq!(
            (cookie.name.as_str(), cookie.ttl),
            ("s", Some(std::time::Duration::ZERO))
        );
        assert_eq!(hash.minimum_ring_size, Some(1024));
        assert_eq!(lb.locality_lb_setting.unwrap().distribute[0].to["r2/*"], 20);
        assert_eq!(
            policy.tls.unwrap().client_certificate.as_deref(),
            Some("/c.pem")
        );
        let tunnel = policy.tunnel.unwrap();
        assert_eq!(
            (tunnel.protocol, tunnel.target_port),
            (TunnelProtocol::Connect, 3128)
        );
        // Typos inside these subtrees are reported too.
        let found = errors::<TrafficPolicy>(
            "{loadBalancer: {localityLbSetting: {distribut: []}, consistentHash: {useSourceIp: true, maglev: {tablesize: 7}}}, proxyProtocol: {version: V3}}",
        );
        assert_eq!(found.len(), 3, "{found:#?}");
        assert!(found
            .iter()
            .any(|f| f.starts_with("loadBalancer.localityLbSetting.distribut: unknown field")));
        assert!(found
            .iter()
            .any(|f| f.starts_with("loadBalancer.consistentHash.maglev.tablesize: unknown field")));
        assert!(found
            .iter()
            .any(|f| f.starts_with("proxyProtocol.version: unknown value \"V3\"")));
    }
}
