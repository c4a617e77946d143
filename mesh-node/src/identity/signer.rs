//! The signer (`mesh-node ca serve`): the only process holding the CA key. It signs a node
//! proxy's CSR for the identity of a pod scheduled on that proxy's node, and for nothing else.
//!
//! Each request is decided in three steps, each refusal logged and counted by reason
//! (`mesh_ca_refusals_total{reason}`):
//! 1. **Who calls** ([`Auth`]): in a cluster, the bearer token goes to the TokenReview API with
//!    the signer's audience; the review must be authenticated for that audience, the caller
//!    must be one of the node proxy's service accounts (`--node-account`, Istio's
//!    `CA_TRUSTED_NODE_ACCOUNTS`), and the token must be bound to a pod (`extra`
//!    `authentication.kubernetes.io/pod-name`/`pod-uid`) that the signer's own pod watch
//!    holds with that UID, scheduled on a node: that node is the caller's. In file mode a
//!    token file names each node's token.
//! 2. **What for**: the SPIFFE ID asked for must be of the trust domain and name the service
//!    account of a pod scheduled on the caller's node.
//! 3. **Signing**: only the CSR's public key is used (its signature proves the caller holds
//!    the key); names, extensions and the lifetime are the signer's own.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

use super::{
    ca::{to_pem, Ca},
    client::{Refusal, SignAnswer, SignRequest},
    tls,
};

/// The bound pod's name in a TokenReview's `user.extra`.
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// The bound pod's UID.
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// The largest request body read.
const MAX_REQUEST: usize = 16 * 1024;
/// Lifetime of the signer's own serving certificate (renewed at half).
const SERVING_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// How callers prove which node they are.
pub enum Auth {
    /// File mode: `token -> node`, from a file of `<node> <token>` lines.
    Tokens(BTreeMap<String, String>),
    /// A cluster: the TokenReview API.
    Review {
        /// The API client.
        client: kube::Client,
        /// The audience tokens must be bound to.
        audience: String,
        /// `namespace/name` of the service accounts node proxies run as.
        node_accounts: BTreeSet<String>,
    },
}

impl Auth {
    /// Reads a node-token file: one `<node> <token>` per line, `#` comments.
    pub fn tokens_file(path: &Path) -> anyhow::Result<Auth> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading node tokens {}", path.display()))?;
        let mut tokens = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let (Some(node), Some(token), None) = (words.next(), words.next(), words.next()) else {
                anyhow::bail!("{}:{}: expected `<node> <token>`", path.display(), n + 1);
            };
            if token.len() < 16 {
                anyhow::bail!(
                    "{}:{}: the token of node {node} is shorter than 16 characters",
                    path.display(),
                    n + 1
                );
            }
            tokens.insert(token.to_string(), node.to_string());
        }
        Ok(Auth::Tokens(tokens))
    }
}

/// One pod as the signer needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `metadata.uid` (absent in file configs).
    pub uid: Option<String>,
    /// `spec.nodeName`.
    pub node: Option<String>,
    /// `spec.serviceAccountName` (`default` when unset).
    pub service_account: String,
}

/// The pods the signer knows.
#[derive(Clone)]
pub enum Pods {
    /// From the config file (reloaded on change).
    File(Arc<ArcSwap<Vec<PodInfo>>>),
    /// From the signer's own watch of the API.
    Kube(reflector::Store<Pod>),
}

impl Pods {
    /// The pods of a config file's resources.
    pub fn from_resources(resources: &crate::config::Resources) -> Vec<PodInfo> {
        resources
            .pods
            .iter()
            .map(|p| PodInfo {
                namespace: p.metadata.namespace().to_string(),
                name: p.metadata.name.clone(),
                uid: None,
                node: p.spec.node_name.clone(),
                service_account: p
                    .spec
                    .service_account_name
                    .clone()
                    .unwrap_or_else(|| "default".into()),
            })
            .collect()
    }

    fn info(pod: &Pod) -> PodInfo {
        let spec = pod.spec.as_ref();
        PodInfo {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone(),
            node: spec.and_then(|s| s.node_name.clone()),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
        }
    }

    fn find(&self, namespace: &str, name: &str) -> Option<PodInfo> {
        match self {
            Pods::File(pods) => pods
                .load()
                .iter()
                .find(|p| p.namespace == namespace && p.name == name)
                .cloned(),
            Pods::Kube(store) => store
                .get(&reflector::ObjectRef::new(name).within(namespace))
                .map(|p| Pods::info(&p)),
        }
    }

    /// Whether a pod of `namespace` running as `service_account` is scheduled on `node`.
    fn on_node(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        let fits = |p: &PodInfo| {
            p.node.as_deref() == Some(node)
                && p.namespace == namespace
                && p.service_account == service_account
        };
        match self {
            Pods::File(pods) => pods.load().iter().any(fits),
            // Compared in place: no pod is copied per request.
            Pods::Kube(store) => store.state().iter().any(|p| {
                let spec = p.spec.as_ref();
                spec.and_then(|s| s.node_name.as_deref()) == Some(node)
                    && p.metadata.namespace.as_deref() == Some(namespace)
                    && spec
                        .and_then(|s| s.service_account_name.as_deref())
                        .unwrap_or("default")
                        == service_account
            }),
        }
    }

    /// Watches every pod of the cluster; returns once the first list is in.
    pub async fn watch(client: kube::Client) -> anyhow::Result<Pods> {
        let (reader, writer) = reflector::store::<Pod>();
        let stream = reflector(
            writer,
            watcher(kube::Api::<Pod>::all(client), watcher::Config::default()),
        )
        .default_backoff()
        .touched_objects();
        tokio::spawn(async move {
            use futures_util::StreamExt;
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                if let Err(err) = event {
                    tracing::warn!("pod watch: {err}");
                }
            }
        });
        reader
            .wait_until_ready()
            .await
            .context("the pod watch ended before its first list")?;
        Ok(Pods::Kube(reader))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// The signer's metrics.
#[derive(Clone, Default)]
pub struct SignerMetrics {
    refusals: Family<ReasonLabels, Counter>,
    issued: Counter,
}

impl SignerMetrics {
    /// Registers `mesh_ca_refusals_total{reason}` and `mesh_ca_certificates_issued_total`.
    pub fn register(registry: &mut Registry) -> SignerMetrics {
        let metrics = SignerMetrics::default();
        registry.register(
            "mesh_ca_refusals",
            "Signing requests refused, by reason",
            metrics.refusals.clone(),
        );
        registry.register(
            "mesh_ca_certificates_issued",
            "Workload certificates signed",
            metrics.issued.clone(),
        );
        metrics
    }
}

/// A refused request: status, reason (the metric's label), message.
#[derive(Debug)]
struct Refused(StatusCode, &'static str, String);

fn refuse(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Refused {
    Refused(status, reason, message.into())
}

/// Who called, once authenticated.
struct Caller {
    node: String,
    /// For logs: the pod or node token that called.
    who: String,
}

/// Everything the signer decides with.
pub struct Signer {
    /// The CA (swapped in place when its files change, `--ca-dir`).
    pub ca: ArcSwap<Ca>,
    /// Identities outside `spiffe://<trust_domain>/` are refused.
    pub trust_domain: String,
    /// Lifetimes asked for are capped at this (and a request of 0 gets it).
    pub max_lifetime: Duration,
    /// How callers authenticate.
    pub auth: Auth,
    /// The pods.
    pub pods: Pods,
    /// Metrics.
    pub metrics: SignerMetrics,
}

impl Signer {
    async fn authenticate(&self, token: &str) -> Result<Caller, Refused> {
        let unauthorized = StatusCode::UNAUTHORIZED;
        match &self.auth {
            Auth::Tokens(tokens) => {
                // Every known token is compared in full, so the time taken says nothing about
                // which prefix matched.
                let mut node = None;
                for (known, owner) in tokens {
                    if constant_time_eq(known.as_bytes(), token.as_bytes()) {
                        node = Some(owner.clone());
                    }
                }
                node.map(|node| Caller {
                    who: format!("node token of {node}"),
                    node,
                })
                .ok_or_else(|| refuse(unauthorized, "invalid_token", "unknown node token"))
            }
            Auth::Review {
                client,
                audience,
                node_accounts,
            } => {
                let review = TokenReview {
                    spec: TokenReviewSpec {
                        token: Some(token.to_string()),
                        audiences: Some(vec![audience.clone()]),
                    },
                    ..Default::default()
                };
                let reviewed = kube::Api::<TokenReview>::all(client.clone())
                    .create(&Default::default(), &review)
                    .await
                    .map_err(|e| {
                        refuse(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "review_failed",
                            format!("TokenReview: {e}"),
                        )
                    })?;
                let status = reviewed.status.unwrap_or_default();
                if status.authenticated != Some(true) {
                    return Err(refuse(
                        unauthorized,
                        "invalid_token",
                        format!(
                            "the token does not authenticate: {}",
                            status.error.as_deref().unwrap_or("no reason given")
                        ),
                    ));
                }
                if !status
                    .audiences
                    .as_ref()
                    .is_some_and(|a| a.iter().any(|a| a == audience))
                {
                    return Err(refuse(
                        unauthorized,
                        "wrong_audience",
                        format!("the token is not bound to audience {audience}"),
                    ));
                }
                let user = status.user.unwrap_or_default();
                let username = user.username.unwrap_or_default();
                let account = username
                    .strip_prefix("system:serviceaccount:")
                    .and_then(|rest| rest.split_once(':'));
                let Some((namespace, account)) = account else {
                    return Err(refuse(
                        StatusCode::FORBIDDEN,
                        "not_node_proxy",
                        format!("{username} is not a service account"),
                    ));
                };
                if !node_accounts.contains(&format!("{namespace}/{account}")) {
                    return Err(refuse(
                        StatusCode::FORBIDDEN,
                        "not_node_proxy",
                        format!(
                            "service account {namespace}/{account} is not a node proxy's (--node-account)"
                        ),
                    ));
                }
                let extra = user.extra.unwrap_or_default();
                let one = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
                let (Some(pod), Some(uid)) = (one(POD_NAME), one(POD_UID)) else {
                    return Err(refuse(
                        unauthorized,
                        "unbound_token",
                        "the token is not bound to a pod",
                    ));
                };
                let who = format!("pod {namespace}/{pod}");
                let known = self.pods.find(namespace, &pod);
                let Some(known) = known.filter(|p| p.uid.as_deref() == Some(uid.as_str())) else {
                    return Err(refuse(
                        unauthorized,
                        "unknown_pod",
                        format!("{who} with UID {uid} is not in the signer's pod watch"),
                    ));
                };
                let node = known.node.ok_or_else(|| {
                    refuse(
                        StatusCode::FORBIDDEN,
                        "not_scheduled",
                        format!("{who} is not scheduled on a node"),
                    )
                })?;
                Ok(Caller { node, who })
            }
        }
    }

    /// `(namespace, service account)` of `identity`, if of the trust domain.
    fn parse_identity<'a>(&self, identity: &'a str) -> Result<(&'a str, &'a str), Refused> {
        let bad = || {
            refuse(
                StatusCode::BAD_REQUEST,
                "bad_identity",
                format!(
                    "{identity} is not spiffe://{}/ns/<namespace>/sa/<service account>",
                    self.trust_domain
                ),
            )
        };
        let rest = identity
            .strip_prefix("spiffe://")
            .and_then(|r| r.strip_prefix(self.trust_domain.as_str()))
            .and_then(|r| r.strip_prefix("/ns/"))
            .ok_or_else(bad)?;
        let (namespace, account) = rest.split_once("/sa/").ok_or_else(bad)?;
        let valid = |s: &str| !s.is_empty() && !s.contains('/');
        if valid(namespace) && valid(account) {
            Ok((namespace, account))
        } else {
            Err(bad())
        }
    }

    /// Decides and signs one request.
    async fn decide(&self, token: Option<&str>, body: &[u8]) -> Result<SignAnswer, Refused> {
        let token = token.ok_or_else(|| {
            refuse(
                StatusCode::UNAUTHORIZED,
                "no_token",
                "no `authorization: Bearer` token",
            )
        })?;
        let request: SignRequest = serde_json::from_slice(body).map_err(|e| {
            refuse(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("not a signing request: {e}"),
            )
        })?;
        let caller = self.authenticate(token).await?;
        let (namespace, account) = self.parse_identity(&request.identity)?;
        if !self.pods.on_node(&caller.node, namespace, account) {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "not_on_node",
                format!(
                    "{} (node {}) asked for {}: no pod of service account {namespace}/{account} \
                     is scheduled on node {}",
                    caller.who, caller.node, request.identity, caller.node
                ),
            ));
        }
        let public_key = csr_public_key(&request.csr)
            .map_err(|e| refuse(StatusCode::BAD_REQUEST, "bad_csr", e))?;
        let lifetime = match request.lifetime_seconds {
            0 => self.max_lifetime,
            s => Duration::from_secs(s).min(self.max_lifetime),
        };
        let ca = self.ca.load();
        let (leaf, _) = ca
            .sign(&request.identity, &public_key, lifetime)
            .map_err(|e| {
                refuse(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "sign_failed",
                    e.to_string(),
                )
            })?;
        let chain = std::iter::once(&leaf)
            .chain(ca.chain())
            .map(to_pem)
            .collect();
        self.metrics.issued.inc();
        tracing::info!(
            identity = request.identity,
            caller = caller.who,
            node = caller.node,
            lifetime_s = lifetime.as_secs(),
            "signed"
        );
        Ok(SignAnswer { chain })
    }

    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        if req.method() != http::Method::POST || req.uri().path() != "/v1/sign" {
            return json(
                StatusCode::NOT_FOUND,
                &Refusal {
                    reason: "not_found".into(),
                    message: "only POST /v1/sign is served".into(),
                },
            );
        }
        let token = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| t.trim().to_string());
        let body = match Limited::new(req.into_body(), MAX_REQUEST).collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) => {
                return self.refused(
                    refuse(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "bad_request",
                        format!("request body: {e}"),
                    ),
                    peer,
                )
            }
        };
        match self.decide(token.as_deref(), &body).await {
            Ok(answer) => json(StatusCode::OK, &answer),
            Err(refused) => self.refused(refused, peer),
        }
    }

    fn refused(
        &self,
        Refused(status, reason, message): Refused,
        peer: SocketAddr,
    ) -> Response<Full<Bytes>> {
        self.metrics
            .refusals
            .get_or_create(&ReasonLabels { reason })
            .inc();
        tracing::warn!(%peer, reason, "signing refused: {message}");
        json(
            status,
            &Refusal {
                reason: reason.to_string(),
                message,
            },
        )
    }
}

fn json(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(body).unwrap_or_default();
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The public key (SubjectPublicKeyInfo, DER) of a CSR whose signature verifies with it;
/// everything else in the CSR is ignored.
pub fn csr_public_key(pem: &str) -> Result<Vec<u8>, String> {
    use x509_parser::prelude::FromDer;
    let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| format!("not a PEM CSR: {e}"))?;
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
        .map_err(|e| format!("not a PKCS#10 CSR: {e}"))?;
    csr.verify_signature()
        .map_err(|e| format!("the CSR's signature does not verify: {e}"))?;
    Ok(csr.certification_request_info.subject_pki.raw.to_vec())
}

use rustls::pki_types::pem::PemObject as _;

/// How often `--ca-dir` is checked for a new CA.
const CA_CHECK: Duration = Duration::from_secs(2);

/// The signer's serving certificate, renewed in place.
#[derive(Debug)]
struct ServingCert(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

fn serving_key(ca: &Ca, identity: &str) -> anyhow::Result<Arc<CertifiedKey>> {
    let leaf = ca.issue(identity, SERVING_LIFETIME)?;
    tls::certified_key(leaf.chain, leaf.key).map_err(|e| anyhow::anyhow!("{e}"))
}

/// What `mesh-node ca serve` runs with.
pub struct ServeSettings {
    /// The TLS listener for nodes.
    pub listen: SocketAddr,
    /// Plain HTTP: `/metrics`, `/healthz/ready`.
    pub admin: SocketAddr,
    /// The signer's own SPIFFE ID (its serving certificate's).
    pub identity: String,
    /// Where the CA was read from: re-read when its files change.
    pub ca_dir: Option<PathBuf>,
}

/// Serves until SIGTERM or SIGINT.
pub async fn serve(
    signer: Signer,
    settings: ServeSettings,
    registry: Registry,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("binding {}", settings.listen))?;
    let admin = tokio::net::TcpListener::bind(settings.admin)
        .await
        .with_context(|| format!("binding {}", settings.admin))?;
    let ca = signer.ca.load();
    tracing::info!(listen = %settings.listen, admin = %settings.admin, identity = settings.identity, roots = ca.roots().len(), intermediates = ca.chain().len(), "signer serving");
    tokio::spawn(serve_admin(admin, Arc::new(registry)));
    let signing = accept(
        listener,
        Arc::new(signer),
        settings.identity,
        settings.ca_dir,
    )?;
    tokio::select! {
        () = signing => Ok(()),
        stop = crate::app::wait_for_shutdown() => stop,
    }
}

/// The versions of the CA files in `dir`, to notice a change (a mounted Secret's update
/// swaps its files).
fn ca_files(dir: &Path) -> Vec<Option<crate::reload::Version>> {
    [
        super::ca::CA_CERT_FILE,
        super::ca::CA_KEY_FILE,
        super::ca::CERT_CHAIN_FILE,
        super::ca::ROOT_CERT_FILE,
        "tls.crt",
        "tls.key",
        "ca.crt",
    ]
    .iter()
    .map(|name| crate::reload::version(&dir.join(name)))
    .collect()
}

/// Accepts signing requests on `listener` forever, presenting a certificate for `identity`
/// (renewed at half its lifetime). With `ca_dir`, a change of its files swaps the CA in
/// (and a new serving certificate from it); a CA that does not load keeps the last good one.
fn accept(
    listener: tokio::net::TcpListener,
    signer: Arc<Signer>,
    identity: String,
    ca_dir: Option<PathBuf>,
) -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let serving = Arc::new(ServingCert(ArcSwap::new(serving_key(
        &signer.ca.load(),
        &identity,
    )?)));
    let acceptor = tokio_rustls::TlsAcceptor::from(tls::signer_server_config(serving.clone()));
    Ok(async move {
        let mut renew = tokio::time::interval_at(
            tokio::time::Instant::now() + SERVING_LIFETIME / 2,
            SERVING_LIFETIME / 2,
        );
        let mut check = tokio::time::interval(CA_CHECK);
        let mut seen = ca_dir.as_deref().map(ca_files);
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        tracing::warn!("accept: {err}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = renew.tick() => {
                    match serving_key(&signer.ca.load(), &identity) {
                        Ok(key) => serving.0.store(key),
                        Err(err) => tracing::error!("renewing the signer's certificate: {err:#}"),
                    }
                    continue;
                }
                _ = check.tick(), if ca_dir.is_some() => {
                    let Some(dir) = ca_dir.as_deref() else { continue };
                    let now = Some(ca_files(dir));
                    if now == seen {
                        continue;
                    }
                    seen = now;
                    match Ca::load(dir).map_err(anyhow::Error::from).and_then(|ca| {
                        let key = serving_key(&ca, &identity)?;
                        Ok((ca, key))
                    }) {
                        Ok((ca, key)) => {
                            tracing::info!(dir = %dir.display(), roots = ca.roots().len(), intermediates = ca.chain().len(), "CA changed: signing with the new one");
                            signer.ca.store(Arc::new(ca));
                            serving.0.store(key);
                        }
                        Err(err) => tracing::error!(dir = %dir.display(), "CA update rejected, signing with the last good one: {err:#}"),
                    }
                    continue;
                }
            };
            let (acceptor, signer) = (acceptor.clone(), signer.clone());
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(err)) => return tracing::debug!(%peer, "TLS handshake failed: {err}"),
                    Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                };
                let service = hyper::service::service_fn(move |req| {
                    let signer = signer.clone();
                    async move { Ok::<_, std::convert::Infallible>(signer.handle(req, peer).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    })
}

/// The signer's SPIFFE ID in a trust domain, unless configured otherwise.
pub fn default_identity(trust_domain: &str) -> String {
    format!("spiffe://{trust_domain}/ns/mesh-system/sa/mesh-ca")
}

/// A signer on loopback inside this process, in file mode: for in-process proxies (tests).
/// It signs for `pods`, each node of `nodes` authenticated by a token it writes to a file of
/// its own; the directory goes when it is dropped.
pub struct Local {
    /// Where it listens.
    pub address: SocketAddr,
    dir: PathBuf,
    bundle: super::bundle::SharedBundle,
    task: tokio::task::JoinHandle<()>,
}

impl Local {
    /// Starts it on 127.0.0.1.
    pub async fn start(ca: Ca, pods: Vec<PodInfo>, nodes: &[&str]) -> anyhow::Result<Local> {
        let dir = std::env::temp_dir().join(format!(
            "mesh-signer-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir)?;
        let mut tokens = BTreeMap::new();
        for node in nodes {
            let token = format!("{node}-{:032x}", fastrand::u128(..));
            std::fs::write(dir.join(format!("{node}.token")), &token)?;
            tokens.insert(token, node.to_string());
        }
        let bundle = super::bundle::TrustBundle::new(ca.roots().to_vec(), &dir)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let signer = Signer {
            ca: ArcSwap::from_pointee(ca),
            trust_domain: "cluster.local".into(),
            max_lifetime: Duration::from_secs(24 * 3600),
            auth: Auth::Tokens(tokens),
            pods: Pods::File(Arc::new(ArcSwap::from_pointee(pods))),
            metrics: SignerMetrics::default(),
        };
        let task = tokio::spawn(accept(
            listener,
            Arc::new(signer),
            default_identity("cluster.local"),
            None,
        )?);
        Ok(Local {
            address,
            dir,
            bundle: Arc::new(ArcSwap::from_pointee(bundle)),
            task,
        })
    }

    /// A client for node `node`, trusting the signer's roots.
    pub fn client(&self, node: &str) -> super::client::SignerClient {
        super::client::SignerClient {
            address: self.address.to_string(),
            identity: default_identity("cluster.local"),
            token_file: self.dir.join(format!("{node}.token")),
            bundle: self.bundle.clone(),
        }
    }

    /// Stops answering (the signer is down).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn serve_admin(listener: tokio::net::TcpListener, registry: Arc<Registry>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let registry = registry.clone();
                async move {
                    let response = match req.uri().path() {
                        "/metrics" => {
                            let mut text = String::new();
                            let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
                            Response::new(Full::new(Bytes::from(text)))
                        }
                        "/healthz/ready" | "/healthz/live" => {
                            Response::new(Full::new(Bytes::from_static(b"ok\n")))
                        }
                        _ => Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::new()))
                            .unwrap_or_default(),
                    };
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// The file mode's pods: read now, re-read when the file changes (a bad update keeps the last
/// good pods).
pub fn file_pods(path: PathBuf) -> anyhow::Result<Pods> {
    let seen = crate::reload::version(&path);
    let resources =
        crate::config::load_file(&path).map_err(|e| anyhow::anyhow!("{}", e.render()))?;
    let pods = Arc::new(ArcSwap::from_pointee(Pods::from_resources(&resources)));
    let shared = pods.clone();
    tokio::spawn(async move {
        let mut seen = seen;
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now = crate::reload::version(&path);
            if now == seen {
                continue;
            }
            seen = now;
            match crate::config::load_file(&path) {
                Ok(resources) => shared.store(Arc::new(Pods::from_resources(&resources))),
                Err(err) => tracing::error!(
                    "config update rejected, the last good pods stay:\n{}",
                    err.render()
                ),
            }
        }
    });
    Ok(Pods::File(pods))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(pods: Vec<PodInfo>) -> Signer {
        let root = super::super::ca::generate_root().unwrap();
        Signer {
            ca: ArcSwap::from_pointee(Ca::from_pem(&root.cert, &root.key).unwrap()),
            trust_domain: "cluster.local".into(),
            max_lifetime: Duration::from_secs(3600),
            auth: Auth::Tokens(BTreeMap::from([(
                "a-token-of-node-a-0123".into(),
                "node-a".into(),
            )])),
            pods: Pods::File(Arc::new(ArcSwap::from_pointee(pods))),
            metrics: SignerMetrics::default(),
        }
    }

    fn pod(node: &str, sa: &str) -> PodInfo {
        PodInfo {
            namespace: "shop".into(),
            name: format!("{sa}-1"),
            uid: None,
            node: Some(node.into()),
            service_account: sa.into(),
        }
    }

    fn request(identity: &str, csr: &str, lifetime: u64) -> Vec<u8> {
        serde_json::to_vec(&SignRequest {
            identity: identity.into(),
            csr: csr.into(),
            lifetime_seconds: lifetime,
        })
        .unwrap()
    }

    /// A CSR that asks for everything a leaf must not have: CA:TRUE, extra names, key usages
    /// for signing certificates.
    fn greedy_csr(key: &rcgen::KeyPair) -> String {
        let mut params = rcgen::CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://cluster.local/ns/kube-system/sa/admin"
                .try_into()
                .unwrap(),
        ));
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    #[tokio::test]
    async fn only_the_public_key_of_a_csr_is_used() {
        let signer = signer(vec![pod("node-a", "web")]);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let id = "spiffe://cluster.local/ns/shop/sa/web";
        let ten_years = 10 * 365 * 24 * 3600;
        let answer = signer
            .decide(
                Some("a-token-of-node-a-0123"),
                &request(id, &greedy_csr(&key), ten_years),
            )
            .await
            .unwrap();
        let leaf = super::super::ca::certs(&answer.chain[0], Path::new("t")).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf[0]).unwrap();
        assert!(!cert.is_ca());
        assert_eq!(tls::spiffe_id(&leaf[0]).unwrap(), id);
        let names = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(names.value.general_names.len(), 1, "only the SPIFFE ID");
        let validity = cert.validity();
        let span = validity.not_after.timestamp() - validity.not_before.timestamp();
        assert_eq!(
            span,
            3600 + super::super::ca::BACKDATE.as_secs() as i64,
            "capped"
        );
        assert_eq!(
            cert.public_key().raw,
            rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        );
        let usage = cert.key_usage().unwrap().unwrap().value;
        assert!(!usage.key_cert_sign() && usage.digital_signature());
    }

    #[tokio::test]
    async fn refusals_name_their_reason() {
        let signer = signer(vec![pod("node-a", "web"), pod("node-b", "api")]);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = super::super::client::csr("spiffe://cluster.local/ns/shop/sa/api", &key).unwrap();
        let token = Some("a-token-of-node-a-0123");
        let reason = |r: Result<SignAnswer, Refused>| r.unwrap_err().1;
        let api = "spiffe://cluster.local/ns/shop/sa/api";
        assert_eq!(
            reason(signer.decide(token, &request(api, &csr, 60)).await),
            "not_on_node"
        );
        assert_eq!(
            reason(
                signer
                    .decide(Some("a-token-of-node-b-0123"), &request(api, &csr, 60))
                    .await
            ),
            "invalid_token"
        );
        assert_eq!(
            reason(signer.decide(None, &request(api, &csr, 60)).await),
            "no_token"
        );
        let foreign = "spiffe://example.org/ns/shop/sa/web";
        assert_eq!(
            reason(signer.decide(token, &request(foreign, &csr, 60)).await),
            "bad_identity"
        );
        let web = "spiffe://cluster.local/ns/shop/sa/web";
        let tampered = csr.replace("MII", "MIJ");
        assert_eq!(
            reason(signer.decide(token, &request(web, &tampered, 60)).await),
            "bad_csr"
        );
        assert_eq!(reason(signer.decide(token, b"{").await), "bad_request");
        assert!(signer.decide(token, &request(web, &csr, 60)).await.is_ok());
    }
}
