//! Outbound (`:15001`) and inbound plaintext (`:15006`) connections, each from accept to
//! record.
//!
//! Outbound: original destination -> Service VIP resolved to an endpoint -> by destination:
//! an enrolled pod of this node is delivered directly after its inbound policy is applied
//! (the client's identity is known in-process: no TLS hop to ourselves); an enrolled pod of
//! another node is reached through HBONE; anything else in plaintext.
//!
//! Inbound plaintext: the client has no mesh identity. PeerAuthentication STRICT for the
//! destination port refuses it before a byte reaches the pod; otherwise
//! AuthorizationPolicy decides.

use crate::response_flag::ResponseFlag;
use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::Arc,
};

use futures_util::future::OptionFuture;
use tokio::net::TcpStream;

use super::{connect_from, record, relay, reset, Direction, Outcome, ProxyContext, Tracked};
use crate::{
    authz::{self, Decision},
    state::{Resolution, ServiceTarget, State, Workload},
    sys,
    telemetry::{Peer, Report},
};

/// Handles one accepted connection.
pub async fn handle(
    ctx: Arc<ProxyContext>,
    direction: Direction,
    client: TcpStream,
    peer: SocketAddr,
) {
    let Ok(local) = client.local_addr() else {
        return;
    };
    // Without NAT on the node, conntrack's original destination equals the local address;
    // after a kube-proxy DNAT it is the Service VIP the client dialled.
    let original_dst = sys::original_dst(&client).unwrap_or(local);
    let state = ctx.state.load_full();
    let opened = match direction {
        Direction::Outbound => outbound(&ctx, &state, client, peer, original_dst).await,
        // Boxed: the inbound ways are larger than the outbound ones (whose every way is
        // boxed), and would size every outbound connection's task.
        _ => Box::pin(inbound(&ctx, &state, client, peer, original_dst)).await,
    };
    // A long-lived connection does not keep the config it started under alive.
    drop(state);
    // The opening is over and its futures gone: a relayed connection's task holds only its
    // sockets, its record and the relay (boxed, as HBONE tunnels relay in their own way).
    OptionFuture::from(opened.map(|relayed| Box::pin(relayed.relay()))).await;
}

/// A plain TCP connection once both ends are connected: what lives as long as it does.
/// Opening it (resolution, policy, reports, the connect) runs in futures that are gone by
/// the time it relays, so an idle connection holds only this and the relay.
struct Relayed<'a> {
    tracked: Tracked<'a>,
    client: TcpStream,
    server: TcpStream,
}

impl<'a> Relayed<'a> {
    /// Relays between the client and the server until both ends finish, then records it.
    /// (A plain function returning an `async` block: the block keeps its captures in place,
    /// where an `async fn` would hold its argument and a moved copy of it.)
    fn relay(self) -> impl std::future::Future<Output = ()> + Send + 'a {
        let Relayed {
            tracked,
            mut client,
            mut server,
        } = self;
        async move {
            let _ = client.set_nodelay(true);
            super::keepalive(&client);
            let (copied, error) = relay(&mut client, &mut server, &tracked.live).await;
            if error.is_some() {
                // One side broke (for example reset): reset the other too, so it does not
                // take a truncated stream for a complete one.
                reset(&client);
                reset(&server);
            }
            tracked.finish(Outcome::relayed(copied, error));
        }
    }
}

async fn outbound<'a>(
    ctx: &'a Arc<ProxyContext>,
    state: &State,
    client: TcpStream,
    peer: SocketAddr,
    original_dst: SocketAddr,
) -> Option<Relayed<'a>> {
    let mut rec = record(Direction::Outbound, peer, original_dst);
    let source = ip_of(peer).and_then(|ip| state.workloads.get(&ip));
    if let Some(source) = source {
        rec.source_workload = Some(qualified(source));
        rec.source_identity = source.enrolled.then(|| source.identity.clone());
    }
    let resolved = state.resolve_at_node(original_dst, &ctx.node_addresses.load());
    if let (Resolution::Service(target), Some(_)) = (&resolved, source.filter(|s| s.enrolled)) {
        // An HTTP port of a Service: routed per request.
        if target.protocol.is_http() {
            rec.service = Some(target.qualified_name());
            // Boxed, as every L7 server: its future is large, and sizing this one (and so
            // every L4 connection's task) by it cost idle connections kilobytes each.
            Box::pin(crate::http::outbound::serve(
                ctx.clone(),
                client,
                peer,
                target.vip,
                rec,
            ))
            .await;
            return None;
        }
    }
    let routed = match &resolved {
        Resolution::Service(target) => crate::http::outbound::tcp_route(ctx, state, source, target),
        _ => None,
    };
    let resolved = match routed {
        Some(Ok((target, endpoint))) => {
            rec.service = Some(target.qualified_name());
            Ok((Some(target), SocketAddr::V4(endpoint)))
        }
        Some(Err(outcome)) => Err(outcome),
        None => resolve_upstream(ctx, state, original_dst, &mut rec),
    };
    let (service, upstream) = match resolved {
        Ok(resolved) => resolved,
        Err(outcome) => {
            reset(&client);
            Tracked::open(ctx, Direction::Outbound, rec).finish(outcome);
            return None;
        }
    };
    rec.upstream = Some(upstream);
    let destination = ip_of(upstream).and_then(|ip| state.workloads.get(&ip));
    if let Some(d) = destination {
        rec.destination_workload = Some(qualified(d));
    }
    let source = source.filter(|s| s.enrolled);
    match (source, destination.filter(|d| d.enrolled)) {
        // Each way boxed, so the connection's task is sized by the way it takes, not by the
        // largest (an idle HBONE connection held 4.6 KB of task before).
        (_, Some(d)) if state.is_local(d) => {
            Box::pin(same_node(ctx, client, peer, rec, source, d, service)).await
        }
        (Some(s), Some(d)) => {
            Box::pin(super::hbone::outbound_way(
                ctx, client, rec, s, d, service, upstream,
            ))
            .await;
            None
        }
        _ => {
            let reports = vec![Report {
                reporter: "source",
                source: source.map_or_else(Peer::unknown, |s| Peer::of(s, true)),
                destination: destination.map_or_else(Peer::unknown, |d| Peer::of(d, false)),
                service: None,
                mtls: false,
            }
            .service(service)];
            Box::pin(plain(
                ctx,
                Direction::Outbound,
                client,
                peer,
                upstream,
                rec,
                reports,
            ))
            .await
        }
    }
}

/// From an enrolled pod to an enrolled pod of this node: the destination's inbound policy
/// with the source's identity, then a direct connection (the identity is known in-process,
/// so this counts as mutual TLS for PeerAuthentication, as in Istio ambient).
async fn same_node<'a>(
    ctx: &'a Arc<ProxyContext>,
    client: TcpStream,
    peer: SocketAddr,
    mut rec: super::connections::ConnectionRecord,
    source: Option<&Workload>,
    destination: &Workload,
    service: Option<&ServiceTarget>,
) -> Option<Relayed<'a>> {
    let upstream = rec.upstream?;
    // Without a known enrolled source (the kernel's map and this snapshot disagree for a
    // moment, e.g. right after the pod left the mesh) the client has no identity: plaintext.
    let mtls = source.is_some();
    rec.path = "same_node";
    rec.security = if mtls { "mutual_tls" } else { "none" };
    rec.destination_identity = Some(destination.identity.clone());
    let reports = ["source", "destination"]
        .into_iter()
        .map(|reporter| {
            Report {
                reporter,
                source: source.map_or_else(Peer::unknown, |s| Peer::of(s, true)),
                destination: Peer::of(destination, true),
                service: None,
                mtls,
            }
            .service(service)
        })
        .collect();
    let identity = source.map(|s| s.identity.as_str());
    deliver(
        ctx,
        Direction::Outbound,
        client,
        peer,
        upstream,
        destination,
        identity,
        rec,
        reports,
    )
    .await
}

/// A connection to an enrolled pod of this node, the client authenticated (`identity`) or
/// not: plaintext to a STRICT port is refused; an HTTP port is served request by request
/// (AuthorizationPolicy per request); any other port gets AuthorizationPolicy for the
/// connection, then a relay.
#[allow(clippy::too_many_arguments)]
async fn deliver<'a>(
    ctx: &'a Arc<ProxyContext>,
    direction: Direction,
    client: TcpStream,
    peer: SocketAddr,
    upstream: SocketAddr,
    destination: &Workload,
    identity: Option<&str>,
    mut rec: super::connections::ConnectionRecord,
    reports: Vec<Report>,
) -> Option<Relayed<'a>> {
    if identity.is_none() && destination.mtls.mode_for(upstream.port()) == "STRICT" {
        rec.authorization = Some(strict_refusal(destination, upstream.port()));
        deny(ctx, direction, &client, rec, reports);
        return None;
    }
    if http_port(ctx, upstream) {
        let inbound = crate::http::inbound::Inbound {
            peer,
            identity: identity.map(Into::into),
            target: upstream,
            mtls: identity.is_some(),
        };
        rec.path = match direction {
            Direction::Outbound => "same_node_http",
            _ => "plaintext_http",
        };
        serve_http(ctx, direction, client, rec, inbound).await;
        return None;
    }
    let decision = authorize(destination, identity, peer, upstream);
    let allowed = decision.allowed;
    rec.authorization = Some(decision);
    if !allowed {
        deny(ctx, direction, &client, rec, reports);
        return None;
    }
    plain(ctx, direction, client, peer, upstream, rec, reports).await
}

async fn inbound<'a>(
    ctx: &'a Arc<ProxyContext>,
    state: &State,
    client: TcpStream,
    peer: SocketAddr,
    original_dst: SocketAddr,
) -> Option<Relayed<'a>> {
    let mut rec = record(Direction::Inbound, peer, original_dst);
    let source = ip_of(peer).and_then(|ip| state.workloads.get(&ip));
    rec.source_workload = source.map(qualified);
    // A client outside the mesh dialled a Service VIP, NodePort or hostPort leading to an
    // enrolled pod of this node (the kernel captures those before kube-proxy's DNAT):
    // resolve and balance as kube-proxy would.
    let (service, upstream) = match resolve_upstream(ctx, state, original_dst, &mut rec) {
        Ok(resolved) => resolved,
        Err(outcome) => {
            reset(&client);
            Tracked::open(ctx, Direction::Inbound, rec).finish(outcome);
            return None;
        }
    };
    rec.upstream = Some(upstream);
    let destination = ip_of(upstream)
        .and_then(|ip| state.workloads.get(&ip))
        .filter(|d| d.enrolled && state.is_local(d));
    let Some(destination) = destination else {
        if upstream != original_dst {
            // The endpoint chosen is elsewhere (another node, or a pod outside the mesh):
            // its node applies its own policy.
            let local_client = source.is_some_and(|s| state.is_local(s));
            return plain_elsewhere(ctx, client, peer, upstream, rec, local_client).await;
        }
        if state.workload(original_dst.ip()).is_none() {
            // Not a pod, and no longer a Service address of this node (the snapshot or the
            // node's addresses changed since the capture): dialling it would let kube-proxy
            // deliver it to a pod with no policy applied. Refuse.
            reset(&client);
            let error = format!("{original_dst} is no pod and no Service of this node");
            Tracked::open(ctx, Direction::Inbound, rec)
                .finish(Outcome::refused(ResponseFlag::NoRoute, error));
            return None;
        }
        // A flow captured for a pod that has since left the mesh: deliver it as the kernel
        // would have.
        return plain(
            ctx,
            Direction::Inbound,
            client,
            peer,
            original_dst,
            rec,
            Vec::new(),
        )
        .await;
    };
    rec.destination_workload = Some(qualified(destination));
    rec.destination_identity = Some(destination.identity.clone());
    let service = service.or_else(|| state.service_of_endpoint(upstream));
    let reports = vec![Report {
        reporter: "destination",
        source: source.map_or_else(Peer::unknown, |s| Peer::of(s, false)),
        destination: Peer::of(destination, true),
        service: None,
        mtls: false,
    }
    .service(service)];
    deliver(
        ctx,
        Direction::Inbound,
        client,
        peer,
        upstream,
        destination,
        None,
        rec,
        reports,
    )
    .await
}

/// Relays to an endpoint chosen for a client outside the mesh that is not a local enrolled
/// pod. A client pod of this node keeps its address (the replies, which would go straight to
/// it, are steered back to the proxy); any other client (another node's pod or a host
/// through a NodePort) is masqueraded to the node's address, as kube-proxy does, because its
/// replies would not come back through this node at all.
async fn plain_elsewhere(
    ctx: &ProxyContext,
    client: TcpStream,
    peer: SocketAddr,
    upstream: SocketAddr,
    rec: super::connections::ConnectionRecord,
    local_client: bool,
) -> Option<Relayed<'_>> {
    // Hairpin (the endpoint is the client itself) is masqueraded too, as kube-proxy does.
    let preserve = |source: &std::net::Ipv4Addr, endpoint: &SocketAddrV4| {
        local_client && endpoint.ip() != source
    };
    let preserved = match (ip_of(peer), upstream) {
        (Some(source), SocketAddr::V4(endpoint)) if preserve(&source, &endpoint) => {
            Some((source, endpoint))
        }
        _ => None,
    };
    let Some((source, endpoint)) = preserved else {
        let node = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0));
        return plain(
            ctx,
            Direction::Inbound,
            client,
            node,
            upstream,
            rec,
            Vec::new(),
        )
        .await;
    };
    let tracked = Tracked::open(ctx, Direction::Inbound, rec);
    let server = match super::connect_steered(source, endpoint, &ctx.replies).await {
        Ok(connected) => connected,
        Err(err) => {
            reset(&client);
            tracked.finish(Outcome::refused(
                ResponseFlag::UpstreamConnectFailure,
                format!("connect to {upstream}: {err}"),
            ));
            return None;
        }
    };
    Some(Relayed {
        tracked,
        client,
        server,
    })
}

/// Whether a pod port serves a Service port that declares HTTP: the destination side then
/// parses requests (AuthorizationPolicy per request, request metrics).
pub(crate) fn http_port(ctx: &ProxyContext, upstream: SocketAddr) -> bool {
    ctx.state
        .load()
        .service_of_endpoint(upstream)
        .is_some_and(|s| s.protocol.is_http())
}

/// Serves HTTP from a client to a local pod's HTTP port: connects to the pod first (a client
/// of an unreachable pod gets a reset, as at L4), then authorizes and relays each request.
pub(crate) async fn serve_http(
    ctx: &Arc<ProxyContext>,
    direction: Direction,
    client: TcpStream,
    rec: super::connections::ConnectionRecord,
    inbound: crate::http::inbound::Inbound,
) {
    let tracked = Tracked::open(ctx, direction, rec);
    let source = ip_of(inbound.peer).unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
    let pod = match connect_from(source, inbound.target).await {
        Ok(pod) => pod,
        Err(err) => {
            reset(&client);
            let error = format!("connect to {}: {err}", inbound.target);
            tracked.finish(Outcome::refused(
                ResponseFlag::UpstreamConnectFailure,
                error,
            ));
            return;
        }
    };
    let _ = client.set_nodelay(true);
    super::keepalive(&client);
    Box::pin(crate::http::inbound::serve(
        ctx.clone(),
        client,
        inbound,
        Some(pod),
    ))
    .await;
    tracked.finish(Outcome::default());
}

/// The decision for plaintext to a STRICT workload port.
fn strict_refusal(destination: &Workload, port: u16) -> Decision {
    Decision {
        allowed: false,
        policy: destination.mtls.policy_for(port).map(str::to_string),
        reason: "plaintext refused: PeerAuthentication STRICT",
        audited: Vec::new(),
    }
}

/// Where a captured connection goes: a Service address (VIP, external, NodePort) resolves to
/// its next ready endpoint, a hostPort to its pod, anything else to itself. Notes the Service
/// in the record; the error is the outcome to record when there is nowhere to go.
fn resolve_upstream<'s>(
    ctx: &ProxyContext,
    state: &'s State,
    original_dst: SocketAddr,
    rec: &mut super::connections::ConnectionRecord,
) -> Result<(Option<&'s ServiceTarget>, SocketAddr), Outcome> {
    match state.resolve_at_node(original_dst, &ctx.node_addresses.load()) {
        Resolution::Direct => Ok((None, original_dst)),
        Resolution::Pod(pod) => Ok((None, SocketAddr::V4(pod))),
        Resolution::Service(target) => {
            rec.service = Some(target.qualified_name());
            match target.pick() {
                Some(endpoint) => Ok((Some(target), SocketAddr::V4(endpoint))),
                None => Err(Outcome::refused(
                    ResponseFlag::NoHealthyUpstream,
                    "no ready endpoint",
                )),
            }
        }
        Resolution::UnknownServicePort { service } => {
            let port = original_dst.port();
            let error = format!("port {port} is not a port of Service {service}");
            rec.service = Some(service);
            Err(Outcome::refused(ResponseFlag::NoRoute, error))
        }
    }
}

/// Decides a connection to a local workload.
pub(crate) fn authorize(
    destination: &Workload,
    source_identity: Option<&str>,
    peer: SocketAddr,
    upstream: SocketAddr,
) -> Decision {
    authorize_request(destination, source_identity, peer, upstream, None)
}

/// Decides a connection, or one HTTP request on it, to a local workload.
pub(crate) fn authorize_request(
    destination: &Workload,
    source_identity: Option<&str>,
    peer: SocketAddr,
    upstream: SocketAddr,
    request: Option<authz::HttpAttrs<'_>>,
) -> Decision {
    let decision = authz::authorize(
        &destination.authorization,
        &authz::Connection {
            source_identity,
            source_ip: ip_of(peer).unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
            destination_ip: destination.ip,
            destination_port: upstream.port(),
            request,
        },
    );
    if !decision.audited.is_empty() {
        tracing::info!(
            source = %peer,
            identity = source_identity.unwrap_or("-"),
            destination = %upstream,
            allowed = decision.allowed,
            policies = ?decision.audited,
            "AUDIT policy matched"
        );
    }
    decision
}

/// Refuses a connection by policy: the client gets a reset, no byte reaches the pod.
fn deny(
    ctx: &ProxyContext,
    direction: Direction,
    client: &TcpStream,
    rec: super::connections::ConnectionRecord,
    reports: Vec<Report>,
) {
    reset(client);
    let reason = rec
        .authorization
        .as_ref()
        .map_or("denied", |d| d.reason)
        .to_string();
    let mut tracked = Tracked::open(ctx, direction, rec);
    tracked.live = ctx.tcp.open(reports);
    tracked.finish(Outcome::refused(ResponseFlag::Denied, reason));
}

/// Connects to `upstream` as the client, for a plain TCP relay.
async fn plain(
    ctx: &ProxyContext,
    direction: Direction,
    client: TcpStream,
    peer: SocketAddr,
    upstream: SocketAddr,
    rec: super::connections::ConnectionRecord,
    reports: Vec<Report>,
) -> Option<Relayed<'_>> {
    let mut tracked = Tracked::open(ctx, direction, rec);
    tracked.live = ctx.tcp.open(reports);
    let client_ip = ip_of(peer).unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
    let source = match ctx.upstream_source(client_ip, upstream) {
        Ok(source) => source,
        Err(error) => {
            reset(&client);
            tracked.finish(Outcome::refused(ResponseFlag::NoRoute, error));
            return None;
        }
    };
    let server = match connect_from(source, upstream).await {
        Ok(server) => server,
        Err(err) => {
            reset(&client);
            tracked.finish(Outcome::refused(
                ResponseFlag::UpstreamConnectFailure,
                format!("connect to {upstream}: {err}"),
            ));
            return None;
        }
    };
    Some(Relayed {
        tracked,
        client,
        server,
    })
}

pub(crate) fn ip_of(addr: SocketAddr) -> Option<std::net::Ipv4Addr> {
    match addr {
        SocketAddr::V4(v4) => Some(*v4.ip()),
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped(),
    }
}

pub(crate) fn qualified(w: &Workload) -> String {
    format!("{}/{}", w.namespace, w.name)
}
