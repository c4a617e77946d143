//! The source side of HBONE: tunnels multiplexed over pooled mTLS HTTP/2 connections to the
//! peers' node proxies, one pool per (source workload, destination identity, destination
//! address) as ztunnel keys them. A pooled connection takes streams up to the peer's limit,
//! then another one is opened. The outer TCP connection leaves from the source pod's address
//! (`IP_TRANSPARENT`). The client accepts only the destination workload's SPIFFE ID. After the
//! source's certificate is renewed, connections made with the old one take no new streams and
//! close once their streams end.

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
use http::{Method, Request, StatusCode};
use mesh_common::PORT_HBONE;
use rustls::pki_types::ServerName;

use crate::{
    gate::Authorized,
    identity::{tls, Certificates, WorkloadCert},
    metrics::ProxyMetrics,
};

use super::Error;

/// What the pool needs of the node: its certificates (the roots a peer must chain to) and
/// the handshake metrics.
#[derive(Clone, Copy)]
pub struct Peers<'a> {
    /// This node's certificates.
    pub certs: &'a Certificates,
    /// Where handshakes are counted.
    pub metrics: &'a ProxyMetrics,
    /// How connections are made.
    pub sockets: &'a dyn super::Sockets,
}

/// HTTP/2 flow-control windows: large enough that one stream fills a fast link (the
/// bandwidth-delay product inside a cluster is small; a window below a few hundred KiB
/// stalls bulk transfers), the connection's large enough for several streams.
pub(crate) const STREAM_WINDOW: u32 = 4 << 20;
pub(crate) const CONNECTION_WINDOW: u32 = 16 << 20;
/// Largest HTTP/2 frame accepted.
pub(crate) const MAX_FRAME: u32 = 1 << 20;
/// Streams a client may open on one connection (ztunnel's default).
pub(crate) const MAX_STREAMS: u32 = 100;
/// TLS (and HTTP/2) handshake deadline.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for a tunnel to be answered: the destination proxy's own connect timeout (5 s)
/// plus room. A peer that stalls beyond it gets the connection marked broken and the client
/// reset.
const STREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// A pooled connection without streams for this long is closed (by default).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a pooled connection's peer is pinged, and how long it has to answer.
const PING_EVERY: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Tries of one tunnel: a dead or closing pooled connection, then a new one that turned out
/// to be closing too, then one more.
const ATTEMPTS: usize = 3;
/// How often the pool drops idle, broken and superseded connections.
const REAP_EVERY: Duration = Duration::from_secs(1);

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
    /// Drops broken, superseded and (after `idle`) unused connections every second
    /// (dropping the pool's handle closes a connection once its last stream ends).
    pub fn spawn_reaper(&self, certs: Arc<Certificates>, idle: Duration) {
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
                            && now.duration_since(since) >= idle;
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
        peers: Peers<'_>,
        source: std::net::Ipv4Addr,
        cert: &WorkloadCert,
        identity: &str,
        to: &Authorized,
    ) -> Result<(h2::SendStream<Bytes>, h2::RecvStream, StreamGuard), Error> {
        let (SocketAddr::V4(target), Some(tunnel)) = (to.target(), to.tunnel()) else {
            return Err(Error::NotTunnelled {
                target: to.target(),
            });
        };
        let key = Key {
            source,
            source_identity: cert.identity.clone(),
            identity: identity.to_string(),
            destination: SocketAddrV4::new(*target.ip(), PORT_HBONE),
        };
        // A pooled connection can turn out to be dead (the peer went away) or closing (its
        // proxy hands over to a successor: GOAWAY, REFUSED_STREAM): then try again on a new
        // one.
        for attempt in 0..ATTEMPTS {
            let retry = attempt + 1 < ATTEMPTS;
            let conn = match self.checkout(&key, cert.generation) {
                Some(conn) => conn,
                None => self.checkout_or_connect(peers, &key, cert, &tunnel).await?,
            };
            let guard = StreamGuard(conn.clone());
            let ready = tokio::time::timeout(STREAM_TIMEOUT, conn.sender.clone().ready()).await;
            let mut sender = match ready {
                Ok(Ok(sender)) => sender,
                failed => {
                    conn.closed.store(true, Ordering::Release);
                    if retry {
                        continue;
                    }
                    let why = match failed {
                        Ok(Err(err)) => err.to_string(),
                        _ => "no stream slot within the deadline".to_string(),
                    };
                    return Err(Error::Stream {
                        target,
                        detail: format!("HBONE connection to {}: {why}", key.destination),
                    });
                }
            };
            let request = Request::builder()
                .method(Method::CONNECT)
                .uri(target.to_string())
                .version(http::Version::HTTP_2)
                .body(())
                .map_err(|e| Error::Stream {
                    target,
                    detail: e.to_string(),
                })?;
            let (response, send) = match sender.send_request(request, false) {
                Ok(sent) => sent,
                Err(err) => {
                    conn.closed.store(true, Ordering::Release);
                    if retry {
                        continue;
                    }
                    return Err(Error::Stream {
                        target,
                        detail: err.to_string(),
                    });
                }
            };
            let response = match tokio::time::timeout(STREAM_TIMEOUT, response).await {
                Ok(Ok(response)) => response,
                // Not answered: nothing went through this stream yet, so a new one is as good.
                Ok(Err(err)) if retry && never_served(&err) => {
                    conn.closed.store(true, Ordering::Release);
                    continue;
                }
                Ok(Err(err)) => {
                    return Err(Error::Stream {
                        target,
                        detail: err.to_string(),
                    })
                }
                Err(_) => {
                    // The peer does not answer: take the connection out of service.
                    conn.closed.store(true, Ordering::Release);
                    return Err(Error::Stream {
                        target,
                        detail: format!(
                            "no answer within {STREAM_TIMEOUT:?}: is the destination node's \
                             proxy overloaded or stuck?"
                        ),
                    });
                }
            };
            return match response.status() {
                StatusCode::OK => Ok((send, response.into_body(), guard)),
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(Error::Denied { target }),
                status => Err(Error::Stream {
                    target,
                    detail: format!("the destination proxy answered {status}"),
                }),
            };
        }
        Err(Error::Stream {
            target,
            detail: format!("HBONE connection to {} failed", key.destination),
        })
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
        peers: Peers<'_>,
        key: &Key,
        cert: &WorkloadCert,
        tunnel: &Authorized,
    ) -> Result<Arc<Pooled>, Error> {
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
                None => self.connect(peers, key, cert, tunnel).await,
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
        peers: Peers<'_>,
        key: &Key,
        cert: &WorkloadCert,
        tunnel: &Authorized,
    ) -> Result<Arc<Pooled>, Error> {
        let tcp = super::connect(peers.sockets, key.source, tunnel)
            .await
            .map_err(|e| Error::hbone_connect(key.destination, e))?;
        let config = tls::client_config(
            cert.certified.clone(),
            peers.certs.bundle().clone(),
            &key.identity,
        );
        let name = ServerName::IpAddress((*key.destination.ip()).into());
        let handshake = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(err)) => {
                let reason = tls::failure_reason(&err);
                peers.metrics.handshake_failed("client", reason);
                tracing::warn!(destination = %key.destination, identity = %key.identity, reason, "HBONE handshake failed: {err}");
                return Err(Error::handshake(
                    key.destination,
                    &key.identity,
                    reason,
                    &err,
                ));
            }
            Err(_) => {
                peers.metrics.handshake_failed("client", "timeout");
                return Err(Error::HandshakeTimeout {
                    addr: key.destination,
                });
            }
        };
        let (sender, mut connection) = h2::client::Builder::new()
            .initial_max_send_streams(MAX_STREAMS as usize)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| Error::Handshake {
                addr: key.destination,
                detail: format!("HTTP/2: {e}"),
            })?;
        peers.metrics.hbone_opened("client");
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

/// A stream the peer refused before serving it: REFUSED_STREAM, or cut off by the peer's
/// GOAWAY (its id above the last one the peer serves).
fn never_served(err: &h2::Error) -> bool {
    err.reason() == Some(h2::Reason::REFUSED_STREAM) || (err.is_go_away() && err.is_remote())
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
