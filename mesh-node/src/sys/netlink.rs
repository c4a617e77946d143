//! Netlink, spoken raw: the link and address events the datapath rescans on, what a pod's
//! end of its veth holds (its addresses and MAC, in the pod's namespace, known here only by
//! its id), and the cgroup of mesh-node's own sockets (sock_diag). `ip` cannot ask the
//! first two of a namespace it has no name for, nor `ss` the third as a number. The repair
//! pass lists established TCP sockets and aborts one (sock_diag, `SOCK_DESTROY`) in pods'
//! namespaces, which it enters on a thread of its own.

use std::{
    io,
    mem::{size_of, zeroed},
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

/// `NETLINK_LISTEN_ALL_NSID` from `<linux/netlink.h>`.
const NETLINK_LISTEN_ALL_NSID: libc::c_int = 8;
/// `NETLINK_GET_STRICT_CHK` from `<linux/netlink.h>`.
const NETLINK_GET_STRICT_CHK: libc::c_int = 12;
/// `NETLINK_SOCK_DIAG` from `<linux/netlink.h>`.
const NETLINK_SOCK_DIAG: libc::c_int = 4;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `SOCK_DESTROY` from `<linux/sock_diag.h>` (CONFIG_INET_DIAG_DESTROY).
const SOCK_DESTROY: u16 = 21;
/// `TCP_ESTABLISHED` from `<net/tcp_states.h>`.
const TCP_ESTABLISHED: u32 = 1;
/// `IFLA_ADDRESS`, `IFLA_TARGET_NETNSID` from `<linux/if_link.h>`.
const IFLA_ADDRESS: u16 = 1;
const IFLA_TARGET_NETNSID: u16 = 46;
/// `IFA_LOCAL`, `IFA_TARGET_NETNSID` from `<linux/if_addr.h>`.
const IFA_LOCAL: u16 = 2;
const IFA_TARGET_NETNSID: u16 = 10;
/// `INET_DIAG_CGROUP_ID` from `<linux/inet_diag.h>` (Linux >= 5.8).
const INET_DIAG_CGROUP_ID: u16 = 21;
const TCP_LISTEN: u32 = 10;

/// A netlink socket subscribed to link and IPv4 address changes (`RTMGRP_LINK`,
/// `RTMGRP_IPV4_IFADDR`) of this network namespace and of every namespace it has an id for
/// (the pods' ends of their veths).
pub struct LinkEvents {
    fd: OwnedFd,
}

impl LinkEvents {
    /// Opens the socket.
    pub fn open() -> io::Result<LinkEvents> {
        let fd = socket(libc::NETLINK_ROUTE)?;
        // SAFETY: an all-zero sockaddr_nl is valid; we set family and groups.
        let mut addr: libc::sockaddr_nl = unsafe { zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR) as u32;
        // SAFETY: pointer and length describe `addr`.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // A pod's address appearing, or another pod claiming it, happens in the pods'
        // namespaces.
        set_option(&fd, NETLINK_LISTEN_ALL_NSID)?;
        Ok(LinkEvents { fd })
    }

    /// Blocks until at least one event arrives (its content is not needed: the caller
    /// rescans).
    pub fn wait(&self) -> io::Result<()> {
        let mut buf = [0u8; 16 * 1024];
        // SAFETY: the buffer is valid for `buf.len()` bytes.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            // ENOBUFS: events were lost; a rescan covers them.
            if err.raw_os_error() != Some(libc::ENOBUFS) {
                return Err(err);
            }
        }
        Ok(())
    }
}

impl AsRawFd for LinkEvents {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// What a pod's end of its veth holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerInterface {
    /// Its IPv4 addresses.
    pub addresses: Vec<Ipv4Addr>,
    /// Its MAC address.
    pub mac: Option<[u8; 6]>,
}

/// Interface `ifindex` of the network namespace this one knows as `nsid` (a veth's
/// `link_netnsid`): its MAC (`RTM_GETLINK`) and IPv4 addresses (an `RTM_GETADDR` dump), asked
/// with `IFLA_TARGET_NETNSID`/`IFA_TARGET_NETNSID` (Linux >= 4.20) and strict checking, so
/// the kernel filters by interface.
pub fn peer_interface(nsid: i32, ifindex: u32) -> io::Result<PeerInterface> {
    let fd = socket(libc::NETLINK_ROUTE)?;
    set_option(&fd, NETLINK_GET_STRICT_CHK)?;
    let mut peer = PeerInterface::default();
    // ifinfomsg: family, pad, type, index, flags, change.
    let mut link = vec![0u8; 4];
    link.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    link.extend_from_slice(&[0; 8]);
    link.extend(attribute(IFLA_TARGET_NETNSID, &nsid.to_ne_bytes()));
    exchange(&fd, RTM_GETLINK, false, &link, |kind, payload| {
        if kind == RTM_NEWLINK {
            let mac = attributes(payload.get(16..).unwrap_or_default())
                .find(|(kind, value)| *kind == IFLA_ADDRESS && value.len() == 6);
            peer.mac =
                mac.map(|(_, value)| [value[0], value[1], value[2], value[3], value[4], value[5]]);
        }
    })?;
    // ifaddrmsg: family, prefix length, flags, scope, index.
    let mut addr = vec![libc::AF_INET as u8, 0, 0, 0];
    addr.extend_from_slice(&ifindex.to_ne_bytes());
    addr.extend(attribute(IFA_TARGET_NETNSID, &nsid.to_ne_bytes()));
    exchange(&fd, RTM_GETADDR, true, &addr, |kind, payload| {
        if kind == RTM_NEWADDR {
            for (kind, value) in attributes(payload.get(8..).unwrap_or_default()) {
                if let (IFA_LOCAL, &[a, b, c, d]) = (kind, value) {
                    peer.addresses.push(Ipv4Addr::new(a, b, c, d));
                }
            }
        }
    })?;
    Ok(peer)
}

/// The cgroup (v2) id of the sockets this process makes: what `bpf_skb_cgroup_id` and
/// `bpf_get_current_cgroup_id` give for them in the kernel programs, read back from a
/// listening socket of ours through sock_diag (`INET_DIAG_CGROUP_ID`, Linux >= 5.8), which
/// works whatever cgroup namespace mesh-node runs in.
pub fn own_cgroup_id() -> io::Result<u64> {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let port = listener.local_addr()?.port();
    let fd = socket(NETLINK_SOCK_DIAG)?;
    // inet_diag_req_v2: family, protocol, extensions, pad, states, then an empty socket id.
    let mut request = vec![libc::AF_INET as u8, libc::IPPROTO_TCP as u8, 0, 0];
    request.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    request.extend_from_slice(&[0; 48]);
    let mut found = None;
    exchange(&fd, SOCK_DIAG_BY_FAMILY, true, &request, |_, payload| {
        // inet_diag_msg: family, state, timer, retransmits, then the socket id (source
        // port first, network order) ...; 72 bytes before the attributes.
        let Some(id) = payload.get(4..8) else { return };
        let source = u16::from_be_bytes([id[0], id[1]]);
        let local = payload.get(8..12) == Some(&Ipv4Addr::LOCALHOST.octets()[..]);
        if source != port || !local {
            return;
        }
        for (kind, value) in attributes(payload.get(72..).unwrap_or_default()) {
            if let (INET_DIAG_CGROUP_ID, Ok(bytes)) = (kind, <[u8; 8]>::try_from(value)) {
                found = Some(u64::from_ne_bytes(bytes));
            }
        }
    })?;
    drop(listener);
    found.ok_or_else(|| {
        io::Error::other("sock_diag reported no cgroup id for our socket (Linux >= 5.8 needed)")
    })
}

/// An established TCP/IPv4 socket of the calling thread's network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    /// Its own address.
    pub local: SocketAddrV4,
    /// Its peer's.
    pub remote: SocketAddrV4,
}

/// The established TCP/IPv4 sockets of the calling thread's network namespace (sock_diag).
pub fn established_tcp() -> io::Result<Vec<TcpSocket>> {
    let fd = socket(NETLINK_SOCK_DIAG)?;
    let mut request = vec![libc::AF_INET as u8, libc::IPPROTO_TCP as u8, 0, 0];
    request.extend_from_slice(&(1u32 << TCP_ESTABLISHED).to_ne_bytes());
    request.extend_from_slice(&[0; 48]);
    let mut sockets = Vec::new();
    exchange(&fd, SOCK_DIAG_BY_FAMILY, true, &request, |_, payload| {
        // inet_diag_msg: family, state, timer, retransmits, then the socket id: source
        // port, destination port (network order), source and destination (16 bytes each).
        let Some(id) = payload.get(4..52) else { return };
        let address = |at: usize, port_at: usize| {
            SocketAddrV4::new(
                Ipv4Addr::new(id[at], id[at + 1], id[at + 2], id[at + 3]),
                u16::from_be_bytes([id[port_at], id[port_at + 1]]),
            )
        };
        sockets.push(TcpSocket {
            local: address(4, 0),
            remote: address(20, 2),
        });
    })?;
    Ok(sockets)
}

/// Aborts the TCP/IPv4 socket `local` <-> `remote` of the calling thread's network
/// namespace, as `ss -K` does (`SOCK_DESTROY`): its owner gets an error, its peer a reset.
pub fn destroy_tcp(local: SocketAddrV4, remote: SocketAddrV4) -> io::Result<()> {
    let fd = socket(NETLINK_SOCK_DIAG)?;
    let mut request = vec![libc::AF_INET as u8, libc::IPPROTO_TCP as u8, 0, 0];
    request.extend_from_slice(&u32::MAX.to_ne_bytes()); // any state
    request.extend_from_slice(&local.port().to_be_bytes());
    request.extend_from_slice(&remote.port().to_be_bytes());
    for ip in [local.ip(), remote.ip()] {
        request.extend_from_slice(&ip.octets());
        request.extend_from_slice(&[0; 12]);
    }
    request.extend_from_slice(&0u32.to_ne_bytes()); // any interface
    request.extend_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE
    let mut message = message(SOCK_DESTROY, false, &request);
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    message[6..8].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: the buffer is valid for its length; the kernel is the destination.
    let sent = unsafe { libc::send(fd.as_raw_fd(), message.as_ptr().cast(), message.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 1024];
    // SAFETY: the buffer is valid for its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    for answer in messages(&buf[..n as usize]) {
        let (kind, payload) = answer?;
        if kind == libc::NLMSG_ERROR as u16 {
            let errno = payload.get(..4).ok_or_else(truncated)?;
            let errno = i32::from_ne_bytes([errno[0], errno[1], errno[2], errno[3]]);
            return if errno == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(-errno))
            };
        }
    }
    Err(truncated())
}

fn socket(protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_option(fd: &OwnedFd, option: libc::c_int) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: the fd is a live netlink socket; pointer and length describe `on`.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_NETLINK,
            option,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends one request of type `kind` with `body`, and hands each answer's type and payload
/// (after its header) to `each`: until the end of the dump, or the one answer of a plain
/// request. An error answer becomes the error.
fn exchange(
    fd: &OwnedFd,
    kind: u16,
    dump: bool,
    body: &[u8],
    mut each: impl FnMut(u16, &[u8]),
) -> io::Result<()> {
    let request = message(kind, dump, body);
    // SAFETY: the buffer is valid for its length; the kernel is the destination (no address).
    let sent = unsafe { libc::send(fd.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: the buffer is valid for `buf.len()` bytes.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        for answer in messages(&buf[..n as usize]) {
            let (kind, payload) = answer?;
            match kind {
                kind if kind == libc::NLMSG_DONE as u16 => return Ok(()),
                kind if kind == libc::NLMSG_ERROR as u16 => {
                    let errno = payload.get(..4).ok_or_else(truncated)?;
                    let errno = i32::from_ne_bytes([errno[0], errno[1], errno[2], errno[3]]);
                    if errno == 0 {
                        return Ok(()); // an acknowledgement
                    }
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                kind => {
                    each(kind, payload);
                    if !dump {
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// A request: header (length, type, flags, sequence, port id) and `body`.
fn message(kind: u16, dump: bool, body: &[u8]) -> Vec<u8> {
    let mut flags = libc::NLM_F_REQUEST as u16;
    if dump {
        flags |= libc::NLM_F_DUMP as u16;
    }
    let mut request = Vec::with_capacity(16 + body.len());
    request.extend_from_slice(&(16 + body.len() as u32).to_ne_bytes());
    request.extend_from_slice(&kind.to_ne_bytes());
    request.extend_from_slice(&flags.to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    request.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    request.extend_from_slice(body);
    request
}

/// One attribute (length, type, value, padded to 4 bytes).
fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + value.len() + 3);
    out.extend_from_slice(&(4 + value.len() as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize((out.len() + 3) & !3, 0);
    out
}

fn truncated() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message")
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

/// The messages of one read: (type, payload after the 16-byte header).
fn messages(mut data: &[u8]) -> impl Iterator<Item = io::Result<(u16, &[u8])>> {
    std::iter::from_fn(move || {
        if data.len() < 16 {
            return None;
        }
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if len < 16 || len > data.len() {
            data = &[];
            return Some(Err(truncated()));
        }
        let (message, rest) = data.split_at(len);
        data = rest.get(((len + 3) & !3) - len..).unwrap_or_default();
        Some(Ok((u16_at(message, 4), &message[16..])))
    })
}

/// The attributes in `data`: (type without flag bits, value). Stops at a malformed one.
fn attributes(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if data.len() < 4 {
            return None;
        }
        let len = u16_at(data, 0) as usize;
        if len < 4 || len > data.len() {
            return None;
        }
        let (attribute, rest) = data.split_at(len);
        data = rest.get(((len + 3) & !3) - len..).unwrap_or_default();
        Some((u16_at(attribute, 2) & 0x3fff, &attribute[4..]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&(16 + payload.len() as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(payload);
        m
    }

    #[test]
    fn messages_and_attributes_are_read_and_a_cut_message_is_an_error() {
        let mut payload = vec![2, 24, 0, 0, 7, 0, 0, 0];
        payload.extend(attribute(1, &[9, 9, 9, 9]));
        payload.extend(attribute(IFA_LOCAL, &[100, 65, 0, 2]));
        payload.extend(attribute(3, b"eth0\0"));
        let mut read = answer(RTM_NEWADDR, &payload);
        read.extend(answer(libc::NLMSG_DONE as u16, &[0; 4]));
        let all: Vec<(u16, &[u8])> = messages(&read).map(Result::unwrap).collect();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].0, RTM_NEWADDR);
        let attrs: Vec<(u16, &[u8])> = attributes(&all[0].1[8..]).collect();
        assert_eq!(attrs.len(), 3);
        assert_eq!(attrs[1], (IFA_LOCAL, &[100, 65, 0, 2][..]));
        assert_eq!(attrs[2].1, b"eth0\0");
        let mut cut = answer(RTM_NEWADDR, &payload);
        cut.truncate(30);
        assert!(messages(&cut).next().unwrap().is_err());
    }

    #[test]
    fn requests_carry_the_header_and_padded_attributes() {
        let body = attribute(IFA_TARGET_NETNSID, &3i32.to_ne_bytes());
        assert_eq!(body.len(), 8);
        let request = message(RTM_GETADDR, true, &body);
        assert_eq!(request.len(), 24);
        assert_eq!(u32::from_ne_bytes(request[0..4].try_into().unwrap()), 24);
        assert_eq!(u16_at(&request, 4), RTM_GETADDR);
        assert_eq!(
            u16_at(&request, 6),
            (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16
        );
        assert_eq!(attribute(3, b"abcde").len(), 12);
    }
}
