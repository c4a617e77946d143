//! HTTP connections from this node proxy to endpoints, pooled per (client pod, endpoint):
//! through an HBONE tunnel to an enrolled pod of another node, directly to a pod of this
//! node or outside the mesh; always from the client pod's address. HTTP/1.1 connections
//! serve one request at a time and go back to the pool when the response headers arrive
//! (they take the next request once the body has been read); one HTTP/2 connection per pair
//! carries concurrent requests. The destination's connection-pool limits are enforced here:
//! `maxConnections` (then waiting, up to `http1MaxPendingRequests`, else overflow),
//! `maxRequestsPerConnection` and `idleTimeout`.

use std::{
    net::Ipv4Addr,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::ProxyContext;
use super::{
    cluster::{Cluster, EndpointState, View},
    BoxError,
};
use crate::{gate::Authorized, state::Workload, transport};

/// Request bodies sent upstream.
pub type Body = BoxBody<Bytes, BoxError>;

/// A request sender of either protocol.
#[derive(Clone)]
pub enum Sender {
    /// HTTP/1.1: one request at a time.
    H1(Arc<tokio::sync::Mutex<http1::SendRequest<Body>>>),
    /// HTTP/2: shared.
    H2(http2::SendRequest<Body>),
}

impl Sender {
    /// The connection ended.
    pub fn closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.try_lock().is_ok_and(|s| s.is_closed()),
            Sender::H2(s) => s.is_closed(),
        }
    }

    /// Free for a request now (HTTP/2: always, while open).
    fn is_ready(&self) -> bool {
        match self {
            Sender::H1(s) => s.try_lock().is_ok_and(|s| s.is_ready()),
            Sender::H2(s) => !s.is_closed(),
        }
    }

    /// Sends one request.
    pub async fn send(
        &self,
        request: http::Request<Body>,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper::Error> {
        match self {
            Sender::H1(s) => {
                let mut s = s.lock().await;
                s.ready().await?;
                s.send_request(request).await
            }
            Sender::H2(s) => {
                let mut s = s.clone();
                s.ready().await?;
                s.send_request(request).await
            }
        }
    }
}

/// Who a pooled connection belongs to and how it travels: a connection is only reused for
/// the same client pod (address and identity) over the same kind of path to the same
/// destination identity, so an address reused by another pod, or a destination that joined
/// the mesh, never inherits a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    source: Ipv4Addr,
    source_identity: Option<crate::config::semantics::Identity>,
    destination_identity: Option<crate::config::semantics::Identity>,
    hbone: bool,
}

/// One pooled connection.
pub struct Conn {
    sender: Sender,
    owner: Owner,
    h2: bool,
    served: usize,
    idle_since: Instant,
}

/// The connections to one endpoint.
#[derive(Default)]
pub struct Conns {
    list: Vec<Conn>,
}

impl Conns {
    /// Drops closed connections and idle ones older than `idle`.
    pub fn reap(&mut self, idle: Duration) {
        let now = Instant::now();
        self.list.retain(|c| {
            let expired = c.sender.is_ready() && now.duration_since(c.idle_since) >= idle;
            !c.sender.closed() && !expired
        });
    }

    fn take(&mut self, owner: &Owner, h2: bool, max_per_conn: usize) -> Option<Lease> {
        self.list.retain(|c| !c.sender.closed());
        let i = self
            .list
            .iter()
            .position(|c| c.owner == *owner && c.h2 == h2 && c.sender.is_ready())?;
        if h2 {
            // Shared: stays pooled, unless this request is its last.
            let conn = &mut self.list[i];
            conn.served += 1;
            let sender = conn.sender.clone();
            if max_per_conn > 0 && conn.served >= max_per_conn {
                self.list.swap_remove(i);
            }
            return Some(Lease {
                sender,
                reusable: false,
                served: 0,
                owner: owner.clone(),
                h2,
            });
        }
        let conn = self.list.swap_remove(i);
        Some(Lease {
            sender: conn.sender,
            reusable: true,
            served: conn.served,
            owner: owner.clone(),
            h2,
        })
    }
}

/// A connection taken for one request.
pub struct Lease {
    /// Where to send.
    pub sender: Sender,
    /// HTTP/1.1, to be returned after the response headers.
    reusable: bool,
    served: usize,
    owner: Owner,
    h2: bool,
}

impl Lease {
    /// Returns an HTTP/1.1 connection to the pool once its response headers arrived, unless
    /// it has served `maxRequestsPerConnection` or must not be reused.
    pub fn release(self, endpoint: &EndpointState, max_per_conn: usize, keep: bool) {
        let served = self.served + 1;
        if !self.reusable || !keep || (max_per_conn > 0 && served >= max_per_conn) {
            return;
        }
        endpoint
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .list
            .push(Conn {
                sender: self.sender,
                owner: self.owner,
                h2: self.h2,
                served,
                idle_since: Instant::now(),
            });
    }
}

/// Decrements the cluster's connection count when a connection ends.
struct Counted(Arc<Cluster>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_waiters();
    }
}

/// Decrements the pending count.
struct Waiting<'a>(&'a Cluster);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Where a connection goes and as whom.
pub struct Target<'a> {
    /// The client pod.
    pub source: Option<&'a Workload>,
    /// The endpoint's pod, if known.
    pub destination: Option<&'a Workload>,
    /// `podIP:port`, as the policy gate let the request go there.
    pub to: &'a Authorized,
    /// Through an HBONE tunnel (an enrolled pod of another node, from an enrolled pod).
    pub hbone: bool,
    /// Speak HTTP/2.
    pub h2: bool,
}

impl Target<'_> {
    fn owner(&self) -> Owner {
        let hbone = self.hbone;
        Owner {
            source: self.source.map_or(Ipv4Addr::UNSPECIFIED, |s| s.ip),
            source_identity: self
                .source
                .filter(|s| s.enrolled)
                .map(|s| s.identity.clone()),
            destination_identity: self
                .destination
                .filter(|d| d.enrolled)
                .map(|d| d.identity.clone()),
            hbone,
        }
    }
}

/// A connection for one request to `target`: a pooled one, a new one within
/// `maxConnections`, or, past it, the first one freed while at most
/// `http1MaxPendingRequests` wait.
pub async fn lease(
    ctx: &ProxyContext,
    cluster: &Arc<Cluster>,
    view: &View,
    endpoint: &EndpointState,
    target: &Target<'_>,
) -> Result<Lease, transport::Error> {
    let policy = &view.policy;
    let owner = target.owner();
    let mut waiting: Option<Waiting<'_>> = None;
    let deadline = Instant::now() + policy.connect_timeout;
    loop {
        let freed = cluster.freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        let pooled = endpoint
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(&owner, target.h2, policy.max_requests_per_connection);
        if let Some(lease) = pooled {
            return Ok(lease);
        }
        if cluster.connections.fetch_add(1, Ordering::AcqRel) < policy.max_connections {
            let counted = Counted(cluster.clone());
            drop(waiting);
            return connect(ctx, target, counted, policy.connect_timeout)
                .await
                .map(|sender| {
                    let lease = Lease {
                        sender: sender.clone(),
                        reusable: !target.h2,
                        served: 0,
                        owner: owner.clone(),
                        h2: target.h2,
                    };
                    if target.h2 {
                        endpoint
                            .conns
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .list
                            .push(Conn {
                                sender,
                                owner,
                                h2: true,
                                served: 1,
                                idle_since: Instant::now(),
                            });
                    }
                    lease
                });
        }
        cluster.connections.fetch_sub(1, Ordering::AcqRel);
        if waiting.is_none() {
            if cluster.pending.fetch_add(1, Ordering::AcqRel) >= policy.max_pending {
                cluster.pending.fetch_sub(1, Ordering::AcqRel);
                return Err(transport::Error::Overflow {
                    detail: format!(
                        "{} connections open and {} requests pending",
                        policy.max_connections, policy.max_pending
                    ),
                });
            }
            waiting = Some(Waiting(cluster));
        }
        if Instant::now() >= deadline {
            return Err(transport::Error::Overflow {
                detail: "no connection freed up within the connect timeout".into(),
            });
        }
        // A connection returns to the pool idle without a signal (its response body was
        // read): look again soon even when nothing is signalled.
        let _ = tokio::time::timeout(Duration::from_millis(5), freed).await;
    }
}

/// Opens a connection and starts driving it.
async fn connect(
    ctx: &ProxyContext,
    target: &Target<'_>,
    counted: Counted,
    timeout: Duration,
) -> Result<Sender, transport::Error> {
    let source = target.source.map_or(Ipv4Addr::UNSPECIFIED, |s| s.ip);
    let endpoint = target.to.target();
    let http = |detail| transport::Error::Http {
        target: endpoint,
        detail,
    };
    if target.hbone {
        let (Some(s), Some(d)) = (target.source, target.destination) else {
            return Err(transport::Error::NotTunnelled { target: endpoint });
        };
        let cert =
            ctx.certs
                .for_workload(s)
                .await
                .map_err(|e| transport::Error::NoCertificate {
                    identity: s.identity.to_string(),
                    detail: e.to_string(),
                })?;
        let opened = tokio::time::timeout(
            timeout,
            ctx.pool
                .stream(ctx.peers(), s.ip, &cert, &d.identity, target.to),
        )
        .await
        .map_err(|_| http(format!("HBONE tunnel not open within {timeout:?}")))?;
        let (send, recv, guard) = opened?;
        let io = TokioIo::new(transport::tunnel::Tunnel::new(send, recv));
        return handshake(io, target.h2, (counted, guard))
            .await
            .map_err(http);
    }
    let from_node =
        crate::plan::node_source(&ctx.node_addresses.load(), endpoint).map_err(|refusal| {
            transport::Error::NoRoute {
                reason: refusal.reason,
            }
        })?;
    let source = if from_node {
        Ipv4Addr::UNSPECIFIED
    } else {
        source
    };
    let connected = tokio::time::timeout(
        timeout,
        transport::connect(&*ctx.sockets, source, target.to),
    )
    .await;
    let stream = match connected {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => return Err(err),
        Err(_) => {
            let timed_out = std::io::Error::from(std::io::ErrorKind::TimedOut);
            return Err(transport::Error::connect(endpoint, timed_out));
        }
    };
    handshake(TokioIo::new(stream), target.h2, counted)
        .await
        .map_err(http)
}

/// HTTP handshake over `io`; the connection task owns `hold` until the connection ends.
pub async fn handshake<I, H>(io: I, h2: bool, hold: H) -> Result<Sender, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    H: Send + 'static,
{
    if h2 {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .handshake(io)
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
        tokio::spawn(async move {
            let _hold = hold;
            if let Err(err) = conn.await {
                tracing::debug!("upstream HTTP/2 connection: {err}");
            }
        });
        return Ok(Sender::H2(sender));
    }
    let (sender, conn) = http1::Builder::new()
        .handshake(io)
        .await
        .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
    tokio::spawn(async move {
        let _hold = hold;
        if let Err(err) = conn.with_upgrades().await {
            tracing::debug!("upstream HTTP/1.1 connection: {err}");
        }
    });
    Ok(Sender::H1(Arc::new(tokio::sync::Mutex::new(sender))))
}
