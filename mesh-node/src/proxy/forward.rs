//! One proxied TCP connection, from accept to record (L4 passthrough).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use mesh_common::MARK_PROXY;
use socket2::SockRef;
use tokio::net::{TcpSocket, TcpStream};

use super::connections::{now_ms, ConnectionRecord, Connections};
use crate::{
    metrics::ProxyMetrics,
    state::{Resolution, State},
    sys,
};

/// How long to wait for an upstream connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Copy buffer per direction.
const COPY_BUFFER: usize = 64 * 1024;

/// Which listener accepted the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From a local enrolled pod (`:15001`).
    Outbound,
    /// To a local enrolled pod (`:15006`).
    Inbound,
}

impl Direction {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// What every connection handler shares.
pub struct ProxyContext {
    /// The current config snapshot.
    pub state: Arc<ArcSwap<State>>,
    /// The connection record.
    pub connections: Arc<Connections>,
    /// Metrics.
    pub metrics: ProxyMetrics,
}

/// A connection that could not be forwarded.
struct Refusal {
    flag: &'static str,
    error: String,
    service: Option<String>,
    upstream: Option<SocketAddr>,
}

/// Handles one accepted connection.
pub async fn handle(
    ctx: Arc<ProxyContext>,
    direction: Direction,
    client: TcpStream,
    peer: SocketAddr,
) {
    let Ok(local) = client.local_addr() else {
        return;
    };
    // Without NAT on the node, conntrack's original destination equals the local address;
    // after a kube-proxy DNAT it is the Service VIP the client dialled.
    let original_dst = sys::original_dst(&client).unwrap_or(local);
    let metrics = &ctx.metrics;
    metrics.opened(direction);
    let id = ctx.connections.open(ConnectionRecord {
        id: 0,
        direction: direction.as_str(),
        client: peer,
        original_dst,
        service: None,
        upstream: None,
        opened_ms: now_ms(),
        closed_ms: None,
        bytes_sent: 0,
        bytes_received: 0,
        flag: "",
        error: None,
    });

    let result = forward(&ctx, direction, client, original_dst).await;
    let flag = match &result {
        Ok(done) => done.flag,
        Err(refusal) => refusal.flag,
    };
    metrics.closed(direction, flag);
    ctx.connections.close(id, |record| match result {
        Ok(done) => {
            record.service = done.service;
            record.upstream = Some(done.upstream);
            record.bytes_sent = done.sent;
            record.bytes_received = done.received;
            record.flag = done.flag;
            record.error = done.error;
            metrics.bytes(direction, done.sent, done.received);
        }
        Err(refusal) => {
            tracing::debug!(%peer, %original_dst, flag = refusal.flag, "refused: {}", refusal.error);
            record.service = refusal.service;
            record.upstream = refusal.upstream;
            record.flag = refusal.flag;
            record.error = Some(refusal.error);
        }
    });
}

struct Forwarded {
    service: Option<String>,
    upstream: SocketAddr,
    sent: u64,
    received: u64,
    flag: &'static str,
    error: Option<String>,
}

async fn forward(
    ctx: &ProxyContext,
    direction: Direction,
    mut client: TcpStream,
    original_dst: SocketAddr,
) -> Result<Forwarded, Refusal> {
    let (service, upstream) = match direction {
        Direction::Inbound => (None, original_dst),
        Direction::Outbound => {
            let state = ctx.state.load();
            match state.resolve(original_dst) {
                Resolution::Direct => (None, original_dst),
                Resolution::Service(target) => {
                    let service = Some(target.qualified_name());
                    match target.pick() {
                        Some(endpoint) => (service, SocketAddr::V4(endpoint)),
                        None => {
                            reset(&client);
                            return Err(Refusal {
                                flag: "UH",
                                error: "no ready endpoint".into(),
                                service,
                                upstream: None,
                            });
                        }
                    }
                }
                Resolution::UnknownServicePort { service } => {
                    reset(&client);
                    return Err(Refusal {
                        flag: "NR",
                        error: format!(
                            "port {} is not a port of Service {service}",
                            original_dst.port()
                        ),
                        service: Some(service),
                        upstream: None,
                    });
                }
            }
        }
    };

    let mut server = match connect(upstream).await {
        Ok(server) => server,
        Err(err) => {
            reset(&client);
            return Err(Refusal {
                flag: "UF",
                error: format!("connect to {upstream}: {err}"),
                service,
                upstream: Some(upstream),
            });
        }
    };
    let _ = client.set_nodelay(true);
    keepalive(&client);
    keepalive(&server);
    let (copied, error) = relay(&mut client, &mut server).await;
    if error.is_some() {
        // One side broke (for example reset): reset the other too, so it does not take a
        // truncated stream for a complete one.
        reset(&client);
        reset(&server);
    }
    Ok(Forwarded {
        service,
        upstream,
        sent: copied.sent,
        received: copied.received,
        flag: if error.is_some() { "DC" } else { "" },
        error: error.map(|e| e.to_string()),
    })
}

#[derive(Default)]
struct Copied {
    sent: u64,
    received: u64,
}

/// Copies both ways until both directions end. An end of stream is passed on as a half-close
/// (`shutdown(Write)`), so either side may keep sending after the other finished. Stops at
/// the first error; the byte counts are kept either way.
async fn relay(client: &mut TcpStream, server: &mut TcpStream) -> (Copied, Option<std::io::Error>) {
    let (mut client_read, mut client_write) = client.split();
    let (mut server_read, mut server_write) = server.split();
    let mut copied = Copied::default();
    let result = tokio::try_join!(
        pipe(&mut client_read, &mut server_write, &mut copied.sent),
        pipe(&mut server_read, &mut client_write, &mut copied.received),
    );
    (copied, result.err())
}

async fn pipe<R, W>(from: &mut R, to: &mut W, count: &mut u64) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        *count += n as u64;
    }
}

/// Detects peers that vanished without a word (a deleted pod, a dead node): after 60 s idle,
/// probes every 10 s, gives up after 6 unanswered probes.
fn keepalive(stream: &TcpStream) {
    let params = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(6);
    let _ = SockRef::from(stream).set_tcp_keepalive(&params);
}

/// Connects to `upstream` with the proxy's socket mark, so no capture rule touches it.
async fn connect(upstream: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = match upstream {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    SockRef::from(&socket).set_mark(MARK_PROXY)?;
    socket.set_nodelay(true)?;
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(upstream)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "timed out",
        )),
    }
}

/// Makes the client see a reset rather than a clean close.
fn reset(client: &TcpStream) {
    let _ = SockRef::from(client).set_linger(Some(Duration::ZERO));
}
