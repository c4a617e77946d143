//! The transport layer, under both L4 (`proxy`) and L7 (`http`): listeners, connections made
//! from a client's address, the byte relays (TCP to TCP, TCP to an HTTP/2 stream), the HBONE
//! client pool ([`pool`]) and an HBONE stream as a socket ([`tunnel`]). It imports neither
//! `proxy` nor `http`. Every connection it makes carries `MARK_PROXY`, so no
//! capture rule takes it again, and goes only where the policy gate let it
//! ([`crate::gate::Authorized`]).

pub mod error;
pub mod pool;
pub mod tunnel;

pub use error::Error;
pub use pool::Pool;

use std::{
    future::Future,
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use mesh_common::MARK_PROXY;
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpSocket, TcpStream},
};

use crate::{gate::Authorized, sys, telemetry::Live};

/// How long to wait for an upstream connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest read from a TCP socket in a relay (plain or into an HTTP/2 tunnel).
const COPY_BUFFER: usize = 64 * 1024;

/// Binds a transparent listener on `127.0.0.1:port`. It carries `MARK_PROXY`, and so do its
/// handshake answers and the connections it accepts (they inherit the listener's mark): every
/// packet the proxy sends has it, which the conntrack bypass relies on (capture::routing).
pub fn bind_listener(port: u16) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_ip_transparent_v4(true)?;
    socket.set_mark(MARK_PROXY)?;
    socket.set_nonblocking(true)?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// The kernel-facing parts of the data path, behind one seam: making a connection from a
/// client's address, learning where a captured connection was going, steering the replies of
/// a connection made as a pod outside the mesh. [`Kernel`] is the node proxy's; an in-process
/// proxy (tests, as a normal user) uses [`Loopback`].
pub trait Sockets: Send + Sync + 'static {
    /// A socket ready to connect to `upstream` from `source` (unspecified: the node's own
    /// address).
    fn dial(&self, source: Ipv4Addr, upstream: SocketAddr) -> io::Result<TcpSocket>;

    /// A socket bound to `source` (a local pod outside the mesh) to connect to `upstream`,
    /// whose replies would otherwise go straight to the pod: they are steered back to the
    /// proxy before the SYN leaves.
    fn dial_steered(&self, source: Ipv4Addr, upstream: SocketAddrV4) -> io::Result<TcpSocket>;

    /// Where a captured connection was going.
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr>;
}

/// The node proxy's sockets: transparent (`IP_TRANSPARENT`) connections from the client's
/// address carrying `MARK_PROXY`, the original destination from `getsockname()` (after the
/// kernel's `sk_lookup`) or conntrack (after a kube-proxy DNAT), replies steered by the
/// capture program's flow map.
pub struct Kernel {
    /// The capture program's reply steering.
    pub replies: Arc<crate::capture::ReplySteering>,
}

impl Sockets for Kernel {
    fn dial(&self, source: Ipv4Addr, upstream: SocketAddr) -> io::Result<TcpSocket> {
        let socket = match upstream {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        let sock = SockRef::from(&socket);
        sock.set_mark(MARK_PROXY)?;
        if upstream.is_ipv4() && !source.is_unspecified() {
            sock.set_ip_transparent_v4(true)?;
            // The port is chosen at connect time, per destination.
            sys::set_bind_address_no_port(&socket)?;
            socket.bind(SocketAddr::from((source, 0)))?;
        }
        Ok(socket)
    }

    fn dial_steered(&self, source: Ipv4Addr, upstream: SocketAddrV4) -> io::Result<TcpSocket> {
        let socket = TcpSocket::new_v4()?;
        let sock = SockRef::from(&socket);
        sock.set_mark(MARK_PROXY)?;
        sock.set_ip_transparent_v4(true)?;
        // The port is taken now: the reply direction must be known before the SYN leaves.
        socket.bind(SocketAddr::from((source, 0)))?;
        let SocketAddr::V4(local) = socket.local_addr()? else {
            return Err(io::Error::other(
                "bound an IPv4 socket to a non-IPv4 address",
            ));
        };
        self.replies
            .add(upstream, local)
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(socket)
    }

    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        // Without NAT on the node, conntrack's original destination equals the local address;
        // after a kube-proxy DNAT it is the Service VIP the client dialled.
        sys::original_dst(stream).map_or_else(|| stream.local_addr(), Ok)
    }
}

/// Sockets of an in-process proxy on loopback, with no privilege: pods are `127.x.y.z`
/// addresses (all local), a connection from a pod binds its address, and the original
/// destination of an accepted connection is what the test registered for its client
/// ([`Loopback::capture`]), else the listener's address.
#[derive(Default)]
pub struct Loopback {
    captured: std::sync::Mutex<std::collections::HashMap<SocketAddr, SocketAddr>>,
}

impl Loopback {
    /// The next connection from `client` was going to `original_dst`.
    pub fn capture(&self, client: SocketAddr, original_dst: SocketAddr) {
        self.captured
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(client, original_dst);
    }
}

impl Sockets for Loopback {
    fn dial(&self, source: Ipv4Addr, upstream: SocketAddr) -> io::Result<TcpSocket> {
        let socket = match upstream {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if upstream.is_ipv4() && !source.is_unspecified() {
            socket.bind(SocketAddr::from((source, 0)))?;
        }
        Ok(socket)
    }

    fn dial_steered(&self, source: Ipv4Addr, upstream: SocketAddrV4) -> io::Result<TcpSocket> {
        self.dial(source, upstream.into())
    }

    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        let captured = self
            .captured
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&stream.peer_addr()?);
        captured.map_or_else(|| stream.local_addr(), Ok)
    }
}

/// Connects where the gate let it (`to`) from `source` (the client pod's address, so the
/// server sees the real client; unspecified for the node's own).
pub(crate) async fn connect(
    sockets: &dyn Sockets,
    source: Ipv4Addr,
    to: &Authorized,
) -> Result<TcpStream, Error> {
    let upstream = to.target();
    let socket = sockets
        .dial(source, upstream)
        .map_err(|e| Error::connect(upstream, e))?;
    finish_connect(socket, upstream).await
}

/// Connects where the gate let it (`to`) as `source`, a local pod outside the mesh, whose
/// replies are steered back to the proxy ([`Sockets::dial_steered`]).
pub(crate) async fn connect_steered(
    sockets: &dyn Sockets,
    source: Ipv4Addr,
    to: &Authorized,
) -> Result<TcpStream, Error> {
    let SocketAddr::V4(upstream) = to.target() else {
        let error = io::Error::other("steered connections are IPv4 only");
        return Err(Error::connect(to.target(), error));
    };
    let socket = sockets
        .dial_steered(source, upstream)
        .map_err(|e| Error::connect(upstream.into(), e))?;
    finish_connect(socket, upstream.into()).await
}

async fn finish_connect(socket: TcpSocket, upstream: SocketAddr) -> Result<TcpStream, Error> {
    let _ = socket.set_nodelay(true);
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(upstream)).await {
        Ok(result) => result.map_err(|e| Error::connect(upstream, e))?,
        Err(_) => {
            let timed_out = io::Error::from(io::ErrorKind::TimedOut);
            return Err(Error::connect(upstream, timed_out));
        }
    };
    keepalive(&stream);
    Ok(stream)
}

/// Detects peers that vanished without a word (a deleted pod, a dead node): after 60 s idle,
/// probes every 10 s, gives up after 6 unanswered probes.
pub(crate) fn keepalive(stream: &TcpStream) {
    let params = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(6);
    let _ = SockRef::from(stream).set_tcp_keepalive(&params);
}

/// Makes the peer see a reset rather than a clean close when the stream is dropped.
pub(crate) fn reset(stream: &impl std::os::fd::AsFd) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Bytes relayed.
#[derive(Debug, Default)]
pub(crate) struct Copied {
    /// Client to server.
    pub sent: u64,
    /// Server to client.
    pub received: u64,
}

/// One direction of a plain relay, as it stands between two steps: bytes read and not yet
/// written, whether the reading side has ended, whether that end was passed on. Kept outside
/// the copying future, so a relay paused at any await point leaves it exact (the successor
/// of an upgrade goes on from it: [`crate::drain`]).
#[derive(Debug, Default)]
pub struct Half {
    /// Read, not yet written.
    pub pending: bytes::BytesMut,
    /// The reading side's end of stream has been read.
    pub eof: bool,
    /// ... and passed on (the writing side is shut down).
    pub shut: bool,
}

/// How a plain relay ended.
pub(crate) enum Ended {
    /// Both directions finished, or one failed or `stop` resolved (the error).
    Done(Option<io::Error>),
    /// `pause` resolved: where each direction stands (client to server, server to client).
    Paused([Half; 2]),
}

/// Copies both ways between two TCP connections until both directions end, starting from
/// `halves` (client to server, server to client; [`Half::default`] for a new connection). An
/// end of stream is passed on as a half-close, so either side may keep sending after the
/// other finished. Stops at the first error, or when `stop` resolves (an error then); when
/// `pause` resolves, stops between steps and returns where it stands. The byte counts are
/// kept either way.
pub(crate) async fn relay(
    client: &mut TcpStream,
    server: &mut TcpStream,
    live: &Live,
    stop: impl Future<Output = ()>,
    pause: impl Future<Output = ()>,
    halves: [Half; 2],
) -> (Copied, Ended) {
    let (mut client_read, mut client_write) = client.split();
    let (mut server_read, mut server_write) = server.split();
    let mut copied = Copied::default();
    let [mut up, mut down] = halves;
    // The copies are made inside `select!`: made before it and moved in, a future would be
    // held twice in this one (an idle connection's memory is mostly its relay's future).
    let ended = tokio::select! {
        result = async {
            tokio::try_join!(
                pipe(&mut client_read, &mut server_write, &mut up, &mut copied.sent, |n| {
                    live.client_bytes(n)
                }),
                pipe(
                    &mut server_read,
                    &mut client_write,
                    &mut down,
                    &mut copied.received,
                    |n| live.server_bytes(n)
                ),
            )
        } => Ended::Done(result.err()),
        () = stop => Ended::Done(Some(stopped())),
        () = pause => Ended::Paused([std::mem::take(&mut up), std::mem::take(&mut down)]),
    };
    (copied, ended)
}

/// Moves one direction on from where `half` stands: writes what is pending, passes the end
/// of stream on, reads the next bytes. Every await is cancel-safe (a write either happened
/// and is accounted for, or did not), so `half` is exact whenever this is dropped.
async fn pipe(
    from: &mut tokio::net::tcp::ReadHalf<'_>,
    to: &mut tokio::net::tcp::WriteHalf<'_>,
    half: &mut Half,
    count: &mut u64,
    counted: impl Fn(u64),
) -> io::Result<()> {
    loop {
        if !half.pending.is_empty() && half.eof {
            // The last bytes and the end of stream in one segment (corked, the FIN joins the
            // queued data): the receiver gets both at once, as it would from the sender
            // directly. Sent apart, a client that reads its answer before the FIN arrives
            // closes first and holds the TIME_WAIT, on its own ports, which piles up in a
            // burst of new connections (docs/benchmarks.md, churn).
            let _ = SockRef::from(to.as_ref()).set_tcp_cork(true);
        }
        while !half.pending.is_empty() {
            let n = to.write(&half.pending).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            bytes::Buf::advance(&mut half.pending, n);
            *count += n as u64;
            counted(n as u64);
        }
        // The buffer exists only while data is in hand (an idle connection holds none).
        half.pending = bytes::BytesMut::new();
        if half.eof {
            if !half.shut {
                to.shutdown().await?;
                half.shut = true;
            }
            return Ok(());
        }
        match read_when_ready(from).await? {
            None => half.eof = true,
            Some(Read { data, last }) => {
                half.pending = data;
                half.eof = last;
            }
        }
    }
}

/// What one read from a relay's TCP side got.
struct Read {
    data: bytes::BytesMut,
    /// The peer's end of stream came with these bytes: nothing follows them.
    last: bool,
}

/// Waits until `from` is readable, then reads what is there (`None` at end of stream). The
/// buffer exists only while data is in hand, so an idle connection holds none (a buffer
/// reserved per direction while waiting would be most of an idle connection's memory).
async fn read_when_ready(from: &mut tokio::net::tcp::ReadHalf<'_>) -> io::Result<Option<Read>> {
    loop {
        let ready = from.as_ref().ready(tokio::io::Interest::READABLE).await?;
        let mut data = bytes::BytesMut::with_capacity(COPY_BUFFER);
        let room = data.capacity();
        match from.as_ref().try_read_buf(&mut data) {
            Ok(0) => return Ok(None),
            // The FIN was in before this read (the readiness saw it) and the read left
            // room, so it drained the queue up to the FIN.
            Ok(n) => {
                return Ok(Some(Read {
                    data,
                    last: ready.is_read_closed() && n < room,
                }))
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
            Err(err) => return Err(err),
        }
    }
}

/// Writes the last bytes of a direction and its end of stream in one segment (corked, as in
/// [`pipe`]).
async fn write_last(to: &mut tokio::net::tcp::WriteHalf<'_>, data: &[u8]) -> io::Result<()> {
    let _ = SockRef::from(to.as_ref()).set_tcp_cork(true);
    to.write_all(data).await?;
    to.shutdown().await
}

/// Which end of the connection the TCP socket of a tunnel relay is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum TcpEnd {
    /// The client pod (source side of HBONE).
    Client,
    /// The server pod (destination side).
    Server,
}

/// Copies both ways between a TCP connection and an HTTP/2 stream (an HBONE tunnel), with
/// HTTP/2 flow control as back pressure. End of stream maps to a half-close both ways. Stops
/// at the first error or when `stop` resolves, and then resets the stream.
pub(crate) async fn relay_h2(
    tcp: &mut TcpStream,
    mut send: h2::SendStream<Bytes>,
    mut recv: h2::RecvStream,
    end: TcpEnd,
    live: &Live,
    stop: impl Future<Output = ()>,
) -> (Copied, Option<io::Error>) {
    let (mut tcp_read, mut tcp_write) = tcp.split();
    let mut from_tcp = 0u64;
    let mut from_h2 = 0u64;
    let (count_tcp, count_h2): (&Counted<'_>, &Counted<'_>) = match end {
        TcpEnd::Client => (&|n| live.client_bytes(n), &|n| live.server_bytes(n)),
        TcpEnd::Server => (&|n| live.server_bytes(n), &|n| live.client_bytes(n)),
    };
    // Made inside `select!`, as in `relay`.
    let result = tokio::select! {
        result = async {
            tokio::try_join!(
                tcp_to_h2(&mut tcp_read, &mut send, &mut from_tcp, count_tcp),
                h2_to_tcp(&mut recv, &mut tcp_write, &mut from_h2, count_h2),
            )
        } => result.map(drop),
        () = stop => Err(stopped()),
    };
    if result.is_err() {
        send.send_reset(h2::Reason::CANCEL);
    }
    let copied = match end {
        TcpEnd::Client => Copied {
            sent: from_tcp,
            received: from_h2,
        },
        TcpEnd::Server => Copied {
            sent: from_h2,
            received: from_tcp,
        },
    };
    (copied, result.err())
}

/// The error of a relay that its `stop` ended.
fn stopped() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "relay stopped: the connection was revoked",
    )
}

/// Called with each relayed chunk's size.
type Counted<'a> = dyn Fn(u64) + Sync + 'a;

async fn tcp_to_h2(
    from: &mut tokio::net::tcp::ReadHalf<'_>,
    to: &mut h2::SendStream<Bytes>,
    count: &mut u64,
    counted: &Counted<'_>,
) -> io::Result<()> {
    loop {
        let Some(Read { data, last }) = read_when_ready(from).await? else {
            return to.send_data(Bytes::new(), true).map_err(h2_io);
        };
        let n = data.len();
        let mut data = data.freeze();
        while !data.is_empty() {
            to.reserve_capacity(data.len());
            let granted = std::future::poll_fn(|cx| to.poll_capacity(cx))
                .await
                .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "tunnel stream closed"))?
                .map_err(h2_io)?;
            if granted == 0 {
                continue;
            }
            let chunk = data.split_to(granted.min(data.len()));
            // The last bytes carry END_STREAM: one frame, written out together at the other
            // end (write_last).
            to.send_data(chunk, last && data.is_empty())
                .map_err(h2_io)?;
        }
        *count += n as u64;
        counted(n as u64);
        if last {
            return Ok(());
        }
    }
}

async fn h2_to_tcp(
    from: &mut h2::RecvStream,
    to: &mut tokio::net::tcp::WriteHalf<'_>,
    count: &mut u64,
    counted: &Counted<'_>,
) -> io::Result<()> {
    while let Some(chunk) = from.data().await {
        let chunk = chunk.map_err(h2_io)?;
        let last = from.is_end_stream();
        if last {
            write_last(to, &chunk).await?;
        } else {
            to.write_all(&chunk).await?;
        }
        let n = chunk.len();
        let _ = from.flow_control().release_capacity(n);
        *count += n as u64;
        counted(n as u64);
        if last {
            return Ok(());
        }
    }
    to.shutdown().await
}

/// An HTTP/2 error as an I/O error (a reset stream is a reset connection).
/// Whether an error from an HBONE stream (as [`h2_io`] made it) is the peer's RST_STREAM.
pub(crate) fn reset_by_peer(error: &io::Error) -> bool {
    error
        .get_ref()
        .and_then(|e| e.downcast_ref::<h2::Error>())
        .is_some_and(|e| e.is_reset() && e.is_remote())
}

pub(crate) fn h2_io(err: h2::Error) -> io::Error {
    if err.is_io() {
        return err
            .into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    io::Error::new(io::ErrorKind::ConnectionReset, err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A connected pair on loopback: (the relay's end, the application's end).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (relay, _) = listener.accept().await.unwrap();
        (relay, app)
    }

    /// A relay paused while bytes flow, then resumed from where it stood (as a successor
    /// does), delivers every byte once, in order, and passes the half-close on.
    #[tokio::test]
    async fn a_paused_relay_resumes_with_nothing_lost_or_repeated() {
        let (mut client, mut client_app) = pair().await;
        let (mut server, mut server_app) = pair().await;
        const TOTAL: usize = 4 << 20;
        let data: Vec<u8> = (0..TOTAL).map(|i| (i % 251) as u8).collect();
        let sender = tokio::spawn({
            let data = data.clone();
            async move {
                client_app.write_all(&data).await.unwrap();
                client_app.shutdown().await.unwrap();
                client_app
            }
        });
        // The server side reads slowly at first, so bytes back up in the relay.
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut chunk = vec![0u8; 8192];
            loop {
                let n = server_app.read(&mut chunk).await.unwrap();
                if n == 0 {
                    return got;
                }
                got.extend_from_slice(&chunk[..n]);
                if got.len() < TOTAL / 2 {
                    tokio::time::sleep(std::time::Duration::from_micros(200)).await;
                }
            }
        });
        let live = Live::none();
        let mut halves: [Half; 2] = Default::default();
        let mut pauses = 0;
        loop {
            let (_, ended) = relay(
                &mut client,
                &mut server,
                &live,
                std::future::pending(),
                tokio::time::sleep(std::time::Duration::from_millis(3)),
                halves,
            )
            .await;
            match ended {
                Ended::Paused(stood) => {
                    pauses += 1;
                    halves = stood;
                }
                Ended::Done(error) => {
                    assert!(error.is_none(), "{error:?}");
                    break;
                }
            }
            // The server side answers nothing; end it once the client's side is done, so
            // the relay can finish both ways.
            if halves[0].shut && !halves[1].eof {
                break;
            }
        }
        assert!(
            pauses > 2,
            "the relay finished before it was paused ({pauses})"
        );
        let got = reader.await.unwrap();
        assert_eq!(got.len(), TOTAL);
        assert!(got == data, "bytes were lost, repeated or reordered");
        drop(sender.await.unwrap());
    }
}
