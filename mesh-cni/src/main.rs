//! `mesh-cni`: the mesh's chained CNI plugin (CNI spec 1.0: ADD, DEL, CHECK, VERSION).
//!
//! Chained after the plugins that give a pod its interface and addresses (on K3s: flannel,
//! which delegates to `bridge` and `host-local`). On ADD it tells the node's mesh-node, over
//! its unix socket, the pod's host-side interface and addresses from `prevResult`; mesh-node
//! attaches capture to that interface and applies the pod's enrolment before it answers, so
//! the pod's first packet is governed. When mesh-node cannot be reached, the enrolment cache
//! mesh-node keeps on disk decides: a pod that would be enrolled is refused (the runtime
//! retries the sandbox), any other pod starts. `prevResult` is passed through unchanged.
//!
//! Network configuration (the plugin's entry in the conflist):
//! `{"type": "mesh-cni", "stateDir": "/var/lib/mesh"}`: mesh-node's `--state-dir`, which
//! holds the socket and the cache.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use mesh_cni::{cache_path, socket_path, Command, Enrolment, Reply, Request};
use serde_json::{json, Value};

const SUPPORTED: [&str; 4] = ["0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// mesh-node's default `--state-dir`.
const DEFAULT_STATE_DIR: &str = "/var/lib/mesh";
/// How long mesh-node may take to set a pod up (a link scan and a few map writes; the
/// runtime's own CNI timeout is minutes).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// CNI error codes (spec 1.0, "Error"): 4 invalid environment variables, 6 failure to
/// decode content, 7 invalid network config, 11 try again later; 100 and up are the
/// plugin's own.
const INVALID_ENVIRONMENT: u32 = 4;
const DECODE: u32 = 6;
const INVALID_CONFIG: u32 = 7;
const TRY_AGAIN_LATER: u32 = 11;
const NOT_GOVERNED: u32 = 100;

struct Failure {
    code: u32,
    msg: String,
    details: String,
}

fn fail(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Failure {
    Failure {
        code,
        msg: msg.into(),
        details: details.into(),
    }
}

fn main() -> ExitCode {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    if command == "VERSION" {
        println!(
            "{}",
            json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED})
        );
        return ExitCode::SUCCESS;
    }
    let mut stdin = Vec::new();
    let config = std::io::stdin()
        .read_to_end(&mut stdin)
        .map_err(|err| {
            fail(
                DECODE,
                "cannot read the network configuration",
                err.to_string(),
            )
        })
        .and_then(|_| {
            serde_json::from_slice::<Value>(&stdin).map_err(|err| {
                fail(
                    DECODE,
                    "the network configuration is not JSON",
                    err.to_string(),
                )
            })
        });
    let version = config
        .as_ref()
        .ok()
        .and_then(|c| c["cniVersion"].as_str())
        .unwrap_or("1.0.0")
        .to_string();
    let outcome = config.and_then(|config| match command.as_str() {
        "ADD" => add(&config),
        "DEL" => Ok(del(&config)),
        "CHECK" => check(&config),
        other => Err(fail(
            INVALID_ENVIRONMENT,
            format!("unknown CNI_COMMAND {other:?}"),
            "expected ADD, DEL, CHECK or VERSION",
        )),
    });
    match outcome {
        Ok(Some(result)) => {
            println!("{result}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("mesh-cni {command}: {}: {}", failure.msg, failure.details);
            println!(
                "{}",
                json!({
                    "cniVersion": version,
                    "code": failure.code,
                    "msg": failure.msg,
                    "details": failure.details,
                })
            );
            ExitCode::FAILURE
        }
    }
}

/// The pod as the runtime describes it: `K8S_POD_NAMESPACE` and `K8S_POD_NAME` from
/// `CNI_ARGS`; `None` for a sandbox that is not a Kubernetes pod.
fn pod() -> Option<(String, String)> {
    let args = std::env::var("CNI_ARGS").unwrap_or_default();
    let find = |key: &str| {
        args.split(';')
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
    };
    Some((find("K8S_POD_NAMESPACE")?, find("K8S_POD_NAME")?))
}

fn state_dir(config: &Value) -> PathBuf {
    PathBuf::from(config["stateDir"].as_str().unwrap_or(DEFAULT_STATE_DIR))
}

/// The request for `command` from the environment and `prevResult`.
fn request(command: Command, config: &Value, namespace: &str, name: &str) -> Request {
    let previous = &config["prevResult"];
    let empty = Vec::new();
    let interfaces = previous["interfaces"].as_array().unwrap_or(&empty);
    let host: Vec<String> = interfaces
        .iter()
        .filter(|i| i["sandbox"].as_str().unwrap_or("").is_empty())
        .filter_map(|i| i["name"].as_str().map(String::from))
        .collect();
    let addresses: Vec<Ipv4Addr> = previous["ips"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|cidr| cidr.split('/').next()?.parse().ok())
        .collect();
    Request {
        command,
        container_id: std::env::var("CNI_CONTAINERID").unwrap_or_default(),
        namespace: namespace.to_string(),
        name: name.to_string(),
        interfaces: host,
        addresses,
    }
}

/// Sends `request` to mesh-node and reads its answer; `Err` when mesh-node cannot be
/// reached or did not answer.
fn ask(state_dir: &Path, request: &Request) -> std::io::Result<Reply> {
    let path = socket_path(state_dir);
    let mut stream = UnixStream::connect(&path)?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    stream.set_write_timeout(Some(ANSWER_TIMEOUT))?;
    let mut line = serde_json::to_vec(request).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(|err| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unreadable answer {answer:?}: {err}"),
        )
    })
}

/// What to say when mesh-node cannot be asked: the cache decides whether the pod may go on.
fn unreachable(
    state_dir: &Path,
    namespace: &str,
    name: &str,
    err: &std::io::Error,
) -> Result<(), Failure> {
    let socket = socket_path(state_dir);
    let cache = cache_path(state_dir);
    match Enrolment::load(&cache) {
        Ok(enrolment) if !enrolment.decide(namespace, name) => Ok(()),
        Ok(_) => Err(fail(
            TRY_AGAIN_LATER,
            format!(
                "mesh-node is not serving on this node; pod {namespace}/{name} is enrolled in \
                 the mesh and must not start uncaptured"
            ),
            format!(
                "cannot reach mesh-node at {}: {err}; the runtime retries the sandbox, which \
                 starts once mesh-node serves",
                socket.display()
            ),
        )),
        Err(cache_err) => Err(fail(
            TRY_AGAIN_LATER,
            format!(
                "mesh-node is not serving on this node and its enrolment cache is unreadable, \
                 so pod {namespace}/{name} may be enrolled: held until mesh-node serves"
            ),
            format!(
                "cannot reach mesh-node at {}: {err}; cannot read {}: {cache_err}",
                socket.display(),
                cache.display()
            ),
        )),
    }
}

fn add(config: &Value) -> Result<Option<Value>, Failure> {
    let previous = config.get("prevResult").cloned().ok_or_else(|| {
        fail(
            INVALID_CONFIG,
            "mesh-cni must be chained after the plugin that creates the pod's interface",
            "no prevResult in the network configuration",
        )
    })?;
    let Some((namespace, name)) = pod() else {
        return Ok(Some(previous)); // not a Kubernetes pod: nothing to govern
    };
    let dir = state_dir(config);
    let request = request(Command::Add, config, &namespace, &name);
    match ask(&dir, &request) {
        Ok(Reply { error: None, .. }) => Ok(Some(previous)),
        Ok(Reply {
            error: Some(error), ..
        }) => Err(fail(
            TRY_AGAIN_LATER,
            format!("mesh-node could not set up pod {namespace}/{name}"),
            error,
        )),
        Err(err) => unreachable(&dir, &namespace, &name, &err).map(|()| Some(previous)),
    }
}

/// DEL succeeds whatever happens (the spec: a missing resource is not an error); mesh-node
/// is told so that it forgets the pod's interface at once.
fn del(config: &Value) -> Option<Value> {
    if let Some((namespace, name)) = pod() {
        let request = request(Command::Del, config, &namespace, &name);
        if let Err(err) = ask(&state_dir(config), &request) {
            eprintln!("mesh-cni DEL {namespace}/{name}: mesh-node not told: {err}");
        }
    }
    None
}

fn check(config: &Value) -> Result<Option<Value>, Failure> {
    if config.get("prevResult").is_none() {
        return Err(fail(
            INVALID_CONFIG,
            "CHECK needs prevResult",
            "no prevResult in the network configuration",
        ));
    }
    let Some((namespace, name)) = pod() else {
        return Ok(None);
    };
    let dir = state_dir(config);
    let request = request(Command::Check, config, &namespace, &name);
    match ask(&dir, &request) {
        Ok(Reply { error: None, .. }) => Ok(None),
        Ok(Reply {
            error: Some(error), ..
        }) => Err(fail(
            NOT_GOVERNED,
            format!("pod {namespace}/{name} is not governed by the mesh as it should be"),
            error,
        )),
        Err(err) => unreachable(&dir, &namespace, &name, &err).map(|()| None),
    }
}
