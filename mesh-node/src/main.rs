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
use mesh_common::{Listener, PORT_ADMIN, PORT_INBOUND, PORT_OUTBOUND};
use mesh_node::{
    admin::{self, Admin, DatapathView},
    capture::{self, Datapath, Event},
    config,
    metrics::{ConfigMetrics, KernelCollector, ProxyMetrics},
    preflight, proxy,
    proxy::{connections::Connections, Direction, ProxyContext},
    reload,
    state::State,
    sys,
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
    Run(RunArgs),
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
    },
    /// Remove every program, pin, rule and route of a node.
    Uninstall(NodeArgs),
}

#[derive(Args)]
struct NodeArgs {
    /// Name of this node (as in pods' spec.nodeName).
    #[arg(long, env = "MESH_NODE")]
    node: String,
    /// bpffs directory for pins; a per-node subdirectory is used.
    #[arg(long, env = "MESH_BPFFS", default_value = "/sys/fs/bpf/mesh")]
    bpffs: PathBuf,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Multi-document YAML of Kubernetes-shaped resources; re-read when it changes.
    #[arg(long, env = "MESH_CONFIG")]
    config: PathBuf,
    /// Admin endpoint (health, metrics, debug).
    #[arg(long, env = "MESH_ADMIN_ADDR", default_value_t = SocketAddr::from(([0, 0, 0, 0], PORT_ADMIN)))]
    admin_addr: SocketAddr,
    /// Log filter (tracing EnvFilter syntax); `mesh_ebpf=debug` also logs every captured SYN
    /// from the kernel programs.
    #[arg(long, env = "MESH_LOG", default_value = "info")]
    log: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { files } => validate(&files),
        Command::Analyze { files } => analyze(&files),
        Command::Uninstall(args) => {
            init_logging("info");
            prepare_bpffs(&args.bpffs);
            if let Err(err) = preflight::check(&args.bpffs) {
                eprintln!("{err}");
                return ExitCode::from(EXIT_PREFLIGHT);
            }
            match capture::uninstall(&args.bpffs, &args.node) {
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
        Command::Run(args) => run(args),
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

fn analyze(files: &[PathBuf]) -> ExitCode {
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
    let findings = mesh_node::analyze::analyze(&resources);
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

fn run(args: RunArgs) -> ExitCode {
    init_logging(&args.log);
    let config_version = reload::version(&args.config);
    let resources = match config::load_file(&args.config) {
        Ok(resources) => resources,
        Err(err) => {
            eprintln!("{}", err.render());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    for warning in &resources.warnings {
        tracing::warn!("{warning}");
    }
    prepare_bpffs(&args.node.bpffs);
    if let Err(err) = preflight::check(&args.node.bpffs) {
        eprintln!("{err}");
        return ExitCode::from(EXIT_PREFLIGHT);
    }
    // The bridge guard (MESH-BRIDGE) sees bridged frames only through br_netfilter.
    let br_nf = std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables");
    if br_nf.map(|v| v.trim() != "1").unwrap_or(true) {
        tracing::warn!(
            "br_netfilter is off (net.bridge.bridge-nf-call-iptables != 1): the bridge guard \
             cannot refuse SYNs that bypass capture on links without the program"
        );
    }
    match sys::raise_nofile_limit() {
        Ok(limit) => tracing::debug!(limit, "open-file limit raised"),
        Err(err) => tracing::warn!("cannot raise the open-file limit: {err}"),
    }
    let state = State::build(&resources, &args.node.node, 1);
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
    match runtime.block_on(serve(args, state, config_version)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("mesh-node: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(
    args: RunArgs,
    state: State,
    config_version: Option<reload::Version>,
) -> anyhow::Result<()> {
    let node = args.node.node.clone();
    tracing::info!(
        node = %node,
        config = %args.config.display(),
        bpffs = %capture::pin_dir(&args.node.bpffs, &node).display(),
        admin = %args.admin_addr,
        "starting"
    );
    let log_captures = tracing::enabled!(target: "mesh_ebpf", tracing::Level::DEBUG);
    // Subscribe to link events before the first scan, so no link appears unseen.
    let link_events = sys::LinkEvents::open().context("opening the netlink link-event socket")?;
    let (mut datapath, counters) = Datapath::install(&args.node.bpffs, &node, log_captures)
        .context("installing the capture datapath")?;
    if log_captures {
        spawn_kernel_log(&mut datapath);
    }

    let outbound = proxy::bind_listener(PORT_OUTBOUND).context("binding the outbound listener")?;
    let inbound = proxy::bind_listener(PORT_INBOUND).context("binding the inbound listener")?;
    datapath.register_listener(Listener::Outbound, &outbound)?;
    datapath.register_listener(Listener::Inbound, &inbound)?;
    datapath.set_enrolled(&state.local_enrolled())?;
    tracing::info!(
        enrolled = state.local_enrolled().len(),
        links = datapath.attached_links().len(),
        "capture installed"
    );

    let mut registry = Registry::default();
    let proxy_metrics = ProxyMetrics::register(&mut registry);
    let config_metrics = ConfigMetrics::register(&mut registry);
    config_metrics.generation.set(state.generation as i64);
    KernelCollector::register(&mut registry, counters);

    let state = Arc::new(ArcSwap::from_pointee(state));
    let connections = Arc::new(Connections::default());
    let admin = Arc::new(Admin {
        ready: false.into(),
        registry,
        connections: connections.clone(),
        state: state.clone(),
        datapath: Mutex::new(DatapathView::default()),
    });
    let admin_listener = admin::bind(args.admin_addr)
        .await
        .with_context(|| format!("binding the admin endpoint {}", args.admin_addr))?;

    let (events, receiver) = mpsc::channel();
    spawn_datapath_thread(datapath, receiver, admin.clone())?;
    spawn_link_watcher(link_events, events.clone())?;
    tokio::spawn(reload::watch(
        config_version,
        args.config.clone(),
        node,
        state.clone(),
        config_metrics,
        events,
    ));

    let ctx = Arc::new(ProxyContext {
        state,
        connections,
        metrics: proxy_metrics,
    });
    tokio::spawn(proxy::serve(outbound, Direction::Outbound, ctx.clone()));
    tokio::spawn(proxy::serve(inbound, Direction::Inbound, ctx));
    tokio::spawn(admin::serve(admin_listener, admin.clone()));
    admin.ready.store(true, Ordering::Release);
    tracing::info!("ready");

    wait_for_shutdown().await?;
    tracing::info!(
        "stopping; the capture programs stay attached, so enrolled pods' new connections are \
         refused until mesh-node starts again (run `mesh-node uninstall` to remove them)"
    );
    Ok(())
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
/// kernel (attachments, maps) in order, off the async workers.
fn spawn_datapath_thread(
    mut datapath: Datapath,
    events: mpsc::Receiver<Event>,
    admin: Arc<Admin>,
) -> anyhow::Result<()> {
    let initial = admin.state.load().generation;
    let publish = move |datapath: &Datapath, generation: Option<u64>, error: Option<String>| {
        if let Ok(mut view) = admin.datapath.lock() {
            view.links = datapath
                .attached_links()
                .iter()
                .map(|(i, n)| (*i, n.clone()))
                .collect();
            view.enrolled = datapath.enrolled().into_iter().collect();
            view.failed_links = datapath.failed_links().clone();
            if let Some(generation) = generation {
                view.generation = generation;
            }
            view.error = error;
        }
    };
    publish(&datapath, Some(initial), None);
    std::thread::Builder::new()
        .name("datapath".into())
        .spawn(move || {
            // Work that failed (a link sync, a config apply) is retried every second, whatever
            // else arrives meanwhile.
            let mut links_pending = false;
            let mut config_pending: Option<Arc<State>> = None;
            let mut retry_at: Option<std::time::Instant> = None;
            loop {
                let event = match retry_at {
                    None => events
                        .recv()
                        .map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                    Some(at) => {
                        events.recv_timeout(at.saturating_duration_since(std::time::Instant::now()))
                    }
                };
                match event {
                    Ok(Event::LinksChanged) => links_pending = true,
                    Ok(Event::Config(state)) => config_pending = Some(state),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
                // Coalesce bursts (a pod creation is several link events), for at most 200 ms.
                let deadline = std::time::Instant::now() + Duration::from_millis(200);
                while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
                    match events.recv_timeout(left.min(Duration::from_millis(20))) {
                        Ok(Event::LinksChanged) => links_pending = true,
                        Ok(Event::Config(state)) => config_pending = Some(state),
                        Err(_) => break,
                    }
                }
                if retry_at.is_some_and(|at| std::time::Instant::now() >= at) {
                    links_pending |= !datapath.failed_links().is_empty();
                }
                let mut error = None;
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
                    match datapath.set_enrolled(&state.local_enrolled()) {
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
                }
                retry_at = (links_pending || config_pending.is_some())
                    .then(|| std::time::Instant::now() + Duration::from_secs(1));
                publish(&datapath, applied, error);
            }
        })?;
    Ok(())
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
