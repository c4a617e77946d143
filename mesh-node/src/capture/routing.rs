//! The node-side rules that complete capture:
//! - policy routing: packets carrying `MARK_CAPTURE` are delivered locally
//!   (`ip rule fwmark 0x200/0x200 lookup 100`, `local 0.0.0.0/0 dev lo table 100`);
//! - `MESH-PREROUTING` (nat): captured flows skip kube-proxy's DNAT, so the proxy sees the
//!   Service VIP itself and dials endpoints directly; `MESH-OUTPUT` (nat) does the same for
//!   the node's own connections that `connect4` sends to the proxy (`--host-traffic`);
//! - `MESH-GUARD` (filter INPUT): a captured SYN that no transparent proxy socket will take
//!   (mesh-node is down) is refused with a TCP reset: the mesh fails closed, promptly.
//! - `MESH-BRIDGE` (filter FORWARD, bridged frames via br_netfilter, as on K3s): a SYN to or
//!   from an enrolled pod (ipset `mesh-enrolled`, kept equal to `MESH_ENROLLED`) that a bridge
//!   is about to switch port to port is refused. Captured frames are addressed to the bridge
//!   and never switched, so such a SYN only exists when a link lacks the capture program (a
//!   pod created while mesh-node was down): the backstop that keeps the mesh closed then.
//!   Flows kube-proxy DNATed are exempt: br_netfilter bridges a Service connection DNATed to a
//!   pod on the same bridge, and that is legitimate.
//! - `MESH-NOTRACK` (raw PREROUTING) and `MESH-NOTRACK-OUT` (raw OUTPUT): captured packets
//!   from enrolled pods and every packet the proxy sends them (`MARK_PROXY`, on its
//!   connections and on its listeners, whose handshake answers and accepted connections
//!   inherit it) bypass conntrack, both directions alike. The proxy connects to pods as the
//!   client pod, from the client's address and a port the kernel picks; tracked, such a
//!   connection collided with one kube-proxy DNATed for the same client and port before it
//!   was enrolled (TIME_WAIT entries live 2 minutes): conntrack rewrote the proxy's source
//!   port or un-DNATed the pod's reply, the reply never reached the proxy, and the request
//!   waited 5 s for the connect timeout (measured in the benchmark).
//!
//! Every step is idempotent, so a restart changes nothing that is already in place.

use std::process::Command;

use mesh_common::{MARK_CAPTURE, MARK_PROXY, ROUTE_TABLE, RULE_PRIORITY};

use super::CaptureError;

const GUARD_CHAIN: &str = "MESH-GUARD";
const NAT_CHAIN: &str = "MESH-PREROUTING";
const NAT_OUTPUT_CHAIN: &str = "MESH-OUTPUT";
const BRIDGE_CHAIN: &str = "MESH-BRIDGE";
const NOTRACK_CHAIN: &str = "MESH-NOTRACK";
const NOTRACK_OUT_CHAIN: &str = "MESH-NOTRACK-OUT";
const ENROLLED_SET: &str = "mesh-enrolled";

fn mark() -> String {
    format!("{MARK_CAPTURE:#x}/{MARK_CAPTURE:#x}")
}

/// Installs the rule, route and iptables chains (idempotent: what is already right is left
/// alone, so a restart changes nothing).
pub fn install() -> Result<(), CaptureError> {
    let pref = RULE_PRIORITY.to_string();
    let table = ROUTE_TABLE.to_string();
    let mark = mark();
    let existing = output("ip", &["rule", "show", "pref", &pref])?;
    if !existing.contains(&format!("fwmark {mark} lookup {table}")) {
        run(
            "ip",
            &[
                "rule", "add", "pref", &pref, "fwmark", &mark, "lookup", &table,
            ],
        )?;
    }
    local_route("replace", &table)?;

    let syn = ["-p", "tcp", "--syn", "-m", "mark", "--mark", &mark];
    let accept: Vec<&str> = syn
        .iter()
        .copied()
        .chain(["-m", "socket", "--transparent", "-j", "RETURN"])
        .collect();
    let reject: Vec<&str> = syn
        .iter()
        .copied()
        .chain(["-j", "REJECT", "--reject-with", "tcp-reset"])
        .collect();
    ensure_chain("filter", GUARD_CHAIN, &[&accept, &reject])?;
    ensure_jump_first("filter", "INPUT", GUARD_CHAIN)?;
    ensure_chain(
        "nat",
        NAT_CHAIN,
        &[&["-m", "mark", "--mark", &mark, "-j", "ACCEPT"]],
    )?;
    ensure_jump_first("nat", "PREROUTING", NAT_CHAIN)?;
    ensure_chain(
        "nat",
        NAT_OUTPUT_CHAIN,
        &[&["-m", "mark", "--mark", &mark, "-j", "ACCEPT"]],
    )?;
    ensure_jump_first("nat", "OUTPUT", NAT_OUTPUT_CHAIN)?;

    run("ipset", &["create", ENROLLED_SET, "hash:ip", "-exist"])?;
    let bridged = [
        "-m",
        "physdev",
        "--physdev-is-bridged",
        "-p",
        "tcp",
        "--syn",
        "-m",
        "conntrack",
        "!",
        "--ctstate",
        "DNAT",
        "-m",
        "set",
        "--match-set",
        ENROLLED_SET,
    ];
    let refuse = ["-j", "REJECT", "--reject-with", "tcp-reset"];
    let to_enrolled: Vec<&str> = bridged
        .iter()
        .copied()
        .chain(["dst"])
        .chain(refuse)
        .collect();
    let from_enrolled: Vec<&str> = bridged
        .iter()
        .copied()
        .chain(["src"])
        .chain(refuse)
        .collect();
    ensure_chain("filter", BRIDGE_CHAIN, &[&to_enrolled, &from_enrolled])?;
    ensure_jump_first("filter", "FORWARD", BRIDGE_CHAIN)?;

    let proxy_mark = format!("{MARK_PROXY:#x}/{MARK_PROXY:#x}");
    let notrack = ["-j", "CT", "--notrack"];
    let from_pods: Vec<&str> = ["-m", "mark", "--mark", &mark, "-m", "set", "--match-set"]
        .into_iter()
        .chain([ENROLLED_SET, "src"])
        .chain(notrack)
        .collect();
    let to_pods: Vec<&str> = [
        "-m",
        "mark",
        "--mark",
        &proxy_mark,
        "-m",
        "set",
        "--match-set",
    ]
    .into_iter()
    .chain([ENROLLED_SET, "dst"])
    .chain(notrack)
    .collect();
    ensure_chain("raw", NOTRACK_CHAIN, &[&from_pods])?;
    ensure_jump_first("raw", "PREROUTING", NOTRACK_CHAIN)?;
    ensure_chain("raw", NOTRACK_OUT_CHAIN, &[&to_pods])?;
    ensure_jump_first("raw", "OUTPUT", NOTRACK_OUT_CHAIN)?;
    Ok(())
}

/// Makes the bridge guard's ipset equal `ips`, atomically (filled aside, then swapped in).
pub fn sync_enrolled_set(
    ips: &std::collections::BTreeSet<std::net::Ipv4Addr>,
) -> Result<(), CaptureError> {
    let staging = format!("{ENROLLED_SET}-new");
    let mut script = format!("create {staging} hash:ip -exist\nflush {staging}\n");
    for ip in ips {
        script.push_str(&format!("add {staging} {ip}\n"));
    }
    script.push_str(&format!(
        "swap {staging} {ENROLLED_SET}\ndestroy {staging}\n"
    ));
    let command = format!("ipset restore (set {ENROLLED_SET}, {} entries)", ips.len());
    run_script(&command, "ipset", &["restore"], &script)
}

/// Drops the node's neighbour (ARP) entries for `ips`: their addresses just moved to
/// another interface (a new pod took a freed address), and an entry naming the old pod's MAC
/// would hold the new pod's traffic until it expired. The pod's own announcement at start
/// may have been refused while its interface was not yet trusted with the address.
pub fn forget_neighbours(ips: &[std::net::Ipv4Addr]) -> Result<(), CaptureError> {
    if ips.is_empty() {
        return Ok(());
    }
    let script: String = ips
        .iter()
        .map(|ip| format!("neigh flush to {ip}\n"))
        .collect();
    let command = format!("ip -batch - (neigh flush, {} addresses)", ips.len());
    run_script(&command, "ip", &["-4", "-batch", "-"], &script)
}

/// Runs `program args` with `script` as its standard input; `command` names it in errors.
fn run_script(
    command: &str,
    program: &str,
    args: &[&str],
    script: &str,
) -> Result<(), CaptureError> {
    let fail = |message: String| CaptureError::Command {
        command: command.to_string(),
        message,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|err| fail(err.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin
            .write_all(script.as_bytes())
            .map_err(|err| fail(err.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|err| fail(err.to_string()))?;
    if !out.status.success() {
        return Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

/// Removes everything [`install`] adds; what is already gone is fine. Every step is tried;
/// the failures are reported together.
pub fn remove() -> Result<Vec<String>, CaptureError> {
    let mut removed = Vec::new();
    let mut errors = Vec::new();
    let pref = RULE_PRIORITY.to_string();
    let table = ROUTE_TABLE.to_string();
    let mark = mark();
    while run(
        "ip",
        &[
            "rule", "del", "pref", &pref, "fwmark", &mark, "lookup", &table,
        ],
    )
    .is_ok()
    {
        removed.push(format!("ip rule pref {pref} fwmark {mark} lookup {table}"));
    }
    while local_route("del", &table).is_ok() {
        removed.push(format!("route local 0.0.0.0/0 dev lo table {table}"));
    }
    for (table, builtin, chain) in [
        ("filter", "INPUT", GUARD_CHAIN),
        ("filter", "FORWARD", BRIDGE_CHAIN),
        ("nat", "PREROUTING", NAT_CHAIN),
        ("nat", "OUTPUT", NAT_OUTPUT_CHAIN),
        ("raw", "PREROUTING", NOTRACK_CHAIN),
        ("raw", "OUTPUT", NOTRACK_OUT_CHAIN),
    ] {
        if iptables(table, &["-S", chain]).is_err() {
            continue; // not there
        }
        while iptables(table, &["-D", builtin, "-j", chain]).is_ok() {}
        match iptables(table, &["-F", chain]).and_then(|_| iptables(table, &["-X", chain])) {
            Ok(_) => removed.push(format!("iptables {table} chain {chain}")),
            Err(err) => errors.push(err.to_string()),
        }
    }
    // After the chains: a set cannot be destroyed while a rule refers to it.
    let sets = output("ipset", &["list", "-n"]).unwrap_or_default();
    for set in [format!("{ENROLLED_SET}-new"), ENROLLED_SET.to_string()] {
        if !sets.lines().any(|l| l.trim() == set) {
            continue;
        }
        match run("ipset", &["destroy", &set]) {
            Ok(()) => removed.push(format!("ipset {set}")),
            Err(err) => errors.push(err.to_string()),
        }
    }
    if errors.is_empty() {
        Ok(removed)
    } else {
        Err(CaptureError::Command {
            command: "removing the node rules".into(),
            message: errors.join("; "),
        })
    }
}

/// Makes `chain` hold exactly `rules`, in order: left alone when it already does, rebuilt
/// otherwise (a guard whose RETURN rule came after its REJECT would refuse every capture).
fn ensure_chain(table: &str, chain: &str, rules: &[&[&str]]) -> Result<(), CaptureError> {
    let matches = match iptables(table, &["-S", chain]) {
        Ok(listing) => {
            let appended = listing.lines().filter(|l| l.starts_with("-A ")).count();
            let all_present = rules.iter().all(|rule| {
                let check: Vec<&str> = ["-C", chain]
                    .into_iter()
                    .chain(rule.iter().copied())
                    .collect();
                iptables(table, &check).is_ok()
            });
            // -C finds rules but not their order: compare the targets' order too.
            let targets: Vec<&str> = listing
                .lines()
                .filter(|l| l.starts_with("-A "))
                .filter_map(|l| l.split(" -j ").nth(1))
                .map(|t| t.split_whitespace().next().unwrap_or(""))
                .collect();
            let wanted: Vec<&str> = rules
                .iter()
                .filter_map(|r| r.iter().position(|a| *a == "-j").map(|i| r[i + 1]))
                .collect();
            appended == rules.len() && all_present && targets == wanted
        }
        Err(_) => {
            iptables(table, &["-N", chain])?;
            false
        }
    };
    if !matches {
        iptables(table, &["-F", chain])?;
        for rule in rules {
            let append: Vec<&str> = ["-A", chain]
                .into_iter()
                .chain(rule.iter().copied())
                .collect();
            iptables(table, &append)?;
        }
    }
    Ok(())
}

/// Makes the jump to `chain` the first rule of `builtin`, so it runs before kube-proxy's.
fn ensure_jump_first(table: &str, builtin: &str, chain: &str) -> Result<(), CaptureError> {
    let listing = iptables(table, &["-S", builtin])?;
    let first = listing.lines().find(|l| l.starts_with("-A "));
    if first == Some(format!("-A {builtin} -j {chain}").as_str()) {
        return Ok(());
    }
    // Not first (a kube-proxy resync can push its own jump ahead): move ours to the top.
    while iptables(table, &["-D", builtin, "-j", chain]).is_ok() {}
    iptables(table, &["-I", builtin, "1", "-j", chain])?;
    Ok(())
}

/// `ip route VERB local 0.0.0.0/0 dev lo table TABLE`: every address is local for marked
/// packets.
fn local_route(verb: &str, table: &str) -> Result<(), CaptureError> {
    run(
        "ip",
        &[
            "route",
            verb,
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            table,
        ],
    )
}

fn iptables(table: &str, args: &[&str]) -> Result<String, CaptureError> {
    let full: Vec<&str> = ["-w", "5", "-t", table]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    output("iptables", &full)
}

fn run(program: &str, args: &[&str]) -> Result<(), CaptureError> {
    output(program, args).map(drop)
}

fn output(program: &str, args: &[&str]) -> Result<String, CaptureError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|err| CaptureError::Command {
            command: command.clone(),
            message: err.to_string(),
        })?;
    if !out.status.success() {
        return Err(CaptureError::Command {
            command,
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
