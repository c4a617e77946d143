//! The immutable state snapshot the proxy and the datapath read: workloads with identity,
//! enrolment and the policies that apply to them, Services with their VIPs, protocols and
//! ready endpoints, and the routing resources by host. A new snapshot is built for every
//! config change and swapped in atomically (`arc-swap`); the hot path never waits on an
//! update.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use serde::{Serialize, Serializer};

use crate::config::{
    kinds::{AuthorizationPolicy, DestinationRule, VirtualService},
    model::{Labels, Resource, Service, LABEL_SERVICE_NAME},
    semantics::{self, EffectiveMtls, Mesh, Protocol},
    Resources,
};

/// A shared reference to a resource; shown as `namespace/name` in `/debug/state`.
#[derive(Debug)]
pub struct Ref<S>(pub Arc<Resource<S>>);

impl<S> Clone for Ref<S> {
    fn clone(&self) -> Self {
        Ref(self.0.clone())
    }
}

impl<S> PartialEq for Ref<S> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl<S> Eq for Ref<S> {}

impl<S> Serialize for Ref<S> {
    fn serialize<Z: Serializer>(&self, serializer: Z) -> Result<Z::Ok, Z::Error> {
        serializer.serialize_str(&self.0.metadata.qualified())
    }
}

/// A pod as the mesh sees it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Workload {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Node it runs on.
    pub node: Option<String>,
    /// Pod IP.
    pub ip: Ipv4Addr,
    /// Service account.
    pub service_account: String,
    /// SPIFFE identity (`spiffe://cluster.local/ns/<ns>/sa/<sa>`).
    pub identity: crate::config::semantics::Identity,
    /// Labels (policy and subset selectors match them).
    pub labels: Labels,
    /// In the mesh.
    pub enrolled: bool,
    /// Ready (a Service endpoint).
    pub ready: bool,
    /// PeerAuthentication in effect.
    pub mtls: EffectiveMtls,
    /// AuthorizationPolicies that apply to it, in the order they were read.
    pub authorization: Vec<Ref<crate::config::security::AuthorizationPolicySpec>>,
    /// Its tracing (Telemetry), for the enrolled pods of this node (`sampling` and `provider`
    /// null: the `--trace-sampling` and first `--tracing-provider` defaults).
    pub tracing: Option<Arc<crate::trace::WorkloadTracing>>,
}

impl Workload {
    /// `namespace/name`.
    pub fn qualified(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One port of a Service with a VIP, and the endpoints it balances over.
#[derive(Debug, Serialize)]
pub struct ServiceTarget {
    /// Namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// `name.namespace.svc.cluster.local`.
    pub host: String,
    /// `clusterIP:port`.
    pub vip: SocketAddrV4,
    /// Protocol the port declares (`appProtocol` or name prefix).
    pub protocol: Protocol,
    /// Ready endpoints (`podIP:targetPort`), in a stable order.
    pub endpoints: Vec<SocketAddrV4>,
    /// The NodePort every node opens for it, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
    /// Round-robin cursor.
    #[serde(skip)]
    next: AtomicUsize,
}

impl ServiceTarget {
    /// The next ready endpoint, round robin; `None` when there is none.
    pub fn pick(&self) -> Option<SocketAddrV4> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        Some(self.endpoints[i])
    }

    /// `namespace/name`.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Where an outbound connection goes.
#[derive(Debug)]
pub enum Resolution<'a> {
    /// To a Service VIP: balance over its endpoints.
    Service(&'a ServiceTarget),
    /// The destination is a VIP but not a port of its Service: nothing to connect to.
    UnknownServicePort {
        /// The Service that owns the VIP.
        service: String,
    },
    /// A hostPort of this node: connect to the pod port it maps to.
    Pod(SocketAddrV4),
    /// Not a VIP: connect to the original destination itself.
    Direct,
}

/// One immutable configuration snapshot.
#[derive(Debug, Default, Serialize)]
pub struct State {
    /// Increases with every accepted config change.
    pub generation: u64,
    /// Some pod or Service has an IPv6 address: IPv6 to and from enrolled pods is dropped.
    pub dual_stack: bool,
    /// The cluster's DNS servers: the addresses of every Service with a port 53 and their
    /// endpoints (with `--udp-to-enrolled=dns-only`, UDP from port 53 only from these).
    pub dns_servers: BTreeSet<Ipv4Addr>,
    /// The node this proxy serves.
    pub node: String,
    /// Root namespace and trust domain.
    pub mesh: Mesh,
    /// Every pod with an IP, by IP.
    pub workloads: BTreeMap<Ipv4Addr, Workload>,
    /// Service ports with a VIP, by `clusterIP:port`.
    pub services: HashMap<SocketAddrV4, ServiceTarget>,
    /// `externalIPs` and load-balancer ingress addresses (with the Service port) to the
    /// Service port (`clusterIP:port`) kube-proxy forwards them to.
    #[serde(skip)]
    pub external: HashMap<SocketAddrV4, SocketAddrV4>,
    /// NodePorts to the Service port (`clusterIP:port`) they lead to.
    #[serde(skip)]
    pub node_ports: HashMap<u16, SocketAddrV4>,
    /// hostPorts of this node's pods to the pod port they map to.
    #[serde(skip)]
    pub host_ports: HashMap<u16, SocketAddrV4>,
    /// Each endpoint's Service port (the lowest VIP:port when several select it), for the
    /// destination side's `destination_service` label.
    #[serde(skip)]
    pub endpoint_services: HashMap<SocketAddrV4, SocketAddrV4>,
    /// Clusters IPs (any port) to Service `namespace/name`.
    pub vips: HashMap<Ipv4Addr, String>,
    /// Endpoints that a Service port declaring HTTP/2 or gRPC leads to: the destination side
    /// speaks HTTP/2 to them when the request came as HTTP/2.
    #[serde(skip)]
    pub h2_endpoints: std::collections::HashSet<SocketAddrV4>,
    /// Service FQDNs to their ports (`clusterIP:port`), for route destinations.
    #[serde(skip)]
    pub services_by_host: HashMap<String, Vec<SocketAddrV4>>,
    /// VirtualServices for mesh traffic by the FQDN (or wildcard) of each of their hosts.
    pub virtual_services: BTreeMap<String, Vec<Ref<crate::config::networking::VirtualServiceSpec>>>,
    /// NetworkPolicies known (`namespace/name`), for `/debug/state`.
    pub network_policies: Vec<String>,
    /// DestinationRules by the FQDN of their host, oldest first. Istio merges several for one
    /// host (subsets from all; the traffic policy of the oldest) and prefers the client's
    /// namespace, then the Service's, then the root namespace's: the routing code picks.
    pub destination_rules:
        BTreeMap<String, Vec<Ref<crate::config::networking::DestinationRuleSpec>>>,
    /// What enrols a pod that starts now (the CNI gate's decision and its on-disk cache).
    #[serde(skip)]
    pub enrolment: mesh_cni::Enrolment,
}

/// The enrolment rules of `resources`: every namespace's, and the pods whose own label
/// decides (see `semantics::pod_enrolled`).
fn enrolment(
    resources: &Resources,
    namespaces: &BTreeMap<&str, &crate::config::model::Namespace>,
) -> mesh_cni::Enrolment {
    mesh_cni::Enrolment {
        namespaces: namespaces
            .iter()
            .map(|(name, ns)| {
                (
                    name.to_string(),
                    semantics::namespace_enrolls(&ns.metadata.labels),
                )
            })
            .collect(),
        pods: resources
            .pods
            .iter()
            .filter(|pod| {
                pod.metadata
                    .labels
                    .contains_key(crate::config::model::LABEL_DATAPLANE_MODE)
            })
            .map(|pod| {
                (
                    pod.metadata.qualified(),
                    semantics::pod_enrolled(pod, namespaces),
                )
            })
            .collect(),
    }
}

impl State {
    /// Builds the snapshot for `node` from a set of resources.
    pub fn build(resources: &Resources, node: &str, mesh: &Mesh, generation: u64) -> State {
        let namespaces: BTreeMap<&str, _> = resources
            .namespaces
            .iter()
            .map(|ns| (ns.metadata.name.as_str(), ns))
            .collect();
        let authorization: Vec<Arc<AuthorizationPolicy>> = resources
            .authorization_policies
            .iter()
            .cloned()
            .map(Arc::new)
            .collect();

        let mut workloads = BTreeMap::new();
        for pod in &resources.pods {
            let Some(ip) = pod.live_ip() else {
                continue;
            };
            let namespace = pod.metadata.namespace();
            let labels = &pod.metadata.labels;
            let service_account = semantics::service_account(pod).to_string();
            let mut workload = Workload {
                namespace: namespace.to_string(),
                name: pod.metadata.name.clone(),
                node: pod.spec.node_name.clone(),
                ip,
                identity: mesh.spiffe_id(namespace, &service_account),
                service_account,
                labels: labels.clone(),
                enrolled: semantics::pod_enrolled(pod, &namespaces),
                ready: pod.is_ready(),
                mtls: semantics::effective_mtls(
                    mesh,
                    &resources.peer_authentications,
                    namespace,
                    labels,
                ),
                authorization: authorization
                    .iter()
                    .filter(|p| semantics::authorization_applies(mesh, p, namespace, labels))
                    .map(|p| Ref(p.clone()))
                    .collect(),
                tracing: None,
            };
            if workload.enrolled && workload.node.as_deref() == Some(node) {
                workload.tracing = Some(Arc::new(crate::trace::WorkloadTracing::resolve(
                    &resources.telemetries,
                    &mesh.root_namespace,
                    &workload,
                )));
            }
            workloads.insert(ip, workload);
        }

        let mut services = HashMap::new();
        let mut external = HashMap::new();
        let mut vips = HashMap::new();
        for svc in &resources.services {
            let Some(vip) = svc
                .spec
                .cluster_ip
                .as_deref()
                .and_then(|ip| ip.parse().ok())
            else {
                continue;
            };
            let qualified = format!("{}/{}", svc.metadata.namespace(), svc.metadata.name);
            vips.insert(vip, qualified);
            for (index, port) in svc.spec.ports.iter().enumerate() {
                if !port
                    .protocol
                    .as_deref()
                    .unwrap_or("TCP")
                    .eq_ignore_ascii_case("TCP")
                {
                    continue;
                }
                let endpoints = endpoints(resources, svc, index);
                let addr = SocketAddrV4::new(vip, port.port);
                let extra = svc.spec.external_ips.iter().chain(&svc.status.ingress_ips);
                for ip in extra.filter_map(|ip| ip.parse::<Ipv4Addr>().ok()) {
                    external.insert(SocketAddrV4::new(ip, port.port), addr);
                }
                services.insert(
                    addr,
                    ServiceTarget {
                        namespace: svc.metadata.namespace().to_string(),
                        name: svc.metadata.name.clone(),
                        host: semantics::service_fqdn(&svc.metadata.name, svc.metadata.namespace()),
                        vip: addr,
                        protocol: semantics::port_protocol(port),
                        node_port: port.node_port,
                        endpoints,
                        next: AtomicUsize::new(0),
                    },
                );
            }
        }

        let mut endpoint_services: HashMap<SocketAddrV4, SocketAddrV4> = HashMap::new();
        for target in services.values() {
            for endpoint in &target.endpoints {
                endpoint_services
                    .entry(*endpoint)
                    .and_modify(|vip| *vip = (*vip).min(target.vip))
                    .or_insert(target.vip);
            }
        }
        let h2_endpoints = services
            .values()
            .filter(|s| matches!(s.protocol, Protocol::Http2 | Protocol::Grpc))
            .flat_map(|s| s.endpoints.iter().copied())
            .collect();
        let mut services_by_host: HashMap<String, Vec<SocketAddrV4>> = HashMap::new();
        for target in services.values() {
            services_by_host
                .entry(target.host.clone())
                .or_default()
                .push(target.vip);
        }
        services_by_host.values_mut().for_each(|v| v.sort());
        let node_ports = services
            .values()
            .filter_map(|t| Some((t.node_port?, t.vip)))
            .collect();
        let mut host_ports = HashMap::new();
        for pod in &resources.pods {
            let (Some(ip), true) = (pod.live_ip(), pod.spec.node_name.as_deref() == Some(node))
            else {
                continue;
            };
            for port in pod.spec.containers.iter().flat_map(|c| &c.ports) {
                let tcp = port
                    .protocol
                    .as_deref()
                    .unwrap_or("TCP")
                    .eq_ignore_ascii_case("TCP");
                let Some(host_port) = port.host_port.filter(|_| tcp) else {
                    continue;
                };
                // Two pods may share a hostPort on different hostIPs (not modelled): an
                // enrolled pod's mapping wins, so it is never left uncaptured.
                let enrolled =
                    |ip: &Ipv4Addr| workloads.get(ip).is_some_and(|w: &Workload| w.enrolled);
                let keep = host_ports
                    .get(&host_port)
                    .is_some_and(|have: &SocketAddrV4| enrolled(have.ip()) && !enrolled(&ip));
                if !keep {
                    host_ports.insert(host_port, SocketAddrV4::new(ip, port.container_port));
                }
            }
        }
        let dual_stack = resources.pods.iter().any(|p| p.status.ipv6)
            || resources.services.iter().any(|s| s.spec.ipv6);
        let mut dns_servers = BTreeSet::new();
        for svc in &resources.services {
            for (index, port) in svc.spec.ports.iter().enumerate() {
                if port.port != 53 {
                    continue;
                }
                dns_servers.extend(
                    svc.spec
                        .cluster_ip
                        .as_deref()
                        .and_then(|ip| ip.parse::<Ipv4Addr>().ok()),
                );
                dns_servers.extend(endpoints(resources, svc, index).iter().map(|e| *e.ip()));
            }
        }
        State {
            generation,
            dual_stack,
            dns_servers,
            node: node.to_string(),
            mesh: mesh.clone(),
            endpoint_services,
            services_by_host,
            h2_endpoints,
            external,
            node_ports,
            host_ports,
            workloads,
            services,
            vips,
            virtual_services: index_virtual_services(&resources.virtual_services),
            network_policies: resources
                .network_policies
                .iter()
                .map(|p| p.metadata.qualified())
                .collect(),
            destination_rules: index_destination_rules(&resources.destination_rules),
            enrolment: enrolment(resources, &namespaces),
        }
    }

    /// Whether `w` runs on this node.
    pub fn is_local(&self, w: &Workload) -> bool {
        w.node.as_deref() == Some(self.node.as_str())
    }

    /// The enrolled pods of this node.
    fn local_enrolled_workloads(&self) -> impl Iterator<Item = &Workload> {
        self.workloads
            .values()
            .filter(|w| w.enrolled && self.is_local(w))
    }

    /// AuthorizationPolicies with HTTP rules that apply to pods of this node serving a
    /// Service port declared TCP (or undeclared), where the proxy enforces them at L4 as Istio
    /// ambient's ztunnel does (see `authz`); on HTTP ports they apply per request. Logged on
    /// each change.
    pub fn l7_policies_at_l4(&self) -> BTreeSet<String> {
        let opaque = |w: &Workload| {
            self.services
                .values()
                .any(|s| !s.protocol.is_http() && s.endpoints.iter().any(|e| *e.ip() == w.ip))
        };
        self.local_enrolled_workloads()
            .filter(|w| opaque(w))
            .flat_map(|w| &w.authorization)
            .filter(|p| p.0.spec.uses_l7())
            .map(|p| p.0.metadata.qualified())
            .collect()
    }

    /// The Service (port) an endpoint serves, if any.
    pub fn service_of_endpoint(&self, endpoint: SocketAddr) -> Option<&ServiceTarget> {
        let SocketAddr::V4(endpoint) = endpoint else {
            return None;
        };
        self.services.get(self.endpoint_services.get(&endpoint)?)
    }

    /// SPIFFE IDs of the enrolled pods on this node: the certificates it holds.
    pub fn local_identities(&self) -> BTreeSet<String> {
        self.local_enrolled_workloads()
            .map(|w| w.identity.to_string())
            .collect()
    }

    /// Service VIP:ports (and their `externalIPs` and load-balancer addresses) with a ready
    /// endpoint that is an enrolled pod of this node: the kernel captures new flows to them
    /// from clients outside the mesh (see `proxy::forward`).
    pub fn local_enrolled_vips(&self) -> BTreeSet<SocketAddrV4> {
        let local = self.local_enrolled();
        let vips: BTreeSet<SocketAddrV4> = self
            .services
            .values()
            .filter(|s| s.endpoints.iter().any(|e| local.contains(e.ip())))
            .map(|s| s.vip)
            .collect();
        // Their external and load-balancer addresses too: kube-proxy forwards those alike.
        let external = self
            .external
            .iter()
            .filter(|(_, vip)| vips.contains(vip))
            .map(|(addr, _)| *addr);
        external.chain(vips.iter().copied()).collect()
    }

    /// Service VIP:ports, not HTTP, whose every ready endpoint (at least one) is an enrolled
    /// pod of this node: a connection to one stays on the node at L4 (the same-node socket bypass takes
    /// only those, with pods' own addresses).
    pub fn local_only_vips(&self) -> BTreeSet<SocketAddrV4> {
        let local = self.local_enrolled();
        self.services
            .values()
            // Not HTTP ports: a route may send the requests to another node, and the proxy
            // reads them slower than a pod writes into a bypassed socket's windowless queue
            // (see local_http_endpoints).
            .filter(|s| {
                !s.protocol.is_http()
                    && !s.endpoints.is_empty()
                    && s.endpoints.iter().all(|e| local.contains(e.ip()))
            })
            .map(|s| s.vip)
            .collect()
    }

    /// Enrolled pods of this node at the ports HTTP Service ports lead to: the same-node
    /// bypass never takes a connection to one (the proxy reads it slower than a pod writes,
    /// and a bypassed socket's queue has no window).
    pub fn local_http_endpoints(&self) -> BTreeSet<SocketAddrV4> {
        let local = self.local_enrolled();
        self.services
            .values()
            .filter(|s| s.protocol.is_http())
            .flat_map(|s| s.endpoints.iter())
            .filter(|e| local.contains(e.ip()))
            .copied()
            .collect()
    }

    /// NodePorts whose Service has a ready endpoint that is an enrolled pod of this node, and
    /// hostPorts of this node's enrolled pods: the kernel captures new flows to them at this
    /// node's addresses, as it does for VIPs.
    pub fn local_enrolled_node_ports(&self) -> BTreeSet<u16> {
        let vips = self.local_enrolled_vips();
        let local_enrolled = self.local_enrolled();
        let node_ports = self
            .node_ports
            .iter()
            .filter(|(_, vip)| vips.contains(vip))
            .map(|(port, _)| *port);
        let host_ports = self
            .host_ports
            .iter()
            .filter(|(_, pod)| local_enrolled.contains(pod.ip()))
            .map(|(port, _)| *port);
        node_ports.chain(host_ports).collect()
    }

    /// Like [`State::resolve`], also resolving NodePorts and hostPorts at this node's own
    /// addresses.
    pub fn resolve_at_node(
        &self,
        orig_dst: SocketAddr,
        node_addresses: &BTreeSet<Ipv4Addr>,
    ) -> Resolution<'_> {
        if let SocketAddr::V4(dst) = orig_dst {
            if node_addresses.contains(dst.ip()) {
                if let Some(target) = self
                    .node_ports
                    .get(&dst.port())
                    .and_then(|vip| self.services.get(vip))
                {
                    return Resolution::Service(target);
                }
                if let Some(pod) = self.host_ports.get(&dst.port()) {
                    return Resolution::Pod(*pod);
                }
            }
        }
        self.resolve(orig_dst)
    }

    /// This node's pods on the pod network, address -> enrolled: the kernel binds each
    /// address to its pod's interface, and captures the enrolled ones.
    pub fn local_pods(&self) -> std::collections::BTreeMap<Ipv4Addr, bool> {
        self.workloads
            .values()
            .filter(|w| self.is_local(w))
            .map(|w| (w.ip, w.enrolled))
            .collect()
    }

    /// IPs of the enrolled pods on this node: what the kernel captures.
    pub fn local_enrolled(&self) -> BTreeSet<Ipv4Addr> {
        self.local_enrolled_workloads().map(|w| w.ip).collect()
    }

    /// Classifies an outbound original destination.
    pub fn resolve(&self, orig_dst: SocketAddr) -> Resolution<'_> {
        let SocketAddr::V4(dst) = orig_dst else {
            return Resolution::Direct;
        };
        if let Some(target) = self
            .services
            .get(&dst)
            .or_else(|| self.services.get(self.external.get(&dst)?))
        {
            return Resolution::Service(target);
        }
        match self.vips.get(dst.ip()) {
            Some(service) => Resolution::UnknownServicePort {
                service: service.clone(),
            },
            None => Resolution::Direct,
        }
    }

    /// The workload with this IP, if any.
    pub fn workload(&self, ip: std::net::IpAddr) -> Option<&Workload> {
        match ip {
            std::net::IpAddr::V4(ip) => self.workloads.get(&ip),
            std::net::IpAddr::V6(_) => None,
        }
    }
}

/// VirtualServices that apply to mesh traffic, by each host's FQDN, oldest first.
fn index_virtual_services(
    list: &[VirtualService],
) -> BTreeMap<String, Vec<Ref<crate::config::networking::VirtualServiceSpec>>> {
    let mut sorted: Vec<&VirtualService> = list.iter().collect();
    sorted.sort_by_key(|vs| vs.metadata.age_key());
    let mut out: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for vs in sorted.into_iter().filter(|vs| vs.spec.applies_to_mesh()) {
        let shared = Arc::new(vs.clone());
        let hosts: BTreeSet<String> = vs
            .spec
            .hosts
            .iter()
            .map(|host| semantics::fqdn(host, vs.namespace()))
            .collect();
        for host in hosts {
            out.entry(host).or_default().push(Ref(shared.clone()));
        }
    }
    out
}

/// DestinationRules by their host's FQDN, oldest first.
fn index_destination_rules(
    list: &[DestinationRule],
) -> BTreeMap<String, Vec<Ref<crate::config::networking::DestinationRuleSpec>>> {
    let mut sorted: Vec<&DestinationRule> = list.iter().collect();
    sorted.sort_by_key(|dr| dr.metadata.age_key());
    let mut out: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for dr in sorted {
        out.entry(semantics::fqdn(&dr.spec.host, dr.namespace()))
            .or_default()
            .push(Ref(Arc::new(dr.clone())));
    }
    out
}

/// Ready endpoints of port `index` of `svc`: from its EndpointSlices when there are any,
/// otherwise from the pods its selector matches.
fn endpoints(resources: &Resources, svc: &Service, index: usize) -> Vec<SocketAddrV4> {
    let namespace = svc.metadata.namespace();
    let port = &svc.spec.ports[index];
    let port_name = port.name.clone().unwrap_or_default();
    let slices: Vec<_> = resources
        .endpoint_slices
        .iter()
        .filter(|s| {
            s.metadata.namespace() == namespace
                && s.address_type == "IPv4"
                && s.metadata.labels.get(LABEL_SERVICE_NAME) == Some(&svc.metadata.name)
        })
        .collect();
    let mut out = BTreeSet::new();
    if !slices.is_empty() {
        for slice in slices {
            let Some(ep_port) = slice
                .ports
                .iter()
                .find(|p| p.name.clone().unwrap_or_default() == port_name)
            else {
                continue;
            };
            for ep in &slice.endpoints {
                if ep.conditions.ready == Some(false) {
                    continue;
                }
                for addr in &ep.addresses {
                    if let Ok(ip) = addr.parse() {
                        out.insert(SocketAddrV4::new(ip, ep_port.port));
                    }
                }
            }
        }
        return out.into_iter().collect();
    }
    for pod in &resources.pods {
        let Some(ip) = pod.endpoint_ip() else {
            continue;
        };
        if !pod.is_ready() || !semantics::service_selects(svc, pod) {
            continue;
        }
        if let Some(target) = semantics::target_port(pod, port.target_port.as_ref(), port.port) {
            out.insert(SocketAddrV4::new(ip, target));
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_str;

    const CONFIG: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: injected, labels: {istio-injection: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: mesh, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 100.65.0.2, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: mesh, labels: {app: web, istio.io/dataplane-mode: none}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 9090}]}]}
status: {podIP: 100.65.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: mesh, labels: {app: web}}
spec: {nodeName: n2}
status: {podIP: 100.65.1.2, conditions: [{type: Ready, status: "False"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: d, namespace: plain, labels: {istio.io/dataplane-mode: ambient}}
spec: {nodeName: n1}
status: {podIP: 100.65.0.4}
---
apiVersion: v1
kind: Pod
metadata: {name: e, namespace: injected}
spec: {nodeName: n1}
status: {podIP: 100.65.0.5}
---
apiVersion: v1
kind: Pod
metadata: {name: f, namespace: plain}
spec: {nodeName: n1}
status: {podIP: 100.65.0.6}
---
apiVersion: v1
kind: Pod
metadata: {name: host, namespace: mesh, labels: {app: web}}
spec: {nodeName: n1, hostNetwork: true}
status: {podIP: 100.64.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: done, namespace: mesh, labels: {app: web}}
spec: {nodeName: n1}
status: {podIP: 100.65.0.2, phase: Succeeded}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: mesh}
spec:
  clusterIP: 100.66.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}, {name: raw, port: 81, targetPort: 7000}]
"#;

    fn state() -> State {
        State::build(
            &parse_str("t.yaml", CONFIG).unwrap(),
            "n1",
            &Mesh::default(),
            1,
        )
    }

    #[test]
    fn local_pods_are_every_pod_network_pod_of_the_node_and_ipv6_makes_a_dual_stack_cluster() {
        let state = State::build(&parse_str("t", CONFIG).unwrap(), "n1", &Mesh::default(), 1);
        let local = state.local_pods();
        assert_eq!(local.get(&"100.65.0.2".parse().unwrap()), Some(&true));
        assert_eq!(local.get(&"100.65.0.3".parse().unwrap()), Some(&false));
        assert!(local.values().filter(|e| **e).count() < local.len());
        assert!(!state.dual_stack);
        // IPv6 first: the pod keeps its IPv4 address from podIPs; the cluster is dual-stack.
        let dual = r#"
apiVersion: v1
kind: Pod
metadata: {name: d, namespace: default}
spec: {nodeName: n1}
status: {podIP: "fd00::5", podIPs: [{ip: "fd00::5"}, {ip: 100.65.0.9}]}
"#;
        let resources = parse_str("t", dual).unwrap();
        assert_eq!(
            resources.pods[0].status.pod_ip,
            Some("100.65.0.9".parse().unwrap())
        );
        let state = State::build(&resources, "n1", &Mesh::default(), 1);
        assert!(state.dual_stack);
        assert!(state
            .local_pods()
            .contains_key(&"100.65.0.9".parse().unwrap()));
        let service = r#"
apiVersion: v1
kind: Service
metadata: {name: s}
spec: {clusterIP: 100.66.0.1, clusterIPs: [100.66.0.1, "fd00:1::1"], ports: [{port: 80}]}
"#;
        let state = State::build(&parse_str("t", service).unwrap(), "n1", &Mesh::default(), 1);
        assert!(state.dual_stack);
    }

    #[test]
    fn enrolment_follows_namespace_and_pod_labels() {
        let ips: Vec<String> = state()
            .local_enrolled()
            .iter()
            .map(|ip| ip.to_string())
            .collect();
        // a: namespace ambient; b: opted out; c: other node; d: pod label; e: injection; f: none;
        // host: host network; done: finished (its old IP is a's now).
        assert_eq!(ips, ["100.65.0.2", "100.65.0.4", "100.65.0.5"]);
    }

    #[test]
    fn node_ports_and_host_ports_resolve_only_at_the_node_addresses() {
        let extra = r#"
---
apiVersion: v1
kind: Service
metadata: {name: np, namespace: mesh}
spec:
  type: LoadBalancer
  clusterIP: 100.66.0.11
  externalIPs: [100.64.9.1]
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
status: {loadBalancer: {ingress: [{ip: 100.64.9.2}, {hostname: lb.example}]}}
---
apiVersion: v1
kind: Pod
metadata: {name: hp, namespace: mesh}
spec: {nodeName: n1, containers: [{name: c, ports: [{containerPort: 9000, hostPort: 31000}]}]}
status: {podIP: 100.65.0.7}
---
apiVersion: v1
kind: Pod
metadata: {name: hp-elsewhere, namespace: mesh}
spec: {nodeName: n2, containers: [{name: c, ports: [{containerPort: 9000, hostPort: 31001}]}]}
status: {podIP: 100.65.1.7}
"#;
        let text = format!("{CONFIG}{extra}");
        let state = State::build(
            &parse_str("t.yaml", &text).unwrap(),
            "n1",
            &Mesh::default(),
            1,
        );
        // 30080: its Service has the local enrolled pod a; 31000: hp is local and enrolled;
        // 31001 belongs to another node.
        assert_eq!(
            state.local_enrolled_node_ports(),
            BTreeSet::from([30080, 31000])
        );
        let node: BTreeSet<Ipv4Addr> = BTreeSet::from(["100.64.0.1".parse().unwrap()]);
        let at = |addr: &str| state.resolve_at_node(addr.parse().unwrap(), &node);
        assert!(matches!(at("100.64.0.1:30080"), Resolution::Service(t) if t.name == "np"));
        assert!(
            matches!(at("100.64.0.1:31000"), Resolution::Pod(p) if p.to_string() == "100.65.0.7:9000")
        );
        // Another host with the same port is just a destination.
        assert!(matches!(at("100.64.0.9:30080"), Resolution::Direct));
        // External and load-balancer addresses lead to the Service like its VIP, and are
        // captured like it.
        let vips = state.local_enrolled_vips();
        for addr in ["100.64.9.1:80", "100.64.9.2:80", "100.66.0.11:80"] {
            assert!(vips.contains(&addr.parse().unwrap()), "{addr}: {vips:?}");
            assert!(
                matches!(at(addr), Resolution::Service(t) if t.name == "np"),
                "{addr}"
            );
        }
    }

    #[test]
    fn named_target_ports_resolve_per_pod_and_unready_pods_are_skipped() {
        let state = state();
        let vip = "100.66.0.10:80".parse().unwrap();
        let Resolution::Service(target) = state.resolve(vip) else {
            panic!("VIP not resolved")
        };
        assert_eq!(target.qualified_name(), "mesh/web");
        let eps: Vec<String> = target.endpoints.iter().map(ToString::to_string).collect();
        // The host-network pod declares no `http` port and the finished pod is gone.
        assert_eq!(eps, ["100.65.0.2:8080", "100.65.0.3:9090"]);
        // Round robin over the ready endpoints.
        let picks: Vec<_> = (0..4).map(|_| target.pick().unwrap().port()).collect();
        assert_eq!(picks, [8080, 9090, 8080, 9090]);
        let Resolution::Service(raw) = state.resolve("100.66.0.10:81".parse().unwrap()) else {
            panic!("port 81 not resolved")
        };
        // A numeric targetPort: the host-network pod is an endpoint too, on the node's IP.
        let raw_eps: Vec<String> = raw.endpoints.iter().map(ToString::to_string).collect();
        assert_eq!(
            raw_eps,
            ["100.64.0.10:7000", "100.65.0.2:7000", "100.65.0.3:7000"]
        );
        assert!(matches!(
            state.resolve("100.66.0.10:82".parse().unwrap()),
            Resolution::UnknownServicePort { .. }
        ));
        assert!(matches!(
            state.resolve("100.65.1.2:80".parse().unwrap()),
            Resolution::Direct
        ));
    }

    #[test]
    fn endpoint_slices_take_precedence_over_the_selector() {
        let text = format!(
            "{CONFIG}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-x, namespace: mesh, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: 8181}}]\nendpoints:\n- addresses: [100.65.1.9]\n- addresses: [100.65.1.10]\n  conditions: {{ready: false}}\n"
        );
        let state = State::build(
            &parse_str("t.yaml", &text).unwrap(),
            "n1",
            &Mesh::default(),
            1,
        );
        let Resolution::Service(target) = state.resolve("100.66.0.10:80".parse().unwrap()) else {
            panic!("VIP not resolved")
        };
        assert_eq!(target.endpoints, ["100.65.1.9:8181".parse().unwrap()]);
    }

    #[test]
    fn workloads_carry_identity_and_the_policies_that_select_them() {
        let policies = r#"
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: mesh}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-only, namespace: mesh}
spec: {selector: {matchLabels: {app: web}}, rules: [{from: [{source: {namespaces: [mesh]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: everyone, namespace: istio-system}
spec: {action: AUDIT, rules: [{}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: mesh}
spec: {hosts: [web, web.mesh.svc.cluster.local], http: [{route: [{destination: {host: web}}]}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ingress-only, namespace: mesh}
spec: {hosts: [web], gateways: [gw], http: [{route: [{destination: {host: web}}]}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: new, namespace: mesh, creationTimestamp: "2026-02-01T00:00:00Z"}
spec: {host: web}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: old, namespace: mesh, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {host: web.mesh}
"#;
        let text = format!("{CONFIG}{policies}");
        let state = State::build(
            &parse_str("t.yaml", &text).unwrap(),
            "n1",
            &Mesh::default(),
            1,
        );
        let a = &state.workloads[&"100.65.0.2".parse().unwrap()];
        assert_eq!(a.identity, "spiffe://cluster.local/ns/mesh/sa/default");
        assert_eq!(a.mtls.mode, crate::config::security::MtlsMode::Strict);
        let names: Vec<String> = a
            .authorization
            .iter()
            .map(|p| p.0.metadata.qualified())
            .collect();
        assert_eq!(names, ["mesh/web-only", "istio-system/everyone"]);
        let d = &state.workloads[&"100.65.0.4".parse().unwrap()];
        assert_eq!(
            d.mtls.mode,
            crate::config::security::MtlsMode::Permissive,
            "namespace plain has no policy"
        );
        assert_eq!(d.authorization.len(), 1, "only the mesh-wide policy");
        let host = "web.mesh.svc.cluster.local";
        // Both spellings of the host index the one VirtualService; the gateway-only one is out.
        let vs: Vec<String> = state.virtual_services[host]
            .iter()
            .map(|v| v.0.metadata.name.clone())
            .collect();
        assert_eq!(vs, ["web"]);
        let rules: Vec<&str> = state.destination_rules[host]
            .iter()
            .map(|r| r.0.metadata.name.as_str())
            .collect();
        assert_eq!(rules, ["old", "new"]);
        let Resolution::Service(target) = state.resolve("100.66.0.10:80".parse().unwrap()) else {
            panic!("VIP not resolved")
        };
        assert_eq!(target.host, host);
        assert_eq!(target.protocol, Protocol::Http);
        let json = serde_json::to_value(&state).unwrap();
        assert_eq!(json["destination_rules"][host][0], "mesh/old");
    }

    #[test]
    fn kubectl_output_builds_the_expected_snapshot() {
        let text = include_str!("../../tests/data/kubectl-get.yaml");
        let state = State::build(
            &parse_str("k.yaml", text).unwrap(),
            "k3s-agent-1",
            &Mesh::default(),
            1,
        );
        let ip: Ipv4Addr = "100.65.1.7".parse().unwrap();
        assert_eq!(state.local_enrolled(), BTreeSet::from([ip]));
        assert_eq!(
            state.workloads[&ip].identity,
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        let Resolution::Service(web) = state.resolve("100.66.0.20:80".parse().unwrap()) else {
            panic!("VIP not resolved")
        };
        assert_eq!(web.endpoints, ["100.65.1.7:8080".parse().unwrap()]);
        assert_eq!(web.protocol, Protocol::Http);
    }
}
