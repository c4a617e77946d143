//! The node's pin directory: where it is, taking it exclusively, replacing a pinned link
//! without a gap, what an earlier version left there, and removing all of it (`mesh-node
//! uninstall`).

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap, Map, MapData},
    programs::links::{FdLink, PinnedLink},
};
use mesh_common::{maps, COUNTER_CAPACITY};

use super::{routing, CaptureError};

/// Map pins an earlier version of mesh-node made that this one no longer uses.
const OBSOLETE_PINS: [&str; 1] = ["MESH_ENROLLED"];

/// Gets a pin directory ready for this version's object, before it is loaded: a map pin it
/// no longer uses is removed, and so is one it would outgrow (the counters gained slots;
/// aya would reuse the smaller pinned map as it is). Returns the enrolled pods the earlier
/// version's `MESH_ENROLLED` held: they must stay refused, not go uncaptured, until the
/// first config binds them (`PodMaps::seed_enrolled`).
pub fn prepare(dir: &Path) -> Result<Vec<Ipv4Addr>, CaptureError> {
    let mut enrolled = Vec::new();
    let old = dir.join("MESH_ENROLLED");
    if let Ok(data) = MapData::from_pin(&old) {
        if let Ok(map) = HashMap::<MapData, u32, u32>::try_from(Map::HashMap(data)) {
            enrolled = map
                .keys()
                .filter_map(Result::ok)
                .map(|key| Ipv4Addr::from(key.to_ne_bytes()))
                .collect();
        }
    }
    for name in OBSOLETE_PINS {
        if fs::remove_file(dir.join(name)).is_ok() {
            tracing::info!(pin = name, "removed a map pin an earlier version left");
        }
    }
    let counters = dir.join(maps::COUNTERS);
    let outgrown = MapData::from_pin(&counters)
        .ok()
        .and_then(|data| data.info().ok())
        .is_some_and(|info| info.max_entries() < COUNTER_CAPACITY);
    if outgrown {
        fs::remove_file(&counters).map_err(|err| CaptureError::Pin {
            path: counters.clone(),
            message: err.to_string(),
        })?;
        tracing::info!(
            pin = maps::COUNTERS,
            "replaced a smaller map an earlier version pinned"
        );
    }
    Ok(enrolled)
}

/// The per-node pin directory under the bpffs root. bpffs refuses names with dots, which
/// node names (FQDNs) often have.
pub fn pin_dir(bpffs: &Path, node: &str) -> PathBuf {
    let safe: String = node
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    bpffs.join(safe)
}

/// Pins `link` at `path`, replacing (and so detaching) whatever was pinned there before. The
/// new pin is made under another name and renamed over the old one, so at every instant one
/// of the two links is pinned and attached.
pub(super) fn replace_pin(path: &Path, link: FdLink) -> Result<(), CaptureError> {
    let pin_error = |path: &Path, err: &dyn std::fmt::Display| CaptureError::Pin {
        path: path.to_path_buf(),
        message: err.to_string(),
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push("-new");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    link.pin(&tmp).map_err(|err| pin_error(&tmp, &err))?;
    fs::rename(&tmp, path).map_err(|err| pin_error(path, &err))
}

/// Takes the exclusive lock on a node's pin directory.
pub(super) fn lock(dir: &Path) -> Result<std::os::fd::OwnedFd, CaptureError> {
    match crate::sys::try_lock_dir(dir) {
        Ok(Some(fd)) => Ok(fd),
        Ok(None) => Err(CaptureError::Busy(dir.to_path_buf())),
        Err(err) => Err(CaptureError::Pin {
            path: dir.to_path_buf(),
            message: format!("cannot lock: {err}"),
        }),
    }
}

/// Removes every attachment, pin, rule and route of `node`. Returns what was removed. Every
/// step is tried; the errors of all failed steps are reported together.
pub fn uninstall(bpffs: &Path, node: &str) -> Result<Vec<String>, CaptureError> {
    let dir = pin_dir(bpffs, node);
    let mut removed = Vec::new();
    let mut errors = Vec::new();
    let _lock = if dir.exists() {
        Some(lock(&dir)?)
    } else {
        None
    };
    if let Ok(entries) = fs::read_dir(dir.join("links")) {
        for entry in entries.flatten() {
            let path = entry.path();
            let result = match PinnedLink::from_pin(&path) {
                // Dropping the unpinned link detaches it.
                Ok(link) => link.unpin().map(drop),
                Err(_) => fs::remove_file(&path),
            };
            match result {
                Ok(()) => removed.push(format!("link {}", path.display())),
                Err(err) => errors.push(format!("{}: {err}", path.display())),
            }
        }
    }
    if let Ok(entries) = fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                continue;
            }
            match fs::remove_file(&path) {
                Ok(()) => removed.push(format!("map {}", path.display())),
                Err(err) => errors.push(format!("{}: {err}", path.display())),
            }
        }
    }
    // Rules before the directory: while the lock is held no `run` can start in between and
    // have its fresh rules removed.
    match routing::remove() {
        Ok(items) => removed.extend(items),
        Err(err) => errors.push(err.to_string()),
    }
    for path in [dir.join("links"), dir.clone()] {
        if path.exists() {
            if let Err(err) = fs::remove_dir(&path) {
                errors.push(format!("{}: {err}", path.display()));
            }
        }
    }
    if errors.is_empty() {
        Ok(removed)
    } else {
        Err(CaptureError::Command {
            command: format!("uninstall of node {node}"),
            message: errors.join("; "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_dirs_have_no_dots() {
        assert_eq!(
            pin_dir(Path::new("/sys/fs/bpf/mesh"), "node-1.example.com"),
            Path::new("/sys/fs/bpf/mesh/node-1_example_com")
        );
    }
}
