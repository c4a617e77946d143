//! AuthorizationPolicy at L4, with Istio's semantics.
//!
//! Evaluation order for a connection to a workload: CUSTOM policies are not supported by the
//! node proxy (as in Istio ambient's ztunnel) and are skipped; any matching DENY policy
//! denies; if any ALLOW policy applies to the workload, the connection must match one of
//! them; otherwise it is allowed. AUDIT policies never change the outcome; a match is
//! recorded. Rules OR; inside a rule `from`, `to` and `when` must all match; inside those,
//! every set field must match.
//!
//! HTTP attributes (methods, paths, hosts, request principals, `request.*` conditions) are
//! not known at L4. As Istio ambient's L4 proxy does, an ALLOW rule that uses them never
//! matches, and a DENY rule that uses them applies on its L4 part alone (which denies more,
//! never less). A warning is logged when such a policy applies to a local workload.

use std::net::Ipv4Addr;

use serde::Serialize;

use crate::{
    config::{
        security::{Action, AuthorizationPolicySpec, Condition, Operation, Rule, Source},
        values::{Cidr, Pattern},
    },
    state::Ref,
};

/// What is known about a connection at L4.
#[derive(Clone, Copy, Debug)]
pub struct Connection<'a> {
    /// The client's SPIFFE ID (`spiffe://td/ns/x/sa/y`), if it authenticated with mTLS.
    pub source_identity: Option<&'a str>,
    /// The client's address.
    pub source_ip: Ipv4Addr,
    /// The destination workload's address.
    pub destination_ip: Ipv4Addr,
    /// The destination port (the workload's port).
    pub destination_port: u16,
    /// The HTTP request, when the port speaks HTTP and the proxy parses it.
    pub request: Option<HttpAttrs<'a>>,
}

/// What an AuthorizationPolicy can see of an HTTP request.
#[derive(Clone, Copy, Debug)]
pub struct HttpAttrs<'a> {
    /// Method.
    pub method: &'a str,
    /// Path without the query string.
    pub path: &'a str,
    /// `Host` / `:authority`.
    pub host: &'a str,
    /// Request headers.
    pub headers: &'a http::HeaderMap,
}

impl Connection<'_> {
    /// Istio's `source.principal`: the SPIFFE ID without `spiffe://`; empty without mTLS.
    fn principal(&self) -> &str {
        self.source_identity
            .map(|id| id.strip_prefix("spiffe://").unwrap_or(id))
            .unwrap_or("")
    }

    /// `source.namespace`, from the identity; empty without mTLS.
    fn namespace(&self) -> &str {
        self.principal()
            .split_once("/ns/")
            .and_then(|(_, rest)| rest.split_once('/'))
            .map_or("", |(ns, _)| ns)
    }

    /// `<namespace>/<service account>`, for `serviceAccounts`.
    fn service_account(&self) -> String {
        let principal = self.principal();
        match principal.split_once("/sa/") {
            Some((_, sa)) if !self.namespace().is_empty() => format!("{}/{sa}", self.namespace()),
            _ => String::new(),
        }
    }
}

/// The outcome for one connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// Whether the connection may proceed.
    pub allowed: bool,
    /// The policy that decided (`namespace/name`): the matching DENY or ALLOW policy; none
    /// when no ALLOW policy applies, or when ALLOW policies apply and none matched.
    pub policy: Option<String>,
    /// Why, in a few words.
    pub reason: &'static str,
    /// AUDIT policies that matched.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub audited: Vec<String>,
}

/// Decides a connection against the AuthorizationPolicies that apply to its destination.
pub fn authorize(policies: &[Ref<AuthorizationPolicySpec>], conn: &Connection<'_>) -> Decision {
    let mut audited = Vec::new();
    for policy in policies.iter().filter(|p| p.0.spec.action == Action::Audit) {
        if policy_matches(&policy.0.spec, conn) {
            audited.push(policy.0.metadata.qualified());
        }
    }
    if let Some(deny) = policies
        .iter()
        .find(|p| p.0.spec.action == Action::Deny && policy_matches(&p.0.spec, conn))
    {
        return Decision {
            allowed: false,
            policy: Some(deny.0.metadata.qualified()),
            reason: "denied by a DENY policy",
            audited,
        };
    }
    let mut allows = policies
        .iter()
        .filter(|p| p.0.spec.action == Action::Allow)
        .peekable();
    if allows.peek().is_none() {
        return Decision {
            allowed: true,
            policy: None,
            reason: "no ALLOW policy applies",
            audited,
        };
    }
    match allows.find(|p| policy_matches(&p.0.spec, conn)) {
        Some(allow) => Decision {
            allowed: true,
            policy: Some(allow.0.metadata.qualified()),
            reason: "allowed by an ALLOW policy",
            audited,
        },
        None => Decision {
            allowed: false,
            policy: None,
            reason: "no ALLOW policy matched",
            audited,
        },
    }
}

/// Whether a rule of the policies matches request paths (`paths` or `notPaths`) on `port`.
pub fn matches_paths(policies: &[Ref<AuthorizationPolicySpec>], port: u16) -> bool {
    policies.iter().any(|p| {
        p.0.spec.rules.iter().flat_map(|r| &r.to).any(|o| {
            (!o.paths.is_empty() || !o.not_paths.is_empty())
                && (o.ports.is_empty() || o.ports.contains(&port))
                && !o.not_ports.contains(&port)
        })
    })
}

/// Whether any rule of the policy matches at L4.
fn policy_matches(spec: &AuthorizationPolicySpec, conn: &Connection<'_>) -> bool {
    spec.rules.iter().any(|rule| {
        // Without the request (an L4 port), an ALLOW (or AUDIT) rule that needs HTTP
        // attributes never matches; a DENY rule is judged on its L4 part.
        if rule.uses_l7() && conn.request.is_none() && spec.action != Action::Deny {
            return false;
        }
        rule_matches(rule, conn)
    })
}

fn rule_matches(rule: &Rule, conn: &Connection<'_>) -> bool {
    (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, conn)))
        && (rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, conn)))
        && rule.when.iter().all(|c| condition_matches(c, conn))
}

/// `field` matches when empty or when a pattern matches; `not_field` when none does.
fn patterns(want: &[Pattern], not: &[Pattern], value: &str) -> bool {
    (want.is_empty() || want.iter().any(|p| p.matches(value)))
        && !not.iter().any(|p| p.matches(value))
}

fn cidrs(want: &[Cidr], not: &[Cidr], ip: Ipv4Addr) -> bool {
    (want.is_empty() || want.iter().any(|c| c.contains(ip))) && !not.iter().any(|c| c.contains(ip))
}

fn source_matches(source: &Source, conn: &Connection<'_>) -> bool {
    let account = conn.service_account();
    // No RequestAuthentication (JWT) in this mesh: a request's principal is empty, so
    // `requestPrincipals: ["*"]` never matches. At L4 these fields never get here for ALLOW.
    let request_principal = conn.request.is_none()
        || patterns(
            &source.request_principals,
            &source.not_request_principals,
            "",
        );
    request_principal
        && patterns(&source.principals, &source.not_principals, conn.principal())
        && patterns(&source.namespaces, &source.not_namespaces, conn.namespace())
        && (source.service_accounts.is_empty() || source.service_accounts.contains(&account))
        && !source.not_service_accounts.contains(&account)
        && cidrs(&source.ip_blocks, &source.not_ip_blocks, conn.source_ip)
        // At L4 the remote address is the peer's address.
        && cidrs(
            &source.remote_ip_blocks,
            &source.not_remote_ip_blocks,
            conn.source_ip,
        )
}

fn operation_matches(operation: &Operation, conn: &Connection<'_>) -> bool {
    let port = conn.destination_port;
    let l4 = (operation.ports.is_empty() || operation.ports.contains(&port))
        && !operation.not_ports.contains(&port);
    let Some(request) = conn.request else {
        return l4;
    };
    // Hosts compare without case, with or without the port.
    let host = request.host.to_ascii_lowercase();
    let bare = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
    let host_matches = |patterns: &[Pattern]| {
        patterns.iter().any(|p| {
            let p = lowercase(p);
            p.matches(&host) || p.matches(bare)
        })
    };
    l4 && patterns(&operation.methods, &operation.not_methods, request.method)
        && patterns(&operation.paths, &operation.not_paths, request.path)
        && (operation.hosts.is_empty() || host_matches(&operation.hosts))
        && !host_matches(&operation.not_hosts)
}

fn lowercase(pattern: &Pattern) -> Pattern {
    match pattern {
        Pattern::Exact(s) => Pattern::Exact(s.to_ascii_lowercase()),
        Pattern::Prefix(s) => Pattern::Prefix(s.to_ascii_lowercase()),
        Pattern::Suffix(s) => Pattern::Suffix(s.to_ascii_lowercase()),
        other => other.clone(),
    }
}

/// A `when` condition. Keys about HTTP requests are not known at L4 and count as matching
/// (only DENY rules get this far with them).
fn condition_matches(condition: &Condition, conn: &Connection<'_>) -> bool {
    let check = |matches: &dyn Fn(&str) -> bool| {
        (condition.values.is_empty() || condition.values.iter().any(|v| matches(v)))
            && !condition.not_values.iter().any(|v| matches(v))
    };
    let text = |value: &str| check(&|want: &str| Pattern::parse(want).matches(value));
    let ip =
        |addr: Ipv4Addr| check(&|want: &str| Cidr::parse(want).is_ok_and(|c| c.contains(addr)));
    match condition.key.as_str() {
        "source.ip" | "remote.ip" => ip(conn.source_ip),
        "destination.ip" => ip(conn.destination_ip),
        "destination.port" => check(&|want: &str| want.parse() == Ok(conn.destination_port)),
        "source.principal" => text(conn.principal()),
        "source.namespace" => text(conn.namespace()),
        "source.serviceAccount" => text(&conn.service_account()),
        // No SNI inside the mesh's own tunnel.
        "connection.sni" => text(""),
        key => match (conn.request, key.strip_prefix("request.headers[")) {
            (Some(request), Some(name)) => {
                let name = name.trim_end_matches(']');
                let value = request.headers.get(name).and_then(|v| v.to_str().ok());
                // A missing header matches no value, and is not excluded by any.
                match value {
                    Some(value) => text(value),
                    None => condition.values.is_empty(),
                }
            }
            // No request authentication (JWT) in the mesh: its principal and claims are empty.
            (Some(_), None) if key.starts_with("request.auth.") => text(""),
            (Some(_), None) => false,
            // At L4 (DENY rules only get here): judged on the L4 part.
            (None, _) => true,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::parse_str;

    fn policies(yaml: &str) -> Vec<Ref<AuthorizationPolicySpec>> {
        let resources = parse_str("p.yaml", yaml).unwrap_or_else(|e| panic!("{}", e.render()));
        resources
            .authorization_policies
            .into_iter()
            .map(|p| Ref(Arc::new(p)))
            .collect()
    }

    const ISSUE: &str = r#"
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: web-app-l4, namespace: default}
spec:
  selector: {matchLabels: {app: web-app}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/api-service"]}}]
  - from: [{source: {namespaces: ["ops"]}}]
    to: [{operation: {ports: ["9000"]}}]
"#;

    fn conn(identity: Option<&str>, port: u16) -> Connection<'_> {
        Connection {
            source_identity: identity,
            source_ip: Ipv4Addr::new(100, 64, 1, 5),
            destination_ip: Ipv4Addr::new(100, 64, 2, 7),
            destination_port: port,
            request: None,
        }
    }

    const API: &str = "spiffe://cluster.local/ns/default/sa/api-service";
    const OPS: &str = "spiffe://cluster.local/ns/ops/sa/tools";
    const OTHER: &str = "spiffe://cluster.local/ns/default/sa/other";

    #[test]
    fn the_issue_policy() {
        let p = policies(ISSUE);
        let allowed = |id, port| authorize(&p, &conn(id, port)).allowed;
        assert!(allowed(Some(API), 8080));
        assert!(allowed(Some(API), 9000));
        assert!(allowed(Some(OPS), 9000));
        assert!(!allowed(Some(OPS), 8080));
        assert!(!allowed(Some(OTHER), 9000));
        assert!(!allowed(None, 9000), "plaintext has no namespace");
        let d = authorize(&p, &conn(Some(API), 1));
        assert_eq!(d.policy.as_deref(), Some("default/web-app-l4"));
        assert_eq!(
            authorize(&p, &conn(Some(OTHER), 1)).reason,
            "no ALLOW policy matched"
        );
    }

    #[test]
    fn deny_wins_and_empty_allow_denies_everything() {
        let deny = r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-api, namespace: default}
spec:
  action: DENY
  rules: [{from: [{source: {principals: ["*/sa/api-service"]}}]}]
"#;
        let p = policies(&format!("{ISSUE}{deny}"));
        let d = authorize(&p, &conn(Some(API), 8080));
        assert!(!d.allowed);
        assert_eq!(d.policy.as_deref(), Some("default/no-api"));
        assert!(authorize(&p, &conn(Some(OPS), 9000)).allowed, "control");
        let nothing = policies(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x, namespace: default}\nspec: {}\n",
        );
        assert!(!authorize(&nothing, &conn(Some(API), 80)).allowed);
        assert!(
            authorize(&[], &conn(None, 80)).allowed,
            "no policy: allowed"
        );
    }

    #[test]
    fn negations_ip_blocks_conditions_and_audit() {
        let p = policies(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: plaintext, namespace: default}
spec:
  action: DENY
  rules: [{from: [{source: {notPrincipals: ["*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: default}
spec:
  rules:
  - from: [{source: {ipBlocks: ["100.64.1.0/24"], notNamespaces: ["ops"]}}]
    to: [{operation: {notPorts: ["22"]}}]
    when: [{key: source.principal, values: ["*/sa/api-service", "*/sa/other"]}, {key: destination.port, notValues: ["23"]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: watch, namespace: default}
spec:
  action: AUDIT
  rules: [{to: [{operation: {ports: ["8080"]}}]}]
"#,
        );
        let d = authorize(&p, &conn(None, 8080));
        assert_eq!(
            (d.allowed, d.policy.as_deref()),
            (false, Some("default/plaintext"))
        );
        let d = authorize(&p, &conn(Some(API), 8080));
        assert!(d.allowed);
        assert_eq!(d.audited, ["default/watch"]);
        assert!(authorize(&p, &conn(Some(OTHER), 9000)).allowed);
        assert!(!authorize(&p, &conn(Some(API), 22)).allowed, "notPorts");
        assert!(!authorize(&p, &conn(Some(API), 23)).allowed, "notValues");
        assert!(
            !authorize(&p, &conn(Some(OPS), 80)).allowed,
            "notNamespaces"
        );
        let mut elsewhere = conn(Some(API), 80);
        elsewhere.source_ip = Ipv4Addr::new(100, 64, 9, 9);
        assert!(!authorize(&p, &elsewhere).allowed, "ipBlocks");
    }

    #[test]
    fn http_rules_at_l4() {
        let p = policies(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: default}
spec:
  rules: [{from: [{source: {principals: ["cluster.local/ns/default/sa/api-service"]}}], to: [{operation: {methods: ["GET"]}}]}]
"#,
        );
        assert!(
            !authorize(&p, &conn(Some(API), 80)).allowed,
            "an ALLOW rule with HTTP fields never matches at L4"
        );
        let p = policies(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-post, namespace: default}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: ["ops"]}}], to: [{operation: {methods: ["POST"]}}]}]
"#,
        );
        assert!(
            !authorize(&p, &conn(Some(OPS), 80)).allowed,
            "DENY applies on its L4 part"
        );
        assert!(
            authorize(&p, &conn(Some(API), 80)).allowed,
            "and only on it"
        );
    }

    #[test]
    fn service_accounts_field() {
        let p = policies(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: sa, namespace: default}
spec:
  rules: [{from: [{source: {serviceAccounts: ["default/api-service"]}}]}]
"#,
        );
        assert!(authorize(&p, &conn(Some(API), 80)).allowed);
        assert!(!authorize(&p, &conn(Some(OTHER), 80)).allowed);
    }

    #[test]
    fn http_rules_per_request() {
        let p = policies(
            r#"
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: web-app-policy, namespace: default}
spec:
  selector: {matchLabels: {app: web-app}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/api-service"]}}]
    to: [{operation: {methods: ["GET"], paths: ["/api/v1/*"]}}]
  - from: [{source: {principals: ["cluster.local/ns/default/sa/admin-service"]}}]
    to: [{operation: {methods: ["*"]}}]
  - to: [{operation: {hosts: ["Status.Example"], notPaths: ["/private*"]}}]
    when: [{key: "request.headers[x-token]", values: ["ok-*"]}]
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: no-delete, namespace: default}
spec:
  action: DENY
  rules: [{to: [{operation: {methods: [DELETE]}}], when: [{key: request.auth.principal, values: ["*"]}]}]
"#,
        );
        let admin = "spiffe://cluster.local/ns/default/sa/admin-service";
        let check =
            |id: Option<&str>, method: &str, path: &str, host: &str, token: Option<&str>| {
                let mut headers = http::HeaderMap::new();
                if let Some(t) = token {
                    headers.insert("x-token", t.parse().unwrap());
                }
                let mut c = conn(id, 8080);
                c.request = Some(HttpAttrs {
                    method,
                    path,
                    host,
                    headers: &headers,
                });
                authorize(&p, &c).allowed
            };
        let h = "web-app:8080";
        assert!(check(Some(API), "GET", "/api/v1/users", h, None));
        assert!(!check(Some(API), "POST", "/api/v1/users", h, None));
        assert!(!check(Some(API), "GET", "/admin", h, None));
        assert!(!check(Some(API), "GET", "/api/v2/users", h, None));
        assert!(
            check(Some(admin), "DELETE", "/anything", h, None),
            "no JWT principal"
        );
        assert!(!check(Some(OTHER), "GET", "/api/v1/users", h, None));
        // Hosts without case and port; a header condition; notPaths.
        assert!(check(
            None,
            "GET",
            "/health",
            "status.example:80",
            Some("ok-1")
        ));
        assert!(!check(
            None,
            "GET",
            "/health",
            "status.example",
            Some("bad")
        ));
        assert!(!check(None, "GET", "/health", "status.example", None));
        assert!(!check(
            None,
            "GET",
            "/private/x",
            "status.example",
            Some("ok-1")
        ));
        // A JWT requirement: nobody carries one here.
        let jwt = policies(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: jwt, namespace: default}
spec: {rules: [{from: [{source: {requestPrincipals: ["*"]}}]}]}
"#,
        );
        let headers = http::HeaderMap::new();
        let mut c = conn(Some(API), 8080);
        c.request = Some(HttpAttrs {
            method: "GET",
            path: "/",
            host: h,
            headers: &headers,
        });
        assert!(!authorize(&jwt, &c).allowed);
        // The same policy on an L4 port: the HTTP rules never allow.
        assert!(!authorize(&p, &conn(Some(API), 8080)).allowed);
    }
}
