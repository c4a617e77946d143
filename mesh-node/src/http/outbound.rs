//! The client side of L7: a local enrolled pod's connection to an HTTP port of a Service.
//! Each request is routed by the VirtualService for the Service's host (or straight to the
//! Service without one), sent to an endpoint of the chosen destination under its
//! DestinationRule, retried and timed as the route says, and reported with
//! `reporter="source"` (and `reporter="destination"` when the endpoint is an enrolled pod of
//! this node, whose AuthorizationPolicy is then applied here).

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
};

/// Request bodies up to this size are buffered, so the request can be retried and mirrored;
/// larger or open-ended ones stream through with a single attempt.
const REPLAY_LIMIT: u64 = 64 * 1024;
/// Time a client has to send a body that is buffered for retries and mirrors.
const BODY_TIMEOUT: Duration = super::server::HEAD_TIMEOUT;
/// Mirrored requests in flight at once on this node; a mirror beyond it is skipped (and
/// counted in `mesh_mirror_skipped_total`): a copy must never cost the real traffic.
const MAX_MIRRORS: usize = 256;
static MIRRORS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_MIRRORS);
/// A mirrored request, its answer included, is given up after this.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);
/// Envoy's default retry back-off base interval.
const BACKOFF_BASE: Duration = Duration::from_millis(25);

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
    let served = server::serve(&ctx.l7.outbound, peer.ip(), client, handle).await;
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

/// Where a request goes.
struct Plan<'s> {
    route: Option<&'s HttpRoute>,
    /// The `uri.prefix` of the match entry that applied (prefix rewrites replace it).
    matched_prefix: Option<String>,
    /// The VirtualService's namespace (short hosts in it resolve there).
    vs_namespace: Option<String>,
    route_name: Option<String>,
    destination: Option<&'s HttpRouteDestination>,
    host: String,
    subset: Option<String>,
    port: Option<u16>,
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
}

impl Call<'_> {
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
    super::normalize_uri(req.uri_mut());
    let upgrade = super::is_upgrade(req.headers()) && req.version() != http::Version::HTTP_2;
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
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
    };
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
        if let Some(redirect) = &route.redirect {
            let response = redirect_response(redirect, &parts, &authority, conn.vip.port());
            return call.answer(response, ResponseFlag::None, None);
        }
        if let Some(direct) = &route.direct_response {
            let status = StatusCode::from_u16(direct.status as u16).unwrap_or(StatusCode::OK);
            let body = direct.body.clone().unwrap_or_default();
            let mut response = local_response(status, body);
            apply_header_ops(
                response.headers_mut(),
                route.headers.as_ref().and_then(|h| h.response.as_ref()),
            );
            return call.answer(response, ResponseFlag::None, None);
        }
        if let Some(fault) = &route.fault {
            if let Some(delay) = &fault.delay {
                if hit(delay.percentage.as_ref().map(|p| p.0)) {
                    tokio::time::sleep(delay.fixed_delay.0).await;
                    // The route timeout starts after the injected delay, as Envoy's router
                    // runs after its fault filter.
                    routed_at = Instant::now();
                    call.log.response_flags = ResponseFlag::DelayInjected;
                }
            }
            if let Some(abort) = &fault.abort {
                if hit(abort.percentage.as_ref().map(|p| p.0)) {
                    let response = abort_response(abort, &parts);
                    return call.answer(
                        response,
                        ResponseFlag::FaultInjected,
                        Some("fault injected".into()),
                    );
                }
            }
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
    if !parts.headers.contains_key("x-request-id") {
        let id = format!("{:032x}", fastrand::u128(..));
        if let Ok(value) = HeaderValue::from_str(&id) {
            parts.headers.insert("x-request-id", value);
        }
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
        let hop_h2 = if via_hbone(&state, source, destination) {
            h2
        } else {
            declared_h2 && !upgrade
        };
        let Some(request) = upstream_request(&parts, this_body, hop_h2, &authority) else {
            break (
                local_response(StatusCode::BAD_REQUEST, "invalid request target"),
                ResponseFlag::None,
                Some(format!("cannot forward {} to {authority}", parts.uri)),
            );
        };
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
            hop_h2,
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
                    if f.flag == ResponseFlag::UpstreamOverflow {
                        break (local_response(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error or disconnect/reset before headers. reset reason: overflow"), ResponseFlag::UpstreamOverflow, Some(f.error.clone()));
                    }
                    if f.flag == ResponseFlag::Denied {
                        // The destination's policy refused the tunnel: not the endpoint's
                        // fault, and not worth a retry.
                        let response = local_response(StatusCode::FORBIDDEN, "RBAC: access denied");
                        break (response, ResponseFlag::None, Some(f.error.clone()));
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
                        f.error,
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

/// The key of a destination's runtime state for a client.
fn cluster_key(
    state: &State,
    client_ns: &str,
    source: Option<&Workload>,
    host: &str,
    subset: Option<String>,
    target: &ServiceTarget,
) -> ClusterKey {
    let selective = state
        .destination_rules
        .get(host)
        .is_some_and(|rules| rules.iter().any(|r| r.0.spec.workload_selector.is_some()));
    let selector = match source.filter(|_| selective) {
        Some(s) => cluster::hash_key(format!("{:?}", s.labels).as_bytes()),
        None => 0,
    };
    ClusterKey {
        client_ns: client_ns.to_string(),
        host: host.to_string(),
        subset,
        port: target.vip.port(),
        selector,
    }
}

/// Whether a request from `source` to `destination` travels in an HBONE tunnel.
pub(crate) fn via_hbone(
    state: &State,
    source: Option<&Workload>,
    destination: Option<&Workload>,
) -> bool {
    source.is_some_and(|s| s.enrolled)
        && destination.is_some_and(|d| d.enrolled && !state.is_local(d))
}

/// The runtime state of a destination and its view under the current snapshot.
fn cluster_view(
    ctx: &ProxyContext,
    state: &State,
    key: ClusterKey,
    target: &ServiceTarget,
    source: Option<&Workload>,
) -> (Arc<cluster::Cluster>, Arc<View>) {
    let cluster = ctx.l7.clusters.get(&key);
    let no_labels = Default::default();
    let labels = source.map_or(&no_labels, |s| &s.labels);
    let view = cluster.view(state.generation, || {
        let effective = cluster::effective(
            state,
            &key.host,
            key.subset.as_deref(),
            key.port,
            &key.client_ns,
            labels,
        );
        match effective {
            Ok((policy, subset)) => View {
                generation: state.generation,
                policy,
                endpoints: cluster::subset_endpoints(state, target, subset.as_ref()),
                error: None,
            },
            Err(cluster::Unroutable::NoSubset(name)) => View {
                generation: state.generation,
                policy: Default::default(),
                endpoints: Vec::new(),
                error: Some(format!(
                    "no DestinationRule defines subset {name} of {}",
                    key.host
                )),
            },
        }
    });
    (cluster, view)
}

/// The VirtualService `tcp` routes, for the plan of an outbound connection.
pub struct Routes<'c>(pub &'c ProxyContext);

impl<'s> TcpRoutes<'s> for Routes<'_> {
    fn route(
        &self,
        state: &'s State,
        source: Option<&'s Workload>,
        service: &'s ServiceTarget,
    ) -> Option<Result<(&'s ServiceTarget, SocketAddrV4), Refusal>> {
        tcp_route(self.0, state, source, service)
    }
}

/// A TCP connection to a Service port with a VirtualService `tcp` route: the weighted
/// destination's endpoint under its DestinationRule. `None` when no tcp route applies.
fn tcp_route<'s>(
    ctx: &ProxyContext,
    state: &'s State,
    source: Option<&Workload>,
    service: &'s ServiceTarget,
) -> Option<Result<(&'s ServiceTarget, SocketAddrV4), Refusal>> {
    let client_ns = source.map_or("default", |s| s.namespace.as_str());
    let vs = route::virtual_service(state, &service.host, client_ns)?;
    let matched = route::tcp_route(&vs.0.spec, service.vip.port(), source)?;
    let Some(destination) = route::pick_tcp(matched) else {
        return Some(Err(Refusal::new(
            ResponseFlag::NoRoute,
            "tcp route without destinations",
        )));
    };
    let host = crate::config::semantics::fqdn(&destination.destination.host, vs.0.namespace());
    let port = destination.destination.port.map(|p| p as u16);
    let Some(target) = destination_service(state, &host, port, service, service.vip.port()) else {
        return Some(Err(Refusal::new(
            ResponseFlag::NoCluster,
            format!("{host} has no such port"),
        )));
    };
    let subset = destination.destination.subset.clone();
    let key = cluster_key(state, client_ns, source, &host, subset, target);
    let (cluster, view) = cluster_view(ctx, state, key, target, source);
    if let Some(error) = &view.error {
        return Some(Err(Refusal::new(ResponseFlag::NoCluster, error.clone())));
    }
    let hash = hash_key_l4(&view.policy.balancer, source);
    Some(match cluster.pick(&view, &HashSet::new(), hash, None) {
        Some(endpoint) => Ok((target, endpoint)),
        None => Err(Refusal::new(
            ResponseFlag::NoHealthyUpstream,
            "no healthy upstream",
        )),
    })
}

fn hash_key_l4(balancer: &cluster::Balancer, source: Option<&Workload>) -> Option<u64> {
    match balancer {
        cluster::Balancer::Hash(cluster::HashOn::SourceIp) => {
            source.map(|s| cluster::hash_ip(s.ip))
        }
        _ => None,
    }
}

/// Decrements the destination's retries in flight.
struct RetryGuard(Arc<cluster::Cluster>);

impl Drop for RetryGuard {
    fn drop(&mut self) {
        self.0.retries.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The route for a request: `Err` when a VirtualService applies and no route matches (NR).
fn plan<'s>(
    state: &'s State,
    service: &'s ServiceTarget,
    source: Option<&'s Workload>,
    parts: &Parts,
    authority: &str,
    client_ns: &str,
) -> Result<Plan<'s>, ()> {
    let default = Plan {
        route: None,
        matched_prefix: None,
        vs_namespace: None,
        route_name: None,
        destination: None,
        host: service.host.clone(),
        subset: None,
        port: Some(service.vip.port()),
    };
    let Some(vs) = route::virtual_service(state, &service.host, client_ns) else {
        return Ok(default);
    };
    let view = route::RequestView {
        method: parts.method.as_str(),
        scheme: "http",
        authority,
        path_and_query: parts.uri.path_and_query().map_or("/", |p| p.as_str()),
        headers: &parts.headers,
        port: service.vip.port(),
        source,
    };
    let (index, matched) = route::http_route(&vs.0.spec, &view).ok_or(())?;
    let name = matched
        .name
        .clone()
        .unwrap_or_else(|| format!("{}#{index}", vs.0.metadata.qualified()));
    let matched_prefix = matched
        .matches
        .iter()
        .find(|m| route::matches(m, &view))
        .and_then(|m| match &m.uri {
            Some(crate::config::values::StringMatch::Prefix(p)) => Some(p.clone()),
            _ => None,
        });
    let mut plan = Plan {
        route: Some(matched),
        route_name: Some(name),
        matched_prefix,
        vs_namespace: Some(vs.0.namespace().to_string()),
        ..default
    };
    if matched.redirect.is_some() || matched.direct_response.is_some() {
        return Ok(plan);
    }
    let Some(destination) = route::pick_http(matched) else {
        return Err(());
    };
    plan.destination = Some(destination);
    plan.host = crate::config::semantics::fqdn(&destination.destination.host, vs.0.namespace());
    plan.subset = destination.destination.subset.clone();
    plan.port = destination.destination.port.map(|p| p as u16);
    Ok(plan)
}

/// The Service port a route destination names: its `port`, else the port the client
/// dialled when the Service has it, else the Service's only port.
fn destination_service<'s>(
    state: &'s State,
    host: &str,
    port: Option<u16>,
    dialled: &'s ServiceTarget,
    dialled_port: u16,
) -> Option<&'s ServiceTarget> {
    if host == dialled.host && port.is_none_or(|p| p == dialled_port) {
        return Some(dialled);
    }
    let vips = state.services_by_host.get(host)?;
    let vip = match port {
        Some(port) => vips.iter().find(|v| v.port() == port)?,
        None => vips
            .iter()
            .find(|v| v.port() == dialled_port)
            .or_else(|| (vips.len() == 1).then(|| &vips[0]))?,
    };
    state.services.get(vip)
}

fn report(
    reporter: &'static str,
    source: Option<&Workload>,
    destination: Option<&Workload>,
    service: Option<&ServiceTarget>,
    mtls: bool,
) -> Report {
    Report {
        reporter,
        source: source.map_or_else(Peer::unknown, |s| Peer::of(s, s.enrolled)),
        destination: destination.map_or_else(Peer::unknown, |d| Peer::of(d, mtls)),
        service: None,
        mtls,
    }
    .service(service)
}

/// The reports of a request sent to `destination`: the source's; the destination's too when
/// it is an enrolled pod of this node.
fn reports_for(
    state: &State,
    source: Option<&Workload>,
    destination: Option<&Workload>,
    target: &ServiceTarget,
) -> Vec<Report> {
    let enrolled = |w: Option<&Workload>| w.is_some_and(|w| w.enrolled);
    let mtls = enrolled(source) && enrolled(destination);
    let mut reports = vec![report("source", source, destination, Some(target), mtls)];
    if destination.is_some_and(|d| d.enrolled && state.is_local(d)) {
        reports.push(report(
            "destination",
            source,
            destination,
            Some(target),
            mtls,
        ));
    }
    reports
}

enum ReqBody {
    Bytes(Bytes),
    Stream(http_body_util::combinators::BoxBody<Bytes, BoxError>),
}

/// Buffers a request body that is empty or declared small; streams the rest.
async fn replayable(body: Incoming, parts: &Parts) -> Result<ReqBody, hyper::Error> {
    use http_body::Body;
    if body.is_end_stream() {
        return Ok(ReqBody::Bytes(Bytes::new()));
    }
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n <= REPLAY_LIMIT => Ok(ReqBody::Bytes(body.collect().await?.to_bytes())),
        _ => Ok(ReqBody::Stream(super::boxed(body))),
    }
}

enum Answer {
    Upstream(Response<Incoming>),
    Local(Response<RespBody>, ResponseFlag, Option<String>),
}

enum Failure {
    Connect(upstream::ConnectFailure),
    /// Error text, and whether it was a refused stream.
    Reset(String, bool),
    Timeout,
}

/// One attempt: the destination's policy when it is a local enrolled pod, a connection,
/// the request.
#[allow(clippy::too_many_arguments)]
async fn send(
    ctx: &ProxyContext,
    state: &State,
    cluster: &Arc<cluster::Cluster>,
    view: &View,
    endpoint_state: &cluster::EndpointState,
    source: Option<&Workload>,
    destination: Option<&Workload>,
    endpoint: SocketAddrV4,
    mut request: Request<upstream::Body>,
    h2: bool,
    peer: SocketAddr,
) -> Result<Answer, Failure> {
    let to = match destination.filter(|d| d.enrolled && state.is_local(d)) {
        Some(d) => {
            // A pod of this node: its policy is decided here, as its inbound side would.
            let identity = source.filter(|s| s.enrolled).map(|s| s.identity.as_str());
            let host = super::authority_of(request.uri(), request.headers());
            let admitted = gate::request(
                d,
                gate::Client {
                    addr: peer,
                    identity,
                },
                SocketAddr::V4(endpoint),
                HttpAttrs {
                    method: request.method().as_str(),
                    path: request.uri().path(),
                    host,
                    headers: request.headers(),
                },
            );
            match admitted {
                Ok(admitted) => {
                    super::inbound::set_client_cert(request.headers_mut(), &d.identity, identity);
                    admitted
                }
                Err(decision) => {
                    let response = local_response(StatusCode::FORBIDDEN, "RBAC: access denied");
                    let why = format!(
                        "{} ({})",
                        decision.reason,
                        decision.policy.as_deref().unwrap_or("-")
                    );
                    return Ok(Answer::Local(response, ResponseFlag::None, Some(why)));
                }
            }
        }
        None => gate::elsewhere(state, SocketAddr::V4(endpoint)).map_err(|error| {
            Failure::Connect(upstream::ConnectFailure {
                flag: ResponseFlag::NoRoute,
                error,
            })
        })?,
    };
    let target = Target {
        source,
        destination,
        to: &to,
        hbone: via_hbone(state, source, destination),
        h2,
    };
    let lease = upstream::lease(ctx, cluster, view, endpoint_state, &target)
        .await
        .map_err(Failure::Connect)?;
    let upgrade = request.headers().contains_key(header::UPGRADE);
    match lease.sender.send(request).await {
        Ok(response) => {
            let close = response
                .headers()
                .get(header::CONNECTION)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.eq_ignore_ascii_case("close"));
            lease.release(
                endpoint_state,
                view.policy.max_requests_per_connection,
                !close && !upgrade,
            );
            Ok(Answer::Upstream(response))
        }
        Err(err) => {
            let refused = refused_stream(&err);
            Err(Failure::Reset(err.to_string(), refused))
        }
    }
}

fn refused_stream(err: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(err);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = e.source();
    }
    false
}

/// Istio's retry policy of a route: its `retries`, or the default (2 retries on
/// connect-failure, refused-stream, unavailable, cancelled and 503).
struct RetryPolicy {
    attempts: u32,
    per_try: Option<Duration>,
    backoff: Duration,
    on: RetryOn,
}

#[derive(Default)]
struct RetryOn {
    five_xx: bool,
    gateway: bool,
    connect: bool,
    reset: bool,
    refused_stream: bool,
    retriable_4xx: bool,
    status_codes: bool,
    codes: Vec<u16>,
    grpc: Vec<u32>,
}

impl RetryOn {
    fn parse(text: &str) -> RetryOn {
        let mut on = RetryOn {
            codes: vec![503],
            ..RetryOn::default()
        };
        let mut numbers = Vec::new();
        for item in text.split(',').map(str::trim) {
            match item {
                "5xx" => on.five_xx = true,
                "gateway-error" => on.gateway = true,
                "connect-failure" => on.connect = true,
                "reset" | "reset-before-request" => on.reset = true,
                "refused-stream" => on.refused_stream = true,
                "retriable-4xx" => on.retriable_4xx = true,
                "retriable-status-codes" => on.status_codes = true,
                "cancelled" => on.grpc.push(1),
                "deadline-exceeded" => on.grpc.push(4),
                "resource-exhausted" => on.grpc.push(8),
                "internal" => on.grpc.push(13),
                "unavailable" => on.grpc.push(14),
                other => {
                    if let Ok(code) = other.parse::<u16>() {
                        numbers.push(code);
                    }
                }
            }
        }
        if !numbers.is_empty() {
            on.status_codes = true;
            on.codes = numbers;
        }
        on
    }

    fn status(&self, status: u16, grpc: Option<u32>) -> bool {
        (self.five_xx && status >= 500)
            || (self.gateway && matches!(status, 502..=504))
            || (self.retriable_4xx && status == 409)
            || (self.status_codes && self.codes.contains(&status))
            || grpc.is_some_and(|g| self.grpc.contains(&g))
    }

    fn connect(&self) -> bool {
        self.connect || self.five_xx || self.gateway || self.reset
    }

    fn reset(&self, refused: bool) -> bool {
        self.reset || self.five_xx || self.gateway || (refused && self.refused_stream)
    }

    fn timeout(&self) -> bool {
        self.five_xx || self.gateway || self.reset
    }
}

const DEFAULT_RETRY_ON: &str =
    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";

impl RetryPolicy {
    fn of(retries: Option<&HttpRetry>) -> RetryPolicy {
        let Some(r) = retries else {
            return RetryPolicy {
                attempts: 2,
                per_try: None,
                backoff: BACKOFF_BASE,
                on: RetryOn::parse(DEFAULT_RETRY_ON),
            };
        };
        RetryPolicy {
            attempts: r.attempts.max(0) as u32,
            per_try: r.per_try_timeout.map(|d| d.0).filter(|d| !d.is_zero()),
            backoff: r.backoff.map_or(BACKOFF_BASE, |d| d.0),
            on: RetryOn::parse(r.retry_on.as_deref().unwrap_or(DEFAULT_RETRY_ON)),
        }
    }
}

/// Whether a fault or mirror with `percentage` applies to this request.
fn hit(percentage: Option<f64>) -> bool {
    let p = percentage.unwrap_or(0.0);
    p >= 100.0 || fastrand::f64() * 100.0 < p
}

fn abort_response(
    abort: &crate::config::networking::FaultAbort,
    parts: &Parts,
) -> Response<RespBody> {
    if let Some(grpc) = &abort.grpc_status {
        let code = grpc_code(grpc);
        let mut response = local_response(StatusCode::OK, "");
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from(code));
        headers.insert(
            "grpc-message",
            HeaderValue::from_static("fault filter abort"),
        );
        let _ = parts;
        return response;
    }
    let status = abort
        .http_status
        .and_then(|s| StatusCode::from_u16(s as u16).ok())
        .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    local_response(status, "fault filter abort")
}

/// gRPC status numbers by name (Istio takes names such as `UNAVAILABLE`).
fn grpc_code(name: &str) -> u32 {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    name.parse()
        .ok()
        .or_else(|| {
            NAMES
                .iter()
                .position(|n| n.eq_ignore_ascii_case(name))
                .map(|i| i as u32)
        })
        .unwrap_or(2)
}

fn redirect_response(
    redirect: &crate::config::networking::HttpRedirect,
    parts: &Parts,
    authority: &str,
    port: u16,
) -> Response<RespBody> {
    let scheme = redirect.scheme.clone().unwrap_or_else(|| "http".into());
    let (host, request_port) = match authority.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => (h.to_string(), p.parse().ok()),
        _ => (authority.to_string(), None),
    };
    // `authority` replaces host and port, as Envoy's host_redirect does.
    let request_port = if redirect.authority.is_some() {
        None
    } else {
        request_port
    };
    let host = redirect.authority.clone().unwrap_or(host);
    let port = match (&redirect.port, &redirect.derive_port) {
        (Some(p), _) => Some(*p as u16),
        (None, Some(crate::config::networking::DerivePort::FromRequestPort)) => {
            request_port.or(Some(port))
        }
        (None, Some(_)) => None,
        (None, None) => request_port,
    };
    let path = match &redirect.uri {
        Some(uri) => {
            let query = parts
                .uri
                .query()
                .map(|q| format!("?{q}"))
                .unwrap_or_default();
            format!("{uri}{query}")
        }
        None => parts
            .uri
            .path_and_query()
            .map_or("/".into(), |p| p.as_str().to_string()),
    };
    let location = match port {
        Some(p) if !(scheme == "http" && p == 80 || scheme == "https" && p == 443) => {
            format!("{scheme}://{host}:{p}{path}")
        }
        _ => format!("{scheme}://{host}{path}"),
    };
    let code = StatusCode::from_u16(redirect.redirect_code as u16)
        .unwrap_or(StatusCode::MOVED_PERMANENTLY);
    let mut response = local_response(code, "");
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// `rewrite`: the matched prefix (or the whole path) and the authority.
fn rewrite_request(
    rewrite: &crate::config::networking::HttpRewrite,
    matched_prefix: Option<&str>,
    parts: &mut Parts,
    authority: &mut String,
) {
    let path = parts.uri.path().to_string();
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let mut new_path = None;
    if let Some(uri) = &rewrite.uri {
        // The prefix matched (perhaps ignoring case): the path's first bytes are it.
        let rest = matched_prefix.and_then(|p| path.get(p.len()..));
        new_path = Some(match rest {
            Some(rest) => {
                // `/api` -> `/`: do not produce `//x`.
                if uri.ends_with('/') && rest.starts_with('/') {
                    format!("{uri}{}", &rest[1..])
                } else {
                    format!("{uri}{rest}")
                }
            }
            None => uri.clone(),
        });
    } else if let Some(regex) = &rewrite.uri_regex_rewrite {
        if let Some(re) = &regex.compiled {
            let replacement = re2_replacement(&regex.rewrite);
            new_path = Some(re.replace_all(&path, replacement.as_str()).into_owned());
        }
    }
    if let Some(new_path) = new_path {
        if let Ok(uri) = format!("{new_path}{query}").parse::<Uri>() {
            parts.uri = uri;
        }
    }
    if let Some(new_authority) = &rewrite.authority {
        *authority = new_authority.clone();
    }
}

/// An RE2 rewrite (`\\1` for a group) in the regex crate's syntax (`${1}`; `$` literal as
/// `$$`).
fn re2_replacement(rewrite: &str) -> String {
    let mut out = String::with_capacity(rewrite.len());
    let mut chars = rewrite.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '$' => out.push_str("$$"),
            '\\' => match chars.peek().copied() {
                Some(d) if d.is_ascii_digit() => {
                    chars.next();
                    out.push_str(&format!("${{{d}}}"));
                }
                Some(other) => {
                    chars.next();
                    out.push(other);
                }
                None => out.push('\\'),
            },
            c => out.push(c),
        }
    }
    out
}

/// Sends copies of the request to the route's mirrors (as Envoy does: `-shadow` appended to
/// the host, the answer ignored).
#[allow(clippy::too_many_arguments)]
fn mirror(
    ctx: &Arc<ProxyContext>,
    state: &Arc<State>,
    source: Option<&Workload>,
    route: &HttpRoute,
    parts: &Parts,
    body: &Bytes,
    authority: &str,
    (client_ns, vs_ns): (&str, &str),
    dialled_port: u16,
) {
    let mut targets: Vec<(&crate::config::networking::Destination, Option<f64>)> = Vec::new();
    if let Some(m) = &route.mirror {
        targets.push((m, route.mirror_percentage.as_ref().map(|p| p.0)));
    }
    for m in &route.mirrors {
        targets.push((&m.destination, m.percentage.as_ref().map(|p| p.0)));
    }
    for (destination, percentage) in targets {
        // A mirror without a percentage mirrors everything.
        if !hit(percentage.or(Some(100.0))) {
            continue;
        }
        let host = crate::config::semantics::fqdn(&destination.host, vs_ns);
        let Some(target) = state
            .services_by_host
            .get(&host)
            .and_then(|vips| {
                let port = destination.port.map(|p| p as u16);
                vips.iter()
                    .find(|v| {
                        port.is_none_or(|p| v.port() == p)
                            && (port.is_some() || v.port() == dialled_port)
                    })
                    .or_else(|| vips.first())
            })
            .and_then(|vip| state.services.get(vip))
        else {
            continue;
        };
        let shadow = match authority.rsplit_once(':') {
            Some((h, p)) => format!("{h}-shadow:{p}"),
            None => format!("{authority}-shadow"),
        };
        let key = cluster_key(
            state,
            client_ns,
            source,
            &host,
            destination.subset.clone(),
            target,
        );
        let (cluster, view) = cluster_view(ctx, state, key, target, source);
        let Some(endpoint) = cluster.pick(&view, &HashSet::new(), None, None) else {
            continue;
        };
        let Ok(permit) = MIRRORS.try_acquire() else {
            ctx.l7.mirrors_skipped.inc();
            continue;
        };
        let h2 = matches!(target.protocol, Protocol::Http2 | Protocol::Grpc);
        let Some(request) = upstream_request(
            parts,
            Full::new(body.clone()).map_err(|e| match e {}).boxed(),
            h2,
            &shadow,
        ) else {
            continue;
        };
        let (ctx, state) = (ctx.clone(), state.clone());
        let source_ip = source.map(|s| s.ip);
        tokio::spawn(async move {
            let _permit = permit;
            let source = source_ip.and_then(|ip| state.workloads.get(&ip));
            let destination = state.workloads.get(endpoint.ip());
            let endpoint_state = cluster.endpoint(endpoint);
            let peer = SocketAddr::from((source_ip.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED), 0));
            let sent = send(
                &ctx,
                &state,
                &cluster,
                &view,
                &endpoint_state,
                source,
                destination,
                endpoint,
                request,
                h2,
                peer,
            );
            let answered = async {
                if let Ok(Answer::Upstream(response)) = sent.await {
                    let _ = response.into_body().collect().await;
                }
            };
            let _ = tokio::time::timeout(MIRROR_TIMEOUT, answered).await;
        });
    }
}

/// The consistent-hash key of a request, when the balancer hashes.
fn hash_key(balancer: &cluster::Balancer, parts: &Parts, peer: SocketAddr) -> Option<u64> {
    let cluster::Balancer::Hash(on) = balancer else {
        return None;
    };
    match on {
        cluster::HashOn::Header(name) => parts
            .headers
            .get(name.as_str())
            .map(|v| cluster::hash_key(v.as_bytes())),
        cluster::HashOn::Cookie(cookie) => {
            cookie_value(parts, &cookie.name).map(|v| cluster::hash_key(v.as_bytes()))
        }
        cluster::HashOn::SourceIp => ipv4(peer).map(cluster::hash_ip),
        cluster::HashOn::Query(name) => parts.uri.query().and_then(|q| {
            q.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (k == name).then(|| cluster::hash_key(v.as_bytes()))
            })
        }),
    }
}

fn cookie_value(parts: &Parts, name: &str) -> Option<String> {
    parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then(|| v.to_string())
        })
}

/// A hashing cookie with a TTL that the client did not send is generated, as Envoy does, so
/// its next requests stick to the same endpoint.
fn set_hash_cookie(
    response: &mut Response<RespBody>,
    cookie: &crate::config::networking::HttpCookie,
    parts: &Parts,
) {
    let Some(ttl) = cookie.ttl else { return };
    if cookie_value(parts, &cookie.name).is_some() {
        return;
    }
    let path = cookie
        .path
        .as_deref()
        .map(|p| format!("; Path={p}"))
        .unwrap_or_default();
    let value = format!(
        "{}=\"{:016x}\"; Max-Age={}{path}; HttpOnly",
        cookie.name,
        fastrand::u64(..),
        ttl.as_secs()
    );
    if let Ok(value) = HeaderValue::from_str(&value) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
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
