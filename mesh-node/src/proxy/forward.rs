//! Outbound (`:15001`) and inbound plaintext (`:15006`) connections, each from accept to
//! record: the plan (`crate::plan`) decides where a connection goes and whether the policy
//! gate lets it; this module does it.
//!
//! Outbound: to an enrolled pod of this node directly (the client's identity is known
//! in-process: no TLS hop to ourselves); to an enrolled pod of another node through HBONE;
//! anything else in plaintext; an HTTP Service port request by request (`http::outbound`).
//!
//! Inbound plaintext: the client has no mesh identity. PeerAuthentication STRICT for the
//! destination port refuses it before a byte reaches the pod; otherwise
//! AuthorizationPolicy decides.

use std::{
    future::Future,
    net::{Ipv4Addr, SocketAddr},
    pin::Pin,
    sync::Arc,
};

use tokio::net::TcpStream;

use crate::{
    connections::{ConnectionRecord, Direction},
    context::{Outcome, Tracked},
    drain::{Handoff, Live},
    gate::{
        revoke::{until_revoked, Asked, Registration},
        Authorized, Decision, Served,
    },
    http::ProxyContext,
    plan::{self, Facts, From, Plan},
    response_flag::ResponseFlag,
    state::{ServiceTarget, State, Workload},
    telemetry::{Peer, Report},
    transport::{self, reset},
};

/// Handles one accepted connection (`live` counts it while it lives). A plain function
/// returning the task's future: an `async fn` here would hold its arguments next to the
/// future it awaits, for as long as the connection lives.
pub fn handle(
    ctx: Arc<ProxyContext>,
    direction: Direction,
    client: TcpStream,
    peer: SocketAddr,
    live: Live,
) -> impl Future<Output = ()> + Send {
    let facts = ctx
        .sockets
        .original_dst(&client)
        .ok()
        .map(|original_dst| Facts {
            client: peer,
            original_dst,
        });
    decide_and_do(ctx, direction, client, facts, None, live)
}

/// Takes over a plain relay a predecessor handed over during an upgrade (`crate::drain`):
/// decided again, on this process's config, as a connection from its client straight to the
/// upstream it is connected to (its Service, if it went through one, is not known any more);
/// relayed on from where each direction stood if the gate still lets it through as a plain
/// relay, else both ends are reset and the record says why.
pub async fn adopt(ctx: Arc<ProxyContext>, handoff: Handoff, live: Live) {
    let Handoff {
        direction,
        peer,
        upstream,
        client,
        server,
        halves,
    } = handoff;
    let facts = Facts {
        client: peer,
        original_dst: upstream,
    };
    let (client, server) = match (TcpStream::from_std(client), TcpStream::from_std(server)) {
        (Ok(client), Ok(server)) => (client, server),
        (client, server) => {
            tracing::warn!("a handed-over connection cannot be taken over");
            for stream in [client.ok(), server.ok()].into_iter().flatten() {
                reset(&stream);
            }
            return;
        }
    };
    let adopted = Adopted {
        server: Some(server),
        halves,
    };
    decide_and_do(
        ctx,
        direction,
        client,
        Some(facts),
        Some(Box::new(adopted)),
        live,
    )
    .await
}

/// A connection on its way to what its plan says: accepted by a listener, or taken over
/// from a predecessor (`adopted`).
struct Conn {
    direction: Direction,
    client: TcpStream,
    facts: Facts,
    adopted: Option<Box<Adopted>>,
}

/// A relay taken over from a predecessor: its upstream connection and where each direction
/// stands. The upstream is reset if the connection does not go on.
struct Adopted {
    server: Option<TcpStream>,
    halves: [transport::Half; 2],
}

impl Drop for Adopted {
    fn drop(&mut self) {
        if let Some(server) = &self.server {
            reset(server);
        }
    }
}

async fn decide_and_do(
    ctx: Arc<ProxyContext>,
    direction: Direction,
    client: TcpStream,
    facts: Option<Facts>,
    adopted: Option<Box<Adopted>>,
    _live: Live,
) {
    let Some(facts) = facts else {
        return;
    };
    // Before the snapshot the decision is made on is loaded: a config change published
    // from now on reaches this connection (`gate::revoke`).
    let registration = ctx.revocations.register();
    let state = ctx.state.load_full();
    let node = ctx.node_addresses.load();
    let plan = match direction {
        Direction::Outbound => plan::outbound(&state, &node, facts, &crate::http::Routes(&ctx)),
        _ => plan::inbound(&state, &node, facts),
    };
    // Boxed and gone once open: the opening's future is sized by its largest way.
    let conn = Conn {
        direction,
        client,
        facts,
        adopted,
    };
    let lives = Box::pin(open(&ctx, &state, conn, plan, registration)).await;
    // A long-lived connection does not keep the config it started under alive.
    drop(node);
    drop(state);
    if let Some(lives) = lives {
        lives.await;
    }
}

/// What lives as long as an opened connection (its relay, HBONE tunnel or HTTP server),
/// run once the plan, the snapshot it was made from and the futures that opened the
/// connection are gone: an idle connection holds only this.
type Lives<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// A plain TCP connection once both ends are connected: what lives as long as it does.
struct Relayed<'a> {
    tracked: Tracked<'a>,
    client: TcpStream,
    server: TcpStream,
    /// Where the gate decided the connection: closed when a config change refuses it.
    registration: Option<Registration<'a>>,
    /// Where each direction stands (a new connection: nothing pending).
    halves: [transport::Half; 2],
    drain: &'a crate::drain::Drain,
    direction: Direction,
    /// The client's address and the upstream's, for a handover.
    addresses: (SocketAddr, SocketAddr),
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
            registration,
            halves,
            drain,
            direction,
            addresses: (peer, upstream),
        } = self;
        async move {
            let _ = client.set_nodelay(true);
            transport::keepalive(&client);
            let (copied, ended) = transport::relay(
                &mut client,
                &mut server,
                &tracked.live,
                until_revoked(registration.as_ref()),
                drain.handing_off(),
                halves,
            )
            .await;
            let error = match ended {
                transport::Ended::Done(error) => error,
                transport::Ended::Paused(halves) => {
                    // Upgrading: the successor relays it on from here.
                    let handed = match (client.into_std(), server.into_std()) {
                        (Ok(client), Ok(server)) => drain
                            .hand_off(Handoff {
                                direction,
                                peer,
                                upstream,
                                client,
                                server,
                                halves,
                            })
                            .map_err(|relay| {
                                reset(&relay.client);
                                reset(&relay.server);
                            }),
                        _ => Err(()),
                    };
                    let outcome = match handed {
                        Ok(()) => Outcome::handed_over(copied),
                        Err(()) => Outcome::refused(
                            ResponseFlag::DownstreamTermination,
                            "could not be handed to the successor",
                        ),
                    };
                    tracked.finish(outcome);
                    return;
                }
            };
            if error.is_some() {
                // One side broke (for example reset), or the policy no longer lets the
                // connection through: reset both, so neither takes a truncated stream for a
                // complete one.
                reset(&client);
                reset(&server);
            }
            let outcome = Outcome::relayed(copied, error, registration.as_ref());
            tracked.finish(outcome);
        }
    }
}

/// Does what the plan says, up to what then lives as long as the connection.
async fn open<'a>(
    ctx: &'a Arc<ProxyContext>,
    state: &State,
    conn: Conn,
    plan: Plan<'_>,
    registration: Registration<'a>,
) -> Option<Lives<'a>> {
    let Conn {
        direction,
        client,
        facts,
        adopted,
    } = conn;
    let mut rec = ConnectionRecord::new(direction, facts.client, facts.original_dst);
    if adopted.is_some() {
        let plain = matches!(
            plan,
            Plan::Plain { .. }
                | Plan::Local {
                    served: Served::Connection,
                    ..
                }
        );
        if !plain {
            // Under this config it would not be a plain relay (an HTTP port now, a tunnel,
            // refused): it cannot go on as one.
            reset(&client);
            Tracked::open(ctx, direction, rec).finish(Outcome::refused(
                ResponseFlag::DownstreamTermination,
                "handed over by the predecessor, but no longer a plain relay under this \
                 process's config",
            ));
            return None;
        }
    }
    let client_pod = plan::ipv4(facts.client).and_then(|ip| state.workloads.get(&ip));
    rec.source_workload = client_pod.map(Workload::qualified);
    if direction == Direction::Outbound {
        rec.source_identity = client_pod
            .filter(|s| s.enrolled)
            .map(|s| s.identity.clone());
    }
    match plan {
        Plan::Http { service } => {
            rec.service = Some(service.qualified_name());
            Some(Box::pin(crate::http::outbound::serve(
                ctx.clone(),
                client,
                facts.client,
                service.vip,
                rec,
            )))
        }
        Plan::Refuse { service, refusal } => {
            rec.service = service;
            reset(&client);
            Tracked::open(ctx, direction, rec)
                .finish(Outcome::refused(refusal.flag, refusal.reason));
            None
        }
        Plan::Hbone {
            source,
            destination,
            service,
            to,
        } => {
            rec.service = service.map(ServiceTarget::qualified_name);
            rec.upstream = Some(to.target());
            rec.destination_workload = Some(destination.qualified());
            super::hbone::outbound(
                ctx,
                client,
                rec,
                (source, destination),
                service,
                to,
                registration,
            )
            .await
            .map(|tunnelled| Box::pin(tunnelled.relay()) as Lives)
        }
        Plan::Plain {
            source,
            destination,
            service,
            from,
            to,
        } => {
            rec.service = service.map(ServiceTarget::qualified_name);
            rec.upstream = Some(to.target());
            rec.destination_workload = destination.map(Workload::qualified);
            let reports = match direction {
                Direction::Outbound => vec![Report {
                    reporter: "source",
                    source: source.map_or_else(Peer::unknown, |s| Peer::of(s, true)),
                    destination: destination.map_or_else(Peer::unknown, |d| Peer::of(d, false)),
                    service: None,
                    mtls: false,
                }
                .service(service)],
                // Inbound to an endpoint elsewhere: its node reports.
                _ => Vec::new(),
            };
            let tracked = Tracked::reported(ctx, direction, rec, reports);
            let conn = Conn {
                direction,
                client,
                facts,
                adopted,
            };
            // Not decided here; registered so the drain timeout can stop it.
            plain(ctx, conn, from, to, tracked, Some(registration)).await
        }
        Plan::Local {
            source,
            destination,
            service,
            upstream,
            served,
            admitted,
        } => {
            rec.service = service.map(ServiceTarget::qualified_name);
            rec.upstream = Some(upstream);
            rec.destination_workload = Some(destination.qualified());
            rec.destination_identity = Some(destination.identity.clone());
            // Without a known enrolled source (the kernel's map and this snapshot disagree
            // for a moment, e.g. right after the pod left the mesh) the client has no
            // identity: plaintext. In-process, an enrolled source counts as mutual TLS for
            // PeerAuthentication, as in Istio ambient.
            let mtls = source.is_some();
            let reports = match direction {
                Direction::Outbound => {
                    rec.path = "same_node";
                    rec.security = if mtls { "mutual_tls" } else { "none" };
                    ["source", "destination"]
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
                        .collect()
                }
                _ => vec![Report {
                    reporter: "destination",
                    source: client_pod.map_or_else(Peer::unknown, |s| Peer::of(s, false)),
                    destination: Peer::of(destination, true),
                    service: None,
                    mtls: false,
                }
                .service(service.or_else(|| state.service_of_endpoint(upstream)))],
            };
            let admitted = match admitted {
                Ok(admitted) => admitted,
                Err(decision) => {
                    deny(ctx, direction, &client, rec, decision, reports);
                    return None;
                }
            };
            match served {
                Served::PerRequest => {
                    let inbound = crate::http::inbound::Inbound {
                        peer: facts.client,
                        identity: source.map(|s| s.identity.clone()),
                        target: upstream,
                        mtls,
                    };
                    rec.path = match direction {
                        Direction::Outbound => "same_node_http",
                        _ => "plaintext_http",
                    };
                    Some(Box::pin(serve_http(
                        ctx, direction, client, rec, inbound, admitted,
                    )))
                }
                Served::Connection => {
                    let asked = Asked {
                        destination: destination.ip,
                        client: facts.client,
                        identity: source.map(|s| s.identity.clone()),
                        target: upstream,
                        direction: direction.as_str(),
                    };
                    if let Err(decision) = registration.commit(asked, state) {
                        deny(ctx, direction, &client, rec, decision, reports);
                        return None;
                    }
                    rec.authorization = admitted.decision().cloned();
                    let from =
                        From::Client(plan::ipv4(facts.client).unwrap_or(Ipv4Addr::UNSPECIFIED));
                    let tracked = Tracked::reported(ctx, direction, rec, reports);
                    let conn = Conn {
                        direction,
                        client,
                        facts,
                        adopted,
                    };
                    plain(ctx, conn, from, admitted, tracked, Some(registration)).await
                }
            }
        }
    }
}

/// Serves HTTP from a client to a local pod's HTTP port: connects to the pod first (a client
/// of an unreachable pod gets a reset, as at L4), then authorizes and relays each request.
async fn serve_http(
    ctx: &Arc<ProxyContext>,
    direction: Direction,
    client: TcpStream,
    rec: ConnectionRecord,
    inbound: crate::http::inbound::Inbound,
    admitted: Authorized,
) {
    let tracked = Tracked::open(ctx, direction, rec);
    let source = plan::ipv4(inbound.peer).unwrap_or(Ipv4Addr::UNSPECIFIED);
    let pod = match transport::connect(&*ctx.sockets, source, &admitted).await {
        Ok(pod) => pod,
        Err(err) => {
            reset(&client);
            tracked.finish(Outcome::failed(&err));
            return;
        }
    };
    let _ = client.set_nodelay(true);
    transport::keepalive(&client);
    Box::pin(crate::http::inbound::serve(
        ctx.clone(),
        client,
        inbound,
        Some(pod),
    ))
    .await;
    tracked.finish(Outcome::default());
}

/// Refuses a connection by policy: the client gets a reset, no byte reaches the pod.
fn deny(
    ctx: &ProxyContext,
    direction: Direction,
    client: &TcpStream,
    mut rec: ConnectionRecord,
    decision: Decision,
    reports: Vec<Report>,
) {
    reset(client);
    let reason = decision.reason.to_string();
    rec.authorization = Some(decision);
    let tracked = Tracked::reported(ctx, direction, rec, reports);
    tracked.finish(Outcome::refused(ResponseFlag::Denied, reason));
}

/// Connects to where the gate let the connection go (`to`), from `from`, for a plain TCP
/// relay; `registration` where this node's gate decided it.
async fn plain<'a>(
    ctx: &'a ProxyContext,
    conn: Conn,
    from: From,
    to: Authorized,
    tracked: Tracked<'a>,
    registration: Option<Registration<'a>>,
) -> Option<Lives<'a>> {
    let Conn {
        direction,
        client,
        facts,
        adopted,
    } = conn;
    let addresses = (facts.client, to.target());
    let (server, halves) = match adopted {
        Some(mut adopted) => (
            Ok(adopted.server.take()?),
            std::mem::take(&mut adopted.halves),
        ),
        None => (
            match from {
                From::Client(source) => transport::connect(&*ctx.sockets, source, &to).await,
                From::Node => transport::connect(&*ctx.sockets, Ipv4Addr::UNSPECIFIED, &to).await,
                From::Steered(source) => {
                    transport::connect_steered(&*ctx.sockets, source, &to).await
                }
            },
            Default::default(),
        ),
    };
    match server {
        Ok(server) => Some(Box::pin(
            Relayed {
                tracked,
                client,
                server,
                registration,
                halves,
                drain: &ctx.drain,
                direction,
                addresses,
            }
            .relay(),
        )),
        Err(err) => {
            reset(&client);
            tracked.finish(Outcome::failed(&err));
            None
        }
    }
}
