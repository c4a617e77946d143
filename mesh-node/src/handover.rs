//! The handover of a node from one mesh-node process to the next (an upgrade, a restart):
//! one active process, at most one draining.
//!
//! The active process holds the node's lock (an `flock` on its pin directory) and listens on
//! `<state-dir>/handover.sock` (mode 0600, same user only). A second `mesh-node run` for the
//! node finds the lock taken and asks there instead ([`take_node`]): the active process
//! pauses its kernel writes and passes the lock and its listening sockets over `SCM_RIGHTS`
//! (the same sockets, so their accept queues are never closed or reset); the successor
//! adopts the kernel state, serves from the same listeners and says so; only then does the
//! predecessor stop accepting and drain ([`crate::drain`]). If the successor fails before it
//! serves, the predecessor resumes as if nothing had happened. The channel stays open while
//! the predecessor drains: its end tells the successor the predecessor has exited, and a
//! further successor is refused until then.

use std::{
    io,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::Interest,
    net::{UnixListener, UnixStream},
};

use crate::{connections::Direction, drain::Handoff, sys, transport::Half};

/// The control socket's file name in the state directory.
pub const SOCKET: &str = "handover.sock";

/// How long each step of a handover may take before the other side gives up on it (the
/// successor's installation of the datapath is the long one).
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// The control socket of the node whose state directory is `state_dir`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET)
}

/// One message on the control socket: a line of JSON (descriptors ride with `HandingOver`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Message {
    /// Successor: may I take the node over?
    TakeOver { pid: u32, version: String },
    /// Active process: no (a predecessor of its own still drains, or a handover is under
    /// way).
    Refused { reason: String },
    /// Active process: here are the lock and the listeners (outbound, inbound, HBONE, admin);
    /// my kernel writes are paused. `cgroup`: the cgroup of my sockets, which the kernel
    /// programs must keep treating as the proxy's while I drain.
    HandingOver { pid: u32, cgroup: u64 },
    /// Successor: I serve from the listeners; drain.
    Serving,
    /// Predecessor, as it exits: connections it closed at the drain timeout.
    Drained { closed: u64 },
    /// Predecessor: a plain relay, paused; descriptors: the client's connection, the
    /// upstream one. The pending bytes of each direction follow the line.
    Relay {
        direction: String,
        peer: std::net::SocketAddr,
        upstream: std::net::SocketAddr,
        halves: [HalfHead; 2],
    },
}

/// One direction of a handed-over relay (its pending bytes follow the message).
#[derive(Debug, Serialize, Deserialize)]
struct HalfHead {
    pending: usize,
    eof: bool,
    shut: bool,
}

/// The node's listening sockets, shared by the active and the draining process.
pub struct Listeners {
    /// `:15001`.
    pub outbound: std::net::TcpListener,
    /// `:15006`.
    pub inbound: std::net::TcpListener,
    /// `:15008`.
    pub hbone: std::net::TcpListener,
    /// The admin endpoint.
    pub admin: std::net::TcpListener,
}

impl Listeners {
    /// Other descriptors of the same sockets.
    pub fn try_clone(&self) -> io::Result<Listeners> {
        Ok(Listeners {
            outbound: self.outbound.try_clone()?,
            inbound: self.inbound.try_clone()?,
            hbone: self.hbone.try_clone()?,
            admin: self.admin.try_clone()?,
        })
    }

    fn fds(&self) -> [BorrowedFd<'_>; 4] {
        [
            self.outbound.as_fd(),
            self.inbound.as_fd(),
            self.hbone.as_fd(),
            self.admin.as_fd(),
        ]
    }

    fn from_fds(fds: [OwnedFd; 4]) -> io::Result<Listeners> {
        let [outbound, inbound, hbone, admin] = fds.map(std::net::TcpListener::from);
        for listener in [&outbound, &inbound, &hbone, &admin] {
            listener.set_nonblocking(true)?;
        }
        Ok(Listeners {
            outbound,
            inbound,
            hbone,
            admin,
        })
    }
}

/// How this process gets the node.
pub enum Start {
    /// No mesh-node ran it: the lock, free.
    Fresh(OwnedFd),
    /// From the mesh-node that ran it.
    Successor(Inherited),
}

/// What a successor gets from its predecessor.
pub struct Inherited {
    /// The node's lock (the same open file as the predecessor's).
    pub lock: OwnedFd,
    /// The listening sockets.
    pub listeners: Listeners,
    /// The predecessor's process id.
    pub pid: u32,
    /// The cgroup of the predecessor's sockets.
    pub cgroup: u64,
    channel: Channel,
}

/// Why a handover did not happen.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the running mesh-node at {path}: {source}")]
    Unreachable { path: PathBuf, source: io::Error },
    #[error("the running mesh-node refused the handover: {0}")]
    Refused(String),
    #[error("handover protocol: {0}")]
    Protocol(String),
    #[error("handover: {0}")]
    Io(#[from] io::Error),
}

/// Takes the node: its lock when no mesh-node runs it (`lock` tries it), else a handover
/// from the one that does. A running one that is itself still waiting for its predecessor
/// to exit, or is not answering yet (just starting), is asked again every second, for up
/// to `patience`.
pub async fn take_node(
    state_dir: &Path,
    lock: impl Fn() -> io::Result<Option<OwnedFd>>,
    patience: Duration,
) -> Result<Start, Error> {
    let path = socket_path(state_dir);
    let started = tokio::time::Instant::now();
    let mut said = None;
    loop {
        if let Some(lock) = lock()? {
            return Ok(Start::Fresh(lock));
        }
        let wait = match ask(&path).await {
            Ok(inherited) => return Ok(Start::Successor(inherited)),
            Err(err @ (Error::Refused(_) | Error::Unreachable { .. })) => err,
            Err(err) => return Err(err),
        };
        if started.elapsed() >= patience {
            return Err(wait);
        }
        let reason = wait.to_string();
        if said.as_ref() != Some(&reason) {
            tracing::info!("waiting to take the node over: {reason}");
            said = Some(reason);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn ask(path: &Path) -> Result<Inherited, Error> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| Error::Unreachable {
            path: path.to_path_buf(),
            source,
        })?;
    let mut channel = Channel::new(stream);
    channel
        .send(
            &Message::TakeOver {
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").into(),
            },
            &[],
        )
        .await?;
    let answer = tokio::time::timeout(STEP_TIMEOUT, channel.recv())
        .await
        .map_err(|_| Error::Protocol("no answer to the takeover request".into()))??;
    match answer {
        Some(Message::HandingOver { pid, cgroup }) => {
            let fds: Vec<OwnedFd> = std::mem::take(&mut channel.fds);
            let [lock, outbound, inbound, hbone, admin]: [OwnedFd; 5] =
                fds.try_into().map_err(|fds: Vec<OwnedFd>| {
                    Error::Protocol(format!("expected 5 descriptors, got {}", fds.len()))
                })?;
            Ok(Inherited {
                lock,
                listeners: Listeners::from_fds([outbound, inbound, hbone, admin])?,
                pid,
                cgroup,
                channel,
            })
        }
        Some(Message::Refused { reason }) => Err(Error::Refused(reason)),
        Some(other) => Err(Error::Protocol(format!("unexpected answer {other:?}"))),
        None => Err(Error::Protocol("the running mesh-node hung up".into())),
    }
}

impl Inherited {
    /// Tells the predecessor this process serves (it then stops accepting and drains), and
    /// follows it until it exits: `adopt` takes each plain relay it hands over, `drained`
    /// gets the connections it closed at its drain timeout, `gone` is called when it has
    /// exited (or crashed).
    pub async fn serving(
        mut self,
        adopt: impl Fn(Handoff) + Send + 'static,
        drained: impl FnOnce(u64) + Send + 'static,
        gone: impl FnOnce() + Send + 'static,
    ) {
        let pid = self.pid;
        if let Err(err) = self.channel.send(&Message::Serving, &[]).await {
            // It went away meanwhile (stopped, crashed): the node is this process's anyway.
            tracing::warn!(pid, "the predecessor is gone: {err}");
            gone();
            return;
        }
        tokio::spawn(async move {
            let mut drained = Some(drained);
            loop {
                match self.channel.recv().await {
                    Ok(Some(Message::Drained { closed })) => {
                        if let Some(drained) = drained.take() {
                            drained(closed);
                        }
                    }
                    Ok(Some(Message::Relay {
                        direction,
                        peer,
                        upstream,
                        halves,
                    })) => {
                        match self
                            .channel
                            .relay(&direction, (peer, upstream), halves)
                            .await
                        {
                            Ok(relay) => adopt(relay),
                            Err(err) => {
                                tracing::warn!(pid, "a handed-over relay is lost: {err}");
                                break;
                            }
                        }
                    }
                    Ok(Some(other)) => {
                        tracing::warn!(pid, "unexpected handover message {other:?}");
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            tracing::info!(pid, "the predecessor has exited");
            gone();
        });
    }
}

/// The active process's side: the control socket.
pub struct Control {
    listener: UnixListener,
}

/// What the active process hands over: other descriptors of its lock and listeners.
pub struct Offer {
    /// The node's lock.
    pub lock: OwnedFd,
    /// The listening sockets.
    pub listeners: Listeners,
}

/// A successor serves: this process drains, and tells it, at exit, what it had to close.
pub struct TakenOver {
    /// The successor's process id.
    pub pid: u32,
    channel: Channel,
}

impl TakenOver {
    /// Hands a paused plain relay to the successor (this process's descriptors of its
    /// sockets are closed after, without a shutdown: the sockets stay open in the successor).
    pub async fn hand_off(&mut self, relay: Handoff) -> Result<(), Error> {
        let Handoff {
            direction,
            peer,
            upstream,
            client,
            server,
            halves,
        } = relay;
        let message = Message::Relay {
            direction: direction.as_str().into(),
            peer,
            upstream,
            halves: halves.each_ref().map(|half| HalfHead {
                pending: half.pending.len(),
                eof: half.eof,
                shut: half.shut,
            }),
        };
        let tail: Vec<u8> = halves
            .iter()
            .flat_map(|h| h.pending.iter().copied())
            .collect();
        let sent = self
            .channel
            .send_with(&message, &[client.as_fd(), server.as_fd()], &tail)
            .await;
        if sent.is_err() {
            // Not handed over: ended, and reset so neither end takes it for complete.
            crate::transport::reset(&client);
            crate::transport::reset(&server);
        }
        sent
    }

    /// Tells the successor how many connections the drain timeout closed.
    pub async fn drained(self, closed: u64) {
        let _ = self.channel.send(&Message::Drained { closed }, &[]).await;
    }
}

/// The datapath's part in a handover: pause its writes, then resume them (the successor
/// failed) or let the kernel go (it serves).
pub trait Writer: Send + Sync {
    /// Resolves once nothing is being written.
    fn pause(&self) -> tokio::sync::oneshot::Receiver<()>;
    /// Writing again.
    fn resume(&self);
    /// The kernel is the successor's.
    fn hand_over(&self);
}

impl Control {
    /// Binds the control socket (replacing the path a predecessor bound: it no longer
    /// takes requests).
    pub fn bind(state_dir: &Path) -> io::Result<Control> {
        use std::os::unix::fs::PermissionsExt;
        let path = socket_path(state_dir);
        let fresh = path.with_extension("sock-new");
        let _ = std::fs::remove_file(&fresh);
        let listener = UnixListener::bind(&fresh)?;
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&fresh, &path)?;
        Ok(Control { listener })
    }

    /// Takes requests until a successor serves. `busy` says why a request must be refused
    /// now (a predecessor of this process still drains), if it must.
    pub async fn serve(
        &self,
        offer: &Offer,
        writer: &dyn Writer,
        busy: impl Fn() -> Option<String>,
    ) -> TakenOver {
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!("handover socket: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match self.hand_over(stream, offer, writer, &busy).await {
                Ok(taken) => return taken,
                Err(err) => tracing::warn!("handover did not happen: {err}"),
            }
        }
    }

    async fn hand_over(
        &self,
        stream: UnixStream,
        offer: &Offer,
        writer: &dyn Writer,
        busy: &impl Fn() -> Option<String>,
    ) -> Result<TakenOver, Error> {
        let peer = stream.peer_cred()?;
        if peer.uid() != sys::euid() {
            return Err(Error::Protocol(format!(
                "refused a request from uid {} (pid {:?})",
                peer.uid(),
                peer.pid()
            )));
        }
        let mut channel = Channel::new(stream);
        let pid = match tokio::time::timeout(STEP_TIMEOUT, channel.recv()).await {
            Ok(Ok(Some(Message::TakeOver { pid, version }))) => {
                tracing::info!(pid, version, "a successor asks to take the node over");
                pid
            }
            Ok(Ok(other)) => return Err(Error::Protocol(format!("unexpected {other:?}"))),
            Ok(Err(err)) => return Err(err),
            Err(_) => return Err(Error::Protocol("no request".into())),
        };
        if let Some(reason) = busy() {
            channel.send(&Message::Refused { reason }, &[]).await?;
            return Err(Error::Refused(format!(
                "successor pid {pid} asked too early"
            )));
        }
        if tokio::time::timeout(STEP_TIMEOUT, writer.pause())
            .await
            .is_err()
        {
            writer.resume();
            return Err(Error::Protocol("the datapath did not pause".into()));
        }
        let handing = Message::HandingOver {
            pid: std::process::id(),
            cgroup: sys::own_cgroup_id().unwrap_or(0),
        };
        let mut fds = vec![offer.lock.as_fd()];
        fds.extend(offer.listeners.fds());
        let served = async {
            channel.send(&handing, &fds).await?;
            match tokio::time::timeout(STEP_TIMEOUT, channel.recv()).await {
                Ok(Ok(Some(Message::Serving))) => Ok(()),
                Ok(Ok(other)) => Err(Error::Protocol(format!(
                    "the successor did not serve: {other:?}"
                ))),
                Ok(Err(err)) => Err(err),
                Err(_) => Err(Error::Protocol(
                    "the successor did not serve in time".into(),
                )),
            }
        };
        match served.await {
            Ok(()) => {
                writer.hand_over();
                tracing::info!(pid, "the successor serves: draining");
                Ok(TakenOver { pid, channel })
            }
            Err(err) => {
                writer.resume();
                Err(err)
            }
        }
    }
}

/// Messages, one JSON line each, with descriptors.
struct Channel {
    stream: UnixStream,
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Channel {
    fn new(stream: UnixStream) -> Channel {
        Channel {
            stream,
            buf: Vec::new(),
            fds: Vec::new(),
        }
    }

    async fn send(&self, message: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), Error> {
        self.send_with(message, fds, &[]).await
    }

    /// `message`, then `tail` (raw bytes the receiver knows the length of from the message).
    async fn send_with(
        &self,
        message: &Message,
        fds: &[BorrowedFd<'_>],
        tail: &[u8],
    ) -> Result<(), Error> {
        let mut line = serde_json::to_vec(message).map_err(io::Error::other)?;
        line.push(b'\n');
        line.extend_from_slice(tail);
        let mut sent = 0;
        while sent < line.len() {
            // The descriptors ride with the first byte.
            let attach = if sent == 0 { fds } else { &[] };
            sent += self
                .stream
                .async_io(Interest::WRITABLE, || {
                    sys::send_with_fds(&self.stream, &line[sent..], attach)
                })
                .await?;
        }
        Ok(())
    }

    /// The rest of a `Relay` message: its two descriptors and pending bytes.
    async fn relay(
        &mut self,
        direction: &str,
        (peer, upstream): (std::net::SocketAddr, std::net::SocketAddr),
        halves: [HalfHead; 2],
    ) -> Result<Handoff, Error> {
        let direction = match direction {
            "outbound" => Direction::Outbound,
            "inbound" => Direction::Inbound,
            other => return Err(Error::Protocol(format!("a relay from listener {other:?}"))),
        };
        if self.fds.len() < 2 {
            return Err(Error::Protocol(
                "a relay without its two descriptors".into(),
            ));
        }
        let mut fds = self.fds.drain(..2);
        let (client, server) = (fds.next(), fds.next());
        drop(fds);
        let (Some(client), Some(server)) = (client, server) else {
            return Err(Error::Protocol(
                "a relay without its two descriptors".into(),
            ));
        };
        let mut out: [Half; 2] = Default::default();
        for (head, half) in halves.iter().zip(out.iter_mut()) {
            half.pending = bytes::BytesMut::from(&self.bytes(head.pending).await?[..]);
            half.eof = head.eof;
            half.shut = head.shut;
        }
        Ok(Handoff {
            direction,
            peer,
            upstream,
            client: client.into(),
            server: server.into(),
            halves: out,
        })
    }

    /// The next `n` raw bytes.
    async fn bytes(&mut self, n: usize) -> Result<Vec<u8>, Error> {
        while self.buf.len() < n {
            if !self.fill().await? {
                return Err(Error::Protocol("the stream ended inside a message".into()));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Reads more into the buffer; `false` at the end of the stream.
    async fn fill(&mut self) -> Result<bool, Error> {
        let mut chunk = [0u8; 4096];
        let (read, fds) = self
            .stream
            .async_io(Interest::READABLE, || {
                sys::recv_with_fds(&self.stream, &mut chunk)
            })
            .await?;
        self.fds.extend(fds);
        self.buf.extend_from_slice(&chunk[..read]);
        Ok(read > 0)
    }

    /// The next message; `None` once the other side hung up.
    async fn recv(&mut self) -> Result<Option<Message>, Error> {
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                return serde_json::from_slice(&line)
                    .map(Some)
                    .map_err(|err| Error::Protocol(format!("bad message: {err}")));
            }
            if self.buf.len() > 1 << 20 {
                return Err(Error::Protocol("message too long".into()));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener() -> std::net::TcpListener {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        listener
    }

    struct Recorder(std::sync::Mutex<Vec<&'static str>>);

    impl Writer for Recorder {
        fn pause(&self) -> tokio::sync::oneshot::Receiver<()> {
            self.0.lock().unwrap().push("pause");
            let (done, paused) = tokio::sync::oneshot::channel();
            let _ = done.send(());
            paused
        }
        fn resume(&self) {
            self.0.lock().unwrap().push("resume");
        }
        fn hand_over(&self) {
            self.0.lock().unwrap().push("hand_over");
        }
    }

    /// A handover between two tasks of this process: the successor gets the same listening
    /// socket (a connection queued before the handover is accepted after it), the
    /// predecessor pauses, then hands over; a successor that hangs up before serving makes
    /// it resume.
    #[tokio::test]
    async fn the_same_sockets_change_hands_and_a_failed_successor_leaves_things_as_they_were() {
        let dir = std::env::temp_dir().join(format!("mesh-handover-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lock_file = dir.join("lock");
        std::fs::write(&lock_file, "").unwrap();
        let listeners = Listeners {
            outbound: listener(),
            inbound: listener(),
            hbone: listener(),
            admin: listener(),
        };
        let outbound = listeners.outbound.local_addr().unwrap();
        let offer = Offer {
            lock: std::fs::File::open(&lock_file).unwrap().into(),
            listeners,
        };
        let control = Control::bind(&dir).unwrap();
        let writer = Recorder(Default::default());
        // Queued in the predecessor's accept queue before the handover.
        let queued = std::net::TcpStream::connect(outbound).unwrap();
        let never = || -> io::Result<Option<OwnedFd>> { Ok(None) };

        // A successor that hangs up after getting the sockets.
        let predecessor = control.serve(&offer, &writer, || None);
        let quitter = async {
            let Start::Successor(inherited) = take_node(&dir, never, Duration::from_secs(5))
                .await
                .unwrap()
            else {
                panic!("not a handover")
            };
            drop(inherited);
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        tokio::select! {
            _ = predecessor => panic!("handed over to a successor that never served"),
            () = quitter => {}
        }
        assert_eq!(*writer.0.lock().unwrap(), ["pause", "resume"]);

        // A successor that serves.
        let successor = async {
            let Start::Successor(inherited) = take_node(&dir, never, Duration::from_secs(5))
                .await
                .unwrap()
            else {
                panic!("not a handover")
            };
            assert_eq!(inherited.pid, std::process::id());
            let accepted = inherited.listeners.outbound.accept().unwrap();
            assert_eq!(accepted.1, queued.local_addr().unwrap());
            let (closed, reported) = tokio::sync::mpsc::unbounded_channel();
            inherited
                .serving(
                    |_| {},
                    move |n| {
                        let _ = closed.send(n);
                    },
                    || {},
                )
                .await;
            reported
        };
        let (taken, reported) = tokio::join!(control.serve(&offer, &writer, || None), successor);
        assert_eq!(
            *writer.0.lock().unwrap(),
            ["pause", "resume", "pause", "hand_over"]
        );
        taken.drained(3).await;
        let mut reported = reported;
        assert_eq!(reported.recv().await, Some(3));

        // While this process's own predecessor drains, a successor is refused.
        tokio::select! {
            _ = control.serve(&offer, &writer, || Some("predecessor 1 drains".into())) => {
                panic!("handed over while draining")
            }
            result = take_node(&dir, never, Duration::ZERO) => assert!(
                matches!(&result, Err(Error::Refused(why)) if why == "predecessor 1 drains"),
                "{:?}", result.err()
            ),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
