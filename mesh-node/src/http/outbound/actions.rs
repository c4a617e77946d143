//! Route actions other than forwarding: fault injection (abort), redirects, rewrites and
//! mirroring.

use super::*;

/// What a route does before a request is forwarded.
pub(super) enum Before {
    /// Nothing: forward it.
    Forward,
    /// A delay was injected (and waited): forward it.
    Delayed,
    /// Answered here (redirect, direct response, injected abort).
    Answer(Response<RespBody>, ResponseFlag, Option<String>),
}

/// The route's own answer or injected delay, before forwarding: a redirect, a direct response,
/// a fault (delay, then abort), each as Istio orders them.
pub(super) async fn before_forwarding(
    route: &HttpRoute,
    parts: &Parts,
    authority: &str,
    port: u16,
) -> Before {
    if let Some(redirect) = &route.redirect {
        let response = redirect_response(redirect, parts, authority, port);
        return Before::Answer(response, ResponseFlag::None, None);
    }
    if let Some(direct) = &route.direct_response {
        let status = StatusCode::from_u16(direct.status as u16).unwrap_or(StatusCode::OK);
        let body = direct.body.clone().unwrap_or_default();
        let mut response = local_response(status, body);
        apply_header_ops(
            response.headers_mut(),
            route.headers.as_ref().and_then(|h| h.response.as_ref()),
        );
        return Before::Answer(response, ResponseFlag::None, None);
    }
    let Some(fault) = &route.fault else {
        return Before::Forward;
    };
    let mut before = Before::Forward;
    if let Some(delay) = &fault.delay {
        if hit(delay.percentage.as_ref().map(|p| p.0)) {
            tokio::time::sleep(delay.fixed_delay.0).await;
            before = Before::Delayed;
        }
    }
    if let Some(abort) = &fault.abort {
        if hit(abort.percentage.as_ref().map(|p| p.0)) {
            let response = abort_response(abort, parts);
            let error = Some("fault injected".into());
            return Before::Answer(response, ResponseFlag::FaultInjected, error);
        }
    }
    before
}

/// Mirrored requests in flight at once on this node; a mirror beyond it is skipped (and
/// counted in `mesh_mirror_skipped_total`): a copy must never cost the real traffic.
pub(super) const MAX_MIRRORS: usize = 256;

pub(super) static MIRRORS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_MIRRORS);

/// A mirrored request, its answer included, is given up after this.
pub(super) const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether a fault or mirror with `percentage` applies to this request.
pub(super) fn hit(percentage: Option<f64>) -> bool {
    let p = percentage.unwrap_or(0.0);
    p >= 100.0 || fastrand::f64() * 100.0 < p
}

pub(super) fn abort_response(
    abort: &crate::config::networking::FaultAbort,
    parts: &Parts,
) -> Response<RespBody> {
    if let Some(grpc) = &abort.grpc_status {
        let code = grpc_code(grpc);
        let mut response = local_response(StatusCode::OK, "");
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from(code));
        headers.insert(
            "grpc-message",
            HeaderValue::from_static("fault filter abort"),
        );
        let _ = parts;
        return response;
    }
    let status = abort
        .http_status
        .and_then(|s| StatusCode::from_u16(s as u16).ok())
        .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    local_response(status, "fault filter abort")
}

/// gRPC status numbers by name (Istio takes names such as `UNAVAILABLE`).
pub(super) fn grpc_code(name: &str) -> u32 {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    name.parse()
        .ok()
        .or_else(|| {
            NAMES
                .iter()
                .position(|n| n.eq_ignore_ascii_case(name))
                .map(|i| i as u32)
        })
        .unwrap_or(2)
}

pub(super) fn redirect_response(
    redirect: &crate::config::networking::HttpRedirect,
    parts: &Parts,
    authority: &str,
    port: u16,
) -> Response<RespBody> {
    let scheme = redirect.scheme.clone().unwrap_or_else(|| "http".into());
    let (host, request_port) = match authority.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => (h.to_string(), p.parse().ok()),
        _ => (authority.to_string(), None),
    };
    // `authority` replaces host and port, as Envoy's host_redirect does.
    let request_port = if redirect.authority.is_some() {
        None
    } else {
        request_port
    };
    let host = redirect.authority.clone().unwrap_or(host);
    let port = match (&redirect.port, &redirect.derive_port) {
        (Some(p), _) => Some(*p as u16),
        (None, Some(crate::config::networking::DerivePort::FromRequestPort)) => {
            request_port.or(Some(port))
        }
        (None, Some(_)) => None,
        (None, None) => request_port,
    };
    let path = match &redirect.uri {
        Some(uri) => {
            let query = parts
                .uri
                .query()
                .map(|q| format!("?{q}"))
                .unwrap_or_default();
            format!("{uri}{query}")
        }
        None => parts
            .uri
            .path_and_query()
            .map_or("/".into(), |p| p.as_str().to_string()),
    };
    let location = match port {
        Some(p) if !(scheme == "http" && p == 80 || scheme == "https" && p == 443) => {
            format!("{scheme}://{host}:{p}{path}")
        }
        _ => format!("{scheme}://{host}{path}"),
    };
    let code = StatusCode::from_u16(redirect.redirect_code as u16)
        .unwrap_or(StatusCode::MOVED_PERMANENTLY);
    let mut response = local_response(code, "");
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// `rewrite`: the matched prefix (or the whole path) and the authority.
pub(super) fn rewrite_request(
    rewrite: &crate::config::networking::HttpRewrite,
    matched_prefix: Option<&str>,
    parts: &mut Parts,
    authority: &mut String,
) {
    let path = parts.uri.path().to_string();
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let mut new_path = None;
    if let Some(uri) = &rewrite.uri {
        // The prefix matched (perhaps ignoring case): the path's first bytes are it.
        let rest = matched_prefix.and_then(|p| path.get(p.len()..));
        new_path = Some(match rest {
            Some(rest) => {
                // `/api` -> `/`: do not produce `//x`.
                if uri.ends_with('/') && rest.starts_with('/') {
                    format!("{uri}{}", &rest[1..])
                } else {
                    format!("{uri}{rest}")
                }
            }
            None => uri.clone(),
        });
    } else if let Some(regex) = &rewrite.uri_regex_rewrite {
        if let Some(re) = &regex.compiled {
            let replacement = re2_replacement(&regex.rewrite);
            new_path = Some(re.replace_all(&path, replacement.as_str()).into_owned());
        }
    }
    if let Some(new_path) = new_path {
        if let Ok(uri) = format!("{new_path}{query}").parse::<Uri>() {
            parts.uri = uri;
        }
    }
    if let Some(new_authority) = &rewrite.authority {
        *authority = new_authority.clone();
    }
}

/// An RE2 rewrite (`\\1` for a group) in the regex crate's syntax (`${1}`; `$` literal as
/// `$$`).
pub(super) fn re2_replacement(rewrite: &str) -> String {
    let mut out = String::with_capacity(rewrite.len());
    let mut chars = rewrite.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '$' => out.push_str("$$"),
            '\\' => match chars.peek().copied() {
                Some(d) if d.is_ascii_digit() => {
                    chars.next();
                    out.push_str(&format!("${{{d}}}"));
                }
                Some(other) => {
                    chars.next();
                    out.push(other);
                }
                None => out.push('\\'),
            },
            c => out.push(c),
        }
    }
    out
}

/// Sends copies of the request to the route's mirrors (as Envoy does: `-shadow` appended to
/// the host, the answer ignored).
#[allow(clippy::too_many_arguments)]
pub(super) fn mirror(
    ctx: &Arc<ProxyContext>,
    state: &Arc<State>,
    source: Option<&Workload>,
    route: &HttpRoute,
    parts: &Parts,
    body: &Bytes,
    authority: &str,
    (client_ns, vs_ns): (&str, &str),
    dialled_port: u16,
) {
    let mut targets: Vec<(&crate::config::networking::Destination, Option<f64>)> = Vec::new();
    if let Some(m) = &route.mirror {
        targets.push((m, route.mirror_percentage.as_ref().map(|p| p.0)));
    }
    for m in &route.mirrors {
        targets.push((&m.destination, m.percentage.as_ref().map(|p| p.0)));
    }
    for (destination, percentage) in targets {
        // A mirror without a percentage mirrors everything.
        if !hit(percentage.or(Some(100.0))) {
            continue;
        }
        let host = crate::config::semantics::fqdn(&destination.host, vs_ns);
        let Some(target) = state
            .services_by_host
            .get(&host)
            .and_then(|vips| {
                let port = destination.port.map(|p| p as u16);
                vips.iter()
                    .find(|v| {
                        port.is_none_or(|p| v.port() == p)
                            && (port.is_some() || v.port() == dialled_port)
                    })
                    .or_else(|| vips.first())
            })
            .and_then(|vip| state.services.get(vip))
        else {
            continue;
        };
        let shadow = match authority.rsplit_once(':') {
            Some((h, p)) => format!("{h}-shadow:{p}"),
            None => format!("{authority}-shadow"),
        };
        let key = cluster_key(
            state,
            client_ns,
            source,
            &host,
            destination.subset.clone(),
            target,
        );
        let (cluster, view) = cluster_view(ctx, state, key, target, source);
        let Some(endpoint) = cluster.pick(&view, &HashSet::new(), None, None) else {
            continue;
        };
        let Ok(permit) = MIRRORS.try_acquire() else {
            ctx.l7.mirrors_skipped.inc();
            continue;
        };
        let h2 = matches!(target.protocol, Protocol::Http2 | Protocol::Grpc);
        let Some(request) = upstream_request(
            parts,
            Full::new(body.clone()).map_err(|e| match e {}).boxed(),
            h2,
            &shadow,
        ) else {
            continue;
        };
        let (ctx, state) = (ctx.clone(), state.clone());
        let source_ip = source.map(|s| s.ip);
        tokio::spawn(async move {
            let _permit = permit;
            let source = source_ip.and_then(|ip| state.workloads.get(&ip));
            let destination = state.workloads.get(endpoint.ip());
            let endpoint_state = cluster.endpoint(endpoint);
            let peer = SocketAddr::from((source_ip.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED), 0));
            let sent = send(
                &ctx,
                &state,
                &cluster,
                &view,
                &endpoint_state,
                source,
                destination,
                endpoint,
                request,
                Hop {
                    h2,
                    hbone: via_hbone(&state, source, destination),
                },
                peer,
            );
            let answered = async {
                if let Ok(Answer::Upstream(response)) = sent.await {
                    let _ = response.into_body().collect().await;
                }
            };
            let _ = tokio::time::timeout(MIRROR_TIMEOUT, answered).await;
        });
    }
}
