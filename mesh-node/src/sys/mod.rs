//! The one place that talks to the kernel through raw `libc` calls. Every `unsafe` block of
//! mesh-node lives here, each with a `SAFETY:` comment.
#![allow(unsafe_code)]

mod netlink;

pub use netlink::{
    destroy_tcp, established_tcp, own_cgroup_id, peer_interface, LinkEvents, PeerInterface,
    TcpSocket,
};

use std::{
    io,
    mem::{size_of, zeroed},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

/// `SO_ORIGINAL_DST` from `<linux/netfilter_ipv4.h>`.
const SO_ORIGINAL_DST: libc::c_int = 80;
/// `BPF_FS_MAGIC` from `<linux/magic.h>`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The destination a connection had before any NAT on this node, from conntrack
/// (`SO_ORIGINAL_DST`). `None` when conntrack does not track the connection.
pub fn original_dst(fd: &impl AsRawFd) -> Option<SocketAddr> {
    // SAFETY: an all-zero sockaddr_in is valid; getsockopt writes at most `len` bytes into it.
    let mut addr: libc::sockaddr_in = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: the fd is a live socket owned by the caller; pointer and length describe `addr`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc != 0 || addr.sin_family != libc::AF_INET as libc::sa_family_t {
        return None;
    }
    Some(SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    )))
}

/// Whether `path` is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: an all-zero statfs is valid; statfs fills it from a NUL-terminated path.
    let mut buf: libc::statfs = unsafe { zeroed() };
    // SAFETY: both pointers are valid for the duration of the call.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut buf) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(buf.f_type as i64 == BPF_FS_MAGIC)
}

/// Wanted open-file limit: every proxied connection takes two descriptors.
const NOFILE: u64 = 1 << 20;

/// Raises the open-file limit to 2^20 (as root), or at least the soft limit to the hard
/// one; returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    // SAFETY: an all-zero rlimit is valid and getrlimit fills it.
    let mut lim: libc::rlimit = unsafe { zeroed() };
    // SAFETY: the pointer is valid for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let wanted = libc::rlimit {
        rlim_cur: lim.rlim_max.max(NOFILE),
        rlim_max: lim.rlim_max.max(NOFILE),
    };
    // SAFETY: the pointer is valid for the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) } == 0 {
        return Ok(wanted.rlim_cur);
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: the pointer is valid for the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim.rlim_cur)
}

/// Sets the calling thread's nice value (on Linux each thread has its own): `nice` above 0
/// lowers it, which needs no privilege.
pub fn set_thread_nice(nice: i32) -> io::Result<()> {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: a plain syscall on this thread's own id.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `IP_BIND_ADDRESS_NO_PORT`: a socket bound to an address with port 0 gets its port at
/// `connect()`, per destination, so many connections from one source address (the proxy
/// dials as the client pod) do not exhaust the ephemeral ports.
pub fn set_bind_address_no_port(fd: &impl AsRawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: the fd is a live socket owned by the caller; the pointer and length describe
    // `one`.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Effective capability bits of this process (`CapEff` in /proc/self/status).
pub fn effective_capabilities() -> io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or_else(|| io::Error::other("no CapEff line in /proc/self/status"))
}

/// The kernel release (`uname -r`), e.g. `6.18.44`.
pub fn kernel_release() -> String {
    // SAFETY: an all-zero utsname is valid and uname fills it.
    let mut uts: libc::utsname = unsafe { zeroed() };
    // SAFETY: the pointer is valid for the call.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return String::new();
    }
    // SAFETY: uname NUL-terminates `release`.
    unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Blocks until `fd` is readable.
pub fn wait_readable(fd: &impl AsRawFd) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: `pfd` is a valid pollfd array of length 1 for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, -1) };
        if rc >= 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// An exclusive, non-blocking `flock` on a directory, held until the returned fd is dropped.
/// `Ok(None)` when another process holds it.
pub fn try_lock_dir(path: &Path) -> io::Result<Option<OwnedFd>> {
    let dir = std::fs::File::open(path)?;
    // SAFETY: flock on an fd we own; LOCK_NB makes it return at once.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(err)
        };
    }
    Ok(Some(dir.into()))
}

/// Runs `work` in the network namespace at `path` (a `/proc/PID/ns/net` or a bind mount
/// of one), on a thread of its own that ends with it: the caller's namespace is untouched.
pub fn in_netns<T: Send + 'static>(
    path: std::path::PathBuf,
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || {
            let file = std::fs::File::open(&path)?;
            // SAFETY: setns on a valid namespace fd, on this short-lived thread only.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            work()
        })?
        .join()
        .map_err(|_| io::Error::other("the thread in the other network namespace panicked"))?
}

/// The network namespaces of this machine other than the caller's: one path each (a
/// process's `/proc/PID/ns/net`, or a bind mount under `/run/netns`), told apart by inode.
pub fn other_network_namespaces() -> Vec<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let inode = |path: &Path| std::fs::metadata(path).map(|m| m.ino()).ok();
    let mut seen: std::collections::BTreeSet<u64> =
        inode(Path::new("/proc/self/ns/net")).into_iter().collect();
    let mut paths = Vec::new();
    let procs = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .map(|e| e.path().join("ns/net"));
    let mounts = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path());
    for path in mounts.chain(procs) {
        if let Some(ino) = inode(&path) {
            if seen.insert(ino) {
                paths.push(path);
            }
        }
    }
    paths
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`, Linux >= 5.14):
/// what `bpf_get_netns_cookie` returns for sockets of that namespace.
pub fn netns_cookie() -> io::Result<u64> {
    // SAFETY: socket(2) with constant arguments; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: the fd is a live socket we own; pointer and length describe `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Opens the root of the cgroup v2 hierarchy, where programs attached see every process of
/// the machine: the first `cgroup2` mount this process sees that is the root (the root has
/// no `cgroup.events`; in a container with its own cgroup namespace, a mount of the host's
/// hierarchy, such as the DaemonSet's hostPath at /sys/fs/cgroup, is one, the runtime's own
/// mount is not), else a private mount of it that is detached again at once (`ip netns exec`
/// gives its command a fresh /sys without cgroup mounts); the open directory stays usable.
/// Returns the directory and where it was found.
pub fn open_cgroup2_root() -> io::Result<(std::fs::File, String)> {
    let is_root = |dir: &std::fs::File| {
        let events = format!("/proc/self/fd/{}/cgroup.events", dir.as_raw_fd());
        !Path::new(&events).exists()
    };
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    for path in cgroup2_mounts(&mountinfo) {
        if let Ok(dir) = std::fs::File::open(&path) {
            if is_root(&dir) {
                return Ok((dir, path));
            }
        }
    }
    // A directory of our own: mkdir fails rather than reuse anything already there.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir =
        std::env::temp_dir().join(format!("mesh-node-cgroup2-{}-{nanos}", std::process::id()));
    std::fs::create_dir(&dir)?;
    let result = mount_and_open_cgroup2(&dir);
    let _ = std::fs::remove_dir(&dir);
    let dir = result?;
    if !is_root(&dir) {
        return Err(io::Error::other(
            "this process's cgroup namespace is not the host's and no mount of the host's \
             cgroup v2 hierarchy is visible: mount it (the DaemonSet mounts the host's \
             /sys/fs/cgroup)",
        ));
    }
    Ok((dir, "a private cgroup2 mount".to_string()))
}

fn mount_and_open_cgroup2(dir: &Path) -> io::Result<std::fs::File> {
    let target = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: NUL-terminated strings that outlive the call; no data argument.
    let rc = unsafe {
        libc::mount(
            c"cgroup2".as_ptr(),
            target.as_ptr(),
            c"cgroup2".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let file = std::fs::File::open(dir);
    // SAFETY: as above; MNT_DETACH unmounts lazily while `file` keeps the directory usable.
    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    file
}

/// The mount points of the `cgroup2` filesystems in a mountinfo listing, in order.
fn cgroup2_mounts(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (fields, rest) = line.split_once(" - ")?;
            if rest.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            // Mount points escape spaces and the like as octal (\040).
            let point = fields.split_whitespace().nth(4)?;
            Some(point.replace("\\040", " "))
        })
        .collect()
}

#[cfg(test)]
mod cgroup_tests {
    use super::*;

    #[test]
    fn cgroup2_mounts_are_found_in_mountinfo() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                      32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mounts(hybrid), ["/sys/fs/cgroup/unified"]);
        // A container with its own cgroup namespace and the host's hierarchy mounted over
        // its own: both are listed, the root is told apart by its content.
        let container = "30 23 0:26 / /sys/fs/cgroup ro shared:4 - cgroup2 cgroup2 rw\n\
                         40 30 0:26 /../../.. /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mounts(container),
            ["/sys/fs/cgroup", "/sys/fs/cgroup"]
        );
        assert!(cgroup2_mounts("31 23 0:28 / /sys rw - sysfs sysfs rw\n").is_empty());
        let spaced = "41 31 0:38 / /mnt/my\\040cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mounts(spaced), ["/mnt/my cgroup"]);
    }
}

/// The file mappings present when start-up began (before any other thread), by range: only
/// these are released later. A library or a file mapped and unmapped meanwhile (a `dlopen`,
/// a backtrace reading the binary) could have its range reused for live memory between
/// reading smaps and `madvise`.
static STARTUP_MAPPINGS: std::sync::OnceLock<Vec<(u64, u64)>> = std::sync::OnceLock::new();

/// Notes the process's file mappings; call first thing, before other threads exist.
pub fn note_startup_mappings() {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let ranges = maps
        .lines()
        .filter_map(mapping_header)
        .filter(|(_, _, _, path)| path.starts_with('/'))
        .map(|(start, end, _, _)| (start, end))
        .collect();
    let _ = STARTUP_MAPPINGS.set(ranges);
}

/// Gives back what start-up used and no longer needs: heap pages freed since (the parsed
/// kernel BTF, the first config's YAML documents: `malloc_trim`), and the pages of files
/// mapped read-only - this binary's and its libraries' code and constants, the embedded eBPF
/// object among them - from the page tables (`MADV_DONTNEED` on the private read-only file
/// mappings noted at start ([`note_startup_mappings`]) that hold no private copy of a page,
/// resident or swapped, as relocations, a uprobe or a breakpoint leave: the pages stay in
/// the page cache, and what is used again is mapped back from there on its next use).
/// Returns the resident bytes unmapped.
pub fn release_startup_memory() -> io::Result<u64> {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
    let noted = STARTUP_MAPPINGS
        .get()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut released = 0u64;
    for mapping in clean_file_mappings(&smaps) {
        if !noted.contains(&(mapping.start, mapping.end)) {
            continue;
        }
        // SAFETY: the range is one of this process's own mappings since start-up: private,
        // read-only, file-backed, not locked or huge-page backed, with no private (changed)
        // page, resident or swapped. Dropping its page-table entries makes the next access
        // fault the same file contents back in.
        let rc = unsafe {
            libc::madvise(
                mapping.start as *mut libc::c_void,
                (mapping.end - mapping.start) as usize,
                libc::MADV_DONTNEED,
            )
        };
        if rc == 0 {
            released += mapping.resident;
        }
    }
    Ok(released)
}

/// A read-only file mapping, as /proc/self/smaps lists it.
#[derive(Debug, PartialEq)]
struct FileMapping {
    start: u64,
    end: u64,
    /// Resident bytes.
    resident: u64,
}

/// One mapping of a smaps listing, as far as read.
#[derive(Default)]
struct SmapsEntry {
    start: u64,
    end: u64,
    /// Private, read-only, backed by a file.
    read_only_file: bool,
    rss: Option<u64>,
    anonymous: Option<u64>,
    swap: Option<u64>,
    private_hugetlb: u64,
    /// Locked, huge-page, PFN, I/O or userfaultfd (missing, write-protect, minor) mappings
    /// (VmFlags): never released.
    special: bool,
}

impl SmapsEntry {
    fn clean(&self) -> Option<FileMapping> {
        let clean = self.read_only_file
            && self.anonymous == Some(0)
            && self.swap == Some(0)
            && self.private_hugetlb == 0
            && !self.special;
        Some(FileMapping {
            start: self.start,
            end: self.end,
            resident: self.rss? * 1024,
        })
        .filter(|_| clean)
    }
}

/// The private read-only file mappings without private pages, from a smaps listing.
fn clean_file_mappings(smaps: &str) -> Vec<FileMapping> {
    let mut found = Vec::new();
    let mut current: Option<SmapsEntry> = None;
    for line in smaps.lines() {
        let kib = |key: &str| -> Option<u64> {
            line.strip_prefix(key)?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        };
        if let Some((start, end, perms, path)) = mapping_header(line) {
            found.extend(current.take().and_then(|entry| entry.clean()));
            current = Some(SmapsEntry {
                start,
                end,
                read_only_file: (perms == "r-xp" || perms == "r--p") && path.starts_with('/'),
                ..SmapsEntry::default()
            });
            continue;
        }
        let Some(entry) = current.as_mut() else {
            continue;
        };
        if let Some(v) = kib("Rss:") {
            entry.rss = Some(v);
        } else if let Some(v) = kib("Anonymous:") {
            entry.anonymous = Some(v);
        } else if let Some(v) = kib("Swap:") {
            entry.swap = Some(v);
        } else if let Some(v) = kib("Private_Hugetlb:") {
            entry.private_hugetlb = v;
        } else if let Some(flags) = line.strip_prefix("VmFlags:") {
            entry.special = flags
                .split_whitespace()
                .any(|f| matches!(f, "lo" | "ht" | "pf" | "io" | "um" | "uw" | "ui"));
        }
    }
    found.extend(current.and_then(|entry| entry.clean()));
    found
}

/// The range, permissions and path of a maps/smaps mapping line (`None` for other lines).
fn mapping_header(line: &str) -> Option<(u64, u64, &str, &str)> {
    let mut fields = line.splitn(6, ' ');
    let (start, end) = fields.next()?.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let perms = fields.next()?;
    if perms.len() != 4 {
        return None;
    }
    let path = fields.nth(3).map_or("", str::trim_start);
    Some((start, end, perms, path))
}

#[cfg(test)]
mod startup_memory_tests {
    use super::*;

    #[test]
    fn only_unchanged_read_only_file_mappings_are_picked() {
        let entry = |range: &str, perms: &str, path: &str, rss: u64, anon: u64, swap: u64| {
            format!(
                "{range} {perms} 00000000 fe:00 5440320    {path}\n\
                 Rss:          {rss} kB\n\
                 Anonymous:    {anon} kB\n\
                 Swap:         {swap} kB\n\
                 SwapPss:      0 kB\n\
                 Private_Hugetlb:  0 kB\n\
                 VmFlags: rd mr mw me\n"
            )
        };
        let exe = "/usr/bin/mesh-node";
        let smaps = [
            entry("55a3f17bd000-55a3f1a91000", "r--p", exe, 100, 0, 0),
            entry("55a3f1a91000-55a3f1e81000", "r-xp", exe, 8000, 0, 0),
            // A changed page (as a uprobe leaves).
            entry("55a3f1e81000-55a3f1ee6000", "r-xp", exe, 40, 4, 0),
            // Relocated constants (RELRO), resident or swapped out.
            entry("55a3f1ee6000-55a3f1ef0000", "r--p", exe, 40, 40, 0),
            entry("55a3f1ef0000-55a3f1ef2000", "r--p", exe, 0, 0, 8),
            // Writable data.
            entry("55a3f1ef2000-55a3f1ef4000", "rw-p", exe, 8, 0, 0),
            entry(
                "7f3a987bb000-7f3a9894f000",
                "r-xp",
                "/usr/lib/libc.so.6",
                1000,
                0,
                0,
            ),
            // Shared.
            entry(
                "7f3a98950000-7f3a98960000",
                "r--s",
                "/memfd:x (deleted)",
                64,
                0,
                0,
            ),
            // Locked.
            entry(
                "7f3a98960000-7f3a98970000",
                "r--p",
                "/data/locked",
                64,
                0,
                0,
            )
            .replace("rd mr mw me", "rd mr mw me lo"),
            // Private huge pages.
            entry(
                "7f3a98a00000-7f3a98c00000",
                "r--p",
                "/anon_hugepage (deleted)",
                0,
                0,
                0,
            )
            .replace("Private_Hugetlb:  0", "Private_Hugetlb:  2048"),
            entry("7ffc1c5d5000-7ffc1c5f6000", "rw-p", "[stack]", 132, 132, 0),
            entry("7ffc1c5f8000-7ffc1c5fa000", "r-xp", "[vdso]", 8, 0, 0),
        ]
        .concat();
        let picked: Vec<(u64, u64)> = clean_file_mappings(&smaps)
            .iter()
            .map(|m| (m.start, m.resident / 1024))
            .collect();
        assert_eq!(
            picked,
            [
                (0x55a3f17bd000, 100),
                (0x55a3f1a91000, 8000),
                (0x7f3a987bb000, 1000)
            ]
        );
    }

    fn rss_file_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("RssFile:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    #[test]
    fn releasing_start_up_memory_unmaps_code_and_the_code_still_runs() {
        note_startup_mappings();
        let before = rss_file_kib();
        let released = release_startup_memory().unwrap();
        let after = rss_file_kib();
        assert!(released > 0, "no resident read-only file mapping was found");
        assert!(after < before, "RssFile {before} kB -> {after} kB");
        // This test's own code was unmapped too, and here it still runs; so does a second
        // release, which finds the code faulted back in since.
        assert!(release_startup_memory().unwrap() > 0);
    }
}

/// Most file descriptors one message carries.
pub const MAX_PASSED_FDS: usize = 8;

/// Sends `bytes` on the unix stream socket `socket` with `fds` attached (`SCM_RIGHTS`): the
/// receiver gets its own descriptors of the same open files (sockets keep their queues).
/// A non-blocking socket may answer `WouldBlock`; nothing was sent then.
pub fn send_with_fds(
    socket: &impl AsRawFd,
    bytes: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> io::Result<usize> {
    if fds.len() > MAX_PASSED_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("at most {MAX_PASSED_FDS} descriptors per message"),
        ));
    }
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // u64 elements: aligned for cmsghdr.
    let mut control = [0u64; 16];
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives the sendmsg call.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let data_len = std::mem::size_of_val(fds) as u32;
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(data_len) } as usize;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer (128 bytes) holds one header and 8 descriptors;
        // CMSG_FIRSTHDR of a msghdr with a control buffer that large is non-null.
        unsafe {
            let header = libc::CMSG_FIRSTHDR(&msg);
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = libc::CMSG_LEN(data_len) as usize;
            let data = libc::CMSG_DATA(header).cast::<libc::c_int>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    // SAFETY: `msg` points at live buffers for the duration of the call.
    let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(sent as usize)
    }
}

/// Receives into `buf` from the unix stream socket `socket`, with the descriptors attached
/// to what was read (close-on-exec). `Ok((0, _))` at the end of the stream.
pub fn recv_with_fds(socket: &impl AsRawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 16];
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives the recvmsg call.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: as above.
    let read = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if read < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` up to msg_controllen with well-formed headers; the
    // descriptors of an SCM_RIGHTS header are new and ours to own.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&msg);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(header).cast::<libc::c_int>();
                let count =
                    ((*header).cmsg_len - libc::CMSG_LEN(0) as usize) / size_of::<libc::c_int>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            header = libc::CMSG_NXTHDR(&msg, header);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "descriptors were cut off (more than the control buffer holds)",
        ));
    }
    Ok((read as usize, fds))
}

/// This process's effective user id.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() }
}
