//! Kernel programs of the mesh, one file per concern:
//! - [`capture`]: TC ingress on pod-facing links and uplinks; drops what claims a local pod's
//!   address from another interface, and what of an enrolled pod would go around the proxy
//!   (IPv6, fragments); marks new TCP flows of enrolled pods (and the later packets of those
//!   flows) so policy routing delivers them locally.
//! - [`egress`]: TC egress on pod interfaces: what goes into an enrolled pod's interface
//!   (no IPv6 but ICMPv6, no TCP fragments, no SYN the proxy or the kubelet did not send).
//! - [`host`]: `cgroup/connect4`: the node's own connections to enrolled pods go to the proxy.
//! - [`lookup`]: `sk_lookup` on the node's netns; hands captured flows to the proxy listener
//!   chosen from maps (it sees no packet mark).
//! - [`maps`]: the maps shared with user space, pinned by name; [`settings`]: the globals
//!   mesh-node sets before loading; [`packet`]: header parsing for the TC programs.
//! - [`counters`]: per-CPU counters for every decision and drop reason.
//! - [`bypass`]: `sock_ops` + `sk_msg`: bytes between local pods and the proxy skip TCP.
#![no_std]
#![no_main]

mod bypass;
mod capture;
mod counters;
mod egress;
mod host;
mod lookup;
mod maps;
mod packet;
mod settings;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Programs never panic (the verifier would reject an unreachable loop anyway).
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
