//! Churn: many short connections between the same pods, where each ends with the server's
//! answer and FIN in one segment (an HTTP/1.1 server closing after its response does this).
//! Without a mesh the client gets both at once and, closing after the answer, never holds a
//! TIME_WAIT; through the proxies it must be the same. When the proxies delivered the FIN
//! after the data, the client often closed first, its ports piled up in TIME_WAIT and a
//! second burst of connections from the same client slowed down (performance issue: 0.41x
//! of the first burst). Counted, not timed: the client's TIME_WAIT entries (nstat TcpExtTW).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use mesh_tests::{cluster::Cluster, fixtures::BENCH, netns::Netns};

/// Connections per path.
const CONNECTIONS: usize = 400;

const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello";

/// A server on 8081 that answers each request and closes in the same segment (corked).
fn serve(netns: &Netns, stop: Arc<AtomicBool>) -> Result<std::thread::JoinHandle<()>> {
    let listener = netns.run(|| Ok(TcpListener::bind("0.0.0.0:8081")?))?;
    listener.set_nonblocking(true)?;
    Ok(std::thread::spawn(move || {
        while !stop.load(Ordering::Acquire) {
            let Ok((mut conn, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            };
            let _ = conn.set_nonblocking(false);
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let sock = socket2::SockRef::from(&conn);
            let _ = sock.set_tcp_cork(true);
            let _ = conn.write_all(ANSWER);
            let _ = conn.shutdown(std::net::Shutdown::Write);
            // Until the client's FIN: the server's close then leaves it no reason to reset.
            while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
        }
    }))
}

/// `CONNECTIONS` requests from the client pod, each on a new connection closed as soon as
/// the whole answer is read; returns how many TIME_WAIT entries the client's namespace got.
fn burst(client: &Netns, to: SocketAddr) -> Result<u64> {
    let before = time_waits(client)?;
    client.run(move || {
        for i in 0..CONNECTIONS {
            let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(5))
                .with_context(|| format!("connection {i} to {to}"))?;
            conn.set_read_timeout(Some(Duration::from_secs(5)))?;
            conn.write_all(b"GET / HTTP/1.1\r\nhost: churn\r\nconnection: close\r\n\r\n")?;
            let mut answer = vec![0u8; ANSWER.len()];
            conn.read_exact(&mut answer)
                .with_context(|| format!("answer {i} from {to}"))?;
            anyhow::ensure!(answer == ANSWER, "answer {i}: {answer:?}");
        }
        Ok(())
    })?;
    Ok(time_waits(client)? - before)
}

/// TIME_WAIT entries the namespace's TCP ever made (nstat's TcpExtTW, absolute).
fn time_waits(netns: &Netns) -> Result<u64> {
    let out = netns.exec("nstat", &["-az", "TcpExtTW"])?;
    Ok(out
        .lines()
        .find_map(|l| l.strip_prefix("TcpExtTW "))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0))
}

fn churn(mesh: bool) -> Result<()> {
    let mut cluster = Cluster::new(BENCH)?;
    let stop = Arc::new(AtomicBool::new(false));
    let servers = [
        serve(&cluster.pod("srv-same").netns, stop.clone())?,
        serve(&cluster.pod("srv-cross").netns, stop.clone())?,
    ];
    if mesh {
        cluster.start_mesh_everywhere()?;
    }
    let client = &cluster.pod("client").netns;
    let mut failures = Vec::new();
    for (path, vip) in [
        ("same node", "100.66.0.40:81"),
        ("cross node", "100.66.0.41:81"),
    ] {
        let waits = burst(client, vip.parse()?)?;
        eprintln!("churn (mesh: {mesh}): {path}: the client holds {waits} TIME_WAITs after {CONNECTIONS} connections");
        if waits > 0 {
            failures.push(format!("{path}: {waits} of {CONNECTIONS}"));
        }
    }
    if mesh {
        // Every connection went through the proxies (as source: node-a for both paths).
        let opened = cluster.metric_sum(
            "node-a",
            "istio_tcp_connections_opened_total",
            &[("reporter", "source")],
        )?;
        assert_eq!(
            opened,
            2 * CONNECTIONS as u64,
            "connections the source proxy opened"
        );
    }
    stop.store(true, Ordering::Release);
    for server in servers {
        let _ = server.join();
    }
    assert!(
        failures.is_empty(),
        "the client closed first (its answer's FIN came after the answer) on: {}",
        failures.join(", ")
    );
    Ok(())
}

/// The reference: without the mesh the client never closes first.
#[test]
fn without_the_mesh_the_client_of_short_connections_holds_no_time_wait() {
    mesh_tests::require_root!();
    churn(false).unwrap();
}

#[test]
fn through_the_mesh_the_client_of_short_connections_holds_no_time_wait() {
    mesh_tests::require_root!();
    churn(true).unwrap();
}
