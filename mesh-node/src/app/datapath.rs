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
            let mut pending = Pending::default();
            // Answered once the first generation (the first event) was applied or failed.
            let mut first_done = Some(first_done);
            let mut retry_at: Option<Instant> = None;
            // What changes without an event (the kubelet's cgroups) is looked at again.
            let mut refresh_at = Instant::now() + Duration::from_secs(5);
            loop {
                let wake = retry_at.map_or(refresh_at, |at| at.min(refresh_at));
                let event = events.recv_timeout(wake.saturating_duration_since(Instant::now()));
                let mut pause = None;
                match event {
                    Ok(Event::Pause(ack)) => pause = Some(ack),
                    Ok(event) => pending.add(event),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
                // Coalesce bursts (a pod creation is several link events), for at most 200 ms;
                // a pod waiting at the CNI gate, or the start waiting for the first
                // generation, is not kept waiting.
                let deadline = Instant::now() + Duration::from_millis(200);
                while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                    if !pending.pods.is_empty() || first_done.is_some() || pause.is_some() {
                        break;
                    }
                    match events.recv_timeout(left.min(Duration::from_millis(20))) {
                        Ok(Event::Pause(ack)) => pause = Some(ack),
                        Ok(event) => pending.add(event),
                        Err(_) => break,
                    }
                }
                if retry_at.is_some_and(|at| Instant::now() >= at) {
                    pending.links |= !datapath.failed_links().is_empty();
                }
                let mut error = None;
                if Instant::now() >= refresh_at {
                    refresh_at = Instant::now() + Duration::from_secs(5);
                    if let Err(err) = datapath.refresh() {
                        tracing::error!("datapath refresh failed (will retry): {err}");
                        error = Some(format!("refresh: {err}"));
                    }
                }
                if pending.links {
                    match datapath.sync_links() {
                        Ok(()) => pending.links = !datapath.failed_links().is_empty(),
                        Err(err) => {
                            tracing::error!("link sync failed (will retry): {err}");
                            error = Some(format!("link sync: {err}"));
                        }
                    }
                }
                let mut applied = None;
                if let Some(state) = pending.config.take() {
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
                            pending.config = Some(state);
                        }
                    }
                    if let Some(done) = first_done.take() {
                        let _ = done.send(result.map_err(|err| err.to_string()));
                    }
                }
                // After the config: a pod the new config already knows is decided on it.
                for request in pending.pods.drain(..) {
                    let done = match request.command {
                        mesh_cni::Command::Add => datapath.admit(&request.pod).map(drop),
                        mesh_cni::Command::Del => datapath.release(&request.pod),
                        mesh_cni::Command::Check => datapath.check(&request.pod),
                    };
                    let _ = request.reply.send(done);
                }
                retry_at = (pending.links || pending.config.is_some())
                    .then(|| Instant::now() + Duration::from_secs(1));
                publish(&datapath, applied, error);
                if let Some(ack) = pause {
                    // Nothing is written from here until the successor serves or fails.
                    let _ = ack.send(());
                    tracing::info!("datapath paused: a successor is taking over");
                    loop {
                        match events.recv() {
                            Ok(Event::Resume) => {
                                tracing::info!("datapath resumed: the successor failed");
                                pending.links = true;
                                retry_at = Some(Instant::now());
                                break;
                            }
                            Ok(Event::HandedOver) | Err(_) => {
                                drop(datapath);
                                handed_over(&events);
                                return;
                            }
                            Ok(event) => pending.add(event),
                        }
                    }
                }
            }
        })?;
    Ok(first_applied)
}

/// What the datapath thread has yet to apply.
#[derive(Default)]
struct Pending {
    links: bool,
    config: Option<Arc<State>>,
    pods: Vec<PodRequest>,
}

impl Pending {
    fn add(&mut self, event: Event) {
        match event {
            Event::LinksChanged => self.links = true,
            Event::Config(state) => self.config = Some(state),
            Event::Pod(request) => self.pods.push(request),
            Event::Pause(_) | Event::Resume | Event::HandedOver => {}
        }
    }
}

/// After the handover: the kernel is the successor's; pods asking here (through a gate
/// socket the successor has replaced) are told to ask again, the rest is let go.
fn handed_over(events: &mpsc::Receiver<Event>) {
    for event in events {
        if let Event::Pod(request) = event {
            let _ = request.reply.send(Err(
                "this mesh-node handed the node over to its successor: ask again".into(),
            ));
        }
    }
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
