//! The signing CA: the key and certificates only the signer (`mesh-node ca serve`) holds.
//!
//! It reads the layouts users bring: Istio's plug-in `cacerts` (`ca-cert.pem` and `ca-key.pem`,
//! the signing certificate and its key; `cert-chain.pem`, the chain above it; `root-cert.pem`,
//! the root) and cert-manager's (`tls.crt`, the signing certificate and its chain; `tls.key`;
//! `ca.crt`, the root). The signing certificate may be the root itself or an intermediate;
//! leaves are served with the chain up to (not including) the root, and verifiers check that
//! chain against their trust bundle, which holds roots only.

use std::{
    fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivatePkcs8KeyDer};

use super::{IdentityError, Leaf};

/// Istio `cacerts`: the signing certificate.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// Istio `cacerts`: the signing key.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// Istio `cacerts`: the chain from the signing certificate up to the root.
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
/// Istio `cacerts`: the root.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// Leaf certificates are valid from this long before issue, for clocks slightly behind.
pub(crate) const BACKDATE: Duration = Duration::from_secs(60);
/// Lifetime of a root made by `mesh-node ca init`.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of an intermediate made by `mesh-node ca init --intermediate`.
const INTERMEDIATE_LIFETIME: Duration = Duration::from_secs(2 * 365 * 24 * 3600);

/// The signing key, the chain above it, and the roots.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate, then any intermediates above it; no root.
    chain: Vec<CertificateDer<'static>>,
    /// The roots the chain ends at (what verifiers must trust).
    roots: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ca")
    }
}

/// PEM text of one certificate and its key.
pub struct Pem {
    /// The certificate.
    pub cert: String,
    /// Its key (PKCS#8).
    pub key: String,
}

/// What `mesh-node ca init` makes: the signer's files (Istio's `cacerts` layout) and, with an
/// intermediate, the root's key, which the signer does not need.
pub struct Material {
    /// `(file name, contents)` in the `cacerts` layout.
    pub files: Vec<(&'static str, String)>,
    /// The root key, when the signing certificate is an intermediate.
    pub root_key: Option<String>,
    /// The trust bundle: the root (PEM).
    pub bundle: String,
}

impl Material {
    /// A new root, signing itself, or a root and an intermediate that signs.
    pub fn generate(intermediate: bool) -> Result<Material, String> {
        let root = generate_root()?;
        if !intermediate {
            return Ok(Material {
                files: vec![
                    (CA_CERT_FILE, root.cert.clone()),
                    (CA_KEY_FILE, root.key.clone()),
                    (CERT_CHAIN_FILE, root.cert.clone()),
                    (ROOT_CERT_FILE, root.cert.clone()),
                ],
                root_key: None,
                bundle: root.cert,
            });
        }
        let int = generate_intermediate(&root)?;
        Ok(Material {
            files: vec![
                (CA_CERT_FILE, int.cert.clone()),
                (CA_KEY_FILE, int.key),
                (CERT_CHAIN_FILE, format!("{}{}", int.cert, root.cert)),
                (ROOT_CERT_FILE, root.cert.clone()),
            ],
            root_key: Some(root.key),
            bundle: root.cert,
        })
    }

    /// Writes the files into `dir` (created 0700; the key 0600, through a private temporary
    /// file renamed into place).
    pub fn write(&self, dir: &Path) -> Result<(), IdentityError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| IdentityError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        for (name, text) in &self.files {
            let path = dir.join(name);
            write_private(&path, text.as_bytes()).map_err(io(&path))?;
        }
        Ok(())
    }
}

impl Ca {
    /// Reads the CA from `dir`, in Istio's `cacerts` layout or cert-manager's, and checks it:
    /// the signing certificate is a CA, the key is its key, and the chain links up to a root.
    pub fn load(dir: &Path) -> Result<Ca, IdentityError> {
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read_to_string(&path)
                .map(|text| (text, path.clone()))
                .map_err(|source| IdentityError::Io { path, source })
        };
        let exists = |name: &str| dir.join(name).exists();
        if exists(CA_KEY_FILE) {
            let (cert, cert_path) = read(CA_CERT_FILE)?;
            let (key, key_path) = read(CA_KEY_FILE)?;
            let mut chain = certs(&cert, &cert_path)?;
            if exists(CERT_CHAIN_FILE) {
                let (text, path) = read(CERT_CHAIN_FILE)?;
                chain.extend(certs(&text, &path)?);
            }
            let roots = if exists(ROOT_CERT_FILE) {
                let (text, path) = read(ROOT_CERT_FILE)?;
                certs(&text, &path)?
            } else {
                Vec::new()
            };
            Ca::assemble(chain, &cert_path, &key, &key_path, roots)
        } else if exists("tls.key") {
            let (cert, cert_path) = read("tls.crt")?;
            let (key, key_path) = read("tls.key")?;
            let chain = certs(&cert, &cert_path)?;
            let roots = if exists("ca.crt") {
                let (text, path) = read("ca.crt")?;
                certs(&text, &path)?
            } else {
                Vec::new()
            };
            Ca::assemble(chain, &cert_path, &key, &key_path, roots)
        } else {
            Err(IdentityError::BadCa {
                path: dir.to_path_buf(),
                reason: format!(
                    "no CA here: expected Istio's cacerts ({CA_CERT_FILE}, {CA_KEY_FILE}, \
                     {CERT_CHAIN_FILE}, {ROOT_CERT_FILE}) or cert-manager's (tls.crt, tls.key, \
                     ca.crt)"
                ),
            })
        }
    }

    /// A CA from a certificate and key (PEM) in memory; the certificate must be a root.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, IdentityError> {
        let memory = Path::new("(memory)");
        let chain = certs(cert_pem, memory)?;
        Ca::assemble(chain, memory, key_pem, memory, Vec::new())
    }

    /// `chain`: the signing certificate first, then what its files put above it (roots among
    /// them are moved to `roots`, duplicates dropped).
    fn assemble(
        chain: Vec<CertificateDer<'static>>,
        cert_path: &Path,
        key_pem: &str,
        key_path: &Path,
        mut roots: Vec<CertificateDer<'static>>,
    ) -> Result<Ca, IdentityError> {
        let bad = |path: &Path, reason: String| IdentityError::BadCa {
            path: path.to_path_buf(),
            reason,
        };
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| bad(key_path, format!("not a PEM private key: {e}")))?;
        let signing = chain[0].clone();
        let parsed = parse(&signing, cert_path)?;
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
        let mut above = Vec::new();
        for cert in chain {
            let p = parse(&cert, cert_path)?;
            if p.subject() == p.issuer() && p.verify_signature(None).is_ok() {
                if !roots.contains(&cert) {
                    roots.push(cert);
                }
            } else if !above.contains(&cert) {
                above.push(cert);
            }
        }
        if roots.is_empty() {
            return Err(bad(
                cert_path,
                "no root: give the root certificate (root-cert.pem or ca.crt)".into(),
            ));
        }
        // Each certificate is signed by the next; the last by one of the roots.
        for (i, cert) in above.iter().enumerate() {
            let p = parse(cert, cert_path)?;
            let signed_by = |issuer: &CertificateDer<'_>| {
                parse(issuer, cert_path).is_ok_and(|i| {
                    i.subject() == p.issuer() && p.verify_signature(Some(i.public_key())).is_ok()
                })
            };
            let linked = match above.get(i + 1) {
                Some(next) => signed_by(next),
                None => roots.iter().any(signed_by),
            };
            if !linked {
                return Err(bad(
                    cert_path,
                    format!(
                        "the chain is broken: {} is not signed by the certificate above it",
                        p.subject()
                    ),
                ));
            }
        }
        let issuer = Issuer::from_ca_cert_der(&signing, key)
            .map_err(|e| bad(cert_path, format!("cannot sign with it: {e}")))?;
        Ok(Ca {
            issuer,
            chain: above,
            roots,
        })
    }

    /// The roots the served chains end at.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The roots as PEM, a trust bundle for nodes.
    pub fn roots_pem(&self) -> String {
        self.roots.iter().map(|c| to_pem(c)).collect()
    }

    /// The intermediates served after each leaf (the signing certificate first, unless it is
    /// the root).
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// Signs a leaf for `identity` over `public_key` (an X.509 SubjectPublicKeyInfo, DER),
    /// valid for `lifetime` from now. Everything else in the certificate is set here: the
    /// only name is the SPIFFE ID, `CA:FALSE`, the key usages of a TLS client and server.
    pub fn sign(
        &self,
        identity: &str,
        public_key: &[u8],
        lifetime: Duration,
    ) -> Result<(CertificateDer<'static>, SystemTime), IdentityError> {
        let fail = |reason: String| IdentityError::Issue {
            identity: identity.to_string(),
            reason,
        };
        let key = rcgen::SubjectPublicKeyInfo::from_der(public_key)
            .map_err(|e| fail(format!("unusable public key: {e}")))?;
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
        Ok((cert.der().clone(), now + lifetime))
    }

    /// A new key and a leaf for it with the chain: the signer's own serving certificate, and
    /// tests that play a workload.
    pub fn issue(&self, identity: &str, lifetime: Duration) -> Result<Leaf, IdentityError> {
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| IdentityError::Issue {
                identity: identity.to_string(),
                reason: e.to_string(),
            })?;
        let (cert, expires) = self.sign(
            identity,
            &rcgen::PublicKeyData::subject_public_key_info(&key),
            lifetime,
        )?;
        let mut chain = vec![cert];
        chain.extend(self.chain.iter().cloned());
        Ok(Leaf {
            chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            expires,
        })
    }
}

fn parse<'a>(
    cert: &'a CertificateDer<'_>,
    path: &Path,
) -> Result<x509_parser::certificate::X509Certificate<'a>, IdentityError> {
    x509_parser::parse_x509_certificate(cert)
        .map(|(_, c)| c)
        .map_err(|e| IdentityError::BadCa {
            path: path.to_path_buf(),
            reason: format!("not an X.509 certificate: {e}"),
        })
}

/// Every certificate of a PEM text; at least one.
pub(crate) fn certs(
    text: &str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| IdentityError::BadCa {
            path: path.to_path_buf(),
            reason: format!("not a PEM certificate: {e}"),
        })?;
    if certs.is_empty() {
        return Err(IdentityError::BadCa {
            path: path.to_path_buf(),
            reason: "not a PEM certificate: no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// A certificate as PEM.
pub fn to_pem(cert: &CertificateDer<'_>) -> String {
    pem("CERTIFICATE", cert)
}

/// DER bytes as a PEM block labelled `label`.
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}

/// The cluster's CA as Kubernetes manifests in `namespace`: the signer's Secret `name`
/// (Istio's `cacerts` layout) and the nodes' trust bundle, ConfigMap `mesh-trust-bundle`
/// (the root only). The key exists only in the output.
pub fn manifests(material: &Material, name: &str, namespace: &str) -> String {
    use base64::Engine;
    let b64 = |text: &str| base64::engine::general_purpose::STANDARD.encode(text.as_bytes());
    let data: String = material
        .files
        .iter()
        .map(|(file, text)| format!("  {file}: {}\n", b64(text)))
        .collect();
    let bundle: String = material
        .bundle
        .lines()
        .map(|line| format!("    {line}\n"))
        .collect();
    format!(
        "# The mesh CA for the signer (mesh-node ca serve) only: keep this file secret, apply it\n\
         # once (kubectl apply -f), then delete it.\n\
         apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels: {{app.kubernetes.io/part-of: mesh}}\n\
         type: Opaque\ndata:\n{data}\
         ---\n\
         # The trust bundle every node proxy reads (roots only, no key).\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: mesh-trust-bundle\n  namespace: {namespace}\n  labels: {{app.kubernetes.io/part-of: mesh}}\n\
         data:\n  roots.pem: |\n{bundle}"
    )
}

fn ca_params(common_name: &str, lifetime: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "mesh");
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.use_authority_key_identifier_extension = true;
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + lifetime).into();
    params
}

/// A new self-signed root.
pub fn generate_root() -> Result<Pem, String> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let mut params = ca_params("mesh root CA", ROOT_LIFETIME);
    params.use_authority_key_identifier_extension = false;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A new intermediate signed by `root`.
pub fn generate_intermediate(root: &Pem) -> Result<Pem, String> {
    let root_key = KeyPair::from_pem(&root.key).map_err(|e| e.to_string())?;
    let issuer = Issuer::from_ca_cert_pem(&root.cert, root_key).map_err(|e| e.to_string())?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let mut params = ca_params("mesh intermediate CA", INTERMEDIATE_LIFETIME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let cert = params.signed_by(&key, &issuer).map_err(|e| e.to_string())?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Writes `bytes` to `path` through a private temporary file renamed into place.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp: PathBuf = path.with_extension("tmp");
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

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mesh-ca-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn init_writes_a_ca_that_loads_with_and_without_an_intermediate() {
        for intermediate in [false, true] {
            let dir = temp_dir(&format!("init-{intermediate}"));
            let material = Material::generate(intermediate).unwrap();
            material.write(&dir).unwrap();
            let mode = fs::metadata(dir.join(CA_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
            let ca = Ca::load(&dir).unwrap();
            assert_eq!(ca.roots().len(), 1);
            assert_eq!(ca.chain().len(), usize::from(intermediate));
            assert_eq!(ca.roots_pem(), material.bundle);
            assert_eq!(material.root_key.is_some(), intermediate);
            fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn cert_manager_layout_loads() {
        let dir = temp_dir("cert-manager");
        fs::create_dir_all(&dir).unwrap();
        let root = generate_root().unwrap();
        let int = generate_intermediate(&root).unwrap();
        fs::write(dir.join("tls.crt"), &int.cert).unwrap();
        fs::write(dir.join("tls.key"), &int.key).unwrap();
        fs::write(dir.join("ca.crt"), &root.cert).unwrap();
        let ca = Ca::load(&dir).unwrap();
        assert_eq!(ca.chain().len(), 1);
        let leaf = ca
            .issue("spiffe://cluster.local/ns/a/sa/b", Duration::from_secs(60))
            .unwrap();
        assert_eq!(leaf.chain.len(), 2, "leaf and intermediate");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_broken_mismatched_or_unlinked_ca_is_a_clear_error() {
        let dir = temp_dir("broken");
        Material::generate(true).unwrap().write(&dir).unwrap();
        let other = temp_dir("other");
        Material::generate(true).unwrap().write(&other).unwrap();
        // Another root: the intermediate does not link to it.
        fs::copy(other.join(ROOT_CERT_FILE), dir.join(ROOT_CERT_FILE)).unwrap();
        fs::copy(dir.join(CA_CERT_FILE), dir.join(CERT_CHAIN_FILE)).unwrap();
        let err = Ca::load(&dir).unwrap_err().to_string();
        assert!(err.contains("chain is broken"), "{err}");
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
        assert!(missing.contains("cacerts"), "{missing}");
        fs::remove_dir_all(&dir).unwrap();
        fs::remove_dir_all(&other).unwrap();
    }

    #[test]
    fn leaves_carry_only_the_spiffe_id_and_the_lifetime() {
        let root = generate_root().unwrap();
        let ca = Ca::from_pem(&root.cert, &root.key).unwrap();
        let id = "spiffe://cluster.local/ns/shop/sa/web";
        let leaf = ca.issue(id, Duration::from_secs(20)).unwrap();
        assert_eq!(super::super::tls::spiffe_id(&leaf.chain[0]).unwrap(), id);
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf.chain[0]).unwrap();
        let validity = cert.validity();
        let span = validity.not_after.timestamp() - validity.not_before.timestamp();
        assert_eq!(span, 20 + BACKDATE.as_secs() as i64);
        assert!(!cert.is_ca());
    }

    #[test]
    fn manifests_hold_the_secret_and_a_bundle_without_the_key() {
        let material = Material::generate(true).unwrap();
        let text = manifests(&material, "mesh-ca", "mesh-system");
        let docs: Vec<serde_yaml_ng::Value> = text
            .split("\n---\n")
            .map(|d| serde_yaml_ng::from_str(d).unwrap())
            .collect();
        assert_eq!(docs[0]["kind"].as_str(), Some("Secret"));
        assert_eq!(docs[1]["kind"].as_str(), Some("ConfigMap"));
        let bundle = docs[1]["data"]["roots.pem"].as_str().unwrap();
        assert_eq!(bundle, material.bundle);
        assert!(!text.contains(material.root_key.as_deref().unwrap()));
    }
}
