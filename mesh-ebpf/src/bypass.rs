//! Same-node socket bypass: bytes between a local enrolled pod and the node proxy skip the TCP
//! stack, the veth pair and the bridge. Both ends still see an ordinary TCP connection (the
//! handshake and the FIN/RST go over it as before); only the payload of each `sendmsg` is
//! moved straight into the peer socket's receive queue. The proxy sees every byte it saw
//! before, so policy, routing, metrics and mTLS are unchanged; only kernel work is saved.
//!
//! - [`mesh_sockops`] (cgroup `sock_ops`, on the cgroup v2 root): when a TCP connection
//!   between two local pods is established (to the pod's address, or to a Service VIP:port
//!   whose every ready endpoint is a local pod: `BYPASS_SERVICES`), the pods' sockets join
//!   `BYPASS_PODS` and the proxy's sockets (in the node's netns, carrying `MARK_PROXY`) join
//!   `BYPASS_PROXY`. Every other socket is left alone, so nothing is moved into a socket that
//!   feeds a slower path. Connections to a local pod's HTTP port (`BYPASS_HTTP`) never join:
//!   the proxy parses them and reads slower than a pod writes, and a redirected message has
//!   no window to slow the writer down.
//! - [`mesh_msg_pod`] / [`mesh_msg_proxy`] (`sk_msg`, one per map): a message is redirected
//!   into the receive queue of the peer socket in the other map (the mirrored key).
//!
//! Order: a receiver reads its bypass queue before its TCP queue, so one sender's bytes must
//! all take one path. A socket joins its map when its connection is established, before it can
//! send; the peer may join later (the passive side is created when the handshake's last ACK
//! arrives). So a sender that finds no peer socket at a message (its first, if the peer has
//! not joined yet) is put in `BYPASS_PASSED` and sends over TCP for the rest of its life (the
//! entry goes when the socket closes, seen by the state callback); one that found its peer at
//! its first message finds it until the peer closes.

use aya_ebpf::{
    bindings::{
        sk_action::{SK_DROP, SK_PASS},
        BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::bpf_get_netns_cookie,
    macros::{map, sk_msg, sock_ops},
    maps::{HashMap, PerCpuArray, SockHash},
    programs::{SkMsgContext, SockOpsContext},
};
use mesh_common::{
    sock_class, BypassCounter, ServiceKey, SockKey, BYPASS_COUNTER_SLOTS, MARK_PROXY,
};

use crate::{maps::enrolled, settings::node_netns_cookie};

const AF_INET: u32 = 2;
const TCP_CLOSE: u32 = 7;

/// Sockets of local enrolled pods.
#[map(name = "MESH_BYP_PODS")]
static PODS: SockHash<SockKey> = SockHash::with_max_entries(65_536, 0);

/// The proxy's sockets to and from local enrolled pods.
#[map(name = "MESH_BYP_PROXY")]
static PROXY: SockHash<SockKey> = SockHash::with_max_entries(65_536, 0);

/// Senders that send over TCP for good (value unused, 1). Never full: an entry belongs to a
/// socket in one of the two maps above and goes when that socket closes (state callback),
/// so it can hold one per socket of both; not an LRU, which could forget a live sender and
/// let its next message overtake the ones it sent over TCP.
#[map(name = "MESH_BYP_PASSED")]
static PASSED: HashMap<SockKey, u32> = HashMap::with_max_entries(131_072, 0);

/// Service VIP:ports whose every ready endpoint is an enrolled pod of this node (value
/// unused, 1); kept by mesh-node.
#[map(name = "MESH_BYP_SVC")]
static LOCAL_SERVICES: HashMap<ServiceKey, u32> = HashMap::with_max_entries(65_536, 0);

/// Local enrolled pods' HTTP ports, `podIP:port` (value unused, 1); kept by mesh-node.
/// Connections with either end in it never join.
#[map(name = "MESH_BYP_HTTP")]
static HTTP_PORTS: HashMap<ServiceKey, u32> = HashMap::with_max_entries(65_536, 0);

#[map(name = "MESH_BYP_COUNT")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(BYPASS_COUNTER_SLOTS, 0);

#[inline(always)]
fn bump(counter: BypassCounter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot, used by this CPU only while the program runs.
        unsafe { *slot += 1 };
    }
}

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if ctx.family() != AF_INET {
        return 1;
    }
    if op == BPF_SOCK_OPS_STATE_CB {
        // Only sockets that joined asked for state callbacks.
        if ctx.arg(1) == TCP_CLOSE {
            forget_passed(&ctx);
        }
        return 1;
    }
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return 1;
    }
    let local_ip = ctx.local_ip4();
    let remote_ip = ctx.remote_ip4();
    // SAFETY: the helper takes the program's context pointer.
    let netns = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
    let node_netns = node_netns_cookie();
    let local_port = ctx.local_port() as u16;
    let remote_port = u32::from_be(ctx.remote_port()) as u16;
    let proxy = proxy_socket(&ctx);
    // Only connections between two pods of this node, relayed by this proxy, join: the
    // proxy then moves bytes between two bypassed sockets at memory speed. A redirected
    // message is queued at the receiver without TCP's window, so a pod's bytes must never
    // be moved into a proxy socket that feeds a slower path (HBONE to another node): that
    // queue would grow without bound, until the connection is reset.
    let class = if netns == node_netns {
        // The proxy's socket: accepted from a local pod for a local pod or a Service
        // address served by local pods only (local = the original destination), or its own
        // connection to a local pod from a local pod's address.
        if !proxy || !enrolled(remote_ip) || !local_destination(local_ip, local_port) {
            return 1;
        }
        sock_class::PROXY
    } else if !proxy && enrolled(local_ip) {
        // A pod's socket (not a proxy's: another node's proxy, when tests run several nodes
        // on one kernel, connects from this node's pods' addresses too), to a local pod or
        // Service address with a local endpoint, or accepted from a local pod's address.
        if !local_destination(remote_ip, remote_port) {
            return 1;
        }
        sock_class::POD
    } else {
        return 1;
    };
    // Either end: the pod's port is the local one of the server pod's and the proxy's
    // accepted sockets, the remote one of the client's and the proxy's upstream sockets.
    if http_port(local_ip, local_port) || http_port(remote_ip, remote_port) {
        return 1;
    }
    let key = SockKey {
        local_ip,
        remote_ip,
        local_port,
        remote_port,
        class,
    };
    // A decision about an earlier connection with this tuple does not carry over.
    let _ = PASSED.remove(key);
    let map = if class == sock_class::PROXY {
        &PROXY
    } else {
        &PODS
    };
    // SAFETY: `ops` is the valid context pointer of this program invocation.
    match map.update(key, unsafe { &mut *ctx.ops }, 0) {
        Ok(()) => {
            // Its close must drop its PASSED entry, if it gets one.
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            bump(if class == sock_class::PROXY {
                BypassCounter::ProxySocket
            } else {
                BypassCounter::PodSocket
            })
        }
        Err(_) => bump(BypassCounter::InsertFailed),
    }
    1
}

/// Drops the PASSED entry of a socket that joined and is now closed (its class found as
/// when it joined: a socket of the node's netns is the proxy's).
#[inline(always)]
fn forget_passed(ctx: &SockOpsContext) {
    // SAFETY: the helper takes the program's context pointer.
    let netns = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
    let node_netns = node_netns_cookie();
    let key = SockKey {
        local_ip: ctx.local_ip4(),
        remote_ip: ctx.remote_ip4(),
        local_port: ctx.local_port() as u16,
        remote_port: u32::from_be(ctx.remote_port()) as u16,
        class: if netns == node_netns {
            sock_class::PROXY
        } else {
            sock_class::POD
        },
    };
    let _ = PASSED.remove(key);
}

/// True for a local enrolled pod's address, or a Service VIP:port (host order) whose every
/// ready endpoint is one.
#[inline(always)]
fn local_destination(ip: u32, port: u16) -> bool {
    enrolled(ip)
        || LOCAL_SERVICES
            .get_ptr(ServiceKey {
                ip,
                port: port.to_be(),
                _pad: 0,
            })
            .is_some()
}

/// True for a local enrolled pod's HTTP port (port in host order).
#[inline(always)]
fn http_port(ip: u32, port: u16) -> bool {
    HTTP_PORTS
        .get_ptr(ServiceKey {
            ip,
            port: port.to_be(),
            _pad: 0,
        })
        .is_some()
}

/// True when the socket carries the proxy's mark (its own connections and the ones its
/// listeners accepted).
#[inline(always)]
fn proxy_socket(ctx: &SockOpsContext) -> bool {
    // SAFETY: `ops` is valid; `sk` is checked for null before it is read.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a non-null full socket handed to the program by the kernel.
    unsafe { (*sk).mark & MARK_PROXY != 0 }
}

#[sk_msg]
pub fn mesh_msg_pod(ctx: SkMsgContext) -> u32 {
    forward(&ctx, sock_class::POD, &PROXY, sock_class::PROXY)
}

#[sk_msg]
pub fn mesh_msg_proxy(ctx: SkMsgContext) -> u32 {
    forward(&ctx, sock_class::PROXY, &PODS, sock_class::POD)
}

#[inline(always)]
fn forward(ctx: &SkMsgContext, class: u32, peers: &SockHash<SockKey>, peer_class: u32) -> u32 {
    // SAFETY: `msg` is the valid context pointer of this program invocation.
    let msg = unsafe { &*ctx.msg };
    let local_port = msg.local_port as u16;
    let remote_port = u32::from_be(msg.remote_port) as u16;
    let own = SockKey {
        local_ip: msg.local_ip4,
        remote_ip: msg.remote_ip4,
        local_port,
        remote_port,
        class,
    };
    if PASSED.get_ptr(own).is_some() {
        return SK_PASS;
    }
    let peer = SockKey {
        local_ip: msg.remote_ip4,
        remote_ip: msg.local_ip4,
        local_port: remote_port,
        remote_port: local_port,
        class: peer_class,
    };
    if peers.redirect_msg(ctx, peer, BPF_F_INGRESS as u64) == SK_PASS as i64 {
        bump(BypassCounter::Redirected);
        return SK_PASS;
    }
    if PASSED.insert(own, 1, 0).is_err() {
        // Cannot happen (one entry per socket at most, room for all): were it to, this
        // sender could not be kept on TCP, so its message must not go anywhere.
        bump(BypassCounter::InsertFailed);
        return SK_DROP;
    }
    bump(BypassCounter::NoPeer);
    SK_PASS
}
