//! Draining: once a successor has taken over the node ([`crate::handover`]), this process
//! accepts nothing new and finishes what it serves. Every server of the proxy watches one
//! [`Drain`]: HTTP/1.1 answers the next request on each connection with `connection: close`,
//! HTTP/2 (L7 clients and HBONE peers) gets the graceful two-step GOAWAY, L4 and HBONE streams
//! relay until they end. Each accepted connection is counted while it lives, so the process
//! knows when its last one has ended.

use std::sync::{
    atomic::{AtomicU8, AtomicUsize, Ordering},
    Arc, OnceLock,
};

use tokio::sync::{mpsc, Notify};

use crate::{connections::Direction, transport::Half};

/// A plain relay (no TLS state: same-node, or plaintext to or from outside the mesh) paused
/// between two steps and handed to the successor: both sockets, where each direction stands.
#[derive(Debug)]
pub struct Handoff {
    /// The listener that accepted it (`outbound` or `inbound`).
    pub direction: Direction,
    /// The client's address (a socket whose peer has closed may not tell it any more).
    pub peer: std::net::SocketAddr,
    /// Where the proxy connected.
    pub upstream: std::net::SocketAddr,
    /// The accepted client connection.
    pub client: std::net::TcpStream,
    /// The proxy's connection to the upstream.
    pub server: std::net::TcpStream,
    /// Client to server, server to client.
    pub halves: [Half; 2],
}

/// The drain signal and the count of live accepted connections, shared by every server.
#[derive(Clone)]
pub struct Drain(Arc<Inner>);

/// Where the process is in its life (an `AtomicU8`: every open connection waits on it, so
/// the wait is kept to a `Notify`'s).
mod phase {
    /// Active: accepting and serving.
    pub const SERVING: u8 = 0;
    /// A successor took over: serving what is open, nothing new.
    pub const DRAINING: u8 = 1;
}

struct Inner {
    phase: AtomicU8,
    /// Wakes whoever waits for the next phase.
    moved: Notify,
    /// Where plain relays go once draining (the successor), if anywhere.
    handoff: OnceLock<mpsc::UnboundedSender<Handoff>>,
    live: AtomicUsize,
    ended: Notify,
}

impl Default for Drain {
    fn default() -> Self {
        Drain(Arc::new(Inner {
            phase: AtomicU8::new(phase::SERVING),
            moved: Notify::new(),
            handoff: OnceLock::new(),
            live: AtomicUsize::new(0),
            ended: Notify::new(),
        }))
    }
}

impl Drain {
    /// From now on every server drains.
    pub fn start(&self) {
        self.reach(phase::DRAINING);
    }

    fn reach(&self, phase: u8) {
        if self.0.phase.fetch_max(phase, Ordering::AcqRel) < phase {
            self.0.moved.notify_waiters();
        }
    }

    /// Starts draining, handing plain relays to `handoff` (the successor takes them).
    pub fn start_handing_off(&self, handoff: mpsc::UnboundedSender<Handoff>) {
        let _ = self.0.handoff.set(handoff);
        self.start();
    }

    /// Resolves once plain relays are to be handed over; never when nothing takes them.
    pub async fn handing_off(&self) {
        self.started().await;
        if self.0.handoff.get().is_none() {
            std::future::pending::<()>().await;
        }
    }

    /// Hands a paused relay over; gives it back when nothing takes it.
    pub fn hand_off(&self, relay: Handoff) -> Result<(), Box<Handoff>> {
        match self.0.handoff.get() {
            Some(handoff) => handoff.send(relay).map_err(|err| Box::new(err.0)),
            None => Err(Box::new(relay)),
        }
    }

    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        self.0.phase.load(Ordering::Acquire) >= phase::DRAINING
    }

    /// Resolves once draining has started (at once if it has).
    pub async fn started(&self) {
        self.reached(phase::DRAINING).await
    }

    async fn reached(&self, phase: u8) {
        loop {
            let moved = self.0.moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            if self.0.phase.load(Ordering::Acquire) >= phase {
                return;
            }
            moved.await;
        }
    }

    /// Counts an accepted connection until the returned guard is dropped.
    pub fn track(&self) -> Live {
        self.0.live.fetch_add(1, Ordering::AcqRel);
        Live(self.0.clone())
    }

    /// Accepted connections still open.
    pub fn live(&self) -> usize {
        self.0.live.load(Ordering::Acquire)
    }

    /// Resolves once no accepted connection is open.
    pub async fn idle(&self) {
        loop {
            let ended = self.0.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.live() == 0 {
                return;
            }
            ended.await;
        }
    }
}

/// One live accepted connection (see [`Drain::track`]).
pub struct Live(Arc<Inner>);

impl Drop for Live {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.ended.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_waits_for_the_last_connection() {
        let drain = Drain::default();
        let (a, b) = (drain.track(), drain.track());
        assert_eq!(drain.live(), 2);
        let waiter = tokio::spawn({
            let drain = drain.clone();
            async move { drain.idle().await }
        });
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(b);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(!drain.is_draining());
        drain.start();
        drain.started().await;
        assert!(drain.is_draining());
    }
}
