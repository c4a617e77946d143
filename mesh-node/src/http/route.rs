//! VirtualService routing for mesh traffic, as Istio documents it: the VirtualService for the
//! destination host visible to the client's namespace (`exportTo`; the oldest when several
//! claim one host, as Istio does for sidecars), its `http` routes in order, the first whose
//! match applies (any of its `match` entries; every set field of an entry), weighted
//! destinations. Pure functions over the snapshot: unit-tested here, used by `outbound`.

use http::HeaderMap;

use crate::{
    config::{
        networking::{
            HeaderMatch, HttpMatchRequest, HttpRoute, HttpRouteDestination, RouteDestination,
            TcpRoute, VirtualServiceSpec,
        },
        semantics,
        values::StringMatch,
    },
    state::{Ref, State, Workload},
};

/// What routing needs to know about a request.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    /// `GET`, `POST`, ...
    pub method: &'a str,
    /// `http` (the mesh's own transport is the tunnel).
    pub scheme: &'a str,
    /// `:authority` or `Host`.
    pub authority: &'a str,
    /// Path with the query string.
    pub path_and_query: &'a str,
    /// Request headers.
    pub headers: &'a HeaderMap,
    /// The Service port the client dialled.
    pub port: u16,
    /// The client pod.
    pub source: Option<&'a Workload>,
}

impl RequestView<'_> {
    fn path(&self) -> &str {
        self.path_and_query
            .split_once('?')
            .map_or(self.path_and_query, |(p, _)| p)
    }

    fn query(&self) -> &str {
        self.path_and_query.split_once('?').map_or("", |(_, q)| q)
    }
}

/// Whether a resource with `export_to`, in `namespace`, is visible to clients in `client`.
pub fn visible(export_to: &[String], namespace: &str, client: &str) -> bool {
    export_to.is_empty()
        || export_to
            .iter()
            .any(|e| e == "*" || e == client || (e == "." && namespace == client))
}

/// The VirtualService that routes mesh traffic to `host` (an FQDN) for a client in
/// `client_ns`: an exact host before wildcards, the longest wildcard first; among several
/// for the same host, the oldest visible one.
pub fn virtual_service<'s>(
    state: &'s State,
    host: &str,
    client_ns: &str,
) -> Option<&'s Ref<VirtualServiceSpec>> {
    let usable = |list: &'s Vec<Ref<VirtualServiceSpec>>| {
        list.iter()
            .find(|vs| visible(&vs.0.spec.export_to, vs.0.namespace(), client_ns))
    };
    if let Some(found) = state.virtual_services.get(host).and_then(usable) {
        return Some(found);
    }
    let mut wildcards: Vec<(&String, &Vec<_>)> = state
        .virtual_services
        .iter()
        .filter(|(pattern, _)| pattern.starts_with('*') && semantics::host_matches(pattern, host))
        .collect();
    wildcards.sort_by_key(|(pattern, _)| std::cmp::Reverse(pattern.len()));
    wildcards.into_iter().find_map(|(_, list)| usable(list))
}

/// The first route of `vs` whose match applies, with its index.
pub fn http_route<'v>(
    vs: &'v VirtualServiceSpec,
    req: &RequestView<'_>,
) -> Option<(usize, &'v HttpRoute)> {
    vs.http.iter().enumerate().find(|(_, route)| {
        route.matches.is_empty() || route.matches.iter().any(|m| matches(m, req))
    })
}

/// The first `tcp` route of `vs` that applies to a connection to `port` from `source`.
pub fn tcp_route<'v>(
    vs: &'v VirtualServiceSpec,
    port: u16,
    source: Option<&Workload>,
) -> Option<&'v TcpRoute> {
    vs.tcp.iter().find(|route| {
        route.matches.is_empty()
            || route.matches.iter().any(|m| {
                m.port.is_none_or(|p| p == u32::from(port))
                    && labels_match(&m.source_labels, source)
                    && m.source_namespace
                        .as_ref()
                        .is_none_or(|ns| source.is_some_and(|s| &s.namespace == ns))
                    && (m.gateways.is_empty() || m.gateways.iter().any(|g| g == "mesh"))
            })
    })
}

fn labels_match(want: &crate::config::model::Labels, source: Option<&Workload>) -> bool {
    want.is_empty() || source.is_some_and(|s| want.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
}

/// Whether one `match` entry applies to the request.
pub(crate) fn matches(m: &HttpMatchRequest, req: &RequestView<'_>) -> bool {
    if !m.gateways.is_empty() && !m.gateways.iter().any(|g| g == "mesh") {
        return false;
    }
    if m.port.is_some_and(|p| p != u32::from(req.port)) {
        return false;
    }
    if !labels_match(&m.source_labels, req.source) {
        return false;
    }
    if let Some(ns) = &m.source_namespace {
        if req.source.is_none_or(|s| &s.namespace != ns) {
            return false;
        }
    }
    if let Some(uri) = &m.uri {
        let path = req.path();
        let ok = if m.ignore_uri_case {
            match uri {
                StringMatch::Exact(want) => path.eq_ignore_ascii_case(want),
                StringMatch::Prefix(want) => path
                    .get(..want.len())
                    .is_some_and(|p| p.eq_ignore_ascii_case(want)),
                StringMatch::Regex(_) => uri.matches(path),
            }
        } else {
            uri.matches(path)
        };
        if !ok {
            return false;
        }
    }
    let simple = [
        (&m.scheme, req.scheme),
        (&m.method, req.method),
        (&m.authority, req.authority),
    ];
    if simple
        .iter()
        .any(|(want, have)| want.as_ref().is_some_and(|w| !w.matches(have)))
    {
        return false;
    }
    let header = |name: &str, want: &HeaderMatch| {
        let values = req.headers.get_all(name);
        let mut values = values.iter().filter_map(|v| v.to_str().ok()).peekable();
        match want {
            HeaderMatch::Present => values.peek().is_some(),
            HeaderMatch::Value(want) => values.any(|v| want.matches(v)),
        }
    };
    if !m.headers.iter().all(|(name, want)| header(name, want)) {
        return false;
    }
    if m.without_headers
        .iter()
        .any(|(name, want)| header(name, want))
    {
        return false;
    }
    if !m.query_params.is_empty() {
        let query = req.query();
        let value_of = |name: &str| {
            query.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (k == name).then_some(v)
            })
        };
        if !m
            .query_params
            .iter()
            .all(|(name, want)| value_of(name).is_some_and(|v| want.matches(v)))
        {
            return false;
        }
    }
    true
}

/// Picks one of weighted destinations: weights are relative (weight / sum); a missing
/// weight counts as 100 when it is the only destination, else 0 (Istio requires weights on
/// all of several). `roll` is a uniform number in `0..1`.
pub fn pick_weighted<T>(items: &[T], weight: impl Fn(&T) -> Option<i32>, roll: f64) -> Option<&T> {
    if items.len() == 1 {
        return items.first();
    }
    let weights: Vec<u64> = items
        .iter()
        .map(|i| weight(i).unwrap_or(0).max(0) as u64)
        .collect();
    let total: u64 = weights.iter().sum();
    if total == 0 {
        return items.first();
    }
    let mut point = (roll * total as f64) as u64;
    for (item, w) in items.iter().zip(weights) {
        if point < w {
            return Some(item);
        }
        point -= w;
    }
    items.last()
}

/// The destination of an HTTP route for this request.
pub fn pick_http(route: &HttpRoute) -> Option<&HttpRouteDestination> {
    pick_weighted(&route.route, |d| d.weight, fastrand::f64())
}

/// The destination of a TCP route for this connection.
pub fn pick_tcp(route: &TcpRoute) -> Option<&RouteDestination> {
    pick_weighted(&route.route, |d| d.weight, fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_str, semantics::Mesh};

    const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: client, version: v1}}
spec: {nodeName: n1}
status: {podIP: 100.65.0.2}
---
apiVersion: v1
kind: Service
metadata: {name: web-app}
spec: {clusterIP: 100.66.0.10, selector: {app: web-app}, ports: [{name: http, port: 8080}]}
"#;

    fn state(extra: &str) -> State {
        let text = format!("{BASE}{extra}");
        State::build(
            &parse_str("t.yaml", &text).unwrap(),
            "n1",
            &Mesh::default(),
            1,
        )
    }

    fn view<'a>(
        path: &'a str,
        headers: &'a HeaderMap,
        source: Option<&'a Workload>,
    ) -> RequestView<'a> {
        RequestView {
            method: "GET",
            scheme: "http",
            authority: "web-app:8080",
            path_and_query: path,
            headers,
            port: 8080,
            source,
        }
    }

    const HOST: &str = "web-app.default.svc.cluster.local";

    #[test]
    fn the_issue_virtual_service_routes_by_header_then_path() {
        let state = state(
            r#"
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: web-app}
spec:
  hosts: [web-app]
  http:
  - match: [{headers: {user-agent: {regex: ".*Chrome.*"}}}]
    route: [{destination: {host: web-app, subset: v2}}]
  - match: [{uri: {prefix: "/api"}}]
    route:
    - {destination: {host: web-app, port: {number: 8080}, subset: v1}, weight: 90}
    - {destination: {host: web-app, port: {number: 8080}, subset: v2}, weight: 10}
"#,
        );
        let vs = &virtual_service(&state, HOST, "default").unwrap().0.spec;
        let mut chrome = HeaderMap::new();
        chrome.insert("user-agent", "Mozilla/5.0 Chrome/120".parse().unwrap());
        assert_eq!(http_route(vs, &view("/x", &chrome, None)).unwrap().0, 0);
        let none = HeaderMap::new();
        assert_eq!(
            http_route(vs, &view("/api/v1?q=1", &none, None)).unwrap().0,
            1
        );
        // Nothing matches: NR.
        assert!(http_route(vs, &view("/other", &none, None)).is_none());
        // The regex is anchored: "Chrome" alone in the middle of nothing still matches .*X.*,
        // but "chrome" (case) does not.
        chrome.insert("user-agent", "chrome".parse().unwrap());
        assert!(http_route(vs, &view("/x", &chrome, None)).is_none());
        // 90/10 by weight.
        let route = &vs.http[1];
        let pick = |roll| pick_weighted(&route.route, |d| d.weight, roll).unwrap();
        assert_eq!(pick(0.0).destination.subset.as_deref(), Some("v1"));
        assert_eq!(pick(0.899).destination.subset.as_deref(), Some("v1"));
        assert_eq!(pick(0.9).destination.subset.as_deref(), Some("v2"));
        assert_eq!(pick(0.999).destination.subset.as_deref(), Some("v2"));
    }

    #[test]
    fn visibility_gateways_and_match_fields() {
        let state = state(
            r#"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: private, namespace: other, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  hosts: [web-app.default.svc.cluster.local]
  exportTo: ["."]
  http: [{route: [{destination: {host: web-app.default}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: fields, creationTimestamp: "2026-02-01T00:00:00Z"}
spec:
  hosts: ["*.default.svc.cluster.local"]
  http:
  - match: [{queryParams: {v: {exact: "2"}}, withoutHeaders: {x-skip: {}}}]
    route: [{destination: {host: web-app}}]
  - match: [{sourceLabels: {app: client}, method: {exact: POST}}]
    route: [{destination: {host: web-app}}]
  - match: [{uri: {exact: /CASE}, ignoreUriCase: true}, {gateways: [gw], uri: {prefix: /}}]
    route: [{destination: {host: web-app}}]
"#,
        );
        // The `private` one is only for namespace `other`; the wildcard one is found instead.
        let other = virtual_service(&state, HOST, "other").unwrap();
        assert_eq!(other.0.metadata.name, "private");
        let vs = &virtual_service(&state, HOST, "default").unwrap().0.spec;
        let none = HeaderMap::new();
        assert_eq!(
            http_route(vs, &view("/?a=1&v=2", &none, None)).unwrap().0,
            0
        );
        let mut skip = HeaderMap::new();
        skip.insert("x-skip", "".parse().unwrap());
        assert!(http_route(vs, &view("/?v=2", &skip, None)).is_none());
        let client = state.workloads.values().next().unwrap();
        let mut post = view("/", &none, Some(client));
        post.method = "POST";
        assert_eq!(http_route(vs, &post).unwrap().0, 1);
        post.source = None;
        assert!(http_route(vs, &post).is_none());
        assert_eq!(http_route(vs, &view("/case", &none, None)).unwrap().0, 2);
        // A match entry for a gateway only never applies to mesh traffic.
        assert!(http_route(vs, &view("/x", &none, None)).is_none());
    }

    #[test]
    fn relative_weights_and_single_destinations() {
        let items = [Some(1), Some(3)];
        let at = |roll| *pick_weighted(&items, |w| *w, roll).unwrap();
        assert_eq!(at(0.2), Some(1));
        assert_eq!(at(0.3), Some(3));
        let single = [None::<i32>];
        assert_eq!(pick_weighted(&single, |w| *w, 0.7), Some(&None));
    }
}
