//! Which host-side interface each of the node's pods is (`MESH_PODS`, `MESH_POD_LINKS`): the
//! kernel believes a pod's address only from that interface, so a pod that takes another
//! pod's address (or sends with it) gets nothing of that pod's identity, and an enrolled
//! pod's interface carries the rules that follow the interface rather than an address
//! (capture's `egress`).
//!
//! The binding is learnt from the kernel itself: an interface claims the IPv4 addresses its
//! other end has in the pod's namespace, read over netlink. A pod's address is bound to the
//! one interface that claims it, and stays bound while that interface exists and still
//! claims it, whatever else claims it later (an impostor adding the address to its own
//! interface). An address no interface claims yet, or several claim at once with none bound
//! before, is bound to none: the kernel then refuses it as a source everywhere, which fails
//! closed (the pod is cut off, never impersonated) and is reported. A pod started with an
//! impostor already holding its address is therefore cut off until the impostor lets go;
//! the CNI plugin's report of the interface at pod start is the stronger source (a later
//! issue).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use aya::maps::{HashMap, MapData};
use mesh_common::{maps, pod_flags, PodEntry, PodLink};

use super::{map_error, CaptureError};

/// The node's pods on the pod network: address -> enrolled.
pub type LocalPods = BTreeMap<Ipv4Addr, bool>;

/// What each pod interface (ifindex) claims: the addresses on its other end.
pub type Claims = BTreeMap<u32, BTreeSet<Ipv4Addr>>;

/// The kernel's binding of addresses to interfaces, and what could not be bound.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Binding {
    /// `MESH_PODS`: every local pod.
    pub pods: BTreeMap<Ipv4Addr, PodEntry>,
    /// `MESH_POD_LINKS`: every interface bound to a pod, and every interface that claims an
    /// enrolled pod's address no interface is trusted with (it may be the pod's).
    pub links: BTreeMap<u32, PodLink>,
    /// Why an address is bound to no interface, one line each.
    pub unbound: BTreeMap<Ipv4Addr, String>,
}

/// Decides the binding. `previous` is what the kernel holds now (address -> ifindex, 0 for
/// none).
///
/// First each interface is given to one pod: the pod it was bound to, while it still holds
/// that pod's address; else the one pod address it holds; an interface that holds several
/// pods' addresses with none bound to it before belongs to none (an impostor cannot take
/// a freed address it added to its own pod's interface). Then each pod's address is bound
/// to the interface given to it, the one it was bound to when several are: a binding stays
/// while its interface holds the address, whatever else claims it later.
pub fn bind(pods: &LocalPods, claims: &Claims, previous: &BTreeMap<Ipv4Addr, u32>) -> Binding {
    let was_bound: BTreeMap<u32, Ipv4Addr> = previous
        .iter()
        .filter(|(_, ifindex)| **ifindex != 0)
        .map(|(ip, ifindex)| (*ifindex, *ip))
        .collect();
    let mut candidates: BTreeMap<Ipv4Addr, Vec<u32>> = BTreeMap::new();
    let mut unowned: BTreeMap<u32, Vec<Ipv4Addr>> = BTreeMap::new();
    for (&ifindex, addresses) in claims {
        let held: Vec<Ipv4Addr> = addresses
            .iter()
            .filter(|ip| pods.contains_key(ip))
            .copied()
            .collect();
        let owner = match (was_bound.get(&ifindex), held.as_slice()) {
            (Some(ip), _) if held.contains(ip) => Some(*ip),
            (_, &[ip]) => Some(ip),
            _ => None,
        };
        match owner {
            Some(ip) => candidates.entry(ip).or_default().push(ifindex),
            None if held.len() > 1 => {
                unowned.insert(ifindex, held);
            }
            None => {}
        }
    }
    let mut binding = Binding::default();
    for (&ip, &enrolled) in pods {
        let flags = if enrolled { pod_flags::ENROLLED } else { 0 };
        let links = candidates.get(&ip).map(Vec::as_slice).unwrap_or_default();
        let kept = previous
            .get(&ip)
            .copied()
            .filter(|i| *i != 0 && links.contains(i));
        let ifindex = match (kept, links) {
            (Some(ifindex), _) | (None, &[ifindex]) => ifindex,
            (None, []) => {
                let why = match unowned.iter().find(|(_, held)| held.contains(&ip)) {
                    Some((ifindex, held)) => format!(
                        "pod address {ip}: the interface with ifindex {ifindex} holds it among \
                         the addresses of {} pods, so it is none of theirs",
                        held.len()
                    ),
                    None => format!("pod address {ip}: no pod interface holds it (yet)"),
                };
                binding.unbound.insert(ip, why);
                0
            }
            (None, several) => {
                let list: Vec<String> = several.iter().map(u32::to_string).collect();
                binding.unbound.insert(
                    ip,
                    format!(
                        "pod address {ip} is held by the interfaces with ifindex {}: none is \
                         trusted with it until only one holds it (one may be an impostor)",
                        list.join(", ")
                    ),
                );
                if enrolled {
                    for ifindex in several {
                        binding.links.entry(*ifindex).or_default().flags |= pod_flags::ENROLLED;
                    }
                }
                0
            }
        };
        binding.pods.insert(ip, PodEntry { ifindex, flags });
        if ifindex != 0 {
            let link = binding.links.entry(ifindex).or_default();
            link.ip = u32::from_ne_bytes(ip.octets());
            link.flags |= flags;
        }
    }
    // An interface that is no pod's but holds an enrolled pod's address may be that pod's:
    // it gets the rules of enrolled pods' interfaces.
    for (ifindex, held) in unowned {
        if held.iter().any(|ip| pods.get(ip) == Some(&true)) {
            binding.links.entry(ifindex).or_default().flags |= pod_flags::ENROLLED;
        }
    }
    binding
}

/// The two maps, kept equal to a [`Binding`] by difference.
pub struct PodMaps {
    pods: HashMap<MapData, u32, PodEntry>,
    links: HashMap<MapData, u32, PodLink>,
}

fn key(ip: &Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

impl PodMaps {
    /// Takes the maps of a loaded object.
    pub fn new(
        pods: HashMap<MapData, u32, PodEntry>,
        links: HashMap<MapData, u32, PodLink>,
    ) -> PodMaps {
        PodMaps { pods, links }
    }

    /// What `MESH_PODS` holds: address -> bound ifindex (0: none).
    pub fn bound(&self) -> BTreeMap<Ipv4Addr, u32> {
        self.entries()
            .into_iter()
            .map(|(ip, entry)| (ip, entry.ifindex))
            .collect()
    }

    fn entries(&self) -> BTreeMap<Ipv4Addr, PodEntry> {
        self.pods
            .iter()
            .filter_map(Result::ok)
            .map(|(ip, entry)| (Ipv4Addr::from(ip.to_ne_bytes()), entry))
            .collect()
    }

    /// The enrolled pods in `MESH_PODS`.
    pub fn enrolled(&self) -> BTreeSet<Ipv4Addr> {
        self.entries()
            .into_iter()
            .filter(|(_, entry)| entry.enrolled())
            .map(|(ip, _)| ip)
            .collect()
    }

    /// Makes both maps equal `binding`: new and changed entries first, then removals. An
    /// address moving to a new interface is one update (never a moment with none).
    pub fn apply(&mut self, binding: &Binding) -> Result<(), CaptureError> {
        let have = self.entries();
        for (ip, entry) in &binding.pods {
            if have.get(ip) != Some(entry) {
                self.pods
                    .insert(key(ip), *entry, 0)
                    .map_err(map_error(maps::PODS))?;
            }
        }
        let links: BTreeMap<u32, PodLink> = self.links.iter().filter_map(Result::ok).collect();
        for (ifindex, link) in &binding.links {
            if links.get(ifindex) != Some(link) {
                self.links
                    .insert(ifindex, *link, 0)
                    .map_err(map_error(maps::POD_LINKS))?;
            }
        }
        for ifindex in links.keys().filter(|i| !binding.links.contains_key(i)) {
            self.links
                .remove(ifindex)
                .map_err(map_error(maps::POD_LINKS))?;
        }
        for ip in have.keys().filter(|ip| !binding.pods.contains_key(ip)) {
            self.pods.remove(&key(ip)).map_err(map_error(maps::PODS))?;
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

    fn claims(list: &[(u32, &[u8])]) -> Claims {
        list.iter()
            .map(|(ifindex, ips)| (*ifindex, ips.iter().map(|l| ip(*l)).collect()))
            .collect()
    }

    #[test]
    fn each_pod_is_bound_to_the_one_interface_that_holds_its_address() {
        let pods = LocalPods::from([(ip(2), true), (ip(4), false)]);
        let binding = bind(&pods, &claims(&[(10, &[2]), (11, &[4])]), &BTreeMap::new());
        assert_eq!(
            binding.pods[&ip(2)],
            PodEntry {
                ifindex: 10,
                flags: pod_flags::ENROLLED
            }
        );
        assert_eq!(
            binding.pods[&ip(4)],
            PodEntry {
                ifindex: 11,
                flags: 0
            }
        );
        assert_eq!(binding.links[&10].ip, key(&ip(2)));
        assert!(binding.links[&10].enrolled());
        assert!(!binding.links[&11].enrolled());
        assert!(binding.unbound.is_empty());
    }

    #[test]
    fn an_impostor_that_adds_a_bound_address_gets_nothing() {
        let pods = LocalPods::from([(ip(2), true), (ip(4), false)]);
        let before = BTreeMap::from([(ip(2), 10), (ip(4), 11)]);
        // 11 (the pod with .4) adds .2 to its own interface.
        let binding = bind(&pods, &claims(&[(10, &[2]), (11, &[4, 2])]), &before);
        assert_eq!(binding.pods[&ip(2)].ifindex, 10);
        assert_eq!(binding.pods[&ip(4)].ifindex, 11);
        // The impostor's own interface is not taken for the enrolled pod's.
        assert!(!binding.links[&11].enrolled());
        assert!(binding.unbound.is_empty());
    }

    #[test]
    fn an_address_held_twice_with_no_binding_before_is_trusted_to_neither() {
        let pods = LocalPods::from([(ip(2), true)]);
        let binding = bind(&pods, &claims(&[(10, &[2]), (11, &[2])]), &BTreeMap::new());
        assert_eq!(binding.pods[&ip(2)].ifindex, 0);
        assert!(binding.unbound[&ip(2)].contains("10, 11"));
        // Both interfaces get the enrolled pod's rules: either may be the pod's.
        assert!(binding.links[&10].enrolled() && binding.links[&11].enrolled());
        assert_eq!(binding.links[&10].ip, 0);
    }

    #[test]
    fn an_impostor_cannot_take_a_freed_address_it_holds_besides_its_own() {
        let pods = LocalPods::from([(ip(2), true), (ip(4), false)]);
        let before = BTreeMap::from([(ip(2), 10), (ip(4), 11)]);
        // The pod with .2 is gone (interface 10 too); its new pod has no address yet.
        let binding = bind(&pods, &claims(&[(11, &[4, 2]), (12, &[])]), &before);
        assert_eq!(binding.pods[&ip(2)].ifindex, 0);
        assert_eq!(binding.pods[&ip(4)].ifindex, 11);
        // Then the new pod's interface has it: bound there, not to the impostor's.
        let before = BTreeMap::from([(ip(2), 0), (ip(4), 11)]);
        let binding = bind(&pods, &claims(&[(11, &[4, 2]), (12, &[2])]), &before);
        assert_eq!(binding.pods[&ip(2)].ifindex, 12);
    }

    #[test]
    fn an_interface_with_several_pods_addresses_and_no_binding_is_nobodys() {
        let pods = LocalPods::from([(ip(2), true), (ip(4), false)]);
        let binding = bind(
            &pods,
            &claims(&[(11, &[4, 2]), (10, &[2])]),
            &BTreeMap::new(),
        );
        assert_eq!(binding.pods[&ip(2)].ifindex, 10);
        assert_eq!(binding.pods[&ip(4)].ifindex, 0);
        assert!(binding.unbound[&ip(4)].contains("ifindex 11"));
        // It may be the enrolled pod's: it gets enrolled pods' rules.
        assert!(binding.links[&11].enrolled());
        assert_eq!(binding.links[&11].ip, 0);
    }

    #[test]
    fn an_address_reused_by_a_new_pod_moves_to_its_interface() {
        let pods = LocalPods::from([(ip(2), true)]);
        let before = BTreeMap::from([(ip(2), 10)]);
        // Interface 10 is gone (its pod deleted); 12 is the new pod's.
        let binding = bind(&pods, &claims(&[(12, &[2])]), &before);
        assert_eq!(binding.pods[&ip(2)].ifindex, 12);
        assert!(!binding.links.contains_key(&10));
    }

    #[test]
    fn a_pod_with_no_interface_yet_is_refused_as_a_source_and_reported() {
        let pods = LocalPods::from([(ip(2), false)]);
        let binding = bind(&pods, &Claims::new(), &BTreeMap::new());
        assert_eq!(binding.pods[&ip(2)], PodEntry::default());
        assert!(binding.unbound[&ip(2)].contains("no pod interface"));
        assert!(binding.links.is_empty());
    }
}
