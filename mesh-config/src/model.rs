//! Typed Kubernetes resources the mesh reads: the fields it uses; others are accepted silently
//! (these kinds have many fields the mesh has no business with). The Istio kinds and
//! NetworkPolicy are modelled completely in [`super::networking`], [`super::security`] and
//! [`super::netpol`].
//!
//! Field names follow the Kubernetes API (camelCase in YAML). A resource without
//! `metadata.namespace` belongs to `default`, as `kubectl apply` does.

use std::net::{IpAddr, Ipv4Addr};

use serde_yaml_ng::Value;

use super::decode::{Cx, Decode};
pub use super::values::IntOrString;

/// Labels and selectors.
pub use super::values::Labels;

/// `metadata` of every resource.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Resource name (required).
    pub name: String,
    /// Namespace; `None` means `default` for namespaced kinds.
    pub namespace: Option<String>,
    /// Labels.
    pub labels: Labels,
    /// Annotations.
    pub annotations: Labels,
    /// Creation time (RFC 3339); among Istio policies of one level the oldest wins.
    pub creation_timestamp: Option<String>,
}

impl ObjectMeta {
    /// The namespace, `default` when unset.
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }

    /// `namespace/name`.
    pub fn qualified(&self) -> String {
        format!("{}/{}", self.namespace(), self.name)
    }

    /// Sort key from oldest to newest, as Istio picks among policies of one level: creation
    /// time (none counts as oldest), then `namespace/name`.
    pub fn age_key(&self) -> (String, String) {
        (
            self.creation_timestamp.clone().unwrap_or_default(),
            self.qualified(),
        )
    }
}

/// A namespaced resource with a `spec` (the Istio kinds and NetworkPolicy).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resource<S> {
    /// `group/version` it was written with (`networking.istio.io/v1beta1`).
    pub api_version: String,
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    pub spec: S,
}

impl<S> Resource<S> {
    /// The namespace, `default` when unset.
    pub fn namespace(&self) -> &str {
        self.metadata.namespace()
    }
}

impl<S: Decode + Default> Decode for Resource<S> {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            f.skip("kind");
            f.skip("status");
            let api_version = f.req("apiVersion");
            let metadata = f.req("metadata");
            // A missing spec is an empty one (`AuthorizationPolicy` with no spec denies
            // everything it selects, as `spec: {}` does); the spec's own rules still apply.
            let spec = if f.has("spec") {
                f.opt("spec")
            } else {
                f.skip("spec");
                let empty = Value::Mapping(Default::default());
                f.cx().at("spec", |cx| S::decode(&empty, cx))
            };
            Resource {
                api_version,
                metadata,
                spec: spec.unwrap_or_default(),
            }
        })
    }
}

/// `v1/Namespace`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Namespace {
    /// Metadata; its labels decide enrolment.
    pub metadata: ObjectMeta,
}

/// `v1/Pod`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pod {
    /// Metadata; `istio.io/dataplane-mode` on the pod enrols it or opts it out.
    pub metadata: ObjectMeta,
    /// Spec.
    pub spec: PodSpec,
    /// Status: the pod's IP and readiness.
    pub status: PodStatus,
}

/// `Pod.spec`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodSpec {
    /// The node the pod runs on.
    pub node_name: Option<String>,
    /// Host-network pods share the node's IP: they are never captured or enrolled.
    pub host_network: bool,
    /// The pod's service account (its mesh identity).
    pub service_account_name: Option<String>,
    /// Containers (their named ports resolve a Service's named `targetPort`).
    pub containers: Vec<Container>,
}

/// `Pod.spec.containers[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Container {
    /// Container name.
    pub name: String,
    /// Declared ports.
    pub ports: Vec<ContainerPort>,
}

/// `Pod.spec.containers[].ports[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerPort {
    /// Port name, referenced by a Service's `targetPort`.
    pub name: Option<String>,
    /// Port number.
    pub container_port: u16,
    /// `TCP` (default), `UDP` or `SCTP`.
    pub protocol: Option<String>,
    /// The node port mapped to it (the CNI's portmap).
    pub host_port: Option<u16>,
}

/// `Pod.status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodStatus {
    /// `Pending`, `Running`, `Succeeded`, `Failed` or `Unknown`.
    pub phase: Option<String>,
    /// The pod's IPv4 address: `podIP`, or on a cluster whose first family is IPv6 the
    /// IPv4 one of `podIPs`.
    pub pod_ip: Option<Ipv4Addr>,
    /// The pod has an IPv6 address (`podIP`, `podIPs`): the cluster is dual-stack.
    pub ipv6: bool,
    /// Conditions; `Ready` decides whether the pod is a Service endpoint.
    pub conditions: Vec<Condition>,
}

/// A status condition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Condition {
    /// Condition type, e.g. `Ready`.
    pub kind: String,
    /// `"True"`, `"False"` or `"Unknown"`.
    pub status: String,
}

impl Pod {
    /// The pod IP a live, pod-network pod holds: `None` for host-network pods (their IP is
    /// the node's) and for pods that finished (their `podIP` may already belong to another
    /// pod). Only such pods can be workloads of the mesh.
    pub fn live_ip(&self) -> Option<Ipv4Addr> {
        if self.spec.host_network {
            return None;
        }
        self.endpoint_ip()
    }

    /// The IP a Service may send to: any pod that has not finished, host-network pods
    /// included (as Kubernetes does).
    pub fn endpoint_ip(&self) -> Option<Ipv4Addr> {
        let finished = matches!(self.status.phase.as_deref(), Some("Succeeded" | "Failed"));
        if finished {
            return None;
        }
        self.status.pod_ip
    }

    /// Ready as Kubernetes defines it (condition `Ready` is `True`). A hand-written pod with no
    /// conditions at all counts as ready, so small local configs need not spell them out.
    pub fn is_ready(&self) -> bool {
        let conditions = &self.status.conditions;
        conditions.is_empty()
            || conditions
                .iter()
                .any(|c| c.kind == "Ready" && c.status == "True")
    }
}

/// `v1/Service`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    pub spec: ServiceSpec,
    /// Status (load-balancer ingress addresses).
    pub status: ServiceStatus,
}

/// `Service.status`: the addresses a load balancer gave the Service
/// (`status.loadBalancer.ingress[].ip`), which kube-proxy also forwards to its endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceStatus {
    /// Ingress IPs.
    pub ingress_ips: Vec<String>,
}

struct LoadBalancerStatus(Vec<String>);

struct LoadBalancerIngress(Option<String>);

/// `Service.spec`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceSpec {
    /// The virtual IP (`None` for a headless Service).
    pub cluster_ip: Option<String>,
    /// Ports.
    pub ports: Vec<ServicePort>,
    /// Pod selector; endpoints come from it unless EndpointSlices are given.
    pub selector: Option<Labels>,
    /// Other addresses kube-proxy forwards the Service's ports at (`externalIPs`).
    pub external_ips: Vec<String>,
    /// The Service has an IPv6 family (`ipFamilies`, `clusterIPs`): the cluster is
    /// dual-stack.
    pub ipv6: bool,
}

/// `Service.spec.ports[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePort {
    /// Port name (required when a Service has several ports).
    pub name: Option<String>,
    /// Application protocol (e.g. `http`), used for protocol selection.
    pub app_protocol: Option<String>,
    /// The Service port on the VIP.
    pub port: u16,
    /// The pod port: a number or the name of a container port; defaults to `port`.
    pub target_port: Option<IntOrString>,
    /// `TCP` (default), `UDP` or `SCTP`.
    pub protocol: Option<String>,
    /// The port every node opens for it (NodePort and LoadBalancer Services).
    pub node_port: Option<u16>,
}

/// `discovery.k8s.io/v1/EndpointSlice`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointSlice {
    /// Metadata; label `kubernetes.io/service-name` names the Service.
    pub metadata: ObjectMeta,
    /// `IPv4`, `IPv6` or `FQDN`.
    pub address_type: String,
    /// Endpoints.
    pub endpoints: Vec<Endpoint>,
    /// Ports (matched to Service ports by name).
    pub ports: Vec<EndpointPort>,
}

/// `EndpointSlice.endpoints[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// Addresses (one for IPv4 slices in practice).
    pub addresses: Vec<String>,
    /// Conditions.
    pub conditions: EndpointConditions,
    /// Node of the endpoint.
    pub node_name: Option<String>,
}

/// `EndpointSlice.endpoints[].conditions`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointConditions {
    /// Ready; unset means ready, as the API documents.
    pub ready: Option<bool>,
}

/// `EndpointSlice.ports[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointPort {
    /// Name, matching the Service port's name (empty for an unnamed port).
    pub name: Option<String>,
    /// The endpoint port.
    pub port: u16,
}

/// Label that enrols a namespace or pod (`ambient`), or opts a pod out (`none`).
pub const LABEL_DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// Namespace label honoured as enrolment (there are no sidecars to inject).
pub const LABEL_INJECTION: &str = "istio-injection";
/// EndpointSlice label naming its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

impl Decode for ObjectMeta {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, false, |f| ObjectMeta {
            name: f.req("name"),
            namespace: f.opt("namespace"),
            labels: f.map("labels"),
            annotations: f.map("annotations"),
            creation_timestamp: f.opt("creationTimestamp"),
        })
    }
}

impl Decode for Namespace {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, false, |f| Namespace {
            metadata: f.req("metadata"),
        })
    }
}

impl Decode for Pod {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, false, |f| Pod {
            metadata: f.req("metadata"),
            spec: f.opt("spec").unwrap_or_default(),
            status: f.opt("status").unwrap_or_default(),
        })
    }
}

impl Decode for PodSpec {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, false, |f| PodSpec {
            node_name: f.opt("nodeName"),
            host_network: f.flag("hostNetwork"),
            service_account_name: f.opt("serviceAccountName"),
            containers: f.list("containers"),
        })
    }
}

impl Decode for Container {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, false, |f| Container {
            name: f.opt("name").unwrap_or_default(),
            ports: f.list("ports"),
        })
    }
}

impl Decode for ContainerPort {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, false, |f| ContainerPort {
            name: f.opt("name"),
            container_port: f.req("containerPort"),
            protocol: f.opt("protocol"),
            host_port: f.opt("hostPort"),
        })
    }
}

impl Decode for PodStatus {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, false, |f| {
            let primary: Option<IpAddr> = f.opt("podIP");
            let all: Vec<PodIp> = f.list("podIPs");
            let addresses: Vec<IpAddr> = primary
                .into_iter()
                .chain(all.into_iter().filter_map(|p| p.0))
                .collect();
            PodStatus {
                phase: f.opt("phase"),
                pod_ip: addresses.iter().find_map(|ip| match ip {
                    IpAddr::V4(v4) => Some(*v4),
                    IpAddr::V6(_) => None,
                }),
                ipv6: addresses.iter().any(IpAddr::is_ipv6),
                conditions: f.list("conditions"),
            }
        })
    }
}

/// `Pod.status.podIPs[]`.
struct PodIp(Option<IpAddr>);

impl Decode for PodIp {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, false, |f| PodIp(f.opt("ip")))
    }
}

impl Decode for Condition {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, false, |f| Condition {
            kind: f.req("type"),
            status: f.req("status"),
        })
    }
}

impl Decode for Service {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, false, |f| Service {
            metadata: f.req("metadata"),
            spec: f.opt("spec").unwrap_or_default(),
            status: f.opt("status").unwrap_or_default(),
        })
    }
}

impl Decode for ServiceStatus {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, false, |f| ServiceStatus {
            ingress_ips: f
                .opt::<LoadBalancerStatus>("loadBalancer")
                .map(|lb| lb.0)
                .unwrap_or_default(),
        })
    }
}

impl Decode for LoadBalancerStatus {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, false, |f| {
            LoadBalancerStatus(
                f.list::<LoadBalancerIngress>("ingress")
                    .into_iter()
                    .filter_map(|i| i.0)
                    .collect(),
            )
        })
    }
}

impl Decode for LoadBalancerIngress {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, false, |f| LoadBalancerIngress(f.opt("ip")))
    }
}

impl Decode for ServiceSpec {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, false, |f| {
            let cluster_ip: Option<String> = f.opt("clusterIP");
            let cluster_ips: Vec<String> = f.list("clusterIPs");
            let families: Vec<String> = f.list("ipFamilies");
            ServiceSpec {
                ipv6: families.iter().any(|f| f == "IPv6")
                    || cluster_ip
                        .iter()
                        .chain(&cluster_ips)
                        .any(|ip| ip.contains(':')),
                cluster_ip,
                ports: f.list("ports"),
                selector: f.opt("selector"),
                external_ips: f.list("externalIPs"),
            }
        })
    }
}

impl Decode for ServicePort {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, false, |f| ServicePort {
            name: f.opt("name"),
            app_protocol: f.opt("appProtocol"),
            port: f.req("port"),
            target_port: f.opt("targetPort"),
            protocol: f.opt("protocol"),
            node_port: f.opt("nodePort"),
        })
    }
}

impl Decode for EndpointSlice {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, false, |f| EndpointSlice {
            metadata: f.req("metadata"),
            address_type: f.req("addressType"),
            endpoints: f.list("endpoints"),
            ports: f.list("ports"),
        })
    }
}

impl Decode for Endpoint {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, false, |f| Endpoint {
            addresses: f.req("addresses"),
            conditions: f.opt("conditions").unwrap_or_default(),
            node_name: f.opt("nodeName"),
        })
    }
}

impl Decode for EndpointConditions {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, false, |f| EndpointConditions {
            ready: f.opt("ready"),
        })
    }
}

impl Decode for EndpointPort {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, false, |f| EndpointPort {
            name: f.opt("name"),
            port: f.req("port"),
        })
    }
}
