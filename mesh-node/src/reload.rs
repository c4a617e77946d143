//! Watches the config file and swaps in a new snapshot when it changes. An invalid update is
//! rejected with its diagnostics logged, and the last good snapshot keeps serving.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;

use crate::{config, gate::Revocations, metrics::ConfigMetrics, state::State};

/// How often the file's metadata is checked.
const POLL: Duration = Duration::from_millis(250);

/// Identity of one version of the file (catches in-place edits and atomic renames).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

/// The file's current version; take it before reading the file, so an edit made while the
/// read is being used is still seen as a change.
pub fn version(path: &Path) -> Option<Version> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some(Version {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode: meta.ino(),
    })
}

/// Logs what a new snapshot does differently from what its resources may lead one to expect:
/// AuthorizationPolicies whose HTTP rules are enforced at L4 only, and (when it becomes so)
/// a dual-stack cluster, whose IPv6 the mesh does not carry.
pub fn warn_about(state: &State, previous: Option<&State>) {
    if state.dual_stack && !previous.is_some_and(|p| p.dual_stack) {
        tracing::warn!(
            "the cluster is dual-stack (pods or Services with IPv6 addresses): the mesh \
             carries IPv4 only, so IPv6 TCP and UDP to and from enrolled pods are dropped \
             (ICMPv6 passes); give enrolled workloads IPv4 to talk over"
        );
    }
    for policy in state.l7_policies_at_l4() {
        tracing::warn!(
            policy,
            "AuthorizationPolicy has HTTP rules and selects pods serving TCP ports: there they are \
             enforced at L4 as Istio ambient's ztunnel does (an ALLOW rule with HTTP fields \
             never matches, a DENY rule applies on its L4 part); on HTTP ports per request"
        );
    }
}

/// Where every config generation goes, from either source: the first (`Publisher::first`)
/// and each later one (`Publisher::publish`).
pub struct Publisher {
    /// The snapshot the proxy serves from.
    pub state: Arc<ArcSwap<State>>,
    /// The generation and rejection metrics.
    pub metrics: ConfigMetrics,
    /// The open connections the new policy may revoke.
    pub revocations: Arc<Revocations>,
    /// Hands the generation to the datapath, which updates the kernel's maps; `false` once
    /// the datapath is gone.
    pub datapath: Box<dyn Fn(Arc<State>) -> bool + Send + Sync>,
}

impl Publisher {
    /// Starts from the first generation: warns about it, counts it, stores it, starts the
    /// revocations' registry from it and hands it to the datapath (which applies it before
    /// anything is served).
    pub fn first(
        first: State,
        metrics: ConfigMetrics,
        registry: &mut prometheus_client::registry::Registry,
        datapath: Box<dyn Fn(Arc<State>) -> bool + Send + Sync>,
    ) -> Publisher {
        warn_about(&first, None);
        metrics.generation.set(first.generation as i64);
        let first = Arc::new(first);
        let publisher = Publisher {
            revocations: Arc::new(Revocations::new(first.clone(), registry)),
            state: Arc::new(ArcSwap::new(first.clone())),
            metrics,
            datapath,
        };
        (publisher.datapath)(first);
        publisher
    }

    /// Serves `next` from now on: warns about what it does unexpectedly, stores it, counts it,
    /// closes the open connections its policy refuses, and sends it to the datapath (`false`
    /// once the datapath is gone).
    pub fn publish(&self, next: Arc<State>) -> bool {
        warn_about(&next, Some(&self.state.load()));
        self.state.store(next.clone());
        self.metrics.generation.set(next.generation as i64);
        self.revocations.sweep(&next);
        (self.datapath)(next)
    }
}

/// Polls `path` forever, starting from version `seen` (the one the current snapshot was built
/// from); each valid change becomes the next generation.
pub async fn watch(
    mut seen: Option<Version>,
    path: PathBuf,
    node: String,
    mesh: crate::config::semantics::Mesh,
    publisher: Publisher,
) {
    loop {
        tokio::time::sleep(POLL).await;
        let now = version(&path);
        if now == seen {
            continue;
        }
        seen = now;
        match config::load_file(&path) {
            Ok(resources) => {
                for warning in &resources.warnings {
                    tracing::warn!("{warning}");
                }
                let generation = publisher.state.load().generation + 1;
                let next = Arc::new(State::build(&resources, &node, &mesh, generation));
                tracing::info!(generation, file = %path.display(), "config reloaded");
                if !publisher.publish(next) {
                    return;
                }
            }
            Err(err) => {
                publisher.metrics.rejected.inc();
                tracing::error!(
                    "config update rejected, generation {} keeps serving:\n{}",
                    publisher.state.load().generation,
                    err.render()
                );
            }
        }
    }
}
