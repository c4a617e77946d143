//! How a connection or request ended, as Istio reports it: Envoy's response flags (the
//! `response_flags` label of Istio's metrics, `%RESPONSE_FLAGS%` in access logs) and ztunnel's
//! `DENY`. One type for the whole data path, rendered in one place ([`ResponseFlag::code`]).

/// Why a connection or request did not end normally; [`ResponseFlag::None`] when it did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ResponseFlag {
    /// Ended normally (`-`).
    #[default]
    None,
    /// `DC`: the downstream (client) side ended or broke the connection or stream.
    DownstreamTermination,
    /// `UF`: connecting to the upstream failed (refused, timed out, TLS or HBONE failure).
    UpstreamConnectFailure,
    /// `UC`: the upstream closed the connection before answering.
    UpstreamTermination,
    /// `UT`: the upstream did not answer within the route's timeout.
    UpstreamTimeout,
    /// `URX`: retries exhausted.
    RetryLimitExceeded,
    /// `UO`: a connection-pool limit (circuit breaker) refused it.
    UpstreamOverflow,
    /// `UH`: no healthy endpoint.
    NoHealthyUpstream,
    /// `NR`: no route (no VirtualService route matched, or no destination for the address).
    NoRoute,
    /// `NC`: the route's destination names no known cluster (Service or subset).
    NoCluster,
    /// `DPE`: the downstream request broke HTTP (or a limit on it).
    DownstreamProtocolError,
    /// `FI`: a fault injection aborted the request.
    FaultInjected,
    /// `DI`: a fault injection delayed the request.
    DelayInjected,
    /// `DENY`: refused by policy (PeerAuthentication STRICT or AuthorizationPolicy), as
    /// ztunnel reports it.
    Denied,
}

impl ResponseFlag {
    /// Every flag, for tests and documentation.
    pub const ALL: [ResponseFlag; 14] = [
        ResponseFlag::None,
        ResponseFlag::DownstreamTermination,
        ResponseFlag::UpstreamConnectFailure,
        ResponseFlag::UpstreamTermination,
        ResponseFlag::UpstreamTimeout,
        ResponseFlag::RetryLimitExceeded,
        ResponseFlag::UpstreamOverflow,
        ResponseFlag::NoHealthyUpstream,
        ResponseFlag::NoRoute,
        ResponseFlag::NoCluster,
        ResponseFlag::DownstreamProtocolError,
        ResponseFlag::FaultInjected,
        ResponseFlag::DelayInjected,
        ResponseFlag::Denied,
    ];

    /// The code in metrics labels, access logs and the connections view (`-` for none).
    pub const fn code(self) -> &'static str {
        match self {
            ResponseFlag::None => "-",
            ResponseFlag::DownstreamTermination => "DC",
            ResponseFlag::UpstreamConnectFailure => "UF",
            ResponseFlag::UpstreamTermination => "UC",
            ResponseFlag::UpstreamTimeout => "UT",
            ResponseFlag::RetryLimitExceeded => "URX",
            ResponseFlag::UpstreamOverflow => "UO",
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::NoRoute => "NR",
            ResponseFlag::NoCluster => "NC",
            ResponseFlag::DownstreamProtocolError => "DPE",
            ResponseFlag::FaultInjected => "FI",
            ResponseFlag::DelayInjected => "DI",
            ResponseFlag::Denied => "DENY",
        }
    }

    /// Whether something went wrong (any flag but [`ResponseFlag::None`]).
    pub fn is_set(self) -> bool {
        self != ResponseFlag::None
    }
}

impl std::fmt::Display for ResponseFlag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

impl serde::Serialize for ResponseFlag {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.code())
    }
}

/// Serializes [`ResponseFlag::None`] as an empty string (`/debug/connections`), any other
/// flag as its code.
pub fn empty_when_none<S: serde::Serializer>(
    flag: &ResponseFlag,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(if flag.is_set() { flag.code() } else { "" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_has_its_own_code() {
        let codes: std::collections::BTreeSet<&str> =
            ResponseFlag::ALL.iter().map(|f| f.code()).collect();
        assert_eq!(codes.len(), ResponseFlag::ALL.len());
        assert_eq!(ResponseFlag::default().code(), "-");
        assert!(!ResponseFlag::None.is_set());
        assert!(ResponseFlag::Denied.is_set());
        assert_eq!(
            serde_json::to_string(&ResponseFlag::UpstreamConnectFailure).unwrap(),
            "\"UF\""
        );
    }
}
