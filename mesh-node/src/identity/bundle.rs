//! The trust bundle: the roots a node proxy accepts peer certificates from (and the signer's).
//!
//! A bundle may hold several roots, which is how a root is rotated without an outage
//! (docs/security.md): the new root is added everywhere first, then the signer switches, then
//! the old root is removed. The file (a mounted ConfigMap in a cluster) is re-read when it
//! changes; a bad update keeps the last good bundle. Every handshake reads the bundle in force,
//! so a change applies to the next connection without a restart.

use std::{path::Path, sync::Arc};

use arc_swap::ArcSwap;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};
use rustls::pki_types::{CertificateDer, TrustAnchor};

use super::IdentityError;

/// Roots, with the anchors webpki verifies against.
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
    fingerprint: String,
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TrustBundle({})", self.fingerprint)
    }
}

/// The bundle in force, shared by every TLS verifier of the process.
pub type SharedBundle = Arc<ArcSwap<TrustBundle>>;

impl TrustBundle {
    /// The roots in `pem`: at least one, each a CA certificate; `origin` names the source in
    /// errors.
    pub fn parse(pem: &str, origin: &Path) -> Result<TrustBundle, IdentityError> {
        let roots = super::ca::certs(pem, origin)?;
        TrustBundle::new(roots, origin)
    }

    /// A bundle of `roots`.
    pub fn new(
        roots: Vec<CertificateDer<'static>>,
        origin: &Path,
    ) -> Result<TrustBundle, IdentityError> {
        let bad = |reason: String| IdentityError::BadCa {
            path: origin.to_path_buf(),
            reason,
        };
        let mut anchors = Vec::with_capacity(roots.len());
        for (i, root) in roots.iter().enumerate() {
            let (_, parsed) = x509_parser::parse_x509_certificate(root)
                .map_err(|e| bad(format!("certificate {}: not X.509: {e}", i + 1)))?;
            if !parsed.is_ca() {
                return Err(bad(format!(
                    "certificate {} ({}) is not a CA certificate",
                    i + 1,
                    parsed.subject()
                )));
            }
            let anchor = webpki::anchor_from_trusted_cert(root)
                .map_err(|e| bad(format!("certificate {}: {e}", i + 1)))?;
            anchors.push(anchor.to_owned());
        }
        Ok(TrustBundle {
            fingerprint: fingerprint(&roots),
            roots,
            anchors,
        })
    }

    /// This bundle, shared (what verifiers take).
    pub fn shared(self) -> SharedBundle {
        Arc::new(ArcSwap::from_pointee(self))
    }

    /// Reads the bundle file.
    pub fn load(path: &Path) -> Result<TrustBundle, IdentityError> {
        let text = std::fs::read_to_string(path).map_err(|source| IdentityError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        TrustBundle::parse(&text, path)
    }

    /// The roots.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The anchors for webpki.
    pub fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    /// SHA-256 over the sorted roots (hex, 16 bytes): equal on every node holding the same
    /// set of roots, in any order.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

fn fingerprint(roots: &[CertificateDer<'_>]) -> String {
    let mut sorted: Vec<&[u8]> = roots.iter().map(|r| r.as_ref()).collect();
    sorted.sort();
    sorted.dedup();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for root in sorted {
        ctx.update(&(root.len() as u32).to_be_bytes());
        ctx.update(root);
    }
    ctx.finish().as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FingerprintLabels {
    fingerprint: String,
}

/// `mesh_trust_bundle_info{fingerprint}`: 1 for the bundle in force (the only series).
#[derive(Clone, Default)]
pub struct BundleMetric(Family<FingerprintLabels, Gauge>);

impl BundleMetric {
    /// Registers the metric.
    pub fn register(registry: &mut Registry) -> BundleMetric {
        let metric = BundleMetric::default();
        registry.register(
            "mesh_trust_bundle_info",
            "The trust bundle in force on this node: its fingerprint (SHA-256 of its roots)",
            metric.0.clone(),
        );
        metric
    }

    /// Reports `now` in force instead of `before`.
    pub fn set(&self, before: Option<&TrustBundle>, now: &TrustBundle) {
        if let Some(before) = before {
            self.0.remove(&FingerprintLabels {
                fingerprint: before.fingerprint.clone(),
            });
        }
        self.0
            .get_or_create(&FingerprintLabels {
                fingerprint: now.fingerprint.clone(),
            })
            .set(1);
    }
}

/// The bundle file and the version of it in force: [`BundleFile::refresh`] swaps in a changed
/// file, keeping the last good bundle when the new one is bad.
pub struct BundleFile {
    path: std::path::PathBuf,
    seen: Option<crate::reload::Version>,
    shared: SharedBundle,
    metric: BundleMetric,
}

impl BundleFile {
    /// Reads the bundle at `path` (an error names what is wrong with it).
    pub fn open(path: &Path, metric: BundleMetric) -> Result<BundleFile, IdentityError> {
        let seen = crate::reload::version(path);
        let bundle = TrustBundle::load(path)?;
        metric.set(None, &bundle);
        tracing::info!(path = %path.display(), fingerprint = bundle.fingerprint(), roots = bundle.roots().len(), "trust bundle");
        Ok(BundleFile {
            path: path.to_path_buf(),
            seen,
            shared: Arc::new(ArcSwap::from_pointee(bundle)),
            metric,
        })
    }

    /// The bundle in force.
    pub fn shared(&self) -> SharedBundle {
        self.shared.clone()
    }

    /// Re-reads the file if it changed.
    pub fn refresh(&mut self) {
        let now = crate::reload::version(&self.path);
        if now == self.seen {
            return;
        }
        self.seen = now;
        match TrustBundle::load(&self.path) {
            Ok(bundle) => {
                let before = self.shared.load_full();
                if bundle.fingerprint == before.fingerprint {
                    return;
                }
                self.metric.set(Some(&before), &bundle);
                tracing::info!(
                    fingerprint = bundle.fingerprint(),
                    previous = before.fingerprint(),
                    roots = bundle.roots().len(),
                    "trust bundle changed"
                );
                self.shared.store(Arc::new(bundle));
            }
            Err(err) => tracing::error!(
                fingerprint = self.shared.load().fingerprint(),
                "trust bundle update rejected, the last good bundle stays in force: {err}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::generate_root;

    #[test]
    fn fingerprint_ignores_order_and_a_bad_bundle_is_named() {
        let (a, b) = (generate_root().unwrap(), generate_root().unwrap());
        let origin = Path::new("roots.pem");
        let ab = TrustBundle::parse(&format!("{}{}", a.cert, b.cert), origin).unwrap();
        let ba = TrustBundle::parse(&format!("{}{}", b.cert, a.cert), origin).unwrap();
        let only_a = TrustBundle::parse(&a.cert, origin).unwrap();
        assert_eq!(ab.fingerprint(), ba.fingerprint());
        assert_ne!(ab.fingerprint(), only_a.fingerprint());
        assert_eq!(ab.roots().len(), 2);
        let err = TrustBundle::parse("junk", origin).unwrap_err().to_string();
        assert!(err.contains("roots.pem"), "{err}");
        let ca = crate::identity::Ca::from_pem(&a.cert, &a.key).unwrap();
        let leaf = ca
            .issue(
                "spiffe://cluster.local/ns/a/sa/b",
                std::time::Duration::from_secs(60),
            )
            .unwrap();
        let err = TrustBundle::parse(&crate::identity::ca::to_pem(&leaf.chain[0]), origin)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a CA certificate"), "{err}");
    }
}
