//! Revocation: a connection the gate let through stays let through only while the policy
//! agrees. Every connection decided as a whole ([`Served::Connection`]: a same-node
//! connection, a plaintext one from outside the mesh, an HBONE stream) is registered here
//! before its decision is made, and the decision's inputs are recorded with it; each new
//! config generation re-decides the connections whose destination's PeerAuthentication or
//! AuthorizationPolicy changed, and the ones now refused are closed (their relay resets both
//! sides), logged and counted with the policy that decided. HTTP connections are decided
//! request by request and are not registered.
//!
//! No change can slip between a decision and its registration: the registration exists
//! before the snapshot the decision reads is loaded, and [`Registration::commit`] compares
//! that snapshot's generation with the last one swept (under the lock the sweep holds): a
//! decision older than the last sweep is made again on the swept snapshot before the
//! connection goes on.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard, OnceLock},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use super::{Client, Decision, Served};
use crate::{
    config::{security::Action, semantics::Identity},
    state::{State, Workload},
};

/// What a connection's decision was made on: enough to make it again on another snapshot.
#[derive(Clone, Debug)]
pub struct Asked {
    /// The enrolled pod of this node the connection reaches.
    pub destination: Ipv4Addr,
    /// The client as the gate saw it.
    pub client: SocketAddr,
    /// The identity the client proved, if any.
    pub identity: Option<Identity>,
    /// `podIP:port`.
    pub target: SocketAddr,
    /// `outbound`, `inbound` or `hbone`, for the log and the metric.
    pub direction: &'static str,
}

impl Asked {
    /// The gate's decision on `state`: `None` when the destination is no longer an enrolled
    /// pod of this node (its policy is then nobody's to apply here: the pod is going away).
    fn decide(&self, state: &State) -> Option<Result<(), Decision>> {
        let destination = state
            .workloads
            .get(&self.destination)
            .filter(|w| w.enrolled && state.is_local(w))?;
        let client = Client {
            addr: self.client,
            identity: self.identity.as_deref(),
        };
        Some(super::connection(destination, client, self.target, Served::Connection).map(drop))
    }
}

/// Why a connection was revoked.
#[derive(Clone, Debug)]
pub struct Revoked {
    /// The policy that decided (`namespace/name`, or the ALLOW policies none of which
    /// matches any more, or `-`).
    pub policy: String,
    /// The decision's reason.
    pub reason: &'static str,
    /// Not the policy: the process drained past its drain timeout after a successor took
    /// the node over ([`Revocations::close_all`]).
    pub drained: bool,
}

impl std::fmt::Display for Revoked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.drained {
            return f.write_str(self.reason);
        }
        write!(
            f,
            "revoked by a config change ({}): {}",
            self.policy, self.reason
        )
    }
}

/// One registered connection.
#[derive(Default)]
struct Entry {
    /// Set by [`Registration::commit`]; until then the sweep passes the entry by.
    asked: OnceLock<Asked>,
    /// Why the connection was revoked.
    revoked: OnceLock<Revoked>,
    /// Wakes the connection's relay once `revoked` is set.
    wake: tokio::sync::Notify,
}

struct Inner {
    next: u64,
    entries: HashMap<u64, Arc<Entry>>,
    /// The last snapshot swept: every committed decision agrees with it.
    swept: Arc<State>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RevokedLabels {
    direction: &'static str,
    /// The policy that decided (`namespace/name`); for an ALLOW set that no longer matches,
    /// the ALLOW policies of the destination.
    policy: String,
}

/// The connections decided as a whole that are open now.
pub struct Revocations {
    inner: Mutex<Inner>,
    revoked: Family<RevokedLabels, Counter>,
}

impl Revocations {
    /// Starts from the first snapshot, registering `mesh_proxy_connections_revoked`.
    pub fn new(first: Arc<State>, registry: &mut Registry) -> Self {
        let revoked = Family::default();
        registry.register(
            "mesh_proxy_connections_revoked",
            "Open connections closed because a config change made the policy refuse them, \
             by the policy that decided",
            revoked.clone(),
        );
        Revocations {
            inner: Mutex::new(Inner {
                next: 0,
                entries: HashMap::new(),
                swept: first,
            }),
            revoked,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a connection before its decision is made (before the snapshot it is made
    /// on is loaded). Dropping the registration removes it.
    pub fn register(&self) -> Registration<'_> {
        let entry = Arc::new(Entry::default());
        let mut inner = self.lock();
        inner.next += 1;
        let id = inner.next;
        inner.entries.insert(id, entry.clone());
        Registration {
            revocations: self,
            id,
            entry,
        }
    }

    /// After `next` is published: re-decides every committed connection whose destination's
    /// policy differs from the last swept snapshot's, and revokes the ones now refused.
    pub fn sweep(&self, next: &Arc<State>) {
        let mut inner = self.lock();
        let previous = std::mem::replace(&mut inner.swept, next.clone());
        let mut unchanged: HashMap<Ipv4Addr, bool> = HashMap::new();
        let mut revoked = 0usize;
        for entry in inner.entries.values() {
            let Some(asked) = entry.asked.get() else {
                continue;
            };
            if entry.revoked.get().is_some() {
                continue;
            }
            let same = *unchanged.entry(asked.destination).or_insert_with(|| {
                same_policy(
                    previous.workloads.get(&asked.destination),
                    next.workloads.get(&asked.destination),
                )
            });
            if same {
                continue;
            }
            if let Some(Err(decision)) = asked.decide(next) {
                self.revoke(entry, asked, decision, next);
                revoked += 1;
            }
        }
        if revoked > 0 {
            tracing::info!(
                generation = next.generation,
                revoked,
                "open connections revoked by the new config"
            );
        }
    }

    /// Stops every registered connection, decided here or not (the drain timeout after a
    /// takeover): their relays end and reset both sides. Returns how many.
    pub fn close_all(&self, reason: &'static str) -> usize {
        let inner = self.lock();
        let mut closed = 0;
        for entry in inner.entries.values() {
            let drained = Revoked {
                policy: "-".into(),
                reason,
                drained: true,
            };
            if entry.revoked.set(drained).is_ok() {
                entry.wake.notify_one();
                closed += 1;
            }
        }
        closed
    }

    fn revoke(&self, entry: &Entry, asked: &Asked, decision: Decision, state: &State) {
        let destination = state.workloads.get(&asked.destination);
        let policy = deciding_policy(&decision, destination);
        tracing::warn!(
            direction = asked.direction,
            client = %asked.client,
            identity = asked.identity.as_deref().unwrap_or("-"),
            target = %asked.target,
            destination = destination.map(Workload::qualified).unwrap_or_default(),
            policy,
            generation = state.generation,
            "open connection revoked: {}",
            decision.reason
        );
        self.revoked
            .get_or_create(&RevokedLabels {
                direction: asked.direction,
                policy: policy.clone(),
            })
            .inc();
        let revoked = Revoked {
            policy,
            reason: decision.reason,
            drained: false,
        };
        if entry.revoked.set(revoked).is_ok() {
            // A permit is kept if the relay is not waiting yet.
            entry.wake.notify_one();
        }
    }
}

/// The policy that decided, as the log and the metric name it.
fn deciding_policy(decision: &Decision, destination: Option<&Workload>) -> String {
    if let Some(policy) = &decision.policy {
        return policy.clone();
    }
    let allow: Vec<String> = destination
        .map(|d| {
            d.authorization
                .iter()
                .filter(|p| p.0.spec.action == Action::Allow)
                .map(|p| p.0.metadata.qualified())
                .collect()
        })
        .unwrap_or_default();
    if allow.is_empty() {
        "-".to_string()
    } else {
        allow.join(",")
    }
}

/// Whether a pod's PeerAuthentication and AuthorizationPolicies are the same in two
/// snapshots (a pod in one only counts as changed).
fn same_policy(before: Option<&Workload>, after: Option<&Workload>) -> bool {
    match (before, after) {
        (Some(a), Some(b)) => {
            a.mtls == b.mtls
                && a.authorization.len() == b.authorization.len()
                && a.authorization
                    .iter()
                    .zip(&b.authorization)
                    .all(|(x, y)| x == y || *x.0 == *y.0)
        }
        (None, None) => true,
        _ => false,
    }
}

/// A connection's place in [`Revocations`], held as long as the connection lives.
pub struct Registration<'a> {
    revocations: &'a Revocations,
    id: u64,
    entry: Arc<Entry>,
}

impl Registration<'_> {
    /// Records what the connection was let through on, decided on `decided` (the snapshot
    /// loaded after [`Revocations::register`]). When a newer snapshot was swept meanwhile,
    /// the decision is made again on it: `Err` is the decision that now refuses the
    /// connection.
    pub fn commit(&self, asked: Asked, decided: &State) -> Result<(), Decision> {
        let inner = self.revocations.lock();
        if inner.swept.generation > decided.generation {
            if let Some(Err(decision)) = asked.decide(&inner.swept) {
                return Err(decision);
            }
        }
        let _ = self.entry.asked.set(asked);
        Ok(())
    }

    /// Resolves once a config change revoked the connection.
    pub async fn revoked(&self) {
        loop {
            if self.entry.revoked.get().is_some() {
                return;
            }
            self.entry.wake.notified().await;
        }
    }

    /// Why the connection was revoked, once it was.
    pub fn revocation(&self) -> Option<&Revoked> {
        self.entry.revoked.get()
    }
}

/// Resolves once the connection of `registration` is revoked; never without one.
pub async fn until_revoked(registration: Option<&Registration<'_>>) {
    match registration {
        Some(registration) => registration.revoked().await,
        None => std::future::pending().await,
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.revocations.lock().entries.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::parse_str;

    const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: node-a, containers: [{name: c, image: x}]}
status: {podIP: 100.64.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {nodeName: node-a, containers: [{name: c, image: x}]}
status: {podIP: 100.64.0.3}
"#;

    const DENY_WEB: &str = r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: nothing, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
"#;

    const STRICT_WEB: &str = r#"
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: STRICT}
"#;

    fn state(extra: &str, generation: u64) -> Arc<State> {
        let yaml = format!("{PODS}{extra}");
        let resources = parse_str("revoke.yaml", &yaml).expect("valid");
        Arc::new(State::build(
            &resources,
            "node-a",
            &Default::default(),
            generation,
        ))
    }

    fn asked(destination: [u8; 4], identity: Option<&str>) -> Asked {
        Asked {
            destination: destination.into(),
            client: "100.64.0.9:40000".parse().unwrap(),
            identity: identity.map(|i| Identity::parse(i).unwrap()),
            target: SocketAddr::from((destination, 8080)),
            direction: "inbound",
        }
    }

    /// A connection registered and decided on `decided`, to `destination`'s port 8080.
    fn committed<'r>(
        revocations: &'r Revocations,
        destination: [u8; 4],
        identity: Option<&str>,
        decided: &State,
    ) -> Registration<'r> {
        let registration = revocations.register();
        registration
            .commit(asked(destination, identity), decided)
            .expect("admitted");
        registration
    }

    fn is_revoked(registration: &Registration<'_>) -> Option<Revoked> {
        registration.revocation().cloned()
    }

    const SA: &str = "spiffe://cluster.local/ns/shop/sa/client";

    #[test]
    fn a_change_that_refuses_closes_only_what_it_refuses() {
        let first = state("", 1);
        let revocations = Revocations::new(first.clone(), &mut Registry::default());
        let to_web = committed(&revocations, [100, 64, 0, 2], Some(SA), &first);
        let plaintext_to_web = committed(&revocations, [100, 64, 0, 2], None, &first);
        let to_db = committed(&revocations, [100, 64, 0, 3], Some(SA), &first);

        // STRICT on web: only the plaintext connection to web goes.
        revocations.sweep(&state(STRICT_WEB, 2));
        let revoked = is_revoked(&plaintext_to_web).expect("plaintext revoked");
        assert_eq!(revoked.policy, "shop/strict");
        assert!(is_revoked(&to_web).is_none());
        assert!(is_revoked(&to_db).is_none());

        // Allow-nothing on web: the mTLS one goes too; db keeps its connection.
        let third = state(&format!("{STRICT_WEB}{DENY_WEB}"), 3);
        revocations.sweep(&third);
        let revoked = is_revoked(&to_web).expect("mTLS revoked");
        assert!(is_revoked(&to_db).is_none());
        // No ALLOW policy matches: the ones that apply are named.
        assert_eq!(revoked.policy, "shop/nothing");
    }

    #[test]
    fn a_decision_made_on_a_snapshot_older_than_the_last_sweep_is_made_again() {
        let first = state("", 1);
        let revocations = Revocations::new(first.clone(), &mut Registry::default());
        // Registered, and deciding on generation 1 while generation 2 is published and swept.
        let late = revocations.register();
        revocations.sweep(&state(DENY_WEB, 2));
        let refused = late.commit(asked([100, 64, 0, 2], Some(SA)), &first);
        assert!(refused.is_err(), "a stale decision was committed");
        // A decision on the swept snapshot stands.
        let fresh = revocations.register();
        fresh
            .commit(asked([100, 64, 0, 3], Some(SA)), &first)
            .expect("db is not refused");
    }

    #[test]
    fn a_registration_leaves_when_its_connection_ends() {
        let first = state("", 1);
        let revocations = Revocations::new(first.clone(), &mut Registry::default());
        let registration = committed(&revocations, [100, 64, 0, 2], Some(SA), &first);
        assert_eq!(revocations.lock().entries.len(), 1);
        drop(registration);
        assert!(revocations.lock().entries.is_empty());
    }

    #[tokio::test]
    async fn the_relay_wakes_when_revoked() {
        let first = state("", 1);
        let revocations = Revocations::new(first.clone(), &mut Registry::default());
        let registration = committed(&revocations, [100, 64, 0, 2], Some(SA), &first);
        let waiting = registration.revoked();
        revocations.sweep(&state(DENY_WEB, 2));
        tokio::time::timeout(std::time::Duration::from_secs(1), waiting)
            .await
            .expect("woken");
    }
}
