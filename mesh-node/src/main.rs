//! `mesh-node`: run the node proxy, validate config, or uninstall a node's datapath.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{atomic::Ordering, mpsc, Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use arc_swap::ArcSwap;
use clap::{Args, Parser, Subcommand};
use mesh_common::{Listener, PORT_ADMIN, PORT_HBONE, PORT_INBOUND, PORT_OUTBOUND};
use mesh_node::{
    admin::{self, Admin, DatapathView},
    capture::{
        self,
        host::{HostTraffic, DEFAULT_KUBELET_CGROUPS},
        Datapath, Event, PodRequest, UdpToEnrolled,
    },
    cni,
    config::{self, semantics},
    connections::{Connections, Direction},
    http::ProxyContext,
    identity, kube_source,
    metrics::{ConfigMetrics, KernelCollector, ProxyMetrics},
    preflight, proxy, reload,
    state::State,
    sys,
    telemetry::{self, TcpMetrics},
    transport,
};
use prometheus_client::registry::Registry;

/// Exit status for invalid configuration (`EX_USAGE` in sysexits.h).
const EXIT_CONFIG: u8 = 64;
/// Exit status when privileges, kernel features or tools are missing (EX_NOPERM).
const EXIT_PREFLIGHT: u8 = 77;

#[derive(Parser)]
#[command(
    name = "mesh-node",
    version,
    about = "Per-node proxy of an eBPF-steered, sidecarless service mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    /// Print the CustomResourceDefinitions of the four Istio kinds the mesh reads (generated
    /// from its typed model), or write one file per CRD into a directory.
    Crds {
        /// Write `<plural>.<group>.yaml` files here instead of printing.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Generate a new root CA and print it as a Secret manifest for the DaemonSet to mount
    /// (`kubectl apply -f`); the key is in the output only.
    Init {
        /// Secret name.
        #[arg(long, default_value = "mesh-ca")]
        name: String,
        /// Namespace of the mesh (deploy/ uses mesh-system).
        #[arg(long, default_value = "mesh-system")]
        namespace: String,
    },
}

#[derive(Args)]
struct NodeArgs {
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

#[derive(Args)]
struct MeshArgs {
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

impl MeshArgs {
    fn mesh(&self) -> semantics::Mesh {
        semantics::Mesh {
            root_namespace: self.root_namespace.clone(),
            trust_domain: self.trust_domain.clone(),
            paths: config::paths::PathSettings {
                normalization: self.path_normalization,
                reject_ambiguous: self.reject_ambiguous_paths,
            },
        }
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    node: NodeArgs,
    #[command(flatten)]
    mesh: MeshArgs,
    /// Local mode: the mesh CA (ca-cert.pem, ca-key.pem) is kept in this directory,
    /// generated on first start.
    #[arg(long, env = "MESH_STATE_DIR", default_value = "/var/lib/mesh")]
    state_dir: PathBuf,
    /// Cluster mode: read the CA from this directory (a mounted Secret with ca-cert.pem and
    /// ca-key.pem) instead of the state directory; never generates one.
    #[arg(long, env = "MESH_CA_DIR")]
    ca_dir: Option<PathBuf>,
    /// Lifetime of workload certificates (Go duration syntax: 24h, 90m, 20s); each is
    /// renewed at half its lifetime.
    #[arg(long, env = "MESH_CERT_LIFETIME", default_value = "24h", value_parser = parse_lifetime)]
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
    /// A node address, besides loopback, on which the admin endpoint also serves `/debug/*`
    /// (which reveals every workload, identity, policy and connection of the mesh). Off by
    /// default: `/debug/*` answers only on loopback.
    #[arg(long, env = "MESH_DEBUG_ADDRESS")]
    debug_address: Option<std::net::IpAddr>,
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
    /// How often the repair pass runs (Go duration syntax).
    #[arg(long, env = "MESH_REPAIR_INTERVAL", default_value = "30s", value_parser = parse_lifetime)]
    repair_interval: Duration,
    /// Log filter (tracing EnvFilter syntax); `mesh_ebpf=debug` also logs every captured SYN
    /// from the kernel programs.
    #[arg(long, env = "MESH_LOG", default_value = "info")]
    log: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { files } => validate(&files),
        Command::Analyze { files, mesh } => analyze(&files, &mesh.mesh()),
        Command::Uninstall(args) => {
            init_logging("info");
            prepare_bpffs(&args.bpffs);
            if let Err(err) = preflight::check(&args.bpffs) {
                eprintln!("{err}");
                return ExitCode::from(EXIT_PREFLIGHT);
            }
            let uninstalled = capture::uninstall(&args.bpffs, &args.node).map(|mut removed| {
                if let (Some(conf), Some(bin)) = (&args.cni_conf_dir, &args.cni_bin_dir) {
                    removed.extend(cni::uninstall(conf, bin));
                }
                removed
            });
            match uninstalled {
                Ok(removed) if removed.is_empty() => {
                    println!("nothing of node {} was installed", args.node);
                    ExitCode::SUCCESS
                }
                Ok(removed) => {
                    for item in removed {
                        println!("removed {item}");
                    }
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("uninstall failed: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(args) => run(*args),
        Command::Crds { out } => {
            let crds = config::schema::crds();
            match out {
                None => {
                    let all: Vec<String> = crds.into_iter().map(|(_, yaml)| yaml).collect();
                    print!("{}", all.join("---\n"));
                    ExitCode::SUCCESS
                }
                Some(dir) => {
                    for (name, yaml) in crds {
                        if let Err(err) = std::fs::write(dir.join(&name), yaml) {
                            eprintln!("mesh-node crds: {}: {err}", dir.join(&name).display());
                            return ExitCode::FAILURE;
                        }
                    }
                    ExitCode::SUCCESS
                }
            }
        }
        Command::Ca(CaCommand::Init { name, namespace }) => {
            match identity::ca_secret_manifest(&name, &namespace) {
                Ok(manifest) => {
                    print!("{manifest}");
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("mesh-node ca init: {err}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn validate(files: &[PathBuf]) -> ExitCode {
    let mut failed = false;
    for file in files {
        match config::load_file(file) {
            Ok(resources) => {
                for warning in &resources.warnings {
                    println!("{warning}");
                }
            }
            Err(err) => {
                failed = true;
                println!("{}", err.render());
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn parse_lifetime(text: &str) -> Result<Duration, String> {
    let lifetime = config::values::Duration::parse(text)?.0;
    if lifetime < Duration::from_secs(2) {
        return Err(format!("{text:?} is too short: at least 2s"));
    }
    Ok(lifetime)
}

fn analyze(files: &[PathBuf], mesh: &semantics::Mesh) -> ExitCode {
    let paths: Vec<&std::path::Path> = files.iter().map(PathBuf::as_path).collect();
    let resources = match config::load_files(&paths) {
        Ok(resources) => resources,
        Err(errors) => {
            for err in errors {
                println!("{}", err.render());
            }
            eprintln!("analysis needs files without errors; fix the errors above first");
            return ExitCode::FAILURE;
        }
    };
    for warning in &resources.warnings {
        println!("{warning}");
    }
    let findings = mesh_node::analyze::analyze(&resources, mesh);
    for finding in &findings {
        println!("{finding}");
    }
    let errors = findings
        .iter()
        .filter(|f| f.severity() == config::Severity::Error)
        .count();
    if findings.is_empty() && resources.warnings.is_empty() {
        eprintln!("no problems found");
    } else {
        eprintln!(
            "{errors} error(s), {} warning(s)",
            findings.len() - errors + resources.warnings.len()
        );
    }
    if errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Creates the pin root inside an existing bpffs (e.g. /sys/fs/bpf/mesh); preflight then
/// reports clearly if it is not on one.
fn prepare_bpffs(bpffs: &std::path::Path) {
    if !bpffs.exists() {
        let _ = std::fs::create_dir_all(bpffs);
    }
}

/// Where the resources come from.
enum Source {
    /// A file, re-read when it changes (its version when first read).
    File(PathBuf, Option<reload::Version>),
    /// The Kubernetes API server.
    Kube(Arc<kube_source::Store>),
}

fn run(args: RunArgs) -> ExitCode {
    // Before any other thread: what start-up memory may be released later (sys).
    sys::note_startup_mappings();
    init_logging(&args.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("mesh-worker")
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let (source, resources) = match &args.config {
        Some(path) => {
            let version = reload::version(path);
            match config::load_file(path) {
                Ok(resources) => (Source::File(path.clone(), version), resources),
                Err(err) => {
                    eprintln!("{}", err.render());
                    return ExitCode::from(EXIT_CONFIG);
                }
            }
        }
        None => match runtime.block_on(kube_source::start(args.kubeconfig.as_deref())) {
            Ok((store, resources)) => (Source::Kube(store), resources),
            Err(err) => {
                eprintln!("kube: {err:#}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    for warning in &resources.warnings {
        tracing::warn!("{warning}");
    }
    prepare_bpffs(&args.node.bpffs);
    if let Err(err) = preflight::check(&args.node.bpffs) {
        eprintln!("{err}");
        return ExitCode::from(EXIT_PREFLIGHT);
    }
    // The forward guard sees bridged frames only through br_netfilter.
    let br_nf = std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables");
    if br_nf.map(|v| v.trim() != "1").unwrap_or(true) {
        tracing::warn!(
            "br_netfilter is off (net.bridge.bridge-nf-call-iptables != 1): the forward guard \
             cannot refuse SYNs that bypass capture on links without the program"
        );
    }
    match sys::raise_nofile_limit() {
        Ok(limit) => tracing::debug!(limit, "open-file limit raised"),
        Err(err) => tracing::warn!("cannot raise the open-file limit: {err}"),
    }
    enable_time_wait_reuse();
    let ca = match &args.ca_dir {
        Some(dir) => identity::Ca::load(dir),
        None => identity::Ca::load_or_create(&args.state_dir.join("ca")),
    };
    let ca = match ca {
        Ok(ca) => ca,
        Err(err) => {
            eprintln!("mesh CA: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let state = State::build(&resources, &args.node.node, &args.mesh.mesh(), 1);
    let served = runtime.block_on(serve(args, state, ca, source));
    // Connections still finishing log their last lines; then the buffer is written out.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    telemetry::flush_access_log();
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("mesh-node: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Connection churn leaves the proxy's outgoing sockets in TIME_WAIT; reusing them for new
/// outgoing connections (safe with TCP timestamps) keeps ports from running out. The sysctl
/// is per network namespace: mesh-node owns it in the node's.
fn enable_time_wait_reuse() {
    const PATH: &str = "/proc/sys/net/ipv4/tcp_tw_reuse";
    match std::fs::read_to_string(PATH) {
        Ok(value) if value.trim() == "1" => {}
        Ok(_) => match std::fs::write(PATH, "1") {
            Ok(()) => tracing::info!("enabled net.ipv4.tcp_tw_reuse"),
            Err(err) => tracing::warn!("cannot enable net.ipv4.tcp_tw_reuse: {err}"),
        },
        Err(err) => tracing::warn!("cannot read net.ipv4.tcp_tw_reuse: {err}"),
    }
}

async fn serve(
    args: RunArgs,
    state: State,
    ca: identity::Ca,
    source: Source,
) -> anyhow::Result<()> {
    let node = args.node.node.clone();
    tracing::info!(
        node = %node,
        config = %args.config.as_ref().map_or("the Kubernetes API".into(), |p| p.display().to_string()),
        bpffs = %capture::pin_dir(&args.node.bpffs, &node).display(),
        admin = %args.admin_addr,
        "starting"
    );
    let log_captures = tracing::enabled!(target: "mesh_ebpf", tracing::Level::DEBUG);
    // Subscribe to link events before the first scan, so no link appears unseen.
    let link_events = sys::LinkEvents::open().context("opening the netlink link-event socket")?;
    let settings = capture::Settings {
        log_captures,
        bypass: args.socket_bypass,
        host_traffic: args.host_traffic,
        kubelet_cgroups: args.kubelet_cgroups.clone(),
        udp_dns_only: args.udp_to_enrolled == UdpToEnrolled::DnsOnly,
        gate_file: Some(args.state_dir.join("cni/gated.json")),
    };
    std::fs::create_dir_all(args.state_dir.join("cni"))
        .with_context(|| format!("creating {}", args.state_dir.join("cni").display()))?;
    tracing::info!(
        host_traffic = ?settings.host_traffic,
        udp_to_enrolled = ?args.udp_to_enrolled,
        "datapath settings"
    );
    let (mut datapath, counters) = Datapath::install(&args.node.bpffs, &node, &settings)
        .context("installing the capture datapath")?;
    if log_captures {
        spawn_kernel_log(&mut datapath);
    }
    let replies = Arc::new(
        capture::ReplySteering::open(&args.node.bpffs, &node)
            .context("opening the flow map for the proxy")?,
    );

    let outbound =
        transport::bind_listener(PORT_OUTBOUND).context("binding the outbound listener")?;
    let inbound = transport::bind_listener(PORT_INBOUND).context("binding the inbound listener")?;
    let hbone = transport::bind_listener(PORT_HBONE).context("binding the HBONE listener")?;
    datapath.register_listener(Listener::Outbound, &outbound)?;
    datapath.register_listener(Listener::Inbound, &inbound)?;
    datapath.register_listener(Listener::Hbone, &hbone)?;
    let node_addresses = Arc::new(ArcSwap::from_pointee(datapath.node_addresses().clone()));
    tracing::info!(links = datapath.attached_links().len(), "capture installed");

    let mut registry = Registry::default();
    let proxy_metrics = ProxyMetrics::register(&mut registry);
    let config_metrics = ConfigMetrics::register(&mut registry);
    let series_cap = telemetry::SeriesCap::register(&mut registry);
    let tcp_metrics = TcpMetrics::register(&mut registry, series_cap.clone());
    let limited = mesh_node::http::server::ServerMetrics::register(&mut registry);
    let gate_metrics = cni::GateMetrics::register(&mut registry);
    let request_metrics = telemetry::RequestMetrics::register(&mut registry, series_cap);
    let l7 = Arc::new(mesh_node::http::L7::new(
        &mut registry,
        request_metrics,
        &limited,
    ));
    telemetry::start_access_log(&mut registry).context("starting the access-log writer")?;
    let certs = Arc::new(identity::Certificates::new(
        ca,
        &node,
        &args.mesh.trust_domain,
        args.cert_lifetime,
        identity::CertMetrics::register(&mut registry),
    ));
    certs.sync(&state.local_identities());
    KernelCollector::register(&mut registry, counters);

    let (events, receiver) = mpsc::channel();
    let datapath_events = events.clone();
    let publisher = reload::Publisher::first(
        state,
        config_metrics,
        &mut registry,
        Box::new(move |state| datapath_events.send(Event::Config(state)).is_ok()),
    );
    let (state, revocations) = (publisher.state.clone(), publisher.revocations.clone());
    let connections = Arc::new(Connections::default());
    let admin = Arc::new(Admin {
        ready: false.into(),
        registry,
        connections: connections.clone(),
        state: state.clone(),
        datapath: Mutex::new(DatapathView::default()),
        clusters: l7.clusters.clone(),
        gate: mesh_node::http::server::Gate::new(
            "admin",
            mesh_node::http::server::Limits::ADMIN,
            limited,
        ),
        debug_address: args.debug_address,
    });
    let admin_listener = admin::bind(args.admin_addr)
        .await
        .with_context(|| format!("binding the admin endpoint {}", args.admin_addr))?;

    // The first generation goes to the kernel through the datapath thread like every other
    // (the publisher sent it); nothing is served before it is there.
    let first = spawn_datapath_thread(datapath, receiver, admin.clone(), node_addresses.clone())?;
    first
        .await
        .context("the datapath thread ended")?
        .map_err(|err| anyhow::anyhow!("applying config generation 1 to the kernel: {err}"))?;
    spawn_link_watcher(link_events, events.clone())?;
    // The pod-start gate: the enrolment cache first (the plugin's answer while mesh-node is
    // away), then the socket; the plugin is installed once both are there.
    let cache = mesh_cni::cache_path(&args.state_dir);
    let enrolment = state.load().enrolment.clone();
    enrolment
        .store(&cache)
        .with_context(|| format!("writing the enrolment cache {}", cache.display()))?;
    tokio::spawn(cni::keep_cache(state.clone(), cache, enrolment));
    let gate = cni::bind(&args.state_dir).with_context(|| {
        format!(
            "binding the CNI gate socket {}",
            mesh_cni::socket_path(&args.state_dir).display()
        )
    })?;
    tokio::spawn(cni::serve(
        gate,
        state.clone(),
        events.clone(),
        gate_metrics.clone(),
    ));
    if let (Some(conf_dir), Some(bin_dir)) = (&args.node.cni_conf_dir, &args.node.cni_bin_dir) {
        let plugin = match &args.cni_plugin {
            Some(path) => path.clone(),
            None => std::env::current_exe()
                .context("locating the mesh-cni plugin next to mesh-node")?
                .with_file_name(cni::PLUGIN),
        };
        tokio::spawn(cni::keep_installed(cni::Install {
            conf_dir: conf_dir.clone(),
            bin_dir: bin_dir.clone(),
            plugin,
            state_dir: args.state_dir.clone(),
        }));
    }
    tokio::spawn(cni::repair(
        admin.clone(),
        state.clone(),
        args.repair,
        args.repair_interval,
        gate_metrics,
    ));
    match source {
        Source::File(path, version) => tokio::spawn(reload::watch(
            version,
            path,
            node,
            args.mesh.mesh(),
            publisher,
        )),
        Source::Kube(store) => tokio::spawn(kube_source::reconcile(
            store,
            node,
            args.mesh.mesh(),
            publisher,
        )),
    };

    let pool = transport::Pool::default();
    pool.spawn_reaper(certs.clone(), transport::pool::IDLE_TIMEOUT);
    tokio::spawn(keep_certificates(certs.clone(), state.clone()));
    l7.clusters.spawn_reaper(state.clone());
    let ctx = Arc::new(ProxyContext {
        l7,
        state,
        connections,
        metrics: proxy_metrics,
        tcp: tcp_metrics,
        certs,
        pool,
        node_addresses,
        sockets: Arc::new(transport::Kernel { replies }),
        revocations,
    });
    tokio::spawn(proxy::serve(outbound, Direction::Outbound, ctx.clone()));
    tokio::spawn(proxy::serve(inbound, Direction::Inbound, ctx.clone()));
    tokio::spawn(proxy::serve(hbone, Direction::Hbone, ctx));
    tokio::spawn(admin::serve(admin_listener, admin.clone()));
    admin.ready.store(true, Ordering::Release);
    match sys::release_startup_memory() {
        Ok(bytes) => tracing::info!(file_pages_unmapped_kib = bytes / 1024, "ready"),
        Err(err) => tracing::info!("ready (start-up memory not released: {err})"),
    }

    wait_for_shutdown().await?;
    tracing::info!(
        "stopping; the capture programs stay attached, so enrolled pods' new connections are \
         refused until mesh-node starts again (run `mesh-node uninstall` to remove them)"
    );
    Ok(())
}

/// Every second: certificates for exactly the identities of this node's enrolled pods,
/// renewed at half their lifetime.
async fn keep_certificates(certs: Arc<identity::Certificates>, state: Arc<ArcSwap<State>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        certs.sync(&state.load().local_identities());
    }
}

async fn wait_for_shutdown() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    Ok(())
}

/// The datapath has one owner: this thread applies link changes and config snapshots to the
/// kernel (attachments, maps) in order, off the async workers, the first snapshot included
/// (`reload::Publisher::first` sends it before this starts); the answer resolves once that
/// one was applied, or failed.
fn spawn_datapath_thread(
    mut datapath: Datapath,
    events: mpsc::Receiver<Event>,
    admin: Arc<Admin>,
    node_addresses: Arc<ArcSwap<std::collections::BTreeSet<std::net::Ipv4Addr>>>,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<Result<(), String>>> {
    let (first_done, first_applied) = tokio::sync::oneshot::channel();
    let publish = move |datapath: &Datapath, generation: Option<u64>, error: Option<String>| {
        if **node_addresses.load() != *datapath.node_addresses() {
            node_addresses.store(Arc::new(datapath.node_addresses().clone()));
        }
        if let Ok(mut view) = admin.datapath.lock() {
            view.links = datapath
                .attached_links()
                .iter()
                .map(|(i, n)| (*i, n.clone()))
                .collect();
            view.enrolled = datapath.enrolled().into_iter().collect();
            view.pod_interfaces = datapath.pod_interfaces();
            view.failed_links = datapath.failed_links().clone();
            view.gated = datapath.gated();
            if let Some(generation) = generation {
                view.generation = generation;
            }
            view.error = error;
        }
    };
    publish(&datapath, None, None);
    std::thread::Builder::new()
        .name("datapath".into())
        .spawn(move || {
            // Work that failed (a link sync, a config apply) is retried every second, whatever
            // else arrives meanwhile.
            let mut links_pending = false;
            let mut config_pending: Option<Arc<State>> = None;
            // Answered once the first generation (the first event) was applied or failed.
            let mut first_done = Some(first_done);
            let mut pods_pending: Vec<PodRequest> = Vec::new();
            let mut retry_at: Option<std::time::Instant> = None;
            // What changes without an event (the kubelet's cgroups) is looked at again.
            let mut refresh_at = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                let wake = retry_at.map_or(refresh_at, |at| at.min(refresh_at));
                let event =
                    events.recv_timeout(wake.saturating_duration_since(std::time::Instant::now()));
                match event {
                    Ok(Event::LinksChanged) => links_pending = true,
                    Ok(Event::Config(state)) => config_pending = Some(state),
                    Ok(Event::Pod(request)) => pods_pending.push(request),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
                // Coalesce bursts (a pod creation is several link events), for at most 200 ms;
                // a pod waiting at the CNI gate, or the start waiting for the first
                // generation, is not kept waiting.
                let deadline = std::time::Instant::now() + Duration::from_millis(200);
                while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
                    if !pods_pending.is_empty() || first_done.is_some() {
                        break;
                    }
                    match events.recv_timeout(left.min(Duration::from_millis(20))) {
                        Ok(Event::LinksChanged) => links_pending = true,
                        Ok(Event::Config(state)) => config_pending = Some(state),
                        Ok(Event::Pod(request)) => pods_pending.push(request),
                        Err(_) => break,
                    }
                }
                if retry_at.is_some_and(|at| std::time::Instant::now() >= at) {
                    links_pending |= !datapath.failed_links().is_empty();
                }
                let mut error = None;
                if std::time::Instant::now() >= refresh_at {
                    refresh_at = std::time::Instant::now() + Duration::from_secs(5);
                    if let Err(err) = datapath.refresh() {
                        tracing::error!("datapath refresh failed (will retry): {err}");
                        error = Some(format!("refresh: {err}"));
                    }
                }
                if links_pending {
                    match datapath.sync_links() {
                        Ok(()) => links_pending = !datapath.failed_links().is_empty(),
                        Err(err) => {
                            tracing::error!("link sync failed (will retry): {err}");
                            error = Some(format!("link sync: {err}"));
                        }
                    }
                }
                let mut applied = None;
                if let Some(state) = config_pending.take() {
                    let result = datapath.apply_config(&state);
                    match &result {
                        Ok(()) => {
                            tracing::info!(
                                generation = state.generation,
                                enrolled = state.local_enrolled().len(),
                                "enrolled pods updated"
                            );
                            applied = Some(state.generation);
                        }
                        Err(err) => {
                            tracing::error!("updating enrolled pods failed (will retry): {err}");
                            error = Some(format!("config generation {}: {err}", state.generation));
                            config_pending = Some(state);
                        }
                    }
                    if let Some(done) = first_done.take() {
                        let _ = done.send(result.map_err(|err| err.to_string()));
                    }
                }
                // After the config: a pod the new config already knows is decided on it.
                for request in pods_pending.drain(..) {
                    let done = match request.command {
                        mesh_cni::Command::Add => datapath.admit(&request.pod).map(drop),
                        mesh_cni::Command::Del => datapath.release(&request.pod),
                        mesh_cni::Command::Check => datapath.check(&request.pod),
                    };
                    let _ = request.reply.send(done);
                }
                retry_at = (links_pending || config_pending.is_some())
                    .then(|| std::time::Instant::now() + Duration::from_secs(1));
                publish(&datapath, applied, error);
            }
        })?;
    Ok(first_applied)
}

fn spawn_link_watcher(socket: sys::LinkEvents, events: mpsc::Sender<Event>) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("netlink".into())
        .spawn(move || loop {
            if let Err(err) = socket.wait() {
                tracing::error!("netlink link events: {err}");
                std::thread::sleep(Duration::from_secs(1));
            }
            if events.send(Event::LinksChanged).is_err() {
                return;
            }
        })?;
    Ok(())
}

/// Forwards the kernel programs' log records (aya-log) to tracing, on a thread of its own.
fn spawn_kernel_log(datapath: &mut Datapath) {
    let mut logger = match aya_log::EbpfLogger::init(datapath.ebpf_mut()) {
        Ok(logger) => logger,
        Err(err) => {
            tracing::warn!("kernel log forwarding unavailable: {err}");
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("kernel-log".into())
        .spawn(move || {
            while sys::wait_readable(&logger).is_ok() {
                logger.flush();
            }
        });
    if let Err(err) = spawned {
        tracing::warn!("kernel log forwarding unavailable: {err}");
    }
}
