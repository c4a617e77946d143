//! Decide, then do: what the proxy does with a captured connection, decided by pure functions
//! of one config snapshot and the connection's facts. The listeners (`proxy`) act on the
//! [`Plan`]; nothing here does I/O.
//!
//! - [`outbound`]: a connection from a local enrolled pod (`:15001`).
//! - [`inbound`]: plaintext to a local enrolled pod, or to a Service, NodePort or hostPort
//!   leading to one, from a client outside the mesh (`:15006`).
//! - [`tunnel`]: an HBONE CONNECT stream to a local enrolled pod (`:15008`).
//!
//! A connection to an enrolled pod of this node carries the policy gate's answer
//! ([`gate::connection`]); any other connection carries the gate's leave for a destination
//! whose policy is not this node's ([`gate::elsewhere`]).

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
};

use mesh_common::{PORT_HBONE, PORT_INBOUND, PORT_OUTBOUND};

use crate::{
    gate::{self, Authorized, Client, Decision, Served},
    response_flag::ResponseFlag,
    state::{Resolution, ServiceTarget, State, Workload},
};

/// What is known of a captured connection when it is accepted.
#[derive(Clone, Copy, Debug)]
pub struct Facts {
    /// The client's address.
    pub client: SocketAddr,
    /// Where the client meant to go (resolved once, at accept).
    pub original_dst: SocketAddr,
}

/// Why a connection goes nowhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// How it is recorded.
    pub flag: ResponseFlag,
    /// What an operator reads.
    pub reason: String,
}

impl Refusal {
    /// A refusal with `flag`.
    pub fn new(flag: ResponseFlag, reason: impl Into<String>) -> Refusal {
        Refusal {
            flag,
            reason: reason.into(),
        }
    }
}

/// The address a plain connection leaves from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum From {
    /// The client pod's: the server sees the real client.
    Client(Ipv4Addr),
    /// A local pod outside the mesh, whose replies are steered back to the proxy.
    Steered(Ipv4Addr),
    /// The node's own (masqueraded, as kube-proxy does).
    Node,
}

/// What to do with one connection.
#[derive(Debug)]
pub enum Plan<'s> {
    /// A Service port that declares HTTP, from an enrolled pod: routed request by request.
    Http {
        /// The Service port dialled.
        service: &'s ServiceTarget,
    },
    /// To an enrolled pod of this node: the gate decided (`admitted`), the proxy connects
    /// directly (the client's identity, if any, is known in-process or from the tunnel).
    Local {
        /// The enrolled client pod, when it is one.
        source: Option<&'s Workload>,
        /// The pod.
        destination: &'s Workload,
        /// The Service port that led there, if any.
        service: Option<&'s ServiceTarget>,
        /// `podIP:port`.
        upstream: SocketAddr,
        /// How the port is served.
        served: Served,
        /// The gate's answer: the leave to connect, or the decision that refused it.
        admitted: Result<Authorized, Decision>,
    },
    /// To an enrolled pod of another node, from an enrolled pod: through HBONE.
    Hbone {
        /// The client pod.
        source: &'s Workload,
        /// The server pod.
        destination: &'s Workload,
        /// The Service port that led there, if any.
        service: Option<&'s ServiceTarget>,
        /// `podIP:port`, which its node decides.
        to: Authorized,
    },
    /// Anywhere else, in plaintext: this node's policy does not apply.
    Plain {
        /// The client pod, when it is an enrolled one.
        source: Option<&'s Workload>,
        /// The server pod, when it is a pod.
        destination: Option<&'s Workload>,
        /// The Service port that led there, if any.
        service: Option<&'s ServiceTarget>,
        /// Where from.
        from: From,
        /// Where to.
        to: Authorized,
    },
    /// Nowhere.
    Refuse {
        /// The Service the destination belongs to, when known.
        service: Option<String>,
        /// Why.
        refusal: Refusal,
    },
}

impl Plan<'_> {
    fn refuse(service: Option<String>, flag: ResponseFlag, reason: impl Into<String>) -> Self {
        Plan::Refuse {
            service,
            refusal: Refusal::new(flag, reason),
        }
    }
}

/// A VirtualService `tcp` route for a Service port: the endpoint it picks, `None` when no tcp
/// route applies (the L7 module knows the routes and the per-endpoint state).
pub trait TcpRoutes<'s> {
    /// The destination Service port and endpoint for a connection from `source` to `service`.
    fn route(
        &self,
        state: &'s State,
        source: Option<&'s Workload>,
        service: &'s ServiceTarget,
    ) -> Option<Result<(&'s ServiceTarget, SocketAddrV4), Refusal>>;
}

/// No tcp routes (tests, and clients whose routes do not matter).
pub struct NoRoutes;

impl<'s> TcpRoutes<'s> for NoRoutes {
    fn route(
        &self,
        _: &'s State,
        _: Option<&'s Workload>,
        _: &'s ServiceTarget,
    ) -> Option<Result<(&'s ServiceTarget, SocketAddrV4), Refusal>> {
        None
    }
}

/// A connection from a local enrolled pod, captured at `:15001`.
pub fn outbound<'s>(
    state: &'s State,
    node: &BTreeSet<Ipv4Addr>,
    facts: Facts,
    routes: &impl TcpRoutes<'s>,
) -> Plan<'s> {
    let source = ipv4(facts.client).and_then(|ip| state.workloads.get(&ip));
    let enrolled = source.filter(|s| s.enrolled);
    let resolved = state.resolve_at_node(facts.original_dst, node);
    if let (Resolution::Service(target), Some(_)) = (&resolved, enrolled) {
        if target.protocol.is_http() {
            return Plan::Http { service: target };
        }
    }
    let routed = match &resolved {
        Resolution::Service(target) => routes.route(state, source, target),
        _ => None,
    };
    let (service, upstream) = match routed {
        Some(Ok((target, endpoint))) => (Some(target), SocketAddr::V4(endpoint)),
        Some(Err(refusal)) => {
            return Plan::Refuse {
                service: None,
                refusal,
            }
        }
        None => match upstream(resolved, facts.original_dst) {
            Ok(resolved) => resolved,
            Err((service, refusal)) => return Plan::Refuse { service, refusal },
        },
    };
    let destination = ipv4(upstream).and_then(|ip| state.workloads.get(&ip));
    match (enrolled, destination.filter(|d| d.enrolled)) {
        (_, Some(d)) if state.is_local(d) => {
            local(state, facts.client, enrolled, d, service, upstream)
        }
        (Some(s), Some(d)) => match gate::elsewhere(state, upstream) {
            Ok(to) if upstream.is_ipv4() => Plan::Hbone {
                source: s,
                destination: d,
                service,
                to,
            },
            Ok(_) => Plan::refuse(
                None,
                ResponseFlag::UpstreamConnectFailure,
                "HBONE needs an IPv4 destination",
            ),
            Err(reason) => Plan::refuse(None, ResponseFlag::NoRoute, reason),
        },
        _ => {
            let client = ipv4(facts.client).unwrap_or(Ipv4Addr::UNSPECIFIED);
            plain(
                state,
                node,
                enrolled,
                destination,
                service,
                From::Client(client),
                upstream,
            )
        }
    }
}

/// Plaintext from a client outside the mesh, captured at `:15006`: to a local enrolled pod,
/// or to a Service address, NodePort or hostPort of this node (the kernel captures those
/// before kube-proxy's DNAT), resolved and balanced as kube-proxy would.
pub fn inbound<'s>(state: &'s State, node: &BTreeSet<Ipv4Addr>, facts: Facts) -> Plan<'s> {
    let client = ipv4(facts.client);
    let source = client.and_then(|ip| state.workloads.get(&ip));
    let resolved = state.resolve_at_node(facts.original_dst, node);
    let (service, upstream) = match upstream(resolved, facts.original_dst) {
        Ok(resolved) => resolved,
        Err((service, refusal)) => return Plan::Refuse { service, refusal },
    };
    let destination = ipv4(upstream)
        .and_then(|ip| state.workloads.get(&ip))
        .filter(|d| d.enrolled && state.is_local(d));
    if let Some(destination) = destination {
        return local(state, facts.client, None, destination, service, upstream);
    }
    if upstream != facts.original_dst {
        // The endpoint chosen is elsewhere (another node, or a pod outside the mesh): its
        // node applies its own policy. A client pod of this node keeps its address (its
        // replies are steered back to the proxy); any other client is masqueraded, as
        // kube-proxy does, because its replies would not come back through this node. So is
        // a hairpin (the endpoint is the client itself).
        let local_client = source.is_some_and(|s| state.is_local(s));
        let from = match (client, upstream) {
            (Some(ip), SocketAddr::V4(endpoint)) if local_client && *endpoint.ip() != ip => {
                From::Steered(ip)
            }
            _ => From::Node,
        };
        return plain(state, node, None, None, service, from, upstream);
    }
    if state.workload(facts.original_dst.ip()).is_none() {
        // Not a pod, and no longer a Service address of this node (the snapshot or the
        // node's addresses changed since the capture): dialling it would let kube-proxy
        // deliver it to a pod with no policy applied.
        return Plan::refuse(
            None,
            ResponseFlag::NoRoute,
            format!(
                "{} is no pod and no Service of this node",
                facts.original_dst
            ),
        );
    }
    // A flow captured for a pod that has since left the mesh: delivered as the kernel would
    // have.
    let from = From::Client(client.unwrap_or(Ipv4Addr::UNSPECIFIED));
    plain(state, node, None, None, None, from, upstream)
}

/// A CONNECT stream to `target` on an HBONE connection from `client` (proven `identity`)
/// made to `local`, where this node presented `presented`. The tunnel must lead to the
/// workload whose certificate the connection presented: the address the connection was made
/// to, still held by a pod of that identity.
pub fn tunnel<'s>(
    state: &'s State,
    client: SocketAddr,
    local: SocketAddr,
    target: SocketAddr,
    identity: &str,
    presented: &str,
) -> Plan<'s> {
    let destination = ipv4(target)
        .filter(|ip| Some(*ip) == ipv4(local))
        .and_then(|ip| state.workloads.get(&ip))
        .filter(|w| w.enrolled && state.is_local(w) && w.identity == presented);
    let Some(destination) = destination else {
        return Plan::refuse(
            None,
            ResponseFlag::NoRoute,
            format!("CONNECT {target} on a tunnel to {local}: not the workload of this connection"),
        );
    };
    // The client pod, when its address and its proven identity agree.
    let source = ipv4(client)
        .and_then(|ip| state.workloads.get(&ip))
        .filter(|s| s.identity == identity);
    let served = served(state, target);
    let admitted = gate::connection(
        destination,
        Client {
            addr: client,
            identity: Some(identity),
        },
        target,
        served,
    );
    Plan::Local {
        source,
        destination,
        // The client's Service is not in the tunnel.
        service: None,
        upstream: target,
        served,
        admitted,
    }
}

/// How a port of a local pod is served: request by request when it serves a Service port
/// that declares HTTP.
pub fn served(state: &State, upstream: SocketAddr) -> Served {
    if state
        .service_of_endpoint(upstream)
        .is_some_and(|s| s.protocol.is_http())
    {
        Served::PerRequest
    } else {
        Served::Connection
    }
}

fn local<'s>(
    state: &'s State,
    client: SocketAddr,
    source: Option<&'s Workload>,
    destination: &'s Workload,
    service: Option<&'s ServiceTarget>,
    upstream: SocketAddr,
) -> Plan<'s> {
    let served = served(state, upstream);
    let admitted = gate::connection(
        destination,
        Client {
            addr: client,
            identity: source.map(|s| s.identity.as_str()),
        },
        upstream,
        served,
    );
    Plan::Local {
        source,
        destination,
        service,
        upstream,
        served,
        admitted,
    }
}

fn plain<'s>(
    state: &'s State,
    node: &BTreeSet<Ipv4Addr>,
    source: Option<&'s Workload>,
    destination: Option<&'s Workload>,
    service: Option<&'s ServiceTarget>,
    from: From,
    upstream: SocketAddr,
) -> Plan<'s> {
    let from = match from {
        From::Client(ip) => match node_source(node, upstream) {
            Ok(true) => From::Node,
            Ok(false) => From::Client(ip),
            Err(refusal) => {
                return Plan::Refuse {
                    service: None,
                    refusal,
                }
            }
        },
        From::Node => match node_source(node, upstream) {
            Err(refusal) => {
                return Plan::Refuse {
                    service: None,
                    refusal,
                }
            }
            Ok(_) => From::Node,
        },
        steered => steered,
    };
    match gate::elsewhere(state, upstream) {
        Ok(to) => Plan::Plain {
            source,
            destination,
            service,
            from,
            to,
        },
        Err(reason) => Plan::refuse(None, ResponseFlag::NoRoute, reason),
    }
}

/// Whether a connection to `upstream` must leave from the node's own address: one to an
/// address of this node never leaves it, and made from the client pod's address the node's
/// answer would go to the pod rather than to the proxy (kube-proxy masquerades such hairpin
/// traffic too). The proxy's own listener ports there are refused: it never dials itself.
pub fn node_source(node: &BTreeSet<Ipv4Addr>, upstream: SocketAddr) -> Result<bool, Refusal> {
    let SocketAddr::V4(upstream) = upstream else {
        return Ok(false);
    };
    let ip = upstream.ip();
    if !(ip.is_loopback() || ip.is_unspecified() || node.contains(ip)) {
        return Ok(false);
    }
    if [PORT_OUTBOUND, PORT_INBOUND, PORT_HBONE].contains(&upstream.port()) {
        return Err(Refusal::new(
            ResponseFlag::NoRoute,
            format!(
                "{upstream} is this node proxy's own listener: refused, the proxy never dials \
                 itself"
            ),
        ));
    }
    Ok(true)
}

/// The Service port that led to an upstream address, if any, and the address.
type Upstream<'s> = (Option<&'s ServiceTarget>, SocketAddr);
/// The Service an address belongs to, if known, and why it leads nowhere.
type Unresolved = (Option<String>, Refusal);

/// Where a resolution leads: a Service address (VIP, external, NodePort) to its next ready
/// endpoint, a hostPort to its pod, anything else to itself.
/// The refusal names the Service when there is one.
fn upstream(
    resolved: Resolution<'_>,
    original_dst: SocketAddr,
) -> Result<Upstream<'_>, Unresolved> {
    match resolved {
        Resolution::Direct => Ok((None, original_dst)),
        Resolution::Pod(pod) => Ok((None, SocketAddr::V4(pod))),
        Resolution::Service(target) => match target.pick() {
            Some(endpoint) => Ok((Some(target), SocketAddr::V4(endpoint))),
            None => Err((
                Some(target.qualified_name()),
                Refusal::new(ResponseFlag::NoHealthyUpstream, "no ready endpoint"),
            )),
        },
        Resolution::UnknownServicePort { service } => {
            let reason = format!(
                "port {} is not a port of Service {service}",
                original_dst.port()
            );
            Err((Some(service), Refusal::new(ResponseFlag::NoRoute, reason)))
        }
    }
}

/// The IPv4 address of `addr` (IPv4-mapped IPv6 included).
pub fn ipv4(addr: SocketAddr) -> Option<Ipv4Addr> {
    match addr {
        SocketAddr::V4(v4) => Some(*v4.ip()),
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_str;

    /// Node `n1` (address 100.64.0.1) runs `web` (HTTP on 8080, raw TCP on 7000), `db` (STRICT,
    /// hostPort 31000) and `out` (outside the mesh); node `n2` runs `far` (enrolled) and
    /// `outfar` (outside the mesh).
    const CONFIG: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 100.65.0.2, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {nodeName: n1, containers: [{name: c, ports: [{containerPort: 5432, hostPort: 31000}]}]}
status: {podIP: 100.65.0.3, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: out, namespace: plain, labels: {app: out}}
spec: {nodeName: n1}
status: {podIP: 100.65.0.6, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: far, namespace: shop, labels: {app: far}}
spec: {nodeName: n2}
status: {podIP: 100.65.1.2, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: outfar, namespace: plain, labels: {app: outfar}}
spec: {nodeName: n2}
status: {podIP: 100.65.1.6, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  clusterIP: 100.66.0.10
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: raw, port: 81, targetPort: 7000, nodePort: 30081}
---
apiVersion: v1
kind: Service
metadata: {name: far, namespace: shop}
spec: {clusterIP: 100.66.0.20, selector: {app: far}, ports: [{name: tcp, port: 9000}]}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: shop}
spec: {clusterIP: 100.66.0.30, selector: {app: nobody}, ports: [{name: tcp, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: outfar, namespace: plain}
spec: {clusterIP: 100.66.0.40, selector: {app: outfar}, ports: [{name: tcp, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: out, namespace: plain}
spec: {clusterIP: 100.66.0.50, selector: {app: out}, ports: [{name: tcp, port: 80}]}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: db-strict, namespace: shop}
spec: {selector: {matchLabels: {app: db}}, mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-outfar, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules: [{from: [{source: {ipBlocks: [100.65.1.6/32]}}]}]
"#;

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/default";

    fn state() -> State {
        State::build(
            &parse_str("plan.yaml", CONFIG).unwrap(),
            "n1",
            &Default::default(),
            1,
        )
    }

    fn node() -> BTreeSet<Ipv4Addr> {
        BTreeSet::from([Ipv4Addr::new(100, 64, 0, 1)])
    }

    fn facts(client: &str, original_dst: &str) -> Facts {
        Facts {
            client: format!("{client}:40000").parse().unwrap(),
            original_dst: original_dst.parse().unwrap(),
        }
    }

    /// A plan in one line, for tables.
    fn show(plan: &Plan<'_>) -> String {
        let name = |w: Option<&Workload>| w.map_or("-".to_string(), |w| w.name.clone());
        let svc = |s: Option<&ServiceTarget>| s.map_or("-".to_string(), |s| s.qualified_name());
        match plan {
            Plan::Http { service } => format!("http {}", service.qualified_name()),
            Plan::Local {
                source,
                destination,
                service,
                upstream,
                served,
                admitted,
            } => {
                let verdict = match admitted {
                    Ok(pass) => {
                        assert_eq!(pass.target(), *upstream, "the leave is for the upstream");
                        assert!(pass.tunnel().is_none(), "a local pod is no tunnel");
                        "allowed".to_string()
                    }
                    Err(decision) => format!(
                        "denied ({}: {})",
                        decision.policy.as_deref().unwrap_or("-"),
                        decision.reason
                    ),
                };
                format!(
                    "local {} {upstream} {served:?} {verdict} from={} svc={}",
                    destination.name,
                    name(*source),
                    svc(*service)
                )
            }
            Plan::Hbone {
                source,
                destination,
                service,
                to,
            } => format!(
                "hbone {} -> {} {} via {} svc={}",
                source.name,
                destination.name,
                to.target(),
                to.tunnel().expect("a tunnel leave").target(),
                svc(*service)
            ),
            Plan::Plain {
                source,
                destination,
                service,
                from,
                to,
            } => format!(
                "plain {} {from:?} src={} dst={} svc={}",
                to.target(),
                name(*source),
                name(*destination),
                svc(*service)
            ),
            Plan::Refuse { service, refusal } => format!(
                "refuse {} {} svc={}",
                refusal.flag,
                refusal.reason,
                service.as_deref().unwrap_or("-")
            ),
        }
    }

    fn check(cases: &[(&str, String, &str)]) {
        let mut failed = Vec::new();
        for (case, got, want) in cases {
            if got != want {
                failed.push(format!("{case}:\n   got  {got}\n   want {want}"));
            }
        }
        assert!(failed.is_empty(), "\n{}", failed.join("\n"));
    }

    #[test]
    fn outbound_plans() {
        let state = state();
        let node = node();
        let out =
            |client: &str, dst: &str| show(&outbound(&state, &node, facts(client, dst), &NoRoutes));
        check(&[
            (
                "a Service's HTTP port from an enrolled pod is routed per request",
                out("100.65.0.2", "100.66.0.10:80"),
                "http shop/web",
            ),
            (
                "a Service's TCP port with an endpoint on this node",
                out("100.65.0.3", "100.66.0.10:81"),
                "local web 100.65.0.2:7000 Connection allowed from=db svc=shop/web",
            ),
            (
                "a Service whose endpoint is an enrolled pod of another node",
                out("100.65.0.2", "100.66.0.20:9000"),
                "hbone web -> far 100.65.1.2:9000 via 100.65.1.2:15008 svc=shop/far",
            ),
            (
                "a pod of another node by its address",
                out("100.65.0.2", "100.65.1.2:9000"),
                "hbone web -> far 100.65.1.2:9000 via 100.65.1.2:15008 svc=-",
            ),
            (
                "a STRICT pod of this node, the client identified in-process",
                out("100.65.0.2", "100.65.0.3:5432"),
                "local db 100.65.0.3:5432 Connection allowed from=web svc=-",
            ),
            (
                "a STRICT pod of this node from a client the snapshot has outside the mesh",
                out("100.65.0.6", "100.65.0.3:5432"),
                "local db 100.65.0.3:5432 Connection denied (shop/db-strict: plaintext \
                 refused: PeerAuthentication STRICT) from=- svc=-",
            ),
            (
                "a pod's HTTP port of this node is served per request",
                out("100.65.0.3", "100.65.0.2:8080"),
                "local web 100.65.0.2:8080 PerRequest allowed from=db svc=-",
            ),
            (
                "a Service's HTTP port from a client outside the mesh is not routed",
                out("100.65.0.6", "100.66.0.10:80"),
                "local web 100.65.0.2:8080 PerRequest allowed from=- svc=shop/web",
            ),
            (
                "a pod of this node outside the mesh",
                out("100.65.0.2", "100.65.0.6:80"),
                "plain 100.65.0.6:80 Client(100.65.0.2) src=web dst=out svc=-",
            ),
            (
                "an address outside the cluster",
                out("100.65.0.2", "100.127.0.1:443"),
                "plain 100.127.0.1:443 Client(100.65.0.2) src=web dst=- svc=-",
            ),
            (
                "a Service whose endpoint is outside the mesh on another node",
                out("100.65.0.2", "100.66.0.40:80"),
                "plain 100.65.1.6:80 Client(100.65.0.2) src=web dst=outfar svc=plain/outfar",
            ),
            (
                "an enrolled pod of another node from a client outside the mesh: no HBONE",
                out("100.65.0.6", "100.65.1.2:9000"),
                "plain 100.65.1.2:9000 Client(100.65.0.6) src=- dst=far svc=-",
            ),
            (
                "a Service VIP at a port the Service does not have",
                out("100.65.0.2", "100.66.0.10:82"),
                "refuse NR port 82 is not a port of Service shop/web svc=shop/web",
            ),
            (
                "a Service without ready endpoints",
                out("100.65.0.2", "100.66.0.30:80"),
                "refuse UH no ready endpoint svc=shop/empty",
            ),
            (
                "a NodePort at this node's address",
                out("100.65.0.3", "100.64.0.1:30081"),
                "local web 100.65.0.2:7000 Connection allowed from=db svc=shop/web",
            ),
            (
                "a hostPort at this node's address",
                out("100.65.0.2", "100.64.0.1:31000"),
                "local db 100.65.0.3:5432 Connection allowed from=web svc=-",
            ),
            (
                "the proxy's own listener at this node's address",
                out("100.65.0.2", "100.64.0.1:15001"),
                "refuse NR 100.64.0.1:15001 is this node proxy's own listener: refused, the \
                 proxy never dials itself svc=-",
            ),
            (
                "another port of this node leaves from the node's address",
                out("100.65.0.2", "100.64.0.1:22"),
                "plain 100.64.0.1:22 Node src=web dst=- svc=-",
            ),
            (
                "loopback leaves from the node's address",
                out("100.65.0.2", "127.0.0.1:8080"),
                "plain 127.0.0.1:8080 Node src=web dst=- svc=-",
            ),
            (
                "a NodePort at an address that is not this node's is just an address",
                out("100.65.0.2", "100.64.0.9:30081"),
                "plain 100.64.0.9:30081 Client(100.65.0.2) src=web dst=- svc=-",
            ),
            (
                "IPv6 is plain",
                out("100.65.0.2", "[fd00::1]:80"),
                "plain [fd00::1]:80 Client(100.65.0.2) src=web dst=- svc=-",
            ),
        ]);
    }

    /// Sends every TCP route to `far`, or refuses.
    struct FixedRoute(Option<SocketAddrV4>);

    impl<'s> TcpRoutes<'s> for FixedRoute {
        fn route(
            &self,
            state: &'s State,
            _: Option<&'s Workload>,
            _: &'s ServiceTarget,
        ) -> Option<Result<(&'s ServiceTarget, SocketAddrV4), Refusal>> {
            let far = &state.services[&"100.66.0.20:9000".parse().unwrap()];
            Some(match self.0 {
                Some(endpoint) => Ok((far, endpoint)),
                None => Err(Refusal::new(ResponseFlag::NoCluster, "no such subset")),
            })
        }
    }

    #[test]
    fn outbound_plans_follow_tcp_routes() {
        let state = state();
        let node = node();
        let routed = |routes: &FixedRoute, dst: &str| {
            show(&outbound(&state, &node, facts("100.65.0.2", dst), routes))
        };
        check(&[
            (
                "a tcp route to a Service of another node",
                routed(
                    &FixedRoute(Some("100.65.1.2:9000".parse().unwrap())),
                    "100.66.0.10:81",
                ),
                "hbone web -> far 100.65.1.2:9000 via 100.65.1.2:15008 svc=shop/far",
            ),
            (
                "a tcp route that leads nowhere",
                routed(&FixedRoute(None), "100.66.0.10:81"),
                "refuse NC no such subset svc=-",
            ),
            (
                "tcp routes do not apply to HTTP ports",
                routed(&FixedRoute(None), "100.66.0.10:80"),
                "http shop/web",
            ),
            (
                "nor to pod addresses",
                routed(&FixedRoute(None), "100.65.1.2:9000"),
                "hbone web -> far 100.65.1.2:9000 via 100.65.1.2:15008 svc=-",
            ),
        ]);
    }

    #[test]
    fn inbound_plans() {
        let state = state();
        let node = node();
        let inb = |client: &str, dst: &str| show(&inbound(&state, &node, facts(client, dst)));
        check(&[
            (
                "plaintext refused by AuthorizationPolicy",
                inb("100.65.1.6", "100.65.0.2:7000"),
                "local web 100.65.0.2:7000 Connection denied (shop/no-outfar: denied by a \
                 DENY policy) from=- svc=-",
            ),
            (
                "plaintext allowed under PERMISSIVE",
                inb("100.65.1.9", "100.65.0.2:7000"),
                "local web 100.65.0.2:7000 Connection allowed from=- svc=-",
            ),
            (
                "plaintext to a STRICT pod",
                inb("100.65.1.9", "100.65.0.3:5432"),
                "local db 100.65.0.3:5432 Connection denied (shop/db-strict: plaintext \
                 refused: PeerAuthentication STRICT) from=- svc=-",
            ),
            (
                "plaintext to an HTTP port is served per request",
                inb("100.65.1.9", "100.65.0.2:8080"),
                "local web 100.65.0.2:8080 PerRequest allowed from=- svc=-",
            ),
            (
                "a Service VIP before kube-proxy's DNAT, its endpoint here",
                inb("100.65.1.9", "100.66.0.10:81"),
                "local web 100.65.0.2:7000 Connection allowed from=- svc=shop/web",
            ),
            (
                "a NodePort from a host",
                inb("100.64.0.7", "100.64.0.1:30081"),
                "local web 100.65.0.2:7000 Connection allowed from=- svc=shop/web",
            ),
            (
                "a hostPort to a STRICT pod",
                inb("100.64.0.7", "100.64.0.1:31000"),
                "local db 100.65.0.3:5432 Connection denied (shop/db-strict: plaintext \
                 refused: PeerAuthentication STRICT) from=- svc=-",
            ),
            (
                "a VIP whose endpoint is on another node, from another node: masqueraded",
                inb("100.65.1.6", "100.66.0.20:9000"),
                "plain 100.65.1.2:9000 Node src=- dst=- svc=shop/far",
            ),
            (
                "a VIP whose endpoint is on another node, from a local pod: replies steered",
                inb("100.65.0.6", "100.66.0.20:9000"),
                "plain 100.65.1.2:9000 Steered(100.65.0.6) src=- dst=- svc=shop/far",
            ),
            (
                "hairpin: the endpoint is the client itself",
                inb("100.65.0.6", "100.66.0.50:80"),
                "plain 100.65.0.6:80 Node src=- dst=- svc=plain/out",
            ),
            (
                "an address that is no pod and no Service of this node",
                inb("100.65.1.9", "100.64.5.5:80"),
                "refuse NR 100.64.5.5:80 is no pod and no Service of this node svc=-",
            ),
            (
                "a pod that left the mesh since the capture",
                inb("100.65.1.9", "100.65.0.6:80"),
                "plain 100.65.0.6:80 Client(100.65.1.9) src=- dst=- svc=-",
            ),
            (
                "a Service port that does not exist",
                inb("100.65.1.9", "100.66.0.10:99"),
                "refuse NR port 99 is not a port of Service shop/web svc=shop/web",
            ),
        ]);
    }

    #[test]
    fn tunnel_plans() {
        let state = state();
        let web: SocketAddr = "100.65.0.2:15008".parse().unwrap();
        let tun = |client: &str, local: SocketAddr, target: &str, presented: &str| {
            let client: SocketAddr = format!("{client}:40000").parse().unwrap();
            let far = "spiffe://cluster.local/ns/shop/sa/default";
            show(&tunnel(
                &state,
                client,
                local,
                target.parse().unwrap(),
                far,
                presented,
            ))
        };
        check(&[
            (
                "a tunnel to the workload of the connection",
                tun("100.65.1.2", web, "100.65.0.2:7000", WEB),
                "local web 100.65.0.2:7000 Connection allowed from=far svc=-",
            ),
            (
                "HTTP inside the tunnel is served per request",
                tun("100.65.1.2", web, "100.65.0.2:8080", WEB),
                "local web 100.65.0.2:8080 PerRequest allowed from=far svc=-",
            ),
            (
                "AuthorizationPolicy sees the tunnel's source address",
                tun("100.65.1.6", web, "100.65.0.2:7000", WEB),
                "local web 100.65.0.2:7000 Connection denied (shop/no-outfar: denied by a \
                 DENY policy) from=- svc=-",
            ),
            (
                "a CONNECT to another pod than the connection's",
                tun("100.65.1.2", web, "100.65.0.3:5432", WEB),
                "refuse NR CONNECT 100.65.0.3:5432 on a tunnel to 100.65.0.2:15008: not the \
                 workload of this connection svc=-",
            ),
            (
                "a connection that presented another identity",
                tun(
                    "100.65.1.2",
                    web,
                    "100.65.0.2:7000",
                    "spiffe://cluster.local/ns/shop/sa/other",
                ),
                "refuse NR CONNECT 100.65.0.2:7000 on a tunnel to 100.65.0.2:15008: not the \
                 workload of this connection svc=-",
            ),
            (
                "a pod outside the mesh is no tunnel destination",
                tun(
                    "100.65.1.2",
                    "100.65.0.6:15008".parse().unwrap(),
                    "100.65.0.6:80",
                    WEB,
                ),
                "refuse NR CONNECT 100.65.0.6:80 on a tunnel to 100.65.0.6:15008: not the \
                 workload of this connection svc=-",
            ),
        ]);
    }
}
