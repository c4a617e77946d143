//! The demo: a two-node cluster in network namespaces, from a mesh config file
//! (`examples/demo.yaml` by default), with mesh-node on every node. Every pod that declares
//! container ports serves on them: HTTP where a Service declares the port HTTP, a greeting
//! over plain TCP otherwise; every other pod is a client that calls each Service port twice
//! and each server pod once (curl for HTTP). The report shows, for each call, who answered
//! and which node proxies carried it (from their own records), then the canary split of 100
//! requests per enrolled client and HTTP Service as the VirtualService routes them, and the
//! Istio metrics. Everything is removed at the end, also on failure.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use anyhow::{anyhow, Context, Result};
use mesh_node::{config, state::State};
use mesh_tests::{
    apps::{greet, Behaviour, Server},
    cluster::{Cluster, ProxyConnection},
    web::{self, WebServer},
};

struct Call {
    /// When the call started and ended (ms since the Unix epoch).
    window: (u64, u64),
    client: String,
    target: String,
    dst: SocketAddr,
    local: Option<SocketAddr>,
    answer: String,
    /// The pod that answered.
    server: String,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn main() -> Result<()> {
    let path = std::env::args()
        .nth(1)
        .map_or_else(|| PathBuf::from("examples/demo.yaml"), PathBuf::from);
    let yaml =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let resources =
        config::parse_str(&path.display().to_string(), &yaml).map_err(|e| anyhow!("{e}"))?;
    let state = State::build(&resources, "", &Default::default(), 0);

    println!("== building the cluster from {}", path.display());
    let mut cluster = Cluster::new(&yaml)?;
    let nodes: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    for node in &cluster.nodes {
        let pods: Vec<String> = cluster
            .pods
            .values()
            .filter(|p| p.node == node.name)
            .map(|p| {
                let enrolled = state.workloads.get(&p.ip).is_some_and(|w| w.enrolled);
                format!(
                    "{}/{} {}{}",
                    p.namespace,
                    p.name,
                    p.ip,
                    if enrolled { " (mesh)" } else { "" }
                )
            })
            .collect();
        println!(
            "   {} (underlay {}): {}",
            node.name,
            node.underlay,
            pods.join(", ")
        );
    }
    cluster.start_mesh_everywhere()?;
    let signer = cluster.signer_ref()?;
    println!(
        "   signer (mesh-node ca serve) on {} with the only copy of the CA key, in a mount \
         namespace of its own",
        signer.address
    );
    println!(
        "   mesh-node running on {}, each holding certificates for its own pods only: {}",
        nodes.join(", "),
        nodes
            .iter()
            .map(|n| format!(
                "{n} {}",
                cluster.metric(n, "mesh_certificates").unwrap_or(0)
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let http = |addr: SocketAddr| {
        state
            .service_of_endpoint(addr)
            .is_some_and(|s| s.protocol.is_http())
    };
    let mut servers = Vec::new();
    let mut web_servers = Vec::new();
    let mut server_ports: Vec<(String, SocketAddr)> = Vec::new();
    let mut clients = Vec::new();
    for pod in &resources.pods {
        let Some(p) = cluster.pods.get(&pod.metadata.name) else {
            continue;
        };
        let ports: Vec<u16> = pod
            .spec
            .containers
            .iter()
            .flat_map(|c| &c.ports)
            .map(|p| p.container_port)
            .collect();
        if ports.is_empty() {
            clients.push(p.name.clone());
        }
        for port in ports {
            if http(SocketAddr::from((p.ip, port))) {
                web_servers.push(WebServer::start(&p.netns, port, &p.name)?);
            } else {
                servers.push(Server::start(
                    &p.netns,
                    port,
                    Behaviour::Greet(p.name.clone()),
                )?);
            }
            server_ports.push((
                format!("{}/{}", p.namespace, p.name),
                SocketAddr::from((p.ip, port)),
            ));
        }
    }
    let mut vips: Vec<_> = state.services.values().collect();
    vips.sort_by_key(|s| s.vip);

    let mut calls = Vec::new();
    for client in &clients {
        let pod = cluster.pod(client);
        let who = format!("{}/{}", pod.namespace, pod.name);
        let mut targets: Vec<(String, SocketAddr)> = Vec::new();
        for svc in &vips {
            for _ in 0..2 {
                targets.push((
                    format!("Service {}", svc.qualified_name()),
                    SocketAddr::V4(svc.vip),
                ));
            }
        }
        targets.extend(
            server_ports
                .iter()
                .map(|(name, addr)| (format!("pod {name}"), *addr)),
        );
        for (target, dst) in targets {
            let start = now_ms();
            let is_http = http(dst)
                || state
                    .services
                    .values()
                    .any(|s| SocketAddr::V4(s.vip) == dst && s.protocol.is_http());
            let (local, answer, server) = if is_http {
                match web::get(&pod.netns, &format!("http://{dst}/"), &[]) {
                    Ok((status, pod, local)) => {
                        (Some(local), format!("HTTP {status} from {pod}"), pod)
                    }
                    Err(err) => (None, format!("failed: {err:#}"), String::new()),
                }
            } else {
                match greet(&pod.netns, dst) {
                    Ok((local, answer)) => {
                        let server = answer.strip_prefix("hello from ").unwrap_or("").to_string();
                        (Some(local), answer, server)
                    }
                    Err(err) => (None, format!("failed: {err:#}"), String::new()),
                }
            };
            // The proxies' records are kept to the millisecond: keep calls apart.
            std::thread::sleep(std::time::Duration::from_millis(5));
            calls.push(Call {
                window: (start, now_ms()),
                client: who.clone(),
                target,
                dst,
                local,
                answer,
                server,
            });
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(300));

    let mut records: BTreeMap<String, Vec<ProxyConnection>> = BTreeMap::new();
    for node in &nodes {
        records.insert(node.clone(), cluster.connections(node)?);
    }
    println!("\n== calls (client -> destination: answer; path)");
    for call in &calls {
        let path = describe_path(&cluster, &state, &records, call);
        println!(
            "   {:<14} -> {:<21} {:<24} {:<22} {}",
            call.client,
            call.dst.to_string(),
            format!("({})", call.target),
            format!("\"{}\"", call.answer),
            path
        );
    }

    println!("\n== what each node proxy recorded (its /debug/connections)");
    for (node, conns) in &records {
        println!("   {node}: {} connection(s)", conns.len());
        for c in conns {
            println!(
                "     {:<8} {:<21} orig dst {:<20} -> {:<20} {:>5} B sent {:>5} B received{}{}",
                c.direction,
                c.client.to_string(),
                c.original_dst.to_string(),
                c.upstream.map_or("-".into(), |u| u.to_string()),
                c.bytes_sent,
                c.bytes_received,
                c.service
                    .as_ref()
                    .map_or(String::new(), |s| format!("  service {s}")),
                if c.flag.is_empty() {
                    String::new()
                } else {
                    format!("  flag {}", c.flag)
                },
            );
        }
    }
    println!("\n== canary routing (100 requests per enrolled client and HTTP Service, by pod)");
    for client in &clients {
        let pod = cluster.pod(client);
        let enrolled = state.workloads.get(&pod.ip).is_some_and(|w| w.enrolled);
        if !enrolled {
            continue;
        }
        for svc in vips.iter().filter(|s| s.protocol.is_http()) {
            let url = format!("http://{}/", svc.vip);
            for (label, extra) in [
                ("", &[][..]),
                (" with x-canary: always", &["-H", "x-canary: always"][..]),
            ] {
                let answers = web::curl_many(&pod.netns, &url, 100, extra)?;
                let mut by_pod: BTreeMap<String, usize> = BTreeMap::new();
                for a in &answers {
                    let key = if a.status == 200 {
                        a.pod.clone()
                    } else {
                        format!("HTTP {}", a.status)
                    };
                    *by_pod.entry(key).or_default() += 1;
                }
                let split: Vec<String> = by_pod.iter().map(|(k, n)| format!("{k} {n}")).collect();
                println!(
                    "   {}/{} -> Service {}{label}: {}",
                    pod.namespace,
                    pod.name,
                    svc.qualified_name(),
                    split.join(", ")
                );
            }
        }
    }
    println!("\n== Istio request metrics (istio_requests_total by reporter, version and code)");
    for node in &nodes {
        let (_, body) = cluster.admin_get(node, "/metrics")?;
        let mut sums: BTreeMap<String, u64> = BTreeMap::new();
        for line in body
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
        {
            let label = |key: &str| {
                line.split(&format!("{key}=\""))
                    .nth(1)
                    .and_then(|rest| rest.split('"').next())
                    .unwrap_or("")
                    .to_string()
            };
            let value: u64 = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let key = format!(
                "{} {}->{}/{} {}",
                label("reporter"),
                label("source_workload"),
                label("destination_workload"),
                label("destination_version"),
                label("response_code")
            );
            *sums.entry(key).or_default() += value;
        }
        println!("   {node}:");
        for (key, n) in sums {
            println!("     {key}: {n}");
        }
    }
    println!(
        "\n== Istio TCP metrics (istio_tcp_connections_opened_total by reporter and security)"
    );
    for node in &nodes {
        let mut parts = Vec::new();
        for reporter in ["source", "destination"] {
            for security in ["mutual_tls", "none"] {
                let n = cluster.metric_sum(
                    node,
                    "istio_tcp_connections_opened_total",
                    &[
                        ("reporter", reporter),
                        ("connection_security_policy", security),
                    ],
                )?;
                parts.push(format!("{reporter}/{security}={n}"));
            }
        }
        let certs = cluster.metric_sum(node, "mesh_certificates", &[])?;
        println!(
            "   {node}: {} (workload certificates held: {certs})",
            parts.join(" ")
        );
    }
    println!("\n== kernel decisions (mesh_kernel_packets_total)");
    for node in &nodes {
        let mut parts = Vec::new();
        for decision in [
            "captured_outbound_syn",
            "captured_inbound_syn",
            "steered_flow",
            "steered_socket",
            "passed_uncaptured",
        ] {
            parts.push(format!(
                "{decision}={}",
                cluster.kernel_counter(node, decision)?
            ));
        }
        println!("   {node}: {}", parts.join(" "));
    }
    let failed = calls.iter().filter(|c| c.local.is_none()).count();
    drop(servers);
    drop(web_servers);
    drop(cluster);
    println!("\n== cleaned up (namespaces, programs, pins, rules)");
    if failed > 0 {
        anyhow::bail!("{failed} call(s) failed");
    }
    Ok(())
}

/// Which proxies carried a call, from their records: the client's node proxy records the
/// client address (outbound); the destination node's proxy records the pod it delivered to
/// (inbound).
fn describe_path(
    cluster: &Cluster,
    state: &State,
    records: &BTreeMap<String, Vec<ProxyConnection>>,
    call: &Call,
) -> String {
    let Some(local) = call.local else {
        return String::new();
    };
    let short = |id: &Option<String>| {
        id.as_deref().map_or("-".to_string(), |i| {
            i.rsplit('/').next().unwrap_or(i).to_string()
        })
    };
    let mut hops = Vec::new();
    for (node, conns) in records {
        for c in conns.iter().filter(|c| c.client == local) {
            let upstream = c.upstream.map_or("-".into(), |u| u.to_string());
            let how = match c.path.as_str() {
                "hbone" => format!(
                    " [HBONE mTLS sa/{} -> sa/{}]",
                    short(&c.source_identity),
                    short(&c.destination_identity)
                ),
                "same_node" => " [same node, identity in-process]".to_string(),
                "http_routed" => " [L7: each request routed by the VirtualService]".to_string(),
                "same_node_http" | "plaintext_http" => " [HTTP authorized per request]".to_string(),
                _ => String::new(),
            };
            hops.push(format!(
                "{node} proxy {} (orig dst {} -> {upstream}){how}",
                c.direction, c.original_dst
            ));
        }
    }
    // The destination node's proxy records the delivery to the pod (HBONE or plaintext
    // inbound), with the source pod or the previous hop as its client: match it by pod and by
    // time.
    let answered_by = call.server.as_str();
    if let Some(server) = cluster.pods.get(answered_by) {
        let node = &server.node;
        let inbound = records.get(node).and_then(|conns| {
            conns.iter().find(|c| {
                (c.direction == "inbound" || c.direction == "hbone")
                    && c.upstream.is_some_and(|u| u.ip() == server.ip)
                    && c.opened_ms >= call.window.0
                    && c.opened_ms <= call.window.1
            })
        });
        if let Some(c) = inbound {
            if !hops.iter().any(|h| h.starts_with(node.as_str())) {
                let how = match c.path.as_str() {
                    "hbone" => format!(" [peer sa/{} verified]", short(&c.source_identity)),
                    "hbone_http" => format!(
                        " [peer sa/{} verified, HTTP authorized per request]",
                        short(&c.source_identity)
                    ),
                    _ => String::new(),
                };
                hops.push(format!(
                    "{node} proxy {} to {}{how}",
                    c.direction, server.ip
                ));
            }
        }
    }
    let enrolled = |pod: &str| {
        cluster
            .pods
            .get(pod)
            .and_then(|p| state.workloads.get(&p.ip))
            .is_some_and(|w| w.enrolled)
    };
    let client = call.client.rsplit('/').next().unwrap_or("");
    if hops.is_empty() && (enrolled(client) || enrolled(answered_by)) {
        "NOT captured (unexpected: one end is in the mesh)".into()
    } else if hops.is_empty() {
        "direct (neither end in the mesh)".into()
    } else {
        format!("via {}", hops.join(" + "))
    }
}
