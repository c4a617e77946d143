//! Start-up checks: the privileges, kernel features and tools mesh-node needs. Everything
//! missing is reported at once, by name, before anything is changed on the node.

use std::path::Path;

use crate::sys;

const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// What is missing.
#[derive(Debug, thiserror::Error)]
#[error("mesh-node cannot manage this node's datapath:\n  - {}", .missing.join("\n  - "))]
pub struct PreflightError {
    /// One line per missing item, naming it and what to do.
    pub missing: Vec<String>,
}

/// Checks everything `run` and `uninstall` need; `bpffs` is the pin root (`--bpffs`).
pub fn check(bpffs: &Path) -> Result<(), PreflightError> {
    let mut missing = Vec::new();
    match sys::effective_capabilities() {
        Ok(caps) => missing.extend(missing_capabilities(caps)),
        Err(err) => missing.push(format!("cannot read capabilities: {err}")),
    }
    let release = sys::kernel_release();
    if !kernel_at_least(&release, 6, 6) {
        missing.push(format!(
            "kernel {release} is older than 6.6: TCX links are needed so programs stay \
             attached while mesh-node is stopped"
        ));
    }
    if !Path::new("/proc/self/ns/net").exists() {
        missing.push("/proc/self/ns/net is not available (network namespaces)".into());
    }
    match sys::is_bpffs(bpffs) {
        Ok(true) => {}
        Ok(false) => missing.push(format!(
            "{} is not on a bpf filesystem: mount one (`mount -t bpf bpf {}`) or point --bpffs \
             at one",
            bpffs.display(),
            bpffs.display()
        )),
        Err(err) => missing.push(format!(
            "bpf filesystem {} is not usable ({err}): mount one (`mount -t bpf bpf {}`) or \
             point --bpffs at one",
            bpffs.display(),
            bpffs.display()
        )),
    }
    for tool in ["ip", "iptables", "nft"] {
        if !on_path(tool) {
            missing.push(format!(
                "`{tool}` is not on PATH (install iproute2, iptables and nftables)"
            ));
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PreflightError { missing })
    }
}

fn missing_capabilities(caps: u64) -> Vec<String> {
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    let mut missing = Vec::new();
    for (cap, name, why) in [
        (
            CAP_NET_ADMIN,
            "CAP_NET_ADMIN",
            "attach TC/sk_lookup programs, routing rules, iptables",
        ),
        (
            CAP_NET_RAW,
            "CAP_NET_RAW",
            "transparent listeners (IP_TRANSPARENT) and socket marks",
        ),
    ] {
        if !has(cap) {
            missing.push(format!("capability {name} ({why})"));
        }
    }
    if !has(CAP_SYS_ADMIN) {
        for (cap, name, why) in [
            (CAP_BPF, "CAP_BPF", "load eBPF programs and maps"),
            (
                CAP_PERFMON,
                "CAP_PERFMON",
                "eBPF programs that look up sockets",
            ),
        ] {
            if !has(cap) {
                missing.push(format!("capability {name} or CAP_SYS_ADMIN ({why})"));
            }
        }
    }
    missing
}

fn kernel_at_least(release: &str, major: u32, minor: u32) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    match (parts.next(), parts.next()) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => false,
    }
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_every_missing_capability() {
        let missing = missing_capabilities(0);
        let text = missing.join("\n");
        for name in ["CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_BPF", "CAP_PERFMON"] {
            assert!(text.contains(name), "{text}");
        }
        let all = (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW) | (1 << CAP_BPF) | (1 << CAP_PERFMON);
        assert!(missing_capabilities(all).is_empty());
        let admin = (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW) | (1 << CAP_SYS_ADMIN);
        assert!(missing_capabilities(admin).is_empty());
    }

    #[test]
    fn compares_kernel_releases() {
        assert!(kernel_at_least("6.18.44-fc-v657", 6, 6));
        assert!(kernel_at_least("6.6.0", 6, 6));
        assert!(!kernel_at_least("6.1.90", 6, 6));
        assert!(!kernel_at_least("5.15.0-generic", 6, 6));
        assert!(!kernel_at_least("", 6, 6));
    }
}
