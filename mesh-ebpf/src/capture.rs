//! TC ingress (attached to every pod-facing link and uplink of the node): what comes in.
//!
//! First, who may claim an address. A frame from a pod's interface carries no VLAN tag and
//! no other pod interface's source MAC (`POD_MACS`: no pod pulls another's bridge entry to
//! its own port). A local pod's IPv4 address is believed only from that pod's host-side
//! interface (`PODS`): any IPv4 packet or ARP claiming it elsewhere (another pod that added
//! the address, the overlay, an uplink) is dropped, and a pod's interface only sends from
//! its pod's address (`POD_LINKS`). IPv6 from an enrolled pod is dropped but for ICMPv6
//! (neighbour discovery): IPv6 is not proxied, and must not go around the proxy. Fragments
//! of TCP to or from an enrolled pod are dropped (real TCP sets DF; the first fragment of a
//! SYN need not even hold its flags), and a TCP packet whose header cannot be read is
//! dropped, never passed on uncaptured.
//!
//! Then capture. A TCP packet is steered to the node proxy by setting `MARK_CAPTURE`, which
//! policy routing turns into local delivery (where `sk_lookup` picks the proxy listener).
//! Only new flows are steered: a SYN without ACK from a local enrolled pod (outbound) or to
//! one (inbound), and the later packets of flows that were steered at their SYN (`FLOWS`,
//! which keeps a flow captured until it ends even if its pod leaves the mesh) or that a
//! local socket owns. Everything else, including connections that predate the mesh, passes
//! untouched. The socket lookup's verdict is kept in `VERDICTS`, so it runs once per flow,
//! not once per packet.
//!
//! On a bridge port, a frame from one pod to another pod of the same node would be switched at
//! L2 and never reach the IP stack, so a steered frame also gets the bridge's MAC address as its
//! destination: the bridge then passes it up.

use aya_ebpf::{
    bindings::{bpf_sock_tuple, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_sk_release, bpf_skc_lookup_tcp},
    macros::classifier,
    programs::TcContext,
    EbpfContext,
};
use aya_log_ebpf::debug;
use mesh_common::{
    flow_verdict, Counter, Direction, FlowKey, MacKey, PodEntry, PodLink, ServiceKey, MARK_CAPTURE,
};

use crate::{
    counters::bump,
    maps::{
        enrolled, pod, pod_link, service, BRIDGE_PORTS, FLOWS, POD_MACS, SERVICE_CLIENTS, VERDICTS,
    },
    packet::{self, Ipv4, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP},
    settings,
};

const TCP_TIME_WAIT: u32 = 6;
const TCP_CLOSE: u32 = 7;
const TCP_LISTEN: u32 = 10;
const TCP_NEW_SYN_RECV: u32 = 12;
/// `BPF_F_CURRENT_NETNS`: look sockets up in the netns of the device the packet arrived on.
const CURRENT_NETNS: u64 = u64::MAX;
/// "Continue with the next program, or pass": lets other TCX programs on the link run.
pub const NEXT: i32 = TC_ACT_UNSPEC;
/// Drop the packet.
pub const DROP: i32 = TC_ACT_SHOT;

#[classifier]
pub fn mesh_capture(ctx: TcContext) -> i32 {
    match try_capture(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

fn try_capture(ctx: &TcContext) -> Result<i32, i32> {
    // SAFETY: `skb` is the valid context pointer of this program invocation.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let link = pod_link(ifindex);
    let ether_type = packet::ether_type(ctx).map_err(|()| NEXT)?;
    if link.present() {
        from_pod_link(ctx, ifindex, ether_type)?;
    }
    match ether_type {
        ETH_P_IP => {}
        ETH_P_ARP => return arp(ctx, ifindex, link),
        ETH_P_IPV6 => return ipv6(ctx, link),
        _ => return Ok(NEXT),
    }
    let ip = packet::ipv4(ctx).map_err(|()| dropped(Counter::Malformed))?;
    let source = claim(ip.src, ifindex, link, Counter::SpoofedSource)?;
    if ip.proto != IPPROTO_TCP {
        return Ok(NEXT);
    }
    if ip.fragment {
        return fragment(ctx, &ip, source);
    }
    let (src_port, dst_port) = packet::ports(ctx, &ip).map_err(|()| dropped(Counter::Malformed))?;
    let flags = packet::tcp_flags(ctx, &ip).map_err(|()| dropped(Counter::Malformed))?;
    let (src_ip, dst_ip) = (ip.src, ip.dst);
    let syn = flags & packet::TCP_FLAG_SYN != 0 && flags & packet::TCP_FLAG_ACK == 0;
    let client = ServiceKey {
        ip: src_ip,
        port: src_port,
        _pad: 0,
    };
    let direction = if source.enrolled() {
        Some(Direction::Outbound)
    } else if enrolled(dst_ip) {
        Some(Direction::Inbound)
    } else if syn && service(dst_ip, dst_port) {
        // A new flow to a Service address that kube-proxy could DNAT to an enrolled pod here
        // (its later packets follow from FLOWS). Remember the client for sk_lookup, in case
        // the DNAT runs first after all.
        let _ = SERVICE_CLIENTS.insert(client, 1, 0);
        Some(Direction::Inbound)
    } else {
        None
    };

    let flow = FlowKey {
        src_ip,
        dst_ip,
        src_port,
        dst_port,
    };

    if syn {
        let Some(direction) = direction else {
            // A new flow the mesh does not take: forget any earlier flow with this tuple, so
            // its later packets are not steered by a stale entry.
            let _ = FLOWS.remove(flow);
            let _ = VERDICTS.remove(flow);
            // Also its reverse: the proxy registers the reply direction of connections it
            // makes as a local client (and leaves it to expire), which must not catch the
            // replies of this new flow.
            let reverse = FlowKey {
                src_ip: dst_ip,
                dst_ip: src_ip,
                src_port: dst_port,
                dst_port: src_port,
            };
            let _ = FLOWS.remove(reverse);
            let _ = SERVICE_CLIENTS.remove(client);
            return Ok(NEXT);
        };
        // A new flow: remember it so its later packets follow even if NAT changes the tuple
        // the proxy's socket is known by (kube-proxy's DNAT runs after TC), and even if the
        // pod leaves the mesh before the connection ends.
        let _ = FLOWS.insert(flow, direction as u32, 0);
        let _ = VERDICTS.remove(flow);
        bump(match direction {
            Direction::Outbound => Counter::CapturedOutboundSyn,
            Direction::Inbound => Counter::CapturedInboundSyn,
        });
        if settings::log_captures() {
            debug!(
                ctx,
                "steer syn {:i}:{} -> {:i}:{} dir {}",
                u32::from_be(src_ip),
                u16::from_be(src_port),
                u32::from_be(dst_ip),
                u16::from_be(dst_port),
                direction as u32
            );
        }
    } else if is_captured(FLOWS.get_ptr(flow)) {
        bump(Counter::SteeredFlow);
    } else if direction.is_none() {
        return Ok(NEXT);
    } else if let Some(verdict) = VERDICTS.get_ptr(flow) {
        // SAFETY: a plain u32 read from a map value pointer the lookup just returned.
        if unsafe { *verdict } == flow_verdict::PASS {
            bump(Counter::PassedUncaptured);
            return Ok(NEXT);
        }
        bump(Counter::SteeredFlow);
    } else {
        // First packet seen of a flow of an enrolled pod that was not captured at its SYN:
        // look the socket up once and remember the verdict for the flow's later packets.
        let owned = owned_by_local_socket(ctx, &flow);
        let verdict = if owned {
            flow_verdict::OWNED
        } else {
            flow_verdict::PASS
        };
        let _ = VERDICTS.insert(flow, verdict, 0);
        if !owned {
            bump(Counter::PassedUncaptured);
            return Ok(NEXT);
        }
        bump(Counter::SteeredSocket);
    }

    steer(ctx);
    Ok(NEXT)
}

/// Counts `counter` and returns the verdict that drops the packet.
#[inline(always)]
pub fn dropped(counter: Counter) -> i32 {
    bump(counter);
    DROP
}

/// A frame from a pod's interface: no VLAN tag, and not another pod interface's source MAC.
#[inline(always)]
fn from_pod_link(ctx: &TcContext, ifindex: u32, ether_type: u16) -> Result<(), i32> {
    if packet::vlan_tagged(ctx, ether_type) {
        return Err(dropped(Counter::VlanDropped));
    }
    let mac = packet::source_mac(ctx).map_err(|()| dropped(Counter::Malformed))?;
    // SAFETY: a plain u32 read from a map value the lookup just returned.
    let owner = unsafe { POD_MACS.get(MacKey { mac, _pad: [0; 2] }) }
        .copied()
        .unwrap_or(ifindex);
    if owner != ifindex {
        return Err(dropped(Counter::SpoofedMac));
    }
    Ok(())
}

/// Whether `src` may be claimed from the interface `ifindex` (an IPv4 source, an ARP
/// sender): a pod's interface claims only its pod's address, any other interface no local
/// pod's address that is bound elsewhere. Returns the local pod that claims it (not
/// `present` when none does).
#[inline(always)]
fn claim(src: u32, ifindex: u32, link: PodLink, counter: Counter) -> Result<PodEntry, i32> {
    if link.ip != 0 {
        if src != link.ip {
            return Err(dropped(counter));
        }
        return Ok(PodEntry {
            ifindex,
            flags: link.flags,
        });
    }
    let owner = pod(src);
    if owner.present() && owner.ifindex != ifindex {
        return Err(dropped(counter));
    }
    Ok(owner)
}

/// ARP: the sender address is claimed like an IPv4 source, so no neighbour table (the
/// node's, other pods') learns an impostor's MAC for a pod's address. Probes (sender
/// 0.0.0.0) pass; from a pod's interface, an ARP packet that cannot be read is dropped.
#[inline(always)]
fn arp(ctx: &TcContext, ifindex: u32, link: PodLink) -> Result<i32, i32> {
    let sender = match packet::arp_sender(ctx) {
        Ok(sender) => sender,
        Err(()) if link.present() => return Err(dropped(Counter::Malformed)),
        Err(()) => return Ok(NEXT),
    };
    if sender != 0 {
        claim(sender, ifindex, link, Counter::SpoofedArp)?;
    }
    Ok(NEXT)
}

/// IPv6 on an enrolled pod's interface: only ICMPv6 passes (the proxy carries IPv4 only,
/// and nothing of an enrolled pod may go around it).
#[inline(always)]
pub fn ipv6(ctx: &TcContext, link: PodLink) -> Result<i32, i32> {
    if !link.enrolled() {
        return Ok(NEXT);
    }
    match packet::ipv6_is_icmp(ctx) {
        Ok(true) => Ok(NEXT),
        _ => Err(dropped(Counter::Ipv6Dropped)),
    }
}

/// A fragment of TCP: dropped when it is from (`source`) or to an enrolled pod, or (the
/// first one, which has the ports) to a captured Service address, which kube-proxy would
/// DNAT to one.
#[inline(always)]
fn fragment(ctx: &TcContext, ip: &Ipv4, source: PodEntry) -> Result<i32, i32> {
    let to_service = || packet::ports(ctx, ip).is_ok_and(|(_, port)| service(ip.dst, port));
    if source.enrolled() || enrolled(ip.dst) || to_service() {
        return Err(dropped(Counter::FragmentDropped));
    }
    Ok(NEXT)
}

/// True for a `FLOWS` entry that records a capture (a direction); any other value, such as
/// one a different build left in the pinned map, is not trusted.
#[inline(always)]
fn is_captured(entry: Option<*const u32>) -> bool {
    match entry {
        // SAFETY: a plain u32 read from a map value pointer the lookup just returned.
        Some(value) => matches!(
            unsafe { *value },
            flow_verdict::OUTBOUND | flow_verdict::INBOUND
        ),
        None => false,
    }
}

/// Marks the packet for local delivery and, on a bridge port, addresses the frame to the bridge.
#[inline(always)]
fn steer(ctx: &TcContext) {
    // SAFETY: `skb` is the valid context pointer of this program invocation.
    let mark = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(mark | MARK_CAPTURE);
    // SAFETY: as above.
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    // SAFETY: the value is plain data and the map entry is only read.
    if let Some(port) = unsafe { BRIDGE_PORTS.get(ifindex) } {
        let mac = port.bridge_mac;
        if ctx.store(0, &mac, 0).is_err() {
            bump(Counter::MacRewriteFailed);
        }
    }
}

/// True when a live local connection owns this tuple: a flow the proxy accepted or opened (or
/// a connection to the node itself, which goes to the local stack either way). The lookup
/// falls through to the listener lookup, which runs `sk_lookup` and would return the proxy's
/// listener for any enrolled tuple, so listeners do not count; nor do sockets that are done
/// (TIME_WAIT, CLOSE) or request sockets (a handshake the lookup cannot vouch for).
#[inline(always)]
fn owned_by_local_socket(ctx: &TcContext, flow: &FlowKey) -> bool {
    // SAFETY: an all-zero `bpf_sock_tuple` is a valid value (a union of plain integers).
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4.saddr = flow.src_ip;
    tuple.__bindgen_anon_1.ipv4.daddr = flow.dst_ip;
    tuple.__bindgen_anon_1.ipv4.sport = flow.src_port;
    tuple.__bindgen_anon_1.ipv4.dport = flow.dst_port;
    // SAFETY: the context and tuple pointers are valid for the call; the size is that of the
    // IPv4 part of the tuple, as the helper requires.
    let sk = unsafe {
        bpf_skc_lookup_tcp(
            ctx.as_ptr(),
            &mut tuple,
            core::mem::size_of::<FlowKey>() as u32,
            CURRENT_NETNS,
            0,
        )
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` is a non-null socket reference from the lookup; `state` is readable on a
    // sock_common, and the reference is released exactly once.
    let state = unsafe { (*sk).state };
    unsafe { bpf_sk_release(sk.cast()) };
    !matches!(
        state,
        TCP_TIME_WAIT | TCP_CLOSE | TCP_LISTEN | TCP_NEW_SYN_RECV
    )
}
