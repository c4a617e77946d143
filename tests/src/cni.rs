//! Pods started the way a container runtime starts them (containerd's CNI side, reduced):
//! a new network namespace, then the first network configuration of the node's CNI
//! directory (sorted by name), each plugin of its chain run in order with the CNI
//! environment, the network configuration on standard input and the previous plugin's result
//! as `prevResult`. A failed ADD is undone (DEL of the chain in reverse, the namespace
//! removed), as the runtime does before it retries the sandbox.
//!
//! The node's own configuration is `10-flannel.conflist`: Debian's containernetworking-plugins
//! `bridge` (the node's `cni0`) with `host-local` addresses, the plugins K3s's flannel
//! delegates to. mesh-node (with `--cni-conf-dir`) writes `00-mesh.conflist`, the same chain
//! with its plugin appended, which sorts first.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::{
    cluster::{Cluster, Pod},
    netns::Netns,
};

/// Where Debian's containernetworking-plugins are.
const SYSTEM_PLUGINS: &str = "/usr/lib/cni";

/// What the runtime keeps of a pod's sandbox to tear it down.
pub struct Sandbox {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// The network configuration the pod was set up with.
    pub conflist: Value,
    /// The final result of its ADD.
    pub result: Value,
    /// Node name.
    pub node: String,
    /// The namespace path (`CNI_NETNS`).
    pub netns_path: PathBuf,
    /// `CNI_ARGS`.
    pub args: String,
}

/// A failed CNI command: the failing plugin's exit status and its output (a CNI error
/// object for a plugin that follows the spec).
#[derive(Debug)]
pub struct CniError {
    /// The plugin (`type`).
    pub plugin: String,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CNI plugin {} failed: {} {}",
            self.plugin,
            self.stdout.trim(),
            self.stderr.trim()
        )
    }
}

impl std::error::Error for CniError {}

impl Cluster {
    /// Writes node `node`'s own network configuration (`10-flannel.conflist`) as K3s does at
    /// start: `bridge` on `cni0` with `host-local` addresses from the node's pod CIDR, MTU
    /// `mtu`.
    pub fn write_node_conflist(&self, node: &str, mtu: u32) -> Result<PathBuf> {
        let (conf, _) = self.cni_dirs(node);
        std::fs::create_dir_all(&conf)?;
        let gateway = self.node(node).gateway;
        if !conf.join("10-flannel.conflist").exists() {
            // A bridge without an address of its own takes its lowest port's, so its MAC
            // changes as pods come and go, and `bridge`'s CHECK compares it with the one in
            // the pod's ADD result: set one, as flannel's bridge has.
            let mac = format!("0e:6d:65:73:62:{:02x}", self.node(node).index + 1);
            self.node(node)
                .netns
                .ip(&["link", "set", "cni0", "address", &mac])
                .map_err(|e| anyhow!("{e}"))?;
        }
        let subnet = Ipv4Addr::from(u32::from(gateway) & 0xffff_ff00);
        let config = json!({
            "cniVersion": "1.0.0",
            "name": "cbr0",
            "plugins": [{
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "mtu": mtu,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": format!("{subnet}/24"), "gateway": gateway.to_string()}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": self.dir().join(format!("ipam-{node}")),
                },
            }],
        });
        let path = conf.join("10-flannel.conflist");
        let tmp = conf.join("10-flannel.conflist.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&config)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// The network configuration the runtime would use on `node` now: the first file of
    /// its CNI directory.
    pub fn runtime_conflist(&self, node: &str) -> Result<(PathBuf, Value)> {
        let (conf, _) = self.cni_dirs(node);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&conf)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
            .collect();
        files.sort();
        let path = files
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("no network configuration in {}", conf.display()))?;
        let text = std::fs::read_to_string(&path)?;
        Ok((path, serde_json::from_str(&text)?))
    }

    /// Starts pod `name` on `node` through CNI, asking host-local for `ip`. On failure the
    /// sandbox is torn down and the failing plugin's error returned.
    pub fn cni_add(
        &mut self,
        name: &str,
        namespace: &str,
        node: &str,
        ip: Ipv4Addr,
    ) -> Result<(), CniError> {
        let internal = |e: anyhow::Error| CniError {
            plugin: "(runtime)".into(),
            stdout: String::new(),
            stderr: format!("{e:#}"),
        };
        let k = self.next_pod_index();
        let netns = Netns::create(&format!("{}-c{k}", self.id)).map_err(internal)?;
        let (_, conflist) = self.runtime_conflist(node).map_err(internal)?;
        let mut sandbox = Sandbox {
            container_id: format!("{}-c{k}", self.id),
            conflist,
            result: Value::Null,
            node: node.to_string(),
            netns_path: PathBuf::from("/run/netns").join(netns.name()),
            args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};\
                 K8S_POD_INFRA_CONTAINER_ID={}-c{k};IP={ip}",
                self.id
            ),
        };
        let plugins = sandbox.conflist["plugins"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut previous: Option<Value> = None;
        for plugin in &plugins {
            match self.run_plugin("ADD", &sandbox, plugin, previous.as_ref()) {
                Ok(result) => previous = Some(result),
                Err(err) => {
                    // The runtime undoes what was set up, then retries the sandbox later.
                    let _ = self.cni_del_chain(&sandbox, previous.as_ref());
                    return Err(err);
                }
            }
        }
        sandbox.result = previous.unwrap_or(Value::Null);
        let veth = sandbox.result["interfaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|i| {
                i["sandbox"].as_str().unwrap_or("").is_empty()
                    && i["name"].as_str().is_some_and(|n| n.starts_with("veth"))
            })
            .and_then(|i| i["name"].as_str())
            .unwrap_or_default()
            .to_string();
        self.pods.insert(
            name.to_string(),
            Pod {
                name: name.to_string(),
                namespace: namespace.to_string(),
                node: node.to_string(),
                ip,
                netns,
                veth,
            },
        );
        self.sandboxes.insert(name.to_string(), sandbox);
        Ok(())
    }

    /// CNI CHECK of pod `name`'s chain, with its ADD result.
    pub fn cni_check(&self, name: &str) -> Result<(), CniError> {
        let sandbox = &self.sandboxes[name];
        let plugins = sandbox.conflist["plugins"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for plugin in &plugins {
            self.run_plugin("CHECK", sandbox, plugin, Some(&sandbox.result))?;
        }
        Ok(())
    }

    /// Stops pod `name` as the runtime does: CNI DEL of its chain in reverse, then its
    /// namespace goes.
    pub fn cni_del(&mut self, name: &str) -> Result<()> {
        let sandbox = self
            .sandboxes
            .remove(name)
            .with_context(|| format!("no CNI pod {name}"))?;
        let result = sandbox.result.clone();
        self.cni_del_chain(&sandbox, Some(&result))
            .map_err(|e| anyhow!("{e}"))?;
        self.pods.remove(name);
        Ok(())
    }

    fn cni_del_chain(&self, sandbox: &Sandbox, result: Option<&Value>) -> Result<(), CniError> {
        let plugins = sandbox.conflist["plugins"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut first_error = None;
        for plugin in plugins.iter().rev() {
            if let Err(err) = self.run_plugin("DEL", sandbox, plugin, result) {
                first_error.get_or_insert(err);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Runs one plugin of `sandbox`'s chain in the node's namespace.
    fn run_plugin(
        &self,
        command: &str,
        sandbox: &Sandbox,
        plugin: &Value,
        previous: Option<&Value>,
    ) -> Result<Value, CniError> {
        let kind = plugin["type"].as_str().unwrap_or_default().to_string();
        let fail = |stderr: String| CniError {
            plugin: kind.clone(),
            stdout: String::new(),
            stderr,
        };
        let (_, bin) = self.cni_dirs(&sandbox.node);
        let path = [bin.clone(), PathBuf::from(SYSTEM_PLUGINS)]
            .into_iter()
            .map(|dir| dir.join(&kind))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                fail(format!(
                    "failed to find plugin {kind:?} in {}",
                    bin.display()
                ))
            })?;
        let mut config = plugin.clone();
        config["cniVersion"] = sandbox.conflist["cniVersion"].clone();
        config["name"] = sandbox.conflist["name"].clone();
        if let Some(previous) = previous {
            config["prevResult"] = previous.clone();
        }
        let cni_path = format!("{}:{SYSTEM_PLUGINS}", bin.display());
        let mut child = Command::new("ip")
            .args(["netns", "exec", self.node(&sandbox.node).netns.name()])
            .arg(&path)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &sandbox.container_id)
            .env("CNI_NETNS", &sandbox.netns_path)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", &sandbox.args)
            .env("CNI_PATH", cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| fail(e.to_string()))?;
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("piped");
            stdin
                .write_all(config.to_string().as_bytes())
                .map_err(|e| fail(e.to_string()))?;
        }
        let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(CniError {
                plugin: kind,
                stdout,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        if command != "ADD" {
            return Ok(Value::Null);
        }
        serde_json::from_str(&stdout).map_err(|e| fail(format!("result {stdout:?}: {e}")))
    }

    /// Runs ADD for `name` until it succeeds (as the runtime retries a sandbox), for at most
    /// `within`; returns the failures seen before.
    pub fn cni_add_retrying(
        &mut self,
        name: &str,
        namespace: &str,
        node: &str,
        ip: Ipv4Addr,
        within: std::time::Duration,
    ) -> Result<Vec<CniError>> {
        let started = std::time::Instant::now();
        let mut failures = Vec::new();
        loop {
            match self.cni_add(name, namespace, node, ip) {
                Ok(()) => return Ok(failures),
                Err(err) if started.elapsed() < within => {
                    failures.push(err);
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(err) => bail!("ADD of {name} still failing after {within:?}: {err}"),
            }
        }
    }
}
