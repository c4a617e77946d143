//! `security.istio.io` (v1beta1, v1): PeerAuthentication and AuthorizationPolicy, with Istio's
//! field names and value rules.

use std::collections::BTreeMap;

use serde_yaml_ng::Value;

use super::decode::{string_enum, Cx, Decode, Fields};
use super::values::{Cidr, Pattern, WorkloadSelector};

string_enum! {
    /// `PeerAuthentication.MutualTLS.mode`.
    MtlsMode {
        /// Inherit from the parent level (PERMISSIVE when nothing is set).
        Unset = "UNSET",
        /// Plain text only. Istio ambient does not support it between enrolled workloads.
        Disable = "DISABLE",
        /// mTLS and plain text.
        Permissive = "PERMISSIVE",
        /// mTLS only.
        Strict = "STRICT",
    }
}

/// `PeerAuthentication.spec`.
#[derive(Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct PeerAuthenticationSpec {
    /// Workloads it applies to; `None` means the namespace (mesh-wide in the root namespace).
    pub selector: Option<WorkloadSelector>,
    /// Mode for all ports.
    #[schemars(with = "Option<super::schema::MutualTls>")]
    pub mtls: Option<MtlsMode>,
    /// Per-port modes (only with a selector).
    #[schemars(with = "std::collections::BTreeMap<String, super::schema::MutualTls>")]
    pub port_level_mtls: BTreeMap<u16, MtlsMode>,
}

impl PeerAuthenticationSpec {
    /// Whether it selects particular workloads (a selector with labels).
    pub fn has_selector(&self) -> bool {
        self.selector
            .as_ref()
            .is_some_and(|s| !s.match_labels.is_empty())
    }
}

/// `{mode: STRICT}`.
struct MutualTls(MtlsMode);

impl Decode for MutualTls {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            MutualTls(f.opt("mode").unwrap_or_default())
        })
    }
}

impl Decode for PeerAuthenticationSpec {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let mtls = f.opt::<MutualTls>("mtls").map(|m| m.0);
            let empty_map =
                matches!(value.get("portLevelMtls"), Some(Value::Mapping(m)) if m.is_empty());
            let raw: BTreeMap<String, MutualTls> = f.map("portLevelMtls");
            let mut port_level_mtls = BTreeMap::new();
            for (port, mode) in raw {
                match port.parse::<u16>() {
                    Ok(p) if p > 0 => {
                        port_level_mtls.insert(p, mode.0);
                    }
                    _ => f.error_entry(
                        "portLevelMtls",
                        &port,
                        "not a port number between 1 and 65535",
                    ),
                }
            }
            if empty_map {
                f.error_at("portLevelMtls", "must not be empty when present");
            }
            let spec = PeerAuthenticationSpec {
                selector: f.opt("selector"),
                mtls,
                port_level_mtls,
            };
            let modes = spec.mtls.iter().chain(spec.port_level_mtls.values());
            if modes.clone().any(|m| *m == MtlsMode::Disable) {
                f.cx().warn(
                    "mode DISABLE: Istio ambient does not support plain text between enrolled \
                     workloads; traffic between them stays mTLS",
                );
            }
            spec
        })
    }
}

string_enum! {
    /// `AuthorizationPolicy.action`.
    Action {
        /// Allow matching requests (the default).
        Allow = "ALLOW",
        /// Deny matching requests.
        Deny = "DENY",
        /// Audit matching requests (no effect on traffic).
        Audit = "AUDIT",
        /// Delegate to an external authorizer.
        Custom = "CUSTOM",
    }
}

/// `AuthorizationPolicy.spec`.
#[derive(Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
#[schemars(transform = super::schema::authorization_extras)]
pub struct AuthorizationPolicySpec {
    /// Workloads it applies to; `None` means every workload of the namespace (all namespaces
    /// in the root namespace).
    pub selector: Option<WorkloadSelector>,
    /// `targetRef`/`targetRefs` (gateways and waypoints; recorded, they select no workload
    /// of the node proxy).
    pub target_refs: Vec<TargetRef>,
    /// Rules, ORed. With no rules an ALLOW policy matches nothing (denies all).
    pub rules: Vec<Rule>,
    /// What a match does.
    pub action: Action,
    /// External authorizer (CUSTOM only).
    #[schemars(with = "Option<super::schema::Provider>")]
    pub provider: Option<String>,
}

impl AuthorizationPolicySpec {
    /// Whether any rule needs HTTP attributes (which a plain TCP port cannot provide).
    pub fn uses_l7(&self) -> bool {
        self.rules.iter().any(Rule::uses_l7)
    }
}

/// `PolicyTargetReference`.
#[derive(Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct TargetRef {
    /// API group.
    pub group: String,
    /// Kind (`Gateway`, `Service`, `ServiceEntry`).
    pub kind: String,
    /// Name.
    pub name: String,
    /// Namespace (the policy's when unset).
    pub namespace: Option<String>,
}

impl Decode for TargetRef {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| TargetRef {
            group: f.opt("group").unwrap_or_default(),
            kind: f.req("kind"),
            name: f.req("name"),
            namespace: f.opt("namespace"),
        })
    }
}

struct Provider(String);

impl Decode for Provider {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| Provider(f.req("name")))
    }
}

impl Decode for AuthorizationPolicySpec {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let mut target_refs: Vec<TargetRef> = f.list("targetRefs");
            target_refs.extend(f.opt::<TargetRef>("targetRef"));
            let spec = AuthorizationPolicySpec {
                selector: f.opt("selector"),
                target_refs,
                rules: f.list("rules"),
                action: f.opt("action").unwrap_or_default(),
                provider: f.opt::<Provider>("provider").map(|p| p.0),
            };
            if f.has("selector") && (f.has("targetRef") || f.has("targetRefs")) {
                f.error_at("selector", "use either selector or targetRef(s), not both");
            }
            let no_rules = spec.rules.is_empty() && !f.failed("rules");
            match spec.action {
                // A misspelled action is reported once, not again through its consequences.
                _ if f.failed("action") => {}
                Action::Custom if spec.provider.is_none() => {
                    f.error_at("provider", "CUSTOM needs a provider")
                }
                Action::Custom if no_rules => f.error_at("rules", "CUSTOM needs at least one rule"),
                Action::Deny if no_rules => f.error_at(
                    "rules",
                    "DENY needs at least one rule (a DENY with no rules would match nothing)",
                ),
                Action::Custom => {}
                other if f.has("provider") => f.error_at(
                    "provider",
                    format!("provider is only for CUSTOM, not {other}"),
                ),
                _ => {}
            }
            spec
        })
    }
}

/// `Rule`: all of `from`, `to` and `when` must match (each list ORs its items).
#[derive(Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct Rule {
    /// Sources.
    #[schemars(with = "Vec<super::schema::RuleFrom>")]
    pub from: Vec<Source>,
    /// Operations.
    #[schemars(with = "Vec<super::schema::RuleTo>")]
    pub to: Vec<Operation>,
    /// Extra conditions.
    pub when: Vec<Condition>,
}

impl Rule {
    /// Whether it needs HTTP attributes.
    pub fn uses_l7(&self) -> bool {
        self.from
            .iter()
            .any(|s| !s.request_principals.is_empty() || !s.not_request_principals.is_empty())
            || self.to.iter().any(|o| {
                !(o.hosts.is_empty()
                    && o.not_hosts.is_empty()
                    && o.methods.is_empty()
                    && o.not_methods.is_empty()
                    && o.paths.is_empty()
                    && o.not_paths.is_empty())
            })
            || self
                .when
                .iter()
                .any(|c| c.key.starts_with("request.") || c.key.starts_with("experimental."))
    }
}

/// `{source: {...}}` and `{operation: {...}}` wrappers.
struct Wrapped<T>(T);

impl Decode for Wrapped<Source> {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| Wrapped(f.req("source")))
    }
}

impl Decode for Wrapped<Operation> {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| Wrapped(f.req("operation")))
    }
}

impl Decode for Rule {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            for key in ["from", "to"] {
                if f.has(key) && matches!(value.get(key), Some(Value::Sequence(s)) if s.is_empty())
                {
                    f.error_at(key, "must not be an empty list (leave it out instead)");
                }
            }
            Rule {
                from: f
                    .list::<Wrapped<Source>>("from")
                    .into_iter()
                    .map(|w| w.0)
                    .collect(),
                to: f
                    .list::<Wrapped<Operation>>("to")
                    .into_iter()
                    .map(|w| w.0)
                    .collect(),
                when: f.list("when"),
            }
        })
    }
}

/// `Source`: every non-empty field must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct Source {
    /// Peer identities (`<trust-domain>/ns/<ns>/sa/<sa>`).
    pub principals: Vec<Pattern>,
    /// Excluded peer identities.
    pub not_principals: Vec<Pattern>,
    /// JWT principals (`iss/sub`), HTTP only.
    pub request_principals: Vec<Pattern>,
    /// Excluded JWT principals.
    pub not_request_principals: Vec<Pattern>,
    /// Peer namespaces.
    pub namespaces: Vec<Pattern>,
    /// Excluded peer namespaces.
    pub not_namespaces: Vec<Pattern>,
    /// Peer service accounts (`ns/sa`).
    pub service_accounts: Vec<String>,
    /// Excluded peer service accounts.
    pub not_service_accounts: Vec<String>,
    /// Source IPs.
    pub ip_blocks: Vec<Cidr>,
    /// Excluded source IPs.
    pub not_ip_blocks: Vec<Cidr>,
    /// Original client IPs (X-Forwarded-For); the same as ip_blocks for mesh traffic.
    pub remote_ip_blocks: Vec<Cidr>,
    /// Excluded original client IPs.
    pub not_remote_ip_blocks: Vec<Cidr>,
}

impl Decode for Source {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let s = Source {
                principals: f.list("principals"),
                not_principals: f.list("notPrincipals"),
                request_principals: f.list("requestPrincipals"),
                not_request_principals: f.list("notRequestPrincipals"),
                namespaces: f.list("namespaces"),
                not_namespaces: f.list("notNamespaces"),
                service_accounts: f.list("serviceAccounts"),
                not_service_accounts: f.list("notServiceAccounts"),
                ip_blocks: f.list("ipBlocks"),
                not_ip_blocks: f.list("notIpBlocks"),
                remote_ip_blocks: f.list("remoteIpBlocks"),
                not_remote_ip_blocks: f.list("notRemoteIpBlocks"),
            };
            let accounts = !s.service_accounts.is_empty() || !s.not_service_accounts.is_empty();
            let identities = ["principals", "notPrincipals", "namespaces", "notNamespaces"];
            if accounts && identities.iter().any(|k| f.has(k)) {
                f.error_at(
                    "serviceAccounts",
                    "serviceAccounts cannot be combined with principals or namespaces (or their not- forms)",
                );
            }
            for (key, list) in [
                ("serviceAccounts", &s.service_accounts),
                ("notServiceAccounts", &s.not_service_accounts),
            ] {
                for (i, sa) in list.iter().enumerate() {
                    let parts: Vec<&str> = sa.split('/').collect();
                    if parts.len() > 2 || parts.iter().any(|p| p.is_empty()) || sa.contains('*') {
                        f.error_item(key, i, format!("{sa:?} is not `name` or `namespace/name`"));
                    }
                }
            }
            reject_empty(f, value, &SOURCE_FIELDS);
            s
        })
    }
}

/// `Operation`: every non-empty field must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct Operation {
    /// Host header values (HTTP).
    pub hosts: Vec<Pattern>,
    /// Excluded hosts.
    pub not_hosts: Vec<Pattern>,
    /// Destination ports.
    #[schemars(with = "Vec<String>")]
    pub ports: Vec<u16>,
    /// Excluded ports.
    #[schemars(with = "Vec<String>")]
    pub not_ports: Vec<u16>,
    /// Methods (HTTP).
    pub methods: Vec<Pattern>,
    /// Excluded methods.
    pub not_methods: Vec<Pattern>,
    /// Paths (HTTP).
    pub paths: Vec<Pattern>,
    /// Excluded paths.
    pub not_paths: Vec<Pattern>,
}

struct PortString(u16);

impl Decode for PortString {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        let text = match value {
            Value::Number(n) => {
                cx.warn(format!(
                    "ports are strings in Istio's API (\"{n}\"); `kubectl apply` would refuse a number"
                ));
                n.to_string()
            }
            other => String::decode(other, cx)?,
        };
        match text.parse::<u16>() {
            Ok(port) => Some(PortString(port)),
            Err(_) => {
                cx.error(format!("{text:?} is not a port number (0-65535)"));
                None
            }
        }
    }
}

impl Decode for Operation {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        let ports = |f: &mut Fields<'_, '_>, key: &str| -> Vec<u16> {
            f.list::<PortString>(key).into_iter().map(|p| p.0).collect()
        };
        cx.object(value, true, |f| {
            let o = Operation {
                hosts: f.list("hosts"),
                not_hosts: f.list("notHosts"),
                ports: ports(f, "ports"),
                not_ports: ports(f, "notPorts"),
                methods: f.list("methods"),
                not_methods: f.list("notMethods"),
                paths: f.list("paths"),
                not_paths: f.list("notPaths"),
            };
            reject_empty(f, value, &OPERATION_FIELDS);
            o
        })
    }
}

/// The fields of `Source`.
const SOURCE_FIELDS: [&str; 12] = [
    "principals",
    "notPrincipals",
    "requestPrincipals",
    "notRequestPrincipals",
    "namespaces",
    "notNamespaces",
    "serviceAccounts",
    "notServiceAccounts",
    "ipBlocks",
    "notIpBlocks",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
];

/// The fields of `Operation`.
const OPERATION_FIELDS: [&str; 8] = [
    "hosts",
    "notHosts",
    "ports",
    "notPorts",
    "methods",
    "notMethods",
    "paths",
    "notPaths",
];

/// Istio refuses an empty source or operation, which would match everything. Only known
/// fields count: a misspelled one (`principal:`) must not make an ALLOW rule match everyone.
fn reject_empty(f: &mut Fields<'_, '_>, value: &Value, fields: &[&str]) {
    let set = fields.iter().any(|key| {
        !matches!(value.get(key), None | Some(Value::Null))
            && !matches!(value.get(key), Some(Value::Sequence(s)) if s.is_empty())
    });
    if !set {
        f.cx().error(format!(
            "must set at least one of {} (an empty one would match everything)",
            fields.join(", ")
        ));
    }
}

/// Checks one condition value.
type ValueCheck = fn(&str) -> bool;

/// Keys Istio accepts in `when` conditions.
const CONDITION_KEYS: &[&str] = &[
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "source.serviceAccount",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "destination.ip",
    "destination.port",
    "connection.sni",
];

/// `Condition` (`when`).
#[derive(Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[schemars(rename_all = "camelCase", default)]
pub struct Condition {
    /// Attribute name, e.g. `source.ip` or `request.headers[x-token]`.
    pub key: String,
    /// Allowed values.
    pub values: Vec<String>,
    /// Excluded values.
    pub not_values: Vec<String>,
}

impl Decode for Condition {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let c = Condition {
                key: f.req("key"),
                values: f.list("values"),
                not_values: f.list("notValues"),
            };
            let bracketed = |prefix: &str| {
                c.key
                    .strip_prefix(prefix)
                    .and_then(|rest| rest.strip_suffix(']'))
                    .is_some_and(|inner| !inner.is_empty())
            };
            let known = CONDITION_KEYS.contains(&c.key.as_str())
                || bracketed("request.headers[")
                || bracketed("request.auth.claims[")
                || c.key.starts_with("experimental.envoy.filters.");
            if !c.key.is_empty() && !known {
                f.error_at(
                    "key",
                    format!(
                        "unknown condition key {:?}; expected request.headers[NAME], \
                         request.auth.claims[NAME] or one of {}",
                        c.key,
                        CONDITION_KEYS.join(", ")
                    ),
                );
            }
            if c.values.is_empty() && c.not_values.is_empty() {
                f.cx().error("a condition needs values or notValues");
            }
            let checks: [(&str, ValueCheck); 3] = [
                ("source.ip", |v| Cidr::parse(v).is_ok()),
                ("remote.ip", |v| Cidr::parse(v).is_ok()),
                ("destination.port", |v| v.parse::<u16>().is_ok()),
            ];
            for (key, valid) in checks {
                if c.key == key {
                    for (field, list) in [("values", &c.values), ("notValues", &c.not_values)] {
                        for (i, v) in list.iter().enumerate() {
                            if !valid(v) {
                                f.error_item(field, i, format!("{v:?} is not valid for {key}"));
                            }
                        }
                    }
                }
            }
            c
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::decode::decode_yaml as decode;

    #[test]
    fn the_issue_example_policy_is_valid_and_l4() {
        let (spec, found) = decode::<AuthorizationPolicySpec>(
            r#"
selector: {matchLabels: {app: web-app}}
rules:
- from: [{source: {principals: ["cluster.local/ns/default/sa/api-service"]}}]
- from: [{source: {namespaces: ["ops"]}}]
  to: [{operation: {ports: ["9000"]}}]
"#,
        );
        assert!(found.is_empty(), "{found:#?}");
        let spec = spec.unwrap();
        assert_eq!(spec.action, Action::Allow);
        assert_eq!(spec.rules[1].to[0].ports, [9000]);
        assert!(!spec.uses_l7());
        let (l7, _) = decode::<AuthorizationPolicySpec>(
            "{rules: [{to: [{operation: {methods: [GET], paths: ['/api/v1/*']}}]}]}",
        );
        assert!(l7.unwrap().uses_l7());
    }

    #[test]
    fn authorization_policy_rules() {
        let (_, found) = decode::<AuthorizationPolicySpec>(
            r#"
action: DENY
provider: {name: ext}
"#,
        );
        assert!(
            found.iter().any(|f| f.starts_with("rules: DENY needs")),
            "{found:#?}"
        );
        let (_, found) = decode::<AuthorizationPolicySpec>(
            r#"
action: CUSTOM
rules:
- from: []
  to: [{operation: {ports: ["http"]}}]
  when: [{key: destination.namespace, values: [x]}, {key: source.ip}]
- from: [{source: {}}]
"#,
        );
        let want = [
            "provider: CUSTOM needs a provider",
            "rules[0].from: must not be an empty list (leave it out instead)",
            "rules[0].to[0].operation.ports[0]: \"http\" is not a port number (0-65535)",
            "rules[0].when[1]: a condition needs values or notValues",
            "rules[1].from[0].source: must set at least one of principals, notPrincipals, requestPrincipals, notRequestPrincipals, namespaces, notNamespaces, serviceAccounts, notServiceAccounts, ipBlocks, notIpBlocks, remoteIpBlocks, notRemoteIpBlocks (an empty one would match everything)",
        ];
        for w in want {
            assert!(found.iter().any(|f| f == w), "missing {w:?} in {found:#?}");
        }
        assert!(found
            .iter()
            .any(|f| f.starts_with("rules[0].when[0].key: unknown condition key")));
        let (_, found) = decode::<AuthorizationPolicySpec>("{action: REJECT}");
        assert_eq!(
            found,
            ["action: unknown value \"REJECT\"; expected one of ALLOW, DENY, AUDIT, CUSTOM"]
        );
    }

    #[test]
    fn peer_authentication_modes() {
        let (spec, found) = decode::<PeerAuthenticationSpec>(
            "{selector: {matchLabels: {app: a}}, mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: PERMISSIVE}}}",
        );
        assert!(found.is_empty(), "{found:#?}");
        let spec = spec.unwrap();
        assert_eq!(spec.mtls, Some(MtlsMode::Strict));
        assert_eq!(spec.port_level_mtls[&8080], MtlsMode::Permissive);
        assert!(spec.has_selector());
        let (_, found) = decode::<PeerAuthenticationSpec>("{mtls: {mode: DISABLE}}");
        assert!(
            found[0].contains("Istio ambient does not support"),
            "{found:#?}"
        );
        let (_, found) = decode::<PeerAuthenticationSpec>(
            "{mtls: {mode: strict}, portLevelMtls: {0: {mode: STRICT}}}",
        );
        assert_eq!(found.len(), 2, "{found:#?}");
    }

    #[test]
    fn a_misspelled_field_never_leaves_a_source_that_matches_everyone() {
        let (_, found) = decode::<AuthorizationPolicySpec>(
            "{rules: [{from: [{source: {principal: [cluster.local/ns/a/sa/b]}}]}]}",
        );
        assert!(
            found
                .iter()
                .any(|f| f.starts_with("rules[0].from[0].source: must set at least one of")),
            "{found:#?}"
        );
        assert!(found
            .iter()
            .any(|f| f.starts_with("rules[0].from[0].source.principal: unknown field")));
        // A field with a bad value is one error, not also "empty source".
        let (_, found) =
            decode::<AuthorizationPolicySpec>("{rules: [{to: [{operation: {ports: [http]}}]}]}");
        assert_eq!(found.len(), 1, "{found:#?}");
        // A misspelled action is one error, not also "provider is only for CUSTOM".
        let (_, found) = decode::<AuthorizationPolicySpec>(
            "{action: custom, provider: {name: ext}, rules: [{}]}",
        );
        assert_eq!(found.len(), 1, "{found:#?}");
        let (_, found) = decode::<AuthorizationPolicySpec>("{action: DENY, rules: []}");
        assert_eq!(
            found,
            ["rules: DENY needs at least one rule (a DENY with no rules would match nothing)"]
        );
        let (spec, found) = decode::<AuthorizationPolicySpec>(
            "{rules: [{from: [{source: {serviceAccounts: [api, ops/tool]}}], when: [{key: source.ip, notValues: [bad]}]}]}",
        );
        assert_eq!(
            found,
            ["rules[0].when[0].notValues[0]: \"bad\" is not valid for source.ip"]
        );
        assert!(spec.is_some());
        let (_, found) = decode::<PeerAuthenticationSpec>(
            "{selector: {matchLabels: {a: b}}, mtls: {mode: BAD}, portLevelMtls: {}}",
        );
        assert_eq!(
            found.len(),
            2,
            "empty portLevelMtls is reported despite another error: {found:#?}"
        );
    }
}
