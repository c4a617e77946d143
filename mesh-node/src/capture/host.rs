//! The node's own connections to enrolled pods (`--host-traffic`). Nothing a process of the
//! node's network namespace sends to a pod meets TC ingress, so without this every
//! host-network pod and node daemon reaches enrolled pods with neither PeerAuthentication nor
//! AuthorizationPolicy applied. With `kubelet-only` (the default) the `connect4` program on
//! the cgroup v2 root sends such a connection to the proxy, as plaintext from outside the
//! mesh, unless the kubelet makes it (its cgroups, `--kubelet-cgroup`); the egress program
//! drops a SYN that went around it (a raw socket). With `allow` both let the node through,
//! as Istio ambient does.
//!
//! The `connect4` link is pinned like the TC links (`links/connect4`): while mesh-node is
//! down the node's connections to enrolled pods still go to the proxy's (closed) listeners
//! and are refused, and the kubelet's probes still reach the pods.

use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    os::fd::AsRawFd,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, MapData},
    programs::{links::FdLink, links::PinnedLink, CgroupAttachMode, CgroupSockAddr},
    Ebpf,
};
use mesh_common::{maps, programs};

use super::{map_error, prog_error, program, replace_pin, sync_keys, CaptureError, Update};

/// `--host-traffic`: what the node's own connections to enrolled pods may do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum HostTraffic {
    /// Only the kubelet's connections reach enrolled pods directly; every other one goes
    /// through the proxy as plaintext from outside the mesh (STRICT refuses it,
    /// AuthorizationPolicy applies).
    #[default]
    KubeletOnly,
    /// Every connection from the node reaches enrolled pods directly (Istio's behaviour).
    Allow,
}

impl HostTraffic {
    /// The value of the kernel programs' `HOST_POLICY` global.
    pub fn policy(self) -> u8 {
        match self {
            HostTraffic::KubeletOnly => mesh_common::host_policy::KUBELET_ONLY,
            HostTraffic::Allow => mesh_common::host_policy::ALLOW,
        }
    }
}

/// The kubelet's cgroups on K3s (the agent runs the kubelet, containerd and the shims in
/// one unit) and with a separate kubelet unit (kubeadm).
pub const DEFAULT_KUBELET_CGROUPS: [&str; 3] = [
    "/system.slice/k3s.service",
    "/system.slice/k3s-agent.service",
    "/system.slice/kubelet.service",
];

/// The host-traffic state: the kubelet's cgroups and the source address in the kernel.
pub struct Host {
    kubelet: HashMap<MapData, u64, u32>,
    source: Array<MapData, u32>,
    /// The cgroup v2 root, where `--kubelet-cgroup` paths are looked up (`kubelet-only`).
    root: Option<fs::File>,
    paths: Vec<PathBuf>,
    /// The paths found, with their cgroup id, as last put in the map (`None` before the
    /// first look, when the map may still hold what an earlier run put there).
    found: Option<BTreeMap<PathBuf, u64>>,
}

impl Host {
    /// Attaches `connect4` (with `kubelet-only`), or removes the link a previous run pinned
    /// (with `allow`); `kubelet` and `source` are the loaded object's maps.
    pub fn install(
        ebpf: &mut Ebpf,
        dir: &Path,
        (traffic, kubelet_cgroups): (HostTraffic, &[PathBuf]),
        (kubelet, source): (HashMap<MapData, u64, u32>, Array<MapData, u32>),
        proxy_cgroup: u64,
    ) -> Result<Host, CaptureError> {
        let pin = dir.join("links/connect4");
        let root = match traffic {
            HostTraffic::KubeletOnly => {
                let (root, _) =
                    crate::sys::open_cgroup2_root().map_err(|err| CaptureError::Program {
                        program: programs::CONNECT4,
                        message: format!(
                            "cannot open the cgroup v2 root: {err}; --host-traffic=kubelet-only \
                             needs it (or choose --host-traffic=allow)"
                        ),
                    })?;
                if root.metadata().is_ok_and(|m| m.ino() == proxy_cgroup) {
                    tracing::warn!(
                        "mesh-node runs in the root cgroup: the node's processes there are taken \
                         for the proxy (run it in a cgroup of its own, as the DaemonSet does)"
                    );
                }
                let prog: &mut CgroupSockAddr = program(ebpf, programs::CONNECT4)?;
                prog.load().map_err(prog_error(programs::CONNECT4))?;
                // A cgroup link: other programs on the root (another node's mesh-node in
                // tests, other tools) keep theirs; this one acts in this node's namespace.
                let id = prog
                    .attach(&root, CgroupAttachMode::Single)
                    .map_err(prog_error(programs::CONNECT4))?;
                let link: FdLink = prog
                    .take_link(id)
                    .map_err(prog_error(programs::CONNECT4))?
                    .try_into()
                    .map_err(|err| CaptureError::Program {
                        program: programs::CONNECT4,
                        message: format!("not a BPF link ({err}): kernel >= 5.7 is required"),
                    })?;
                replace_pin(&pin, link)?;
                Some(root)
            }
            HostTraffic::Allow => {
                if let Ok(link) = PinnedLink::from_pin(&pin) {
                    link.unpin().map(drop).map_err(|err| CaptureError::Pin {
                        path: pin.clone(),
                        message: err.to_string(),
                    })?;
                }
                None
            }
        };
        let mut host = Host {
            kubelet,
            source,
            root,
            paths: kubelet_cgroups.to_vec(),
            found: None,
        };
        host.sync_kubelet()?;
        if traffic == HostTraffic::KubeletOnly && host.found.as_ref().is_some_and(|f| f.is_empty())
        {
            tracing::warn!(
                cgroups = ?host.paths,
                "--host-traffic=kubelet-only, but none of the kubelet's cgroups exists: every \
                 connection from the node to an enrolled pod goes through the proxy, so the \
                 kubelet's probes of STRICT pods are refused; set --kubelet-cgroup"
            );
        }
        Ok(host)
    }

    /// Looks the kubelet's cgroups up again (they may appear after mesh-node starts) and
    /// makes the map hold exactly their ids.
    pub fn sync_kubelet(&mut self) -> Result<(), CaptureError> {
        let Some(root) = &self.root else {
            return Ok(());
        };
        let root = format!("/proc/self/fd/{}", root.as_raw_fd());
        let mut found = BTreeMap::new();
        for path in &self.paths {
            let relative = path.strip_prefix("/").unwrap_or(path);
            // A cgroup's id is its directory's inode number in cgroupfs.
            if let Ok(meta) = fs::metadata(Path::new(&root).join(relative)) {
                found.insert(path.clone(), meta.ino());
            }
        }
        if self.found.as_ref() == Some(&found) {
            return Ok(());
        }
        let ids = found.values().copied();
        sync_keys(&mut self.kubelet, ids, maps::KUBELET_CGROUPS, Update::Exact)?;
        tracing::info!(cgroups = ?found.keys().collect::<Vec<_>>(), "the kubelet's cgroups");
        self.found = Some(found);
        Ok(())
    }

    /// Sets the node address host connections sent to the proxy are bound to.
    pub fn set_source(&mut self, source: Option<Ipv4Addr>) -> Result<(), CaptureError> {
        let value = source.map_or(0, |ip| u32::from_ne_bytes(ip.octets()));
        if self.source.get(&0, 0).ok() != Some(value) {
            self.source
                .set(0, value, 0)
                .map_err(map_error(maps::HOST_SOURCE))?;
        }
        Ok(())
    }
}
