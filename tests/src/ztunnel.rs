//! Istio's ztunnel as a peer of the benchmark, run the way Istio ambient runs it: in-pod mode.
//!
//! The harness plays istio-cni's node agent for each node: it installs the in-pod redirection
//! rules in every pod's namespace (what istio-cni's `cni/pkg/iptables` writes there) and
//! serves ZDS (ztunnel's `proto/zds.proto`) on a unix seqpacket socket, handing ztunnel each
//! pod's workload info and network namespace file descriptor. ztunnel's workloads and
//! services come from a local config file made from the cluster's own Pods and Services; its
//! certificates from its built-in fake CA (the `testing` feature). Written from the protocol
//! description, not from Istio's code.

use std::{
    collections::BTreeMap,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde_yaml_ng::Value;

use crate::cluster::Cluster;

/// ztunnel running on every node of a cluster, each fed by its own ZDS server.
pub struct Ztunnel {
    nodes: Vec<NodeZtunnel>,
}

struct NodeZtunnel {
    child: Child,
    zds: Option<JoinHandle<Result<()>>>,
    socket: PathBuf,
}

/// The packet mark ztunnel sets on its sockets in shared (in-pod) mode, and the connection
/// mark the rules give connections it opened, as istio-cni's defaults.
const INPOD_RULES: &str = "*mangle
-N ISTIO_PRERT
-N ISTIO_OUTPUT
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
COMMIT
*nat
-N ISTIO_PRERT
-N ISTIO_OUTPUT
-A OUTPUT -j ISTIO_OUTPUT
-A PREROUTING -j ISTIO_PRERT
-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001
COMMIT
";

impl Ztunnel {
    /// Starts `binary` (a ztunnel built with the `testing` feature) on every node of
    /// `cluster`, for the workloads of `config_yaml` (the cluster's own Kubernetes YAML), and
    /// waits until each is ready with every local pod's proxy listening.
    pub fn start(cluster: &Cluster, binary: &Path, config_yaml: &str) -> Result<Ztunnel> {
        let config = cluster.dir().join("ztunnel.yaml");
        std::fs::write(&config, local_config(config_yaml)?)?;
        for pod in cluster.pods.values() {
            redirect_in_pod(pod.netns.name())?;
        }
        let mut out = Ztunnel { nodes: Vec::new() };
        for node in &cluster.nodes {
            let socket = cluster.dir().join(format!("zds-{}.sock", node.name));
            let pods: Vec<(WorkloadInfo, PathBuf)> = cluster
                .pods
                .values()
                .filter(|p| p.node == node.name)
                .map(|p| {
                    let info = workload_info(config_yaml, &p.name, &p.namespace);
                    Ok((info?, PathBuf::from("/run/netns").join(p.netns.name())))
                })
                .collect::<Result<_>>()?;
            let (ready_tx, ready_rx) = mpsc::channel();
            let listener = zds_listener(&socket)?;
            let zds = std::thread::Builder::new()
                .name(format!("zds-{}", node.name))
                .spawn(move || serve_zds(listener, pods, ready_tx))?;
            let log =
                std::fs::File::create(cluster.dir().join(format!("ztunnel-{}.log", node.name)))?;
            let child = Command::new("ip")
                .args(["netns", "exec", node.netns.name()])
                .arg(binary)
                .arg("proxy")
                .env("XDS_ADDRESS", "")
                .env("FAKE_CA", "true")
                .env("LOCAL_XDS_PATH", &config)
                .env("NODE_NAME", &node.name)
                .env("INPOD_UDS", &socket)
                .env("ISTIO_META_DNS_CAPTURE", "false")
                .env("IPV6_ENABLED", "false")
                .env_remove("POD_NAME")
                .env_remove("POD_NAMESPACE")
                .env_remove("SERVICE_ACCOUNT")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", binary.display()))?;
            out.nodes.push(NodeZtunnel {
                child,
                zds: Some(zds),
                socket,
            });
            match ready_rx.recv_timeout(Duration::from_secs(30)) {
                Ok(()) => {}
                Err(_) => {
                    let node = out.nodes.last_mut().context("just pushed")?;
                    let zds = node.zds.take().context("just set")?;
                    let _ = node.child.kill();
                    let why = match zds.join() {
                        Ok(Err(err)) => format!("{err:#}"),
                        _ => "no ZDS connection in 30 s".into(),
                    };
                    bail!("ztunnel on {}: {why}", node.socket.display());
                }
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while node
                .netns
                .http_get(15021, "/healthz/ready")
                .map(|r| r.0)
                .ok()
                != Some(200)
            {
                ensure!(
                    Instant::now() < deadline,
                    "ztunnel on {} not ready in 30 s",
                    node.name
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(out)
    }

    /// The ztunnel processes' PIDs, one per node, in the cluster's node order.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(|n| n.child.id()).collect()
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            // Ours: ended by its PID. The ZDS thread sees the connection close and returns.
            let _ = node.child.kill();
            let _ = node.child.wait();
            if let Some(zds) = node.zds.take() {
                let _ = zds.join();
            }
            let _ = std::fs::remove_file(&node.socket);
        }
    }
}

/// Installs istio-cni's in-pod rules in `netns`: outbound TCP to ztunnel's 15001, inbound
/// plaintext to 15006, HBONE to 15008 untouched; ztunnel's own marked sockets pass, and the
/// replies of connections it opened with the client's address come back to it.
fn redirect_in_pod(netns: &str) -> Result<()> {
    let mut restore = Command::new("ip")
        .args(["netns", "exec", netns, "iptables-restore", "--noflush"])
        .stdin(Stdio::piped())
        .spawn()
        .context("iptables-restore")?;
    std::io::Write::write_all(
        restore.stdin.as_mut().context("stdin")?,
        INPOD_RULES.as_bytes(),
    )?;
    drop(restore.stdin.take());
    ensure!(
        restore.wait()?.success(),
        "iptables-restore in {netns} failed"
    );
    for args in [
        &[
            "rule",
            "add",
            "fwmark",
            "0x111/0xfff",
            "pref",
            "32764",
            "lookup",
            "100",
        ][..],
        &[
            "route",
            "replace",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            "100",
        ],
    ] {
        crate::netns::sh("ip", &[&["-n", netns][..], args].concat())?;
    }
    Ok(())
}

/// ztunnel's local config (its `LOCAL_XDS_PATH` file) for the Pods and Services of a
/// Kubernetes YAML: every pod an HBONE workload on its node, every Service a VIP whose
/// endpoints are the pods its selector picks.
pub fn local_config(yaml: &str) -> Result<String> {
    let docs = documents(yaml)?;
    let services: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Service").collect();
    let ports_of = |svc: &Value| -> Result<BTreeMap<u16, u16>> {
        let mut ports = BTreeMap::new();
        for port in svc["spec"]["ports"].as_sequence().into_iter().flatten() {
            let number = |key: &str| -> Result<u16> {
                Ok(u16::try_from(port[key].as_u64().with_context(|| {
                    format!(
                        "Service {}: ports[].{key} must be a number",
                        hostname(svc).unwrap_or_default()
                    )
                })?)?)
            };
            ports.insert(number("port")?, number("targetPort")?);
        }
        Ok(ports)
    };
    let mut config = LocalConfig::default();
    for pod in docs.iter().filter(|d| d["kind"] == "Pod") {
        let (name, namespace) = (str_at(pod, "name")?, namespace_of(pod)?);
        let labels = &pod["metadata"]["labels"];
        let mut of_services = BTreeMap::new();
        for svc in &services {
            let selector = svc["spec"]["selector"].as_mapping();
            if namespace_of(svc)? == namespace
                && selector.is_some_and(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
            {
                of_services.insert(format!("{namespace}/{}", hostname(svc)?), ports_of(svc)?);
            }
        }
        config.workloads.push(LocalWorkload {
            uid: format!("{namespace}/{name}"),
            name: name.into(),
            namespace: namespace.into(),
            service_account: service_account(pod).into(),
            trust_domain: "cluster.local".into(),
            workload_ips: vec![pod["status"]["podIP"]
                .as_str()
                .with_context(|| format!("Pod {namespace}/{name} without status.podIP"))?
                .into()],
            node: pod["spec"]["nodeName"]
                .as_str()
                .with_context(|| format!("Pod {namespace}/{name} without spec.nodeName"))?
                .into(),
            network: String::new(),
            protocol: "HBONE".into(),
            services: of_services,
        });
    }
    for svc in &services {
        config.services.push(LocalService {
            name: str_at(svc, "name")?.into(),
            namespace: namespace_of(svc)?.into(),
            hostname: hostname(svc)?,
            vips: vec![format!(
                "/{}",
                svc["spec"]["clusterIP"].as_str().with_context(|| format!(
                    "Service {} without clusterIP",
                    hostname(svc).unwrap_or_default()
                ))?
            )],
            ports: ports_of(svc)?,
        });
    }
    Ok(serde_yaml_ng::to_string(&config)?)
}

/// ztunnel's local config file, the parts used here (camelCase, as ztunnel reads it).
#[derive(Default, serde::Serialize)]
struct LocalConfig {
    workloads: Vec<LocalWorkload>,
    services: Vec<LocalService>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct LocalWorkload {
    uid: String,
    name: String,
    namespace: String,
    service_account: String,
    trust_domain: String,
    workload_ips: Vec<String>,
    node: String,
    network: String,
    protocol: String,
    /// `namespace/hostname` -> service port -> target port.
    services: BTreeMap<String, BTreeMap<u16, u16>>,
}

#[derive(serde::Serialize)]
struct LocalService {
    name: String,
    namespace: String,
    hostname: String,
    vips: Vec<String>,
    ports: BTreeMap<u16, u16>,
}

fn service_account(pod: &Value) -> &str {
    pod["spec"]["serviceAccountName"]
        .as_str()
        .unwrap_or("default")
}

fn documents(yaml: &str) -> Result<Vec<Value>> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| Ok(serde::Deserialize::deserialize(d)?))
        .collect()
}

fn str_at<'a>(doc: &'a Value, field: &str) -> Result<&'a str> {
    doc["metadata"][field].as_str().with_context(|| {
        format!(
            "{} without metadata.{field}",
            doc["kind"].as_str().unwrap_or("?")
        )
    })
}

fn namespace_of(doc: &Value) -> Result<&str> {
    str_at(doc, "namespace")
}

fn hostname(svc: &Value) -> Result<String> {
    Ok(format!(
        "{}.{}.svc.cluster.local",
        str_at(svc, "name")?,
        namespace_of(svc)?
    ))
}

/// What ztunnel matches a ZDS pod against its config by.
struct WorkloadInfo {
    name: String,
    namespace: String,
    service_account: String,
}

fn workload_info(yaml: &str, name: &str, namespace: &str) -> Result<WorkloadInfo> {
    let docs = documents(yaml)?;
    let pod = docs
        .iter()
        .find(|d| {
            d["kind"] == "Pod"
                && d["metadata"]["name"] == name
                && d["metadata"]["namespace"] == namespace
        })
        .with_context(|| format!("no Pod {namespace}/{name} in the config"))?;
    Ok(WorkloadInfo {
        name: name.into(),
        namespace: namespace.into(),
        service_account: service_account(pod).into(),
    })
}

// ZDS messages (`istio.workload.zds`), encoded by prost from these definitions.

#[derive(Clone, PartialEq, prost::Message)]
struct ZdsHello {
    #[prost(int32, tag = "1")]
    version: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ZdsWorkloadInfo {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    namespace: String,
    #[prost(string, tag = "3")]
    service_account: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct AddWorkload {
    #[prost(string, tag = "1")]
    uid: String,
    #[prost(message, optional, tag = "2")]
    workload_info: Option<ZdsWorkloadInfo>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SnapshotSent {}

#[derive(Clone, PartialEq, prost::Message)]
struct WorkloadRequest {
    #[prost(message, optional, tag = "1")]
    add: Option<AddWorkload>,
    #[prost(message, optional, tag = "3")]
    snapshot_sent: Option<SnapshotSent>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Ack {
    #[prost(string, tag = "1")]
    error: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct WorkloadResponse {
    #[prost(message, optional, tag = "1")]
    ack: Option<Ack>,
}

fn zds_listener(path: &Path) -> Result<socket2::Socket> {
    let _ = std::fs::remove_file(path);
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::SEQPACKET, None)?;
    socket.bind(&socket2::SockAddr::unix(path)?)?;
    socket.listen(1)?;
    Ok(socket)
}

/// One ZDS session: takes ztunnel's hello, sends every pod with its namespace's file
/// descriptor (each acknowledged before the next), then the end of the snapshot; reports
/// ready and holds the connection until ztunnel goes away.
fn serve_zds(
    listener: socket2::Socket,
    pods: Vec<(WorkloadInfo, PathBuf)>,
    ready: mpsc::Sender<()>,
) -> Result<()> {
    listener.set_read_timeout(Some(Duration::from_secs(30)))?;
    let (conn, _) = listener.accept().context("no ztunnel connected")?;
    drop(listener);
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let hello: ZdsHello = receive(&conn).context("ZDS hello")?;
    ensure!(
        hello.version == 1,
        "ZDS hello with version {}",
        hello.version
    );
    for (info, netns) in pods {
        let uid = format!("{}/{}", info.namespace, info.name);
        let request = WorkloadRequest {
            add: Some(AddWorkload {
                uid: uid.clone(),
                workload_info: Some(ZdsWorkloadInfo {
                    name: info.name,
                    namespace: info.namespace,
                    service_account: info.service_account,
                }),
            }),
            snapshot_sent: None,
        };
        let fd = std::fs::File::open(&netns).with_context(|| format!("{}", netns.display()))?;
        send(&conn, &request, Some(fd.as_raw_fd()))?;
        acked(&conn).with_context(|| format!("adding {uid}"))?;
    }
    let end = WorkloadRequest {
        add: None,
        snapshot_sent: Some(SnapshotSent {}),
    };
    send(&conn, &end, None)?;
    acked(&conn).context("end of snapshot")?;
    let _ = ready.send(());
    // Held until ztunnel exits (end of stream).
    conn.set_read_timeout(None)?;
    let mut buf = [std::mem::MaybeUninit::new(0u8); 64];
    while conn.recv(&mut buf).map(|n| n > 0).unwrap_or(false) {}
    Ok(())
}

fn receive<M: prost::Message + Default>(conn: &socket2::Socket) -> Result<M> {
    let mut buf = [std::mem::MaybeUninit::new(0u8); 1024];
    let n = conn.recv(&mut buf)?;
    ensure!(n > 0, "ztunnel closed the ZDS connection");
    // SAFETY: recv initialized the first n bytes.
    let bytes: Vec<u8> = buf[..n]
        .iter()
        .map(|b| unsafe { b.assume_init() })
        .collect();
    Ok(M::decode(bytes.as_slice())?)
}

fn acked(conn: &socket2::Socket) -> Result<()> {
    let response: WorkloadResponse = receive(conn)?;
    match response.ack {
        Some(ack) if ack.error.is_empty() => Ok(()),
        Some(ack) => bail!("ztunnel refused: {}", ack.error),
        None => bail!("ztunnel answered without an ack"),
    }
}

/// Sends one message as one datagram, with `fd` attached (SCM_RIGHTS) when given.
fn send(conn: &socket2::Socket, message: &impl prost::Message, fd: Option<i32>) -> Result<()> {
    let bytes = message.encode_to_vec();
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // Room for one descriptor, aligned for cmsghdr.
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data; every pointer in it points at live buffers above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE/CMSG_FIRSTHDR/CMSG_DATA address `control`, which is large
        // enough for one int's control message.
        unsafe {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) as usize;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>(), fd);
        }
    }
    // SAFETY: msg is fully initialized; the socket is open.
    let sent = unsafe { libc::sendmsg(conn.as_raw_fd(), &msg, 0) };
    ensure!(
        sent == bytes.len() as isize,
        "ZDS send: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn zds_messages_encode_as_ztunnel_reads_them() {
        // Bytes of proto3's encoding, as the protocol's own peers produce them.
        let end = WorkloadRequest {
            add: None,
            snapshot_sent: Some(SnapshotSent {}),
        };
        assert_eq!(end.encode_to_vec(), [0x1a, 0x00]);
        assert_eq!(ZdsHello { version: 1 }.encode_to_vec(), [0x08, 0x01]);
        let ok = WorkloadResponse::decode(&[0x0a, 0x00][..]).unwrap();
        assert_eq!(ok.ack.map(|a| a.error), Some(String::new()));
    }

    #[test]
    fn local_config_makes_hbone_workloads_and_service_vips() {
        let config = local_config(crate::fixtures::BENCH).unwrap();
        let parsed: Value = serde_yaml_ng::from_str(&config).unwrap();
        let cross = parsed["workloads"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|w| w["name"] == "srv-cross")
            .unwrap();
        assert_eq!(cross["node"], "node-b");
        assert_eq!(cross["protocol"], "HBONE");
        assert_eq!(cross["serviceAccount"], "server");
        let ports = cross["services"]["bench/cross.bench.svc.cluster.local"]
            .as_mapping()
            .unwrap();
        assert_eq!(ports.get(Value::from(81)), Some(&Value::from(8081)));
        let svc = parsed["services"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "cross")
            .unwrap();
        assert_eq!(svc["vips"][0], "/100.66.0.41");
    }
}
