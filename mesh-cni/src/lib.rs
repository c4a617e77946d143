//! The pod-start gate shared by the CNI plugin (`mesh-cni`, run by the container runtime for
//! every pod sandbox) and mesh-node: the request the plugin sends over mesh-node's unix
//! socket, its answer, and the node-local enrolment cache the plugin decides from while
//! mesh-node is not there to ask.
//!
//! Kept free of everything but serde: the plugin is a short-lived binary the runtime runs
//! once per pod and command, and must stay small and quick to start.

use std::{
    collections::BTreeMap,
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// The files of the gate in mesh-node's state directory (`--state-dir`): `cni/mesh.sock`
/// (the socket) and `cni/enrolment.json` (the cache).
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("cni/mesh.sock")
}

/// See [`socket_path`].
pub fn cache_path(state_dir: &Path) -> PathBuf {
    state_dir.join("cni/enrolment.json")
}

/// What the plugin asks mesh-node (one JSON line).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// `ADD`, `DEL` or `CHECK`.
    pub command: Command,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// The pod's Kubernetes namespace (`K8S_POD_NAMESPACE`).
    pub namespace: String,
    /// The pod's name (`K8S_POD_NAME`).
    pub name: String,
    /// Host-side interfaces of `prevResult` (those without a sandbox): the pod's veth is one
    /// of them (the bridge is another).
    pub interfaces: Vec<String>,
    /// The pod's IPv4 addresses from `prevResult`.
    pub addresses: Vec<Ipv4Addr>,
}

/// The CNI command of a [`Request`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    /// The pod's network was just set up: govern it before answering.
    Add,
    /// The pod's network is being torn down.
    Del,
    /// Is the pod governed as it should be?
    Check,
}

/// mesh-node's answer (one JSON line).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// Why the pod must not start (or the check failed); `None`: go ahead.
    pub error: Option<String>,
    /// Whether the pod is enrolled.
    pub enrolled: bool,
}

/// What enrols a pod, as mesh-node last knew it: written by mesh-node whenever it changes,
/// read by the plugin when mesh-node cannot be reached (not started yet after a reboot,
/// restarting, crashed). Istio's rules: a pod's own `istio.io/dataplane-mode` label decides,
/// else its namespace's labels.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolment {
    /// Namespace -> whether its labels enrol its pods (every namespace mesh-node knew).
    pub namespaces: BTreeMap<String, bool>,
    /// `namespace/name` -> enrolled, for pods whose own label decides (`ambient`/`none`).
    pub pods: BTreeMap<String, bool>,
}

impl Enrolment {
    /// Whether the pod would be enrolled. A namespace the cache does not know (created while
    /// mesh-node was away) does not enrol: its labels are unknown, and refusing every pod of
    /// it would hold pods the mesh was never asked to take.
    pub fn decide(&self, namespace: &str, name: &str) -> bool {
        match self.pods.get(&format!("{namespace}/{name}")) {
            Some(enrolled) => *enrolled,
            None => self.namespaces.get(namespace).copied().unwrap_or(false),
        }
    }

    /// Reads the cache.
    pub fn load(path: &Path) -> io::Result<Enrolment> {
        let text = std::fs::read(path)?;
        serde_json::from_slice(&text).map_err(|err| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {err}", path.display()),
            )
        })
    }

    /// Writes the cache atomically (a new file renamed over the old one, synced first: it
    /// must survive a power cut, as a reboot is when it is read).
    pub fn store(&self, path: &Path) -> io::Result<()> {
        use std::io::Write;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.tmp");
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec_pretty(self).map_err(io::Error::other)?)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_label_wins_over_its_namespace_and_unknown_namespaces_do_not_enrol() {
        let cache = Enrolment {
            namespaces: [("mesh".into(), true), ("plain".into(), false)].into(),
            pods: [
                ("mesh/opt-out".into(), false),
                ("plain/opt-in".into(), true),
            ]
            .into(),
        };
        assert!(cache.decide("mesh", "web"));
        assert!(!cache.decide("mesh", "opt-out"));
        assert!(cache.decide("plain", "opt-in"));
        assert!(!cache.decide("plain", "web"));
        assert!(!cache.decide("new", "web"));
    }

    #[test]
    fn the_cache_round_trips_through_its_file() {
        let dir = std::env::temp_dir().join(format!("mesh-cni-test-{}", std::process::id()));
        let path = cache_path(&dir);
        let cache = Enrolment {
            namespaces: [("mesh".into(), true)].into(),
            pods: BTreeMap::new(),
        };
        cache.store(&path).unwrap();
        assert_eq!(Enrolment::load(&path).unwrap(), cache);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn requests_are_one_json_line_with_upper_case_commands() {
        let request = Request {
            command: Command::Add,
            container_id: "c1".into(),
            namespace: "mesh".into(),
            name: "web".into(),
            interfaces: vec!["veth1".into()],
            addresses: vec![Ipv4Addr::new(10, 0, 0, 5)],
        };
        let line = serde_json::to_string(&request).unwrap();
        assert!(line.contains("\"command\":\"ADD\""), "{line}");
        assert!(!line.contains('\n'));
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), request);
    }
}
