//! Kernel programs of the mesh, one file per concern:
//! - [`capture`]: TC ingress on pod-facing links and uplinks; marks new TCP flows of enrolled
//!   pods (and the later packets of those flows) so policy routing delivers them locally.
//! - [`lookup`]: `sk_lookup` on the node's netns; hands captured flows to the proxy listener
//!   chosen from maps (it sees no packet mark).
//! - [`maps`]: the maps shared with user space, pinned by name.
//! - [`counters`]: per-CPU counters for every decision and drop reason.
//! - [`bypass`]: `sock_ops` + `sk_msg`: bytes between local pods and the proxy skip TCP.
#![no_std]
#![no_main]

mod bypass;
mod capture;
mod counters;
mod lookup;
mod maps;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Programs never panic (the verifier would reject an unreachable loop anyway).
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
