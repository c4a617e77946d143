//! An HBONE tunnel (one HTTP/2 CONNECT stream) as a byte stream, so HTTP can be spoken inside
//! it with hyper: reads take DATA frames (releasing flow-control capacity as they are
//! consumed), writes wait for send capacity, shutdown ends the stream.

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{ready, Context, Poll},
};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest single write handed to HTTP/2 at once.
const MAX_WRITE: usize = 256 * 1024;

/// One CONNECT stream, readable and writable.
pub struct Tunnel {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received but not yet read.
    pending: Bytes,
    /// The peer ended its side.
    eof: bool,
    /// This side ended its half (END_STREAM queued behind the data written).
    shut_down: bool,
    /// Set when the peer resets the stream before this side wrote anything.
    premature_reset: Option<Arc<AtomicBool>>,
    /// This side wrote data.
    wrote: bool,
}

impl Tunnel {
    /// Wraps the two halves of an established CONNECT stream.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Tunnel {
        Tunnel {
            send,
            recv,
            pending: Bytes::new(),
            eof: false,
            shut_down: false,
            premature_reset: None,
            wrote: false,
        }
    }

    /// Sets `flag` if the peer resets the stream before this side wrote anything (a
    /// tunnel opened and abandoned, as in a rapid-reset flood; a pooled connection the
    /// peer is done with has had its answers).
    pub fn noting_premature_reset(mut self, flag: Arc<AtomicBool>) -> Tunnel {
        self.premature_reset = Some(flag);
        self
    }

    fn failed(&self, err: h2::Error) -> io::Error {
        let err = crate::transport::h2_io(err);
        if !self.wrote && crate::transport::reset_by_peer(&err) {
            if let Some(flag) = &self.premature_reset {
                flag.store(true, Ordering::Release);
            }
        }
        err
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.pending.is_empty() {
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    this.pending = data;
                }
                Some(Err(err)) => return Poll::Ready(Err(this.failed(err))),
                None => this.eof = true,
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        this.send.reserve_capacity(data.len().min(MAX_WRITE));
        loop {
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(granted)) => {
                    let n = granted.min(data.len());
                    if let Err(err) = this
                        .send
                        .send_data(Bytes::copy_from_slice(&data[..n]), false)
                    {
                        return Poll::Ready(Err(this.failed(err)));
                    }
                    this.wrote = true;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(err)) => return Poll::Ready(Err(this.failed(err))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "tunnel stream closed",
                    )))
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Ending a stream that was reset already is not an error worth reporting.
        if !self.shut_down {
            self.shut_down = true;
            let _ = self.send.send_data(Bytes::new(), true);
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        // Dropped with its own half still open (a connection given up on): tell the peer
        // now. After a clean shutdown nothing is reset here: an explicit RST_STREAM would
        // discard the DATA still queued before the END_STREAM (the end of a response), and
        // h2 itself cancels the peer's half, if still open, once that data is sent.
        if !self.shut_down && !self.eof {
            self.send.send_reset(h2::Reason::CANCEL);
        }
    }
}
