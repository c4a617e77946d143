//! Istio's rules for how resources relate, shared by the state snapshot and `analyze`: host
//! names, protocol selection, enrolment, identity, and which policies apply to a workload.

use std::collections::BTreeMap;

use super::kinds::{AuthorizationPolicy, PeerAuthentication};
use super::model::{
    IntOrString, Labels, Namespace, Pod, Service, ServicePort, LABEL_DATAPLANE_MODE,
    LABEL_INJECTION,
};
use super::security::MtlsMode;
use super::values::labels_match;

/// Istio's default root namespace: policies there without a selector apply mesh-wide.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";
/// The cluster's DNS domain (also the default SPIFFE trust domain).
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Mesh-wide settings that Istio keeps in its MeshConfig: the root namespace (whose
/// selector-less policies apply mesh-wide), the SPIFFE trust domain of identities and how
/// request paths are normalized.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Mesh {
    /// Root namespace (`istio-system` by default).
    pub root_namespace: String,
    /// Trust domain (`cluster.local` by default).
    pub trust_domain: String,
    /// Path normalization, and the refusal of ambiguous paths where policy matches paths.
    pub paths: super::paths::PathSettings,
}

impl Default for Mesh {
    fn default() -> Self {
        Mesh {
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_string(),
            trust_domain: CLUSTER_DOMAIN.to_string(),
            paths: super::paths::PathSettings::default(),
        }
    }
}

/// The fully qualified name of `host` as written in a resource of `namespace`, resolved as
/// Kubernetes DNS does for a pod in that namespace: `web` -> `web.ns.svc.cluster.local`,
/// `web.other` -> `web.other.svc.cluster.local`, `web.other.svc` -> `...svc.cluster.local`;
/// longer names and wildcards are kept.
pub fn fqdn(host: &str, namespace: &str) -> String {
    if host.contains('*') {
        return host.to_string();
    }
    match host.split('.').count() {
        1 => format!("{host}.{namespace}.svc.{CLUSTER_DOMAIN}"),
        2 => format!("{host}.svc.{CLUSTER_DOMAIN}"),
        3 if host.ends_with(".svc") => format!("{host}.{CLUSTER_DOMAIN}"),
        _ => host.to_string(),
    }
}

/// The FQDN of Service `name` in `namespace`.
pub fn service_fqdn(name: &str, namespace: &str) -> String {
    format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}")
}

/// Whether `pattern` (a host, possibly `*.suffix` or `*`) covers FQDN `host`.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => host.ends_with(suffix),
        None => pattern == host,
    }
}

/// The protocol a Service port declares, as Istio selects it: `appProtocol` first, then the
/// port name's prefix (`http`, `http-web`, `grpc-api`); anything else is opaque TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 (and HTTP/2 upgrades).
    Http,
    /// HTTP/2 (including h2c with prior knowledge).
    Http2,
    /// gRPC (HTTP/2).
    Grpc,
    /// Declared TCP, TLS, or a protocol the mesh treats as opaque bytes.
    Tcp,
    /// Nothing declared: treated as TCP (no sniffing in the node proxy).
    Undeclared,
}

impl Protocol {
    /// Whether the node proxy parses it as HTTP.
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2 | Protocol::Grpc)
    }

    fn from_name(name: &str) -> Option<Protocol> {
        Some(match name.to_ascii_lowercase().as_str() {
            "http" => Protocol::Http,
            "http2" | "kubernetes.io/h2c" => Protocol::Http2,
            "grpc" | "grpc-web" => Protocol::Grpc,
            "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" | "kubernetes.io/ws"
            | "kubernetes.io/wss" => Protocol::Tcp,
            _ => return None,
        })
    }
}

/// The protocol Service port `port` declares.
pub fn port_protocol(port: &ServicePort) -> Protocol {
    if let Some(declared) = port.app_protocol.as_deref().and_then(Protocol::from_name) {
        return declared;
    }
    let name = port.name.as_deref().unwrap_or("");
    let prefix = name.split_once('-').map_or(name, |(prefix, _)| prefix);
    // `grpc-web` is a protocol of its own, not `grpc` with a suffix.
    Protocol::from_name(name)
        .or_else(|| Protocol::from_name(prefix))
        .unwrap_or(Protocol::Undeclared)
}

/// Resolves a `targetPort` (number, container port name, or unset = the Service port).
pub fn target_port(pod: &Pod, target: Option<&IntOrString>, service_port: u16) -> Option<u16> {
    match target {
        None => Some(service_port),
        Some(IntOrString::Int(port)) => Some(*port),
        Some(IntOrString::String(name)) => match name.parse::<u16>() {
            Ok(port) => Some(port),
            Err(_) => pod
                .spec
                .containers
                .iter()
                .flat_map(|c| &c.ports)
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .map(|p| p.container_port),
        },
    }
}

/// Whether Service `svc` selects `pod`: same namespace and a non-empty selector that the
/// pod's labels match (a Service without a selector has hand-made endpoints).
pub fn service_selects(svc: &Service, pod: &Pod) -> bool {
    svc.spec.selector.as_ref().is_some_and(|selector| {
        !selector.is_empty()
            && pod.metadata.namespace() == svc.metadata.namespace()
            && labels_match(&pod.metadata.labels, selector)
    })
}

/// Whether a namespace's labels enrol its pods: `istio.io/dataplane-mode=ambient`, or
/// `istio-injection=enabled` (there are no sidecars, so it is honoured as enrolment).
pub fn namespace_enrolls(labels: &Labels) -> bool {
    labels.get(LABEL_DATAPLANE_MODE).map(String::as_str) == Some("ambient")
        || labels.get(LABEL_INJECTION).map(String::as_str) == Some("enabled")
}

/// Whether `pod` is in the mesh: its own `istio.io/dataplane-mode` label (`ambient` or `none`)
/// decides, otherwise its namespace's labels. Host-network pods never are.
pub fn pod_enrolled(pod: &Pod, namespaces: &BTreeMap<&str, &Namespace>) -> bool {
    if pod.spec.host_network {
        return false;
    }
    match pod
        .metadata
        .labels
        .get(LABEL_DATAPLANE_MODE)
        .map(String::as_str)
    {
        Some("none") => false,
        Some("ambient") => true,
        _ => namespaces
            .get(pod.metadata.namespace())
            .is_some_and(|ns| namespace_enrolls(&ns.metadata.labels)),
    }
}

/// The service account a pod runs as (`default` when unset, as Kubernetes assigns it).
pub fn service_account(pod: &Pod) -> &str {
    pod.spec
        .service_account_name
        .as_deref()
        .filter(|sa| !sa.is_empty())
        .unwrap_or("default")
}

impl Mesh {
    /// The SPIFFE identity of service account `sa` in `namespace`.
    pub fn spiffe_id(&self, namespace: &str, sa: &str) -> Identity {
        Identity(format!("spiffe://{}/ns/{namespace}/sa/{sa}", self.trust_domain).into())
    }
}

/// A workload's SPIFFE ID (`spiffe://<trust domain>/ns/<namespace>/sa/<service account>`):
/// made from the config ([`Mesh::spiffe_id`]) or read from a verified certificate
/// ([`Identity::parse`]). Cheap to clone (shared).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Identity(std::sync::Arc<str>);

impl Identity {
    /// A SPIFFE ID as a certificate states it: `spiffe://` and a trust domain, then a path.
    pub fn parse(text: &str) -> Result<Identity, String> {
        match text
            .strip_prefix("spiffe://")
            .and_then(|rest| rest.split_once('/'))
        {
            Some((domain, path)) if !domain.is_empty() && !path.is_empty() => {
                Ok(Identity(text.into()))
            }
            _ => Err(format!(
                "{text:?} is not a SPIFFE ID (spiffe://<trust domain>/<path>)"
            )),
        }
    }

    /// The ID as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Identity {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Identity {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for Identity {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for Identity {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl serde::Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

/// The mTLS mode in effect for a workload, and the policies it comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EffectiveMtls {
    /// Mode for ports without a port-level setting (never UNSET: PERMISSIVE by default).
    pub mode: MtlsMode,
    /// Port-level modes (never UNSET: an UNSET port takes `mode`).
    pub ports: BTreeMap<u16, MtlsMode>,
    /// The policies that decided it, mesh-wide first (`namespace/name`).
    pub policies: Vec<String>,
    /// The policy that set `mode` (none when nothing set it: the PERMISSIVE default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode_from: Option<String>,
    /// The policy that set each port-level mode.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub ports_from: BTreeMap<u16, String>,
}

impl EffectiveMtls {
    /// The mode for workload port `port`: its port-level mode, else the workload's.
    pub fn mode_for(&self, port: u16) -> MtlsMode {
        self.ports.get(&port).copied().unwrap_or(self.mode)
    }

    /// The policy (`namespace/name`) that decided the mode of `port`, if any did.
    pub fn policy_for(&self, port: u16) -> Option<&str> {
        self.ports_from
            .get(&port)
            .or(self.mode_from.as_ref())
            .map(String::as_str)
    }
}

/// The oldest policy (by creation time, then name; all candidates share a namespace), which Istio picks among several at one
/// level.
fn oldest<'a>(
    candidates: impl Iterator<Item = &'a PeerAuthentication>,
) -> Option<&'a PeerAuthentication> {
    candidates.min_by_key(|p| p.metadata.age_key())
}

/// Resolves PeerAuthentication for a workload in `namespace` with `labels`, as Istio does:
/// mesh-wide (root namespace, no selector), then namespace-wide (no selector), then workload
/// (selector, outside the root namespace); UNSET inherits from the level above; when several
/// policies exist at one level the oldest (then the first by name) wins.
pub fn effective_mtls(
    mesh: &Mesh,
    policies: &[PeerAuthentication],
    namespace: &str,
    labels: &Labels,
) -> EffectiveMtls {
    let root = mesh.root_namespace.as_str();
    let mesh = oldest(
        policies
            .iter()
            .filter(|p| p.namespace() == root && !p.spec.has_selector()),
    );
    let ns = oldest(
        policies
            .iter()
            .filter(|p| p.namespace() == namespace && namespace != root && !p.spec.has_selector()),
    );
    let workload = oldest(policies.iter().filter(|p| {
        p.namespace() == namespace
            && namespace != root
            && p.spec.has_selector()
            && p.spec.selector.as_ref().is_some_and(|s| s.matches(labels))
    }));
    let mut mode = MtlsMode::Permissive;
    let mut out = EffectiveMtls::default();
    for policy in [mesh, ns, workload].into_iter().flatten() {
        out.policies.push(policy.metadata.qualified());
        match policy.spec.mtls {
            None | Some(MtlsMode::Unset) => {}
            Some(set) => {
                mode = set;
                out.mode_from = Some(policy.metadata.qualified());
            }
        }
    }
    out.mode = mode;
    if let Some(policy) = workload {
        for (port, port_mode) in &policy.spec.port_level_mtls {
            let resolved = if *port_mode == MtlsMode::Unset {
                mode
            } else {
                out.ports_from.insert(*port, policy.metadata.qualified());
                *port_mode
            };
            out.ports.insert(*port, resolved);
        }
    }
    out
}

/// Whether AuthorizationPolicy `policy` applies to a workload in `namespace` with `labels`:
/// policies in the root namespace apply in every namespace, others in their own; no selector
/// means every workload there. Policies bound by `targetRef(s)` attach to gateways, Services
/// or waypoints, not to workloads, and select none here.
pub fn authorization_applies(
    mesh: &Mesh,
    policy: &AuthorizationPolicy,
    namespace: &str,
    labels: &Labels,
) -> bool {
    if !policy.spec.target_refs.is_empty() {
        return false;
    }
    let scope = policy.namespace() == mesh.root_namespace || policy.namespace() == namespace;
    scope
        && policy
            .spec
            .selector
            .as_ref()
            .is_none_or(|s| s.matches(labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_spiffe_ids() {
        let id = Mesh::default().spiffe_id("shop", "web");
        assert_eq!(id, "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(Identity::parse(id.as_str()), Ok(id.clone()));
        for bad in [
            "",
            "spiffe://",
            "spiffe://td",
            "spiffe:///ns/a",
            "https://td/ns/a",
        ] {
            assert!(Identity::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(serde_json::to_string(&id).unwrap(), format!("\"{id}\""));
    }
    use crate::parse_str;

    #[test]
    fn hosts_resolve_as_kubernetes_dns_does() {
        let table = [
            ("web", "default", "web.default.svc.cluster.local"),
            ("web.shop", "default", "web.shop.svc.cluster.local"),
            ("web.shop.svc", "default", "web.shop.svc.cluster.local"),
            (
                "web.shop.svc.cluster.local",
                "x",
                "web.shop.svc.cluster.local",
            ),
            ("*.shop.svc.cluster.local", "x", "*.shop.svc.cluster.local"),
            ("api.example.com", "x", "api.example.com"),
        ];
        for (host, ns, want) in table {
            assert_eq!(fqdn(host, ns), want, "{host} in {ns}");
        }
        assert!(host_matches(
            "*.shop.svc.cluster.local",
            "web.shop.svc.cluster.local"
        ));
        assert!(!host_matches(
            "*.shop.svc.cluster.local",
            "web.other.svc.cluster.local"
        ));
        assert!(host_matches("*", "anything"));
    }

    #[test]
    fn protocol_selection_follows_istio() {
        let port = |name: Option<&str>, app: Option<&str>| ServicePort {
            name: name.map(Into::into),
            app_protocol: app.map(Into::into),
            port: 80,
            ..Default::default()
        };
        let table = [
            (port(Some("http"), None), Protocol::Http),
            (port(Some("http-web"), None), Protocol::Http),
            (port(Some("http2"), None), Protocol::Http2),
            (port(Some("grpc-api"), None), Protocol::Grpc),
            (port(Some("grpc-web"), None), Protocol::Grpc),
            (port(Some("tcp-db"), None), Protocol::Tcp),
            (port(Some("web"), None), Protocol::Undeclared),
            (port(Some("httpx"), None), Protocol::Undeclared),
            (port(None, None), Protocol::Undeclared),
            (port(Some("tcp"), Some("http")), Protocol::Http),
            (
                port(Some("web"), Some("kubernetes.io/h2c")),
                Protocol::Http2,
            ),
        ];
        for (p, want) in table {
            assert_eq!(port_protocol(&p), want, "{p:?}");
        }
    }

    const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: mesh, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ns, namespace: shop}
spec: {mtls: {mode: UNSET}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: legacy, namespace: shop}
spec:
  selector: {matchLabels: {app: legacy}}
  mtls: {mode: PERMISSIVE}
  portLevelMtls: {9000: {mode: STRICT}, 9001: {mode: UNSET}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ignored, namespace: istio-system}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: PERMISSIVE}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: b-newer, namespace: lab, creationTimestamp: "2026-01-02T00:00:00Z"}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: z-older, namespace: lab, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: all, namespace: istio-system}
spec: {action: DENY, rules: [{from: [{source: {namespaces: [evil]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web, namespace: shop}
spec: {selector: {matchLabels: {app: web}}, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: gw, namespace: shop}
spec: {targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}], rules: [{}]}
"#;

    #[test]
    fn peer_authentication_precedence() {
        let r = parse_str("p.yaml", POLICIES).unwrap();
        let labels = |app: &str| Labels::from([("app".to_string(), app.to_string())]);
        let web = effective_mtls(
            &Mesh::default(),
            &r.peer_authentications,
            "shop",
            &labels("web"),
        );
        // Namespace UNSET inherits the mesh's STRICT; the root-namespace selector is ignored.
        assert_eq!(web.mode, MtlsMode::Strict);
        assert_eq!(web.policies, ["istio-system/mesh", "shop/ns"]);
        assert_eq!(
            web.policy_for(80),
            Some("istio-system/mesh"),
            "UNSET decides nothing"
        );
        let legacy = effective_mtls(
            &Mesh::default(),
            &r.peer_authentications,
            "shop",
            &labels("legacy"),
        );
        assert_eq!(legacy.mode, MtlsMode::Permissive);
        assert_eq!(legacy.ports[&9000], MtlsMode::Strict);
        assert_eq!(
            legacy.ports[&9001],
            MtlsMode::Permissive,
            "UNSET port inherits the workload mode"
        );
        assert_eq!(legacy.policy_for(9000), Some("shop/legacy"));
        assert_eq!(
            legacy.policy_for(9001),
            Some("shop/legacy"),
            "the workload mode's policy"
        );
        // Two namespace-wide policies: the oldest wins.
        let lab = effective_mtls(
            &Mesh::default(),
            &r.peer_authentications,
            "lab",
            &labels("x"),
        );
        assert_eq!(lab.mode, MtlsMode::Permissive);
        assert_eq!(lab.policies, ["istio-system/mesh", "lab/z-older"]);
        assert_eq!(
            effective_mtls(&Mesh::default(), &[], "x", &Labels::new()).mode,
            MtlsMode::Permissive
        );
    }

    #[test]
    fn authorization_scope() {
        let r = parse_str("p.yaml", POLICIES).unwrap();
        let labels = |app: &str| Labels::from([("app".to_string(), app.to_string())]);
        let applying = |ns: &str, app: &str| -> Vec<String> {
            r.authorization_policies
                .iter()
                .filter(|p| authorization_applies(&Mesh::default(), p, ns, &labels(app)))
                .map(|p| p.metadata.qualified())
                .collect()
        };
        assert_eq!(applying("shop", "web"), ["istio-system/all", "shop/web"]);
        assert_eq!(applying("shop", "db"), ["istio-system/all"]);
        assert_eq!(applying("other", "web"), ["istio-system/all"]);
    }
}
