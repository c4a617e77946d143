//! The limits every HTTP server of the proxy runs under (the admin endpoint, the L7 client
//! side, the L7 destination side), so that one hostile client can cost it only a bounded
//! amount of memory and CPU:
//!
//! - a **request-head deadline** ([`HEAD_TIMEOUT`]): a connection that has not sent a complete
//!   request head within it of its start, or of the first byte of a later head, is closed.
//!   An idle keep-alive connection (no head started) is not timed out; HTTP/2 and upgraded
//!   connections are exempt after their first request (HTTP/2 bounds its header blocks
//!   itself);
//! - **head size and count**: at most [`MAX_HEAD`] bytes and [`MAX_HEADERS`] headers (431 in
//!   HTTP/1.1, a stream error in HTTP/2);
//! - a **budget of unfinished heads**: bytes read towards heads not yet complete are charged
//!   to the source address and to the server; over either budget the connection is closed;
//! - **connection caps** per source address and per server, refused at accept;
//! - **HTTP/2**: concurrent streams, header list size (which also bounds CONTINUATION
//!   frames), pending-accept and local-error reset limits, set explicitly; a connection whose
//!   streams are mostly cancelled by the client right after they start (the rapid-reset
//!   pattern, CVE-2023-44487) is closed.
//!
//! Every refusal and limit-closed connection is counted in
//! `mesh_http_server_limited_total{server,reason}`.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::IpAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::Notify,
};

use super::BoxError;
use crate::drain::Drain;

/// Time a client has to send a complete request head: from the connection's start for the
/// first, from its first byte for a later one.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head (HTTP/1.1 read buffer; HTTP/2 header list), as Envoy's 60 KiB
/// default `max_request_headers_kb`.
pub const MAX_HEAD: usize = 64 << 10;
/// Most headers in a request head.
pub const MAX_HEADERS: usize = 100;
/// Concurrent HTTP/2 streams per connection.
pub const MAX_STREAMS: u32 = 100;
/// HTTP/2 streams the client may reset before the server accepted them (h2's default,
/// set explicitly).
pub const MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// HTTP/2 streams the server may reset for protocol errors before it closes the connection.
pub const MAX_LOCAL_ERROR_RESETS: usize = 100;
/// Requests cancelled by the client within [`PREMATURE`] of their start: once a connection
/// has this many and they are at least half of its requests, it is closed (Envoy's
/// premature-reset rule).
pub const MAX_PREMATURE_CANCELS: u64 = 500;
/// A request cancelled sooner than this after its start counts as premature.
pub const PREMATURE: Duration = Duration::from_secs(1);

/// Envoy's premature-reset rule, for one connection: counts the requests (streams) it
/// started and those the client cancelled right after they started.
#[derive(Debug, Default)]
pub(crate) struct Cancels {
    started: AtomicU64,
    cancelled: AtomicU64,
}

impl Cancels {
    /// One more request or stream started.
    pub(crate) fn started(&self) {
        self.started.fetch_add(1, Ordering::Relaxed);
    }

    /// One was cancelled right after it started; true once the connection has at least
    /// [`MAX_PREMATURE_CANCELS`] such and they are at least half of what it started.
    pub(crate) fn cancelled(&self) -> bool {
        let cancelled = self.cancelled.fetch_add(1, Ordering::AcqRel) + 1;
        cancelled >= MAX_PREMATURE_CANCELS && cancelled * 2 >= self.started.load(Ordering::Relaxed)
    }
}

/// Caps of one server.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Open connections from one source address.
    pub connections_per_source: usize,
    /// Open connections in all.
    pub connections: usize,
    /// Bytes of unfinished request heads from one source address.
    pub head_bytes_per_source: usize,
    /// Bytes of unfinished request heads in all.
    pub head_bytes: usize,
    /// Connections from one source served while they wait for their first request head;
    /// more wait their turn (holding no HTTP state) until the head deadline.
    pub first_heads_per_source: usize,
}

impl Limits {
    /// The admin endpoint: Prometheus, the kubelet's probes and an operator's curl.
    pub const ADMIN: Limits = Limits {
        connections_per_source: 16,
        connections: 256,
        head_bytes_per_source: 256 << 10,
        head_bytes: 2 << 20,
        first_heads_per_source: 4,
    };
    /// An L7 server (client side or destination side): the pods of a node.
    pub const L7: Limits = Limits {
        connections_per_source: 4096,
        connections: 65536,
        head_bytes_per_source: 1 << 20,
        head_bytes: 8 << 20,
        first_heads_per_source: 64,
    };
}

/// Why a server refused or closed a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limited {
    /// Too many connections from its source address.
    ConnectionsPerSource,
    /// Too many connections to this server.
    Connections,
    /// No complete request head within [`HEAD_TIMEOUT`].
    HeadTimeout,
    /// Its unfinished head went over the source's or the server's budget.
    HeadBudget,
    /// Its requests were mostly cancelled right after they started.
    PrematureCancels,
}

impl Limited {
    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Limited::ConnectionsPerSource => "connections_per_source",
            Limited::Connections => "connections",
            Limited::HeadTimeout => "head_timeout",
            Limited::HeadBudget => "head_budget",
            Limited::PrematureCancels => "premature_cancels",
        }
    }
}

impl std::fmt::Display for Limited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Limited::ConnectionsPerSource => "too many connections from this source",
            Limited::Connections => "too many connections",
            Limited::HeadTimeout => "no complete request head in time",
            Limited::HeadBudget => "request head over the memory budget",
            Limited::PrematureCancels => "requests cancelled right after they started",
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitedLabels {
    server: &'static str,
    reason: &'static str,
}

/// `mesh_http_server_limited_total{server,reason}`.
#[derive(Clone, Debug, Default)]
pub struct ServerMetrics(Family<LimitedLabels, Counter>);

impl ServerMetrics {
    /// Registers the counter.
    pub fn register(registry: &mut Registry) -> ServerMetrics {
        let metrics = ServerMetrics::default();
        registry.register(
            "mesh_http_server_limited",
            "HTTP server connections refused or closed by a limit, by server and reason",
            metrics.0.clone(),
        );
        metrics
    }
}

#[derive(Debug, Default)]
struct Usage {
    connections: usize,
    head_bytes: usize,
    sources: HashMap<IpAddr, Source>,
}

/// What one source address uses of a server.
#[derive(Debug, Default)]
struct Source {
    connections: usize,
    head_bytes: usize,
    /// Connections served before their first head.
    first_heads: usize,
    /// Woken, one at a time, when one of them got its first head or closed.
    turns: Arc<Notify>,
}

/// The caps of one server and what is in use of them.
#[derive(Debug)]
pub struct Gate {
    server: &'static str,
    limits: Limits,
    usage: Mutex<Usage>,
    metrics: ServerMetrics,
}

impl Gate {
    /// A server called `server` in the metrics.
    pub fn new(server: &'static str, limits: Limits, metrics: ServerMetrics) -> Arc<Gate> {
        Arc::new(Gate {
            server,
            limits,
            usage: Mutex::new(Usage::default()),
            metrics,
        })
    }

    fn usage(&self) -> std::sync::MutexGuard<'_, Usage> {
        self.usage.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count(&self, reason: Limited) {
        self.metrics
            .0
            .get_or_create(&LimitedLabels {
                server: self.server,
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Admits a connection from `source`, or says which cap it would break (counted).
    fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Arc<Conn>, Limited> {
        let mut usage = self.usage();
        let refused = if usage.connections >= self.limits.connections {
            Some(Limited::Connections)
        } else if usage.sources.get(&source).map_or(0, |s| s.connections)
            >= self.limits.connections_per_source
        {
            Some(Limited::ConnectionsPerSource)
        } else {
            None
        };
        if let Some(reason) = refused {
            drop(usage);
            self.count(reason);
            return Err(reason);
        }
        usage.connections += 1;
        let entry = usage.sources.entry(source).or_default();
        entry.connections += 1;
        let turns = entry.turns.clone();
        Ok(Arc::new(Conn {
            gate: self.clone(),
            source,
            start: Instant::now(),
            head_since: AtomicU64::new(1),
            head_bytes: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            exempt: AtomicBool::new(false),
            h2: AtomicBool::new(false),
            cancels: Cancels::default(),
            waiting_first: AtomicBool::new(false),
            turns,
            closing: Mutex::new(None),
            wake: Notify::new(),
        }))
    }

    /// Charges `n` more bytes of an unfinished head; false when a budget is exceeded.
    fn charge(&self, source: IpAddr, n: usize) -> bool {
        let mut usage = self.usage();
        let total = usage.head_bytes + n;
        let Some(entry) = usage.sources.get_mut(&source) else {
            return false;
        };
        if entry.head_bytes + n > self.limits.head_bytes_per_source
            || total > self.limits.head_bytes
        {
            return false;
        }
        entry.head_bytes += n;
        usage.head_bytes = total;
        true
    }

    /// Takes one of the source's turns to be served before a first head; false when all
    /// are taken.
    fn first_head_turn(&self, source: IpAddr) -> bool {
        let mut usage = self.usage();
        match usage.sources.get_mut(&source) {
            Some(entry) if entry.first_heads < self.limits.first_heads_per_source => {
                entry.first_heads += 1;
                true
            }
            _ => false,
        }
    }

    /// Gives back a turn taken with [`Gate::first_head_turn`] and wakes the source's next
    /// waiting connection.
    fn first_head_done(&self, source: IpAddr) {
        if let Some(entry) = self.usage().sources.get_mut(&source) {
            entry.first_heads = entry.first_heads.saturating_sub(1);
            entry.turns.notify_one();
        }
    }

    fn release(&self, source: IpAddr, head_bytes: usize, closed: bool) {
        let mut usage = self.usage();
        usage.head_bytes = usage.head_bytes.saturating_sub(head_bytes);
        if closed {
            usage.connections = usage.connections.saturating_sub(1);
        }
        if let Some(entry) = usage.sources.get_mut(&source) {
            entry.head_bytes = entry.head_bytes.saturating_sub(head_bytes);
            if closed {
                entry.connections = entry.connections.saturating_sub(1);
                if entry.connections == 0 {
                    usage.sources.remove(&source);
                }
            }
        }
    }
}

/// One admitted connection: its head clock and its share of the gate.
#[derive(Debug)]
struct Conn {
    gate: Arc<Gate>,
    source: IpAddr,
    start: Instant,
    /// Milliseconds after `start` (plus one) at which the head being waited for began; 0
    /// while none is (a request in flight, or idle between requests).
    head_since: AtomicU64,
    /// Bytes charged to the gate for the unfinished head.
    head_bytes: AtomicUsize,
    in_flight: AtomicUsize,
    /// HTTP/2 or upgraded: no head clock any more.
    exempt: AtomicBool,
    /// A request came over HTTP/2: draining sends GOAWAY.
    h2: AtomicBool,
    cancels: Cancels,
    /// Holds a turn of its source to be served before its first head.
    waiting_first: AtomicBool,
    /// Its source's turns.
    turns: Arc<Notify>,
    /// Set when a limit ends the connection.
    closing: Mutex<Option<Limited>>,
    wake: Notify,
}

impl Conn {
    fn since(&self) -> u64 {
        self.start.elapsed().as_millis() as u64 + 1
    }

    fn close(&self, reason: Limited) {
        let mut closing = self.closing.lock().unwrap_or_else(|e| e.into_inner());
        if closing.is_none() {
            *closing = Some(reason);
            self.gate.count(reason);
            self.wake.notify_one();
        }
    }

    fn closing(&self) -> Option<Limited> {
        *self.closing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `n` bytes were read from the client: charged to the head being waited for.
    fn read(&self, n: usize) -> io::Result<()> {
        if n == 0
            || self.exempt.load(Ordering::Acquire)
            || self.in_flight.load(Ordering::Acquire) > 0
        {
            return Ok(());
        }
        if self.head_since.load(Ordering::Acquire) == 0 {
            self.head_since.store(self.since(), Ordering::Release);
            self.wake.notify_one();
        }
        if !self.gate.charge(self.source, n) {
            self.close(Limited::HeadBudget);
            return Err(io::Error::other(Limited::HeadBudget.to_string()));
        }
        self.head_bytes.fetch_add(n, Ordering::AcqRel);
        Ok(())
    }

    /// A complete request head arrived.
    fn request(&self, version: http::Version) {
        if self.waiting_first.swap(false, Ordering::AcqRel) {
            self.gate.first_head_done(self.source);
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.cancels.started();
        self.head_since.store(0, Ordering::Release);
        if version == http::Version::HTTP_2 {
            self.exempt.store(true, Ordering::Release);
            if !self.h2.swap(true, Ordering::AcqRel) {
                self.wake.notify_one();
            }
        }
        let charged = self.head_bytes.swap(0, Ordering::AcqRel);
        if charged > 0 {
            self.gate.release(self.source, charged, false);
        }
    }

    /// A request ended; `premature`: cancelled by the client right after it started.
    fn request_done(&self, premature: bool) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        if premature && self.cancels.cancelled() {
            self.close(Limited::PrematureCancels);
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if *self.waiting_first.get_mut() {
            self.gate.first_head_done(self.source);
        }
        self.gate
            .release(self.source, *self.head_bytes.get_mut(), true);
    }
}

/// The client's connection, reads charged to the head being waited for; holds the
/// connection's place at the gate for as long as it lives (also after an upgrade).
struct Metered<I> {
    io: I,
    conn: Arc<Conn>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Metered<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.conn.read(buf.filled().len() - before)?;
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Metered<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Marks a response the handler made because the client went away mid-request (its body
/// ended in an error, its stream was reset): counted as a cancelled request.
#[derive(Clone, Copy, Debug)]
pub struct ClientGone;

/// One request in flight; ends when its response body does (or is dropped).
struct InFlight {
    conn: Arc<Conn>,
    started: Instant,
    done: bool,
    client_gone: bool,
}

impl InFlight {
    fn finish(&mut self, complete: bool) {
        if !self.done {
            self.done = true;
            let cancelled = self.client_gone || !complete;
            self.conn
                .request_done(cancelled && self.started.elapsed() < PREMATURE);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.finish(false);
    }
}

/// A response body that ends its request's [`InFlight`].
pub struct Guarded<B: Body> {
    inner: B,
    in_flight: InFlight,
}

impl<B> Body for Guarded<B>
where
    B: Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.in_flight.finish(true),
            // Trailers end a body; hyper does not poll past them.
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() || this.inner.is_end_stream() => {
                this.in_flight.finish(true)
            }
            _ => {}
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

impl<B> Drop for Guarded<B>
where
    B: Body,
{
    fn drop(&mut self) {
        // A body hyper never polled because it was empty is complete too.
        let complete = self.inner.is_end_stream();
        self.in_flight.finish(complete);
    }
}

/// How a connection ended.
#[derive(Debug)]
pub enum Served {
    /// Refused at accept or closed by a limit.
    Limited(Limited),
    /// Served until the client (or an error) ended it.
    Done(Result<(), BoxError>),
}

/// Serves HTTP/1.1 and HTTP/2 (prior knowledge) on `io` from `source` under `gate`'s limits,
/// with upgrades; each request goes to `handle`. Once `drain` starts, an HTTP/1.1 connection
/// is closed after its next response (`connection: close`; an idle one stays open, since
/// closing it would race with the client's next request) and an HTTP/2 one gets the graceful
/// two-step GOAWAY.
pub async fn serve<I, F, Fut, B>(
    gate: &Arc<Gate>,
    drain: &Drain,
    source: IpAddr,
    io: I,
    handle: F,
) -> Served
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    let conn = match gate.admit(source) {
        Ok(conn) => conn,
        Err(reason) => return Served::Limited(reason),
    };
    // Its turn to be served: until then the connection holds a socket and this task only.
    let deadline = tokio::time::Instant::from_std(conn.start + HEAD_TIMEOUT);
    loop {
        let turn = conn.turns.notified();
        tokio::pin!(turn);
        turn.as_mut().enable();
        if gate.first_head_turn(source) {
            conn.waiting_first.store(true, Ordering::Release);
            break;
        }
        if tokio::time::timeout_at(deadline, turn).await.is_err() {
            conn.close(Limited::HeadTimeout);
            return Served::Limited(Limited::HeadTimeout);
        }
    }
    let service = {
        let conn = conn.clone();
        let drain = drain.clone();
        service_fn(move |req: Request<Incoming>| {
            let version = req.version();
            conn.request(version);
            let mut in_flight = InFlight {
                conn: conn.clone(),
                started: Instant::now(),
                done: false,
                client_gone: false,
            };
            let response = handle(req);
            let drain = drain.clone();
            async move {
                let mut response = response.await;
                if drain.is_draining() && version < http::Version::HTTP_2 {
                    response
                        .headers_mut()
                        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
                }
                in_flight.client_gone = response.extensions().get::<ClientGone>().is_some();
                if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                    in_flight.conn.exempt.store(true, Ordering::Release);
                }
                Ok::<_, std::convert::Infallible>(
                    response.map(|inner| Guarded { inner, in_flight }),
                )
            }
        })
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(MAX_HEAD)
        .max_headers(MAX_HEADERS)
        // The head clock here replaces hyper's, which would also end idle keep-alives.
        .header_read_timeout(None);
    builder
        .http2()
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEAD as u32)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESETS);
    let io = TokioIo::new(Metered {
        io,
        conn: conn.clone(),
    });
    let connection = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);
    let draining = drain.started();
    tokio::pin!(draining);
    let (mut drained, mut goaway) = (false, false);
    loop {
        if let Some(reason) = conn.closing() {
            return Served::Limited(reason);
        }
        if drained && !goaway && conn.h2.load(Ordering::Acquire) {
            connection.as_mut().graceful_shutdown();
            goaway = true;
        }
        let since = conn.head_since.load(Ordering::Acquire);
        let deadline = (since != 0 && !conn.exempt.load(Ordering::Acquire))
            .then(|| conn.start + Duration::from_millis(since - 1) + HEAD_TIMEOUT);
        let timer = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            served = &mut connection => {
                return match conn.closing() {
                    Some(reason) => Served::Limited(reason),
                    None => Served::Done(served),
                };
            }
            () = conn.wake.notified() => {}
            () = &mut draining, if !drained => drained = true,
            () = timer => {
                if conn.head_since.load(Ordering::Acquire) == since
                    && !conn.exempt.load(Ordering::Acquire)
                {
                    conn.close(Limited::HeadTimeout);
                    return Served::Limited(Limited::HeadTimeout);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(limits: Limits) -> Arc<Gate> {
        Gate::new("test", limits, ServerMetrics::default())
    }

    #[test]
    fn connections_are_capped_per_source_and_in_all() {
        let gate = gate(Limits {
            connections_per_source: 2,
            connections: 3,
            ..Limits::L7
        });
        let a: IpAddr = [100, 65, 0, 2].into();
        let b: IpAddr = [100, 65, 0, 3].into();
        let first = gate.admit(a).unwrap();
        let _second = gate.admit(a).unwrap();
        assert_eq!(gate.admit(a).unwrap_err(), Limited::ConnectionsPerSource);
        let _third = gate.admit(b).unwrap();
        assert_eq!(gate.admit(b).unwrap_err(), Limited::Connections);
        drop(first);
        assert!(gate.admit(a).is_ok(), "a closed connection frees its place");
    }

    #[test]
    fn unfinished_heads_are_charged_until_the_request_arrives() {
        let gate = gate(Limits {
            head_bytes_per_source: 100,
            head_bytes: 150,
            ..Limits::L7
        });
        let a: IpAddr = [100, 65, 0, 2].into();
        let b: IpAddr = [100, 65, 0, 3].into();
        let one = gate.admit(a).unwrap();
        one.read(60).unwrap();
        let two = gate.admit(a).unwrap();
        assert!(two.read(60).is_err(), "over the source's budget");
        assert_eq!(two.closing(), Some(Limited::HeadBudget));
        let three = gate.admit(b).unwrap();
        three.read(90).unwrap();
        assert!(three.read(10).is_err(), "over the server's budget");
        one.request(http::Version::HTTP_11);
        assert_eq!(gate.usage().head_bytes, 90, "a complete head is released");
        one.read(50).unwrap();
        assert_eq!(gate.usage().head_bytes, 90, "body bytes are not charged");
    }

    #[test]
    fn a_source_gets_a_few_turns_before_first_heads() {
        let gate = gate(Limits {
            first_heads_per_source: 1,
            ..Limits::L7
        });
        let a: IpAddr = [100, 65, 0, 2].into();
        let first = gate.admit(a).unwrap();
        let second = gate.admit(a).unwrap();
        assert!(gate.first_head_turn(a));
        first.waiting_first.store(true, Ordering::Release);
        assert!(!gate.first_head_turn(a), "the source's one turn is taken");
        let woken = second.turns.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        first.request(http::Version::HTTP_11);
        assert!(
            futures_util::FutureExt::now_or_never(woken).is_some(),
            "the next connection of the source is woken"
        );
        assert!(gate.first_head_turn(a), "the turn is free again");
    }

    #[test]
    fn mostly_cancelled_requests_close_the_connection() {
        let gate = gate(Limits::L7);
        let conn = gate.admit([100, 65, 0, 2].into()).unwrap();
        for _ in 0..MAX_PREMATURE_CANCELS - 1 {
            conn.request(http::Version::HTTP_2);
            conn.request_done(true);
        }
        assert_eq!(conn.closing(), None);
        conn.request(http::Version::HTTP_2);
        conn.request_done(true);
        assert_eq!(conn.closing(), Some(Limited::PrematureCancels));
    }
}
