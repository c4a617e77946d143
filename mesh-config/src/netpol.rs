//! `networking.k8s.io/v1` NetworkPolicy, complete, with the evaluation rules Kubernetes
//! documents (used by `analyze`; the kernel enforces it through the CNI, not the mesh).

use serde_yaml_ng::Value;

use super::decode::{string_enum, Cx, Decode};
use super::values::Labels;
use super::values::{Cidr, IntOrString, LabelSelector};

string_enum! {
    /// `policyTypes[]`.
    PolicyType {
        /// Incoming connections.
        Ingress = "Ingress",
        /// Outgoing connections.
        Egress = "Egress",
    }
}

/// `NetworkPolicy.spec`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkPolicySpec {
    /// Pods of the policy's namespace it applies to (empty: all).
    pub pod_selector: LabelSelector,
    /// Directions it isolates; default Ingress, plus Egress when egress rules exist.
    pub policy_types: Vec<PolicyType>,
    /// Allowed incoming connections.
    pub ingress: Vec<IngressRule>,
    /// Allowed outgoing connections.
    pub egress: Vec<EgressRule>,
}

impl NetworkPolicySpec {
    /// The directions it isolates, with Kubernetes' default when `policyTypes` is unset.
    pub fn types(&self) -> Vec<PolicyType> {
        if !self.policy_types.is_empty() {
            return self.policy_types.clone();
        }
        let mut types = vec![PolicyType::Ingress];
        if !self.egress.is_empty() {
            types.push(PolicyType::Egress);
        }
        types
    }
}

impl Decode for NetworkPolicySpec {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| NetworkPolicySpec {
            pod_selector: f.req("podSelector"),
            policy_types: f.list("policyTypes"),
            ingress: f.list("ingress"),
            egress: f.list("egress"),
        })
    }
}

/// `NetworkPolicyIngressRule`: a connection is allowed when it comes from any of `from` (all
/// sources when empty) to any of `ports` (all ports when empty).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IngressRule {
    /// Allowed sources.
    pub from: Vec<Peer>,
    /// Allowed destination ports.
    pub ports: Vec<NetworkPolicyPort>,
}

impl Decode for IngressRule {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| IngressRule {
            from: f.list("from"),
            ports: f.list("ports"),
        })
    }
}

/// `NetworkPolicyEgressRule`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressRule {
    /// Allowed destinations.
    pub to: Vec<Peer>,
    /// Allowed destination ports.
    pub ports: Vec<NetworkPolicyPort>,
}

impl Decode for EgressRule {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| EgressRule {
            to: f.list("to"),
            ports: f.list("ports"),
        })
    }
}

/// `NetworkPolicyPeer`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// Pods (in the policy's namespace, or in the namespaces `namespace_selector` selects).
    pub pod_selector: Option<LabelSelector>,
    /// Namespaces.
    pub namespace_selector: Option<LabelSelector>,
    /// Addresses.
    pub ip_block: Option<IpBlock>,
}

impl Peer {
    /// Whether a pod with `labels` in a namespace with `namespace_labels` (named `namespace`)
    /// matches, for a policy in `policy_namespace`.
    pub fn matches_pod(
        &self,
        policy_namespace: &str,
        namespace: &str,
        namespace_labels: &Labels,
        labels: &Labels,
        ip: std::net::Ipv4Addr,
    ) -> bool {
        if let Some(block) = &self.ip_block {
            return block.cidr.contains(ip) && !block.except.iter().any(|c| c.contains(ip));
        }
        let namespace_ok = match &self.namespace_selector {
            Some(selector) => selector.matches(namespace_labels),
            None => namespace == policy_namespace,
        };
        namespace_ok
            && self
                .pod_selector
                .as_ref()
                .is_none_or(|selector| selector.matches(labels))
    }
}

impl Decode for Peer {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let peer = Peer {
                pod_selector: f.opt("podSelector"),
                namespace_selector: f.opt("namespaceSelector"),
                ip_block: f.opt("ipBlock"),
            };
            let selectors = f.has("podSelector") || f.has("namespaceSelector");
            if f.has("ipBlock") && selectors {
                f.cx()
                    .error("ipBlock cannot be combined with podSelector or namespaceSelector");
            } else if !f.has("ipBlock") && !selectors {
                f.cx()
                    .error("a peer needs podSelector, namespaceSelector or ipBlock");
            }
            peer
        })
    }
}

/// `IPBlock`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpBlock {
    /// Allowed network.
    pub cidr: Cidr,
    /// Excluded parts of it.
    pub except: Vec<Cidr>,
}

impl Decode for IpBlock {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| IpBlock {
            cidr: f.req("cidr"),
            except: f.list("except"),
        })
    }
}

/// `NetworkPolicyPort`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkPolicyPort {
    /// `TCP` (default), `UDP` or `SCTP`.
    pub protocol: Option<String>,
    /// Port number or named container port; all ports when unset.
    pub port: Option<IntOrString>,
    /// End of a numeric range starting at `port`.
    pub end_port: Option<u16>,
}

impl NetworkPolicyPort {
    /// Whether TCP port `port` (numbered) is covered. Named ports never cover the mesh's
    /// tunnel port, which no container declares.
    pub fn covers_tcp(&self, port: u16) -> bool {
        if !self
            .protocol
            .as_deref()
            .unwrap_or("TCP")
            .eq_ignore_ascii_case("TCP")
        {
            return false;
        }
        match &self.port {
            None => true,
            Some(IntOrString::Int(start)) => {
                let end = self.end_port.unwrap_or(*start);
                (*start..=end).contains(&port)
            }
            Some(IntOrString::String(_)) => false,
        }
    }
}

impl Decode for NetworkPolicyPort {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let p = NetworkPolicyPort {
                protocol: f.opt("protocol"),
                port: f.opt("port"),
                end_port: f.opt("endPort"),
            };
            if let Some(protocol) = &p.protocol {
                if !["TCP", "UDP", "SCTP"].contains(&protocol.as_str()) {
                    f.error_at(
                        "protocol",
                        format!("unknown protocol {protocol:?}; expected TCP, UDP or SCTP"),
                    );
                }
            }
            let port_known = !f.failed("port");
            match (&p.port, p.end_port) {
                _ if !port_known => {}
                (Some(IntOrString::Int(start)), Some(end)) if end < *start => {
                    f.error_at("endPort", "must not be below port")
                }
                (Some(IntOrString::String(_)) | None, Some(_)) => {
                    f.error_at("endPort", "needs a numeric port")
                }
                _ => {}
            }
            p
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_peers_follow_kubernetes() {
        let value: Value = serde_yaml_ng::from_str(
            r#"
podSelector: {matchLabels: {app: db}}
ingress:
- from: [{namespaceSelector: {matchLabels: {team: a}}, podSelector: {matchLabels: {app: web}}}]
  ports: [{port: 5432}, {port: 8000, endPort: 8100}, {port: http}]
egress:
- to: [{ipBlock: {cidr: 100.64.0.0/10, except: [100.64.1.0/24]}}]
"#,
        )
        .unwrap();
        let mut cx = Cx::default();
        let spec = NetworkPolicySpec::decode(&value, &mut cx).unwrap();
        assert_eq!(cx.errors(), 0, "{:?}", cx.into_findings());
        assert_eq!(spec.types(), [PolicyType::Ingress, PolicyType::Egress]);
        let ports = &spec.ingress[0].ports;
        assert!(ports[0].covers_tcp(5432) && !ports[0].covers_tcp(15008));
        assert!(ports[1].covers_tcp(8050) && !ports[1].covers_tcp(8101));
        assert!(!ports[2].covers_tcp(15008));
        let labels = |k: &str, v: &str| Labels::from([(k.to_string(), v.to_string())]);
        let peer = &spec.ingress[0].from[0];
        let ip = "100.65.0.2".parse().unwrap();
        assert!(peer.matches_pod("db", "x", &labels("team", "a"), &labels("app", "web"), ip));
        assert!(!peer.matches_pod("db", "x", &labels("team", "b"), &labels("app", "web"), ip));
        let block = &spec.egress[0].to[0];
        assert!(block.matches_pod("db", "x", &Labels::new(), &Labels::new(), ip));
        let excepted = "100.64.1.9".parse().unwrap();
        assert!(!block.matches_pod("db", "x", &Labels::new(), &Labels::new(), excepted));
    }
}
