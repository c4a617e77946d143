//! Hostile pods against the proxy's own servers (root, two nodes, release-like build): the
//! admin port keeps the mesh's inventory to loopback, slow request heads and HTTP/2 floods
//! cost bounded memory and are cut off, a backend cannot grow the metrics, a client cannot
//! forge its identity to the application, responses over HBONE arrive complete, and a
//! client that declares a body and sends nothing holds no request slot.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use mesh_tests::{
    apps::{Behaviour, Server},
    cluster::{proc_status_kib, Cluster},
    fixtures::{L7, L7_GRPC, L7_HTTP},
    netns::Netns,
    require_root,
    web::{curl, WebServer},
};

const PORT: u16 = 8080;
/// The proxy's request-head deadline (`http::server::HEAD_TIMEOUT`).
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
const HBONE: u16 = 15008;
/// The `web-app` Service's TCP port (`tcp-raw`).
const TCP_PORT: u16 = 7000;

fn start(extra: &str) -> (Cluster, Vec<WebServer>) {
    let mut cluster = Cluster::new(&format!("{L7}{extra}")).unwrap();
    cluster.start_mesh_everywhere().unwrap();
    let servers = ["web-1", "web-2", "web-3"]
        .into_iter()
        .map(|name| WebServer::start(&cluster.pod(name).netns, PORT, name).unwrap())
        .collect();
    (cluster, servers)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A TCP connection made from inside `ns`, for tokio.
fn connect(ns: &Netns, dst: SocketAddr) -> tokio::net::TcpStream {
    let stream = ns
        .run(move || Ok(TcpStream::connect_timeout(&dst, Duration::from_secs(5))?))
        .unwrap();
    stream.set_nonblocking(true).unwrap();
    tokio::net::TcpStream::from_std(stream).unwrap()
}

/// Peak RSS of a process while `work` runs, sampled every 50 ms, in KiB.
fn peak_rss_during<T>(pid: u32, work: impl FnOnce() -> T) -> (T, u64) {
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (done, peak) = (done.clone(), peak.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Acquire) {
                if let Ok(kib) = proc_status_kib(pid, "VmRSS:") {
                    peak.fetch_max(kib, Ordering::AcqRel);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let out = work();
    done.store(true, Ordering::Release);
    sampler.join().unwrap();
    (out, peak.load(Ordering::Acquire))
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[test]
fn the_admin_port_shows_the_mesh_only_on_loopback() {
    require_root!();
    let (cluster, _servers) = start("");
    let node = cluster.node("node-a");
    // A pod outside the mesh, at its node's address.
    let plain = &cluster.pod("plain-a").netns;
    let admin = |path: &str| {
        let url = format!("http://{}:{}{path}", node.gateway, mesh_common::PORT_ADMIN);
        let (status, _, body) = curl(plain, &[&url]).unwrap();
        (status, body)
    };
    for path in ["/debug/state", "/debug/connections"] {
        let (status, body) = admin(path);
        assert_eq!(status, 403, "{path} from a pod: {body:.200}");
        assert!(!body.contains("spiffe://"), "{path} revealed identities");
    }
    let (status, body) = admin("/metrics");
    assert_eq!(status, 200);
    assert!(body.contains("mesh_config_generation"), "{body:.200}");
    assert_eq!(admin("/healthz/ready").0, 200);
    let (status, body) = cluster.admin_get("node-a", "/debug/state").unwrap();
    assert_eq!(status, 200, "on loopback");
    assert!(body.contains("spiffe://cluster.local/ns/default/sa/web-app"));
}

/// Opens `count` connections to `dst` from `ns`, each sending a request head 1 KiB at a
/// time every 250 ms and never finishing it; returns, per connection, when the proxy
/// closed it after its start (`None`: still open after `give_up`).
fn slow_heads(
    ns: &Netns,
    dst: SocketAddr,
    count: usize,
    give_up: Duration,
) -> Vec<Option<Duration>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = runtime();
    let streams: Vec<_> = (0..count)
        .map(|_| {
            (rt.block_on(async { Instant::now() }), {
                let _guard = rt.enter();
                connect(ns, dst)
            })
        })
        .collect();
    rt.block_on(async move {
        let tasks: Vec<_> = streams
            .into_iter()
            .map(|(started, mut stream)| {
                tokio::spawn(async move {
                    let mut chunk = b"GET / HTTP/1.1\r\nHost: victim\r\nX-Pad: ".to_vec();
                    chunk.resize(1024, b'a');
                    let mut buf = [0u8; 512];
                    while started.elapsed() < give_up {
                        if stream.write_all(&chunk).await.is_err() {
                            return Some(started.elapsed());
                        }
                        chunk = vec![b'a'; 1024];
                        let wait = tokio::time::sleep(Duration::from_millis(250));
                        tokio::select! {
                            read = stream.read(&mut buf) => match read {
                                Ok(0) | Err(_) => return Some(started.elapsed()),
                                Ok(_) => {} // a 4xx answer; the close follows
                            },
                            () = wait => {}
                        }
                    }
                    None
                })
            })
            .collect();
        let mut out = Vec::new();
        for task in tasks {
            out.push(task.await.unwrap());
        }
        out
    })
}

#[test]
fn slow_request_heads_cost_bounded_memory_and_are_closed_in_time() {
    require_root!();
    mesh_node::sys::raise_nofile_limit().unwrap();
    let (cluster, _servers) = start("");
    let pid = cluster.mesh_pid("node-a").unwrap();
    let gateway = cluster.node("node-a").gateway;
    let admin = SocketAddr::from((gateway, mesh_common::PORT_ADMIN));
    let l7: SocketAddr = L7_HTTP.parse().unwrap();
    // Normal traffic throughout: a meshed pod's requests, the node's own admin reads.
    let stop = AtomicBool::new(false);
    let other = &cluster.pod("other").netns;
    let node_ns = &cluster.node("node-a").netns;
    let plain = &cluster.pod("plain-a").netns;
    let api = &cluster.pod("api").netns;
    let give_up = HEAD_TIMEOUT + Duration::from_secs(5);
    let mut before = 0;
    let (((admin_closed, l7_closed), peak), (served, failed)) = std::thread::scope(|scope| {
        let normal = scope.spawn(|| {
            let (mut served, mut failed) = (0, Vec::new());
            while !stop.load(Ordering::Acquire) {
                match curl(other, &["-o", "/dev/null", &format!("http://{L7_HTTP}/")]) {
                    Ok((200, _, _)) => served += 1,
                    other => failed.push(format!("L7: {other:?}")),
                }
                match node_ns.http_get(mesh_common::PORT_ADMIN, "/healthz/ready") {
                    Ok((200, _)) => served += 1,
                    other => failed.push(format!("admin: {other:?}")),
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            (served, failed)
        });
        std::thread::sleep(Duration::from_secs(1));
        before = cluster.mesh_rss_kib("node-a").unwrap();
        let attacks = peak_rss_during(pid, || {
            let admin_attack = scope.spawn(|| slow_heads(plain, admin, 1000, give_up));
            let l7_closed = slow_heads(api, l7, 1000, give_up);
            (admin_attack.join().unwrap(), l7_closed)
        });
        stop.store(true, Ordering::Release);
        (attacks, normal.join().unwrap())
    });
    let growth_mib = peak.saturating_sub(before) as f64 / 1024.0;
    let latest = |closed: &[Option<Duration>]| closed.iter().flatten().max().copied();
    println!(
        "slow heads: mesh-node RSS {:.1} MiB before, peak {:.1} MiB (+{growth_mib:.1} MiB); \
         admin: {} of 1000 closed, last after {:?}; L7: {} of 1000 closed, last after {:?}; \
         normal requests served meanwhile: {served}, failed: {}",
        before as f64 / 1024.0,
        peak as f64 / 1024.0,
        admin_closed.iter().flatten().count(),
        latest(&admin_closed),
        l7_closed.iter().flatten().count(),
        latest(&l7_closed),
        failed.len(),
    );
    for (what, closed) in [("admin", &admin_closed), ("L7", &l7_closed)] {
        let open = closed.iter().filter(|c| c.is_none()).count();
        assert_eq!(
            open, 0,
            "{what}: {open} slow connections still open after {give_up:?}"
        );
        let late = latest(closed).unwrap();
        assert!(
            late <= HEAD_TIMEOUT + Duration::from_secs(1),
            "{what}: a slow connection was closed only after {late:?}"
        );
    }
    assert!(growth_mib <= 16.0, "mesh-node grew by {growth_mib:.1} MiB");
    assert!(failed.is_empty(), "normal requests failed: {failed:?}");
    assert!(served > 20, "only {served} normal requests were made");
    let limited = cluster
        .metric_sum("node-a", "mesh_http_server_limited_total", &[])
        .unwrap();
    assert!(limited >= 2000, "{limited} limited connections counted");
}

/// An HTTP/2 client over `io`, its connection driven in the background.
async fn h2_client<T>(io: T) -> h2::client::SendRequest<Bytes>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (client, connection) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Sends up to `count` requests made by `request`, cancelling each `wait` after sending its
/// head; returns how many were sent before the server cut the connection off (`count`:
/// never).
async fn rapid_resets(
    mut client: h2::client::SendRequest<Bytes>,
    count: usize,
    wait: Duration,
    request: impl Fn() -> http::Request<()>,
) -> usize {
    for sent in 0..count {
        let ready = tokio::time::timeout(Duration::from_secs(5), client.clone().ready()).await;
        client = match ready {
            Ok(Ok(client)) => client,
            _ => return sent,
        };
        let Ok((response, mut stream)) = client.send_request(request(), false) else {
            return sent;
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        stream.send_reset(h2::Reason::CANCEL);
        drop(response);
        // Let the connection task put the frames on the wire.
        tokio::task::yield_now().await;
    }
    // The last resets may still be on their way.
    tokio::time::sleep(Duration::from_millis(500)).await;
    match client.ready().await {
        Ok(_) => count,
        Err(_) => count - 1,
    }
}

/// A mesh client certificate for `identity`, and the TLS connector that presents it to
/// a server of `server` identity.
fn mesh_connector(cluster: &Cluster, identity: &str, server: &str) -> tokio_rustls::TlsConnector {
    use mesh_node::identity::{bundle, tls};
    let ca = cluster.ca().unwrap();
    let leaf = ca.issue(identity, Duration::from_secs(3600)).unwrap();
    let key = tls::certified_key(leaf.chain, leaf.key).unwrap();
    let bundle = bundle::TrustBundle::new(ca.roots().to_vec(), std::path::Path::new("mesh"))
        .unwrap()
        .shared();
    tokio_rustls::TlsConnector::from(tls::client_config(key, bundle, server))
}

/// An HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK header block of literal `x-flood` headers of 4,000 bytes, `size` bytes long.
fn flood_block(size: usize) -> Vec<u8> {
    let mut literal = vec![0x00, 7];
    literal.extend_from_slice(b"x-flood");
    // 4000 as an HPACK integer with a 7-bit prefix: 127, then 3873 in 7-bit groups.
    literal.extend_from_slice(&[0x7f, 0xa1, 0x1e]);
    literal.extend(std::iter::repeat_n(b'a', 4000));
    let mut block = Vec::with_capacity(size);
    while block.len() + literal.len() <= size {
        block.extend_from_slice(&literal);
    }
    block
}

/// Sends a header block that never ends (HEADERS, then CONTINUATION frames of `frame_size`)
/// over `io` until the server closes the connection or `total` bytes went out; returns the
/// bytes sent before the server's answer ended it (`None`: it never did).
async fn continuation_flood<T>(io: T, frame_size: usize, total: usize) -> Option<usize>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut reader, mut io) = tokio::io::split(io);
    let mut start = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    start.extend(frame(4, 0, 0, &[]));
    io.write_all(&start).await.ok()?;
    let block = flood_block(frame_size);
    let mut sent = 0;
    let mut first = true;
    let mut buf = vec![0u8; 4096];
    while sent < total {
        let kind = if first { 1 } else { 9 };
        first = false;
        let bytes = frame(kind, 0, 1, &block);
        let write = io.write_all(&bytes);
        let read = async {
            // Anything but SETTINGS and their ACK means the end (GOAWAY, or the close).
            loop {
                match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        };
        tokio::select! {
            written = write => {
                if written.is_err() {
                    return Some(sent);
                }
                sent += bytes.len();
            }
            () = read => return Some(sent),
        }
    }
    // All sent: the server has had its chance to refuse.
    let mut rest = Vec::new();
    match tokio::time::timeout(Duration::from_secs(3), reader.read_to_end(&mut rest)).await {
        Ok(_) => Some(sent),
        Err(_) => None,
    }
}

#[test]
fn http2_floods_are_cut_off_on_l7_ports_and_on_hbone() {
    require_root!();
    let (cluster, _servers) = start("");
    let api = &cluster.pod("api").netns;
    let plain = &cluster.pod("plain-a").netns;
    let pid_a = cluster.mesh_pid("node-a").unwrap();
    let pid_b = cluster.mesh_pid("node-b").unwrap();
    let web_2 = SocketAddr::from((cluster.pod("web-2").ip, HBONE));
    let connector = mesh_connector(
        &cluster,
        "spiffe://cluster.local/ns/default/sa/api-service",
        "spiffe://cluster.local/ns/default/sa/web-app",
    );
    let rt = runtime();
    let tls = |rt: &tokio::runtime::Runtime| {
        let _guard = rt.enter();
        let tcp = connect(plain, web_2);
        let name = rustls::pki_types::ServerName::IpAddress(cluster.pod("web-2").ip.into());
        rt.block_on(connector.connect(name, tcp)).unwrap()
    };

    // Rapid reset on the L7 client side (h2c to a Service port): each request declares a
    // body, is accepted and handled, and is cancelled 2 ms later.
    let cpu = cpu_seconds(pid_a);
    let (sent, peak_a) = peak_rss_during(pid_a, || {
        rt.block_on(async {
            let client = h2_client(connect(api, L7_GRPC.parse().unwrap())).await;
            rapid_resets(client, 1000, Duration::from_millis(2), || {
                http::Request::post(format!("http://{L7_GRPC}/"))
                    .header("content-length", "100")
                    .body(())
                    .unwrap()
            })
            .await
        })
    });
    let l7_cpu = cpu_seconds(pid_a) - cpu;
    println!("L7 rapid reset: cut off after {sent} of 1000 cancelled requests; node-a CPU {l7_cpu:.2} s, peak RSS {:.1} MiB", peak_a as f64 / 1024.0);
    let limited = |node| {
        let (_, metrics) = cluster.admin_get(node, "/metrics").unwrap();
        metrics
            .lines()
            .filter(|l| l.contains("_limited_total{"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    println!("limits hit: {:?}", limited("node-a"));
    assert!(
        sent < 1000,
        "the L7 port kept serving a client that cancels every request"
    );

    // Rapid reset on HBONE (after mTLS): tunnels cancelled at once (h2 itself limits resets
    // of streams not yet accepted), and tunnels cancelled 5 ms after they were opened,
    // to the pod's HTTP port (HTTP served inside the tunnel) and to a TCP port (relayed).
    let _echo = Server::start(&cluster.pod("web-2").netns, TCP_PORT, Behaviour::Echo).unwrap();
    for (port, wait) in [
        (PORT, Duration::ZERO),
        (PORT, Duration::from_millis(5)),
        (TCP_PORT, Duration::from_millis(5)),
    ] {
        let cpu = cpu_seconds(pid_b);
        let target = format!("{}:{port}", cluster.pod("web-2").ip);
        let (sent, peak_b) = peak_rss_during(pid_b, || {
            let stream = tls(&rt);
            rt.block_on(async {
                let client = h2_client(stream).await;
                rapid_resets(client, 1000, wait, || {
                    http::Request::builder()
                        .method(http::Method::CONNECT)
                        .uri(target.as_str())
                        .body(())
                        .unwrap()
                })
                .await
            })
        });
        let hbone_cpu = cpu_seconds(pid_b) - cpu;
        println!(
            "HBONE rapid reset to :{port}, cancelled after {wait:?}: cut off after {sent} of \
             1000 tunnels; node-b CPU {hbone_cpu:.2} s, peak RSS {:.1} MiB",
            peak_b as f64 / 1024.0
        );
        assert!(
            sent < 1000,
            "HBONE kept serving a client that cancels every tunnel (:{port}, {wait:?})"
        );
    }
    println!("limits hit on node-b: {:?}", limited("node-b"));

    // CONTINUATION floods: a header block that never ends. On the L7 port in 16 KiB frames
    // (its largest); on HBONE, whose frames may be 1 MiB, in 1 MiB frames from four
    // connections at once.
    let l7_stream = {
        let _guard = rt.enter();
        connect(api, L7_GRPC.parse().unwrap())
    };
    // What the proxy took in, not what the client's kernel queued: with its send buffer
    // autotuned (up to 4 MiB) a slow (debug) proxy let 1.3 MB pile up before its GOAWAY
    // arrived in about one run of five (before and after the relay change of the churn fix).
    socket2::SockRef::from(&l7_stream)
        .set_send_buffer_size(64 << 10)
        .unwrap();
    let cut = rt.block_on(continuation_flood(l7_stream, 16 << 10, 32 << 20));
    println!("L7 CONTINUATION flood: cut off after {cut:?} bytes");
    assert!(cut.is_some_and(|n| n < 1 << 20), "L7 port: {cut:?}");
    let before = proc_status_kib(pid_b, "VmRSS:").unwrap();
    let streams: Vec<_> = (0..4).map(|_| tls(&rt)).collect();
    let (cuts, peak) = peak_rss_during(pid_b, || {
        rt.block_on(async {
            let floods = streams
                .into_iter()
                .map(|s| tokio::spawn(continuation_flood(s, 1 << 20, 32 << 20)));
            let mut cuts = Vec::new();
            for flood in floods {
                cuts.push(flood.await.unwrap());
            }
            cuts
        })
    });
    let growth = peak.saturating_sub(before) as f64 / 1024.0;
    println!(
        "HBONE CONTINUATION flood x4: cut off after {cuts:?} bytes; node-b RSS +{growth:.1} MiB"
    );
    assert!(cuts.iter().all(Option::is_some), "{cuts:?}");
    assert!(
        growth <= 16.0,
        "node-b grew by {growth:.1} MiB under the flood"
    );
    // The proxy still serves.
    let (status, _, _) = curl(api, &["-o", "/dev/null", &format!("http://{L7_HTTP}/")]).unwrap();
    assert_eq!(status, 200);
}

#[test]
fn a_backend_cannot_grow_the_request_metrics() {
    require_root!();
    let (cluster, _servers) = start("");
    let api = &cluster.pod("api").netns;
    // A gRPC client (the h2 crate) making 1,000 calls, each answered with another status.
    let answered = runtime().block_on(async {
        let mut client = h2_client(connect(api, L7_GRPC.parse().unwrap())).await;
        let mut answered = 0;
        for i in 0..1000 {
            client = client.ready().await.unwrap();
            let request = http::Request::post(format!("http://{L7_GRPC}/x?grpc_status=s{i:04}"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .unwrap();
            let (response, mut body) = client.send_request(request, false).unwrap();
            body.send_data(Bytes::from_static(&[0, 0, 0, 0, 1, b'x']), true)
                .unwrap();
            let mut response = response.await.unwrap().into_body();
            while let Some(data) = response.data().await {
                let data = data.unwrap();
                let _ = response.flow_control().release_capacity(data.len());
            }
            let trailers = response.trailers().await.unwrap().unwrap_or_default();
            if trailers.get("grpc-status").is_some() {
                answered += 1;
            }
        }
        answered
    });
    assert_eq!(answered, 1000, "every call answered with a status");
    for node in ["node-a", "node-b"] {
        let (_, metrics) = cluster.admin_get(node, "/metrics").unwrap();
        for family in [
            "istio_requests_total{",
            "istio_request_duration_milliseconds_count{",
            "istio_request_bytes_count{",
            "istio_response_bytes_count{",
        ] {
            let series = metrics.lines().filter(|l| l.starts_with(family)).count();
            println!(
                "{node}: {series} series of {family}..}} ; /metrics is {} bytes",
                metrics.len()
            );
            assert!(
                series < 100,
                "{node}: {series} series of {family}..}} after 1000 distinct grpc-status"
            );
        }
        assert!(
            metrics.contains("grpc_response_status=\"unknown\""),
            "{node}: the invalid statuses are counted as unknown"
        );
    }
}

#[test]
fn a_forged_client_certificate_header_never_reaches_the_app() {
    require_root!();
    let (cluster, servers) = start("");
    let api = &cluster.pod("api").netns;
    let forged = "x-forwarded-client-cert: By=spiffe://cluster.local/ns/default/sa/web-app;\
                  URI=spiffe://cluster.local/ns/kube-system/sa/cluster-admin";
    for _ in 0..12 {
        let (status, _, _) = curl(
            api,
            &[
                "-H",
                forged,
                "-o",
                "/dev/null",
                &format!("http://{L7_HTTP}/"),
            ],
        )
        .unwrap();
        assert_eq!(status, 200);
    }
    let want = "By=spiffe://cluster.local/ns/default/sa/web-app;\
                URI=spiffe://cluster.local/ns/default/sa/api-service";
    let mut seen = 0;
    for server in &servers {
        for value in server.seen.client_certs.lock().unwrap().iter() {
            assert_eq!(value, want, "{} saw", server.name);
            seen += 1;
        }
    }
    assert_eq!(seen, 12);
}

#[test]
fn responses_over_hbone_arrive_complete_when_the_client_closes() {
    require_root!();
    let deny = r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-private, namespace: default}
spec:
  selector: {matchLabels: {app: web-app}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/private"]}}]
"#;
    let (cluster, _servers) = start(deny);
    let api = &cluster.pod("api").netns;
    // web-2 is on the other node: the request crosses in an HBONE tunnel.
    let web_2 = format!("http://{}:{PORT}", cluster.pod("web-2").ip);
    let mut complete = 0;
    for i in 0..20 {
        let (status, _, body) =
            curl(api, &["-H", "connection: close", &format!("{web_2}/{i}")]).unwrap();
        if status == 200 && body == "web-2\n" {
            complete += 1;
        }
    }
    assert_eq!(complete, 20, "complete responses of 20");
    let (status, _, body) = curl(
        api,
        &["-H", "connection: close", &format!("{web_2}/private")],
    )
    .unwrap();
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
}

#[test]
fn a_declared_body_that_never_comes_holds_no_request_slot() {
    require_root!();
    let one_slot = r#"
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web-app, namespace: default}
spec:
  host: web-app
  trafficPolicy:
    connectionPool:
      http: {http2MaxRequests: 1}
"#;
    let (cluster, _servers) = start(one_slot);
    let api = &cluster.pod("api").netns;
    // Declares 1,000 bytes and sends none.
    let mut stalled = api
        .run(|| {
            Ok(TcpStream::connect_timeout(
                &L7_HTTP.parse()?,
                Duration::from_secs(5),
            )?)
        })
        .unwrap();
    let started = Instant::now();
    write!(
        stalled,
        "POST /upload HTTP/1.1\r\nHost: web-app\r\nContent-Length: 1000\r\n\r\n"
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // Meanwhile the destination's one request slot is free for others.
    for _ in 0..5 {
        let (status, _, _) =
            curl(api, &["-o", "/dev/null", &format!("http://{L7_HTTP}/")]).unwrap();
        assert_eq!(status, 200, "a request while a client stalls its body");
    }
    // And the stalled one gets 408 at the deadline.
    stalled
        .set_read_timeout(Some(HEAD_TIMEOUT + Duration::from_secs(5)))
        .unwrap();
    let mut answer = vec![0u8; 1024];
    let n = stalled.read(&mut answer).unwrap_or(0);
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:.100}");
    assert!(started.elapsed() <= HEAD_TIMEOUT + Duration::from_secs(1));
}
