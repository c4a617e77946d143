//! Service VIPs: an enrolled pod's connection to `clusterIP:port` is resolved by the node proxy
//! to a ready endpoint (round robin, named targetPort honoured), and the proxy records the VIP
//! both when its bypass rule keeps kube-proxy's DNAT away and when kube-proxy's DNAT ran first.

use std::{collections::BTreeSet, net::SocketAddr};

use mesh_tests::{
    apps::{greet, Behaviour, Server},
    cluster::Cluster,
    fixtures::{TWO_NODES, WEB_PORT},
    require_root,
};

fn vip() -> SocketAddr {
    "100.66.0.10:80".parse().unwrap()
}

/// Connects `rounds` times from a1 to the VIP; returns who answered, checking each record.
fn call_vip(cluster: &Cluster, rounds: usize) -> BTreeSet<String> {
    let mut answered = BTreeSet::new();
    for _ in 0..rounds {
        let (local, greeting) = greet(&cluster.pod("a1").netns, vip()).unwrap();
        let record = cluster
            .wait_connection("node-a", "connection to the VIP", |c| c.client == local)
            .unwrap();
        assert_eq!(record.original_dst, vip(), "the proxy lost the VIP");
        assert_eq!(record.service.as_deref(), Some("mesh/web"));
        let upstream = record.upstream.expect("an endpoint was chosen");
        assert_eq!(
            upstream.port(),
            WEB_PORT,
            "targetPort `http` resolves to 8080"
        );
        let pod = if upstream.ip() == cluster.pod("a2").ip {
            "a2"
        } else {
            "b1"
        };
        assert_eq!(
            greeting,
            format!("hello from {pod}"),
            "answered by the recorded endpoint"
        );
        answered.insert(greeting);
    }
    answered
}

/// The two-node cluster with the mesh on both nodes and both `web` pods greeting.
fn web_cluster() -> (Cluster, Vec<Server>) {
    let mut cluster = Cluster::new(TWO_NODES).unwrap();
    cluster.start_mesh_everywhere().unwrap();
    let servers = ["a2", "b1"]
        .map(|pod| {
            Server::start(
                &cluster.pod(pod).netns,
                WEB_PORT,
                Behaviour::Greet(pod.into()),
            )
            .unwrap()
        })
        .into();
    (cluster, servers)
}

#[test]
fn vip_connections_are_balanced_over_ready_endpoints_and_the_proxy_records_the_vip() {
    require_root!();
    let (cluster, _servers) = web_cluster();

    let answered = call_vip(&cluster, 4);
    assert_eq!(
        answered.len(),
        2,
        "round robin reached both endpoints: {answered:?}"
    );

    // A kube-proxy resync puts its jump first: DNAT now runs before the mesh's bypass rule.
    // The flow map keeps the flow captured and conntrack still knows the VIP.
    cluster.kube_proxy_first("node-a").unwrap();
    let answered = call_vip(&cluster, 4);
    assert_eq!(answered.len(), 2, "{answered:?}");

    // A port the Service does not have: refused, recorded as no route.
    let refused = greet(&cluster.pod("a1").netns, "100.66.0.10:81".parse().unwrap());
    assert!(
        refused.is_err() || refused.as_ref().unwrap().1.is_empty(),
        "{refused:?}"
    );
    cluster
        .wait_connection("node-a", "NR record", |c| c.flag == "NR")
        .unwrap();
}

#[test]
fn a_pod_outside_the_mesh_dialling_a_vip_with_a_local_enrolled_endpoint_goes_through_the_proxy() {
    require_root!();
    let (cluster, _servers) = web_cluster();
    // c1 is not enrolled. Its calls to the VIP (which kube-proxy could DNAT to a2 over the
    // bridge, past the pod's policy) are captured inbound on node-a before the DNAT, and the
    // proxy balances over both endpoints.
    let c1 = cluster.pod("c1").ip;
    let calls = |cluster: &Cluster| {
        let mut answered = BTreeSet::new();
        for _ in 0..8 {
            let (local, greeting) = greet(&cluster.pod("c1").netns, vip()).unwrap();
            let record = cluster
                .wait_connection("node-a", "c1's call to the VIP", |c| c.client == local)
                .unwrap();
            assert_eq!(record.direction, "inbound");
            assert_eq!(record.original_dst, vip());
            assert_eq!(record.service.as_deref(), Some("mesh/web"));
            answered.insert(greeting);
        }
        answered
    };
    let answered = calls(&cluster);
    assert_eq!(answered.len(), 2, "both endpoints answer: {answered:?}");
    // After a kube-proxy resync put its DNAT first, sk_lookup sees the chosen endpoint as
    // the local address; the client recorded at capture still leads it to the proxy.
    cluster.kube_proxy_first("node-a").unwrap();
    let before = retransmitted(&cluster.pod("c1").netns);
    let answered = calls(&cluster);
    assert_eq!(
        answered.len(),
        2,
        "after kube-proxy moved first: {answered:?}"
    );
    // Each connection made it at its first SYN (one the node cannot place is lost and only
    // a retransmission gets through, seconds later).
    assert_eq!(
        retransmitted(&cluster.pod("c1").netns),
        before,
        "SYNs were retransmitted"
    );
    let conns = cluster.connections("node-a").unwrap();
    assert!(conns.iter().all(|c| c.direction != "outbound"), "{conns:?}");
    // The calls balanced to b1 keep c1's address (node-a registers their replies with its
    // capture program, which steers them back to the proxy) and are captured inbound on
    // node-b.
    let node_b = cluster.connections("node-b").unwrap();
    assert!(
        node_b
            .iter()
            .any(|c| c.direction == "inbound" && c.client.ip() == c1),
        "{node_b:?}"
    );
    assert!(node_b.iter().all(|c| c.client.ip() == c1), "{node_b:?}");
}

/// TCP segments the namespace retransmitted (`Tcp: RetransSegs` of /proc/net/snmp).
fn retransmitted(ns: &mesh_tests::netns::Netns) -> u64 {
    let snmp = ns.exec("cat", &["/proc/net/snmp"]).unwrap();
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
    let at = names
        .split_whitespace()
        .position(|n| n == "RetransSegs")
        .unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}
