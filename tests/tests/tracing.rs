//! Distributed tracing: what the proxy's span exporter sends is read by a real OTLP receiver
//! built on the official `opentelemetry-proto` package; a collector that refuses costs spans,
//! counted, never a wait. End to end (root): a request through two hops (a client, an app
//! that forwards the trace headers, an app on the other node) is one trace of four spans with
//! the right parent links, in W3C and B3 alike; sampling follows the Telemetry resources.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant, SystemTime},
};

use mesh_node::trace::{
    context::{extract, SpanContext},
    export::{ExportMetrics, Exporter, Kind, Runtime, Span, Value},
};
use mesh_tests::{
    cluster::Cluster,
    fixtures::TWO_NODES,
    otlp::{Behaviour, Receiver},
    require_root,
    web::{curl_many, get, Mode, WebServer},
};
use serde_json::Value as Json;

fn span(context: SpanContext, kind: Kind, service: &str) -> Span {
    Span {
        context,
        name: "web.shop.svc.cluster.local:8080/*".into(),
        kind,
        start: SystemTime::now(),
        end: SystemTime::now() + Duration::from_millis(2),
        attributes: vec![
            ("http.method", Value::Str("GET".into())),
            ("http.status_code", Value::Int(200)),
        ],
        tags: vec![("cluster".into(), "east".into())],
        error: false,
        service: service.into(),
    }
}

fn wait_for(receiver: &Receiver, count: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let spans = receiver.spans();
        if spans.len() >= count || Instant::now() > deadline {
            return spans;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_real_otlp_receiver_decodes_the_exported_spans_with_their_links() {
    let dir = std::env::temp_dir().join(format!("mesh-otlp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let receiver =
        Receiver::start(None, "127.0.0.1:0".parse().unwrap(), &dir, Behaviour::OK).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // A request that came in with a W3C context: a client span (source side) and a server
    // span (destination side) in the caller's trace.
    let mut headers = http::HeaderMap::new();
    headers.insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap(),
    );
    let client = SpanContext::start(extract(&headers), 0.0, 50.0);
    let server = client.child();
    let metrics = ExportMetrics::default();
    let export = Runtime::start().unwrap();
    runtime.block_on(async {
        let exporter = Exporter::start(receiver.url().parse().unwrap(), metrics.clone(), &export);
        exporter.send(span(client.clone(), Kind::Client, "api"));
        exporter.send(span(server.clone(), Kind::Server, "web"));
        // The batch goes out after its linger time.
        tokio::time::sleep(Duration::from_millis(900)).await;
    });
    assert_eq!(metrics.exported(), 2);
    let spans = wait_for(&receiver, 2);
    assert_eq!(spans.len(), 2, "{spans:?}");
    let find = |kind: &str| spans.iter().find(|s| s["kind"] == kind).unwrap();
    let (c, s) = (find("SPAN_KIND_CLIENT"), find("SPAN_KIND_SERVER"));
    assert_eq!(c["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(s["trace_id"], c["trace_id"]);
    assert_eq!(c["parent_span_id"], "00f067aa0ba902b7", "the caller's span");
    assert_eq!(s["parent_span_id"], c["span_id"]);
    assert_eq!(c["span_id"], client.span_hex());
    assert_eq!(
        (c["service"].as_str(), s["service"].as_str()),
        (Some("api"), Some("web"))
    );
    assert_eq!(c["attributes"]["http.method"], "GET");
    assert_eq!(c["attributes"]["http.status_code"], 200);
    assert_eq!(c["attributes"]["cluster"], "east");
    assert_eq!(c["scope"], "mesh-node");
    assert!(c["end_ns"].as_u64() > c["start_ns"].as_u64());

    // A collector that refuses: the spans are dropped and counted, sending never waits.
    let refusing = Receiver::start(
        None,
        "127.0.0.1:0".parse().unwrap(),
        &dir,
        Behaviour {
            status: 503,
            delay: 0.0,
        },
    )
    .unwrap();
    runtime.block_on(async {
        let exporter = Exporter::start(refusing.url().parse().unwrap(), metrics.clone(), &export);
        let started = Instant::now();
        for _ in 0..100 {
            exporter.send(span(
                SpanContext::start(None, 100.0, 0.0),
                Kind::Client,
                "api",
            ));
        }
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "sending waited"
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
    });
    assert!(refusing.spans().is_empty());
    assert_eq!(metrics.dropped("export_failed"), 100);
    let _ = std::fs::remove_dir_all(&dir);
}

/// TWO_NODES with a2 as app `front` and b1 as app `back`, each behind an HTTP Service.
fn chain_fixture(extra: &str) -> String {
    let pods = TWO_NODES
        .replace(
            "metadata: {name: a2, namespace: mesh, labels: {app: web}}",
            "metadata: {name: a2, namespace: mesh, labels: {app: front}}",
        )
        .replace(
            "metadata: {name: b1, namespace: mesh, labels: {app: web}}",
            "metadata: {name: b1, namespace: mesh, labels: {app: back, version: v2}}",
        );
    format!(
        "{pods}{}{extra}",
        r#"
---
apiVersion: v1
kind: Service
metadata: {name: front, namespace: mesh}
spec:
  clusterIP: 100.66.0.21
  selector: {app: front}
  ports: [{name: http, port: 80, targetPort: 8081}]
---
apiVersion: v1
kind: Service
metadata: {name: back, namespace: mesh}
spec:
  clusterIP: 100.66.0.22
  selector: {app: back}
  ports: [{name: http, port: 80, targetPort: 8081}]
"#
    )
}

const FRONT: &str = "http://100.66.0.21/";
const BACK: &str = "http://100.66.0.22/";

/// A two-node cluster whose proxies export spans to a receiver on each node's loopback; the
/// app `front` (a2) answers each request by calling `back` (b1) with the trace headers.
struct Chain {
    cluster: Cluster,
    receivers: Vec<Receiver>,
    front: WebServer,
    back: WebServer,
}

impl Chain {
    fn start(extra: &str) -> Chain {
        let mut cluster = Cluster::new(&chain_fixture(extra)).unwrap();
        cluster.run_args = vec![
            "--tracing-provider".into(),
            "otel=http://127.0.0.1:4318".into(),
        ];
        let receivers = ["node-a", "node-b"]
            .iter()
            .map(|node| {
                let dir = cluster.dir().join(format!("otlp-{node}"));
                std::fs::create_dir_all(&dir).unwrap();
                Receiver::start(
                    Some(&cluster.node(node).netns),
                    "127.0.0.1:4318".parse().unwrap(),
                    &dir,
                    Behaviour::OK,
                )
                .unwrap()
            })
            .collect();
        cluster.start_mesh_everywhere().unwrap();
        let front = WebServer::start(&cluster.pod("a2").netns, 8081, "a2").unwrap();
        front.set(Mode {
            forward_to: Some(BACK.into()),
            ..Mode::default()
        });
        let back = WebServer::start(&cluster.pod("b1").netns, 8081, "b1").unwrap();
        Chain {
            cluster,
            receivers,
            front,
            back,
        }
    }

    /// Every span received from both nodes.
    fn spans(&self) -> Vec<Json> {
        self.receivers.iter().flat_map(Receiver::spans).collect()
    }

    /// Waits until `count` spans of `trace` arrived (and a moment for any more).
    fn trace(&self, trace: &str, count: usize) -> Vec<Json> {
        let of_trace = || -> Vec<Json> {
            self.spans()
                .into_iter()
                .filter(|s| s["trace_id"] == trace)
                .collect()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while of_trace().len() < count && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(700));
        of_trace()
    }
}

/// The span of `trace` of `kind` whose service is `service`.
fn find<'s>(spans: &'s [Json], kind: &str, service: &str) -> &'s Json {
    spans
        .iter()
        .find(|s| s["kind"] == kind && s["service"] == service)
        .unwrap_or_else(|| panic!("no {kind} span of {service} in {spans:#?}"))
}

/// The trace headers a pod's request carried, as a map.
fn headers_seen(server: &WebServer, index: usize) -> BTreeMap<String, String> {
    server.seen.trace_headers.lock().unwrap()[index]
        .iter()
        .cloned()
        .collect()
}

#[test]
fn a_request_through_two_hops_is_one_trace_of_four_spans() {
    require_root!();
    // Mesh-wide custom tags (a literal, a request header); a 0% sampling that the caller's
    // sampled flag overrides.
    let chain = Chain::start(
        r#"
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing:
  - providers: [{name: otel}]
    randomSamplingPercentage: 0
    customTags:
      cluster: {literal: {value: east}}
      user: {header: {name: x-user, defaultValue: nobody}}
"#,
    );
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    let (status, pod, _) = get(
        &chain.cluster.pod("a1").netns,
        FRONT,
        &[
            "-H",
            &format!("traceparent: 00-{trace}-{caller}-01"),
            "-H",
            "x-user: alice",
        ],
    )
    .unwrap();
    if status != 200 {
        let body = chain
            .cluster
            .pod("a1")
            .netns
            .exec("curl", &["-sS", FRONT])
            .unwrap_or_default();
        panic!(
            "{status} from {pod}: {body}\n{}",
            chain.cluster.mesh_log("node-a")
        );
    }
    assert_eq!(pod, "a2");
    assert_eq!(chain.back.requests(), 1);

    let spans = chain.trace(trace, 4);
    assert_eq!(spans.len(), 4, "{spans:#?}");
    // Hop 1: a1 -> front (a2, same node: node-a's proxy makes both spans).
    let client1 = find(&spans, "SPAN_KIND_CLIENT", "client.mesh");
    let server1 = find(&spans, "SPAN_KIND_SERVER", "front.mesh");
    // Hop 2: a2 -> back (b1, node-b: node-a makes the client span, node-b the server span).
    let client2 = find(&spans, "SPAN_KIND_CLIENT", "front.mesh");
    let server2 = find(&spans, "SPAN_KIND_SERVER", "back.mesh");
    assert_eq!(client1["parent_span_id"], caller, "the caller's span");
    assert_eq!(server1["parent_span_id"], client1["span_id"]);
    assert_eq!(client2["parent_span_id"], server1["span_id"]);
    assert_eq!(server2["parent_span_id"], client2["span_id"]);
    // Each app got the request with the span of its own node's server side as the parent.
    let parent_of = |headers: &BTreeMap<String, String>| {
        let traceparent = &headers["traceparent"];
        assert!(
            traceparent.starts_with(&format!("00-{trace}-")),
            "{traceparent}"
        );
        assert!(traceparent.ends_with("-01"), "{traceparent}");
        traceparent[36..52].to_string()
    };
    assert_eq!(
        parent_of(&headers_seen(&chain.front, 0)),
        server1["span_id"]
    );
    assert_eq!(parent_of(&headers_seen(&chain.back, 0)), server2["span_id"]);

    // Attributes as Istio's proxies set them.
    let attrs = |span: &Json, key: &str| span["attributes"][key].clone();
    for span in [client1, server1, client2, server2] {
        assert_eq!(attrs(span, "http.method"), "GET");
        assert_eq!(attrs(span, "http.status_code"), 200);
        assert_eq!(attrs(span, "response_flags"), "-");
        assert_eq!(attrs(span, "istio.namespace"), "mesh");
        assert_eq!(attrs(span, "http.protocol"), "HTTP/1.1");
        assert_eq!(attrs(span, "component"), "proxy");
        assert_eq!(attrs(span, "request_size"), 0);
        assert!(attrs(span, "guid:x-request-id").is_string(), "{span:#}");
        assert!(span["end_ns"].as_u64() >= span["start_ns"].as_u64());
    }
    assert_eq!(attrs(client1, "http.url"), "http://100.66.0.21/");
    assert_eq!(
        attrs(client1, "upstream_cluster"),
        "outbound|80||front.mesh.svc.cluster.local"
    );
    assert_eq!(attrs(client1, "peer.address"), "100.65.0.3:8081");
    assert_eq!(attrs(client1, "istio.canonical_service"), "client");
    assert_eq!(attrs(client1, "istio.peer.canonical_service"), "front");
    assert_eq!(client1["name"], "front.mesh.svc.cluster.local:80/*");
    assert_eq!(attrs(server1, "upstream_cluster"), "inbound|8081||");
    assert_eq!(attrs(server1, "istio.peer.canonical_service"), "client");
    assert_eq!(attrs(server2, "istio.canonical_service"), "back");
    assert_eq!(attrs(server2, "istio.canonical_revision"), "v2");
    assert_eq!(attrs(server2, "istio.peer.canonical_service"), "front");
    assert_eq!(attrs(server2, "istio.peer.namespace"), "mesh");
    assert_eq!(
        attrs(server2, "peer.address")
            .as_str()
            .map(|a| a.starts_with("100.65.0.3:")),
        Some(true)
    );
    assert!(
        attrs(client2, "response_size").as_i64() > Some(0),
        "{client2:#}"
    );
    // Custom tags: the literal everywhere; the header where the request carried it (the
    // front app forwards only the trace headers, so the second hop gets the default).
    for span in [client1, server1, client2, server2] {
        assert_eq!(attrs(span, "cluster"), "east", "{span:#}");
    }
    assert_eq!(attrs(client1, "user"), "alice");
    assert_eq!(attrs(server1, "user"), "alice");
    assert_eq!(attrs(client2, "user"), "nobody");
    // The request id is the one the first proxy made, all along the chain.
    let id = attrs(client1, "guid:x-request-id");
    assert!(spans
        .iter()
        .all(|s| s["attributes"]["guid:x-request-id"] == id));

    // The access-log lines carry the trace and each proxy's span.
    for (node, span) in [
        ("node-a", client1),
        ("node-a", client2),
        ("node-b", server2),
    ] {
        let log = chain.cluster.mesh_log(node);
        let line = format!(r#""trace_id":"{trace}","span_id":{}"#, span["span_id"]);
        assert!(
            log.contains(&line),
            "no access-log line with {line} on {node}: {log}"
        );
    }
}

#[test]
fn b3_in_multi_and_single_headers_comes_out_in_the_same_format_and_trace() {
    require_root!();
    let chain = Chain::start("");
    let a1 = &chain.cluster.pod("a1").netns;
    let trace = "80f198ee56343ba864fe8b2a57d3eff7";
    let caller = "e457b5a2e4d86bd1";

    // Multi-header B3.
    let (status, _, _) = get(
        a1,
        FRONT,
        &[
            "-H",
            &format!("x-b3-traceid: {trace}"),
            "-H",
            &format!("x-b3-spanid: {caller}"),
            "-H",
            "x-b3-sampled: 1",
        ],
    )
    .unwrap();
    assert_eq!(status, 200);
    let spans = chain.trace(trace, 4);
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let client1 = find(&spans, "SPAN_KIND_CLIENT", "client.mesh");
    let server1 = find(&spans, "SPAN_KIND_SERVER", "front.mesh");
    let server2 = find(&spans, "SPAN_KIND_SERVER", "back.mesh");
    assert_eq!(client1["parent_span_id"], caller);
    for (server, index, span) in [(&chain.front, 0, server1), (&chain.back, 0, server2)] {
        let seen = headers_seen(server, index);
        assert!(!seen.contains_key("traceparent"), "{seen:?}");
        assert!(!seen.contains_key("b3"), "{seen:?}");
        assert_eq!(seen["x-b3-traceid"], trace);
        assert_eq!(seen["x-b3-spanid"], span["span_id"].as_str().unwrap());
        assert_eq!(
            seen["x-b3-parentspanid"],
            span["parent_span_id"].as_str().unwrap()
        );
        assert_eq!(seen["x-b3-sampled"], "1");
    }

    // Single `b3`.
    let trace = "463ac35c9f6413ad48485a3953bb6124";
    let (status, _, _) = get(a1, FRONT, &["-H", &format!("b3: {trace}-{caller}-1")]).unwrap();
    assert_eq!(status, 200);
    let spans = chain.trace(trace, 4);
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let server1 = find(&spans, "SPAN_KIND_SERVER", "front.mesh");
    let server2 = find(&spans, "SPAN_KIND_SERVER", "back.mesh");
    for (server, span) in [(&chain.front, server1), (&chain.back, server2)] {
        let seen = headers_seen(server, 1);
        assert!(!seen.contains_key("traceparent") && !seen.contains_key("x-b3-traceid"));
        assert_eq!(
            seen["b3"],
            format!(
                "{trace}-{}-1-{}",
                span["span_id"].as_str().unwrap(),
                span["parent_span_id"].as_str().unwrap()
            )
        );
    }
}

/// A Telemetry sampling `percentage` to the `otel` provider, for the sampling test.
fn telemetry(namespace: &str, name: &str, selector: Option<&str>, percentage: u32) -> String {
    telemetry_tracing(
        namespace,
        name,
        selector,
        &format!("[{{providers: [{{name: otel}}], randomSamplingPercentage: {percentage}}}]"),
    )
}

/// A Telemetry with `tracing`, for the pods labelled `app: <selector>` (or all).
fn telemetry_tracing(namespace: &str, name: &str, selector: Option<&str>, tracing: &str) -> String {
    let selector = selector.map_or(String::new(), |app| {
        format!("\n  selector: {{matchLabels: {{app: {app}}}}}")
    });
    format!(
        r#"
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: {name}, namespace: {namespace}}}
spec:{selector}
  tracing: {tracing}
"#
    )
}

#[test]
fn sampling_follows_the_telemetry_resources_and_the_callers_decision() {
    require_root!();
    let chain = Chain::start(&telemetry("istio-system", "mesh-default", None, 0));
    let a1 = &chain.cluster.pod("a1").netns;
    // Traces started at a1 (its client spans) so far, and their server spans on node-b.
    // Requests traced so far: a1's client spans, each with its server span on node-b (the
    // client span is the server span's parent).
    let traced = |chain: &Chain| {
        std::thread::sleep(Duration::from_millis(1200));
        let spans = chain.spans();
        let of = |kind: &str, service: &str, link: &str| -> Vec<String> {
            let mut ids: Vec<String> = spans
                .iter()
                .filter(|s| s["kind"] == kind && s["service"] == service)
                .map(|s| format!("{}/{}", s["trace_id"], s[link]))
                .collect();
            ids.sort();
            ids
        };
        let clients = of("SPAN_KIND_CLIENT", "client.mesh", "span_id");
        let servers = of("SPAN_KIND_SERVER", "back.mesh", "parent_span_id");
        assert_eq!(clients, servers, "each traced request has both spans");
        clients.len()
    };
    let requests = |count: usize, extra: &[&str]| {
        let answers = curl_many(a1, BACK, count, extra).unwrap();
        assert!(answers.iter().all(|a| a.status == 200));
    };
    let generation = std::cell::Cell::new(
        chain.cluster.debug_state("node-a").unwrap()["generation"]
            .as_u64()
            .unwrap(),
    );
    let apply = |extra: String| {
        chain.cluster.write_config(&chain_fixture(&extra)).unwrap();
        generation.set(generation.get() + 1);
        chain.cluster.wait_generation(generation.get());
    };

    // 0%: nothing.
    requests(200, &[]);
    assert_eq!(traced(&chain), 0, "0% sampled something");
    // The caller's decision wins: sampled in, traced at 0%.
    requests(
        50,
        &[
            "-H",
            "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ],
    );
    assert_eq!(
        traced(&chain),
        50,
        "an incoming sampled flag was not honoured"
    );

    // 100%: every request; an incoming "not sampled" still wins.
    apply(telemetry("istio-system", "mesh-default", None, 100));
    let before = traced(&chain);
    requests(200, &[]);
    assert_eq!(traced(&chain) - before, 200);
    requests(
        50,
        &[
            "-H",
            "traceparent: 00-1af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
        ],
    );
    assert_eq!(
        traced(&chain) - before,
        200,
        "an incoming unsampled flag was not honoured"
    );

    // 10%: 10 +- 3% of 2,000.
    apply(telemetry("istio-system", "mesh-default", None, 10));
    let before = traced(&chain);
    requests(2000, &[]);
    let sampled = traced(&chain) - before;
    eprintln!("10%: {sampled} of 2000 requests traced");
    assert!((140..=260).contains(&sampled), "{sampled} of 2000 at 10%");

    // A namespace's Telemetry over the mesh's, a workload's over the namespace's.
    apply(format!(
        "{}{}",
        telemetry("istio-system", "mesh-default", None, 100),
        telemetry("mesh", "namespace", None, 0)
    ));
    let before = traced(&chain);
    requests(100, &[]);
    assert_eq!(
        traced(&chain) - before,
        0,
        "the namespace's 0% did not apply"
    );
    apply(format!(
        "{}{}{}",
        telemetry("istio-system", "mesh-default", None, 0),
        telemetry("mesh", "namespace", None, 0),
        telemetry("mesh", "clients", Some("client"), 100)
    ));
    requests(100, &[]);
    assert_eq!(
        traced(&chain) - before,
        100,
        "the workload's 100% did not override its namespace's 0%"
    );

    // disableSpanReporting on the destination's side: its spans go unreported, the context
    // (sampled) still reaches the app.
    apply(format!(
        "{}{}",
        telemetry("istio-system", "mesh-default", None, 100),
        telemetry_tracing(
            "mesh",
            "back-quiet",
            Some("back"),
            "[{disableSpanReporting: true}]"
        )
    ));
    std::thread::sleep(Duration::from_millis(1200));
    let count = |kind: &str, service: &str| {
        chain
            .spans()
            .iter()
            .filter(|s| s["kind"] == kind && s["service"] == service)
            .count()
    };
    let (clients, servers) = (
        count("SPAN_KIND_CLIENT", "client.mesh"),
        count("SPAN_KIND_SERVER", "back.mesh"),
    );
    let seen = chain.back.seen.trace_headers.lock().unwrap().len();
    requests(20, &[]);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(count("SPAN_KIND_CLIENT", "client.mesh"), clients + 20);
    assert_eq!(
        count("SPAN_KIND_SERVER", "back.mesh"),
        servers,
        "disableSpanReporting reported spans"
    );
    let last = headers_seen(&chain.back, seen + 19);
    assert!(last["traceparent"].ends_with("-01"), "{last:?}");

    // A provider no --tracing-provider defines, for a1's requests: its client spans are not
    // sent anywhere but counted, one warning names the provider and the Telemetry, and
    // /debug/state shows what a1 resolved; the destination (not selected) still reports.
    apply(format!(
        "{}{}",
        telemetry("istio-system", "mesh-default", None, 100),
        telemetry_tracing(
            "mesh",
            "to-zipkin",
            Some("client"),
            "[{providers: [{name: zipkin}]}]"
        )
    ));
    let state = chain.cluster.debug_state("node-a").unwrap();
    let a1_state = state["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "a1")
        .unwrap();
    assert_eq!(
        a1_state["tracing"]["client"]["provider"], "zipkin",
        "{a1_state}"
    );
    assert_eq!(
        a1_state["tracing"]["client"]["from"],
        serde_json::json!(["istio-system/mesh-default", "mesh/to-zipkin"]),
        "{a1_state}"
    );
    let unknown = || {
        chain
            .cluster
            .metric_sum(
                "node-a",
                "mesh_trace_spans_dropped_total",
                &[("reason", "unknown_provider")],
            )
            .unwrap()
    };
    let (clients, servers, dropped) = (
        count("SPAN_KIND_CLIENT", "client.mesh"),
        count("SPAN_KIND_SERVER", "back.mesh"),
        unknown(),
    );
    requests(20, &[]);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(count("SPAN_KIND_CLIENT", "client.mesh"), clients);
    assert_eq!(count("SPAN_KIND_SERVER", "back.mesh"), servers + 20);
    assert_eq!(unknown() - dropped, 20);
    // a1's side did no tracing and left the headers alone (as Istio, for a provider it does
    // not know): back's spans start their traces rather than name a parent never reported.
    let roots = chain
        .spans()
        .iter()
        .filter(|s| s["kind"] == "SPAN_KIND_SERVER" && s["service"] == "back.mesh")
        .skip(servers)
        .filter(|s| s["parent_span_id"] == "")
        .count();
    assert_eq!(roots, 20, "back's server spans name an unreported parent");
    let warning = one_log_line(&chain, "node-a", "no --tracing-provider defines");
    assert!(
        warning.contains("zipkin") && warning.contains("mesh/to-zipkin"),
        "{warning}"
    );
}

/// The one line of `node`'s mesh-node log that contains `needle` (panics unless there is
/// exactly one).
fn one_log_line(chain: &Chain, node: &str, needle: &str) -> String {
    let log = chain.cluster.mesh_log(node);
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(needle)).collect();
    assert_eq!(
        lines.len(),
        1,
        "one line with {needle:?} in {node}'s log: {lines:?}"
    );
    lines[0].to_string()
}

/// Fixed-rate load from a1 to `back` (the other node) for `seconds`; panics on any failure.
fn load(chain: &Chain, seconds: u64) -> u64 {
    let report = mesh_tests::load::mesh_load_in(
        chain.cluster.pod("a1").netns.name(),
        &[
            "http://100.66.0.22:80/",
            "--rate",
            "1000",
            "--connections",
            "4",
            "--seconds",
            &seconds.to_string(),
            "--body",
            "0",
        ],
    )
    .unwrap();
    let failed = report["errors"].as_u64().unwrap_or(1) + report["non_2xx"].as_u64().unwrap_or(1);
    let requests = report["requests"].as_u64().unwrap_or(0);
    assert_eq!(failed, 0, "{report}");
    assert!(requests >= 800 * seconds, "{report}");
    requests
}

#[test]
fn a_collector_that_is_down_or_slow_costs_spans_never_requests() {
    require_root!();
    let mut chain = Chain::start(&telemetry("istio-system", "mesh-default", None, 100));
    let dropped = |chain: &Chain, reason: &str| {
        chain
            .cluster
            .metric_sum(
                "node-a",
                "mesh_trace_spans_dropped_total",
                &[("reason", reason)],
            )
            .unwrap()
    };
    // Down: every export fails; the requests do not notice.
    chain.receivers.clear();
    let requests = load(&chain, 3);
    std::thread::sleep(Duration::from_millis(1500));
    let failed = dropped(&chain, "export_failed");
    assert_eq!(
        failed, requests,
        "each of node-a's client spans is counted lost"
    );
    // Said once in the log (many batches failed: at most one warning a minute), naming the
    // collector.
    let warning = one_log_line(&chain, "node-a", "span export failed");
    assert!(warning.contains("127.0.0.1:4318"), "{warning}");

    // Slow: each export waits for its timeout while the queue fills; what does not fit is
    // dropped and counted, and the requests do not notice.
    let dir = chain.cluster.dir().join("otlp-slow");
    std::fs::create_dir_all(&dir).unwrap();
    chain.receivers.push(
        Receiver::start(
            Some(&chain.cluster.node("node-a").netns),
            "127.0.0.1:4318".parse().unwrap(),
            &dir,
            Behaviour {
                status: 200,
                delay: 30.0,
            },
        )
        .unwrap(),
    );
    let requests = load(&chain, 12);
    let full = dropped(&chain, "queue_full");
    assert!(
        full > 0 && full < requests,
        "{full} of {requests} spans dropped for a full queue"
    );
}
