//! The demo: a two-node cluster in network namespaces, from a mesh config file
//! (`examples/demo.yaml` by default), with mesh-node on every node. Every pod that declares
//! container ports runs a greeting server on them; every other pod is a client that calls each
//! Service VIP twice and each server pod once. The report shows, for each call, who answered
//! and which node proxy carried it (from the proxies' own records), with the original
//! destination. Everything is removed at the end, also on failure.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use anyhow::{anyhow, Context, Result};
use mesh_node::{config, state::State};
use mesh_tests::{
    apps::{greet, Behaviour, Server},
    cluster::{Cluster, ProxyConnection},
};

struct Call {
    /// When the call started and ended (ms since the Unix epoch).
    window: (u64, u64),
    client: String,
    target: String,
    dst: SocketAddr,
    local: Option<SocketAddr>,
    answer: String,
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
    println!("   mesh-node running on {}", nodes.join(", "));

    let mut servers = Vec::new();
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
            servers.push(Server::start(
                &p.netns,
                port,
                Behaviour::Greet(p.name.clone()),
            )?);
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
            let (local, answer) = match greet(&pod.netns, dst) {
                Ok((local, answer)) => (Some(local), answer),
                Err(err) => (None, format!("failed: {err:#}")),
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
    let answered_by = call.answer.strip_prefix("hello from ").unwrap_or("");
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
                let how = if c.direction == "hbone" {
                    format!(" [peer sa/{} verified]", short(&c.source_identity))
                } else {
                    String::new()
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
