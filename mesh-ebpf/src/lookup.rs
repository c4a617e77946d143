//! `sk_lookup` on the node's network namespace: picks the proxy listener for a captured flow.
//!
//! sk_lookup sees no packet mark, so the choice comes from maps alone: a flow from a local
//! enrolled pod goes to the outbound listener; a flow to a local enrolled pod goes to the HBONE
//! listener when it targets port 15008 (when one is registered), to the inbound plaintext
//! listener otherwise; so does a flow to a Service VIP:port in `SERVICES`. With no
//! listener registered (the proxy is down) the lookup continues normally and finds nothing, and
//! the node's guard rule refuses the connection: the mesh fails closed.

use aya_ebpf::{bindings::sk_action::SK_PASS, macros::sk_lookup, programs::SkLookupContext};
use mesh_common::{Counter, Listener, ServiceKey, PORT_HBONE};

use crate::{
    counters::bump,
    maps::{ENROLLED, LISTENERS, SERVICES, SERVICE_CLIENTS},
};

const AF_INET: u32 = 2;
const IPPROTO_TCP: u32 = 6;

#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: `lookup` is the valid context pointer of this program invocation.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.family != AF_INET || lookup.protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let listener = if ENROLLED.get_ptr(lookup.remote_ip4).is_some() {
        Listener::Outbound
    } else if ENROLLED.get_ptr(lookup.local_ip4).is_some() {
        if lookup.local_port == u32::from(PORT_HBONE) {
            Listener::Hbone
        } else {
            Listener::Inbound
        }
    } else if SERVICES
        .get_ptr(ServiceKey {
            ip: lookup.local_ip4,
            port: (lookup.local_port as u16).to_be(),
            _pad: 0,
        })
        .is_some()
    {
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
