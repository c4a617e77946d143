//! Handles on pinned maps that other threads than the datapath's use: the proxy's reply
//! steering (`MESH_FLOWS`) and the metrics' kernel counters.

use std::{net::SocketAddrV4, path::Path};

use aya::maps::{HashMap, MapData, PerCpuArray};
use mesh_common::{flow_verdict, maps, BypassCounter, Counter, FlowKey};

use super::{map_error, pin_dir, CaptureError};

/// A second handle on the pinned flow map, for the proxy: when it dials a pod of another node
/// as a local client that is not in the mesh (whose replies the capture program would
/// otherwise route straight to that client), it registers the reply direction of its
/// connection as a captured flow, so the replies are steered back to its socket.
pub struct ReplySteering {
    flows: std::sync::Mutex<HashMap<MapData, FlowKey, u32>>,
}

impl ReplySteering {
    /// Opens the node's pinned `MESH_FLOWS` map (after [`Datapath::install`]).
    pub fn open(bpffs: &Path, node: &str) -> Result<ReplySteering, CaptureError> {
        let path = pin_dir(bpffs, node).join(maps::FLOWS);
        let data = MapData::from_pin(&path).map_err(map_error(maps::FLOWS))?;
        let map = aya::maps::Map::from_map_data(data).map_err(map_error(maps::FLOWS))?;
        let flows = HashMap::try_from(map).map_err(map_error(maps::FLOWS))?;
        Ok(ReplySteering {
            flows: std::sync::Mutex::new(flows),
        })
    }

    fn key(remote: SocketAddrV4, local: SocketAddrV4) -> FlowKey {
        FlowKey {
            src_ip: u32::from_ne_bytes(remote.ip().octets()),
            dst_ip: u32::from_ne_bytes(local.ip().octets()),
            src_port: remote.port().to_be(),
            dst_port: local.port().to_be(),
        }
    }

    /// Packets from `remote` to `local` (the proxy's socket) are steered to it. The entry is
    /// left to the LRU (late packets after the socket closed still reach its TIME_WAIT
    /// state); the capture program drops it when the local client itself opens a flow
    /// with that tuple.
    pub fn add(&self, remote: SocketAddrV4, local: SocketAddrV4) -> Result<(), CaptureError> {
        self.flows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(Self::key(remote, local), flow_verdict::INBOUND, 0)
            .map_err(map_error(maps::FLOWS))
    }
}

/// The kernel decision counters (`mesh_kernel_packets_total`).
pub struct KernelCounters {
    pub(super) map: PerCpuArray<MapData, u64>,
    pub(super) bypass: Option<PerCpuArray<MapData, u64>>,
}

impl KernelCounters {
    /// Every capture counter with its label, summed over CPUs.
    pub fn read(&self) -> Vec<(&'static str, u64)> {
        sum_slots(&self.map, &Counter::ALL)
    }

    /// Every bypass counter with its label (`mesh_socket_bypass_total`); `None` when the
    /// bypass is not attached.
    pub fn read_bypass(&self) -> Option<Vec<(&'static str, u64)>> {
        self.bypass
            .as_ref()
            .map(|map| sum_slots(map, &BypassCounter::ALL))
    }
}

fn sum_slots<C: Copy + Into<u32>>(
    map: &PerCpuArray<MapData, u64>,
    slots: &[(C, &'static str)],
) -> Vec<(&'static str, u64)> {
    slots
        .iter()
        .map(|(slot, label)| {
            let total = map
                .get(&(*slot).into(), 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0);
            (*label, total)
        })
        .collect()
}
