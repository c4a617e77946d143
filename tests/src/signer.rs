//! The cluster's signer (`mesh-node ca serve`), run as a K3s server node would host it: in the
//! first node's network namespace, in a mount namespace of its own where the CA files live on
//! a tmpfs that no other process can see.
//!
//! A holder process keeps that mount namespace (and the tmpfs) alive, so the signer can be
//! stopped and started again with the same CA, and a second CA can be made beside the first
//! for a root rotation. Nodes get a token each (file mode) and a trust bundle file each, so a
//! test can move one node's bundle ahead of another's.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use mesh_node::identity::Ca;

use crate::{cluster::terminate, netns::Netns};

/// The signer's TLS port.
pub const PORT: u16 = 15012;
/// The name of the CA the signer starts with.
const FIRST_CA: &str = "ca-1";
/// Its admin port (loopback of the first node).
pub const ADMIN_PORT: u16 = 15014;

/// The signer and the namespace holding its key.
pub struct Signer {
    holder: Child,
    process: Mutex<Option<Child>>,
    /// The tmpfs mount point (empty outside the holder's mount namespace).
    vault: PathBuf,
    /// Where it listens.
    pub address: SocketAddr,
    log: PathBuf,
    dir: PathBuf,
    /// Extra arguments of `ca serve` (e.g. `--kube --kubeconfig F`).
    pub args: Vec<String>,
}

impl Signer {
    /// Makes the vault in `netns` (the first node's) and a first CA in it (`intermediate`: a
    /// root and an intermediate), whose root is the bundle at [`Signer::bundle_path`].
    pub fn create(
        dir: &Path,
        netns: &Netns,
        listen: SocketAddr,
        intermediate: bool,
    ) -> Result<Signer> {
        let vault = dir.join("ca-vault");
        std::fs::create_dir_all(&vault)?;
        let holder = Command::new("ip")
            .args(["netns", "exec", netns.name()])
            .args(["unshare", "--mount", "--propagation", "private", "sh", "-c"])
            .arg("mount -t tmpfs -o mode=0700,size=4m mesh-ca \"$0\" && exec sleep 86400")
            .arg(&vault)
            .stdin(Stdio::null())
            .spawn()?;
        let signer = Signer {
            holder,
            process: Mutex::new(None),
            vault,
            address: listen,
            log: dir.join("signer.log"),
            dir: dir.to_path_buf(),
            args: Vec::new(),
        };
        crate::wait_until("the signer's vault", || {
            std::fs::read_to_string(format!("/proc/{}/comm", signer.holder.id()))
                .is_ok_and(|c| c.trim() == "sleep")
        });
        signer.init(FIRST_CA, intermediate)?;
        Ok(signer)
    }

    /// Runs `mesh-node ARGS` inside the vault's namespaces; its output goes to the log.
    fn command(&self, args: &[&str]) -> Result<Command> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new("nsenter");
        cmd.args([
            "--target",
            &self.holder.id().to_string(),
            "--mount",
            "--net",
            "--",
        ])
        .arg(crate::cluster::mesh_node_bin()?)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        Ok(cmd)
    }

    /// Makes a new CA `name` in the vault; its root is written to [`Signer::bundle_path`].
    pub fn init(&self, name: &str, intermediate: bool) -> Result<()> {
        let out = self.vault.join(name);
        let bundle = self.bundle_path(name);
        let mut args = vec!["ca", "init", "--out", path(&out), "--bundle", path(&bundle)];
        if intermediate {
            args.push("--intermediate");
        }
        let status = self.command(&args)?.status()?;
        if !status.success() {
            bail!("mesh-node ca init failed:\n{}", self.log());
        }
        Ok(())
    }

    /// The root (PEM) of CA `name`.
    pub fn bundle_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("bundle-{name}.pem"))
    }

    /// Starts `ca serve` with the current CA, reading pods from `config` and authenticating
    /// nodes by `tokens`; waits until it serves.
    pub fn start(&self, config: &Path, tokens: &Path) -> Result<()> {
        let mut process = self.process.lock().unwrap();
        if process.is_some() {
            return Ok(());
        }
        let before = self.log().matches("signer serving").count();
        let ca_dir = self.vault.join(self.current());
        let listen = self.address.to_string();
        let admin = format!("127.0.0.1:{ADMIN_PORT}");
        let mut args = vec![
            "ca",
            "serve",
            "--ca-dir",
            path(&ca_dir),
            "--listen",
            &listen,
            "--admin-addr",
            &admin,
        ];
        let kube = self.args.iter().any(|a| a == "--kube");
        if !kube {
            args.extend(["--config", path(config)]);
        }
        if !self.args.iter().any(|a| a == "--no-node-tokens") {
            args.extend(["--node-tokens", path(tokens)]);
        }
        args.extend(
            self.args
                .iter()
                .filter(|a| *a != "--no-node-tokens")
                .map(String::as_str),
        );
        let mut child = self.command(&args)?.spawn()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.log().matches("signer serving").count() == before {
            if let Some(status) = child.try_wait()? {
                bail!("the signer exited with {status}:\n{}", self.log());
            }
            if Instant::now() > deadline {
                terminate(&mut child);
                bail!("the signer did not serve within 20 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        *process = Some(child);
        Ok(())
    }

    /// Stops `ca serve` (the vault stays).
    pub fn stop(&self) {
        if let Some(mut child) = self.process.lock().unwrap().take() {
            terminate(&mut child);
        }
    }

    /// The CA in use: the first one made, whose files [`Signer::replace_with`] replaces.
    pub fn current(&self) -> &'static str {
        FIRST_CA
    }

    /// Replaces the files of the CA in use with CA `name`'s, as an update of a mounted
    /// Secret does (each file renamed into place); the running signer picks them up.
    pub fn replace_with(&self, name: &str) -> Result<()> {
        let (from, to) = (self.inside(name), self.inside(self.current()));
        for entry in std::fs::read_dir(&from)? {
            let entry = entry?;
            let target = to.join(entry.file_name());
            let tmp = target.with_extension("new");
            std::fs::copy(entry.path(), &tmp)?;
            std::fs::rename(&tmp, &target)?;
        }
        Ok(())
    }

    /// The signer's PID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.lock().unwrap().as_ref().map(Child::id)
    }

    /// What the signer printed.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// CA `name` as the signer reads it (through the holder's view of the vault: the test
    /// plays an attacker who has that CA, or checks what the signer holds).
    pub fn ca(&self, name: &str) -> Result<Ca> {
        Ok(Ca::load(&self.inside(name))?)
    }

    /// The key of CA `name` (PEM), read through the holder's view of the vault.
    pub fn key_pem(&self, name: &str) -> Result<String> {
        let path = self.inside(name).join("ca-key.pem");
        std::fs::read_to_string(&path).with_context(|| path.display().to_string())
    }

    /// The vault directory of CA `name` as seen from inside the holder's mount namespace.
    fn inside(&self, name: &str) -> PathBuf {
        let relative = self.vault.join(name);
        let relative = relative.strip_prefix("/").unwrap_or(&relative);
        PathBuf::from(format!("/proc/{}/root", self.holder.id())).join(relative)
    }

    /// The vault's mount point as seen from here (outside: an empty directory).
    pub fn vault(&self) -> &Path {
        &self.vault
    }
}

impl Drop for Signer {
    fn drop(&mut self) {
        self.stop();
        terminate(&mut self.holder);
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// Every readable mapping of process `pid` and its state directory `dir`, searched for each
/// of `needles`: `(needle index, where)` of every find.
pub fn scan_for(pid: u32, dir: Option<&Path>, needles: &[Vec<u8>]) -> Result<Vec<(usize, String)>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut found = Vec::new();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem"))?;
    let mut scanned = 0usize;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let name = fields.nth(3).unwrap_or("");
        if !perms.starts_with('r')
            || name == "[vvar]"
            || name == "[vsyscall]"
            || name == "[vvar_vclock]"
        {
            continue;
        }
        let (start, end) = range
            .split_once('-')
            .ok_or_else(|| anyhow!("maps: {line}"))?;
        let (start, end) = (
            u64::from_str_radix(start, 16)?,
            u64::from_str_radix(end, 16)?,
        );
        let mut bytes = vec![0u8; (end - start) as usize];
        if mem.seek(SeekFrom::Start(start)).is_err() || mem.read_exact(&mut bytes).is_err() {
            continue;
        }
        scanned += bytes.len();
        for (i, needle) in needles.iter().enumerate() {
            if memchr::memmem::find(&bytes, needle).is_some() {
                found.push((i, format!("memory {range} {name}")));
            }
        }
    }
    if scanned == 0 {
        bail!("nothing of process {pid}'s memory could be read");
    }
    if let Some(dir) = dir {
        for file in walk(dir)? {
            let Ok(bytes) = std::fs::read(&file) else {
                continue;
            };
            for (i, needle) in needles.iter().enumerate() {
                if memchr::memmem::find(&bytes, needle).is_some() {
                    found.push((i, file.display().to_string()));
                }
            }
        }
    }
    Ok(found)
}

fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            files.extend(walk(&entry.path())?);
        } else if kind.is_file() {
            files.push(entry.path());
        }
    }
    Ok(files)
}

/// What betrays a P-256 key in PKCS#8 PEM: the PEM text's base64 body, the private scalar as
/// stored in the DER (big-endian) and as ring keeps it in memory (little-endian limbs).
pub fn key_needles(key_pem: &str) -> Result<Vec<Vec<u8>>> {
    use rustls::pki_types::{pem::PemObject, PrivatePkcs8KeyDer};
    let der = PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| anyhow!("not a PKCS#8 key: {e}"))?;
    let der = der.secret_pkcs8_der();
    // ECPrivateKey: version 1 (02 01 01), then the scalar as an OCTET STRING of 32 (04 20).
    let at = memchr::memmem::find(der, &[0x02, 0x01, 0x01, 0x04, 0x20])
        .ok_or_else(|| anyhow!("no P-256 scalar in the key"))?;
    let scalar = der[at + 5..at + 37].to_vec();
    let mut reversed = scalar.clone();
    reversed.reverse();
    let body: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    Ok(vec![scalar, reversed, body.as_bytes()[..48].to_vec()])
}
