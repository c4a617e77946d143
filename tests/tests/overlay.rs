//! The zero-trust overlay end to end (root, two nodes, real clients): HBONE mTLS on the wire,
//! PeerAuthentication STRICT/PERMISSIVE, L4 AuthorizationPolicy, source address
//! preservation, certificate rotation under live connections, the HBONE listener against a
//! foreign TLS client, TCP telemetry read by a real Prometheus, and failure flags. Every
//! refusal is paired with a positive control that succeeds on the same path.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use mesh_node::identity::{ca, Ca};
use mesh_tests::{
    apps::{echo_text, transfer, Behaviour, Server, Session},
    cluster::Cluster,
    fixtures::{
        DENY_API, OVERLAY, PERMISSIVE, STRICT, WEB_APP_L4, WEB_APP_VIP, WEB_HOST_PORT,
        WEB_NODE_PORT, WEB_PORT,
    },
    require_root,
    tools::{pcap_text, s_client, Capture, Prometheus},
    wait_until,
};

const HBONE: u16 = 15008;

fn ip(cluster: &Cluster, pod: &str) -> Ipv4Addr {
    cluster.pod(pod).ip
}

fn addr(cluster: &Cluster, pod: &str, port: u16) -> SocketAddr {
    SocketAddr::from((ip(cluster, pod), port))
}

/// Whether `from` gets its message echoed by the server on `to:port`.
fn reaches(cluster: &Cluster, from: &str, to: &str, port: u16) -> bool {
    let msg = format!("hello from {from} to {to}:{port}\n");
    echo_text(&cluster.pod(from).netns, addr(cluster, to, port), &msg).is_ok_and(|back| back == msg)
}

fn wait_generation(cluster: &Cluster, generation: u64) {
    cluster.wait_generation(generation);
}

/// A client certificate chain for `identity` from `ca` (as an attacker holding the CA, or a
/// foreign one, would make it), as PEM files for openssl.
fn client_cert(cluster: &Cluster, ca: &Ca, identity: &str, name: &str) -> (PathBuf, PathBuf) {
    let leaf = ca.issue(identity, Duration::from_secs(3600)).unwrap();
    let cert = cluster.dir().join(format!("{name}.crt.pem"));
    let key = cluster.dir().join(format!("{name}.key.pem"));
    let chain: String = leaf.chain.iter().map(|c| ca::to_pem(c)).collect();
    std::fs::write(&cert, chain).unwrap();
    std::fs::write(&key, ca::pem("PRIVATE KEY", leaf.key.secret_der())).unwrap();
    (cert, key)
}

/// The trust bundle the nodes read (the mesh root).
fn mesh_ca_pem(cluster: &Cluster) -> PathBuf {
    cluster.node_state_dir("node-a").join("trust-bundle.pem")
}

#[test]
fn only_tls_to_port_15008_crosses_the_overlay_between_enrolled_pods() {
    require_root!();
    let mut cluster = Cluster::new(&format!("{OVERLAY}{STRICT}")).unwrap();
    cluster.start_mesh_everywhere().unwrap();
    let _web = Server::start(&cluster.pod("web-b").netns, WEB_PORT, Behaviour::Echo).unwrap();
    let _plain = Server::start(&cluster.pod("plain-b").netns, 7000, Behaviour::Echo).unwrap();

    let file = cluster.dir().join("overlay.pcap");
    let capture = Capture::start(&cluster.node("node-b").netns, "flannel.1", &file).unwrap();
    let secret = format!("{}END", "SECRET-MARKER-".repeat(8192));
    let back = echo_text(
        &cluster.pod("api").netns,
        addr(&cluster, "web-b", WEB_PORT),
        &secret,
    );
    assert_eq!(back.unwrap(), secret, "api -> web-b through HBONE");
    // Positive control: plaintext between pods outside the mesh is visible to the capture.
    let clear = "CLEAR-CONTROL-MARKER\n";
    let back = echo_text(
        &cluster.pod("plain-a").netns,
        addr(&cluster, "plain-b", 7000),
        clear,
    );
    assert_eq!(back.unwrap(), clear);
    let file = capture.finish();

    let everything = pcap_text(&file, "").unwrap();
    assert!(
        everything.contains("CLEAR-CONTROL-MARKER"),
        "the capture shows payloads: {everything}"
    );
    assert!(
        !everything.contains("SECRET-MARKER"),
        "the enrolled pods' bytes crossed the overlay in clear"
    );
    let between = pcap_text(&file, "host 100.65.0.2 and host 100.65.1.2").unwrap();
    let packets: Vec<&str> = between.lines().filter(|l| l.contains(" IP ")).collect();
    assert!(
        packets.len() > 10,
        "no packets between api and web-b: {between}"
    );
    for packet in &packets {
        assert!(
            packet.contains(".15008 >") || packet.contains(".15008:"),
            "a packet between enrolled pods not to or from port 15008: {packet}"
        );
    }
}

#[test]
fn strict_refuses_plaintext_from_pods_outside_the_mesh_and_permissive_lets_it_through() {
    require_root!();
    let mut cluster = Cluster::new(&format!("{OVERLAY}{STRICT}")).unwrap();
    cluster.start_mesh_everywhere().unwrap();
    let web_a = Server::start(&cluster.pod("web-a").netns, WEB_PORT, Behaviour::Echo).unwrap();
    let web_b = Server::start(&cluster.pod("web-b").netns, WEB_PORT, Behaviour::Echo).unwrap();
    let pairs = [
        ("plain-a", "web-a"), // same node, over the bridge
        ("plain-b", "web-a"), // from the other node
        ("plain-a", "web-b"),
        ("plain-b", "web-b"),
    ];

    // Positive control: an enrolled client gets through (mTLS / same-node identity).
    for web in ["web-a", "web-b"] {
        assert!(reaches(&cluster, "api", web, WEB_PORT), "api -> {web}");
    }
    let seen = (web_a.peers().len(), web_b.peers().len());
    for (client, web) in pairs {
        assert!(
            !reaches(&cluster, client, web, WEB_PORT),
            "plaintext {client} -> {web} got through STRICT"
        );
    }
    assert_eq!(
        (web_a.peers().len(), web_b.peers().len()),
        seen,
        "a refused plaintext connection reached a server"
    );
    // Through the Service VIP from the node of one endpoint: kube-proxy would DNAT it to
    // web-a over the bridge; the mesh captures it first and refuses it (or, for web-b, the
    // other node does). Positive control: the enrolled client through the same VIP.
    let vip: SocketAddr = WEB_APP_VIP.parse().unwrap();
    let via_vip = |from: &str| {
        let msg = format!("via the VIP from {from}\n");
        echo_text(&cluster.pod(from).netns, vip, &msg).is_ok_and(|back| back == msg)
    };
    for _ in 0..4 {
        assert!(via_vip("api"), "control: api -> VIP");
    }
    let seen = (web_a.peers().len(), web_b.peers().len());
    for _ in 0..4 {
        assert!(
            !via_vip("plain-a"),
            "plaintext plain-a -> VIP got through STRICT"
        );
    }
    assert_eq!((web_a.peers().len(), web_b.peers().len()), seen);

    // Through the NodePort and the hostPort at node-a's address (both lead to web-a), from
    // the other node: kube-proxy (or the CNI's portmap) would DNAT it to the pod after the
    // capture point; the mesh captures it on the uplink first. Positive control: the
    // enrolled client through the same ports.
    let node_a = cluster.node("node-a").underlay;
    let via_node = |from: &str, port: u16| {
        let msg = format!("via node-a:{port} from {from}\n");
        let back = echo_text(
            &cluster.pod(from).netns,
            SocketAddr::from((node_a, port)),
            &msg,
        );
        back.is_ok_and(|back| back == msg)
    };
    for port in [WEB_NODE_PORT, WEB_HOST_PORT] {
        assert!(via_node("api", port), "control: api -> node-a:{port}");
        let seen = web_a.peers().len();
        assert!(
            !via_node("plain-b", port),
            "plaintext plain-b -> node-a:{port} got through STRICT"
        );
        assert_eq!(web_a.peers().len(), seen);
        // Refused by node-a's proxy, captured at its own address and port on the uplink.
        cluster
            .wait_connection("node-a", "the refused node-port connection", |c| {
                c.direction == "inbound"
                    && c.original_dst == SocketAddr::from((node_a, port))
                    && c.client.ip() == ip(&cluster, "plain-b")
                    && c.flag == "DENY"
            })
            .unwrap();
    }

    for (node, client) in [("node-a", "plain-b"), ("node-b", "plain-a")] {
        let refused = cluster
            .wait_connection(node, "a refused plaintext connection", |c| {
                c.direction == "inbound"
                    && c.client.ip() == ip(&cluster, client)
                    && c.flag == "DENY"
            })
            .unwrap();
        assert_eq!(refused.bytes_sent + refused.bytes_received, 0);
    }

    cluster
        .write_config(&format!("{OVERLAY}{PERMISSIVE}"))
        .unwrap();
    wait_generation(&cluster, 2);
    for (client, web) in pairs {
        assert!(
            reaches(&cluster, client, web, WEB_PORT),
            "plaintext {client} -> {web} refused under PERMISSIVE"
        );
        let server = if web == "web-a" { &web_a } else { &web_b };
        assert_eq!(
            server.peers().last().unwrap().ip(),
            ip(&cluster, client),
            "{web} did not see {client}'s address"
        );
    }
    let seen = (web_a.peers().len(), web_b.peers().len());
    for _ in 0..4 {
        assert!(
            via_vip("plain-a"),
            "plain-a -> VIP refused under PERMISSIVE"
        );
    }
    // Balanced over both endpoints, and both see the client's own address (the remote one
    // too: its replies are steered back to node-a's proxy).
    assert!(web_a.peers().len() > seen.0 && web_b.peers().len() > seen.1);
    assert!(web_a.peers()[seen.0..]
        .iter()
        .chain(&web_b.peers()[seen.1..])
        .all(|p| p.ip() == ip(&cluster, "plain-a")));
    for port in [WEB_NODE_PORT, WEB_HOST_PORT] {
        assert!(
            via_node("plain-b", port),
            "plain-b -> node-a:{port} refused under PERMISSIVE"
        );
        assert_eq!(web_a.peers().last().unwrap().ip(), ip(&cluster, "plain-b"));
    }
}

#[test]
fn l4_authorization_policy_as_istio_documents_it() {
    require_root!();
    let config = format!("{OVERLAY}{STRICT}{WEB_APP_L4}");
    let mut cluster = Cluster::new(&config).unwrap();
    cluster.start_mesh_everywhere().unwrap();
    let mut servers = Vec::new();
    for web in ["web-a", "web-b"] {
        for port in [8080, 9000] {
            let server = Server::start(&cluster.pod(web).netns, port, Behaviour::Echo).unwrap();
            servers.push(((web, port), server));
        }
    }
    let server = |web: &str, port: u16| &servers.iter().find(|(k, _)| *k == (web, port)).unwrap().1;

    // api-service on any port; namespace ops on 9000 only; anyone else nowhere. web-a shares
    // node-a with the clients (same-node path), web-b is across the overlay (HBONE).
    let table = [
        ("api", 8080, true),
        ("api", 9000, true),
        ("ops1", 9000, true),
        ("ops1", 8080, false),
        ("other", 8080, false),
        ("other", 9000, false),
    ];
    for web in ["web-a", "web-b"] {
        for (client, port, allowed) in table {
            let before = server(web, port).peers().len();
            assert_eq!(
                reaches(&cluster, client, web, port),
                allowed,
                "{client} -> {web}:{port}"
            );
            let peers = server(web, port).peers();
            if allowed {
                // The destination pod sees the source pod's address as its peer.
                assert_eq!(peers.last().unwrap().ip(), ip(&cluster, client));
            } else {
                assert_eq!(
                    peers.len(),
                    before,
                    "a denied {client} reached {web}:{port}"
                );
            }
        }
    }
    let denied = cluster
        .wait_connection("node-b", "other's denied tunnel", |c| {
            c.direction == "hbone" && c.client.ip() == ip(&cluster, "other") && c.flag == "DENY"
        })
        .unwrap();
    assert_eq!(
        denied.source_identity.as_deref(),
        Some("spiffe://cluster.local/ns/default/sa/other")
    );
    assert_eq!(
        denied.authorization.unwrap()["reason"],
        "no ALLOW policy matched"
    );

    // A DENY policy (mesh-wide, in the root namespace) overrides the ALLOW.
    cluster
        .write_config(&format!("{config}{DENY_API}"))
        .unwrap();
    wait_generation(&cluster, 2);
    for web in ["web-a", "web-b"] {
        assert!(
            !reaches(&cluster, "api", web, 8080),
            "api -> {web} despite DENY"
        );
        assert!(
            reaches(&cluster, "ops1", web, 9000),
            "control: ops1 -> {web}:9000"
        );
    }
    for (node, direction) in [("node-a", "outbound"), ("node-b", "hbone")] {
        let record = cluster
            .wait_connection(node, "api denied by deny-api", |c| {
                c.direction == direction
                    && c.client.ip() == ip(&cluster, "api")
                    && c.flag == "DENY"
                    && c.authorization
                        .as_ref()
                        .is_some_and(|a| a["policy"] == "istio-system/deny-api")
            })
            .unwrap();
        assert_eq!(record.bytes_sent, 0);
    }
}

#[test]
fn certificates_rotate_under_live_connections() {
    require_root!();
    let mut cluster = Cluster::new(OVERLAY).unwrap();
    cluster.run_args = vec!["--cert-lifetime".into(), "20s".into()];
    cluster.start_mesh_everywhere().unwrap();
    let _web = Server::start(&cluster.pod("web-b").netns, WEB_PORT, Behaviour::Echo).unwrap();
    let probe = "spiffe://cluster.local/ns/plain/sa/probe";
    let (cert, key) = client_cert(&cluster, &cluster.ca().unwrap(), probe, "probe");
    let ca = mesh_ca_pem(&cluster);
    let hbone = addr(&cluster, "web-b", HBONE);
    let prober = &cluster.pod("plain-b").netns;
    let first = s_client(prober, hbone, &cert, &key, &ca, &[]).unwrap();
    assert!(first.established, "{}", first.output);
    let first_cert = first.server_cert.unwrap();

    let web = addr(&cluster, "web-b", WEB_PORT);
    let mut session = Session::open(&cluster.pod("api").netns, web).unwrap();
    session.roundtrip().unwrap();
    let opened = |c: &Cluster| {
        c.metric_sum(
            "node-a",
            "mesh_hbone_connections_opened_total",
            &[("side", "client")],
        )
        .unwrap()
    };
    let pooled = opened(&cluster);
    // Control: a second connection right away shares the pooled HBONE connection.
    transfer(&cluster.pod("api").netns, web, 4096).unwrap();
    assert_eq!(
        opened(&cluster),
        pooled,
        "a new HBONE connection without a rotation"
    );

    // 60 s of traffic on the long connection: with a 20 s lifetime every certificate is
    // renewed every 10 s, so it spans several rotations on both nodes.
    let started = Instant::now();
    let mut later_cert = None;
    for _ in 0..240 {
        if started.elapsed() >= Duration::from_secs(60) {
            break;
        }
        session.roundtrip().unwrap();
        if later_cert.is_none() && started.elapsed() >= Duration::from_secs(25) {
            let probe = s_client(prober, hbone, &cert, &key, &ca, &[]).unwrap();
            assert!(probe.established, "{}", probe.output);
            later_cert = probe.server_cert;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(started.elapsed() >= Duration::from_secs(60));
    session.roundtrip().unwrap();
    assert_ne!(
        later_cert.unwrap(),
        first_cert,
        "a connection after rotations got the first certificate"
    );
    for node in ["node-a", "node-b"] {
        let rotations = cluster
            .metric_sum(
                node,
                "mesh_certificates_issued_total",
                &[("reason", "rotation")],
            )
            .unwrap();
        assert!(rotations >= 4, "{node}: {rotations} rotations in 60 s");
    }
    // The pooled connection was made with a replaced certificate: it takes no new stream.
    transfer(&cluster.pod("api").netns, web, 4096).unwrap();
    assert!(
        opened(&cluster) > pooled,
        "the old pooled connection took a new stream"
    );
    session.roundtrip().unwrap();
}

#[test]
fn the_hbone_listener_refuses_foreign_certificates_and_old_tls() {
    require_root!();
    let mut cluster = Cluster::new(OVERLAY).unwrap();
    cluster.start_mesh_everywhere().unwrap();
    let identity = "spiffe://cluster.local/ns/plain/sa/probe";
    let (cert, key) = client_cert(&cluster, &cluster.ca().unwrap(), identity, "ours");
    let foreign = ca::generate_root().unwrap();
    let foreign = Ca::from_pem(&foreign.cert, &foreign.key).unwrap();
    let (bad_cert, bad_key) = client_cert(&cluster, &foreign, identity, "foreign");
    let ca = mesh_ca_pem(&cluster);
    let hbone = addr(&cluster, "web-b", HBONE);
    let prober = &cluster.pod("plain-b").netns;

    // Positive control: a certificate of the mesh CA completes TLS 1.3, and the server
    // presents web-b's identity.
    let good = s_client(prober, hbone, &cert, &key, &ca, &[]).unwrap();
    assert!(good.established, "{}", good.output);
    let pem = cluster.dir().join("server.pem");
    std::fs::write(&pem, good.server_cert.unwrap()).unwrap();
    let san = mesh_tests::netns::sh(
        "openssl",
        &[
            "x509",
            "-noout",
            "-ext",
            "subjectAltName",
            "-in",
            &pem.to_string_lossy(),
        ],
    )
    .unwrap();
    assert!(
        san.contains("URI:spiffe://cluster.local/ns/default/sa/web-app"),
        "{san}"
    );

    // The server's view decides: a TLS 1.3 client finishes its side of the handshake before
    // the server has judged its certificate, so s_client alone cannot tell a refusal.
    let count = |metric: &str, labels: &[(&str, &str)]| {
        cluster.metric_sum("node-b", metric, labels).unwrap()
    };
    let accepted = || count("mesh_hbone_connections_opened_total", &[("side", "server")]);
    let untrusted = || {
        count(
            "mesh_tls_handshake_failures_total",
            &[("side", "server"), ("reason", "untrusted")],
        )
    };
    let protocol = || {
        count(
            "mesh_tls_handshake_failures_total",
            &[("side", "server"), ("reason", "protocol")],
        )
    };
    wait_until("the control accepted", || accepted() == 1);

    let foreign = s_client(prober, hbone, &bad_cert, &bad_key, &ca, &[]).unwrap();
    wait_until("the foreign certificate refused", || untrusted() == 1);
    assert_eq!(
        accepted(),
        1,
        "accepted a foreign certificate: {}",
        foreign.output
    );

    let old = s_client(prober, hbone, &cert, &key, &ca, &["-tls1_2"]).unwrap();
    assert!(!old.established, "TLS 1.2 accepted: {}", old.output);
    wait_until("TLS 1.2 refused", || protocol() == 1);
    assert_eq!(accepted(), 1);
}

#[test]
fn tcp_metrics_count_every_byte_and_prometheus_reads_them() {
    require_root!();
    let mut cluster = Cluster::new(OVERLAY).unwrap();
    cluster.start_mesh_everywhere().unwrap();
    let _web_a = Server::start(&cluster.pod("web-a").netns, WEB_PORT, Behaviour::Echo).unwrap();
    let _web_b = Server::start(&cluster.pod("web-b").netns, WEB_PORT, Behaviour::Echo).unwrap();
    let node_b = &cluster.node("node-b").netns;
    let prometheus = Prometheus::start(node_b, &cluster.dir().join("prometheus")).unwrap();

    let cross: u64 = 1_234_567;
    let local: u64 = 777_777;
    transfer(
        &cluster.pod("api").netns,
        addr(&cluster, "web-b", WEB_PORT),
        cross,
    )
    .unwrap();
    transfer(
        &cluster.pod("api").netns,
        addr(&cluster, "web-a", WEB_PORT),
        local,
    )
    .unwrap();

    let labels = |reporter, destination| {
        [
            ("reporter", reporter),
            ("source_workload", "api"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/default/sa/api-service",
            ),
            ("destination_workload", destination),
            ("connection_security_policy", "mutual_tls"),
        ]
    };
    let checks = [
        ("node-a", "source", "web-b", cross),
        ("node-a", "source", "web-a", local),
        ("node-a", "destination", "web-a", local),
        ("node-b", "destination", "web-b", cross),
    ];
    for (node, reporter, destination, bytes) in checks {
        let labels = labels(reporter, destination);
        wait_until(&format!("{node} {reporter} closed"), || {
            cluster
                .metric_sum(node, "istio_tcp_connections_closed_total", &labels)
                .unwrap()
                == 1
        });
        for metric in [
            "istio_tcp_received_bytes_total",
            "istio_tcp_sent_bytes_total",
        ] {
            assert_eq!(
                cluster.metric_sum(node, metric, &labels).unwrap(),
                bytes,
                "{node} {metric} {labels:?}"
            );
        }
        assert_eq!(
            cluster
                .metric_sum(node, "istio_tcp_connections_opened_total", &labels)
                .unwrap(),
            1
        );
    }

    // The destination side names the Service the pod port serves; the source side dialled
    // the pod directly.
    let service = ("destination_service", "web-app.default.svc.cluster.local");
    let mut labels = labels("destination", "web-b").to_vec();
    labels.push(service);
    assert_eq!(
        cluster
            .metric_sum("node-b", "istio_tcp_sent_bytes_total", &labels)
            .unwrap(),
        cross
    );

    // The same through a real Prometheus scraping node-b.
    let selector = r#"{reporter="destination",source_workload="api",destination_workload="web-b",destination_principal="spiffe://cluster.local/ns/default/sa/web-app",destination_service="web-app.default.svc.cluster.local",connection_security_policy="mutual_tls"}"#;
    for metric in [
        "istio_tcp_received_bytes_total",
        "istio_tcp_sent_bytes_total",
    ] {
        prometheus
            .wait_value(node_b, &format!("sum({metric}{selector})"), cross as f64)
            .unwrap();
    }
    prometheus
        .wait_value(
            node_b,
            &format!("sum(istio_tcp_connections_closed_total{selector})"),
            1.0,
        )
        .unwrap();
}

#[test]
fn refused_and_unreachable_destinations_reset_the_client_and_are_flagged() {
    require_root!();
    let mut cluster = Cluster::new(OVERLAY).unwrap();
    cluster.start_mesh_everywhere().unwrap();
    let _web = Server::start(&cluster.pod("web-b").netns, WEB_PORT, Behaviour::Echo).unwrap();
    assert!(reaches(&cluster, "api", "web-b", WEB_PORT), "control");
    let api = &cluster.pod("api").netns;

    // Nothing listens on web-b:9999: node-b's proxy is refused, answers 503, node-a resets.
    let started = Instant::now();
    assert!(echo_text(api, addr(&cluster, "web-b", 9999), "x").is_err());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the client hung"
    );
    for (node, direction) in [("node-a", "outbound"), ("node-b", "hbone")] {
        cluster
            .wait_connection(node, "the refused tunnel", |c| {
                c.direction == direction && c.original_dst.port() == 9999 && c.flag == "UF"
            })
            .unwrap();
    }
    // No pod has this address: the connection attempt times out, the client is reset.
    let nowhere = SocketAddr::from(([100, 65, 1, 99], 80));
    let started = Instant::now();
    assert!(echo_text(api, nowhere, "x").is_err());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the client hung"
    );
    cluster
        .wait_connection("node-a", "the unreachable destination", |c| {
            c.original_dst == nowhere && c.flag == "UF"
        })
        .unwrap();
    assert!(
        cluster
            .metric_sum(
                "node-a",
                "istio_tcp_connections_closed_total",
                &[("response_flags", "UF")]
            )
            .unwrap()
            >= 2
    );
}

#[test]
fn port_level_mtls_and_a_configured_root_namespace_and_trust_domain() {
    require_root!();
    // Mesh-wide STRICT from a root namespace of our choosing; web-app relaxes port 8080 to
    // PERMISSIVE (portLevelMtls keys are the workload's ports); an ALLOW policy names the
    // client by the configured trust domain.
    let policies = r#"
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: mesh, namespace: mesh-root}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web-app, namespace: default}
spec:
  selector: {matchLabels: {app: web-app}}
  mtls: {mode: UNSET}
  portLevelMtls: {8080: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-app-allow, namespace: default}
spec:
  selector: {matchLabels: {app: web-app}}
  rules:
  - from: [{source: {principals: ["example.org/ns/default/sa/api-service"]}}]
  - from: [{source: {ipBlocks: ["100.65.0.6/32"]}}]
"#;
    let mut cluster = Cluster::new(&format!("{OVERLAY}{policies}")).unwrap();
    cluster.run_args = [
        "--root-namespace",
        "mesh-root",
        "--trust-domain",
        "example.org",
    ]
    .map(String::from)
    .to_vec();
    cluster.start_mesh_everywhere().unwrap();
    let mut servers = Vec::new();
    for web in ["web-a", "web-b"] {
        for port in [8080, 9000] {
            servers.push(Server::start(&cluster.pod(web).netns, port, Behaviour::Echo).unwrap());
        }
    }
    for web in ["web-a", "web-b"] {
        // mTLS with the configured trust domain, on both ports.
        assert!(reaches(&cluster, "api", web, 9000), "api -> {web}:9000");
        assert!(reaches(&cluster, "api", web, 8080), "api -> {web}:8080");
        // Plaintext (allowed by ipBlocks): the PERMISSIVE port only; the other inherits the
        // mesh-wide STRICT.
        assert!(
            reaches(&cluster, "plain-a", web, 8080),
            "plain-a -> {web}:8080"
        );
        assert!(
            !reaches(&cluster, "plain-a", web, 9000),
            "plain-a -> {web}:9000"
        );
    }
    let record = cluster
        .wait_connection("node-b", "api's tunnel", |c| {
            c.direction == "hbone" && c.client.ip() == ip(&cluster, "api")
        })
        .unwrap();
    assert_eq!(
        record.source_identity.as_deref(),
        Some("spiffe://example.org/ns/default/sa/api-service")
    );
    let refused = cluster
        .wait_connection("node-b", "plain-a refused on 9000", |c| {
            c.client.ip() == ip(&cluster, "plain-a") && c.original_dst.port() == 9000
        })
        .unwrap();
    assert_eq!(refused.flag, "DENY");
    let decision = refused.authorization.unwrap();
    assert_eq!(
        decision["reason"],
        "plaintext refused: PeerAuthentication STRICT"
    );
    // Port 9000 has no port-level mode: the mesh-wide policy decided.
    assert_eq!(decision["policy"], "mesh-root/mesh");
}

#[test]
fn a_silent_peer_is_detected_and_the_clients_of_its_tunnels_are_reset() {
    use std::io::{Read, Write};
    require_root!();
    let mut cluster = Cluster::new(OVERLAY).unwrap();
    cluster.start_mesh_everywhere().unwrap();
    let _web = Server::start(&cluster.pod("web-b").netns, WEB_PORT, Behaviour::Echo).unwrap();
    let web = addr(&cluster, "web-b", WEB_PORT);
    let mut stream =
        mesh_tests::apps::connect_in(&cluster.pod("api").netns, web, Duration::from_secs(5))
            .unwrap();
    stream.write_all(b"ping\n").unwrap();
    let mut buf = [0u8; 5];
    stream.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping\n", "control: the tunnel works");

    // node-b goes silent for HBONE: packets vanish, no reset, no FIN.
    let node_b = &cluster.node("node-b").netns;
    let rule = ["-p", "tcp", "--dport", "15008", "-j", "DROP"];
    node_b
        .exec(
            "iptables",
            &[&["-w", "-I", "INPUT"][..], &rule[..]].concat(),
        )
        .unwrap();
    // The client just waits; the proxy's HTTP/2 pings find the peer gone and reset it.
    let started = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let outcome = stream.read(&mut buf);
    let waited = started.elapsed();
    match outcome {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("after {waited:?}: {other:?}, expected a reset"),
    }
    assert!(
        waited < Duration::from_secs(30),
        "detected only after {waited:?}"
    );
    assert!(cluster.mesh_log("node-a").contains("does not answer pings"));
    // Control: once node-b answers again, new tunnels work.
    node_b
        .exec(
            "iptables",
            &[&["-w", "-D", "INPUT"][..], &rule[..]].concat(),
        )
        .unwrap();
    assert!(reaches(&cluster, "api", "web-b", WEB_PORT));
}
