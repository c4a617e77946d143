//! `networking.istio.io` (v1alpha3, v1beta1, v1): VirtualService ([`virtual_service`]) and
//! DestinationRule ([`destination_rule`]), complete with Istio's field names and value rules.
//! Fields whose behaviour the mesh does not implement yet are still decoded, checked and
//! recorded, so a typo in them is reported today.

pub mod destination_rule;
pub mod virtual_service;

pub use destination_rule::*;
pub use virtual_service::*;

use std::collections::BTreeSet;

use serde_yaml_ng::Value;

use crate::decode::{Cx, Decode, Fields};

/// Checks a host name as Istio does: a DNS name, optionally starting with `*` (wildcard).
pub fn check_host(host: &str) -> Result<(), String> {
    if host == "*" {
        return Ok(());
    }
    let name = host.strip_prefix("*.").unwrap_or(host);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "{host:?} is not a valid host (a DNS name, optionally starting with `*.`)"
        ));
    }
    Ok(())
}

fn check_export_to(f: &mut Fields<'_, '_>, export_to: &[String]) {
    let mut seen = BTreeSet::new();
    for (i, entry) in export_to.iter().enumerate() {
        if !seen.insert(entry) {
            f.error_item("exportTo", i, format!("{entry:?} is listed twice"));
        } else if entry != "." && entry != "*" && check_host(entry).is_err() {
            f.error_item(
                "exportTo",
                i,
                format!("{entry:?} is not `.`, `*` or a namespace name"),
            );
        }
    }
    if export_to.len() > 1 && export_to.iter().any(|e| e == "*") {
        f.error_at("exportTo", "`*` must be the only entry");
    }
}

fn check_port(f: &mut Fields<'_, '_>, key: &str, port: Option<u32>) {
    if let Some(port) = port {
        if !(1..=65535).contains(&port) {
            f.error_at(key, format!("port {port} is not between 1 and 65535"));
        }
    }
}

/// `PortSelector` (`{number: 8080}`).
#[derive(Clone, Copy, Debug, Default)]
struct PortSelector {
    number: u32,
}

impl Decode for PortSelector {
    fn decode(value: &Value, cx: &mut Cx) -> Option<Self> {
        cx.object(value, true, |f| {
            let number = f.req("number");
            check_port(f, "number", Some(number));
            PortSelector { number }
        })
    }
}

#[cfg(test)]
fn errors<T: Decode>(yaml: &str) -> Vec<String> {
    crate::decode::decode_yaml::<T>(yaml).1
}
