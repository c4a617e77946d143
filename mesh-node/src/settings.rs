//! What `mesh-node run` was asked to do, as one value checked as a whole before anything
//! starts ([`crate::cli`] builds it from the flags and names every invalid one) and logged
//! once at start, so a node's log says what it ran with.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use crate::{
    capture::{host::HostTraffic, UdpToEnrolled},
    cni,
    config::semantics::Mesh,
};

/// The node proxy's settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The node and its pins.
    pub node: Node,
    /// Mesh-wide settings (root namespace, trust domain, request paths).
    pub mesh: Mesh,
    /// Where the resources come from.
    pub source: Source,
    /// The CNI gate's socket, enrolment cache and handover socket.
    pub state_dir: PathBuf,
    /// Where workload certificates come from and which roots are trusted.
    pub signer: SignerSettings,
    /// Lifetime of workload certificates.
    pub cert_lifetime: Duration,
    /// The admin endpoint.
    pub admin_addr: SocketAddr,
    /// This process's own socket for exec probes.
    pub probe_socket: Option<PathBuf>,
    /// A node address, besides loopback, where `/debug/*` answers.
    pub debug_address: Option<IpAddr>,
    /// The experimental same-node socket bypass.
    pub socket_bypass: bool,
    /// What the node's own connections to enrolled pods may do.
    pub host_traffic: HostTraffic,
    /// The kubelet's cgroups, below the cgroup v2 root.
    pub kubelet_cgroups: Vec<PathBuf>,
    /// What UDP may reach enrolled pods.
    pub udp_to_enrolled: UdpToEnrolled,
    /// The CNI plugin to keep installed; `None`: not installed.
    pub cni: Option<cni::Install>,
    /// What the repair pass does about pods that bypassed the gate.
    pub repair: cni::Repair,
    /// How often the repair pass runs.
    pub repair_interval: Duration,
    /// How long this process, once a successor took over, keeps relaying what is open.
    pub drain_timeout: Duration,
    /// Where spans go and the default sampling.
    pub tracing: crate::trace::TracingSettings,
    /// The log filter (tracing `EnvFilter` syntax, already checked).
    pub log: String,
}

/// The signer a node asks for certificates, and the trust bundle.
#[derive(Clone, Debug)]
pub struct SignerSettings {
    /// `host:port` of `mesh-node ca serve`.
    pub address: String,
    /// The signer's SPIFFE ID (its certificate must carry it).
    pub identity: String,
    /// The bearer token the node proves itself with (re-read on every request).
    pub token_file: PathBuf,
    /// The roots (PEM), re-read when the file changes.
    pub trust_bundle: PathBuf,
}

/// A node: its name and where its kernel state is pinned (`run` and `uninstall`).
#[derive(Clone, Debug)]
pub struct Node {
    /// The node's name, as in pods' `spec.nodeName`; also a directory name under `bpffs`.
    pub name: String,
    /// The pin root (a directory on a bpffs).
    pub bpffs: PathBuf,
    /// The runtime's CNI configuration and binary directories, when the plugin is managed.
    pub cni_dirs: Option<(PathBuf, PathBuf)>,
}

/// Where the resources come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A file of Kubernetes-shaped resources, re-read when it changes.
    File(PathBuf),
    /// The Kubernetes API server (with this kubeconfig, or in-cluster credentials).
    Kube { kubeconfig: Option<PathBuf> },
}

/// Exit status for invalid settings or configuration (`EX_USAGE` in sysexits.h).
pub const EXIT_CONFIG: u8 = 64;
/// Exit status when privileges, kernel features or tools are missing (`EX_NOPERM`).
pub const EXIT_PREFLIGHT: u8 = 77;

/// One line, every setting as `name=value`, for the start-up log.
impl fmt::Display for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let duration = |d: Duration| format!("{d:?}");
        let path = |p: &PathBuf| p.display().to_string();
        write!(
            f,
            "node={} bpffs={}",
            self.node.name,
            path(&self.node.bpffs)
        )?;
        match &self.source {
            Source::File(file) => write!(f, " config={}", path(file))?,
            Source::Kube { kubeconfig } => write!(
                f,
                " kube=true kubeconfig={}",
                kubeconfig.as_ref().map_or("in-cluster".into(), path)
            )?,
        }
        write!(
            f,
            " root_namespace={} trust_domain={} path_normalization={} \
             reject_ambiguous_paths={} state_dir={} ca_address={} ca_identity={} \
             ca_token_file={} trust_bundle={} cert_lifetime={} admin_addr={} \
             probe_socket={} debug_address={} socket_bypass={} host_traffic={} kubelet_cgroups={} \
             udp_to_enrolled={} cni={} repair={} repair_interval={} drain_timeout={} tracing={} \
             log={}",
            self.mesh.root_namespace,
            self.mesh.trust_domain,
            self.mesh.paths.normalization,
            self.mesh.paths.reject_ambiguous,
            path(&self.state_dir),
            self.signer.address,
            self.signer.identity,
            path(&self.signer.token_file),
            path(&self.signer.trust_bundle),
            duration(self.cert_lifetime),
            self.admin_addr,
            self.probe_socket.as_ref().map_or("off".into(), path),
            self.debug_address
                .map_or("loopback-only".into(), |a| a.to_string()),
            self.socket_bypass,
            value_name(self.host_traffic),
            self.kubelet_cgroups
                .iter()
                .map(path)
                .collect::<Vec<_>>()
                .join(","),
            value_name(self.udp_to_enrolled),
            self.cni.as_ref().map_or("off".into(), |cni| format!(
                "{}+{}+{}",
                path(&cni.conf_dir),
                path(&cni.bin_dir),
                path(&cni.plugin)
            )),
            value_name(self.repair),
            duration(self.repair_interval),
            duration(self.drain_timeout),
            self.tracing,
            self.log,
        )
    }
}

/// A value's name on the command line.
fn value_name(value: impl clap::ValueEnum) -> String {
    value
        .to_possible_value()
        .map_or_else(|| "?".into(), |v| v.get_name().to_string())
}

/// Why `name` is not a DNS label of at most `max` characters (RFC 1123, as Kubernetes
/// checks object names): lowercase letters, digits and `-` (and `.` between labels when
/// `dots`), starting and ending with a letter or digit.
pub fn dns_name_problem(name: &str, max: usize, dots: bool) -> Option<String> {
    if name.is_empty() {
        return Some("is empty".into());
    }
    if name.len() > max {
        return Some(format!("is longer than {max} characters"));
    }
    let labels: Vec<&str> = if dots {
        name.split('.').collect()
    } else {
        vec![name]
    };
    for label in labels {
        let alnum =
            |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !alnum(label.chars().next()) || !alnum(label.chars().last()) {
            return Some(format!(
                "{name:?} must start and end{} with a lowercase letter or digit",
                if dots {
                    " (each dot-separated part)"
                } else {
                    ""
                }
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Some(format!(
                "{name:?} has {c:?}: only lowercase letters, digits, '-'{}",
                if dots { " and '.'" } else { "" }
            ));
        }
    }
    None
}

/// Why `domain` is not a SPIFFE trust domain name (lowercase letters, digits, `.`, `-`, `_`).
pub fn trust_domain_problem(domain: &str) -> Option<String> {
    if domain.is_empty() {
        return Some("is empty".into());
    }
    if domain.len() > 255 {
        return Some("is longer than 255 characters".into());
    }
    domain
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
        .map(|c| {
            format!("{domain:?} has {c:?}: a SPIFFE trust domain has only lowercase letters, digits, '.', '-' and '_'")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names_follow_rfc_1123() {
        assert_eq!(dns_name_problem("node-1", 63, false), None);
        assert_eq!(
            dns_name_problem("ip-10-0-0-1.ec2.internal", 253, true),
            None
        );
        assert!(dns_name_problem("", 63, false).is_some());
        assert!(dns_name_problem("Node", 63, false)
            .unwrap()
            .contains("lowercase"));
        assert!(dns_name_problem("a/b", 253, true).unwrap().contains("'/'"));
        assert!(dns_name_problem("a.b", 63, false).unwrap().contains("'.'"));
        assert!(dns_name_problem("../b", 253, true).is_some());
        assert!(dns_name_problem("-a", 63, false).is_some());
        assert!(dns_name_problem("a..b", 253, true).is_some());
        assert!(dns_name_problem(&"a".repeat(64), 63, false)
            .unwrap()
            .contains("63"));
    }

    #[test]
    fn trust_domains_follow_spiffe() {
        assert_eq!(trust_domain_problem("cluster.local"), None);
        assert_eq!(trust_domain_problem("example_org-1.io"), None);
        assert!(trust_domain_problem("").is_some());
        assert!(trust_domain_problem("Example.org").is_some());
        assert!(trust_domain_problem("a/ns/x").unwrap().contains("'/'"));
    }
}
