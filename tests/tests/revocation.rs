//! Revocation end to end (root, two nodes, real clients): a policy applied by a live config
//! update closes, within a second, the open connections it now refuses (a cross-node HBONE
//! connection, a same-node one, plaintext ones after PERMISSIVE -> STRICT), and only those;
//! and policy flipping while connections are opened in a loop never leaves a refused one open.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use mesh_tests::{
    apps::{echo_text, Behaviour, Server, Session},
    cluster::Cluster,
    fixtures::{OVERLAY, PERMISSIVE, STRICT, WEB_PORT},
    require_root,
};

/// Istio's allow-nothing policy for namespace `default`: an ALLOW policy with no rules.
const ALLOW_NOTHING: &str = r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: default}
spec: {}
"#;

fn addr(cluster: &Cluster, pod: &str) -> SocketAddr {
    SocketAddr::from((cluster.pod(pod).ip, WEB_PORT))
}

fn open(cluster: &Cluster, from: &str, to: &str) -> Session {
    let mut session = Session::open(&cluster.pod(from).netns, addr(cluster, to))
        .unwrap_or_else(|e| panic!("{from} -> {to}: {e:#}"));
    session
        .roundtrip()
        .unwrap_or_else(|e| panic!("{from} -> {to} before the change: {e:#}"));
    session
}

/// Polls `sessions` until each has ended or 3 s passed since `since`; returns how long after
/// `since` each one ended (`None`: still open).
fn ends(since: Instant, sessions: &[(&str, &Session)]) -> Vec<Option<Duration>> {
    let mut ended = vec![None; sessions.len()];
    while since.elapsed() < Duration::from_secs(3) && ended.iter().any(Option::is_none) {
        for (at, (_, session)) in ended.iter_mut().zip(sessions) {
            if at.is_none() && session.ended() {
                *at = Some(since.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    ended
}

fn assert_closed_within_a_second(since: Instant, sessions: &[(&str, &Session)]) {
    for ((what, _), at) in sessions.iter().zip(ends(since, sessions)) {
        let at = at.unwrap_or_else(|| panic!("{what}: still open 3 s after the policy change"));
        eprintln!(
            "{what}: closed {} ms after the config was written",
            at.as_millis()
        );
        assert!(
            at < Duration::from_secs(1),
            "{what}: closed only after {at:?}"
        );
    }
}

#[test]
fn a_policy_applied_live_closes_the_connections_it_now_refuses_within_a_second() {
    require_root!();
    let mut cluster = Cluster::new(&format!("{OVERLAY}{PERMISSIVE}")).unwrap();
    cluster.start_mesh_everywhere().unwrap();
    let _servers: Vec<Server> = ["web-a", "web-b", "ops1"]
        .iter()
        .map(|pod| Server::start(&cluster.pod(pod).netns, WEB_PORT, Behaviour::Echo).unwrap())
        .collect();

    let mut hbone = open(&cluster, "api", "web-b");
    let mut same_node = open(&cluster, "api", "web-a");
    let plain_same_node = open(&cluster, "plain-a", "web-a");
    let plain_cross_node = open(&cluster, "plain-b", "web-a");
    let plain_to_b = open(&cluster, "plain-a", "web-b");
    // Namespace `ops` keeps its policy: these stay.
    let mut unrelated = open(&cluster, "api", "ops1");
    let mut unrelated_plain = open(&cluster, "plain-b", "ops1");

    // PERMISSIVE -> STRICT: the plaintext connections to `default` go.
    let written = Instant::now();
    cluster.write_config(&format!("{OVERLAY}{STRICT}")).unwrap();
    assert_closed_within_a_second(
        written,
        &[
            ("plaintext plain-a -> web-a (same node)", &plain_same_node),
            ("plaintext plain-b -> web-a (other node)", &plain_cross_node),
            ("plaintext plain-a -> web-b (other node)", &plain_to_b),
        ],
    );
    cluster.wait_generation(2);
    for (what, session) in [
        ("api -> web-b over HBONE", &mut hbone),
        ("api -> web-a on the same node", &mut same_node),
        ("api -> ops1", &mut unrelated),
        ("plaintext plain-b -> ops1", &mut unrelated_plain),
    ] {
        session
            .roundtrip()
            .unwrap_or_else(|e| panic!("{what} broken by STRICT: {e:#}"));
    }
    let revoked = cluster
        .wait_connection("node-a", "the revoked plaintext connection", |c| {
            c.direction == "inbound" && c.flag == "DENY" && c.bytes_received > 0
        })
        .unwrap();
    let error = revoked.error.unwrap_or_default();
    assert!(
        error.contains("revoked") && error.contains("default/default"),
        "{error}"
    );
    let counted = |node: &str, policy: &str| {
        cluster
            .metric_sum(
                node,
                "mesh_proxy_connections_revoked_total",
                &[("policy", policy)],
            )
            .unwrap()
    };
    assert_eq!(counted("node-a", "default/default"), 2);
    assert_eq!(counted("node-b", "default/default"), 1);

    // Allow-nothing: the mesh connections to `default` go too, on both paths.
    let written = Instant::now();
    cluster
        .write_config(&format!("{OVERLAY}{STRICT}{ALLOW_NOTHING}"))
        .unwrap();
    assert_closed_within_a_second(
        written,
        &[
            ("api -> web-b over HBONE", &hbone),
            ("api -> web-a on the same node", &same_node),
        ],
    );
    cluster.wait_generation(3);
    for (what, session) in [
        ("api -> ops1", &mut unrelated),
        ("plaintext plain-b -> ops1", &mut unrelated_plain),
    ] {
        session
            .roundtrip()
            .unwrap_or_else(|e| panic!("{what} broken by a policy of another namespace: {e:#}"));
    }
    assert!(
        echo_text(&cluster.pod("api").netns, addr(&cluster, "web-a"), "new\n").is_err(),
        "a new connection got through allow-nothing"
    );
    let tunnel = cluster
        .wait_connection("node-b", "the revoked HBONE stream", |c| {
            c.direction == "hbone" && c.flag == "DENY" && c.bytes_received > 0
        })
        .unwrap();
    assert!(tunnel
        .error
        .is_some_and(|e| e.contains("revoked") && e.contains("default/allow-nothing")),);
    cluster
        .wait_connection("node-a", "the revoked same-node connection", |c| {
            c.direction == "outbound" && c.flag == "DENY" && c.bytes_received > 0
        })
        .unwrap();
    assert_eq!(counted("node-b", "default/allow-nothing"), 1);
    assert_eq!(counted("node-a", "default/allow-nothing"), 1);
    let log = cluster.mesh_log("node-b");
    assert!(
        log.contains("open connection revoked") && log.contains("default/allow-nothing"),
        "node-b's log does not name the revocation"
    );
}

#[test]
fn policy_flipping_while_connections_open_never_leaves_a_refused_one_open() {
    require_root!();
    let mut cluster = Cluster::new(&format!("{OVERLAY}{PERMISSIVE}")).unwrap();
    cluster.start_mesh_everywhere().unwrap();
    let _servers: Vec<Server> = ["web-a", "web-b"]
        .iter()
        .map(|pod| Server::start(&cluster.pod(pod).netns, WEB_PORT, Behaviour::Echo).unwrap())
        .collect();
    let allow = format!("{OVERLAY}{PERMISSIVE}");
    let deny = format!("{OVERLAY}{STRICT}{ALLOW_NOTHING}");

    let stop = AtomicBool::new(false);
    let kept: Mutex<Vec<(&str, Session)>> = Mutex::new(Vec::new());
    let attempts = AtomicUsize::new(0);
    // Odd: the last flip is to deny.
    let flips = 13;
    std::thread::scope(|scope| {
        for (from, to) in [("api", "web-b"), ("api", "web-a"), ("plain-a", "web-a")] {
            let (cluster, stop, kept, attempts) = (&cluster, &stop, &kept, &attempts);
            scope.spawn(move || {
                let started = Instant::now();
                for _ in 0..2_000 {
                    if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(30) {
                        break;
                    }
                    attempts.fetch_add(1, Ordering::Relaxed);
                    let netns = &cluster.pod(from).netns;
                    if let Ok(mut session) = Session::open(netns, addr(cluster, to)) {
                        // Kept only if it got through: an open connection the policy allowed.
                        if session.roundtrip().is_ok() {
                            kept.lock().unwrap().push((to, session));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
        }
        // Flip every 300 ms (the proxy polls its config file every 250 ms), ending on deny.
        for flip in 1..=flips {
            let config = if flip % 2 == 1 { &deny } else { &allow };
            cluster.write_config(config).unwrap();
            std::thread::sleep(Duration::from_millis(300));
        }
        cluster.wait_generation(1 + flips);
        stop.store(true, Ordering::Relaxed);
    });
    let last = Instant::now();
    let kept = kept.into_inner().unwrap();
    let sessions: Vec<(&str, &Session)> = kept.iter().map(|(to, s)| (*to, s)).collect();
    eprintln!(
        "{} connections attempted, {} got through while allowed",
        attempts.load(Ordering::Relaxed),
        kept.len()
    );
    assert!(
        kept.len() >= 20 && kept.iter().any(|(to, _)| *to == "web-b"),
        "too few connections got through to show anything ({})",
        kept.len()
    );
    let ends = ends(last, &sessions);
    let open: Vec<usize> = (0..ends.len())
        .filter(|&i| ends[i].is_none_or(|at| at > Duration::from_secs(1)))
        .collect();
    let mut by_destination = std::collections::BTreeMap::<&str, usize>::new();
    for &i in &open {
        *by_destination.entry(kept[i].0).or_default() += 1;
    }
    assert!(
        open.is_empty(),
        "{} of {} connections that allow-nothing refuses were open more than 1 s after it \
         was in force (by destination: {by_destination:?})",
        open.len(),
        kept.len(),
    );
}
