//! The ABI between the mesh's kernel programs (`mesh-ebpf`) and the node daemon (`mesh-node`).
//!
//! Everything here is `#![no_std]` and `#[repr(C)]`: the same definitions compile for
//! `bpfel-unknown-none` and for the host. Keys and values carry explicit padding and a
//! compile-time size check so both sides agree byte for byte. IPv4 addresses and ports are
//! stored in network byte order, exactly as the kernel hands them to the programs.
#![no_std]

/// Packet mark bit set by the TC capture program: policy routing delivers marked packets
/// locally, where the `sk_lookup` program hands them to a proxy listener.
pub const MARK_CAPTURE: u32 = 0x200;
/// Socket mark (`SO_MARK`) carried by every connection the node proxy opens, so the kernel
/// programs and the routing rules never capture the proxy's own traffic again.
pub const MARK_PROXY: u32 = 0x400;
/// Routing table holding `local 0.0.0.0/0 dev lo` for captured packets.
pub const ROUTE_TABLE: u32 = 100;
/// Priority of the `fwmark MARK_CAPTURE lookup ROUTE_TABLE` rule (before `main` at 32766).
pub const RULE_PRIORITY: u32 = 100;

/// Outbound (transparent) listener port.
pub const PORT_OUTBOUND: u16 = 15001;
/// Inbound plaintext listener port.
pub const PORT_INBOUND: u16 = 15006;
/// Inbound HBONE (HTTP/2 CONNECT over mutual TLS) listener port.
pub const PORT_HBONE: u16 = 15008;
/// Admin port: metrics, health, debug.
pub const PORT_ADMIN: u16 = 15020;

/// Map names (pinned by name under the node's bpffs directory).
pub mod maps {
    /// `HashMap<u32 (IPv4, network order), PodEntry>`: every pod of this node on the pod
    /// network, enrolled or not, with the host-side interface its address is bound to. A
    /// packet that carries one of these addresses as its source on any other interface is
    /// dropped: a pod cannot take another pod's identity by taking its address.
    pub const PODS: &str = "MESH_PODS";
    /// `HashMap<u32 (ifindex), PodLink>`: the host-side interfaces of this node's pods (every
    /// veth whose other end is in another namespace), for the rules that follow the
    /// interface rather than an address (IPv6, fragments, VLAN tags, UDP, SYNs the proxy did
    /// not send).
    pub const POD_LINKS: &str = "MESH_POD_LINKS";
    /// `HashMap<MacKey, u32 (ifindex)>`: each pod interface's MAC address (its other end's,
    /// as first seen): a frame from another pod interface with that source MAC is dropped,
    /// so no pod can pull another pod's bridge forwarding entry to its own port.
    pub const POD_MACS: &str = "MESH_POD_MACS";
    /// `HashMap<u32 (IPv4), u32>`: the cluster's DNS servers (Service addresses with a port
    /// 53 and their endpoints): with `--udp-to-enrolled=dns-only`, UDP from port 53 reaches
    /// enrolled pods only from these.
    pub const DNS_SERVERS: &str = "MESH_DNS";
    /// `HashMap<u64 (cgroup id), u32>`: the kubelet's cgroups. Connections from the node to
    /// enrolled pods made by a process in one of them (or below) reach the pod directly; with
    /// `--host-traffic=kubelet-only` every other one goes through the proxy.
    pub const KUBELET_CGROUPS: &str = "MESH_KUBELET_CG";
    /// `Array<u32>` of one entry: the node address (network order) a host connection to an
    /// enrolled pod is bound to when it is sent to the proxy (0: none known yet).
    pub const HOST_SOURCE: &str = "MESH_HOST_SRC";
    /// `LruHashMap<FlowKey, u32 (flow_verdict)>`: flows captured at their SYN.
    pub const FLOWS: &str = "MESH_FLOWS";
    /// `LruHashMap<FlowKey, u32 (flow_verdict)>`: the cached verdict for flows of enrolled
    /// pods that were not captured at their SYN (socket lookup done once per flow). Kept apart
    /// from `FLOWS` so this churn cannot evict captured flows.
    pub const VERDICTS: &str = "MESH_VERDICTS";
    /// `SockMap` indexed by [`super::Listener`]: the proxy's listening sockets.
    pub const LISTENERS: &str = "MESH_LISTENERS";
    /// `HashMap<u32 (ifindex), BridgePort>`: interfaces that are ports of a bridge, with the
    /// bridge's MAC address, so captured frames can be handed up to the node's IP stack.
    pub const BRIDGE_PORTS: &str = "MESH_BRIDGE_PORTS";
    /// `HashMap<ServiceKey, u32>`: Service VIP:ports with a ready endpoint that is an enrolled
    /// pod of this node. A pod outside the mesh on this node dialling one of them would
    /// otherwise reach the enrolled pod through kube-proxy's DNAT, bridged, without its
    /// PeerAuthentication and AuthorizationPolicy: such SYNs are captured inbound.
    pub const SERVICES: &str = "MESH_SERVICES";
    /// `LruHashMap<ServiceKey, u32>`: the client address:port of each flow captured through
    /// `SERVICES`, so `sk_lookup` still hands it to the inbound listener when kube-proxy's
    /// DNAT got to it first (the local address is then the endpoint, not the Service).
    pub const SERVICE_CLIENTS: &str = "MESH_SERVICE_CLIENTS";
    /// `PerCpuArray<u64>` indexed by [`super::Counter`].
    pub const COUNTERS: &str = "MESH_COUNTERS";
    /// `SockHash<SockKey>`: established TCP sockets of local enrolled pods (same-node bypass).
    /// Not pinned, like the other bypass maps: they live and die with the proxy, whose
    /// sockets every bypassed byte goes to or comes from.
    pub const BYPASS_PODS: &str = "MESH_BYP_PODS";
    /// `SockHash<SockKey>`: the proxy's established sockets to and from local enrolled pods.
    pub const BYPASS_PROXY: &str = "MESH_BYP_PROXY";
    /// `HashMap<SockKey, u32>`: bypass sockets that found no peer to send to and so send over
    /// TCP for good (their bytes must never overtake each other); an entry goes when its
    /// socket closes.
    pub const BYPASS_PASSED: &str = "MESH_BYP_PASSED";
    /// `HashMap<ServiceKey, u32>`: Service VIP:ports whose every ready endpoint is an
    /// enrolled pod of this node, so a connection to one stays on the node (the bypass).
    pub const BYPASS_SERVICES: &str = "MESH_BYP_SVC";
    /// `HashMap<ServiceKey, u32>`: local enrolled pods' HTTP ports (`podIP:port`); a
    /// connection with an end there never joins the bypass.
    pub const BYPASS_HTTP: &str = "MESH_BYP_HTTP";
    /// `PerCpuArray<u64>` indexed by [`super::BypassCounter`].
    pub const BYPASS_COUNTERS: &str = "MESH_BYP_COUNT";
}

/// Program names as they appear in the object file and in `bpftool prog` (15 characters max).
pub mod programs {
    /// TC ingress program attached to every pod-facing link and uplink.
    pub const CAPTURE: &str = "mesh_capture";
    /// TC egress program on the same links: what goes into an enrolled pod's interface.
    pub const EGRESS: &str = "mesh_egress";
    /// `cgroup/connect4` program (cgroup v2 root): the node's own connections to enrolled
    /// pods go to the proxy, unless the kubelet makes them.
    pub const CONNECT4: &str = "mesh_connect4";
    /// `sk_lookup` program attached to the node's network namespace.
    pub const SK_LOOKUP: &str = "mesh_sk_lookup";
    /// `sock_ops` program (cgroup): puts pod and proxy sockets in the bypass maps.
    pub const SOCKOPS: &str = "mesh_sockops";
    /// `sk_msg` program on `BYPASS_PODS`: a pod's message goes straight to the proxy's socket.
    pub const MSG_FROM_POD: &str = "mesh_msg_pod";
    /// `sk_msg` program on `BYPASS_PROXY`: the proxy's message goes straight to the pod's.
    pub const MSG_FROM_PROXY: &str = "mesh_msg_proxy";
}

/// Index of a proxy listener in the `LISTENERS` sockmap.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// Outbound capture (`PORT_OUTBOUND`).
    Outbound = 0,
    /// Inbound plaintext (`PORT_INBOUND`).
    Inbound = 1,
    /// Inbound HBONE (`PORT_HBONE`).
    Hbone = 2,
}

/// Number of slots in the `LISTENERS` sockmap.
pub const LISTENER_SLOTS: u32 = 3;

/// Which way a captured flow goes, relative to the enrolled pod of this node.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Sent by a local enrolled pod.
    Outbound = 1,
    /// Addressed to a local enrolled pod.
    Inbound = 2,
}

/// Value of the `FLOWS` map: what to do with the later packets of a flow.
pub mod flow_verdict {
    /// Leave alone: the flow was not captured (it predates the mesh, or it is a reply of a
    /// flow the mesh never captured).
    pub const PASS: u32 = 0;
    /// Steer: captured at its SYN from a local enrolled pod.
    pub const OUTBOUND: u32 = super::Direction::Outbound as u32;
    /// Steer: captured at its SYN to a local enrolled pod.
    pub const INBOUND: u32 = super::Direction::Inbound as u32;
    /// Steer: a local socket that is not a listener owns it (found by socket lookup).
    pub const OWNED: u32 = 3;
}

/// Flags of [`PodEntry`] and [`PodLink`].
pub mod pod_flags {
    /// The pod is in the mesh (a `PodLink`: the interface carries an enrolled pod's
    /// address, or claims one).
    pub const ENROLLED: u32 = 1;
    /// Set on every entry: the kernel programs read a missing entry as an all-zero one.
    pub const PRESENT: u32 = 2;
}

/// Value of the `PODS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodEntry {
    /// The host-side interface the pod's address is bound to; 0 when no interface can be
    /// trusted with it yet (none claims it, or several do): the address is then refused as
    /// a source everywhere.
    pub ifindex: u32,
    /// [`pod_flags`].
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<PodEntry>() == 8);

impl PodEntry {
    /// Whether there is such a pod (an entry).
    pub const fn present(&self) -> bool {
        self.flags & pod_flags::PRESENT != 0
    }

    /// Whether the pod is in the mesh.
    pub const fn enrolled(&self) -> bool {
        self.flags & pod_flags::ENROLLED != 0
    }
}

/// Value of the `POD_LINKS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodLink {
    /// The address of the pod this interface belongs to (network order), for the
    /// interface's life; 0 while it belongs to none. It sends from that address only.
    pub ip: u32,
    /// [`pod_flags`].
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<PodLink>() == 8);

impl PodLink {
    /// Whether this is a pod's interface (an entry).
    pub const fn present(&self) -> bool {
        self.flags & pod_flags::PRESENT != 0
    }

    /// Whether an enrolled pod is (or may be) behind this interface.
    pub const fn enrolled(&self) -> bool {
        self.flags & pod_flags::ENROLLED != 0
    }
}

/// Key of the `POD_MACS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MacKey {
    /// The MAC address.
    pub mac: [u8; 6],
    /// Explicit padding.
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<MacKey>() == 8);

/// Values of the kernel programs' `HOST_POLICY` global (`--host-traffic`).
pub mod host_policy {
    /// Only the kubelet's connections reach enrolled pods directly; every other connection
    /// from the node goes through the proxy as plaintext from outside the mesh.
    pub const KUBELET_ONLY: u8 = 0;
    /// Every connection from the node reaches enrolled pods directly (Istio's behaviour).
    pub const ALLOW: u8 = 1;
}

/// Deepest cgroup level the programs look at when they match a process against
/// `KUBELET_CGROUPS` (the root is level 0).
pub const CGROUP_LEVELS: i32 = 16;

/// Key of the `FLOWS` map: a TCP 4-tuple as seen at TC ingress, before any NAT.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source address, network order.
    pub src_ip: u32,
    /// Destination address, network order.
    pub dst_ip: u32,
    /// Source port, network order.
    pub src_port: u16,
    /// Destination port, network order.
    pub dst_port: u16,
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 12);

/// Key of the `SERVICES` map: a Service VIP and port, network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// Cluster IP, network order.
    pub ip: u32,
    /// Service port, network order.
    pub port: u16,
    /// Explicit padding.
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);

/// Value of the `BRIDGE_PORTS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BridgePort {
    /// MAC address of the bridge the port belongs to.
    pub bridge_mac: [u8; 6],
    /// Explicit padding.
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<BridgePort>() == 8);

/// Counters kept by the kernel programs, one slot each in the `COUNTERS` map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A SYN from a local enrolled pod was steered to the outbound listener.
    CapturedOutboundSyn = 0,
    /// A SYN to a local enrolled pod was steered to the inbound listener.
    CapturedInboundSyn = 1,
    /// A later packet of a flow marked for steering in the `FLOWS` map was steered.
    SteeredFlow = 2,
    /// The first packet seen of a flow owned by a local socket (socket lookup) was steered;
    /// the verdict is cached in `FLOWS`.
    SteeredSocket = 3,
    /// A packet to or from an enrolled pod belonged to no captured flow and was left alone
    /// (connections that predate the mesh, replies of flows the mesh never captured).
    PassedUncaptured = 4,
    /// A TCP packet (or an IPv4 header) too short or malformed to read was dropped: a TCP
    /// packet is never passed on uncaptured because its header could not be read.
    Malformed = 5,
    /// `sk_lookup` assigned a proxy listener.
    LookupAssigned = 6,
    /// `sk_lookup` wanted a proxy listener but none was registered (proxy down).
    LookupNoListener = 7,
    /// Rewriting the destination MAC of a bridged frame failed.
    MacRewriteFailed = 8,
    /// An IPv4 packet whose source is a local pod's address arrived on another interface
    /// than that pod's (or while no interface is trusted with it): dropped.
    SpoofedSource = 9,
    /// An ARP packet claiming a local pod's address arrived on another interface than that
    /// pod's: dropped, so no neighbour table learns the impostor.
    SpoofedArp = 10,
    /// IPv6 TCP or UDP to or from an enrolled pod: dropped (IPv6 is not proxied).
    Ipv6Dropped = 11,
    /// An IPv4 fragment of TCP to or from an enrolled pod (or to a captured Service
    /// address): dropped (real TCP sets DF; a fragmented SYN would escape capture).
    FragmentDropped = 12,
    /// UDP to an enrolled pod other than DNS, with `--udp-to-enrolled=dns-only`: dropped.
    UdpDropped = 13,
    /// A SYN into an enrolled pod's interface that the proxy did not send, nor a socket of
    /// the node that may (a raw socket, a connection the `connect4` hook did not see, a pod
    /// whose own interface has no capture program yet): dropped.
    UnproxiedSyn = 14,
    /// A connection from the node to an enrolled pod (or a captured Service address) was
    /// sent to the proxy (`connect4`).
    HostCaptured = 15,
    /// A connection from the node to an enrolled pod made by the kubelet went directly.
    HostKubelet = 16,
    /// A connection from the node to an enrolled pod could not be sent to the proxy (its
    /// socket is bound to a port but no address): refused with EPERM.
    HostRefused = 17,
    /// A connection straight to one of the proxy's own listeners (`127.0.0.1:15001`, ...):
    /// refused by `sk_lookup`, so the proxy never dials itself.
    SelfLoop = 18,
    /// A VLAN-tagged frame from a pod's interface, or into an enrolled pod's: dropped (a
    /// tag would hide the packet from every other rule).
    VlanDropped = 19,
    /// A frame from a pod's interface whose source MAC is another pod interface's: dropped.
    SpoofedMac = 20,
}

impl From<Counter> for u32 {
    fn from(counter: Counter) -> u32 {
        counter as u32
    }
}

/// Number of counters in use.
pub const COUNTER_SLOTS: u32 = 21;
/// Size of the pinned `COUNTERS` map: larger than needed, so a version that adds counters
/// can adopt the map a previous one pinned.
pub const COUNTER_CAPACITY: u32 = 64;
const _: () = assert!(COUNTER_SLOTS <= COUNTER_CAPACITY);

impl Counter {
    /// Every counter, in slot order, with the label the daemon exports it under.
    pub const ALL: [(Counter, &'static str); COUNTER_SLOTS as usize] = [
        (Counter::CapturedOutboundSyn, "captured_outbound_syn"),
        (Counter::CapturedInboundSyn, "captured_inbound_syn"),
        (Counter::SteeredFlow, "steered_flow"),
        (Counter::SteeredSocket, "steered_socket"),
        (Counter::PassedUncaptured, "passed_uncaptured"),
        (Counter::Malformed, "malformed"),
        (Counter::LookupAssigned, "lookup_assigned"),
        (Counter::LookupNoListener, "lookup_no_listener"),
        (Counter::MacRewriteFailed, "mac_rewrite_failed"),
        (Counter::SpoofedSource, "spoofed_source"),
        (Counter::SpoofedArp, "spoofed_arp"),
        (Counter::Ipv6Dropped, "ipv6_dropped"),
        (Counter::FragmentDropped, "fragment_dropped"),
        (Counter::UdpDropped, "udp_dropped"),
        (Counter::UnproxiedSyn, "unproxied_syn"),
        (Counter::HostCaptured, "host_captured"),
        (Counter::HostKubelet, "host_kubelet"),
        (Counter::HostRefused, "host_refused"),
        (Counter::SelfLoop, "self_loop"),
        (Counter::VlanDropped, "vlan_dropped"),
        (Counter::SpoofedMac, "spoofed_mac"),
    ];
}

/// Which bypass map a socket is in (part of [`SockKey`]).
pub mod sock_class {
    /// A socket of a local enrolled pod, in its own network namespace.
    pub const POD: u32 = 1;
    /// A socket of the node proxy to or from a local enrolled pod.
    pub const PROXY: u32 = 2;
}

/// Key of the bypass maps: a socket's own view of its connection. A pod's socket and the
/// proxy's socket of the same leg have mirrored keys; the proxy's transparent sockets can have
/// exactly the key of a pod's socket (it connects from the client's address), so the class
/// tells them apart.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// Local address, network order.
    pub local_ip: u32,
    /// Remote address, network order.
    pub remote_ip: u32,
    /// Local port, host order.
    pub local_port: u16,
    /// Remote port, host order.
    pub remote_port: u16,
    /// [`sock_class`] of the socket.
    pub class: u32,
}
const _: () = assert!(core::mem::size_of::<SockKey>() == 16);

/// Counters of the same-node bypass, one slot each in the `BYPASS_COUNTERS` map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BypassCounter {
    /// A pod socket joined the bypass.
    PodSocket = 0,
    /// A proxy socket joined the bypass.
    ProxySocket = 1,
    /// A socket could not join (map full, or the socket already in another program's
    /// sockmap): its connection uses TCP, as without the bypass.
    InsertFailed = 2,
    /// A message went straight to its peer socket.
    Redirected = 3,
    /// A socket found no peer socket to send to: its first message (the peer has not joined
    /// yet, or never will), or one after the peer closed. It sends over TCP from then on.
    NoPeer = 4,
}

impl From<BypassCounter> for u32 {
    fn from(counter: BypassCounter) -> u32 {
        counter as u32
    }
}

/// Number of slots in the `BYPASS_COUNTERS` map.
pub const BYPASS_COUNTER_SLOTS: u32 = 5;

impl BypassCounter {
    /// Every counter, in slot order, with its label.
    pub const ALL: [(BypassCounter, &'static str); BYPASS_COUNTER_SLOTS as usize] = [
        (BypassCounter::PodSocket, "pod_socket"),
        (BypassCounter::ProxySocket, "proxy_socket"),
        (BypassCounter::InsertFailed, "insert_failed"),
        (BypassCounter::Redirected, "redirected"),
        (BypassCounter::NoPeer, "no_peer"),
    ];
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: as below.
    unsafe impl aya::Pod for super::SockKey {}
    // SAFETY: each type is `#[repr(C)]`, `Copy`, has no implicit padding (checked by the size
    // asserts above) and every bit pattern is a valid value.
    unsafe impl aya::Pod for super::PodEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PodLink {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MacKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BridgePort {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceKey {}
}
