//! L7 in the node proxy end to end (root, two nodes, real HTTP servers, curl and wrk):
//! VirtualService routing (weights, headers, paths), blue/green under load, retries and
//! timeouts, outlier detection, connection-pool limits, the L7 AuthorizationPolicy, h2c,
//! gRPC and upgrades, error answers, and request metrics read by a real Prometheus.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::SocketAddr,
    time::{Duration, Instant},
};

use mesh_tests::{
    apps::{greet, Behaviour, Server},
    cluster::Cluster,
    fixtures::{
        BENCH, L7, L7_GRPC, L7_HTTP, WEB_APP_AUTHZ, WEB_APP_DR, WEB_APP_SUBSETS, WEB_APP_VS,
    },
    load::mesh_load_in,
    require_root,
    tools::Prometheus,
    wait_until,
    web::{curl, curl_many, curl_urls, wrk, wrk_with, Answer, Mode, WebServer},
};

const PORT: u16 = 8080;

/// The cluster with mesh-node on both nodes and a web server in every `web-*` pod.
fn start(extra: &str) -> (Cluster, BTreeMap<&'static str, WebServer>) {
    let mut cluster = Cluster::new(&format!("{L7}{extra}")).unwrap();
    cluster.start_mesh_everywhere().unwrap();
    let servers = ["web-1", "web-2", "web-3"]
        .into_iter()
        .map(|name| {
            let server = WebServer::start(&cluster.pod(name).netns, PORT, name).unwrap();
            (name, server)
        })
        .collect();
    (cluster, servers)
}

/// Replaces the config and waits until both nodes serve it.
fn reconfigure(cluster: &Cluster, generation: &mut u64, extra: &str) {
    cluster.write_config(&format!("{L7}{extra}")).unwrap();
    *generation += 1;
    cluster.wait_generation(*generation);
}

fn url(path: &str) -> String {
    format!("http://{L7_HTTP}{path}")
}

/// Answers by pod.
fn by_pod(answers: &[Answer]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for a in answers {
        assert_eq!(a.status, 200, "every request succeeds: {a:?}");
        *out.entry(a.pod.clone()).or_default() += 1;
    }
    out
}

fn share(counts: &BTreeMap<String, usize>, pods: &[&str], total: usize) -> f64 {
    let n: usize = pods
        .iter()
        .map(|p| counts.get(*p).copied().unwrap_or(0))
        .sum();
    n as f64 * 100.0 / total as f64
}

#[test]
fn weighted_splits_header_match_and_path_routing_follow_the_virtual_service() {
    require_root!();
    let (cluster, _servers) = start(&format!("{WEB_APP_DR}{WEB_APP_VS}"));
    let api = &cluster.pod("api").netns;

    // 90/10 over 2,000 requests (v1 = web-1 and web-2, v2 = web-3), within 3 points.
    let answers = curl_many(api, &url("/api/v1/items"), 2000, &[]).unwrap();
    let counts = by_pod(&answers);
    let v1 = share(&counts, &["web-1", "web-2"], 2000);
    assert!(
        (87.0..=93.0).contains(&v1),
        "90/10 split gave v1 {v1}%: {counts:?}"
    );
    // ROUND_ROBIN inside subset v1.
    let (w1, w2) = (counts["web-1"] as i64, counts["web-2"] as i64);
    assert!((w1 - w2).abs() <= 2, "round robin over v1: {counts:?}");

    // Every Chrome request goes to v2, whatever the path.
    let chrome = ["-A", "Mozilla/5.0 (X11) Chrome/120.0 Safari/537.36"];
    for path in ["/api/v1/items", "/", "/other"] {
        let answers = curl_many(api, &url(path), 100, &chrome).unwrap();
        assert_eq!(
            by_pod(&answers),
            BTreeMap::from([("web-3".into(), 100)]),
            "{path}"
        );
    }

    // A request no route matches: 404, flagged NR in the source's metrics.
    let (status, _, _) = curl(api, &[&url("/unrouted")]).unwrap();
    assert_eq!(status, 404);
    let nr = cluster
        .metric_sum(
            "node-a",
            "istio_requests_total",
            &[("response_code", "404"), ("response_flags", "NR")],
        )
        .unwrap();
    assert_eq!(nr, 1);

    // 95/5.
    let mut generation = 1;
    let ninety_five = WEB_APP_VS
        .replace("weight: 90", "weight: 95")
        .replace("weight: 10", "weight: 5");
    reconfigure(
        &cluster,
        &mut generation,
        &format!("{WEB_APP_DR}{ninety_five}"),
    );
    let answers = curl_many(api, &url("/api/v2"), 2000, &[]).unwrap();
    let counts = by_pod(&answers);
    let v1 = share(&counts, &["web-1", "web-2"], 2000);
    assert!(
        (92.0..=98.0).contains(&v1),
        "95/5 split gave v1 {v1}%: {counts:?}"
    );

    // Path routing: /admin -> admin (web-3), /api -> api (web-2), the rest -> web (web-1).
    let paths = r#"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web-app, namespace: default}
spec:
  hosts: [web-app.default.svc.cluster.local]
  http:
  - match: [{uri: {prefix: /admin}}]
    route: [{destination: {host: web-app, subset: admin}}]
  - match: [{uri: {prefix: /api}}]
    route: [{destination: {host: web-app, subset: api}}]
  - route: [{destination: {host: web-app, subset: web}}]
"#;
    reconfigure(&cluster, &mut generation, &format!("{WEB_APP_DR}{paths}"));
    for (path, pod) in [
        ("/admin/users", "web-3"),
        ("/api/v1", "web-2"),
        ("/", "web-1"),
        ("/static/app.js", "web-1"),
    ] {
        let answers = curl_many(api, &url(path), 20, &[]).unwrap();
        assert_eq!(
            by_pod(&answers),
            BTreeMap::from([(pod.into(), 20)]),
            "{path}"
        );
    }
}

#[test]
fn blue_green_switch_under_steady_load_fails_no_request() {
    require_root!();
    let blue_green = |blue: u32, green: u32| {
        format!(
            r#"{WEB_APP_DR}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web-app, namespace: default}}
spec:
  hosts: [web-app]
  http:
  - route:
    - {{destination: {{host: web-app, subset: v1}}, weight: {blue}}}
    - {{destination: {{host: web-app, subset: v2}}, weight: {green}}}
"#
        )
    };
    let (cluster, servers) = start(&blue_green(100, 0));
    let api = cluster.pod("api").netns.name().to_string();
    let load = std::thread::spawn(move || wrk(&api, &url("/"), 4, 6));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        servers["web-3"].requests(),
        0,
        "green gets nothing at 100/0"
    );
    assert!(servers["web-1"].requests() > 0);
    let mut generation = 1;
    reconfigure(&cluster, &mut generation, &blue_green(0, 100));
    std::thread::sleep(Duration::from_millis(200));
    let blue_after_switch = servers["web-1"].requests() + servers["web-2"].requests();
    let load = load.join().unwrap().unwrap();
    assert_eq!(load.non_2xx, 0, "{load:?}");
    assert_eq!(load.errors, 0, "{load:?}");
    assert!(load.requests > 500, "steady load: {load:?}");
    // Pooled connections closed after two requests each (maxRequestsPerConnection) are
    // not mistaken for a rapid-reset flood.
    for node in ["node-a", "node-b"] {
        let limited = cluster
            .metric_sum(node, "mesh_hbone_limited_total", &[])
            .unwrap();
        assert_eq!(limited, 0, "{node} cut off an HBONE connection");
    }
    let blue_end = servers["web-1"].requests() + servers["web-2"].requests();
    assert_eq!(
        blue_end, blue_after_switch,
        "blue got requests after the switch"
    );
    assert!(servers["web-3"].requests() > 100, "green took over");
}

#[test]
fn retries_hide_a_flaky_endpoint_and_timeouts_answer_on_time() {
    require_root!();
    let route = |retries: &str| {
        format!(
            r#"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web-app, namespace: default}}
spec:
  hosts: [web-app]
  http:
  - match: [{{uri: {{prefix: /slow-try}}}}]
    route: [{{destination: {{host: web-app}}}}]
    retries: {{attempts: 1, perTryTimeout: 400ms, retryOn: connect-failure}}
    timeout: 5s
  - match: [{{uri: {{prefix: /slow}}}}]
    route: [{{destination: {{host: web-app}}}}]
    retries: {{attempts: 0}}
    timeout: 1s
  - route: [{{destination: {{host: web-app}}}}]
    retries: {retries}
"#
        )
    };
    // Control: without retries, web-2 answering every other request with 503 shows.
    let (cluster, servers) = start(&route("{attempts: 0}"));
    let api = &cluster.pod("api").netns;
    servers["web-2"].set(Mode {
        fail_every: Some(2),
        ..Mode::default()
    });
    let answers = curl_many(api, &url("/"), 600, &[]).unwrap();
    let failed = answers.iter().filter(|a| a.status != 200).count();
    assert!(
        failed > 30,
        "the flaky endpoint shows without retries: {failed}/600"
    );

    // attempts: 3 -> at least 99.5% success over 2,000 requests.
    let mut generation = 1;
    reconfigure(&cluster, &mut generation, &route("{attempts: 3}"));
    let flaky_before = servers["web-2"].requests();
    let answers = curl_many(api, &url("/"), 2000, &[]).unwrap();
    let ok = answers.iter().filter(|a| a.status == 200).count();
    assert!(ok >= 1990, "{ok}/2000 succeeded with retries");
    assert!(
        servers["web-2"].requests() - flaky_before > 300,
        "the flaky endpoint kept taking requests"
    );
    let retried = cluster
        .metric_sum(
            "node-a",
            "istio_requests_total",
            &[("reporter", "destination"), ("response_code", "503")],
        )
        .unwrap_or(0)
        + cluster
            .metric_sum(
                "node-b",
                "istio_requests_total",
                &[("reporter", "destination"), ("response_code", "503")],
            )
            .unwrap();
    assert!(
        retried > 300,
        "the destination saw the 503s the client did not: {retried}"
    );

    // timeout: 1s against a 3 s answer -> 504 at 1 s +-10%.
    // Timed by curl itself: the start of `ip netns exec curl` is no part of the answer's
    // time (and a loaded machine stretches it).
    let timed = |path: &str| {
        let out = api
            .exec(
                "curl",
                &[
                    "-sS",
                    "--max-time",
                    "20",
                    "-w",
                    "\n%{http_code} %{time_total}",
                    &url(path),
                ],
            )
            .unwrap();
        let (body, last) = out.rsplit_once('\n').unwrap_or(("", &out));
        let (status, seconds) = last.trim().split_once(' ').unwrap();
        let took = Duration::from_secs_f64(seconds.parse().unwrap());
        (status.parse::<u16>().unwrap(), took, body.to_string())
    };
    let (status, took, body) = timed("/slow?delay_ms=3000");
    assert_eq!(status, 504, "{body}");
    assert!(
        (900..=1100).contains(&took.as_millis()),
        "route timeout answered after {took:?}"
    );
    // perTryTimeout 400ms (no retry on timeouts here) -> 504 at 400 ms +-10%.
    let (status, took, _) = timed("/slow-try?delay_ms=3000");
    assert_eq!(status, 504);
    assert!(
        (360..=440).contains(&took.as_millis()),
        "per-try timeout answered after {took:?}"
    );
    let ut = cluster
        .metric_sum(
            "node-a",
            "istio_requests_total",
            &[("reporter", "source"), ("response_flags", "UT")],
        )
        .unwrap();
    assert_eq!(ut, 2);
}

#[test]
fn outlier_detection_ejects_after_five_errors_for_the_base_time_within_the_cap() {
    require_root!();
    let config = r#"
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web-app, namespace: default}
spec:
  host: web-app
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection: {consecutive5xxErrors: 5, interval: 1s, baseEjectionTime: 3s, maxEjectionPercent: 50}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web-app, namespace: default}
spec:
  hosts: [web-app]
  http: [{route: [{destination: {host: web-app}}], retries: {attempts: 0}}]
"#;
    let (cluster, servers) = start(config);
    let api = &cluster.pod("api").netns;
    servers["web-2"].set(Mode {
        status: Some(500),
        ..Mode::default()
    });
    let started = Instant::now();
    let answers = curl_many(api, &url("/"), 60, &[]).unwrap();
    let ejected_at = Instant::now();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        servers["web-2"].requests(),
        5,
        "ejected after 5 errors in a row"
    );
    let failed = answers.iter().filter(|a| a.status == 500).count();
    assert_eq!(failed, 5);
    let state = cluster.debug_state("node-a").unwrap();
    let ejected: Vec<_> = state["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["ejected"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(ejected, [serde_json::json!("100.65.1.2:8080")]);
    // Still out until baseEjectionTime passed.
    let _ = curl_many(api, &url("/"), 20, &[]).unwrap();
    assert!(ejected_at.elapsed() < Duration::from_millis(2700));
    assert_eq!(servers["web-2"].requests(), 5);
    // Back after it.
    std::thread::sleep(Duration::from_millis(3200).saturating_sub(ejected_at.elapsed()));
    let _ = curl_many(api, &url("/"), 6, &[]).unwrap();
    assert!(
        servers["web-2"].requests() > 5,
        "returned after baseEjectionTime"
    );

    // maxEjectionPercent 50 of three endpoints: one may be out, never two.
    servers["web-3"].set(Mode {
        status: Some(500),
        ..Mode::default()
    });
    let failing_before = servers["web-2"].requests() + servers["web-3"].requests();
    let _ = curl_many(api, &url("/"), 90, &[]).unwrap();
    let failing_after = servers["web-2"].requests() + servers["web-3"].requests();
    assert!(
        failing_after - failing_before > 20,
        "one failing endpoint stays in: {} more requests",
        failing_after - failing_before
    );
    let state = cluster.debug_state("node-a").unwrap();
    let ejected: usize = state["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["ejected"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(ejected, 1, "{}", state["clusters"]);
}

#[test]
fn connection_pool_limits_overflow_with_503_uo_and_cap_backend_connections() {
    require_root!();
    let config = r#"
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web-app, namespace: default}
spec:
  host: web-app
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 2}
      http: {http1MaxPendingRequests: 1}
  subsets: [{name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web-app, namespace: default}
spec:
  hosts: [web-app]
  http: [{route: [{destination: {host: web-app, subset: v2}}], retries: {attempts: 0}}]
"#;
    let (cluster, servers) = start(config);
    // The backend's open connections, sampled while the load runs. When wrk stops, the
    // proxy drops the requests in flight and their upstream connections; the one request
    // still pending then gets a new connection while the destination side is still
    // closing a dropped one, so the backend's count may briefly show three at the very
    // end: the limit holds on the proxy's connections, the backend lags their teardown.
    let seen = servers["web-3"].seen.clone();
    let sampler = std::thread::spawn(move || {
        let started = Instant::now();
        let mut most = 0;
        while started.elapsed() < Duration::from_millis(2700) {
            if started.elapsed() > Duration::from_millis(300) {
                most = most.max(seen.open.load(std::sync::atomic::Ordering::Acquire));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        most
    });
    // Every client on node-a, ten connections, answers that take 200 ms.
    let load = wrk(
        cluster.pod("api").netns.name(),
        &url("/?delay_ms=200"),
        10,
        3,
    )
    .unwrap();
    let max_open = sampler.join().unwrap();
    assert!(load.non_2xx > 0, "overload overflows: {load:?}");
    assert!(load.requests > load.non_2xx, "some pass: {load:?}");
    assert!(
        (1..=2).contains(&max_open),
        "the backend saw {max_open} connections at once while loaded"
    );
    let uo = cluster
        .metric_sum(
            "node-a",
            "istio_requests_total",
            &[("response_code", "503"), ("response_flags", "UO")],
        )
        .unwrap();
    // wrk does not count the answers still in flight when it stops (at most one per
    // connection).
    assert!(
        (load.non_2xx..=load.non_2xx + 10).contains(&uo),
        "every overflow is a 503 UO: {uo} against {load:?}"
    );
}

#[test]
fn l7_authorization_policy_as_istio_documents_it() {
    require_root!();
    let (cluster, servers) = start(WEB_APP_AUTHZ);
    // web-1 is on the clients' node (same-node path), web-3 across (HBONE), and the VIP.
    for target in ["100.65.0.5:8080", "100.65.1.3:8080", L7_HTTP] {
        let call = |client: &str, method: &str, path: &str| {
            let ns = &cluster.pod(client).netns;
            let (status, _, body) = curl(
                ns,
                &[
                    "--path-as-is",
                    "-X",
                    method,
                    &format!("http://{target}{path}"),
                ],
            )
            .unwrap();
            (status, body)
        };
        let denied = (403, "RBAC: access denied".to_string());
        assert_eq!(call("api", "GET", "/api/v1/users").0, 200, "{target}");
        assert_eq!(call("api", "POST", "/api/v1/users"), denied, "{target}");
        assert_eq!(call("api", "GET", "/admin"), denied, "{target}");
        // Normalized before the policy sees it, as Istio's default does.
        assert_eq!(
            call("api", "GET", "/api/v1/../../admin"),
            denied,
            "{target}"
        );
        assert_eq!(
            call("api", "GET", "/api/v1/x/%2e%2e/users").0,
            200,
            "{target}"
        );
        assert_eq!(call("admin", "POST", "/admin").0, 200, "{target}");
        assert_eq!(call("admin", "DELETE", "/api/v1/users").0, 200, "{target}");
        assert_eq!(call("other", "GET", "/api/v1/users"), denied, "{target}");
    }
    // Denied requests never reached a server: 4 allowed per target, normalized.
    let served: u64 = servers.values().map(WebServer::requests).sum();
    assert_eq!(served, 12);
    let paths: Vec<String> = servers
        .values()
        .flat_map(|s| s.seen.log.lock().unwrap().clone())
        .map(|(path, _)| path)
        .collect();
    assert!(
        paths.iter().all(|p| !p.contains("..") && !p.contains('%')),
        "{paths:?}"
    );
}

/// `GET path` from pod `client` to `target`, the request line sent byte for byte (no client
/// library normalizes it); the answer's status.
fn raw_get(cluster: &Cluster, client: &str, target: &str, path: &str) -> u16 {
    let request = format!("GET {path} HTTP/1.1\r\nhost: {target}\r\nconnection: close\r\n\r\n");
    let target = target.to_string();
    let answer = cluster
        .pod(client)
        .netns
        .run(move || {
            let mut stream = std::net::TcpStream::connect(&target)?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(request.as_bytes())?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer)?;
            Ok(answer)
        })
        .unwrap();
    answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("{path}: no HTTP answer: {answer:?}"))
}

/// A DENY on `/admin` and `/admin/*`, and the paths many servers read as `/admin` or below
/// it: under the defaults (DECODE_AND_MERGE_SLASHES, ambiguous paths refused where policy
/// matches paths) each is denied (403) or refused (400) and never reaches the backend; under
/// Istio's default (BASE, nothing refused) every one of them gets through, which is what the
/// code did before the modes existed.
#[test]
fn path_variants_cannot_get_past_a_deny_on_admin() {
    require_root!();
    let deny = r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: default}
spec:
  selector: {matchLabels: {app: web-app}}
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin", "/admin/*"]}}]}]
"#;
    let variants = [
        ("//admin", 403),
        ("/admin%2Fx", 403),
        ("/%2Fadmin", 403),
        ("/admin%5Cx", 403),
        ("/admin;jsessionid=1", 400),
    ];
    let istio = [
        "--path-normalization",
        "BASE",
        "--reject-ambiguous-paths",
        "false",
    ];
    for run_args in [&[][..], &istio[..]] {
        let mut cluster = Cluster::new(&format!("{L7}{deny}")).unwrap();
        cluster.run_args = run_args.iter().map(|a| a.to_string()).collect();
        cluster.start_mesh_everywhere().unwrap();
        let servers: Vec<WebServer> = ["web-1", "web-2", "web-3"]
            .into_iter()
            .map(|name| WebServer::start(&cluster.pod(name).netns, PORT, name).unwrap())
            .collect();
        // web-1 on the client's node, web-3 across nodes (HBONE), and the Service VIP nine
        // times, so its balancing (least request among two picked at random) reaches every
        // endpoint, web-1 among them, whose policy the client's own proxy decides (each
        // variant misses web-1 nine times with odds of 3%).
        let mut targets = vec!["100.65.0.5:8080", "100.65.1.3:8080"];
        targets.extend([L7_HTTP; 9]);
        for target in targets.iter().copied() {
            assert_eq!(raw_get(&cluster, "api", target, "/public"), 200, "{target}");
            assert_eq!(raw_get(&cluster, "api", target, "/admin"), 403, "{target}");
            for (path, refused) in variants {
                let want = if run_args.is_empty() { refused } else { 200 };
                assert_eq!(
                    raw_get(&cluster, "api", target, path),
                    want,
                    "{path} to {target} with {run_args:?}"
                );
            }
        }
        let seen: Vec<String> = servers
            .iter()
            .flat_map(|s| s.seen.log.lock().unwrap().clone())
            .map(|(path, _)| path)
            .collect();
        let admin = seen.iter().filter(|p| p.contains("admin")).count();
        if run_args.is_empty() {
            assert_eq!(admin, 0, "no variant reached a backend: {seen:?}");
        } else {
            assert_eq!(admin, targets.len() * variants.len(), "{seen:?}");
        }
    }
}

#[test]
fn h2c_grpc_and_upgrades_are_routed_by_the_same_rules() {
    require_root!();
    let canary = format!(
        "{WEB_APP_SUBSETS}{}",
        r#"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web-app, namespace: default}
spec:
  hosts: [web-app]
  http:
  - match: [{headers: {x-canary: {exact: "yes"}}}]
    route: [{destination: {host: web-app, subset: v2}}]
  - route: [{destination: {host: web-app, subset: v1}}]
"#
    );
    let (cluster, servers) = start(&canary);
    let api = &cluster.pod("api").netns;
    // h2c with prior knowledge on the HTTP port, the requests multiplexed on one connection
    // (curl 7.88 cannot reuse a prior-knowledge connection for sequential requests).
    let h2c = [
        "--http2-prior-knowledge",
        "--parallel",
        "--parallel-immediate",
    ];
    let canary_h2 = curl_many(
        api,
        &url("/"),
        20,
        &[&h2c[..], &["-H", "x-canary: yes"]].concat(),
    )
    .unwrap();
    assert_eq!(by_pod(&canary_h2), BTreeMap::from([("web-3".into(), 20)]));
    let plain_h2 = by_pod(&curl_many(api, &url("/"), 20, &h2c).unwrap());
    assert!(!plain_h2.contains_key("web-3") && plain_h2.values().sum::<usize>() == 20);

    // gRPC (HTTP/2, application/grpc, trailers) on the grpc port.
    let frame = cluster.dir().join("grpc.bin");
    let mut message = vec![0u8, 0, 0, 0, 5];
    message.extend_from_slice(b"hello");
    std::fs::write(&frame, &message).unwrap();
    let grpc = |extra: &[&str]| {
        let mut args = vec![
            "--http2-prior-knowledge",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "--data-binary",
        ];
        let at = format!("@{}", frame.display());
        args.push(&at);
        args.extend_from_slice(extra);
        let target = format!("http://{L7_GRPC}/echo.Echo/Say");
        args.push(&target);
        curl(api, &args).unwrap()
    };
    let (status, headers, body) = grpc(&["-H", "x-canary: yes"]);
    assert_eq!(status, 200);
    assert!(headers.contains("x-pod: web-3"), "{headers}");
    assert!(
        format!("{headers}{body}").contains("grpc-status: 0"),
        "trailers pass: {headers}{body}"
    );
    assert!(body.contains("hello"));
    let (_, headers, _) = grpc(&[]);
    assert!(!headers.contains("x-pod: web-3"), "{headers}");
    let grpc_ok = cluster
        .metric_sum(
            "node-a",
            "istio_requests_total",
            &[
                ("reporter", "source"),
                ("request_protocol", "grpc"),
                ("grpc_response_status", "0"),
            ],
        )
        .unwrap();
    assert_eq!(grpc_ok, 2);
    let seen: Vec<String> = ["web-1", "web-2", "web-3"]
        .iter()
        .flat_map(|p| servers[p].seen.log.lock().unwrap().clone())
        .map(|(path, _)| path)
        .collect();
    assert!(seen.iter().any(|p| p == "/echo.Echo/Say"));

    // An upgrade (as WebSocket does) passes through: 101, then bytes both ways.
    let vip: SocketAddr = L7_HTTP.parse().unwrap();
    let echoed = api
        .run(move || {
            let mut s = std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET /ws HTTP/1.1\r\nHost: web-app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nx-canary: yes\r\n\r\n")?;
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut byte)?;
                head.push(byte[0]);
            }
            s.write_all(b"ping over the upgraded connection")?;
            let mut back = [0u8; 33];
            s.read_exact(&mut back)?;
            Ok((String::from_utf8_lossy(&head).to_string(), back.to_vec()))
        })
        .unwrap();
    assert!(echoed.0.starts_with("HTTP/1.1 101"), "{}", echoed.0);
    assert!(
        echoed.0.to_ascii_lowercase().contains("x-pod: web-3"),
        "{}",
        echoed.0
    );
    assert_eq!(echoed.1, b"ping over the upgraded connection");
}

#[test]
fn errors_users_can_act_on() {
    require_root!();
    let config = r#"
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web-app, namespace: default}
spec:
  host: web-app
  subsets: [{name: none, labels: {version: v9}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web-app, namespace: default}
spec:
  hosts: [web-app]
  http:
  - match: [{uri: {prefix: /empty}}]
    route: [{destination: {host: web-app, subset: none}}]
  - match: [{uri: {prefix: /missing}}]
    route: [{destination: {host: web-app, subset: v7}}]
  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, authority: web-app.default}
  - match: [{uri: {prefix: /teapot}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: web-app}}]
  - match: [{uri: {prefix: /mirrored}}]
    route: [{destination: {host: web-app}}]
    mirror: {host: web-app}
  - name: default-route
    route: [{destination: {host: web-app}}]
    headers: {response: {set: {x-routed: "yes"}}}
"#;
    let (cluster, servers) = start(config);
    let api = &cluster.pod("api").netns;
    let (status, _, body) = curl(api, &[&url("/empty")]).unwrap();
    assert_eq!((status, body.as_str()), (503, "no healthy upstream"));
    let (status, _, _) = curl(api, &[&url("/missing")]).unwrap();
    assert_eq!(status, 503);
    let (status, headers, _) = curl(api, &[&url("/old?x=1")]).unwrap();
    assert_eq!(status, 301);
    assert!(
        headers.contains("location: http://web-app.default/new?x=1"),
        "{headers}"
    );
    let (status, _, _) = curl(api, &[&url("/teapot")]).unwrap();
    assert_eq!(status, 418);
    let (status, headers, _) = curl(api, &[&url("/")]).unwrap();
    assert_eq!(status, 200);
    assert!(headers.contains("x-routed: yes"), "{headers}");
    // A malformed request gets 400, and the proxy keeps serving.
    let vip: SocketAddr = L7_HTTP.parse().unwrap();
    let answer = api
        .run(move || {
            let mut s = std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GARBAGE \x01\x02 NOT-HTTP\r\n\r\n")?;
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            Ok(out)
        })
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    let (status, _, _) = curl(api, &[&url("/")]).unwrap();
    assert_eq!(status, 200);

    // Two pipelined requests in one write: two answers, in order.
    let answer = api
        .run(move || {
            let mut s = std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET /first HTTP/1.1\r\nHost: web-app\r\n\r\nGET /second HTTP/1.1\r\nHost: web-app\r\nConnection: close\r\n\r\n")?;
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            Ok(out)
        })
        .unwrap();
    let first = answer.find("x-seen-path: /first").expect("first answered");
    let second = answer
        .find("x-seen-path: /second")
        .expect("second answered");
    assert!(first < second, "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "{answer}");

    // A mirrored request reaches a second endpoint with `-shadow` on its host.
    let (status, _, _) = curl(api, &[&url("/mirrored")]).unwrap();
    assert_eq!(status, 200);
    wait_until("the shadow request", || {
        servers.values().any(|s| {
            s.seen
                .log
                .lock()
                .unwrap()
                .iter()
                .any(|(path, host)| path == "/mirrored" && host == "100.66.0.30-shadow:8080")
        })
    });

    // One access-log line per request, with the route. Lines are written in batches every
    // 50 ms, so the line may not be out yet when the request has been answered.
    let find_line = || {
        cluster
            .mesh_log("node-a")
            .lines()
            .filter(|l| l.starts_with("{\"kind\":\"http\""))
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v["path"] == "/" && v["reporter"] == "source")
    };
    wait_until("an access-log line for GET /", || find_line().is_some());
    let line = find_line().unwrap();
    assert_eq!(line["route"], "default-route", "{line}");
    assert_eq!(line["response_code"], 200, "{line}");
    assert_eq!(
        line["destination_service"],
        "web-app.default.svc.cluster.local"
    );

    for (flag, want) in [("UH", 1), ("NC", 1), ("FI", 1)] {
        let got = cluster
            .metric_sum(
                "node-a",
                "istio_requests_total",
                &[("reporter", "source"), ("response_flags", flag)],
            )
            .unwrap();
        assert_eq!(got, want, "{flag}");
    }
}

#[test]
fn request_metrics_answer_istio_dashboard_queries_in_prometheus() {
    require_root!();
    let config = format!(
        "{WEB_APP_SUBSETS}{}",
        r#"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web-app, namespace: default}
spec:
  hosts: [web-app]
  http:
  - match: [{uri: {prefix: /fail}}]
    route: [{destination: {host: web-app, subset: v2}}]
    retries: {attempts: 0}
  - route: [{destination: {host: web-app, subset: v1}}]
"#
    );
    let (cluster, servers) = start(&config);
    servers["web-3"].set(Mode {
        status: Some(500),
        ..Mode::default()
    });
    let node_a = &cluster.node("node-a").netns;
    let node_b = cluster.node("node-b").underlay;
    let prometheus =
        Prometheus::start_scraping(node_a, &cluster.dir().join("prometheus"), &[node_b]).unwrap();
    let api = &cluster.pod("api").netns;
    // One of each first, so both series exist before the bulk (rate() counts increases
    // between samples, not a series' first value).
    assert_eq!(curl(api, &[&url("/ok")]).unwrap().0, 200);
    assert_eq!(curl(api, &[&url("/fail")]).unwrap().0, 500);
    std::thread::sleep(Duration::from_secs(3));
    // Then 248 more, one failing in five, interleaved so both series grow alike.
    let urls: Vec<String> = (0..248)
        .map(|i| match i % 5 {
            4 => url("/fail?delay_ms=30"),
            _ => url("/ok?delay_ms=30"),
        })
        .collect();
    let answers = curl_urls(api, &urls, &[]).unwrap();
    let failed = answers.iter().filter(|a| a.status == 500).count();
    assert_eq!(failed, 49);
    assert!(answers.iter().all(|a| a.status == 200 || a.status == 500));

    // Both proxies scraped; every request counted once per reporter.
    let total = "sum by (reporter) (istio_requests_total{destination_service=\"web-app.default.svc.cluster.local\"})";
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = prometheus.query(node_a, total).unwrap();
        let sums: BTreeMap<String, f64> = got
            .iter()
            .map(|(m, v)| (m["reporter"].as_str().unwrap_or("").to_string(), *v))
            .collect();
        if sums.get("source") == Some(&250.0) && sums.get("destination") == Some(&250.0) {
            break;
        }
        assert!(Instant::now() < deadline, "request totals: {sums:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let one = |promql: &str| {
        let got = prometheus.query(node_a, promql).unwrap();
        assert_eq!(got.len(), 1, "{promql}: {got:?}");
        got[0].1
    };
    let rate = one("sum(rate(istio_requests_total{reporter=\"destination\"}[5m]))");
    assert!(rate > 0.0, "rate {rate}");
    let error_rate = one(
        "sum(rate(istio_requests_total{reporter=\"destination\",response_code=~\"5..\"}[5m])) / sum(rate(istio_requests_total{reporter=\"destination\"}[5m]))",
    );
    assert!(
        (error_rate - 49.0 / 248.0).abs() < 0.03,
        "one in five failed: {error_rate}"
    );
    let p95 = one(
        "histogram_quantile(0.95, sum by (le) (rate(istio_request_duration_milliseconds_bucket{reporter=\"destination\"}[5m])))",
    );
    assert!(
        (25.0..=100.0).contains(&p95),
        "every answer takes 30+ ms: p95 {p95}"
    );
    // Istio's labels on a destination series from the other node.
    let series = prometheus
        .query(
            node_a,
            "istio_requests_total{reporter=\"destination\",response_code=\"500\"}",
        )
        .unwrap();
    assert_eq!(series.len(), 1, "{series:?}");
    let labels = &series[0].0;
    for (key, want) in [
        ("source_workload", "api"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/default/sa/api-service",
        ),
        ("destination_workload", "web-3"),
        ("destination_version", "v2"),
        ("destination_service_name", "web-app"),
        ("connection_security_policy", "mutual_tls"),
        ("request_protocol", "http"),
        ("response_flags", "-"),
    ] {
        assert_eq!(labels[key], want, "{key} in {labels}");
    }
}

#[test]
fn added_latency_of_l7_routing_over_l4_is_measured() {
    require_root!();
    // The issue's VirtualService (Chrome -> v2) and AuthorizationPolicy applied, plus rules
    // that let api-service use the Service's L4 port and POST (the fixed-rate load sends
    // 1 KiB bodies).
    let config = format!(
        "{WEB_APP_VS}{WEB_APP_AUTHZ}  - from: [{{source: {{principals: [\"cluster.local/ns/default/sa/api-service\"]}}}}]\n    to: [{{operation: {{ports: [\"7000\"]}}}}]\n  - from: [{{source: {{principals: [\"cluster.local/ns/default/sa/api-service\"]}}}}]\n    to: [{{operation: {{methods: [POST], paths: [\"/api/v1/*\"]}}}}]\n{}",
        WEB_APP_SUBSETS
    );
    let (cluster, _servers) = start(&config);
    // The same server on the Service's L4 port.
    let _raw = WebServer::start(&cluster.pod("web-3").netns, 7000, "web-3-raw").unwrap();
    let api = cluster.pod("api").netns.name();
    // One connection: each request waits for the previous answer, so the percentiles are
    // the unloaded round trip through each path, both to web-3 across nodes: L4 to its
    // address on the TCP port, L7 through the Service, routed to v2 by the header.
    let l4 = wrk(api, "http://100.65.1.3:7000/api/v1/x", 1, 3).unwrap();
    let l7 = wrk_with(api, &url("/api/v1/x"), 1, 3, &["User-Agent: Chrome"]).unwrap();
    for load in [&l4, &l7] {
        assert_eq!((load.errors, load.non_2xx), (0, 0), "{load:?}");
    }
    println!(
        "latency p50/p90/p99 us: L4 HBONE {:?}, L7 routed and authorized {:?}; added p50 {:.0} us, p99 {:.0} us",
        l4.latency_us,
        l7.latency_us,
        l7.latency_us[0] - l4.latency_us[0],
        l7.latency_us[2] - l4.latency_us[2]
    );
    // The same two paths at a fixed 1,000 requests/s of 1 KiB over 4 connections, latency
    // from the intended send time (mesh-load: no coordinated omission).
    let fixed = |url: &str, header: &[&str]| -> serde_json::Value {
        let headers: Vec<String> = header.iter().map(|h| format!("--header={h}")).collect();
        let args: Vec<&str> = [url, "--rate=1000", "--connections=4", "--seconds=3"]
            .into_iter()
            .chain(headers.iter().map(String::as_str))
            .collect();
        mesh_load_in(api, &args).unwrap()
    };
    let l4_fixed = fixed("http://100.65.1.3:7000/api/v1/x", &[]);
    let l7_fixed = fixed(&url("/api/v1/x"), &["User-Agent: Chrome"]);
    for report in [&l4_fixed, &l7_fixed] {
        assert_eq!(report["errors"], 0, "{report}");
        assert_eq!(report["non_2xx"], 0, "{report}");
        assert!(report["requests"].as_u64().unwrap() > 2500, "{report}");
    }
    println!(
        "fixed 1000 rps p50/p90/p99/p99.9/max us: L4 HBONE {}, L7 {}",
        l4_fixed["latency_us"], l7_fixed["latency_us"]
    );
}

#[test]
fn tcp_routes_split_connections_by_weight() {
    require_root!();
    let config = format!(
        "{WEB_APP_SUBSETS}{}",
        r#"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web-app-tcp, namespace: default}
spec:
  hosts: [web-app]
  tcp:
  - match: [{port: 7000}]
    route:
    - {destination: {host: web-app, subset: v1, port: {number: 7000}}, weight: 0}
    - {destination: {host: web-app, subset: v2, port: {number: 7000}}, weight: 100}
"#
    );
    let (cluster, _web) = start(&config);
    let _greeters: Vec<_> = ["web-1", "web-2", "web-3"]
        .iter()
        .map(|p| {
            Server::start(&cluster.pod(p).netns, 7000, Behaviour::Greet(p.to_string())).unwrap()
        })
        .collect();
    let vip: SocketAddr = "100.66.0.30:7000".parse().unwrap();
    for _ in 0..20 {
        let (_, answer) = greet(&cluster.pod("api").netns, vip).unwrap();
        assert_eq!(answer, "hello from web-3");
    }
}

/// Connections kube-proxy DNATed for a client before it was enrolled stay in the node's
/// conntrack table (TIME_WAIT, 2 minutes), and the proxy then connects to the pod as that
/// client, from ports the kernel picks. Without the mesh's conntrack bypass, some of the
/// proxy's 32 connections here collide with the ~35,000 earlier ones, the pod's reply never
/// reaches the proxy, and their requests wait 5 s for the connect timeout (seen: p99 4.8 s).
#[test]
fn connections_dnated_before_enrolment_do_not_stall_the_proxys_connections() {
    require_root!();
    let mut cluster = Cluster::new(BENCH).unwrap();
    let client = cluster.pod("client").netns.name().to_string();
    cluster
        .pod("client")
        .netns
        .allow_many_connections()
        .unwrap();
    let _server = WebServer::start(&cluster.pod("srv-same").netns, PORT, "srv-same").unwrap();
    let before = mesh_load_in(
        &client,
        &[
            "http://100.66.0.40:80/",
            "--mode=connect",
            "--connections=16",
            "--seconds=8",
        ],
    )
    .unwrap();
    assert!(before["count"].as_u64().unwrap() > 10_000, "{before}");
    cluster.start_mesh_everywhere().unwrap();
    let after = mesh_load_in(
        &client,
        &[
            "http://100.66.0.40:80/",
            "--rate=400",
            "--connections=32",
            "--seconds=2",
        ],
    )
    .unwrap();
    assert_eq!(
        (after["errors"].as_u64(), after["non_2xx"].as_u64()),
        (Some(0), Some(0)),
        "{after}"
    );
    let max_us = after["latency_us"][4].as_u64().unwrap();
    assert!(max_us < 2_000_000, "a request stalled {max_us} us: {after}");
}
