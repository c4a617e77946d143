//! Real outside tools the security and telemetry tests use: tcpdump (what crosses a link),
//! openssl s_client (a TLS client that is not ours) and Prometheus (a real scraper and
//! query engine for the metrics). Each process is started by the test, in a namespace the
//! test created, and ended by its PID.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

use crate::netns::{sh, Netns};

/// Sends `signal` to a child we started, then waits up to 5 s for it (killing it after).
pub(crate) fn stop(child: &mut Child, signal: i32) {
    // SAFETY: kill on the PID of a child this process started and has not reaped.
    unsafe { libc::kill(child.id() as i32, signal) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A running tcpdump writing the packets of one interface to a pcap file.
pub struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    /// Starts `tcpdump -i IFACE` in `ns`, writing to `file`; returns once it listens.
    pub fn start(ns: &Netns, iface: &str, file: &Path) -> Result<Capture> {
        let log = file.with_extension("log");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns.name(),
                "tcpdump",
                "-Z",
                "root",
                "--immediate-mode",
                "-i",
                iface,
                "-nn",
                "-U",
                "-s",
                "0",
                "-w",
            ])
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting tcpdump")?;
        let mut capture = Capture {
            child,
            file: file.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("listening on")
        {
            if Instant::now() > deadline {
                stop(&mut capture.child, libc::SIGKILL);
                bail!("tcpdump did not start: {}", std::fs::read_to_string(&log)?);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(capture)
    }

    /// Stops tcpdump (SIGINT flushes the file) and returns the file.
    pub fn finish(mut self) -> PathBuf {
        stop(&mut self.child, libc::SIGINT);
        self.file.clone()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            stop(&mut self.child, libc::SIGINT);
        }
    }
}

/// The packets of a pcap file matching `filter`, decoded with payload as ASCII (`-A`).
pub fn pcap_text(file: &Path, filter: &str) -> Result<String> {
    let file = file.to_string_lossy();
    let mut args = vec!["-r", &*file, "-nn", "-A"];
    args.extend(filter.split_whitespace());
    sh("tcpdump", &args)
}

/// What `openssl s_client` made of a connection.
#[derive(Debug)]
pub struct TlsProbe {
    /// The handshake completed and the server's certificate verified against the CA file.
    pub established: bool,
    /// The server's certificate (PEM), when one was received.
    pub server_cert: Option<String>,
    /// Everything openssl printed.
    pub output: String,
}

/// Runs `openssl s_client` in `ns` against `addr` with the given client certificate chain
/// (PEM: the leaf, then any intermediates) and key (PEM) and CA file (PEM), plus `extra`
/// arguments (e.g. `-tls1_2`).
pub fn s_client(
    ns: &Netns,
    addr: SocketAddr,
    cert_pem: &Path,
    key_pem: &Path,
    ca_pem: &Path,
    extra: &[&str],
) -> Result<TlsProbe> {
    // openssl takes the leaf and the intermediates from separate files.
    let text = std::fs::read_to_string(cert_pem)?;
    const END: &str = "-----END CERTIFICATE-----\n";
    let (leaf, chain) = text
        .split_once(END)
        .map(|(leaf, rest)| (format!("{leaf}{END}"), rest.to_string()))
        .ok_or_else(|| anyhow::anyhow!("{}: no certificate", cert_pem.display()))?;
    let leaf_file = cert_pem.with_extension("leaf.pem");
    std::fs::write(&leaf_file, leaf)?;
    let chain_file = cert_pem.with_extension("chain.pem");
    std::fs::write(&chain_file, &chain)?;
    let mut cmd = Command::new("timeout");
    cmd.args([
        "10",
        "ip",
        "netns",
        "exec",
        ns.name(),
        "openssl",
        "s_client",
    ])
    .arg("-connect")
    .arg(addr.to_string())
    .arg("-cert")
    .arg(&leaf_file)
    .arg("-key")
    .arg(key_pem)
    .arg("-CAfile")
    .arg(ca_pem)
    .args(["-verify_return_error", "-showcerts", "-alpn", "h2"])
    .args(extra)
    .stdin(Stdio::null());
    if !chain.trim().is_empty() {
        cmd.arg("-cert_chain").arg(&chain_file);
    }
    let out = cmd.output().context("running openssl s_client")?;
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let server_cert = output
        .split_once("-----BEGIN CERTIFICATE-----")
        .and_then(|(_, rest)| rest.split_once("-----END CERTIFICATE-----"))
        .map(|(body, _)| format!("-----BEGIN CERTIFICATE-----{body}-----END CERTIFICATE-----\n"));
    let established = out.status.success()
        && output.contains("Verify return code: 0 (ok)")
        && output.contains("TLSv1.3");
    Ok(TlsProbe {
        established,
        server_cert,
        output,
    })
}

/// Port Prometheus listens on, inside the namespace it runs in.
const PROMETHEUS_PORT: u16 = 9090;

/// A Prometheus server scraping mesh-node admin endpoints every second: the one of the
/// namespace it runs in, and any others given.
pub struct Prometheus {
    child: Child,
    ns_name: String,
}

impl Prometheus {
    /// Starts Prometheus in `ns` (a node namespace) with its data under `dir`.
    pub fn start(ns: &Netns, dir: &Path) -> Result<Prometheus> {
        Self::start_scraping(ns, dir, &[])
    }

    /// Starts Prometheus in `ns`, also scraping the admin endpoints of `others` (the
    /// underlay addresses of other nodes).
    pub fn start_scraping(
        ns: &Netns,
        dir: &Path,
        others: &[std::net::Ipv4Addr],
    ) -> Result<Prometheus> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("prometheus.yml");
        let mut targets = vec!["'127.0.0.1:15020'".to_string()];
        targets.extend(others.iter().map(|ip| format!("'{ip}:15020'")));
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 scrape_configs:\n\
                 - job_name: mesh-node\n  static_configs: [{{targets: [{}]}}]\n",
                targets.join(", ")
            ),
        )?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name(), "prometheus"])
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log"))?)
            .spawn()
            .context("starting prometheus (scripts/setup installs it)")?;
        let prometheus = Prometheus {
            child,
            ns_name: ns.name().to_string(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(prometheus.get(ns, "/-/ready"), Ok((200, _))) {
            if Instant::now() > deadline {
                bail!(
                    "prometheus not ready after 30 s: {}",
                    std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(prometheus)
    }

    /// Evaluates `promql` (an instant query); returns each series' labels and value.
    pub fn query(&self, ns: &Netns, promql: &str) -> Result<Vec<(serde_json::Value, f64)>> {
        assert_eq!(
            ns.name(),
            self.ns_name,
            "query from the namespace Prometheus runs in"
        );
        let (status, body) = self.get(ns, &format!("/api/v1/query?query={}", encode(promql)))?;
        if status != 200 {
            bail!("query {promql:?} answered {status}: {body}");
        }
        let doc: serde_json::Value = serde_json::from_str(&body)?;
        let results = doc["data"]["result"]
            .as_array()
            .ok_or_else(|| anyhow!("no result in {body}"))?;
        results
            .iter()
            .map(|r| {
                let value = r["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| anyhow!("bad value in {r}"))?;
                Ok((r["metric"].clone(), value))
            })
            .collect()
    }

    /// Waits (up to 20 s) until `promql` returns exactly one series whose value is `want`;
    /// returns the last result otherwise.
    pub fn wait_value(&self, ns: &Netns, promql: &str, want: f64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.query(ns, promql)?;
            if got.len() == 1 && got[0].1 == want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{promql} = {got:?}, want {want}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn get(&self, ns: &Netns, path: &str) -> Result<(u16, String)> {
        ns.http_get(PROMETHEUS_PORT, path)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        stop(&mut self.child, libc::SIGTERM);
    }
}

/// Percent-encodes a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
