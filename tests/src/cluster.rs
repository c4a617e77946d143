//! A K3s-like cluster in network namespaces, built from a mesh config file (the same file
//! mesh-node reads): one node namespace per `spec.nodeName`, one pod namespace per Pod with a
//! `status.podIP`, kube-proxy-like DNAT for every Service VIP.
//!
//! Node i: underlay `eth0` 100.64.0.(10+i)/24 on a fabric bridge (own namespace), bridge
//! `cni0` 100.65.i.1/24 holding the pods' veths, VXLAN `flannel.1` 100.65.i.0/32 with static
//! routes, neighbours and FDB entries towards the other nodes (as flannel programs them),
//! `ip_forward=1`, no default route. Pods: `eth0` in 100.65.i.0/24, default via cni0.
//! Everything, including the bpffs mount holding the nodes' pin directories, is removed on
//! drop, also when a test panics; namespaces left by a killed test process are swept by the
//! next cluster.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Result};
use mesh_node::{config, state::State};
use serde::Deserialize;

use crate::netns::{sh, veth_pair, Netns};

/// Prefix of every namespace and mount this harness creates.
const PREFIX: &str = "mt";
/// Where test bpffs instances are mounted (outside /sys, which `ip netns exec` remounts).
const BPFFS_ROOT: &str = "/run/mesh-test";
/// Lock file held by each cluster while it exists ([`Cluster::new`]).
const CLUSTER_LOCK: &str = "/run/mesh-test.lock";

/// A node of the cluster.
pub struct Node {
    /// `spec.nodeName`.
    pub name: String,
    /// Position (decides its addresses).
    pub index: u8,
    /// The node's namespace.
    pub netns: Netns,
    /// Underlay address.
    pub underlay: Ipv4Addr,
    /// `cni0` address (the pods' gateway).
    pub gateway: Ipv4Addr,
    /// `flannel.1` address.
    pub flannel: Ipv4Addr,
}

/// A pod of the cluster.
pub struct Pod {
    /// Pod name (unique in a test cluster).
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Node name.
    pub node: String,
    /// Pod IP.
    pub ip: Ipv4Addr,
    /// The pod's namespace.
    pub netns: Netns,
    /// The host side of its veth, in the node's namespace.
    pub veth: String,
}

/// One connection as the node proxy recorded it (`/debug/connections`).
#[derive(Clone, Debug, Deserialize)]
pub struct ProxyConnection {
    /// `outbound`, `inbound` or `hbone`.
    pub direction: String,
    /// Client address as the proxy saw it.
    pub client: SocketAddr,
    /// The client's SPIFFE ID when authenticated.
    #[serde(default)]
    pub source_identity: Option<String>,
    /// The destination's SPIFFE ID.
    #[serde(default)]
    pub destination_identity: Option<String>,
    /// `hbone`, `same_node` or `plaintext`.
    pub path: String,
    /// `mutual_tls` or `none`.
    pub security: String,
    /// The authorization decision, as JSON.
    #[serde(default)]
    pub authorization: Option<serde_json::Value>,
    /// Error detail.
    #[serde(default)]
    pub error: Option<String>,
    /// Original destination.
    pub original_dst: SocketAddr,
    /// Service `namespace/name` when the destination was its VIP.
    pub service: Option<String>,
    /// Where the proxy connected.
    pub upstream: Option<SocketAddr>,
    /// Bytes client -> upstream.
    pub bytes_sent: u64,
    /// Bytes upstream -> client.
    pub bytes_received: u64,
    /// Response flag.
    pub flag: String,
    /// When the proxy accepted it (ms since the Unix epoch).
    pub opened_ms: u64,
    /// Set once closed.
    pub closed_ms: Option<u64>,
}

/// The cluster; dropping it removes everything it created.
pub struct Cluster {
    /// Unique id (prefix of every name).
    pub id: String,
    dir: PathBuf,
    bpffs: PathBuf,
    config: PathBuf,
    mesh: BTreeMap<String, Child>,
    /// Each node's mesh-node runs in a cgroup of its own, as in its DaemonSet's container:
    /// the kernel programs tell the proxy's sockets apart by it.
    mesh_cgroups: BTreeMap<String, crate::attack::Cgroup>,
    /// The cgroups of upgraded mesh-nodes (a successor gets a cgroup of its own, as the
    /// surge pod of a DaemonSet rollout does), removed with the cluster.
    retired_cgroups: Vec<crate::attack::Cgroup>,
    /// Extra arguments for `mesh-node run` (e.g. `--cert-lifetime 20s`).
    pub run_args: Vec<String>,
    /// The signer, started with the first mesh-node ([`Cluster::signer`]).
    signer: Option<crate::signer::Signer>,
    /// Whether the signer's first CA signs with an intermediate (the default) or the root.
    pub ca_intermediate: bool,
    /// Extra arguments for the signer's `ca serve`, set before it starts.
    pub signer_args: Vec<String>,
    /// When set, `mesh-node run` reads the Kubernetes API through this kubeconfig
    /// (`--kube`) instead of the config file.
    pub kubeconfig: Option<PathBuf>,
    /// When set, each node's mesh-node installs the CNI plugin into the node's CNI
    /// directories ([`Cluster::cni_dirs`]), which [`crate::cni`] runs pods through.
    pub cni: bool,
    /// Pods started through CNI, by name: what the runtime keeps to tear them down.
    pub sandboxes: BTreeMap<String, crate::cni::Sandbox>,
    /// Pods by name.
    pub pods: BTreeMap<String, Pod>,
    /// Pods created so far (names namespaces and veths, never reused).
    pods_created: usize,
    /// Nodes in index order.
    pub nodes: Vec<Node>,
    fabric: Option<Netns>,
    /// Held while the cluster exists (dropped last): one cluster at a time on this machine.
    _exclusive: std::fs::File,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Cluster {
    /// Builds the cluster described by `config_yaml`.
    ///
    /// Clusters on one machine take turns (an exclusive lock, across processes, waited for):
    /// they all use the same pod addresses, and the same-node socket bypass's programs, on
    /// the cgroup v2 root, see every socket of the machine and tell pods apart by address, so
    /// one cluster's mesh-node would claim another cluster's pod sockets (a real node has one
    /// mesh-node per kernel).
    pub fn new(config_yaml: &str) -> Result<Cluster> {
        let exclusive = std::fs::File::create(CLUSTER_LOCK)?;
        // SAFETY: flock on a file we own; blocks until the other cluster is gone.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&exclusive), libc::LOCK_EX) } != 0 {
            bail!(
                "cannot lock {CLUSTER_LOCK}: {}",
                std::io::Error::last_os_error()
            );
        }
        sweep_stale();
        let id = format!(
            "{PREFIX}{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(&id);
        std::fs::create_dir_all(&dir)?;
        let bpffs = Path::new(BPFFS_ROOT).join(&id);
        let mut cluster = Cluster {
            config: dir.join("mesh.yaml"),
            dir,
            bpffs,
            mesh: BTreeMap::new(),
            mesh_cgroups: BTreeMap::new(),
            retired_cgroups: Vec::new(),
            run_args: Vec::new(),
            signer: None,
            ca_intermediate: true,
            signer_args: Vec::new(),
            kubeconfig: None,
            cni: false,
            sandboxes: BTreeMap::new(),
            pods: BTreeMap::new(),
            pods_created: 0,
            nodes: Vec::new(),
            fabric: None,
            id,
            _exclusive: exclusive,
        };
        cluster.build(config_yaml)?;
        Ok(cluster)
    }

    fn build(&mut self, config_yaml: &str) -> Result<()> {
        std::fs::write(&self.config, config_yaml)?;
        let resources =
            config::parse_str("cluster.yaml", config_yaml).map_err(|e| anyhow!("{e}"))?;

        std::fs::create_dir_all(&self.bpffs)?;
        sh(
            "mount",
            &["-t", "bpf", "bpf", &self.bpffs.to_string_lossy()],
        )?;

        let fabric = Netns::create(&format!("{}-fab", self.id))?;
        fabric.ip(&["link", "add", "br0", "type", "bridge"])?;
        fabric.ip(&["link", "set", "br0", "up"])?;

        let mut node_names: Vec<String> = resources
            .pods
            .iter()
            .filter_map(|p| p.spec.node_name.clone())
            .collect();
        node_names.sort();
        node_names.dedup();
        for (index, name) in node_names.iter().enumerate() {
            let node = self.add_node(&fabric, name, index as u8)?;
            self.nodes.push(node);
        }
        self.fabric = Some(fabric);
        for i in 0..self.nodes.len() {
            for j in 0..self.nodes.len() {
                if i != j {
                    self.link_nodes(i, j)?;
                }
            }
        }

        for pod in &resources.pods {
            let (Some(ip), Some(node)) = (pod.status.pod_ip, pod.spec.node_name.as_deref()) else {
                continue;
            };
            self.add_pod(&pod.metadata.name, pod.metadata.namespace(), node, ip)?;
        }

        for node in &self.nodes {
            let state = State::build(&resources, &node.name, &Default::default(), 0);
            install_kube_proxy(node, &state)?;
        }
        Ok(())
    }

    fn add_node(&self, fabric: &Netns, name: &str, index: u8) -> Result<Node> {
        let netns = Netns::create(&format!("{}-n{index}", self.id))?;
        let underlay = Ipv4Addr::new(100, 64, 0, 10 + index);
        let gateway = Ipv4Addr::new(100, 65, index, 1);
        let flannel = Ipv4Addr::new(100, 65, index, 0);
        let port = format!("n{index}");
        veth_pair(&netns, "eth0", fabric, &port)?;
        fabric.ip(&["link", "set", &port, "master", "br0", "up"])?;
        netns.ip(&["addr", "add", &format!("{underlay}/24"), "dev", "eth0"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        // As on K3s: bridged frames pass iptables, so a Service connection DNATed to a pod on
        // the same bridge gets its replies un-DNATed (br_netfilter).
        netns
            .exec("sysctl", &["-qw", "net.bridge.bridge-nf-call-iptables=1"])
            .map_err(|e| anyhow!("br_netfilter is needed, as on K3s: {e}"))?;
        netns.ip(&["link", "add", "cni0", "type", "bridge"])?;
        netns.ip(&["addr", "add", &format!("{gateway}/24"), "dev", "cni0"])?;
        netns.ip(&["link", "set", "cni0", "up"])?;
        netns.ip(&[
            "link",
            "add",
            "flannel.1",
            "type",
            "vxlan",
            "id",
            "1",
            "local",
            &underlay.to_string(),
            "dev",
            "eth0",
            "dstport",
            "8472",
            "nolearning",
        ])?;
        netns.ip(&[
            "link",
            "set",
            "flannel.1",
            "address",
            &flannel_mac(index),
            "mtu",
            "1450",
            "up",
        ])?;
        netns.ip(&["addr", "add", &format!("{flannel}/32"), "dev", "flannel.1"])?;
        Ok(Node {
            name: name.to_string(),
            index,
            netns,
            underlay,
            gateway,
            flannel,
        })
    }

    /// Creates a pod namespace on `node` with a veth into its `cni0` (the config is not
    /// changed: see [`Cluster::write_config`]).
    pub fn add_pod(&mut self, name: &str, namespace: &str, node: &str, ip: Ipv4Addr) -> Result<()> {
        let k = self.next_pod_index();
        let node = self.node(node);
        if ip.octets()[..3] != node.gateway.octets()[..3] {
            bail!(
                "pod {name} has IP {ip}, outside node {}'s pod CIDR {}/24",
                node.name,
                Ipv4Addr::from(u32::from(node.gateway) & 0xffff_ff00)
            );
        }
        let netns = Netns::create(&format!("{}-p{k}", self.id))?;
        let veth = format!("veth{k}");
        veth_pair(&netns, "eth0", &node.netns, &veth)?;
        node.netns
            .ip(&["link", "set", &veth, "master", "cni0", "mtu", "1450", "up"])?;
        netns.ip(&["link", "set", "eth0", "mtu", "1450", "up"])?;
        netns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        netns.ip(&["route", "add", "default", "via", &node.gateway.to_string()])?;
        let pod = Pod {
            name: name.to_string(),
            namespace: namespace.to_string(),
            node: node.name.clone(),
            ip,
            netns,
            veth,
        };
        self.pods.insert(name.to_string(), pod);
        Ok(())
    }

    /// A number for the next pod's namespace (never reused within the cluster).
    pub(crate) fn next_pod_index(&mut self) -> usize {
        self.pods_created += 1;
        self.pods_created - 1
    }

    /// Routes node i's traffic for node j's pods over VXLAN, as flannel does.
    fn link_nodes(&self, i: usize, j: usize) -> Result<()> {
        let (from, to) = (&self.nodes[i], &self.nodes[j]);
        let mac = flannel_mac(to.index);
        from.netns.ip(&[
            "route",
            "add",
            &format!("100.65.{}.0/24", to.index),
            "via",
            &to.flannel.to_string(),
            "dev",
            "flannel.1",
            "onlink",
        ])?;
        from.netns.ip(&[
            "neigh",
            "add",
            &to.flannel.to_string(),
            "lladdr",
            &mac,
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        ])?;
        from.netns.exec(
            "bridge",
            &[
                "fdb",
                "append",
                &mac,
                "dev",
                "flannel.1",
                "dst",
                &to.underlay.to_string(),
            ],
        )?;
        Ok(())
    }

    /// Waits until every node's mesh-node serves config generation `generation`.
    pub fn wait_generation(&self, generation: u64) {
        for node in self.mesh.keys() {
            crate::wait_until(&format!("generation {generation} on {node}"), || {
                self.debug_state(node)
                    .is_ok_and(|s| s["generation"].as_u64() == Some(generation))
            });
        }
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// The pod called `name`.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .get(name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// The config file mesh-node reads.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The bpffs mount holding the nodes' pin directories.
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// Replaces the config file (mesh-node reloads it).
    pub fn write_config(&self, yaml: &str) -> Result<()> {
        let tmp = self.dir.join("mesh.yaml.tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, &self.config)?;
        Ok(())
    }

    /// Starts mesh-node in node `name`'s namespace and waits until it is ready.
    pub fn start_mesh(&mut self, name: &str) -> Result<()> {
        let child = self.spawn_mesh(name, &["run"])?;
        self.mesh.insert(name.to_string(), child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(child) = self.mesh.get_mut(name) {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "mesh-node on {name} exited with {status}:\n{}",
                        self.mesh_log(name)
                    );
                }
            }
            if matches!(self.admin_get(name, "/healthz/ready"), Ok((200, _))) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "mesh-node on {name} not ready after 20 s:\n{}",
                    self.mesh_log(name)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `mesh-node ARGS --node NAME --bpffs ...` in the node's namespace (with `--config`
    /// for `run`), output to the node's log file.
    pub fn spawn_mesh(&mut self, name: &str, args: &[&str]) -> Result<Child> {
        if !self.mesh_cgroups.contains_key(name) {
            let cgroup = crate::attack::Cgroup::create(&format!("{}-{name}", self.id))?;
            self.mesh_cgroups.insert(name.to_string(), cgroup);
        }
        let node = self.node(name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(name))?;
        // The shell moves itself into the cgroup, then becomes `ip netns exec`, which becomes
        // mesh-node: one process, whose PID the caller keeps.
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("echo $$ > \"$0\" && exec \"$@\"")
            .arg(self.mesh_cgroups[name].procs())
            .args(["ip", "netns", "exec", node.netns.name()])
            .arg(mesh_node_bin()?)
            .args(args)
            .args(["--node", name, "--bpffs"])
            .arg(&self.bpffs);
        if args.first() == Some(&"run") {
            // A state directory per node (its CNI gate socket, enrolment cache), its token
            // for the signer and its own copy of the trust bundle.
            let state = self.node_state_dir(name);
            std::fs::create_dir_all(&state)?;
            let signer = self.signer()?;
            let address = signer.address.to_string();
            let first_bundle = signer.bundle_path("ca-1");
            if !state.join("trust-bundle.pem").exists() {
                std::fs::copy(first_bundle, state.join("trust-bundle.pem"))?;
            }
            cmd.args(["--ca-address", &address, "--ca-token-file"])
                .arg(state.join("ca-token"))
                .arg("--trust-bundle")
                .arg(state.join("trust-bundle.pem"));
            match &self.kubeconfig {
                Some(kubeconfig) => cmd.arg("--kube").arg("--kubeconfig").arg(kubeconfig),
                None => cmd.arg("--config").arg(&self.config),
            };
            cmd.arg("--state-dir").arg(&state).args(&self.run_args);
            if self.cni {
                let (conf, bin) = self.cni_dirs(name);
                std::fs::create_dir_all(&conf)?;
                std::fs::create_dir_all(&bin)?;
                cmd.arg("--cni-conf-dir")
                    .arg(conf)
                    .arg("--cni-bin-dir")
                    .arg(bin);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .env("RUST_BACKTRACE", "1");
        Ok(cmd.spawn()?)
    }

    /// Upgrades node `name`'s mesh-node as an operator would: a second `mesh-node run` for
    /// the node takes it over; returns once the predecessor has handed over (its log says
    /// the successor serves), with the predecessor's process (draining; the successor is
    /// the node's mesh-node from now on). Fails if the successor exits first.
    pub fn upgrade_mesh(&mut self, name: &str) -> Result<Child> {
        self.upgrade_mesh_with(name, &[])
    }

    /// [`Cluster::upgrade_mesh`] with extra `run` arguments for the successor.
    pub fn upgrade_mesh_with(&mut self, name: &str, extra: &[&str]) -> Result<Child> {
        const SERVES: &str = "the successor serves: draining";
        let before = self.mesh_log(name).matches(SERVES).count();
        // The successor in a cgroup of its own, as a DaemonSet's surge pod.
        let generation = self.retired_cgroups.len() + 1;
        let cgroup = crate::attack::Cgroup::create(&format!("{}-{name}-{generation}", self.id))?;
        if let Some(old) = self.mesh_cgroups.insert(name.to_string(), cgroup) {
            self.retired_cgroups.push(old);
        }
        let args: Vec<&str> = ["run"].iter().chain(extra).copied().collect();
        let mut successor = self.spawn_mesh(name, &args)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.mesh_log(name).matches(SERVES).count() == before {
            if let Some(status) = successor.try_wait()? {
                bail!(
                    "the successor on {name} exited with {status}:\n{}",
                    self.mesh_log(name)
                );
            }
            if Instant::now() > deadline {
                terminate(&mut successor);
                bail!(
                    "no handover on {name} within 20 s:\n{}",
                    self.mesh_log(name)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let predecessor = self
            .mesh
            .insert(name.to_string(), successor)
            .ok_or_else(|| anyhow!("mesh-node was not running on {name}"))?;
        Ok(predecessor)
    }

    /// Starts mesh-node on every node.
    pub fn start_mesh_everywhere(&mut self) -> Result<()> {
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        for name in names {
            self.start_mesh(&name)?;
        }
        Ok(())
    }

    /// Stops node `name`'s mesh-node with SIGTERM and waits for it to exit.
    pub fn stop_mesh(&mut self, name: &str) -> Result<()> {
        let Some(mut child) = self.mesh.remove(name) else {
            bail!("mesh-node is not running on {name}");
        };
        terminate(&mut child);
        Ok(())
    }

    /// The process ID of node `name`'s mesh-node (`ip netns exec` execs it, so the child is
    /// mesh-node itself).
    pub fn mesh_pid(&self, name: &str) -> Result<u32> {
        self.mesh
            .get(name)
            .map(Child::id)
            .ok_or_else(|| anyhow!("mesh-node is not running on {name}"))
    }

    /// Resident memory of node `name`'s mesh-node, in KiB (from /proc).
    pub fn mesh_rss_kib(&self, name: &str) -> Result<u64> {
        let child = self
            .mesh
            .get(name)
            .ok_or_else(|| anyhow!("mesh-node is not running on {name}"))?;
        proc_status_kib(child.id(), "VmRSS:")
    }

    /// Kills node `name`'s mesh-node with SIGKILL (a crash: no chance to clean anything).
    pub fn kill_mesh(&mut self, name: &str) -> Result<()> {
        let Some(mut child) = self.mesh.remove(name) else {
            bail!("mesh-node is not running on {name}");
        };
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Runs `mesh-node uninstall` for node `name`; returns its output.
    pub fn uninstall(&self, name: &str) -> Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", self.node(name).netns.name()])
            .arg(mesh_node_bin()?)
            .args(["uninstall", "--node", name, "--bpffs"])
            .arg(&self.bpffs)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "uninstall failed: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(text)
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("mesh-node-{name}.log"))
    }

    /// Everything node `name`'s mesh-node printed.
    pub fn mesh_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    /// GET on node `name`'s admin endpoint; returns status and body.
    pub fn admin_get(&self, name: &str, path: &str) -> Result<(u16, String)> {
        self.node(name)
            .netns
            .http_get(mesh_common::PORT_ADMIN, path)
    }

    /// Asserts that a new connection from pod `pod` to `dst` is refused (a reset), within a
    /// second.
    pub fn assert_refused(&self, pod: &str, dst: SocketAddr) {
        let started = Instant::now();
        let err =
            crate::apps::connect_in(&self.pod(pod).netns, dst, Duration::from_secs(3)).unwrap_err();
        let kind = err
            .downcast_ref::<std::io::Error>()
            .map(std::io::Error::kind);
        assert_eq!(
            kind,
            Some(std::io::ErrorKind::ConnectionRefused),
            "{pod} -> {dst}: {err:#}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{pod} -> {dst}: refusal took {:?}",
            started.elapsed()
        );
    }

    /// The connections node `name`'s proxy recorded.
    pub fn connections(&self, name: &str) -> Result<Vec<ProxyConnection>> {
        let (status, body) = self.admin_get(name, "/debug/connections")?;
        if status != 200 {
            bail!("/debug/connections answered {status}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// Waits until node `name`'s proxy has recorded a closed connection matching `pred`.
    pub fn wait_connection(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(&ProxyConnection) -> bool,
    ) -> Result<ProxyConnection> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let conns = self.connections(name)?;
            if let Some(c) = conns.iter().find(|c| c.closed_ms.is_some() && pred(c)) {
                return Ok(c.clone());
            }
            if Instant::now() > deadline {
                bail!("node {name}'s proxy recorded no {what}; it has: {conns:#?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A kernel counter from node `name`'s metrics (`mesh_kernel_packets_total{decision}`).
    pub fn kernel_counter(&self, name: &str, decision: &str) -> Result<u64> {
        self.metric(
            name,
            &format!("mesh_kernel_packets_total{{decision=\"{decision}\"}}"),
        )
    }

    /// One same-node bypass counter of node `name` (`mesh_socket_bypass_total{event}`).
    pub fn bypass_counter(&self, name: &str, event: &str) -> Result<u64> {
        self.metric(
            name,
            &format!("mesh_socket_bypass_total{{event=\"{event}\"}}"),
        )
    }

    /// Node `name`'s datapath as `/debug/state` shows it: the links carrying the capture
    /// program, and the pod IPs in the kernel's enrolled map.
    pub fn datapath_view(&self, name: &str) -> Result<(Vec<String>, Vec<String>)> {
        let state = self.debug_state(name)?;
        let datapath = &state["datapath"];
        let strings = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        };
        let links = datapath["links"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l[1].as_str().map(str::to_string))
            .collect();
        Ok((links, strings(&datapath["enrolled"])))
    }

    /// Node `name`'s `/debug/state` document.
    pub fn debug_state(&self, name: &str) -> Result<serde_json::Value> {
        let (status, body) = self.admin_get(name, "/debug/state")?;
        if status != 200 {
            bail!("/debug/state answered {status}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// The value of one series (`name{labels}` exactly as exposed) of node `name`'s metrics.
    pub fn metric(&self, name: &str, series: &str) -> Result<u64> {
        let (_, body) = self.admin_get(name, "/metrics")?;
        let needle = format!("{series} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&needle))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| anyhow!("no {series} in metrics"))
    }

    /// The sum of every series of metric `metric` (full exposed name) of node `name` that
    /// carries all of `labels`; 0 when none does.
    pub fn metric_sum(&self, name: &str, metric: &str, labels: &[(&str, &str)]) -> Result<u64> {
        let (_, body) = self.admin_get(name, "/metrics")?;
        let mut sum = 0;
        for line in body.lines() {
            let Some(rest) = line.strip_prefix(metric) else {
                continue;
            };
            let (set, value) = if let Some(value) = rest.strip_prefix(' ') {
                ("", value)
            } else if let Some((set, value)) =
                rest.strip_prefix('{').and_then(|r| r.rsplit_once("} "))
            {
                (set, value)
            } else {
                continue;
            };
            let fits = labels
                .iter()
                .all(|(k, v)| set.split(',').any(|pair| pair == format!("{k}=\"{v}\"")));
            if fits {
                sum += value.trim().parse::<u64>().unwrap_or(0);
            }
        }
        Ok(sum)
    }

    /// The signer, started now if it is not yet: in the first node's namespaces, with a CA
    /// of its own ([`crate::signer`]), a token per node, pods from the config file (or the
    /// API with `signer_args` `--kube`).
    pub fn signer(&mut self) -> Result<&mut crate::signer::Signer> {
        if self.signer.is_none() {
            let first = &self.nodes[0];
            let listen = SocketAddr::from((first.underlay, crate::signer::PORT));
            let mut signer = crate::signer::Signer::create(
                &self.dir,
                &first.netns,
                listen,
                self.ca_intermediate,
            )?;
            signer.args = self.signer_args.clone();
            // The signer signs in the nodes' trust domain.
            if let Some(at) = self.run_args.iter().position(|a| a == "--trust-domain") {
                signer
                    .args
                    .extend(self.run_args[at..=at + 1].iter().cloned());
            }
            // A token per node (file mode), unless the test gave the node one (a token the
            // fake API server issued, for a signer that reviews tokens).
            let mut tokens = String::new();
            for node in &self.nodes {
                let file = self.node_state_dir(&node.name).join("ca-token");
                if !file.exists() {
                    std::fs::create_dir_all(self.node_state_dir(&node.name))?;
                    std::fs::write(&file, format!("{:032x}", random_u128()))?;
                }
                let token = std::fs::read_to_string(&file)?;
                tokens.push_str(&format!("{} {}\n", node.name, token.trim()));
            }
            std::fs::write(self.dir.join("node-tokens"), tokens)?;
            self.signer = Some(signer);
        }
        self.start_signer()?;
        self.signer.as_mut().ok_or_else(|| anyhow!("no signer"))
    }

    /// Starts the signer again after [`Cluster::stop_signer`] (with the CA it was switched
    /// to, if it was).
    pub fn start_signer(&self) -> Result<()> {
        let signer = self.signer_ref()?;
        signer.start(&self.config, &self.dir.join("node-tokens"))
    }

    /// Stops the signer (nodes keep their certificates; renewals fail until it is back).
    pub fn stop_signer(&self) {
        if let Some(signer) = self.signer.as_ref() {
            signer.stop();
        }
    }

    /// The CA the signer signs with (as an attacker holding it would use it).
    pub fn ca(&self) -> Result<mesh_node::identity::Ca> {
        let signer = self.signer_ref()?;
        signer.ca(signer.current())
    }

    /// The signer, once started.
    pub fn signer_ref(&self) -> Result<&crate::signer::Signer> {
        self.signer
            .as_ref()
            .ok_or_else(|| anyhow!("the signer has not started (no mesh-node yet)"))
    }

    /// The value of one series of the signer's metrics (`name{labels}` as exposed).
    pub fn signer_metric(&self, series: &str) -> Result<u64> {
        let (_, body) = self.nodes[0]
            .netns
            .http_get(crate::signer::ADMIN_PORT, "/metrics")?;
        let needle = format!("{series} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&needle))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| anyhow!("no {series} in the signer's metrics"))
    }

    /// The directory where the cluster keeps its files (config, logs, state).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Node `name`'s own state directory (`--state-dir`, with its signer token `ca-token`
    /// and trust bundle `trust-bundle.pem`).
    pub fn node_state_dir(&self, name: &str) -> PathBuf {
        self.dir.join(format!("state-{name}"))
    }

    /// Node `name`'s CNI configuration and binary directories.
    pub fn cni_dirs(&self, name: &str) -> (PathBuf, PathBuf) {
        let base = self.dir.join(format!("cni-{name}"));
        (base.join("net.d"), base.join("bin"))
    }

    /// Moves kube-proxy's jump to the top of PREROUTING on node `name`, as a kube-proxy
    /// resync could, so its DNAT runs before the mesh's bypass rule.
    pub fn kube_proxy_first(&self, name: &str) -> Result<()> {
        let netns = &self.node(name).netns;
        netns.exec(
            "iptables",
            &["-w", "-t", "nat", "-D", "PREROUTING", "-j", "KUBE-SERVICES"],
        )?;
        netns.exec(
            "iptables",
            &[
                "-w",
                "-t",
                "nat",
                "-I",
                "PREROUTING",
                "1",
                "-j",
                "KUBE-SERVICES",
            ],
        )?;
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        let names: Vec<String> = self.mesh.keys().cloned().collect();
        for name in names {
            if let Some(mut child) = self.mesh.remove(&name) {
                terminate(&mut child);
            }
        }
        if let Some(signer) = self.signer.take() {
            if panicking {
                eprintln!("---- signer log ----\n{}", signer.log());
            }
        }
        self.mesh_cgroups.clear();
        self.retired_cgroups.clear();
        if panicking {
            for node in &self.nodes {
                eprintln!(
                    "---- mesh-node log of {} ----\n{}",
                    node.name,
                    self.mesh_log(&node.name)
                );
            }
        }
        // Pods, nodes, then the fabric; the bpffs mount (pins) last.
        self.sandboxes.clear();
        self.pods.clear();
        self.nodes.clear();
        self.fabric = None;
        let _ = sh("umount", &[&self.bpffs.to_string_lossy()]);
        let _ = std::fs::remove_dir(&self.bpffs);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn random_u128() -> u128 {
    let mut bytes = [0u8; 16];
    let mut urandom = std::fs::File::open("/dev/urandom").expect("/dev/urandom");
    std::io::Read::read_exact(&mut urandom, &mut bytes).expect("/dev/urandom");
    u128::from_le_bytes(bytes)
}

/// SIGTERM to a child we started; waits up to 5 s (then kills it).
pub(crate) fn terminate(child: &mut Child) {
    crate::tools::stop(child, libc::SIGTERM);
}

fn flannel_mac(index: u8) -> String {
    format!("0e:6d:65:73:68:{:02x}", index + 1)
}

/// kube-proxy's iptables mode, reduced to what matters: every Service VIP:port is DNATed to
/// one of its ready endpoints (chosen at random), in PREROUTING and OUTPUT.
fn install_kube_proxy(node: &Node, state: &State) -> Result<()> {
    let ipt = |args: &[&str]| -> Result<()> {
        let full: Vec<&str> = ["-w", "-t", "nat"]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        node.netns.exec("iptables", &full).map(drop)
    };
    ipt(&["-N", "KUBE-SERVICES"])?;
    ipt(&["-N", "KUBE-NODEPORTS"])?;
    ipt(&["-A", "PREROUTING", "-j", "KUBE-SERVICES"])?;
    ipt(&["-A", "OUTPUT", "-j", "KUBE-SERVICES"])?;
    let mut services: Vec<_> = state.services.values().collect();
    services.sort_by_key(|s| s.vip);
    for (n, svc) in services.iter().enumerate() {
        if svc.endpoints.is_empty() {
            continue;
        }
        let chain = format!("KUBE-SVC-{n}");
        ipt(&["-N", &chain])?;
        let count = svc.endpoints.len();
        for (i, ep) in svc.endpoints.iter().enumerate() {
            let to = ep.to_string();
            if i + 1 < count {
                let p = format!("{:.5}", 1.0 / (count - i) as f64);
                ipt(&[
                    "-A",
                    &chain,
                    "-p",
                    "tcp",
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &p,
                    "-j",
                    "DNAT",
                    "--to-destination",
                    &to,
                ])?;
            } else {
                ipt(&[
                    "-A",
                    &chain,
                    "-p",
                    "tcp",
                    "-j",
                    "DNAT",
                    "--to-destination",
                    &to,
                ])?;
            }
        }
        ipt(&[
            "-A",
            "KUBE-SERVICES",
            "-d",
            &format!("{}/32", svc.vip.ip()),
            "-p",
            "tcp",
            "--dport",
            &svc.vip.port().to_string(),
            "-j",
            &chain,
        ])?;
        if let Some(node_port) = svc.node_port {
            // As kube-proxy does: NodePort traffic is masqueraded, so replies come back
            // through this node whichever endpoint answers.
            let port = node_port.to_string();
            let tcp = ["-A", "KUBE-NODEPORTS", "-p", "tcp", "--dport", &port];
            ipt(&[&tcp[..], &["-j", "MARK", "--set-xmark", "0x4000/0x4000"]].concat())?;
            ipt(&[&tcp[..], &["-j", &chain]].concat())?;
        }
    }
    // hostPorts of this node's pods, as the CNI's portmap plugin maps them.
    let mut host_ports: Vec<_> = state.host_ports.iter().collect();
    host_ports.sort();
    for (host_port, pod) in host_ports {
        let port = host_port.to_string();
        let tcp = ["-A", "KUBE-NODEPORTS", "-p", "tcp", "--dport", &port];
        ipt(&[&tcp[..], &["-j", "MARK", "--set-xmark", "0x4000/0x4000"]].concat())?;
        ipt(&[
            &tcp[..],
            &["-j", "DNAT", "--to-destination", &pod.to_string()],
        ]
        .concat())?;
    }
    // Last in KUBE-SERVICES, as kube-proxy orders it.
    ipt(&[
        "-A",
        "KUBE-SERVICES",
        "-m",
        "addrtype",
        "--dst-type",
        "LOCAL",
        "-j",
        "KUBE-NODEPORTS",
    ])?;
    ipt(&[
        "-A",
        "POSTROUTING",
        "-m",
        "mark",
        "--mark",
        "0x4000/0x4000",
        "-j",
        "MASQUERADE",
    ])?;
    Ok(())
}

/// How many programs called `name` are loaded on the machine (`bpftool prog show`).
pub fn loaded_programs(name: &str) -> Result<usize> {
    let listing = sh("bpftool", &["prog", "show"])?;
    Ok(listing
        .lines()
        .filter(|l| l.split_whitespace().any(|w| w == name))
        .count())
}

/// Waits (programs are freed after an RCU grace period) until `count` programs called `name`
/// are loaded; returns the last count seen.
pub fn wait_loaded_programs(name: &str, count: usize) -> Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seen = loaded_programs(name)?;
        if seen == count || Instant::now() > deadline {
            return Ok(seen);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `/proc/PID/status` line's value in KiB (`key` with its colon, e.g. `VmRSS:`).
pub fn proc_status_kib(pid: u32, key: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no {key} in /proc/{pid}/status"))
}

/// The mesh-node binary next to the running test or demo executable
/// (`target/<profile>/mesh-node`), or `$MESH_NODE_BIN`.
pub fn mesh_node_bin() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("MESH_NODE_BIN") {
        return Ok(path.into());
    }
    built_bin("mesh-node")
}

/// A binary of this workspace built next to the running test (`cargo build --bins`).
pub fn built_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "{name} binary not found next to {}: run `cargo build --bins` first",
        exe.display()
    )
}

/// Removes namespaces and bpffs mounts left by test processes that no longer exist.
fn sweep_stale() {
    let alive = |id: &str| -> bool {
        let pid: String = id
            .trim_start_matches(PREFIX)
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        pid.is_empty() || Path::new(&format!("/proc/{pid}")).exists()
    };
    if let Ok(list) = sh("ip", &["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if name.starts_with(PREFIX) && name.contains('x') && !alive(name) {
                let _ = sh("ip", &["netns", "del", name]);
            }
        }
    }
    // Cgroups tests made (`attack::Cgroup`), named after their cluster.
    if let Ok(entries) = crate::attack::cgroup2_root().and_then(|r| Ok(std::fs::read_dir(r)?)) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(PREFIX) && name.contains('x') && !alive(&name) {
                let _ = std::fs::remove_dir(entry.path());
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(BPFFS_ROOT) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !alive(&name) {
                let _ = sh("umount", &[&entry.path().to_string_lossy()]);
                let _ = std::fs::remove_dir(entry.path());
            }
        }
    }
}
