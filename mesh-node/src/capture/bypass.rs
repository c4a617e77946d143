//! The same-node socket bypass (mesh-ebpf's `bypass`): `sock_ops` on the cgroup v2 root puts
//! local pods' sockets and the proxy's sockets to them in two SOCKHASH maps, `sk_msg` moves
//! each message straight into the peer socket. Nothing of it is pinned: the maps, the programs
//! and the cgroup link live exactly as long as this process, whose sockets are one end of
//! every bypassed connection (when it exits they are closed anyway).

use std::{collections::BTreeSet, net::SocketAddrV4};

use aya::{
    maps::{HashMap, MapData, PerCpuArray, SockHash},
    programs::{CgroupAttachMode, SkMsg, SockOps},
    Ebpf,
};
use mesh_common::{maps, programs, ServiceKey, SockKey};

use super::{map_error, prog_error, program, CaptureError};

/// The attached bypass: its socket maps, held open while the programs use them, and the
/// Services it may take.
pub struct Bypass {
    _pods: SockHash<MapData, SockKey>,
    _proxy: SockHash<MapData, SockKey>,
    services: HashMap<MapData, ServiceKey, u32>,
    http: HashMap<MapData, ServiceKey, u32>,
}

/// The bypass's maps and their sizes when it is off: created with the object all the same,
/// so they are made as small as the kernel allows.
pub const MAPS: [&str; 5] = [
    maps::BYPASS_PODS,
    maps::BYPASS_PROXY,
    maps::BYPASS_PASSED,
    maps::BYPASS_SERVICES,
    maps::BYPASS_HTTP,
];

impl Bypass {
    /// Loads and attaches the bypass programs of a loaded object. Returns the bypass, its
    /// counters and where the `sock_ops` program is attached.
    pub fn attach(
        ebpf: &mut Ebpf,
    ) -> Result<(Bypass, PerCpuArray<MapData, u64>, String), CaptureError> {
        let mut take = |name: &'static str| {
            ebpf.take_map(name).ok_or(CaptureError::Map {
                map: name,
                message: "missing from the object".into(),
            })
        };
        let pods: SockHash<MapData, SockKey> =
            SockHash::try_from(take(maps::BYPASS_PODS)?).map_err(map_error(maps::BYPASS_PODS))?;
        let proxy: SockHash<MapData, SockKey> =
            SockHash::try_from(take(maps::BYPASS_PROXY)?).map_err(map_error(maps::BYPASS_PROXY))?;
        let counters = PerCpuArray::try_from(take(maps::BYPASS_COUNTERS)?)
            .map_err(map_error(maps::BYPASS_COUNTERS))?;
        let services = HashMap::try_from(take(maps::BYPASS_SERVICES)?)
            .map_err(map_error(maps::BYPASS_SERVICES))?;
        let http =
            HashMap::try_from(take(maps::BYPASS_HTTP)?).map_err(map_error(maps::BYPASS_HTTP))?;

        for (name, map) in [
            (programs::MSG_FROM_POD, &pods),
            (programs::MSG_FROM_PROXY, &proxy),
        ] {
            let prog: &mut SkMsg = program(ebpf, name)?;
            prog.load().map_err(prog_error(name))?;
            prog.attach(map.fd()).map_err(prog_error(name))?;
        }

        let (cgroup_dir, cgroup) =
            crate::sys::open_cgroup2_root().map_err(|err| CaptureError::Program {
                program: programs::SOCKOPS,
                message: format!("cannot open the cgroup v2 root: {err}"),
            })?;
        let prog: &mut SockOps = program(ebpf, programs::SOCKOPS)?;
        prog.load().map_err(prog_error(programs::SOCKOPS))?;
        // A cgroup link: other programs (another node's mesh-node in tests, other tools)
        // keep theirs.
        prog.attach(&cgroup_dir, CgroupAttachMode::Single)
            .map_err(prog_error(programs::SOCKOPS))?;
        Ok((
            Bypass {
                _pods: pods,
                _proxy: proxy,
                services,
                http,
            },
            counters,
            cgroup,
        ))
    }

    /// Makes the bypass's maps hold exactly `vips` (the Service VIP:ports it may take: not
    /// HTTP, every ready endpoint an enrolled pod of this node) and `http` (local enrolled
    /// pods' HTTP ports, which it never takes), by difference.
    pub fn set_services(
        &mut self,
        vips: &BTreeSet<SocketAddrV4>,
        http: &BTreeSet<SocketAddrV4>,
    ) -> Result<(), CaptureError> {
        super::sync_service_map(
            &mut self.http,
            http,
            maps::BYPASS_HTTP,
            super::Update::Exact,
        )?;
        super::sync_service_map(
            &mut self.services,
            vips,
            maps::BYPASS_SERVICES,
            super::Update::Exact,
        )
    }
}
