//! The node-side rules that complete capture:
//! - policy routing: packets carrying `MARK_CAPTURE` are delivered locally
//!   (`ip rule fwmark 0x200/0x200 lookup 100`, `local 0.0.0.0/0 dev lo table 100`);
//! - `MESH-PREROUTING` (iptables nat): captured flows skip kube-proxy's DNAT, so the proxy
//!   sees the Service VIP itself and dials endpoints directly; `MESH-OUTPUT` (nat) does the
//!   same for the node's own connections that `connect4` sends to the proxy
//!   (`--host-traffic`). These stay in iptables: only a rule in the same nat chain as
//!   kube-proxy's can keep its DNAT away (an nftables accept ends only its own chain).
//! - the nftables table `ip mesh` (one transaction, so never half there) holds the guards
//!   and the conntrack bypass, in base chains that run before the iptables filter table
//!   (priority `filter - 10`), where a reject is final whatever another controller
//!   (K3s's kube-router, which keeps its ACCEPTing jumps first in INPUT/FORWARD) inserts
//!   later in the chain:
//!   - `guard_input` (input): a captured SYN that no transparent proxy socket will take
//!     (mesh-node is down) is refused with a TCP reset: the mesh fails closed, promptly,
//!     and never reaches a socket of the node that happens to listen on that port.
//!   - `guard_forward` (forward; bridged frames too, via br_netfilter as on K3s): a SYN to
//!     or from an enrolled pod (set `enrolled`, kept equal to `MESH_ENROLLED`) that the node
//!     forwards is refused. Captured flows are delivered locally, never forwarded, so such a
//!     SYN only exists when a link lacks the capture program (a pod started without the CNI
//!     plugin while mesh-node was down): the backstop that keeps the mesh closed then. Flows
//!     kube-proxy DNATed are exempt: br_netfilter bridges a Service connection DNATed to a
//!     pod on the same bridge, and that is legitimate.
//!   - `notrack_pre` (prerouting, raw priority) and `notrack_out` (output, raw priority):
//!     captured packets from enrolled pods and every packet the proxy sends them
//!     (`MARK_PROXY`, on its connections and on its listeners, whose handshake answers and
//!     accepted connections inherit it) bypass conntrack, both directions alike. The proxy
//!     connects to pods as the client pod, from the client's address and a port the kernel
//!     picks; tracked, such a connection collided with one kube-proxy DNATed for the same
//!     client and port before it was enrolled (TIME_WAIT entries live 2 minutes): conntrack
//!     rewrote the proxy's source port or un-DNATed the pod's reply, the reply never reached
//!     the proxy, and the request waited for the connect timeout.
//!
//! Every step is idempotent, so a restart changes nothing that is already in place (the
//! table's chains are redefined in one transaction, its set keeps its elements).

use std::process::Command;

use mesh_common::{MARK_CAPTURE, MARK_PROXY, ROUTE_TABLE, RULE_PRIORITY};

use super::CaptureError;

const NAT_CHAIN: &str = "MESH-PREROUTING";
const NAT_OUTPUT_CHAIN: &str = "MESH-OUTPUT";
/// The nftables table of the guards and the conntrack bypass.
pub const NFT_TABLE: &str = "mesh";
/// Its set of enrolled pod addresses.
const ENROLLED_SET: &str = "enrolled";
/// What versions before the nftables table installed in iptables (removed at start and by
/// uninstall): (table, builtin chain, chain).
const LEGACY_CHAINS: [(&str, &str, &str); 4] = [
    ("filter", "INPUT", "MESH-GUARD"),
    ("filter", "FORWARD", "MESH-BRIDGE"),
    ("raw", "PREROUTING", "MESH-NOTRACK"),
    ("raw", "OUTPUT", "MESH-NOTRACK-OUT"),
];
const LEGACY_SETS: [&str; 2] = ["mesh-enrolled-new", "mesh-enrolled"];

fn mark() -> String {
    format!("{MARK_CAPTURE:#x}/{MARK_CAPTURE:#x}")
}

/// The table's chains and rules, as one `nft -f` transaction (`add` leaves the table and its
/// set as they are; each chain is flushed and refilled).
fn nft_ruleset() -> String {
    let capture = format!("meta mark & {MARK_CAPTURE:#x} == {MARK_CAPTURE:#x}");
    let proxy = format!("meta mark & {MARK_PROXY:#x} == {MARK_PROXY:#x}");
    let syn = "tcp flags & (fin|syn|rst|ack) == syn";
    let t = NFT_TABLE;
    let set = ENROLLED_SET;
    let chain = |name: &str, hook: &str, priority: &str, rules: &[String]| {
        let mut text = format!(
            "add chain ip {t} {name} {{ type filter hook {hook} priority {priority}; policy accept; }}
             flush chain ip {t} {name}
"
        );
        for rule in rules {
            text.push_str(&format!(
                "add rule ip {t} {name} {rule}
"
            ));
        }
        text
    };
    let mut script = format!(
        "add table ip {t}
add set ip {t} {set} {{ type ipv4_addr; }}
"
    );
    script += &chain(
        "guard_input",
        "input",
        "filter - 10",
        &[
            format!("{capture} {syn} socket transparent 1 accept"),
            format!("{capture} {syn} counter reject with tcp reset"),
        ],
    );
    script += &chain(
        "guard_forward",
        "forward",
        "filter - 10",
        &[
            format!("{syn} ct status dnat accept"),
            format!("{syn} ip daddr @{set} counter reject with tcp reset"),
            format!("{syn} ip saddr @{set} counter reject with tcp reset"),
        ],
    );
    script += &chain(
        "notrack_pre",
        "prerouting",
        "raw",
        &[format!("{capture} ip saddr @{set} notrack")],
    );
    script += &chain(
        "notrack_out",
        "output",
        "raw",
        &[format!("{proxy} ip daddr @{set} notrack")],
    );
    script
}

/// Installs the rule, route, nftables table and iptables nat chains (idempotent: what is
/// already right is left alone, so a restart changes nothing).
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

    run_script(
        "nft -f - (table ip mesh)",
        "nft",
        &["-f", "-"],
        &nft_ruleset(),
    )?;
    // The guards are in place: what an earlier version kept in iptables can go (its set
    // would no longer be kept up to date).
    remove_legacy(&mut Vec::new(), &mut Vec::new());

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
    Ok(())
}

/// Makes the guards' set of enrolled pods equal `ips`, atomically (one transaction).
pub fn sync_enrolled_set(
    ips: &std::collections::BTreeSet<std::net::Ipv4Addr>,
) -> Result<(), CaptureError> {
    let t = NFT_TABLE;
    let set = ENROLLED_SET;
    let mut script = format!(
        "flush set ip {t} {set}
"
    );
    if !ips.is_empty() {
        let list: Vec<String> = ips.iter().map(ToString::to_string).collect();
        script.push_str(&format!(
            "add element ip {t} {set} {{ {} }}
",
            list.join(", ")
        ));
    }
    let command = format!("nft -f - (set {set}, {} entries)", ips.len());
    run_script(&command, "nft", &["-f", "-"], &script)
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
        ("nat", "PREROUTING", NAT_CHAIN),
        ("nat", "OUTPUT", NAT_OUTPUT_CHAIN),
    ] {
        remove_chain(table, builtin, chain, &mut removed, &mut errors);
    }
    if output("nft", &["list", "table", "ip", NFT_TABLE]).is_ok() {
        match run("nft", &["delete", "table", "ip", NFT_TABLE]) {
            Ok(()) => removed.push(format!("nftables table ip {NFT_TABLE}")),
            Err(err) => errors.push(err.to_string()),
        }
    }
    remove_legacy(&mut removed, &mut errors);
    if errors.is_empty() {
        Ok(removed)
    } else {
        Err(CaptureError::Command {
            command: "removing the node rules".into(),
            message: errors.join("; "),
        })
    }
}

/// Removes the jumps to `chain` from `builtin` and the chain itself, if it is there.
fn remove_chain(
    table: &str,
    builtin: &str,
    chain: &str,
    removed: &mut Vec<String>,
    errors: &mut Vec<String>,
) {
    if iptables(table, &["-S", chain]).is_err() {
        return; // not there
    }
    while iptables(table, &["-D", builtin, "-j", chain]).is_ok() {}
    match iptables(table, &["-F", chain]).and_then(|_| iptables(table, &["-X", chain])) {
        Ok(_) => removed.push(format!("iptables {table} chain {chain}")),
        Err(err) => errors.push(err.to_string()),
    }
}

/// Removes the iptables guards and ipset of versions before the nftables table.
fn remove_legacy(removed: &mut Vec<String>, errors: &mut Vec<String>) {
    for (table, builtin, chain) in LEGACY_CHAINS {
        remove_chain(table, builtin, chain, removed, errors);
    }
    // After the chains: a set cannot be destroyed while a rule refers to it. No ipset tool,
    // no sets.
    let sets = output("ipset", &["list", "-n"]).unwrap_or_default();
    for set in LEGACY_SETS {
        if sets.lines().any(|l| l.trim() == set) {
            match run("ipset", &["destroy", set]) {
                Ok(()) => removed.push(format!("ipset {set}")),
                Err(err) => errors.push(err.to_string()),
            }
        }
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
