//! TC egress (on pod interfaces, next to `capture`): what goes into an enrolled pod's interface.
//! Every packet to a pod of this node leaves through its host-side interface, whoever sent
//! it (another pod over the bridge, the overlay, the node itself), so this is where "to an
//! enrolled pod" is decided without knowing the pod's every address:
//!
//! - a VLAN-tagged frame: dropped;
//! - IPv6 but ICMPv6 (neighbour discovery): dropped, as in `capture` for the other way;
//! - IPv4 fragments of TCP: dropped;
//! - a SYN that the proxy did not send (its `MARK_PROXY` from a socket of mesh-node's
//!   cgroup: a mark alone any process with CAP_NET_RAW can set) is dropped unless the node
//!   sent it and may (`--host-traffic=allow`, or the kubelet's cgroups). Captured flows reach
//!   a pod only through the proxy, and the `connect4` hook sends the node's own connections
//!   there too, so what is left is a raw socket, a pod whose interface has no capture
//!   program yet, or a connection made before the hook was attached;
//! - with `--udp-to-enrolled=dns-only`, UDP but DNS: to port 53, or from port 53 of one of
//!   the cluster's DNS servers (`DNS_SERVERS`).
//!
//! Attached to pod interfaces only; those of pods outside the mesh are left alone.

use aya_ebpf::{helpers::bpf_skb_cgroup_id, macros::classifier, programs::TcContext};
use mesh_common::{Counter, MARK_PROXY};

use crate::{
    capture::{dropped, ipv6, NEXT},
    host::kubelet_socket,
    maps::{pod_link, DNS_SERVERS},
    packet::{self, Ipv4, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, IPPROTO_UDP, PORT_DNS},
    settings,
};

#[classifier]
pub fn mesh_egress(ctx: TcContext) -> i32 {
    match try_egress(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

fn try_egress(ctx: &TcContext) -> Result<i32, i32> {
    // SAFETY: `skb` is the valid context pointer of this program invocation.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let link = pod_link(ifindex);
    if !link.enrolled() {
        return Ok(NEXT);
    }
    let ether_type = packet::ether_type(ctx).map_err(|()| NEXT)?;
    if packet::vlan_tagged(ctx, ether_type) {
        return Err(dropped(Counter::VlanDropped));
    }
    match ether_type {
        ETH_P_IP => {}
        ETH_P_IPV6 => return ipv6(ctx, link),
        _ => return Ok(NEXT),
    }
    let ip = packet::ipv4(ctx).map_err(|()| dropped(Counter::Malformed))?;
    match ip.proto {
        IPPROTO_TCP => tcp(ctx, &ip),
        IPPROTO_UDP if settings::udp_dns_only() => udp(ctx, &ip),
        _ => Ok(NEXT),
    }
}

#[inline(always)]
fn tcp(ctx: &TcContext, ip: &Ipv4) -> Result<i32, i32> {
    if ip.fragment {
        return Err(dropped(Counter::FragmentDropped));
    }
    let flags = packet::tcp_flags(ctx, ip).map_err(|()| dropped(Counter::Malformed))?;
    let syn = flags & packet::TCP_FLAG_SYN != 0 && flags & packet::TCP_FLAG_ACK == 0;
    if !syn || may_connect(ctx) {
        return Ok(NEXT);
    }
    Err(dropped(Counter::UnproxiedSyn))
}

/// Whether the SYN comes from a socket of the node (a forwarded or bridged packet has none)
/// that may reach enrolled pods directly: the proxy's, or with `--host-traffic=allow` any,
/// else the kubelet's.
#[inline(always)]
fn may_connect(ctx: &TcContext) -> bool {
    // SAFETY: the helper takes the program's context pointer; 0 means no local socket.
    let cgroup = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    if cgroup == 0 {
        return false;
    }
    // SAFETY: as in `try_egress`.
    let mark = unsafe { (*ctx.skb.skb).mark };
    let proxy = mark & MARK_PROXY != 0 && settings::is_proxy_cgroup(cgroup);
    proxy || settings::host_traffic_allowed() || kubelet_socket(ctx)
}

/// UDP to an enrolled pod with `--udp-to-enrolled=dns-only`: only DNS passes, a query to
/// the pod's port 53 or an answer from a DNS server's. Later fragments pass: without their
/// first one (which has the ports) they are never delivered.
#[inline(always)]
fn udp(ctx: &TcContext, ip: &Ipv4) -> Result<i32, i32> {
    if !ip.first {
        return Ok(NEXT);
    }
    let (src, dst) = packet::ports(ctx, ip).map_err(|()| dropped(Counter::Malformed))?;
    let answer = || src == PORT_DNS && DNS_SERVERS.get_ptr(ip.src).is_some();
    if dst == PORT_DNS || answer() {
        return Ok(NEXT);
    }
    Err(dropped(Counter::UdpDropped))
}
