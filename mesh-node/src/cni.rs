//! The pod-start gate, mesh-node's side (docs/cni.md):
//! - the socket the CNI plugin (`mesh-cni`) asks at every pod's ADD, DEL and CHECK; an ADD
//!   is answered only once the datapath thread has capture on the pod's interface and its
//!   enrolment in the kernel (`Datapath::admit`), so the pod's first packet is governed;
//! - the enrolment cache on disk the plugin decides from while mesh-node is away (a pod that
//!   would be enrolled is refused then, any other starts);
//! - the plugin's install into the node's CNI configuration (`00-mesh.conflist`: the
//!   node's own chain with the plugin appended, named to come first, kept in step when the
//!   node's file is rewritten, as K3s rewrites its flannel conflist at every start);
//! - the repair pass: enrolled pods of this node that never went through the gate (started
//!   before the install, or without the plugin), reported with their connections that
//!   predate capture, which `--repair=reset` resets.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::{mpsc, Arc},
    time::Duration,
};

use arc_swap::ArcSwap;
use mesh_cni::{Command, Reply, Request};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use crate::{
    admin::Admin,
    capture::{Event, PodRequest, PodStart},
    state::State,
};

/// The conflist mesh-node writes in the CNI configuration directory: sorted before the
/// node's own, so the runtime (which takes the first) uses it.
pub const CONFLIST: &str = "00-mesh.conflist";
/// The plugin's file name in the CNI binary directory (its `type`).
pub const PLUGIN: &str = "mesh-cni";
/// A request line longer than this is refused.
const MAX_REQUEST: usize = 64 * 1024;
/// How long the datapath may take to set a pod up before the ADD fails (and is retried).
const ADMIT_TIMEOUT: Duration = Duration::from_secs(20);

/// `--repair`: what the repair pass does about enrolled pods that never went through the
/// gate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Repair {
    /// Report them and their connections that predate capture (log and metrics).
    #[default]
    Report,
    /// Report them and reset those connections (both ends get a reset; the application
    /// reconnects, through the mesh).
    Reset,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    command: &'static str,
    /// `ok`, `refused` (the pod may not start, or the check failed), `invalid`.
    result: &'static str,
}

/// The gate's metrics.
#[derive(Clone, Default)]
pub struct GateMetrics {
    requests: Family<RequestLabels, Counter>,
    ungated: Gauge,
    uncaptured: Gauge,
    resets: Counter,
}

impl GateMetrics {
    /// Registers the gate's metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "mesh_cni_requests",
            "CNI plugin requests answered, by command and result",
            metrics.requests.clone(),
        );
        registry.register(
            "mesh_cni_ungated_pods",
            "Enrolled pods of this node that never went through the CNI gate (repair pass)",
            metrics.ungated.clone(),
        );
        registry.register(
            "mesh_cni_uncaptured_connections",
            "Established connections of ungated enrolled pods that the proxy does not carry",
            metrics.uncaptured.clone(),
        );
        registry.register(
            "mesh_cni_repair_resets",
            "Uncaptured connections of ungated pods reset by the repair pass (--repair=reset)",
            metrics.resets.clone(),
        );
        metrics
    }
}

/// Binds the gate's socket (`mesh_cni::socket_path`), readable by root only; a socket file
/// a previous run left is replaced.
pub fn bind(state_dir: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let path = mesh_cni::socket_path(state_dir);
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the CNI plugin's requests forever.
pub async fn serve(
    listener: tokio::net::UnixListener,
    state: Arc<ArcSwap<State>>,
    events: mpsc::Sender<Event>,
    metrics: GateMetrics,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!("CNI gate accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (state, events, metrics) = (state.clone(), events.clone(), metrics.clone());
        tokio::spawn(async move {
            if let Err(err) = answer(stream, &state, &events, &metrics).await {
                tracing::warn!("CNI gate: {err}");
            }
        });
    }
}

async fn answer(
    stream: tokio::net::UnixStream,
    state: &ArcSwap<State>,
    events: &mpsc::Sender<Event>,
    metrics: &GateMetrics,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = tokio::io::BufReader::new(read).take(MAX_REQUEST as u64);
    tokio::time::timeout(Duration::from_secs(5), reader.read_until(b'\n', &mut line))
        .await
        .map_err(|_| std::io::Error::other("no request within 5 s"))??;
    let (command, reply) = match serde_json::from_slice::<Request>(&line) {
        Ok(request) => {
            let command = request.command;
            (Some(command), decide(request, state, events).await)
        }
        Err(err) => (
            None,
            Reply {
                error: Some(format!("unreadable request: {err}")),
                enrolled: false,
            },
        ),
    };
    let result = match (&command, &reply.error) {
        (None, _) => "invalid",
        (_, None) => "ok",
        (_, Some(_)) => "refused",
    };
    metrics
        .requests
        .get_or_create(&RequestLabels {
            command: match command {
                Some(Command::Add) => "add",
                Some(Command::Del) => "del",
                Some(Command::Check) => "check",
                None => "-",
            },
            result,
        })
        .inc();
    let mut text = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
    text.push(b'\n');
    write.write_all(&text).await
}

/// Decides the pod's enrolment and has the datapath thread carry the command out.
async fn decide(request: Request, state: &ArcSwap<State>, events: &mpsc::Sender<Event>) -> Reply {
    let enrolled = state
        .load()
        .enrolment
        .decide(&request.namespace, &request.name);
    let pod = PodStart {
        namespace: request.namespace,
        name: request.name,
        interfaces: request.interfaces,
        addresses: request.addresses,
        enrolled,
    };
    let name = format!("{}/{}", pod.namespace, pod.name);
    let (reply, done) = tokio::sync::oneshot::channel();
    let sent = events.send(Event::Pod(PodRequest {
        command: request.command,
        pod,
        reply,
    }));
    let error = match sent {
        Err(_) => Some("mesh-node's datapath is not running".to_string()),
        Ok(()) => match tokio::time::timeout(ADMIT_TIMEOUT, done).await {
            Ok(Ok(Ok(()))) => None,
            Ok(Ok(Err(err))) => Some(err),
            Ok(Err(_)) => Some("mesh-node's datapath dropped the request".to_string()),
            Err(_) => Some(format!(
                "mesh-node's datapath did not answer within {} s",
                ADMIT_TIMEOUT.as_secs()
            )),
        },
    };
    if let (Command::Add | Command::Check, Some(err)) = (request.command, &error) {
        tracing::warn!(pod = %name, command = ?request.command, "CNI gate refused: {err}");
    }
    Reply { error, enrolled }
}

/// Writes the enrolment cache whenever the config's enrolment rules differ from what it
/// holds (`written`, stored at start), checked every second, forever.
pub async fn keep_cache(
    state: Arc<ArcSwap<State>>,
    path: PathBuf,
    mut written: mesh_cni::Enrolment,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let current = state.load();
        if written != current.enrolment {
            match current.enrolment.store(&path) {
                Ok(()) => written = current.enrolment.clone(),
                Err(err) => {
                    tracing::warn!(path = %path.display(), "cannot write the enrolment cache: {err}")
                }
            }
        }
    }
}

/// Where the plugin goes: the node's CNI directories (`--cni-conf-dir`, `--cni-bin-dir`).
#[derive(Clone, Debug)]
pub struct Install {
    /// The runtime's CNI configuration directory.
    pub conf_dir: PathBuf,
    /// The runtime's CNI binary directory.
    pub bin_dir: PathBuf,
    /// The plugin binary to copy there.
    pub plugin: PathBuf,
    /// mesh-node's state directory (the plugin's `stateDir`).
    pub state_dir: PathBuf,
}

impl Install {
    /// Puts the plugin binary in place and `00-mesh.conflist` (the node's first network
    /// configuration with the plugin appended) in line with the node's configuration.
    /// Returns what changed, one line each.
    pub fn sync(&self) -> Result<Vec<String>, String> {
        let mut changed = Vec::new();
        let target = self.bin_dir.join(PLUGIN);
        let binary = std::fs::read(&self.plugin)
            .map_err(|err| format!("cannot read the plugin {}: {err}", self.plugin.display()))?;
        if std::fs::read(&target).ok().as_deref() != Some(&binary[..]) {
            write_atomically(&target, &binary, 0o755)?;
            changed.push(format!("plugin binary {}", target.display()));
        }
        let (source, chain) = self.node_chain()?;
        let ours = self.conf_dir.join(CONFLIST);
        let text = serde_json::to_string_pretty(&chain).map_err(|err| err.to_string())? + "\n";
        if std::fs::read_to_string(&ours).ok().as_deref() != Some(text.as_str()) {
            write_atomically(&ours, text.as_bytes(), 0o644)?;
            changed.push(format!(
                "{} (the chain of {} with {PLUGIN} appended)",
                ours.display(),
                source.display()
            ));
        }
        Ok(changed)
    }

    /// The node's own network configuration (the first file the runtime would take but
    /// ours) as a conflist with the plugin last.
    fn node_chain(&self) -> Result<(PathBuf, serde_json::Value), String> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.conf_dir)
            .map_err(|err| format!("{}: {err}", self.conf_dir.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
                matches!(ext, "conflist" | "conf" | "json")
                    && p.file_name().and_then(|n| n.to_str()) != Some(CONFLIST)
            })
            .collect();
        files.sort();
        let source = files.into_iter().next().ok_or_else(|| {
            format!(
                "no CNI network configuration in {} yet (the node's network plugin writes it)",
                self.conf_dir.display()
            )
        })?;
        let text = std::fs::read_to_string(&source)
            .map_err(|err| format!("{}: {err}", source.display()))?;
        let mut config: serde_json::Value = serde_json::from_str(&text)
            .map_err(|err| format!("{}: not JSON: {err}", source.display()))?;
        let mut plugins = match config.get_mut("plugins").map(serde_json::Value::take) {
            Some(serde_json::Value::Array(plugins)) => plugins,
            Some(_) => return Err(format!("{}: `plugins` is not a list", source.display())),
            None => {
                // A single-plugin .conf: it becomes the chain's first plugin.
                let single = config.clone();
                config = serde_json::json!({
                    "cniVersion": single["cniVersion"],
                    "name": single["name"],
                });
                vec![single]
            }
        };
        plugins.retain(|p| p["type"] != PLUGIN);
        plugins.push(serde_json::json!({
            "type": PLUGIN,
            "stateDir": self.state_dir,
        }));
        config["plugins"] = serde_json::Value::Array(plugins);
        Ok((source, config))
    }
}

/// Removes the conflist and the plugin binary [`Install`] put in place; returns what was
/// removed.
pub fn uninstall(conf_dir: &Path, bin_dir: &Path) -> Vec<String> {
    [conf_dir.join(CONFLIST), bin_dir.join(PLUGIN)]
        .into_iter()
        .filter(|path| std::fs::remove_file(path).is_ok())
        .map(|path| path.display().to_string())
        .collect()
}

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("mesh-tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|err| format!("cannot write {}: {err}", path.display()))
}

/// Keeps the plugin installed, checking every second (K3s rewrites its conflist at start;
/// an upgrade of the node may empty the binary directory).
pub async fn keep_installed(install: Install) {
    let mut last_error = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        match install.sync() {
            Ok(changed) => {
                for what in changed {
                    tracing::info!("CNI plugin installed: {what}");
                }
                last_error = None;
            }
            Err(err) => {
                if last_error.as_ref() != Some(&err) {
                    tracing::warn!("cannot install the CNI plugin (will retry): {err}");
                }
                last_error = Some(err);
            }
        }
    }
}

/// An enrolled pod of this node that never went through the gate.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Ungated {
    ip: Ipv4Addr,
    pod: String,
}

/// The repair pass, at start and every `every`: reports enrolled pods of this node whose
/// interface never went through the gate and their connections the proxy does not carry
/// (they predate capture), and with `Repair::Reset` resets those connections.
pub async fn repair(
    admin: Arc<Admin>,
    state: Arc<ArcSwap<State>>,
    mode: Repair,
    every: Duration,
    metrics: GateMetrics,
) {
    let mut reported: BTreeSet<Ungated> = BTreeSet::new();
    let mut reported_connections: BTreeSet<(SocketAddrV4, SocketAddrV4)> = BTreeSet::new();
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let ungated = {
            let (gated, interfaces) = match admin.datapath.lock() {
                Ok(view) => (view.gated.clone(), view.pod_interfaces.clone()),
                Err(_) => continue,
            };
            let state = state.load();
            ungated_pods(&state, &gated, &interfaces)
        };
        metrics.ungated.set(ungated.len() as i64);
        for pod in ungated.difference(&reported) {
            tracing::warn!(
                pod = %pod.pod,
                ip = %pod.ip,
                "enrolled pod never went through the CNI gate (started before the plugin was \
                 installed, or without it): its connections from before capture are not governed"
            );
        }
        reported = ungated.clone();
        if ungated.is_empty() {
            metrics.uncaptured.set(0);
            continue;
        }
        let ips: BTreeMap<Ipv4Addr, String> =
            ungated.iter().map(|p| (p.ip, p.pod.clone())).collect();
        let found = tokio::task::spawn_blocking(move || uncaptured(&ips)).await;
        let found = match found {
            Ok(Ok(found)) => found,
            Ok(Err(err)) => {
                tracing::warn!("repair pass: cannot list the pods' connections: {err}");
                continue;
            }
            Err(_) => continue,
        };
        metrics.uncaptured.set(found.len() as i64);
        let mut still = BTreeSet::new();
        for (netns, socket, pod) in found {
            let key = (socket.local, socket.remote);
            still.insert(key);
            if !reported_connections.contains(&key) {
                tracing::warn!(
                    pod = %pod,
                    local = %socket.local,
                    remote = %socket.remote,
                    "connection of an ungated enrolled pod predates capture: not governed by the mesh"
                );
            }
            if mode == Repair::Reset {
                let (local, remote) = (socket.local, socket.remote);
                let reset = tokio::task::spawn_blocking(move || {
                    crate::sys::in_netns(netns, move || crate::sys::destroy_tcp(local, remote))
                })
                .await;
                match reset {
                    Ok(Ok(())) => {
                        metrics.resets.inc();
                        tracing::warn!(pod = %pod, %local, %remote, "uncaptured connection reset (--repair=reset)");
                    }
                    Ok(Err(err)) => {
                        tracing::warn!(pod = %pod, %local, %remote, "cannot reset the uncaptured connection: {err}")
                    }
                    Err(_) => {}
                }
            }
        }
        reported_connections = still;
    }
}

/// Enrolled pods of this node bound to an interface that did not go through the gate.
fn ungated_pods(
    state: &State,
    gated: &BTreeMap<u32, String>,
    interfaces: &BTreeMap<Ipv4Addr, u32>,
) -> BTreeSet<Ungated> {
    state
        .workloads
        .values()
        .filter(|w| w.enrolled && state.is_local(w))
        .filter(|w| {
            interfaces
                .get(&w.ip)
                .is_some_and(|i| *i != 0 && !gated.contains_key(i))
        })
        .map(|w| Ungated {
            ip: w.ip,
            pod: format!("{}/{}", w.namespace, w.name),
        })
        .collect()
}

/// The established connections of the pods at `ips` (found in every other network
/// namespace by their local address, which must be an address of that namespace: a proxy
/// elsewhere may use a pod's address for its transparent sockets) that no socket of this
/// node's namespace mirrors. A connection the proxy carries always has its mirror here (the
/// proxy's own end), and so has one the kubelet or another host process made directly; one
/// the node merely forwards has none: it bypasses the mesh. The pods' namespaces are read
/// first and this one after, so a mirror made in between is not missed.
fn uncaptured(
    ips: &BTreeMap<Ipv4Addr, String>,
) -> std::io::Result<Vec<(PathBuf, crate::sys::TcpSocket, String)>> {
    let mut candidates = Vec::new();
    for netns in crate::sys::other_network_namespaces() {
        let wanted: BTreeSet<Ipv4Addr> = ips.keys().copied().collect();
        let read = crate::sys::in_netns(netns.clone(), move || {
            let mut sockets = crate::sys::established_tcp()?;
            sockets.retain(|s| {
                wanted.contains(s.local.ip())
                    && std::net::UdpSocket::bind(SocketAddrV4::new(*s.local.ip(), 0)).is_ok()
            });
            Ok(sockets)
        });
        let Ok(sockets) = read else {
            continue; // gone meanwhile
        };
        for socket in sockets {
            if let Some(pod) = ips.get(socket.local.ip()) {
                candidates.push((netns.clone(), socket, pod.clone()));
            }
        }
    }
    let here: BTreeSet<(SocketAddrV4, SocketAddrV4)> = crate::sys::established_tcp()?
        .into_iter()
        .map(|s| (s.local, s.remote))
        .collect();
    Ok(candidates
        .into_iter()
        .filter(|(_, s, _)| !here.contains(&(s.remote, s.local)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn install(dir: &Path) -> Install {
        for sub in ["net.d", "bin"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let plugin = dir.join("plugin");
        std::fs::write(&plugin, b"binary").unwrap();
        Install {
            conf_dir: dir.join("net.d"),
            bin_dir: dir.join("bin"),
            plugin,
            state_dir: PathBuf::from("/var/lib/mesh"),
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mesh-cni-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn the_node_chain_gets_the_plugin_last_in_a_file_that_sorts_first() {
        let dir = scratch("chain");
        let install = install(&dir);
        assert!(install
            .sync()
            .unwrap_err()
            .contains("no CNI network configuration"));
        std::fs::write(
            dir.join("net.d/10-flannel.conflist"),
            r#"{"name":"cbr0","cniVersion":"1.0.0","plugins":[{"type":"flannel"},{"type":"portmap"}]}"#,
        )
        .unwrap();
        assert_eq!(install.sync().unwrap().len(), 1, "the conflist");
        assert!(install.sync().unwrap().is_empty(), "nothing to do twice");
        let ours: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("net.d").join(CONFLIST)).unwrap(),
        )
        .unwrap();
        let types: Vec<&str> = ours["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["flannel", "portmap", PLUGIN]);
        assert_eq!(ours["name"], "cbr0");
        assert_eq!(ours["plugins"][2]["stateDir"], "/var/lib/mesh");
        assert_eq!(
            std::fs::read(dir.join("bin").join(PLUGIN)).unwrap(),
            b"binary"
        );

        // Rewritten as K3s does at start: ours follows.
        std::fs::write(
            dir.join("net.d/10-flannel.conflist"),
            r#"{"name":"cbr0","cniVersion":"1.0.0","plugins":[{"type":"flannel","delegate":{"mtu":1400}}]}"#,
        )
        .unwrap();
        assert_eq!(install.sync().unwrap().len(), 1);
        let ours = std::fs::read_to_string(dir.join("net.d").join(CONFLIST)).unwrap();
        assert!(ours.contains("1400") && ours.contains(PLUGIN), "{ours}");
        assert_eq!(uninstall(&install.conf_dir, &install.bin_dir).len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_chain() {
        let dir = scratch("single");
        let install = install(&dir);
        std::fs::write(
            dir.join("net.d/87-podman.conf"),
            r#"{"cniVersion":"0.4.0","name":"podman","type":"bridge","bridge":"cni-podman0"}"#,
        )
        .unwrap();
        install.sync().unwrap();
        let ours: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("net.d").join(CONFLIST)).unwrap(),
        )
        .unwrap();
        assert_eq!(ours["cniVersion"], "0.4.0");
        assert_eq!(ours["plugins"][0]["type"], "bridge");
        assert_eq!(ours["plugins"][1]["type"], PLUGIN);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
