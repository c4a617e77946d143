//! The command line: clap's definitions and their checks. `run`'s flags become one
//! [`Settings`] value; every invalid flag is named with the reason, all at once, before
//! anything starts (`main` exits 64 with them).

use std::{
    net::{IpAddr, SocketAddr},
    path::{Component, Path, PathBuf},
    time::Duration,
};

use clap::{Args, Parser, Subcommand};
use mesh_common::{PORT_ADMIN, PORT_HBONE, PORT_INBOUND, PORT_OUTBOUND};

use crate::{
    capture::{
        host::{HostTraffic, DEFAULT_KUBELET_CGROUPS},
        UdpToEnrolled,
    },
    cni,
    config::{self, semantics},
    settings::{dns_name_problem, trust_domain_problem, Node, Settings, Source},
};

/// `mesh-node`'s command line.
#[derive(Parser)]
#[command(
    name = "mesh-node",
    version,
    about = "Per-node proxy of an eBPF-steered, sidecarless service mesh"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// Run the node proxy: load and attach the kernel programs, serve captured traffic.
    Run(Box<RunArgs>),
    /// Check configuration files; print each problem as file:document:field; exit 1 on errors.
    Validate {
        /// Files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Check how the resources of all files fit together (routes to missing subsets, policies
    /// that select nothing, ...), like `istioctl analyze`; exit 1 on errors.
    Analyze {
        /// Files to analyze together.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        mesh: MeshArgs,
    },
    /// Remove every program, pin, rule and route of a node.
    Uninstall(NodeArgs),
    /// The mesh CA for a cluster.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Ask this pod's `mesh-node run` whether it is ready or alive, over its probe socket
    /// (`--probe-socket`): for exec probes, which answer for this pod's process even while a
    /// successor and its predecessor share the node's network. Exit 0 when it is.
    Probe {
        /// What to ask.
        #[arg(value_enum)]
        check: ProbeCheck,
        /// The probe socket of the `run` to ask.
        #[arg(long, env = "MESH_PROBE_SOCKET")]
        socket: PathBuf,
    },
    /// Print the CustomResourceDefinitions of the Istio kinds the mesh reads (generated
    /// from its typed model), or write one file per CRD into a directory.
    Crds {
        /// Write `<plural>.<group>.yaml` files here instead of printing.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// `mesh-node probe ...`.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ProbeCheck {
    /// `/healthz/ready`: serving (not starting, not draining after a takeover).
    Ready,
    /// `/healthz/live`: the process answers.
    Live,
}

impl ProbeCheck {
    /// The admin path it asks.
    pub fn path(self) -> &'static str {
        match self {
            ProbeCheck::Ready => "/healthz/ready",
            ProbeCheck::Live => "/healthz/live",
        }
    }
}

/// `mesh-node ca ...`.
#[derive(Subcommand)]
pub enum CaCommand {
    /// Generate a new CA: a root, or with `--intermediate` a root and an intermediate that
    /// signs. Prints the signer's Secret (Istio's cacerts layout) and the nodes' trust-bundle
    /// ConfigMap (`kubectl apply -f`), or with `--out` writes the files into a directory.
    Init(CaInitArgs),
    /// Run the signer: the only process holding the CA key. It signs node proxies' CSRs for
    /// the identities of pods scheduled on the caller's node (docs/security.md).
    Serve(Box<CaServeArgs>),
}

/// `mesh-node ca init`'s flags.
#[derive(Args)]
pub struct CaInitArgs {
    /// Secret name.
    #[arg(long, default_value = "mesh-ca")]
    pub name: String,
    /// Namespace of the mesh (deploy/ uses mesh-system).
    #[arg(long, default_value = "mesh-system")]
    pub namespace: String,
    /// Sign with an intermediate under a new root (the root's key is not in the signer's
    /// files; keep it with `--root-key-out` to make the next intermediate).
    #[arg(long)]
    pub intermediate: bool,
    /// Write ca-cert.pem, ca-key.pem, cert-chain.pem and root-cert.pem here (0700, keys 0600)
    /// instead of printing manifests.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write the trust bundle (the root, PEM) to this file.
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    /// With `--intermediate`: write the root's key to this file (0600).
    #[arg(long, requires = "intermediate")]
    pub root_key_out: Option<PathBuf>,
}

/// `mesh-node ca serve`'s flags.
#[derive(Args)]
pub struct CaServeArgs {
    /// The CA: Istio's cacerts (ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem) or
    /// cert-manager's (tls.crt, tls.key, ca.crt), a mounted Secret.
    #[arg(long, env = "MESH_CA_DIR", default_value = "/etc/mesh/ca")]
    pub ca_dir: PathBuf,
    /// The TLS address node proxies ask.
    #[arg(long, env = "MESH_CA_LISTEN", default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,
    /// Plain HTTP: /metrics and /healthz/ready.
    #[arg(long, env = "MESH_CA_ADMIN_ADDR", default_value = "0.0.0.0:15014")]
    pub admin_addr: SocketAddr,
    /// File mode: the pods come from this file (re-read when it changes).
    #[arg(
        long,
        env = "MESH_CONFIG",
        required_unless_present = "kube",
        conflicts_with = "kube"
    )]
    pub config: Option<PathBuf>,
    /// Watch the pods in the Kubernetes API and authenticate node proxies by TokenReview.
    #[arg(long, env = "MESH_KUBE")]
    pub kube: bool,
    /// Kubeconfig to use with `--kube` outside a cluster.
    #[arg(long, requires = "kube")]
    pub kubeconfig: Option<PathBuf>,
    /// Authenticate nodes by static tokens instead of TokenReview (file mode; required
    /// without `--kube`): one `<node> <token>` per line, tokens of at least 16 characters.
    #[arg(long, env = "MESH_CA_NODE_TOKENS", required_unless_present = "kube")]
    pub node_tokens: Option<PathBuf>,
    /// The audience node proxies' tokens must be bound to.
    #[arg(long, env = "MESH_CA_AUDIENCE", default_value = "mesh-ca")]
    pub audience: String,
    /// The service accounts node proxies run as, `namespace/name` (repeat or comma-separate;
    /// Istio's CA_TRUSTED_NODE_ACCOUNTS).
    #[arg(
        long = "node-account",
        env = "MESH_CA_NODE_ACCOUNTS",
        value_delimiter = ',',
        default_value = "mesh-system/mesh-node"
    )]
    pub node_accounts: Vec<String>,
    /// SPIFFE trust domain; identities outside it are refused.
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = semantics::CLUSTER_DOMAIN)]
    pub trust_domain: String,
    /// The signer's own SPIFFE ID (default spiffe://<trust-domain>/ns/mesh-system/sa/mesh-ca).
    #[arg(long, env = "MESH_CA_IDENTITY")]
    pub identity: Option<String>,
    /// The longest workload certificate lifetime signed (Go duration syntax).
    #[arg(long, env = "MESH_CA_MAX_CERT_LIFETIME", default_value = "24h", value_parser = go_duration)]
    pub max_cert_lifetime: Duration,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "MESH_LOG", default_value = "info")]
    pub log: String,
}

/// The node a command acts on (`run`, `uninstall`).
#[derive(Args)]
pub struct NodeArgs {
    /// Name of this node (as in pods' spec.nodeName).
    #[arg(long, env = "MESH_NODE")]
    node: String,
    /// bpffs directory for pins; a per-node subdirectory is used.
    #[arg(long, env = "MESH_BPFFS", default_value = "/sys/fs/bpf/mesh")]
    bpffs: PathBuf,
    /// The container runtime's CNI configuration directory: mesh-node keeps
    /// `00-mesh.conflist` there (the node's chain with the `mesh-cni` plugin appended).
    /// K3s: /var/lib/rancher/k3s/agent/etc/cni/net.d. Without it the plugin is not
    /// installed (the repair pass still reports pods that bypassed it).
    #[arg(long, env = "MESH_CNI_CONF_DIR", requires = "cni_bin_dir")]
    cni_conf_dir: Option<PathBuf>,
    /// The runtime's CNI binary directory, where the plugin is copied. K3s: the `bin_dir` of
    /// /var/lib/rancher/k3s/agent/etc/containerd/config.toml (/var/lib/rancher/k3s/data/cni
    /// on current releases).
    #[arg(long, env = "MESH_CNI_BIN_DIR", requires = "cni_conf_dir")]
    cni_bin_dir: Option<PathBuf>,
}

/// Mesh-wide settings (`run`, `analyze`).
#[derive(Args)]
pub struct MeshArgs {
    /// Istio's root namespace: its selector-less PeerAuthentication and AuthorizationPolicy
    /// apply mesh-wide.
    #[arg(long, env = "MESH_ROOT_NAMESPACE", default_value = semantics::DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
    /// SPIFFE trust domain of workload identities (spiffe://<trust-domain>/ns/<ns>/sa/<sa>).
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = semantics::CLUSTER_DOMAIN)]
    trust_domain: String,
    /// How request paths are normalized before routing, AuthorizationPolicy and the backend
    /// (Istio's MeshConfig `pathNormalization`): NONE, BASE (Istio's default),
    /// MERGE_SLASHES or DECODE_AND_MERGE_SLASHES (docs/traffic.md).
    #[arg(
        long,
        env = "MESH_PATH_NORMALIZATION",
        default_value = "DECODE_AND_MERGE_SLASHES"
    )]
    path_normalization: config::paths::Normalization,
    /// Answer 400 to a request whose path is still ambiguous after normalization (an encoded
    /// slash or backslash, `;` path parameters, ...) on a port where an AuthorizationPolicy
    /// matches paths (docs/traffic.md).
    #[arg(long, env = "MESH_REJECT_AMBIGUOUS_PATHS", default_value_t = true, action = clap::ArgAction::Set)]
    reject_ambiguous_paths: bool,
}

/// `mesh-node run`'s flags.
#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    node: NodeArgs,
    #[command(flatten)]
    mesh: MeshArgs,
    /// The CNI gate's socket, the enrolment cache and the handover socket live here.
    #[arg(long, env = "MESH_STATE_DIR", default_value = "/var/lib/mesh")]
    state_dir: PathBuf,
    /// The signer (`mesh-node ca serve`) workload certificates are asked from, `host:port`.
    #[arg(
        long,
        env = "MESH_CA_ADDRESS",
        default_value = "mesh-ca.mesh-system.svc:15012"
    )]
    ca_address: String,
    /// The signer's SPIFFE ID, which its certificate must carry (default:
    /// spiffe://<trust-domain>/ns/mesh-system/sa/mesh-ca).
    #[arg(long, env = "MESH_CA_IDENTITY")]
    ca_identity: Option<String>,
    /// The token this node proves itself to the signer with, re-read on every request: in a
    /// cluster the projected ServiceAccount token (audience mesh-ca), in file mode the node's
    /// line of the signer's `--node-tokens`.
    #[arg(
        long,
        env = "MESH_CA_TOKEN_FILE",
        default_value = "/var/run/secrets/mesh-ca/token"
    )]
    ca_token_file: PathBuf,
    /// The trust bundle: the roots (PEM) peers' and the signer's certificates must chain to;
    /// re-read when it changes (a mounted ConfigMap).
    #[arg(
        long,
        env = "MESH_TRUST_BUNDLE",
        default_value = "/var/run/mesh/trust/roots.pem"
    )]
    trust_bundle: PathBuf,
    /// Lifetime of workload certificates asked for (Go duration syntax: 24h, 90m, 20s; at
    /// least 2s; the signer may cap it); each is renewed at half its lifetime.
    #[arg(long, env = "MESH_CERT_LIFETIME", default_value = "24h", value_parser = go_duration)]
    cert_lifetime: Duration,
    /// Multi-document YAML of Kubernetes-shaped resources; re-read when it changes.
    #[arg(
        long,
        env = "MESH_CONFIG",
        required_unless_present = "kube",
        conflicts_with = "kube"
    )]
    config: Option<PathBuf>,
    /// Read the resources from the Kubernetes API server instead (in-cluster credentials,
    /// or the kubeconfig).
    #[arg(long, env = "MESH_KUBE")]
    kube: bool,
    /// Kubeconfig to use with `--kube` outside a cluster (without it: in-cluster
    /// credentials, else `$KUBECONFIG`, else ~/.kube/config).
    #[arg(long, requires = "kube")]
    kubeconfig: Option<PathBuf>,
    /// Admin endpoint (health, metrics, debug).
    #[arg(long, env = "MESH_ADMIN_ADDR", default_value_t = SocketAddr::from(([0, 0, 0, 0], PORT_ADMIN)))]
    admin_addr: SocketAddr,
    /// A unix socket of this process's own (in the pod's filesystem) where the health and
    /// metrics endpoints answer too, for `mesh-node probe` (exec probes): during an upgrade
    /// the admin port is the successor's, this socket stays each process's.
    #[arg(long, env = "MESH_PROBE_SOCKET")]
    probe_socket: Option<PathBuf>,
    /// A node address, besides loopback, on which the admin endpoint also serves `/debug/*`
    /// (which reveals every workload, identity, policy and connection of the mesh). Off by
    /// default: `/debug/*` answers only on loopback.
    #[arg(long, env = "MESH_DEBUG_ADDRESS")]
    debug_address: Option<IpAddr>,
    /// Same-node socket bypass (experimental, off by default): bytes between local pods and
    /// this proxy skip the TCP stack (sock_ops on the cgroup v2 root + sk_msg). Policy,
    /// routing and metrics are unchanged. Known problem: the kernel answers some blocking
    /// reads of pods' sockets with EAGAIN (ARCHITECTURE.md, known gaps).
    #[arg(long, env = "MESH_SOCKET_BYPASS", default_value_t = false, action = clap::ArgAction::Set)]
    socket_bypass: bool,
    /// The node's own connections to enrolled pods (host-network pods, node daemons):
    /// `kubelet-only` sends every one but the kubelet's through the proxy as plaintext from
    /// outside the mesh (STRICT refuses it, AuthorizationPolicy applies); `allow` lets them
    /// all reach the pods directly, as Istio ambient does.
    #[arg(long, env = "MESH_HOST_TRAFFIC", value_enum, default_value_t = HostTraffic::KubeletOnly)]
    host_traffic: HostTraffic,
    /// The kubelet's cgroups, as paths below the cgroup v2 root (repeat the flag, or
    /// comma-separate): its processes and every process below them reach enrolled pods
    /// directly with `--host-traffic=kubelet-only`. Paths that do not exist are skipped.
    #[arg(
        long = "kubelet-cgroup",
        env = "MESH_KUBELET_CGROUPS",
        value_delimiter = ',',
        default_values = DEFAULT_KUBELET_CGROUPS
    )]
    kubelet_cgroups: Vec<PathBuf>,
    /// UDP to enrolled pods: `allow` (STRICT covers TCP, as in Istio) or `dns-only` (only
    /// DNS reaches them: queries to port 53, answers from port 53 of the cluster's DNS
    /// servers; everything else is dropped).
    #[arg(long, env = "MESH_UDP_TO_ENROLLED", value_enum, default_value_t = UdpToEnrolled::Allow)]
    udp_to_enrolled: UdpToEnrolled,
    /// The CNI plugin binary to install (with `--cni-conf-dir`); default: `mesh-cni` next
    /// to the mesh-node binary.
    #[arg(long, env = "MESH_CNI_PLUGIN")]
    cni_plugin: Option<PathBuf>,
    /// What the repair pass does about enrolled pods that never went through the CNI gate:
    /// `report` them and their connections from before capture (log, metrics), or also
    /// `reset` those connections.
    #[arg(long, env = "MESH_REPAIR", value_enum, default_value_t = cni::Repair::Report)]
    repair: cni::Repair,
    /// How often the repair pass runs (Go duration syntax; at least 1s).
    #[arg(long, env = "MESH_REPAIR_INTERVAL", default_value = "30s", value_parser = go_duration)]
    repair_interval: Duration,
    /// After a successor took the node over (a second `mesh-node run`: an upgrade), how long
    /// this process keeps relaying its open connections before it resets what is left and
    /// exits (Go duration syntax). HTTP clients are moved over at their next request.
    #[arg(long, env = "MESH_DRAIN_TIMEOUT", default_value = "1h", value_parser = go_duration)]
    drain_timeout: Duration,
    /// An OTLP collector (HTTP/protobuf) spans may go to, as NAME=URL
    /// (`http://host:port[/path]`, the path defaulting to /v1/traces): the stand-in for
    /// MeshConfig `extensionProviders`, named by Telemetry `tracing[].providers`. The first is
    /// the default provider. Repeat the flag (or comma-separate) for more; none: tracing off.
    #[arg(
        long = "tracing-provider",
        env = "MESH_TRACING_PROVIDERS",
        value_delimiter = ','
    )]
    tracing_providers: Vec<String>,
    /// Percentage (0-100) of requests without a caller's sampling decision that are traced
    /// where no Telemetry sets `randomSamplingPercentage` (MeshConfig
    /// `defaultConfig.tracing.sampling`; Istio's default is 1).
    #[arg(long, env = "MESH_TRACE_SAMPLING", default_value_t = 1.0)]
    trace_sampling: f64,
    /// Log filter (tracing EnvFilter syntax); `mesh_ebpf=debug` also logs every captured SYN
    /// from the kernel programs.
    #[arg(long, env = "MESH_LOG", default_value = "info")]
    log: String,
}

/// The shortest workload certificate lifetime (renewal runs every second, at half life).
const MIN_CERT_LIFETIME: Duration = Duration::from_secs(2);
/// The shortest repair interval.
const MIN_REPAIR_INTERVAL: Duration = Duration::from_secs(1);

fn go_duration(text: &str) -> Result<Duration, String> {
    config::values::Duration::parse(text).map(|d| d.0)
}

/// Every problem found, each as `--flag: reason`.
#[derive(Debug, Default)]
pub struct Problems(pub Vec<String>);

impl Problems {
    fn check(&mut self, flag: &str, problem: Option<String>) {
        if let Some(problem) = problem {
            self.0.push(format!("--{flag}: {problem}"));
        }
    }

    fn done<T>(self, value: T) -> Result<T, Problems> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(self)
        }
    }
}

/// Why `path` is not an absolute path without `..`.
fn absolute_problem(path: &Path) -> Option<String> {
    if !path.is_absolute() {
        Some(format!("{} is not an absolute path", path.display()))
    } else if path.components().any(|c| c == Component::ParentDir) {
        Some(format!("{} has a '..' component", path.display()))
    } else {
        None
    }
}

fn at_least(value: Duration, min: Duration) -> Option<String> {
    (value < min).then(|| format!("{value:?} is too short: at least {min:?}"))
}

impl NodeArgs {
    /// The node, or every invalid flag.
    pub fn node(self) -> Result<Node, Problems> {
        let mut problems = Problems::default();
        self.check(&mut problems);
        problems.done(self.into_node())
    }

    fn check(&self, problems: &mut Problems) {
        // Also a directory name under the pin root: no '/', no "..".
        problems.check("node", dns_name_problem(&self.node, 253, true));
        problems.check("bpffs", absolute_problem(&self.bpffs));
    }

    fn into_node(self) -> Node {
        Node {
            name: self.node,
            bpffs: self.bpffs,
            cni_dirs: self.cni_conf_dir.zip(self.cni_bin_dir),
        }
    }
}

impl MeshArgs {
    /// The mesh-wide settings, or every invalid flag.
    pub fn mesh(self) -> Result<semantics::Mesh, Problems> {
        let mut problems = Problems::default();
        self.check(&mut problems);
        problems.done(self.into_mesh())
    }

    fn check(&self, problems: &mut Problems) {
        problems.check(
            "root-namespace",
            dns_name_problem(&self.root_namespace, 63, false),
        );
        problems.check("trust-domain", trust_domain_problem(&self.trust_domain));
    }

    fn into_mesh(self) -> semantics::Mesh {
        semantics::Mesh {
            root_namespace: self.root_namespace,
            trust_domain: self.trust_domain,
            paths: config::paths::PathSettings {
                normalization: self.path_normalization,
                reject_ambiguous: self.reject_ambiguous_paths,
            },
        }
    }
}

impl RunArgs {
    /// The settings, or every invalid flag (the plugin default is looked up next to
    /// `current_exe`).
    pub fn settings(self, current_exe: &Path) -> Result<Settings, Problems> {
        let mut problems = Problems::default();
        self.node.check(&mut problems);
        self.mesh.check(&mut problems);
        problems.check("state-dir", absolute_problem(&self.state_dir));
        if let Some(socket) = &self.probe_socket {
            problems.check("probe-socket", absolute_problem(socket));
        }
        problems.check(
            "cert-lifetime",
            at_least(self.cert_lifetime, MIN_CERT_LIFETIME),
        );
        problems.check(
            "repair-interval",
            at_least(self.repair_interval, MIN_REPAIR_INTERVAL),
        );
        let listeners = [
            (PORT_OUTBOUND, "outbound"),
            (PORT_INBOUND, "inbound"),
            (PORT_HBONE, "HBONE"),
        ];
        problems.check(
            "admin-addr",
            listeners
                .iter()
                .find(|(port, _)| *port == self.admin_addr.port())
                .map(|(port, name)| format!("port {port} is the {name} listener's"))
                .or_else(|| {
                    (self.admin_addr.port() == 0)
                        .then(|| "port 0 would pick a port no probe knows".into())
                }),
        );
        problems.check(
            "debug-address",
            self.debug_address.and_then(|address| {
                (address.is_unspecified() || address.is_multicast()).then(|| {
                    format!(
                        "{address} is not one address of this node (name the address the \
                         debug endpoint may answer on)"
                    )
                })
            }),
        );
        for cgroup in &self.kubelet_cgroups {
            problems.check(
                "kubelet-cgroup",
                absolute_problem(cgroup)
                    .map(|why| format!("{why} (a path below the cgroup v2 root, from /)")),
            );
        }
        problems.check(
            "log",
            tracing_subscriber::EnvFilter::try_new(&self.log)
                .err()
                .map(|err| format!("invalid filter {:?}: {err}", self.log)),
        );
        let cni = match (&self.node.cni_conf_dir, &self.node.cni_bin_dir) {
            (Some(conf_dir), Some(bin_dir)) => {
                let plugin = self
                    .cni_plugin
                    .clone()
                    .unwrap_or_else(|| current_exe.with_file_name(cni::PLUGIN));
                problems.check(
                    "cni-plugin",
                    (!plugin.is_file()).then(|| format!("{} is not a file", plugin.display())),
                );
                Some(cni::Install {
                    conf_dir: conf_dir.clone(),
                    bin_dir: bin_dir.clone(),
                    plugin,
                    state_dir: self.state_dir.clone(),
                })
            }
            _ => {
                problems.check(
                    "cni-plugin",
                    self.cni_plugin
                        .is_some()
                        .then(|| "is only used with --cni-conf-dir and --cni-bin-dir".into()),
                );
                None
            }
        };
        let ca_identity = self.ca_identity.clone().unwrap_or_else(|| {
            format!(
                "spiffe://{}/ns/mesh-system/sa/mesh-ca",
                self.mesh.trust_domain
            )
        });
        problems.check(
            "ca-identity",
            (!ca_identity.starts_with("spiffe://"))
                .then(|| format!("{ca_identity} is not a SPIFFE ID (spiffe://...)")),
        );
        problems.check(
            "ca-address",
            match self.ca_address.rsplit_once(':') {
                Some((host, port))
                    if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) =>
                {
                    None
                }
                _ => Some(format!("{} is not host:port", self.ca_address)),
            },
        );
        let mut providers: Vec<crate::trace::Provider> = Vec::new();
        for text in &self.tracing_providers {
            match crate::trace::TracingSettings::provider(text) {
                Ok(p) if providers.iter().any(|q| q.name == p.name) => problems.check(
                    "tracing-provider",
                    Some(format!("{} is named twice", p.name)),
                ),
                Ok(p) => providers.push(p),
                Err(why) => problems.check("tracing-provider", Some(why)),
            }
        }
        problems.check(
            "trace-sampling",
            (!(0.0..=100.0).contains(&self.trace_sampling))
                .then(|| format!("{} is not a percentage (0-100)", self.trace_sampling)),
        );
        let source = match self.config {
            Some(file) => Source::File(file),
            None => Source::Kube {
                kubeconfig: self.kubeconfig,
            },
        };
        problems.done(Settings {
            node: self.node.into_node(),
            mesh: self.mesh.into_mesh(),
            source,
            state_dir: self.state_dir,
            signer: crate::settings::SignerSettings {
                identity: ca_identity,
                address: self.ca_address,
                token_file: self.ca_token_file,
                trust_bundle: self.trust_bundle,
            },
            cert_lifetime: self.cert_lifetime,
            admin_addr: self.admin_addr,
            probe_socket: self.probe_socket,
            debug_address: self.debug_address,
            socket_bypass: self.socket_bypass,
            host_traffic: self.host_traffic,
            kubelet_cgroups: self.kubelet_cgroups,
            udp_to_enrolled: self.udp_to_enrolled,
            cni,
            repair: self.repair,
            repair_interval: self.repair_interval,
            drain_timeout: self.drain_timeout,
            tracing: crate::trace::TracingSettings {
                providers,
                sampling: self.trace_sampling,
            },
            log: self.log,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Settings, Problems> {
        let cli = Cli::try_parse_from(["mesh-node", "run"].iter().chain(args)).unwrap();
        let Command::Run(run) = cli.command else {
            unreachable!()
        };
        run.settings(Path::new("/nonexistent/mesh-node"))
    }

    #[test]
    fn defaults_are_valid_and_logged_on_one_line() {
        let settings = run(&["--node", "n1", "--config", "/etc/mesh.yaml"]).unwrap();
        let line = settings.to_string();
        for field in [
            "node=n1 ",
            "config=/etc/mesh.yaml ",
            "trust_domain=cluster.local ",
            "path_normalization=DECODE_AND_MERGE_SLASHES ",
            "ca_address=mesh-ca.mesh-system.svc:15012 ",
            "ca_identity=spiffe://cluster.local/ns/mesh-system/sa/mesh-ca ",
            "cert_lifetime=86400s ",
            "admin_addr=0.0.0.0:15020 ",
            "debug_address=loopback-only ",
            "host_traffic=kubelet-only ",
            "udp_to_enrolled=allow ",
            "cni=off ",
            "repair_interval=30s ",
            "log=info",
        ] {
            assert!(line.contains(field), "{field} not in {line}");
        }
        assert!(!line.contains('\n'));
    }

    #[test]
    fn every_invalid_flag_is_named_at_once() {
        let problems = run(&[
            "--node",
            "../n1",
            "--bpffs",
            "bpf",
            "--config",
            "/c.yaml",
            "--trust-domain",
            "Example.org",
            "--root-namespace",
            "istio.system",
            "--state-dir",
            "/var/lib/../mesh",
            "--cert-lifetime",
            "1s",
            "--repair-interval",
            "10ms",
            "--admin-addr",
            "0.0.0.0:15008",
            "--debug-address",
            "0.0.0.0",
            "--kubelet-cgroup",
            "system.slice/k3s.service",
            "--log",
            "mesh_node=loud",
            "--cni-plugin",
            "/bin/true",
        ])
        .err()
        .unwrap()
        .0;
        let flags: Vec<&str> = problems
            .iter()
            .map(|p| p.split_once(':').unwrap().0)
            .collect();
        assert_eq!(
            flags,
            [
                "--node",
                "--bpffs",
                "--root-namespace",
                "--trust-domain",
                "--state-dir",
                "--cert-lifetime",
                "--repair-interval",
                "--admin-addr",
                "--debug-address",
                "--kubelet-cgroup",
                "--log",
                "--cni-plugin",
            ],
            "{problems:#?}"
        );
        assert!(
            problems[5].contains("1s is too short: at least 2s"),
            "{problems:#?}"
        );
        assert!(
            problems[7].contains("15008 is the HBONE listener's"),
            "{problems:#?}"
        );
    }

    #[test]
    fn tracing_providers_and_sampling_are_checked() {
        let problems = run(&[
            "--node",
            "n1",
            "--config",
            "/c.yaml",
            "--tracing-provider",
            "otel=http://a:4318,otel=http://b:4318",
            "--tracing-provider",
            "zipkin=https://z:9411",
            "--trace-sampling",
            "150",
        ])
        .err()
        .unwrap()
        .0;
        assert_eq!(
            problems,
            [
                "--tracing-provider: otel is named twice",
                "--tracing-provider: \"https://z:9411\": only http:// collectors (OTLP \
                 HTTP/protobuf) are supported",
                "--trace-sampling: 150 is not a percentage (0-100)",
            ]
        );
        let settings = run(&[
            "--node",
            "n1",
            "--config",
            "/c.yaml",
            "--tracing-provider",
            "otel=http://a:4318",
        ])
        .unwrap();
        assert_eq!(settings.tracing.providers[0].name, "otel");
        assert!(settings
            .to_string()
            .contains(" tracing=otel=http://a:4318/v1/traces;sampling=1% "));
    }

    #[test]
    fn the_plugin_must_exist_when_it_is_installed() {
        let problems = run(&[
            "--node",
            "n1",
            "--config",
            "/c.yaml",
            "--cni-conf-dir",
            "/etc/cni/net.d",
            "--cni-bin-dir",
            "/opt/cni/bin",
        ])
        .err()
        .unwrap()
        .0;
        assert_eq!(
            problems,
            ["--cni-plugin: /nonexistent/mesh-cni is not a file"]
        );
    }
}
