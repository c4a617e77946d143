//! `cargo xtask <task>`: what developers and CI run daily.
//!
//! - `build-ebpf`: build the kernel object with Debian's rustc-web and bpf-linker (see
//!   docs/toolchain.md); mesh-node embeds the result.
//! - `clippy-ebpf`: lint the eBPF crate with Debian's clippy (warnings denied).
//! - `fmt-ebpf [--check]`: rustfmt the eBPF crate.
//! - `demo`: build everything and run the two-node demo cluster (root).
//! - `bench [--quick] [--only PATTERN] [--peer ztunnel=PATH]`: build release binaries and run the benchmark matrix (root), writing
//!   JSON to target/bench/ and the table to docs/benchmarks.md; `--quick` is the short smoke
//!   variant on the tests' (debug) build, which writes only the JSON; `--only` runs a subset (no doc);
//!   `--peer ztunnel=PATH` also measures Istio's ztunnel (docs/benchmarks.md) in the same run.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    match args.first().map(String::as_str) {
        Some("build-ebpf") => build_ebpf(&root),
        Some("clippy-ebpf") => ebpf_cargo(
            &root,
            &["clippy", "--release", "--locked", "--", "-D", "warnings"],
        ),
        Some("fmt-ebpf") => fmt_ebpf(&root, args.iter().any(|a| a == "--check")),
        Some("demo") => demo(&root, &args[1..]),
        Some("bench") => bench(&root, &args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask <build-ebpf | clippy-ebpf | fmt-ebpf [--check] | demo [CONFIG] | bench [--quick] [--only PATTERN] [--peer ztunnel=PATH]>"
            );
            std::process::exit(2);
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_path_buf()
}

/// Path of the built kernel object; mesh-node's build script reads the same path.
fn ebpf_object(root: &Path) -> PathBuf {
    root.join("mesh-ebpf/target/bpfel-unknown-none/release/mesh-ebpf")
}

/// Says what the next long step does, so nobody watches a silent build.
fn step(what: &str) {
    eprintln!("\n== xtask: {what}");
}

fn build_ebpf(root: &Path) -> Result<()> {
    step("building the eBPF programs (mesh-ebpf, release; the first build takes a few minutes)");
    ebpf_cargo(root, &["build", "--release", "--locked"])?;
    let object = ebpf_object(root);
    if !object.exists() {
        bail!(
            "the eBPF build succeeded but {} is missing",
            object.display()
        );
    }
    println!("eBPF object: {}", object.display());
    Ok(())
}

/// Runs Debian's cargo in mesh-ebpf/ with the environment TOOLCHAIN.md prescribes: rustup's
/// variables removed (they would override rust-toolchain.toml), Debian's rustc, and
/// `.tools/bin` (bpf-linker) first on PATH.
fn ebpf_cargo(root: &Path, args: &[&str]) -> Result<()> {
    let cargo = Path::new("/usr/bin/cargo");
    let linker = root.join(".tools/bin/bpf-linker");
    if !cargo.exists() || !linker.exists() {
        bail!(
            "the eBPF toolchain is missing ({} or {}): run scripts/setup first",
            cargo.display(),
            linker.display()
        );
    }
    let path = format!(
        "{}:/usr/bin:{}",
        root.join(".tools/bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new(cargo);
    cmd.args(args)
        .current_dir(root.join("mesh-ebpf"))
        .env("PATH", path)
        .env("RUSTC", "/usr/bin/rustc");
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO",
        "CARGO_MANIFEST_DIR",
        "RUSTDOC",
    ] {
        cmd.env_remove(var);
    }
    run(&mut cmd)
}

fn fmt_ebpf(root: &Path, check: bool) -> Result<()> {
    // rustup's rustfmt formats any target's sources; it only needs the edition.
    let mut cmd = Command::new("rustfmt");
    cmd.env("RUSTUP_TOOLCHAIN", "stable")
        .args(["--edition", "2021", "--config-path"])
        .arg(root.join("rustfmt.toml"));
    if check {
        cmd.arg("--check");
    }
    for entry in std::fs::read_dir(root.join("mesh-ebpf/src"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs") {
            cmd.arg(path);
        }
    }
    run(&mut cmd)
}

fn demo(root: &Path, args: &[String]) -> Result<()> {
    build_ebpf(root)?;
    step("building mesh-node and the demo (the first build takes several minutes)");
    run(workspace_cargo(root).args(["build", "-p", "mesh-node", "-p", "mesh-tests", "--bins"]))?;
    let config = args
        .first()
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("examples/demo.yaml"));
    step(&format!("running the demo with {}", config.display()));
    run(Command::new(root.join("target/debug/mesh-demo")).arg(config))
}

fn bench(root: &Path, args: &[String]) -> Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    build_ebpf(root)?;
    // The quick variant uses the tests' build (what `cargo build --workspace --bins` made for
    // them, so CI compiles nothing twice); the full one measures release binaries.
    let (profile, mut build) = if quick {
        ("debug", vec!["build"])
    } else {
        ("release", vec!["build", "--release"])
    };
    build.extend(["--workspace", "--bins", "--locked"]);
    step(&format!("building the workspace's binaries ({profile})"));
    run(workspace_cargo(root).args(&build))?;
    let mut cmd = Command::new(root.join("target").join(profile).join("mesh-bench"));
    cmd.current_dir(root)
        .arg("--out")
        .arg(root.join("target/bench"));
    if !quick {
        cmd.arg("--doc").arg(root.join("docs/benchmarks.md"));
    }
    // `--quick`, `--only PATTERN` (which writes no doc) and the rest go to mesh-bench, which
    // runs in the workspace root: a peer's binary given relative to here is made absolute.
    let mut peer = false;
    for arg in args {
        let arg = match (peer, arg.strip_prefix("--peer=")) {
            (true, _) => absolute_peer(arg),
            (false, Some(value)) => format!("--peer={}", absolute_peer(value)),
            _ => arg.clone(),
        };
        peer = arg == "--peer";
        cmd.arg(arg);
    }
    run(&mut cmd)
}

/// `NAME=PATH` with PATH absolute (as it is from this process's directory).
fn absolute_peer(value: &str) -> String {
    match value.split_once('=') {
        Some((name, path)) => match std::path::absolute(path) {
            Ok(path) => format!("{name}={}", path.display()),
            Err(_) => value.to_string(),
        },
        None => value.to_string(),
    }
}

/// `cargo` (rustup's, from PATH; `RUSTUP_TOOLCHAIN` is kept, so `cargo +TOOLCHAIN xtask`
/// holds) for the workspace, without what `cargo run` put in this process's environment: with `LD_LIBRARY_PATH`, `CARGO_PKG_*` and the like inherited, the
/// build's fingerprints differ from a plain `cargo build`'s and everything is compiled again.
fn workspace_cargo(root: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || [
                "CARGO",
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "LD_LIBRARY_PATH",
                "RUST_RECURSION_COUNT",
            ]
            .contains(&name.as_ref())
        {
            cmd.env_remove(name.as_ref());
        }
    }
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{:?} failed: {status}", cmd.get_program());
    }
    Ok(())
}
