//! The threads that own the kernel side: the datapath worker (the one writer of
//! attachments and maps), the netlink link watcher that feeds it, and the forwarder of the
//! kernel programs' log records.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    sync::{mpsc, Arc},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;

use crate::{
    admin::Admin,
    capture::{Datapath, Event, PodRequest},
    state::State,
    sys,
};

/// The datapath has one owner: this thread applies link changes and config snapshots to the
/// kernel (attachments, maps) in order, off the async workers, the first snapshot included
/// (`reload::Publisher::first` sends it before this starts); the answer resolves once that
/// one was applied, or failed.
pub(super) fn spawn_datapath_thread(
    mut datapath: Datapath,
    events: mpsc::Receiver<Event>,
    admin: Arc<Admin>,
    node_addresses: Arc<ArcSwap<BTreeSet<Ipv4Addr>>>,
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
            let mut retry_at: Option<Instant> = None;
            // What changes without an event (the kubelet's cgroups) is looked at again.
            let mut refresh_at = Instant::now() + Duration::from_secs(5);
            loop {
                let wake = retry_at.map_or(refresh_at, |at| at.min(refresh_at));
                let event = events.recv_timeout(wake.saturating_duration_since(Instant::now()));
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
                let deadline = Instant::now() + Duration::from_millis(200);
                while let Some(left) = deadline.checked_duration_since(Instant::now()) {
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
                if retry_at.is_some_and(|at| Instant::now() >= at) {
                    links_pending |= !datapath.failed_links().is_empty();
                }
                let mut error = None;
                if Instant::now() >= refresh_at {
                    refresh_at = Instant::now() + Duration::from_secs(5);
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
                    .then(|| Instant::now() + Duration::from_secs(1));
                publish(&datapath, applied, error);
            }
        })?;
    Ok(first_applied)
}

pub(super) fn spawn_link_watcher(
    socket: sys::LinkEvents,
    events: mpsc::Sender<Event>,
) -> anyhow::Result<()> {
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
pub(super) fn spawn_kernel_log(datapath: &mut Datapath) {
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
