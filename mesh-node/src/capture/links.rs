//! Which links of the node get the capture programs: every Ethernet link except bridges
//! themselves (pod-facing veths, the overlay device, uplinks), plus the bridge ports whose
//! captured frames must be readdressed to their bridge, and the veths whose other end is in
//! another namespace (a pod's: its addresses say which pod it is). Read with
//! `ip -j -d link show` (the netns's own view, unlike /sys), rescanned on every netlink link
//! event; and the node's own addresses (`ip -j -4 addr show`), where NodePorts are captured.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    process::Command,
};

use serde::Deserialize;

use super::CaptureError;

/// One link as `ip -j -d link show` prints it (the fields used).
#[derive(Clone, Debug, Deserialize)]
pub struct Link {
    /// Interface index.
    pub ifindex: u32,
    /// Interface name.
    pub ifname: String,
    /// `ether`, `loopback`, `none` (L3 devices), ...
    #[serde(default)]
    pub link_type: String,
    /// MAC address.
    #[serde(default)]
    pub address: Option<String>,
    /// Name of the master device (a bridge for bridge ports).
    #[serde(default)]
    pub master: Option<String>,
    /// For a veth: the ifindex of its other end, in that end's namespace.
    #[serde(default)]
    pub link_index: Option<u32>,
    /// For a veth whose other end is in another namespace: that namespace's id here.
    #[serde(default)]
    pub link_netnsid: Option<i32>,
    /// Link details.
    #[serde(default)]
    pub linkinfo: Option<LinkInfo>,
}

/// `linkinfo` of a link.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct LinkInfo {
    /// `veth`, `bridge`, `vxlan`, ...
    #[serde(default)]
    pub info_kind: Option<String>,
}

/// The node's links, classified.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeLinks {
    /// Links that get the capture program: ifindex -> name.
    pub capture: BTreeMap<u32, String>,
    /// Bridge ports: ifindex -> the bridge's MAC.
    pub bridge_ports: BTreeMap<u32, [u8; 6]>,
    /// Veths whose other end is in another namespace: ifindex -> (that namespace's id,
    /// the other end's ifindex there).
    pub peers: BTreeMap<u32, (i32, u32)>,
}

/// Lists and classifies the links of the current network namespace.
pub fn discover() -> Result<NodeLinks, CaptureError> {
    let links: Vec<Link> = ip_json(&["-j", "-d", "link", "show"])?;
    Ok(classify(&links))
}

/// One interface's addresses as `ip -j -4 addr show` prints them (the fields used).
#[derive(Clone, Debug, Deserialize)]
struct Addresses {
    #[serde(default)]
    ifname: String,
    #[serde(default)]
    addr_info: Vec<AddrInfo>,
}

#[derive(Clone, Debug, Deserialize)]
struct AddrInfo {
    #[serde(default)]
    local: Option<Ipv4Addr>,
    #[serde(default)]
    prefixlen: u8,
}

/// The node's own IPv4 addresses (loopback excluded) with their prefix lengths: where its
/// NodePorts listen. The Service VIPs kube-proxy's IPVS mode puts on `kube-ipvs0` are not
/// node addresses.
pub fn addresses() -> Result<BTreeSet<(Ipv4Addr, u8)>, CaptureError> {
    let interfaces: Vec<Addresses> = ip_json(&["-j", "-4", "addr", "show"])?;
    Ok(interfaces
        .iter()
        .filter(|i| i.ifname != "kube-ipvs0")
        .flat_map(|i| &i.addr_info)
        .filter_map(|a| Some((a.local?, a.prefixlen)))
        .filter(|(ip, _)| !ip.is_loopback())
        .collect())
}

/// The node address a connection from the node to its pods comes from: the one whose
/// network holds the most of `pods` (the pods' bridge, as the routing table would pick it),
/// else the lowest. `None` when the node has no address.
pub fn host_source(
    addresses: &BTreeSet<(Ipv4Addr, u8)>,
    pods: impl Iterator<Item = Ipv4Addr> + Clone,
) -> Option<Ipv4Addr> {
    let holds = |(ip, prefix): &(Ipv4Addr, u8)| {
        let mask = u32::MAX.checked_shl(32 - u32::from(*prefix)).unwrap_or(0);
        let net = u32::from(*ip) & mask;
        pods.clone()
            .filter(|pod| u32::from(*pod) & mask == net)
            .count()
    };
    let mut best: Option<(usize, Ipv4Addr)> = None;
    for address in addresses {
        let count = holds(address);
        if best.is_none_or(|(most, _)| count > most) {
            best = Some((count, address.0));
        }
    }
    best.map(|(_, ip)| ip)
}

/// Runs `ip ARGS` and parses its JSON output.
fn ip_json<T: serde::de::DeserializeOwned>(args: &[&str]) -> Result<T, CaptureError> {
    let command = format!("ip {}", args.join(" "));
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|err| CaptureError::Command {
            command: command.clone(),
            message: err.to_string(),
        })?;
    if !output.status.success() {
        return Err(CaptureError::Command {
            command,
            message: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    serde_json::from_slice(&output.stdout).map_err(|err| CaptureError::Command {
        command,
        message: format!("unexpected output: {err}"),
    })
}

/// Classifies links (see the module doc).
pub fn classify(links: &[Link]) -> NodeLinks {
    let kind = |l: &Link| l.linkinfo.as_ref().and_then(|i| i.info_kind.clone());
    let bridges: BTreeMap<&str, [u8; 6]> = links
        .iter()
        .filter(|l| kind(l).as_deref() == Some("bridge"))
        .filter_map(|l| Some((l.ifname.as_str(), parse_mac(l.address.as_deref()?)?)))
        .collect();
    let mut out = NodeLinks::default();
    for link in links {
        if link.link_type != "ether" || kind(link).as_deref() == Some("bridge") {
            continue;
        }
        out.capture.insert(link.ifindex, link.ifname.clone());
        if let Some(mac) = link.master.as_deref().and_then(|m| bridges.get(m)) {
            out.bridge_ports.insert(link.ifindex, *mac);
        }
        if let (Some("veth"), Some(nsid), Some(peer)) =
            (kind(link).as_deref(), link.link_netnsid, link.link_index)
        {
            out.peers.insert(link.ifindex, (nsid, peer));
        }
    }
    out
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_ether_links_but_not_bridges_and_maps_ports_to_their_bridge() {
        let json = r#"[
          {"ifindex":1,"ifname":"lo","link_type":"loopback","address":"00:00:00:00:00:00"},
          {"ifindex":2,"ifname":"eth0","link_type":"ether","address":"02:00:00:00:00:01","linkinfo":{"info_kind":"veth"}},
          {"ifindex":3,"ifname":"cni0","link_type":"ether","address":"0a:58:64:41:00:01","linkinfo":{"info_kind":"bridge"}},
          {"ifindex":4,"ifname":"flannel.1","link_type":"ether","address":"0e:00:00:00:00:01","linkinfo":{"info_kind":"vxlan"}},
          {"ifindex":5,"ifname":"veth1","link_index":2,"link_netnsid":3,"link_type":"ether","address":"ee:00:00:00:00:05","master":"cni0","linkinfo":{"info_kind":"veth","info_slave_kind":"bridge"}},
          {"ifindex":6,"ifname":"wg0","link_type":"none"}
        ]"#;
        let links: Vec<Link> = serde_json::from_str(json).unwrap();
        let node = classify(&links);
        assert_eq!(node.capture.keys().copied().collect::<Vec<_>>(), [2, 4, 5]);
        assert_eq!(node.bridge_ports.len(), 1);
        assert_eq!(node.bridge_ports[&5], [0x0a, 0x58, 0x64, 0x41, 0x00, 0x01]);
        // eth0 is a veth too, but its other end is in this namespace.
        assert_eq!(node.peers, BTreeMap::from([(5, (3, 2))]));
    }

    #[test]
    fn host_connections_come_from_the_pods_bridge_address() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let addresses = BTreeSet::from([
            (ip("100.64.0.10"), 24),
            (ip("100.65.0.0"), 32),
            (ip("100.65.0.1"), 24),
        ]);
        let pods = [ip("100.65.0.2"), ip("100.65.0.3")];
        assert_eq!(
            host_source(&addresses, pods.iter().copied()),
            Some(ip("100.65.0.1"))
        );
        assert_eq!(
            host_source(&addresses, std::iter::empty()),
            Some(ip("100.64.0.10"))
        );
        assert_eq!(host_source(&BTreeSet::new(), pods.iter().copied()), None);
    }

    #[test]
    fn parses_macs() {
        assert_eq!(
            parse_mac("aa:bb:cc:dd:ee:ff"),
            Some([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff])
        );
        assert_eq!(parse_mac("aa:bb"), None);
        assert_eq!(parse_mac("aa:bb:cc:dd:ee:ff:00"), None);
    }
}
