//! A node's client of the signer: a new key per certificate, a CSR over TLS, the returned
//! chain checked before use.
//!
//! The protocol (docs/security.md): `POST /v1/sign` on the signer's TLS port (TLS 1.3; the
//! signer proves the SPIFFE ID `--ca-identity` with a certificate chained to the node's trust
//! bundle), `authorization: Bearer <token>` (the node proxy's projected ServiceAccount token in
//! a cluster, its node token in file mode; re-read from its file on every request, since
//! projected tokens rotate), a JSON body `{"identity", "csr" (PEM), "lifetime_seconds"}`.
//! The answer: `200 {"chain": [PEM, ...]}` (the leaf first, then the intermediates), or an
//! error status with `{"reason", "message"}`.

use std::{path::PathBuf, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName};
use serde::{Deserialize, Serialize};

use super::{bundle::SharedBundle, tls, Leaf};

/// How long one request to the signer may take, connection included.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The largest answer read.
const MAX_ANSWER: usize = 64 * 1024;

/// The body of a signing request.
#[derive(Debug, Serialize, Deserialize)]
pub struct SignRequest {
    /// The SPIFFE ID asked for.
    pub identity: String,
    /// A PKCS#10 CSR (PEM); only its public key (and the signature proving its possession) is
    /// used.
    pub csr: String,
    /// The lifetime asked for; the signer caps it.
    #[serde(default)]
    pub lifetime_seconds: u64,
}

/// A successful answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct SignAnswer {
    /// The leaf, then the intermediates (PEM).
    pub chain: Vec<String>,
}

/// A refusal.
#[derive(Debug, Serialize, Deserialize)]
pub struct Refusal {
    /// Machine-readable (`invalid_token`, `wrong_audience`, `not_node_proxy`, `not_on_node`,
    /// ...), the label of `mesh_ca_refusals_total`.
    pub reason: String,
    /// For people.
    pub message: String,
}

/// Why a certificate could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The signer could not be reached or answered garbage.
    #[error("signer {address}: {detail}")]
    Unreachable {
        /// Its address.
        address: String,
        /// What happened.
        detail: String,
    },
    /// The signer refused.
    #[error("signer {address} refused ({status} {reason}): {message}")]
    Refused {
        /// Its address.
        address: String,
        /// The HTTP status.
        status: u16,
        /// Its reason.
        reason: String,
        /// Its message.
        message: String,
    },
    /// What it returned is not usable here.
    #[error("the certificate from signer {address} is not usable: {detail}")]
    Unusable {
        /// Its address.
        address: String,
        /// Why.
        detail: String,
    },
}

/// Where and how a node asks for certificates.
#[derive(Clone, Debug)]
pub struct SignerClient {
    /// `host:port` of the signer.
    pub address: String,
    /// The signer's SPIFFE ID.
    pub identity: String,
    /// The file holding the bearer token.
    pub token_file: PathBuf,
    /// The roots the signer's certificate and the returned chains must chain to.
    pub bundle: SharedBundle,
}

impl SignerClient {
    /// A new key and a certificate for `identity` from the signer, checked against the trust
    /// bundle in force.
    pub async fn sign(&self, identity: &str, lifetime: Duration) -> Result<Leaf, SignError> {
        match tokio::time::timeout(TIMEOUT, self.request(identity, lifetime)).await {
            Ok(result) => result,
            Err(_) => Err(self.unreachable(format!("no answer within {TIMEOUT:?}"))),
        }
    }

    fn unreachable(&self, detail: impl std::fmt::Display) -> SignError {
        SignError::Unreachable {
            address: self.address.clone(),
            detail: detail.to_string(),
        }
    }

    fn unusable(&self, detail: impl std::fmt::Display) -> SignError {
        SignError::Unusable {
            address: self.address.clone(),
            detail: detail.to_string(),
        }
    }

    async fn request(&self, identity: &str, lifetime: Duration) -> Result<Leaf, SignError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| self.unusable(e))?;
        let csr = csr(identity, &key).map_err(|e| self.unusable(e))?;
        let chain = self.sign_csr(identity, &csr, lifetime).await?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(&chain[0]).map_err(|e| self.unusable(e))?;
        if parsed.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        {
            return Err(self.unusable("the certificate is not for the key sent"));
        }
        let expires = std::time::UNIX_EPOCH
            + Duration::from_secs(parsed.validity().not_after.timestamp().max(0) as u64);
        Ok(Leaf {
            chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            expires,
        })
    }

    /// Sends `csr` (PEM) for `identity`; returns the chain (the leaf first) once it verifies
    /// against the trust bundle in force for that identity.
    pub async fn sign_csr(
        &self,
        identity: &str,
        csr: &str,
        lifetime: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, SignError> {
        let token = std::fs::read_to_string(&self.token_file)
            .map_err(|e| self.unreachable(format!("token {}: {e}", self.token_file.display())))?;
        let body = serde_json::to_vec(&SignRequest {
            identity: identity.to_string(),
            csr: csr.to_string(),
            lifetime_seconds: lifetime.as_secs(),
        })
        .map_err(|e| self.unusable(e))?;
        let (status, answer) = self.post(token.trim(), body).await?;
        if status != 200 {
            let refusal: Refusal = serde_json::from_slice(&answer).unwrap_or(Refusal {
                reason: "unknown".into(),
                message: String::from_utf8_lossy(&answer).into_owned(),
            });
            return Err(SignError::Refused {
                address: self.address.clone(),
                status,
                reason: refusal.reason,
                message: refusal.message,
            });
        }
        let answer: SignAnswer = serde_json::from_slice(&answer)
            .map_err(|e| self.unreachable(format!("not a signing answer: {e}")))?;
        let mut chain: Vec<CertificateDer<'static>> = Vec::new();
        for pem in &answer.chain {
            chain.extend(
                super::ca::certs(pem, std::path::Path::new("answer"))
                    .map_err(|e| self.unusable(e))?,
            );
        }
        if chain.is_empty() {
            return Err(self.unusable("empty chain"));
        }
        tls::verify_chain(&chain, &self.bundle, identity).map_err(|e| {
            self.unusable(format!(
                "{e} (trust bundle {}: is this node's bundle behind the signer's root?)",
                self.bundle.load().fingerprint()
            ))
        })?;
        Ok(chain)
    }

    async fn post(&self, token: &str, body: Vec<u8>) -> Result<(u16, Bytes), SignError> {
        let tcp = tokio::net::TcpStream::connect(&self.address)
            .await
            .map_err(|e| self.unreachable(e))?;
        let config = tls::signer_client_config(self.bundle.clone(), &self.identity);
        let host = self
            .address
            .rsplit_once(':')
            .map_or(&*self.address, |h| h.0);
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| self.unreachable(format!("{host}: {e}")))?;
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| self.unreachable(format!("TLS: {e}")))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.unreachable(e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let request = http::Request::post("/v1/sign")
            .header(http::header::HOST, host)
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| self.unusable(e))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = response.status().as_u16();
        let answer = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| self.unreachable(format!("reading the answer: {e}")))?
            .to_bytes();
        Ok((status, answer))
    }
}

/// A CSR for `identity` over `key` (PEM).
pub fn csr(identity: &str, key: &KeyPair) -> Result<String, String> {
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(
        identity
            .try_into()
            .map_err(|e| format!("{identity}: {e}"))?,
    )];
    params
        .serialize_request(key)
        .and_then(|csr| csr.pem())
        .map_err(|e| e.to_string())
}
