//! `mesh-load`: the benchmarks' fixed-rate HTTP/1.1 load generator (see `mesh_tests::load`).
//! Prints one JSON report. Run it inside a pod namespace (`ip netns exec`).

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Parser;
use mesh_tests::load::{run, Plan};

#[derive(Parser)]
#[command(about = "Fixed-rate HTTP/1.1 load without coordinated omission; prints JSON")]
struct Args {
    /// `http://host:port/path`.
    url: String,
    /// Requests per second, all connections together.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Keep-alive connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Seconds to send (at most 300).
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
    let headers = args
        .headers
        .iter()
        .map(|h| match h.split_once(':') {
            Some((k, v)) => Ok((k.trim().to_string(), v.trim().to_string())),
            None => bail!("header {h:?} is not `name: value`"),
        })
        .collect::<Result<Vec<_>>>()?;
    let plan = Plan {
        url: args.url,
        rate: args.rate,
        connections: args.connections,
        duration: Duration::from_secs(args.seconds),
        body: args.body,
        headers,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let report = runtime.block_on(run(&plan))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
