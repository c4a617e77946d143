//! Header parsing shared by the TC programs (ingress and egress). Every reader returns
//! `Err(())` for a header it cannot read whole; the callers decide what a malformed packet
//! means for them (for TCP: dropped, never passed on uncaptured).

use aya_ebpf::programs::TcContext;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_ACK: u8 = 0x10;
/// UDP port of DNS (network order, as loaded).
pub const PORT_DNS: u16 = 53u16.to_be();

/// The EtherType of the frame (host order).
#[inline(always)]
pub fn ether_type(ctx: &TcContext) -> Result<u16, ()> {
    ctx.load::<u16>(12).map(u16::from_be).map_err(|_| ())
}

/// Whether the frame carries a VLAN tag (the kernel took the outer one out of the frame
/// before TC; a second one stays in it): the rules below would read the tag as the EtherType
/// and let the packet inside pass unchecked.
#[inline(always)]
pub fn vlan_tagged(ctx: &TcContext, ether_type: u16) -> bool {
    // SAFETY: `skb` is the valid context pointer of this program invocation.
    let present = unsafe { (*ctx.skb.skb).vlan_present } != 0;
    present || ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD
}

/// The source MAC address of the frame.
#[inline(always)]
pub fn source_mac(ctx: &TcContext) -> Result<[u8; 6], ()> {
    ctx.load(6).map_err(|_| ())
}

/// What the programs need of an IPv4 header; addresses in network order.
pub struct Ipv4 {
    pub src: u32,
    pub dst: u32,
    pub proto: u8,
    /// Offset of the transport header (after the IP options).
    pub l4: usize,
    /// One past the last byte of the IP packet (by its total length).
    pub end: usize,
    /// A fragment (more fragments follow, or not the first).
    pub fragment: bool,
    /// The first (or only) fragment: the one that carries the transport header.
    pub first: bool,
}

/// Reads the IPv4 header; `Err` when it is too short or not IPv4.
#[inline(always)]
pub fn ipv4(ctx: &TcContext) -> Result<Ipv4, ()> {
    let version_ihl: u8 = ctx.load(ETH_HLEN).map_err(|_| ())?;
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || ihl < 20 {
        return Err(());
    }
    let total = u16::from_be(ctx.load::<u16>(ETH_HLEN + 2).map_err(|_| ())?) as usize;
    // 0: a BIG TCP aggregate over 64 KiB, whose length is the packet's (what the kernel's
    // iph_totlen() reads too).
    let end = match total {
        0 => ctx.len() as usize,
        total if total < ihl => return Err(()),
        total => ETH_HLEN + total,
    };
    let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).map_err(|_| ())?);
    let offset = frag & 0x1fff;
    let more = frag & 0x2000 != 0;
    Ok(Ipv4 {
        proto: ctx.load(ETH_HLEN + 9).map_err(|_| ())?,
        src: ctx.load(ETH_HLEN + 12).map_err(|_| ())?,
        dst: ctx.load(ETH_HLEN + 16).map_err(|_| ())?,
        l4: ETH_HLEN + ihl,
        end,
        fragment: more || offset != 0,
        first: offset == 0,
    })
}

/// Source and destination port (network order) of a TCP or UDP header.
#[inline(always)]
pub fn ports(ctx: &TcContext, ip: &Ipv4) -> Result<(u16, u16), ()> {
    if !ip.first || ip.l4 + 4 > ip.end {
        return Err(());
    }
    let src = ctx.load(ip.l4).map_err(|_| ())?;
    let dst = ctx.load(ip.l4 + 2).map_err(|_| ())?;
    Ok((src, dst))
}

/// The flags byte of a TCP header.
#[inline(always)]
pub fn tcp_flags(ctx: &TcContext, ip: &Ipv4) -> Result<u8, ()> {
    if !ip.first || ip.l4 + 20 > ip.end {
        return Err(());
    }
    ctx.load(ip.l4 + 13).map_err(|_| ())
}

/// The sender's IPv4 address (network order) of an ARP packet for IPv4 over Ethernet,
/// with either hardware type Linux takes on an Ethernet link (1, Ethernet; 6, IEEE 802).
#[inline(always)]
pub fn arp_sender(ctx: &TcContext) -> Result<u32, ()> {
    let kinds: [u8; 6] = ctx.load(ETH_HLEN).map_err(|_| ())?;
    let [0, 1 | 6, 0x08, 0x00, 6, 4] = kinds else {
        return Err(());
    };
    ctx.load(ETH_HLEN + 14).map_err(|_| ())
}

/// Whether an IPv6 packet is ICMPv6 (neighbour discovery and the like), behind at most a
/// few extension headers; `Err` when the header chain cannot be read. A fragment is never
/// ICMPv6 here: neighbour discovery is not fragmented.
#[inline(always)]
pub fn ipv6_is_icmp(ctx: &TcContext) -> Result<bool, ()> {
    const HOP_BY_HOP: u8 = 0;
    const ROUTING: u8 = 43;
    const DESTINATION: u8 = 60;
    let mut next: u8 = ctx.load(ETH_HLEN + 6).map_err(|_| ())?;
    let mut offset = ETH_HLEN + 40;
    for _ in 0..4 {
        match next {
            IPPROTO_ICMPV6 => return Ok(true),
            HOP_BY_HOP | ROUTING | DESTINATION => {
                next = ctx.load(offset).map_err(|_| ())?;
                let len: u8 = ctx.load(offset + 1).map_err(|_| ())?;
                offset += (len as usize + 1) * 8;
            }
            _ => return Ok(false),
        }
    }
    Ok(next == IPPROTO_ICMPV6)
}
