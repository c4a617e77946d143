//! Workload identity: the mesh's certificate authority and the node's workload certificates.
//!
//! The CA signs short-lived leaf certificates whose only name is the workload's SPIFFE ID
//! (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`, a URI SAN). A node proxy holds certificates
//! only for the service accounts of the enrolled pods on its own node ([`Certificates::for_workload`]
//! refuses others), renews each at half its lifetime and drops those no local pod needs any
//! more. Leaf keys never leave memory; the CA key lives in the state directory (mode 0600)
//! in local mode, or in the mounted Secret in cluster mode.

pub mod tls;

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
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
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::ServerConfig,
    sign::CertifiedKey,
};

use crate::state::Workload;

/// File names of the CA in a state directory or a mounted Secret (Istio's `cacerts` names).
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// The CA's private key.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// Default lifetime of workload certificates.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Leaf certificates are valid from this long before issue, for clocks slightly behind.
const BACKDATE: Duration = Duration::from_secs(60);
/// Lifetime of a CA generated in local mode.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// What can go wrong with identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A CA file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A CA file is not a usable certificate or key.
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
    /// A certificate was asked for a workload this node does not host.
    #[error("workload {workload} runs on node {node:?}, not on this node: no certificate issued")]
    NotLocal {
        /// `namespace/name`.
        workload: String,
        /// Its node.
        node: Option<String>,
    },
}

/// The certificate authority: the root every proxy trusts, and (on nodes) its signing key.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
    root_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ca")
    }
}

impl Ca {
    /// Local mode: loads the CA from `dir`, generating and saving one on first start (the key
    /// with mode 0600, the directory 0700).
    pub fn load_or_create(dir: &Path) -> Result<Ca, IdentityError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| IdentityError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io(dir))?;
        // Several processes may share the directory (nodes of one test cluster): the first
        // creates the CA under the lock, the others wait and load it.
        let lock_path = dir.join(".lock");
        let lock = fs::File::create(&lock_path).map_err(io(&lock_path))?;
        lock.lock().map_err(io(&lock_path))?;
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => return Ca::load(dir),
            (false, false) => {}
            // Only a crash while creating the CA (under this lock) leaves half of it; no
            // certificate was ever issued from it: start over.
            _ => tracing::warn!(
                dir = %dir.display(),
                "incomplete CA (a crash while creating it?): generating a new one"
            ),
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        let (cert_pem, key_pem) = generate_root().map_err(|reason| IdentityError::BadCa {
            path: cert_path.clone(),
            reason,
        })?;
        // The key first, created private and renamed into place, so a crash leaves no half
        // CA and the key is never readable by others.
        write_private(&key_path, key_pem.as_bytes()).map_err(io(&key_path))?;
        write_private(&cert_path, cert_pem.as_bytes()).map_err(io(&cert_path))?;
        fs::set_permissions(&cert_path, fs::Permissions::from_mode(0o644))
            .map_err(io(&cert_path))?;
        tracing::info!(dir = %dir.display(), "generated a new mesh CA");
        Ca::load(dir)
    }

    /// Cluster mode (and every start after the first in local mode): reads `ca-cert.pem`
    /// and `ca-key.pem` from `dir` (a mounted Secret); never writes.
    pub fn load(dir: &Path) -> Result<Ca, IdentityError> {
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read_to_string(&path)
                .map(|text| (text, path.clone()))
                .map_err(|source| IdentityError::Io { path, source })
        };
        let (cert_pem, cert_path) = read(CA_CERT_FILE)?;
        let (key_pem, key_path) = read(CA_KEY_FILE)?;
        Ca::parse(cert_pem, &cert_path, &key_pem, &key_path)
    }

    /// A new root held only in memory (tests, in-process proxies): its certificate and key
    /// (PEM), for [`Ca::from_pem`].
    pub fn generate_pem() -> Result<(String, String), IdentityError> {
        generate_root().map_err(|reason| IdentityError::BadCa {
            path: PathBuf::from("(memory)"),
            reason,
        })
    }

    /// A CA from its certificate and key (PEM) in memory.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, IdentityError> {
        let memory = Path::new("(memory)");
        Ca::parse(cert_pem.to_string(), memory, key_pem, memory)
    }

    /// A CA from its certificate and key (PEM); the paths name them in errors.
    fn parse(
        cert_pem: String,
        cert_path: &Path,
        key_pem: &str,
        key_path: &Path,
    ) -> Result<Ca, IdentityError> {
        let bad = |path: &Path, reason: String| IdentityError::BadCa {
            path: path.to_path_buf(),
            reason,
        };
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| bad(key_path, format!("not a PEM private key: {e}")))?;
        let root = rustls::pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| bad(cert_path, format!("not a PEM certificate: {e}")))?;
        let root: CertificateDer<'static> = root;
        let (_, parsed) = x509_parser::parse_x509_certificate(&root)
            .map_err(|e| bad(cert_path, format!("not an X.509 certificate: {e}")))?;
        if !parsed.is_ca() {
            return Err(bad(
                cert_path,
                "not a CA certificate (basicConstraints CA:FALSE)".into(),
            ));
        }
        if parsed.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        {
            return Err(bad(
                key_path,
                format!("the key does not belong to {}", cert_path.display()),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&root, key)
            .map_err(|e| bad(cert_path, format!("cannot sign with it: {e}")))?;
        Ok(Ca {
            issuer,
            root_pem: cert_pem,
            root,
        })
    }

    /// The root certificate (DER).
    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// The root certificate (PEM), for tools that verify the mesh's certificates.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Signs a new leaf for `identity`, valid for `lifetime` from now.
    pub fn issue(&self, identity: &str, lifetime: Duration) -> Result<Leaf, IdentityError> {
        let fail = |reason: String| IdentityError::Issue {
            identity: identity.to_string(),
            reason,
        };
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| fail(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            identity.try_into().map_err(|e| fail(format!("{e}")))?,
        )];
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + lifetime).into();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| fail(e.to_string()))?;
        Ok(Leaf {
            cert: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            expires: now + lifetime,
        })
    }
}

/// A freshly signed leaf certificate and its key.
pub struct Leaf {
    /// The certificate (DER).
    pub cert: CertificateDer<'static>,
    /// Its private key (PKCS#8).
    pub key: PrivateKeyDer<'static>,
    /// Its `notAfter`.
    pub expires: SystemTime,
}

/// A new root CA for the cluster as a Kubernetes Secret manifest (`ca-cert.pem`,
/// `ca-key.pem`, Istio's cacerts names) in `namespace`, for `mesh-node run --ca-dir` to
/// mount. The key exists only in the manifest printed.
pub fn ca_secret_manifest(name: &str, namespace: &str) -> Result<String, String> {
    use base64::Engine;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let (cert, key) = generate_root()?;
    Ok(format!(
        "# The mesh root CA: keep this file secret, apply it once (kubectl apply -f), then delete it.\n\
         apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels: {{app.kubernetes.io/part-of: mesh}}\n\
         type: Opaque\ndata:\n  ca-cert.pem: {}\n  ca-key.pem: {}\n",
        b64(cert.as_bytes()),
        b64(key.as_bytes())
    ))
}

fn generate_root() -> Result<(String, String), String> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "mesh");
    name.push(DnType::CommonName, "mesh root CA");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + CA_LIFETIME).into();
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes `bytes` to `path` through a private temporary file renamed into place.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path)
}

/// A workload certificate in use, with the TLS server config that presents it.
pub struct WorkloadCert {
    /// The SPIFFE ID it certifies.
    pub identity: String,
    /// Increases with every certificate the node issues: pooled connections remember the one
    /// they were made with, and take no new streams once it has been replaced.
    pub generation: u64,
    /// Certificate and signing key, for rustls.
    pub certified: Arc<CertifiedKey>,
    /// Accepts HBONE connections to this workload: presents the certificate, requires a
    /// client certificate with a SPIFFE ID of the trust domain, TLS 1.3 only.
    pub server: Arc<ServerConfig>,
    /// `notAfter`.
    pub expires: SystemTime,
    /// When it is renewed (half its lifetime).
    renew_at: Instant,
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
}

impl CertMetrics {
    /// Registers `mesh_certificates_issued_total`, `mesh_certificates` and
    /// `mesh_certificate_issue_failures_total`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = CertMetrics::default();
        registry.register(
            "mesh_certificates_issued",
            "Workload certificates issued by this node, by reason (new, rotation)",
            metrics.issued.clone(),
        );
        registry.register(
            "mesh_certificates",
            "Workload certificates this node holds",
            metrics.held.clone(),
        );
        registry.register(
            "mesh_certificate_issue_failures",
            "Workload certificates that could not be issued",
            metrics.failures.clone(),
        );
        metrics
    }
}

/// The node's workload certificates, by SPIFFE ID.
pub struct Certificates {
    ca: Ca,
    node: String,
    trust_domain: String,
    lifetime: Duration,
    certs: Mutex<HashMap<String, Arc<WorkloadCert>>>,
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
    /// A store for the workloads of `node`, signing with `ca`.
    pub fn new(
        ca: Ca,
        node: &str,
        trust_domain: &str,
        lifetime: Duration,
        metrics: CertMetrics,
    ) -> Certificates {
        Certificates {
            ca,
            node: node.to_string(),
            trust_domain: trust_domain.to_string(),
            lifetime,
            certs: Mutex::default(),
            generation: AtomicU64::new(0),
            metrics,
        }
    }

    /// The root every proxy trusts.
    pub fn root(&self) -> &CertificateDer<'static> {
        self.ca.root()
    }

    /// The trust domain of the identities this node accepts.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The current certificate of a workload of this node, issued now if it has none; an
    /// error for a workload of another node.
    pub fn for_workload(&self, workload: &Workload) -> Result<Arc<WorkloadCert>, IdentityError> {
        if workload.node.as_deref() != Some(self.node.as_str()) {
            return Err(IdentityError::NotLocal {
                workload: format!("{}/{}", workload.namespace, workload.name),
                node: workload.node.clone(),
            });
        }
        if let Some(cert) = self.lock().get(workload.identity.as_str()) {
            return Ok(cert.clone());
        }
        let cert = self.issue(&workload.identity, "new")?;
        Ok(self
            .lock()
            .entry(workload.identity.to_string())
            .or_insert(cert)
            .clone())
    }

    /// Keeps certificates for exactly `wanted` (the identities of this node's enrolled pods):
    /// issues missing ones, renews those past half their lifetime, drops the rest. Returns
    /// how many were issued. Called on every config change and every second.
    pub fn sync(&self, wanted: &BTreeSet<String>) -> usize {
        let now = Instant::now();
        // Due: (identity, the generation being replaced, if any).
        let due: Vec<(String, Option<u64>)> = {
            let mut certs = self.lock();
            certs.retain(|identity, _| wanted.contains(identity));
            wanted
                .iter()
                .filter_map(|identity| match certs.get(identity) {
                    None => Some((identity.clone(), None)),
                    Some(cert) if cert.renew_at <= now => {
                        Some((identity.clone(), Some(cert.generation)))
                    }
                    Some(_) => None,
                })
                .collect()
        };
        let mut issued = 0;
        for (identity, replacing) in due {
            let reason = if replacing.is_some() {
                "rotation"
            } else {
                "new"
            };
            match self.issue(&identity, reason) {
                Ok(cert) => {
                    // Signed without the lock: install only if nobody (a connection that
                    // needed the certificate at once) installed one meanwhile.
                    let mut certs = self.lock();
                    if certs.get(&identity).map(|c| c.generation) == replacing {
                        if replacing.is_some() {
                            tracing::info!(
                                identity,
                                generation = cert.generation,
                                "certificate rotated"
                            );
                        }
                        certs.insert(identity, cert);
                        issued += 1;
                    }
                }
                Err(err) => tracing::error!("{err} (the current certificate stays in use)"),
            }
        }
        self.metrics.held.set(self.lock().len() as i64);
        issued
    }

    /// The generation of the certificate held for `identity`, if any.
    pub fn generation_of(&self, identity: &str) -> Option<u64> {
        self.lock().get(identity).map(|c| c.generation)
    }

    /// The identities and generations held, for `/debug/state`.
    pub fn held(&self) -> Vec<(String, u64, SystemTime)> {
        let mut held: Vec<_> = self
            .lock()
            .values()
            .map(|c| (c.identity.clone(), c.generation, c.expires))
            .collect();
        held.sort();
        held
    }

    fn issue(
        &self,
        identity: &str,
        reason: &'static str,
    ) -> Result<Arc<WorkloadCert>, IdentityError> {
        let leaf = self.ca.issue(identity, self.lifetime).inspect_err(|_| {
            self.metrics.failures.inc();
        })?;
        let certified = tls::certified_key(leaf.cert, leaf.key).map_err(|reason| {
            self.metrics.failures.inc();
            IdentityError::Issue {
                identity: identity.to_string(),
                reason,
            }
        })?;
        let server = tls::server_config(certified.clone(), self.root().clone(), &self.trust_domain);
        self.metrics
            .issued
            .get_or_create(&IssuedLabels { reason })
            .inc();
        Ok(Arc::new(WorkloadCert {
            identity: identity.to_string(),
            generation: self.generation.fetch_add(1, Ordering::Relaxed) + 1,
            certified,
            server,
            expires: leaf.expires,
            renew_at: Instant::now() + self.lifetime / 2,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<WorkloadCert>>> {
        self.certs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_init_prints_a_secret_that_loads_as_the_ca() {
        use base64::Engine;
        let manifest = ca_secret_manifest("mesh-ca", "mesh-system").unwrap();
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&manifest).unwrap();
        assert_eq!(doc["kind"].as_str(), Some("Secret"));
        let dir = std::env::temp_dir().join(format!("mesh-ca-init-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for file in ["ca-cert.pem", "ca-key.pem"] {
            let text = doc["data"][file].as_str().unwrap();
            let pem = base64::engine::general_purpose::STANDARD
                .decode(text)
                .unwrap();
            std::fs::write(dir.join(file), pem).unwrap();
        }
        let loaded = Ca::load(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        loaded.unwrap();
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mesh-ca-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn local_ca_is_created_once_with_a_private_key_and_reused() {
        let dir = temp_dir("create");
        let first = Ca::load_or_create(&dir).unwrap();
        let mode = fs::metadata(dir.join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = Ca::load_or_create(&dir).unwrap();
        assert_eq!(first.root(), again.root(), "the root survives a restart");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_broken_or_mismatched_ca_is_a_clear_error() {
        let dir = temp_dir("broken");
        Ca::load_or_create(&dir).unwrap();
        let other = temp_dir("other");
        Ca::load_or_create(&other).unwrap();
        fs::copy(other.join(CA_KEY_FILE), dir.join(CA_KEY_FILE)).unwrap();
        let err = Ca::load(&dir).unwrap_err().to_string();
        assert!(err.contains("does not belong to"), "{err}");
        fs::write(dir.join(CA_CERT_FILE), "junk").unwrap();
        let err = Ca::load(&dir).unwrap_err().to_string();
        assert!(
            err.contains("ca-cert.pem") && err.contains("not a PEM certificate"),
            "{err}"
        );
        let missing = Ca::load(&temp_dir("missing")).unwrap_err().to_string();
        assert!(missing.contains("ca-cert.pem"), "{missing}");
        fs::remove_dir_all(&dir).unwrap();
        fs::remove_dir_all(&other).unwrap();
    }

    #[test]
    fn leaves_carry_only_the_spiffe_id_and_the_lifetime() {
        let dir = temp_dir("leaf");
        let ca = Ca::load_or_create(&dir).unwrap();
        let id = "spiffe://cluster.local/ns/shop/sa/web";
        let leaf = ca.issue(id, Duration::from_secs(20)).unwrap();
        assert_eq!(tls::spiffe_id(&leaf.cert).unwrap(), id);
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf.cert).unwrap();
        let validity = cert.validity();
        let span = validity.not_after.timestamp() - validity.not_before.timestamp();
        assert_eq!(span, 20 + BACKDATE.as_secs() as i64);
        assert!(!cert.is_ca());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_local_workloads_get_certificates_and_they_rotate_at_half_life() {
        let dir = temp_dir("store");
        let store = Certificates::new(
            Ca::load_or_create(&dir).unwrap(),
            "n1",
            "cluster.local",
            Duration::from_millis(400),
            CertMetrics::default(),
        );
        let mut w = Workload {
            namespace: "shop".into(),
            name: "web-1".into(),
            node: Some("n2".into()),
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
        };
        assert!(matches!(
            store.for_workload(&w),
            Err(IdentityError::NotLocal { .. })
        ));
        w.node = Some("n1".into());
        let first = store.for_workload(&w).unwrap();
        assert_eq!(store.for_workload(&w).unwrap().generation, first.generation);
        let wanted = BTreeSet::from([w.identity.to_string()]);
        assert_eq!(store.sync(&wanted), 0, "not due yet");
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(store.sync(&wanted), 1, "renewed after half the lifetime");
        assert!(store.for_workload(&w).unwrap().generation > first.generation);
        store.sync(&BTreeSet::new());
        assert!(
            store.held().is_empty(),
            "dropped when no local pod needs it"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
