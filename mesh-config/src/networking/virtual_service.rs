//! `VirtualService` (`networking.istio.io` v1alpha3, v1beta1, v1): hosts, HTTP, TLS and TCP
//! routes with their matches, destinations and actions.

use std::collections::{BTreeMap, BTreeSet};

use serde_yaml_ng::Value;

use super::{check_export_to, check_host, check_port, PortSelector};
use crate::decode::{string_enum, Cx, Decode, Fields};
use crate::values::{Duration, Labels, Percent, StringMatch};

/// `VirtualService.spec`.
#[derive(Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct VirtualServiceSpec {
    /// Destination hosts: short names, `name.namespace`, FQDNs, or wildcards.
    pub hosts: Vec<String>,
    /// Gateways and sidecars the routes apply to; empty means `mesh` only.
    pub gateways: Vec<String>,
    /// HTTP routes, first match wins.
    pub http: Vec<HttpRoute>,
    /// TLS (SNI) routes.
    pub tls: Vec<TlsRoute>,
    /// Opaque TCP routes.
    pub tcp: Vec<TcpRoute>,
    /// Namespaces it is visible to (`.` own, `*` all); empty means all.
    pub export_to: Vec<String>,
}

impl VirtualServiceSpec {
    /// Whether it applies to mesh traffic (as opposed to only ingress gateways).
    pub fn applies_to_mesh(&self) -> bool {
        self.gateways.is_empty() || self.gateways.iter().any(|g| g == "mesh")
    }
}

impl Decode for VirtualServiceSpec {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let spec = VirtualServiceSpec {
                hosts: f.list("hosts"),
                gateways: f.list("gateways"),
                http: f.list("http"),
                tls: f.list("tls"),
                tcp: f.list("tcp"),
                export_to: f.list("exportTo"),
            };
            let mut seen = BTreeSet::new();
            for (i, host) in spec.hosts.iter().enumerate() {
                if host == "*" && spec.applies_to_mesh() {
                    f.error_item("hosts", i, "`*` is not allowed for mesh traffic");
                } else if let Err(why) = check_host(host) {
                    f.error_item("hosts", i, why);
                } else if !seen.insert(host) {
                    f.error_item("hosts", i, format!("{host:?} is listed twice"));
                }
            }
            if spec.http.is_empty()
                && spec.tls.is_empty()
                && spec.tcp.is_empty()
                && !f.has("http")
                && !f.has("tcp")
                && !f.has("tls")
            {
                f.cx()
                    .error("a VirtualService needs http, tls or tcp routes");
            }
            check_export_to(f, &spec.export_to);
            spec
        })
    }
}

/// `HTTPRoute`.
#[derive(Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
#[schemars(transform = crate::schema::http_route_extras)]
pub struct HttpRoute {
    /// Name (for logs and stats).
    pub name: Option<String>,
    /// Match conditions, ORed; empty matches everything.
    #[schemars(rename = "match")]
    pub matches: Vec<HttpMatchRequest>,
    /// Weighted destinations.
    pub route: Vec<HttpRouteDestination>,
    /// Redirect instead of forwarding.
    pub redirect: Option<HttpRedirect>,
    /// Answer directly instead of forwarding.
    pub direct_response: Option<HttpDirectResponse>,
    /// Delegate to another VirtualService.
    pub delegate: Option<Delegate>,
    /// Rewrite before forwarding.
    pub rewrite: Option<HttpRewrite>,
    /// Request timeout (no timeout when unset).
    pub timeout: Option<Duration>,
    /// Retry policy.
    pub retries: Option<HttpRetry>,
    /// Fault injection.
    pub fault: Option<HttpFaultInjection>,
    /// Mirror destination (single).
    pub mirror: Option<Destination>,
    /// Mirror percentage of `mirror`.
    pub mirror_percentage: Option<Percent>,
    /// Mirror destinations (several).
    pub mirrors: Vec<HttpMirrorPolicy>,
    /// CORS policy.
    pub cors_policy: Option<CorsPolicy>,
    /// Header manipulation.
    pub headers: Option<Headers>,
}

impl Decode for HttpRoute {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            f.deprecated("mirrorPercent", "use mirrorPercentage");
            f.skip("mirrorPercent");
            let route = HttpRoute {
                name: f.opt("name"),
                matches: f.list("match"),
                route: f.list("route"),
                redirect: f.opt("redirect"),
                direct_response: f.opt("directResponse"),
                delegate: f.opt("delegate"),
                rewrite: f.opt("rewrite"),
                timeout: f.opt("timeout"),
                retries: f.opt("retries"),
                fault: f.opt("fault"),
                mirror: f.opt("mirror"),
                mirror_percentage: f.opt("mirrorPercentage"),
                mirrors: f.list("mirrors"),
                cors_policy: f.opt("corsPolicy"),
                headers: f.opt("headers"),
            };
            let actions: Vec<&str> = ["route", "redirect", "directResponse", "delegate"]
                .into_iter()
                .filter(|k| f.has(k))
                .collect();
            match actions.len() {
                0 => f.cx().error(
                    "an HTTP route needs one of route, redirect, directResponse or delegate",
                ),
                1 => {}
                _ => f.cx().error(format!(
                    "an HTTP route takes only one of route, redirect, directResponse and \
                     delegate, found {}",
                    actions.join(" and ")
                )),
            }
            for (action, others) in [
                ("redirect", ["fault", "rewrite"]),
                ("directResponse", ["fault", "rewrite"]),
            ] {
                for other in others {
                    if f.has(action) && f.has(other) {
                        f.error_at(other, format!("{other} cannot be combined with {action}"));
                    }
                }
            }
            if f.has("mirror") && f.has("mirrors") {
                f.error_at("mirrors", "use either mirror or mirrors, not both");
            }
            route
        })
    }
}

/// `HTTPMatchRequest`: every condition set must hold.
#[derive(Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct HttpMatchRequest {
    /// Name (for logs).
    pub name: Option<String>,
    /// Path match.
    pub uri: Option<StringMatch>,
    /// `http` or `https`.
    pub scheme: Option<StringMatch>,
    /// Method.
    pub method: Option<StringMatch>,
    /// `Host`/`:authority`.
    pub authority: Option<StringMatch>,
    /// Headers (names are matched case-insensitively).
    pub headers: BTreeMap<String, HeaderMatch>,
    /// Destination port.
    pub port: Option<u32>,
    /// Labels the source workload must have.
    pub source_labels: Labels,
    /// Gateways the match applies to.
    pub gateways: Vec<String>,
    /// Query parameters (exact or regex; Istio does not support prefix here).
    pub query_params: BTreeMap<String, StringMatch>,
    /// Compare the path case-insensitively.
    pub ignore_uri_case: bool,
    /// Headers that must not match.
    pub without_headers: BTreeMap<String, HeaderMatch>,
    /// Namespace the source workload must be in.
    pub source_namespace: Option<String>,
    /// Stat prefix (recorded, unused).
    pub stat_prefix: Option<String>,
}

impl Decode for HttpMatchRequest {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let m = HttpMatchRequest {
                name: f.opt("name"),
                uri: f.opt("uri"),
                scheme: f.opt("scheme"),
                method: f.opt("method"),
                authority: f.opt("authority"),
                headers: f.map("headers"),
                port: f.opt("port"),
                source_labels: f.map("sourceLabels"),
                gateways: f.list("gateways"),
                query_params: f.map("queryParams"),
                ignore_uri_case: f.flag("ignoreUriCase"),
                without_headers: f.map("withoutHeaders"),
                source_namespace: f.opt("sourceNamespace"),
                stat_prefix: f.opt("statPrefix"),
            };
            for (field, headers) in [
                ("headers", &m.headers),
                ("withoutHeaders", &m.without_headers),
            ] {
                for name in headers.keys() {
                    let valid = !name.is_empty()
                        && name
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
                    if !valid {
                        f.error_entry(field, name, "not a header name (letters, digits, - and _)");
                    }
                }
            }
            for (name, matcher) in &m.query_params {
                if matcher.is_prefix() {
                    f.error_entry(
                        "queryParams",
                        name,
                        "Istio supports only exact and regex for query parameters",
                    );
                }
            }
            check_port(f, "port", m.port);
            m
        })
    }
}

/// A header condition: `{}` (present) or a string match.
#[derive(Clone, Debug, PartialEq)]
pub enum HeaderMatch {
    /// The header is present, whatever its value.
    Present,
    /// The header's value matches.
    Value(StringMatch),
}

impl Decode for HeaderMatch {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        match value {
            Value::Mapping(map) if map.is_empty() => Some(HeaderMatch::Present),
            other => StringMatch::decode(other, cx).map(HeaderMatch::Value),
        }
    }
}

/// `HTTPRouteDestination`.
#[derive(Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct HttpRouteDestination {
    /// Where to send.
    pub destination: Destination,
    /// Relative weight (share = weight / sum of weights); unset counts as 0 unless it is the
    /// only destination, as Istio does.
    pub weight: Option<i32>,
    /// Header manipulation for this destination.
    pub headers: Option<Headers>,
}

impl Decode for HttpRouteDestination {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let d = HttpRouteDestination {
                destination: f.req("destination"),
                weight: f.opt("weight"),
                headers: f.opt("headers"),
            };
            check_weight(f, d.weight);
            d
        })
    }
}

fn check_weight(f: &mut Fields<'_, '_>, weight: Option<i32>) {
    if weight.is_some_and(|w| w < 0) {
        f.error_at("weight", "weight must not be negative");
    }
}

/// `Destination`.
#[derive(Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct Destination {
    /// Service host (short name, `name.namespace`, or FQDN).
    pub host: String,
    /// Subset defined by a DestinationRule.
    pub subset: Option<String>,
    /// Port on the host (required when the Service has several ports).
    #[schemars(with = "Option<crate::schema::PortSelector>")]
    pub port: Option<u32>,
}

impl Decode for Destination {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let host: String = f.req("host");
            if host.contains('*') {
                f.error_at("host", "a destination host cannot be a wildcard");
            } else if !host.is_empty() {
                if let Err(why) = check_host(&host) {
                    f.error_at("host", why);
                }
            }
            let port = f
                .opt::<PortSelector>("port")
                .map(|p| p.number)
                .filter(|n| *n != 0);
            Destination {
                host,
                subset: f.opt("subset"),
                port,
            }
        })
    }
}

string_enum! {
    /// `HTTPRedirect.derivePort`.
    DerivePort {
        /// The scheme's default port.
        FromProtocolDefault = "FROM_PROTOCOL_DEFAULT",
        /// The request's port.
        FromRequestPort = "FROM_REQUEST_PORT",
    }
}

/// `HTTPRedirect`.
#[derive(Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct HttpRedirect {
    /// Replacement path.
    pub uri: Option<String>,
    /// Replacement authority.
    pub authority: Option<String>,
    /// Replacement port.
    pub port: Option<u32>,
    /// Port derivation.
    pub derive_port: Option<DerivePort>,
    /// Replacement scheme.
    pub scheme: Option<String>,
    /// Status code (301 by default).
    pub redirect_code: u32,
}

impl Decode for HttpRedirect {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let r = HttpRedirect {
                uri: f.opt("uri"),
                authority: f.opt("authority"),
                port: f.opt("port"),
                derive_port: f.opt("derivePort"),
                scheme: f.opt("scheme"),
                redirect_code: f.opt("redirectCode").filter(|c| *c != 0).unwrap_or(301),
            };
            if !(300..=399).contains(&r.redirect_code) {
                f.error_at(
                    "redirectCode",
                    format!("{} is not a redirect code (3xx)", r.redirect_code),
                );
            }
            if !["uri", "authority", "scheme", "port", "derivePort"]
                .iter()
                .any(|k| f.has(k))
            {
                f.cx()
                    .error("a redirect needs at least one of uri, authority, scheme or port");
            }
            if let Some(scheme) = r
                .scheme
                .as_deref()
                .filter(|s| !["http", "https"].contains(s))
            {
                f.error_at("scheme", format!("{scheme:?} is not http or https"));
            }
            if f.has("port") && f.has("derivePort") {
                f.error_at("derivePort", "use either port or derivePort, not both");
            }
            check_port(f, "port", r.port);
            r
        })
    }
}

/// `HTTPDirectResponse`.
#[derive(Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct HttpDirectResponse {
    /// Status code.
    pub status: u32,
    /// Body (`string` or base64 `bytes`).
    #[schemars(with = "Option<crate::schema::HttpBody>")]
    pub body: Option<String>,
}

impl Decode for HttpDirectResponse {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let status: u32 = f.req("status");
            if f.has("status") && !(200..=599).contains(&status) {
                f.error_at(
                    "status",
                    format!("{status} is not an HTTP status (200-599)"),
                );
            }
            let body = f.opt::<HttpBody>("body").map(|b| b.0);
            HttpDirectResponse { status, body }
        })
    }
}

struct HttpBody(String);

impl Decode for HttpBody {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            if f.has("string") == f.has("bytes") {
                f.cx().error("a body needs exactly one of string or bytes");
            }
            HttpBody(f.opt("string").or(f.opt("bytes")).unwrap_or_default())
        })
    }
}

/// `Delegate`.
#[derive(Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct Delegate {
    /// VirtualService name.
    pub name: String,
    /// Its namespace (default: the delegating VirtualService's).
    pub namespace: Option<String>,
}

impl Decode for Delegate {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| Delegate {
            name: f.req("name"),
            namespace: f.opt("namespace"),
        })
    }
}

/// `HTTPRewrite`.
#[derive(Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct HttpRewrite {
    /// Replace the matched prefix (or the whole path for exact/regex matches).
    pub uri: Option<String>,
    /// Replace the authority.
    pub authority: Option<String>,
    /// Regex rewrite of the path.
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

impl Decode for HttpRewrite {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let r = HttpRewrite {
                uri: f.opt("uri"),
                authority: f.opt("authority"),
                uri_regex_rewrite: f.opt("uriRegexRewrite"),
            };
            if f.has("uri") && f.has("uriRegexRewrite") {
                f.error_at(
                    "uriRegexRewrite",
                    "use either uri or uriRegexRewrite, not both",
                );
            }
            r
        })
    }
}

/// `RegexRewrite`: every substring of the path matching `pattern` is replaced (as Envoy's
/// `regex_rewrite` does; anchor with `^...$` to replace the whole path).
#[derive(Clone, Debug, Default, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct RegexRewrite {
    /// The pattern (RE2, not anchored).
    #[schemars(rename = "match")]
    pub pattern: String,
    /// The replacement (`\1` for groups).
    pub rewrite: String,
    /// `pattern` compiled when the config was read (`None` only in a config that failed).
    #[schemars(skip)]
    pub compiled: Option<regex::Regex>,
}

impl PartialEq for RegexRewrite {
    fn eq(&self, other: &Self) -> bool {
        (&self.pattern, &self.rewrite) == (&other.pattern, &other.rewrite)
    }
}

impl Decode for RegexRewrite {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let pattern: String = f.req("match");
            let compiled = if f.has("match") {
                crate::values::compile_regex(&pattern, &pattern)
                    .map_err(|why| f.error_at("match", why))
                    .ok()
            } else {
                None
            };
            RegexRewrite {
                pattern,
                rewrite: f.req("rewrite"),
                compiled,
            }
        })
    }
}

/// Retry conditions Istio (Envoy) accepts in `retryOn`, besides HTTP status codes.
pub const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "http3-post-connect-failure",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// `HTTPRetry`.
#[derive(Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct HttpRetry {
    /// Retries allowed (not counting the first try).
    pub attempts: i32,
    /// Timeout per try (default: the route timeout).
    pub per_try_timeout: Option<Duration>,
    /// Conditions, comma separated (Envoy names or status codes).
    pub retry_on: Option<String>,
    /// Retry on other localities.
    pub retry_remote_localities: bool,
    /// Avoid hosts already tried.
    pub retry_ignore_previous_hosts: Option<bool>,
    /// Base interval between retries (Envoy's default 25ms).
    pub backoff: Option<Duration>,
}

impl Decode for HttpRetry {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let r = HttpRetry {
                attempts: f.opt("attempts").unwrap_or(0),
                per_try_timeout: f.opt("perTryTimeout"),
                retry_on: f.opt("retryOn"),
                retry_remote_localities: f.flag("retryRemoteLocalities"),
                retry_ignore_previous_hosts: f.opt("retryIgnorePreviousHosts"),
                backoff: f.opt("backoff"),
            };
            if r.attempts < 0 {
                f.error_at("attempts", "attempts must not be negative");
            }
            let attempts_known = !f.failed("attempts");
            if r.attempts == 0 && attempts_known {
                for key in ["perTryTimeout", "retryOn", "retryRemoteLocalities"] {
                    if f.has(key) {
                        f.error_at(key, "has no effect with attempts 0 (no retries)");
                    }
                }
            }
            for item in r.retry_on.as_deref().unwrap_or("").split(',') {
                let item = item.trim();
                let status = item.parse::<u16>().is_ok_and(|s| (100..=599).contains(&s));
                if !item.is_empty() && !status && !RETRY_ON.contains(&item) {
                    f.error_at(
                        "retryOn",
                        format!(
                            "unknown retry condition {item:?}; expected an HTTP status or one of {}",
                            RETRY_ON.join(", ")
                        ),
                    );
                }
            }
            r
        })
    }
}

/// `HTTPFaultInjection`.
#[derive(Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct HttpFaultInjection {
    /// Delay before forwarding.
    pub delay: Option<FaultDelay>,
    /// Abort with an error.
    pub abort: Option<FaultAbort>,
}

impl Decode for HttpFaultInjection {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let fault = HttpFaultInjection {
                delay: f.opt("delay"),
                abort: f.opt("abort"),
            };
            if !f.has("delay") && !f.has("abort") {
                f.cx().error("a fault needs delay or abort");
            }
            fault
        })
    }
}

/// `HTTPFaultInjection.Delay`.
#[derive(Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
#[schemars(transform = crate::schema::delay_extras)]
pub struct FaultDelay {
    /// The delay.
    pub fixed_delay: Duration,
    /// Share of requests delayed (default 100 when unset, as Envoy does).
    pub percentage: Option<Percent>,
}

impl Decode for FaultDelay {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            f.deprecated("percent", "use percentage: {value: N}");
            f.deprecated("exponentialDelay", "use fixedDelay");
            let percent: Option<i32> = f.opt("percent");
            f.skip("exponentialDelay");
            FaultDelay {
                fixed_delay: f.req("fixedDelay"),
                percentage: f
                    .opt("percentage")
                    .or(percent.map(|p| Percent(f64::from(p)))),
            }
        })
    }
}

/// `HTTPFaultInjection.Abort`.
#[derive(Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct FaultAbort {
    /// HTTP status returned.
    pub http_status: Option<u32>,
    /// gRPC status returned.
    pub grpc_status: Option<String>,
    /// HTTP/2 error returned.
    pub http2_error: Option<String>,
    /// Share of requests aborted.
    pub percentage: Option<Percent>,
}

impl Decode for FaultAbort {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let a = FaultAbort {
                http_status: f.opt("httpStatus"),
                grpc_status: f.opt("grpcStatus"),
                http2_error: f.opt("http2Error"),
                percentage: f.opt("percentage"),
            };
            let kinds = ["httpStatus", "grpcStatus", "http2Error"]
                .into_iter()
                .filter(|k| f.has(k))
                .count();
            if kinds != 1 {
                f.cx()
                    .error("an abort needs exactly one of httpStatus, grpcStatus or http2Error");
            }
            if let Some(status) = a.http_status {
                if !(200..=599).contains(&status) {
                    f.error_at(
                        "httpStatus",
                        format!("{status} is not an HTTP status (200-599)"),
                    );
                }
            }
            a
        })
    }
}

/// `HTTPMirrorPolicy`.
#[derive(Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct HttpMirrorPolicy {
    /// Where copies go.
    pub destination: Destination,
    /// Share of requests copied.
    pub percentage: Option<Percent>,
}

impl Decode for HttpMirrorPolicy {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| HttpMirrorPolicy {
            destination: f.req("destination"),
            percentage: f.opt("percentage"),
        })
    }
}

string_enum! {
    /// `CorsPolicy.unmatchedPreflights`.
    UnmatchedPreflights {
        /// Forward to the upstream.
        Unspecified = "UNSPECIFIED",
        /// Forward to the upstream.
        Forward = "FORWARD",
        /// Ignore (answer without CORS headers).
        Ignore = "IGNORE",
    }
}

/// `CorsPolicy`.
#[derive(Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
#[schemars(transform = crate::schema::cors_extras)]
pub struct CorsPolicy {
    /// Allowed origins.
    pub allow_origins: Vec<StringMatch>,
    /// Allowed methods.
    pub allow_methods: Vec<String>,
    /// Allowed request headers.
    pub allow_headers: Vec<String>,
    /// Exposed response headers.
    pub expose_headers: Vec<String>,
    /// Preflight cache time.
    pub max_age: Option<Duration>,
    /// Allow credentials.
    pub allow_credentials: Option<bool>,
    /// What to do with preflights from origins that do not match.
    pub unmatched_preflights: UnmatchedPreflights,
}

impl Decode for CorsPolicy {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            f.deprecated("allowOrigin", "use allowOrigins with string matches");
            let legacy: Vec<String> = f.list("allowOrigin");
            let mut allow_origins: Vec<StringMatch> = f.list("allowOrigins");
            allow_origins.extend(legacy.into_iter().map(StringMatch::Exact));
            CorsPolicy {
                allow_origins,
                allow_methods: f.list("allowMethods"),
                allow_headers: f.list("allowHeaders"),
                expose_headers: f.list("exposeHeaders"),
                max_age: f.opt("maxAge"),
                allow_credentials: f.opt("allowCredentials"),
                unmatched_preflights: f.opt("unmatchedPreflights").unwrap_or_default(),
            }
        })
    }
}

/// `Headers`: request and response manipulation.
#[derive(Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct Headers {
    /// Request headers.
    pub request: Option<HeaderOperations>,
    /// Response headers.
    pub response: Option<HeaderOperations>,
}

impl Decode for Headers {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| Headers {
            request: f.opt("request"),
            response: f.opt("response"),
        })
    }
}

/// `Headers.HeaderOperations`.
#[derive(Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct HeaderOperations {
    /// Overwrite.
    pub set: BTreeMap<String, String>,
    /// Append.
    pub add: BTreeMap<String, String>,
    /// Remove.
    pub remove: Vec<String>,
}

impl Decode for HeaderOperations {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| HeaderOperations {
            set: f.map("set"),
            add: f.map("add"),
            remove: f.list("remove"),
        })
    }
}

/// `TLSRoute`.
#[derive(Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct TlsRoute {
    /// Matches (at least one).
    #[schemars(rename = "match")]
    pub matches: Vec<TlsMatchAttributes>,
    /// Destinations.
    pub route: Vec<RouteDestination>,
}

impl Decode for TlsRoute {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let r = TlsRoute {
                matches: f.req("match"),
                route: f.list("route"),
            };
            if r.route.is_empty() && f.has("match") {
                f.error_at("route", "a TLS route needs at least one destination");
            }
            r
        })
    }
}

/// `TLSMatchAttributes`.
#[derive(Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct TlsMatchAttributes {
    /// SNI names (required).
    pub sni_hosts: Vec<String>,
    /// Destination CIDRs.
    pub destination_subnets: Vec<String>,
    /// Destination port.
    pub port: Option<u32>,
    /// Source workload labels.
    pub source_labels: Labels,
    /// Gateways.
    pub gateways: Vec<String>,
    /// Source namespace.
    pub source_namespace: Option<String>,
}

impl Decode for TlsMatchAttributes {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let m = TlsMatchAttributes {
                sni_hosts: f.req("sniHosts"),
                destination_subnets: f.list("destinationSubnets"),
                port: f.opt("port"),
                source_labels: f.map("sourceLabels"),
                gateways: f.list("gateways"),
                source_namespace: f.opt("sourceNamespace"),
            };
            check_port(f, "port", m.port);
            check_subnets(f, &m.destination_subnets);
            m
        })
    }
}

fn check_subnets(f: &mut Fields<'_, '_>, subnets: &[String]) {
    for (i, subnet) in subnets.iter().enumerate() {
        if let Err(why) = crate::values::Cidr::parse(subnet) {
            f.error_item("destinationSubnets", i, why);
        }
    }
}

/// `TCPRoute`.
#[derive(Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct TcpRoute {
    /// Matches; empty matches everything.
    #[schemars(rename = "match")]
    pub matches: Vec<L4MatchAttributes>,
    /// Destinations.
    pub route: Vec<RouteDestination>,
}

impl Decode for TcpRoute {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let r = TcpRoute {
                matches: f.list("match"),
                route: f.list("route"),
            };
            if r.route.is_empty() {
                f.error_at("route", "a TCP route needs at least one destination");
            }
            r
        })
    }
}

/// `L4MatchAttributes`.
#[derive(Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct L4MatchAttributes {
    /// Destination CIDRs.
    pub destination_subnets: Vec<String>,
    /// Destination port.
    pub port: Option<u32>,
    /// Source workload labels.
    pub source_labels: Labels,
    /// Gateways.
    pub gateways: Vec<String>,
    /// Source namespace.
    pub source_namespace: Option<String>,
}

impl Decode for L4MatchAttributes {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let m = L4MatchAttributes {
                destination_subnets: f.list("destinationSubnets"),
                port: f.opt("port"),
                source_labels: f.map("sourceLabels"),
                gateways: f.list("gateways"),
                source_namespace: f.opt("sourceNamespace"),
            };
            check_port(f, "port", m.port);
            check_subnets(f, &m.destination_subnets);
            m
        })
    }
}

/// `RouteDestination` (TCP and TLS routes).
#[derive(Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct RouteDestination {
    /// Where to send.
    pub destination: Destination,
    /// Relative weight.
    pub weight: Option<i32>,
}

impl Decode for RouteDestination {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let d = RouteDestination {
                destination: f.req("destination"),
                weight: f.opt("weight"),
            };
            check_weight(f, d.weight);
            d
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::errors;
    use super::*;

    #[test]
    fn host_names() {
        for ok in [
            "web",
            "web.ns",
            "web.ns.svc.cluster.local",
            "*.ns.svc.cluster.local",
            "*",
        ] {
            assert!(check_host(ok).is_ok(), "{ok}");
        }
        for bad in ["", "web_app", "-web", "a..b", "web*"] {
            assert!(check_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn http_route_rules() {
        let found = errors::<HttpRoute>(
            "{match: [{headers: {user agent: {exact: x}}, queryParams: {q: {prefix: a}}, port: 0}], \
             route: [{destination: {host: a}, weight: -1}], redirect: {uri: /x, redirectCode: 200}, \
             retries: {attempts: 2, retryOn: '5xx,bogus,503'}, timeout: 1x}",
        );
        let want = [
            "match[0].headers[\"user agent\"]: not a header name (letters, digits, - and _)",
            "match[0].queryParams[\"q\"]: Istio supports only exact and regex for query parameters",
            "match[0].port: port 0 is not between 1 and 65535",
            "route[0].weight: weight must not be negative",
            "redirect.redirectCode: 200 is not a redirect code (3xx)",
        ];
        for w in want {
            assert!(found.iter().any(|f| f == w), "missing {w:?} in {found:#?}");
        }
        assert!(
            found
                .iter()
                .any(|f| f.starts_with("timeout: invalid duration")),
            "{found:#?}"
        );
        assert!(found
            .iter()
            .any(|f| f.starts_with("retries.retryOn: unknown retry condition \"bogus\"")));
        assert!(
            found
                .iter()
                .any(|f| f.contains("only one of route, redirect")),
            "{found:#?}"
        );
        assert!(errors::<HttpRoute>("{name: x}")[0].contains("needs one of route"));
    }

    #[test]
    fn virtual_service_visibility_and_gateways() {
        let spec = |yaml: &str| {
            let value: Value = serde_yaml_ng::from_str(yaml).unwrap();
            VirtualServiceSpec::decode(&value, &mut Cx::default()).unwrap()
        };
        assert!(spec("{hosts: [a], tcp: [{route: [{destination: {host: a}}]}]}").applies_to_mesh());
        assert!(
            !spec("{hosts: [a], gateways: [gw], tcp: [{route: [{destination: {host: a}}]}]}")
                .applies_to_mesh()
        );
        assert!(spec(
            "{hosts: [a], gateways: [gw, mesh], tcp: [{route: [{destination: {host: a}}]}]}"
        )
        .applies_to_mesh());
        let found = errors::<VirtualServiceSpec>("{hosts: [a], exportTo: ['*', x]}");
        assert!(
            found.iter().any(|f| f.contains("needs http, tls or tcp")),
            "{found:#?}"
        );
        assert!(
            found
                .iter()
                .any(|f| f.contains("`*` must be the only entry")),
            "{found:#?}"
        );
    }

    #[test]
    fn presence_matches_retry_fields_and_one_error_per_mistake() {
        let value: Value = serde_yaml_ng::from_str(
            "{headers: {x-user: {}}, withoutHeaders: {x-debug: {exact: '1'}}}",
        )
        .unwrap();
        let mut cx = Cx::default();
        let m = HttpMatchRequest::decode(&value, &mut cx).unwrap();
        assert_eq!(cx.errors(), 0);
        assert_eq!(m.headers["x-user"], HeaderMatch::Present);
        let found = errors::<HttpRetry>(
            "{attempts: 2, retryOn: 5xx, backoff: 50ms, retryIgnorePreviousHosts: true}",
        );
        assert!(found.is_empty(), "{found:#?}");
        // A bad attempts value is one error, not also "no effect with attempts 0".
        let found = errors::<HttpRetry>("{attempts: '3', retryOn: 5xx}");
        assert_eq!(found.len(), 1, "{found:#?}");
        let found = errors::<VirtualServiceSpec>(
            "{hosts: [a, b, a, 'x_y'], tcp: [{route: [{destination: {host: '*'}}]}]}",
        );
        assert_eq!(
            found,
            [
                "tcp[0].route[0].destination.host: a destination host cannot be a wildcard",
                "hosts[2]: \"a\" is listed twice",
                "hosts[3]: \"x_y\" is not a valid host (a DNS name, optionally starting with `*.`)",
            ]
        );
        let found = errors::<HttpRedirect>("{redirectCode: 0}");
        assert_eq!(
            found,
            [": a redirect needs at least one of uri, authority, scheme or port"]
        );
        assert!(errors::<HttpRedirect>("{uri: /x, redirectCode: 399}").is_empty());
        let found = errors::<HttpRewrite>("{uriRegexRewrite: {rewrite: /x}}");
        assert_eq!(found, ["uriRegexRewrite.match: required field is missing"]);
    }
}
