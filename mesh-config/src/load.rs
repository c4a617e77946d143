//! Parsing a configuration file into typed resources, reporting every problem (not only the
//! first) as `file:document:field: message`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::Path,
};

use serde::Deserialize;
use serde_yaml_ng::Value;

use super::decode::{Cx, Decode, Diagnostic, Severity};
use super::kinds::{
    AuthorizationPolicy, DestinationRule, NetworkPolicy, PeerAuthentication, Telemetry,
    VirtualService,
};
use super::model::{EndpointSlice, Namespace, ObjectMeta, Pod, Service};

/// A file that has errors: every diagnostic found (errors and warnings).
#[derive(Debug, thiserror::Error)]
#[error("{file} has {} error(s):\n{}", self.errors().count(), self.render())]
pub struct LoadError {
    /// The file.
    pub file: String,
    /// Everything found, in document order.
    pub diagnostics: Vec<Diagnostic>,
}

impl LoadError {
    /// The diagnostics that are errors.
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
    }

    /// All diagnostics, one per line.
    pub fn render(&self) -> String {
        let lines: Vec<String> = self.diagnostics.iter().map(ToString::to_string).collect();
        lines.join("\n")
    }
}

/// Where a resource came from: `file:document`, for messages about it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// The file.
    pub file: String,
    /// The document position.
    pub document: String,
}

/// The resources of one or more files.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resources {
    /// Namespaces.
    pub namespaces: Vec<Namespace>,
    /// Pods.
    pub pods: Vec<Pod>,
    /// Services.
    pub services: Vec<Service>,
    /// EndpointSlices.
    pub endpoint_slices: Vec<EndpointSlice>,
    /// NetworkPolicies.
    pub network_policies: Vec<NetworkPolicy>,
    /// VirtualServices.
    pub virtual_services: Vec<VirtualService>,
    /// DestinationRules.
    pub destination_rules: Vec<DestinationRule>,
    /// PeerAuthentications.
    pub peer_authentications: Vec<PeerAuthentication>,
    /// AuthorizationPolicies.
    pub authorization_policies: Vec<AuthorizationPolicy>,
    /// Telemetries.
    pub telemetries: Vec<Telemetry>,
    /// Where each resource came from, by `Kind namespace/name`.
    pub origins: BTreeMap<String, Origin>,
    /// Warnings found while loading (the resources are usable).
    pub warnings: Vec<Diagnostic>,
}

impl Resources {
    /// Where the resource `Kind namespace/name` was read from (`file:document`), if known.
    pub fn origin(&self, kind: &str, meta: &ObjectMeta) -> Option<&Origin> {
        self.origins.get(&resource_key(kind, meta))
    }

    /// Adds every resource of `other`; a resource both define is an error.
    pub fn merge(&mut self, other: Resources) -> Result<(), Vec<Diagnostic>> {
        let duplicates: Vec<Diagnostic> = other
            .origins
            .iter()
            .filter_map(|(key, origin)| {
                let first = self.origins.get(key)?;
                Some(Diagnostic {
                    severity: Severity::Error,
                    file: origin.file.clone(),
                    document: origin.document.clone(),
                    field: "metadata.name".into(),
                    message: format!(
                        "duplicate {key}, already defined at {}:{}",
                        first.file, first.document
                    ),
                })
            })
            .collect();
        if !duplicates.is_empty() {
            return Err(duplicates);
        }
        self.namespaces.extend(other.namespaces);
        self.pods.extend(other.pods);
        self.services.extend(other.services);
        self.endpoint_slices.extend(other.endpoint_slices);
        self.network_policies.extend(other.network_policies);
        self.virtual_services.extend(other.virtual_services);
        self.destination_rules.extend(other.destination_rules);
        self.peer_authentications.extend(other.peer_authentications);
        self.authorization_policies
            .extend(other.authorization_policies);
        self.telemetries.extend(other.telemetries);
        self.origins.extend(other.origins);
        self.warnings.extend(other.warnings);
        Ok(())
    }
}

fn resource_key(kind: &str, meta: &ObjectMeta) -> String {
    if kind == "Namespace" {
        format!("{kind} {}", meta.name)
    } else {
        format!("{kind} {}", meta.qualified())
    }
}

/// API versions the mesh reads, per kind: `(group, versions, kind)`.
const KINDS: &[(&str, &[&str], &str)] = &[
    ("", &["v1"], "Namespace"),
    ("", &["v1"], "Pod"),
    ("", &["v1"], "Service"),
    ("discovery.k8s.io", &["v1"], "EndpointSlice"),
    ("networking.k8s.io", &["v1"], "NetworkPolicy"),
    (
        "networking.istio.io",
        &["v1alpha3", "v1beta1", "v1"],
        "VirtualService",
    ),
    (
        "networking.istio.io",
        &["v1alpha3", "v1beta1", "v1"],
        "DestinationRule",
    ),
    (
        "security.istio.io",
        &["v1beta1", "v1"],
        "PeerAuthentication",
    ),
    (
        "security.istio.io",
        &["v1beta1", "v1"],
        "AuthorizationPolicy",
    ),
    ("telemetry.istio.io", &["v1alpha1", "v1"], "Telemetry"),
];

/// The other kinds of the groups the mesh reads: ignored with a warning. Any other kind in
/// these groups is a misspelling (`AuthorisationPolicy`) and an error, so a policy never
/// goes missing silently.
const OTHER_KINDS: &[(&str, &[&str])] = &[
    (
        "networking.istio.io",
        &[
            "Gateway",
            "ServiceEntry",
            "Sidecar",
            "WorkloadEntry",
            "WorkloadGroup",
            "EnvoyFilter",
            "ProxyConfig",
        ],
    ),
    ("security.istio.io", &["RequestAuthentication"]),
    ("telemetry.istio.io", &[]),
    (
        "networking.k8s.io",
        &["Ingress", "IngressClass", "IPAddress", "ServiceCIDR"],
    ),
    ("discovery.k8s.io", &[]),
];

/// Reads and parses several files into one set; every file's problems are reported.
pub fn load_files(paths: &[&Path]) -> Result<Resources, Vec<LoadError>> {
    let mut all = Resources::default();
    let mut failed = Vec::new();
    for path in paths {
        match load_file(path) {
            Ok(resources) => {
                if let Err(diagnostics) = all.merge(resources) {
                    failed.push(LoadError {
                        file: path.display().to_string(),
                        diagnostics,
                    });
                }
            }
            Err(err) => failed.push(err),
        }
    }
    if failed.is_empty() {
        Ok(all)
    } else {
        Err(failed)
    }
}

/// Reads and parses `path`.
pub fn load_file(path: &Path) -> Result<Resources, LoadError> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => parse_str(&file, &text),
        Err(err) => Err(LoadError {
            diagnostics: vec![Diagnostic {
                severity: Severity::Error,
                file: file.clone(),
                document: "0".into(),
                field: String::new(),
                message: format!("cannot read the file: {err}"),
            }],
            file,
        }),
    }
}

/// Parses multi-document YAML text; `file` names it in diagnostics.
pub fn parse_str(file: &str, text: &str) -> Result<Resources, LoadError> {
    let mut loader = Loader {
        file,
        resources: Resources::default(),
        diagnostics: Vec::new(),
        pod_ips: BTreeMap::new(),
    };
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let position = (index + 1).to_string();
        match Value::deserialize(document) {
            Ok(Value::Null) => {}
            Ok(value) => loader.document(&position, value),
            Err(err) => {
                loader.error(&position, "", format!("invalid YAML: {err}"));
                // The parser cannot resynchronise after a syntax error.
                break;
            }
        }
    }
    if loader
        .diagnostics
        .iter()
        .any(|d| d.severity == Severity::Error)
    {
        return Err(LoadError {
            file: file.to_string(),
            diagnostics: loader.diagnostics,
        });
    }
    let mut resources = loader.resources;
    resources.warnings = loader.diagnostics;
    Ok(resources)
}

/// Decodes resources one by one, as a Kubernetes API server serves them: `(position,
/// document)` pairs, the position naming each in diagnostics. A resource with an error is left
/// out and reported; the others are kept (one broken VirtualService does not stop the rest).
/// Returns the resources and every diagnostic, errors included.
pub fn parse_objects(
    source: &str,
    objects: impl IntoIterator<Item = (String, Value)>,
) -> (Resources, Vec<Diagnostic>) {
    let mut loader = Loader {
        file: source,
        resources: Resources::default(),
        diagnostics: Vec::new(),
        pod_ips: BTreeMap::new(),
    };
    for (position, value) in objects {
        loader.document(&position, value);
    }
    let mut resources = loader.resources;
    resources.warnings = loader
        .diagnostics
        .iter()
        .filter(|d| d.severity != Severity::Error)
        .cloned()
        .collect();
    (resources, loader.diagnostics)
}

struct Loader<'a> {
    file: &'a str,
    resources: Resources,
    diagnostics: Vec<Diagnostic>,
    /// Live pod IPs and the pod holding each, to find two pods with one IP.
    pod_ips: BTreeMap<Ipv4Addr, String>,
}

impl Loader<'_> {
    fn push(&mut self, severity: Severity, document: &str, field: &str, message: String) {
        self.diagnostics.push(Diagnostic {
            severity,
            file: self.file.to_string(),
            document: document.to_string(),
            field: field.to_string(),
            message,
        });
    }

    fn error(&mut self, document: &str, field: &str, message: String) {
        self.push(Severity::Error, document, field, message);
    }

    fn document(&mut self, position: &str, value: Value) {
        let Value::Mapping(map) = &value else {
            self.error(position, "", "a resource must be a YAML mapping".into());
            return;
        };
        let text = |key: &str| map.get(key).and_then(Value::as_str).map(str::to_string);
        let (Some(api_version), Some(kind)) = (text("apiVersion"), text("kind")) else {
            let missing = if text("apiVersion").is_none() {
                "apiVersion"
            } else {
                "kind"
            };
            self.error(position, missing, "required string field is missing".into());
            return;
        };
        if kind == "List" {
            let items = match map.get("items") {
                Some(Value::Sequence(items)) => items.clone(),
                None | Some(Value::Null) => Vec::new(),
                Some(_) => {
                    self.error(
                        position,
                        "items",
                        "a List's items must be a sequence".into(),
                    );
                    return;
                }
            };
            for (i, item) in items.into_iter().enumerate() {
                self.document(&format!("{position}.items[{i}]"), item);
            }
            return;
        }
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", &api_version));
        let Some((_, versions, _)) = KINDS.iter().find(|(g, _, k)| *g == group && *k == kind)
        else {
            if let Some((_, others)) = OTHER_KINDS.iter().find(|(g, _)| *g == group) {
                if !others.contains(&kind.as_str()) {
                    let ours: Vec<&str> = KINDS
                        .iter()
                        .filter(|(g, _, _)| *g == group)
                        .map(|(_, _, k)| *k)
                        .collect();
                    self.error(
                        position,
                        "kind",
                        format!(
                            "{group} has no kind {kind:?}; the mesh reads {}, and ignores {}",
                            ours.join(", "),
                            others.join(", ")
                        ),
                    );
                    return;
                }
            }
            self.push(
                Severity::Warning,
                position,
                "kind",
                format!("unsupported resource {kind} ({api_version}) is ignored"),
            );
            return;
        };
        if !versions.contains(&version) {
            let expected: Vec<String> = versions
                .iter()
                .map(|v| {
                    if group.is_empty() {
                        v.to_string()
                    } else {
                        format!("{group}/{v}")
                    }
                })
                .collect();
            self.error(
                position,
                "apiVersion",
                format!(
                    "{kind} is not served as {api_version}; use {}",
                    expected.join(" or ")
                ),
            );
            return;
        }
        let (p, k, v) = (position, kind.as_str(), &value);
        match k {
            "Namespace" => self.add(p, k, v, |r| &mut r.namespaces, Self::accept),
            "Pod" => self.add(p, k, v, |r| &mut r.pods, Self::unique_ip),
            "Service" => self.add(p, k, v, |r| &mut r.services, Self::check_service),
            "EndpointSlice" => self.add(p, k, v, |r| &mut r.endpoint_slices, Self::accept),
            "NetworkPolicy" => self.add(p, k, v, |r| &mut r.network_policies, Self::accept),
            "VirtualService" => self.add(p, k, v, |r| &mut r.virtual_services, Self::accept),
            "DestinationRule" => self.add(p, k, v, |r| &mut r.destination_rules, Self::accept),
            "PeerAuthentication" => {
                self.add(p, k, v, |r| &mut r.peer_authentications, Self::accept)
            }
            "AuthorizationPolicy" => {
                self.add(p, k, v, |r| &mut r.authorization_policies, Self::accept)
            }
            "Telemetry" => self.add(p, k, v, |r| &mut r.telemetries, Self::accept),
            other => unreachable!("kind {other} is in KINDS but not handled"),
        }
    }

    /// The kind has no rules of its own beyond its decoder.
    fn accept<T>(&mut self, _: &str, _: &T) -> bool {
        true
    }

    /// Decodes one document of `kind` and adds it to `list` when it has no error, its name is
    /// unique and `check` (the kind's own rules) passes.
    fn add<T: Decode + HasMeta>(
        &mut self,
        position: &str,
        kind: &str,
        value: &Value,
        list: fn(&mut Resources) -> &mut Vec<T>,
        check: fn(&mut Self, &str, &T) -> bool,
    ) {
        if let Some(resource) = self.typed(position, kind, value) {
            if check(self, position, &resource) {
                list(&mut self.resources).push(resource);
            }
        }
    }

    /// Decodes one document of `kind`, reporting every problem; `Some` when it has no error
    /// and its name is unique.
    fn typed<T: Decode + HasMeta>(
        &mut self,
        position: &str,
        kind: &str,
        value: &Value,
    ) -> Option<T> {
        let name = describe(kind, value);
        let mut cx = Cx::default();
        let decoded = T::decode(value, &mut cx);
        let clean = cx.errors() == 0;
        for finding in cx.into_findings() {
            let message = format!("{} (in {name})", finding.message);
            self.push(finding.severity, position, &finding.field, message);
        }
        let resource = decoded.filter(|_| clean)?;
        self.unique(position, kind, resource.meta())
            .then_some(resource)
    }

    fn unique(&mut self, position: &str, kind: &str, meta: &ObjectMeta) -> bool {
        if meta.name.is_empty() {
            self.error(
                position,
                "metadata.name",
                format!("{kind} has an empty name"),
            );
            return false;
        }
        let key = resource_key(kind, meta);
        if let Some(first) = self.resources.origins.get(&key) {
            let message = format!(
                "duplicate {key}, already defined in document {}",
                first.document
            );
            self.error(position, "metadata.name", message);
            return false;
        }
        let origin = Origin {
            file: self.file.to_string(),
            document: position.to_string(),
        };
        self.resources.origins.insert(key, origin);
        true
    }

    fn unique_ip(&mut self, position: &str, pod: &Pod) -> bool {
        let Some(ip) = pod.live_ip() else {
            return true;
        };
        let name = format!("Pod {}", pod.metadata.qualified());
        if let Some(other) = self.pod_ips.get(&ip) {
            let message = format!("{name} has podIP {ip}, which {other} already has");
            self.error(position, "status.podIP", message);
            return false;
        }
        self.pod_ips.insert(ip, name);
        true
    }

    fn check_service(&mut self, position: &str, svc: &Service) -> bool {
        let errors = self.diagnostics.len();
        let name = format!("Service {}", svc.metadata.qualified());
        match svc.spec.cluster_ip.as_deref() {
            None | Some("") | Some("None") => {}
            Some(ip) if ip.parse::<Ipv4Addr>().is_ok() => {}
            Some(ip) => self.error(
                position,
                "spec.clusterIP",
                format!("{ip:?} is not an IPv4 address or \"None\" (in {name})"),
            ),
        }
        let mut names = BTreeSet::new();
        for (i, port) in svc.spec.ports.iter().enumerate() {
            let port_name = port.name.as_deref().unwrap_or("");
            if port.port == 0 {
                self.error(
                    position,
                    &format!("spec.ports[{i}].port"),
                    format!("port 0 is not a valid Service port (in {name})"),
                );
            }
            if svc.spec.ports.len() > 1 && port_name.is_empty() {
                self.error(
                    position,
                    &format!("spec.ports[{i}].name"),
                    format!("a Service with several ports must name each one (in {name})"),
                );
            } else if !port_name.is_empty() && !names.insert(port_name) {
                self.error(
                    position,
                    &format!("spec.ports[{i}].name"),
                    format!("port name {port_name:?} is used twice (in {name})"),
                );
            }
        }
        self.diagnostics.len() == errors
    }
}

/// Resources with `metadata`.
trait HasMeta {
    fn meta(&self) -> &ObjectMeta;
}

impl<S> HasMeta for super::model::Resource<S> {
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
}

macro_rules! has_meta {
    ($($t:ty),*) => {$(
        impl HasMeta for $t {
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
        }
    )*};
}
has_meta!(Namespace, Pod, Service, EndpointSlice);

/// `Kind namespace/name` of a raw document, for messages.
fn describe(kind: &str, value: &Value) -> String {
    let meta = value.get("metadata");
    let field = |key: &str| {
        meta.and_then(|m| m.get(key))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let name = field("name").unwrap_or_else(|| "<unnamed>".into());
    match field("namespace") {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: demo, labels: {app: web}}
spec:
  nodeName: node-a
  containers: [{name: web, ports: [{name: http, containerPort: 8080}]}]
status:
  podIP: 100.65.0.2
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  clusterIP: 100.66.0.10
  selector: {app: web}
  ports: [{port: 80, targetPort: http}]
---
"#;

    #[test]
    fn parses_every_kind_and_defaults_the_namespace() {
        let text = format!(
            "{GOOD}apiVersion: v1\nkind: Pod\nmetadata: {{name: lone}}\nstatus: {{podIP: 100.65.0.3}}\n"
        );
        let resources = parse_str("c.yaml", &text).unwrap();
        assert_eq!(resources.namespaces.len(), 1);
        assert_eq!(resources.pods.len(), 2);
        assert_eq!(resources.pods[1].metadata.namespace(), "default");
        assert_eq!(resources.services[0].spec.ports[0].port, 80);
        assert!(resources.warnings.is_empty());
    }

    #[test]
    fn accepts_kubectl_list_documents() {
        let text = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Namespace
  metadata: {name: a}
- apiVersion: v1
  kind: Namespace
  metadata: {name: b}
"#;
        let resources = parse_str("l.yaml", text).unwrap();
        assert_eq!(resources.namespaces.len(), 2);
    }

    #[test]
    fn reports_every_error_with_document_and_field() {
        let text = r#"
apiVersion: v1
kind: Pod
metadata: {name: a}
status: {podIP: not-an-ip}
---
apiVersion: v1
kind: Service
metadata: {name: s, namespace: x}
spec: {ports: [{port: 99999}]}
---
kind: Pod
metadata: {name: b}
"#;
        let err = parse_str("bad.yaml", text).unwrap_err();
        let lines: Vec<String> = err.errors().map(ToString::to_string).collect();
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert!(
            lines[0].starts_with("bad.yaml:1:status.podIP: error:"),
            "{}",
            lines[0]
        );
        assert!(lines[0].contains("Pod a"), "{}", lines[0]);
        assert!(
            lines[1].starts_with("bad.yaml:2:spec.ports[0].port: error:"),
            "{}",
            lines[1]
        );
        assert!(lines[1].contains("Service x/s"), "{}", lines[1]);
        assert_eq!(
            lines[2],
            "bad.yaml:3:apiVersion: error: required string field is missing"
        );
    }

    #[test]
    fn rejects_duplicates_and_bad_cluster_ips() {
        let text = format!(
            "{GOOD}apiVersion: v1\nkind: Service\nmetadata: {{name: web2, namespace: demo}}\nspec: {{clusterIP: 1.2.3}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: demo}}\n"
        );
        let err = parse_str("d.yaml", &text).unwrap_err();
        let rendered = err.render();
        assert!(
            rendered.contains("d.yaml:4:spec.clusterIP: error"),
            "{rendered}"
        );
        assert!(
            rendered.contains("d.yaml:5:metadata.name: error: duplicate Service demo/web, already defined in document 3"),
            "{rendered}"
        );
    }

    #[test]
    fn rejects_two_live_pods_with_one_ip_but_not_a_finished_one() {
        let pod = |name: &str, phase: &str| {
            format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nstatus: {{podIP: 100.65.0.7, phase: {phase}}}\n---\n")
        };
        let ok = format!("{}{}", pod("old", "Succeeded"), pod("new", "Running"));
        assert!(parse_str("ip.yaml", &ok).is_ok());
        let clash = format!("{}{}", pod("a", "Running"), pod("b", "Pending"));
        let err = parse_str("ip.yaml", &clash).unwrap_err();
        assert!(
            err.render().contains("ip.yaml:2:status.podIP: error: Pod default/b has podIP 100.65.0.7, which Pod default/a already has"),
            "{}",
            err.render()
        );
    }

    #[test]
    fn reads_every_istio_version_and_warns_about_other_kinds() {
        let text = r#"
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: a}
spec: {hosts: [web], http: [{route: [{destination: {host: web}}]}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: b, namespace: x}
spec: {hosts: [web], http: [{route: [{destination: {host: web}}]}]}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default}
spec: {mtls: {mode: STRICT}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
"#;
        let resources = parse_str("w.yaml", text).unwrap();
        assert_eq!(resources.virtual_services.len(), 2);
        assert_eq!(resources.virtual_services[0].namespace(), "default");
        assert_eq!(resources.peer_authentications.len(), 1);
        assert_eq!(resources.warnings.len(), 1);
        assert!(resources.warnings[0].to_string().contains("Deployment"));
        let origin = resources
            .origin("VirtualService", &resources.virtual_services[1].metadata)
            .unwrap();
        assert_eq!(origin.document, "2");
        let err = parse_str(
            "v.yaml",
            "apiVersion: security.istio.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec: {}\n",
        )
        .unwrap_err();
        assert!(
            err.render().contains("v.yaml:1:apiVersion: error: PeerAuthentication is not served as security.istio.io/v1alpha1; use security.istio.io/v1beta1 or security.istio.io/v1"),
            "{}",
            err.render()
        );
    }

    #[test]
    fn reports_yaml_syntax_errors() {
        let err = parse_str("s.yaml", "apiVersion: v1\nkind: [\n").unwrap_err();
        assert!(err.render().starts_with("s.yaml:1::"), "{}", err.render());
    }

    #[test]
    fn every_namespaced_kind_defaults_to_the_default_namespace() {
        let docs = [
            ("v1", "Pod", ""),
            ("v1", "Service", ""),
            (
                "discovery.k8s.io/v1",
                "EndpointSlice",
                "addressType: IPv4\n",
            ),
            (
                "networking.k8s.io/v1",
                "NetworkPolicy",
                "spec: {podSelector: {}}\n",
            ),
            (
                "networking.istio.io/v1",
                "VirtualService",
                "spec: {hosts: [a], tcp: [{route: [{destination: {host: a}}]}]}\n",
            ),
            (
                "networking.istio.io/v1beta1",
                "DestinationRule",
                "spec: {host: a}\n",
            ),
            ("security.istio.io/v1", "PeerAuthentication", "spec: {}\n"),
            (
                "security.istio.io/v1beta1",
                "AuthorizationPolicy",
                "spec: {}\n",
            ),
            ("telemetry.istio.io/v1", "Telemetry", "spec: {}\n"),
        ];
        for (api, kind, rest) in docs {
            for (namespace, want) in [("", "default"), ("namespace: shop, ", "shop")] {
                let text = format!(
                    "apiVersion: {api}\nkind: {kind}\nmetadata: {{{namespace}name: x}}\n{rest}"
                );
                let r = parse_str("n.yaml", &text).unwrap_or_else(|e| panic!("{kind}: {e}"));
                let got: Vec<&str> = r
                    .pods
                    .iter()
                    .map(|p| p.metadata.namespace())
                    .chain(r.services.iter().map(|s| s.metadata.namespace()))
                    .chain(r.endpoint_slices.iter().map(|s| s.metadata.namespace()))
                    .chain(r.network_policies.iter().map(|p| p.namespace()))
                    .chain(r.virtual_services.iter().map(|p| p.namespace()))
                    .chain(r.destination_rules.iter().map(|p| p.namespace()))
                    .chain(r.peer_authentications.iter().map(|p| p.namespace()))
                    .chain(r.authorization_policies.iter().map(|p| p.namespace()))
                    .chain(r.telemetries.iter().map(|p| p.namespace()))
                    .collect();
                assert_eq!(got, [want], "{kind} with {namespace:?}");
            }
        }
    }

    #[test]
    fn a_misspelled_kind_in_a_group_the_mesh_reads_is_an_error() {
        let err = parse_str(
            "k.yaml",
            "apiVersion: security.istio.io/v1\nkind: AuthorisationPolicy\nmetadata: {name: p}\nspec: {}\n",
        )
        .unwrap_err();
        assert!(
            err.render().contains("k.yaml:1:kind: error: security.istio.io has no kind \"AuthorisationPolicy\"; the mesh reads PeerAuthentication, AuthorizationPolicy, and ignores RequestAuthentication"),
            "{}",
            err.render()
        );
        let ok = parse_str(
            "k.yaml",
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: g}\nspec: {}\n",
        )
        .unwrap();
        assert!(ok.warnings[0]
            .message
            .contains("unsupported resource Gateway"));
    }
}
