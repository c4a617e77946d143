//! Distributed tracing (issue 24, in progress): what the proxy's span exporter sends is read
//! by a real OTLP receiver built on the official `opentelemetry-proto` package; a collector
//! that refuses costs spans, counted, never a wait.

use std::time::{Duration, Instant, SystemTime};

use mesh_node::trace::{
    context::{extract, SpanContext},
    export::{ExportMetrics, Exporter, Kind, Span, Value},
};
use mesh_tests::otlp::{Behaviour, Receiver};

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
    runtime.block_on(async {
        let exporter = Exporter::start(receiver.url().parse().unwrap(), metrics.clone());
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
        let exporter = Exporter::start(refusing.url().parse().unwrap(), metrics.clone());
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
