//! The destination side's policy gate: the one module that decides whether a client may reach
//! a port of an enrolled pod of this node. PeerAuthentication (STRICT refuses a client without
//! a mesh identity), AuthorizationPolicy ([`authz`], per connection or per HTTP request) and
//! the AUDIT record are decided here and nowhere else. A connection decided as a whole is
//! decided again when the policy changes, and closed if now refused ([`revoke`]).
//!
//! The proxy connects to a destination only with an [`Authorized`] in hand
//! (`transport::connect`), and only this module makes one: [`connection`] and [`request`] for
//! an enrolled pod of this node, [`elsewhere`] for any other destination, whose own node (or
//! nobody) applies policy, and which refuses an enrolled pod of this node. A path that skips
//! the gate does not compile:
//!
//! ```compile_fail
//! // Outside this module an `Authorized` cannot be built: its fields are private.
//! let pass = mesh_node::gate::Authorized {
//!     target: "100.64.0.2:80".parse().unwrap(),
//!     decision: None,
//!     elsewhere: true,
//! };
//! ```

pub mod authz;
pub mod revoke;

use std::net::{Ipv4Addr, SocketAddr};

pub use authz::{Decision, HttpAttrs};
pub use revoke::{Asked, Registration, Revocations, Revoked};

use crate::{
    config::{
        paths::{self, PathSettings},
        security::MtlsMode,
    },
    state::{State, Workload},
};

/// The client as the gate sees it.
#[derive(Clone, Copy, Debug)]
pub struct Client<'a> {
    /// Its address (the pod's, or the peer node's for HBONE).
    pub addr: SocketAddr,
    /// Its SPIFFE ID, when it proved one: by mTLS (HBONE), or an enrolled pod of this node
    /// known in-process.
    pub identity: Option<&'a str>,
}

impl Client<'_> {
    fn ip(&self) -> Ipv4Addr {
        match self.addr {
            SocketAddr::V4(v4) => *v4.ip(),
            SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
        }
    }
}

/// Leave to connect to one destination address. Only this module makes one.
#[derive(Debug)]
pub struct Authorized {
    target: SocketAddr,
    /// The AuthorizationPolicy decision, where one was made (a local enrolled pod).
    decision: Option<Decision>,
    /// Made by [`elsewhere`]: the destination's own node decides.
    elsewhere: bool,
}

impl Authorized {
    /// Where the connection may go.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// The decision that allowed it (none where this node's policy does not apply, or where
    /// each request is decided on its own).
    pub fn decision(&self) -> Option<&Decision> {
        self.decision.as_ref()
    }

    /// The decision, for the connection's record.
    pub fn into_decision(self) -> Option<Decision> {
        self.decision
    }

    /// The leave to reach the HBONE port (`15008`) at the same address: the node proxy in
    /// front of a pod of another node. Only for a destination [`elsewhere`] let through.
    pub fn tunnel(&self) -> Option<Authorized> {
        let SocketAddr::V4(target) = self.target else {
            return None;
        };
        self.elsewhere.then(|| Authorized {
            target: SocketAddr::from((*target.ip(), mesh_common::PORT_HBONE)),
            decision: None,
            elsewhere: true,
        })
    }
}

/// How a port of a local pod is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// As a byte stream: AuthorizationPolicy decides the connection.
    Connection,
    /// Request by request (a Service port that declares HTTP): PeerAuthentication decides the
    /// connection, AuthorizationPolicy each request ([`request`]).
    PerRequest,
}

/// A connection from `client` to `target`, a port of `destination` (an enrolled pod of this
/// node), served as `served`. `Err` is the decision that refuses it.
pub fn connection(
    destination: &Workload,
    client: Client<'_>,
    target: SocketAddr,
    served: Served,
) -> Result<Authorized, Decision> {
    peer_authentication(destination, client, target)?;
    if served == Served::PerRequest {
        return Ok(Authorized {
            target,
            decision: None,
            elsewhere: false,
        });
    }
    authorize(destination, client, target, None)
}

/// One HTTP request from `client` to `target`, a port of `destination` (an enrolled pod of this
/// node). PeerAuthentication is decided again: a request on a connection opened before a
/// change to STRICT is refused like a new one.
pub fn request(
    destination: &Workload,
    client: Client<'_>,
    target: SocketAddr,
    request: HttpAttrs<'_>,
) -> Result<Authorized, Decision> {
    peer_authentication(destination, client, target)?;
    authorize(destination, client, target, Some(request))
}

/// Why an HTTP request is refused ([`http_request`]).
#[derive(Debug)]
pub enum Refused {
    /// A path servers could read as another one where policy matches paths: 400, with why.
    Path(String),
    /// The policy's decision: 403.
    Policy(Decision),
}

/// One HTTP request, as both places that decide a local pod's requests (its own inbound side,
/// and a client's proxy balancing a Service to it) must: the path ([`path`]), then the
/// policy ([`request`]).
pub fn http_request(
    destination: &Workload,
    client: Client<'_>,
    target: SocketAddr,
    attrs: HttpAttrs<'_>,
    paths: PathSettings,
) -> Result<Authorized, Refused> {
    path(destination, target, attrs.path, paths).map_err(Refused::Path)?;
    request(destination, client, target, attrs).map_err(Refused::Policy)
}

/// The path of a request to `target`, a port of `destination`: where an AuthorizationPolicy
/// matches paths on that port, a path that servers could read as another one (an encoded
/// slash, `;` parameters, ...: `config::paths::ambiguity`) is refused unless the mesh
/// allows ambiguous paths. `Err` says why (answered 400).
fn path(
    destination: &Workload,
    target: SocketAddr,
    path: &str,
    settings: PathSettings,
) -> Result<(), String> {
    if !settings.reject_ambiguous
        || !authz::matches_paths(&destination.authorization, target.port())
    {
        return Ok(());
    }
    match paths::ambiguity(path, settings.normalization) {
        None => Ok(()),
        Some(what) => Err(format!(
            "ambiguous path refused: it carries {what}, and an AuthorizationPolicy of {}/{} \
             matches paths on port {}",
            destination.namespace,
            destination.name,
            target.port()
        )),
    }
}

/// A destination that is no enrolled pod of this node, where this node's policy does not
/// apply: another node's pod (its node decides), a pod outside the mesh, an address outside
/// the cluster. `Err` names an enrolled pod of this node, which must pass [`connection`] or
/// [`request`].
pub fn elsewhere(state: &State, target: SocketAddr) -> Result<Authorized, String> {
    match state.workload(target.ip()) {
        Some(pod) if pod.enrolled && state.is_local(pod) => Err(format!(
            "{target} is enrolled pod {}/{} of this node: its policy must be decided first",
            pod.namespace, pod.name
        )),
        _ => Ok(Authorized {
            target,
            decision: None,
            elsewhere: true,
        }),
    }
}

/// STRICT refuses a client without a mesh identity.
fn peer_authentication(
    destination: &Workload,
    client: Client<'_>,
    target: SocketAddr,
) -> Result<(), Decision> {
    let port = target.port();
    if client.identity.is_none() && destination.mtls.mode_for(port) == MtlsMode::Strict {
        return Err(Decision {
            allowed: false,
            policy: destination.mtls.policy_for(port).map(str::to_string),
            reason: "plaintext refused: PeerAuthentication STRICT",
            audited: Vec::new(),
        });
    }
    Ok(())
}

/// AuthorizationPolicy, and the AUDIT log line when an AUDIT policy matched.
fn authorize(
    destination: &Workload,
    client: Client<'_>,
    target: SocketAddr,
    request: Option<HttpAttrs<'_>>,
) -> Result<Authorized, Decision> {
    let decision = authz::authorize(
        &destination.authorization,
        &authz::Connection {
            source_identity: client.identity,
            source_ip: client.ip(),
            destination_ip: destination.ip,
            destination_port: target.port(),
            request,
        },
    );
    if !decision.audited.is_empty() {
        tracing::info!(
            source = %client.addr,
            identity = client.identity.unwrap_or("-"),
            destination = %target,
            allowed = decision.allowed,
            policies = ?decision.audited,
            "AUDIT policy matched"
        );
    }
    if !decision.allowed {
        return Err(decision);
    }
    Ok(Authorized {
        target,
        decision: Some(decision),
        elsewhere: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::load::parse_str, state::State};

    const NODE: &str = "node-a";

    /// A snapshot: `web` (STRICT on 9000, PERMISSIVE otherwise; an ALLOW policy for `api` on
    /// 8080 and an AUDIT one) and `lab` on this node, `far` on another, `plain` outside the
    /// mesh.
    fn state() -> State {
        let yaml = format!(
            r#"
apiVersion: v1
kind: Namespace
metadata: {{name: shop, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: lab}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: shop, labels: {{app: web}}}}
spec: {{nodeName: {NODE}, containers: [{{name: c, image: x}}]}}
status: {{podIP: 100.64.0.2}}
---
apiVersion: v1
kind: Pod
metadata: {{name: far, namespace: shop, labels: {{app: far}}}}
spec: {{nodeName: node-b, containers: [{{name: c, image: x}}]}}
status: {{podIP: 100.64.1.2}}
---
apiVersion: v1
kind: Pod
metadata: {{name: plain, namespace: lab}}
spec: {{nodeName: {NODE}, containers: [{{name: c, image: x}}]}}
status: {{podIP: 100.64.0.9}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: web, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  portLevelMtls: {{9000: {{mode: STRICT}}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: api-only, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/shop/sa/api]}}}}]
    to: [{{operation: {{ports: ["8080", "9000"], methods: [GET], notPaths: [/admin]}}}}]
  - to: [{{operation: {{ports: ["7000"]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: watch, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  action: AUDIT
  rules: [{{to: [{{operation: {{ports: ["8080"]}}}}]}}]
"#
        );
        let resources = parse_str("gate.yaml", &yaml).expect("valid");
        State::build(&resources, NODE, &Default::default(), 1)
    }

    const API: &str = "spiffe://cluster.local/ns/shop/sa/api";
    const OTHER: &str = "spiffe://cluster.local/ns/shop/sa/other";

    fn client(identity: Option<&str>) -> Client<'_> {
        Client {
            addr: "100.64.1.2:40000".parse().unwrap(),
            identity,
        }
    }

    fn web(state: &State) -> &Workload {
        &state.workloads[&"100.64.0.2".parse().unwrap()]
    }

    fn at(port: u16) -> SocketAddr {
        SocketAddr::from(([100, 64, 0, 2], port))
    }

    fn get<'a>(path: &'a str, headers: &'a http::HeaderMap) -> HttpAttrs<'a> {
        HttpAttrs {
            method: "GET",
            path,
            host: "web.shop",
            headers,
        }
    }

    #[test]
    fn strict_refuses_a_client_without_identity_and_names_the_policy() {
        let state = state();
        let refused = connection(web(&state), client(None), at(9000), Served::Connection)
            .expect_err("STRICT port, plaintext");
        assert_eq!(
            refused.reason,
            "plaintext refused: PeerAuthentication STRICT"
        );
        assert_eq!(refused.policy.as_deref(), Some("shop/web"));
        let refused = connection(web(&state), client(None), at(9000), Served::PerRequest)
            .expect_err("STRICT holds for HTTP ports too");
        assert_eq!(refused.policy.as_deref(), Some("shop/web"));
        // PERMISSIVE port: plaintext gets through PeerAuthentication, AuthorizationPolicy
        // still applies (port 7000 is open to anyone).
        let pass = connection(web(&state), client(None), at(7000), Served::Connection)
            .expect("PERMISSIVE port, allowed by the second rule");
        assert_eq!(pass.target(), at(7000));
        assert_eq!(
            pass.decision().and_then(|d| d.policy.as_deref()),
            Some("shop/api-only")
        );
    }

    #[test]
    fn a_connection_is_decided_on_its_l4_attributes() {
        let state = state();
        // The ALLOW rule for `api` needs HTTP attributes: at L4 it never matches.
        let refused = connection(web(&state), client(Some(API)), at(8080), Served::Connection)
            .expect_err("L7 ALLOW rule at L4");
        assert_eq!(refused.reason, "no ALLOW policy matched");
        assert_eq!(
            refused.audited,
            ["shop/watch"],
            "the AUDIT policy is recorded"
        );
        // On an HTTP port only PeerAuthentication decides the connection.
        let pass = connection(
            web(&state),
            client(Some(OTHER)),
            at(8080),
            Served::PerRequest,
        )
        .expect("per request: decided later");
        assert!(pass.decision().is_none());
    }

    #[test]
    fn a_request_is_decided_on_its_http_attributes_and_on_strict_again() {
        let state = state();
        let headers = http::HeaderMap::new();
        let web = web(&state);
        let pass = request(web, client(Some(API)), at(8080), get("/items", &headers))
            .expect("api may GET /items");
        assert_eq!(
            pass.decision().and_then(|d| d.policy.as_deref()),
            Some("shop/api-only")
        );
        for (who, path) in [
            (Some(API), "/admin"),
            (Some(OTHER), "/items"),
            (None, "/items"),
        ] {
            let refused =
                request(web, client(who), at(8080), get(path, &headers)).expect_err("refused");
            assert_eq!(refused.reason, "no ALLOW policy matched", "{who:?} {path}");
        }
        let refused = request(web, client(None), at(9000), get("/items", &headers))
            .expect_err("STRICT per request");
        assert_eq!(
            refused.reason,
            "plaintext refused: PeerAuthentication STRICT"
        );
    }

    #[test]
    fn elsewhere_passes_anything_but_an_enrolled_pod_of_this_node() {
        let state = state();
        for target in [
            "100.64.1.2:80",
            "100.64.0.9:80",
            "100.127.0.1:443",
            "[fd00::1]:80",
        ] {
            let target: SocketAddr = target.parse().unwrap();
            let pass = elsewhere(&state, target).unwrap_or_else(|e| panic!("{target}: {e}"));
            assert_eq!(pass.target(), target);
            assert!(pass.decision().is_none());
            if target.is_ipv4() {
                let tunnel = pass.tunnel().expect("the node proxy's HBONE port");
                assert_eq!(tunnel.target(), SocketAddr::new(target.ip(), 15008));
            }
        }
        let headers = http::HeaderMap::new();
        let local =
            request(web(&state), client(Some(API)), at(8080), get("/", &headers)).expect("allowed");
        assert!(local.tunnel().is_none(), "a local pod is reached directly");
        let refused = elsewhere(&state, at(80)).expect_err("local enrolled pod");
        assert!(refused.contains("shop/web"), "{refused}");
    }
}
