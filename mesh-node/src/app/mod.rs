//! `mesh-node run`: the wiring of the node proxy. [`run`] reads the first config, checks
//! privileges and loads the CA; `serve` installs the datapath, binds the listeners, starts
//! the publisher, the CNI gate, the config source and the proxies, and waits for a signal.
//! [`datapath`] holds the threads that own the kernel side.

mod datapath;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{atomic::Ordering, mpsc, Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use arc_swap::ArcSwap;
use mesh_common::{Listener, PORT_HBONE, PORT_INBOUND, PORT_OUTBOUND};
use prometheus_client::registry::Registry;

use crate::{
    admin::{self, Admin, DatapathView},
    capture::{self, Datapath, Event, UdpToEnrolled},
    cni, config,
    connections::{Connections, Direction},
    http::{self, ProxyContext},
    identity, kube_source,
    metrics::{ConfigMetrics, KernelCollector, ProxyMetrics},
    preflight, proxy, reload,
    settings::{self, Settings, EXIT_CONFIG, EXIT_PREFLIGHT},
    state::State,
    sys,
    telemetry::{self, TcpMetrics},
    transport,
};
use crate::{drain::Drain, handover};
use datapath::{spawn_datapath_thread, spawn_kernel_log, spawn_link_watcher};

/// Logs to standard error with `filter` (already checked; `info` if it were not).
pub fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Creates the pin root inside an existing bpffs (e.g. /sys/fs/bpf/mesh); preflight then
/// reports clearly if it is not on one.
pub fn prepare_bpffs(bpffs: &Path) {
    if !bpffs.exists() {
        let _ = std::fs::create_dir_all(bpffs);
    }
}

/// Where the resources come from, once first read.
enum Source {
    /// A file, re-read when it changes (its version when first read).
    File(PathBuf, Option<reload::Version>),
    /// The Kubernetes API server.
    Kube(Arc<kube_source::Store>),
}

/// `mesh-node run`: reads the first config and the CA, checks privileges, then serves until
/// SIGTERM or SIGINT.
pub fn run(settings: Settings) -> ExitCode {
    // Before any other thread: what start-up memory may be released later (sys).
    sys::note_startup_mappings();
    init_logging(&settings.log);
    tracing::info!(%settings, "starting");
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
    let (source, resources) = match &settings.source {
        settings::Source::File(path) => {
            let version = reload::version(path);
            match config::load_file(path) {
                Ok(resources) => (Source::File(path.clone(), version), resources),
                Err(err) => {
                    eprintln!("{}", err.render());
                    return ExitCode::from(EXIT_CONFIG);
                }
            }
        }
        settings::Source::Kube { kubeconfig } => {
            match runtime.block_on(kube_source::start(kubeconfig.as_deref())) {
                Ok((store, resources)) => (Source::Kube(store), resources),
                Err(err) => {
                    eprintln!("kube: {err:#}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            }
        }
    };
    for warning in &resources.warnings {
        tracing::warn!("{warning}");
    }
    prepare_bpffs(&settings.node.bpffs);
    if let Err(err) = preflight::check(&settings.node.bpffs) {
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
    let mut registry = Registry::default();
    let bundle = match identity::bundle::BundleFile::open(
        &settings.signer.trust_bundle,
        identity::bundle::BundleMetric::register(&mut registry),
    ) {
        Ok(bundle) => bundle,
        Err(err) => {
            eprintln!("trust bundle: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let state = State::build(&resources, &settings.node.name, &settings.mesh, 1);
    let served = runtime.block_on(serve(settings, state, bundle, registry, source));
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
    settings: Settings,
    state: State,
    bundle: identity::bundle::BundleFile,
    mut registry: Registry,
    source: Source,
) -> anyhow::Result<()> {
    let node = settings.node.name.clone();
    let log_captures = tracing::enabled!(target: "mesh_ebpf", tracing::Level::DEBUG);
    // Subscribe to link events before the first scan, so no link appears unseen.
    let link_events = sys::LinkEvents::open().context("opening the netlink link-event socket")?;
    std::fs::create_dir_all(settings.state_dir.join("cni"))
        .with_context(|| format!("creating {}", settings.state_dir.join("cni").display()))?;

    let proxy_metrics = ProxyMetrics::register(&mut registry);
    let config_metrics = ConfigMetrics::register(&mut registry);
    let series_cap = telemetry::SeriesCap::register(&mut registry);
    let tcp_metrics = TcpMetrics::register(&mut registry, series_cap.clone());
    let limited = http::server::ServerMetrics::register(&mut registry);
    let gate_metrics = cni::GateMetrics::register(&mut registry);
    let request_metrics = telemetry::RequestMetrics::register(&mut registry, series_cap);
    let upgrade_metrics = UpgradeMetrics::register(&mut registry);
    let tracer = crate::trace::Tracer::start(&settings.tracing, &mut registry)
        .context("starting the trace-export thread")?;
    let l7 = Arc::new(http::L7::new(
        &mut registry,
        request_metrics,
        &limited,
        tracer,
    ));
    telemetry::start_access_log(&mut registry).context("starting the access-log writer")?;
    // Certificates for every local identity before the node is taken (from a predecessor,
    // which keeps serving meanwhile).
    let signer = identity::client::SignerClient {
        address: settings.signer.address.clone(),
        identity: settings.signer.identity.clone(),
        token_file: settings.signer.token_file.clone(),
        bundle: bundle.shared(),
    };
    let certs = Arc::new(identity::Certificates::new(
        signer,
        &node,
        &settings.mesh.trust_domain,
        settings.cert_lifetime,
        identity::CertMetrics::register(&mut registry),
    ));
    // Bounded: a signer that does not answer must not keep the node unserved (what is
    // missing is retried in the background).
    let wanted = state.local_identities();
    let obtained = tokio::time::timeout(FIRST_CERTIFICATES, certs.sync(&wanted))
        .await
        .unwrap_or(0);
    if obtained < wanted.len() {
        tracing::warn!(
            obtained,
            wanted = wanted.len(),
            signer = settings.signer.address,
            "starting without a certificate for every local identity: retrying in the \
             background (connections needing the missing ones fail until then)"
        );
    }

    let start = handover::take_node(
        &settings.state_dir,
        || capture::try_lock_node(&settings.node.bpffs, &node),
        TAKEOVER_PATIENCE,
    )
    .await
    .context("taking the node")?;
    let (lock, listeners, inherited) = match start {
        handover::Start::Fresh(lock) => (lock, bind_listeners(&settings)?, None),
        handover::Start::Successor(inherited) => {
            tracing::info!(
                pid = inherited.pid,
                cgroup = inherited.cgroup,
                own_cgroup = sys::own_cgroup_id().unwrap_or(0),
                "taking the node over from its mesh-node"
            );
            let lock = inherited.lock.try_clone()?;
            let listeners = inherited.listeners.try_clone()?;
            (lock, listeners, Some(inherited))
        }
    };
    let offer = handover::Offer {
        lock: lock.try_clone()?,
        listeners: listeners.try_clone()?,
    };
    let capture = capture::Settings {
        log_captures,
        bypass: settings.socket_bypass,
        host_traffic: settings.host_traffic,
        kubelet_cgroups: settings.kubelet_cgroups.clone(),
        udp_dns_only: settings.udp_to_enrolled == UdpToEnrolled::DnsOnly,
        gate_file: Some(settings.state_dir.join("cni/gated.json")),
        predecessor_cgroup: inherited.as_ref().map_or(0, |i| i.cgroup),
    };
    let (mut datapath, counters) = Datapath::install(&settings.node.bpffs, &node, &capture, lock)
        .context("installing the capture datapath")?;
    if log_captures {
        spawn_kernel_log(&mut datapath);
    }
    let replies = Arc::new(
        capture::ReplySteering::open(&settings.node.bpffs, &node)
            .context("opening the flow map for the proxy")?,
    );
    datapath.register_listener(Listener::Outbound, &listeners.outbound)?;
    datapath.register_listener(Listener::Inbound, &listeners.inbound)?;
    datapath.register_listener(Listener::Hbone, &listeners.hbone)?;
    let node_addresses = Arc::new(ArcSwap::from_pointee(datapath.node_addresses().clone()));
    tracing::info!(links = datapath.attached_links().len(), "capture installed");
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
    let drain = Drain::default();
    let admin = Arc::new(Admin {
        ready: false.into(),
        registry,
        connections: connections.clone(),
        state: state.clone(),
        datapath: Mutex::new(DatapathView::default()),
        clusters: l7.clusters.clone(),
        gate: http::server::Gate::new("admin", http::server::Limits::ADMIN, limited),
        debug_address: settings.debug_address,
        drain: drain.clone(),
        certs: certs.clone(),
    });

    if let Some(path) = &settings.probe_socket {
        let probes = admin::bind_probes(path)
            .with_context(|| format!("binding the probe socket {}", path.display()))?;
        tokio::spawn(admin::serve_probes(probes, admin.clone()));
    }

    // The first generation goes to the kernel through the datapath thread like every other
    // (the publisher sent it); nothing is served before it is there.
    let first = spawn_datapath_thread(datapath, receiver, admin.clone(), node_addresses.clone())?;
    first
        .await
        .context("the datapath thread ended")?
        .map_err(|err| anyhow::anyhow!("applying config generation 1 to the kernel: {err}"))?;
    spawn_link_watcher(link_events, events.clone())?;
    // What only the active process does (it writes files and kernel state), stopped when a
    // successor takes over.
    let mut writers = Vec::new();
    // The pod-start gate: the enrolment cache first (the plugin's answer while mesh-node is
    // away), then the socket; the plugin is installed once both are there.
    let cache = mesh_cni::cache_path(&settings.state_dir);
    let enrolment = state.load().enrolment.clone();
    enrolment
        .store(&cache)
        .with_context(|| format!("writing the enrolment cache {}", cache.display()))?;
    writers.push(tokio::spawn(cni::keep_cache(
        state.clone(),
        cache,
        enrolment,
    )));
    let gate = cni::bind(&settings.state_dir).with_context(|| {
        format!(
            "binding the CNI gate socket {}",
            mesh_cni::socket_path(&settings.state_dir).display()
        )
    })?;
    writers.push(tokio::spawn(cni::serve(
        gate,
        state.clone(),
        events.clone(),
        gate_metrics.clone(),
    )));
    if let Some(install) = settings.cni.clone() {
        writers.push(tokio::spawn(cni::keep_installed(install)));
    }
    writers.push(tokio::spawn(cni::repair(
        admin.clone(),
        state.clone(),
        settings.repair,
        settings.repair_interval,
        gate_metrics,
    )));
    // The config keeps being followed while draining: a policy change still revokes the
    // connections this process relays.
    match source {
        Source::File(path, version) => tokio::spawn(reload::watch(
            version,
            path,
            node,
            settings.mesh.clone(),
            publisher,
        )),
        Source::Kube(store) => tokio::spawn(kube_source::reconcile(
            store,
            node,
            settings.mesh.clone(),
            publisher,
        )),
    };

    let pool = transport::Pool::default();
    pool.spawn_reaper(certs.clone(), transport::pool::IDLE_TIMEOUT);
    tokio::spawn(keep_certificates(certs.clone(), state.clone(), bundle));
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
        drain: drain.clone(),
    });
    let handover::Listeners {
        outbound,
        inbound,
        hbone,
        admin: admin_listener,
    } = listeners;
    tokio::spawn(proxy::serve(outbound, Direction::Outbound, ctx.clone()));
    tokio::spawn(proxy::serve(inbound, Direction::Inbound, ctx.clone()));
    tokio::spawn(proxy::serve(hbone, Direction::Hbone, ctx.clone()));
    tokio::spawn(admin::serve(admin_listener, admin.clone()));
    admin.ready.store(true, Ordering::Release);
    // The predecessor, if any, stops accepting once told; until it exits no successor of
    // this process is let in.
    let predecessor = Arc::new(Mutex::new(None::<u32>));
    if let Some(inherited) = inherited {
        *predecessor.lock().unwrap_or_else(|e| e.into_inner()) = Some(inherited.pid);
        let closed = upgrade_metrics.predecessor_closed.clone();
        let gone = predecessor.clone();
        let adopting = ctx.clone();
        inherited
            .serving(
                move |relay| {
                    let ctx = adopting.clone();
                    let live = ctx.drain.track();
                    tokio::spawn(proxy::forward::adopt(ctx, relay, live));
                },
                move |n| {
                    closed.inc_by(n);
                },
                move || *gone.lock().unwrap_or_else(|e| e.into_inner()) = None,
            )
            .await;
    }
    let control = handover::Control::bind(&settings.state_dir).with_context(|| {
        format!(
            "binding the handover socket {}",
            handover::socket_path(&settings.state_dir).display()
        )
    })?;
    match sys::release_startup_memory() {
        Ok(bytes) => tracing::info!(file_pages_unmapped_kib = bytes / 1024, "ready"),
        Err(err) => tracing::info!("ready (start-up memory not released: {err})"),
    }

    let writer = DatapathWriter(Mutex::new(events));
    let busy = || {
        predecessor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|pid| format!("its predecessor (pid {pid}) is still draining"))
    };
    let taken = tokio::select! {
        taken = control.serve(&offer, &writer, busy) => taken,
        signal = wait_for_shutdown() => {
            signal?;
            tracing::info!(
                "stopping; the capture programs stay attached, so enrolled pods' new \
                 connections are refused until mesh-node starts again (run `mesh-node \
                 uninstall` to remove them)"
            );
            return Ok(());
        }
    };
    drop((offer, control));
    for task in writers {
        task.abort();
    }
    // With the socket bypass, whose maps are this process's, nothing is handed over.
    drain_after(
        taken,
        &drain,
        &ctx.revocations,
        !settings.socket_bypass,
        settings.drain_timeout,
    )
    .await;
    Ok(())
}

/// After the takeover: hands the plain relays (no TLS state) to the successor with their
/// sockets when `hand_off`, drains the rest until the last connection ends or `timeout`, and
/// tells the successor what had to be closed.
async fn drain_after(
    mut taken: handover::TakenOver,
    drain: &Drain,
    revocations: &crate::gate::Revocations,
    hand_off: bool,
    timeout: Duration,
) {
    let (handoffs, mut handed) = tokio::sync::mpsc::unbounded_channel();
    if hand_off {
        drain.start_handing_off(handoffs);
    } else {
        drain.start();
    }
    let mut moved = 0u64;
    let mut count = |handed: Result<(), handover::Error>| match handed {
        Ok(()) => moved += 1,
        Err(err) => tracing::warn!("a relay could not be handed over: {err}"),
    };
    let drained = drain_until_done(drain, revocations, timeout);
    tokio::pin!(drained);
    let closed = loop {
        tokio::select! {
            closed = &mut drained => break closed,
            Some(relay) = handed.recv() => count(taken.hand_off(relay).await),
        }
    };
    // Relays that paused just before the last connection ended are still queued.
    handed.close();
    while let Ok(relay) = handed.try_recv() {
        count(taken.hand_off(relay).await);
    }
    tracing::info!(handed_over = moved, closed, "drain over");
    taken.drained(closed).await;
}

/// How long a successor waits for a running mesh-node to let it take over (one that is
/// starting, or still waiting for its own predecessor to exit).
const TAKEOVER_PATIENCE: Duration = Duration::from_secs(3600);

/// Binds the proxy's listeners and the admin endpoint (a fresh start).
fn bind_listeners(settings: &Settings) -> anyhow::Result<handover::Listeners> {
    Ok(handover::Listeners {
        outbound: transport::bind_listener(PORT_OUTBOUND)
            .context("binding the outbound listener")?,
        inbound: transport::bind_listener(PORT_INBOUND).context("binding the inbound listener")?,
        hbone: transport::bind_listener(PORT_HBONE).context("binding the HBONE listener")?,
        admin: admin::bind(settings.admin_addr)
            .with_context(|| format!("binding the admin endpoint {}", settings.admin_addr))?,
    })
}

/// Drains until the last accepted connection ends or `timeout` passes (then the relays
/// still open are stopped through the revocation registry, which every relay watches, and
/// reset); SIGINT ends it at once. Returns the connections the timeout closed.
async fn drain_until_done(
    drain: &Drain,
    revocations: &crate::gate::Revocations,
    timeout: Duration,
) -> u64 {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).ok();
    let interrupted = async {
        match int.as_mut() {
            Some(int) => drop(int.recv().await),
            None => std::future::pending().await,
        }
    };
    tracing::info!(
        open = drain.live(),
        timeout = ?timeout,
        "draining: open connections go on until they end or the drain timeout"
    );
    tokio::select! {
        () = drain.idle() => {
            tracing::info!("drained: the last connection ended");
            return 0;
        }
        () = tokio::time::sleep(timeout) => {}
        () = interrupted => tracing::info!("SIGINT while draining"),
    }
    tracing::warn!(
        open = drain.live(),
        "drain timeout: closing the connections still open"
    );
    let closed = revocations
        .close_all("closed at the drain timeout (--drain-timeout): a successor took over the node");
    // The relays reset both ends and write their records.
    let _ = tokio::time::timeout(Duration::from_secs(2), drain.idle()).await;
    closed as u64
}

/// The datapath thread, as the handover sees it.
struct DatapathWriter(Mutex<mpsc::Sender<Event>>);

impl DatapathWriter {
    fn send(&self, event: Event) {
        let _ = self.0.lock().unwrap_or_else(|e| e.into_inner()).send(event);
    }
}

impl handover::Writer for DatapathWriter {
    fn pause(&self) -> tokio::sync::oneshot::Receiver<()> {
        let (paused, answer) = tokio::sync::oneshot::channel();
        self.send(Event::Pause(paused));
        answer
    }

    fn resume(&self) {
        self.send(Event::Resume);
    }

    fn hand_over(&self) {
        self.send(Event::HandedOver);
    }
}

/// What the upgrades of this node leave behind.
struct UpgradeMetrics {
    predecessor_closed: prometheus_client::metrics::counter::Counter,
}

impl UpgradeMetrics {
    fn register(registry: &mut Registry) -> UpgradeMetrics {
        let predecessor_closed = prometheus_client::metrics::counter::Counter::default();
        registry.register(
            "mesh_proxy_predecessor_drain_closed",
            "Connections a predecessor closed at its drain timeout after this process took \
             the node over (reported by the predecessor as it exits)",
            predecessor_closed.clone(),
        );
        UpgradeMetrics { predecessor_closed }
    }
}

/// How long start-up waits for the first certificates from the signer.
const FIRST_CERTIFICATES: Duration = Duration::from_secs(10);

/// Every second: the trust bundle re-read if it changed, and certificates for exactly the
/// identities of this node's enrolled pods, renewed at half their lifetime.
async fn keep_certificates(
    certs: Arc<identity::Certificates>,
    state: Arc<ArcSwap<State>>,
    mut bundle: identity::bundle::BundleFile,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        bundle.refresh();
        let wanted = state.load().local_identities();
        certs.sync(&wanted).await;
    }
}

/// Waits for SIGTERM or SIGINT.
pub(crate) async fn wait_for_shutdown() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    Ok(())
}
