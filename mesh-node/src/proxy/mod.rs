//! The node proxy's TCP path. Listeners are transparent (`IP_TRANSPARENT`) and bound to
//! loopback: the kernel's `sk_lookup` program hands them captured flows whatever their
//! destination, and `getsockname()` / `SO_ORIGINAL_DST` give the original destination.
//!
//! Each connection reads top to bottom in [`forward::handle`]:
//! accept -> original destination -> resolve (Service VIP -> endpoint) -> connect (marked) ->
//! copy both ways (half-close respected) -> record.

pub mod connections;
pub mod forward;

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

pub use forward::{Direction, ProxyContext};

/// Binds a transparent listener on `127.0.0.1:port`.
pub fn bind_listener(port: u16) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_ip_transparent_v4(true)?;
    socket.set_nonblocking(true)?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
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
                tokio::spawn(forward::handle(ctx.clone(), direction, client, peer));
            }
            Err(err) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(direction = direction.as_str(), "accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
