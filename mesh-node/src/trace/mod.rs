//! Distributed tracing: trace context in HTTP headers ([`context`]: W3C trace context and
//! B3, joined or started, the sampling decision), span export over OTLP ([`export`]: a
//! bounded queue, batches, drops counted), and what the L7 paths call ([`Tracer`]): one
//! client span on the source side and one server span on the destination side of each
//! request, sampled and sent as the workload's Telemetry says.
//!
//! Istio resolves a Telemetry's `providers` against MeshConfig `extensionProviders`; here the
//! providers are named on the command line (`--tracing-provider NAME=URL`, the first one is
//! the default provider) with the default sampling percentage (`--trace-sampling`).

pub mod context;
pub mod export;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    sync::{Arc, Mutex, PoisonError},
    time::SystemTime,
};

use http::HeaderMap;
use prometheus_client::registry::Registry;

use crate::{
    config::telemetry::{CustomTag, TracingConfig, TracingMode},
    state::Workload,
};

use self::{
    context::SpanContext,
    export::{ExportMetrics, Exporter, Kind, Span, Value},
};

/// One OTLP collector spans may go to (MeshConfig's `extensionProviders[].opentelemetry`).
#[derive(Clone, Debug, PartialEq)]
pub struct Provider {
    /// The name Telemetry resources use in `tracing[].providers`.
    pub name: String,
    /// `http://host:port/v1/traces`.
    pub endpoint: http::Uri,
}

/// The mesh's tracing settings (the stand-in for MeshConfig's tracing providers and
/// `defaultConfig.tracing.sampling`).
#[derive(Clone, Debug, PartialEq)]
pub struct TracingSettings {
    /// The collectors; the first is the default provider. None: tracing is off.
    pub providers: Vec<Provider>,
    /// Percentage of requests without a sampling decision that are traced, when no
    /// Telemetry sets `randomSamplingPercentage` (Istio's default: 1).
    pub sampling: f64,
}

impl TracingSettings {
    /// Parses `NAME=URL` (`http://host:port[/path]`; the path defaults to `/v1/traces`).
    pub fn provider(text: &str) -> Result<Provider, String> {
        let (name, url) = text
            .split_once('=')
            .ok_or_else(|| format!("{text:?} is not NAME=URL"))?;
        if name.is_empty() {
            return Err(format!("{text:?} has no provider name before ="));
        }
        let uri: http::Uri = url
            .parse()
            .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "{url:?}: only http:// collectors (OTLP HTTP/protobuf) are supported"
            ));
        }
        let authority = uri
            .authority()
            .filter(|a| !a.host().is_empty() && a.port_u16().is_some_and(|p| p > 0))
            .ok_or_else(|| format!("{url:?} has no host:port"))?
            .clone();
        let path = match uri.path() {
            "" | "/" => "/v1/traces",
            path => path,
        };
        let endpoint = http::Uri::builder()
            .scheme("http")
            .authority(authority)
            .path_and_query(path)
            .build()
            .map_err(|e| format!("{url:?}: {e}"))?;
        Ok(Provider {
            name: name.to_string(),
            endpoint,
        })
    }
}

impl fmt::Display for TracingSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.providers.is_empty() {
            return write!(f, "off");
        }
        let providers: Vec<String> = self
            .providers
            .iter()
            .map(|p| format!("{}={}", p.name, p.endpoint))
            .collect();
        write!(f, "{};sampling={}%", providers.join(","), self.sampling)
    }
}

/// A workload's tracing on each side, resolved from the Telemetry resources (for the pods
/// of this node only).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct WorkloadTracing {
    /// Its requests to others (the client span).
    pub client: TracingConfig,
    /// Requests to it (the server span).
    pub server: TracingConfig,
    /// How its spans name it.
    pub canonical: Canonical,
}

// Sampling percentages are checked to be within 0-100 (never NaN).
impl Eq for WorkloadTracing {}

impl WorkloadTracing {
    /// Resolves both sides for `workload` from `telemetries`.
    pub fn resolve(
        telemetries: &[crate::config::kinds::Telemetry],
        root_namespace: &str,
        workload: &Workload,
    ) -> WorkloadTracing {
        let side = |side| {
            crate::config::telemetry::tracing_for(
                telemetries,
                root_namespace,
                &workload.namespace,
                &workload.labels,
                side,
            )
        };
        WorkloadTracing {
            client: side(TracingMode::Client),
            server: side(TracingMode::Server),
            canonical: Canonical::of(workload),
        }
    }
}

/// Starts and reports the spans of requests: one exporter per provider.
pub struct Tracer {
    exporters: BTreeMap<String, Exporter>,
    default: String,
    sampling: f64,
    metrics: ExportMetrics,
    /// The unknown providers warned about, with the Telemetry resources naming them.
    warned: Mutex<BTreeSet<(String, Vec<String>)>>,
}

impl Tracer {
    /// The tracer of `settings` (starts the `trace-export` thread, one export task per
    /// provider on it); `None` when no provider is named: no request then pays for tracing,
    /// and trace headers pass through untouched. Registers the export metrics either way.
    pub fn start(
        settings: &TracingSettings,
        registry: &mut Registry,
    ) -> std::io::Result<Option<Tracer>> {
        let metrics = ExportMetrics::register(registry);
        let Some(default) = settings.providers.first().map(|p| p.name.clone()) else {
            return Ok(None);
        };
        let runtime = export::Runtime::start()?;
        let exporters = settings
            .providers
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    Exporter::start(p.endpoint.clone(), metrics.clone(), &runtime),
                )
            })
            .collect();
        Ok(Some(Tracer {
            exporters,
            default,
            sampling: settings.sampling,
            metrics,
            warned: Mutex::default(),
        }))
    }

    /// Warns, once per provider and naming Telemetry resources, that `provider` is not
    /// defined: its spans are dropped.
    fn warn_unknown(&self, provider: &str, config: &TracingConfig) {
        let key = (provider.to_string(), config.from.clone());
        let first = self
            .warned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key);
        if first {
            tracing::warn!(
                provider,
                telemetry = config.from.join(", "),
                defined = self
                    .exporters
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
                "a Telemetry sends spans to a tracing provider no --tracing-provider defines: \
                 they are dropped (mesh_trace_spans_dropped_total{{reason=\"unknown_provider\"}})"
            );
        }
    }

    /// The span of `own`'s side (`Kind::Client`: a request of `own`; `Kind::Server`: a
    /// request to it) of a request with `headers`: joined to the trace the headers carry or
    /// the root of a new one, sampled as the caller decided or by the Telemetry's percentage.
    /// `headers` then carry this span as the parent, in the format they came in. `None`
    /// when `own` is not a pod of this node in the mesh (its tracing is not resolved), or its
    /// side reports no spans (`disableSpanReporting`, a provider no flag defines): the
    /// headers are then left as they came.
    pub fn begin(
        &self,
        own: &Workload,
        kind: Kind,
        headers: &mut HeaderMap,
        port: u16,
    ) -> Option<Pending> {
        let tracing = own.tracing.as_ref()?;
        let config = match kind {
            Kind::Client => &tracing.client,
            Kind::Server => &tracing.server,
        };
        // As Istio: with span reporting disabled, or a provider that is not defined, this
        // side does no tracing and the trace headers pass through untouched (a span of ours
        // that is never reported must not become the parent of what follows).
        if config.disable_span_reporting {
            return None;
        }
        let provider = config.provider.as_deref().unwrap_or(&self.default);
        // Provider names match regardless of case, as Istio's.
        let exporter = self
            .exporters
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(provider))
            .map(|(_, exporter)| exporter);
        let percentage = config.sampling.unwrap_or(self.sampling);
        let context = SpanContext::start(
            context::extract(headers),
            percentage,
            fastrand::f64() * 100.0,
        );
        let Some(exporter) = exporter else {
            if context.sampled {
                self.metrics.lost("unknown_provider", 1);
                self.warn_unknown(provider, config);
            }
            return None;
        };
        context.inject(headers);
        let exporter = context.sampled.then(|| exporter.clone());
        let (tags, request_id) = match exporter {
            Some(_) => (
                custom_tags(&config.custom_tags, headers),
                headers
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
            ),
            None => (Vec::new(), None),
        };
        Some(Pending {
            context,
            kind,
            start: SystemTime::now(),
            exporter,
            tags,
            own: tracing.clone(),
            peer: None,
            port,
            request_id,
        })
    }
}

/// The custom tags' values for a request with `headers` (literals, request headers,
/// environment variables of the proxy).
fn custom_tags(tags: &BTreeMap<String, CustomTag>, headers: &HeaderMap) -> Vec<(String, String)> {
    tags.iter()
        .filter_map(|(name, tag)| {
            let value = match tag {
                CustomTag::Literal { value } => Some(value.clone()),
                CustomTag::Header {
                    name,
                    default_value,
                } => headers
                    .get(name.as_str())
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
                    .or_else(|| default_value.clone()),
                CustomTag::Environment {
                    name,
                    default_value,
                } => std::env::var(name).ok().or_else(|| default_value.clone()),
            }?;
            Some((name.clone(), value))
        })
        .collect()
}

/// A workload's canonical service and namespace, as spans name the ends of a request.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Canonical {
    /// `service.istio.io/canonical-name` (or `app.kubernetes.io/name`, `app`, the workload).
    pub service: String,
    /// `service.istio.io/canonical-revision` (or the version labels, `latest`).
    pub revision: String,
    /// The namespace.
    pub namespace: String,
}

impl Canonical {
    /// Of `workload`.
    pub fn of(workload: &Workload) -> Canonical {
        let (service, revision) = crate::telemetry::canonical(workload);
        Canonical {
            service,
            revision,
            namespace: workload.namespace.clone(),
        }
    }
}

/// What a finished request tells its span (from its access-log record).
pub struct Outcome<'a> {
    /// The request's method.
    pub method: &'a str,
    /// `http://<authority><path>`.
    pub url: String,
    /// `HTTP/1.1`, `HTTP/2`.
    pub protocol: &'a str,
    /// The status sent to the client.
    pub status: u16,
    /// Istio's response flags (`-` for none).
    pub flags: String,
    /// Envoy's cluster name: `outbound|<port>|<subset>|<host>` or `inbound|<port>||`.
    pub cluster: String,
    /// The address at the other end of this hop (the client's for a server span, the
    /// endpoint's for a client span).
    pub peer_address: String,
    /// Request and response body bytes.
    pub sizes: (u64, u64),
    /// The span's name: `<host>:<port>/*`.
    pub name: String,
}

/// A span in progress: started with the request, reported when its response ends.
pub struct Pending {
    context: SpanContext,
    kind: Kind,
    start: SystemTime,
    /// Where it goes; `None`: not sampled, reporting disabled, or no such provider.
    exporter: Option<Exporter>,
    tags: Vec<(String, String)>,
    own: Arc<WorkloadTracing>,
    peer: Option<Canonical>,
    port: u16,
    /// `x-request-id` (for a reported span).
    request_id: Option<String>,
}

impl Pending {
    /// Its place in the trace.
    pub fn context(&self) -> &SpanContext {
        &self.context
    }

    /// Client or server.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The port the request was sent to (the Service port for a client span, the pod's for
    /// a server span).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether it is reported (sampled, reporting not disabled, a known provider): when not,
    /// nothing about its request needs to be gathered.
    pub fn reported(&self) -> bool {
        self.exporter.is_some()
    }

    /// The workload at the other end of the request, once known.
    pub fn peer(&mut self, peer: Option<&Workload>) {
        if self.exporter.is_some() {
            self.peer = peer.map(Canonical::of);
        }
    }

    /// Reports the span (when sampled) with what the request came to.
    pub fn finish(self, outcome: Outcome<'_>) {
        let Some(exporter) = self.exporter else {
            return;
        };
        // Room for every attribute a span can have: no growing on the request path.
        let mut attributes = Vec::with_capacity(17);
        attributes.extend([
            ("component", Value::Str("proxy".into())),
            ("http.method", Value::Str(outcome.method.to_string())),
            ("http.url", Value::Str(outcome.url)),
            ("http.protocol", Value::Str(outcome.protocol.to_string())),
            ("http.status_code", Value::Int(i64::from(outcome.status))),
            ("response_flags", Value::Str(outcome.flags)),
            ("upstream_cluster", Value::Str(outcome.cluster)),
            ("peer.address", Value::Str(outcome.peer_address)),
            ("request_size", Value::Int(outcome.sizes.0 as i64)),
            ("response_size", Value::Int(outcome.sizes.1 as i64)),
            (
                "istio.canonical_service",
                Value::Str(self.own.canonical.service.clone()),
            ),
            (
                "istio.canonical_revision",
                Value::Str(self.own.canonical.revision.clone()),
            ),
            (
                "istio.namespace",
                Value::Str(self.own.canonical.namespace.clone()),
            ),
        ]);
        if let Some(peer) = &self.peer {
            attributes.push((
                "istio.peer.canonical_service",
                Value::Str(peer.service.clone()),
            ));
            attributes.push(("istio.peer.namespace", Value::Str(peer.namespace.clone())));
        }
        if let Some(id) = self.request_id {
            attributes.push(("guid:x-request-id", Value::Str(id)));
        }
        let error = outcome.status >= 500 || outcome.status == 0;
        if error {
            attributes.push(("error", Value::Str("true".into())));
        }
        exporter.send(Span {
            service: format!(
                "{}.{}",
                self.own.canonical.service, self.own.canonical.namespace
            ),
            context: self.context,
            name: outcome.name,
            kind: self.kind,
            start: self.start,
            end: SystemTime::now(),
            attributes,
            tags: self.tags,
            error,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn providers_are_name_equals_an_http_url() {
        let otel = TracingSettings::provider("otel=http://collector.obs.svc:4318").unwrap();
        assert_eq!(otel.name, "otel");
        assert_eq!(
            otel.endpoint.to_string(),
            "http://collector.obs.svc:4318/v1/traces"
        );
        let custom = TracingSettings::provider("x=http://10.0.0.1:9411/api/otlp").unwrap();
        assert_eq!(custom.endpoint.to_string(), "http://10.0.0.1:9411/api/otlp");
        for (bad, why) in [
            ("otel", "is not NAME=URL"),
            ("=http://a:1", "no provider name"),
            ("otel=https://a:4318", "only http://"),
            ("otel=http://collector", "no host:port"),
            ("otel=http://collector:0", "no host:port"),
            ("otel=not a url", "is not a URL"),
        ] {
            let err = TracingSettings::provider(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn the_settings_line_names_each_provider_and_the_sampling() {
        let mut settings = TracingSettings {
            providers: Vec::new(),
            sampling: 1.0,
        };
        assert_eq!(settings.to_string(), "off");
        settings
            .providers
            .push(TracingSettings::provider("otel=http://c:4318").unwrap());
        assert_eq!(
            settings.to_string(),
            "otel=http://c:4318/v1/traces;sampling=1%"
        );
    }

    #[test]
    fn custom_tags_take_literals_headers_and_their_defaults() {
        let tags: BTreeMap<String, CustomTag> = [
            (
                "cluster".to_string(),
                CustomTag::Literal {
                    value: "east".into(),
                },
            ),
            (
                "user".to_string(),
                CustomTag::Header {
                    name: "x-user".into(),
                    default_value: Some("nobody".into()),
                },
            ),
            (
                "tenant".to_string(),
                CustomTag::Header {
                    name: "x-tenant".into(),
                    default_value: None,
                },
            ),
        ]
        .into_iter()
        .collect();
        let mut headers = HeaderMap::new();
        assert_eq!(
            custom_tags(&tags, &headers),
            vec![
                ("cluster".to_string(), "east".to_string()),
                ("user".to_string(), "nobody".to_string()),
            ]
        );
        headers.insert("x-user", "alice".parse().unwrap());
        headers.insert("x-tenant", "t1".parse().unwrap());
        assert_eq!(custom_tags(&tags, &headers).len(), 3);
        assert!(custom_tags(&tags, &headers).contains(&("user".into(), "alice".into())));
    }
}
