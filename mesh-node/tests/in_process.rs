//! The in-process tier: two node proxies in one process, talking over loopback, as a normal
//! user (no capture programs, no namespaces, no privilege). Pods are `127.x.y.z` addresses
//! (every one of them is local); the kernel-facing parts are `transport::Loopback`, so an
//! accepted connection's original destination is what the test registered for its client.
//! The rest is the real data path: plans, the policy gate, HBONE with mutual TLS and SPIFFE
//! checks, the HBONE pool, L7 routing with retries.
//!
//! Each test uses its own `127.<n>.0.0/16`, so tests run in parallel without sharing a port.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use mesh_node::{
    config::{parse_str, semantics::Mesh},
    connections::{ConnectionRecord, Connections, Direction},
    context::Context,
    gate::Revocations,
    http::{server::ServerMetrics, ProxyContext, L7},
    identity::{
        ca::{generate_root, Pem},
        signer, Ca, CertMetrics, Certificates,
    },
    metrics::{ConfigMetrics, ProxyMetrics},
    proxy,
    reload::Publisher,
    state::State,
    telemetry::{RequestMetrics, SeriesCap, TcpMetrics},
    transport::{Loopback, Pool},
};
use prometheus_client::registry::Registry;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpSocket, TcpStream},
};

const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/shop/sa/server";

/// The cluster of test `net` (`127.<net>.0.0/16`): `a1` (service account `client`) on node-a
/// at `.1.2`, `b1` (`server_sa`) on node-b at `.2.2` behind Service `web` (HTTP on 80 ->
/// 8080, with a VirtualService that retries 5xx), which admits only `client` on 7000 and 8080.
fn cluster(net: u8, server_sa: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: shop, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: a1, namespace: shop}}
spec: {{nodeName: node-a, serviceAccountName: client}}
status: {{podIP: 127.{net}.1.2, conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: b1, namespace: shop, labels: {{app: web}}}}
spec:
  nodeName: node-b
  serviceAccountName: {server_sa}
  containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]
status: {{podIP: 127.{net}.2.2, conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  clusterIP: 100.66.0.10
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: http}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: shop}}
spec:
  hosts: [web.shop.svc.cluster.local]
  http:
  - route: [{{destination: {{host: web.shop.svc.cluster.local}}}}]
    retries: {{attempts: 3, retryOn: 5xx}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: client-only, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/shop/sa/client]}}}}]
    to: [{{operation: {{ports: ["7000", "8080"]}}}}]
"#
    )
}

fn pod(net: u8, node: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, net, node, 2)
}

/// One in-process node proxy.
struct Node {
    ctx: Arc<ProxyContext>,
    sockets: Arc<Loopback>,
    /// The outbound listener (`:15001` on a node).
    outbound: SocketAddr,
    /// The node's signer (each node has its own, signing for the pods of its own view).
    _signer: signer::Local,
}

struct Setup<'a> {
    net: u8,
    node: &'a str,
    config: String,
    /// CA certificate and key (PEM).
    ca: &'a Pem,
    lifetime: Duration,
    idle: Duration,
}

impl Setup<'_> {
    async fn start(self) -> Node {
        let resources = parse_str("cluster.yaml", &self.config).expect("valid config");
        let signer = signer::Local::start(
            Ca::from_pem(&self.ca.cert, &self.ca.key).expect("CA"),
            signer::Pods::from_resources(&resources),
            &[self.node],
        )
        .await
        .expect("signer");
        let state = State::build(&resources, self.node, &Mesh::default(), 1);
        let mut registry = Registry::default();
        let cap = SeriesCap::register(&mut registry);
        let limited = ServerMetrics::register(&mut registry);
        let requests = RequestMetrics::register(&mut registry, cap.clone());
        let certs = Arc::new(Certificates::new(
            signer.client(self.node),
            self.node,
            "cluster.local",
            self.lifetime,
            CertMetrics::register(&mut registry),
        ));
        certs.sync(&state.local_identities()).await;
        let pool = Pool::default();
        pool.spawn_reaper(certs.clone(), self.idle);
        let sockets = Arc::new(Loopback::default());
        let local: Vec<Ipv4Addr> = state.local_enrolled().into_iter().collect();
        let state = Arc::new(state);
        let revocations = Arc::new(Revocations::new(state.clone(), &mut registry));
        let ctx = Arc::new(Context {
            state: Arc::new(ArcSwap::new(state)),
            connections: Arc::new(Connections::default()),
            metrics: ProxyMetrics::register(&mut registry),
            tcp: TcpMetrics::register(&mut registry, cap),
            certs,
            pool,
            node_addresses: Arc::new(ArcSwap::from_pointee(BTreeSet::new())),
            sockets: sockets.clone(),
            l7: Arc::new(L7::new(&mut registry, requests, &limited, None)),
            revocations,
            drain: Default::default(),
        });
        // The outbound listener anywhere on loopback; the HBONE listener at each local pod's
        // address (on a node, sk_lookup hands `podIP:15008` to one listener).
        let outbound = listen(SocketAddr::from((Ipv4Addr::new(127, self.net, 0, 1), 0)));
        let outbound_addr = outbound.local_addr().unwrap();
        tokio::spawn(proxy::serve(outbound, Direction::Outbound, ctx.clone()));
        for ip in local {
            let hbone = listen(SocketAddr::from((ip, 15008)));
            tokio::spawn(proxy::serve(hbone, Direction::Hbone, ctx.clone()));
        }
        Node {
            ctx,
            sockets,
            outbound: outbound_addr,
            _signer: signer,
        }
    }
}

fn listen(addr: SocketAddr) -> std::net::TcpListener {
    let listener = std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    listener.set_nonblocking(true).unwrap();
    listener
}

/// Nodes a and b of test `net`, sharing one CA; b runs its pod as `server_sa`.
async fn nodes(net: u8, server_sa: &str, lifetime: Duration, idle: Duration) -> (Node, Node) {
    let ca = generate_root().expect("CA");
    let setup = |node| Setup {
        net,
        node,
        config: cluster(net, server_sa),
        ca: &ca,
        lifetime,
        idle,
    };
    (setup("node-a").start().await, setup("node-b").start().await)
}

const DAY: Duration = Duration::from_secs(24 * 3600);
const MINUTE: Duration = Duration::from_secs(60);

/// An echo server at `addr`: it first writes the client's address and a newline, then
/// echoes. Counts its connections.
async fn echo(addr: SocketAddr) -> Arc<AtomicUsize> {
    let listener = TcpListener::bind(addr).await.expect("echo server");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, peer)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let _ = stream
                    .write_all(format!("{}\n", peer.ip()).as_bytes())
                    .await;
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    accepted
}

/// Pod `from` connects to `dst` through `node`'s outbound listener, as the kernel would
/// capture it.
async fn connect(node: &Node, from: Ipv4Addr, dst: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    node.sockets.capture(socket.local_addr().unwrap(), dst);
    socket
        .connect(node.outbound)
        .await
        .expect("the proxy accepts")
}

/// Whether a connection from pod `from` to `dst` through `node` is refused: reset or closed
/// before the server said a word (a refusal can come before `connect` returns).
async fn refused(node: &Node, from: Ipv4Addr, dst: SocketAddr) -> bool {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    node.sockets.capture(socket.local_addr().unwrap(), dst);
    match socket.connect(node.outbound).await {
        Ok(mut stream) => greeting(&mut stream).await.is_none(),
        Err(err) => err.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// The first line the server sent (the address it saw), or `None` if the connection ended.
async fn greeting(stream: &mut TcpStream) -> Option<String> {
    let mut line = String::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        BufReader::new(stream).read_line(&mut line).await
    })
    .await
    .expect("an answer or an end within 10 s");
    match read {
        Ok(n) if n > 0 => Some(line.trim_end().to_string()),
        _ => None,
    }
}

/// Waits for a closed connection record of `node` that satisfies `pick`.
async fn record(
    node: &Node,
    what: &str,
    pick: impl Fn(&ConnectionRecord) -> bool,
) -> ConnectionRecord {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = node
            .ctx
            .connections
            .snapshot()
            .into_iter()
            .find(|r| r.closed_ms.is_some() && pick(r));
        if let Some(found) = found {
            return found;
        }
        assert!(Instant::now() < deadline, "no record of {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hbone_carries_a_connection_with_mutual_tls_from_the_clients_address() {
    let net = 11;
    let (a, b) = nodes(net, "server", DAY, MINUTE).await;
    echo((pod(net, 2), 7000).into()).await;
    let mut stream = connect(&a, pod(net, 1), (pod(net, 2), 7000).into()).await;
    assert_eq!(
        greeting(&mut stream).await.as_deref(),
        Some(pod(net, 1).to_string().as_str()),
        "the server sees the client pod's address"
    );
    stream.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    stream.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"ping");
    drop(stream);
    let sent = record(&a, "the source side", |r| r.path == "hbone").await;
    assert_eq!(sent.direction, "outbound");
    assert_eq!(sent.destination_identity.as_deref(), Some(SERVER));
    let received = record(&b, "the destination side", |r| r.direction == "hbone").await;
    assert_eq!(
        received.source_identity.as_deref(),
        Some(CLIENT),
        "the identity comes from the client's certificate"
    );
    let decision = received.authorization.expect("decided");
    assert!(decision.allowed);
    assert_eq!(decision.policy.as_deref(), Some("shop/client-only"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_destination_gate_refuses_a_port_its_policy_does_not_admit() {
    let net = 12;
    let (a, b) = nodes(net, "server", DAY, MINUTE).await;
    let reached = echo((pod(net, 2), 7001).into()).await;
    assert!(refused(&a, pod(net, 1), (pod(net, 2), 7001).into()).await);
    let refused = record(&b, "the refusal", |r| r.direction == "hbone").await;
    assert_eq!(refused.flag.code(), "DENY");
    assert_eq!(
        refused.authorization.expect("decided").reason,
        "no ALLOW policy matched"
    );
    let source = record(&a, "the source side", |r| r.path == "hbone").await;
    assert_eq!(source.flag.code(), "DENY", "{:?}", source.error);
    assert_eq!(reached.load(Ordering::SeqCst), 0, "no byte reached the pod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_proving_another_identity_is_refused_with_a_hint() {
    let net = 13;
    let ca = generate_root().expect("CA");
    let setup = |node, server_sa| Setup {
        net,
        node,
        // node-b thinks b1 runs as `impostor` and presents that identity.
        config: cluster(net, server_sa),
        ca: &ca,
        lifetime: DAY,
        idle: MINUTE,
    };
    let a = setup("node-a", "server").start().await;
    let _b = setup("node-b", "impostor").start().await;
    let reached = echo((pod(net, 2), 7000).into()).await;
    assert!(refused(&a, pod(net, 1), (pod(net, 2), 7000).into()).await);
    let failed = record(&a, "the failed tunnel", |r| r.path == "hbone").await;
    assert_eq!(failed.flag.code(), "UF");
    let error = failed.error.unwrap_or_default();
    assert!(
        error.contains(&format!("the peer is not {SERVER}")),
        "{error}"
    );
    assert_eq!(reached.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_of_another_ca_is_refused_with_a_hint() {
    let net = 14;
    let (ours, theirs) = (generate_root().unwrap(), generate_root().unwrap());
    let setup = |node, ca| Setup {
        net,
        node,
        config: cluster(net, "server"),
        ca,
        lifetime: DAY,
        idle: MINUTE,
    };
    let a = setup("node-a", &ours).start().await;
    let _b = setup("node-b", &theirs).start().await;
    echo((pod(net, 2), 7000).into()).await;
    assert!(refused(&a, pod(net, 1), (pod(net, 2), 7000).into()).await);
    let failed = record(&a, "the failed tunnel", |r| r.path == "hbone").await;
    let error = failed.error.unwrap_or_default();
    assert!(
        error.contains(
            "peer certificate not signed by this mesh's CA: do all nodes use the same CA?"
        ),
        "{error}"
    );
}

/// An HTTP/1.1 server at `addr` answering 503 to the first `failures` requests, then 200
/// `ok`. Counts requests.
async fn flaky_http(addr: SocketAddr, failures: usize) -> Arc<AtomicUsize> {
    let listener = TcpListener::bind(addr).await.expect("HTTP server");
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream);
                loop {
                    // One request head (GET: no body).
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        match reader.read_line(&mut line).await {
                            Ok(n) if n > 0 => {}
                            _ => return,
                        }
                        head.push_str(&line);
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let n = count.fetch_add(1, Ordering::SeqCst);
                    let response: &[u8] = if n < failures {
                        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy"
                    } else {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                    };
                    if reader.get_mut().write_all(response).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    served
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_l7_route_retries_a_503_across_nodes() {
    let net = 15;
    let (a, b) = nodes(net, "server", DAY, MINUTE).await;
    let served = flaky_http((pod(net, 2), 8080).into(), 1).await;
    let mut stream = connect(&a, pod(net, 1), "100.66.0.10:80".parse().unwrap()).await;
    stream
        .write_all(b"GET /items HTTP/1.1\r\nhost: web.shop\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("an answer within 10 s")
    .unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("ok"), "{response}");
    assert_eq!(served.load(Ordering::SeqCst), 2, "one 503, one retry");
    // Both requests crossed a tunnel (still open: the HTTP connection is pooled), each
    // authorized on node-b.
    let tunnels: Vec<_> = b
        .ctx
        .connections
        .snapshot()
        .into_iter()
        .filter(|r| r.path == "hbone_http")
        .collect();
    assert!(!tunnels.is_empty());
    assert!(tunnels
        .iter()
        .all(|t| t.source_identity.as_deref() == Some(CLIENT)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_opens_another_connection_past_the_peers_stream_limit() {
    let net = 16;
    let (a, _b) = nodes(net, "server", DAY, MINUTE).await;
    echo((pod(net, 2), 7000).into()).await;
    let mut held = Vec::new();
    // The peer admits 100 streams per connection.
    for _ in 0..101 {
        let mut stream = connect(&a, pod(net, 1), (pod(net, 2), 7000).into()).await;
        assert!(greeting(&mut stream).await.is_some());
        held.push(stream);
    }
    let pooled = a.ctx.pool.snapshot();
    let streams: Vec<usize> = pooled.iter().map(|p| p.3).collect();
    assert_eq!(pooled.len(), 2, "{pooled:?}");
    assert_eq!(streams.iter().sum::<usize>(), 101, "{pooled:?}");
    assert!(streams.contains(&100), "the first is full: {pooled:?}");
}

/// Polls `what` until it holds, for up to 10 s.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "{what} did not happen in 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_certificate_renewal_new_tunnels_take_a_new_connection() {
    let net = 17;
    // Renewed at half the lifetime: after 2 s.
    let (a, _b) = nodes(net, "server", Duration::from_secs(4), MINUTE).await;
    echo((pod(net, 2), 7000).into()).await;
    let mut old = connect(&a, pod(net, 1), (pod(net, 2), 7000).into()).await;
    assert!(greeting(&mut old).await.is_some());
    let first = a.ctx.pool.snapshot();
    assert_eq!(first.len(), 1);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let state = a.ctx.state.load();
    assert_eq!(
        a.ctx.certs.sync(&state.local_identities()).await,
        1,
        "renewed"
    );
    let mut new = connect(&a, pod(net, 1), (pod(net, 2), 7000).into()).await;
    assert!(greeting(&mut new).await.is_some());
    let generations = |pooled: &[(String, String, String, usize, u64)]| -> BTreeSet<u64> {
        pooled.iter().map(|p| p.4).collect()
    };
    eventually("the superseded connection leaving the pool", || {
        a.ctx.pool.snapshot().len() == 1
            && generations(&a.ctx.pool.snapshot()) != generations(&first)
    })
    .await;
    // The old tunnel keeps working on its connection until it ends.
    old.write_all(b"still").await.unwrap();
    let mut echoed = [0u8; 5];
    old.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"still");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pooled_connection_is_closed() {
    let net = 18;
    let (a, _b) = nodes(net, "server", DAY, Duration::from_secs(1)).await;
    echo((pod(net, 2), 7000).into()).await;
    let mut stream = connect(&a, pod(net, 1), (pod(net, 2), 7000).into()).await;
    assert!(greeting(&mut stream).await.is_some());
    assert_eq!(a.ctx.pool.snapshot().len(), 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(a.ctx.pool.snapshot().len(), 1, "in use: kept");
    drop(stream);
    eventually("the idle connection closing", || {
        a.ctx.pool.snapshot().is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_closes_the_tunnels_it_now_refuses() {
    let net = 19;
    let (a, b) = nodes(net, "server", DAY, MINUTE).await;
    echo((pod(net, 2), 7000).into()).await;
    let mut stream = connect(&a, pod(net, 1), (pod(net, 2), 7000).into()).await;
    assert!(greeting(&mut stream).await.is_some(), "admitted at first");

    // Node b publishes a generation whose policy no longer admits port 7000.
    let config = cluster(net, "server").replace(r#"["7000", "8080"]"#, r#"["8080"]"#);
    let next = State::build(
        &parse_str("cluster.yaml", &config).expect("valid config"),
        "node-b",
        &Mesh::default(),
        2,
    );
    // No kernel here: the datapath takes the generation and does nothing with it.
    let publisher = Publisher {
        state: b.ctx.state.clone(),
        metrics: ConfigMetrics::default(),
        revocations: b.ctx.revocations.clone(),
        datapath: Box::new(|_| true),
    };
    let published = Instant::now();
    assert!(publisher.publish(Arc::new(next)));

    // The client's connection is reset within a second, on both nodes' records.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(1), stream.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Err(_)) | Ok(Ok(_))),
        "the connection is still open 1 s after the policy refused it"
    );
    assert!(published.elapsed() < Duration::from_secs(1));
    let revoked = record(&b, "the revoked tunnel", |r| r.direction == "hbone").await;
    assert_eq!(revoked.flag.code(), "DENY");
    let error = revoked.error.unwrap_or_default();
    assert!(
        error.contains("revoked") && error.contains("shop/client-only"),
        "{error}"
    );
    let source = record(&a, "the source side", |r| r.path == "hbone").await;
    assert!(source.flag.is_set(), "{:?}", source.error);
}
