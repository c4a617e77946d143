//! `mesh-node analyze`: cross-resource checks in the spirit of `istioctl analyze`. Each finding
//! has a stable code (Istio's where Istio has the same check, `MESH0xxx` otherwise), the
//! resource it concerns with the file and document it came from, and a hint to fix it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use mesh_common::PORT_HBONE;

use crate::{
    decode::Severity,
    kinds::VirtualService,
    load::Resources,
    model::{Labels, ObjectMeta, Pod},
    netpol::{NetworkPolicySpec, PolicyType},
    networking::Destination,
    semantics::{self, Mesh},
    values::{labels_match, WorkloadSelector},
};

/// A check `analyze` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Code {
    /// A route names a host or subset that nothing defines (Istio IST0101).
    ReferencedResourceNotFound,
    /// Two VirtualServices for mesh traffic claim one host (Istio IST0109).
    ConflictingVirtualServiceHosts,
    /// An AuthorizationPolicy or PeerAuthentication selects no workload (Istio IST0127).
    NoMatchingWorkloads,
    /// A DestinationRule subset selects no pod of its Service (Istio IST0173).
    SubsetSelectsNoPods,
    /// A DestinationRule's host matches no Service (Istio IST0174).
    UnknownDestinationRuleHost,
    /// Every destination of a route has weight 0.
    AllWeightsZero,
    /// A PeerAuthentication with a selector in the root namespace, which Istio ignores.
    RootNamespaceSelectorIgnored,
    /// `portLevelMtls` on a namespace- or mesh-wide PeerAuthentication.
    PortLevelMtlsWithoutSelector,
    /// HTTP routes or L7 authorization on ports that declare no HTTP protocol.
    L7OnOpaquePort,
    /// A NetworkPolicy blocks the HBONE port between enrolled pods.
    NetworkPolicyBlocksHbone,
    /// An enrolled pod runs as the namespace's `default` service account.
    NoServiceAccount,
    /// AuthorizationPolicy matches paths under path settings that let variants of a path
    /// (`//admin`, `/admin%2Fx`, `/admin;x=1`) past it.
    PathRulesBypassable,
    /// Two Telemetry resources with selectors select one workload (Istio IST0159).
    ConflictingTelemetrySelectors,
    /// Two Telemetry resources without a selector in one namespace (Istio IST0160).
    MultipleTelemetriesWithoutSelector,
}

impl Code {
    /// The stable identifier printed with each finding.
    pub fn id(self) -> &'static str {
        match self {
            Code::ReferencedResourceNotFound => "IST0101",
            Code::ConflictingVirtualServiceHosts => "IST0109",
            Code::NoMatchingWorkloads => "IST0127",
            Code::SubsetSelectsNoPods => "IST0173",
            Code::UnknownDestinationRuleHost => "IST0174",
            Code::AllWeightsZero => "MESH0001",
            Code::RootNamespaceSelectorIgnored => "MESH0002",
            Code::PortLevelMtlsWithoutSelector => "MESH0003",
            Code::L7OnOpaquePort => "MESH0004",
            Code::NetworkPolicyBlocksHbone => "MESH0005",
            Code::NoServiceAccount => "MESH0006",
            Code::PathRulesBypassable => "MESH0007",
            Code::ConflictingTelemetrySelectors => "IST0159",
            Code::MultipleTelemetriesWithoutSelector => "IST0160",
        }
    }

    /// The check's name.
    pub fn name(self) -> &'static str {
        match self {
            Code::ReferencedResourceNotFound => "ReferencedResourceNotFound",
            Code::ConflictingVirtualServiceHosts => "ConflictingMeshGatewayVirtualServiceHosts",
            Code::NoMatchingWorkloads => "NoMatchingWorkloadsFound",
            Code::SubsetSelectsNoPods => "DestinationRuleSubsetNotSelectPods",
            Code::UnknownDestinationRuleHost => "UnknownDestinationRuleHost",
            Code::AllWeightsZero => "AllRouteWeightsZero",
            Code::RootNamespaceSelectorIgnored => "RootNamespaceSelectorIgnored",
            Code::PortLevelMtlsWithoutSelector => "PortLevelMtlsWithoutSelector",
            Code::L7OnOpaquePort => "L7ConfigOnOpaquePort",
            Code::NetworkPolicyBlocksHbone => "NetworkPolicyBlocksHbone",
            Code::NoServiceAccount => "DefaultServiceAccount",
            Code::PathRulesBypassable => "PathRulesBypassable",
            Code::ConflictingTelemetrySelectors => "ConflictingTelemetryWorkloadSelectors",
            Code::MultipleTelemetriesWithoutSelector => {
                "MultipleTelemetriesWithoutWorkloadSelectors"
            }
        }
    }

    fn severity(self) -> Severity {
        match self {
            Code::ReferencedResourceNotFound
            | Code::ConflictingVirtualServiceHosts
            | Code::SubsetSelectsNoPods
            | Code::AllWeightsZero
            | Code::PortLevelMtlsWithoutSelector
            | Code::NetworkPolicyBlocksHbone => Severity::Error,
            Code::NoMatchingWorkloads
            | Code::UnknownDestinationRuleHost
            | Code::RootNamespaceSelectorIgnored
            | Code::L7OnOpaquePort
            | Code::NoServiceAccount
            | Code::PathRulesBypassable
            | Code::ConflictingTelemetrySelectors
            | Code::MultipleTelemetriesWithoutSelector => Severity::Warning,
        }
    }
}

/// One finding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// The check.
    pub code: Code,
    /// `Kind namespace/name`.
    pub resource: String,
    /// `file:document` it came from.
    pub location: String,
    /// The field it concerns, if one.
    pub field: String,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub hint: String,
}

impl Finding {
    /// Error or warning.
    pub fn severity(&self) -> Severity {
        self.code.severity()
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.severity() {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(
            f,
            "{}:{}: {level} {} ({}) [{}]: {}; fix: {}",
            self.location,
            self.field,
            self.code.id(),
            self.code.name(),
            self.resource,
            self.message,
            self.hint
        )
    }
}

/// Runs every check; findings are ordered by location.
pub fn analyze(resources: &Resources, mesh: &Mesh) -> Vec<Finding> {
    let mut a = Analyzer {
        r: resources,
        mesh,
        findings: Vec::new(),
        namespaces: resources
            .namespaces
            .iter()
            .map(|ns| (ns.metadata.name.as_str(), ns))
            .collect(),
    };
    a.virtual_services();
    a.destination_rules();
    a.peer_authentications();
    a.authorization_policies();
    a.network_policies();
    a.service_accounts();
    a.telemetries();
    let mut findings = a.findings;
    findings.sort_by(|x, y| {
        natural(&x.location)
            .cmp(&natural(&y.location))
            .then(x.field.cmp(&y.field))
    });
    findings
}

/// Sort key that orders `f.yaml:10` after `f.yaml:9`.
fn natural(location: &str) -> (String, Vec<u64>) {
    let (file, rest) = location.rsplit_once(':').unwrap_or((location, ""));
    let numbers = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    (file.to_string(), numbers)
}

struct Analyzer<'a> {
    r: &'a Resources,
    mesh: &'a Mesh,
    findings: Vec<Finding>,
    namespaces: BTreeMap<&'a str, &'a crate::model::Namespace>,
}

impl<'a> Analyzer<'a> {
    fn report(
        &mut self,
        code: Code,
        kind: &str,
        meta: &ObjectMeta,
        field: &str,
        message: String,
        hint: &str,
    ) {
        let location = self
            .r
            .origin(kind, meta)
            .map(|o| format!("{}:{}", o.file, o.document))
            .unwrap_or_default();
        self.findings.push(Finding {
            code,
            resource: format!("{kind} {}", meta.qualified()),
            location,
            field: field.to_string(),
            message,
            hint: hint.to_string(),
        });
    }

    /// Live pods with their namespace.
    fn live_pods(&self) -> impl Iterator<Item = &'a Pod> {
        self.r.pods.iter().filter(|p| p.live_ip().is_some())
    }

    fn enrolled(&self, pod: &Pod) -> bool {
        semantics::pod_enrolled(pod, &self.namespaces)
    }

    /// The Service whose FQDN is `host`.
    fn service(&self, host: &str) -> Option<&'a crate::model::Service> {
        self.r
            .services
            .iter()
            .find(|s| semantics::service_fqdn(&s.metadata.name, s.metadata.namespace()) == host)
    }

    /// Subset names the DestinationRules for `host` define (wildcard rules included).
    fn subsets(&self, host: &str) -> BTreeSet<&'a str> {
        self.r
            .destination_rules
            .iter()
            .filter(|dr| {
                semantics::host_matches(&semantics::fqdn(&dr.spec.host, dr.namespace()), host)
            })
            .flat_map(|dr| dr.spec.subsets.iter().map(|s| s.name.as_str()))
            .collect()
    }

    fn virtual_services(&mut self) {
        let mut by_host: BTreeMap<String, Vec<&'a VirtualService>> = BTreeMap::new();
        for vs in &self.r.virtual_services {
            let ns = vs.namespace();
            let meta = &vs.metadata;
            if vs.spec.applies_to_mesh() {
                let hosts: BTreeSet<String> = vs
                    .spec
                    .hosts
                    .iter()
                    .map(|h| semantics::fqdn(h, ns))
                    .collect();
                for host in hosts {
                    by_host.entry(host).or_default().push(vs);
                }
            }
            // Every route's weighted destinations as (list field, [(destination, weight)]),
            // HTTP, TCP and TLS alike; mirrors are destinations without a weight.
            let mut routes: Vec<(String, Vec<Weighted>)> = Vec::new();
            let mut mirrors: Vec<(String, &Destination)> = Vec::new();
            for (i, route) in vs.spec.http.iter().enumerate() {
                let weighted = route.route.iter().map(|d| (&d.destination, d.weight));
                routes.push((format!("spec.http[{i}].route"), weighted.collect()));
                if let Some(mirror) = &route.mirror {
                    mirrors.push((format!("spec.http[{i}].mirror"), mirror));
                }
                for (j, m) in route.mirrors.iter().enumerate() {
                    mirrors.push((
                        format!("spec.http[{i}].mirrors[{j}].destination"),
                        &m.destination,
                    ));
                }
            }
            let opaque = [
                (
                    "tcp",
                    vs.spec.tcp.iter().map(|r| &r.route).collect::<Vec<_>>(),
                ),
                ("tls", vs.spec.tls.iter().map(|r| &r.route).collect()),
            ];
            for (kind, list) in opaque {
                for (i, route) in list.into_iter().enumerate() {
                    let weighted = route.iter().map(|d| (&d.destination, d.weight));
                    routes.push((format!("spec.{kind}[{i}].route"), weighted.collect()));
                }
            }
            let mut destinations = mirrors;
            let mut route_weights: Vec<(String, Vec<Option<i32>>)> = Vec::new();
            for (field, weighted) in routes {
                for (j, (d, _)) in weighted.iter().enumerate() {
                    destinations.push((format!("{field}[{j}].destination"), d));
                }
                route_weights.push((field, weighted.iter().map(|(_, w)| *w).collect()));
            }
            for (field, weights) in route_weights {
                if weights.len() > 1 && weights.iter().all(|w| w.unwrap_or(0) == 0) {
                    self.report(
                        Code::AllWeightsZero,
                        "VirtualService",
                        meta,
                        &field,
                        format!(
                            "all {} destinations have weight 0, so no traffic can be routed",
                            weights.len()
                        ),
                        "give at least one destination a positive weight (weights are relative)",
                    );
                }
            }
            for (field, d) in destinations {
                let host = semantics::fqdn(&d.host, ns);
                let service = self.service(&host);
                if service.is_none() {
                    self.report(
                        Code::ReferencedResourceNotFound,
                        "VirtualService",
                        meta,
                        &format!("{field}.host"),
                        format!("host {:?} ({host}) matches no Service", d.host),
                        "create the Service or correct the host name",
                    );
                }
                if let Some(subset) = &d.subset {
                    if !self.subsets(&host).contains(subset.as_str()) {
                        self.report(
                            Code::ReferencedResourceNotFound,
                            "VirtualService",
                            meta,
                            &format!("{field}.subset"),
                            format!(
                                "subset {subset:?} of host {host} is defined by no DestinationRule"
                            ),
                            "add the subset to the host's DestinationRule or correct its name",
                        );
                    }
                }
            }
            self.l7_routes(vs);
        }
        for (host, owners) in by_host {
            for vs in &owners {
                // Conflicts only where both are visible (exportTo), as Istio's analyzer keys
                // hosts by their export scope.
                let others: Vec<String> = owners
                    .iter()
                    .filter(|o| !std::ptr::eq(**o, *vs) && visible_together(vs, o))
                    .map(|o| o.metadata.qualified())
                    .collect();
                if others.is_empty() {
                    continue;
                }
                self.report(
                    Code::ConflictingVirtualServiceHosts,
                    "VirtualService",
                    &vs.metadata,
                    "spec.hosts",
                    format!(
                        "host {host} is also claimed for mesh traffic by {}",
                        others.join(", ")
                    ),
                    "merge the routes into one VirtualService per host",
                );
            }
        }
    }

    /// HTTP routes on a host whose Service ports are all undeclared or TCP stay L4.
    fn l7_routes(&mut self, vs: &'a VirtualService) {
        if vs.spec.http.is_empty() || !vs.spec.applies_to_mesh() {
            return;
        }
        for host in &vs.spec.hosts {
            let fqdn = semantics::fqdn(host, vs.namespace());
            let Some(service) = self.service(&fqdn) else {
                continue;
            };
            let ports: BTreeSet<u32> = vs
                .spec
                .http
                .iter()
                .flat_map(|r| r.matches.iter().filter_map(|m| m.port))
                .collect();
            let relevant: Vec<_> = service
                .spec
                .ports
                .iter()
                .filter(|p| ports.is_empty() || ports.contains(&u32::from(p.port)))
                .collect();
            let opaque: Vec<String> = relevant
                .iter()
                .filter(|p| !semantics::port_protocol(p).is_http())
                .map(|p| {
                    format!(
                        "{}{}",
                        p.port,
                        p.name
                            .as_ref()
                            .map(|n| format!(" ({n})"))
                            .unwrap_or_default()
                    )
                })
                .collect();
            if !opaque.is_empty() && opaque.len() == relevant.len() {
                self.report(
                    Code::L7OnOpaquePort,
                    "VirtualService",
                    &vs.metadata,
                    "spec.http",
                    format!(
                        "HTTP routes for {fqdn}, whose port(s) {} declare no HTTP protocol: traffic stays L4 and these routes do not apply",
                        opaque.join(", ")
                    ),
                    "name the Service port http-<suffix> (or grpc-, http2-) or set appProtocol: http",
                );
            }
        }
    }

    fn destination_rules(&mut self) {
        for dr in &self.r.destination_rules {
            let host = semantics::fqdn(&dr.spec.host, dr.namespace());
            let Some(service) = self.service(&host) else {
                if !host.contains('*') {
                    self.report(
                        Code::UnknownDestinationRuleHost,
                        "DestinationRule",
                        &dr.metadata,
                        "spec.host",
                        format!(
                            "host {:?} ({host}) matches no Service: the rule applies to nothing",
                            dr.spec.host
                        ),
                        "correct the host, or create the Service",
                    );
                }
                continue;
            };
            // Services without a selector have hand-made endpoints: nothing to check.
            let has_selector = service
                .spec
                .selector
                .as_ref()
                .is_some_and(|s| !s.is_empty());
            for (i, subset) in dr.spec.subsets.iter().enumerate() {
                let selects = self.live_pods().any(|p| {
                    semantics::service_selects(service, p)
                        && labels_match(&p.metadata.labels, &subset.labels)
                });
                if !selects && has_selector {
                    self.report(
                        Code::SubsetSelectsNoPods,
                        "DestinationRule",
                        &dr.metadata,
                        &format!("spec.subsets[{i}].labels"),
                        format!(
                            "subset {:?} selects no pod of Service {}: requests routed to it fail with 503 (no healthy upstream)",
                            subset.name,
                            service.metadata.qualified()
                        ),
                        "correct the subset's labels or deploy pods that carry them",
                    );
                }
            }
        }
    }

    fn selects_any(&self, namespace: &str, selector: &WorkloadSelector) -> bool {
        self.live_pods().any(|p| {
            (namespace == self.mesh.root_namespace || p.metadata.namespace() == namespace)
                && selector.matches(&p.metadata.labels)
        })
    }

    fn peer_authentications(&mut self) {
        for pa in &self.r.peer_authentications {
            let ns = pa.namespace();
            let meta = &pa.metadata;
            if pa.spec.has_selector() && ns == self.mesh.root_namespace {
                self.report(
                    Code::RootNamespaceSelectorIgnored,
                    "PeerAuthentication",
                    meta,
                    "spec.selector",
                    format!("a PeerAuthentication with a selector in the root namespace {} is ignored by Istio", self.mesh.root_namespace),
                    "move it to the namespace of the workloads it should select, or remove the selector to make it mesh-wide",
                );
            } else if let Some(selector) =
                pa.spec.selector.as_ref().filter(|_| pa.spec.has_selector())
            {
                if !self.selects_any(ns, selector) {
                    self.report(
                        Code::NoMatchingWorkloads,
                        "PeerAuthentication",
                        meta,
                        "spec.selector",
                        format!("the selector matches no workload in namespace {ns}"),
                        "correct the selector's labels or its namespace",
                    );
                }
            }
            if !pa.spec.port_level_mtls.is_empty() && !pa.spec.has_selector() {
                self.report(
                    Code::PortLevelMtlsWithoutSelector,
                    "PeerAuthentication",
                    meta,
                    "spec.portLevelMtls",
                    "portLevelMtls needs a workload selector; Istio refuses it on a mesh- or namespace-wide policy".into(),
                    "add a selector for the workloads whose ports it concerns",
                );
            }
        }
    }

    /// Telemetry: selectors that match nothing, and resources that compete for one level
    /// (the oldest applies, as `telemetry::tracing_for` resolves it).
    fn telemetries(&mut self) {
        let mut by_age: Vec<&crate::kinds::Telemetry> = self.r.telemetries.iter().collect();
        by_age.sort_by_key(|t| crate::telemetry::age(t));
        for (i, t) in by_age.iter().enumerate() {
            let (ns, meta) = (t.namespace(), &t.metadata);
            let older = &by_age[..i];
            match t.spec.selector.as_ref().filter(|_| t.spec.has_selector()) {
                None => {
                    if let Some(first) = older
                        .iter()
                        .find(|o| o.namespace() == ns && !o.spec.has_selector())
                    {
                        self.report(
                            Code::MultipleTelemetriesWithoutSelector,
                            "Telemetry",
                            meta,
                            "spec",
                            format!(
                                "namespace {ns} has another Telemetry without a selector, {}, which applies instead (the oldest wins)",
                                first.metadata.name
                            ),
                            "merge them into one resource",
                        );
                    }
                }
                Some(selector) => {
                    let selected: Vec<&Pod> = self
                        .live_pods()
                        .filter(|p| {
                            p.metadata.namespace() == ns && selector.matches(&p.metadata.labels)
                        })
                        .collect();
                    if selected.is_empty() {
                        self.report(
                            Code::NoMatchingWorkloads,
                            "Telemetry",
                            meta,
                            "spec.selector",
                            format!("the selector matches no workload in namespace {ns}"),
                            "correct the selector's labels or its namespace",
                        );
                    }
                    let rival = older.iter().find(|o| {
                        o.namespace() == ns
                            && o.spec.has_selector()
                            && o.spec.selector.as_ref().is_some_and(|s| {
                                selected.iter().any(|p| s.matches(&p.metadata.labels))
                            })
                    });
                    if let Some(rival) = rival {
                        self.report(
                            Code::ConflictingTelemetrySelectors,
                            "Telemetry",
                            meta,
                            "spec.selector",
                            format!(
                                "it selects workloads that Telemetry {} also selects; that one applies to them (the oldest wins)",
                                rival.metadata.name
                            ),
                            "select each workload with one Telemetry",
                        );
                    }
                }
            }
        }
    }

    fn authorization_policies(&mut self) {
        for ap in &self.r.authorization_policies {
            let ns = ap.namespace();
            let meta = &ap.metadata;
            if let Some(selector) = &ap.spec.selector {
                if !selector.match_labels.is_empty() && !self.selects_any(ns, selector) {
                    self.report(
                        Code::NoMatchingWorkloads,
                        "AuthorizationPolicy",
                        meta,
                        "spec.selector",
                        format!(
                            "the selector matches no workload{}",
                            if ns == self.mesh.root_namespace {
                                String::new()
                            } else {
                                format!(" in namespace {ns}")
                            }
                        ),
                        "correct the selector's labels or its namespace",
                    );
                }
            }
            if let Some(passing) = self.path_variants_passing() {
                let rule = ap.spec.rules.iter().position(|rule| {
                    rule.to
                        .iter()
                        .any(|o| !o.paths.is_empty() || !o.not_paths.is_empty())
                });
                if let Some(i) = rule {
                    self.report(
                        Code::PathRulesBypassable,
                        "AuthorizationPolicy",
                        meta,
                        &format!("spec.rules[{i}].to"),
                        format!(
                            "paths are matched under path normalization {} with ambiguous paths {}: {passing} reach the workload unmatched, and many servers read them as the path the rule names",
                            self.mesh.paths.normalization,
                            if self.mesh.paths.reject_ambiguous { "refused" } else { "allowed" },
                        ),
                        "run with --path-normalization DECODE_AND_MERGE_SLASHES --reject-ambiguous-paths true (the defaults), or match paths with ALLOW rules only",
                    );
                }
            }
            if !ap.spec.uses_l7() || !ap.spec.target_refs.is_empty() {
                continue;
            }
            // The policy's workloads and the pod ports that HTTP Service ports reach.
            let selected: Vec<&Pod> = self
                .live_pods()
                .filter(|p| {
                    semantics::authorization_applies(
                        self.mesh,
                        ap,
                        p.metadata.namespace(),
                        &p.metadata.labels,
                    )
                })
                .collect();
            if selected.is_empty() {
                continue;
            }
            let mut http_ports = BTreeSet::new();
            for svc in &self.r.services {
                for pod in &selected {
                    if !semantics::service_selects(svc, pod) {
                        continue;
                    }
                    for port in svc
                        .spec
                        .ports
                        .iter()
                        .filter(|p| semantics::port_protocol(p).is_http())
                    {
                        http_ports.extend(semantics::target_port(
                            pod,
                            port.target_port.as_ref(),
                            port.port,
                        ));
                    }
                }
            }
            // A rule limited to ports is L7 only where one of them is an HTTP port.
            let opaque = ap.spec.rules.iter().position(|rule| {
                let ports: BTreeSet<u16> = rule
                    .to
                    .iter()
                    .flat_map(|o| o.ports.iter().copied())
                    .collect();
                rule.uses_l7()
                    && if ports.is_empty() {
                        http_ports.is_empty()
                    } else {
                        ports.is_disjoint(&http_ports)
                    }
            });
            if let Some(i) = opaque {
                self.report(
                    Code::L7OnOpaquePort,
                    "AuthorizationPolicy",
                    meta,
                    &format!("spec.rules[{i}]"),
                    "HTTP conditions (methods, paths, hosts, request principals or request.* keys) on ports no HTTP Service port reaches: they are enforced at L4, where an ALLOW rule with HTTP conditions never matches and a DENY rule matches all traffic".into(),
                    "declare the Service port's protocol (name http-<suffix> or appProtocol: http), or use only L4 conditions",
                );
            }
        }
    }

    /// Which variants of a path the mesh's path settings let through unrefused and
    /// unnormalized (so a DENY on the path never sees them), if any.
    fn path_variants_passing(&self) -> Option<String> {
        use crate::paths::{ambiguity, normalize};
        let settings = self.mesh.paths;
        let passing: Vec<&str> = ["//admin", "/admin%2Fx", "/admin%5Cx", "/admin;x=1"]
            .into_iter()
            .filter(|variant| {
                let Ok(path) = normalize(variant, settings.normalization) else {
                    return false;
                };
                let refused =
                    settings.reject_ambiguous && ambiguity(&path, settings.normalization).is_some();
                let matched = path == "/admin" || path.starts_with("/admin/");
                !(refused || matched)
            })
            .collect();
        (!passing.is_empty()).then(|| format!("paths such as {}", passing.join(", ")))
    }

    /// NetworkPolicies add up: a pod selected by any policy of a direction is isolated there,
    /// and a peer is admitted when some rule of some of those policies admits it. Flagged: an
    /// enrolled peer admitted on some port but on no rule that covers 15008 (mesh traffic
    /// between enrolled pods travels on it), reported once per policy and direction. Peers
    /// blocked on every port are blocked on purpose and not reported.
    fn network_policies(&mut self) {
        // Pods with the same namespace and labels are alike to every selector: check one
        // pair per pair of groups (per pod only where a rule has an ipBlock), so a cluster of
        // thousands of pods in a few hundred groups stays fast.
        let mut groups: BTreeMap<(&str, &Labels), Vec<&'a Pod>> = BTreeMap::new();
        for pod in self.live_pods().filter(|p| self.enrolled(p)) {
            groups
                .entry((pod.metadata.namespace(), &pod.metadata.labels))
                .or_default()
                .push(pod);
        }
        let no_labels = Labels::new();
        let namespaces = &self.namespaces;
        let namespace_labels = |ns: &str| -> &Labels {
            namespaces
                .get(ns)
                .map_or(&no_labels, |n| &n.metadata.labels)
        };
        let policies = &self.r.network_policies;
        let mut reported = BTreeSet::new();
        let mut found = Vec::new();
        for direction in [PolicyType::Ingress, PolicyType::Egress] {
            for ((ns, labels), pods) in &groups {
                let selecting: Vec<(usize, &NetworkPolicySpec)> = policies
                    .iter()
                    .enumerate()
                    .filter(|(_, np)| {
                        np.namespace() == *ns
                            && np.spec.types().contains(&direction)
                            && np.spec.pod_selector.matches(labels)
                    })
                    .map(|(i, np)| (i, &np.spec))
                    .collect();
                if selecting.is_empty() {
                    // Not isolated in this direction: everything is admitted.
                    continue;
                }
                let by_ip = selecting.iter().any(|(_, spec)| {
                    rules(spec, direction)
                        .iter()
                        .any(|(peers, _)| peers.iter().any(|p| p.ip_block.is_some()))
                });
                let pod = pods[0];
                for ((peer_ns, peer_labels), members) in &groups {
                    let same_group = std::ptr::eq(members, pods);
                    let candidates = match (by_ip, same_group) {
                        (true, true) => &members[1..],
                        (true, false) => &members[..],
                        (false, true) => &members[1..members.len().min(2)],
                        (false, false) => &members[..1],
                    };
                    for peer in candidates {
                        let peer_ip = peer.live_ip().unwrap_or(Ipv4Addr::UNSPECIFIED);
                        let peer_ns_labels = namespace_labels(peer_ns);
                        let mut admitting = BTreeSet::new();
                        let mut hbone = false;
                        for (i, spec) in &selecting {
                            for (peers, ports) in rules(spec, direction) {
                                let matches = peers.is_empty()
                                    || peers.iter().any(|p| {
                                        p.matches_pod(
                                            ns,
                                            peer_ns,
                                            peer_ns_labels,
                                            peer_labels,
                                            peer_ip,
                                        )
                                    });
                                if matches {
                                    admitting.insert(*i);
                                    hbone |= ports.is_empty()
                                        || ports.iter().any(|p| p.covers_tcp(PORT_HBONE));
                                }
                            }
                        }
                        if hbone {
                            continue;
                        }
                        for i in admitting {
                            if reported.insert((i, direction)) {
                                found.push((&policies[i], direction, pod, *peer));
                            }
                        }
                    }
                }
            }
        }
        for (np, direction, pod, peer) in found {
            let (field, what) = match direction {
                PolicyType::Ingress => ("spec.ingress", format!("incoming port {PORT_HBONE} (HBONE) to enrolled pod {} from enrolled pod {}", pod.metadata.qualified(), peer.metadata.qualified())),
                PolicyType::Egress => ("spec.egress", format!("outgoing port {PORT_HBONE} (HBONE) from enrolled pod {} to enrolled pod {}", pod.metadata.qualified(), peer.metadata.qualified())),
            };
            self.report(
                Code::NetworkPolicyBlocksHbone,
                "NetworkPolicy",
                &np.metadata,
                field,
                format!("admits other ports but blocks {what}; mesh traffic between enrolled pods travels on that port"),
                "allow TCP port 15008 wherever the policies admit enrolled pods",
            );
        }
    }

    fn service_accounts(&mut self) {
        let unnamed: Vec<&'a Pod> = self
            .r
            .pods
            .iter()
            .filter(|p| p.live_ip().is_some() && self.enrolled(p))
            // `kubectl get -o yaml` prints `serviceAccountName: default` for pods that set none.
            .filter(|p| semantics::service_account(p) == "default")
            .collect();
        for pod in unnamed {
            self.report(
                Code::NoServiceAccount,
                "Pod",
                &pod.metadata,
                "spec.serviceAccountName",
                format!(
                    "enrolled pod runs as the default service account, so its identity {} is shared with every other such pod of the namespace and policies cannot tell them apart",
                    self.mesh.spiffe_id(pod.metadata.namespace(), "default")
                ),
                "give the workload its own ServiceAccount (spec.serviceAccountName)",
            );
        }
    }
}

/// A route destination and its weight.
type Weighted<'a> = (&'a Destination, Option<i32>);

/// The (peers, ports) of each rule of `spec` in `direction`.
fn rules(
    spec: &NetworkPolicySpec,
    direction: PolicyType,
) -> Vec<(&[crate::netpol::Peer], &[crate::netpol::NetworkPolicyPort])> {
    match direction {
        PolicyType::Ingress => spec
            .ingress
            .iter()
            .map(|r| (r.from.as_slice(), r.ports.as_slice()))
            .collect(),
        PolicyType::Egress => spec
            .egress
            .iter()
            .map(|r| (r.to.as_slice(), r.ports.as_slice()))
            .collect(),
    }
}

/// The namespaces a VirtualService is visible in; `None` for all.
fn visibility(vs: &VirtualService) -> Option<BTreeSet<&str>> {
    let export = &vs.spec.export_to;
    if export.is_empty() || export.iter().any(|e| e == "*") {
        return None;
    }
    Some(
        export
            .iter()
            .map(|e| if e == "." { vs.namespace() } else { e.as_str() })
            .collect(),
    )
}

fn visible_together(a: &VirtualService, b: &VirtualService) -> bool {
    match (visibility(a), visibility(b)) {
        (Some(x), Some(y)) => !x.is_disjoint(&y),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_str;

    fn codes(yaml: &str) -> Vec<String> {
        let resources = parse_str("a.yaml", yaml).unwrap();
        analyze(&resources, &Mesh::default())
            .iter()
            .map(|f| format!("{} {}", f.code.id(), f.resource))
            .collect()
    }

    const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec: {serviceAccountName: web}
status: {podIP: 100.65.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: api, labels: {app: api}}
spec: {serviceAccountName: api}
status: {podIP: 100.65.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: batch, labels: {app: batch}}
spec: {serviceAccountName: batch}
status: {podIP: 100.65.0.4}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 100.66.0.1, selector: {app: web}, ports: [{name: http, port: 80}]}
"#;

    #[test]
    fn network_policies_add_up_and_peers_blocked_on_purpose_are_not_reported() {
        let policies = r#"
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all}
spec: {podSelector: {}, policyTypes: [Ingress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-api}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{podSelector: {matchLabels: {app: api}}}], ports: [{port: 80}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: hbone}
spec:
  podSelector: {}
  ingress: [{ports: [{port: 15008}]}]
"#;
        assert_eq!(codes(&format!("{BASE}{policies}")), Vec::<String>::new());
        // Without the HBONE policy, only the policy that admits api on port 80 is at fault,
        // once, although it selects one pod and batch is also blocked (on purpose).
        let without = policies.split("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: hbone}").next().unwrap();
        assert_eq!(
            codes(&format!("{BASE}{without}")),
            ["MESH0005 NetworkPolicy default/web-from-api"]
        );
    }

    #[test]
    fn wildcard_rules_define_subsets_and_explicit_default_accounts_are_flagged() {
        let extra = r#"
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: all}
spec: {host: "*.default.svc.cluster.local", subsets: [{name: v1, labels: {app: web}}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec: {hosts: [web], http: [{route: [{destination: {host: web, subset: v1}}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, labels: {app: legacy}}
spec: {serviceAccountName: default}
status: {podIP: 100.65.0.9}
"#;
        assert_eq!(
            codes(&format!("{BASE}{extra}")),
            ["MESH0006 Pod default/legacy"]
        );
    }

    #[test]
    fn l7_policies_are_checked_per_port() {
        let extra = r#"
---
apiVersion: v1
kind: Service
metadata: {name: web-raw}
spec: {clusterIP: 100.66.0.2, selector: {app: web}, ports: [{name: raw, port: 7000}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: on-http}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{to: [{operation: {ports: ["80"], methods: [GET]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: on-raw}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{to: [{operation: {ports: ["7000"], methods: [GET]}}]}]
"#;
        // web has an HTTP port (80) and an opaque one (7000): only the rule on 7000 is L4.
        assert_eq!(
            codes(&format!("{BASE}{extra}")),
            ["MESH0004 AuthorizationPolicy default/on-raw"]
        );
    }

    #[test]
    fn path_rules_are_flagged_under_settings_that_let_variants_through() {
        use crate::paths::{Normalization, PathSettings};
        let policy = r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin", "/admin/*"]}}]}]
"#;
        let resources = parse_str("a.yaml", &format!("{BASE}{policy}")).unwrap();
        let flagged = |normalization, reject_ambiguous| {
            let mesh = Mesh {
                paths: PathSettings {
                    normalization,
                    reject_ambiguous,
                },
                ..Mesh::default()
            };
            analyze(&resources, &mesh)
                .into_iter()
                .find(|f| f.code == Code::PathRulesBypassable)
                .map(|f| f.message)
        };
        // The defaults, and any mode that refuses what it does not normalize: nothing passes.
        assert_eq!(flagged(Normalization::DecodeAndMergeSlashes, true), None);
        assert_eq!(flagged(Normalization::Base, true), None);
        // Istio's default: every variant passes.
        let istio = flagged(Normalization::Base, false).expect("flagged under BASE");
        assert!(
            istio.contains("//admin, /admin%2Fx, /admin%5Cx, /admin;x=1"),
            "{istio}"
        );
        // The strictest mode still lets `;` parameters through unless they are refused.
        let strict = flagged(Normalization::DecodeAndMergeSlashes, false).unwrap();
        assert!(strict.contains("such as /admin;x=1 reach"), "{strict}");
    }

    #[test]
    fn network_policy_ip_blocks_are_checked_per_pod() {
        let policy = r#"
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-batch-ip}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{ipBlock: {cidr: 100.65.0.4/32}}], ports: [{port: 80}]}]
"#;
        let findings = analyze(
            &parse_str("a.yaml", &format!("{BASE}{policy}")).unwrap(),
            &Mesh::default(),
        );
        assert_eq!(findings.len(), 1, "{findings:#?}");
        assert!(
            findings[0]
                .message
                .contains("from enrolled pod default/batch"),
            "{}",
            findings[0].message
        );
    }

    #[test]
    fn virtual_services_conflict_only_where_both_are_visible() {
        let vs = |name: &str, ns: &str, export: &str| {
            format!("---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{hosts: [web.default.svc.cluster.local], exportTo: [{export}], http: [{{route: [{{destination: {{host: web.default.svc.cluster.local}}}}]}}]}}\n")
        };
        let private = format!(
            "{BASE}{}{}",
            vs("a", "team-a", "'.'"),
            vs("b", "team-b", "'.'")
        );
        assert_eq!(codes(&private), Vec::<String>::new());
        let shared = format!(
            "{BASE}{}{}",
            vs("a", "team-a", "'.'"),
            vs("b", "team-b", "'*'")
        );
        assert_eq!(
            codes(&shared),
            [
                "IST0109 VirtualService team-a/a",
                "IST0109 VirtualService team-b/b"
            ]
        );
        // One VirtualService naming its host twice does not conflict with itself.
        let twice = format!("{BASE}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web}}\nspec: {{hosts: [web, web.default.svc.cluster.local], http: [{{route: [{{destination: {{host: web}}}}]}}]}}\n");
        assert_eq!(codes(&twice), Vec::<String>::new());
    }

    #[test]
    fn telemetries_that_select_nothing_or_compete_are_flagged() {
        let found = codes(&format!(
            "{BASE}---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: a, creationTimestamp: \"2024-01-01T00:00:00Z\"}}
spec: {{tracing: [{{randomSamplingPercentage: 10}}]}}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: b, creationTimestamp: \"2024-02-01T00:00:00Z\"}}
spec: {{}}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: web, creationTimestamp: \"2024-01-01T00:00:00Z\"}}
spec: {{selector: {{matchLabels: {{app: web}}}}}}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: web-too, creationTimestamp: \"2024-03-01T00:00:00Z\"}}
spec: {{selector: {{matchLabels: {{app: web}}}}}}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: ghost}}
spec: {{selector: {{matchLabels: {{app: ghost}}}}}}
"
        ));
        for wanted in [
            "IST0160 Telemetry default/b",
            "IST0159 Telemetry default/web-too",
            "IST0127 Telemetry default/ghost",
        ] {
            assert!(
                found.iter().any(|f| f == wanted),
                "{wanted} not in {found:?}"
            );
        }
        assert!(!found
            .iter()
            .any(|f| f.ends_with("default/a") || f.ends_with("default/web")));
    }
}
