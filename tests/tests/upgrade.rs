//! Upgrades of the node proxy: a second `mesh-node run` takes the node over from the running
//! one (the same listening sockets, passed over the handover socket); the predecessor drains.
//! Under load nothing fails: HTTP keep-alive clients move over at their next request, new
//! connections are accepted throughout, long-lived connections keep relaying through the
//! predecessor until they end.

use std::{
    net::SocketAddr,
    process::Child,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context;
use mesh_tests::{
    apps::{Behaviour, Server, Session},
    cluster::Cluster,
    fixtures::{TWO_NODES, WEB_PORT},
    load::mesh_load_in,
    require_root,
    web::WebServer,
};

/// The web pods (a2 on node-a, b1 on node-b) also serve HTTP on this port, behind an HTTP
/// Service: requests through its VIP go through L7 routing, to either node.
const HTTP_PORT: u16 = 8081;
const HTTP_VIP: &str = "100.66.0.11:80";
const HTTP_SERVICE: &str = r#"
---
apiVersion: v1
kind: Service
metadata: {name: web-http, namespace: mesh}
spec:
  clusterIP: 100.66.0.11
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8081}]
"#;

fn addr(cluster: &Cluster, pod: &str, port: u16) -> SocketAddr {
    SocketAddr::from((cluster.pod(pod).ip, port))
}

/// An echo session from pod `from` to pod `to`, one round trip done.
fn session(cluster: &Cluster, from: &str, to: &str) -> Session {
    let mut session = Session::open(&cluster.pod(from).netns, addr(cluster, to, WEB_PORT)).unwrap();
    session.roundtrip().unwrap();
    session
}

/// A draining predecessor, killed if the test ends before it exits.
struct Draining(Child);

impl Draining {
    fn terminate(&self) {
        // SAFETY: kill on the PID of a child we started and have not reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
    }

    /// Waits up to `within` for it to exit; its status.
    fn exited(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Draining {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A thread's result with its error as text.
fn join(thread: JoinHandle<anyhow::Result<u64>>) -> JoinHandle<Result<u64, String>> {
    std::thread::spawn(move || match thread.join() {
        Ok(result) => result.map_err(|e| format!("{e:#}")),
        Err(_) => Err("panicked".into()),
    })
}

/// One short connection (from the calling thread's namespace): 64 bytes echoed back exactly.
fn echo_once(dst: SocketAddr) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let local = stream.local_addr()?;
    let sent = [b'u'; 64];
    stream.write_all(&sent)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut back = Vec::new();
    stream
        .read_to_end(&mut back)
        .with_context(|| format!("{local} -> {dst}"))?;
    anyhow::ensure!(
        back == sent,
        "{} bytes came back, not the 64 sent",
        back.len()
    );
    Ok(())
}

/// `count` GET requests to `authority`, one every `every`, on one HTTP/2 (prior knowledge)
/// connection, as a real client does it: a request the server never served (GOAWAY,
/// REFUSED_STREAM, or never sent because the connection was closing) goes again on a new
/// connection; so does every request after a GOAWAY.
/// Every answer must be 200. Returns the requests answered; fails unless the connection
/// changed when `must_move` (the client's proxy drained: its GOAWAY moved it to the successor).
async fn h2_requests(
    authority: &str,
    count: u64,
    every: Duration,
    must_move: bool,
) -> anyhow::Result<u64> {
    use http_body_util::{BodyExt, Empty};
    let connect = || async {
        let stream = tokio::net::TcpStream::connect(authority).await?;
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await?;
        tokio::spawn(conn);
        anyhow::Ok(sender)
    };
    let never_served = |err: &hyper::Error| {
        // Canceled: never sent (the connection was closing).
        if err.is_canceled() {
            return true;
        }
        let mut source = std::error::Error::source(err);
        while let Some(err) = source {
            if let Some(h2) = err.downcast_ref::<h2::Error>() {
                return h2.is_go_away() || h2.reason() == Some(h2::Reason::REFUSED_STREAM);
            }
            source = err.source();
        }
        false
    };
    let (mut sender, mut connections) = (connect().await?, 1u64);
    for i in 0..count {
        let mut retried = false;
        loop {
            if sender.is_closed() || sender.ready().await.is_err() {
                sender = connect().await?;
                connections += 1;
            }
            let request = http::Request::get(format!("http://{authority}/"))
                .body(Empty::<bytes::Bytes>::new())?;
            match sender.send_request(request).await {
                Ok(response) => {
                    let status = response.status();
                    response.into_body().collect().await?;
                    anyhow::ensure!(status == 200, "request {i}: {status}");
                    break;
                }
                Err(err) if !retried && never_served(&err) => {
                    retried = true;
                    sender = connect().await?;
                    connections += 1;
                }
                Err(err) => anyhow::bail!("request {i} on connection {connections}: {err:#}"),
            }
        }
        tokio::time::sleep(every).await;
    }
    anyhow::ensure!(
        connections > 1 || !must_move,
        "the HTTP/2 connection never moved"
    );
    Ok(count)
}

/// Traffic that runs while a node is upgraded; each part counts what failed.
struct Traffic {
    stop: Arc<AtomicBool>,
    threads: Vec<(&'static str, JoinHandle<Result<u64, String>>)>,
}

impl Traffic {
    /// Starts, for `seconds`: fixed-rate HTTP through the VIP from a1 (both nodes' pods
    /// answer), HTTP/2 requests on one connection, a new TCP connection every 5 ms from a1
    /// to a2 (same node) and to b1 (other node), and round trips every 20 ms on `sessions`.
    fn start(
        cluster: &Cluster,
        sessions: Vec<(&'static str, Session)>,
        seconds: u64,
        upgraded: &str,
    ) -> Traffic {
        // a1's own proxy serves its HTTP/2 connection.
        let must_move = upgraded == "node-a";
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let ns = cluster.pod("a1").netns.name().to_string();
        threads.push((
            "http/1.1 load",
            std::thread::spawn(move || -> Result<u64, String> {
                let report = mesh_load_in(
                    &ns,
                    &[
                        &format!("http://{HTTP_VIP}/"),
                        "--rate",
                        "600",
                        "--connections",
                        "6",
                        "--seconds",
                        &seconds.to_string(),
                        "--body",
                        "0",
                    ],
                )
                .map_err(|e| e.to_string())?;
                let requests = report["requests"].as_u64().unwrap_or(0);
                let failed = report["errors"].as_u64().unwrap_or(1)
                    + report["non_2xx"].as_u64().unwrap_or(1);
                if failed > 0 || requests < 500 * seconds {
                    return Err(format!("{report}"));
                }
                Ok(requests)
            }),
        ));
        threads.push((
            "http/2 requests",
            join(cluster.pod("a1").netns.spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(h2_requests(
                        HTTP_VIP,
                        20 * seconds,
                        Duration::from_millis(50),
                        must_move,
                    ))
            })),
        ));
        for (name, to) in [
            ("new connections a1 -> a2", "a2"),
            ("new connections a1 -> b1", "b1"),
        ] {
            let dst = addr(cluster, to, WEB_PORT);
            let stop = stop.clone();
            threads.push((
                name,
                join(cluster.pod("a1").netns.spawn(move || {
                    let mut done = 0u64;
                    let mut next = Instant::now();
                    while !stop.load(Ordering::Acquire) {
                        echo_once(dst).with_context(|| format!("after {done}"))?;
                        done += 1;
                        next += Duration::from_millis(5);
                        std::thread::sleep(next.saturating_duration_since(Instant::now()));
                    }
                    Ok(done)
                })),
            ));
        }
        for (name, mut session) in sessions {
            let stop = stop.clone();
            threads.push((
                name,
                std::thread::spawn(move || {
                    let mut done = 0;
                    while !stop.load(Ordering::Acquire) {
                        session
                            .roundtrip()
                            .map_err(|e| format!("after {done} rounds: {e:#}"))?;
                        done += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    // Still byte-exact after the upgrade; then closed by the client.
                    session
                        .roundtrip()
                        .map_err(|e| format!("last round: {e:#}"))?;
                    Ok(done)
                }),
            ));
        }
        Traffic { stop, threads }
    }

    /// Stops the open-ended parts, waits for all, and panics with every failure (and the
    /// kernel's drop counters of both nodes).
    fn finish(self, cluster: &Cluster) {
        self.stop.store(true, Ordering::Release);
        let mut failures = Vec::new();
        for (name, thread) in self.threads {
            match thread.join() {
                Ok(Ok(count)) => eprintln!("{name}: {count} without a failure"),
                Ok(Err(err)) => failures.push(format!("{name}: {err}")),
                Err(_) => failures.push(format!("{name}: panicked")),
            }
        }
        if !failures.is_empty() {
            for node in ["node-a", "node-b"] {
                let (_, metrics) = cluster.admin_get(node, "/metrics").unwrap_or_default();
                for line in metrics
                    .lines()
                    .filter(|l| l.starts_with("mesh_kernel_packets"))
                {
                    eprintln!("{node}: {line}");
                }
            }
        }
        assert!(failures.is_empty(), "{failures:#?}");
    }
}

#[test]
fn an_upgrade_under_load_fails_nothing_and_open_connections_go_on() {
    require_root!();
    let mut cluster = Cluster::new(&format!("{TWO_NODES}{HTTP_SERVICE}")).unwrap();
    cluster.start_mesh_everywhere().unwrap();
    let _echo = [
        Server::start(&cluster.pod("a2").netns, WEB_PORT, Behaviour::Echo).unwrap(),
        Server::start(&cluster.pod("b1").netns, WEB_PORT, Behaviour::Echo).unwrap(),
    ];
    let _web = [
        WebServer::start(&cluster.pod("a2").netns, HTTP_PORT, "a2").unwrap(),
        WebServer::start(&cluster.pod("b1").netns, HTTP_PORT, "b1").unwrap(),
    ];

    for node in ["node-a", "node-b"] {
        // Long-lived: same node, across nodes (HBONE), from outside the mesh to the mesh.
        let sessions = vec![
            (
                "session a1 -> a2 (same node)",
                session(&cluster, "a1", "a2"),
            ),
            ("session a1 -> b1 (HBONE)", session(&cluster, "a1", "b1")),
            (
                "session c1 -> a2 (plain, same node)",
                session(&cluster, "c1", "a2"),
            ),
            (
                "session c2 -> a2 (plain, other node)",
                session(&cluster, "c2", "a2"),
            ),
        ];
        let traffic = Traffic::start(&cluster, sessions, 6, node);
        std::thread::sleep(Duration::from_secs(2));
        let started = Instant::now();
        let mut predecessor = Draining(cluster.upgrade_mesh(node).unwrap());
        eprintln!("{node}: taken over in {:?}", started.elapsed());
        // As Kubernetes does once the successor is ready: the predecessor keeps draining.
        predecessor.terminate();
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            predecessor.exited(Duration::ZERO).is_none(),
            "the predecessor exited with connections still open"
        );

        // A connection opened after the takeover is the successor's (recorded on the node
        // of its destination).
        let to = if node == "node-a" { "a2" } else { "b1" };
        let mut late =
            Session::open(&cluster.pod("a1").netns, addr(&cluster, to, WEB_PORT)).unwrap();
        late.roundtrip().unwrap();
        // Open, so the record is there however many connections the load closes meanwhile;
        // on node-b, the stream's record names the client's pooled HBONE connection.
        let recorded = cluster.connections(node).unwrap();
        assert!(
            recorded.iter().any(|c| c.closed_ms.is_none()
                && c.original_dst == addr(&cluster, to, WEB_PORT)
                && (c.client == late.local() || c.direction == "hbone")),
            "the successor on {node} has no record of {}: {recorded:#?}",
            late.local()
        );
        drop(late);
        // HTTP keep-alive clients moved over at their next request: the successor serves
        // requests while the load runs (the client's side on node-a, the pods' on node-b).
        let requests = || {
            cluster
                .metric_sum(node, "istio_requests_total", &[])
                .unwrap()
        };
        let before = requests();
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            requests() > before + 100,
            "the successor on {node} serves no HTTP requests: the clients stayed with the \
             predecessor"
        );

        traffic.finish(&cluster);
        // The sessions closed: the predecessor's last connections ended.
        let status = predecessor
            .exited(Duration::from_secs(10))
            .expect("the predecessor did not exit after its last connection ended");
        assert!(status.success(), "{status}");
        let log = cluster.mesh_log(node);
        assert!(log.contains("drained: the last connection ended"), "{log}");
    }
}

#[test]
fn plain_relays_move_to_the_successor_and_what_cannot_move_closes_at_the_drain_timeout() {
    require_root!();
    let mut cluster = Cluster::new(TWO_NODES).unwrap();
    cluster.run_args = vec!["--drain-timeout".into(), "2s".into()];
    cluster.start_mesh_everywhere().unwrap();
    let _echo = [
        Server::start(&cluster.pod("a2").netns, WEB_PORT, Behaviour::Echo).unwrap(),
        Server::start(&cluster.pod("b1").netns, WEB_PORT, Behaviour::Echo).unwrap(),
        Server::start(&cluster.pod("c3").netns, 9000, Behaviour::Echo).unwrap(),
    ];
    let mut hbone = session(&cluster, "a1", "b1");
    // Relays without TLS state: enrolled to enrolled on this node, plaintext in from outside
    // the mesh (this node and the other), enrolled out to a pod outside the mesh.
    let plain_sessions = vec![
        ("a1 -> a2 (same node)", session(&cluster, "a1", "a2")),
        ("c1 -> a2 (plain in)", session(&cluster, "c1", "a2")),
        (
            "c2 -> a2 (plain in, other node)",
            session(&cluster, "c2", "a2"),
        ),
        (
            "a1 -> c3 (plain out)",
            Session::open(&cluster.pod("a1").netns, addr(&cluster, "c3", 9000)).unwrap(),
        ),
    ];
    let clients: Vec<(&str, std::net::SocketAddr)> = plain_sessions
        .iter()
        .map(|(n, s)| (*n, s.local()))
        .collect();
    // Round trips every 10 ms through the handover, each checked byte for byte.
    let stop = Arc::new(AtomicBool::new(false));
    let loops: Vec<_> = plain_sessions
        .into_iter()
        .map(|(name, mut session)| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut rounds = 0u64;
                while !stop.load(Ordering::Acquire) {
                    session
                        .roundtrip()
                        .map_err(|e| format!("{name}: after {rounds} rounds: {e:#}"))?;
                    rounds += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok::<_, String>((name, session, rounds))
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut predecessor = Draining(cluster.upgrade_mesh("node-a").unwrap());
    let taken = Instant::now();
    hbone.roundtrip().unwrap();
    let status = predecessor
        .exited(Duration::from_secs(10))
        .expect("the predecessor outlived its drain timeout");
    assert!(status.success(), "{status}");
    assert!(
        taken.elapsed() >= Duration::from_secs(2),
        "exited before the drain timeout: {:?}",
        taken.elapsed()
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Release);
    let mut plain = Vec::new();
    for thread in loops {
        let (name, session, rounds) = thread.join().unwrap().unwrap();
        eprintln!("{name}: {rounds} round trips through the handover");
        plain.push((name, session));
    }
    // The plain ones outlived the predecessor, with the successor relaying them.
    let recorded = cluster.connections("node-a").unwrap();
    for ((name, session), (_, client)) in plain.iter_mut().zip(&clients) {
        session
            .roundtrip()
            .unwrap_or_else(|e| panic!("{name} after the drain: {e:#}"));
        assert!(
            recorded
                .iter()
                .any(|c| c.client == *client && c.closed_ms.is_none()),
            "the successor has no open record of {name} ({client})"
        );
    }
    let log = cluster.mesh_log("node-a");
    assert!(
        log.contains("handed over to the successor (upgrade)"),
        "no access-log record of a handed-over relay: {log}"
    );
    // The HBONE one cannot move (its TLS and HTTP/2 state are the predecessor's): reset at
    // the drain timeout, not closed as if it had ended, so the client cannot take it for
    // complete.
    assert!(hbone.ended() && hbone.roundtrip().is_err());
    assert!(
        log.contains("drain timeout: closing the connections still open"),
        "{log}"
    );
    assert!(
        log.contains(
            "closed at the drain timeout (--drain-timeout): a successor took over the node"
        ),
        "no access-log record of the closed connection: {log}"
    );
    // The successor counts what its predecessor had to close: that one only.
    let closed = || {
        cluster
            .metric_sum("node-a", "mesh_proxy_predecessor_drain_closed_total", &[])
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    while closed() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        closed(),
        1,
        "the successor's count of what its predecessor closed"
    );
    // New connections go on.
    session(&cluster, "a1", "b1").roundtrip().unwrap();
}

#[test]
fn a_predecessor_killed_mid_drain_ends_only_its_own_connections() {
    require_root!();
    let mut cluster = Cluster::new(TWO_NODES).unwrap();
    cluster.start_mesh_everywhere().unwrap();
    let _echo = [
        Server::start(&cluster.pod("a2").netns, WEB_PORT, Behaviour::Echo).unwrap(),
        Server::start(&cluster.pod("b1").netns, WEB_PORT, Behaviour::Echo).unwrap(),
    ];
    // What stays with the predecessor (HBONE: its TLS state) and what moves (plain relays).
    let hbone = session(&cluster, "a1", "b1");
    let mut moved = [session(&cluster, "a1", "a2"), session(&cluster, "c1", "a2")];
    let mut predecessor = Draining(cluster.upgrade_mesh("node-a").unwrap());
    let mut after = [
        session(&cluster, "a1", "a2"),
        session(&cluster, "a1", "b1"),
        session(&cluster, "c1", "a2"),
    ];

    // New connections, every 5 ms, through the kill.
    let stop = Arc::new(AtomicBool::new(false));
    let stream = {
        let (dst, stop) = (addr(&cluster, "a2", WEB_PORT), stop.clone());
        join(cluster.pod("a1").netns.spawn(move || {
            let mut done = 0u64;
            while !stop.load(Ordering::Acquire) {
                echo_once(dst).with_context(|| format!("after {done}"))?;
                done += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(done)
        }))
    };
    std::thread::sleep(Duration::from_millis(300));
    predecessor.0.kill().unwrap();
    predecessor.0.wait().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Release);
    let done = stream.join().unwrap().unwrap();
    assert!(done > 20, "{done} connections");

    // Its own connection ended; the successor's, and those it took over, go on.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !hbone.ended() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        hbone.ended(),
        "the predecessor's HBONE connection is still open"
    );
    for s in after.iter_mut().chain(&mut moved) {
        s.roundtrip().unwrap();
    }
    let log = cluster.mesh_log("node-a");
    assert!(log.contains("the predecessor has exited"), "{log}");

    // A crash of the only mesh-node: its replacement serves again (fail closed meanwhile).
    let crashed = Instant::now();
    cluster.kill_mesh("node-a").unwrap();
    cluster.start_mesh("node-a").unwrap();
    let mut back = session(&cluster, "a1", "a2");
    back.roundtrip().unwrap();
    eprintln!(
        "crash recovery (SIGKILL to a new mesh-node serving): {:?}",
        crashed.elapsed()
    );
}

#[test]
fn exec_probes_answer_for_each_process_while_two_share_the_node() {
    require_root!();
    let mut cluster = Cluster::new(TWO_NODES).unwrap();
    let socket = |n: usize| cluster.dir().join(format!("probe-{n}.sock"));
    let (first, second) = (socket(0), socket(1));
    cluster.start_mesh("node-b").unwrap();
    cluster.run_args = vec!["--probe-socket".into(), first.display().to_string()];
    cluster.start_mesh("node-a").unwrap();
    // The successor gets a socket of its own (each pod's emptyDir on a node).
    cluster.run_args.clear();
    let probe = |check: &str, socket: &std::path::Path| {
        std::process::Command::new(mesh_tests::cluster::mesh_node_bin().unwrap())
            .args(["probe", check, "--socket"])
            .arg(socket)
            .output()
            .unwrap()
    };
    assert!(probe("ready", &first).status.success());
    let _echo = Server::start(&cluster.pod("b1").netns, WEB_PORT, Behaviour::Echo).unwrap();
    // An open HBONE connection keeps the predecessor draining.
    let mut held = session(&cluster, "a1", "b1");
    let mut predecessor = Draining(
        cluster
            .upgrade_mesh_with("node-a", &["--probe-socket", &second.display().to_string()])
            .unwrap(),
    );
    let draining = probe("ready", &first);
    assert_eq!(draining.status.code(), Some(1), "{draining:?}");
    assert!(String::from_utf8_lossy(&draining.stdout).contains("draining"));
    assert!(probe("live", &first).status.success());
    assert!(probe("ready", &second).status.success());
    assert!(probe("live", &second).status.success());
    // The admin port is the successor's.
    let (status, _) = cluster.admin_get("node-a", "/healthz/ready").unwrap();
    assert_eq!(status, 200);
    held.roundtrip().unwrap();
    drop(held);
    assert!(predecessor.exited(Duration::from_secs(10)).is_some());
    assert!(!probe("live", &first).status.success());
    assert!(probe("ready", &second).status.success());
}
