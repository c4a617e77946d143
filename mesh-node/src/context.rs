//! What the connection handlers of L4 (`proxy`) and L7 (`http`) share, below both: the
//! context ([`Context`]) and one connection's bookkeeping ([`Tracked`]: its record, metrics and
//! access-log line).

use std::{io, net::Ipv4Addr, sync::Arc};

use arc_swap::ArcSwap;

use crate::{
    connections::{ConnectionRecord, Connections, Direction},
    identity::Certificates,
    metrics::ProxyMetrics,
    response_flag::ResponseFlag,
    state::State,
    telemetry::{self, Live, TcpMetrics},
    transport::{Copied, Pool},
};

/// What every connection handler shares; `L` is the L7 part (`http::L7`), which this layer
/// does not know.
pub struct Context<L> {
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
    pub pool: Pool,
    /// The node's own IPv4 addresses (NodePorts are resolved at them), kept by the datapath.
    pub node_addresses: Arc<ArcSwap<std::collections::BTreeSet<Ipv4Addr>>>,
    /// The kernel-facing sockets ([`crate::transport::Kernel`] on a node).
    pub sockets: Arc<dyn crate::transport::Sockets>,
    /// The open connections decided as a whole, re-decided when the policy changes.
    pub revocations: Arc<crate::gate::Revocations>,
    /// L7 routing state and request metrics.
    pub l7: Arc<L>,
    /// Set once a successor took over: serve what is open, accept nothing new.
    pub drain: crate::drain::Drain,
}

impl<L> Context<L> {
    /// What the HBONE pool needs of the node.
    pub fn peers(&self) -> crate::transport::pool::Peers<'_> {
        crate::transport::pool::Peers {
            certs: &self.certs,
            metrics: &self.metrics,
            sockets: &*self.sockets,
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
    /// A relayed connection: what it carried, and the error that broke it (flag `DC`), or
    /// the revocation that stopped it (flag `DENY`: the relay stops with an error once its
    /// `registration` is revoked).
    pub fn relayed(
        copied: Copied,
        error: Option<io::Error>,
        registration: Option<&crate::gate::Registration<'_>>,
    ) -> Outcome {
        let revoked = registration
            .filter(|_| error.is_some())
            .and_then(|r| r.revocation());
        let (flag, error) = match (revoked, error) {
            // The drain timeout after a takeover, not the policy.
            (Some(revoked), _) if revoked.drained => (
                ResponseFlag::DownstreamTermination,
                Some(revoked.to_string()),
            ),
            (Some(revoked), _) => (ResponseFlag::Denied, Some(revoked.to_string())),
            (None, Some(error)) => (ResponseFlag::DownstreamTermination, Some(error.to_string())),
            (None, None) => (ResponseFlag::None, None),
        };
        Outcome {
            flag,
            error,
            sent: copied.sent,
            received: copied.received,
        }
    }

    /// A plain relay handed to the successor of an upgrade (which records the rest).
    pub fn handed_over(copied: Copied) -> Outcome {
        Outcome {
            flag: ResponseFlag::None,
            error: Some("handed over to the successor (upgrade): its record has the rest".into()),
            sent: copied.sent,
            received: copied.received,
        }
    }

    /// A connection that could not reach its destination.
    pub fn failed(error: &crate::transport::Error) -> Outcome {
        Outcome::refused(error.flag(), error.to_string())
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
    connections: &'a Connections,
    metrics: &'a ProxyMetrics,
    direction: Direction,
    id: u64,
    /// Istio metrics of the connection (empty until the reports are known).
    pub live: Live,
    finished: bool,
}

impl<'a> Tracked<'a> {
    /// Records a new connection.
    pub fn open<L>(ctx: &'a Context<L>, direction: Direction, record: ConnectionRecord) -> Self {
        ctx.metrics.opened(direction);
        let id = ctx.connections.open(record);
        Tracked {
            connections: &ctx.connections,
            metrics: &ctx.metrics,
            direction,
            id,
            live: Live::none(),
            finished: false,
        }
    }

    /// Records a new connection with its Istio metrics.
    pub fn reported<L>(
        ctx: &'a Context<L>,
        direction: Direction,
        record: ConnectionRecord,
        reports: Vec<telemetry::Report>,
    ) -> Self {
        let mut tracked = Tracked::open(ctx, direction, record);
        tracked.live = ctx.tcp.open(reports);
        tracked
    }

    /// Records the end of the connection and writes its access-log line.
    pub fn finish(mut self, outcome: Outcome) {
        self.end(outcome);
    }

    fn end(&mut self, outcome: Outcome) {
        self.finished = true;
        let (direction, id) = (self.direction, self.id);
        let live = std::mem::replace(&mut self.live, Live::none());
        self.metrics.closed(direction, outcome.flag);
        self.metrics
            .bytes(direction, outcome.sent, outcome.received);
        live.close(outcome.flag);
        if outcome.flag == ResponseFlag::Denied {
            tracing::debug!(id, "denied: {}", outcome.error.as_deref().unwrap_or(""));
        }
        let closed = self.connections.close(id, |record| {
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
