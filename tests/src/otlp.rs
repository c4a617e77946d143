//! A real OTLP/HTTP trace receiver (tests/tools/otlp_receiver.py, on the official
//! `opentelemetry-proto` package that scripts/setup installs into `.tools/venv`): what the
//! mesh exports is decoded by code it shares nothing with, one JSON line per span.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{anyhow, bail, Context, Result};

use crate::netns::Netns;

/// A running receiver.
pub struct Receiver {
    child: Child,
    out: PathBuf,
    /// Where it listens.
    pub addr: SocketAddr,
}

/// How the receiver answers exports.
#[derive(Clone, Copy, Debug)]
pub struct Behaviour {
    /// The HTTP status of every answer (spans are kept only with 200).
    pub status: u16,
    /// Seconds before each answer.
    pub delay: f64,
}

impl Behaviour {
    /// A collector that takes everything at once.
    pub const OK: Behaviour = Behaviour {
        status: 200,
        delay: 0.0,
    };
}

fn python() -> Result<PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/venv/bin/python");
    if !venv.exists() {
        bail!("{} is missing: run scripts/setup", venv.display());
    }
    Ok(venv)
}

impl Receiver {
    /// Starts a receiver on `listen` (port 0: any) in `ns` (`None`: this namespace), keeping
    /// spans in a file under `dir`.
    pub fn start(
        ns: Option<&Netns>,
        listen: SocketAddr,
        dir: &Path,
        how: Behaviour,
    ) -> Result<Receiver> {
        let out = dir.join(format!("otlp-{}.jsonl", listen.port()));
        let _ = std::fs::remove_file(&out);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/otlp_receiver.py");
        let mut cmd = match ns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns.name()]).arg(python()?);
                cmd
            }
            None => Command::new(python()?),
        };
        cmd.arg(&script)
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--out")
            .arg(&out)
            .arg("--status")
            .arg(how.status.to_string())
            .arg("--delay")
            .arg(how.delay.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().context("starting the OTLP receiver")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix("listening ") else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the OTLP receiver did not start: {line:?}");
        };
        let addr = addr.parse()?;
        Ok(Receiver { child, out, addr })
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Its process (`ip netns exec` execs the interpreter: the receiver itself).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The export URL (`http://ADDR/v1/traces`).
    pub fn url(&self) -> String {
        format!("http://{}/v1/traces", self.addr)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        crate::cluster::terminate(&mut self.child);
    }
}
