//! `sk_lookup` on the node's network namespace: picks the proxy listener for a captured flow.
//!
//! sk_lookup sees no packet mark, so the choice comes from maps alone: a flow from a local
//! enrolled pod goes to the outbound listener; a flow to a local enrolled pod goes to the HBONE
//! listener when it targets port 15008 (when one is registered), to the inbound plaintext
//! listener otherwise; so does a flow to a Service VIP:port in `SERVICES`. With no
//! listener registered (the proxy is down) the lookup continues normally and finds nothing, and
//! the node's guard rule refuses the connection: the mesh fails closed.
//!
//! A flow that came in over loopback was made by the node itself, never by a pod, whatever
//! its source address: it never goes to the outbound listener (which would give it that
//! pod's identity, and the proxy's own connections from a pod's address to an address of the
//! node would come back to it). A connection straight to a listener's own address
//! (`127.0.0.1:15001`, ...) is refused: the proxy would take it for a captured flow to
//! itself and dial itself, again and again.

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use mesh_common::{Counter, Listener, ServiceKey, PORT_HBONE, PORT_INBOUND, PORT_OUTBOUND};

use crate::{
    counters::bump,
    maps::{enrolled, service, LISTENERS, SERVICE_CLIENTS},
};

const AF_INET: u32 = 2;
const IPPROTO_TCP: u32 = 6;
/// The loopback device's ifindex, in every network namespace.
const LOOPBACK: u32 = 1;

#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: `lookup` is the valid context pointer of this program invocation.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.family != AF_INET || lookup.protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let local_port = lookup.local_port as u16;
    if u32::from_be(lookup.local_ip4) >> 24 == 127
        && matches!(local_port, PORT_OUTBOUND | PORT_INBOUND | PORT_HBONE)
    {
        bump(Counter::SelfLoop);
        return SK_DROP;
    }
    let from_pod = lookup.ingress_ifindex != LOOPBACK;
    let listener = if from_pod && enrolled(lookup.remote_ip4) {
        Listener::Outbound
    } else if enrolled(lookup.local_ip4) {
        if local_port == PORT_HBONE {
            Listener::Hbone
        } else {
            Listener::Inbound
        }
    } else if service(lookup.local_ip4, local_port.to_be()) {
        // A Service address with an enrolled endpoint here, dialled by a client outside the
        // mesh.
        Listener::Inbound
    } else if SERVICE_CLIENTS
        .get_ptr(ServiceKey {
            ip: lookup.remote_ip4,
            // Network order (unlike local_port).
            port: lookup.remote_port,
            _pad: 0,
        })
        .is_some()
    {
        // The same, after kube-proxy's DNAT ran first (the local address is an endpoint).
        Listener::Inbound
    } else {
        return SK_PASS;
    };
    let mut assigned = LISTENERS.redirect_sk_lookup(&ctx, listener as u32, 0);
    if assigned.is_err() && listener == Listener::Hbone {
        // No HBONE listener (yet): port 15008 of a pod is an ordinary inbound port.
        assigned = LISTENERS.redirect_sk_lookup(&ctx, Listener::Inbound as u32, 0);
    }
    match assigned {
        Ok(()) => bump(Counter::LookupAssigned),
        Err(_) => bump(Counter::LookupNoListener),
    }
    SK_PASS
}
