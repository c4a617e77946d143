//! Which links of the node get the capture program: every Ethernet link except bridges
//! themselves (pod-facing veths, the overlay device, uplinks), plus the bridge ports whose
//! captured frames must be readdressed to their bridge. Read with `ip -j -d link show`
//! (the netns's own view, unlike /sys), rescanned on every netlink link event; and the
//! node's own addresses (`ip -j -4 addr show`), where NodePorts are captured.

use std::{
    collections::{BTreeMap, BTreeSet},
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
    local: Option<std::net::Ipv4Addr>,
}

/// The node's own IPv4 addresses (loopback excluded): where its NodePorts listen. The
/// Service VIPs kube-proxy's IPVS mode puts on `kube-ipvs0` are not node addresses.
pub fn addresses() -> Result<BTreeSet<std::net::Ipv4Addr>, CaptureError> {
    let interfaces: Vec<Addresses> = ip_json(&["-j", "-4", "addr", "show"])?;
    Ok(interfaces
        .iter()
        .filter(|i| i.ifname != "kube-ipvs0")
        .flat_map(|i| &i.addr_info)
        .filter_map(|a| a.local)
        .filter(|ip| !ip.is_loopback())
        .collect())
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
          {"ifindex":5,"ifname":"veth1","link_type":"ether","address":"ee:00:00:00:00:05","master":"cni0","linkinfo":{"info_kind":"veth","info_slave_kind":"bridge"}},
          {"ifindex":6,"ifname":"wg0","link_type":"none"}
        ]"#;
        let links: Vec<Link> = serde_json::from_str(json).unwrap();
        let node = classify(&links);
        assert_eq!(node.capture.keys().copied().collect::<Vec<_>>(), [2, 4, 5]);
        assert_eq!(node.bridge_ports.len(), 1);
        assert_eq!(node.bridge_ports[&5], [0x0a, 0x58, 0x64, 0x41, 0x00, 0x01]);
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
