//! Maps shared with `mesh-node`. All are pinned by name under the node's bpffs directory, so
//! they outlive a mesh-node restart: enrolled pods stay captured (the mesh fails closed) and
//! the next mesh-node adopts them.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockMap},
};
use mesh_common::{
    BridgePort, FlowKey, MacKey, PodEntry, PodLink, ServiceKey, COUNTER_CAPACITY, LISTENER_SLOTS,
};

/// This node's pods on the pod network by IPv4 address (network order): the interface each
/// address is bound to, and whether the pod is enrolled.
#[map(name = "MESH_PODS")]
pub static PODS: HashMap<u32, PodEntry> = HashMap::pinned(65_536, 0);

/// The host-side interfaces of this node's pods, by ifindex.
#[map(name = "MESH_POD_LINKS")]
pub static POD_LINKS: HashMap<u32, PodLink> = HashMap::pinned(65_536, 0);

/// Each pod interface's MAC: the only interface frames with that source MAC may come from.
#[map(name = "MESH_POD_MACS")]
pub static POD_MACS: HashMap<MacKey, u32> = HashMap::pinned(65_536, 0);

/// The cluster's DNS servers (value unused, 1).
#[map(name = "MESH_DNS")]
pub static DNS_SERVERS: HashMap<u32, u32> = HashMap::pinned(1_024, 0);

/// Flows captured at their SYN, keyed by the pre-NAT tuple TC sees; value: the direction
/// (`mesh_common::flow_verdict`).
#[map(name = "MESH_FLOWS")]
pub static FLOWS: LruHashMap<FlowKey, u32> = LruHashMap::pinned(262_144, 0);

/// Cached verdicts (`PASS` or `OWNED`) for flows of enrolled pods not captured at their SYN.
#[map(name = "MESH_VERDICTS")]
pub static VERDICTS: LruHashMap<FlowKey, u32> = LruHashMap::pinned(131_072, 0);

/// The proxy's listening sockets, indexed by `mesh_common::Listener`.
#[map(name = "MESH_LISTENERS")]
pub static LISTENERS: SockMap = SockMap::pinned(LISTENER_SLOTS, 0);

/// Service VIP:ports with a ready enrolled endpoint on this node (value unused, 1).
#[map(name = "MESH_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, u32> = HashMap::pinned(65_536, 0);

/// Clients (address, port) of flows captured through `SERVICES`; value unused (1).
#[map(name = "MESH_SERVICE_CLIENTS")]
pub static SERVICE_CLIENTS: LruHashMap<ServiceKey, u32> = LruHashMap::pinned(65_536, 0);

/// Bridge ports (by ifindex) and their bridge's MAC address.
#[map(name = "MESH_BRIDGE_PORTS")]
pub static BRIDGE_PORTS: HashMap<u32, BridgePort> = HashMap::pinned(65_536, 0);

/// The kubelet's cgroups (value unused, 1).
#[map(name = "MESH_KUBELET_CG")]
pub static KUBELET_CGROUPS: HashMap<u64, u32> = HashMap::pinned(64, 0);

/// Index 0: the node address host connections to enrolled pods are bound to.
#[map(name = "MESH_HOST_SRC")]
pub static HOST_SOURCE: Array<u32> = Array::pinned(1, 0);

/// Decision counters, indexed by `mesh_common::Counter`.
#[map(name = "MESH_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_CAPACITY, 0);

/// This node's pod with address `ip` (network order); an all-zero entry (not `present`)
/// when there is none. (A plain value, not an `Option`: the verifier refuses code that
/// spills the uninitialised payload of a `None`.)
#[inline(always)]
pub fn pod(ip: u32) -> PodEntry {
    // SAFETY: the value is plain data, copied out of the map right away.
    unsafe { PODS.get(ip) }.copied().unwrap_or_default()
}

/// Whether `ip` (network order) is an enrolled pod of this node.
#[inline(always)]
pub fn enrolled(ip: u32) -> bool {
    pod(ip).enrolled()
}

/// The pod interface with this ifindex; an all-zero one (not `present`) when it is none.
#[inline(always)]
pub fn pod_link(ifindex: u32) -> PodLink {
    // SAFETY: as in `pod`.
    unsafe { POD_LINKS.get(ifindex) }
        .copied()
        .unwrap_or_default()
}

/// Whether `ip:port` (network order) is a captured Service address (`SERVICES`).
#[inline(always)]
pub fn service(ip: u32, port: u16) -> bool {
    SERVICES.get_ptr(ServiceKey { ip, port, _pad: 0 }).is_some()
}
