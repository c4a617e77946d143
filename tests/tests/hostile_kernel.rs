//! Hostile pods and host processes against the kernel side of the mesh, each attack next to a
//! control that shows the path works: an impostor that takes an enrolled pod's address (and
//! announces it) gets nothing as that pod; IPv6 link-local and fragmented SYNs do not go
//! around STRICT; the node's own processes are plaintext from outside the mesh unless they
//! are the kubelet's; the proxy never dials itself; enrolled pods reach their own node; UDP to
//! enrolled pods can be limited to DNS.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream},
    time::Duration,
};

use mesh_common::MARK_PROXY;
use mesh_tests::{
    apps::{echo_text, Behaviour, Server},
    attack::{self, Cgroup, UdpSink},
    cluster::{proc_status_kib, Cluster},
    fixtures::{TWO_NODES, WEB_PORT},
    require_root, wait_until,
};

/// a2 and b1 (`app: web`) take connections from a1's identity only.
const ONLY_A1: &str = r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-client, namespace: mesh}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/mesh/sa/client"]}}]
"#;

/// Namespace `mesh` (a1, a2, b1) requires mutual TLS.
const STRICT_MESH: &str = r#"
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: mesh}
spec: {mtls: {mode: STRICT}}
"#;

fn v4(cluster: &Cluster, pod: &str, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(cluster.pod(pod).ip, port)
}

/// Whether `stream` carries an echo both ways (a connection the proxy accepted and then
/// refused is reset instead).
fn echoes(stream: anyhow::Result<TcpStream>) -> bool {
    let Ok(mut stream) = stream else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut back = Vec::new();
    stream.write_all(b"who am i\n").is_ok()
        && stream.shutdown(Shutdown::Write).is_ok()
        && stream.read_to_end(&mut back).is_ok()
        && back == b"who am i\n"
}

fn counter(cluster: &Cluster, node: &str, decision: &str) -> u64 {
    cluster.kernel_counter(node, decision).unwrap()
}

#[test]
fn a_pod_that_takes_an_enrolled_pods_address_gets_nothing_of_its_identity() {
    require_root!();
    let mut cluster = Cluster::new(&format!("{TWO_NODES}{ONLY_A1}")).unwrap();
    cluster.start_mesh_everywhere().unwrap();
    let a2 = Server::start(&cluster.pod("a2").netns, WEB_PORT, Behaviour::Echo).unwrap();
    let b1 = Server::start(&cluster.pod("b1").netns, WEB_PORT, Behaviour::Echo).unwrap();
    let targets = [v4(&cluster, "a2", WEB_PORT), v4(&cluster, "b1", WEB_PORT)];
    let victim = cluster.pod("a1").ip;
    let victim_mac = attack::mac(&cluster.pod("a1").netns, "eth0").unwrap();
    let impostor = &cluster.pod("c1").netns;
    let impostor_mac = attack::mac(impostor, "eth0").unwrap();

    // Controls: the policy lets a1 through, same node and across nodes, and refuses c1.
    for dst in targets {
        assert_eq!(
            echo_text(&cluster.pod("a1").netns, dst.into(), "a1\n").unwrap(),
            "a1\n",
            "a1 -> {dst}"
        );
        assert!(
            echo_text(impostor, dst.into(), "c1\n").is_err(),
            "c1 as itself reached {dst}"
        );
    }

    // The attack: c1 takes a1's address and announces it to the bridge (both ARP hardware
    // types Linux takes), then connects from it.
    let seen = (a2.peers().len(), b1.peers().len());
    impostor
        .ip(&["addr", "add", &format!("{victim}/32"), "dev", "eth0"])
        .unwrap();
    for hardware in [1, 6] {
        let announcement = attack::arp_announcement(impostor_mac, victim, hardware);
        attack::send_frame(impostor, "eth0", announcement).unwrap();
    }
    for dst in targets {
        assert!(
            !reaches_as(&cluster, "c1", victim, dst),
            "c1 reached {dst} as a1"
        );
    }
    assert_eq!(
        (a2.peers().len(), b1.peers().len()),
        seen,
        "a server saw a connection of the impostor"
    );
    // Dropped at c1's interface: its packets from a1's address, and its ARP claims, so the
    // node still has a1's MAC for a1's address.
    assert_eq!(neighbour(&cluster, victim), Some(victim_mac));
    assert!(counter(&cluster, "node-a", "spoofed_source") > 0);
    assert!(counter(&cluster, "node-a", "spoofed_arp") >= 2);

    // c1 also sends a frame with a2's MAC as its source: the bridge would move a2's entry
    // to c1's port (and the proxy's plaintext to a2 with it).
    let a2_mac = attack::mac(&cluster.pod("a2").netns, "eth0").unwrap();
    let probe = attack::arp_announcement(a2_mac, Ipv4Addr::UNSPECIFIED, 1);
    attack::send_frame(impostor, "eth0", probe).unwrap();
    let a2_port = bridge_port_of(&cluster, a2_mac);
    assert_ne!(
        a2_port,
        Some(cluster.pod("c1").veth.clone()),
        "a2's bridge entry"
    );
    assert!(counter(&cluster, "node-a", "spoofed_mac") > 0);

    // The real pod keeps working, with its identity, while the impostor holds its address.
    for dst in targets {
        assert_eq!(
            echo_text(&cluster.pod("a1").netns, dst.into(), "still a1\n").unwrap(),
            "still a1\n",
            "a1 -> {dst} during the attack"
        );
    }
    let hbone = cluster
        .wait_connection("node-b", "a1's HBONE stream", |c| {
            c.direction == "hbone" && c.client.ip() == victim && c.bytes_received == 9
        })
        .unwrap();
    assert_eq!(
        hbone.source_identity.as_deref(),
        Some("spiffe://cluster.local/ns/mesh/sa/client")
    );
    let first = pod_interface(&cluster, victim);
    assert!(first > 0, "a1 unbound");

    // c1 gives up its own address and keeps only a1's; then a1 goes and a new pod gets its
    // address. c1's interface stays c1's: the address follows the new pod's interface.
    let own = format!("{}/24", cluster.pod("c1").ip);
    let impostor = &cluster.pod("c1").netns;
    impostor.ip(&["addr", "del", &own, "dev", "eth0"]).unwrap();
    impostor
        .ip(&["addr", "add", &format!("{victim}/24"), "dev", "eth0"])
        .unwrap();
    drop(cluster.pods.remove("a1"));
    wait_until("a1's address bound to no interface", || {
        pod_interface(&cluster, victim) == 0
    });
    assert!(
        !reaches_as(&cluster, "c1", victim, targets[0]),
        "c1 reached a2 as a1, a1 gone"
    );
    cluster.add_pod("a1", "mesh", "node-a", victim).unwrap();
    wait_until("a1's address bound to the new pod's interface", || {
        ![0, first].contains(&pod_interface(&cluster, victim))
    });
    assert_eq!(
        echo_text(&cluster.pod("a1").netns, targets[0].into(), "new a1\n").unwrap(),
        "new a1\n"
    );
    assert!(
        !reaches_as(&cluster, "c1", victim, targets[0]),
        "c1 reached a2 as the new a1"
    );
}

/// Whether `pod`, connecting from `source` (an address it added), gets an echo from `dst`.
fn reaches_as(cluster: &Cluster, pod: &str, source: Ipv4Addr, dst: SocketAddrV4) -> bool {
    let stream = attack::connect_from(&cluster.pod(pod).netns, source, dst, Duration::from_secs(3));
    echoes(stream)
}

/// The MAC node-a's neighbour table has for `ip` on `cni0`.
fn neighbour(cluster: &Cluster, ip: Ipv4Addr) -> Option<[u8; 6]> {
    let node = &cluster.node("node-a").netns;
    let json = node
        .ip(&["-j", "neigh", "show", &ip.to_string(), "dev", "cni0"])
        .unwrap();
    let entries: serde_json::Value = serde_json::from_str(&json).unwrap();
    parse_mac(entries[0]["lladdr"].as_str()?)
}

/// The bridge port (`cni0`) node-a forwards frames for `mac` to.
fn bridge_port_of(cluster: &Cluster, mac: [u8; 6]) -> Option<String> {
    let node = &cluster.node("node-a").netns;
    let json = node
        .exec("bridge", &["-j", "fdb", "show", "br", "cni0"])
        .unwrap();
    let entries: serde_json::Value = serde_json::from_str(&json).unwrap();
    entries
        .as_array()?
        .iter()
        .find(|e| e["mac"].as_str().and_then(parse_mac) == Some(mac))
        .and_then(|e| e["ifname"].as_str().map(str::to_string))
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    Some(mac)
}

/// The interface node-a's kernel believes `ip` from (0: none), per `/debug/state`.
fn pod_interface(cluster: &Cluster, ip: Ipv4Addr) -> u64 {
    let state = cluster.debug_state("node-a").unwrap();
    state["datapath"]["pod_interfaces"][ip.to_string()]
        .as_u64()
        .unwrap_or_else(|| panic!("no pod_interfaces entry for {ip}: {state:#}"))
}

#[test]
fn ipv6_to_and_from_enrolled_pods_is_dropped_and_counted() {
    require_root!();
    // A dual-stack Service: mesh-node says at start that it carries IPv4 only.
    let dual_stack = r#"
---
apiVersion: v1
kind: Service
metadata: {name: dual, namespace: plain}
spec: {clusterIP: 100.66.0.30, ipFamilies: [IPv4, IPv6], ports: [{port: 80}]}
"#;
    let mut cluster = Cluster::new(&format!("{TWO_NODES}{STRICT_MESH}{dual_stack}")).unwrap();
    cluster.start_mesh_everywhere().unwrap();
    assert!(cluster
        .mesh_log("node-a")
        .contains("the cluster is dual-stack"));
    let any = |port| SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
    let a2 = Server::start_at(&cluster.pod("a2").netns, any(WEB_PORT), Behaviour::Echo).unwrap();
    let _c3 = Server::start_at(&cluster.pod("c3").netns, any(WEB_PORT), Behaviour::Echo).unwrap();
    // Every pod's link-local address, once usable (duplicate address detection done).
    let ll = |pod: &str| attack::link_local(&cluster.pod(pod).netns, "eth0").unwrap();
    let (a2_ip, c3_ip) = (ll("a2"), ll("c3"));
    ll("a1");
    ll("c1");
    let c1 = &cluster.pod("c1").netns;
    let short = Duration::from_secs(2);

    // Controls: STRICT refuses c1 over IPv4; IPv6 link-local works between pods outside the
    // mesh.
    assert!(echo_text(c1, v4(&cluster, "a2", WEB_PORT).into(), "v4\n").is_err());
    assert!(echoes(attack::connect_v6(
        c1, c3_ip, WEB_PORT, "eth0", short
    )));

    // To the STRICT pod over IPv6: nothing gets through.
    let to_a2 = attack::connect_v6(c1, a2_ip, WEB_PORT, "eth0", short);
    assert!(to_a2.is_err(), "c1 reached a2 over IPv6");
    assert!(
        a2.peers().iter().all(SocketAddr::is_ipv4),
        "{:?}",
        a2.peers()
    );
    // From an enrolled pod over IPv6: nothing leaves either.
    let from_a1 = attack::connect_v6(&cluster.pod("a1").netns, c3_ip, WEB_PORT, "eth0", short);
    assert!(
        from_a1.is_err(),
        "a1 reached c3 over IPv6, around the proxy"
    );
    // UDP over IPv6: dropped to an enrolled pod, delivered to a pod outside the mesh.
    let sink_a2 = UdpSink::bind(&cluster.pod("a2").netns, 9999).unwrap();
    let sink_c3 = UdpSink::bind(&cluster.pod("c3").netns, 9999).unwrap();
    let scope = attack::ifindex(c1, "eth0").unwrap();
    for ip in [a2_ip, c3_ip] {
        let dst = SocketAddr::V6(SocketAddrV6::new(ip, 9999, 0, scope));
        attack::udp_send(c1, 0, dst, b"ping").unwrap();
    }
    assert_eq!(sink_c3.received(Duration::from_secs(1)).len(), 1);
    assert!(sink_a2.received(Duration::from_millis(200)).is_empty());
    // The SYNs both ways (with their retries) and the datagram.
    let dropped = counter(&cluster, "node-a", "ipv6_dropped");
    assert!(dropped >= 3, "ipv6_dropped: {dropped}");
    // ICMPv6 passes both ways: neighbour discovery found a2 for c1, and c3 for a1.
    for (pod, ip) in [("c1", a2_ip), ("a1", c3_ip)] {
        let ns = &cluster.pod(pod).netns;
        let json = ns
            .ip(&["-6", "-j", "neigh", "show", &ip.to_string(), "dev", "eth0"])
            .unwrap();
        let entries: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert!(entries[0]["lladdr"].is_string(), "{pod} -> {ip}: {json}");
    }
}

#[test]
fn vlan_tagged_frames_never_reach_enrolled_pods() {
    require_root!();
    let mut cluster = Cluster::new(TWO_NODES).unwrap();
    cluster.start_mesh("node-a").unwrap();
    let sink = UdpSink::bind(&cluster.pod("a2").netns, 9999).unwrap();
    let c1 = &cluster.pod("c1").netns;
    let (from, to) = (v4(&cluster, "c1", 5555), v4(&cluster, "a2", 9999));
    let c1_mac = attack::mac(c1, "eth0").unwrap();
    let a2_mac = attack::mac(&cluster.pod("a2").netns, "eth0").unwrap();
    // Control: the same datagram untagged arrives (UDP is not checked by default).
    for tags in [0, 2] {
        let frame = attack::tagged_udp(c1_mac, a2_mac, tags, from, to, b"tagged?");
        attack::send_frame(c1, "eth0", frame).unwrap();
    }
    // Two tags with VLAN id 0: the kernel takes the outer one out before TC, the bridge
    // forwards the frame, the pod's stack strips the inner one and takes the datagram.
    assert_eq!(sink.received(Duration::from_secs(1)).len(), 1);
    assert_eq!(counter(&cluster, "node-a", "vlan_dropped"), 1);
}

#[test]
fn a_fragmented_syn_never_reaches_a_strict_pod() {
    require_root!();
    let mut cluster = Cluster::new(&format!("{TWO_NODES}{STRICT_MESH}")).unwrap();
    cluster.start_mesh_everywhere().unwrap();
    let a2 = Server::start(&cluster.pod("a2").netns, WEB_PORT, Behaviour::Echo).unwrap();
    let node_b = &cluster.node("node-b").netns;
    let dst = v4(&cluster, "a2", WEB_PORT);
    // node-b's path to a2 fragments anything over 68 bytes (and, locked, sets no DF).
    let flannel_a = cluster.node("node-a").flannel.to_string();
    node_b
        .ip(&[
            "route",
            "replace",
            &format!("{}/32", dst.ip()),
            "via",
            &flannel_a,
            "dev",
            "flannel.1",
            "onlink",
            "mtu",
            "lock",
            "68",
        ])
        .unwrap();

    // Control: an ordinary SYN from node-b's host network is captured on node-a and refused
    // there by STRICT.
    let captured = counter(&cluster, "node-a", "captured_inbound_syn");
    let plain = attack::connect_with_ip_options(node_b, dst, Vec::new(), Duration::from_secs(3));
    assert!(!echoes(plain), "plaintext reached the STRICT pod");
    assert!(counter(&cluster, "node-a", "captured_inbound_syn") > captured);

    // The attack: 40 bytes of IP options (NOPs) leave 8 bytes of TCP header in the SYN's
    // first fragment: its ports, not its flags.
    let stream = attack::connect_with_ip_options(node_b, dst, vec![1; 40], Duration::from_secs(3));
    assert!(!echoes(stream), "the fragmented SYN reached the STRICT pod");
    assert!(a2.peers().is_empty(), "a2 saw {:?}", a2.peers());
    assert!(counter(&cluster, "node-a", "fragment_dropped") > 0);
}

#[test]
fn host_processes_are_plaintext_from_outside_the_mesh_unless_they_are_the_kubelet() {
    require_root!();
    // a2 (`app: web`) is STRICT; a1 (`app: client`) PERMISSIVE with an allow-nothing policy.
    let policies = r#"
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web, namespace: mesh}
spec: {selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: mesh}
spec: {selector: {matchLabels: {app: client}}}
"#;
    let mut cluster = Cluster::new(&format!("{TWO_NODES}{policies}")).unwrap();
    let kubelet = Cgroup::create(&format!("{}-kubelet", cluster.id)).unwrap();
    cluster.run_args = vec!["--kubelet-cgroup".into(), kubelet.relative.clone()];
    cluster.start_mesh("node-a").unwrap();
    let _a1 = Server::start(&cluster.pod("a1").netns, WEB_PORT, Behaviour::Echo).unwrap();
    let _a2 = Server::start(&cluster.pod("a2").netns, WEB_PORT, Behaviour::Echo).unwrap();
    let pods = [v4(&cluster, "a2", WEB_PORT), v4(&cluster, "a1", WEB_PORT)];
    let host = cluster.node("node-a").gateway;
    // The test's own thread, in node-a's namespace: a host process outside the kubelet.
    let from_host = |cluster: &Cluster, dst: SocketAddrV4| {
        echo_text(&cluster.node("node-a").netns, dst.into(), "host\n").is_ok()
    };
    let from_kubelet = |cluster: &Cluster, dst: SocketAddrV4| {
        let script = format!(
            "exec 3<>/dev/tcp/{}/{} && echo hi >&3 && test \"$(head -c 2 <&3)\" = hi",
            dst.ip(),
            dst.port()
        );
        let node = &cluster.node("node-a").netns;
        kubelet.run_in(node, "bash", &["-c", &script]).unwrap()
    };

    // kubelet-only (the default): a process outside the kubelet's cgroup is sent to the
    // proxy, where STRICT refuses it at a2 and the policy at a1.
    for dst in pods {
        assert!(!from_host(&cluster, dst), "a host process reached {dst}");
    }
    assert_eq!(counter(&cluster, "node-a", "host_captured"), 2);
    let strict = cluster
        .wait_connection("node-a", "the host's connection to a2", |c| {
            c.client.ip() == host && c.original_dst == SocketAddr::V4(pods[0])
        })
        .unwrap();
    assert_eq!(strict.flag, "DENY");
    assert!(strict.authorization.unwrap().to_string().contains("STRICT"));
    let denied = cluster
        .wait_connection("node-a", "the host's connection to a1", |c| {
            c.client.ip() == host && c.original_dst == SocketAddr::V4(pods[1])
        })
        .unwrap();
    assert_eq!(denied.flag, "DENY");
    // A raw SYN goes around the connect hook: dropped on the pod's interface.
    attack::raw_syn(&cluster.node("node-a").netns, host, pods[0], None).unwrap();
    wait_until("the raw SYN dropped", || {
        counter(&cluster, "node-a", "unproxied_syn") == 1
    });
    // Nor does the proxy's mark make a host process the proxy (CAP_NET_RAW sets it).
    let forged = attack::connect_marked(
        &cluster.node("node-a").netns,
        MARK_PROXY,
        pods[0],
        Duration::from_secs(3),
    );
    assert!(!echoes(forged), "a host process passed as the proxy");
    assert_eq!(counter(&cluster, "node-a", "host_captured"), 3);
    attack::raw_syn(
        &cluster.node("node-a").netns,
        host,
        pods[0],
        Some(MARK_PROXY),
    )
    .unwrap();
    wait_until("the marked raw SYN dropped", || {
        counter(&cluster, "node-a", "unproxied_syn") == 2
    });
    // The kubelet reaches both directly (its probes must work on STRICT pods).
    for dst in pods {
        assert!(
            from_kubelet(&cluster, dst),
            "the kubelet could not reach {dst}"
        );
    }
    assert_eq!(counter(&cluster, "node-a", "host_kubelet"), 2);

    // allow: both reach both, as in Istio ambient; a raw SYN passes too.
    cluster.stop_mesh("node-a").unwrap();
    cluster
        .run_args
        .extend(["--host-traffic".into(), "allow".into()]);
    cluster.start_mesh("node-a").unwrap();
    for dst in pods {
        assert!(
            from_host(&cluster, dst),
            "a host process could not reach {dst}"
        );
        assert!(
            from_kubelet(&cluster, dst),
            "the kubelet could not reach {dst}"
        );
    }
    let raw = counter(&cluster, "node-a", "unproxied_syn");
    attack::raw_syn(&cluster.node("node-a").netns, host, pods[0], None).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(counter(&cluster, "node-a", "unproxied_syn"), raw);
}

#[test]
fn the_proxy_never_dials_itself() {
    require_root!();
    let mut cluster = Cluster::new(TWO_NODES).unwrap();
    cluster.start_mesh("node-a").unwrap();
    let pid = cluster.mesh_pid("node-a").unwrap();
    let node = &cluster.node("node-a").netns;
    let gateway = cluster.node("node-a").gateway;
    let to_node = SocketAddr::from((gateway, 15001));
    // One round: each listener dialled directly (refused by sk_lookup), and a pod dialling
    // the proxy's port at its node's address (refused once by the proxy, not looped).
    let round = |n: u64| {
        for port in [15001, 15006, 15008] {
            let to = SocketAddr::from(([127, 0, 0, 1], port));
            let refused =
                node.run(move || Ok(TcpStream::connect_timeout(&to, Duration::from_secs(2))));
            let err = refused
                .unwrap()
                .expect_err("the proxy's listener took a direct connection");
            assert_eq!(
                err.kind(),
                std::io::ErrorKind::ConnectionRefused,
                "{to}: {err}"
            );
        }
        assert_eq!(counter(&cluster, "node-a", "self_loop"), 3 * n);
        assert!(echo_text(&cluster.pod("a1").netns, to_node, "loop?\n").is_err());
        wait_until("both refusals of a1 -> the node's 15001 recorded", || {
            cluster.connections("node-a").is_ok_and(|c| {
                c.iter()
                    .filter(|c| c.original_dst == to_node && c.flag == "NR")
                    .count() as u64
                    == n
            })
        });
    };
    round(1);
    // The second round must cost what the first left behind: no amplification. Measured
    // after a first round, so allocator and buffer warm-up is not counted as growth.
    // Anonymous memory only: file-backed pages of the (debug) binary come and go as code
    // runs and say nothing about what the proxy holds.
    let anon = || proc_status_kib(pid, "RssAnon:").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (fds, rss) = (attack::open_fds(pid).unwrap(), anon());
    round(2);
    std::thread::sleep(Duration::from_millis(500));
    let (fds_after, rss_after) = (attack::open_fds(pid).unwrap(), anon());
    eprintln!("anonymous RSS {rss} -> {rss_after} KiB, fds {fds} -> {fds_after}");
    assert!(fds_after <= fds + 4, "fds {fds} -> {fds_after}");
    assert!(
        rss_after < rss + 4 * 1024,
        "anonymous RSS {rss} -> {rss_after} KiB"
    );
}

#[test]
fn enrolled_pods_reach_servers_in_their_nodes_namespace() {
    require_root!();
    let mut cluster = Cluster::new(TWO_NODES).unwrap();
    cluster.start_mesh("node-a").unwrap();
    let node = cluster.node("node-a");
    let server = Server::start(&node.netns, 9200, Behaviour::Echo).unwrap();
    let addresses: [Ipv4Addr; 2] = [node.gateway, node.underlay];
    for ip in addresses {
        let dst = SocketAddr::from((ip, 9200));
        assert_eq!(
            echo_text(&cluster.pod("a1").netns, dst, "hello node\n").unwrap(),
            "hello node\n",
            "a1 -> {dst}"
        );
        cluster
            .wait_connection("node-a", "a1 -> the node", |c| c.original_dst == dst)
            .unwrap();
    }
    // The proxy made those connections from the node's own address, as kube-proxy does for
    // hairpin traffic: an answer to the pod's address would have gone to the pod.
    let peers = server.peers();
    assert_eq!(peers.len(), 2);
    assert!(
        peers.iter().all(|p| addresses.contains(&match p.ip() {
            std::net::IpAddr::V4(v4) => v4,
            std::net::IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
        })),
        "{peers:?}"
    );
}

#[test]
fn udp_to_enrolled_pods_can_be_limited_to_dns() {
    require_root!();
    // c3 serves the cluster's DNS (a Service with port 53).
    let config = format!(
        "{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: dns, namespace: plain}}\n\
         spec: {{clusterIP: 100.66.0.53, selector: {{app: dns}}, ports: [{{name: dns, \
         protocol: UDP, port: 53}}]}}\n",
        TWO_NODES.replace(
            "metadata: {name: c3, namespace: plain}",
            "metadata: {name: c3, namespace: plain, labels: {app: dns}}",
        )
    );
    let mut cluster = Cluster::new(&config).unwrap();
    cluster.run_args = vec!["--udp-to-enrolled".into(), "dns-only".into()];
    cluster.start_mesh("node-a").unwrap();
    cluster.run_args.clear();
    cluster.start_mesh("node-b").unwrap();
    let sink = |pod: &str, port| UdpSink::bind(&cluster.pod(pod).netns, port).unwrap();
    let (a2_other, a2_dns) = (sink("a2", 9999), sink("a2", 53));
    let (c3_other, b1_other) = (sink("c3", 9999), sink("b1", 9999));
    let send = |from: &str, from_port: u16, to: &str, port: u16, payload: &'static [u8]| {
        let dst = SocketAddr::from((cluster.pod(to).ip, port));
        attack::udp_send(&cluster.pod(from).netns, from_port, dst, payload).unwrap();
    };
    send("c1", 0, "a2", 9999, b"c1");
    send("c2", 0, "a2", 9999, b"c2");
    // From port 53 of a pod that serves no DNS: not an answer.
    send("c1", 53, "a2", 9999, b"c1 as dns");
    send("c3", 53, "a2", 9999, b"dns answer");
    send("c1", 0, "a2", 53, b"query");
    send("c1", 0, "c3", 9999, b"to c3");
    send("c1", 0, "b1", 9999, b"to b1");
    let wait = Duration::from_secs(1);
    assert_eq!(a2_dns.received(wait), [b"query".to_vec()], "DNS to a2");
    assert_eq!(
        a2_other.received(wait),
        [b"dns answer".to_vec()],
        "only the DNS server's answer reaches a2's other port"
    );
    assert_eq!(c3_other.received(wait).len(), 1, "to c3, outside the mesh");
    assert_eq!(
        b1_other.received(wait).len(),
        1,
        "to b1 (node-b allows UDP)"
    );
    assert_eq!(counter(&cluster, "node-a", "udp_dropped"), 3);
}
