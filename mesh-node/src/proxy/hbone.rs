//! HBONE, as Istio ambient defines it: a TCP connection tunnelled as an HTTP/2 CONNECT stream
//! (`:authority` = destination `podIP:port`) over mutual TLS 1.3 to `<destination podIP>:15008`.
//!
//! Source side ([`outbound`], [`Pool`]): tunnels are multiplexed over pooled connections, one
//! pool per (source workload, destination identity, destination address) as ztunnel keys
//! them; a pooled connection takes streams up to the peer's limit, then another one is
//! opened. The outer TCP connection leaves from the source pod's address (`IP_TRANSPARENT`).
//! The client accepts only the destination workload's SPIFFE ID. After the source's
//! certificate is renewed, connections made with the old one take no new streams and close
//! once their streams end.
//!
//! Destination side ([`serve_connection`]): the kernel delivers `podIP:15008` to the listener;
//! the proxy presents the certificate of the workload at that address, takes the client's
//! identity from its certificate, applies AuthorizationPolicy per stream and connects to the
//! pod from the client's address.

use crate::response_flag::ResponseFlag;
use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Instant,
};

use bytes::Bytes;
use futures_util::future::OptionFuture;
use http::{Method, Request, Response, StatusCode};
use tokio::net::TcpStream;

use crate::{
    config::semantics::Identity,
    connections::{ConnectionRecord, Direction},
    context::{Outcome, Tracked},
    gate::{
        revoke::{until_revoked, Asked, Registration},
        Authorized, Served,
    },
    http::ProxyContext,
    identity::tls,
    plan::{self, ipv4, Plan},
    state::{ServiceTarget, Workload},
    telemetry::{Peer, Report},
    transport::{
        self,
        pool::{
            StreamGuard, CONNECTION_WINDOW, HANDSHAKE_TIMEOUT, MAX_FRAME, MAX_STREAMS,
            STREAM_WINDOW,
        },
        relay_h2, reset, TcpEnd,
    },
};

/// TLS handshakes the destination side runs at once; more wait (up to the handshake
/// deadline) for a turn, so a flood of connections cannot hold unbounded handshake state.
const MAX_HANDSHAKES: usize = 128;
static HANDSHAKES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_HANDSHAKES);
/// Largest CONNECT head accepted (an HBONE head is an authority and a few short headers).
const MAX_HEADER_LIST: u32 = 16 << 10;

/// Streams of one destination-side connection cancelled by the client before they were
/// answered: a client that opens and resets streams as fast as it can (rapid reset) has
/// its connection closed once most of its streams end so.
#[derive(Default)]
struct Cancels {
    count: crate::http::server::Cancels,
    flood: tokio::sync::Notify,
}

impl Cancels {
    /// A tunnel accepted at `accepted` ended; `reset`: by the client's RST_STREAM before
    /// anything was sent back. One so reset right after it opened counts as cancelled
    /// (Envoy's premature reset); a pooled tunnel the client is done with has had answers.
    fn ended(&self, accepted: Instant, reset: bool) {
        if reset && accepted.elapsed() < crate::http::server::PREMATURE {
            self.cancelled();
        }
    }

    fn cancelled(&self) {
        if self.count.cancelled() {
            self.flood.notify_one();
        }
    }
}

/// Opens the HBONE tunnel of one connection from a local enrolled pod (the caller relays
/// it, [`Tunnelled::relay`]). A connection that cannot be tunnelled is reset and recorded
/// here.
pub(crate) async fn outbound<'a>(
    ctx: &'a ProxyContext,
    client: TcpStream,
    mut rec: ConnectionRecord,
    (source, destination): (&Workload, &Workload),
    service: Option<&ServiceTarget>,
    to: Authorized,
    registration: Registration<'a>,
) -> Option<Tunnelled<'a>> {
    rec.path = "hbone";
    rec.security = "mutual_tls";
    rec.destination_identity = Some(destination.identity.clone());
    let report = Report {
        reporter: "source",
        source: Peer::of(source, true),
        destination: Peer::of(destination, true),
        service: None,
        mtls: true,
    }
    .service(service);
    let tracked = Tracked::reported(ctx, Direction::Outbound, rec, vec![report]);
    let cert = match ctx.certs.for_workload(source).await {
        Ok(cert) => cert,
        Err(err) => {
            reset(&client);
            tracked.finish(Outcome::refused(
                ResponseFlag::UpstreamConnectFailure,
                err.to_string(),
            ));
            return None;
        }
    };
    // Boxed: opening a new tunnel connection (TLS and HTTP/2 handshakes) is a large future,
    // which would otherwise size the opening of every connection, whichever way it goes.
    let tunnel =
        Box::pin(
            ctx.pool
                .stream(ctx.peers(), source.ip, &cert, &destination.identity, &to),
        )
        .await;
    let (send, recv, guard) = match tunnel {
        Ok(tunnel) => tunnel,
        Err(failure) => {
            reset(&client);
            tracked.finish(Outcome::failed(&failure));
            return None;
        }
    };
    let _ = client.set_nodelay(true);
    transport::keepalive(&client);
    Some(Tunnelled {
        tcp: client,
        send,
        recv,
        end: TcpEnd::Client,
        tracked,
        _slot: Some(guard),
        cancels: None,
        // Not decided here (the destination's node decides); registered all the same, so
        // the drain timeout after a takeover stops it (`Revocations::close_all`).
        registration: Some(registration),
    })
}

/// An open HBONE tunnel, on either side: what lives as long as the connection (its socket,
/// its HTTP/2 stream, its record). Opening one takes much more (the request, the policy
/// decision, the reports, the pool's connection set-up); that is all gone by the time the
/// connection idles, so an idle connection's task holds only this and the relay.
pub(crate) struct Tunnelled<'a> {
    tcp: TcpStream,
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    end: TcpEnd,
    tracked: Tracked<'a>,
    /// The source side's stream slot on its pooled connection.
    _slot: Option<StreamGuard>,
    /// The destination side's count of cancelled streams, and when this one was accepted.
    cancels: Option<(Arc<Cancels>, Instant)>,
    /// The destination side's place in the gate's revocations.
    registration: Option<Registration<'a>>,
}

impl<'a> Tunnelled<'a> {
    /// Relays until both directions end (a failure resets the TCP side), then records the
    /// outcome. (A plain function returning an `async` block: the block keeps its captures
    /// in place, where an `async fn` would hold its argument and a moved copy of it.)
    pub(crate) fn relay(self) -> impl std::future::Future<Output = ()> + Send + 'a {
        let Tunnelled {
            mut tcp,
            send,
            recv,
            end,
            tracked,
            _slot: slot,
            cancels,
            registration,
        } = self;
        async move {
            let (copied, error) = relay_h2(
                &mut tcp,
                send,
                recv,
                end,
                &tracked.live,
                until_revoked(registration.as_ref()),
            )
            .await;
            if let Some(error) = &error {
                reset(&tcp);
                // Reset by the client before the pod sent it anything.
                if let Some((cancels, accepted)) = cancels {
                    cancels.ended(
                        accepted,
                        transport::reset_by_peer(error) && copied.received == 0,
                    );
                }
            }
            let outcome = Outcome::relayed(copied, error, registration.as_ref());
            tracked.finish(outcome);
            drop(slot);
        }
    }
}

/// The destination side: one accepted connection to `podIP:15008`.
pub async fn serve_connection(
    ctx: Arc<ProxyContext>,
    tcp: TcpStream,
    peer: SocketAddr,
    _live: crate::drain::Live,
) {
    let Ok(local) = tcp.local_addr() else { return };
    let state = ctx.state.load_full();
    let destination = ipv4(local)
        .and_then(|ip| state.workloads.get(&ip))
        .filter(|w| w.enrolled && state.is_local(w));
    let Some(destination) = destination else {
        tracing::warn!(%peer, %local, "HBONE connection to an address that is no enrolled pod of this node: refused");
        reset(&tcp);
        return;
    };
    let cert = match ctx.certs.for_workload(destination).await {
        Ok(cert) => cert,
        Err(err) => {
            tracing::error!("HBONE to {local}: {err}");
            reset(&tcp);
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    transport::keepalive(&tcp);
    let handshake = async {
        let _turn = HANDSHAKES.acquire().await;
        tokio_rustls::TlsAcceptor::from(cert.server.clone())
            .accept(tcp)
            .await
    };
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            let reason = tls::failure_reason(&err);
            ctx.metrics.handshake_failed("server", reason);
            tracing::warn!(%peer, %local, reason, "HBONE handshake refused: {err}");
            return;
        }
        Err(_) => {
            ctx.metrics.handshake_failed("server", "timeout");
            return;
        }
    };
    ctx.metrics.hbone_opened("server");
    let presented = destination.identity.clone();
    let identity = match tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .map(tls::spiffe_id)
    {
        Some(Ok(id)) => match Identity::parse(&id) {
            Ok(id) => id,
            Err(_) => return, // the verifier already required one
        },
        _ => return,
    };
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_pending_accept_reset_streams(crate::http::server::MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(Some(crate::http::server::MAX_LOCAL_ERROR_RESETS))
        .handshake::<_, Bytes>(tls);
    let mut connection = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(err)) => {
            tracing::debug!(%peer, "HBONE HTTP/2 handshake failed: {err}");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "HBONE HTTP/2 handshake timed out");
            return;
        }
    };
    let cancels = Arc::new(Cancels::default());
    let draining = ctx.drain.started();
    tokio::pin!(draining);
    let mut drained = false;
    loop {
        let next = tokio::select! {
            next = connection.accept() => next,
            // A successor took over: GOAWAY (the graceful two-step kind), so the peer's pool
            // opens its next streams on a new connection, which the successor accepts; the
            // open streams go on.
            () = &mut draining, if !drained => {
                drained = true;
                connection.graceful_shutdown();
                continue;
            }
            () = cancels.flood.notified() => {
                ctx.metrics.hbone_limited("premature_cancels");
                tracing::warn!(%peer, "HBONE client cancels most streams it opens (rapid reset): connection closed");
                connection.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                let _ = tokio::time::timeout(
                    HANDSHAKE_TIMEOUT,
                    std::future::poll_fn(|cx| connection.poll_closed(cx)),
                )
                .await;
                return;
            }
        };
        match next {
            Some(Ok((request, respond))) => {
                cancels.count.started();
                tokio::spawn(serve_stream(Box::new(Stream {
                    ctx: ctx.clone(),
                    request,
                    respond,
                    peer,
                    local,
                    identity: identity.clone(),
                    presented: presented.clone(),
                    cancels: cancels.clone(),
                    accepted: Instant::now(),
                })));
            }
            Some(Err(err)) => {
                tracing::debug!(%peer, "HBONE connection error: {err}");
                return;
            }
            None => break,
        }
    }
    // No new streams (the client is done with the connection, e.g. after a certificate
    // renewal): the open ones still need the connection driven until they end.
    if let Err(err) = std::future::poll_fn(|cx| connection.poll_closed(cx)).await {
        tracing::debug!(%peer, "HBONE connection error: {err}");
    }
}

/// Connects to the pod unless the client resets the stream first (then counted as
/// cancelled, and `None`): a reset stream costs no connection to the pod.
async fn connect_unless_cancelled(
    respond: &mut h2::server::SendResponse<Bytes>,
    cancels: &Cancels,
    sockets: &dyn transport::Sockets,
    source: std::net::Ipv4Addr,
    to: &Authorized,
) -> Option<Result<TcpStream, transport::Error>> {
    tokio::select! {
        connected = transport::connect(sockets, source, to) => Some(connected),
        _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => {
            cancels.cancelled();
            None
        }
    }
}

/// A CONNECT stream accepted on the destination side, and its connection's facts.
struct Stream {
    ctx: Arc<ProxyContext>,
    request: Request<h2::RecvStream>,
    respond: h2::server::SendResponse<Bytes>,
    /// The tunnel connection's peer and local addresses.
    peer: SocketAddr,
    local: SocketAddr,
    /// The client's SPIFFE ID, and the one this connection presented.
    identity: Identity,
    presented: Identity,
    /// The connection's count of cancelled streams.
    cancels: Arc<Cancels>,
    /// When the stream was accepted.
    accepted: Instant,
}

/// One CONNECT stream on the destination side (its own task). The stream arrives boxed and
/// is opened in a boxed future, both freed once the tunnel is open, so an idle tunnel's task
/// holds only the relay (docs/benchmarks.md, idle connections).
async fn serve_stream(stream: Box<Stream>) {
    let ctx = stream.ctx.clone();
    let opened = Box::pin(open_stream(&ctx, stream)).await;
    OptionFuture::from(opened.map(Tunnelled::relay)).await;
}

/// Checks a CONNECT stream, applies policy and connects to the pod; answers and records the
/// streams it refuses. HTTP inside the tunnel is served here to its end (`None`).
async fn open_stream(ctx: &Arc<ProxyContext>, stream: Box<Stream>) -> Option<Tunnelled<'_>> {
    let Stream {
        ctx: _,
        request,
        mut respond,
        peer,
        local,
        identity,
        presented,
        cancels,
        accepted,
    } = *stream;
    let answer = |respond: &mut h2::server::SendResponse<Bytes>, status: StatusCode| {
        let response = Response::builder()
            .status(status)
            .body(())
            .unwrap_or_default();
        respond.send_response(response, true).ok();
    };
    if request.method() != Method::CONNECT {
        answer(&mut respond, StatusCode::METHOD_NOT_ALLOWED);
        return None;
    }
    // IPv4 `address:port` only: another form of the same address (an IPv4-mapped IPv6
    // one) must not slip past the checks below.
    let Some(target) = request
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddrV4>().ok())
        .map(SocketAddr::V4)
    else {
        answer(&mut respond, StatusCode::BAD_REQUEST);
        return None;
    };
    // Before the snapshot the decision is made on is loaded (`gate::revoke`).
    let registration = ctx.revocations.register();
    let state = ctx.state.load_full();
    let mut rec = ConnectionRecord::new(Direction::Hbone, peer, target);
    rec.path = "hbone";
    rec.security = "mutual_tls";
    rec.upstream = Some(target);
    rec.source_identity = Some(identity.clone());
    rec.source_workload = ipv4(peer)
        .and_then(|ip| state.workloads.get(&ip))
        .map(Workload::qualified);
    let (source, destination, served, admitted) =
        match plan::tunnel(&state, peer, local, target, &identity, &presented) {
            Plan::Local {
                source,
                destination,
                served,
                admitted,
                ..
            } => (source, destination, served, admitted),
            Plan::Refuse { refusal, .. } => {
                answer(&mut respond, StatusCode::BAD_REQUEST);
                Tracked::open(ctx, Direction::Hbone, rec)
                    .finish(Outcome::refused(refusal.flag, refusal.reason));
                return None;
            }
            other => unreachable!("a tunnel plan is Local or Refuse: {other:?}"),
        };
    rec.destination_workload = Some(destination.qualified());
    rec.destination_identity = Some(destination.identity.clone());
    let report = Report {
        reporter: "destination",
        source: source.map_or_else(|| Peer::identity(&identity), |s| Peer::of(s, true)),
        destination: Peer::of(destination, true),
        service: None,
        mtls: true,
    }
    // The client's Service is not in the tunnel: name the one the pod port serves.
    .service(state.service_of_endpoint(target));
    let source_ip = ipv4(peer).unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
    let admitted = admitted.and_then(|admitted| {
        if served == Served::Connection {
            let asked = Asked {
                destination: destination.ip,
                client: peer,
                identity: Some(identity.clone()),
                target,
                direction: Direction::Hbone.as_str(),
            };
            registration.commit(asked, &state)?;
        }
        Ok(admitted)
    });
    let admitted = match admitted {
        Ok(admitted) => admitted,
        Err(decision) => {
            let reason = decision.reason;
            rec.authorization = Some(decision);
            let tracked = Tracked::reported(ctx, Direction::Hbone, rec, vec![report]);
            // ztunnel answers a policy denial with 401.
            answer(&mut respond, StatusCode::UNAUTHORIZED);
            tracked.finish(Outcome::refused(ResponseFlag::Denied, reason));
            return None;
        }
    };
    if served == Served::PerRequest {
        // HTTP inside the tunnel: authorized and reported per request.
        drop(registration);
        rec.path = "hbone_http";
        let tracked = Tracked::open(ctx, Direction::Hbone, rec);
        let server = match connect_unless_cancelled(
            &mut respond,
            &cancels,
            &*ctx.sockets,
            source_ip,
            &admitted,
        )
        .await
        {
            None => {
                tracked.finish(Outcome::refused(
                    ResponseFlag::DownstreamTermination,
                    "stream reset by the client",
                ));
                return None;
            }
            Some(Ok(server)) => server,
            Some(Err(err)) => {
                answer(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
                tracked.finish(Outcome::failed(&err));
                return None;
            }
        };
        let Ok(send) = respond.send_response(Response::new(()), false) else {
            cancels.cancelled();
            tracked.finish(Outcome::refused(
                ResponseFlag::DownstreamTermination,
                "tunnel closed",
            ));
            return None;
        };
        let premature = Arc::new(AtomicBool::new(false));
        let tunnel = crate::transport::tunnel::Tunnel::new(send, request.into_body())
            .noting_premature_reset(premature.clone());
        let inbound = crate::http::inbound::Inbound {
            peer,
            identity: Some(identity),
            target,
            mtls: true,
        };
        Box::pin(crate::http::inbound::serve(
            ctx.clone(),
            tunnel,
            inbound,
            Some(server),
        ))
        .await;
        cancels.ended(accepted, premature.load(Ordering::Acquire));
        tracked.finish(Outcome::default());
        return None;
    }
    rec.authorization = admitted.decision().cloned();
    let tracked = Tracked::reported(ctx, Direction::Hbone, rec, vec![report]);
    let server =
        match connect_unless_cancelled(&mut respond, &cancels, &*ctx.sockets, source_ip, &admitted)
            .await
        {
            None => {
                tracked.finish(Outcome::refused(
                    ResponseFlag::DownstreamTermination,
                    "stream reset by the client",
                ));
                return None;
            }
            Some(Ok(server)) => server,
            Some(Err(err)) => {
                answer(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
                tracked.finish(Outcome::failed(&err));
                return None;
            }
        };
    let send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(err) => {
            reset(&server);
            cancels.cancelled();
            tracked.finish(Outcome::refused(
                ResponseFlag::DownstreamTermination,
                format!("tunnel closed: {err}"),
            ));
            return None;
        }
    };
    Some(Tunnelled {
        tcp: server,
        send,
        recv: request.into_body(),
        end: TcpEnd::Server,
        tracked,
        _slot: None,
        cancels: Some((cancels, accepted)),
        registration: Some(registration),
    })
}
