//! The proxy's own record of the connections it handled: open ones and the most recent closed
//! ones, served at `/debug/connections`. This is what shows (not assumes) that a flow went
//! through the node proxy, with its original destination.

use crate::response_flag::ResponseFlag;
use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use crate::config::semantics::Identity;

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

/// Closed connections kept for inspection.
const KEEP_CLOSED: usize = 4096;

/// One connection through the proxy.
#[derive(Clone, Debug, Serialize)]
pub struct ConnectionRecord {
    /// Unique per process.
    pub id: u64,
    /// `outbound` (from a local enrolled pod), `inbound` (plaintext to one) or `hbone`
    /// (mTLS tunnel to one).
    pub direction: &'static str,
    /// The client's address as the proxy saw it.
    pub client: SocketAddr,
    /// The client's workload (`namespace/name`), when it is a known pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_workload: Option<String>,
    /// The client's SPIFFE ID, when it is authenticated (mTLS, or an enrolled pod of this node).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_identity: Option<Identity>,
    /// The destination the client asked for (a Service VIP or a pod).
    pub original_dst: SocketAddr,
    /// The Service (`namespace/name`) when the original destination was its VIP.
    pub service: Option<String>,
    /// Where the proxy connected.
    pub upstream: Option<SocketAddr>,
    /// The destination workload (`namespace/name`), when it is a known pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_workload: Option<String>,
    /// The destination's SPIFFE ID (verified by mTLS on the HBONE path).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_identity: Option<Identity>,
    /// How the bytes travel to the destination: `hbone` (mTLS tunnel to its node),
    /// `same_node` (this proxy delivers; identity known in-process), `plaintext`; with
    /// `_http` when the destination side parses HTTP (authorization per request), and
    /// `http_routed` for a client connection to an HTTP Service port (each request routed
    /// on its own: see the request lines of the access log).
    pub path: &'static str,
    /// `mutual_tls` or `none`.
    pub security: &'static str,
    /// The authorization decision (for connections to a workload of this node).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorization: Option<crate::gate::Decision>,
    /// Milliseconds since the Unix epoch.
    pub opened_ms: u64,
    /// Milliseconds since the Unix epoch; `None` while open.
    pub closed_ms: Option<u64>,
    /// Bytes from the client to the upstream.
    pub bytes_sent: u64,
    /// Bytes from the upstream to the client.
    pub bytes_received: u64,
    /// How it ended: empty when fine (this view's spelling since its start; metrics and
    /// logs say `-`), else Istio's code (`UF`, `UH`, `NR`, `DC`, `DENY`, ...).
    #[serde(serialize_with = "crate::response_flag::empty_when_none")]
    pub flag: ResponseFlag,
    /// Error detail, if any.
    pub error: Option<String>,
}

impl ConnectionRecord {
    /// A record with what is known when a connection is accepted.
    pub fn new(direction: Direction, client: SocketAddr, original_dst: SocketAddr) -> Self {
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
}

#[derive(Default)]
struct Inner {
    open: BTreeMap<u64, ConnectionRecord>,
    closed: VecDeque<ConnectionRecord>,
}

/// Open and recently closed connections.
#[derive(Default)]
pub struct Connections {
    next_id: AtomicU64,
    inner: Mutex<Inner>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Connections {
    /// Records a new connection; returns its id.
    pub fn open(&self, mut record: ConnectionRecord) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        record.id = id;
        self.lock().open.insert(id, record);
        id
    }

    /// Closes connection `id`, letting `update` fill in its outcome; returns the final record.
    pub fn close(
        &self,
        id: u64,
        update: impl FnOnce(&mut ConnectionRecord),
    ) -> Option<ConnectionRecord> {
        let mut inner = self.lock();
        let mut record = inner.open.remove(&id)?;
        update(&mut record);
        record.closed_ms = Some(now_ms());
        if inner.closed.len() == KEEP_CLOSED {
            inner.closed.pop_front();
        }
        inner.closed.push_back(record.clone());
        Some(record)
    }

    /// Open connections first, then closed ones, oldest first.
    pub fn snapshot(&self) -> Vec<ConnectionRecord> {
        let inner = self.lock();
        inner
            .open
            .values()
            .chain(inner.closed.iter())
            .cloned()
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> ConnectionRecord {
        ConnectionRecord {
            service: Some("demo/web".into()),
            ..ConnectionRecord::new(
                Direction::Outbound,
                "100.65.0.2:40000".parse().unwrap(),
                "100.66.0.10:80".parse().unwrap(),
            )
        }
    }

    #[test]
    fn keeps_open_then_closed_and_bounds_history() {
        let conns = Connections::default();
        let first = conns.open(record());
        let second = conns.open(record());
        conns.close(first, |r| r.bytes_sent = 7);
        let snap = conns.snapshot();
        assert_eq!(snap.len(), 2);
        assert_eq!(snap[0].id, second);
        assert_eq!(snap[1].bytes_sent, 7);
        assert!(snap[1].closed_ms.is_some());
        for _ in 0..KEEP_CLOSED + 10 {
            let id = conns.open(record());
            conns.close(id, |_| {});
        }
        assert_eq!(conns.snapshot().len(), KEEP_CLOSED + 1);
    }
}
