//! `telemetry.istio.io` (v1alpha1, v1): Telemetry, with Istio's field names and value rules.
//! The mesh reads its `tracing` part; `metrics` and `accessLogging` are accepted with a
//! warning (the mesh's metrics and access log are always on), `targetRefs` (gateways and
//! waypoints, which the mesh does not have) likewise.
//!
//! Which Telemetry applies to a workload, and how levels combine, is [`tracing_for`]: the
//! mesh-wide resource (the root namespace's, without a selector), then the namespace's
//! (without a selector), then the one whose selector matches the workload; each level's
//! `tracing` entry for the direction overrides only the fields it sets, as Istio inherits
//! them.

use std::collections::BTreeMap;

use serde_yaml_ng::Value;

use super::decode::{string_enum, Cx, Decode};
use super::model::Labels;
use super::values::WorkloadSelector;

string_enum! {
    /// `Tracing.TracingSelector.mode`: which side's spans a `tracing` entry configures.
    TracingMode {
        /// Both.
        ClientAndServer = "CLIENT_AND_SERVER",
        /// The source side (the client span).
        Client = "CLIENT",
        /// The destination side (the server span).
        Server = "SERVER",
    }
}

impl TracingMode {
    /// Whether an entry of this mode configures `side` (`Client` or `Server`).
    pub fn covers(self, side: TracingMode) -> bool {
        self == TracingMode::ClientAndServer || self == side
    }
}

/// `Telemetry.spec`.
#[derive(Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct TelemetrySpec {
    /// Workloads it applies to; `None`: the namespace (mesh-wide in the root namespace).
    pub selector: Option<WorkloadSelector>,
    /// Tracing, per direction.
    pub tracing: Vec<Tracing>,
    /// It has a `targetRef(s)`: it attaches to gateways or waypoints, and so (as in Istio)
    /// applies to no workload's own proxy here, neither its namespace nor the mesh.
    #[schemars(skip)]
    pub targeted: bool,
}

impl TelemetrySpec {
    /// Whether it selects particular workloads (a selector with labels).
    pub fn has_selector(&self) -> bool {
        self.selector
            .as_ref()
            .is_some_and(|s| !s.match_labels.is_empty())
    }
}

/// `Telemetry.spec.tracing[]`: each field unset inherits from the level above.
#[derive(Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct Tracing {
    /// The direction it configures (`match.mode`; both when unset).
    #[schemars(with = "Option<super::schema::TracingSelector>")]
    pub r#match: TracingMode,
    /// The provider spans are reported to (Istio allows one), by its name in the mesh
    /// settings (MeshConfig `extensionProviders`).
    #[schemars(with = "Vec<super::schema::ProviderRef>")]
    pub providers: Vec<String>,
    /// Percentage (0 to 100, precision 0.01) of requests with no sampling decision yet that
    /// are traced.
    pub random_sampling_percentage: Option<f64>,
    /// Spans are not reported (context is still propagated, sampling decided).
    pub disable_span_reporting: Option<bool>,
    /// Tags added to every span.
    pub custom_tags: BTreeMap<String, CustomTag>,
    /// Accepted; the mesh samples at random (a warning says so when set).
    pub use_request_id_for_trace_sampling: Option<bool>,
}

/// `Tracing.CustomTag`: exactly one of its kinds (its CRD schema is written by hand in
/// `schema`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CustomTag {
    /// `literal: {value}`.
    Literal {
        /// The value.
        value: String,
    },
    /// `header: {name, defaultValue}`: a request header's value.
    Header {
        /// The header.
        name: String,
        /// When the request has no such header.
        default_value: Option<String>,
    },
    /// `environment: {name, defaultValue}`: an environment variable of the proxy.
    Environment {
        /// The variable.
        name: String,
        /// When it is not set.
        default_value: Option<String>,
    },
}

impl Decode for CustomTag {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let kinds = ["literal", "header", "environment"];
            let given: Vec<&str> = kinds.iter().copied().filter(|k| f.has(k)).collect();
            if given.len() != 1 {
                let message = format!(
                    "exactly one of literal, header, environment (found {})",
                    if given.is_empty() {
                        "none".to_string()
                    } else {
                        given.join(", ")
                    }
                );
                f.cx().error(message);
                // Decode what is there for its own errors.
                let _ = (f.opt::<Literal>("literal"), f.opt::<Named>("header"));
                let _ = f.opt::<Named>("environment");
                return None;
            }
            match given[0] {
                "literal" => f
                    .opt::<Literal>("literal")
                    .map(|l| CustomTag::Literal { value: l.0 }),
                "header" => f.opt::<Named>("header").map(|n| CustomTag::Header {
                    name: n.name,
                    default_value: n.default_value,
                }),
                _ => f
                    .opt::<Named>("environment")
                    .map(|n| CustomTag::Environment {
                        name: n.name,
                        default_value: n.default_value,
                    }),
            }
        })
        .flatten()
    }
}

/// `{value}`.
struct Literal(String);

impl Decode for Literal {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| Literal(f.req("value")))
    }
}

/// `{name, defaultValue}`.
struct Named {
    name: String,
    default_value: Option<String>,
}

impl Decode for Named {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let name: String = f.req("name");
            if name.is_empty() && !f.failed("name") {
                f.error_at("name", "must not be empty");
            }
            Named {
                name,
                default_value: f.opt("defaultValue"),
            }
        })
    }
}

/// `{name}` of a provider.
struct ProviderName(String);

impl Decode for ProviderName {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let name: String = f.req("name");
            if name.is_empty() && !f.failed("name") {
                f.error_at("name", "must not be empty");
            }
            ProviderName(name)
        })
    }
}

/// `match: {mode}`.
struct Selector(TracingMode);

impl Decode for Selector {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| Selector(f.opt("mode").unwrap_or_default()))
    }
}

impl Decode for Tracing {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let r#match = f.opt::<Selector>("match").map(|s| s.0).unwrap_or_default();
            let providers: Vec<String> = f
                .list::<ProviderName>("providers")
                .into_iter()
                .map(|p| p.0)
                .collect();
            if providers.len() > 1 {
                f.error_at(
                    "providers",
                    "only one provider may be named per tracing entry (as in Istio)",
                );
            }
            let random_sampling_percentage: Option<f64> = f.opt("randomSamplingPercentage");
            if let Some(p) = random_sampling_percentage {
                if !(0.0..=100.0).contains(&p) {
                    f.error_at(
                        "randomSamplingPercentage",
                        format!("{p} is not a percentage between 0 and 100"),
                    );
                }
            }
            let use_request_id_for_trace_sampling = f.opt("useRequestIdForTraceSampling");
            if use_request_id_for_trace_sampling == Some(true) {
                f.warn_at(
                    "useRequestIdForTraceSampling",
                    "ignored: the mesh samples at random, independently of x-request-id",
                );
            }
            f.skip("enableIstioTags");
            Tracing {
                r#match,
                providers,
                random_sampling_percentage,
                disable_span_reporting: f.opt("disableSpanReporting"),
                custom_tags: f.map("customTags"),
                use_request_id_for_trace_sampling,
            }
        })
    }
}

impl Decode for TelemetrySpec {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            for (key, why) in [
                ("metrics", "the mesh's Istio metrics are always on"),
                ("accessLogging", "the mesh's access log is always on"),
                (
                    "targetRef",
                    "the mesh has no gateways or waypoints to target: this Telemetry applies to \
                     no workload",
                ),
                (
                    "targetRefs",
                    "the mesh has no gateways or waypoints to target: this Telemetry applies to \
                     no workload",
                ),
            ] {
                if f.has(key) {
                    f.warn_at(key, format!("ignored: {why}"));
                    f.skip(key);
                }
            }
            TelemetrySpec {
                targeted: f.has("targetRef") || f.has("targetRefs"),
                selector: f.opt("selector"),
                tracing: f.list("tracing"),
            }
        })
    }
}

/// What tracing does on one side of a workload's requests, once every level is applied.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TracingConfig {
    /// The provider spans go to; `None`: the mesh's default provider.
    pub provider: Option<String>,
    /// Percentage of requests without a sampling decision that are traced; `None`: the
    /// mesh's default.
    pub sampling: Option<f64>,
    /// Spans are not reported.
    pub disable_span_reporting: bool,
    /// Tags added to every span.
    pub custom_tags: BTreeMap<String, CustomTag>,
    /// The Telemetry resources that contributed (`namespace/name`, mesh-wide first).
    pub from: Vec<String>,
}

/// The order in which Telemetries of one level win: the oldest first (`creationTimestamp`,
/// none counting as oldest), then by `namespace/name`.
pub fn age(t: &crate::kinds::Telemetry) -> (&Option<String>, &str, &str) {
    (
        &t.metadata.creation_timestamp,
        t.namespace(),
        &t.metadata.name,
    )
}

/// The tracing of a workload of `namespace` with `labels`, on `side` (`Client` or
/// `Server`), from `telemetries` and Istio's root namespace. Of several resources at one
/// level (which Istio calls invalid), the oldest applies, as for Istio's other policies.
pub fn tracing_for(
    telemetries: &[crate::kinds::Telemetry],
    root_namespace: &str,
    namespace: &str,
    labels: &Labels,
    side: TracingMode,
) -> TracingConfig {
    fn oldest<'t>(
        candidates: impl Iterator<Item = &'t crate::kinds::Telemetry>,
    ) -> Option<&'t crate::kinds::Telemetry> {
        candidates.min_by_key(|t| age(t))
    }
    // Those bound to gateways or waypoints apply to no workload here.
    let telemetries = || telemetries.iter().filter(|t| !t.spec.targeted);
    let level =
        |ns: &str| oldest(telemetries().filter(|t| t.namespace() == ns && !t.spec.has_selector()));
    let mesh = level(root_namespace);
    let own = (namespace != root_namespace)
        .then(|| level(namespace))
        .flatten();
    let workload = oldest(telemetries().filter(|t| {
        t.namespace() == namespace
            && t.spec
                .selector
                .as_ref()
                .is_some_and(|s| !s.match_labels.is_empty() && s.matches(labels))
    }));
    let mut config = TracingConfig {
        provider: None,
        sampling: None,
        disable_span_reporting: false,
        custom_tags: BTreeMap::new(),
        from: Vec::new(),
    };
    for telemetry in [mesh, own, workload].into_iter().flatten() {
        let mut used = false;
        for entry in telemetry
            .spec
            .tracing
            .iter()
            .filter(|e| e.r#match.covers(side))
        {
            used = true;
            if let Some(provider) = entry.providers.first() {
                config.provider = Some(provider.clone());
            }
            if let Some(p) = entry.random_sampling_percentage {
                config.sampling = Some(p);
            }
            if let Some(disable) = entry.disable_span_reporting {
                config.disable_span_reporting = disable;
            }
            if !entry.custom_tags.is_empty() {
                config.custom_tags = entry.custom_tags.clone();
            }
        }
        if used {
            config.from.push(format!(
                "{}/{}",
                telemetry.namespace(),
                telemetry.metadata.name
            ));
        }
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::parse_str;

    fn telemetries(yaml: &str) -> Vec<crate::kinds::Telemetry> {
        parse_str("t.yaml", yaml).unwrap().telemetries
    }

    #[test]
    fn levels_override_only_what_they_set() {
        let all = telemetries(
            r#"
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing:
  - providers: [{name: otel}]
    randomSamplingPercentage: 10
    customTags: {cluster: {literal: {value: east}}}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: shop, namespace: shop}
spec:
  tracing: [{randomSamplingPercentage: 50}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  tracing:
  - match: {mode: SERVER}
    randomSamplingPercentage: 100
  - match: {mode: CLIENT}
    disableSpanReporting: true
"#,
        );
        let web: Labels = [("app".to_string(), "web".to_string())].into();
        let server = tracing_for(&all, "istio-system", "shop", &web, TracingMode::Server);
        assert_eq!(server.sampling, Some(100.0));
        assert_eq!(server.provider.as_deref(), Some("otel"), "inherited");
        assert!(!server.disable_span_reporting);
        assert_eq!(server.custom_tags.len(), 1);
        assert_eq!(
            server.from,
            ["istio-system/mesh-default", "shop/shop", "shop/web"]
        );
        let client = tracing_for(&all, "istio-system", "shop", &web, TracingMode::Client);
        assert_eq!(client.sampling, Some(50.0), "the namespace's");
        assert!(client.disable_span_reporting);
        let other = tracing_for(
            &all,
            "istio-system",
            "shop",
            &Labels::new(),
            TracingMode::Client,
        );
        assert_eq!(other.sampling, Some(50.0));
        let elsewhere = tracing_for(&all, "istio-system", "ops", &web, TracingMode::Server);
        assert_eq!(elsewhere.sampling, Some(10.0), "mesh-wide only");
        // One bound to a gateway by targetRefs applies to no workload, even without a
        // selector and first in the order of age (no timestamps: by name).
        let mut with_gateway = telemetries(
            r#"
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: gateway, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]
  tracing: [{randomSamplingPercentage: 100}]
"#,
        );
        with_gateway.extend(all.iter().cloned());
        let other = tracing_for(
            &with_gateway,
            "istio-system",
            "shop",
            &Labels::new(),
            TracingMode::Client,
        );
        assert_eq!(
            other.sampling,
            Some(50.0),
            "the gateway's applied: {other:?}"
        );
        let none = tracing_for(&[], "istio-system", "ops", &web, TracingMode::Server);
        assert_eq!(none.sampling, None);
        assert!(none.from.is_empty());
    }

    #[test]
    fn mistakes_are_named_and_what_is_ignored_warns() {
        let err = parse_str(
            "t.yaml",
            r#"
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: bad, namespace: shop}
spec:
  tracing:
  - randomSamplingPercentage: 150
    providers: [{name: a}, {name: b}]
    match: {mode: BOTH}
    customTags:
      both: {literal: {value: x}, header: {name: y}}
      none: {}
      empty: {header: {name: ""}}
"#,
        )
        .unwrap_err()
        .render();
        for wanted in [
            "tracing[0].randomSamplingPercentage: error: 150 is not a percentage between 0 and 100",
            "tracing[0].providers: error: only one provider",
            "tracing[0].match.mode: error:",
            "tracing[0].customTags[\"both\"]: error: exactly one of literal, header, environment (found literal, header)",
            "tracing[0].customTags[\"none\"]: error: exactly one of literal, header, environment (found none)",
            "tracing[0].customTags[\"empty\"].header.name: error: must not be empty",
        ] {
            assert!(err.contains(wanted), "{wanted} not in:\n{err}");
        }
        let warned = parse_str(
            "t.yaml",
            "apiVersion: telemetry.istio.io/v1alpha1\nkind: Telemetry\nmetadata: {name: t, namespace: shop}\nspec:\n  metrics: [{providers: [{name: prometheus}]}]\n  accessLogging: [{disabled: true}]\n  tracing: [{useRequestIdForTraceSampling: true}]\n",
        )
        .unwrap();
        let warnings: Vec<String> = warned.warnings.iter().map(|w| w.to_string()).collect();
        let warnings = warnings.join("\n");
        for wanted in [
            "metrics: warning: ignored",
            "accessLogging: warning: ignored",
            "useRequestIdForTraceSampling: warning: ignored",
        ] {
            assert!(warnings.contains(wanted), "{wanted} not in:\n{warnings}");
        }
        assert_eq!(warned.telemetries.len(), 1);
    }
}
