//! The command line's error paths: invalid config (exit 64, every problem named with file,
//! document and field), `validate`, and missing privileges (exit 77, each one named).

use std::{os::unix::process::CommandExt, process::Command};

use mesh_tests::{cluster::mesh_node_bin, require_root};

const BAD: &str = r#"apiVersion: v1
kind: Pod
metadata: {name: a}
status: {podIP: 300.1.1.1}
---
apiVersion: v1
kind: Service
metadata: {name: s, namespace: x}
spec: {clusterIP: 100.66.0.1, ports: [{port: 80}, {port: 81, name: b}]}
"#;

/// A file in a directory of its own, removed on drop.
struct TempFile {
    path: std::path::PathBuf,
}

impl std::ops::Deref for TempFile {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn write(name: &str, text: &str) -> TempFile {
    let dir = std::env::temp_dir().join(format!("mesh-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    TempFile { path }
}

/// `mesh-node run` for node n1 with `config`. The bpffs does not exist: were the file ever
/// accepted, preflight would still stop mesh-node before it touched this (the host's) network
/// namespace.
fn run_command(config: &std::path::Path) -> Command {
    let mut cmd = Command::new(mesh_node_bin().unwrap());
    cmd.args([
        "run",
        "--node",
        "n1",
        "--bpffs",
        "/nonexistent/bpffs",
        "--config",
    ])
    .arg(config);
    cmd
}

fn validate(file: &std::path::Path) -> std::process::Output {
    Command::new(mesh_node_bin().unwrap())
        .arg("validate")
        .arg(file)
        .output()
        .unwrap()
}

#[test]
fn run_with_an_invalid_config_exits_64_naming_every_problem() {
    let file = write("bad.yaml", BAD);
    let out = run_command(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let f = file.display().to_string();
    assert!(
        stderr.contains(&format!("{f}:1:status.podIP: error:")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{f}:2:spec.ports[0].name: error:")),
        "{stderr}"
    );
}

#[test]
fn validate_reports_errors_and_warnings_with_exit_codes() {
    let bad = write("bad2.yaml", BAD);
    let out = validate(&bad);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().filter(|l| l.contains(": error:")).count(),
        2,
        "{stdout}"
    );

    let good = write(
        "good.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n",
    );
    let out = validate(&good);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains(":2:kind: warning:"));
}

#[test]
fn run_without_privileges_exits_77_naming_what_is_missing() {
    require_root!();
    let file = write(
        "ok.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
    );
    // Readable by the unprivileged user.
    use std::os::unix::fs::PermissionsExt;
    let dir = file.parent().unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&*file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run_command(&file).uid(65534).gid(65534).output().unwrap();
    assert_eq!(out.status.code(), Some(77), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for missing in ["CAP_NET_ADMIN", "CAP_BPF", "/nonexistent/bpffs is not"] {
        assert!(
            stderr.contains(missing),
            "{missing} not named in:\n{stderr}"
        );
    }
}

#[test]
fn run_with_invalid_flags_exits_64_naming_each_before_starting() {
    let file = write(
        "flags.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
    );
    let out = run_command(&file)
        .args(["--trust-domain", "Example.org", "--cert-lifetime", "1s"])
        .args(["--admin-addr", "127.0.0.1:15008", "--log", "mesh=loud"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for problem in [
        "mesh-node run: --trust-domain: \"Example.org\" has 'E'",
        "mesh-node run: --cert-lifetime: 1s is too short: at least 2s",
        "mesh-node run: --admin-addr: port 15008 is the HBONE listener's",
        "mesh-node run: --log: invalid filter \"mesh=loud\"",
    ] {
        assert!(stderr.contains(problem), "{problem:?} not in:\n{stderr}");
    }
    // Nothing started: not even the log.
    assert!(!stderr.contains("starting"), "{stderr}");

    // A malformed value is a usage error too (clap's own message).
    let out = run_command(&file)
        .args(["--repair-interval", "soon"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--repair-interval"));
}

#[test]
fn run_logs_its_settings_on_one_line_at_start() {
    let file = write(
        "settings.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
    );
    // Preflight stops it (no bpffs), after the settings were logged.
    let out = run_command(&file)
        .args(["--trust-domain", "example.org", "--log", "info"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.contains("starting"))
        .unwrap_or_else(|| panic!("no start line in:\n{stderr}"));
    for field in [
        "node=n1 ",
        "bpffs=/nonexistent/bpffs ",
        &format!("config={} ", file.display()),
        "trust_domain=example.org ",
        "cert_lifetime=86400s ",
        "log=info",
    ] {
        assert!(line.contains(field), "{field:?} not in {line}");
    }
}
