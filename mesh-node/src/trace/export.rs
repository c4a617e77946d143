//! Span export over OTLP (HTTP/protobuf to `<collector>/v1/traces`), off the request path:
//! a request hands its finished span to a bounded queue and never waits, nor wakes anyone; a
//! task per collector, on a thread of its own at a lower CPU priority ([`Runtime`]), wakes
//! at the first span, lets the queue fill for [`LINGER`] (or until a batch is queued), and
//! sends what it holds in `ExportTraceServiceRequest`s (the official OpenTelemetry protobuf
//! types) of up to [`BATCH`] spans. A full queue, or a collector that is down, slow or refusing, costs
//! spans, never requests: each lost span is counted in `mesh_trace_spans_dropped_total{reason}`.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue},
    resource::v1::Resource,
    trace::v1::{
        span::SpanKind, status::StatusCode, ResourceSpans, ScopeSpans, Span as Proto, Status,
    },
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use prost::Message as _;
use tokio::sync::mpsc;

use super::context::SpanContext;

/// Spans waiting for export, at most (beyond: dropped and counted).
pub const QUEUE: usize = 8192;
/// Spans per export request, at most.
pub const BATCH: usize = 512;
/// How long the first span of a batch waits for company (while it waits, the requests'
/// spans go onto the queue without waking the exporter).
pub const LINGER: Duration = Duration::from_millis(500);
/// How often a failing collector is warned about, at most.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// The export thread's nice value: below the proxy's workers, which preempt it.
const NICE: i32 = 10;
/// How long one export request may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A span attribute's value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
}

/// Which side of a request a span records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The source side (the proxy as the client).
    Client,
    /// The destination side (the proxy as the server).
    Server,
}

/// A finished span.
#[derive(Clone, Debug)]
pub struct Span {
    /// Its place in the trace.
    pub context: SpanContext,
    /// Its name (Istio's: `<host>:<port>/*`).
    pub name: String,
    /// Client or server.
    pub kind: Kind,
    /// When the request started.
    pub start: SystemTime,
    /// When its response ended.
    pub end: SystemTime,
    /// Attributes, Istio's names.
    pub attributes: Vec<(&'static str, Value)>,
    /// Custom tags of the Telemetry in force.
    pub tags: Vec<(String, String)>,
    /// The request failed (a 5xx, or no response).
    pub error: bool,
    /// The `service.name` of its resource (the workload's canonical service).
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    /// `queue_full`, `export_failed`, `unknown_provider`.
    reason: &'static str,
}

/// Export metrics.
#[derive(Clone, Default)]
pub struct ExportMetrics {
    exported: Counter,
    dropped: Family<DropLabels, Counter>,
}

impl ExportMetrics {
    /// Registers `mesh_trace_spans_exported_total` and `mesh_trace_spans_dropped_total`.
    pub fn register(registry: &mut Registry) -> ExportMetrics {
        let metrics = ExportMetrics::default();
        registry.register(
            "mesh_trace_spans_exported",
            "Spans a collector accepted",
            metrics.exported.clone(),
        );
        registry.register(
            "mesh_trace_spans_dropped",
            "Spans lost, by reason (queue_full: the collector cannot keep up; export_failed: \
             the collector refused, failed or did not answer in time; unknown_provider: a \
             Telemetry names a provider no --tracing-provider defines)",
            metrics.dropped.clone(),
        );
        metrics
    }

    /// Spans exported so far.
    pub fn exported(&self) -> u64 {
        self.exported.get()
    }

    /// Spans dropped so far for `reason`.
    pub fn dropped(&self, reason: &'static str) -> u64 {
        self.dropped.get_or_create(&DropLabels { reason }).get()
    }

    /// Counts `spans` lost for `reason`.
    pub(crate) fn lost(&self, reason: &'static str, spans: usize) {
        self.dropped
            .get_or_create(&DropLabels { reason })
            .inc_by(spans as u64);
    }
}

/// The `trace-export` thread: a single-threaded tokio runtime at nice [`NICE`] that encodes
/// and sends every collector's spans, so that neither takes a turn from the proxy's workers.
pub struct Runtime(tokio::runtime::Handle);

impl Runtime {
    /// Starts the thread.
    pub fn start() -> std::io::Result<Runtime> {
        // The runtime is built and dropped on its own thread (a tokio runtime must not be
        // dropped on another runtime's worker, where this is called).
        let (built, handle) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("trace-export".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        let _ = built.send(Err(err));
                        return;
                    }
                };
                let _ = built.send(Ok(runtime.handle().clone()));
                // Failing leaves the thread at the workers' priority.
                if let Err(err) = crate::sys::set_thread_nice(NICE) {
                    tracing::debug!("trace-export: nice {NICE} not set: {err}");
                }
                runtime.block_on(std::future::pending::<()>());
            })?;
        let handle = handle
            .recv()
            .map_err(|_| std::io::Error::other("the trace-export thread ended at start"))??;
        Ok(Runtime(handle))
    }
}

/// The queue to one collector.
#[derive(Clone)]
pub struct Exporter {
    queue: mpsc::Sender<Span>,
    metrics: ExportMetrics,
}

impl Exporter {
    /// Starts exporting to `endpoint` (`http://host:port/v1/traces`) on `runtime`.
    pub fn start(endpoint: http::Uri, metrics: ExportMetrics, runtime: &Runtime) -> Exporter {
        let (queue, spans) = mpsc::channel(QUEUE);
        runtime.0.spawn(export(endpoint, spans, metrics.clone()));
        Exporter { queue, metrics }
    }

    /// Hands `span` to the exporter; never waits (a full queue drops it, counted).
    pub fn send(&self, span: Span) {
        if self.queue.try_send(span).is_err() {
            self.metrics.lost("queue_full", 1);
        }
    }
}

/// One collector's exporter: waits for a span (the only wake-up a request causes), sleeps up
/// to [`LINGER`] (a sleeping receiver is not woken by sends: a request's span costs a push),
/// then sends what the queue holds, [`BATCH`] spans at a time, one request after another.
async fn export(endpoint: http::Uri, mut spans: mpsc::Receiver<Span>, metrics: ExportMetrics) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut warned = None;
    while let Some(first) = spans.recv().await {
        batch.push(first);
        // The wait ends early once a batch is queued (checked every LINGER / 10: a timer,
        // still no wake-up per span), so a busy node's queue does not fill meanwhile.
        let deadline = tokio::time::Instant::now() + LINGER;
        while spans.len() + batch.len() < BATCH && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(LINGER / 10).await;
        }
        loop {
            while batch.len() < BATCH {
                match spans.try_recv() {
                    Ok(span) => batch.push(span),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                break;
            }
            let full = batch.len() == BATCH;
            send(&endpoint, std::mem::take(&mut batch), &metrics, &mut warned).await;
            if !full {
                break;
            }
        }
    }
}

/// Sends `batch` to `endpoint`, counting its spans exported or lost; a failure is logged at
/// warning level at most every [`WARN_EVERY`] (`warned`: when it last was), at debug level
/// otherwise.
async fn send(
    endpoint: &http::Uri,
    batch: Vec<Span>,
    metrics: &ExportMetrics,
    warned: &mut Option<Instant>,
) {
    let count = batch.len();
    let failure = match tokio::time::timeout(TIMEOUT, post(endpoint, batch)).await {
        Ok(Ok(())) => {
            metrics.exported.inc_by(count as u64);
            return;
        }
        Ok(Err(err)) => err,
        Err(_) => format!("no answer within {}s", TIMEOUT.as_secs()),
    };
    metrics.lost("export_failed", count);
    if warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
        *warned = Some(Instant::now());
        tracing::warn!(
            %endpoint,
            count,
            "span export failed: {failure}; the spans are dropped \
             (mesh_trace_spans_dropped_total{{reason=\"export_failed\"}}; next warning in {}s at the soonest)",
            WARN_EVERY.as_secs()
        );
    } else {
        tracing::debug!(%endpoint, count, "span export failed: {failure}");
    }
}

/// Posts `batch` to `endpoint`, encoded once the collector answers the connection (a
/// collector that is down costs no encoding).
async fn post(endpoint: &http::Uri, batch: Vec<Span>) -> Result<(), String> {
    let authority = endpoint
        .authority()
        .ok_or_else(|| format!("{endpoint} has no host"))?
        .clone();
    let port = authority.port_u16().unwrap_or(80);
    let tcp = tokio::net::TcpStream::connect((authority.host(), port))
        .await
        .map_err(|e| e.to_string())?;
    let body = encode(batch).encode_to_vec();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = http::Request::post(endpoint.path())
        .header(http::header::HOST, authority.as_str())
        .header(http::header::CONTENT_TYPE, "application/x-protobuf")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("the collector answered {}", response.status()))
    }
}

fn nanos(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn key_value(key: impl Into<String>, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
    }
}

/// The OTLP request for `spans`: one resource per service, one scope (the mesh).
pub fn encode(spans: Vec<Span>) -> ExportTraceServiceRequest {
    let mut by_service: BTreeMap<String, Vec<Proto>> = BTreeMap::new();
    for span in spans {
        let context = &span.context;
        let mut attributes = Vec::with_capacity(span.attributes.len() + span.tags.len());
        attributes.extend(span.attributes.into_iter().map(|(k, v)| {
            key_value(
                k,
                match v {
                    Value::Str(s) => any_value::Value::StringValue(s),
                    Value::Int(i) => any_value::Value::IntValue(i),
                },
            )
        }));
        attributes.extend(
            span.tags
                .into_iter()
                .map(|(k, v)| key_value(k, any_value::Value::StringValue(v))),
        );
        let proto = Proto {
            trace_id: context.trace_id.to_vec(),
            span_id: context.span_id.to_vec(),
            parent_span_id: context.parent.map(|p| p.to_vec()).unwrap_or_default(),
            trace_state: context
                .tracestate
                .as_ref()
                .and_then(|s| s.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            name: span.name,
            kind: match span.kind {
                Kind::Client => SpanKind::Client,
                Kind::Server => SpanKind::Server,
            } as i32,
            start_time_unix_nano: nanos(span.start),
            end_time_unix_nano: nanos(span.end),
            attributes,
            status: Some(Status {
                message: String::new(),
                code: if span.error {
                    StatusCode::Error
                } else {
                    StatusCode::Unset
                } as i32,
            }),
            // Whether the parent is remote is known (0x100); it is (0x200) whenever there is
            // one: every parent comes in the request's headers, from another process (or,
            // for a pod of this node, from this proxy's client side, as two proxies would).
            flags: 0x100
                | if context.parent.is_some() { 0x200 } else { 0 }
                | u32::from(context.sampled),
            ..Default::default()
        };
        by_service.entry(span.service).or_default().push(proto);
    }
    ExportTraceServiceRequest {
        resource_spans: by_service
            .into_iter()
            .map(|(service, spans)| ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![key_value(
                        "service.name",
                        any_value::Value::StringValue(service),
                    )],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "mesh-node".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(service: &str, kind: Kind) -> Span {
        Span {
            context: SpanContext::start(None, 100.0, 0.0),
            name: "web.shop.svc.cluster.local:80/*".into(),
            kind,
            start: SystemTime::now(),
            end: SystemTime::now() + Duration::from_millis(3),
            attributes: vec![
                ("http.method", Value::Str("GET".into())),
                ("http.status_code", Value::Int(200)),
            ],
            tags: vec![("cluster".into(), "east".into())],
            error: false,
            service: service.into(),
        }
    }

    /// A collector on loopback that decodes what it gets with the protobuf types and
    /// answers `status`.
    async fn collector(
        status: u16,
    ) -> (
        http::Uri,
        mpsc::UnboundedReceiver<ExportTraceServiceRequest>,
    ) {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: http::Uri = format!("http://{}/v1/traces", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let (got, received) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let got = got.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let got = got.clone();
                            async move {
                                assert_eq!(req.uri().path(), "/v1/traces");
                                assert_eq!(
                                    req.headers()[http::header::CONTENT_TYPE],
                                    "application/x-protobuf"
                                );
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                got.send(ExportTraceServiceRequest::decode(body).unwrap())
                                    .unwrap();
                                let mut response = http::Response::new(Full::new(Bytes::new()));
                                *response.status_mut() =
                                    http::StatusCode::from_u16(status).unwrap();
                                Ok::<_, std::convert::Infallible>(response)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        (uri, received)
    }

    #[tokio::test]
    async fn spans_are_batched_per_service_and_failures_are_counted() {
        let (uri, mut received) = collector(200).await;
        let metrics = ExportMetrics::default();
        let runtime = Runtime::start().unwrap();
        let exporter = Exporter::start(uri, metrics.clone(), &runtime);
        let client = span("api", Kind::Client);
        let server = Span {
            context: client.context.child(),
            ..span("web", Kind::Server)
        };
        exporter.send(client.clone());
        exporter.send(server);
        let request = received.recv().await.unwrap();
        assert_eq!(request.resource_spans.len(), 2, "one resource per service");
        let spans: Vec<&Proto> = request
            .resource_spans
            .iter()
            .flat_map(|r| r.scope_spans.iter().flat_map(|s| &s.spans))
            .collect();
        assert_eq!(spans.len(), 2);
        let (c, s) = (
            spans
                .iter()
                .find(|s| s.kind == SpanKind::Client as i32)
                .unwrap(),
            spans
                .iter()
                .find(|s| s.kind == SpanKind::Server as i32)
                .unwrap(),
        );
        assert_eq!(c.trace_id, s.trace_id);
        assert_eq!(s.parent_span_id, c.span_id);
        assert_eq!(c.trace_id, client.context.trace_id.to_vec());
        assert!(c.attributes.iter().any(|a| a.key == "cluster"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(metrics.exported.get(), 2);

        // A refusing collector, and one that is not there: spans dropped, counted.
        let (refusing, mut received) = collector(503).await;
        let exporter = Exporter::start(refusing, metrics.clone(), &runtime);
        exporter.send(span("api", Kind::Client));
        received.recv().await.unwrap();
        let gone: http::Uri = "http://127.0.0.1:1/v1/traces".parse().unwrap();
        let exporter_gone = Exporter::start(gone, metrics.clone(), &runtime);
        exporter_gone.send(span("api", Kind::Client));
        let failed = || {
            metrics
                .dropped
                .get_or_create(&DropLabels {
                    reason: "export_failed",
                })
                .get()
        };
        for _ in 0..100 {
            if failed() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(failed(), 2);
    }

    #[tokio::test]
    async fn a_full_queue_drops_without_waiting() {
        // Nothing drains this queue: the exporter task is never given a runtime turn while
        // the test fills it.
        let (queue, _spans) = mpsc::channel(QUEUE);
        let metrics = ExportMetrics::default();
        let exporter = Exporter {
            queue,
            metrics: metrics.clone(),
        };
        let started = std::time::Instant::now();
        for _ in 0..QUEUE + 10 {
            exporter.send(span("api", Kind::Client));
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(
            metrics
                .dropped
                .get_or_create(&DropLabels {
                    reason: "queue_full"
                })
                .get(),
            10
        );
    }
}
