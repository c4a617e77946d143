//! Parsing a configuration file into typed resources, reporting every problem (not only the
//! first) as `file:document:field: message`.

use std::{collections::BTreeSet, fmt, path::Path};

use serde::{de::DeserializeOwned, Deserialize};
use serde_yaml_ng::Value;

use super::model::{EndpointSlice, Namespace, ObjectMeta, Pod, Service};

/// How bad a [`Diagnostic`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// The file cannot be used.
    Error,
    /// The file is used; something in it is ignored or suspicious.
    Warning,
}

/// One problem found in a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// The file, as given on the command line.
    pub file: String,
    /// The document: its 1-based position in the file, plus `.items[i]` inside a `List`.
    pub document: String,
    /// The field path inside the document (`spec.ports[0].port`), empty for the whole document.
    pub field: String,
    /// What is wrong, including the resource it concerns when known.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(
            f,
            "{}:{}:{}: {level}: {}",
            self.file, self.document, self.field, self.message
        )
    }
}

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

/// The resources of one or more files.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    /// Namespaces.
    pub namespaces: Vec<Namespace>,
    /// Pods.
    pub pods: Vec<Pod>,
    /// Services.
    pub services: Vec<Service>,
    /// EndpointSlices.
    pub endpoint_slices: Vec<EndpointSlice>,
    /// Warnings found while loading (the resources are usable).
    pub warnings: Vec<Diagnostic>,
}

/// Kinds that later versions of the mesh enforce; accepted and ignored for now.
const NOT_YET_ENFORCED: [&str; 5] = [
    "VirtualService",
    "DestinationRule",
    "PeerAuthentication",
    "AuthorizationPolicy",
    "NetworkPolicy",
];

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
        seen: BTreeSet::new(),
        pod_ips: std::collections::BTreeMap::new(),
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

struct Loader<'a> {
    file: &'a str,
    resources: Resources,
    diagnostics: Vec<Diagnostic>,
    /// (kind, namespace, name) of every resource, to find duplicates.
    seen: BTreeSet<(String, String, String)>,
    /// Live pod IPs and the pod holding each, to find two pods with one IP.
    pod_ips: std::collections::BTreeMap<std::net::Ipv4Addr, String>,
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

    fn warning(&mut self, document: &str, field: &str, message: String) {
        self.push(Severity::Warning, document, field, message);
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
        let group = api_version.rsplit_once('/').map_or("", |(group, _)| group);
        match (group, kind.as_str()) {
            ("", "Namespace") => {
                if let Some(ns) = self.typed::<Namespace>(position, &kind, value) {
                    if self.unique(position, &kind, "", &ns.metadata) {
                        self.resources.namespaces.push(ns);
                    }
                }
            }
            ("", "Pod") => {
                if let Some(pod) = self.typed::<Pod>(position, &kind, value) {
                    if self.unique(position, &kind, pod.metadata.namespace(), &pod.metadata)
                        && self.unique_ip(position, &pod)
                    {
                        self.resources.pods.push(pod);
                    }
                }
            }
            ("", "Service") => {
                if let Some(svc) = self.typed::<Service>(position, &kind, value) {
                    self.check_service(position, &svc);
                    if self.unique(position, &kind, svc.metadata.namespace(), &svc.metadata) {
                        self.resources.services.push(svc);
                    }
                }
            }
            ("discovery.k8s.io", "EndpointSlice") => {
                if let Some(slice) = self.typed::<EndpointSlice>(position, &kind, value) {
                    let ns = slice.metadata.namespace().to_string();
                    if self.unique(position, &kind, &ns, &slice.metadata) {
                        self.resources.endpoint_slices.push(slice);
                    }
                }
            }
            (_, other) if NOT_YET_ENFORCED.contains(&other) => self.warning(
                position,
                "kind",
                format!("{other} ({api_version}) is accepted but not enforced by this version"),
            ),
            _ => self.warning(
                position,
                "kind",
                format!("unsupported resource {kind} ({api_version}) is ignored"),
            ),
        }
    }

    /// Deserializes one document, reporting the failing field path.
    fn typed<T: DeserializeOwned>(
        &mut self,
        position: &str,
        kind: &str,
        value: Value,
    ) -> Option<T> {
        let name = describe(kind, &value);
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(typed) => Some(typed),
            Err(err) => {
                let path = err.path().to_string();
                let field = if path == "." { String::new() } else { path };
                self.error(position, &field, format!("{} (in {name})", err.inner()));
                None
            }
        }
    }

    fn unique(&mut self, position: &str, kind: &str, namespace: &str, meta: &ObjectMeta) -> bool {
        if meta.name.is_empty() {
            self.error(
                position,
                "metadata.name",
                format!("{kind} has an empty name"),
            );
            return false;
        }
        let key = (kind.to_string(), namespace.to_string(), meta.name.clone());
        if !self.seen.insert(key) {
            self.error(
                position,
                "metadata.name",
                format!("duplicate {kind} {namespace}/{}", meta.name),
            );
            return false;
        }
        true
    }

    fn unique_ip(&mut self, position: &str, pod: &Pod) -> bool {
        let Some(ip) = pod.live_ip() else {
            return true;
        };
        let name = format!("Pod {}/{}", pod.metadata.namespace(), pod.metadata.name);
        if let Some(other) = self.pod_ips.get(&ip) {
            let message = format!("{name} has podIP {ip}, which {other} already has");
            self.error(position, "status.podIP", message);
            return false;
        }
        self.pod_ips.insert(ip, name);
        true
    }

    fn check_service(&mut self, position: &str, svc: &Service) {
        let name = format!("Service {}/{}", svc.metadata.namespace(), svc.metadata.name);
        match svc.spec.cluster_ip.as_deref() {
            None | Some("") | Some("None") => {}
            Some(ip) if ip.parse::<std::net::Ipv4Addr>().is_ok() => {}
            Some(ip) => self.error(
                position,
                "spec.clusterIP",
                format!("{ip:?} is not an IPv4 address or \"None\" (in {name})"),
            ),
        }
        if svc.spec.ports.len() > 1 {
            for (i, port) in svc.spec.ports.iter().enumerate() {
                if port.name.as_deref().unwrap_or("").is_empty() {
                    self.error(
                        position,
                        &format!("spec.ports[{i}].name"),
                        format!("a Service with several ports must name each one (in {name})"),
                    );
                }
            }
        }
    }
}

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
            "{GOOD}apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: demo}}\nspec: {{clusterIP: 1.2.3}}\n"
        );
        let err = parse_str("d.yaml", &text).unwrap_err();
        let rendered = err.render();
        assert!(
            rendered.contains("d.yaml:4:spec.clusterIP: error"),
            "{rendered}"
        );
        assert!(
            rendered.contains("d.yaml:4:metadata.name: error: duplicate Service demo/web"),
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
    fn warns_about_kinds_it_does_not_enforce() {
        let text = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n";
        let resources = parse_str("w.yaml", text).unwrap();
        assert_eq!(resources.warnings.len(), 2);
        assert!(resources.warnings[0].to_string().contains("not enforced"));
        assert!(resources.warnings[1].to_string().contains("Deployment"));
    }

    #[test]
    fn reports_yaml_syntax_errors() {
        let err = parse_str("s.yaml", "apiVersion: v1\nkind: [\n").unwrap_err();
        assert!(err.render().starts_with("s.yaml:1::"), "{}", err.render());
    }
}
