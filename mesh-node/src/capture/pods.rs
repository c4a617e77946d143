//! Which host-side interface each of the node's pods is (`MESH_PODS`, `MESH_POD_LINKS`,
//! `MESH_POD_MACS`): the kernel believes a pod's address only from that interface, so a pod
//! that takes another pod's address (or sends with it, or with its MAC) gets nothing of that
//! pod's identity, and an enrolled pod's interface carries the rules that follow the
//! interface rather than an address (capture's `egress`).
//!
//! The binding is learnt from the kernel: each pod interface (a veth whose other end is in
//! another namespace) shows the IPv4 addresses and the MAC its other end has, read over
//! netlink. An interface belongs to a pod for its whole life: to the pod whose address it
//! held alone when it was first seen with one, provided no other interface had that pod
//! already. A pod's address is bound to the interface that belongs to it while that
//! interface holds it. So a pod that adds another pod's address to its own interface gets
//! nothing, not even when that pod's interface goes (a new interface takes the address); an
//! address no interface can have yet, or that two new interfaces claim at once, is bound to
//! none: the kernel then refuses it as a source everywhere, which fails closed (the pod is
//! cut off, never impersonated) and is reported. Each interface's MAC is recorded once, for
//! its life, unless another interface has it already. The CNI plugin's report of the
//! interface at pod start (`crate::cni`) is the stronger source: a gated interface owns its
//! pod's address from the pod's first packet, before the config knows the pod.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use aya::maps::{HashMap, MapData};
use mesh_common::{maps, pod_flags, MacKey, PodEntry, PodLink};

use super::{map_error, CaptureError};
use crate::sys::PeerInterface;

/// The node's pods on the pod network: address -> enrolled.
pub type LocalPods = BTreeMap<Ipv4Addr, bool>;

/// What each pod interface (ifindex) shows of its other end.
pub type Claims = BTreeMap<u32, PeerInterface>;

/// What the kernel holds: the maps' contents, and the binding the next one starts from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Binding {
    /// `MESH_PODS`: every local pod.
    pub pods: BTreeMap<Ipv4Addr, PodEntry>,
    /// `MESH_POD_LINKS`: every pod interface.
    pub links: BTreeMap<u32, PodLink>,
    /// `MESH_POD_MACS`: each pod interface's MAC.
    pub macs: BTreeMap<[u8; 6], u32>,
    /// Why an address is bound to no interface, one line each (not in the maps).
    pub unbound: BTreeMap<Ipv4Addr, String>,
}

fn key(ip: &Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn address(key: u32) -> Ipv4Addr {
    Ipv4Addr::from(key.to_ne_bytes())
}

/// Interfaces the CNI plugin reported at pod start (ifindex -> the pod's address): the
/// runtime's word, stronger than what the kernel shows.
pub type Gated = BTreeMap<u32, Ipv4Addr>;

/// Decides the next binding from the config's pods, what the interfaces hold now, what the
/// kernel holds (see the module doc) and what the CNI plugin reported: a gated interface
/// belongs to its pod's address whatever another interface held or claims.
pub fn bind(pods: &LocalPods, claims: &Claims, held: &Binding, gated: &Gated) -> Binding {
    let gated: BTreeMap<u32, Ipv4Addr> = gated
        .iter()
        .filter(|(ifindex, _)| claims.contains_key(ifindex))
        .map(|(ifindex, ip)| (*ifindex, *ip))
        .collect();
    let gated_ips: BTreeSet<Ipv4Addr> = gated.values().copied().collect();
    // Each interface's pod: the one it belonged to before, for its life; else (a new one)
    // the one pod address it holds, unless an interface that is still there has that pod.
    let taken: BTreeSet<Ipv4Addr> = held
        .links
        .iter()
        .filter(|(ifindex, link)| link.ip != 0 && claims.contains_key(ifindex))
        .map(|(_, link)| address(link.ip))
        .chain(
            held.pods
                .iter()
                .filter(|(_, e)| e.ifindex != 0 && claims.contains_key(&e.ifindex))
                .map(|(ip, _)| *ip),
        )
        .collect();
    let holds = |peer: &PeerInterface| -> Vec<Ipv4Addr> {
        let mut held: Vec<Ipv4Addr> = peer
            .addresses
            .iter()
            .filter(|ip| pods.contains_key(ip))
            .copied()
            .collect();
        held.sort();
        held.dedup();
        held
    };
    let mut owners: BTreeMap<u32, Ipv4Addr> = BTreeMap::new();
    let mut fresh: BTreeMap<Ipv4Addr, Vec<u32>> = BTreeMap::new();
    for (&ifindex, peer) in claims {
        if let Some(ip) = gated.get(&ifindex) {
            owners.insert(ifindex, *ip);
            continue;
        }
        match held.links.get(&ifindex).filter(|l| l.ip != 0) {
            Some(link) if !gated_ips.contains(&address(link.ip)) => {
                owners.insert(ifindex, address(link.ip));
            }
            Some(_) => {}
            None => {
                if let [ip] = holds(peer)[..] {
                    if !taken.contains(&ip) && !gated_ips.contains(&ip) {
                        fresh.entry(ip).or_default().push(ifindex);
                    }
                }
            }
        }
    }
    let mut binding = Binding::default();
    for (ip, links) in &fresh {
        match links[..] {
            [ifindex] => {
                owners.insert(ifindex, *ip);
            }
            _ => {
                let list: Vec<String> = links.iter().map(u32::to_string).collect();
                binding.unbound.insert(
                    *ip,
                    format!(
                        "pod address {ip} is held by the new interfaces with ifindex {}: none is \
                         trusted with it (one may be an impostor) until only one holds it",
                        list.join(", ")
                    ),
                );
            }
        }
    }

    for (&ip, &enrolled) in pods {
        let flags = pod_flags::PRESENT | if enrolled { pod_flags::ENROLLED } else { 0 };
        let own = owners
            .iter()
            .find(|(ifindex, owner)| **owner == ip && claims[ifindex].addresses.contains(&ip));
        let ifindex = match own {
            Some((ifindex, _)) => *ifindex,
            None => {
                binding.unbound.entry(ip).or_insert_with(|| {
                    match owners.iter().find(|(_, owner)| **owner == ip) {
                        Some((ifindex, _)) => format!(
                            "pod address {ip}: its interface (ifindex {ifindex}) does not hold it"
                        ),
                        None => format!("pod address {ip}: no pod interface holds it (yet)"),
                    }
                });
                0
            }
        };
        binding.pods.insert(ip, PodEntry { ifindex, flags });
    }

    for (&ifindex, peer) in claims {
        let owner = owners.get(&ifindex);
        let enrolled = match owner {
            Some(ip) => pods.get(ip) == Some(&true),
            // Not any pod's yet, but it holds an enrolled pod's address: it may be that
            // pod's, so it gets the rules of enrolled pods' interfaces.
            None => holds(peer).iter().any(|ip| pods.get(ip) == Some(&true)),
        };
        binding.links.insert(
            ifindex,
            PodLink {
                ip: owner.map_or(0, key),
                flags: pod_flags::PRESENT | if enrolled { pod_flags::ENROLLED } else { 0 },
            },
        );
    }

    // MACs: each interface keeps the one recorded for it; a new one gets its other end's,
    // unless another interface has it.
    binding.macs = held
        .macs
        .iter()
        .filter(|(_, ifindex)| claims.contains_key(ifindex))
        .map(|(mac, ifindex)| (*mac, *ifindex))
        .collect();
    let recorded: BTreeSet<u32> = binding.macs.values().copied().collect();
    for (&ifindex, peer) in claims {
        if let (false, Some(mac)) = (recorded.contains(&ifindex), peer.mac) {
            binding.macs.entry(mac).or_insert(ifindex);
        }
    }
    binding
}

/// The three maps, kept equal to a [`Binding`] by difference.
pub struct PodMaps {
    pods: HashMap<MapData, u32, PodEntry>,
    links: HashMap<MapData, u32, PodLink>,
    macs: HashMap<MapData, MacKey, u32>,
}

impl PodMaps {
    /// Takes the maps of a loaded object.
    pub fn new(
        pods: HashMap<MapData, u32, PodEntry>,
        links: HashMap<MapData, u32, PodLink>,
        macs: HashMap<MapData, MacKey, u32>,
    ) -> PodMaps {
        PodMaps { pods, links, macs }
    }

    /// What `MESH_PODS` holds.
    pub fn pods(&self) -> BTreeMap<Ipv4Addr, PodEntry> {
        self.pods
            .iter()
            .filter_map(Result::ok)
            .map(|(ip, entry)| (address(ip), entry))
            .collect()
    }

    /// What the maps hold.
    pub fn held(&self) -> Binding {
        Binding {
            pods: self.pods(),
            links: self.links.iter().filter_map(Result::ok).collect(),
            macs: self
                .macs
                .iter()
                .filter_map(Result::ok)
                .map(|(mac, ifindex)| (mac.mac, ifindex))
                .collect(),
            unbound: BTreeMap::new(),
        }
    }

    /// Adds `ips` as enrolled pods bound to no interface, unless present: a start after an
    /// upgrade from a version that kept enrolled pods in another map, so they are refused,
    /// not let through uncaptured, until the first config binds them.
    pub fn seed_enrolled(&mut self, ips: &[Ipv4Addr]) -> Result<(), CaptureError> {
        let entry = PodEntry {
            ifindex: 0,
            flags: pod_flags::PRESENT | pod_flags::ENROLLED,
        };
        for ip in ips {
            if self.pods.get(&key(ip), 0).is_err() {
                self.pods
                    .insert(key(ip), entry, 0)
                    .map_err(map_error(maps::PODS))?;
            }
        }
        Ok(())
    }

    /// Makes the maps equal `binding`: new and changed entries first, then removals. An
    /// address moving to a new interface is one update (never a moment with none).
    pub fn apply(&mut self, binding: &Binding) -> Result<(), CaptureError> {
        let held = self.held();
        let mac_key = |mac: &[u8; 6]| MacKey {
            mac: *mac,
            _pad: [0; 2],
        };
        for (mac, ifindex) in &binding.macs {
            if held.macs.get(mac) != Some(ifindex) {
                self.macs
                    .insert(mac_key(mac), ifindex, 0)
                    .map_err(map_error(maps::POD_MACS))?;
            }
        }
        for (ifindex, link) in &binding.links {
            if held.links.get(ifindex) != Some(link) {
                self.links
                    .insert(ifindex, link, 0)
                    .map_err(map_error(maps::POD_LINKS))?;
            }
        }
        for (ip, entry) in &binding.pods {
            if held.pods.get(ip) != Some(entry) {
                self.pods
                    .insert(key(ip), entry, 0)
                    .map_err(map_error(maps::PODS))?;
            }
        }
        for ip in held.pods.keys().filter(|ip| !binding.pods.contains_key(ip)) {
            self.pods.remove(&key(ip)).map_err(map_error(maps::PODS))?;
        }
        for ifindex in held.links.keys().filter(|i| !binding.links.contains_key(i)) {
            self.links
                .remove(ifindex)
                .map_err(map_error(maps::POD_LINKS))?;
        }
        for mac in held.macs.keys().filter(|m| !binding.macs.contains_key(*m)) {
            self.macs
                .remove(&mac_key(mac))
                .map_err(map_error(maps::POD_MACS))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(100, 65, 0, last)
    }

    fn mac(last: u8) -> [u8; 6] {
        [2, 0, 0, 0, 0, last]
    }

    /// Interfaces (ifindex, the addresses of their other end); each has MAC `mac(ifindex)`.
    fn claims(list: &[(u32, &[u8])]) -> Claims {
        list.iter()
            .map(|(ifindex, ips)| {
                let peer = PeerInterface {
                    addresses: ips.iter().map(|l| ip(*l)).collect(),
                    mac: Some(mac(*ifindex as u8)),
                };
                (*ifindex, peer)
            })
            .collect()
    }

    /// Binds twice, each time from what the last one left, as the datapath does.
    fn settle(pods: &LocalPods, steps: &[Claims]) -> Binding {
        steps.iter().fold(Binding::default(), |held, claims| {
            bind(pods, claims, &held, &Gated::new())
        })
    }

    #[test]
    fn each_pod_is_bound_to_the_one_interface_that_holds_its_address() {
        let pods = LocalPods::from([(ip(2), true), (ip(4), false)]);
        let binding = settle(&pods, &[claims(&[(10, &[2]), (11, &[4]), (12, &[])])]);
        let present = pod_flags::PRESENT;
        assert_eq!(
            binding.pods[&ip(2)],
            PodEntry {
                ifindex: 10,
                flags: present | pod_flags::ENROLLED
            }
        );
        assert_eq!(
            binding.pods[&ip(4)],
            PodEntry {
                ifindex: 11,
                flags: present
            }
        );
        assert_eq!(binding.links[&10].ip, key(&ip(2)));
        assert!(binding.links[&10].enrolled());
        assert!(!binding.links[&11].enrolled());
        // Every pod interface is listed, with its MAC; one that is no pod's has ip 0.
        assert_eq!(
            binding.links[&12],
            PodLink {
                ip: 0,
                flags: present
            }
        );
        assert_eq!(binding.macs.len(), 3);
        assert_eq!(binding.macs[&mac(12)], 12);
        assert!(binding.unbound.is_empty());
    }

    #[test]
    fn an_impostor_that_adds_a_bound_address_gets_nothing() {
        let pods = LocalPods::from([(ip(2), true), (ip(4), false)]);
        // 11 (the pod with .4) adds .2 to its own interface.
        let binding = settle(
            &pods,
            &[
                claims(&[(10, &[2]), (11, &[4])]),
                claims(&[(10, &[2]), (11, &[4, 2])]),
            ],
        );
        assert_eq!(binding.pods[&ip(2)].ifindex, 10);
        assert_eq!(binding.pods[&ip(4)].ifindex, 11);
        assert_eq!(binding.links[&11].ip, key(&ip(4)));
        assert!(!binding.links[&11].enrolled());
        assert!(binding.unbound.is_empty());
    }

    #[test]
    fn an_impostor_never_inherits_an_address_even_after_dropping_its_own() {
        let pods = LocalPods::from([(ip(2), true), (ip(4), false)]);
        let binding = settle(
            &pods,
            &[
                claims(&[(10, &[2]), (11, &[4])]),
                // 11 drops its own address and holds only .2 ...
                claims(&[(10, &[2]), (11, &[2])]),
                // ... then the pod with .2 goes (interface 10 with it).
                claims(&[(11, &[2])]),
            ],
        );
        assert_eq!(binding.pods[&ip(2)].ifindex, 0);
        assert_eq!(binding.pods[&ip(4)].ifindex, 0);
        assert_eq!(binding.links[&11].ip, key(&ip(4)), "11 stays .4's");
        assert!(binding.unbound[&ip(4)].contains("does not hold it"));
        // The new pod that gets .2 gets it at once.
        let binding = bind(
            &pods,
            &claims(&[(11, &[2]), (12, &[2])]),
            &binding,
            &Gated::new(),
        );
        assert_eq!(binding.pods[&ip(2)].ifindex, 12);
    }

    #[test]
    fn a_new_pod_gets_its_address_although_an_older_pod_added_it_first() {
        let pods = LocalPods::from([(ip(2), true), (ip(4), false)]);
        // .2 is the next address the IPAM hands out; the pod with .4 takes it first.
        let binding = settle(
            &pods,
            &[claims(&[(11, &[4])]), claims(&[(11, &[4, 2]), (12, &[2])])],
        );
        assert_eq!(binding.pods[&ip(2)].ifindex, 12);
        assert_eq!(binding.pods[&ip(4)].ifindex, 11);
    }

    #[test]
    fn an_address_two_new_interfaces_claim_is_trusted_to_neither() {
        let pods = LocalPods::from([(ip(2), true)]);
        let binding = settle(&pods, &[claims(&[(10, &[2]), (11, &[2])])]);
        assert_eq!(binding.pods[&ip(2)].ifindex, 0);
        assert!(binding.unbound[&ip(2)].contains("10, 11"));
        // Neither belongs to the pod, both get the enrolled pod's rules.
        for ifindex in [10, 11] {
            assert_eq!(binding.links[&ifindex].ip, 0);
            assert!(binding.links[&ifindex].enrolled());
        }
        // One lets go: the other gets it.
        let binding = bind(
            &pods,
            &claims(&[(10, &[2]), (11, &[])]),
            &binding,
            &Gated::new(),
        );
        assert_eq!(binding.pods[&ip(2)].ifindex, 10);
    }

    #[test]
    fn an_address_reused_by_a_new_pod_moves_to_its_interface() {
        let pods = LocalPods::from([(ip(2), true)]);
        let binding = settle(&pods, &[claims(&[(10, &[2])]), claims(&[(12, &[2])])]);
        assert_eq!(binding.pods[&ip(2)].ifindex, 12);
        assert!(!binding.links.contains_key(&10));
        assert!(!binding.macs.values().any(|i| *i == 10));
    }

    #[test]
    fn a_pod_with_no_interface_yet_is_refused_as_a_source_and_reported() {
        let pods = LocalPods::from([(ip(2), false)]);
        let binding = settle(&pods, &[Claims::new()]);
        assert_eq!(binding.pods[&ip(2)].ifindex, 0);
        assert!(binding.pods[&ip(2)].present());
        assert!(binding.unbound[&ip(2)].contains("no pod interface"));
    }

    #[test]
    fn a_mac_stays_with_the_interface_that_had_it_first() {
        let pods = LocalPods::from([(ip(2), true), (ip(4), false)]);
        let first = settle(&pods, &[claims(&[(10, &[2]), (11, &[4])])]);
        // 11 sets 10's MAC on its own interface.
        let mut copied = claims(&[(10, &[2]), (11, &[4])]);
        copied.get_mut(&11).unwrap().mac = Some(mac(10));
        let binding = bind(&pods, &copied, &first, &Gated::new());
        assert_eq!(binding.macs[&mac(10)], 10);
        assert_eq!(binding.macs[&mac(11)], 11);
        // A new interface with a MAC another one has records none.
        let mut new = claims(&[(10, &[2]), (11, &[4]), (12, &[])]);
        new.get_mut(&12).unwrap().mac = Some(mac(10));
        let binding = bind(&pods, &new, &binding, &Gated::new());
        assert!(!binding.macs.values().any(|i| *i == 12));
    }

    #[test]
    fn the_cni_plugin_s_interface_wins_over_an_earlier_claim_and_a_rival() {
        let pods: LocalPods = [(ip(2), true)].into();
        // Interface 10 held the address first and keeps it without the gate's word.
        let first = bind(
            &pods,
            &claims(&[(10, &[2])]),
            &Binding::default(),
            &Gated::new(),
        );
        assert_eq!(first.pods[&ip(2)].ifindex, 10);
        // Interface 11 is the one the runtime gave the pod (10 is stale or an impostor).
        let gated: Gated = [(11, ip(2))].into();
        let binding = bind(&pods, &claims(&[(10, &[2]), (11, &[2])]), &first, &gated);
        assert_eq!(binding.pods[&ip(2)].ifindex, 11);
        assert_eq!(binding.links[&11].ip, key(&ip(2)));
        assert_eq!(binding.links[&10].ip, 0, "10 no longer owns the address");
        assert!(binding.unbound.is_empty(), "{:?}", binding.unbound);
        // Two new interfaces with the address: without the gate neither is trusted; with
        // it, the gated one is.
        let rivals = claims(&[(12, &[2]), (13, &[2])]);
        let none = bind(&pods, &rivals, &Binding::default(), &Gated::new());
        assert_eq!(none.pods[&ip(2)].ifindex, 0);
        let one = bind(&pods, &rivals, &Binding::default(), &[(13, ip(2))].into());
        assert_eq!(one.pods[&ip(2)].ifindex, 13);
    }
}
