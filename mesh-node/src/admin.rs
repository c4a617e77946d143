//! The admin endpoint (`:15020`): `/healthz/ready`, `/healthz/live` and `/metrics` on every
//! address (the kubelet and Prometheus reach it at the node's address); `/debug/connections`
//! and `/debug/state`, which reveal every workload, identity, policy and connection of the
//! mesh, only on loopback (or the `--debug-address` an operator opts into). It runs under
//! the limits of [`crate::http::server`] with [`Limits::ADMIN`].

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use arc_swap::ArcSwap;
use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header::CONTENT_TYPE,
    Method, Request, Response, StatusCode,
};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::{
    connections::Connections,
    http::server::{self, Gate, Served},
    state::State,
};

/// What the admin endpoint serves.
pub struct Admin {
    /// Set once the datapath, listeners and config are in place.
    pub ready: AtomicBool,
    /// The metrics registry.
    pub registry: Registry,
    /// The proxy's connection record.
    pub connections: Arc<Connections>,
    /// The current config snapshot.
    pub state: Arc<ArcSwap<State>>,
    /// What the datapath thread last applied to the kernel.
    pub datapath: Mutex<DatapathView>,
    /// L7 destinations in use (connections, requests, ejected endpoints).
    pub clusters: Arc<crate::http::cluster::Clusters>,
    /// The admin server's limits ([`server::Limits::ADMIN`]).
    pub gate: Arc<Gate>,
    /// A non-loopback address that also serves `/debug/*` (`--debug-address`).
    pub debug_address: Option<IpAddr>,
    /// Set once a successor took over (then not ready, and the successor serves the port).
    pub drain: crate::drain::Drain,
    /// The workload certificates held.
    pub certs: Arc<crate::identity::Certificates>,
}

/// The kernel side as last applied, for `/debug/state`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DatapathView {
    /// Config generation whose enrolment is in the kernel map.
    pub generation: u64,
    /// Links carrying the capture program (ifindex, name).
    pub links: Vec<(u32, String)>,
    /// Enrolled pods' IPs in the kernel's pod map.
    pub enrolled: Vec<std::net::Ipv4Addr>,
    /// Every pod address of this node and the interface (ifindex) the kernel believes it
    /// from; 0: none can be trusted with it (the address is refused as a source).
    pub pod_interfaces: std::collections::BTreeMap<std::net::Ipv4Addr, u32>,
    /// Links the capture program could not be attached to (retried every second): name ->
    /// error. Not ready while any remain.
    pub failed_links: std::collections::BTreeMap<String, String>,
    /// Pod interfaces that went through the CNI gate: ifindex -> `namespace/name`.
    pub gated: std::collections::BTreeMap<u32, String>,
    /// The last datapath update that failed and is being retried. Not ready while set.
    pub error: Option<String>,
}

/// Serves the admin endpoint on `listener` until draining starts (the listener is shared
/// with the successor, which serves it from then on).
pub async fn serve(listener: std::net::TcpListener, admin: Arc<Admin>) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(err) => {
            tracing::error!("cannot use the admin listener: {err}");
            return;
        }
    };
    let draining = admin.drain.started();
    tokio::pin!(draining);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut draining => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("admin accept failed: {err}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let debug = stream.local_addr().is_ok_and(|local| {
                local.ip().is_loopback() || Some(local.ip()) == admin.debug_address
            });
            let (gate, drain) = (admin.gate.clone(), admin.drain.clone());
            let handle = move |req: Request<Incoming>| {
                let response = route(&admin, &req, debug);
                async move { response }
            };
            if let Served::Limited(reason) =
                server::serve(&gate, &drain, peer.ip(), stream, handle).await
            {
                tracing::debug!(%peer, "admin connection closed: {reason}");
            }
        });
    }
}

/// Serves the health and metrics endpoints of this process on a unix socket of its own
/// (`--probe-socket`, in the pod's own filesystem) for exec probes: while a successor and its
/// draining predecessor share the node's network (and the admin port), each still answers
/// for itself here, the predecessor as not ready. Never drains.
pub async fn serve_probes(listener: tokio::net::UnixListener, admin: Arc<Admin>) {
    let own = crate::drain::Drain::default();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!("probe socket accept failed: {err}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (admin, own) = (admin.clone(), own.clone());
        tokio::spawn(async move {
            let gate = admin.gate.clone();
            let handle = move |req: Request<Incoming>| {
                let response = route(&admin, &req, false);
                async move { response }
            };
            let local = IpAddr::from([127, 0, 0, 1]);
            if let Served::Limited(reason) = server::serve(&gate, &own, local, stream, handle).await
            {
                tracing::debug!("probe connection closed: {reason}");
            }
        });
    }
}

/// Binds the probe socket (replacing a stale one), mode 0600.
pub fn bind_probes(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Binds the admin address.
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

fn route(admin: &Admin, req: &Request<Incoming>, debug: bool) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is supported\n".into(),
        );
    }
    let path = req.uri().path();
    if path.starts_with("/debug/") && !debug {
        return text(
            StatusCode::FORBIDDEN,
            "/debug/* is served on loopback only (mesh-node run --debug-address opts an \
             address in)\n"
                .into(),
        );
    }
    match path {
        "/healthz/ready" => {
            let (failed, error) = admin
                .datapath
                .lock()
                .map(|d| (d.failed_links.len(), d.error.clone()))
                .unwrap_or_default();
            if let Some(error) = error {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("datapath update failing: {error}\n"),
                )
            } else if failed > 0 {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("capture missing on {failed} link(s): see /debug/state\n"),
                )
            } else if admin.drain.is_draining() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "draining: a successor took over\n".into(),
                )
            } else if admin.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "starting\n".into())
            }
        }
        "/metrics" => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, &admin.registry) {
                Ok(()) => with_type(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body,
                ),
                Err(err) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("encoding failed: {err}\n"),
                ),
            }
        }
        // Liveness: the admin server answers, so the proxy's runtime is alive.
        "/healthz/live" => text(StatusCode::OK, "alive\n".into()),
        "/debug/connections" => json(&admin.connections.snapshot()),
        "/debug/state" => {
            let state = admin.state.load();
            let datapath = admin.datapath.lock().map(|d| d.clone()).unwrap_or_default();
            let mut services: Vec<_> = state.services.values().collect();
            services.sort_by_key(|s| s.vip);
            json(&serde_json::json!({
                "generation": state.generation,
                "node": state.node,
                "local_enrolled": state.local_enrolled(),
                "workloads": state.workloads.values().collect::<Vec<_>>(),
                "services": services,
                "virtual_services": state.virtual_services,
                "destination_rules": state.destination_rules,
                "network_policies": state.network_policies,
                "datapath": datapath,
                "clusters": admin.clusters.snapshot(),
                "certificates": admin.certs.held(),
            }))
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /healthz/ready, /metrics, /debug/connections, /debug/state\n".into(),
        ),
    }
}

fn json(value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_string_pretty(value) {
        Ok(body) => with_type(StatusCode::OK, "application/json", body),
        Err(err) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    with_type(status, "text/plain; charset=utf-8", body)
}

fn with_type(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}
