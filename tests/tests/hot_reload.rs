//! Hot reload under steady traffic: config edits (a new Service endpoint, a newly enrolled pod)
//! take effect within a second while new and open connections through the proxy keep working,
//! and an invalid edit changes nothing, is logged with its reason and counted.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use mesh_tests::{
    apps::{greet, transfer, Behaviour, Server, Session},
    cluster::Cluster,
    fixtures::{TWO_NODES, WEB_PORT},
    require_root, wait_until,
};

/// b1 starts outside the `web` Service (labelled `app: web-next`); c3 starts outside the mesh.
fn initial() -> String {
    TWO_NODES.replace(
        "metadata: {name: b1, namespace: mesh, labels: {app: web}}",
        "metadata: {name: b1, namespace: mesh, labels: {app: web-next}}",
    )
}

/// Answers by who answered, failures with their errors, and the client address of every
/// answered call.
type Tally = (BTreeMap<String, usize>, Vec<String>, Vec<SocketAddr>);

/// Traffic that runs until stopped (at most 60 s or 5,000 calls): new connections to the
/// Service VIP from a1, and one long echo session from a1 to a2, all through node-a's proxy.
struct Load<'s> {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::ScopedJoinHandle<'s, ()>>,
    /// Greetings by answering pod, and failures with their errors.
    answers: Arc<Mutex<Tally>>,
}

impl<'s> Load<'s> {
    fn start<'e>(scope: &'s std::thread::Scope<'s, 'e>, cluster: &'s Cluster) -> Load<'s> {
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(Mutex::new((BTreeMap::new(), Vec::new(), Vec::new())));
        let vip: SocketAddr = "100.66.0.10:80".parse().unwrap();
        let a1 = &cluster.pod("a1").netns;
        let (s, out) = (stop.clone(), answers.clone());
        let calls = scope.spawn(move || {
            let started = Instant::now();
            for _ in 0..5_000 {
                if s.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(60) {
                    break;
                }
                let result = greet(a1, vip);
                let mut out = out.lock().unwrap();
                match result {
                    Ok((local, greeting)) => {
                        *out.0.entry(greeting).or_default() += 1;
                        out.2.push(local);
                    }
                    Err(err) => out.1.push(format!("{err:#}")),
                }
                drop(out);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let a2 = SocketAddr::from((cluster.pod("a2").ip, 9000));
        let (s, out) = (stop.clone(), answers.clone());
        let session = scope.spawn(move || {
            let mut session = match Session::open(a1, a2) {
                Ok(session) => session,
                Err(err) => return out.lock().unwrap().1.push(format!("session: {err:#}")),
            };
            let started = Instant::now();
            for _ in 0..5_000 {
                if s.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(60) {
                    break;
                }
                if let Err(err) = session.roundtrip() {
                    return out.lock().unwrap().1.push(format!("session: {err:#}"));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            *out.lock().unwrap().0.entry("session".into()).or_default() += 1;
        });
        Load {
            stop,
            threads: vec![calls, session],
            answers,
        }
    }

    fn answered(&self, pod: &str) -> usize {
        let answers = self.answers.lock().unwrap();
        answers
            .0
            .get(&format!("hello from {pod}"))
            .copied()
            .unwrap_or(0)
    }

    fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().unwrap();
        }
        let answers = self.answers.lock().unwrap();
        answers.clone()
    }
}

fn generation(cluster: &Cluster) -> u64 {
    cluster.metric("node-a", "mesh_config_generation").unwrap()
}

fn endpoints(cluster: &Cluster) -> Vec<String> {
    let state = cluster.debug_state("node-a").unwrap();
    let services = state["services"].as_array().cloned().unwrap_or_default();
    let web = services
        .iter()
        .find(|s| s["vip"] == "100.66.0.10:80")
        .expect("the web Service in /debug/state");
    let mut out: Vec<String> = web["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e.as_str().map(str::to_string))
        .collect();
    out.sort();
    out
}

#[test]
fn config_edits_apply_within_a_second_under_traffic_and_invalid_edits_change_nothing() {
    require_root!();
    let mut cluster = Cluster::new(&initial()).unwrap();
    cluster.start_mesh_everywhere().unwrap();
    let _servers: Vec<Server> = ["a2", "b1"]
        .into_iter()
        .map(|pod| {
            let netns = &cluster.pod(pod).netns;
            Server::start(netns, WEB_PORT, Behaviour::Greet(pod.into())).unwrap()
        })
        .collect();
    let _echo = Server::start(&cluster.pod("a2").netns, 9000, Behaviour::Echo).unwrap();
    let _c3_echo = Server::start(&cluster.pod("a2").netns, 9001, Behaviour::Echo).unwrap();
    assert_eq!(endpoints(&cluster), ["100.65.0.3:8080"]);
    std::thread::scope(|scope| edits_under_load(scope, &cluster));
}

fn edits_under_load<'s, 'e>(scope: &'s std::thread::Scope<'s, 'e>, cluster: &'s Cluster) {
    let load = Load::start(scope, cluster);
    wait_until("steady traffic", || load.answered("a2") >= 20);

    // 1. A Service endpoint is added: b1 gets the label the Service selects.
    let before = generation(cluster);
    cluster.write_config(TWO_NODES).unwrap();
    let written = Instant::now();
    wait_until("the new endpoint in the state", || {
        endpoints(cluster) == ["100.65.0.3:8080", "100.65.1.2:8080"]
    });
    let endpoint_delay = written.elapsed();
    assert_eq!(generation(cluster), before + 1);
    wait_until("traffic reaching the new endpoint", || {
        load.answered("b1") >= 1
    });
    let traffic_delay = written.elapsed();
    wait_until("more traffic to the new endpoint", || {
        load.answered("b1") >= 5
    });

    // 2. A pod is enrolled: c3 (namespace `plain`) gets the ambient label.
    let enrolled = TWO_NODES.replace(
        "metadata: {name: c3, namespace: plain}",
        "metadata: {name: c3, namespace: plain, labels: {istio.io/dataplane-mode: ambient}}",
    );
    cluster.write_config(&enrolled).unwrap();
    let written = Instant::now();
    wait_until("c3 in the kernel's enrolled map", || {
        let (_, enrolled) = cluster.datapath_view("node-a").unwrap();
        enrolled.contains(&"100.65.0.5".to_string())
    });
    let enrol_delay = written.elapsed();
    let done = transfer(
        &cluster.pod("c3").netns,
        SocketAddr::from((cluster.pod("a2").ip, 9001)),
        1 << 16,
    )
    .unwrap();
    cluster
        .wait_connection("node-a", "c3's connection, now captured", |c| {
            c.client == done.local && c.direction == "outbound"
        })
        .unwrap();

    // 3. An invalid edit: rejected, counted, logged with the reason; nothing changes.
    let rejected = cluster
        .metric("node-a", "mesh_config_rejected_total")
        .unwrap();
    let generation_before = generation(cluster);
    cluster
        .write_config(&enrolled.replace(
            "ports: [{name: tcp-web, port: 80, targetPort: http}]",
            "ports: [{name: tcp-web, port: 80, targetPort: http, appProtocol: 7}]",
        ))
        .unwrap();
    wait_until("the rejection to be counted", || {
        cluster
            .metric("node-a", "mesh_config_rejected_total")
            .unwrap()
            > rejected
    });
    let log = cluster.mesh_log("node-a");
    assert!(
        log.contains("config update rejected")
            && log.contains("spec.ports[0].appProtocol: error: expected a string, found a number"),
        "the log names the problem:\n{log}"
    );
    assert_eq!(generation(cluster), generation_before);
    assert_eq!(endpoints(cluster), ["100.65.0.3:8080", "100.65.1.2:8080"]);
    let calls_before = load.answered("a2") + load.answered("b1");
    wait_until("traffic after the rejected edit", || {
        load.answered("a2") + load.answered("b1") >= calls_before + 10
    });

    let (answers, failures, clients) = load.finish();
    eprintln!(
        "endpoint in state after {endpoint_delay:?}, in traffic after {traffic_delay:?}; \
         enrolled after {enrol_delay:?}; answers {answers:?}"
    );
    assert!(failures.is_empty(), "failed connections: {failures:#?}");
    assert_eq!(
        answers.get("session"),
        Some(&1),
        "the open session kept going"
    );
    // Every call went through node-a's proxy: a capture gap while the kernel maps were
    // updated would show as a call kube-proxy's DNAT answered alone.
    let records = cluster.connections("node-a").unwrap();
    let vip: SocketAddr = "100.66.0.10:80".parse().unwrap();
    let missing: Vec<&SocketAddr> = clients
        .iter()
        .filter(|c| {
            !records
                .iter()
                .any(|r| r.client == **c && r.direction == "outbound" && r.original_dst == vip)
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} calls bypassed the proxy: {missing:?}",
        missing.len(),
        clients.len()
    );
    for (what, delay) in [
        ("endpoint", endpoint_delay),
        ("traffic to the new endpoint", traffic_delay),
        ("enrolment", enrol_delay),
    ] {
        assert!(
            delay < Duration::from_secs(1),
            "the {what} change took {delay:?}, more than a second"
        );
    }
}
