//! Workload identity: the node's workload certificates, obtained from the signer.
//!
//! Certificates are short-lived leaves whose only name is the workload's SPIFFE ID
//! (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`, a URI SAN). A node proxy holds no CA key: it
//! asks the signer (`mesh-node ca serve`, [`signer`]) for each certificate with a CSR over a
//! key it made ([`client`]), and the signer signs only identities of pods scheduled on the
//! caller's node. The node holds certificates only for the service accounts of the enrolled
//! pods on its own node ([`Certificates::for_workload`] refuses others), renews each at half
//! its lifetime (retrying with backoff while the signer is away), never presents an expired
//! one, and drops those no local pod needs any more. Leaf keys never leave memory. Peers are
//! verified against the trust bundle ([`bundle`]), which may hold several roots.

pub mod bundle;
pub mod ca;
pub mod client;
pub mod signer;
pub mod tls;

use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer},
    server::ServerConfig,
    sign::CertifiedKey,
};

pub use ca::Ca;

use crate::state::Workload;
use bundle::SharedBundle;
use client::{SignError, SignerClient};

/// Default lifetime of workload certificates.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// The first retry after a failed renewal; doubled each time.
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between retries.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// What can go wrong with identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A CA or bundle file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A CA or bundle file is not a usable certificate or key.
    #[error("{path}: {reason}")]
    BadCa {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Signing failed.
    #[error("issuing a certificate for {identity}: {reason}")]
    Issue {
        /// The SPIFFE ID.
        identity: String,
        /// Why.
        reason: String,
    },
    /// The signer did not give a certificate.
    #[error("no certificate for {identity}: {source}")]
    Signer {
        /// The SPIFFE ID.
        identity: String,
        /// Why.
        source: Arc<SignError>,
    },
    /// The certificate held expired and could not be renewed: it is not presented.
    #[error("the certificate of {identity} expired {ago:?} ago and the signer has not renewed it: refused ({source})")]
    Expired {
        /// The SPIFFE ID.
        identity: String,
        /// Since when.
        ago: Duration,
        /// Why the renewal failed.
        source: Arc<SignError>,
    },
    /// A certificate was asked for a workload this node does not host.
    #[error("workload {workload} runs on node {node:?}, not on this node: no certificate issued")]
    NotLocal {
        /// `namespace/name`.
        workload: String,
        /// Its node.
        node: Option<String>,
    },
}

/// A new key and its certificate chain (the leaf first).
pub struct Leaf {
    /// The leaf, then the intermediates (DER).
    pub chain: Vec<CertificateDer<'static>>,
    /// Its private key (PKCS#8).
    pub key: PrivateKeyDer<'static>,
    /// The leaf's `notAfter`.
    pub expires: SystemTime,
}

/// A workload certificate in use, with the TLS server config that presents it.
pub struct WorkloadCert {
    /// The SPIFFE ID it certifies.
    pub identity: String,
    /// Increases with every certificate the node obtains: pooled connections remember the one
    /// they were made with, and take no new streams once it has been replaced.
    pub generation: u64,
    /// Certificate chain and signing key, for rustls.
    pub certified: Arc<CertifiedKey>,
    /// Accepts HBONE connections to this workload: presents the certificate, requires a
    /// client certificate with a SPIFFE ID of the trust domain, TLS 1.3 only.
    pub server: Arc<ServerConfig>,
    /// `notAfter`.
    pub expires: SystemTime,
    /// When it is renewed (half its remaining lifetime when obtained).
    renew_at: Instant,
}

impl WorkloadCert {
    fn expired(&self, now: SystemTime) -> Option<Duration> {
        now.duration_since(self.expires).ok()
    }
}

impl std::fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity)
            .field("generation", &self.generation)
            .finish()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssuedLabels {
    /// `new` or `rotation`.
    reason: &'static str,
}

/// Certificate metrics.
#[derive(Clone, Default)]
pub struct CertMetrics {
    issued: Family<IssuedLabels, Counter>,
    held: Gauge,
    failures: Counter,
    overdue: Gauge,
    expiry: Gauge,
}

impl CertMetrics {
    /// Registers `mesh_certificates_issued_total`, `mesh_certificates`,
    /// `mesh_certificate_issue_failures_total`, `mesh_certificates_overdue` and
    /// `mesh_certificate_expiry_seconds`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = CertMetrics::default();
        registry.register(
            "mesh_certificates_issued",
            "Workload certificates obtained from the signer, by reason (new, rotation)",
            metrics.issued.clone(),
        );
        registry.register(
            "mesh_certificates",
            "Workload certificates this node holds",
            metrics.held.clone(),
        );
        registry.register(
            "mesh_certificate_issue_failures",
            "Requests for a workload certificate that failed (signer unreachable or refusing)",
            metrics.failures.clone(),
        );
        registry.register(
            "mesh_certificates_overdue",
            "Certificates held past their renewal time (half their lifetime): the signer has \
             not renewed them",
            metrics.overdue.clone(),
        );
        registry.register(
            "mesh_certificate_expiry_seconds",
            "Seconds until the soonest held certificate expires (negative: expired, refused)",
            metrics.expiry.clone(),
        );
        metrics
    }
}

/// One certificate held, as `/debug/state` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Held {
    /// The SPIFFE ID.
    pub identity: String,
    /// Its generation on this node.
    pub generation: u64,
    /// `notAfter`, seconds since the Unix epoch.
    pub expires_unix: u64,
    /// Whether it expired (it is then not presented).
    pub expired: bool,
    /// The last failure to renew it, while retried.
    pub renewal_failure: Option<String>,
}

/// When an identity may be asked for again after a failure.
struct Retry {
    at: Instant,
    delay: Duration,
    error: Arc<SignError>,
}

/// The node's workload certificates, by SPIFFE ID.
pub struct Certificates {
    signer: SignerClient,
    node: String,
    trust_domain: String,
    lifetime: Duration,
    certs: Mutex<HashMap<String, Arc<WorkloadCert>>>,
    retries: Mutex<HashMap<String, Retry>>,
    /// One request to the signer at a time.
    asking: tokio::sync::Mutex<()>,
    generation: AtomicU64,
    metrics: CertMetrics,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates")
            .field("node", &self.node)
            .finish()
    }
}

impl Certificates {
    /// A store for the workloads of `node`, asking `signer`; certificates of `lifetime` (the
    /// signer may cap it).
    pub fn new(
        signer: SignerClient,
        node: &str,
        trust_domain: &str,
        lifetime: Duration,
        metrics: CertMetrics,
    ) -> Certificates {
        Certificates {
            signer,
            node: node.to_string(),
            trust_domain: trust_domain.to_string(),
            lifetime,
            certs: Mutex::default(),
            retries: Mutex::default(),
            asking: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
            metrics,
        }
    }

    /// The trust bundle in force.
    pub fn bundle(&self) -> &SharedBundle {
        &self.signer.bundle
    }

    /// The trust domain of the identities this node accepts.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The current certificate of a workload of this node, obtained now if it has none (or
    /// only an expired one); an error for a workload of another node, and while the signer
    /// cannot give one.
    pub async fn for_workload(
        &self,
        workload: &Workload,
    ) -> Result<Arc<WorkloadCert>, IdentityError> {
        if workload.node.as_deref() != Some(self.node.as_str()) {
            return Err(IdentityError::NotLocal {
                workload: format!("{}/{}", workload.namespace, workload.name),
                node: workload.node.clone(),
            });
        }
        let identity = workload.identity.as_str();
        if let Some(cert) = self.usable(identity) {
            return Ok(cert);
        }
        // Boxed: asking the signer is a large future, which would otherwise size every
        // connection's task.
        Box::pin(self.obtain_now(identity)).await
    }

    /// [`Certificates::for_workload`] without a usable certificate: asks the signer now,
    /// unless it is being retried.
    async fn obtain_now(&self, identity: &str) -> Result<Arc<WorkloadCert>, IdentityError> {
        let _asking = self.asking.lock().await;
        // Another connection may have obtained it meanwhile.
        if let Some(cert) = self.usable(identity) {
            return Ok(cert);
        }
        let held = self.lock().get(identity).map(|c| c.generation);
        // While the signer is being retried, fail at once with its last error.
        let waiting = self
            .retries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(identity)
            .filter(|r| r.at > Instant::now())
            .map(|r| r.error.clone());
        let result = match waiting {
            Some(error) => Err(error),
            None => self.obtain(identity, held).await,
        };
        match result {
            Ok(cert) => Ok(cert),
            Err(source) => Err(match self.lock().get(identity) {
                Some(cert) => IdentityError::Expired {
                    identity: identity.to_string(),
                    ago: cert.expired(SystemTime::now()).unwrap_or_default(),
                    source,
                },
                None => IdentityError::Signer {
                    identity: identity.to_string(),
                    source,
                },
            }),
        }
    }

    /// The certificate held for `identity` unless it expired.
    fn usable(&self, identity: &str) -> Option<Arc<WorkloadCert>> {
        self.lock()
            .get(identity)
            .filter(|c| c.expired(SystemTime::now()).is_none())
            .cloned()
    }

    /// Keeps certificates for exactly `wanted` (the identities of this node's enrolled pods):
    /// asks for missing ones, renews those past half their lifetime, drops the rest; after a
    /// failure an identity is asked for again with exponential backoff. Returns how many were
    /// obtained. Called on every config change and every second.
    pub async fn sync(&self, wanted: &BTreeSet<String>) -> usize {
        let now = Instant::now();
        // Due: (identity, the generation being replaced, if any).
        let due: Vec<(String, Option<u64>)> = {
            let mut certs = self.lock();
            certs.retain(|identity, _| wanted.contains(identity));
            let mut retries = self.retries.lock().unwrap_or_else(|e| e.into_inner());
            retries.retain(|identity, _| wanted.contains(identity));
            wanted
                .iter()
                .filter(|identity| retries.get(*identity).is_none_or(|r| r.at <= now))
                .filter_map(|identity| match certs.get(identity) {
                    None => Some((identity.clone(), None)),
                    Some(cert) if cert.renew_at <= now => {
                        Some((identity.clone(), Some(cert.generation)))
                    }
                    Some(_) => None,
                })
                .collect()
        };
        let mut obtained = 0;
        if !due.is_empty() {
            let _asking = self.asking.lock().await;
            for (identity, replacing) in due {
                // A connection that needed the certificate at once may have obtained it.
                if self.lock().get(&identity).map(|c| c.generation) != replacing {
                    continue;
                }
                if self.obtain(&identity, replacing).await.is_ok() {
                    obtained += 1;
                }
            }
        }
        self.report();
        obtained
    }

    /// Asks the signer for `identity` and installs the answer; on failure, schedules the next
    /// attempt and warns (the certificate held, if any, stays in use until it expires).
    async fn obtain(
        &self,
        identity: &str,
        replacing: Option<u64>,
    ) -> Result<Arc<WorkloadCert>, Arc<SignError>> {
        let result = self.signer.sign(identity, self.lifetime).await;
        let leaf = match result {
            Ok(leaf) => leaf,
            Err(err) => {
                self.metrics.failures.inc();
                let err = Arc::new(err);
                let mut retries = self.retries.lock().unwrap_or_else(|e| e.into_inner());
                let delay = retries
                    .get(identity)
                    .map_or(RETRY_FIRST, |r| (r.delay * 2).min(RETRY_MAX));
                retries.insert(
                    identity.to_string(),
                    Retry {
                        at: Instant::now() + delay,
                        delay,
                        error: err.clone(),
                    },
                );
                drop(retries);
                match self.lock().get(identity).map(|c| c.expires) {
                    Some(expires) => match expires.duration_since(SystemTime::now()) {
                        Ok(left) => {
                            tracing::warn!(identity, retry_in = ?delay, expires_in = ?left, "certificate renewal failed, the current certificate stays in use: {err}")
                        }
                        Err(_) => {
                            tracing::error!(identity, retry_in = ?delay, "certificate expired and not renewed: connections needing it are refused: {err}")
                        }
                    },
                    None => tracing::error!(identity, retry_in = ?delay, "no certificate: {err}"),
                }
                return Err(err);
            }
        };
        self.retries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(identity);
        let certified = tls::certified_key(leaf.chain, leaf.key).map_err(|detail| {
            self.metrics.failures.inc();
            Arc::new(SignError::Unusable {
                address: self.signer.address.clone(),
                detail,
            })
        })?;
        let server = tls::server_config(
            certified.clone(),
            self.signer.bundle.clone(),
            &self.trust_domain,
        );
        let left = leaf
            .expires
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let reason = if replacing.is_some() {
            "rotation"
        } else {
            "new"
        };
        self.metrics
            .issued
            .get_or_create(&IssuedLabels { reason })
            .inc();
        let cert = Arc::new(WorkloadCert {
            identity: identity.to_string(),
            generation: self.generation.fetch_add(1, Ordering::Relaxed) + 1,
            certified,
            server,
            expires: leaf.expires,
            renew_at: Instant::now() + left / 2,
        });
        if replacing.is_some() {
            tracing::info!(
                identity,
                generation = cert.generation,
                "certificate rotated"
            );
        }
        self.lock().insert(identity.to_string(), cert.clone());
        Ok(cert)
    }

    /// Sets the gauges: certificates held, overdue, seconds to the soonest expiry.
    fn report(&self) {
        let (now, wall) = (Instant::now(), SystemTime::now());
        let certs = self.lock();
        self.metrics.held.set(certs.len() as i64);
        self.metrics
            .overdue
            .set(certs.values().filter(|c| c.renew_at <= now).count() as i64);
        let soonest = certs.values().map(|c| c.expires).min();
        self.metrics.expiry.set(
            soonest.map_or(0, |expires| match expires.duration_since(wall) {
                Ok(left) => left.as_secs() as i64,
                Err(past) => -(past.duration().as_secs() as i64),
            }),
        );
    }

    /// The last failure to obtain `identity`, if it is being retried.
    pub fn last_failure(&self, identity: &str) -> Option<String> {
        self.retries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(identity)
            .map(|r| r.error.to_string())
    }

    /// The generation of the certificate held for `identity`, if any.
    pub fn generation_of(&self, identity: &str) -> Option<u64> {
        self.lock().get(identity).map(|c| c.generation)
    }

    /// The certificates held, for `/debug/state`.
    pub fn held(&self) -> Vec<Held> {
        let now = SystemTime::now();
        let retries = self.retries.lock().unwrap_or_else(|e| e.into_inner());
        let mut held: Vec<Held> = self
            .lock()
            .values()
            .map(|c| Held {
                identity: c.identity.clone(),
                generation: c.generation,
                expires_unix: c
                    .expires
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                expired: c.expired(now).is_some(),
                renewal_failure: retries.get(&c.identity).map(|r| r.error.to_string()),
            })
            .collect();
        held.sort_by(|a, b| a.identity.cmp(&b.identity));
        held
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<WorkloadCert>>> {
        self.certs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(node: &str) -> Workload {
        Workload {
            namespace: "shop".into(),
            name: "web-1".into(),
            node: Some(node.into()),
            ip: [100, 64, 1, 2].into(),
            service_account: "web".into(),
            identity: crate::config::semantics::Identity::parse(
                "spiffe://cluster.local/ns/shop/sa/web",
            )
            .unwrap(),
            labels: Default::default(),
            enrolled: true,
            ready: true,
            mtls: Default::default(),
            authorization: vec![],
            tracing: None,
        }
    }

    #[tokio::test]
    async fn only_local_workloads_get_certificates_and_they_rotate_at_half_life() {
        let dir = std::env::temp_dir().join(format!("mesh-certs-{}", std::process::id()));
        ca::Material::generate(true).unwrap().write(&dir).unwrap();
        let pod = signer::PodInfo {
            namespace: "shop".into(),
            name: "web-1".into(),
            uid: None,
            node: Some("n1".into()),
            service_account: "web".into(),
        };
        let signer = signer::Local::start(Ca::load(&dir).unwrap(), vec![pod], &["n1"])
            .await
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let store = Certificates::new(
            signer.client("n1"),
            "n1",
            "cluster.local",
            Duration::from_secs(6),
            CertMetrics::default(),
        );
        let mut w = workload("n2");
        assert!(matches!(
            store.for_workload(&w).await,
            Err(IdentityError::NotLocal { .. })
        ));
        w.node = Some("n1".into());
        let first = store.for_workload(&w).await.unwrap();
        assert_eq!(first.certified.cert.len(), 2, "leaf and intermediate");
        assert_eq!(
            store.for_workload(&w).await.unwrap().generation,
            first.generation
        );
        let wanted = BTreeSet::from([w.identity.to_string()]);
        assert_eq!(store.sync(&wanted).await, 0, "not due yet");
        tokio::time::sleep(Duration::from_millis(3100)).await;
        assert_eq!(
            store.sync(&wanted).await,
            1,
            "renewed after half the lifetime"
        );
        let renewed = store.for_workload(&w).await.unwrap();
        assert!(renewed.generation > first.generation);
        // The signer gone: the certificate held serves until it expires, then is refused.
        signer.stop();
        tokio::time::sleep(Duration::from_millis(3100)).await;
        assert_eq!(store.sync(&wanted).await, 0);
        assert!(store.last_failure(w.identity.as_str()).is_some());
        assert_eq!(
            store.for_workload(&w).await.unwrap().generation,
            renewed.generation
        );
        // notAfter has whole seconds: the certificate expires within its lifetime from now.
        while renewed.expires > SystemTime::now() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let err = store.for_workload(&w).await.unwrap_err();
        assert!(matches!(err, IdentityError::Expired { .. }), "{err}");
        store.sync(&BTreeSet::new()).await;
        assert!(
            store.held().is_empty(),
            "dropped when no local pod needs it"
        );
    }
}
