//! `mesh-load`: the benchmarks' HTTP/1.1 load generator (see `mesh_tests::load`). Prints one
//! JSON report. Run it inside a pod namespace (`ip netns exec`).

use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Parser, ValueEnum};
use mesh_tests::load::{bulk, connects, hold, run, Plan};

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// `--rate` requests per second over `--connections` keep-alive connections, latency
    /// from the intended send time (rate 0: each connection as fast as answers come).
    Rate,
    /// One connection downloading the URL's endless body (the harness server's `/bytes`).
    Bulk,
    /// A new connection per request, `--connections` at a time.
    Connect,
    /// Opens `--connections` idle TCP connections to the URL's address, prints
    /// `{"held": N}` and keeps them for `--seconds`.
    Hold,
}

#[derive(Parser)]
#[command(about = "HTTP/1.1 load for the benchmarks, bounded in time; prints JSON")]
struct Args {
    /// `http://host:port/path`.
    url: String,
    /// What to measure.
    #[arg(long, value_enum, default_value = "rate")]
    mode: Mode,
    /// Requests per second, all connections together (0: as fast as possible).
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Connections (keep-alive ones for `rate`, concurrent ones for `connect`, held ones for
    /// `hold`).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Seconds to run (at most 300).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Request body bytes (POST when > 0).
    #[arg(long, default_value_t = 1024)]
    body: usize,
    /// Extra header, `name: value` (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.seconds == 0 || args.seconds > 300 {
        bail!("--seconds must be between 1 and 300");
    }
    if args.connections == 0 || args.connections > 60_000 {
        bail!("--connections must be between 1 and 60000");
    }
    if matches!(args.mode, Mode::Rate) && (args.connections > 1024 || args.rate > 1_000_000) {
        // A thread per connection; a schedule step of at least a microsecond.
        bail!("the rate mode takes at most 1024 connections and 1000000 requests/s");
    }
    mesh_node::sys::raise_nofile_limit()?;
    let headers = args
        .headers
        .iter()
        .map(|h| match h.split_once(':') {
            Some((k, v)) => Ok((k.trim().to_string(), v.trim().to_string())),
            None => bail!("header {h:?} is not `name: value`"),
        })
        .collect::<Result<Vec<_>>>()?;
    let duration = Duration::from_secs(args.seconds);
    // The fixed-rate mode runs its own threads (one runtime per connection); the others share
    // a one-worker runtime.
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
    };
    let report = match args.mode {
        Mode::Rate => serde_json::to_value(run(&Plan {
            url: args.url,
            rate: args.rate,
            connections: args.connections,
            duration,
            body: args.body,
            headers,
        })?)?,
        Mode::Bulk => serde_json::to_value(runtime()?.block_on(bulk(&args.url, duration))?)?,
        Mode::Connect => serde_json::to_value(runtime()?.block_on(connects(
            &args.url,
            args.connections,
            duration,
        ))?)?,
        Mode::Hold => {
            let addr = args
                .url
                .trim_start_matches("http://")
                .split('/')
                .next()
                .unwrap_or_default()
                .to_string();
            return runtime()?.block_on(async {
                let held = hold(&addr, args.connections).await?;
                println!("{}", serde_json::json!({"held": held.len()}));
                tokio::time::sleep(duration).await;
                Ok(())
            });
        }
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
