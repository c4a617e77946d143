//! What a hostile pod or host process does, for the tests that check the mesh refuses it:
//! take another pod's address and announce it (gratuitous ARP), connect from an address it
//! does not own, craft a SYN on a raw socket, send a SYN with IP options over a path whose
//! MTU fragments it, speak IPv6 link-local, and run a process in a cgroup of its choosing.
//! Every call is bounded in time; nothing is sent outside the test's namespaces.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};

use crate::netns::Netns;

/// An ARP announcement (RFC 5227, what `arping -U` sends) claiming `ip` for `mac`: a
/// broadcast request with the address as both sender and target, which neighbour tables take
/// over an entry. `hardware` is the ARP hardware type: 1 (Ethernet) or 6 (IEEE 802), both of
/// which Linux accepts on an Ethernet link.
pub fn arp_announcement(mac: [u8; 6], ip: Ipv4Addr, hardware: u8) -> Vec<u8> {
    let mut frame = Vec::with_capacity(42);
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&0x0806u16.to_be_bytes());
    frame.extend_from_slice(&[0, hardware, 0x08, 0x00, 6, 4, 0, 1]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ip.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&ip.octets());
    frame
}

/// A UDP datagram in an Ethernet frame to `dst_mac`, inside `tags` VLAN tags with VLAN id 0
/// (priority tags, which a receiving stack strips).
pub fn tagged_udp(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    tags: usize,
    from: SocketAddrV4,
    to: SocketAddrV4,
    payload: &[u8],
) -> Vec<u8> {
    let mut udp = Vec::new();
    udp.extend_from_slice(&from.port().to_be_bytes());
    udp.extend_from_slice(&to.port().to_be_bytes());
    udp.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]); // no checksum (allowed for UDP over IPv4)
    udp.extend_from_slice(payload);
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(20 + udp.len() as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&from.ip().octets());
    ip.extend_from_slice(&to.ip().octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut frame = Vec::new();
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    for _ in 0..tags {
        frame.extend_from_slice(&[0x81, 0x00, 0, 0]);
    }
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.extend(ip);
    frame.extend(udp);
    frame
}

/// Sends `frame` as it is out of `iface` in `ns` (AF_PACKET), as a pod with CAP_NET_RAW can.
pub fn send_frame(ns: &Netns, iface: &str, frame: Vec<u8>) -> Result<()> {
    let ifindex = ifindex(ns, iface)?;
    ns.run(move || {
        // SAFETY: socket(2) with constant arguments; the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: a fresh fd nothing else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_ll is valid; the fields used are set below.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = ifindex as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&frame[..6]);
        send_to(&socket, &frame, &to)
    })
}

/// The MAC address of `iface` in `ns`.
pub fn mac(ns: &Netns, iface: &str) -> Result<[u8; 6]> {
    mac_of(ns, iface)
}

fn mac_of(ns: &Netns, iface: &str) -> Result<[u8; 6]> {
    let links: serde_json::Value = serde_json::from_str(&ns.ip(&["-j", "link", "show", iface])?)?;
    let text = links[0]["address"]
        .as_str()
        .ok_or_else(|| anyhow!("{iface} has no MAC"))?;
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(text.split(':')) {
        *byte = u8::from_str_radix(part, 16)?;
    }
    Ok(mac)
}

/// The ifindex of `iface` in `ns`.
pub fn ifindex(ns: &Netns, iface: &str) -> Result<u32> {
    let links: serde_json::Value = serde_json::from_str(&ns.ip(&["-j", "link", "show", iface])?)?;
    links[0]["ifindex"]
        .as_u64()
        .and_then(|i| u32::try_from(i).ok())
        .ok_or_else(|| anyhow!("{iface} has no ifindex"))
}

/// Connects from inside `ns` to `dst` from the local address `source` (which must be one of
/// the namespace's addresses), within `timeout`.
pub fn connect_from(
    ns: &Netns,
    source: Ipv4Addr,
    dst: SocketAddrV4,
    timeout: Duration,
) -> Result<TcpStream> {
    connect_prepared(ns, dst, timeout, move |stream| bind(stream, source))
}

/// Connects from inside `ns` to `dst` with `options` as the IPv4 options of every packet
/// (`IP_OPTIONS`), within `timeout`: with a path MTU of 68 locked on the route, the kernel
/// fragments the SYN so that its first fragment holds 8 bytes of TCP header, not its flags.
pub fn connect_with_ip_options(
    ns: &Netns,
    dst: SocketAddrV4,
    options: Vec<u8>,
    timeout: Duration,
) -> Result<TcpStream> {
    connect_prepared(ns, dst, timeout, move |stream| {
        set_option(stream, libc::IPPROTO_IP, libc::IP_OPTIONS, &options)
    })
}

/// Connects from inside `ns` to `dst` with `mark` on the socket (`SO_MARK`), within
/// `timeout`: what a host process with CAP_NET_RAW can do to pass as the node proxy.
pub fn connect_marked(
    ns: &Netns,
    mark: u32,
    dst: SocketAddrV4,
    timeout: Duration,
) -> Result<TcpStream> {
    connect_prepared(ns, dst, timeout, move |stream| set_mark(stream, mark))
}

/// Connects from inside `ns` to `dst` within `timeout`, on a socket `prepare` set up first.
fn connect_prepared(
    ns: &Netns,
    dst: SocketAddrV4,
    timeout: Duration,
    prepare: impl FnOnce(&TcpStream) -> Result<()> + Send + 'static,
) -> Result<TcpStream> {
    ns.run(move || {
        let stream = TcpStream::from(socket(libc::SOCK_STREAM, 0)?);
        prepare(&stream)?;
        connect_bounded(stream, dst, timeout)
    })
}

fn set_mark(socket: &impl AsRawFd, mark: u32) -> Result<()> {
    set_option(socket, libc::SOL_SOCKET, libc::SO_MARK, &mark.to_ne_bytes())
}

/// `setsockopt(2)` with `value` as the option's bytes.
fn set_option(
    socket: &impl AsRawFd,
    level: libc::c_int,
    option: libc::c_int,
    value: &[u8],
) -> Result<()> {
    // SAFETY: the buffer is valid for its length.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            option,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context(format!("setsockopt {level}/{option}"));
    }
    Ok(())
}

/// A new IPv4 socket of `kind` (`SOCK_STREAM`, `SOCK_RAW`) for `protocol`.
fn socket(kind: libc::c_int, protocol: libc::c_int) -> Result<OwnedFd> {
    // SAFETY: socket(2) with plain arguments; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, kind | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error().into());
    }
    // SAFETY: a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Binds `socket` to `source` (any port).
fn bind(socket: &impl AsRawFd, source: Ipv4Addr) -> Result<()> {
    let from = sockaddr_in(SocketAddrV4::new(source, 0));
    // SAFETY: the address is valid for its length.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&from as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context(format!("bind to {source}"));
    }
    Ok(())
}

fn sockaddr_in(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// `connect` on a fresh socket, waited for at most `timeout` (non-blocking connect + poll).
fn connect_bounded(stream: TcpStream, dst: SocketAddrV4, timeout: Duration) -> Result<TcpStream> {
    stream.set_nonblocking(true)?;
    let to = sockaddr_in(dst);
    // SAFETY: the address is valid for its length.
    let rc = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            (&to as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(err).context(format!("connect to {dst}"));
        }
        let mut pfd = libc::pollfd {
            fd: stream.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        if ready == 0 {
            bail!("connect to {dst}: timed out after {timeout:?}");
        }
        if let Some(err) = stream.take_error()? {
            return Err(err).context(format!("connect to {dst}"));
        }
    }
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(stream)
}

/// Sends one TCP SYN to `dst` from `source` on a raw socket in `ns`, as a process with
/// CAP_NET_RAW can: no `connect()`, so no connect hook sees it. With `mark`, the socket
/// carries it (`SO_MARK`, which CAP_NET_RAW allows too).
pub fn raw_syn(ns: &Netns, source: Ipv4Addr, dst: SocketAddrV4, mark: Option<u32>) -> Result<()> {
    ns.run(move || {
        let socket = socket(libc::SOCK_RAW, libc::IPPROTO_TCP)?;
        bind(&socket, source)?;
        if let Some(mark) = mark {
            set_mark(&socket, mark)?;
        }
        // The kernel adds the IP header; this is the TCP header (checksum included).
        let mut tcp = [0u8; 20];
        tcp[0..2].copy_from_slice(&40_000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
        tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x02; // SYN
        tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
        let sum = tcp_checksum(source, *dst.ip(), &tcp);
        tcp[16..18].copy_from_slice(&sum.to_be_bytes());
        send_to(&socket, &tcp, &sockaddr_in(SocketAddrV4::new(*dst.ip(), 0)))
    })
}

/// `sendto(2)` of `bytes` to the socket address `to` (a `sockaddr_in`, `sockaddr_ll`).
fn send_to<A>(socket: &impl AsRawFd, bytes: &[u8], to: &A) -> Result<()> {
    // SAFETY: the buffer and the address are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            0,
            (to as *const A).cast(),
            std::mem::size_of::<A>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error().into());
    }
    Ok(())
}

fn tcp_checksum(src: Ipv4Addr, dst: Ipv4Addr, segment: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(12 + segment.len());
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(segment);
    checksum(&pseudo)
}

/// The Internet checksum of `bytes`.
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The link-local IPv6 address of `iface` in `ns`, once duplicate address detection is done
/// (waits up to 10 s).
pub fn link_local(ns: &Netns, iface: &str) -> Result<Ipv6Addr> {
    for _ in 0..200 {
        let json = ns.ip(&["-6", "-j", "addr", "show", "dev", iface, "scope", "link"])?;
        let links: serde_json::Value = serde_json::from_str(&json)?;
        let ready = links[0]["addr_info"].as_array().and_then(|infos| {
            infos
                .iter()
                .find(|i| i["tentative"].as_bool() != Some(true))
                .and_then(|i| i["local"].as_str()?.parse().ok())
        });
        if let Some(ip) = ready {
            return Ok(ip);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{iface} in {} has no usable link-local address", ns.name())
}

/// Connects over IPv6 from inside `ns` to `dst` (link-local, out of `iface`) within `timeout`.
pub fn connect_v6(
    ns: &Netns,
    dst: Ipv6Addr,
    port: u16,
    iface: &str,
    timeout: Duration,
) -> Result<TcpStream> {
    let scope = ifindex(ns, iface)?;
    ns.run(move || {
        let to = SocketAddr::V6(SocketAddrV6::new(dst, port, 0, scope));
        TcpStream::connect_timeout(&to, timeout).with_context(|| format!("connect to {to}"))
    })
}

/// Sends one UDP datagram from inside `ns` to `dst`, from `port` (0: any).
pub fn udp_send(ns: &Netns, port: u16, dst: SocketAddr, payload: &'static [u8]) -> Result<()> {
    ns.run(move || {
        let bind: SocketAddr = if dst.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, port).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, port).into()
        };
        UdpSocket::bind(bind)?.send_to(payload, dst)?;
        Ok(())
    })
}

/// A UDP socket bound in `ns` (all addresses, both families) that tells what it received.
pub struct UdpSink(UdpSocket);

impl UdpSink {
    /// Binds `[::]:port` in `ns`.
    pub fn bind(ns: &Netns, port: u16) -> Result<UdpSink> {
        let socket = ns.run(move || Ok(UdpSocket::bind(("::", port))?))?;
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(UdpSink(socket))
    }

    /// The datagrams that arrive within `wait`.
    pub fn received(&self, wait: Duration) -> Vec<Vec<u8>> {
        let deadline = std::time::Instant::now() + wait;
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while std::time::Instant::now() < deadline {
            if let Ok((n, _)) = self.0.recv_from(&mut buf) {
                got.push(buf[..n].to_vec());
            }
        }
        got
    }
}

/// A cgroup (v2) the test makes, removed on drop (after its processes are gone); name it
/// after the cluster's id, so a killed test's is swept by the next cluster.
pub struct Cgroup {
    path: PathBuf,
    /// The path below the cgroup v2 root, as mesh-node's `--kubelet-cgroup` takes it.
    pub relative: String,
}

impl Cgroup {
    /// Creates `<cgroup v2 root>/<name>`.
    pub fn create(name: &str) -> Result<Cgroup> {
        let root = cgroup2_root()?;
        let path = root.join(name);
        std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Cgroup {
            path,
            relative: format!("/{name}"),
        })
    }

    /// Its `cgroup.procs` file: a PID written there moves that process in.
    pub fn procs(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// Runs `ip netns exec NS PROGRAM ARGS` as a process of this cgroup (it moves itself in
    /// before it execs); returns whether it exited with success, within 10 s.
    pub fn run_in(&self, ns: &Netns, program: &str, args: &[&str]) -> Result<bool> {
        let procs = self.procs();
        let status = Command::new("timeout")
            .arg("10")
            .arg("sh")
            .arg("-c")
            .arg("echo $$ > \"$0\" && exec ip netns exec \"$@\"")
            .arg(&procs)
            .arg(ns.name())
            .arg(program)
            .args(args)
            .status()?;
        Ok(status.success())
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Where the cgroup v2 hierarchy is mounted (the first `cgroup2` mount of its root).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (fields, rest) = line.split_once(" - ")?;
            let mut fields = fields.split_whitespace();
            if !rest.starts_with("cgroup2 ") || fields.nth(3)? != "/" {
                return None;
            }
            fields.next().map(|point| Path::new(point).to_path_buf())
        })
        .ok_or_else(|| anyhow!("no cgroup v2 hierarchy is mounted"))
}

/// How many file descriptors process `pid` holds.
pub fn open_fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}
