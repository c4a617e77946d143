//! CustomResourceDefinitions of the Istio kinds the mesh reads, generated from the typed model with
//! schemars (`mesh-node crds`; committed in deploy/crds/ for clusters without Istio's CRDs).
//! The model's types derive `JsonSchema`; where the model stores a field in a parsed form
//! (a port selector as its number, `match` as `matches`, ports as numbers), `with` types and
//! transforms here describe the wire form the API server sees. The result is made
//! structural: subschemas inlined, no defaults (the API server would apply them), only the
//! integer formats Kubernetes knows; `status` is kept open as Istio's CRDs do.

use std::borrow::Cow;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde_json::{json, Map, Value};

use super::{
    networking::{DestinationRuleSpec, ProxyProtocolVersion, VirtualServiceSpec},
    security::{AuthorizationPolicySpec, MtlsMode, Operation, PeerAuthenticationSpec, Source},
    values::{Cidr, Duration, FullRegex, Pattern, Percent, StringMatch},
};

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": "string", "description": "A Go duration: 1h, 30s, 500ms."})
    }
}

impl JsonSchema for Percent {
    fn schema_name() -> Cow<'static, str> {
        "Percent".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": "object", "properties": {"value": {"type": "number", "format": "double"}}})
    }
}

impl JsonSchema for StringMatch {
    fn schema_name() -> Cow<'static, str> {
        "StringMatch".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "object",
            "description": "Exactly one of exact, prefix, regex (a full RE2 match).",
            "properties": {
                "exact": {"type": "string"},
                "prefix": {"type": "string"},
                "regex": {"type": "string"}
            },
            "maxProperties": 1
        })
    }
}

impl JsonSchema for super::networking::HeaderMatch {
    fn schema_name() -> Cow<'static, str> {
        "HeaderMatch".into()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        StringMatch::json_schema(generator)
    }
}

macro_rules! string_schema {
    ($($t:ty),+) => {$(
        impl JsonSchema for $t {
            fn schema_name() -> Cow<'static, str> {
                stringify!($t).into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({"type": "string"})
            }
        }
    )+};
}

string_schema!(FullRegex, Pattern, Cidr);

/// `{number: N}`.
#[derive(JsonSchema)]
#[allow(dead_code)]
pub(crate) struct PortSelector {
    number: u32,
}

/// `HTTPBody`: `{string: ...}` or `{bytes: ...}`.
#[derive(JsonSchema)]
#[allow(dead_code)]
pub(crate) struct HttpBody {
    string: Option<String>,
    bytes: Option<String>,
}

/// `{version: V1}`.
#[derive(JsonSchema)]
#[allow(dead_code)]
pub(crate) struct ProxyProtocol {
    version: Option<ProxyProtocolVersion>,
}

/// `{mode: STRICT}`.
#[derive(JsonSchema)]
#[allow(dead_code)]
pub(crate) struct MutualTls {
    mode: Option<MtlsMode>,
}

/// `{mode: CLIENT}` (Telemetry's `tracing[].match`).
#[derive(JsonSchema)]
#[allow(dead_code)]
pub(crate) struct TracingSelector {
    mode: Option<super::telemetry::TracingMode>,
}

/// `{name: otel}` (Telemetry's `tracing[].providers[]`).
#[derive(JsonSchema)]
#[allow(dead_code)]
pub(crate) struct ProviderRef {
    name: String,
}

impl JsonSchema for super::telemetry::CustomTag {
    fn schema_name() -> Cow<'static, str> {
        "CustomTag".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let named = json!({"type": "object", "properties": {
            "name": {"type": "string"}, "defaultValue": {"type": "string"}}});
        json_schema!({
            "type": "object",
            "description": "Exactly one of literal, header, environment.",
            "properties": {
                "literal": {"type": "object", "properties": {"value": {"type": "string"}}},
                "header": named.clone(),
                "environment": named
            },
            "maxProperties": 1
        })
    }
}

/// `{name: ext-authz}`.
#[derive(JsonSchema)]
#[allow(dead_code)]
pub(crate) struct Provider {
    name: String,
}

/// `{source: {...}}`.
#[derive(JsonSchema)]
#[allow(dead_code)]
pub(crate) struct RuleFrom {
    source: Source,
}

/// `{operation: {...}}`.
#[derive(JsonSchema)]
#[allow(dead_code)]
pub(crate) struct RuleTo {
    operation: Operation,
}

/// Adds properties the decoder accepts but the model folds into others (deprecated forms).
fn add_properties(schema: &mut Schema, extra: Value) {
    let Some(object) = schema.as_object_mut() else {
        return;
    };
    let properties = object
        .entry("properties")
        .or_insert_with(|| Value::Object(Map::new()));
    if let (Some(properties), Value::Object(extra)) = (properties.as_object_mut(), extra) {
        properties.extend(extra);
    }
}

/// `HTTPRoute`: the deprecated `mirrorPercent`.
pub(crate) fn http_route_extras(schema: &mut Schema) {
    add_properties(
        schema,
        json!({"mirrorPercent": {"type": "integer", "format": "int32"}}),
    );
}

/// `HTTPFaultInjection.Delay`: the deprecated `percent` and `exponentialDelay`.
pub(crate) fn delay_extras(schema: &mut Schema) {
    add_properties(
        schema,
        json!({"percent": {"type": "integer", "format": "int32"}, "exponentialDelay": {"type": "string"}}),
    );
}

/// `CorsPolicy`: the deprecated `allowOrigin`.
pub(crate) fn cors_extras(schema: &mut Schema) {
    add_properties(
        schema,
        json!({"allowOrigin": {"type": "array", "items": {"type": "string"}}}),
    );
}

/// `ConsistentHashLB`: `ringHash` and `maglev` (the model keeps their sizes).
pub(crate) fn consistent_hash_extras(schema: &mut Schema) {
    add_properties(
        schema,
        json!({
            "ringHash": {"type": "object", "properties": {"minimumRingSize": {"type": "integer", "format": "int64"}}},
            "maglev": {"type": "object", "properties": {"tableSize": {"type": "integer", "format": "int64"}}}
        }),
    );
    if let Some(properties) = schema
        .as_object_mut()
        .and_then(|o| o.get_mut("properties"))
        .and_then(Value::as_object_mut)
    {
        properties.remove("maglevTableSize");
    }
}

/// `OutlierDetection`: the deprecated `consecutiveErrors`.
pub(crate) fn outlier_extras(schema: &mut Schema) {
    add_properties(
        schema,
        json!({"consecutiveErrors": {"type": "integer", "format": "int32"}}),
    );
}

/// `AuthorizationPolicy`: the single `targetRef`.
pub(crate) fn authorization_extras(schema: &mut Schema) {
    let target_ref = schema
        .as_object()
        .and_then(|o| o.get("properties"))
        .and_then(|p| p.get("targetRefs"))
        .and_then(|t| t.get("items"))
        .cloned();
    if let Some(target_ref) = target_ref {
        add_properties(schema, json!({ "targetRef": target_ref }));
    }
}

/// Makes a generated schema structural for the API server: no `$schema`, `title` or
/// `default`, `nullable` dropped (an absent field is how the API says "unset"), integer
/// formats only `int32`/`int64`, `additionalProperties` only without `properties`.
fn structural(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for key in ["$schema", "title", "default", "nullable", "examples"] {
                map.remove(key);
            }
            if let Some(Value::String(format)) = map.get("format") {
                let keep = match format.as_str() {
                    "int32" | "int64" | "double" | "float" => Some(format.clone()),
                    "uint8" | "uint16" | "int8" | "int16" => Some("int32".into()),
                    "uint32" | "uint64" | "uint" | "int" => Some("int64".into()),
                    _ => None,
                };
                match keep {
                    Some(f) => {
                        map.insert("format".into(), Value::String(f));
                    }
                    None => {
                        map.remove("format");
                    }
                }
            }
            // An Option's `null` in an enum goes (absent is how the API says unset).
            if let Some(Value::Array(values)) = map.get_mut("enum") {
                values.retain(|v| !v.is_null());
            }
            // A `type: [x, "null"]` from an Option becomes `x`.
            if let Some(Value::Array(types)) = map.get("type") {
                let types: Vec<Value> = types.iter().filter(|t| *t != "null").cloned().collect();
                if types.len() == 1 {
                    map.insert("type".into(), types[0].clone());
                }
            }
            for (_, child) in map.iter_mut() {
                structural(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(structural),
        _ => {}
    }
}

fn spec_schema<T: JsonSchema>() -> Value {
    let generator = schemars::generate::SchemaSettings::openapi3()
        .with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        })
        .into_generator();
    let mut value = generator.into_root_schema_for::<T>().to_value();
    structural(&mut value);
    if let Some(map) = value.as_object_mut() {
        map.remove("$defs");
        map.remove("components");
        map.remove("definitions");
        map.insert("type".into(), "object".into());
    }
    value
}

/// One CRD: `(group, kind, plural, versions, spec schema)`.
fn crd(group: &str, kind: &str, plural: &str, versions: &[&str], spec: Value) -> Value {
    let schema = json!({
        "type": "object",
        "properties": {
            "spec": spec,
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
        }
    });
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| {
            json!({
                "name": v,
                "served": true,
                "storage": *v == "v1",
                "schema": {"openAPIV3Schema": schema.clone()},
                "subresources": {"status": {}}
            })
        })
        .collect();
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": format!("{plural}.{group}"),
            "labels": {"app.kubernetes.io/part-of": "mesh"}
        },
        "spec": {
            "group": group,
            "names": {
                "kind": kind,
                "listKind": format!("{kind}List"),
                "plural": plural,
                "singular": kind.to_ascii_lowercase(),
                "shortNames": [short_name(kind)],
                "categories": ["istio-io", format!("{}-istio-io", group.split('.').next().unwrap_or(""))]
            },
            "scope": "Namespaced",
            "versions": versions
        }
    })
}

/// Istio's short names (`kubectl get vs`).
fn short_name(kind: &str) -> &'static str {
    match kind {
        "VirtualService" => "vs",
        "DestinationRule" => "dr",
        "PeerAuthentication" => "pa",
        "Telemetry" => "telemetry",
        _ => "ap",
    }
}

/// The CRDs of the Istio kinds the mesh reads, by file name (`<plural>.<group>.yaml`), as YAML.
pub fn crds() -> Vec<(String, String)> {
    let networking = ["v1", "v1beta1", "v1alpha3"];
    let security = ["v1", "v1beta1"];
    let list = [
        crd(
            "networking.istio.io",
            "VirtualService",
            "virtualservices",
            &networking,
            spec_schema::<VirtualServiceSpec>(),
        ),
        crd(
            "networking.istio.io",
            "DestinationRule",
            "destinationrules",
            &networking,
            spec_schema::<DestinationRuleSpec>(),
        ),
        crd(
            "security.istio.io",
            "PeerAuthentication",
            "peerauthentications",
            &security,
            spec_schema::<PeerAuthenticationSpec>(),
        ),
        crd(
            "security.istio.io",
            "AuthorizationPolicy",
            "authorizationpolicies",
            &security,
            spec_schema::<AuthorizationPolicySpec>(),
        ),
        crd(
            "telemetry.istio.io",
            "Telemetry",
            "telemetries",
            &["v1", "v1alpha1"],
            spec_schema::<super::telemetry::TelemetrySpec>(),
        ),
    ];
    list.into_iter()
        .map(|crd| {
            let name = crd["metadata"]["name"]
                .as_str()
                .unwrap_or("crd")
                .to_string();
            let yaml = serde_yaml_ng::to_string(&crd).unwrap_or_default();
            (
                format!("{name}.yaml"),
                format!(
                    "# Generated by `mesh-node crds` from the typed model; do not edit.\n{yaml}"
                ),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every schema node has a type (or keeps unknown fields), no `$ref`, no combinators.
    fn assert_structural(path: &str, v: &Value) {
        let Some(map) = v.as_object() else { return };
        assert!(
            map.contains_key("type") || map.contains_key("x-kubernetes-preserve-unknown-fields"),
            "{path} has no type: {v}"
        );
        for key in ["$ref", "oneOf", "anyOf", "allOf", "default", "nullable"] {
            assert!(!map.contains_key(key), "{path} has {key}: {v}");
        }
        assert!(
            !(map.contains_key("properties") && map.contains_key("additionalProperties")),
            "{path} has both properties and additionalProperties"
        );
        if let Some(props) = map.get("properties").and_then(Value::as_object) {
            for (k, child) in props {
                assert_structural(&format!("{path}.{k}"), child);
            }
        }
        for key in ["items", "additionalProperties"] {
            if let Some(child) = map.get(key).filter(|c| c.is_object()) {
                assert_structural(&format!("{path}[]"), child);
            }
        }
    }

    #[test]
    fn the_crds_are_structural_and_use_the_wire_names() {
        let vs = spec_schema::<VirtualServiceSpec>();
        assert_structural("vs", &vs);
        let http = &vs["properties"]["http"]["items"]["properties"];
        assert!(http.get("match").is_some() && http.get("matches").is_none());
        assert_eq!(
            http["route"]["items"]["properties"]["destination"]["properties"]["port"]["properties"]
                ["number"]["type"],
            "integer"
        );
        assert_eq!(http["timeout"]["type"], "string");
        let regex = &http["rewrite"]["properties"]["uriRegexRewrite"]["properties"];
        assert!(regex.get("match").is_some() && regex.get("pattern").is_none());
        assert!(http.get("mirrorPercent").is_some());
        let dr = spec_schema::<DestinationRuleSpec>();
        assert_structural("dr", &dr);
        let lb = &dr["properties"]["trafficPolicy"]["properties"]["loadBalancer"]["properties"];
        assert!(lb["consistentHash"]["properties"].get("ringHash").is_some());
        assert_eq!(lb["simple"]["enum"][0], "UNSPECIFIED");
        let pa = spec_schema::<PeerAuthenticationSpec>();
        assert_structural("pa", &pa);
        assert!(pa["properties"]["mtls"]["properties"].get("mode").is_some());
        let ap = spec_schema::<AuthorizationPolicySpec>();
        assert_structural("ap", &ap);
        let rule = &ap["properties"]["rules"]["items"]["properties"];
        assert!(rule["from"]["items"]["properties"]["source"]["properties"]
            .get("principals")
            .is_some());
        assert_eq!(
            rule["to"]["items"]["properties"]["operation"]["properties"]["ports"]["items"]["type"],
            "string"
        );
        let telemetry = spec_schema::<super::super::telemetry::TelemetrySpec>();
        assert_structural("telemetry", &telemetry);
        let tracing = &telemetry["properties"]["tracing"]["items"]["properties"];
        assert_eq!(tracing["match"]["properties"]["mode"]["enum"][1], "CLIENT");
        assert_eq!(
            tracing["providers"]["items"]["properties"]["name"]["type"],
            "string"
        );
        assert_eq!(tracing["randomSamplingPercentage"]["type"], "number");
        let tag = &tracing["customTags"]["additionalProperties"]["properties"];
        assert!(tag["header"]["properties"].get("defaultValue").is_some());
        assert_eq!(crds().len(), 5);
    }

    #[test]
    fn the_committed_crds_are_the_generated_ones() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
        for (name, yaml) in crds() {
            let committed = std::fs::read_to_string(dir.join(&name)).unwrap_or_default();
            assert!(
                committed == yaml,
                "deploy/crds/{name} differs from the model: run `mesh-node crds --out deploy/crds`"
            );
        }
    }
}
