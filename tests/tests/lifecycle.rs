//! The mesh's life on a node: it fails closed while mesh-node is stopped and recovers on
//! restart; starting it leaves established connections alone; `mesh-node uninstall` removes
//! every trace and pods talk directly again.

use std::{net::SocketAddr, time::Duration};

use mesh_tests::{
    apps::{connect_in, transfer, Behaviour, Server, Session},
    cluster::Cluster,
    fixtures::{TWO_NODES, WEB_PORT},
    netns::sh,
    require_root,
};

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

    cluster.stop_mesh("node-a").unwrap();
    let pins = cluster.bpffs().join("node-a/links");
    let pinned: Vec<_> = std::fs::read_dir(&pins).unwrap().flatten().collect();
    assert!(
        pinned.len() >= 3,
        "sk_lookup and TC links stay pinned: {pinned:?}"
    );

    // New connections of the enrolled pod are refused, promptly, and reach no server.
    let (a2_seen, b1_seen) = (a2.peers().len(), b1.peers().len());
    assert_refused(
        &cluster,
        &[
            addr(&cluster, "a2", WEB_PORT),
            addr(&cluster, "b1", WEB_PORT),
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
    cluster.kill_mesh("node-a").unwrap();
    assert_refused(&cluster, &[addr(&cluster, "a2", WEB_PORT)]);
    cluster.start_mesh("node-a").unwrap();
    transfer(
        &cluster.pod("a1").netns,
        addr(&cluster, "a2", WEB_PORT),
        4096,
    )
    .unwrap();
}

/// New connections from a1 to each destination are refused promptly.
fn assert_refused(cluster: &Cluster, dsts: &[SocketAddr]) {
    for dst in dsts {
        let started = std::time::Instant::now();
        let err = connect_in(&cluster.pod("a1").netns, *dst, Duration::from_secs(3)).unwrap_err();
        let io = err
            .downcast_ref::<std::io::Error>()
            .map(std::io::Error::kind);
        assert_eq!(
            io,
            Some(std::io::ErrorKind::ConnectionRefused),
            "{dst}: {err:#}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "refusal took {:?}",
            started.elapsed()
        );
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
    cluster.stop_mesh("node-a").unwrap();

    let report = cluster.uninstall("node-a").unwrap();
    assert!(
        report.contains("sk_lookup") && report.contains("MESH_ENROLLED"),
        "{report}"
    );
    let node = &cluster.node("node-a").netns;
    let attached = node.exec("bpftool", &["net", "show"]).unwrap();
    assert!(
        !attached.contains("mesh_"),
        "programs still attached:\n{attached}"
    );
    assert!(
        !cluster.bpffs().join("node-a").exists(),
        "pin directory left behind"
    );
    assert!(!node.ip(&["rule", "show"]).unwrap().contains("fwmark 0x200"));
    assert_eq!(
        node.ip(&["route", "show", "table", "100"]).unwrap().trim(),
        ""
    );
    for table in ["filter", "nat"] {
        let rules = node.exec("iptables", &["-w", "-t", table, "-S"]).unwrap();
        assert!(!rules.contains("MESH-"), "{table}: {rules}");
    }
    // No program of this node is loaded anywhere (nothing else holds a reference).
    std::thread::sleep(Duration::from_millis(200));
    let progs = sh("bpftool", &["prog", "show"]).unwrap();
    let ids = node.exec("bpftool", &["net", "show"]).unwrap();
    assert!(!ids.contains("mesh_capture"), "{progs}");

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
