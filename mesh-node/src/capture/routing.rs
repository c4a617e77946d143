//! The node-side rules that complete capture:
//! - policy routing: packets carrying `MARK_CAPTURE` are delivered locally
//!   (`ip rule fwmark 0x200/0x200 lookup 100`, `local 0.0.0.0/0 dev lo table 100`);
//! - `MESH-PREROUTING` (nat): captured flows skip kube-proxy's DNAT, so the proxy sees the
//!   Service VIP itself and dials endpoints directly;
//! - `MESH-GUARD` (filter INPUT): a captured SYN that no transparent proxy socket will take
//!   (mesh-node is down) is refused with a TCP reset: the mesh fails closed, promptly.
//!
//! Every step is idempotent, so a restart changes nothing that is already in place.

use std::process::Command;

use mesh_common::{MARK_CAPTURE, ROUTE_TABLE, RULE_PRIORITY};

use super::CaptureError;

const GUARD_CHAIN: &str = "MESH-GUARD";
const NAT_CHAIN: &str = "MESH-PREROUTING";

fn mark() -> String {
    format!("{MARK_CAPTURE:#x}/{MARK_CAPTURE:#x}")
}

/// Installs the rule, route and iptables chains (idempotent).
pub fn install() -> Result<(), CaptureError> {
    let pref = RULE_PRIORITY.to_string();
    let table = ROUTE_TABLE.to_string();
    let mark = mark();
    let existing = output("ip", &["rule", "show", "pref", &pref])?;
    if !existing.contains(&format!("lookup {table}")) {
        run(
            "ip",
            &[
                "rule", "add", "pref", &pref, "fwmark", &mark, "lookup", &table,
            ],
        )?;
    }
    run(
        "ip",
        &[
            "route",
            "replace",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            &table,
        ],
    )?;

    ensure_chain("filter", GUARD_CHAIN)?;
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
    ensure_rule("filter", GUARD_CHAIN, &accept)?;
    ensure_rule("filter", GUARD_CHAIN, &reject)?;
    ensure_jump("filter", "INPUT", GUARD_CHAIN)?;

    ensure_chain("nat", NAT_CHAIN)?;
    ensure_rule(
        "nat",
        NAT_CHAIN,
        &["-m", "mark", "--mark", &mark, "-j", "ACCEPT"],
    )?;
    ensure_jump("nat", "PREROUTING", NAT_CHAIN)?;
    Ok(())
}

/// Removes everything [`install`] adds; what is already gone is fine.
pub fn remove() -> Result<Vec<String>, CaptureError> {
    let mut removed = Vec::new();
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
    if output("ip", &["route", "show", "table", &table]).is_ok_and(|r| !r.trim().is_empty()) {
        run("ip", &["route", "flush", "table", &table])?;
        removed.push(format!("routes of table {table}"));
    }
    for (table, builtin, chain) in [
        ("filter", "INPUT", GUARD_CHAIN),
        ("nat", "PREROUTING", NAT_CHAIN),
    ] {
        while iptables(table, &["-D", builtin, "-j", chain]).is_ok() {}
        if iptables(table, &["-F", chain]).is_ok() {
            iptables(table, &["-X", chain])?;
            removed.push(format!("iptables {table} chain {chain}"));
        }
    }
    Ok(removed)
}

fn ensure_chain(table: &str, chain: &str) -> Result<(), CaptureError> {
    if iptables(table, &["-S", chain]).is_err() {
        iptables(table, &["-N", chain])?;
    }
    Ok(())
}

fn ensure_rule(table: &str, chain: &str, rule: &[&str]) -> Result<(), CaptureError> {
    let check: Vec<&str> = ["-C", chain]
        .into_iter()
        .chain(rule.iter().copied())
        .collect();
    if iptables(table, &check).is_err() {
        let append: Vec<&str> = ["-A", chain]
            .into_iter()
            .chain(rule.iter().copied())
            .collect();
        iptables(table, &append)?;
    }
    Ok(())
}

/// Jumps to `chain` first thing in `builtin`, so it runs before kube-proxy's chains.
fn ensure_jump(table: &str, builtin: &str, chain: &str) -> Result<(), CaptureError> {
    if iptables(table, &["-C", builtin, "-j", chain]).is_err() {
        iptables(table, &["-I", builtin, "1", "-j", chain])?;
    }
    Ok(())
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
