//! The kernel side of capture, owned end to end by mesh-node: loading the programs, attaching
//! them (TC ingress on every pod-facing link and uplink, TC egress on pod links, `sk_lookup`
//! on the node's netns, `connect4` on the cgroup v2 root), pinning links and maps under `<bpffs>/<node>/` so
//! they outlive the process (the mesh fails closed), adopting them on the next start without
//! a gap, keeping the maps in step with the config and the node's interfaces, and removing
//! all of it on `mesh-node uninstall`.

pub mod bypass;
mod handles;
pub mod host;
pub mod links;
mod pins;
pub mod pods;
pub mod routing;
mod tc;

pub use handles::{KernelCounters, ReplySteering};
use pins::replace_pin;
pub use pins::{pin_dir, uninstall};
use tc::{Attach, Tc};

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, SockMap},
    programs::{links::FdLink, SchedClassifier, SkLookup},
    Ebpf, EbpfLoader,
};
use mesh_common::{maps, programs, BridgePort, Listener, ServiceKey};

use self::{
    host::{Host, HostTraffic},
    pods::{LocalPods, PodMaps},
};

/// What the datapath thread reacts to.
#[derive(Debug)]
pub enum Event {
    /// A link appeared, changed or disappeared.
    LinksChanged,
    /// A new config snapshot is in use.
    Config(std::sync::Arc<crate::state::State>),
    /// The CNI plugin reports a pod's start, end or asks for a check (`crate::cni`).
    Pod(PodRequest),
    /// A successor is taking over the node: write nothing more to the kernel until
    /// `Resume` (it failed) or `HandedOver`; answered once nothing is being written.
    Pause(tokio::sync::oneshot::Sender<()>),
    /// The successor failed before serving: this process stays the node's writer.
    Resume,
    /// The successor serves: the kernel state is its own from now on.
    HandedOver,
}

/// A pod as the CNI plugin reports it, with the enrolment mesh-node decided for it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PodStart {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Host-side interfaces of the CNI result (the pod's veth is one of them).
    pub interfaces: Vec<String>,
    /// The pod's IPv4 addresses.
    pub addresses: Vec<Ipv4Addr>,
    /// Whether the pod is enrolled.
    pub enrolled: bool,
}

impl PodStart {
    /// The pod's (first) IPv4 address.
    fn ip(&self) -> Result<Ipv4Addr, String> {
        self.addresses
            .first()
            .copied()
            .ok_or_else(|| "the CNI result gives the pod no IPv4 address".to_string())
    }
}

/// One CNI command for the datapath thread, answered on `reply`.
#[derive(Debug)]
pub struct PodRequest {
    /// ADD, DEL or CHECK.
    pub command: mesh_cni::Command,
    /// The pod.
    pub pod: PodStart,
    /// `Ok` or why not.
    pub reply: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// A pod interface the CNI plugin reported, as kept (and saved) by the datapath.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GatedPod {
    /// `namespace/name`.
    pub pod: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Enrolled, as decided at its start or by the config since.
    pub enrolled: bool,
}

/// What [`Datapath`] saves of the gated interfaces: valid for one boot only (interface
/// indexes start again after a reboot).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct GateRecord {
    boot_id: String,
    pods: BTreeMap<u32, GatedPod>,
}

fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_string())
        .unwrap_or_default()
}

/// The kernel object built by `cargo xtask build-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MESH_EBPF_OBJECT"));

/// Errors of the capture datapath.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The object could not be loaded (verifier, incompatible pinned maps, ...).
    #[error("cannot load the eBPF programs: {0}; if maps pinned by another mesh-node version are in the way, run `mesh-node uninstall --node NAME`")]
    Load(#[from] aya::EbpfError),
    /// A program could not be loaded or attached.
    #[error("eBPF program {program}: {message}")]
    Program {
        /// Program name.
        program: &'static str,
        /// What failed.
        message: String,
    },
    /// A map operation failed.
    #[error("eBPF map {map}: {message}")]
    Map {
        /// Map name.
        map: &'static str,
        /// What failed.
        message: String,
    },
    /// Another mesh-node holds this node's pin directory.
    #[error("another mesh-node is running for this node (it holds {0}); stop it first")]
    Busy(PathBuf),
    /// A pin could not be created or removed.
    #[error("pin {path}: {message}")]
    Pin {
        /// Pin path.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// An external command (`ip`, `iptables`) failed.
    #[error("`{command}` failed: {message}")]
    Command {
        /// The command line.
        command: String,
        /// Its error output.
        message: String,
    },
}

/// `--udp-to-enrolled`: what UDP may reach enrolled pods.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum UdpToEnrolled {
    /// All of it (STRICT covers TCP, as in Istio).
    #[default]
    Allow,
    /// DNS only (to port 53, or from port 53 of the cluster's DNS servers); everything else
    /// is dropped and counted.
    DnsOnly,
}

/// How the datapath is set up (from the command line).
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// Log every steered SYN from the kernel.
    pub log_captures: bool,
    /// Attach the same-node socket bypass.
    pub bypass: bool,
    /// What the node's own connections to enrolled pods may do.
    pub host_traffic: HostTraffic,
    /// The kubelet's cgroups (paths below the cgroup v2 root).
    pub kubelet_cgroups: Vec<PathBuf>,
    /// UDP to enrolled pods: DNS only.
    pub udp_dns_only: bool,
    /// Where the interfaces the CNI plugin reported are saved across restarts (in the state
    /// directory); `None`: not saved.
    pub gate_file: Option<PathBuf>,
    /// The cgroup of a draining predecessor's sockets (0: none), which stay the proxy's.
    pub predecessor_cgroup: u64,
}

/// The node's lock (an exclusive `flock` on its pin directory, created if missing):
/// `Ok(None)` while another mesh-node holds it.
pub fn try_lock_node(bpffs: &Path, node: &str) -> std::io::Result<Option<std::os::fd::OwnedFd>> {
    let dir = pin_dir(bpffs, node);
    fs::create_dir_all(dir.join("links"))?;
    crate::sys::try_lock_dir(&dir)
}

/// The loaded programs, their links and the maps user space writes.
pub struct Datapath {
    ebpf: Ebpf,
    dir: PathBuf,
    pods: PodMaps,
    /// The node's pods as the config last gave them (address -> enrolled); `None` until the
    /// first config is applied.
    config_pods: Option<LocalPods>,
    /// The pods last applied to the kernel: the config's, with the gated ones over them.
    local_pods: Option<LocalPods>,
    /// Pod interfaces the CNI plugin reported (ifindex -> pod), for their life.
    gated: BTreeMap<u32, GatedPod>,
    /// Where `gated` is saved.
    gate_file: Option<PathBuf>,
    /// Pod interfaces as of the last link scan: ifindex -> (namespace id, ifindex there).
    peers: BTreeMap<u32, (i32, u32)>,
    /// What each pod interface's other end held when last read (kept when a read fails).
    seen: pods::Claims,
    /// Pod addresses bound to no interface, with why, as last reported.
    unbound: BTreeMap<Ipv4Addr, String>,
    host: Host,
    services: HashMap<MapData, ServiceKey, u32>,
    dns_servers: HashMap<MapData, u32, u32>,
    /// What the Service map was last asked to hold: VIP:ports, and NodePorts (captured at
    /// every address of the node).
    /// `None` until the first config is applied: the map a previous run pinned is kept as it
    /// is until then (the mesh fails closed).
    service_inputs: Option<(BTreeSet<SocketAddrV4>, BTreeSet<u16>)>,
    /// The node addresses the Service map was last built for.
    services_addresses: Option<BTreeSet<Ipv4Addr>>,
    /// The node's own IPv4 addresses, refreshed with the links.
    node_addresses: BTreeSet<Ipv4Addr>,
    /// The same with their prefix lengths.
    node_networks: BTreeSet<(Ipv4Addr, u8)>,
    bridge_ports: HashMap<MapData, u32, BridgePort>,
    listeners: SockMap<MapData>,
    /// Links carrying the TC programs: ifindex -> name.
    attached: BTreeMap<u32, String>,
    /// Those of them that carry the egress program too (pod interfaces).
    egress: BTreeSet<u32>,
    /// Links the program could not be attached to (retried): name -> error.
    failed: BTreeMap<String, String>,
    /// The enrolled set the guards' nftables set last received, if it is known to be current.
    guard_set: Option<BTreeSet<Ipv4Addr>>,
    /// The same-node socket bypass, when attached.
    bypass: Option<bypass::Bypass>,
    /// Exclusive lock on the pin directory: one mesh-node per node.
    _lock: std::os::fd::OwnedFd,
}

fn map_error(map: &'static str) -> impl Fn(aya::maps::MapError) -> CaptureError {
    move |err| CaptureError::Map {
        map,
        message: err.to_string(),
    }
}

fn prog_error(program: &'static str) -> impl Fn(aya::programs::ProgramError) -> CaptureError {
    move |err| CaptureError::Program {
        program,
        message: format!("{err} ({})", error_chain(&err)),
    }
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, CaptureError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(CaptureError::Program {
        program: name,
        message: "missing from the object".into(),
    })?;
    program.try_into().map_err(prog_error(name))
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut source = err.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.join(": ")
}

impl Datapath {
    /// Loads the programs and takes over the node: adopts or replaces what a previous
    /// mesh-node left pinned, installs routing and guard rules, attaches to every link.
    /// Subscribe to link events before calling this, so no link appears unseen.
    /// With `settings.bypass`, the same-node socket bypass is attached too; if the kernel
    /// refuses it, the error is logged and the node runs without it (traffic is the same,
    /// only slower).
    pub fn install(
        bpffs: &Path,
        node: &str,
        settings: &Settings,
        lock: std::os::fd::OwnedFd,
    ) -> Result<(Datapath, KernelCounters), CaptureError> {
        let dir = pin_dir(bpffs, node);
        let earlier_enrolled = pins::prepare(&dir)?;
        // `connect4` and the bypass act on this namespace's sockets only (cgroup programs see
        // every namespace's).
        let cookie = crate::sys::netns_cookie().map_err(|err| CaptureError::Program {
            program: programs::CONNECT4,
            message: format!(
                "cannot read this network namespace's cookie (SO_NETNS_COOKIE, Linux >= 5.14): \
                 {err}"
            ),
        })?;
        // The proxy's sockets are told apart by their mark and their cgroup: a mark alone
        // any process with CAP_NET_RAW can set.
        let proxy_cgroup = match crate::sys::own_cgroup_id() {
            Ok(id) => id,
            Err(err) if settings.host_traffic == HostTraffic::Allow => {
                tracing::warn!("cannot read mesh-node's own cgroup id: {err}");
                0
            }
            Err(err) => {
                return Err(CaptureError::Program {
                    program: programs::CONNECT4,
                    message: format!(
                        "cannot read mesh-node's own cgroup id (sock_diag, Linux >= 5.8), which \
                         --host-traffic=kubelet-only needs: {err}"
                    ),
                })
            }
        };
        let log_captures = u8::from(settings.log_captures);
        let predecessor_cgroup = settings.predecessor_cgroup;
        let host_policy = settings.host_traffic.policy();
        let udp_dns_only = u8::from(settings.udp_dns_only);
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(&dir)
            .override_global("LOG_CAPTURES", &log_captures, true)
            .override_global("NODE_NETNS_COOKIE", &cookie, true)
            .override_global("PROXY_CGROUP", &proxy_cgroup, true)
            .override_global("PREDECESSOR_CGROUP", &predecessor_cgroup, true)
            .override_global("HOST_POLICY", &host_policy, true)
            .override_global("UDP_DNS_ONLY", &udp_dns_only, true);
        if !settings.bypass {
            // The object creates every map it declares: the bypass's, unused, take the least.
            for name in bypass::MAPS {
                loader.map_max_entries(name, 1);
            }
        }
        let mut ebpf = loader.load(OBJECT)?;

        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(CaptureError::Map {
                map: name,
                message: "missing from the object".into(),
            })
        };
        let mut pods = PodMaps::new(
            HashMap::try_from(take(&mut ebpf, maps::PODS)?).map_err(map_error(maps::PODS))?,
            HashMap::try_from(take(&mut ebpf, maps::POD_LINKS)?)
                .map_err(map_error(maps::POD_LINKS))?,
            HashMap::try_from(take(&mut ebpf, maps::POD_MACS)?)
                .map_err(map_error(maps::POD_MACS))?,
        );
        // Before any program of this version is attached.
        pods.seed_enrolled(&earlier_enrolled)?;
        let dns_servers = HashMap::try_from(take(&mut ebpf, maps::DNS_SERVERS)?)
            .map_err(map_error(maps::DNS_SERVERS))?;
        let services = HashMap::try_from(take(&mut ebpf, maps::SERVICES)?)
            .map_err(map_error(maps::SERVICES))?;
        let bridge_ports = HashMap::try_from(take(&mut ebpf, maps::BRIDGE_PORTS)?)
            .map_err(map_error(maps::BRIDGE_PORTS))?;
        let listeners = SockMap::try_from(take(&mut ebpf, maps::LISTENERS)?)
            .map_err(map_error(maps::LISTENERS))?;
        let mut counters = KernelCounters {
            map: PerCpuArray::try_from(take(&mut ebpf, maps::COUNTERS)?)
                .map_err(map_error(maps::COUNTERS))?,
            bypass: None,
        };
        let bypass = if settings.bypass {
            match bypass::Bypass::attach(&mut ebpf) {
                Ok((bypass, bypass_counters, cgroup)) => {
                    tracing::info!(cgroup = %cgroup, "same-node socket bypass attached");
                    counters.bypass = Some(bypass_counters);
                    Some(bypass)
                }
                Err(err) => {
                    tracing::warn!(
                        "same-node socket bypass unavailable, running without it: {err}"
                    );
                    None
                }
            }
        } else {
            tracing::info!("same-node socket bypass off");
            None
        };
        let host_maps = (
            HashMap::try_from(take(&mut ebpf, maps::KUBELET_CGROUPS)?)
                .map_err(map_error(maps::KUBELET_CGROUPS))?,
            Array::try_from(take(&mut ebpf, maps::HOST_SOURCE)?)
                .map_err(map_error(maps::HOST_SOURCE))?,
        );
        let host = Host::install(
            &mut ebpf,
            &dir,
            (settings.host_traffic, &settings.kubelet_cgroups),
            host_maps,
            proxy_cgroup,
        )?;

        let mut datapath = Datapath {
            ebpf,
            dir,
            pods,
            config_pods: None,
            local_pods: None,
            gated: load_gated(settings.gate_file.as_deref()),
            gate_file: settings.gate_file.clone(),
            peers: BTreeMap::new(),
            seen: BTreeMap::new(),
            unbound: BTreeMap::new(),
            host,
            services,
            dns_servers,
            service_inputs: None,
            services_addresses: None,
            node_addresses: BTreeSet::new(),
            node_networks: BTreeSet::new(),
            bridge_ports,
            listeners,
            attached: BTreeMap::new(),
            egress: BTreeSet::new(),
            failed: BTreeMap::new(),
            guard_set: None,
            bypass,
            _lock: lock,
        };
        datapath.load_programs()?;
        datapath.attach_sk_lookup()?;
        routing::install()?;
        datapath.sync_links()?;
        Ok((datapath, counters))
    }

    /// The loaded object, for the kernel log forwarder.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    fn load_programs(&mut self) -> Result<(), CaptureError> {
        for name in [programs::CAPTURE, programs::EGRESS] {
            let tc: &mut SchedClassifier = self.program(name)?;
            tc.load().map_err(prog_error(name))?;
        }
        let lookup: &mut SkLookup = self.program(programs::SK_LOOKUP)?;
        lookup.load().map_err(|err| CaptureError::Program {
            program: programs::SK_LOOKUP,
            message: format!(
                "{err} ({}); the kernel needs sk_lookup support (Linux >= 5.9, CONFIG_BPF_SYSCALL, CONFIG_INET)",
                error_chain(&err)
            ),
        })?;
        Ok(())
    }

    fn program<'a, P>(&'a mut self, name: &'static str) -> Result<&'a mut P, CaptureError>
    where
        &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    {
        program(&mut self.ebpf, name)
    }

    /// Attaches `sk_lookup` to this netns; a link pinned by a previous run is replaced after
    /// the new one is in place, so lookups never go unanswered.
    fn attach_sk_lookup(&mut self) -> Result<(), CaptureError> {
        let pin = self.dir.join("links/sk_lookup");
        let netns = fs::File::open("/proc/self/ns/net").map_err(|err| CaptureError::Program {
            program: programs::SK_LOOKUP,
            message: format!("cannot open /proc/self/ns/net: {err}"),
        })?;
        let prog: &mut SkLookup = self.program(programs::SK_LOOKUP)?;
        let id = prog
            .attach(&netns)
            .map_err(prog_error(programs::SK_LOOKUP))?;
        let link: FdLink = prog
            .take_link(id)
            .map_err(prog_error(programs::SK_LOOKUP))?
            .into();
        replace_pin(&pin, link)
    }

    /// Brings the TC attachments and the bridge-port map in line with the node's links:
    /// attaches to new links, drops pins of links that are gone, then binds the pods'
    /// addresses again. Links that could not be attached are remembered in
    /// [`Datapath::failed_links`]; call again to retry them.
    pub fn sync_links(&mut self) -> Result<(), CaptureError> {
        if self.scan_links()? {
            self.apply_pods(true)
        } else {
            self.rebind()
        }
    }

    /// [`Datapath::sync_links`] but the binding; true when gated interfaces went with their
    /// links.
    fn scan_links(&mut self) -> Result<bool, CaptureError> {
        self.node_networks = links::addresses()?;
        self.node_addresses = self.node_networks.iter().map(|(ip, _)| *ip).collect();
        if let Some((vips, node_ports)) = self.service_inputs.clone() {
            if self.services_addresses.as_ref() != Some(&self.node_addresses) {
                self.set_services(&vips, &node_ports)?;
            }
        }
        let node = links::discover()?;
        // Bridge ports first: a port must never capture before its frames can be readdressed.
        let have: BTreeSet<u32> = self.bridge_ports.keys().filter_map(Result::ok).collect();
        for ifindex in have.iter().filter(|i| !node.bridge_ports.contains_key(i)) {
            let _ = self.bridge_ports.remove(ifindex);
        }
        for (&ifindex, &bridge_mac) in &node.bridge_ports {
            let port = BridgePort {
                bridge_mac,
                _pad: [0; 2],
            };
            if self.bridge_ports.get(&ifindex, 0).ok() != Some(port) {
                self.bridge_ports
                    .insert(ifindex, port, 0)
                    .map_err(map_error(maps::BRIDGE_PORTS))?;
            }
        }

        self.failed.clear();
        for (&ifindex, name) in &node.capture {
            // Egress only on pod interfaces (a veth can become one when its other end moves
            // into a pod's namespace after it was first seen).
            let egress = node.peers.contains_key(&ifindex);
            if self.attached.get(&ifindex) == Some(name) && self.egress.contains(&ifindex) == egress
            {
                continue;
            }
            let ways: &[Tc] = if egress { &Tc::BOTH } else { &[Tc::Ingress] };
            let attached = ways
                .iter()
                .map(|tc| self.attach_tc(*tc, ifindex, name))
                .collect::<Result<Vec<_>, _>>();
            match attached {
                Ok(how) => {
                    // "Adopted" or "New" when both ways agree, as they do but after an
                    // upgrade that added a program.
                    let how = if how.windows(2).all(|w| w[0] == w[1]) {
                        format!("{:?}", how[0])
                    } else {
                        format!("{how:?}")
                    };
                    tracing::info!(link = %name, ifindex, egress, "capture attached ({how})");
                    self.attached.insert(ifindex, name.clone());
                    if egress {
                        self.egress.insert(ifindex);
                    } else if self.egress.remove(&ifindex) {
                        let _ = fs::remove_file(self.tc_pin(Tc::Egress, ifindex));
                    }
                }
                Err(err) => {
                    // A link can also vanish between the scan and the attach (a pod being
                    // deleted); the retry then finds it gone.
                    tracing::warn!(link = %name, ifindex, "cannot attach capture (will retry): {err}");
                    self.failed.insert(name.clone(), err.to_string());
                }
            }
        }
        let gone: Vec<u32> = self
            .attached
            .keys()
            .filter(|i| !node.capture.contains_key(i))
            .copied()
            .collect();
        for ifindex in gone {
            let name = self.attached.remove(&ifindex).unwrap_or_default();
            self.egress.remove(&ifindex);
            tracing::info!(link = %name, ifindex, "link gone, capture detached");
            for tc in Tc::BOTH {
                let _ = fs::remove_file(self.tc_pin(tc, ifindex));
            }
        }
        // Pins of links that disappeared while mesh-node was not running.
        if let Ok(entries) = fs::read_dir(self.dir.join("links")) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let ifindex = Tc::BOTH
                    .iter()
                    .find_map(|tc| name.strip_prefix(tc.pin_prefix()))
                    .and_then(|i| i.parse().ok());
                let egress = name.starts_with(Tc::Egress.pin_prefix());
                let stale = |i: u32| {
                    !node.capture.contains_key(&i) || (egress && !node.peers.contains_key(&i))
                };
                if ifindex.is_some_and(stale) {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        self.peers = node.peers;
        self.host.sync_kubelet()?;
        let before = self.gated.len();
        self.gated
            .retain(|ifindex, _| self.peers.contains_key(ifindex));
        let gone = self.gated.len() != before;
        if gone {
            self.save_gated();
        }
        Ok(gone)
    }

    /// Looks again at what changes without an event: the kubelet's cgroups (a restarted
    /// kubelet unit gets a new one).
    pub fn refresh(&mut self) -> Result<(), CaptureError> {
        self.host.sync_kubelet()
    }

    /// Links the capture program could not be attached to at the last sync, with the error.
    pub fn failed_links(&self) -> &BTreeMap<String, String> {
        &self.failed
    }

    fn tc_pin(&self, tc: Tc, ifindex: u32) -> PathBuf {
        tc::pin(&self.dir, tc, ifindex)
    }

    /// Attaches one TC program to one link ([`tc::attach`]).
    fn attach_tc(&mut self, tc: Tc, ifindex: u32, name: &str) -> Result<Attach, CaptureError> {
        tc::attach(&mut self.ebpf, &self.dir, tc, ifindex, name)
    }

    /// Makes the kernel's pods those of the config (address -> enrolled), each bound to its
    /// interface ([`pods::bind`]). Flows already captured stay captured until they end (the
    /// kernel forgets an entry when a new, uncaptured SYN reuses its tuple). Until this is
    /// first called, what a previous run pinned stays as it is (the mesh fails closed).
    fn set_pods(&mut self, pods: &LocalPods) -> Result<(), CaptureError> {
        self.config_pods = Some(pods.clone());
        self.apply_pods(false)
    }

    /// Applies the config's pods with the gated ones over them (a pod the CNI plugin
    /// reported is governed before the config has its address). `gate_changed`: the gated
    /// interfaces changed, so the binding is decided again even when the pods did not.
    fn apply_pods(&mut self, gate_changed: bool) -> Result<(), CaptureError> {
        let Some(mut pods) = self.config_pods.clone() else {
            return Ok(());
        };
        for gated in self.gated.values() {
            pods.insert(gated.ip, gated.enrolled);
        }
        let pods = &pods;
        let want: BTreeSet<Ipv4Addr> = pods
            .iter()
            .filter(|(_, enrolled)| **enrolled)
            .map(|(ip, _)| *ip)
            .collect();
        if self.local_pods.as_ref() == Some(pods) && self.guard_set.as_ref() == Some(&want) {
            // Most config changes do not touch the node's pods: no map or set work at all.
            return if gate_changed { self.rebind() } else { Ok(()) };
        }
        self.local_pods = Some(pods.clone());
        // The forward guard refuses forwarded SYNs of the pods in its set, which is only right
        // while the kernel captures them: pods leave the set before they leave the map, and
        // join it after they joined the map.
        let have = self.enrolled();
        // What the set holds, when known (not after a start, nor after a failed update).
        let mut in_set = self.guard_set.take();
        let staying: BTreeSet<Ipv4Addr> = have.intersection(&want).copied().collect();
        if staying.len() < have.len() {
            routing::sync_enrolled_set(&staying)?;
            in_set = Some(staying);
        }
        self.rebind()?;
        if in_set.as_ref() != Some(&want) {
            routing::sync_enrolled_set(&want)?;
        }
        self.guard_set = Some(want);
        Ok(())
    }

    /// Binds the config's pods to the interfaces that hold their addresses now, and reports
    /// an address that no interface can be trusted with (once, when that changes).
    fn rebind(&mut self) -> Result<(), CaptureError> {
        let Some(local_pods) = &self.local_pods else {
            return Ok(());
        };
        let mut claims = pods::Claims::new();
        for (&ifindex, &(nsid, peer)) in &self.peers {
            match crate::sys::peer_interface(nsid, peer) {
                Ok(seen) => {
                    claims.insert(ifindex, seen);
                }
                Err(err) => {
                    // Gone since the scan (a pod being deleted: the next event rescans), or a
                    // read that failed: what it held last time stands until then.
                    tracing::debug!(ifindex, "cannot read the pod's end of the link: {err}");
                    if let Some(seen) = self.seen.get(&ifindex) {
                        claims.insert(ifindex, seen.clone());
                    }
                }
            }
        }
        let held = self.pods.held();
        let gated: pods::Gated = self.gated.iter().map(|(i, g)| (*i, g.ip)).collect();
        let binding = pods::bind(local_pods, &claims, &held, &gated);
        self.pods.apply(&binding)?;
        self.seen = claims;
        let moved: Vec<Ipv4Addr> = binding
            .pods
            .iter()
            .filter(|(ip, entry)| {
                entry.ifindex != 0 && held.pods.get(ip).map(|e| e.ifindex) != Some(entry.ifindex)
            })
            .map(|(ip, _)| *ip)
            .collect();
        routing::forget_neighbours(&moved)?;
        for ip in &moved {
            let ifindex = binding.pods[ip].ifindex;
            let name = self.attached.get(&ifindex).map_or("?", String::as_str);
            tracing::info!(%ip, ifindex, link = name, "pod address bound to its interface");
        }
        for (ip, why) in &binding.unbound {
            if self.unbound.get(ip) != Some(why) {
                tracing::warn!("{why}: the kernel refuses it as a source until then");
            }
        }
        let source = links::host_source(&self.node_networks, local_pods.keys().copied());
        self.unbound = binding.unbound;
        self.host.set_source(source)
    }

    /// The node's own IPv4 addresses, as of the last link scan.
    pub fn node_addresses(&self) -> &BTreeSet<Ipv4Addr> {
        &self.node_addresses
    }

    /// Applies a config snapshot to the kernel: its Service addresses, pods, DNS servers
    /// and the bypass's Services. New Service addresses go in before the pods change and old
    /// ones out after: a newly enrolled pod's interface drops SYNs the proxy did not send,
    /// so its Services must already be captured (else a client outside the mesh would be
    /// DNATed to it and refused), and a pod leaving the mesh keeps them until it has left.
    pub fn apply_config(&mut self, state: &crate::state::State) -> Result<(), CaptureError> {
        let (vips, node_ports) = (
            state.local_enrolled_vips(),
            state.local_enrolled_node_ports(),
        );
        let want = self.service_addresses(&vips, &node_ports);
        sync_service_map(&mut self.services, &want, maps::SERVICES, Update::AddOnly)?;
        // A gated pod the config now knows at its address follows the config's enrolment
        // (its labels may have changed since it started).
        let mut changed = false;
        for gated in self.gated.values_mut() {
            if let Some(w) = state.workloads.get(&gated.ip) {
                if format!("{}/{}", w.namespace, w.name) == gated.pod
                    && w.enrolled != gated.enrolled
                {
                    gated.enrolled = w.enrolled;
                    changed = true;
                }
            }
        }
        if changed {
            self.save_gated();
        }
        self.set_pods(&state.local_pods())?;
        self.set_services(&vips, &node_ports)?;
        let dns = state
            .dns_servers
            .iter()
            .map(|ip| u32::from_ne_bytes(ip.octets()));
        sync_keys(&mut self.dns_servers, dns, maps::DNS_SERVERS, Update::Exact)?;
        self.set_bypass_services(&state.local_only_vips(), &state.local_http_endpoints())
    }

    /// The Service map's entries for `vips` (VIP:ports with a ready enrolled endpoint on this
    /// node) and `node_ports` at each of the node's addresses.
    fn service_addresses(
        &self,
        vips: &BTreeSet<SocketAddrV4>,
        node_ports: &BTreeSet<u16>,
    ) -> BTreeSet<SocketAddrV4> {
        let mut want = vips.clone();
        for ip in &self.node_addresses {
            want.extend(node_ports.iter().map(|port| SocketAddrV4::new(*ip, *port)));
        }
        want
    }

    /// Makes the Service map hold exactly the entries for `vips` and `node_ports`, by
    /// difference.
    fn set_services(
        &mut self,
        vips: &BTreeSet<SocketAddrV4>,
        node_ports: &BTreeSet<u16>,
    ) -> Result<(), CaptureError> {
        self.service_inputs = Some((vips.clone(), node_ports.clone()));
        self.services_addresses = None;
        let want = self.service_addresses(vips, node_ports);
        sync_service_map(&mut self.services, &want, maps::SERVICES, Update::Exact)?;
        self.services_addresses = Some(self.node_addresses.clone());
        Ok(())
    }

    /// Gives the same-node bypass, when attached, the Service VIP:ports it may take (every
    /// ready endpoint an enrolled pod of this node) and the local pods' HTTP ports it never
    /// takes.
    fn set_bypass_services(
        &mut self,
        vips: &BTreeSet<SocketAddrV4>,
        http: &BTreeSet<SocketAddrV4>,
    ) -> Result<(), CaptureError> {
        match &mut self.bypass {
            Some(bypass) => bypass.set_services(vips, http),
            None => Ok(()),
        }
    }

    /// A pod just started (CNI ADD): attaches capture to its interface, binds its address
    /// to it with its enrolment, and checks the kernel has all of it, so the pod's first
    /// packet is governed. Returns the interface's index.
    pub fn admit(&mut self, pod: &PodStart) -> Result<u32, String> {
        let started = std::time::Instant::now();
        let ip = pod.ip()?;
        // One binding at the end, with the new interface's owner known.
        self.scan_links().map_err(|err| err.to_string())?;
        let ifindex = self.pod_link(pod, ip)?;
        self.gated.insert(
            ifindex,
            GatedPod {
                pod: format!("{}/{}", pod.namespace, pod.name),
                ip,
                enrolled: pod.enrolled,
            },
        );
        self.save_gated();
        self.apply_pods(true).map_err(|err| err.to_string())?;
        self.governs(ifindex, ip, pod.enrolled)?;
        tracing::info!(
            pod = %format!("{}/{}", pod.namespace, pod.name),
            %ip,
            ifindex,
            enrolled = pod.enrolled,
            took_ms = started.elapsed().as_millis() as u64,
            "pod start: capture in place"
        );
        Ok(ifindex)
    }

    /// A pod's network is being torn down (CNI DEL): its interface is forgotten.
    pub fn release(&mut self, pod: &PodStart) -> Result<(), String> {
        let name = format!("{}/{}", pod.namespace, pod.name);
        let before = self.gated.len();
        self.gated
            .retain(|_, g| g.pod != name && !pod.addresses.contains(&g.ip));
        if self.gated.len() != before {
            self.save_gated();
            self.apply_pods(true).map_err(|err| err.to_string())?;
        }
        Ok(())
    }

    /// CNI CHECK: the pod's interface carries both capture programs (asked of the kernel,
    /// not of what this process believes) and its address is bound to it with its
    /// enrolment.
    pub fn check(&mut self, pod: &PodStart) -> Result<(), String> {
        let ip = pod.ip()?;
        let node = links::discover().map_err(|err| err.to_string())?;
        let ifindex = named_pod_link(&node.peers, &node.capture, pod, ip).ok_or_else(|| {
            format!(
                "none of the interfaces {:?} is a pod interface holding {ip}",
                pod.interfaces
            )
        })?;
        let name = &node.capture[&ifindex];
        for (way, attach, program) in [
            (
                "ingress",
                aya::programs::TcAttachType::Ingress,
                programs::CAPTURE,
            ),
            (
                "egress",
                aya::programs::TcAttachType::Egress,
                programs::EGRESS,
            ),
        ] {
            let (_, attached) = SchedClassifier::query_tcx(name, attach)
                .map_err(|err| format!("cannot query the programs on {name}: {err}"))?;
            if !attached.iter().any(|p| p.name_as_str() == Some(program)) {
                return Err(format!(
                    "capture is missing from interface {name} ({way}: no {program} program)"
                ));
            }
        }
        self.governs(ifindex, ip, pod.enrolled)
    }

    /// The pod interface among `pod.interfaces` whose other end holds `ip` now.
    fn pod_link(&self, pod: &PodStart, ip: Ipv4Addr) -> Result<u32, String> {
        named_pod_link(&self.peers, &self.attached, pod, ip).ok_or_else(|| {
            let failed: Vec<String> = pod
                .interfaces
                .iter()
                .filter_map(|n| self.failed.get(n).map(|e| format!("{n}: {e}")))
                .collect();
            format!(
                "none of the interfaces {:?} is a pod interface with capture holding {ip}{}",
                pod.interfaces,
                if failed.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", failed.join("; "))
                }
            )
        })
    }

    /// Whether the kernel governs `ip` from `ifindex`: its egress program is attached, and
    /// the pod map binds the address to it with `enrolled`.
    fn governs(&self, ifindex: u32, ip: Ipv4Addr, enrolled: bool) -> Result<(), String> {
        if !self.egress.contains(&ifindex) {
            return Err(format!("capture is not attached to interface {ifindex}"));
        }
        match self.pods.pods().get(&ip) {
            Some(entry) if entry.ifindex == ifindex && entry.enrolled() == enrolled => Ok(()),
            Some(entry) => Err(format!(
                "{ip} is bound to interface {} (enrolled: {}), not {ifindex} (enrolled: {enrolled})",
                entry.ifindex,
                entry.enrolled()
            )),
            None => Err(format!("{ip} is not in the kernel's pod map")),
        }
    }

    /// The gated pod interfaces: ifindex -> `namespace/name`.
    pub fn gated(&self) -> BTreeMap<u32, String> {
        self.gated
            .iter()
            .map(|(i, g)| (*i, g.pod.clone()))
            .collect()
    }

    fn save_gated(&self) {
        let Some(path) = &self.gate_file else { return };
        let record = GateRecord {
            boot_id: boot_id(),
            pods: self.gated.clone(),
        };
        let saved = serde_json::to_vec(&record)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                let tmp = path.with_extension("tmp");
                fs::write(&tmp, bytes)?;
                fs::rename(&tmp, path)
            });
        if let Err(err) = saved {
            tracing::warn!(path = %path.display(), "cannot save the gated pod interfaces: {err}");
        }
    }

    /// The enrolled pods in the kernel's pod map.
    pub fn enrolled(&self) -> BTreeSet<Ipv4Addr> {
        self.pods
            .pods()
            .into_iter()
            .filter(|(_, entry)| entry.enrolled())
            .map(|(ip, _)| ip)
            .collect()
    }

    /// The kernel's binding of pod addresses to interfaces: address -> ifindex (0: none).
    pub fn pod_interfaces(&self) -> BTreeMap<Ipv4Addr, u32> {
        self.pods
            .pods()
            .into_iter()
            .map(|(ip, entry)| (ip, entry.ifindex))
            .collect()
    }

    /// Registers a proxy listener in the sockmap `sk_lookup` picks from.
    pub fn register_listener(
        &mut self,
        slot: Listener,
        socket: &impl AsRawFd,
    ) -> Result<(), CaptureError> {
        self.listeners
            .set(slot as u32, socket, 0)
            .map_err(map_error(maps::LISTENERS))
    }

    /// The links carrying the capture program.
    pub fn attached_links(&self) -> &BTreeMap<u32, String> {
        &self.attached
    }
}

/// The pod interface (of `peers`, by the names in `names`) among `pod.interfaces` whose
/// other end holds `ip` now.
fn named_pod_link(
    peers: &BTreeMap<u32, (i32, u32)>,
    names: &BTreeMap<u32, String>,
    pod: &PodStart,
    ip: Ipv4Addr,
) -> Option<u32> {
    peers
        .iter()
        .filter(|(i, _)| names.get(i).is_some_and(|n| pod.interfaces.contains(n)))
        .find(|(_, (nsid, peer))| {
            crate::sys::peer_interface(*nsid, *peer).is_ok_and(|p| p.addresses.contains(&ip))
        })
        .map(|(i, _)| *i)
}

/// The gated interfaces a run of this boot saved (none after a reboot).
fn load_gated(path: Option<&Path>) -> BTreeMap<u32, GatedPod> {
    let Some(path) = path else {
        return BTreeMap::new();
    };
    match fs::read(path).map(|bytes| serde_json::from_slice::<GateRecord>(&bytes)) {
        Ok(Ok(record)) if record.boot_id == boot_id() => record.pods,
        Ok(Ok(_)) => BTreeMap::new(),
        Ok(Err(err)) => {
            tracing::warn!(path = %path.display(), "ignoring the saved gated pod interfaces: {err}");
            BTreeMap::new()
        }
        Err(_) => BTreeMap::new(),
    }
}

/// Makes a map keyed by [`ServiceKey`] hold exactly the addresses `want` ([`sync_keys`]).
fn sync_service_map(
    map: &mut HashMap<MapData, ServiceKey, u32>,
    want: &BTreeSet<SocketAddrV4>,
    name: &'static str,
    update: Update,
) -> Result<(), CaptureError> {
    let key = |addr: &SocketAddrV4| ServiceKey {
        ip: u32::from_ne_bytes(addr.ip().octets()),
        port: addr.port().to_be(),
        _pad: 0,
    };
    sync_keys(map, want.iter().map(key), name, update)
}

/// Makes a map used as a set (every value 1) hold exactly the keys `want` (at least them,
/// with [`Update::AddOnly`]), by difference: new keys first, so there is no moment with
/// less than either state.
pub(super) fn sync_keys<K: aya::Pod + Eq + std::hash::Hash>(
    map: &mut HashMap<MapData, K, u32>,
    want: impl IntoIterator<Item = K>,
    name: &'static str,
    update: Update,
) -> Result<(), CaptureError> {
    let want: std::collections::HashSet<K> = want.into_iter().collect();
    let have: std::collections::HashSet<K> = map.keys().filter_map(Result::ok).collect();
    for key in want.difference(&have) {
        map.insert(key, 1, 0).map_err(map_error(name))?;
    }
    if update == Update::Exact {
        for key in have.difference(&want) {
            map.remove(key).map_err(map_error(name))?;
        }
    }
    Ok(())
}

/// How [`sync_keys`] changes a map.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Update {
    /// Only adds what is missing.
    AddOnly,
    /// Adds what is missing, then removes what is not wanted.
    Exact,
}
