//! Real TCP apps for pod namespaces: servers that record who connected, clients that check
//! every byte. All loops are bounded in count and time.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::netns::Netns;

/// What a server does with each connection.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// Echo every byte until the client half-closes, then half-close too.
    Echo,
    /// Send `hello from NAME\n`, half-close, and drain until the client closes.
    Greet(String),
}

/// A server in a pod namespace; stopped and joined on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Server {
    /// Starts a server on `0.0.0.0:port` inside `ns`.
    pub fn start(ns: &Netns, port: u16, behaviour: Behaviour) -> Result<Server> {
        Server::start_at(ns, SocketAddr::from(([0, 0, 0, 0], port)), behaviour)
    }

    /// Starts a server on `addr` inside `ns` (`[::]:port` takes IPv4 and IPv6).
    pub fn start_at(ns: &Netns, addr: SocketAddr, behaviour: Behaviour) -> Result<Server> {
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let listener = ns.run(move || {
            let listener = TcpListener::bind(addr)?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })?;
        let (stop2, peers2) = (stop.clone(), peers.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        peers2.lock().unwrap().push(peer);
                        stream.set_nonblocking(false)?;
                        let behaviour = behaviour.clone();
                        std::thread::spawn(move || serve(stream, &behaviour));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        });
        Ok(Server {
            stop,
            peers,
            thread: Some(thread),
        })
    }

    /// Peer addresses of every accepted connection, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(mut stream: TcpStream, behaviour: &Behaviour) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let mut buf = vec![0u8; 64 * 1024];
    match behaviour {
        Behaviour::Echo => loop {
            match stream.read(&mut buf) {
                Ok(0) => {
                    let _ = stream.shutdown(Shutdown::Write);
                    return;
                }
                Ok(n) => {
                    if stream.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        },
        Behaviour::Greet(name) => {
            let _ = stream.write_all(format!("hello from {name}\n").as_bytes());
            let _ = stream.shutdown(Shutdown::Write);
            while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
        }
    }
}

/// Deterministic test bytes: position `i` of the stream.
fn pattern(i: u64) -> u8 {
    let x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x >> 56) as u8 ^ (i as u8)
}

/// Result of [`transfer`].
#[derive(Debug)]
pub struct Transfer {
    /// The client's own address.
    pub local: SocketAddr,
    /// Bytes sent.
    pub sent: u64,
    /// Bytes echoed back and checked.
    pub received: u64,
}

/// Connects from inside `ns` to an echo server at `dst`, sends `bytes` of a known pattern,
/// half-closes, and checks that exactly the same bytes come back followed by EOF.
pub fn transfer(ns: &Netns, dst: SocketAddr, bytes: u64) -> Result<Transfer> {
    let stream = connect_in(ns, dst, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let local = stream.local_addr()?;
    let mut writer = stream.try_clone()?;
    let sender = std::thread::spawn(move || -> Result<u64> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut sent = 0u64;
        while sent < bytes {
            let n = (bytes - sent).min(buf.len() as u64) as usize;
            for (k, b) in buf[..n].iter_mut().enumerate() {
                *b = pattern(sent + k as u64);
            }
            writer.write_all(&buf[..n])?;
            sent += n as u64;
        }
        writer.shutdown(Shutdown::Write)?;
        Ok(sent)
    });
    let mut reader = stream;
    let mut buf = vec![0u8; 64 * 1024];
    let mut received = 0u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if Instant::now() > deadline {
            bail!("transfer to {dst} took longer than 120 s");
        }
        let started = Instant::now();
        let n = match reader.read(&mut buf) {
            // A socket in a sockmap (the same-node bypass) reads through tcp_bpf_recvmsg,
            // which answers a blocking read with EAGAIN when something other than data wakes
            // it (the send side's own progress): a non-blocking client would wait; so does
            // this one. The receive timeout (30 s) still ends a real stall.
            Err(err)
                if err.kind() == std::io::ErrorKind::WouldBlock
                    && started.elapsed() < Duration::from_secs(25) =>
            {
                continue;
            }
            other => other.context("reading the echo")?,
        };
        if n == 0 {
            break;
        }
        for (k, b) in buf[..n].iter().enumerate() {
            let at = received + k as u64;
            if *b != pattern(at) {
                bail!(
                    "byte {at} from {dst} differs: got {b:#x}, want {:#x}",
                    pattern(at)
                );
            }
        }
        received += n as u64;
    }
    let sent = sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    if received != sent {
        bail!("sent {sent} bytes to {dst} but {received} came back before EOF");
    }
    Ok(Transfer {
        local,
        sent,
        received,
    })
}

/// Connects from inside `ns` to a greeting server; returns the client's address and the
/// greeting.
pub fn greet(ns: &Netns, dst: SocketAddr) -> Result<(SocketAddr, String)> {
    let mut stream = connect_in(ns, dst, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let local = stream.local_addr()?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok((local, text.trim().to_string()))
}

/// A TCP connection made from inside `ns`.
pub fn connect_in(ns: &Netns, dst: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    ns.run(move || {
        TcpStream::connect_timeout(&dst, timeout).with_context(|| format!("connect to {dst}"))
    })
}

/// Sends `text` to an echo server at `dst` from inside `ns`, half-closes, and returns what
/// came back before the server's EOF. An error when the connection is refused, reset or
/// times out (10 s).
pub fn echo_text(ns: &Netns, dst: SocketAddr, text: &str) -> Result<String> {
    let mut stream = connect_in(ns, dst, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(text.as_bytes())?;
    stream.shutdown(Shutdown::Write)?;
    let mut back = Vec::new();
    stream
        .read_to_end(&mut back)
        .with_context(|| format!("reading the echo from {dst}"))?;
    if back.is_empty() && !text.is_empty() {
        bail!("{dst} closed the connection without answering");
    }
    Ok(String::from_utf8_lossy(&back).into_owned())
}

/// A long-lived echo session, to check that a connection keeps working across events.
pub struct Session {
    stream: TcpStream,
    round: u64,
}

impl Session {
    /// Opens a session from inside `ns` to an echo server.
    pub fn open(ns: &Netns, dst: SocketAddr) -> Result<Session> {
        let stream = connect_in(ns, dst, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Session { stream, round: 0 })
    }

    /// The client's own address.
    pub fn local(&self) -> SocketAddr {
        self.stream.local_addr().expect("connected socket")
    }

    /// Whether the connection has ended (closed or reset by the other side), without
    /// waiting: a live, quiet connection is not ended.
    pub fn ended(&self) -> bool {
        if self.stream.set_nonblocking(true).is_err() {
            return true;
        }
        let mut byte = [0u8; 1];
        let ended = match self.stream.peek(&mut byte) {
            Ok(n) => n == 0,
            Err(err) => err.kind() != std::io::ErrorKind::WouldBlock,
        };
        let _ = self.stream.set_nonblocking(false);
        ended
    }

    /// Sends a message and checks the echo.
    pub fn roundtrip(&mut self) -> Result<()> {
        self.round += 1;
        let msg = format!("round {} {}\n", self.round, "x".repeat(1000));
        self.stream.write_all(msg.as_bytes())?;
        let mut back = vec![0u8; msg.len()];
        self.stream
            .read_exact(&mut back)
            .with_context(|| format!("echo of round {}", self.round))?;
        if back != msg.as_bytes() {
            bail!("round {} came back altered", self.round);
        }
        Ok(())
    }
}
