//! No enrolled pod ever runs unmeshed (issue 17): pods start through the CNI chain a
//! container runtime runs (Debian's `bridge` + `host-local`, then the mesh's plugin), held
//! while mesh-node is away if they are enrolled; a reboot (pins, programs and rules gone,
//! pods recreated first) lets no byte of an enrolled pod through uncaptured; the plugin stays
//! in the chain when K3s rewrites its conflist; pods that went around the gate are found by
//! the repair pass; and the guards hold whatever another controller puts first in
//! INPUT/FORWARD.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use mesh_tests::{
    apps::{transfer, Behaviour, Server, Session},
    cluster::Cluster,
    require_root, wait_until,
};

/// Two nodes; the harness makes `mesh-a`, `plain-a`, `plain-b` itself (no CNI: they predate
/// the plugin).
const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: mesh-a, namespace: mesh}
spec: {nodeName: node-a}
status: {podIP: 100.65.0.2, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: plain-a, namespace: plain}
spec: {nodeName: node-a}
status: {podIP: 100.65.0.4, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: plain-b, namespace: plain}
spec: {nodeName: node-b}
status: {podIP: 100.65.1.3, conditions: [{type: Ready, status: "True"}]}
"#;

/// Pods started through CNI later (the config knows them, as the API would).
const CNI_PODS: &str = r#"
---
apiVersion: v1
kind: Pod
metadata: {name: gated, namespace: mesh}
spec: {nodeName: node-a}
status: {podIP: 100.65.0.10, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: free, namespace: plain}
spec: {nodeName: node-a}
status: {podIP: 100.65.0.11, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: optout, namespace: mesh, labels: {istio.io/dataplane-mode: none}}
spec: {nodeName: node-a}
status: {podIP: 100.65.0.12, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: mesh}
spec: {mtls: {mode: STRICT}}
"#;

const GATED: Ipv4Addr = Ipv4Addr::new(100, 65, 0, 10);
const FREE: Ipv4Addr = Ipv4Addr::new(100, 65, 0, 11);
const OPTOUT: Ipv4Addr = Ipv4Addr::new(100, 65, 0, 12);
/// A pod the config never lists.
const FRESH: Ipv4Addr = Ipv4Addr::new(100, 65, 0, 13);
const PORT: u16 = 9000;

fn addr(cluster: &Cluster, pod: &str, port: u16) -> SocketAddr {
    SocketAddr::from((cluster.pod(pod).ip, port))
}

/// A cluster whose node-a runs pods through CNI, with mesh-node running everywhere and its
/// plugin installed on node-a.
fn cni_cluster() -> Cluster {
    let mut cluster = Cluster::new(BASE).unwrap();
    cluster.cni = true;
    cluster.write_node_conflist("node-a", 1450).unwrap();
    cluster.write_node_conflist("node-b", 1450).unwrap();
    cluster.write_config(&format!("{BASE}{CNI_PODS}")).unwrap();
    cluster.start_mesh_everywhere().unwrap();
    wait_until("the plugin in node-a's chain", || {
        cluster
            .runtime_conflist("node-a")
            .is_ok_and(|(path, _)| path.ends_with("00-mesh.conflist"))
    });
    cluster
}

#[test]
fn enrolled_pods_wait_at_the_gate_while_mesh_node_is_down_and_start_captured() {
    require_root!();
    let mut cluster = cni_cluster();
    let server = Server::start(&cluster.pod("plain-b").netns, PORT, Behaviour::Echo).unwrap();
    // VERSION, as the runtime asks it of the installed plugin.
    let (_, bin) = cluster.cni_dirs("node-a");
    let version = std::process::Command::new(bin.join("mesh-cni"))
        .env("CNI_COMMAND", "VERSION")
        .output()
        .unwrap();
    let version: serde_json::Value = serde_json::from_slice(&version.stdout).unwrap();
    assert!(
        version["supportedVersions"]
            .to_string()
            .contains("\"1.0.0\""),
        "{version}"
    );
    cluster.stop_mesh("node-a").unwrap();

    // Enrolled: held, with a message naming mesh-node and "try again later" (11).
    let err = cluster
        .cni_add("gated", "mesh", "node-a", GATED)
        .unwrap_err();
    assert_eq!(err.plugin, "mesh-cni", "{err}");
    let error: serde_json::Value = serde_json::from_str(&err.stdout).unwrap();
    assert_eq!(error["code"], 11, "{error}");
    assert!(
        error["msg"]
            .as_str()
            .unwrap()
            .contains("mesh-node is not serving"),
        "{error}"
    );
    assert!(
        !cluster.pods.contains_key("gated"),
        "the sandbox was torn down"
    );
    // Outside the mesh (by namespace, and by the pod's own opt-out label): they start and
    // work.
    let started = Instant::now();
    cluster.cni_add("free", "plain", "node-a", FREE).unwrap();
    eprintln!(
        "ADD with mesh-node away (the cache decides): {:?}",
        started.elapsed()
    );
    cluster.cni_add("optout", "mesh", "node-a", OPTOUT).unwrap();
    for pod in ["free", "optout"] {
        let done = transfer(
            &cluster.pod(pod).netns,
            addr(&cluster, "plain-b", PORT),
            1024,
        )
        .unwrap();
        assert_eq!(server.peers().last(), Some(&done.local), "{pod}");
    }

    // mesh-node is back: the retried ADD succeeds, and a SYN sent the instant it returns is
    // the proxy's.
    cluster.start_mesh("node-a").unwrap();
    cluster
        .cni_add_retrying("gated", "mesh", "node-a", GATED, Duration::from_secs(10))
        .unwrap();
    let done = transfer(
        &cluster.pod("gated").netns,
        addr(&cluster, "plain-b", PORT),
        1024,
    )
    .unwrap();
    cluster
        .wait_connection("node-a", "gated's first connection", |c| {
            c.client == done.local && c.direction == "outbound"
        })
        .unwrap();
    let state = cluster.debug_state("node-a").unwrap();
    let gated = state["datapath"]["gated"].to_string();
    assert!(gated.contains("mesh/gated"), "{state:#}");
    // A pod the config does not know yet (the API has no pod IP when the runtime sets the
    // pod up): its namespace enrols it, and it is governed from its first packet on.
    let started = Instant::now();
    cluster.cni_add("fresh", "mesh", "node-a", FRESH).unwrap();
    eprintln!(
        "ADD through bridge, host-local and the gate: {:?}",
        started.elapsed()
    );
    let log = cluster.mesh_log("node-a");
    let admitted = log.lines().rfind(|l| l.contains("capture in place"));
    eprintln!("mesh-node's part: {admitted:?}");
    let done = transfer(
        &cluster.pod("fresh").netns,
        addr(&cluster, "plain-b", PORT),
        1024,
    )
    .unwrap();
    cluster
        .wait_connection("node-a", "fresh's first connection", |c| {
            c.client == done.local && c.direction == "outbound"
        })
        .unwrap();

    // CHECK: fine while capture is on the interface, a failure once it is gone.
    cluster.cni_check("gated").unwrap();
    cluster.cni_check("free").unwrap();
    let veth = cluster.pod("gated").veth.clone();
    let ifindex: u32 = cluster
        .node("node-a")
        .netns
        .exec("cat", &[&format!("/sys/class/net/{veth}/ifindex")])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    for pin in [format!("tc-{ifindex}"), format!("tce-{ifindex}")] {
        std::fs::remove_file(cluster.bpffs().join("node-a/links").join(pin)).unwrap();
    }
    let err = cluster.cni_check("gated").unwrap_err();
    assert!(
        err.stdout.contains("capture is missing from interface"),
        "{err}"
    );

    // DEL: mesh-node forgets the interface; with mesh-node down DEL still succeeds.
    cluster.cni_del("gated").unwrap();
    wait_until("gated forgotten", || {
        cluster
            .debug_state("node-a")
            .is_ok_and(|s| !s["datapath"]["gated"].to_string().contains("mesh/gated"))
    });
    cluster.stop_mesh("node-a").unwrap();
    cluster.cni_del("free").unwrap();
}

/// Probes `dst` (an echo server) from `pod`'s namespace every 50 ms until stopped; counts the
/// probes that reached it (a byte echoed back).
fn probe(
    cluster: &Cluster,
    pod: &str,
    dst: SocketAddr,
    stop: &Arc<AtomicBool>,
) -> (
    Arc<AtomicUsize>,
    std::thread::JoinHandle<anyhow::Result<()>>,
) {
    let connected = Arc::new(AtomicUsize::new(0));
    let (count, stop) = (connected.clone(), stop.clone());
    let handle = cluster.pod(pod).netns.spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if reaches(dst) {
                count.fetch_add(1, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    });
    (connected, handle)
}

/// Whether an echo server at `dst` answers a byte (from the calling thread's namespace).
fn reaches(dst: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&dst, Duration::from_millis(200))
    else {
        return false;
    };
    let mut byte = [0u8];
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .is_ok()
        && stream.write_all(b"x").is_ok()
        && stream.read_exact(&mut byte).is_ok()
}

#[test]
fn after_a_reboot_no_enrolled_pod_runs_uncaptured() {
    require_root!();
    let mut cluster = cni_cluster();
    cluster.cni_add("free", "plain", "node-a", FREE).unwrap();
    cluster.cni_add("gated", "mesh", "node-a", GATED).unwrap();
    let gated_dst = SocketAddr::from((GATED, PORT));
    let server = Server::start(&cluster.pod("gated").netns, PORT, Behaviour::Echo).unwrap();
    // STRICT: the proxy takes the plaintext connection and resets it.
    assert!(!cluster
        .pod("free")
        .netns
        .run(move || Ok(reaches(gated_dst)))
        .unwrap());
    assert!(server.peers().is_empty());
    drop(server);
    let echo = Server::start(&cluster.pod("plain-b").netns, PORT, Behaviour::Echo).unwrap();

    // The reboot: mesh-node gone, its pins, programs and rules gone, the pods' sandboxes
    // gone (no DEL runs); what is on disk stays (the CNI configuration, the enrolment cache).
    cluster.kill_mesh("node-a").unwrap();
    cluster.uninstall("node-a").unwrap();
    for pod in ["free", "gated"] {
        cluster.sandboxes.remove(pod);
        cluster.pods.remove(pod);
    }
    // containerd, starting, tears down the sandboxes that did not survive (a DEL, which
    // releases their addresses): host-local's reservations go.
    std::fs::remove_dir_all(cluster.dir().join("ipam-node-a")).unwrap();
    // Probers outside the mesh, on this node and the other, from the first moment.
    let stop = Arc::new(AtomicBool::new(false));
    let (remote, remote_thread) = probe(&cluster, "plain-b", gated_dst, &stop);
    let (local, local_thread) = probe(&cluster, "plain-a", gated_dst, &stop);

    // Pods come back before mesh-node: the plain one starts, the enrolled one is held.
    cluster.cni_add("free", "plain", "node-a", FREE).unwrap();
    let (free_prober, free_thread) = probe(&cluster, "free", gated_dst, &stop);
    let held = cluster
        .cni_add("gated", "mesh", "node-a", GATED)
        .unwrap_err();
    assert!(held.stdout.contains("mesh-node"), "{held}");
    std::thread::sleep(Duration::from_millis(500));

    cluster.start_mesh("node-a").unwrap();
    cluster
        .cni_add_retrying("gated", "mesh", "node-a", GATED, Duration::from_secs(10))
        .unwrap();
    // The enrolled pod serves, and calls out at once and again and again.
    let server = Server::start(&cluster.pod("gated").netns, PORT, Behaviour::Echo).unwrap();
    let mut calls = Vec::new();
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let done = transfer(
            &cluster.pod("gated").netns,
            addr(&cluster, "plain-b", PORT),
            512,
        )
        .unwrap();
        calls.push(done.local);
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for thread in [remote_thread, local_thread, free_thread] {
        thread.join().unwrap().unwrap();
    }

    // Under STRICT nothing outside the mesh ever reached the enrolled pod...
    for (who, count) in [
        ("plain-b", &remote),
        ("plain-a", &local),
        ("free", &free_prober),
    ] {
        assert_eq!(
            count.load(Ordering::Relaxed),
            0,
            "{who} reached the enrolled pod"
        );
    }
    assert!(server.peers().is_empty(), "{:?}", server.peers());
    // ...and every connection it made went through the proxy.
    let seen: Vec<SocketAddr> = echo
        .peers()
        .into_iter()
        .filter(|p| p.ip() == std::net::IpAddr::V4(GATED))
        .collect();
    assert_eq!(seen.len(), calls.len(), "{seen:?}");
    for call in &calls {
        cluster
            .wait_connection("node-a", "gated's call through the proxy", |c| {
                c.client == *call && c.direction == "outbound"
            })
            .unwrap();
    }
}

#[test]
fn the_plugin_is_back_in_the_chain_after_k3s_rewrites_its_conflist_and_the_cache_follows_the_config(
) {
    require_root!();
    let cluster = cni_cluster();
    let has = |mtu: u64| {
        cluster
            .runtime_conflist("node-a")
            .is_ok_and(|(path, chain)| {
                let plugins = chain["plugins"].as_array().cloned().unwrap_or_default();
                path.ends_with("00-mesh.conflist")
                    && plugins.first().is_some_and(|p| p["mtu"] == mtu)
                    && plugins.last().is_some_and(|p| p["type"] == "mesh-cni")
            })
    };
    assert!(has(1450));
    // K3s writes its flannel conflist anew at every start.
    cluster.write_node_conflist("node-a", 1400).unwrap();
    let took = wait_until(
        "the chain with the new flannel config and the plugin",
        || has(1400),
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    // Even with the mesh's own file gone.
    let (conf, bin) = cluster.cni_dirs("node-a");
    std::fs::remove_file(conf.join("00-mesh.conflist")).unwrap();
    std::fs::remove_file(bin.join("mesh-cni")).unwrap();
    wait_until("the plugin reinstalled", || {
        has(1400) && bin.join("mesh-cni").is_file()
    });

    // The enrolment cache follows the config: a namespace enrolled later holds its pods too
    // while mesh-node is away.
    let cache = cluster.node_state_dir("node-a").join("cni/enrolment.json");
    let enrolled = |namespace: &str| {
        std::fs::read(&cache)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
            .is_some_and(|c| c["namespaces"][namespace] == true)
    };
    assert!(enrolled("mesh") && !enrolled("plain"));
    let relabelled = format!("{BASE}{CNI_PODS}").replace(
        "metadata: {name: plain}",
        "metadata: {name: plain, labels: {istio.io/dataplane-mode: ambient}}",
    );
    cluster.write_config(&relabelled).unwrap();
    wait_until("the cache with plain enrolled", || enrolled("plain"));
}

#[test]
fn pods_that_went_around_the_gate_are_reported_and_their_uncaptured_connections_reset() {
    require_root!();
    let mut cluster = Cluster::new(BASE).unwrap();
    cluster.cni = true;
    cluster.write_node_conflist("node-a", 1450).unwrap();
    cluster.write_node_conflist("node-b", 1450).unwrap();
    cluster.write_config(&format!("{BASE}{CNI_PODS}")).unwrap();
    cluster.run_args = ["--repair=reset", "--repair-interval=2s"]
        .map(String::from)
        .to_vec();
    let _server = Server::start(&cluster.pod("plain-b").netns, PORT, Behaviour::Echo).unwrap();
    // mesh-a started before the mesh (the harness made it without the plugin) and opened a
    // connection then: it bypasses the proxy for its whole life.
    let mut before = Session::open(
        &cluster.pod("mesh-a").netns,
        addr(&cluster, "plain-b", PORT),
    )
    .unwrap();
    before.roundtrip().unwrap();
    cluster.start_mesh_everywhere().unwrap();
    // A pod through the gate, with a connection the proxy carries: left alone.
    cluster.cni_add("gated", "mesh", "node-a", GATED).unwrap();
    let mut captured =
        Session::open(&cluster.pod("gated").netns, addr(&cluster, "plain-b", PORT)).unwrap();
    captured.roundtrip().unwrap();

    wait_until("mesh-a reported", || {
        cluster
            .metric("node-a", "mesh_cni_ungated_pods")
            .is_ok_and(|n| n == 1)
            && cluster
                .mesh_log("node-a")
                .contains("never went through the CNI gate")
    });
    let log = cluster.mesh_log("node-a");
    let line = log
        .lines()
        .find(|l| l.contains("never went through the CNI gate"))
        .unwrap();
    assert!(line.contains("mesh/mesh-a"), "{line}");
    assert!(!log.contains("pod=mesh/gated ip"), "{log}");
    // Its uncaptured connection is listed and reset (--repair=reset).
    wait_until("the uncaptured connection reset", || {
        cluster
            .metric_sum("node-a", "mesh_cni_repair_resets_total", &[])
            .is_ok_and(|n| n >= 1)
    });
    let log = cluster.mesh_log("node-a");
    assert!(
        log.contains(&before.local().to_string()),
        "the connection is named: {log}"
    );
    assert!(
        before.roundtrip().is_err(),
        "the uncaptured connection was reset"
    );
    captured.roundtrip().unwrap();
    // New connections of mesh-a are the proxy's.
    let done = transfer(
        &cluster.pod("mesh-a").netns,
        addr(&cluster, "plain-b", PORT),
        1024,
    )
    .unwrap();
    cluster
        .wait_connection("node-a", "mesh-a after repair", |c| c.client == done.local)
        .unwrap();
}

#[test]
fn guards_hold_behind_a_kube_router_accept_rule() {
    require_root!();
    let config = format!(
        "{BASE}{}",
        r#"
---
apiVersion: v1
kind: Pod
metadata: {name: late, namespace: mesh}
spec: {nodeName: node-a}
status: {podIP: 100.65.0.20, conditions: [{type: Ready, status: "True"}]}
"#
    );
    let mut cluster = Cluster::new(BASE).unwrap();
    cluster.write_config(&config).unwrap();
    cluster.start_mesh_everywhere().unwrap();
    cluster.stop_mesh("node-a").unwrap();
    // K3s's network-policy controller keeps its jumps first, and ACCEPTs what its policies
    // allow.
    let node = &cluster.node("node-a").netns;
    for (chain, builtin) in [
        ("KUBE-ROUTER-INPUT", "INPUT"),
        ("KUBE-ROUTER-FORWARD", "FORWARD"),
    ] {
        node.exec("iptables", &["-w", "-N", chain]).unwrap();
        node.exec("iptables", &["-w", "-A", chain, "-j", "ACCEPT"])
            .unwrap();
        node.exec("iptables", &["-w", "-I", builtin, "1", "-j", chain])
            .unwrap();
    }
    // A socket of the node listening on every address: a captured SYN delivered locally
    // while mesh-node is down must not reach it.
    let node_listener = Server::start_at(
        node,
        SocketAddr::from(([0, 0, 0, 0], 7777)),
        Behaviour::Echo,
    )
    .unwrap();
    let plain_b = Server::start(&cluster.pod("plain-b").netns, 7777, Behaviour::Echo).unwrap();
    cluster.assert_refused("mesh-a", addr(&cluster, "plain-b", 7777));
    assert!(
        node_listener.peers().is_empty(),
        "{:?}",
        node_listener.peers()
    );
    assert!(plain_b.peers().is_empty(), "{:?}", plain_b.peers());

    // An enrolled pod started without the plugin while mesh-node is down: its link has no
    // capture, so its SYN to a pod of the same bridge would be switched around the mesh.
    cluster
        .add_pod("late", "mesh", "node-a", "100.65.0.20".parse().unwrap())
        .unwrap();
    let plain_a = Server::start(&cluster.pod("plain-a").netns, 7777, Behaviour::Echo).unwrap();
    cluster.assert_refused("late", addr(&cluster, "plain-a", 7777));
    assert!(plain_a.peers().is_empty(), "{:?}", plain_a.peers());
}
