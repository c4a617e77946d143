//! The destination side of L7: HTTP to an HTTP port of an enrolled pod of this node, inside an
//! HBONE tunnel (the client authenticated by mTLS) or in plaintext (PERMISSIVE). Every
//! request is authorized with its method, path, host and headers (Istio's HTTP
//! AuthorizationPolicy: 403 `RBAC: access denied`), reported with
//! `reporter="destination"`, and passed to the pod over one connection per client
//! connection, in the protocol the request came in.

use crate::response_flag::ResponseFlag;
use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{atomic::AtomicU64, Arc},
    time::Instant,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::Mutex,
};

use super::ProxyContext;
use super::{
    full, local_response, protocol_of,
    server::{self, Served},
    strip_hop_by_hop,
    upstream::{handshake, Sender},
    version_name, Counting, Finish, Observed, RequestLog, RespBody,
};
use crate::{
    connections::now_ms,
    gate::{self, Authorized, HttpAttrs},
    plan::ipv4,
    state::Workload,
    telemetry::{Peer, Report},
    trace::export::Kind,
    transport,
};

/// Deadline for the HTTP handshake with the pod (the TCP connect has its own).
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// One client connection to a local pod's HTTP port.
pub struct Inbound {
    /// The client's address.
    pub peer: SocketAddr,
    /// Its SPIFFE ID, when authenticated.
    pub identity: Option<crate::config::semantics::Identity>,
    /// `podIP:port`.
    pub target: SocketAddr,
    /// Whether the client came through mTLS (or is an enrolled pod of this node).
    pub mtls: bool,
}

/// Connections to the pod, opened on demand in the protocol of the requests.
struct Upstream {
    /// A connection made before serving (the tunnel was accepted only once the pod was
    /// reachable), not yet used.
    fresh: Option<TcpStream>,
    h1: Option<Sender>,
    h2: Option<Sender>,
}

/// Serves HTTP on `io` until the client is done.
pub async fn serve<I>(ctx: Arc<ProxyContext>, io: I, conn: Inbound, pod: Option<TcpStream>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let source = conn.peer.ip();
    let conn = Arc::new(conn);
    let upstream = Arc::new(Mutex::new(Upstream {
        fresh: pod,
        h1: None,
        h2: None,
    }));
    let (gate, drain) = (ctx.l7.inbound.clone(), ctx.drain.clone());
    let handle = move |req| {
        let (ctx, conn, upstream) = (ctx.clone(), conn.clone(), upstream.clone());
        async move { handle(&ctx, &conn, &upstream, req).await }
    };
    match server::serve(&gate, &drain, source, io, handle).await {
        Served::Limited(reason) => {
            tracing::debug!(%source, "inbound HTTP connection closed: {reason}")
        }
        Served::Done(Err(err)) => tracing::debug!("inbound HTTP connection: {err}"),
        Served::Done(Ok(())) => {}
    }
}

async fn handle(
    ctx: &ProxyContext,
    conn: &Inbound,
    upstream: &Mutex<Upstream>,
    mut req: Request<Incoming>,
) -> Response<RespBody> {
    let started = Instant::now();
    let state = ctx.state.load_full();
    let malformed = super::normalize_uri(req.uri_mut(), state.mesh.paths.normalization).err();
    let peer_ip = ipv4(conn.peer).unwrap_or(Ipv4Addr::UNSPECIFIED);
    let identity = conn.identity.as_deref();
    // The client pod, when its address and identity agree.
    let source = state
        .workloads
        .get(&peer_ip)
        .filter(|s| identity.is_none_or(|id| s.identity == id));
    let destination = ipv4(conn.target)
        .and_then(|ip| state.workloads.get(&ip))
        .filter(|d| d.enrolled && state.is_local(d));
    let authority = super::authority_of(req.uri(), req.headers()).to_string();
    let mut log = RequestLog {
        kind: "http",
        reporter: "destination",
        start_ms: now_ms(),
        method: req.method().to_string(),
        path: req
            .uri()
            .path_and_query()
            .map_or("/".into(), |p| p.as_str().to_string()),
        authority: authority.clone(),
        version: version_name(req.version()),
        protocol: protocol_of(req.headers()),
        response_flags: ResponseFlag::None,
        client: conn.peer.to_string(),
        source_workload: source.map(Workload::qualified),
        source_principal: identity.map(str::to_string),
        upstream: Some(conn.target.to_string()),
        attempts: 1,
        ..RequestLog::default()
    };
    let request_bytes = Arc::new(AtomicU64::new(0));
    let Some(destination) = destination else {
        log.response_flags = ResponseFlag::NoRoute;
        let finish = Finish::new(
            ctx.l7.metrics.clone(),
            Vec::new(),
            log,
            started,
            request_bytes,
        );
        let response = local_response(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
        return Observed::wrap(response, finish);
    };
    let service = state.service_of_endpoint(conn.target);
    log.destination_service = service.map(|s| s.host.clone());
    let report = Report {
        reporter: "destination",
        source: match (source, identity) {
            (Some(s), _) => Peer::of(s, conn.mtls),
            (None, Some(id)) => Peer::identity(id),
            (None, None) => Peer::unknown(),
        },
        destination: Peer::of(destination, conn.mtls),
        service: None,
        mtls: conn.mtls,
    }
    .service(service);
    // The server span: the pod gets the request with it as the parent.
    let mut span = ctx.l7.tracer.as_ref().and_then(|tracer| {
        tracer.begin(
            destination,
            Kind::Server,
            req.headers_mut(),
            conn.target.port(),
        )
    });
    let mut finish = |log: RequestLog| {
        let mut finish = Finish::new(
            ctx.l7.metrics.clone(),
            vec![report.clone()],
            log,
            started,
            request_bytes.clone(),
        );
        finish.trace(span.take().map(|mut span| {
            span.peer(source);
            span
        }));
        finish
    };
    // A path no mode serves, or one servers could read as another where policy matches
    // paths: 400 before the policy decides on it.
    let admitted = match malformed {
        Some(malformed) => Err(gate::Refused::Path(malformed.to_string())),
        None => gate::http_request(
            destination,
            gate::Client {
                addr: conn.peer,
                identity,
            },
            conn.target,
            HttpAttrs {
                method: req.method().as_str(),
                path: req.uri().path(),
                host: &authority,
                headers: req.headers(),
            },
            state.mesh.paths,
        ),
    };
    let admitted = match admitted {
        Ok(admitted) => {
            log.authorization = admitted.decision().and_then(|d| d.policy.clone());
            admitted
        }
        Err(gate::Refused::Path(reason)) => {
            log.response_flags = ResponseFlag::DownstreamProtocolError;
            log.error = Some(reason);
            return Observed::wrap(super::bad_path(), finish(log));
        }
        Err(gate::Refused::Policy(decision)) => {
            log.authorization = decision.policy;
            log.error = Some(decision.reason.to_string());
            let response = local_response(StatusCode::FORBIDDEN, "RBAC: access denied");
            return Observed::wrap(response, finish(log));
        }
    };

    let upgrade = super::is_upgrade(req.headers()) && req.version() != http::Version::HTTP_2;
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    // HTTP/2 to the pod only where a Service port declares HTTP/2 or gRPC for it (the hop
    // before may have upgraded an HTTP/1.1 request, as `h2UpgradePolicy` does between
    // proxies; the application still gets HTTP/1.1).
    let h2 = !upgrade
        && req.version() == http::Version::HTTP_2
        && matches!(conn.target, SocketAddr::V4(t) if state.h2_endpoints.contains(&t));
    let sender = match sender(&*ctx.sockets, upstream, peer_ip, &admitted, h2, upgrade).await {
        Ok(sender) => sender,
        Err(err) => {
            log.response_flags = ResponseFlag::UpstreamConnectFailure;
            log.error = Some(err.clone());
            let response = local_response(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("upstream connect error or disconnect/reset before headers. reset reason: {err}"),
            );
            return Observed::wrap(response, finish(log));
        }
    };
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    set_client_cert(&mut parts.headers, &destination.identity, identity);
    let body = Counting::wrap(super::boxed(body), request_bytes.clone());
    let Some(forwarded) = super::upstream_request(&parts, body, h2, &authority) else {
        let response = local_response(StatusCode::BAD_REQUEST, "invalid authority");
        return Observed::wrap(response, finish(log));
    };
    match sender.send(forwarded).await {
        Ok(mut response) => {
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                if let Some(client_upgrade) = client_upgrade {
                    let server_upgrade = hyper::upgrade::on(&mut response);
                    super::splice_upgrade(client_upgrade, server_upgrade);
                    let (parts, _) = response.into_parts();
                    return Observed::wrap(
                        Response::from_parts(parts, full(Bytes::new())),
                        finish(log),
                    );
                }
            }
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers, false);
            Observed::wrap(Response::from_parts(parts, super::boxed(body)), finish(log))
        }
        Err(err) => {
            log.response_flags = ResponseFlag::UpstreamTermination;
            log.error = Some(err.to_string());
            let response = local_response(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("upstream connect error or disconnect/reset before headers. reset reason: {err}"),
            );
            Observed::wrap(response, finish(log))
        }
    }
}

/// `X-Forwarded-Client-Cert`, as Istio's sidecars set it with `SANITIZE_SET`: whatever the
/// client sent is removed; a caller authenticated by mTLS is named (`By=` this pod's
/// identity, `URI=` the caller's verified SPIFFE ID), so the application can trust the
/// header exactly as far as it trusts the mesh.
pub(crate) fn set_client_cert(
    headers: &mut http::HeaderMap,
    destination: &str,
    caller: Option<&str>,
) {
    headers.remove(XFCC);
    let Some(caller) = caller else { return };
    if let Ok(value) = http::HeaderValue::from_str(&format!("By={destination};URI={caller}")) {
        headers.insert(XFCC, value);
    }
}

const XFCC: &str = "x-forwarded-client-cert";

/// The connection to the pod for a request of this protocol (the gate let it go `to` the
/// pod); an upgrade gets its own.
async fn sender(
    sockets: &dyn transport::Sockets,
    upstream: &Mutex<Upstream>,
    source: Ipv4Addr,
    to: &Authorized,
    h2: bool,
    upgrade: bool,
) -> Result<Sender, String> {
    let target = to.target();
    let mut up = upstream.lock().await;
    let slot_open = |s: &Option<Sender>| s.as_ref().is_some_and(|s| !s.closed());
    if !upgrade {
        let slot = if h2 { &up.h2 } else { &up.h1 };
        if slot_open(slot) {
            return Ok(slot.clone().expect("checked"));
        }
    }
    let stream = match up.fresh.take() {
        Some(stream) => stream,
        None => transport::connect(sockets, source, to)
            .await
            .map_err(|e| e.to_string())?,
    };
    let sender = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(TokioIo::new(stream), h2, ()))
        .await
        .map_err(|_| format!("HTTP handshake with {target} timed out"))??;
    if !upgrade {
        if h2 {
            up.h2 = Some(sender.clone());
        } else {
            up.h1 = Some(sender.clone());
        }
    }
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_cert_header_is_replaced_never_passed_on() {
        let mut headers = http::HeaderMap::new();
        headers.append(
            XFCC,
            "URI=spiffe://cluster.local/ns/kube-system/sa/admin"
                .parse()
                .unwrap(),
        );
        headers.append(XFCC, "By=x;URI=y".parse().unwrap());
        let me = "spiffe://cluster.local/ns/shop/sa/web";
        let caller = "spiffe://cluster.local/ns/shop/sa/api";
        set_client_cert(&mut headers, me, Some(caller));
        let values: Vec<_> = headers.get_all(XFCC).iter().collect();
        assert_eq!(values, [&format!("By={me};URI={caller}")]);
        set_client_cert(&mut headers, me, None);
        assert!(headers.get(XFCC).is_none(), "plaintext callers get none");
    }
}
