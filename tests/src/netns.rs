//! Network namespaces and commands inside them.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Command, Output},
    thread::JoinHandle,
};

use anyhow::{bail, Context, Result};

/// Runs a command, failing with its stderr when it fails.
pub fn sh(program: &str, args: &[&str]) -> Result<String> {
    let out: Output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `name` with its loopback up. IPv6 stays on, as in real pods and nodes: every
    /// interface gets a link-local address (the tests' own traffic is IPv4 in
    /// 100.64.0.0/10), so what the mesh does with IPv6 is tested as it would meet it.
    pub fn create(name: &str) -> Result<Netns> {
        sh("ip", &["netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Readies the namespace for many short connections: a wide ephemeral port range and
    /// reuse of TIME_WAIT ports for new outgoing connections.
    pub fn allow_many_connections(&self) -> Result<()> {
        self.exec(
            "sysctl",
            &[
                "-qw",
                "net.ipv4.ip_local_port_range=1024 65000",
                "net.ipv4.tcp_tw_reuse=1",
            ],
        )
        .map(drop)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS...`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let full: Vec<&str> = ["-n", self.name.as_str()]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        sh("ip", &full)
    }

    /// Runs any program inside the namespace (`ip netns exec`).
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let full: Vec<&str> = ["netns", "exec", self.name.as_str(), program]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        sh("ip", &full)
    }

    /// Moves the calling thread into this namespace (only this thread).
    pub fn enter(&self) -> Result<()> {
        let file = File::open(format!("/run/netns/{}", self.name))
            .with_context(|| format!("netns {} is gone", self.name))?;
        // SAFETY: setns on a valid namespace fd affects only the calling thread's netns.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {}: {}", self.name, std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Runs `f` on a new thread inside this namespace. Sockets made there stay in it.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> JoinHandle<Result<T>> {
        let name = self.name.clone();
        std::thread::spawn(move || {
            Netns { name: name.clone() }.enter_and_forget()?;
            f()
        })
    }

    /// Runs `f` inside this namespace and waits for it.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.spawn(f)
            .join()
            .map_err(|_| anyhow::anyhow!("thread in netns {} panicked", self.name))?
    }

    /// `GET path` (HTTP/1.0, so no chunked bodies) to `127.0.0.1:port` inside this
    /// namespace; returns the status and the body.
    pub fn http_get(&self, port: u16, path: &str) -> Result<(u16, String)> {
        use std::io::{Read, Write};
        let path = path.to_string();
        self.run(move || {
            let mut stream = std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                std::time::Duration::from_secs(2),
            )?;
            stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
            write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            let (head, body) = response
                .split_once("\r\n\r\n")
                .ok_or_else(|| anyhow::anyhow!("malformed response"))?;
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("no status in {head:?}"))?;
            Ok((status, body.to_string()))
        })
    }

    fn enter_and_forget(self) -> Result<()> {
        let result = self.enter();
        std::mem::forget(self);
        result
    }
}

/// Creates a veth pair with one end (`a_name`) in `a` and the other (`b_name`) in `b`.
pub fn veth_pair(a: &Netns, a_name: &str, b: &Netns, b_name: &str) -> Result<()> {
    let args = [
        "link",
        "add",
        a_name,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
    ];
    let peer = [b_name, "netns", b.name()];
    sh("ip", &[&args[..], &peer[..]].concat()).map(drop)
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh("ip", &["netns", "del", &self.name]);
    }
}
