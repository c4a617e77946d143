//! Test harness: a K3s-like cluster built in network namespaces (DESIGN.md's test topology),
//! real TCP apps in pod namespaces, and mesh-node processes in node namespaces.
//!
//! - [`netns`]: namespaces, commands inside them, threads entered into them;
//! - [`cluster`]: the topology (fabric bridge, nodes with `cni0` and a flannel-like VXLAN,
//!   pods on veths, kube-proxy-like DNAT of Service VIPs) built from a mesh config file,
//!   with mesh-node started per node and everything removed on drop, also on panic;
//! - [`cni`]: pods started as a container runtime starts them: a new namespace, then the
//!   node's CNI chain (Debian's `bridge` + `host-local`, then the mesh's plugin);
//! - [`apps`]: echo and greeting servers, and clients that check every byte;
//! - [`attack`]: what a hostile pod or host process does (address theft with a gratuitous
//!   ARP, spoofed sources, raw SYNs, fragmented SYNs, IPv6 link-local, its own cgroup);
//! - [`kube_api`]: a fake Kubernetes API server (list/watch wire protocol, bookmarks, 410 Gone,
//!   dropped connections) for the kube source;
//! - [`signer`]: the cluster's signer (`mesh-node ca serve`) in a mount namespace of its own,
//!   where the CA key lives on a tmpfs nothing else sees; memory and file scans for a key;
//! - [`otlp`]: a real OTLP/HTTP trace receiver on the official `opentelemetry-proto` package
//!   (Python), one JSON line per span received;
//! - [`load`]: a fixed-rate HTTP load generator without coordinated omission (`mesh-load`);
//! - [`tools`]: tcpdump, openssl s_client and Prometheus, run inside the test's namespaces;
//! - [`web`]: an HTTP/h2c/gRPC server for pods whose answers name the pod, curl and wrk;
//! - [`ztunnel`]: Istio's ztunnel as the benchmark's peer, in in-pod mode (a ZDS server per
//!   node, istio-cni's in-pod rules, a local config made from the cluster's YAML).
//!
//! Addresses: underlay 100.64.0.0/24, pod CIDR of node i 100.65.i.0/24, Service VIPs in
//! 100.66.0.0/16; nothing routes out of the machine.

pub mod apps;
pub mod attack;
pub mod cluster;
pub mod cni;
pub mod fixtures;
pub mod kube_api;
pub mod load;
pub mod netns;
pub mod otlp;
pub mod signer;
pub mod tools;
pub mod web;
pub mod ztunnel;

/// True when running as root (the end-to-end tests need it; CI runs as root).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Skips the calling test unless root, saying why.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            eprintln!("skipped: needs root (network namespaces, eBPF)");
            return;
        }
    };
}

/// Polls `f` every 20 ms until it holds; panics naming `what` after 10 s. Returns how long it
/// took.
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) -> std::time::Duration {
    let started = std::time::Instant::now();
    while !f() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    started.elapsed()
}
