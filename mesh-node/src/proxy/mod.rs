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

pub mod forward;
pub mod hbone;

use std::{sync::Arc, time::Duration};

use tokio::net::TcpListener;

use crate::{connections::Direction, http::ProxyContext};

/// Accepts connections, one task each, until draining starts (a successor shares the
/// listener and accepts from then on); each connection is counted while it lives.
pub async fn serve(listener: std::net::TcpListener, direction: Direction, ctx: Arc<ProxyContext>) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(err) => {
            tracing::error!(direction = direction.as_str(), "cannot use listener: {err}");
            return;
        }
    };
    let draining = ctx.drain.started();
    tokio::pin!(draining);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut draining => return,
        };
        match accepted {
            Ok((client, peer)) => {
                // Held by the connection's task (passed in, not wrapped: a wrapping future
                // would hold the task's arguments twice).
                let live = ctx.drain.track();
                let ctx = ctx.clone();
                match direction {
                    Direction::Hbone => {
                        tokio::spawn(hbone::serve_connection(ctx, client, peer, live))
                    }
                    _ => tokio::spawn(forward::handle(ctx, direction, client, peer, live)),
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
