//! The subcommands besides `run` (which is [`crate::app`]): each takes checked arguments
//! and returns the process's exit status.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use crate::{
    app::{init_logging, prepare_bpffs},
    capture,
    cli::{CaInitArgs, CaServeArgs},
    cni,
    config::{self, semantics::Mesh},
    identity, preflight,
    settings::{Node, EXIT_CONFIG, EXIT_PREFLIGHT},
};

/// `validate`: each file on its own; errors and warnings as `file:document:field: message`.
pub fn validate(files: &[PathBuf]) -> ExitCode {
    let mut failed = false;
    for file in files {
        match config::load_file(file) {
            Ok(resources) => {
                for warning in &resources.warnings {
                    println!("{warning}");
                }
            }
            Err(err) => {
                failed = true;
                println!("{}", err.render());
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `analyze`: the files as one set, then the cross-resource checks.
pub fn analyze(files: &[PathBuf], mesh: &Mesh) -> ExitCode {
    let paths: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let resources = match config::load_files(&paths) {
        Ok(resources) => resources,
        Err(errors) => {
            for err in errors {
                println!("{}", err.render());
            }
            eprintln!("analysis needs files without errors; fix the errors above first");
            return ExitCode::FAILURE;
        }
    };
    for warning in &resources.warnings {
        println!("{warning}");
    }
    let findings = crate::analyze::analyze(&resources, mesh);
    for finding in &findings {
        println!("{finding}");
    }
    let errors = findings
        .iter()
        .filter(|f| f.severity() == config::Severity::Error)
        .count();
    if findings.is_empty() && resources.warnings.is_empty() {
        eprintln!("no problems found");
    } else {
        eprintln!(
            "{errors} error(s), {} warning(s)",
            findings.len() - errors + resources.warnings.len()
        );
    }
    if errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `uninstall`: every program attachment, pin, rule and route of the node, and the CNI
/// plugin when its directories are given.
pub fn uninstall(node: &Node) -> ExitCode {
    init_logging("info");
    prepare_bpffs(&node.bpffs);
    if let Err(err) = preflight::check(&node.bpffs) {
        eprintln!("{err}");
        return ExitCode::from(EXIT_PREFLIGHT);
    }
    let uninstalled = capture::uninstall(&node.bpffs, &node.name).map(|mut removed| {
        if let Some((conf, bin)) = &node.cni_dirs {
            removed.extend(cni::uninstall(conf, bin));
        }
        removed
    });
    match uninstalled {
        Ok(removed) if removed.is_empty() => {
            println!("nothing of node {} was installed", node.name);
            ExitCode::SUCCESS
        }
        Ok(removed) => {
            for item in removed {
                println!("removed {item}");
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("uninstall failed: {err}");
            ExitCode::FAILURE
        }
    }
}

/// `crds`: printed as one multi-document YAML, or one file each in `out`.
pub fn crds(out: Option<&Path>) -> ExitCode {
    let crds = config::schema::crds();
    let Some(dir) = out else {
        let all: Vec<String> = crds.into_iter().map(|(_, yaml)| yaml).collect();
        print!("{}", all.join("---\n"));
        return ExitCode::SUCCESS;
    };
    for (name, yaml) in crds {
        if let Err(err) = std::fs::write(dir.join(&name), yaml) {
            eprintln!("mesh-node crds: {}: {err}", dir.join(&name).display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

/// `ca init`: a new root CA as a Secret manifest.
pub fn ca_init(args: &CaInitArgs) -> ExitCode {
    let fail = |err: &dyn std::fmt::Display| {
        eprintln!("mesh-node ca init: {err}");
        ExitCode::FAILURE
    };
    let material = match identity::ca::Material::generate(args.intermediate) {
        Ok(material) => material,
        Err(err) => return fail(&err),
    };
    let written = (|| -> Result<(), identity::IdentityError> {
        if let Some(dir) = &args.out {
            material.write(dir)?;
        }
        if let (Some(path), Some(key)) = (&args.root_key_out, &material.root_key) {
            identity::ca::write_private(path, key.as_bytes()).map_err(|source| {
                identity::IdentityError::Io {
                    path: path.clone(),
                    source,
                }
            })?;
        }
        if let Some(path) = &args.bundle {
            std::fs::write(path, &material.bundle).map_err(|source| {
                identity::IdentityError::Io {
                    path: path.clone(),
                    source,
                }
            })?;
        }
        Ok(())
    })();
    if let Err(err) = written {
        return fail(&err);
    }
    if args.out.is_none() {
        print!(
            "{}",
            identity::ca::manifests(&material, &args.name, &args.namespace)
        );
    }
    ExitCode::SUCCESS
}

/// `ca serve`: the signer, until SIGTERM.
pub fn ca_serve(args: CaServeArgs) -> ExitCode {
    use identity::signer;
    init_logging(&args.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let ca = match identity::Ca::load(&args.ca_dir) {
        Ok(ca) => ca,
        Err(err) => {
            eprintln!("mesh-node ca serve: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("spiffe://{}/ns/mesh-system/sa/mesh-ca", args.trust_domain));
    let served = runtime.block_on(async move {
        let mut registry = prometheus_client::registry::Registry::default();
        let client = match &args.kubeconfig {
            _ if !args.kube => None,
            kubeconfig => Some(crate::kube_source::client(kubeconfig.as_deref()).await?),
        };
        let pods = match (&client, &args.config) {
            (Some(client), _) => signer::Pods::watch(client.clone()).await?,
            (None, Some(config)) => signer::file_pods(config.clone())?,
            (None, None) => anyhow::bail!("--config or --kube"),
        };
        let auth = match (&args.node_tokens, client) {
            (Some(path), _) => signer::Auth::tokens_file(path)?,
            (None, Some(client)) => signer::Auth::Review {
                client,
                audience: args.audience.clone(),
                node_accounts: args.node_accounts.iter().cloned().collect(),
            },
            (None, None) => anyhow::bail!("--node-tokens or --kube"),
        };
        let signer = signer::Signer {
            ca: arc_swap::ArcSwap::from_pointee(ca),
            trust_domain: args.trust_domain.clone(),
            max_lifetime: args.max_cert_lifetime,
            auth,
            pods,
            metrics: signer::SignerMetrics::register(&mut registry),
        };
        let settings = signer::ServeSettings {
            listen: args.listen,
            admin: args.admin_addr,
            identity,
            ca_dir: Some(args.ca_dir.clone()),
        };
        signer::serve(signer, settings, registry).await
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("mesh-node ca serve: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `probe ready|live`: asks this pod's mesh-node over its probe socket (an exec probe);
/// exit 0 when it answers 200, 1 otherwise (with the answer or the error).
pub fn probe(path: &str, socket: &Path) -> ExitCode {
    use std::io::{Read, Write};
    let asked = (|| {
        let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        stream.set_write_timeout(Some(std::time::Duration::from_secs(5)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nhost: probe\r\n\r\n")?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        std::io::Result::Ok(answer)
    })();
    let answer = match asked {
        Ok(answer) => answer,
        Err(err) => {
            eprintln!("mesh-node probe: {}: {err}", socket.display());
            return ExitCode::FAILURE;
        }
    };
    let status = answer.split_whitespace().nth(1).unwrap_or("");
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    print!("{body}");
    if status == "200" {
        ExitCode::SUCCESS
    } else {
        eprintln!("mesh-node probe: {path} answered {status}");
        ExitCode::FAILURE
    }
}
