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
    collections::HashMap,
    net::{SocketAddr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::future::OptionFuture;
use http::{Method, Request, Response, StatusCode};
use mesh_common::PORT_HBONE;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use super::{forward::qualified, record, Direction, Outcome, ProxyContext, Tracked};
use crate::{
    gate::{Authorized, Served},
    identity::{tls, Certificates, WorkloadCert},
    plan::{self, ipv4, Plan},
    state::{ServiceTarget, Workload},
    telemetry::{Peer, Report},
    transport::{self, relay_h2, reset, TcpEnd},
};

/// HTTP/2 flow-control windows: large enough that one stream fills a fast link (the
/// bandwidth-delay product inside a cluster is small; a window below a few hundred KiB
/// stalls bulk transfers), the connection's large enough for several streams.
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
/// Largest HTTP/2 frame accepted.
const MAX_FRAME: u32 = 1 << 20;
/// Streams a client may open on one connection (ztunnel's default).
const MAX_STREAMS: u32 = 100;
/// TLS (and HTTP/2) handshake deadline.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for a tunnel to be answered: the destination proxy's own connect timeout (5 s)
/// plus room. A peer that stalls beyond it gets the connection marked broken and the client
/// reset.
const STREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// A pooled connection without streams for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a pooled connection's peer is pinged, and how long it has to answer.
const PING_EVERY: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the pool drops idle, broken and superseded connections.
const REAP_EVERY: Duration = Duration::from_secs(1);
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

/// Why a tunnel could not be opened.
pub(crate) struct Failure {
    pub flag: ResponseFlag,
    pub error: String,
}

impl Failure {
    fn uf(error: impl Into<String>) -> Failure {
        Failure {
            flag: ResponseFlag::UpstreamConnectFailure,
            error: error.into(),
        }
    }
}

/// Opens the HBONE tunnel of one connection from a local enrolled pod ([`outbound_way`]
/// relays it). A connection that cannot be tunnelled is reset and recorded here.
async fn outbound<'a>(
    ctx: &'a ProxyContext,
    client: TcpStream,
    mut rec: super::connections::ConnectionRecord,
    source: &Workload,
    destination: &Workload,
    service: Option<&ServiceTarget>,
    to: Authorized,
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
    let mut tracked = Tracked::open(ctx, Direction::Outbound, rec);
    tracked.live = ctx.tcp.open(vec![report]);
    let cert = match ctx.certs.for_workload(source) {
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
    // and the task of every connection would otherwise be sized by it for its whole life.
    let tunnel = Box::pin(
        ctx.pool
            .stream(ctx, source.ip, &cert, &destination.identity, &to),
    )
    .await;
    let (send, recv, guard) = match tunnel {
        Ok(tunnel) => tunnel,
        Err(failure) => {
            reset(&client);
            tracked.finish(Outcome::refused(failure.flag, failure.error));
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
        } = self;
        async move {
            let (copied, error) = relay_h2(&mut tcp, send, recv, end, &tracked.live).await;
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
            tracked.finish(Outcome::relayed(copied, error));
            drop(slot);
        }
    }
}

/// The source side of HBONE for one connection: opens the tunnel in a boxed future, freed
/// once it is open, then relays; the future returned holds only the relay while the
/// connection lives (an idle tunnel's way: 1.9 KB before).
pub(crate) fn outbound_way<'a>(
    ctx: &'a ProxyContext,
    client: TcpStream,
    rec: super::connections::ConnectionRecord,
    source: &'a Workload,
    destination: &'a Workload,
    service: Option<&'a ServiceTarget>,
    to: Authorized,
) -> impl std::future::Future<Output = ()> + Send + 'a {
    let open = Box::pin(outbound(ctx, client, rec, source, destination, service, to));
    async move {
        OptionFuture::from(open.await.map(Tunnelled::relay)).await;
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Key {
    source: std::net::Ipv4Addr,
    source_identity: String,
    identity: String,
    destination: SocketAddrV4,
}

struct Pooled {
    sender: h2::client::SendRequest<Bytes>,
    /// Generation of the source certificate it was made with.
    generation: u64,
    active: AtomicUsize,
    closed: Arc<AtomicBool>,
    idle_since: Mutex<Instant>,
}

impl Pooled {
    fn has_room(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
            && self.active.load(Ordering::Acquire) < self.sender.current_max_send_streams()
    }
}

/// Returns a stream slot to its connection when the tunnel ends.
pub(crate) struct StreamGuard(Arc<Pooled>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
    }
}

/// Outbound HBONE connections, by (source workload, destination identity, destination).
#[derive(Clone, Default)]
pub struct Pool {
    conns: Arc<Mutex<HashMap<Key, Vec<Arc<Pooled>>>>>,
    /// One connection attempt per key at a time: a burst of new tunnels waits for the first
    /// connection and shares it instead of each opening its own.
    connecting: Arc<Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>>,
}

impl Pool {
    /// Drops broken, idle and superseded connections every second (dropping the pool's
    /// handle closes a connection once its last stream ends).
    pub fn spawn_reaper(&self, certs: Arc<Certificates>) {
        let conns = self.conns.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REAP_EVERY);
            loop {
                tick.tick().await;
                let now = Instant::now();
                let mut conns = conns.lock().unwrap_or_else(|e| e.into_inner());
                conns.retain(|key, list| {
                    let current = certs.generation_of(&key.source_identity);
                    list.retain(|c| {
                        let since = *c.idle_since.lock().unwrap_or_else(|e| e.into_inner());
                        let idle = c.active.load(Ordering::Acquire) == 0
                            && now.duration_since(since) >= IDLE_TIMEOUT;
                        let superseded = current != Some(c.generation);
                        !c.closed.load(Ordering::Acquire) && !idle && !superseded
                    });
                    !list.is_empty()
                });
            }
        });
    }

    /// Pooled connections (for `/debug/state`): `(source, identity, destination, streams)`.
    pub fn snapshot(&self) -> Vec<(String, String, String, usize, u64)> {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = conns
            .iter()
            .flat_map(|(k, list)| {
                list.iter().map(move |c| {
                    (
                        k.source.to_string(),
                        k.identity.clone(),
                        k.destination.to_string(),
                        c.active.load(Ordering::Relaxed),
                        c.generation,
                    )
                })
            })
            .collect();
        out.sort();
        out
    }

    /// Opens a tunnel to `to` (a pod of another node, which its node decides) from workload
    /// `source` (holding `cert`) to a workload that must prove `identity`.
    pub(crate) async fn stream(
        &self,
        ctx: &ProxyContext,
        source: std::net::Ipv4Addr,
        cert: &WorkloadCert,
        identity: &str,
        to: &Authorized,
    ) -> Result<(h2::SendStream<Bytes>, h2::RecvStream, StreamGuard), Failure> {
        let (SocketAddr::V4(target), Some(tunnel)) = (to.target(), to.tunnel()) else {
            return Err(Failure::uf(format!(
                "HBONE to {}: an IPv4 pod of another node only",
                to.target()
            )));
        };
        let key = Key {
            source,
            source_identity: cert.identity.clone(),
            identity: identity.to_string(),
            destination: SocketAddrV4::new(*target.ip(), PORT_HBONE),
        };
        // A pooled connection can turn out to be dead (the peer went away): then try once
        // more on a new one.
        for attempt in 0..2 {
            let conn = match self.checkout(&key, cert.generation) {
                Some(conn) => conn,
                None => self.checkout_or_connect(ctx, &key, cert, &tunnel).await?,
            };
            let guard = StreamGuard(conn.clone());
            let ready = tokio::time::timeout(STREAM_TIMEOUT, conn.sender.clone().ready()).await;
            let mut sender = match ready {
                Ok(Ok(sender)) => sender,
                failed => {
                    conn.closed.store(true, Ordering::Release);
                    if attempt == 0 {
                        continue;
                    }
                    let why = match failed {
                        Ok(Err(err)) => err.to_string(),
                        _ => "no stream slot within the deadline".to_string(),
                    };
                    return Err(Failure::uf(format!(
                        "HBONE connection to {}: {why}",
                        key.destination
                    )));
                }
            };
            let request = Request::builder()
                .method(Method::CONNECT)
                .uri(target.to_string())
                .version(http::Version::HTTP_2)
                .body(())
                .map_err(|e| Failure::uf(e.to_string()))?;
            let (response, send) = match sender.send_request(request, false) {
                Ok(sent) => sent,
                Err(err) => {
                    conn.closed.store(true, Ordering::Release);
                    if attempt == 0 {
                        continue;
                    }
                    return Err(Failure::uf(format!("HBONE stream to {target}: {err}")));
                }
            };
            let response = match tokio::time::timeout(STREAM_TIMEOUT, response).await {
                Ok(Ok(response)) => response,
                Ok(Err(err)) => {
                    return Err(Failure::uf(format!("HBONE stream to {target}: {err}")))
                }
                Err(_) => {
                    // The peer does not answer: take the connection out of service.
                    conn.closed.store(true, Ordering::Release);
                    return Err(Failure::uf(format!("HBONE stream to {target}: no answer")));
                }
            };
            return match response.status() {
                StatusCode::OK => Ok((send, response.into_body(), guard)),
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(Failure {
                    flag: ResponseFlag::Denied,
                    error: format!("{target}: refused by the destination's policy"),
                }),
                status => Err(Failure::uf(format!(
                    "{target}: the destination proxy answered {status}"
                ))),
            };
        }
        Err(Failure::uf(format!(
            "HBONE connection to {} failed",
            key.destination
        )))
    }

    /// A pooled connection with room for one more stream, made with the current certificate;
    /// its stream count already taken.
    fn checkout(&self, key: &Key, generation: u64) -> Option<Arc<Pooled>> {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let conn = conns
            .get(key)?
            .iter()
            .find(|c| c.generation == generation && c.has_room())?
            .clone();
        conn.active.fetch_add(1, Ordering::AcqRel);
        Some(conn)
    }

    /// Under the key's connect lock: a connection another task opened meanwhile, or a new one.
    async fn checkout_or_connect(
        &self,
        ctx: &ProxyContext,
        key: &Key,
        cert: &WorkloadCert,
        tunnel: &Authorized,
    ) -> Result<Arc<Pooled>, Failure> {
        let lock = self
            .connecting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let result = {
            let _held = lock.lock().await;
            match self.checkout(key, cert.generation) {
                Some(conn) => Ok(conn),
                None => self.connect(ctx, key, cert, tunnel).await,
            }
        };
        // Forget the lock when nobody else waits on it.
        let mut connecting = self.connecting.lock().unwrap_or_else(|e| e.into_inner());
        if Arc::strong_count(&lock) == 2 {
            connecting.remove(key);
        }
        result
    }

    async fn connect(
        &self,
        ctx: &ProxyContext,
        key: &Key,
        cert: &WorkloadCert,
        tunnel: &Authorized,
    ) -> Result<Arc<Pooled>, Failure> {
        let tcp = transport::connect(key.source, tunnel)
            .await
            .map_err(|e| Failure::uf(format!("connect to {}: {e}", key.destination)))?;
        let config = tls::client_config(
            cert.certified.clone(),
            ctx.certs.root().clone(),
            &key.identity,
        );
        let name = ServerName::IpAddress((*key.destination.ip()).into());
        let handshake = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(err)) => {
                let reason = tls::failure_reason(&err);
                ctx.metrics.handshake_failed("client", reason);
                tracing::warn!(destination = %key.destination, identity = %key.identity, reason, "HBONE handshake failed: {err}");
                return Err(Failure::uf(format!(
                    "TLS handshake with {}: {err}",
                    key.destination
                )));
            }
            Err(_) => {
                ctx.metrics.handshake_failed("client", "timeout");
                return Err(Failure::uf(format!(
                    "TLS handshake with {}: timed out",
                    key.destination
                )));
            }
        };
        let (sender, mut connection) = h2::client::Builder::new()
            .initial_max_send_streams(MAX_STREAMS as usize)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| Failure::uf(format!("HTTP/2 with {}: {e}", key.destination)))?;
        ctx.metrics.hbone_opened("client");
        let closed = Arc::new(AtomicBool::new(false));
        let done = closed.clone();
        let destination = key.destination;
        let ping_pong = connection.ping_pong();
        let driver = tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%destination, "HBONE connection ended: {err}");
            }
            done.store(true, Ordering::Release);
        });
        if let Some(ping_pong) = ping_pong {
            tokio::spawn(watch_liveness(
                ping_pong,
                driver,
                closed.clone(),
                destination,
            ));
        }
        let conn = Arc::new(Pooled {
            sender,
            generation: cert.generation,
            active: AtomicUsize::new(1),
            closed,
            idle_since: Mutex::new(Instant::now()),
        });
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .push(conn.clone());
        Ok(conn)
    }
}

/// Pings a pooled connection's peer every `PING_EVERY`; a peer that does not answer within
/// `PING_TIMEOUT` (a vanished node, a dead proxy) gets the connection torn down, so its
/// streams fail and their clients are reset now rather than after TCP keepalive gives up.
async fn watch_liveness(
    mut ping_pong: h2::PingPong,
    driver: tokio::task::JoinHandle<()>,
    closed: Arc<AtomicBool>,
    destination: SocketAddrV4,
) {
    loop {
        tokio::time::sleep(PING_EVERY).await;
        if closed.load(Ordering::Acquire) {
            return;
        }
        match tokio::time::timeout(PING_TIMEOUT, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return, // the connection is ending anyway
            Err(_) => {
                tracing::warn!(%destination, "HBONE peer does not answer pings: closing the connection");
                closed.store(true, Ordering::Release);
                driver.abort();
                return;
            }
        }
    }
}

/// The destination side: one accepted connection to `podIP:15008`.
pub async fn serve_connection(ctx: Arc<ProxyContext>, tcp: TcpStream, peer: SocketAddr) {
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
    let cert = match ctx.certs.for_workload(destination) {
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
    let presented: Arc<str> = cert.identity.as_str().into();
    let identity: Arc<str> = match tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .map(tls::spiffe_id)
    {
        Some(Ok(id)) => id.into(),
        _ => return, // the verifier already required one
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
    loop {
        let next = tokio::select! {
            next = connection.accept() => next,
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
    source: std::net::Ipv4Addr,
    to: &Authorized,
) -> Option<std::io::Result<TcpStream>> {
    tokio::select! {
        connected = transport::connect(source, to) => Some(connected),
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
    identity: Arc<str>,
    presented: Arc<str>,
    /// The connection's count of cancelled streams.
    cancels: Arc<Cancels>,
    /// When the stream was accepted.
    accepted: Instant,
}

/// One CONNECT stream on the destination side (its own task). The stream arrives boxed and
/// is opened in a boxed future, both freed once the tunnel is open, so an idle tunnel's task
/// holds only the relay (2.7 KB before).
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
    let state = ctx.state.load_full();
    let mut rec = record(Direction::Hbone, peer, target);
    rec.path = "hbone";
    rec.security = "mutual_tls";
    rec.upstream = Some(target);
    rec.source_identity = Some(identity.to_string());
    rec.source_workload = ipv4(peer)
        .and_then(|ip| state.workloads.get(&ip))
        .map(qualified);
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
    rec.destination_workload = Some(qualified(destination));
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
    let admitted = match admitted {
        Ok(admitted) => admitted,
        Err(decision) => {
            let reason = decision.reason;
            rec.authorization = Some(decision);
            let mut tracked = Tracked::open(ctx, Direction::Hbone, rec);
            tracked.live = ctx.tcp.open(vec![report]);
            // ztunnel answers a policy denial with 401.
            answer(&mut respond, StatusCode::UNAUTHORIZED);
            tracked.finish(Outcome::refused(ResponseFlag::Denied, reason));
            return None;
        }
    };
    if served == Served::PerRequest {
        // HTTP inside the tunnel: authorized and reported per request.
        rec.path = "hbone_http";
        let tracked = Tracked::open(ctx, Direction::Hbone, rec);
        let server =
            match connect_unless_cancelled(&mut respond, &cancels, source_ip, &admitted).await {
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
                    let error = format!("connect to {target}: {err}");
                    tracked.finish(Outcome::refused(
                        ResponseFlag::UpstreamConnectFailure,
                        error,
                    ));
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
        let tunnel = crate::http::tunnel::Tunnel::new(send, request.into_body())
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
    let mut tracked = Tracked::open(ctx, Direction::Hbone, rec);
    tracked.live = ctx.tcp.open(vec![report]);
    let server = match connect_unless_cancelled(&mut respond, &cancels, source_ip, &admitted).await
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
            tracked.finish(Outcome::refused(
                ResponseFlag::UpstreamConnectFailure,
                format!("connect to {target}: {err}"),
            ));
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
    })
}
