//! One attempt and the retries: the request body kept for replay, the destination's policy
//! when it is a pod of this node, the connection lease, and Istio's retry conditions.

use super::*;

/// Request bodies up to this size are buffered, so the request can be retried and mirrored;
/// larger or open-ended ones stream through with a single attempt.
pub(super) const REPLAY_LIMIT: u64 = 64 * 1024;

/// Time a client has to send a body that is buffered for retries and mirrors.
pub(super) const BODY_TIMEOUT: Duration = crate::http::server::HEAD_TIMEOUT;

/// Envoy's default retry back-off base interval.
pub(super) const BACKOFF_BASE: Duration = Duration::from_millis(25);

/// Decrements the destination's retries in flight.
pub(super) struct RetryGuard(pub(super) Arc<cluster::Cluster>);

impl Drop for RetryGuard {
    fn drop(&mut self) {
        self.0.retries.fetch_sub(1, Ordering::AcqRel);
    }
}

pub(super) enum ReqBody {
    Bytes(Bytes),
    Stream(http_body_util::combinators::BoxBody<Bytes, BoxError>),
}

/// Buffers a request body that is empty or declared small; streams the rest.
pub(super) async fn replayable(body: Incoming, parts: &Parts) -> Result<ReqBody, hyper::Error> {
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
        _ => Ok(ReqBody::Stream(crate::http::boxed(body))),
    }
}

pub(super) enum Answer {
    Upstream(Response<Incoming>),
    Local(Response<RespBody>, ResponseFlag, Option<String>),
}

pub(super) enum Failure {
    Connect(crate::transport::Error),
    /// Error text, and whether it was a refused stream.
    Reset(String, bool),
    Timeout,
}

/// How the request travels to its endpoint.
#[derive(Clone, Copy)]
pub(super) struct Hop {
    /// In HTTP/2.
    pub(super) h2: bool,
    /// Through an HBONE tunnel.
    pub(super) hbone: bool,
}

/// One attempt: the destination's policy when it is a local enrolled pod, a connection,
/// the request.
#[allow(clippy::too_many_arguments)]
pub(super) async fn send(
    ctx: &ProxyContext,
    state: &State,
    cluster: &Arc<cluster::Cluster>,
    view: &View,
    endpoint_state: &cluster::EndpointState,
    source: Option<&Workload>,
    destination: Option<&Workload>,
    endpoint: SocketAddrV4,
    mut request: Request<upstream::Body>,
    hop: Hop,
    peer: SocketAddr,
) -> Result<Answer, Failure> {
    let to = match destination.filter(|d| d.enrolled && state.is_local(d)) {
        Some(d) => {
            // A pod of this node: its requests are decided here, as its inbound side would.
            let identity = source.filter(|s| s.enrolled).map(|s| s.identity.as_str());
            let host = crate::http::authority_of(request.uri(), request.headers());
            let admitted = gate::http_request(
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
                state.mesh.paths,
            );
            match admitted {
                Ok(admitted) => {
                    crate::http::inbound::set_client_cert(
                        request.headers_mut(),
                        &d.identity,
                        identity,
                    );
                    admitted
                }
                Err(gate::Refused::Path(reason)) => {
                    return Ok(Answer::Local(
                        crate::http::bad_path(),
                        ResponseFlag::DownstreamProtocolError,
                        Some(reason),
                    ));
                }
                Err(gate::Refused::Policy(decision)) => {
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
        None => gate::elsewhere(state, SocketAddr::V4(endpoint))
            .map_err(|reason| Failure::Connect(crate::transport::Error::NoRoute { reason }))?,
    };
    let target = Target {
        source,
        destination,
        to: &to,
        hbone: hop.hbone,
        h2: hop.h2,
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

pub(super) fn refused_stream(err: &hyper::Error) -> bool {
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
pub(super) struct RetryPolicy {
    pub(super) attempts: u32,
    pub(super) per_try: Option<Duration>,
    pub(super) backoff: Duration,
    pub(super) on: RetryOn,
}

#[derive(Default)]
pub(super) struct RetryOn {
    pub(super) five_xx: bool,
    pub(super) gateway: bool,
    pub(super) connect: bool,
    pub(super) reset: bool,
    pub(super) refused_stream: bool,
    pub(super) retriable_4xx: bool,
    pub(super) status_codes: bool,
    pub(super) codes: Vec<u16>,
    pub(super) grpc: Vec<u32>,
}

impl RetryOn {
    pub(super) fn parse(text: &str) -> RetryOn {
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

    pub(super) fn status(&self, status: u16, grpc: Option<u32>) -> bool {
        (self.five_xx && status >= 500)
            || (self.gateway && matches!(status, 502..=504))
            || (self.retriable_4xx && status == 409)
            || (self.status_codes && self.codes.contains(&status))
            || grpc.is_some_and(|g| self.grpc.contains(&g))
    }

    pub(super) fn connect(&self) -> bool {
        self.connect || self.five_xx || self.gateway || self.reset
    }

    pub(super) fn reset(&self, refused: bool) -> bool {
        self.reset || self.five_xx || self.gateway || (refused && self.refused_stream)
    }

    pub(super) fn timeout(&self) -> bool {
        self.five_xx || self.gateway || self.reset
    }
}

pub(super) const DEFAULT_RETRY_ON: &str =
    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";

impl RetryPolicy {
    pub(super) fn of(retries: Option<&HttpRetry>) -> RetryPolicy {
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
