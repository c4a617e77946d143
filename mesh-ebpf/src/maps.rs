//! Maps shared with `mesh-node`. All are pinned by name under the node's bpffs directory, so
//! they outlive a mesh-node restart: enrolled pods stay captured (the mesh fails closed) and
//! the next mesh-node adopts them.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, SockMap},
};
use mesh_common::{BridgePort, EnrolledPod, FlowKey, ServiceKey, COUNTER_SLOTS, LISTENER_SLOTS};

/// Local pods in the mesh, by IPv4 address (network order).
#[map(name = "MESH_ENROLLED")]
pub static ENROLLED: HashMap<u32, EnrolledPod> = HashMap::pinned(65_536, 0);

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

/// Decision counters, indexed by `mesh_common::Counter`.
#[map(name = "MESH_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_SLOTS, 0);
