//! The node's own connections to enrolled pods (`--host-traffic`). Every process of the
//! node's network namespace (host-network pods, node daemons) could otherwise reach an
//! enrolled pod with neither PeerAuthentication nor AuthorizationPolicy applied, since
//! nothing it sends meets TC ingress. With `kubelet-only`, [`mesh_connect4`] (cgroup
//! `connect4`, on the cgroup v2 root, for this node's namespace only) sends such a connection
//! to the proxy: the socket is bound to a node address (`HOST_SOURCE`) and marked with
//! `MARK_CAPTURE`, so policy routing delivers it locally and `sk_lookup` gives it to the
//! inbound listener, where it is plaintext from outside the mesh. The kubelet's (a process
//! in one of `KUBELET_CGROUPS`, or below) and the proxy's (mesh-node's cgroup) go directly.

use aya_ebpf::{
    bindings::{bpf_sock_addr, sockaddr},
    helpers::{
        bpf_bind, bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id,
        bpf_get_netns_cookie, bpf_setsockopt, bpf_skb_ancestor_cgroup_id,
    },
    macros::cgroup_sock_addr,
    programs::{SockAddrContext, TcContext},
    EbpfContext,
};
use mesh_common::{Counter, CGROUP_LEVELS, MARK_CAPTURE};

use crate::{
    counters::bump,
    maps::{enrolled, service, HOST_SOURCE, KUBELET_CGROUPS},
    settings,
};

const SOCK_STREAM: u32 = 1;
const AF_INET: u16 = 2;
const SOL_SOCKET: i32 = 1;
const SO_MARK: i32 = 36;
/// Return values of a `connect4` program.
const PROCEED: i32 = 1;
const REFUSE: i32 = 0;

/// `struct sockaddr_in`.
#[repr(C)]
struct SockaddrIn {
    family: u16,
    port: u16,
    addr: u32,
    zero: [u8; 8],
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i32> {
    // SAFETY: `sock_addr` is the valid context pointer of this program invocation.
    let addr = unsafe { &*ctx.sock_addr };
    if addr.type_ != SOCK_STREAM {
        return Ok(PROCEED);
    }
    // SAFETY: the helper takes the program's context pointer.
    if unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != settings::node_netns_cookie() {
        return Ok(PROCEED);
    }
    let (dst, port) = (addr.user_ip4, addr.user_port as u16);
    if !enrolled(dst) && !service(dst, port) {
        return Ok(PROCEED);
    }
    // SAFETY: a helper without arguments.
    if settings::is_proxy_cgroup(unsafe { bpf_get_current_cgroup_id() }) {
        return Ok(PROCEED);
    }
    // SAFETY: a connect hook always has the socket.
    let sk = unsafe { &*addr.__bindgen_anon_1.sk };
    if kubelet(|level| {
        // SAFETY: a helper without pointer arguments; 0 past the task's own depth.
        unsafe { bpf_get_current_ancestor_cgroup_id(level) }
    }) {
        bump(Counter::HostKubelet);
        return Ok(PROCEED);
    }
    if sk.src_ip4 == 0 {
        bind_host_source(ctx.sock_addr).map_err(|()| refused())?;
    }
    let mut mark = sk.mark | MARK_CAPTURE;
    // SAFETY: the context is a locked socket's connect hook, where the helper may set
    // SO_MARK; the value is a live int of the length given.
    let set = unsafe {
        bpf_setsockopt(
            ctx.as_ptr(),
            SOL_SOCKET,
            SO_MARK,
            (&mut mark as *mut u32).cast(),
            4,
        )
    };
    if set != 0 {
        return Err(refused());
    }
    bump(Counter::HostCaptured);
    Ok(PROCEED)
}

/// Binds the socket to the node address for host connections (any free port): marked, its
/// route is local, which would otherwise make the destination its source.
#[inline(always)]
fn bind_host_source(ctx: *mut bpf_sock_addr) -> Result<(), ()> {
    let source = HOST_SOURCE.get(0).copied().unwrap_or(0);
    if source == 0 {
        return Err(());
    }
    let mut sin = SockaddrIn {
        family: AF_INET,
        port: 0,
        addr: source,
        zero: [0; 8],
    };
    // SAFETY: a `sockaddr_in` on the stack with its exact length; the helper is allowed in
    // connect hooks.
    let rc = unsafe {
        bpf_bind(
            ctx,
            (&mut sin as *mut SockaddrIn).cast::<sockaddr>(),
            core::mem::size_of::<SockaddrIn>() as i32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(())
    }
}

#[inline(always)]
fn refused() -> i32 {
    bump(Counter::HostRefused);
    REFUSE
}

/// Whether the cgroup whose ancestor at each level `ancestor` gives (0 past its own depth)
/// is one of the kubelet's, or below one.
#[inline(always)]
fn kubelet(ancestor: impl Fn(i32) -> u64) -> bool {
    for level in 1..=CGROUP_LEVELS {
        let id = ancestor(level);
        if id == 0 {
            return false;
        }
        if KUBELET_CGROUPS.get_ptr(id).is_some() {
            return true;
        }
    }
    false
}

/// Whether the packet's socket belongs to one of the kubelet's cgroups, or below one.
#[inline(always)]
pub fn kubelet_socket(ctx: &TcContext) -> bool {
    kubelet(|level| {
        // SAFETY: the helper takes the program's context pointer; 0 past the depth.
        unsafe { bpf_skb_ancestor_cgroup_id(ctx.skb.skb, level) }
    })
}
