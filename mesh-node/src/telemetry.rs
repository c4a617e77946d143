//! Istio's standard TCP metrics (`istio_tcp_*`) with Istio's labels, and the JSON access log.
//!
//! A connection is reported by the proxy on the source side (`reporter="source"`) and by the
//! one on the destination side (`reporter="destination"`); a same-node connection has both
//! ends in this proxy, which reports both. Byte counters grow while data flows (long
//! connections show up before they end); `istio_tcp_sent_bytes` counts bytes sent to the
//! client (the response direction) and `istio_tcp_received_bytes` bytes received from it, as
//! Istio defines them.

use crate::response_flag::ResponseFlag;
use std::io::Write;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::{Family, MetricConstructor},
        histogram::Histogram,
    },
    registry::Registry,
};

use crate::{
    connections::ConnectionRecord,
    state::{ServiceTarget, Workload},
};

/// Istio's standard labels for TCP metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    reporter: &'static str,
    source_workload: String,
    source_workload_namespace: String,
    source_principal: String,
    source_app: String,
    source_version: String,
    source_canonical_service: String,
    source_canonical_revision: String,
    source_cluster: &'static str,
    destination_workload: String,
    destination_workload_namespace: String,
    destination_principal: String,
    destination_app: String,
    destination_version: String,
    destination_service: String,
    destination_service_name: String,
    destination_service_namespace: String,
    destination_canonical_service: String,
    destination_canonical_revision: String,
    destination_cluster: &'static str,
    request_protocol: &'static str,
    response_flags: &'static str,
    connection_security_policy: &'static str,
}

const UNKNOWN: &str = "unknown";
/// Istio's cluster name when none is configured.
const CLUSTER: &str = "Kubernetes";

/// One end of a connection as the labels describe it.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    workload: String,
    namespace: String,
    principal: String,
    app: String,
    version: String,
    canonical_service: String,
    canonical_revision: String,
}

/// A workload's canonical service and revision, from the labels Istio reads them from (the
/// workload's name and `latest` without them).
pub fn canonical(workload: &Workload) -> (String, String) {
    let label = |keys: &[&str]| keys.iter().find_map(|k| workload.labels.get(*k)).cloned();
    (
        label(&[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ])
        .unwrap_or_else(|| workload_name(workload)),
        label(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ])
        .unwrap_or_else(|| "latest".into()),
    )
}

impl Peer {
    /// A workload of the mesh (or a known pod outside it). `principal` only when the peer
    /// authenticated (mTLS, or the same-node path that knows it in-process).
    pub fn of(workload: &Workload, authenticated: bool) -> Peer {
        let label = |keys: &[&str]| keys.iter().find_map(|k| workload.labels.get(*k)).cloned();
        let (canonical_service, canonical_revision) = canonical(workload);
        Peer {
            canonical_service,
            canonical_revision,
            app: label(&["app", "app.kubernetes.io/name"]).unwrap_or_else(|| UNKNOWN.into()),
            version: label(&["version", "app.kubernetes.io/version"])
                .unwrap_or_else(|| UNKNOWN.into()),
            principal: if authenticated {
                workload.identity.to_string()
            } else {
                UNKNOWN.into()
            },
            namespace: workload.namespace.clone(),
            workload: workload_name(workload),
        }
    }

    /// An address the mesh knows nothing about.
    pub fn unknown() -> Peer {
        Peer {
            workload: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            principal: UNKNOWN.into(),
            app: UNKNOWN.into(),
            version: UNKNOWN.into(),
            canonical_service: UNKNOWN.into(),
            canonical_revision: UNKNOWN.into(),
        }
    }

    /// Only the identity is known (an HBONE client whose pod this node does not know yet).
    pub fn identity(principal: &str) -> Peer {
        let namespace = principal
            .split_once("/ns/")
            .and_then(|(_, rest)| rest.split_once('/'))
            .map_or(UNKNOWN, |(ns, _)| ns);
        Peer {
            namespace: namespace.into(),
            principal: principal.into(),
            ..Peer::unknown()
        }
    }
}

/// The workload a pod belongs to, as Istio names it from the pod's controller, read here
/// from the labels each controller sets on its pods: a ReplicaSet's pod (`pod-template-hash`)
/// is named by its Deployment (the name without `-<hash>-<suffix>`); a Job's pod
/// (`batch.kubernetes.io/job-name`, `job-name`) by its Job, or by its CronJob when the Job's
/// name ends in the CronJob's `-<scheduled time>` (8 to 10 digits); a StatefulSet's pod
/// (`statefulset.kubernetes.io/pod-name`) by the name without `-<ordinal>`; a DaemonSet's
/// pod (`pod-template-generation`) by the name without its random suffix. A bare pod is
/// named by itself, as in Istio.
fn workload_name(workload: &Workload) -> String {
    let labels = &workload.labels;
    let name = workload.name.as_str();
    if let Some(hash) = labels.get("pod-template-hash") {
        if let Some((base, _)) = name.split_once(&format!("-{hash}-")) {
            return base.to_string();
        }
    }
    if let Some(job) = labels
        .get("batch.kubernetes.io/job-name")
        .or_else(|| labels.get("job-name"))
    {
        return match job.rsplit_once('-') {
            Some((cron, time))
                if (8..=10).contains(&time.len()) && time.bytes().all(|b| b.is_ascii_digit()) =>
            {
                cron.to_string()
            }
            _ => job.clone(),
        };
    }
    let strip = |suffix_ok: fn(&str) -> bool| {
        name.rsplit_once('-')
            .filter(|(base, suffix)| !base.is_empty() && suffix_ok(suffix))
            .map(|(base, _)| base.to_string())
    };
    if labels
        .get("statefulset.kubernetes.io/pod-name")
        .map(String::as_str)
        == Some(name)
    {
        if let Some(base) = strip(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())) {
            return base;
        }
    }
    if labels.contains_key("pod-template-generation") {
        if let Some(base) = strip(|s| s.len() == 5 && s.bytes().all(|b| b.is_ascii_alphanumeric()))
        {
            return base;
        }
    }
    name.to_string()
}

/// What the labels say about one connection.
#[derive(Clone, Debug)]
pub struct Report {
    /// `source` or `destination`.
    pub reporter: &'static str,
    /// Client.
    pub source: Peer,
    /// Server.
    pub destination: Peer,
    /// The Service, when the client dialled its VIP.
    pub service: Option<(String, String, String)>,
    /// Whether the connection was mutually authenticated.
    pub mtls: bool,
}

impl Report {
    /// The Service part of the labels.
    pub fn service(mut self, service: Option<&ServiceTarget>) -> Report {
        self.service = service.map(|s| (s.host.clone(), s.name.clone(), s.namespace.clone()));
        self
    }

    /// The labels of one HTTP request.
    pub fn request_labels(
        &self,
        protocol: &'static str,
        response_code: u16,
        grpc_status: Option<&str>,
        response_flags: ResponseFlag,
    ) -> RequestLabels {
        let tcp = self.labels(response_flags.code());
        RequestLabels {
            tcp: TcpLabels {
                request_protocol: protocol,
                ..tcp
            },
            response_code,
            grpc_response_status: grpc_status_label(grpc_status),
        }
    }

    fn labels(&self, response_flags: &'static str) -> TcpLabels {
        let (service, service_name, service_namespace) = self
            .service
            .clone()
            .unwrap_or_else(|| (UNKNOWN.into(), UNKNOWN.into(), UNKNOWN.into()));
        let s = &self.source;
        let d = &self.destination;
        TcpLabels {
            reporter: self.reporter,
            source_workload: s.workload.clone(),
            source_workload_namespace: s.namespace.clone(),
            source_principal: s.principal.clone(),
            source_app: s.app.clone(),
            source_version: s.version.clone(),
            source_canonical_service: s.canonical_service.clone(),
            source_canonical_revision: s.canonical_revision.clone(),
            source_cluster: CLUSTER,
            destination_workload: d.workload.clone(),
            destination_workload_namespace: d.namespace.clone(),
            destination_principal: d.principal.clone(),
            destination_app: d.app.clone(),
            destination_version: d.version.clone(),
            destination_service: service,
            destination_service_name: service_name,
            destination_service_namespace: service_namespace,
            destination_canonical_service: d.canonical_service.clone(),
            destination_canonical_revision: d.canonical_revision.clone(),
            destination_cluster: CLUSTER,
            request_protocol: "tcp",
            response_flags,
            connection_security_policy: if self.mtls { "mutual_tls" } else { "none" },
        }
    }
}

/// The gRPC status codes (0 `OK` to 16 `UNAUTHENTICATED`) as label values.
const GRPC_CODES: [&str; 17] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
];

/// `grpc_response_status`: the numeric gRPC code, empty without a `grpc-status`, and
/// `unknown` for any other value, so a backend cannot make a series per value it sends.
fn grpc_status_label(status: Option<&str>) -> &'static str {
    match status {
        None => "",
        Some(status) => status
            .trim()
            .parse::<usize>()
            .ok()
            .and_then(|code| GRPC_CODES.get(code).copied())
            .unwrap_or(UNKNOWN),
    }
}

/// Series one `istio_*` metric family may hold. Label sets beyond it are counted in the
/// family's overflow series (every workload, service and principal label `overflow`), and
/// each time that happens in `mesh_metric_series_overflow_total{family}`.
pub const MAX_SERIES: usize = 5000;
const OVERFLOW: &str = "overflow";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FamilyLabels {
    family: &'static str,
}

/// Counts label sets sent to an overflow series, by family.
#[derive(Clone, Default)]
pub struct SeriesCap {
    overflowed: Family<FamilyLabels, Counter>,
    /// Series created per family (families only grow).
    created: Family<FamilyLabels, Counter>,
}

impl SeriesCap {
    /// Registers `mesh_metric_series_overflow_total`.
    pub fn register(registry: &mut Registry) -> SeriesCap {
        let cap = SeriesCap::default();
        registry.register(
            "mesh_metric_series_overflow",
            "Observations sent to a metric family's overflow series because the family \
             holds its most series",
            cap.overflowed.clone(),
        );
        cap
    }

    /// Applies `f` to the series of `family` for `labels`, or to its overflow series once
    /// the family holds [`MAX_SERIES`].
    fn series<L, M, C, R>(
        &self,
        name: &'static str,
        family: &Family<L, M, C>,
        labels: &L,
        overflow: impl FnOnce() -> L,
        f: impl FnOnce(&M) -> R,
    ) -> R
    where
        L: Clone + std::hash::Hash + Eq,
        C: MetricConstructor<M>,
    {
        if let Some(series) = family.get(labels) {
            return f(&series);
        }
        let key = FamilyLabels { family: name };
        let created = self.created.get_or_create(&key);
        if created.get() >= MAX_SERIES as u64 {
            self.overflowed.get_or_create(&key).inc();
            return f(&family.get_or_create(&overflow()));
        }
        // Two callers racing on one new label set count it twice: the cap errs low.
        created.inc();
        drop(created);
        f(&family.get_or_create(labels))
    }
}

impl TcpLabels {
    /// The overflow series' labels: what says who is involved replaced by `overflow`.
    fn overflow(&self) -> TcpLabels {
        let o = || OVERFLOW.to_string();
        TcpLabels {
            reporter: self.reporter,
            source_workload: o(),
            source_workload_namespace: o(),
            source_principal: o(),
            source_app: o(),
            source_version: o(),
            source_canonical_service: o(),
            source_canonical_revision: o(),
            source_cluster: self.source_cluster,
            destination_workload: o(),
            destination_workload_namespace: o(),
            destination_principal: o(),
            destination_app: o(),
            destination_version: o(),
            destination_service: o(),
            destination_service_name: o(),
            destination_service_namespace: o(),
            destination_canonical_service: o(),
            destination_canonical_revision: o(),
            destination_cluster: self.destination_cluster,
            request_protocol: self.request_protocol,
            response_flags: self.response_flags,
            connection_security_policy: self.connection_security_policy,
        }
    }
}

impl RequestLabels {
    fn overflow(&self) -> RequestLabels {
        RequestLabels {
            tcp: self.tcp.overflow(),
            ..self.clone()
        }
    }
}

/// The `istio_tcp_*` counters.
#[derive(Clone, Default)]
pub struct TcpMetrics {
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    cap: SeriesCap,
}

impl TcpMetrics {
    /// Registers the four counters (prometheus-client appends `_total`).
    pub fn register(registry: &mut Registry, cap: SeriesCap) -> Self {
        let metrics = Self {
            cap,
            ..Self::default()
        };
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            metrics.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            metrics.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the client (response direction) of TCP connections",
            metrics.sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client (request direction) of TCP connections",
            metrics.received.clone(),
        );
        metrics
    }

    /// A connection opened: counts it and returns the byte counters to feed while it runs.
    pub fn open(&self, reports: Vec<Report>) -> Live {
        let mut live = Live {
            metrics: Some(self.clone()),
            reports,
            received: Vec::new(),
            sent: Vec::new(),
        };
        for report in &live.reports {
            let labels = report.labels(ResponseFlag::None.code());
            let series = |name, family: &Family<TcpLabels, Counter>| {
                self.cap
                    .series(name, family, &labels, || labels.overflow(), Counter::clone)
            };
            series("istio_tcp_connections_opened", &self.opened).inc();
            live.received
                .push(series("istio_tcp_received_bytes", &self.received));
            live.sent.push(series("istio_tcp_sent_bytes", &self.sent));
        }
        live
    }
}

/// The metrics of one open connection.
pub struct Live {
    metrics: Option<TcpMetrics>,
    reports: Vec<Report>,
    received: Vec<Counter>,
    sent: Vec<Counter>,
}

impl Live {
    /// No reports: a connection the metrics do not count.
    pub fn none() -> Live {
        Live {
            metrics: None,
            reports: Vec::new(),
            received: Vec::new(),
            sent: Vec::new(),
        }
    }

    /// Bytes from the client to the server.
    pub fn client_bytes(&self, n: u64) {
        self.received.iter().for_each(|c| {
            c.inc_by(n);
        });
    }

    /// Bytes from the server to the client.
    pub fn server_bytes(&self, n: u64) {
        self.sent.iter().for_each(|c| {
            c.inc_by(n);
        });
    }

    /// The connection ended with `flag` (empty when fine).
    pub fn close(self, flag: ResponseFlag) {
        let Some(metrics) = &self.metrics else { return };
        let flags = flag.code();
        for report in &self.reports {
            let labels = report.labels(flags);
            let closed = &metrics.closed;
            let overflow = || labels.overflow();
            metrics.cap.series(
                "istio_tcp_connections_closed",
                closed,
                &labels,
                overflow,
                |c| c.inc(),
            );
        }
    }
}

/// Istio's standard labels for request metrics: the TCP ones plus the response's.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    tcp: TcpLabels,
    response_code: u16,
    grpc_response_status: &'static str,
}

/// Istio's default buckets of `istio_request_duration_milliseconds`.
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Buckets of the size histograms (Istio's: powers of ten up to 10^9 bytes).
const SIZE_BUCKETS: [f64; 10] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

type Histograms = Family<RequestLabels, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

fn size_histogram() -> Histogram {
    Histogram::new(SIZE_BUCKETS)
}

/// `istio_requests_total` and the three request histograms.
#[derive(Clone)]
pub struct RequestMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: Histograms,
    request_bytes: Histograms,
    response_bytes: Histograms,
    cap: SeriesCap,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        RequestMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            request_bytes: Family::new_with_constructor(size_histogram),
            response_bytes: Family::new_with_constructor(size_histogram),
            cap: SeriesCap::default(),
        }
    }
}

/// One finished request as the metrics see it.
#[derive(Clone, Copy, Debug)]
pub struct RequestOutcome<'a> {
    /// `http` or `grpc`.
    pub protocol: &'static str,
    /// Response status sent to the client.
    pub code: u16,
    /// `grpc-status` of a gRPC response.
    pub grpc_status: Option<&'a str>,
    /// Istio response flags, `-` when none.
    pub flags: ResponseFlag,
    /// Time from the request to the end of the response.
    pub duration: std::time::Duration,
    /// Request body bytes.
    pub request_bytes: u64,
    /// Response body bytes.
    pub response_bytes: u64,
}

impl RequestMetrics {
    /// Registers the request metrics (prometheus-client appends `_total` to the counter).
    pub fn register(registry: &mut Registry, cap: SeriesCap) -> Self {
        let metrics = Self {
            cap,
            ..Self::default()
        };
        registry.register(
            "istio_requests",
            "HTTP and gRPC requests",
            metrics.requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Time from the request to the end of the response",
            metrics.duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body sizes",
            metrics.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body sizes",
            metrics.response_bytes.clone(),
        );
        metrics
    }

    /// Records one request for each report.
    pub fn record(&self, reports: &[Report], outcome: &RequestOutcome<'_>) {
        for report in reports {
            let labels = report.request_labels(
                outcome.protocol,
                outcome.code,
                outcome.grpc_status,
                outcome.flags,
            );
            let overflow = || labels.overflow();
            let cap = &self.cap;
            let ms = outcome.duration.as_secs_f64() * 1000.0;
            cap.series("istio_requests", &self.requests, &labels, overflow, |c| {
                c.inc()
            });
            let histograms = [
                ("istio_request_duration_milliseconds", &self.duration, ms),
                (
                    "istio_request_bytes",
                    &self.request_bytes,
                    outcome.request_bytes as f64,
                ),
                (
                    "istio_response_bytes",
                    &self.response_bytes,
                    outcome.response_bytes as f64,
                ),
            ];
            for (name, family, value) in histograms {
                cap.series(name, family, &labels, overflow, |h| h.observe(value));
            }
        }
    }
}

/// Bytes of lines waiting for the access-log writer; beyond this, lines are dropped and
/// counted rather than stalling the proxy on a slow standard output.
const ACCESS_LOG_BACKLOG: usize = 4 << 20;
/// How often the writer takes the waiting lines. Lines are batched rather than handed over
/// one by one: waking a thread per request would cost more CPU than the request itself
/// (docs/benchmarks.md).
const ACCESS_LOG_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

struct AccessLog {
    lines: std::sync::Mutex<Vec<u8>>,
    /// Held from taking a batch until it is written, so batches reach stdout in order.
    writing: std::sync::Mutex<()>,
    dropped: Counter,
    /// Of the dropped lines, those of denials (a security record lost).
    dropped_denials: Counter,
}

/// At most one warning about dropped access-log lines per this period.
const DROPPED_WARNING_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

static ACCESS_LOG: std::sync::OnceLock<AccessLog> = std::sync::OnceLock::new();

/// Starts the `access-log` thread that writes the lines to standard output every 50 ms, and
/// registers `mesh_access_log_dropped_total`. Until it runs, lines are written directly.
pub fn start_access_log(registry: &mut Registry) -> std::io::Result<()> {
    let dropped = Counter::default();
    registry.register(
        "mesh_access_log_dropped",
        "Access-log lines dropped because standard output did not keep up",
        dropped.clone(),
    );
    let dropped_denials = Counter::default();
    registry.register(
        "mesh_access_log_dropped_denials",
        "Access-log lines of denied connections and requests dropped because standard \
         output did not keep up",
        dropped_denials.clone(),
    );
    let log = ACCESS_LOG.get_or_init(|| AccessLog {
        lines: std::sync::Mutex::new(Vec::new()),
        writing: std::sync::Mutex::new(()),
        dropped,
        dropped_denials,
    });
    std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || {
            let mut batch = Vec::new();
            let mut warned = (std::time::Instant::now(), 0, 0);
            loop {
                std::thread::sleep(ACCESS_LOG_EVERY);
                let (dropped, denials) = (log.dropped.get(), log.dropped_denials.get());
                if dropped > warned.1 && warned.0.elapsed() >= DROPPED_WARNING_EVERY {
                    tracing::warn!(
                        "access log: {} lines dropped, {} of them denials, in the last {}s: \
                         standard output does not keep up (mesh_access_log_dropped_total)",
                        dropped - warned.1,
                        denials - warned.2,
                        warned.0.elapsed().as_secs()
                    );
                    warned = (std::time::Instant::now(), dropped, denials);
                }
                let _writing = log.writing.lock().unwrap_or_else(|e| e.into_inner());
                std::mem::swap(
                    &mut batch,
                    &mut log.lines.lock().unwrap_or_else(|e| e.into_inner()),
                );
                if !batch.is_empty() {
                    let _ = std::io::stdout().lock().write_all(&batch);
                    batch.clear();
                    // Keep the buffer for reuse, but not a burst's worth of it.
                    batch.shrink_to(64 << 10);
                }
            }
        })?;
    Ok(())
}

/// Writes the lines still waiting (at shutdown, after the runtime stopped).
pub fn flush_access_log() {
    if let Some(log) = ACCESS_LOG.get() {
        let _writing = log.writing.lock().unwrap_or_else(|e| e.into_inner());
        let batch = std::mem::take(&mut *log.lines.lock().unwrap_or_else(|e| e.into_inner()));
        let _ = std::io::stdout().lock().write_all(&batch);
    }
}

/// One JSON line per finished connection on standard output (logs go to standard error), so
/// a log collector can take them apart.
pub fn access_log(record: &ConnectionRecord) {
    access_log_line(record, record.flag == ResponseFlag::Denied);
}

/// Writes any serializable record as one access-log line; `denied`: the record of a denial.
pub fn access_log_line(record: &impl serde::Serialize, denied: bool) {
    let Some(log) = ACCESS_LOG.get() else {
        match serde_json::to_vec(record) {
            Ok(mut line) => {
                line.push(b'\n');
                let _ = std::io::stdout().lock().write_all(&line);
            }
            Err(err) => tracing::warn!("access log: {err}"),
        }
        return;
    };
    // Serialized outside the lock; only the copy into the batch holds it.
    let mut line = match serde_json::to_vec(record) {
        Ok(line) => line,
        Err(err) => {
            tracing::warn!("access log: {err}");
            return;
        }
    };
    line.push(b'\n');
    let mut lines = log.lines.lock().unwrap_or_else(|e| e.into_inner());
    if lines.len() >= ACCESS_LOG_BACKLOG {
        drop(lines);
        log.dropped.inc();
        if denied {
            log.dropped_denials.inc();
        }
        return;
    }
    lines.extend_from_slice(&line);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(namespace: &str, name: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            namespace: namespace.into(),
            name: name.into(),
            node: None,
            ip: [100, 64, 0, 9].into(),
            service_account: "web".into(),
            identity: crate::config::semantics::Identity::parse(&format!(
                "spiffe://cluster.local/ns/{namespace}/sa/web"
            ))
            .unwrap(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            enrolled: true,
            ready: true,
            mtls: Default::default(),
            authorization: vec![],
            tracing: None,
        }
    }

    #[test]
    fn workload_names_and_canonical_labels() {
        let mut w = workload(
            "shop",
            "web-7d4b9c8f6-x2x9q",
            &[
                ("app", "web"),
                ("version", "v2"),
                ("pod-template-hash", "7d4b9c8f6"),
            ],
        );
        let peer = Peer::of(&w, true);
        assert_eq!(peer.workload, "web");
        assert_eq!((peer.app.as_str(), peer.version.as_str()), ("web", "v2"));
        assert_eq!(peer.canonical_service, "web");
        assert_eq!(peer.canonical_revision, "v2");
        assert_eq!(peer.principal, "spiffe://cluster.local/ns/shop/sa/web");
        w.labels.clear();
        let peer = Peer::of(&w, false);
        assert_eq!(peer.workload, "web-7d4b9c8f6-x2x9q");
        assert_eq!(peer.canonical_service, peer.workload);
        assert_eq!(
            (peer.principal.as_str(), peer.canonical_revision.as_str()),
            ("unknown", "latest")
        );
        assert_eq!(
            Peer::identity("spiffe://cluster.local/ns/ops/sa/x").namespace,
            "ops"
        );
    }

    #[test]
    fn controllers_name_the_workload_so_their_pods_share_series() {
        let pod = |name: &str, labels: &[(&str, &str)]| workload("ops", name, labels);
        for (name, labels, want) in [
            ("migrate-x7k2p", &[("job-name", "migrate")][..], "migrate"),
            (
                "backup-29301840-abcde",
                &[("batch.kubernetes.io/job-name", "backup-29301840")][..],
                "backup",
            ),
            (
                "db-2",
                &[("statefulset.kubernetes.io/pod-name", "db-2")][..],
                "db",
            ),
            (
                "agent-q8z4m",
                &[
                    ("pod-template-generation", "3"),
                    ("controller-revision-hash", "6c"),
                ][..],
                "agent",
            ),
            ("debug-shell", &[][..], "debug-shell"),
        ] {
            assert_eq!(workload_name(&pod(name, labels)), want, "{name}");
        }
    }

    #[test]
    fn grpc_status_is_a_code_or_unknown() {
        assert_eq!(grpc_status_label(None), "");
        assert_eq!(grpc_status_label(Some("0")), "0");
        assert_eq!(grpc_status_label(Some("16")), "16");
        assert_eq!(grpc_status_label(Some("17")), "unknown");
        assert_eq!(grpc_status_label(Some("x-secret-1234")), "unknown");
    }

    #[test]
    fn a_family_holds_at_most_max_series_then_overflows() {
        let cap = SeriesCap::default();
        let family: Family<FamilyLabels, Counter> = Family::default();
        let names: Vec<&'static str> = (0..MAX_SERIES + 50)
            .map(|i| &*Box::leak(format!("f{i}").into_boxed_str()))
            .collect();
        for name in &names {
            let labels = FamilyLabels { family: name };
            cap.series(
                "t",
                &family,
                &labels,
                || FamilyLabels { family: OVERFLOW },
                |c| c.inc(),
            );
        }
        let overflow = FamilyLabels { family: OVERFLOW };
        assert_eq!(family.get(&overflow).map(|c| c.get()), Some(50));
        assert!(family
            .get(&FamilyLabels {
                family: names[MAX_SERIES]
            })
            .is_none());
        let key = FamilyLabels { family: "t" };
        assert_eq!(cap.overflowed.get_or_create(&key).get(), 50);
        // Label sets seen before the cap keep their own series.
        cap.series(
            "t",
            &family,
            &FamilyLabels { family: names[0] },
            || overflow.clone(),
            |c| c.inc(),
        );
        assert_eq!(
            family
                .get(&FamilyLabels { family: names[0] })
                .map(|c| c.get()),
            Some(2)
        );
    }
}
