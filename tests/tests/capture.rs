//! Outbound capture: an enrolled pod's connections go through its node proxy (same node over
//! the cni0 bridge, and across nodes over VXLAN), byte-exact both ways with half-close, also
//! with the same-node socket bypass on; a
//! non-enrolled pod's traffic to a non-enrolled pod never touches the proxy.

use std::net::SocketAddr;

use mesh_tests::{
    apps::{transfer, Behaviour, Server},
    cluster::Cluster,
    fixtures::{TWO_NODES, WEB_PORT},
    require_root, wait_until,
};

const BYTES: u64 = 64 * 1024 * 1024;

/// Prints the echo throughput of a 64 MiB transfer (information only: timing is never
/// asserted; `cargo test -- --nocapture` shows it).
fn report(what: &str, started: std::time::Instant) {
    let secs = started.elapsed().as_secs_f64();
    let gbit = (2 * BYTES * 8) as f64 / secs / 1e9;
    eprintln!("64 MiB echoed {what}: {secs:.2} s ({gbit:.2} Gbit/s both ways together)");
}

#[test]
fn enrolled_pod_traffic_goes_through_the_node_proxy_same_node_and_cross_node() {
    require_root!();
    // Plus a Service whose only endpoint is a2 (`web` has a2 and b1), and an HTTP port of
    // a2 (8081).
    let config = format!(
        "{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web-a, namespace: mesh}}\n\
         spec: {{clusterIP: 100.66.0.11, selector: {{only: a}}, ports: [{{name: tcp-web, \
         port: 80, targetPort: 8080}}, {{name: http-web, port: 81, targetPort: 8081}}]}}\n",
        TWO_NODES.replace(
            "name: a2, namespace: mesh, labels: {app: web}",
            "name: a2, namespace: mesh, labels: {app: web, only: a}",
        )
    );
    let mut cluster = Cluster::new(&config).unwrap();
    // With the same-node socket bypass (off by default), so the byte-exact transfers below
    // also cover it.
    cluster.run_args = vec!["--socket-bypass=true".into()];
    cluster.start_mesh_everywhere().unwrap();
    let a2 = Server::start(&cluster.pod("a2").netns, WEB_PORT, Behaviour::Echo).unwrap();
    let b1 = Server::start(&cluster.pod("b1").netns, WEB_PORT, Behaviour::Echo).unwrap();
    let client = &cluster.pod("a1").netns;

    // Same node: a1 -> a2 over the cni0 bridge.
    let dst = SocketAddr::from((cluster.pod("a2").ip, WEB_PORT));
    let started = std::time::Instant::now();
    let done = transfer(client, dst, BYTES).unwrap();
    report("same node, via the proxy", started);
    assert_eq!((done.sent, done.received), (BYTES, BYTES));
    let record = cluster
        .wait_connection("node-a", "outbound a1 -> a2", |c| c.client == done.local)
        .unwrap();
    assert_eq!(record.direction, "outbound");
    assert_eq!(record.original_dst, dst);
    assert_eq!(record.upstream, Some(dst));
    assert_eq!((record.bytes_sent, record.bytes_received), (BYTES, BYTES));
    assert_eq!(record.flag, "");
    assert_eq!(
        (record.path.as_str(), record.security.as_str()),
        ("same_node", "mutual_tls")
    );
    // The server saw the client pod's address (the proxy dials as the client), from another
    // port than the client's own (the proxy's connection).
    let peer = *a2.peers().last().unwrap();
    assert_eq!(peer.ip(), cluster.pod("a1").ip);
    assert_ne!(peer, done.local);

    // Cross node: a1 -> b1 over VXLAN: node-a's proxy tunnels it (HBONE) to node-b's.
    let dst = SocketAddr::from((cluster.pod("b1").ip, WEB_PORT));
    let started = std::time::Instant::now();
    let done = transfer(client, dst, BYTES).unwrap();
    report("cross node, via both proxies", started);
    assert_eq!((done.sent, done.received), (BYTES, BYTES));
    let out = cluster
        .wait_connection("node-a", "outbound a1 -> b1", |c| c.client == done.local)
        .unwrap();
    assert_eq!(
        (out.direction.as_str(), out.original_dst),
        ("outbound", dst)
    );
    assert_eq!((out.bytes_sent, out.bytes_received), (BYTES, BYTES));
    assert_eq!(out.path, "hbone");
    let inbound = cluster
        .wait_connection("node-b", "HBONE to b1", |c| {
            c.direction == "hbone" && c.original_dst == dst
        })
        .unwrap();
    assert_eq!(inbound.client.ip(), cluster.pod("a1").ip);
    assert_eq!(
        inbound.source_identity.as_deref(),
        Some("spiffe://cluster.local/ns/mesh/sa/client")
    );
    assert_eq!((inbound.bytes_sent, inbound.bytes_received), (BYTES, BYTES));
    assert_eq!(b1.peers().last().unwrap().ip(), cluster.pod("a1").ip);

    eprintln!(
        "mesh-node RSS after the transfers (KiB): node-a {:?}, node-b {:?}",
        cluster.mesh_rss_kib("node-a").ok(),
        cluster.mesh_rss_kib("node-b").ok()
    );
    assert!(
        cluster
            .kernel_counter("node-a", "captured_outbound_syn")
            .unwrap()
            >= 2
    );
    // The bypass carried the bytes of the same-node connection (a1 -> a2: both pods' sockets
    // and both of the proxy's; 64 MiB each way per leg, in messages of at most 64 KiB: far
    // more than 1,000), and left the cross-node one to TCP on both nodes (its proxy sockets
    // feed HBONE, slower than a pod can write).
    let counter = |node: &str, event: &str| cluster.bypass_counter(node, event).unwrap();
    let (redirected, pods, proxy) = (
        counter("node-a", "redirected"),
        counter("node-a", "pod_socket"),
        counter("node-a", "proxy_socket"),
    );
    eprintln!("node-a bypass: {redirected} messages, {pods} pod / {proxy} proxy sockets");
    assert!(redirected > 1_000, "node-a: {redirected} messages bypassed");
    assert_eq!(
        (pods, proxy),
        (2, 2),
        "node-a: pod / proxy sockets in the bypass"
    );
    for event in ["redirected", "pod_socket", "proxy_socket"] {
        assert_eq!(counter("node-b", event), 0, "node-b {event}");
    }
    // Through Services. `web` balances (round robin) over a2 and b1: the client's leg never
    // joins (the proxy may pick b1, and a pod's bytes must not queue for HBONE), the
    // proxy's leg to a2 does, once in two connections. `web-a`'s only endpoint is a2: both
    // legs join, as for a1 -> a2.
    let joined = || {
        (
            counter("node-a", "pod_socket"),
            counter("node-a", "proxy_socket"),
        )
    };
    let before = joined();
    for vip in [[100, 66, 0, 10], [100, 66, 0, 10]] {
        let done = transfer(client, SocketAddr::from((vip, 80)), 1 << 20).unwrap();
        assert_eq!(done.received, 1 << 20);
    }
    let after = joined();
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (1, 1),
        "joined through a Service with an endpoint on another node (pod, proxy sockets)"
    );
    let redirected = counter("node-a", "redirected");
    let done = transfer(client, SocketAddr::from(([100, 66, 0, 11], 80)), 1 << 20).unwrap();
    assert_eq!(done.received, 1 << 20);
    let local_only = joined();
    assert_eq!(
        (local_only.0 - after.0, local_only.1 - after.1),
        (2, 2),
        "joined through a Service served by a2 only (pod, proxy sockets)"
    );
    assert!(counter("node-a", "redirected") >= redirected + 32);
    // An HTTP port never joins, not even the proxy's leg to the pod: the proxy parses what
    // comes back and reads slower than a pod writes, and a bypassed queue has no window.
    let _a2_http = Server::start(&cluster.pod("a2").netns, 8081, Behaviour::Echo).unwrap();
    let http_dst = SocketAddr::from((cluster.pod("a2").ip, 8081));
    let local = client
        .run(move || {
            use std::io::{Read, Write};
            let mut s =
                std::net::TcpStream::connect_timeout(&http_dst, std::time::Duration::from_secs(5))?;
            s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
            s.write_all(b"GET / HTTP/1.1\r\nhost: a2\r\nconnection: close\r\n\r\n")?;
            let _ = s.read_to_end(&mut Vec::new());
            Ok(s.local_addr()?)
        })
        .unwrap();
    cluster
        .wait_connection("node-a", "a1 -> a2's HTTP port", |c| c.client == local)
        .unwrap();
    assert_eq!(
        joined(),
        local_only,
        "joined on an HTTP port (pod, proxy sockets)"
    );
    assert!(
        cluster
            .kernel_counter("node-b", "captured_inbound_syn")
            .unwrap()
            >= 1
    );
}

/// Every capture decision of one node's kernel programs, summed.
fn captured(cluster: &Cluster, node: &str) -> u64 {
    [
        "captured_outbound_syn",
        "captured_inbound_syn",
        "steered_flow",
        "steered_socket",
    ]
    .iter()
    .map(|d| cluster.kernel_counter(node, d).unwrap())
    .sum()
}

#[test]
fn traffic_between_pods_outside_the_mesh_bypasses_the_proxy() {
    require_root!();
    let mut cluster = Cluster::new(TWO_NODES).unwrap();
    cluster.start_mesh_everywhere().unwrap();
    let before = (captured(&cluster, "node-a"), captured(&cluster, "node-b"));

    // Same node (over the bridge) and across nodes (over VXLAN).
    for server in ["c3", "c2"] {
        let srv = Server::start(&cluster.pod(server).netns, 9000, Behaviour::Echo).unwrap();
        let dst = SocketAddr::from((cluster.pod(server).ip, 9000));
        let started = std::time::Instant::now();
        let done = transfer(&cluster.pod("c1").netns, dst, BYTES).unwrap();
        report(&format!("c1 -> {server}, direct (not enrolled)"), started);
        assert_eq!(done.received, BYTES);
        // The server saw the client pod itself, port and all: no proxy in between.
        assert_eq!(srv.peers(), vec![done.local]);
    }
    for node in ["node-a", "node-b"] {
        let conns = cluster.connections(node).unwrap();
        assert!(conns.is_empty(), "{node}'s proxy handled {conns:?}");
    }
    let after = (captured(&cluster, "node-a"), captured(&cluster, "node-b"));
    assert_eq!(
        before, after,
        "the kernel steered packets of a non-enrolled flow"
    );
}

fn debug_state(cluster: &Cluster) -> (Vec<String>, Vec<String>) {
    cluster.datapath_view("node-a").unwrap()
}

#[test]
fn pods_added_later_are_captured_and_enrolment_follows_config_edits() {
    require_root!();
    let mut cluster = Cluster::new(TWO_NODES).unwrap();
    cluster.start_mesh("node-a").unwrap();
    let _a2 = Server::start(&cluster.pod("a2").netns, WEB_PORT, Behaviour::Echo).unwrap();

    // A new pod appears: its veth shows up (netlink) and the config gains it (file reload).
    let ip = "100.65.0.9".parse().unwrap();
    cluster.add_pod("a3", "mesh", "node-a", ip).unwrap();
    let pod = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: a3, namespace: mesh}\nspec: {nodeName: node-a}\nstatus: {podIP: 100.65.0.9}\n";
    cluster.write_config(&format!("{TWO_NODES}{pod}")).unwrap();
    wait_until("the new veth and enrolment", || {
        let (links, enrolled) = debug_state(&cluster);
        links.len() == 7 && enrolled.contains(&"100.65.0.9".to_string())
    });
    let dst = SocketAddr::from((cluster.pod("a2").ip, WEB_PORT));
    let done = transfer(&cluster.pod("a3").netns, dst, 1 << 20).unwrap();
    cluster
        .wait_connection("node-a", "a3 -> a2", |c| c.client == done.local)
        .unwrap();

    // Opting the pod out in the config stops its capture.
    let opted_out = pod.replace(
        "namespace: mesh}",
        "namespace: mesh, labels: {istio.io/dataplane-mode: none}}",
    );
    cluster
        .write_config(&format!("{TWO_NODES}{opted_out}"))
        .unwrap();
    wait_until("a3 leaving the mesh", || {
        !debug_state(&cluster).1.contains(&"100.65.0.9".to_string())
    });
    // Outbound capture stops: to a pod outside the mesh it goes direct ...
    let c1 = Server::start(&cluster.pod("c1").netns, 9000, Behaviour::Echo).unwrap();
    let c1_addr = SocketAddr::from((cluster.pod("c1").ip, 9000));
    let done = transfer(&cluster.pod("a3").netns, c1_addr, 1 << 20).unwrap();
    assert_eq!(
        c1.peers().last(),
        Some(&done.local),
        "a3 still went through the proxy"
    );
    // ... while traffic to an enrolled pod is still captured, inbound (its policy decides).
    let done = transfer(&cluster.pod("a3").netns, dst, 4096).unwrap();
    let record = cluster
        .wait_connection("node-a", "a3 -> a2 inbound", |c| c.client == done.local)
        .unwrap();
    assert_eq!(record.direction, "inbound");

    // An invalid edit is rejected and the last good config keeps serving.
    cluster
        .write_config("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nstatus: {podIP: nope}\n")
        .unwrap();
    wait_until("the rejection", || {
        cluster
            .mesh_log("node-a")
            .contains("config update rejected")
    });
    let (_, enrolled) = debug_state(&cluster);
    assert!(enrolled.contains(&"100.65.0.2".to_string()), "{enrolled:?}");
    let done = transfer(&cluster.pod("a1").netns, dst, 4096).unwrap();
    cluster
        .wait_connection("node-a", "a1 -> a2 after a rejected edit", |c| {
            c.client == done.local
        })
        .unwrap();

    // The pod goes away: its link's capture is dropped.
    let gone = cluster.pods.remove("a3");
    drop(gone);
    wait_until("the veth to go", || debug_state(&cluster).0.len() == 6);
}
