//! Why the data path could not reach a destination, in words an operator can act on: each
//! message says what failed, where, and what to check. The response flag of each is fixed
//! ([`Error::flag`]).

use std::{
    io,
    net::{SocketAddr, SocketAddrV4},
};

use crate::response_flag::ResponseFlag;

/// A data-path failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No answer to the SYN.
    #[error(
        "connect to {addr} timed out: is the pod running, and does a NetworkPolicy or a \
         firewall drop the connection?"
    )]
    ConnectTimeout {
        /// Where.
        addr: SocketAddr,
    },
    /// A reset in answer to the SYN.
    #[error("connect to {addr} refused: nothing listens on port {} there", addr.port())]
    ConnectRefused {
        /// Where.
        addr: SocketAddr,
    },
    /// Any other failure to connect.
    #[error("connect to {addr}: {source}")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// What the kernel said.
        source: io::Error,
    },
    /// The HBONE port of the destination node's proxy gave no answer.
    #[error(
        "HBONE connect to {addr} timed out: is a NetworkPolicy or a firewall blocking port \
         15008, and does the destination node run the mesh?"
    )]
    HboneTimeout {
        /// The tunnel endpoint (`podIP:15008`).
        addr: SocketAddrV4,
    },
    /// The HBONE port refused.
    #[error(
        "HBONE connect to {addr} refused: does the destination node run the mesh, and is its \
         proxy up?"
    )]
    HboneRefused {
        /// The tunnel endpoint.
        addr: SocketAddrV4,
    },
    /// The peer's certificate does not chain to this mesh's roots.
    #[error(
        "HBONE handshake with {addr}: peer certificate not signed by this mesh's CA: do all \
         nodes use the same CA?"
    )]
    Untrusted {
        /// The tunnel endpoint.
        addr: SocketAddrV4,
    },
    /// The peer proved another identity than the destination's.
    #[error(
        "HBONE handshake with {addr}: the peer is not {expected}: has the pod at that address \
         been replaced, and do the nodes see the same pods?"
    )]
    WrongIdentity {
        /// The tunnel endpoint.
        addr: SocketAddrV4,
        /// The SPIFFE ID the destination must prove.
        expected: String,
    },
    /// A certificate outside its validity period.
    #[error(
        "HBONE handshake with {addr}: certificate expired or not yet valid: are the nodes' \
         clocks in sync, and is certificate renewal running?"
    )]
    Expired {
        /// The tunnel endpoint.
        addr: SocketAddrV4,
    },
    /// The peer refused this node's certificate.
    #[error(
        "HBONE handshake with {addr}: the peer refused this node's certificate: does it trust \
         this mesh's CA?"
    )]
    RejectedByPeer {
        /// The tunnel endpoint.
        addr: SocketAddrV4,
    },
    /// Any other TLS or HTTP/2 handshake failure.
    #[error("HBONE handshake with {addr}: {detail}")]
    Handshake {
        /// The tunnel endpoint.
        addr: SocketAddrV4,
        /// What failed.
        detail: String,
    },
    /// The handshake did not finish in time.
    #[error("HBONE handshake with {addr} timed out: is the destination node's proxy overloaded?")]
    HandshakeTimeout {
        /// The tunnel endpoint.
        addr: SocketAddrV4,
    },
    /// A tunnel stream could not be opened or was not answered.
    #[error("HBONE stream to {target}: {detail}")]
    Stream {
        /// `podIP:port`.
        target: SocketAddrV4,
        /// What happened.
        detail: String,
    },
    /// The destination's node refused the tunnel by policy.
    #[error(
        "{target}: refused by the destination's policy (PeerAuthentication or AuthorizationPolicy)"
    )]
    Denied {
        /// `podIP:port`.
        target: SocketAddrV4,
    },
    /// HBONE carries IPv4 pods of other nodes only.
    #[error("HBONE to {target}: only an IPv4 pod of another node can be tunnelled to")]
    NotTunnelled {
        /// Where the connection was meant to go.
        target: SocketAddr,
    },
    /// The destination's connection limits are reached (DestinationRule `connectionPool`).
    #[error("{detail}: overflow (DestinationRule connectionPool limits)")]
    Overflow {
        /// Which limit.
        detail: String,
    },
    /// Nowhere this node may connect to.
    #[error("{reason}")]
    NoRoute {
        /// Why.
        reason: String,
    },
    /// The HTTP handshake with an endpoint failed.
    #[error("HTTP handshake with {target}: {detail}")]
    Http {
        /// The endpoint.
        target: SocketAddr,
        /// What failed.
        detail: String,
    },
    /// No certificate for the workload.
    #[error("no certificate for {identity}: {detail}")]
    NoCertificate {
        /// The SPIFFE ID.
        identity: String,
        /// Why.
        detail: String,
    },
}

impl Error {
    /// A failed connect to `addr`.
    pub fn connect(addr: SocketAddr, source: io::Error) -> Error {
        match source.kind() {
            io::ErrorKind::TimedOut => Error::ConnectTimeout { addr },
            io::ErrorKind::ConnectionRefused => Error::ConnectRefused { addr },
            _ => Error::Connect { addr, source },
        }
    }

    /// A failed connect to the HBONE port at `addr`.
    pub fn hbone_connect(addr: SocketAddrV4, source: Error) -> Error {
        match source {
            Error::ConnectTimeout { .. } => Error::HboneTimeout { addr },
            Error::ConnectRefused { .. } => Error::HboneRefused { addr },
            other => other,
        }
    }

    /// A failed TLS handshake with `addr`, whose peer must prove `expected`; `reason` is
    /// [`crate::identity::tls::failure_reason`]'s.
    pub fn handshake(
        addr: SocketAddrV4,
        expected: &str,
        reason: &str,
        source: &io::Error,
    ) -> Error {
        match reason {
            "untrusted" => Error::Untrusted { addr },
            "wrong_identity" => Error::WrongIdentity {
                addr,
                expected: expected.to_string(),
            },
            "expired" => Error::Expired { addr },
            "rejected_by_peer" => Error::RejectedByPeer { addr },
            _ => Error::Handshake {
                addr,
                detail: source.to_string(),
            },
        }
    }

    /// How a connection that met this error is recorded.
    pub fn flag(&self) -> ResponseFlag {
        match self {
            Error::Denied { .. } => ResponseFlag::Denied,
            Error::Overflow { .. } => ResponseFlag::UpstreamOverflow,
            Error::NoRoute { .. } => ResponseFlag::NoRoute,
            _ => ResponseFlag::UpstreamConnectFailure,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_place_and_what_to_check() {
        let pod: SocketAddr = "100.65.1.2:9000".parse().unwrap();
        let tunnel: SocketAddrV4 = "100.65.1.2:15008".parse().unwrap();
        let timed_out = io::Error::new(io::ErrorKind::TimedOut, "timed out");
        let hbone = Error::hbone_connect(tunnel, Error::connect(tunnel.into(), timed_out));
        assert_eq!(
            hbone.to_string(),
            "HBONE connect to 100.65.1.2:15008 timed out: is a NetworkPolicy or a firewall \
             blocking port 15008, and does the destination node run the mesh?"
        );
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(
            Error::connect(pod, refused).to_string(),
            "connect to 100.65.1.2:9000 refused: nothing listens on port 9000 there"
        );
        let bad = io::Error::other("invalid peer certificate: BadSignature");
        let untrusted = Error::handshake(tunnel, "spiffe://x", "untrusted", &bad);
        assert!(
            untrusted.to_string().ends_with(
                "peer certificate not signed by this mesh's CA: do all nodes use the same CA?"
            ),
            "{untrusted}"
        );
        assert_eq!(untrusted.flag(), ResponseFlag::UpstreamConnectFailure);
        let denied = Error::Denied {
            target: "100.65.1.2:9000".parse().unwrap(),
        };
        assert_eq!(denied.flag(), ResponseFlag::Denied);
    }
}
