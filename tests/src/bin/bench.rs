//! `mesh-bench` (root; run by `cargo xtask bench`): builds a two-node netns cluster, measures
//! the same loads without the mesh (baseline), through it at L4 (HBONE mTLS across nodes, the
//! local relay on one node) and at L7 (HTTP routed by a VirtualService, authorized per request
//! by an AuthorizationPolicy), on the same node and across nodes; then the proxies' idle
//! memory and their memory holding idle connections. Writes JSON to `--out` and, with
//! `--doc`, the table into that Markdown file between its markers. Every mesh figure is also
//! given relative to the baseline of the same run.
//!
//! The load (`mesh-load`) runs in the client pod's namespace, the servers (the harness's web
//! server) in the server pods' namespaces; the proxies' CPU and memory come from /proc.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Parser;
use mesh_tests::{
    cluster::{built_bin, proc_status_kib, Cluster},
    fixtures::BENCH,
    load::mesh_load_in,
    netns::sh,
    otlp::{Behaviour, Receiver},
    web::WebServer,
    ztunnel::Ztunnel,
};
use serde::Serialize;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "The mesh's benchmark matrix (root): baseline, L4 and L7, same and cross node")]
struct Args {
    /// Short runs (about a minute in all): a smoke test that every mode completes.
    #[arg(long)]
    quick: bool,
    /// Directory for the JSON report.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Markdown file whose generated section (between `<!-- bench:begin -->` and
    /// `<!-- bench:end -->`) gets the table.
    #[arg(long)]
    doc: Option<PathBuf>,
    /// Run only the loads whose `path/mode/load` contains this (for example `cross/L7`, or
    /// `fixed`). The report is then partial and no doc is written.
    #[arg(long)]
    only: Option<String>,
    /// Another mesh measured in the same run, as `NAME=PATH`. Only `ztunnel=PATH` (Istio's
    /// ztunnel built from source with its `testing` feature; docs/benchmarks.md says how): it
    /// runs in in-pod mode on both nodes and gets the L4 cells' loads.
    #[arg(long, value_name = "NAME=PATH")]
    peer: Vec<String>,
}

/// The mode of the peer's cells.
const ZTUNNEL: &str = "ztunnel";

/// Where each path's Service lives.
const PATHS: [(&str, &str); 2] = [("same node", "100.66.0.40"), ("cross node", "100.66.0.41")];

/// How long each load runs.
struct Plan {
    fixed_s: u64,
    pingpong_s: u64,
    max_s: u64,
    bulk_s: u64,
    connect_s: u64,
    idle_connections: usize,
}

/// One load in one cell of the matrix, with what the proxies spent on it.
#[derive(Clone, Debug, Serialize)]
struct Run {
    path: String,
    mode: String,
    load: String,
    /// mesh-load's report.
    result: Value,
    /// CPU seconds of both node proxies during the run.
    proxy_cpu_s: f64,
    /// Highest peak RSS of a node proxy during the run, KiB.
    proxy_peak_rss_kib: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !mesh_tests::is_root() {
        bail!("mesh-bench needs root (network namespaces, eBPF)");
    }
    let plan = if args.quick {
        Plan {
            fixed_s: 1,
            pingpong_s: 1,
            max_s: 1,
            bulk_s: 1,
            connect_s: 1,
            idle_connections: 500,
        }
    } else {
        Plan {
            fixed_s: 10,
            pingpong_s: 5,
            max_s: 5,
            bulk_s: 5,
            connect_s: 5,
            idle_connections: 10_000,
        }
    };
    let mut ztunnel = None;
    for peer in &args.peer {
        match peer.split_once('=') {
            Some(("ztunnel", path)) if Path::new(path).is_file() => {
                ztunnel = Some(std::fs::canonicalize(path)?)
            }
            Some(("ztunnel", path)) => bail!("--peer ztunnel={path}: no such file"),
            _ => bail!("--peer {peer}: expected ztunnel=PATH (the only peer known)"),
        }
    }
    let started = Instant::now();
    let machine = machine()?;
    eprintln!("mesh-bench: {}", machine["cpu"]);
    mesh_node::sys::raise_nofile_limit()?;
    let load = built_bin("mesh-load")?;
    let mut bench = Bench {
        only: args.only.clone(),
        plan: &plan,
        runs: Vec::new(),
        proxies: Vec::new(),
    };
    // The baseline gets a cluster of its own: its connections, DNATed by the kube-proxy-like
    // rules, would otherwise leave conntrack entries behind that the proxy's connections
    // (made from the same client address and ports) could collide with (ARCHITECTURE.md,
    // known gaps).
    {
        let (cluster, _servers) = topology()?;
        for (path, vip) in PATHS {
            bench.cell(&cluster, path, "baseline", &format!("http://{vip}:80"))?;
        }
    }
    // The mesh with the same-node socket bypass (off by default), in a cluster of its own
    // too; what the bypass did is in the report.
    let mut bypass = serde_json::Map::new();
    {
        let (mut cluster, _servers) = topology()?;
        cluster.run_args = vec!["--socket-bypass=true".into()];
        cluster.start_mesh_everywhere()?;
        bench.proxies = vec![cluster.mesh_pid("node-a")?, cluster.mesh_pid("node-b")?];
        for (path, vip) in PATHS {
            bench.cell(&cluster, path, "L4 bypass", &format!("http://{vip}:81"))?;
            bench.cell(&cluster, path, "L7 bypass", &format!("http://{vip}:80"))?;
        }
        for node in ["node-a", "node-b"] {
            let mut events = serde_json::Map::new();
            for (_, event) in mesh_common::BypassCounter::ALL {
                events.insert(event.into(), cluster.bypass_counter(node, event)?.into());
            }
            bypass.insert(node.into(), events.into());
        }
    }
    // The peer, in a cluster of its own, with the L4 cells' loads.
    let mut peer = Value::Null;
    if let Some(binary) = &ztunnel {
        let (cluster, servers) = topology()?;
        let ztunnel = Ztunnel::start(&cluster, binary, BENCH)?;
        std::thread::sleep(Duration::from_secs(2));
        bench.proxies = ztunnel.pids();
        let idle = idle_rss(&bench.proxies)?;
        for (path, vip) in PATHS {
            bench.cell(&cluster, path, ZTUNNEL, &format!("http://{vip}:81"))?;
        }
        let after = idle_rss(&bench.proxies)?;
        let held = hold_idle(
            &cluster,
            &load,
            &servers[3],
            plan.idle_connections,
            &bench.proxies,
        )?;
        let version = sh(&binary.to_string_lossy(), &["version"]).unwrap_or_default();
        peer = json!({
            "name": "ztunnel",
            "version": version.trim(),
            // The TLS provider the build uses (`CryptoProvider:"tls-ring"` in its version).
            "tls": version
                .split("CryptoProvider:\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or("unknown"),
            "idle_kib": idle,
            "after_loads_kib": after,
            "idle_connections": held,
        });
    }
    // Tracing (every request sampled) with a collector that works, one that is down and one
    // that is slow, in a cluster of its own: latency at 1,000 req/s against the L7 rows
    // (no tracing), and what the exporters counted.
    let tracing = trace_cells(&mut bench)?;
    let (mut cluster, servers) = topology()?;
    cluster.start_mesh_everywhere()?;
    // Idle: started, configured, nothing proxied yet.
    std::thread::sleep(Duration::from_secs(2));
    bench.proxies = vec![cluster.mesh_pid("node-a")?, cluster.mesh_pid("node-b")?];
    let idle = idle_rss(&bench.proxies)?;
    // The L4 cells first: the RSS after them compares with the peer's after the same loads.
    for (path, vip) in PATHS {
        bench.cell(&cluster, path, "L4", &format!("http://{vip}:81"))?;
    }
    let after_loads = idle_rss(&bench.proxies)?;
    for (path, vip) in PATHS {
        bench.cell(&cluster, path, "L7", &format!("http://{vip}:80"))?;
    }
    let held = hold_idle(
        &cluster,
        &load,
        &servers[3],
        plan.idle_connections,
        &bench.proxies,
    );
    // The proxies' logs are kept, the more so when a step failed.
    std::fs::create_dir_all(&args.out)?;
    for node in ["node-a", "node-b"] {
        std::fs::write(args.out.join(format!("{node}.log")), cluster.mesh_log(node))?;
    }
    let held = held?;
    let runs = bench.runs;
    drop(servers);
    let report = json!({
        "machine": machine,
        "quick": args.quick,
        "seconds": started.elapsed().as_secs_f64(),
        "idle_kib": idle,
        "after_loads_kib": after_loads,
        "idle_connections": held,
        "bypass": bypass,
        "tracing": tracing,
        "peer": peer,
        "runs": runs,
    });
    drop(cluster);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let name = if args.quick { "quick" } else { "full" };
    for file in [
        format!("{name}-{stamp}.json"),
        format!("{name}-latest.json"),
    ] {
        std::fs::write(args.out.join(&file), serde_json::to_string_pretty(&report)?)?;
    }
    let table = table(&report);
    println!("{table}");
    if let (Some(doc), None) = (&args.doc, &args.only) {
        write_doc(doc, &table)?;
    }
    eprintln!(
        "mesh-bench: done in {:.0} s; JSON in {}",
        started.elapsed().as_secs_f64(),
        args.out.join(format!("{name}-latest.json")).display()
    );
    Ok(())
}

/// The tracing modes: the mode, what the table calls it, whether every request is sampled
/// (else none is), and the collector's answer delay (`None`: not running).
const TRACED: [(&str, &str, bool, Option<f64>); 4] = [
    ("L7 tracing, none sampled", "none sampled", false, None),
    ("L7 traced", "answering", true, Some(0.0)),
    ("L7 traced, collector down", "down", true, None),
    ("L7 traced, collector slow", "slow (10 s)", true, Some(10.0)),
];

/// Every request sampled, mesh-wide (the proxies start with `--trace-sampling 0`).
const SAMPLE_ALL: &str = "
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing: [{providers: [{name: otel}], randomSamplingPercentage: 100}]
";

/// The L7 fixed-rate loads with tracing on, exporting to an OTLP receiver on each node's
/// loopback: first with no request sampled (trace context read and forwarded, no span: the
/// baseline of the same proxies), then, after a mesh-wide Telemetry samples every request,
/// with the receiver answering at once, absent, and answering after 10 s (past the
/// exporter's timeout). Returns the spans each node's exporter counted per mode.
fn trace_cells(bench: &mut Bench) -> Result<Value> {
    let (mut cluster, _servers) = topology()?;
    cluster.run_args = vec![
        "--tracing-provider".into(),
        "otel=http://127.0.0.1:4318".into(),
        "--trace-sampling".into(),
        "0".into(),
    ];
    cluster.start_mesh_everywhere()?;
    bench.proxies = vec![cluster.mesh_pid("node-a")?, cluster.mesh_pid("node-b")?];
    let counters = |cluster: &Cluster| -> Result<Value> {
        let mut nodes = serde_json::Map::new();
        for node in ["node-a", "node-b"] {
            let sum =
                |metric: &str, labels: &[(&str, &str)]| cluster.metric_sum(node, metric, labels);
            nodes.insert(
                node.into(),
                json!({
                    "exported": sum("mesh_trace_spans_exported_total", &[])?,
                    "export_failed": sum("mesh_trace_spans_dropped_total", &[("reason", "export_failed")])?,
                    "queue_full": sum("mesh_trace_spans_dropped_total", &[("reason", "queue_full")])?,
                }),
            );
        }
        Ok(Value::Object(nodes))
    };
    let mut counted = serde_json::Map::new();
    let mut sampling_all = false;
    for (mode, _, sampled, delay) in TRACED {
        if sampled && !sampling_all {
            let generation = cluster.debug_state("node-a")?["generation"]
                .as_u64()
                .unwrap_or(0);
            cluster.write_config(&format!("{BENCH}{SAMPLE_ALL}"))?;
            cluster.wait_generation(generation + 1);
            sampling_all = true;
        }
        let receivers = match delay {
            Some(delay) => ["node-a", "node-b"]
                .iter()
                .map(|node| {
                    let dir = cluster.dir().join(format!("otlp-{node}-{delay}"));
                    std::fs::create_dir_all(&dir)?;
                    Receiver::start(
                        Some(&cluster.node(node).netns),
                        "127.0.0.1:4318".parse()?,
                        &dir,
                        Behaviour { status: 200, delay },
                    )
                })
                .collect::<Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        let pids: Vec<u32> = receivers.iter().map(Receiver::pid).collect();
        let receivers_cpu = cpu_s(&pids)?;
        let before = counters(&cluster)?;
        let runs = bench.runs.len();
        for (path, vip) in PATHS {
            bench.cell_loads(
                &cluster,
                path,
                mode,
                &format!("http://{vip}:80"),
                &["fixed"],
            )?;
        }
        // Two spans per sampled request (a client and a server span); each is exported or
        // dropped once its batch is sent or given up (a slow collector's after the export
        // timeout).
        let spans: u64 = bench.runs[runs..]
            .iter()
            .map(|r| 2 * u64::from(sampled) * r.result["requests"].as_u64().unwrap_or(0))
            .sum();
        let accounted = |counted: &Value| {
            ["node-a", "node-b"]
                .iter()
                .flat_map(|n| ["exported", "export_failed", "queue_full"].map(|k| (n, k)))
                .map(|(n, k)| counted[*n][k].as_u64().unwrap_or(0))
                .sum::<u64>()
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut after = counters(&cluster)?;
        while accounted(&after) - accounted(&before) < spans && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(250));
            after = counters(&cluster)?;
        }
        let mut delta = serde_json::Map::new();
        for node in ["node-a", "node-b"] {
            let d = |key: &str| {
                after[node][key].as_u64().unwrap_or(0) - before[node][key].as_u64().unwrap_or(0)
            };
            delta.insert(
                node.into(),
                json!({"exported": d("exported"), "export_failed": d("export_failed"), "queue_full": d("queue_full")}),
            );
        }
        // What the receivers, which share the CPUs, spent meanwhile (decoding the spans and
        // writing them out).
        delta.insert(
            "receivers_cpu_s".into(),
            (cpu_s(&pids)? - receivers_cpu).into(),
        );
        // Spans still queued (a slow collector's) when counting stopped.
        delta.insert(
            "queued".into(),
            (spans.saturating_sub(accounted(&after) - accounted(&before))).into(),
        );
        counted.insert(mode.into(), Value::Object(delta));
        drop(receivers);
    }
    Ok(Value::Object(counted))
}

/// The cluster with the servers started: web servers on 8080 (HTTP port) and 8081 (TCP
/// port) in both server pods.
fn topology() -> Result<(Cluster, Vec<WebServer>)> {
    let cluster = Cluster::new(BENCH)?;
    for pod in ["client", "srv-same", "srv-cross"] {
        cluster.pod(pod).netns.allow_many_connections()?;
    }
    let mut servers = Vec::new();
    for pod in ["srv-same", "srv-cross"] {
        for port in [8080, 8081] {
            servers.push(WebServer::start(&cluster.pod(pod).netns, port, pod)?);
        }
    }
    Ok((cluster, servers))
}

struct Bench<'a> {
    only: Option<String>,
    plan: &'a Plan,
    runs: Vec<Run>,
    /// PIDs of the node proxies (none for the baseline).
    proxies: Vec<u32>,
}

impl Bench<'_> {
    /// The loads of one cell.
    fn cell(&mut self, cluster: &Cluster, path: &str, mode: &str, base: &str) -> Result<()> {
        self.cell_loads(cluster, path, mode, base, &[])
    }

    /// The loads of one cell named in `wanted` (empty: all).
    fn cell_loads(
        &mut self,
        cluster: &Cluster,
        path: &str,
        mode: &str,
        base: &str,
        wanted: &[&str],
    ) -> Result<()> {
        let p = self.plan;
        let loads: [(&str, String, Vec<String>); 6] = [
            (
                "fixed",
                format!("{base}/echo"),
                args(
                    &["--rate=1000", "--connections=4", "--body=1024"],
                    p.fixed_s,
                ),
            ),
            (
                // One connection, each 1 KiB request sent when the previous one is answered:
                // the ping-pong that ztunnel's figures in the performance issue come from.
                "pingpong",
                format!("{base}/echo"),
                args(
                    &["--rate=0", "--connections=1", "--body=1024"],
                    p.pingpong_s,
                ),
            ),
            (
                "max",
                format!("{base}/echo"),
                args(&["--rate=0", "--connections=64", "--body=0"], p.max_s),
            ),
            (
                "bulk",
                format!("{base}/bytes"),
                args(&["--mode=bulk"], p.bulk_s),
            ),
            (
                "connect",
                format!("{base}/echo"),
                args(&["--mode=connect", "--connections=16"], p.connect_s),
            ),
            (
                // The same again right away: between the same pods, while the first burst's
                // connections are still in TIME_WAIT somewhere on the path.
                "connect2",
                format!("{base}/echo"),
                args(&["--mode=connect", "--connections=16"], p.connect_s),
            ),
        ];
        for (load, url, extra) in loads {
            let name = format!("{}/{mode}/{load}", path.split(' ').next().unwrap_or(path));
            if self
                .only
                .as_ref()
                .is_some_and(|o| !name.contains(o.as_str()))
                || !(wanted.is_empty() || wanted.contains(&load))
            {
                continue;
            }
            let run = match self.run(cluster, [path, mode, load], &url, &extra) {
                Ok(run) => run,
                Err(err) => {
                    for node in ["node-a", "node-b"] {
                        let log = if mode == ZTUNNEL {
                            std::fs::read_to_string(
                                cluster.dir().join(format!("ztunnel-{node}.log")),
                            )
                            .unwrap_or_default()
                        } else {
                            cluster.mesh_log(node)
                        };
                        let tail: Vec<&str> = log.lines().rev().take(30).collect();
                        eprintln!("--- {node}'s mesh-node log, last lines:");
                        for line in tail.iter().rev() {
                            eprintln!("{line}");
                        }
                    }
                    return Err(err);
                }
            };
            eprintln!(
                "mesh-bench: {path:<10} {mode:<8} {load:<7} {} (proxies {:.2} CPU s)",
                run.result, run.proxy_cpu_s
            );
            self.runs.push(run);
        }
        Ok(())
    }

    fn run(
        &self,
        cluster: &Cluster,
        [path, mode, load]: [&str; 3],
        url: &str,
        extra: &[String],
    ) -> Result<Run> {
        for pid in &self.proxies {
            // Resets the peak RSS (VmHWM) to the current RSS.
            std::fs::write(format!("/proc/{pid}/clear_refs"), "5")?;
        }
        let cpu_before = self.cpu()?;
        let argv: Vec<&str> = [url]
            .into_iter()
            .chain(extra.iter().map(String::as_str))
            .collect();
        let result = mesh_load_in(cluster.pod("client").netns.name(), &argv)
            .with_context(|| format!("{path} {mode} {load}"))?;
        let proxy_cpu_s = self.cpu()? - cpu_before;
        let mut proxy_peak_rss_kib = 0;
        for pid in &self.proxies {
            proxy_peak_rss_kib = proxy_peak_rss_kib.max(proc_status_kib(*pid, "VmHWM:")?);
        }
        let failed =
            result["errors"].as_u64().unwrap_or(0) + result["non_2xx"].as_u64().unwrap_or(0);
        if failed > 0 {
            bail!("{path} {mode} {load}: {failed} requests failed: {result}");
        }
        Ok(Run {
            path: path.into(),
            mode: mode.into(),
            load: load.into(),
            result,
            proxy_cpu_s,
            proxy_peak_rss_kib,
        })
    }

    /// CPU seconds (user + system) the proxies used so far.
    fn cpu(&self) -> Result<f64> {
        cpu_s(&self.proxies)
    }
}

/// CPU seconds (user + system) processes `pids` used so far.
fn cpu_s(pids: &[u32]) -> Result<f64> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut total = 0.0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        // Fields 14 and 15 of stat(5) (utime, stime); `fields` starts at field 3.
        let field = |i: usize| -> Result<f64> {
            Ok(fields
                .get(i - 3)
                .context("short /proc stat")?
                .parse::<f64>()?)
        };
        total += (field(14)? + field(15)?) / ticks;
    }
    Ok(total)
}

fn args(extra: &[&str], seconds: u64) -> Vec<String> {
    extra
        .iter()
        .map(|s| s.to_string())
        .chain([format!("--seconds={seconds}")])
        .collect()
}

/// RSS of each proxy (node-a's, node-b's), and its parts: private memory (anonymous) and
/// mapped files (the binary and its libraries).
fn idle_rss(proxies: &[u32]) -> Result<Value> {
    let mut idle = serde_json::Map::new();
    for (node, pid) in ["node-a", "node-b"].into_iter().zip(proxies) {
        let mut parts = serde_json::Map::new();
        for key in ["VmRSS", "RssAnon", "RssFile"] {
            parts.insert(
                key.into(),
                proc_status_kib(*pid, &format!("{key}:"))?.into(),
            );
        }
        idle.insert(node.into(), parts.into());
    }
    Ok(idle.into())
}

/// Holds `count` idle connections from the client to the cross-node server's TCP port
/// through the proxies (HBONE), and reports what the two proxies hold per connection.
fn hold_idle(
    cluster: &Cluster,
    load: &Path,
    server: &WebServer,
    count: usize,
    proxies: &[u32],
) -> Result<Value> {
    let open_before = server.seen.open.load(std::sync::atomic::Ordering::Acquire);
    let rss = |i: usize| proc_status_kib(proxies[i], "VmRSS:");
    let before = [rss(0)?, rss(1)?];
    let client = cluster.pod("client").netns.name();
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", client])
        .arg(load)
        .args([
            "http://100.66.0.41:81/",
            "--mode=hold",
            &format!("--connections={count}"),
            "--seconds=60",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let measured = (|| {
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().context("stdout")?),
            &mut line,
        )?;
        let held: Value = serde_json::from_str(line.trim())
            .with_context(|| format!("mesh-load --mode=hold printed {line:?}"))?;
        // Every connection reached the server through both proxies.
        let opened = Instant::now();
        let deadline = opened + Duration::from_secs(120);
        while server.seen.open.load(std::sync::atomic::Ordering::Acquire) < open_before + count {
            if Instant::now() > deadline {
                bail!(
                    "only {} of {count} held connections reached the server",
                    server
                        .seen
                        .open
                        .load(std::sync::atomic::Ordering::Acquire)
                        .saturating_sub(open_before)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "mesh-bench: {count} held connections reached the server in {:.1} s",
            opened.elapsed().as_secs_f64()
        );
        std::thread::sleep(Duration::from_secs(1));
        let after = [rss(0)?, rss(1)?];
        let per = |i: usize| (after[i].saturating_sub(before[i])) as f64 * 1024.0 / count as f64;
        Ok(json!({
            "count": held["held"],
            "rss_kib_before": {"node-a": before[0], "node-b": before[1]},
            "rss_kib_after": {"node-a": after[0], "node-b": after[1]},
            "bytes_per_connection": {"node-a": per(0), "node-b": per(1)},
        }))
    })();
    // The child is ours: end it by its PID.
    let _ = child.kill();
    let _ = child.wait();
    measured
}

/// What the machine is.
fn machine() -> Result<Value> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo")?;
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let commit = sh("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_default();
    Ok(json!({
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "memory_gib": (mem_kib as f64 / 1048576.0).round(),
        "kernel": sh("uname", &["-r"])?.trim(),
        "commit": commit.trim(),
        "date": sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"])?.trim(),
    }))
}

/// The Markdown table: every cell with its ratio to the baseline of the same path.
fn table(report: &Value) -> String {
    let runs: Vec<&Value> = report["runs"].as_array().into_iter().flatten().collect();
    let find = |path: &str, mode: &str, load: &str| {
        runs.iter()
            .find(|r| r["path"] == path && r["mode"] == mode && r["load"] == load)
            .copied()
    };
    let m = &report["machine"];
    let mut out = format!(
        "Run {} on {} ({} CPUs, {} GiB, kernel {}), commit {}{}.\n\n",
        m["date"].as_str().unwrap_or(""),
        m["cpu"].as_str().unwrap_or(""),
        m["cpus"],
        m["memory_gib"],
        m["kernel"].as_str().unwrap_or(""),
        m["commit"].as_str().unwrap_or(""),
        if report["quick"] == true {
            " (quick)"
        } else {
            ""
        },
    );
    out.push_str(
        "| path | mode | latency p50 / p90 / p99 / p99.9 µs at 1,000 req/s | added p50 / p99 µs | 1 KiB ping-pong p50 / p99 µs (added) | max req/s (64 conns) | bulk Gbit/s (1 conn) | new conns/s, first / second burst | proxy CPU s per 1,000 req | proxy peak RSS MiB |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    for (path, _) in PATHS {
        let base = |load: &str| find(path, "baseline", load);
        for mode in ["baseline", ZTUNNEL, "L4", "L4 bypass", "L7", "L7 bypass"] {
            let (Some(fixed), Some(pingpong), Some(max), Some(bulk), Some(connect), Some(connect2)) = (
                find(path, mode, "fixed"),
                find(path, mode, "pingpong"),
                find(path, mode, "max"),
                find(path, mode, "bulk"),
                find(path, mode, "connect"),
                find(path, mode, "connect2"),
            ) else {
                continue;
            };
            let lat = |r: &Value, i: usize| r["result"]["latency_us"][i].as_f64().unwrap_or(0.0);
            let ratio = |v: f64, b: Option<f64>| match (mode, b) {
                ("baseline", _) | (_, None) => String::new(),
                (_, Some(b)) if b > 0.0 => format!(" ({:.2}x)", v / b),
                _ => String::new(),
            };
            let added = |run: &Value, load: &str| match base(load) {
                Some(b) if mode != "baseline" => Some(format!(
                    "{:+.0} / {:+.0}",
                    lat(run, 0) - lat(b, 0),
                    lat(run, 2) - lat(b, 2)
                )),
                _ => None,
            };
            let pingpong = format!(
                "{:.0} / {:.0}{}",
                lat(pingpong, 0),
                lat(pingpong, 2),
                added(pingpong, "pingpong").map_or(String::new(), |a| format!(" ({a})"))
            );
            let added = added(fixed, "fixed").unwrap_or_else(|| "-".into());
            let max_rate = max["result"]["rate"].as_f64().unwrap_or(0.0);
            let gbit = bulk["result"]["per_second"].as_f64().unwrap_or(0.0) * 8.0 / 1e9;
            let conns = connect["result"]["per_second"].as_f64().unwrap_or(0.0);
            let conns2 = connect2["result"]["per_second"].as_f64().unwrap_or(0.0);
            let requests = fixed["result"]["requests"].as_f64().unwrap_or(0.0).max(1.0);
            let (cpu, rss) = if mode == "baseline" {
                ("-".to_string(), "-".to_string())
            } else {
                (
                    format!(
                        "{:.3}",
                        fixed["proxy_cpu_s"].as_f64().unwrap_or(0.0) * 1000.0 / requests
                    ),
                    format!(
                        "{:.1}",
                        runs.iter()
                            .filter(|r| r["path"] == path && r["mode"] == mode)
                            .filter_map(|r| r["proxy_peak_rss_kib"].as_f64())
                            .fold(0.0, f64::max)
                            / 1024.0
                    ),
                )
            };
            out.push_str(&format!(
                "| {path} | {mode} | {:.0} / {:.0} / {:.0} / {:.0} | {added} | {pingpong} | {:.0}{} | {:.2}{} | {:.0}{} / {:.0}{} | {cpu} | {rss} |\n",
                lat(fixed, 0),
                lat(fixed, 1),
                lat(fixed, 2),
                lat(fixed, 3),
                max_rate,
                ratio(max_rate, base("max").and_then(|b| b["result"]["rate"].as_f64())),
                gbit,
                ratio(gbit, base("bulk").and_then(|b| b["result"]["per_second"].as_f64().map(|v| v * 8.0 / 1e9))),
                conns,
                ratio(conns, base("connect").and_then(|b| b["result"]["per_second"].as_f64())),
                conns2,
                ratio(conns2, base("connect2").and_then(|b| b["result"]["per_second"].as_f64())),
            ));
        }
    }
    out.push_str(&tracing_table(report, &find));
    out.push_str(&versus(report, &runs));
    let bypass = &report["bypass"];
    out.push_str(&format!(
        "\nSame-node socket bypass (on in the \"bypass\" rows, which ran in a cluster of their own; off, the default, in the others): {} messages moved socket to socket on node-a, {} on node-b; senders left on TCP (no peer socket): {} / {}.\n",
        bypass["node-a"]["redirected"],
        bypass["node-b"]["redirected"],
        bypass["node-a"]["no_peer"],
        bypass["node-b"]["no_peer"],
    ));
    let held = &report["idle_connections"];
    for node in ["node-a", "node-b"] {
        let idle = &report["idle_kib"][node];
        let mib = |key: &str| idle[key].as_f64().unwrap_or(0.0) / 1024.0;
        out.push_str(&format!(
            "\nProxy idle on {node} (started and configured, nothing proxied yet): RSS {:.1} MiB = {:.1} MiB private (anonymous) + {:.1} MiB of mapped files (the binary and its libraries).",
            mib("VmRSS"),
            mib("RssAnon"),
            mib("RssFile"),
        ));
    }
    out.push('\n');
    out.push_str(&format!(
        "{} idle connections held across nodes (L4, HBONE): node-a {:.1} -> {:.1} MiB ({:.0} bytes each), node-b {:.1} -> {:.1} MiB ({:.0} bytes each).\n",
        held["count"],
        held["rss_kib_before"]["node-a"].as_f64().unwrap_or(0.0) / 1024.0,
        held["rss_kib_after"]["node-a"].as_f64().unwrap_or(0.0) / 1024.0,
        held["bytes_per_connection"]["node-a"].as_f64().unwrap_or(0.0),
        held["rss_kib_before"]["node-b"].as_f64().unwrap_or(0.0) / 1024.0,
        held["rss_kib_after"]["node-b"].as_f64().unwrap_or(0.0) / 1024.0,
        held["bytes_per_connection"]["node-b"].as_f64().unwrap_or(0.0),
    ));
    out
}

/// Latency at 1,000 req/s through L7 with tracing on, against the L7 rows (no tracing) of
/// the same run and against the same proxies with no request sampled, and what the
/// exporters did with the spans.
fn tracing_table<'r>(
    report: &Value,
    find: &impl Fn(&str, &str, &str) -> Option<&'r Value>,
) -> String {
    let lat = |r: &Value, i: usize| r["result"]["latency_us"][i].as_f64().unwrap_or(0.0);
    let ratios = |of: &Value, to: Option<&Value>| {
        to.map_or("-".to_string(), |to| {
            format!(
                "{:.2}x / {:.2}x",
                lat(of, 0) / lat(to, 0).max(1.0),
                lat(of, 2) / lat(to, 2).max(1.0)
            )
        })
    };
    let mut out = String::from(
        "\nTracing (spans exported over OTLP to a receiver on each node), latency at 1,000 req/s against the L7 rows above (no tracing) and against the same proxies with no request sampled (measured just before the sampled rows); span counts and the receivers' CPU (they share the two CPUs with the load) are per collector state, both paths and nodes together:\n\n| path | sampled, collector | p50 / p99 µs | p50 / p99 vs L7 | vs none sampled | failed requests | spans exported / dropped (export failed, queue full) / still queued 20 s after the load | receivers' CPU s |\n|---|---|---|---|---|---|---|---|\n",
    );
    let mut any = false;
    for (path, _) in PATHS {
        let none_sampled = find(path, TRACED[0].0, "fixed");
        for (mode, collector, sampled, _) in TRACED {
            let Some(traced) = find(path, mode, "fixed") else {
                continue;
            };
            any = true;
            let spans = &report["tracing"][mode];
            let total = |key: &str| {
                ["node-a", "node-b"]
                    .iter()
                    .map(|n| spans[n][key].as_u64().unwrap_or(0))
                    .sum::<u64>()
            };
            let failed = traced["result"]["errors"].as_u64().unwrap_or(0)
                + traced["result"]["non_2xx"].as_u64().unwrap_or(0);
            out.push_str(&format!(
                "| {path} | {} | {:.0} / {:.0} | {} | {} | {failed} | {} / {} ({}, {}) / {} | {:.1} |\n",
                if sampled {
                    format!("all, {collector}")
                } else {
                    collector.to_string()
                },
                lat(traced, 0),
                lat(traced, 2),
                ratios(traced, find(path, "L7", "fixed")),
                if sampled {
                    ratios(traced, none_sampled)
                } else {
                    "-".to_string()
                },
                total("exported"),
                total("export_failed") + total("queue_full"),
                total("export_failed"),
                total("queue_full"),
                spans["queued"],
                spans["receivers_cpu_s"].as_f64().unwrap_or(0.0),
            ));
        }
    }
    if any {
        out
    } else {
        String::new()
    }
}

/// The mesh's L4 cells against the peer's, from the same run: each figure of both and the
/// ratio mesh / peer (below 1 is better for times, CPU and memory, above 1 for rates).
fn versus(report: &Value, runs: &[&Value]) -> String {
    let peer = &report["peer"];
    let Some(name) = peer["name"].as_str() else {
        return String::new();
    };
    let result = |path: &str, mode: &str, load: &str, key: &str, i: Option<usize>| {
        let run = runs
            .iter()
            .find(|r| r["path"] == path && r["mode"] == mode && r["load"] == load)?;
        let value = &run["result"][key];
        match i {
            Some(i) => value[i].as_f64(),
            None => value.as_f64(),
        }
    };
    let cpu = |path: &str, mode: &str, load: &str| {
        runs.iter()
            .find(|r| r["path"] == path && r["mode"] == mode && r["load"] == load)
            .and_then(|r| r["proxy_cpu_s"].as_f64())
    };
    let mut out = format!(
        "\nThis mesh (L4 rows) against {name} (TLS provider {}), same run, same loads; ratio = mesh / {name}:\n\n| path | measure | {name} | this mesh | ratio |\n|---|---|---|---|---|\n",
        peer["tls"].as_str().unwrap_or("unknown")
    );
    type Measure<'a> = (&'a str, Box<dyn Fn(&str, &str) -> Option<f64> + 'a>, usize);
    let measures: Vec<Measure> = vec![
        (
            "p50 at 1,000 req/s, µs",
            Box::new(|p, m| result(p, m, "fixed", "latency_us", Some(0))),
            0,
        ),
        (
            "p99 at 1,000 req/s, µs",
            Box::new(|p, m| result(p, m, "fixed", "latency_us", Some(2))),
            0,
        ),
        (
            "1 KiB ping-pong p50, µs",
            Box::new(|p, m| result(p, m, "pingpong", "latency_us", Some(0))),
            0,
        ),
        (
            "1 KiB ping-pong p99, µs",
            Box::new(|p, m| result(p, m, "pingpong", "latency_us", Some(2))),
            0,
        ),
        (
            "max req/s (64 conns)",
            Box::new(|p, m| result(p, m, "max", "rate", None)),
            0,
        ),
        (
            "bulk Gbit/s (1 conn)",
            Box::new(|p, m| Some(result(p, m, "bulk", "per_second", None)? * 8.0 / 1e9)),
            2,
        ),
        (
            "new conns/s, first burst",
            Box::new(|p, m| result(p, m, "connect", "per_second", None)),
            0,
        ),
        (
            "new conns/s, second burst",
            Box::new(|p, m| result(p, m, "connect2", "per_second", None)),
            0,
        ),
        (
            "proxy CPU s per 1,000 req at 1,000 req/s",
            Box::new(|p, m| {
                Some(
                    cpu(p, m, "fixed")? * 1000.0
                        / result(p, m, "fixed", "requests", None)?.max(1.0),
                )
            }),
            3,
        ),
        (
            "proxy CPU s per GiB bulk",
            Box::new(|p, m| {
                Some(
                    cpu(p, m, "bulk")?
                        / (result(p, m, "bulk", "count", None)? / 1073741824.0).max(1e-9),
                )
            }),
            2,
        ),
    ];
    for (path, _) in PATHS {
        for (label, measure, decimals) in &measures {
            let (Some(peer), Some(mesh)) = (measure(path, name), measure(path, "L4")) else {
                continue;
            };
            let ratio = if peer > 0.0 {
                format!("{:.2}x", mesh / peer)
            } else {
                "-".into()
            };
            out.push_str(&format!(
                "| {path} | {label} | {peer:.decimals$} | {mesh:.decimals$} | {ratio} |\n"
            ));
        }
    }
    let mib = |v: &Value| v.as_f64().unwrap_or(0.0) / 1024.0;
    for node in ["node-a", "node-b"] {
        for (label, key) in [
            ("idle RSS, MiB", "idle_kib"),
            ("RSS after the L4 loads, MiB", "after_loads_kib"),
        ] {
            let (p, m) = (
                mib(&peer[key][node]["VmRSS"]),
                mib(&report[key][node]["VmRSS"]),
            );
            out.push_str(&format!(
                "| {node} | {label} | {p:.1} | {m:.1} | {:.2}x |\n",
                if p > 0.0 { m / p } else { 0.0 }
            ));
        }
        let per = |r: &Value| {
            r["idle_connections"]["bytes_per_connection"][node]
                .as_f64()
                .unwrap_or(0.0)
        };
        let (p, m) = (per(peer), per(report));
        out.push_str(&format!(
            "| {node} | bytes per idle connection | {p:.0} | {m:.0} | {:.2}x |\n",
            if p > 0.0 { m / p } else { 0.0 }
        ));
    }
    out
}

/// Replaces the part of `doc` between the markers with `table`.
fn write_doc(doc: &Path, table: &str) -> Result<()> {
    const BEGIN: &str = "<!-- bench:begin -->";
    const END: &str = "<!-- bench:end -->";
    let text = std::fs::read_to_string(doc).with_context(|| format!("{}", doc.display()))?;
    let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END)) else {
        bail!("{} has no {BEGIN} ... {END} section", doc.display());
    };
    if e < b {
        bail!("{}: {END} comes before {BEGIN}", doc.display());
    }
    let new = format!("{}{BEGIN}\n{table}{}", &text[..b], &text[e..]);
    std::fs::write(doc, new)?;
    Ok(())
}
