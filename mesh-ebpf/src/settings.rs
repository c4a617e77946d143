//! Globals mesh-node sets before loading (`EbpfLoader::override_global`): fixed for the life
//! of the loaded programs, so the per-packet path reads a constant instead of a map.

use mesh_common::host_policy;

/// Non-zero: log every steered SYN (`mesh_ebpf=debug`).
#[no_mangle]
static LOG_CAPTURES: u8 = 0;

/// The cookie of the node's network namespace.
#[no_mangle]
static NODE_NETNS_COOKIE: u64 = 0;

/// The cgroup id of mesh-node's own sockets: with `MARK_PROXY`, what marks the proxy's
/// connections (a mark alone can be set by any process with CAP_NET_RAW).
#[no_mangle]
static PROXY_CGROUP: u64 = 0;

/// The cgroup id of a draining predecessor's sockets during a handover (0: none): they are
/// the proxy's too until it exits (cgroup ids are never reused).
#[no_mangle]
static PREDECESSOR_CGROUP: u64 = 0;

/// `--host-traffic`: a `mesh_common::host_policy` value.
#[no_mangle]
static HOST_POLICY: u8 = host_policy::KUBELET_ONLY;

/// Non-zero with `--udp-to-enrolled=dns-only`.
#[no_mangle]
static UDP_DNS_ONLY: u8 = 0;

/// Whether every steered SYN is logged.
#[inline(always)]
pub fn log_captures() -> bool {
    // SAFETY: a read of a plain global that user space sets before loading.
    unsafe { core::ptr::read_volatile(&LOG_CAPTURES) != 0 }
}

/// The node's network namespace cookie.
#[inline(always)]
pub fn node_netns_cookie() -> u64 {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&NODE_NETNS_COOKIE) }
}

/// Whether `cgroup` is mesh-node's (the active one's or a draining predecessor's).
#[inline(always)]
pub fn is_proxy_cgroup(cgroup: u64) -> bool {
    // SAFETY: as above.
    let (proxy, predecessor) = unsafe {
        (
            core::ptr::read_volatile(&PROXY_CGROUP),
            core::ptr::read_volatile(&PREDECESSOR_CGROUP),
        )
    };
    cgroup == proxy || (predecessor != 0 && cgroup == predecessor)
}

/// Whether every connection from the node may reach enrolled pods directly.
#[inline(always)]
pub fn host_traffic_allowed() -> bool {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&HOST_POLICY) == host_policy::ALLOW }
}

/// Whether UDP to enrolled pods is limited to DNS.
#[inline(always)]
pub fn udp_dns_only() -> bool {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&UDP_DNS_ONLY) != 0 }
}
