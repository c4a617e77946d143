//! L7 in the node proxy: HTTP/1.1, HTTP/2 (h2c with prior knowledge) and gRPC on Service
//! ports that declare them (`appProtocol` or the port name's prefix), with no waypoint hop.
//!
//! - [`outbound`] (client side): VirtualService routing, DestinationRule load balancing,
//!   connection-pool limits and outlier detection, retries, timeouts, faults, mirroring,
//!   header operations; `reporter="source"` request metrics.
//! - [`inbound`] (destination side, inside the HBONE tunnel or on a plaintext connection):
//!   AuthorizationPolicy per request (403 `RBAC: access denied`), `reporter="destination"`
//!   request metrics, then the pod.
//! - [`route`], [`cluster`]: the Istio semantics as pure functions and per-destination state.
//! - [`upstream`]: pooled connections to endpoints; [`tunnel`]: an HBONE stream as a socket.
//! - [`server`]: the limits every HTTP server of the proxy runs under (also the admin one).

pub mod cluster;
pub mod inbound;
pub mod outbound;
pub mod route;
pub mod server;
pub mod upstream;

pub use outbound::Routes;

/// The data plane's context with its L7 part: what every connection handler of the proxy
/// and of L7 gets.
pub type ProxyContext = crate::context::Context<L7>;

use crate::response_flag::ResponseFlag;
use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use serde::Serialize;

use crate::{
    config::{networking::HeaderOperations, paths},
    telemetry::{Report, RequestMetrics, RequestOutcome},
};

/// Errors carried by bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Response bodies sent to clients.
pub type RespBody = BoxBody<Bytes, BoxError>;

/// What L7 handling shares across connections.
pub struct L7 {
    /// Per-destination state.
    pub clusters: Arc<cluster::Clusters>,
    /// Request metrics.
    pub metrics: RequestMetrics,
    /// Limits of the client-side server (pods' requests to Service ports).
    pub outbound: Arc<server::Gate>,
    /// Limits of the destination-side server (requests to this node's pods).
    pub inbound: Arc<server::Gate>,
    /// Mirrored requests skipped because too many were in flight.
    pub mirrors_skipped: prometheus_client::metrics::counter::Counter,
    /// Spans of requests; `None`: tracing is off.
    pub tracer: Option<crate::trace::Tracer>,
}

impl L7 {
    /// L7 state recording requests in `metrics`, limited connections in `limited` and spans
    /// with `tracer`; registers `mesh_mirror_skipped_total`.
    pub fn new(
        registry: &mut prometheus_client::registry::Registry,
        metrics: RequestMetrics,
        limited: &server::ServerMetrics,
        tracer: Option<crate::trace::Tracer>,
    ) -> L7 {
        let l7 = L7 {
            clusters: Arc::default(),
            metrics,
            outbound: server::Gate::new("outbound", server::Limits::L7, limited.clone()),
            inbound: server::Gate::new("inbound", server::Limits::L7, limited.clone()),
            mirrors_skipped: Default::default(),
            tracer,
        };
        registry.register(
            "mesh_mirror_skipped",
            "Mirrored requests not sent because too many mirrors were in flight",
            l7.mirrors_skipped.clone(),
        );
        l7
    }
}

/// Headers that belong to one hop and are not forwarded (RFC 9110 7.6.1); `te: trailers`
/// is kept (gRPC needs it).
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "trailer",
    "transfer-encoding",
];

/// Removes hop-by-hop headers (and those the `Connection` header names), keeping an upgrade
/// request's `Connection: upgrade` and `Upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| !(upgrade && name == header::UPGRADE))
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    let trailers_only = headers
        .get_all(header::TE)
        .iter()
        .all(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !trailers_only {
        headers.remove(header::TE);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
        headers.remove("http2-settings");
    }
}

/// Whether a request asks for a WebSocket upgrade, the only upgrade passed through (as
/// Istio enables only `websocket`; `h2c` and others are stripped, so no second protocol can
/// run past the per-request checks).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"))
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Applies Istio header operations: set, then add, then remove.
pub fn apply_header_ops(headers: &mut HeaderMap, ops: Option<&HeaderOperations>) {
    let Some(ops) = ops else { return };
    for (name, value) in &ops.set {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(n, v);
        }
    }
    for (name, value) in &ops.add {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.append(n, v);
        }
    }
    for name in &ops.remove {
        headers.remove(name.as_str());
    }
}

/// The answer to a path the gate refuses (`gate::Refused::Path`) or no mode serves.
pub(crate) fn bad_path() -> Response<RespBody> {
    local_response(
        StatusCode::BAD_REQUEST,
        "bad request: ambiguous or malformed path",
    )
}

/// Normalizes the request's path under `mode` (`config::paths`) before routing and policy,
/// and forwards it so normalized; the query string is kept as it is. `Err` is a path that
/// no mode serves (`%00`, a malformed escape): the caller answers 400.
pub fn normalize_uri(
    uri: &mut http::Uri,
    mode: paths::Normalization,
) -> Result<(), paths::Malformed> {
    let Some(pq) = uri.path_and_query() else {
        return Ok(());
    };
    let normalized = match paths::normalize(pq.path(), mode)? {
        std::borrow::Cow::Borrowed(_) => return Ok(()),
        std::borrow::Cow::Owned(normalized) => normalized,
    };
    let query = pq.query().map(|q| format!("?{q}")).unwrap_or_default();
    let mut parts = uri.clone().into_parts();
    // A normalized path holds only characters a URI allows; were it ever refused, the
    // request is refused rather than sent on with another path.
    parts.path_and_query = Some(
        format!("{normalized}{query}")
            .parse()
            .map_err(|_| paths::Malformed::Escape)?,
    );
    *uri = http::Uri::from_parts(parts).map_err(|_| paths::Malformed::Escape)?;
    Ok(())
}

/// The request to send to the next hop: origin form with `Host` for HTTP/1.1; for HTTP/2 the
/// absolute form and no `Host` (`:authority` only, as Envoy forwards it: a `Host` header the
/// policy did not see must not reach the pod). `None` when `authority` makes no URI.
pub fn upstream_request(
    parts: &http::request::Parts,
    body: upstream::Body,
    h2: bool,
    authority: &str,
) -> Option<http::Request<upstream::Body>> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut builder = http::Request::builder().method(parts.method.clone());
    let mut headers = parts.headers.clone();
    if h2 {
        headers.remove(header::HOST);
        builder = builder
            .version(http::Version::HTTP_2)
            .uri(format!("http://{authority}{path}"));
    } else {
        if let Ok(host) = HeaderValue::from_str(authority) {
            headers.insert(header::HOST, host);
        }
        builder = builder.version(http::Version::HTTP_11).uri(path);
    }
    let mut request = builder.body(body).ok()?;
    *request.headers_mut() = headers;
    Some(request)
}

/// A request's authority: `:authority` (the URI's), else the `Host` header; empty without.
pub fn authority_of<'a>(uri: &'a http::Uri, headers: &'a HeaderMap) -> &'a str {
    uri.authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()))
        .unwrap_or("")
}

/// `http` or `grpc`, as Istio's `request_protocol` label says.
pub fn protocol_of(headers: &HeaderMap) -> &'static str {
    let grpc = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        "grpc"
    } else {
        "http"
    }
}

/// A response the proxy makes itself (an error, a denial, a redirect).
pub fn local_response(status: StatusCode, body: impl Into<Bytes>) -> Response<RespBody> {
    let body: Bytes = body.into();
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// A complete body.
pub fn full(bytes: impl Into<Bytes>) -> RespBody {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

/// One request's access-log line.
#[derive(Debug, Default, Serialize)]
pub struct RequestLog {
    /// Always `http`: tells request lines from connection lines.
    pub kind: &'static str,
    /// `source` or `destination`.
    pub reporter: &'static str,
    /// Milliseconds since the Unix epoch.
    pub start_ms: u64,
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Authority.
    pub authority: String,
    /// `HTTP/1.1` or `HTTP/2`.
    pub version: &'static str,
    /// `http` or `grpc`.
    pub protocol: &'static str,
    /// Status sent to the client.
    pub response_code: u16,
    /// `grpc-status`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<String>,
    /// Istio response flags.
    pub response_flags: ResponseFlag,
    /// Detail on a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Until the end of the response.
    pub duration_ms: f64,
    /// Request body bytes.
    pub request_bytes: u64,
    /// Response body bytes.
    pub response_bytes: u64,
    /// Client address.
    pub client: String,
    /// Client workload (`namespace/name`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_workload: Option<String>,
    /// Client SPIFFE ID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_principal: Option<String>,
    /// The VirtualService route that matched (`namespace/name#index` or its name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// The destination host routed to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_service: Option<String>,
    /// The subset routed to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// The endpoint of the last attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// Attempts made (1 without retries).
    pub attempts: u32,
    /// The deciding AuthorizationPolicy (destination side).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorization: Option<String>,
    /// The trace this request is part of (when traced: a `--tracing-provider` is set).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// This proxy's span of the request (the client span on the source side).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub span_id: Option<String>,
}

/// Records a request (metrics and access log) when its response ends.
pub struct Finish {
    metrics: RequestMetrics,
    reports: Vec<Report>,
    log: RequestLog,
    started: Instant,
    request_bytes: Arc<std::sync::atomic::AtomicU64>,
    cluster_slot: Option<Slot>,
    spans: Vec<crate::trace::Pending>,
}

/// Releases a request slot of a destination when the response ends.
pub struct Slot {
    /// The destination.
    pub cluster: Arc<cluster::Cluster>,
    /// The endpoint answering, counted as busy until the response ends.
    pub endpoint: Option<Active>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.cluster
            .requests
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.endpoint.take();
        self.cluster.freed.notify_waiters();
    }
}

/// A request in flight at an endpoint (LEAST_REQUEST counts them); released on drop, also
/// when the client goes away mid-request.
pub struct Active(Arc<cluster::EndpointState>);

impl Active {
    /// Counts one more request at `endpoint`.
    pub fn start(endpoint: Arc<cluster::EndpointState>) -> Active {
        endpoint
            .active
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Active(endpoint)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0
            .active
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Finish {
    /// What to record once the response has been sent.
    pub fn new(
        metrics: RequestMetrics,
        reports: Vec<Report>,
        log: RequestLog,
        started: Instant,
        request_bytes: Arc<std::sync::atomic::AtomicU64>,
    ) -> Finish {
        Finish {
            metrics,
            reports,
            log,
            started,
            request_bytes,
            cluster_slot: None,
            spans: Vec::new(),
        }
    }

    /// Reports `span` too when the response ends; the access-log line carries the ids of
    /// the first span given.
    pub fn trace(&mut self, span: Option<crate::trace::Pending>) {
        let Some(span) = span else { return };
        if self.log.trace_id.is_none() {
            self.log.trace_id = Some(span.context().trace_hex());
            self.log.span_id = Some(span.context().span_hex());
        }
        self.spans.push(span);
    }

    /// Holds `slot` until the response ends.
    pub fn hold(&mut self, slot: Slot) {
        self.cluster_slot = Some(slot);
    }

    fn done(mut self, response_bytes: u64, grpc_status: Option<String>, complete: bool) {
        let log = &mut self.log;
        if !complete && log.response_flags == ResponseFlag::None {
            log.response_flags = ResponseFlag::DownstreamTermination;
        }
        log.duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        log.response_bytes = response_bytes;
        log.request_bytes = self
            .request_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        log.grpc_status = grpc_status;
        self.metrics.record(
            &self.reports,
            &RequestOutcome {
                protocol: log.protocol,
                code: log.response_code,
                grpc_status: log.grpc_status.as_deref(),
                flags: log.response_flags,
                duration: self.started.elapsed(),
                request_bytes: log.request_bytes,
                response_bytes,
            },
        );
        let denied = self.log.response_code == 403
            && self.log.authorization.is_some()
            && self.log.error.is_some();
        for span in std::mem::take(&mut self.spans) {
            report_span(&self.log, span, self.log.response_code);
        }
        crate::telemetry::access_log_line(&self.log, denied);
        drop(self.cluster_slot.take());
    }
}

/// Reports `span` (when it is to be reported) with what its request came to, from its record
/// (`status`: the answer of the hop the span records).
pub fn report_span(log: &RequestLog, span: crate::trace::Pending, status: u16) {
    use crate::trace::export::Kind;
    if !span.reported() {
        return;
    }
    let host = log.destination_service.as_deref().unwrap_or(&log.authority);
    let port = span.port();
    let (cluster, peer_address) = match span.kind() {
        Kind::Client => (
            format!(
                "outbound|{port}|{}|{host}",
                log.subset.as_deref().unwrap_or("")
            ),
            log.upstream.clone().unwrap_or_default(),
        ),
        Kind::Server => (format!("inbound|{port}||"), log.client.clone()),
    };
    let outcome = crate::trace::Outcome {
        method: &log.method,
        url: format!("http://{}{}", log.authority, log.path),
        protocol: log.version,
        status,
        flags: log.response_flags.to_string(),
        cluster,
        peer_address,
        sizes: (log.request_bytes, log.response_bytes),
        name: format!("{host}:{port}/*"),
    };
    span.finish(outcome);
}

/// A response body that counts its bytes, notes a gRPC status in its trailers, and records
/// the request when it ends (or is dropped unfinished: `DC`).
pub struct Observed {
    inner: RespBody,
    bytes: u64,
    grpc_status: Option<String>,
    finish: Option<Finish>,
}

impl Observed {
    /// Wraps a response: its headers may already carry `grpc-status` (trailers-only).
    pub fn wrap(response: Response<RespBody>, mut finish: Finish) -> Response<RespBody> {
        let (mut parts, inner) = response.into_parts();
        if finish.log.response_flags == ResponseFlag::DownstreamTermination {
            parts.extensions.insert(server::ClientGone);
        }
        finish.log.response_code = parts.status.as_u16();
        let grpc_status = parts
            .headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = Observed {
            inner,
            bytes: 0,
            grpc_status,
            finish: Some(finish),
        };
        if body.inner.is_end_stream() {
            let mut body = body;
            body.end(true);
            return Response::from_parts(parts, full(Bytes::new()));
        }
        Response::from_parts(parts, BoxBody::new(body))
    }

    fn end(&mut self, complete: bool) {
        if let Some(finish) = self.finish.take() {
            finish.done(self.bytes, self.grpc_status.take(), complete);
        }
    }
}

impl Body for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
                if let Some(status) = frame
                    .trailers_ref()
                    .and_then(|t| t.get("grpc-status"))
                    .and_then(|v| v.to_str().ok())
                {
                    this.grpc_status = Some(status.to_string());
                }
                if this.inner.is_end_stream() {
                    this.end(true);
                }
            }
            Poll::Ready(Some(Err(_))) => this.end(false),
            Poll::Ready(None) => this.end(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        let complete = self.inner.is_end_stream();
        self.end(complete);
    }
}

/// A request body that counts the bytes it passes on.
pub struct Counting {
    inner: BoxBody<Bytes, BoxError>,
    count: Arc<std::sync::atomic::AtomicU64>,
}

impl Counting {
    /// Wraps `inner`, adding its bytes to `count`.
    pub fn wrap(
        inner: BoxBody<Bytes, BoxError>,
        count: Arc<std::sync::atomic::AtomicU64>,
    ) -> BoxBody<Bytes, BoxError> {
        BoxBody::new(Counting { inner, count })
    }
}

impl Body for Counting {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.count
                    .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An incoming body as a boxed body.
pub fn boxed(body: hyper::body::Incoming) -> BoxBody<Bytes, BoxError> {
    body.map_err(|e| -> BoxError { Box::new(e) }).boxed()
}

/// `HTTP/1.1` or `HTTP/2`.
pub fn version_name(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    }
}

/// Copies both ways between the two upgraded ends of a WebSocket (or other upgrade).
pub fn splice_upgrade(client: hyper::upgrade::OnUpgrade, server: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        let (Ok(client), Ok(server)) = (client.await, server.await) else {
            return;
        };
        let mut client = hyper_util::rt::TokioIo::new(client);
        let mut server = hyper_util::rt::TokioIo::new(server);
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_are_normalized_but_not_their_query() {
        let mut uri: http::Uri = "/x/../api//v1?q=/../a".parse().unwrap();
        normalize_uri(&mut uri, paths::Normalization::DecodeAndMergeSlashes).unwrap();
        assert_eq!(uri, "/api/v1?q=/../a");
        let mut uri: http::Uri = "/a%00".parse().unwrap();
        assert!(normalize_uri(&mut uri, paths::Normalization::None).is_err());
    }

    #[test]
    fn only_websocket_upgrades_and_te_trailers_pass() {
        let mut h = HeaderMap::new();
        h.insert("connection", "Upgrade, HTTP2-Settings".parse().unwrap());
        h.insert("upgrade", "h2c".parse().unwrap());
        h.insert("http2-settings", "AAMAAABkAAQAAP__".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        assert!(!is_upgrade(&h));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("upgrade").is_none() && h.get("http2-settings").is_none());
        assert_eq!(h.get("te").unwrap(), "trailers");
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("connection", "upgrade".parse().unwrap());
        assert!(is_upgrade(&h));
    }
}
