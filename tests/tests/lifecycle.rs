//! The mesh's life on a node: it fails closed while mesh-node is stopped and recovers on
//! restart; starting it leaves established connections alone; `mesh-node uninstall` removes
//! every trace and pods talk directly again.

use std::{net::SocketAddr, time::Duration};

use mesh_tests::{
    apps::{transfer, Behaviour, Server, Session},
    cluster::{wait_loaded_programs, Cluster},
    fixtures::{TWO_NODES, WEB_PORT},
    require_root,
};

/// The programs every node loads (the socket bypass's only when it is on).
const PROGRAMS: [&str; 4] = [
    "mesh_capture",
    "mesh_egress",
    "mesh_sk_lookup",
    "mesh_connect4",
];

fn addr(cluster: &Cluster, pod: &str, port: u16) -> SocketAddr {
    SocketAddr::from((cluster.pod(pod).ip, port))
}

#[test]
fn stopped_mesh_fails_closed_and_a_restart_adopts_the_pinned_programs() {
    require_root!();
    let mut cluster = Cluster::new(TWO_NODES).unwrap();
    cluster.start_mesh_everywhere().unwrap();
    let a2 = Server::start(&cluster.pod("a2").netns, WEB_PORT, Behaviour::Echo).unwrap();
    let b1 = Server::start(&cluster.pod("b1").netns, WEB_PORT, Behaviour::Echo).unwrap();
    let c2 = Server::start(&cluster.pod("c2").netns, 9000, Behaviour::Echo).unwrap();
    transfer(
        &cluster.pod("a1").netns,
        addr(&cluster, "a2", WEB_PORT),
        1024,
    )
    .unwrap();

    let (_, state) = cluster.admin_get("node-a", "/debug/state").unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    let links = state["datapath"]["links"].as_array().unwrap().len();
    assert_eq!(links, 6, "eth0, flannel.1 and four pod veths: {state:#}");
    cluster.stop_mesh("node-a").unwrap();
    let pins = cluster.bpffs().join("node-a/links");
    let pinned: Vec<String> = std::fs::read_dir(&pins)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let count = |prefix: &str| pinned.iter().filter(|p| p.starts_with(prefix)).count();
    // Ingress on every link, egress on the veths (pods' and the underlay's), not flannel.1.
    assert_eq!(
        (
            count("sk_lookup"),
            count("connect4"),
            count("tc-"),
            count("tce-")
        ),
        (1, 1, links, links - 1),
        "every link stays pinned: {pinned:?}"
    );

    // New connections of the enrolled pod are refused, promptly, and reach no server.
    let (a2_seen, b1_seen) = (a2.peers().len(), b1.peers().len());
    let a2_addr = addr(&cluster, "a2", WEB_PORT);
    assert_refused(
        &cluster,
        &[
            // Outbound from the enrolled pod, same node and across nodes.
            ("a1", a2_addr),
            ("a1", addr(&cluster, "b1", WEB_PORT)),
            // Inbound to the enrolled pod, from the same node and from the other node.
            ("c1", a2_addr),
            ("c2", a2_addr),
        ],
    );
    assert_eq!(
        (a2.peers().len(), b1.peers().len()),
        (a2_seen, b1_seen),
        "a connection bypassed the mesh"
    );
    // Pods outside the mesh are unaffected.
    let done = transfer(&cluster.pod("c1").netns, addr(&cluster, "c2", 9000), 1024).unwrap();
    assert_eq!(c2.peers().last(), Some(&done.local));

    // A pod created while mesh-node is down has no capture program on its veth. Its SYN to a
    // same-node enrolled pod would be switched at L2 around the mesh: the forward guard refuses
    // it. To pods outside the mesh it talks as usual.
    cluster
        .add_pod("late", "plain", "node-a", "100.65.0.20".parse().unwrap())
        .unwrap();
    assert_refused(&cluster, &[("late", a2_addr)]);
    let late = &cluster.pod("late").netns;
    assert_eq!(
        a2.peers().len(),
        a2_seen,
        "the late pod reached a2 around the mesh"
    );
    let c3 = Server::start(&cluster.pod("c3").netns, 9000, Behaviour::Echo).unwrap();
    let done = transfer(late, addr(&cluster, "c3", 9000), 1024).unwrap();
    assert_eq!(c3.peers().last(), Some(&done.local));

    // The next mesh-node adopts the pinned programs and serves again.
    cluster.start_mesh("node-a").unwrap();
    let done = transfer(
        &cluster.pod("a1").netns,
        addr(&cluster, "a2", WEB_PORT),
        1 << 20,
    )
    .unwrap();
    cluster
        .wait_connection("node-a", "a1 -> a2 after restart", |c| {
            c.client == done.local
        })
        .unwrap();
    let done = transfer(
        &cluster.pod("a1").netns,
        addr(&cluster, "b1", WEB_PORT),
        1 << 20,
    )
    .unwrap();
    // The late pod's veth now has the program: its connection to a2 is captured inbound.
    let done_late = transfer(&cluster.pod("late").netns, a2_addr, 4096).unwrap();
    cluster
        .wait_connection("node-a", "late -> a2 after restart", |c| {
            c.client == done_late.local && c.direction == "inbound"
        })
        .unwrap();
    cluster
        .wait_connection("node-a", "a1 -> b1 after restart", |c| {
            c.client == done.local
        })
        .unwrap();
    let log = cluster.mesh_log("node-a");
    assert!(
        log.contains("stopping; the capture programs stay attached"),
        "{log}"
    );

    // A crash (SIGKILL) fails closed the same way.
    // Every link kept its pinned TCX link, updated in place to the new program.
    let log = cluster.mesh_log("node-a");
    assert_eq!(
        log.matches("capture attached (Adopted)").count(),
        links,
        "{log}"
    );
    // One program of each kind per node: the restart replaced, it did not add.
    for program in PROGRAMS {
        assert_eq!(wait_loaded_programs(program, 2).unwrap(), 2, "{program}");
    }

    cluster.kill_mesh("node-a").unwrap();
    assert_refused(&cluster, &[("a1", addr(&cluster, "a2", WEB_PORT))]);
    cluster.start_mesh("node-a").unwrap();
    transfer(
        &cluster.pod("a1").netns,
        addr(&cluster, "a2", WEB_PORT),
        4096,
    )
    .unwrap();
}

/// A new connection from each pod to its destination is refused promptly.
fn assert_refused(cluster: &Cluster, calls: &[(&str, SocketAddr)]) {
    for (pod, dst) in calls {
        cluster.assert_refused(pod, *dst);
    }
}

#[test]
fn starting_the_mesh_leaves_established_connections_alone() {
    require_root!();
    let mut cluster = Cluster::new(TWO_NODES).unwrap();
    let _a2 = Server::start(&cluster.pod("a2").netns, WEB_PORT, Behaviour::Echo).unwrap();
    let _b1 = Server::start(&cluster.pod("b1").netns, WEB_PORT, Behaviour::Echo).unwrap();
    let mut sessions = vec![
        // Enrolled to enrolled, same node and across nodes.
        Session::open(&cluster.pod("a1").netns, addr(&cluster, "a2", WEB_PORT)).unwrap(),
        Session::open(&cluster.pod("a1").netns, addr(&cluster, "b1", WEB_PORT)).unwrap(),
        // Outside the mesh to enrolled, same node and across nodes (inbound side).
        Session::open(&cluster.pod("c1").netns, addr(&cluster, "a2", WEB_PORT)).unwrap(),
        Session::open(&cluster.pod("c2").netns, addr(&cluster, "a2", WEB_PORT)).unwrap(),
        Session::open(&cluster.pod("c1").netns, addr(&cluster, "b1", WEB_PORT)).unwrap(),
    ];
    for s in &mut sessions {
        s.roundtrip().unwrap();
    }

    cluster.start_mesh_everywhere().unwrap();
    for round in 0..10 {
        for (i, s) in sessions.iter_mut().enumerate() {
            s.roundtrip().unwrap_or_else(|e| {
                panic!("session {i} broke in round {round} after mesh start: {e:#}")
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Not one of them went through a proxy ...
    let locals: Vec<SocketAddr> = sessions.iter().map(Session::local).collect();
    for node in ["node-a", "node-b"] {
        for c in cluster.connections(node).unwrap() {
            assert!(
                !locals.contains(&c.client),
                "{node} proxied an old connection: {c:?}"
            );
        }
    }
    assert!(
        cluster
            .kernel_counter("node-a", "passed_uncaptured")
            .unwrap()
            > 0
    );
    // ... while a new one does.
    let done = transfer(
        &cluster.pod("a1").netns,
        addr(&cluster, "a2", WEB_PORT),
        4096,
    )
    .unwrap();
    cluster
        .wait_connection("node-a", "new a1 -> a2", |c| c.client == done.local)
        .unwrap();
    for s in &mut sessions {
        s.roundtrip().unwrap();
    }
}

#[test]
fn uninstall_removes_every_trace_and_pods_talk_directly() {
    require_root!();
    let mut cluster = Cluster::new(TWO_NODES).unwrap();
    cluster.start_mesh("node-a").unwrap();
    let a2 = Server::start(&cluster.pod("a2").netns, WEB_PORT, Behaviour::Echo).unwrap();
    transfer(
        &cluster.pod("a1").netns,
        addr(&cluster, "a2", WEB_PORT),
        4096,
    )
    .unwrap();
    // While mesh-node runs, uninstall may not touch the node (a second mesh-node takes it
    // over instead: tests/upgrade.rs).
    let err = cluster.uninstall("node-a").unwrap_err();
    assert!(
        format!("{err:#}").contains("another mesh-node is running"),
        "{err:#}"
    );
    transfer(
        &cluster.pod("a1").netns,
        addr(&cluster, "a2", WEB_PORT),
        4096,
    )
    .unwrap();
    cluster.stop_mesh("node-a").unwrap();

    let report = cluster.uninstall("node-a").unwrap();
    assert!(
        report.contains("sk_lookup") && report.contains("MESH_PODS"),
        "{report}"
    );
    let node = &cluster.node("node-a").netns;
    // Only node-a's mesh ran in this test: with its links detached and pins gone, no program
    // of ours may stay loaded anywhere (bpftool 7.1's `net show` does not list TCX or
    // sk_lookup attachments, so this is the check that can fail).
    for program in PROGRAMS {
        assert_eq!(
            wait_loaded_programs(program, 0).unwrap(),
            0,
            "{program} still loaded"
        );
    }
    assert!(
        !cluster.bpffs().join("node-a").exists(),
        "pin directory left behind"
    );
    assert!(!node.ip(&["rule", "show"]).unwrap().contains("fwmark 0x200"));
    assert_eq!(
        node.ip(&["route", "show", "table", "100"]).unwrap().trim(),
        ""
    );
    for table in ["filter", "nat", "raw"] {
        let rules = node.exec("iptables", &["-w", "-t", table, "-S"]).unwrap();
        assert!(!rules.contains("MESH-"), "{table}: {rules}");
    }
    let tables = node.exec("nft", &["list", "tables"]).unwrap();
    assert!(!tables.contains("mesh"), "{tables}");

    // Direct again: the server sees the client pod itself.
    let done = transfer(
        &cluster.pod("a1").netns,
        addr(&cluster, "a2", WEB_PORT),
        1 << 20,
    )
    .unwrap();
    assert_eq!(a2.peers().last(), Some(&done.local));

    // Uninstalling twice is fine.
    let again = cluster.uninstall("node-a").unwrap();
    assert!(again.contains("nothing"), "{again}");
}
