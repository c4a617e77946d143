//! TLS 1.3 with SPIFFE identities, for HBONE.
//!
//! rustls's webpki verifiers check the chain and DNS or IP names, not URI SANs, so both sides
//! use verifiers of their own: the chain is checked against the mesh root with webpki, then
//! the SPIFFE ID is read from the certificate's URI SAN. The client requires exactly the
//! identity of the destination workload; the server requires a client certificate with an
//! identity of its trust domain (authorization decides what that identity may do).

use std::sync::{Arc, OnceLock};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        ResolvesServerCert,
    },
    sign::{CertifiedKey, SingleCertAndKey},
    ClientConfig, DigitallySignedStruct, DistinguishedName, Error, ServerConfig, SignatureScheme,
};

use super::bundle::SharedBundle;

/// ALPN protocol of HBONE (HTTP/2).
const ALPN_H2: &[u8] = b"h2";

/// The crypto provider (ring), built once.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Pairs a certificate chain (the leaf first) with its key for rustls.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, String> {
    let signer = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(CertifiedKey::new(chain, signer)))
}

/// The server side of HBONE for one workload certificate.
pub fn server_config(
    cert: Arc<CertifiedKey>,
    bundle: SharedBundle,
    trust_domain: &str,
) -> Arc<ServerConfig> {
    let verifier = Arc::new(SpiffeVerifier {
        bundle,
        want: Want::TrustDomain(format!("spiffe://{trust_domain}/")),
    });
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(cert)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // HBONE connections are long-lived and pooled: no session tickets to manage.
    config.send_tls13_tickets = 0;
    Arc::new(config)
}

/// The client side of HBONE: presents `cert`, accepts only a server whose SPIFFE ID is
/// `expected`.
pub fn client_config(
    cert: Arc<CertifiedKey>,
    bundle: SharedBundle,
    expected: &str,
) -> Arc<ClientConfig> {
    let verifier = Arc::new(SpiffeVerifier {
        bundle,
        want: Want::Exactly(expected.to_string()),
    });
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(cert)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// The signer's side of the certificate service: presents the signer's certificate (from
/// `resolver`), asks no client certificate (callers authenticate with a token), HTTP/1.1.
pub fn signer_server_config(resolver: Arc<dyn ResolvesServerCert>) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A node's side of the certificate service: accepts only a signer whose SPIFFE ID is
/// `expected`, chained to the bundle; presents no certificate.
pub fn signer_client_config(bundle: SharedBundle, expected: &str) -> Arc<ClientConfig> {
    let verifier = Arc::new(SpiffeVerifier {
        bundle,
        want: Want::Exactly(expected.to_string()),
    });
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Checks a chain (the leaf first) against the bundle for a TLS client and server, and that
/// its SPIFFE ID is `expected`: a node checks what the signer returned before using it.
pub fn verify_chain(
    chain: &[CertificateDer<'static>],
    bundle: &SharedBundle,
    expected: &str,
) -> Result<(), Error> {
    let verifier = SpiffeVerifier {
        bundle: bundle.clone(),
        want: Want::Exactly(expected.to_string()),
    };
    let (leaf, intermediates) = chain.split_first().ok_or(Error::NoCertificatesPresented)?;
    let now = UnixTime::now();
    verifier.verify(leaf, intermediates, now, webpki::KeyUsage::server_auth())?;
    verifier.verify(leaf, intermediates, now, webpki::KeyUsage::client_auth())
}

/// The SPIFFE ID (URI SAN starting with `spiffe://`) of a certificate; an error unless there
/// is exactly one, as an X.509 SVID requires.
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Result<String, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| format!("unparsable certificate: {e}"))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .ok_or("no subjectAltName")?;
    let mut ids = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) if uri.starts_with("spiffe://") => {
                Some(*uri)
            }
            _ => None,
        });
    match (ids.next(), ids.next()) {
        (Some(id), None) => Ok(id.to_string()),
        (None, _) => Err("no SPIFFE ID (URI SAN spiffe://...)".into()),
        (Some(_), Some(_)) => Err("more than one SPIFFE ID".into()),
    }
}

#[derive(Debug)]
enum Want {
    /// The client's check: exactly this identity.
    Exactly(String),
    /// The server's check: any identity starting with `spiffe://<trust-domain>/`.
    TrustDomain(String),
}

/// Verifies the chain to a root of the bundle in force, then the SPIFFE ID.
#[derive(Debug)]
struct SpiffeVerifier {
    bundle: SharedBundle,
    want: Want,
}

impl SpiffeVerifier {
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), Error> {
        let bundle = self.bundle.load();
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| Error::InvalidCertificate(webpki_error(e)))?;
        cert.verify_for_usage(
            provider().signature_verification_algorithms.all,
            bundle.anchors(),
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| Error::InvalidCertificate(webpki_error(e)))?;
        let id = spiffe_id(end_entity).map_err(|reason| {
            Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(IdentityMismatch(reason)),
            )))
        })?;
        let fits = match &self.want {
            Want::Exactly(want) => id == *want,
            Want::TrustDomain(prefix) => id.starts_with(prefix.as_str()),
        };
        if fits {
            Ok(())
        } else {
            let expected = match &self.want {
                Want::Exactly(want) => want.clone(),
                Want::TrustDomain(prefix) => format!("{prefix}..."),
            };
            Err(Error::InvalidCertificate(rustls::CertificateError::Other(
                rustls::OtherError(Arc::new(IdentityMismatch(format!(
                    "peer identity {id} is not {expected}"
                )))),
            )))
        }
    }
}

/// The certificate is valid but names the wrong workload.
#[derive(Debug)]
struct IdentityMismatch(String);

impl std::fmt::Display for IdentityMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for IdentityMismatch {}

fn webpki_error(error: webpki::Error) -> rustls::CertificateError {
    use rustls::CertificateError as C;
    match error {
        webpki::Error::BadDer | webpki::Error::BadDerTime => C::BadEncoding,
        webpki::Error::CertExpired { .. } => C::Expired,
        webpki::Error::CertNotValidYet { .. } => C::NotValidYet,
        webpki::Error::UnknownIssuer => C::UnknownIssuer,
        webpki::Error::InvalidSignatureForPublicKey => C::BadSignature,
        other => C::Other(rustls::OtherError(Arc::new(other))),
    }
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A short reason for a failed handshake, for metrics (`untrusted`, `expired`,
/// `wrong_identity`, `no_certificate`, `protocol`, `io`).
pub fn failure_reason(error: &std::io::Error) -> &'static str {
    let Some(tls) = error.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
        return "io";
    };
    match tls {
        Error::InvalidCertificate(cert) => match cert {
            rustls::CertificateError::Expired | rustls::CertificateError::NotValidYet => "expired",
            rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature => {
                "untrusted"
            }
            rustls::CertificateError::Other(other) if other.0.is::<IdentityMismatch>() => {
                "wrong_identity"
            }
            _ => "untrusted",
        },
        Error::NoCertificatesPresented => "no_certificate",
        Error::AlertReceived(
            rustls::AlertDescription::BadCertificate
            | rustls::AlertDescription::UnknownCA
            | rustls::AlertDescription::CertificateExpired
            | rustls::AlertDescription::CertificateRequired
            | rustls::AlertDescription::CertificateUnknown,
        ) => "rejected_by_peer",
        _ => "protocol",
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::identity::{bundle::TrustBundle, Ca};

    /// A CA (a root, or a root and an intermediate) and a bundle of its root.
    fn ca(intermediate: bool) -> (Ca, SharedBundle) {
        let dir = std::env::temp_dir().join(format!(
            "mesh-tls-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        crate::identity::ca::Material::generate(intermediate)
            .unwrap()
            .write(&dir)
            .unwrap();
        let ca = Ca::load(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let bundle = TrustBundle::new(ca.roots().to_vec(), std::path::Path::new("test")).unwrap();
        (ca, Arc::new(arc_swap::ArcSwap::from_pointee(bundle)))
    }

    fn key(ca: &(Ca, SharedBundle), id: &str, lifetime: Duration) -> Arc<CertifiedKey> {
        let leaf = ca.0.issue(id, lifetime).unwrap();
        certified_key(leaf.chain, leaf.key).unwrap()
    }

    /// Runs one in-memory handshake; the client expects `expected`.
    fn handshake(
        server_key: Arc<CertifiedKey>,
        server_root: &(Ca, SharedBundle),
        client_key: Arc<CertifiedKey>,
        client_root: &(Ca, SharedBundle),
        expected: &str,
    ) -> Result<String, Error> {
        let server_config = server_config(server_key, server_root.1.clone(), "cluster.local");
        let client_config = client_config(client_key, client_root.1.clone(), expected);
        let mut client = rustls::ClientConnection::new(
            client_config,
            ServerName::IpAddress(std::net::Ipv4Addr::new(100, 64, 0, 1).into()),
        )
        .unwrap();
        let mut server = rustls::ServerConnection::new(server_config).unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            client.write_tls(&mut buf).unwrap();
            if !buf.is_empty() {
                server.read_tls(&mut buf.as_slice()).unwrap();
                server.process_new_packets()?;
            }
            let mut buf = Vec::new();
            server.write_tls(&mut buf).unwrap();
            if !buf.is_empty() {
                client.read_tls(&mut buf.as_slice()).unwrap();
                client.process_new_packets()?;
            }
            if !client.is_handshaking() && !server.is_handshaking() {
                let peer = server.peer_certificates().unwrap();
                return Ok(spiffe_id(&peer[0]).unwrap());
            }
        }
        panic!("handshake did not finish");
    }

    /// Another CA with the same name fails on the signature, one with another name on the
    /// issuer: both are untrusted.
    fn untrusted(err: &Error) -> bool {
        matches!(
            err,
            Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature
            )
        )
    }

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    const API: &str = "spiffe://cluster.local/ns/shop/sa/api";

    #[test]
    fn mutual_spiffe_authentication() {
        let mesh = ca(false);
        let hour = Duration::from_secs(3600);
        // Positive control: the right identities on both sides.
        let peer = handshake(
            key(&mesh, WEB, hour),
            &mesh,
            key(&mesh, API, hour),
            &mesh,
            WEB,
        );
        assert_eq!(peer.unwrap(), API, "the server reads the client's identity");
        // The server presents another workload's certificate: the client refuses.
        let err = handshake(
            key(&mesh, API, hour),
            &mesh,
            key(&mesh, API, hour),
            &mesh,
            WEB,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("is not spiffe://cluster.local/ns/shop/sa/web"),
            "{err}"
        );
        // A client certificate from another CA: the server refuses.
        let other = ca(false);
        let err = handshake(
            key(&mesh, WEB, hour),
            &mesh,
            key(&other, API, hour),
            &mesh,
            WEB,
        )
        .unwrap_err();
        assert!(untrusted(&err), "{err}");
        // A server certificate from another CA: the client refuses.
        let err = handshake(
            key(&other, WEB, hour),
            &mesh,
            key(&mesh, API, hour),
            &mesh,
            WEB,
        )
        .unwrap_err();
        assert!(untrusted(&err), "{err}");
        // Another trust domain: refused by the server.
        let foreign = "spiffe://example.org/ns/shop/sa/api";
        let err = handshake(
            key(&mesh, WEB, hour),
            &mesh,
            key(&mesh, foreign, hour),
            &mesh,
            WEB,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("is not spiffe://cluster.local/..."),
            "{err}"
        );
    }

    /// The reasons the metrics count, from real handshake failures as tokio-rustls reports
    /// them (an I/O error wrapping the rustls error).
    #[test]
    fn handshake_failures_are_classified() {
        let mesh = ca(false);
        let other = ca(false);
        let hour = Duration::from_secs(3600);
        let reason =
            |err: Error| failure_reason(&std::io::Error::new(std::io::ErrorKind::InvalidData, err));
        let wrong = handshake(
            key(&mesh, API, hour),
            &mesh,
            key(&mesh, API, hour),
            &mesh,
            WEB,
        );
        assert_eq!(reason(wrong.unwrap_err()), "wrong_identity");
        let foreign = handshake(
            key(&mesh, WEB, hour),
            &mesh,
            key(&other, API, hour),
            &mesh,
            WEB,
        );
        assert_eq!(reason(foreign.unwrap_err()), "untrusted");
        assert_eq!(
            reason(Error::InvalidCertificate(rustls::CertificateError::Expired)),
            "expired"
        );
        assert_eq!(reason(Error::NoCertificatesPresented), "no_certificate");
        assert_eq!(failure_reason(&std::io::Error::other("reset")), "io");
    }

    #[test]
    fn an_expired_certificate_is_refused() {
        let mesh = ca(false);
        // Valid from one minute ago (backdated) until one second from now.
        let short = key(&mesh, API, Duration::from_secs(1));
        std::thread::sleep(Duration::from_millis(2100));
        let err = handshake(
            key(&mesh, WEB, Duration::from_secs(3600)),
            &mesh,
            short,
            &mesh,
            WEB,
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidCertificate(rustls::CertificateError::Expired)
            ),
            "{err}"
        );
    }

    /// A chain through an intermediate verifies against a bundle of the root alone; a root
    /// added to the bundle is trusted by the next handshake, a root removed is not.
    #[test]
    fn intermediates_and_bundle_changes() {
        let hour = Duration::from_secs(3600);
        let mesh = ca(true);
        let peer = handshake(
            key(&mesh, WEB, hour),
            &mesh,
            key(&mesh, API, hour),
            &mesh,
            WEB,
        );
        assert_eq!(peer.unwrap(), API);
        let next = ca(true);
        let err = handshake(
            key(&next, WEB, hour),
            &mesh,
            key(&mesh, API, hour),
            &mesh,
            WEB,
        )
        .unwrap_err();
        assert!(untrusted(&err), "{err}");
        let both: Vec<_> = [mesh.0.roots(), next.0.roots()].concat();
        mesh.1.store(Arc::new(
            TrustBundle::new(both, std::path::Path::new("t")).unwrap(),
        ));
        let peer = handshake(
            key(&next, WEB, hour),
            &mesh,
            key(&mesh, API, hour),
            &mesh,
            WEB,
        );
        assert_eq!(peer.unwrap(), API, "a root added is trusted at once");
        let leaf = mesh.0.issue(WEB, hour).unwrap();
        verify_chain(&leaf.chain, &mesh.1, WEB).unwrap();
        assert!(verify_chain(&leaf.chain, &mesh.1, API).is_err());
        assert!(verify_chain(&leaf.chain, &next.1, WEB).is_err());
    }
}
