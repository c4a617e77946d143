//! The node proxy's TCP path. Listeners are transparent (`IP_TRANSPARENT`) and bound to
//! loopback: the kernel's `sk_lookup` program hands them captured flows whatever their
//! destination, and `getsockname()` / `SO_ORIGINAL_DST` give the original destination.
//!
//! - [`forward`]: `:15001` outbound from local enrolled pods (to a pod of this node directly,
//!   to an enrolled pod elsewhere through HBONE, to anything else in plaintext) and `:15006`
//!   inbound plaintext (PeerAuthentication and AuthorizationPolicy decide).
//! - [`hbone`]: `:15008` inbound HBONE (mTLS + HTTP/2 CONNECT) and the outbound connection
//!   pool.
//!
//! What each connection does is decided first (`crate::plan`, with the policy gate
//! `crate::gate`), then done here over the transport layer (`crate::transport`). Every
//! connection the proxy opens to a pod uses the client pod's address as its source
//! (`IP_TRANSPARENT`), so pods, their logs and NetworkPolicy see the real client, and carries
//! `MARK_PROXY` so no capture rule takes it again.

pub mod connections;
pub mod forward;
pub mod hbone;

use std::{
    io,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;

use self::connections::{now_ms, ConnectionRecord, Connections};
use crate::{
    identity::Certificates,
    metrics::ProxyMetrics,
    response_flag::ResponseFlag,
    state::State,
    telemetry::{self, Live, TcpMetrics},
    transport::Copied,
};

/// Which listener accepted the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From a local enrolled pod (`:15001`).
    Outbound,
    /// Plaintext to a local enrolled pod (`:15006`).
    Inbound,
    /// HBONE to a local enrolled pod (`:15008`).
    Hbone,
}

impl Direction {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
            Direction::Hbone => "hbone",
        }
    }
}

/// What every connection handler shares.
pub struct ProxyContext {
    /// The current config snapshot.
    pub state: Arc<ArcSwap<State>>,
    /// The connection record.
    pub connections: Arc<Connections>,
    /// Node-level proxy metrics.
    pub metrics: ProxyMetrics,
    /// Istio's TCP metrics.
    pub tcp: TcpMetrics,
    /// This node's workload certificates.
    pub certs: Arc<Certificates>,
    /// Outbound HBONE connections.
    pub pool: hbone::Pool,
    /// The node's own IPv4 addresses (NodePorts are resolved at them), kept by the datapath.
    pub node_addresses: Arc<ArcSwap<std::collections::BTreeSet<Ipv4Addr>>>,
    /// Registers reply directions the capture program must steer back to the proxy.
    pub replies: Arc<crate::capture::ReplySteering>,
    /// L7 routing state and request metrics.
    pub l7: Arc<crate::http::L7>,
}

/// Accepts connections forever, one task each.
pub async fn serve(listener: std::net::TcpListener, direction: Direction, ctx: Arc<ProxyContext>) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(err) => {
            tracing::error!(direction = direction.as_str(), "cannot use listener: {err}");
            return;
        }
    };
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                let ctx = ctx.clone();
                match direction {
                    Direction::Hbone => tokio::spawn(hbone::serve_connection(ctx, client, peer)),
                    _ => tokio::spawn(forward::handle(ctx, direction, client, peer)),
                };
            }
            Err(err) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(direction = direction.as_str(), "accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// How a connection ended.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    /// How it ended ([`ResponseFlag::None`] when fine).
    pub flag: ResponseFlag,
    /// Detail for the record and the access log.
    pub error: Option<String>,
    /// Client to server bytes.
    pub sent: u64,
    /// Server to client bytes.
    pub received: u64,
}

impl Outcome {
    /// A relayed connection: what it carried, and the error that broke it (flag `DC`).
    pub fn relayed(copied: Copied, error: Option<io::Error>) -> Outcome {
        Outcome {
            flag: if error.is_some() {
                ResponseFlag::DownstreamTermination
            } else {
                ResponseFlag::None
            },
            error: error.map(|e| e.to_string()),
            sent: copied.sent,
            received: copied.received,
        }
    }

    /// A connection refused before any byte was relayed.
    pub fn refused(flag: ResponseFlag, error: impl Into<String>) -> Outcome {
        Outcome {
            flag,
            error: Some(error.into()),
            ..Outcome::default()
        }
    }
}

/// One connection's bookkeeping: the record, the metrics and the access-log line. Dropped
/// without [`Tracked::finish`] (a panicking task), it records the connection as broken.
pub(crate) struct Tracked<'a> {
    ctx: &'a ProxyContext,
    direction: Direction,
    id: u64,
    /// Istio metrics of the connection (empty until the reports are known).
    pub live: Live,
    finished: bool,
}

impl<'a> Tracked<'a> {
    /// Records a new connection.
    pub fn open(ctx: &'a ProxyContext, direction: Direction, record: ConnectionRecord) -> Self {
        ctx.metrics.opened(direction);
        let id = ctx.connections.open(record);
        Tracked {
            ctx,
            direction,
            id,
            live: Live::none(),
            finished: false,
        }
    }

    /// Records the end of the connection and writes its access-log line.
    pub fn finish(mut self, outcome: Outcome) {
        self.end(outcome);
    }

    fn end(&mut self, outcome: Outcome) {
        self.finished = true;
        let (ctx, direction, id) = (self.ctx, self.direction, self.id);
        let live = std::mem::replace(&mut self.live, Live::none());
        ctx.metrics.closed(direction, outcome.flag);
        ctx.metrics.bytes(direction, outcome.sent, outcome.received);
        live.close(outcome.flag);
        if outcome.flag == ResponseFlag::Denied {
            tracing::debug!(id, "denied: {}", outcome.error.as_deref().unwrap_or(""));
        }
        let closed = ctx.connections.close(id, |record| {
            record.bytes_sent = outcome.sent;
            record.bytes_received = outcome.received;
            record.flag = outcome.flag;
            record.error = outcome.error;
        });
        if let Some(record) = closed {
            telemetry::access_log(&record);
        }
    }
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.end(Outcome::refused(
                ResponseFlag::DownstreamTermination,
                "the connection's task ended abnormally",
            ));
        }
    }
}

/// A record with what is known when a connection is accepted.
pub(crate) fn record(
    direction: Direction,
    client: SocketAddr,
    original_dst: SocketAddr,
) -> ConnectionRecord {
    ConnectionRecord {
        id: 0,
        direction: direction.as_str(),
        client,
        source_workload: None,
        source_identity: None,
        original_dst,
        service: None,
        upstream: None,
        destination_workload: None,
        destination_identity: None,
        path: "plaintext",
        security: "none",
        authorization: None,
        opened_ms: now_ms(),
        closed_ms: None,
        bytes_sent: 0,
        bytes_received: 0,
        flag: ResponseFlag::None,
        error: None,
    }
}
