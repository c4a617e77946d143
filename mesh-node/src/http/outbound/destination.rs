//! Destination choice: the route a request takes (VirtualService match), the Service port
//! and DestinationRule subset it leads to (the cluster and its view under the snapshot),
//! and the key a hash balancer picks an endpoint by; the same for L4 `tcp` routes.

use super::*;

/// Where a request goes.
pub(super) struct Plan<'s> {
    pub(super) route: Option<&'s HttpRoute>,
    /// The `uri.prefix` of the match entry that applied (prefix rewrites replace it).
    pub(super) matched_prefix: Option<String>,
    /// The VirtualService's namespace (short hosts in it resolve there).
    pub(super) vs_namespace: Option<String>,
    pub(super) route_name: Option<String>,
    pub(super) destination: Option<&'s HttpRouteDestination>,
    pub(super) host: String,
    pub(super) subset: Option<String>,
    pub(super) port: Option<u16>,
}

/// The key of a destination's runtime state for a client.
pub(super) fn cluster_key(
    state: &State,
    client_ns: &str,
    source: Option<&Workload>,
    host: &str,
    subset: Option<String>,
    target: &ServiceTarget,
) -> ClusterKey {
    let selective = state
        .destination_rules
        .get(host)
        .is_some_and(|rules| rules.iter().any(|r| r.0.spec.workload_selector.is_some()));
    let selector = match source.filter(|_| selective) {
        Some(s) => cluster::hash_key(format!("{:?}", s.labels).as_bytes()),
        None => 0,
    };
    ClusterKey {
        client_ns: client_ns.to_string(),
        host: host.to_string(),
        subset,
        port: target.vip.port(),
        selector,
    }
}

/// Whether a request from `source` to `destination` travels in an HBONE tunnel.
pub(crate) fn via_hbone(
    state: &State,
    source: Option<&Workload>,
    destination: Option<&Workload>,
) -> bool {
    source.is_some_and(|s| s.enrolled)
        && destination.is_some_and(|d| d.enrolled && !state.is_local(d))
}

/// The runtime state of a destination and its view under the current snapshot.
pub(super) fn cluster_view(
    ctx: &ProxyContext,
    state: &State,
    key: ClusterKey,
    target: &ServiceTarget,
    source: Option<&Workload>,
) -> (Arc<cluster::Cluster>, Arc<View>) {
    let cluster = ctx.l7.clusters.get(&key);
    let no_labels = Default::default();
    let labels = source.map_or(&no_labels, |s| &s.labels);
    let view = cluster.view(state.generation, || {
        let effective = cluster::effective(
            state,
            &key.host,
            key.subset.as_deref(),
            key.port,
            &key.client_ns,
            labels,
        );
        match effective {
            Ok((policy, subset)) => View {
                generation: state.generation,
                policy,
                endpoints: cluster::subset_endpoints(state, target, subset.as_ref()),
                error: None,
            },
            Err(cluster::Unroutable::NoSubset(name)) => View {
                generation: state.generation,
                policy: Default::default(),
                endpoints: Vec::new(),
                error: Some(format!(
                    "no DestinationRule defines subset {name} of {}",
                    key.host
                )),
            },
        }
    });
    (cluster, view)
}

/// The VirtualService `tcp` routes, for the plan of an outbound connection.
pub struct Routes<'c>(pub &'c ProxyContext);

impl<'s> TcpRoutes<'s> for Routes<'_> {
    fn route(
        &self,
        state: &'s State,
        source: Option<&'s Workload>,
        service: &'s ServiceTarget,
    ) -> Option<Result<(&'s ServiceTarget, SocketAddrV4), Refusal>> {
        tcp_route(self.0, state, source, service)
    }
}

/// A TCP connection to a Service port with a VirtualService `tcp` route: the weighted
/// destination's endpoint under its DestinationRule. `None` when no tcp route applies.
pub(super) fn tcp_route<'s>(
    ctx: &ProxyContext,
    state: &'s State,
    source: Option<&Workload>,
    service: &'s ServiceTarget,
) -> Option<Result<(&'s ServiceTarget, SocketAddrV4), Refusal>> {
    let client_ns = source.map_or("default", |s| s.namespace.as_str());
    let vs = route::virtual_service(state, &service.host, client_ns)?;
    let matched = route::tcp_route(&vs.0.spec, service.vip.port(), source)?;
    let Some(destination) = route::pick_tcp(matched) else {
        return Some(Err(Refusal::new(
            ResponseFlag::NoRoute,
            "tcp route without destinations",
        )));
    };
    let host = crate::config::semantics::fqdn(&destination.destination.host, vs.0.namespace());
    let port = destination.destination.port.map(|p| p as u16);
    let Some(target) = destination_service(state, &host, port, service, service.vip.port()) else {
        return Some(Err(Refusal::new(
            ResponseFlag::NoCluster,
            format!("{host} has no such port"),
        )));
    };
    let subset = destination.destination.subset.clone();
    let key = cluster_key(state, client_ns, source, &host, subset, target);
    let (cluster, view) = cluster_view(ctx, state, key, target, source);
    if let Some(error) = &view.error {
        return Some(Err(Refusal::new(ResponseFlag::NoCluster, error.clone())));
    }
    let hash = hash_key_l4(&view.policy.balancer, source);
    Some(match cluster.pick(&view, &HashSet::new(), hash, None) {
        Some(endpoint) => Ok((target, endpoint)),
        None => Err(Refusal::new(
            ResponseFlag::NoHealthyUpstream,
            "no healthy upstream",
        )),
    })
}

pub(super) fn hash_key_l4(balancer: &cluster::Balancer, source: Option<&Workload>) -> Option<u64> {
    match balancer {
        cluster::Balancer::Hash(cluster::HashOn::SourceIp) => {
            source.map(|s| cluster::hash_ip(s.ip))
        }
        _ => None,
    }
}

/// The route for a request: `Err` when a VirtualService applies and no route matches (NR).
pub(super) fn plan<'s>(
    state: &'s State,
    service: &'s ServiceTarget,
    source: Option<&'s Workload>,
    parts: &Parts,
    authority: &str,
    client_ns: &str,
) -> Result<Plan<'s>, ()> {
    let default = Plan {
        route: None,
        matched_prefix: None,
        vs_namespace: None,
        route_name: None,
        destination: None,
        host: service.host.clone(),
        subset: None,
        port: Some(service.vip.port()),
    };
    let Some(vs) = route::virtual_service(state, &service.host, client_ns) else {
        return Ok(default);
    };
    let view = route::RequestView {
        method: parts.method.as_str(),
        scheme: "http",
        authority,
        path_and_query: parts.uri.path_and_query().map_or("/", |p| p.as_str()),
        headers: &parts.headers,
        port: service.vip.port(),
        source,
    };
    let (index, matched) = route::http_route(&vs.0.spec, &view).ok_or(())?;
    let name = matched
        .name
        .clone()
        .unwrap_or_else(|| format!("{}#{index}", vs.0.metadata.qualified()));
    let matched_prefix = matched
        .matches
        .iter()
        .find(|m| route::matches(m, &view))
        .and_then(|m| match &m.uri {
            Some(crate::config::values::StringMatch::Prefix(p)) => Some(p.clone()),
            _ => None,
        });
    let mut plan = Plan {
        route: Some(matched),
        route_name: Some(name),
        matched_prefix,
        vs_namespace: Some(vs.0.namespace().to_string()),
        ..default
    };
    if matched.redirect.is_some() || matched.direct_response.is_some() {
        return Ok(plan);
    }
    let Some(destination) = route::pick_http(matched) else {
        return Err(());
    };
    plan.destination = Some(destination);
    plan.host = crate::config::semantics::fqdn(&destination.destination.host, vs.0.namespace());
    plan.subset = destination.destination.subset.clone();
    plan.port = destination.destination.port.map(|p| p as u16);
    Ok(plan)
}

/// The Service port a route destination names: its `port`, else the port the client
/// dialled when the Service has it, else the Service's only port.
pub(super) fn destination_service<'s>(
    state: &'s State,
    host: &str,
    port: Option<u16>,
    dialled: &'s ServiceTarget,
    dialled_port: u16,
) -> Option<&'s ServiceTarget> {
    if host == dialled.host && port.is_none_or(|p| p == dialled_port) {
        return Some(dialled);
    }
    let vips = state.services_by_host.get(host)?;
    let vip = match port {
        Some(port) => vips.iter().find(|v| v.port() == port)?,
        None => vips
            .iter()
            .find(|v| v.port() == dialled_port)
            .or_else(|| (vips.len() == 1).then(|| &vips[0]))?,
    };
    state.services.get(vip)
}

/// The consistent-hash key of a request, when the balancer hashes.
pub(super) fn hash_key(
    balancer: &cluster::Balancer,
    parts: &Parts,
    peer: SocketAddr,
) -> Option<u64> {
    let cluster::Balancer::Hash(on) = balancer else {
        return None;
    };
    match on {
        cluster::HashOn::Header(name) => parts
            .headers
            .get(name.as_str())
            .map(|v| cluster::hash_key(v.as_bytes())),
        cluster::HashOn::Cookie(cookie) => {
            cookie_value(parts, &cookie.name).map(|v| cluster::hash_key(v.as_bytes()))
        }
        cluster::HashOn::SourceIp => ipv4(peer).map(cluster::hash_ip),
        cluster::HashOn::Query(name) => parts.uri.query().and_then(|q| {
            q.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (k == name).then(|| cluster::hash_key(v.as_bytes()))
            })
        }),
    }
}

pub(super) fn cookie_value(parts: &Parts, name: &str) -> Option<String> {
    parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then(|| v.to_string())
        })
}

/// A hashing cookie with a TTL that the client did not send is generated, as Envoy does, so
/// its next requests stick to the same endpoint.
pub(super) fn set_hash_cookie(
    response: &mut Response<RespBody>,
    cookie: &crate::config::networking::HttpCookie,
    parts: &Parts,
) {
    let Some(ttl) = cookie.ttl else { return };
    if cookie_value(parts, &cookie.name).is_some() {
        return;
    }
    let path = cookie
        .path
        .as_deref()
        .map(|p| format!("; Path={p}"))
        .unwrap_or_default();
    let value = format!(
        "{}=\"{:016x}\"; Max-Age={}{path}; HttpOnly",
        cookie.name,
        fastrand::u64(..),
        ttl.as_secs()
    );
    if let Ok(value) = HeaderValue::from_str(&value) {
        response.headers_mut().append(header::SET_COOKIE, value);
    }
}
