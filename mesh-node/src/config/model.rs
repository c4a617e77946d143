//! Typed Kubernetes resources the mesh reads (the fields it uses; others are ignored).
//!
//! Field names follow the Kubernetes API (camelCase in YAML). A resource without
//! `metadata.namespace` belongs to `default`, as `kubectl apply` does.

use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::Deserialize;

/// Labels and selectors.
pub type Labels = BTreeMap<String, String>;

/// `metadata` of every resource.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// Resource name (required).
    pub name: String,
    /// Namespace; `None` means `default` for namespaced kinds.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Labels.
    #[serde(default)]
    pub labels: Labels,
}

impl ObjectMeta {
    /// The namespace, `default` when unset.
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
}

/// `v1/Namespace`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Namespace {
    /// Metadata; its labels decide enrolment.
    pub metadata: ObjectMeta,
}

/// `v1/Pod`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Pod {
    /// Metadata; `istio.io/dataplane-mode` on the pod enrols it or opts it out.
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: PodSpec,
    /// Status: the pod's IP and readiness.
    #[serde(default)]
    pub status: PodStatus,
}

/// `Pod.spec`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    /// The node the pod runs on.
    #[serde(default)]
    pub node_name: Option<String>,
    /// Host-network pods share the node's IP: they are never captured or enrolled.
    #[serde(default)]
    pub host_network: bool,
    /// The pod's service account (its mesh identity).
    #[serde(default)]
    pub service_account_name: Option<String>,
    /// Containers (their named ports resolve a Service's named `targetPort`).
    #[serde(default)]
    pub containers: Vec<Container>,
}

/// `Pod.spec.containers[]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    /// Container name.
    #[serde(default)]
    pub name: String,
    /// Declared ports.
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
}

/// `Pod.spec.containers[].ports[]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    /// Port name, referenced by a Service's `targetPort`.
    #[serde(default)]
    pub name: Option<String>,
    /// Port number.
    pub container_port: u16,
    /// `TCP` (default), `UDP` or `SCTP`.
    #[serde(default)]
    pub protocol: Option<String>,
}

/// `Pod.status`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    /// `Pending`, `Running`, `Succeeded`, `Failed` or `Unknown`.
    #[serde(default)]
    pub phase: Option<String>,
    /// The pod's IPv4 address.
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<Ipv4Addr>,
    /// Conditions; `Ready` decides whether the pod is a Service endpoint.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// A status condition.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct Condition {
    /// Condition type, e.g. `Ready`.
    #[serde(rename = "type")]
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
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Service {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// Spec.
    #[serde(default)]
    pub spec: ServiceSpec,
}

/// `Service.spec`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// The virtual IP (`None` for a headless Service).
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    /// Ports.
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// Pod selector; endpoints come from it unless EndpointSlices are given.
    #[serde(default)]
    pub selector: Option<Labels>,
}

/// `Service.spec.ports[]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// Port name (required when a Service has several ports).
    #[serde(default)]
    pub name: Option<String>,
    /// Application protocol (e.g. `http`), used for protocol selection.
    #[serde(default)]
    pub app_protocol: Option<String>,
    /// The Service port on the VIP.
    pub port: u16,
    /// The pod port: a number or the name of a container port; defaults to `port`.
    #[serde(default)]
    pub target_port: Option<IntOrString>,
    /// `TCP` (default), `UDP` or `SCTP`.
    #[serde(default)]
    pub protocol: Option<String>,
}

/// A Kubernetes `IntOrString` (a port number or a port name).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum IntOrString {
    /// A number.
    Int(u16),
    /// A name.
    String(String),
}

/// `discovery.k8s.io/v1/EndpointSlice`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    /// Metadata; label `kubernetes.io/service-name` names the Service.
    pub metadata: ObjectMeta,
    /// `IPv4`, `IPv6` or `FQDN`.
    pub address_type: String,
    /// Endpoints.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// Ports (matched to Service ports by name).
    #[serde(default)]
    pub ports: Vec<EndpointPort>,
}

/// `EndpointSlice.endpoints[]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Addresses (one for IPv4 slices in practice).
    pub addresses: Vec<String>,
    /// Conditions.
    #[serde(default)]
    pub conditions: EndpointConditions,
    /// Node of the endpoint.
    #[serde(default)]
    pub node_name: Option<String>,
}

/// `EndpointSlice.endpoints[].conditions`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct EndpointConditions {
    /// Ready; unset means ready, as the API documents.
    #[serde(default)]
    pub ready: Option<bool>,
}

/// `EndpointSlice.ports[]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPort {
    /// Name, matching the Service port's name (empty for an unnamed port).
    #[serde(default)]
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
