//! The same-node socket bypass (mesh-ebpf's `bypass`): `sock_ops` on the cgroup v2 root puts
//! local pods' sockets and the proxy's sockets to them in two SOCKHASH maps, `sk_msg` moves
//! each message straight into the peer socket. Nothing of it is pinned: the maps, the programs
//! and the cgroup link live exactly as long as this process, whose sockets are one end of
//! every bypassed connection (when it exits they are closed anyway).

use aya::{
    maps::{MapData, PerCpuArray, SockHash},
    programs::{CgroupAttachMode, SkMsg, SockOps},
    Ebpf,
};
use mesh_common::{maps, programs, SockKey};

use super::{map_error, prog_error, program, CaptureError};

/// The attached bypass: its socket maps, held open while the programs use them.
pub struct Bypass {
    _pods: SockHash<MapData, SockKey>,
    _proxy: SockHash<MapData, SockKey>,
}

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
            },
            counters,
            cgroup,
        ))
    }
}
