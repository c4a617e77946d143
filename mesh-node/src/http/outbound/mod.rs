//! The client side of L7: a local enrolled pod's connection to an HTTP port of a Service.
//! Each request is routed by the VirtualService for the Service's host (or straight to the
//! Service without one), sent to an endpoint of the chosen destination under its
//! DestinationRule, retried and timed as the route says, and reported with
//! `reporter="source"` (and `reporter="destination"` when the endpoint is an enrolled pod of
//! this node, whose AuthorizationPolicy is then applied here).

mod actions;
mod attempt;
mod destination;
mod observe;

use crate::response_flag::ResponseFlag;
use std::{
    collections::HashSet,
    net::{SocketAddr, SocketAddrV4},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{header, request::Parts, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::net::TcpStream;

use super::ProxyContext;
use super::{
    apply_header_ops,
    cluster::{self, ClusterKey, View},
    full, local_response, protocol_of, route,
    server::{self, Served},
    strip_hop_by_hop,
    upstream::{self, Target},
    upstream_request, version_name, Active, BoxError, Counting, Finish, Observed, RequestLog,
    RespBody, Slot,
};
use crate::{
    config::{
        networking::{HttpRetry, HttpRoute, HttpRouteDestination},
        semantics::Protocol,
    },
    connections::{now_ms, ConnectionRecord, Direction},
    context::{Outcome, Tracked},
    gate::{self, HttpAttrs},
    plan::ipv4,
    plan::{Refusal, TcpRoutes},
    state::{ServiceTarget, State, Workload},
    telemetry::{Peer, Report},
    trace::{export::Kind, Pending},
};

pub use self::destination::Routes;
use self::{actions::*, attempt::*, destination::*, observe::*};

/// Serves one client connection to an HTTP Service port (`vip`).
pub async fn serve(
    ctx: Arc<ProxyContext>,
    client: TcpStream,
    peer: SocketAddr,
    vip: SocketAddrV4,
    mut rec: ConnectionRecord,
) {
    rec.path = "http_routed";
    let tracked = Tracked::open(&ctx, Direction::Outbound, rec);
    let _ = client.set_nodelay(true);
    crate::transport::keepalive(&client);
    let conn = Arc::new(ClientConn { peer, vip });
    let handle = {
        let ctx = ctx.clone();
        move |req| {
            let (ctx, conn) = (ctx.clone(), conn.clone());
            async move { handle(&ctx, &conn, req).await }
        }
    };
    let served = server::serve(&ctx.l7.outbound, &ctx.drain, peer.ip(), client, handle).await;
    tracked.finish(match served {
        Served::Done(Ok(())) => Outcome::default(),
        Served::Done(Err(err)) => {
            Outcome::refused(ResponseFlag::DownstreamTermination, err.to_string())
        }
        Served::Limited(reason) => {
            Outcome::refused(ResponseFlag::DownstreamProtocolError, reason.to_string())
        }
    });
}

struct ClientConn {
    peer: SocketAddr,
    vip: SocketAddrV4,
}

/// One request in progress: what is needed to answer it and record it. The reports are
/// built once, when it is answered, from the Service and endpoint it got to.
struct Call<'s> {
    metrics: crate::telemetry::RequestMetrics,
    started: Instant,
    log: RequestLog,
    request_bytes: Arc<AtomicU64>,
    state: &'s State,
    source: Option<&'s Workload>,
    service: Option<&'s ServiceTarget>,
    destination: Option<&'s Workload>,
    slot: Option<Slot>,
    /// The client span, and the server span of the answering attempt when the endpoint is
    /// a pod of this node.
    spans: Vec<Pending>,
}

impl Call<'_> {
    /// Reports the server span of an attempt that is retried (a pod of this node answered
    /// `status`).
    fn end_attempt(&self, mut span: Pending, status: u16) {
        span.peer(self.source);
        super::report_span(&self.log, span, status);
    }

    fn answer(
        mut self,
        response: Response<RespBody>,
        flag: ResponseFlag,
        error: Option<String>,
    ) -> Response<RespBody> {
        if flag.is_set() {
            self.log.response_flags = flag;
        }
        self.log.error = error;
        let mut finish = Finish::new(
            self.metrics.clone(),
            match self.service {
                Some(service) => reports_for(self.state, self.source, self.destination, service),
                None => Vec::new(),
            },
            std::mem::take(&mut self.log),
            self.started,
            self.request_bytes.clone(),
        );
        if let Some(slot) = self.slot.take() {
            finish.hold(slot);
        }
        for mut span in self.spans.drain(..) {
            span.peer(match span.kind() {
                Kind::Client => self.destination,
                Kind::Server => self.source,
            });
            finish.trace(Some(span));
        }
        Observed::wrap(response, finish)
    }
}

async fn handle(
    ctx: &Arc<ProxyContext>,
    conn: &ClientConn,
    mut req: Request<Incoming>,
) -> Response<RespBody> {
    let started = Instant::now();
    let state = ctx.state.load_full();
    let source = ipv4(conn.peer).and_then(|ip| state.workloads.get(&ip));
    let malformed = super::normalize_uri(req.uri_mut(), state.mesh.paths.normalization).err();
    let upgrade = super::is_upgrade(req.headers()) && req.version() != http::Version::HTTP_2;
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    if !parts.headers.contains_key("x-request-id") {
        let id = format!("{:032x}", fastrand::u128(..));
        if let Ok(value) = HeaderValue::from_str(&id) {
            parts.headers.insert("x-request-id", value);
        }
    }
    // The client span: the request goes on with it as the parent.
    let span = ctx
        .l7
        .tracer
        .as_ref()
        .zip(source)
        .and_then(|(tracer, source)| {
            tracer.begin(source, Kind::Client, &mut parts.headers, conn.vip.port())
        });
    let authority = super::authority_of(&parts.uri, &parts.headers).to_string();
    let mut call = Call {
        metrics: ctx.l7.metrics.clone(),
        started,
        log: RequestLog {
            kind: "http",
            reporter: "source",
            start_ms: now_ms(),
            method: parts.method.to_string(),
            path: parts
                .uri
                .path_and_query()
                .map_or("/".into(), |p| p.as_str().to_string()),
            authority: authority.clone(),
            version: version_name(parts.version),
            protocol: protocol_of(&parts.headers),
            response_flags: ResponseFlag::None,
            client: conn.peer.to_string(),
            source_workload: source.map(Workload::qualified),
            source_principal: source
                .filter(|s| s.enrolled)
                .map(|s| s.identity.to_string()),
            ..RequestLog::default()
        },
        request_bytes: Arc::new(AtomicU64::new(0)),
        state: &state,
        source,
        service: None,
        destination: None,
        slot: None,
        spans: span.into_iter().collect(),
    };
    if let Some(malformed) = malformed {
        let response = local_response(StatusCode::BAD_REQUEST, "malformed path");
        return call.answer(
            response,
            ResponseFlag::DownstreamProtocolError,
            Some(malformed.to_string()),
        );
    }
    let Some(service) = state.services.get(&conn.vip) else {
        // The Service went away while the connection was open.
        let response = local_response(StatusCode::SERVICE_UNAVAILABLE, "no such service");
        return call.answer(
            response,
            ResponseFlag::NoRoute,
            Some(format!("{} is no Service port now", conn.vip)),
        );
    };
    call.service = Some(service);
    let client_ns = source.map_or("default", |s| s.namespace.as_str());
    let plan = match plan(&state, service, source, &parts, &authority, client_ns) {
        Ok(plan) => plan,
        Err(()) => {
            let response = local_response(StatusCode::NOT_FOUND, "");
            return call.answer(
                response,
                ResponseFlag::NoRoute,
                Some("no route matched".into()),
            );
        }
    };
    call.log.route = plan.route_name.clone();
    call.log.destination_service = Some(plan.host.clone());
    call.log.subset = plan.subset.clone();

    let mut routed_at = started;
    if let Some(route) = plan.route {
        match before_forwarding(route, &parts, &authority, conn.vip.port()).await {
            Before::Forward => {}
            Before::Delayed => {
                // The route timeout starts after the injected delay, as Envoy's router runs
                // after its fault filter.
                routed_at = Instant::now();
                call.log.response_flags = ResponseFlag::DelayInjected;
            }
            Before::Answer(response, flag, error) => return call.answer(response, flag, error),
        }
    }

    // The destination Service and port.
    let Some(target) = destination_service(&state, &plan.host, plan.port, service, conn.vip.port())
    else {
        let response = local_response(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
        return call.answer(
            response,
            ResponseFlag::NoCluster,
            Some(format!("{} has no such port", plan.host)),
        );
    };
    call.service = Some(target);
    let key = cluster_key(
        &state,
        client_ns,
        source,
        &plan.host,
        plan.subset.clone(),
        target,
    );
    let (cluster, view) = cluster_view(ctx, &state, key, target, source);
    if let Some(error) = &view.error {
        let response = local_response(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
        return call.answer(response, ResponseFlag::NoCluster, Some(error.clone()));
    }
    // A small body is read (with a deadline) before the request takes a slot of the
    // destination: a client that declares a length and sends nothing holds no slot.
    let body = match tokio::time::timeout(BODY_TIMEOUT, replayable(body, &parts)).await {
        Ok(Ok(body)) => body,
        Ok(Err(err)) => {
            let response = local_response(StatusCode::BAD_REQUEST, "");
            return call.answer(
                response,
                ResponseFlag::DownstreamTermination,
                Some(format!("reading the request body: {err}")),
            );
        }
        Err(_) => {
            let response = local_response(StatusCode::REQUEST_TIMEOUT, "request timeout");
            return call.answer(
                response,
                ResponseFlag::DownstreamProtocolError,
                Some(format!(
                    "the request body did not arrive within {}s",
                    BODY_TIMEOUT.as_secs()
                )),
            );
        }
    };
    if cluster.requests.fetch_add(1, Ordering::AcqRel) >= view.policy.max_requests {
        cluster.requests.fetch_sub(1, Ordering::AcqRel);
        let response = local_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream connect error or disconnect/reset before headers. reset reason: overflow",
        );
        return call.answer(
            response,
            ResponseFlag::UpstreamOverflow,
            Some("http2MaxRequests reached".into()),
        );
    }
    call.slot = Some(Slot {
        cluster: cluster.clone(),
        endpoint: None,
    });

    // The request as it goes upstream.
    let route_headers = plan.route.and_then(|r| r.headers.as_ref());
    let dest_headers = plan.destination.and_then(|d| d.headers.as_ref());
    apply_header_ops(
        &mut parts.headers,
        route_headers.and_then(|h| h.request.as_ref()),
    );
    apply_header_ops(
        &mut parts.headers,
        dest_headers.and_then(|h| h.request.as_ref()),
    );
    let mut authority = authority;
    if let Some(rewrite) = plan.route.and_then(|r| r.rewrite.as_ref()) {
        rewrite_request(
            rewrite,
            plan.matched_prefix.as_deref(),
            &mut parts,
            &mut authority,
        );
    }
    strip_hop_by_hop(&mut parts.headers, upgrade);
    let declared_h2 = matches!(target.protocol, Protocol::Http2 | Protocol::Grpc);
    let h2 = !upgrade
        && match target.protocol {
            Protocol::Http2 | Protocol::Grpc => true,
            _ => {
                view.policy.h2_upgrade
                    || (view.policy.use_client_protocol && parts.version == http::Version::HTTP_2)
            }
        };
    if let ReqBody::Bytes(bytes) = &body {
        call.request_bytes
            .store(bytes.len() as u64, Ordering::Relaxed);
        if let Some(route) = plan.route {
            mirror(
                ctx,
                &state,
                source,
                route,
                &parts,
                bytes,
                &authority,
                (client_ns, plan.vs_namespace.as_deref().unwrap_or(client_ns)),
                conn.vip.port(),
            );
        }
    }

    let retry = RetryPolicy::of(plan.route.and_then(|r| r.retries.as_ref()));
    let deadline = plan
        .route
        .and_then(|r| r.timeout)
        .filter(|t| !t.0.is_zero())
        .map(|t| routed_at + t.0);
    let hash = hash_key(&view.policy.balancer, &parts, conn.peer);
    let mut tried = HashSet::new();
    let mut body = Some(body);
    let mut last: Option<(Response<RespBody>, ResponseFlag, Option<String>)> = None;
    let mut attempts = 0u32;
    let mut retrying = None::<RetryGuard>;
    // The server span of the attempt in flight, when its endpoint is a pod of this node.
    let mut attempt_span = None::<Pending>;
    let result = loop {
        if attempts > 0 {
            // A retry: within maxRetries, after a jittered back-off.
            if cluster.retries.load(Ordering::Acquire) >= view.policy.max_retries
                && retrying.is_none()
            {
                break last.take().expect("a retry follows an attempt");
            }
            if retrying.is_none() {
                cluster.retries.fetch_add(1, Ordering::AcqRel);
                retrying = Some(RetryGuard(cluster.clone()));
            }
            let ceiling = retry
                .backoff
                .saturating_mul(1 << (attempts - 1).min(4))
                .min(retry.backoff * 10);
            tokio::time::sleep(ceiling.mul_f64(fastrand::f64())).await;
        }
        if let (Some(span), Some((response, ..))) = (attempt_span.take(), &last) {
            call.end_attempt(span, response.status().as_u16());
        }
        attempts += 1;
        let Some(endpoint) = cluster.pick(&view, &tried, hash, None) else {
            break (
                local_response(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream"),
                ResponseFlag::NoHealthyUpstream,
                Some(format!("{} has no ready endpoint", plan.host)),
            );
        };
        tried.insert(endpoint);
        call.log.upstream = Some(endpoint.to_string());
        let destination = state.workloads.get(endpoint.ip());
        call.destination = destination;
        let this_body = match body.take() {
            Some(ReqBody::Bytes(bytes)) => {
                body = Some(ReqBody::Bytes(bytes.clone()));
                Full::new(bytes).map_err(|e| match e {}).boxed()
            }
            Some(ReqBody::Stream(stream)) => Counting::wrap(stream, call.request_bytes.clone()),
            None => break last.take().expect("a streamed body is sent once"),
        };
        let can_retry = attempts <= retry.attempts && body.is_some();
        let now = Instant::now();
        let mut budget = retry.per_try;
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(now);
            budget = Some(budget.map_or(left, |b| b.min(left)));
        }
        let endpoint_state = cluster.endpoint(endpoint);
        let active = Active::start(endpoint_state.clone());
        // The application always gets the protocol its Service port declares; between two
        // node proxies, the DestinationRule may upgrade to HTTP/2.
        let hbone = via_hbone(&state, source, destination);
        let hop_h2 = if hbone { h2 } else { declared_h2 && !upgrade };
        let Some(mut request) = upstream_request(&parts, this_body, hop_h2, &authority) else {
            break (
                local_response(StatusCode::BAD_REQUEST, "invalid request target"),
                ResponseFlag::None,
                Some(format!("cannot forward {} to {authority}", parts.uri)),
            );
        };
        // A pod of this node: its server span too, as its node's inbound side makes it.
        attempt_span = destination
            .filter(|d| d.enrolled && state.is_local(d))
            .zip(ctx.l7.tracer.as_ref())
            .and_then(|(d, tracer)| {
                tracer.begin(d, Kind::Server, request.headers_mut(), endpoint.port())
            });
        let sent = send(
            ctx,
            &state,
            &cluster,
            &view,
            &endpoint_state,
            source,
            destination,
            endpoint,
            request,
            Hop { h2: hop_h2, hbone },
            conn.peer,
        );
        let sent = match budget {
            Some(budget) => tokio::time::timeout(budget, sent)
                .await
                .unwrap_or(Err(Failure::Timeout)),
            None => sent.await,
        };
        let overall_expired = deadline.is_some_and(|d| Instant::now() >= d);
        match sent {
            Ok(Answer::Upstream(response)) => {
                let status = response.status().as_u16();
                cluster.outcome(&view, endpoint, status);
                let grpc = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok());
                if retry.on.status(status, grpc) && can_retry && !overall_expired {
                    drop(active);
                    let (parts, _) = response.into_parts();
                    last = Some((
                        Response::from_parts(parts, full(Bytes::new())),
                        ResponseFlag::RetryLimitExceeded,
                        None,
                    ));
                    continue;
                }
                if let Some(slot) = &mut call.slot {
                    slot.endpoint = Some(active);
                }
                let retried_out = attempts > 1 && retry.on.status(status, grpc);
                let (mut parts, incoming) = response.into_parts();
                if status == 101 {
                    if let Some(client_upgrade) = client_upgrade {
                        let mut response = Response::from_parts(parts, incoming);
                        let server_upgrade = hyper::upgrade::on(&mut response);
                        super::splice_upgrade(client_upgrade, server_upgrade);
                        let (parts, _) = response.into_parts();
                        break (
                            Response::from_parts(parts, full(Bytes::new())),
                            ResponseFlag::None,
                            None,
                        );
                    }
                }
                strip_hop_by_hop(&mut parts.headers, false);
                break (
                    Response::from_parts(parts, super::boxed(incoming)),
                    if retried_out {
                        ResponseFlag::RetryLimitExceeded
                    } else {
                        ResponseFlag::None
                    },
                    None,
                );
            }
            Ok(Answer::Local(response, flag, error)) => break (response, flag, error),
            Err(failure) => {
                drop(active);
                if let Failure::Connect(f) = &failure {
                    if f.flag() == ResponseFlag::UpstreamOverflow {
                        break (local_response(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error or disconnect/reset before headers. reset reason: overflow"), ResponseFlag::UpstreamOverflow, Some(f.to_string()));
                    }
                    if f.flag() == ResponseFlag::Denied {
                        // The destination's policy refused the tunnel: not the endpoint's
                        // fault, and not worth a retry.
                        let response = local_response(StatusCode::FORBIDDEN, "RBAC: access denied");
                        break (response, ResponseFlag::None, Some(f.to_string()));
                    }
                }
                cluster.outcome(&view, endpoint, 0);
                let (status, flag, error, retriable) = match failure {
                    Failure::Timeout => (
                        StatusCode::GATEWAY_TIMEOUT,
                        ResponseFlag::UpstreamTimeout,
                        "upstream request timeout".to_string(),
                        retry.on.timeout(),
                    ),
                    Failure::Connect(f) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        ResponseFlag::UpstreamConnectFailure,
                        f.to_string(),
                        retry.on.connect(),
                    ),
                    Failure::Reset(err, refused) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        ResponseFlag::UpstreamTermination,
                        err,
                        retry.on.reset(refused),
                    ),
                };
                let body = match status {
                    StatusCode::GATEWAY_TIMEOUT => "upstream request timeout".to_string(),
                    _ => format!("upstream connect error or disconnect/reset before headers. reset reason: {error}"),
                };
                let response = local_response(status, body);
                if retriable && can_retry && !overall_expired {
                    last = Some((
                        response,
                        if flag == ResponseFlag::UpstreamTimeout {
                            ResponseFlag::UpstreamTimeout
                        } else {
                            ResponseFlag::RetryLimitExceeded
                        },
                        Some(error),
                    ));
                    continue;
                }
                if overall_expired {
                    break (
                        local_response(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
                        ResponseFlag::UpstreamTimeout,
                        Some("route timeout".into()),
                    );
                }
                let flag = if attempts > 1 && retriable {
                    ResponseFlag::RetryLimitExceeded
                } else {
                    flag
                };
                break (response, flag, Some(error));
            }
        }
    };
    drop(retrying);
    call.spans.extend(attempt_span);
    call.log.attempts = attempts;
    let (mut response, flag, error) = result;
    apply_header_ops(
        response.headers_mut(),
        route_headers.and_then(|h| h.response.as_ref()),
    );
    apply_header_ops(
        response.headers_mut(),
        dest_headers.and_then(|h| h.response.as_ref()),
    );
    if let cluster::Balancer::Hash(cluster::HashOn::Cookie(cookie)) = &view.policy.balancer {
        set_hash_cookie(&mut response, cookie, &parts);
    }
    call.answer(response, flag, error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_conditions_follow_istio() {
        let default = RetryPolicy::of(None);
        assert_eq!(default.attempts, 2);
        assert!(default.on.status(503, None));
        assert!(!default.on.status(500, None));
        assert!(default.on.connect());
        assert!(!default.on.reset(false));
        assert!(default.on.reset(true));
        assert!(default.on.status(200, Some(14)), "gRPC unavailable");
        let on = RetryOn::parse("gateway-error,retriable-4xx,429");
        assert!(on.status(502, None) && on.status(409, None) && on.status(429, None));
        assert!(!on.status(503 + 97, None));
        assert!(!on.status(503, None) || on.gateway);
        let five = RetryOn::parse("5xx");
        assert!(five.status(500, None) && five.timeout() && five.connect());
    }

    #[test]
    fn grpc_names() {
        assert_eq!(grpc_code("UNAVAILABLE"), 14);
        assert_eq!(grpc_code("7"), 7);
    }
}
