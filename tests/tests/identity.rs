//! Trust that survives a compromised node: the CA key lives only in the signer's mount
//! namespace; the signer signs a node's CSR only for pods of that node, authenticating node
//! proxies by TokenReview of their bound tokens; chains through an intermediate verify against
//! the root alone; a root rotates under load without a failed connection; a stopped signer
//! costs nothing until certificates expire, and an expired certificate is never presented.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use mesh_node::identity::{
    bundle::TrustBundle,
    client::{SignError, SignerClient},
    signer::default_identity,
    Leaf,
};
use mesh_tests::{
    apps::{echo_text, Behaviour, Server, Session},
    cluster::Cluster,
    fixtures::{TWO_NODES, WEB_PORT},
    kube_api::FakeApi,
    require_root, signer, wait_until,
};

/// A pod whose service account runs only on node-b.
const ONLY_ON_B: &str = r#"
---
apiVersion: v1
kind: Pod
metadata: {name: b9, namespace: mesh, labels: {app: db}}
spec: {nodeName: node-b, serviceAccountName: only-b}
status: {podIP: 100.65.1.9, conditions: [{type: Ready, status: "True"}]}
"#;

const ONLY_B: &str = "spiffe://cluster.local/ns/mesh/sa/only-b";
const CLIENT: &str = "spiffe://cluster.local/ns/mesh/sa/client";

/// The node proxies as pods of the API (host-network pods of the DaemonSet).
const NODE_PROXIES: &str = r#"
---
apiVersion: v1
kind: Pod
metadata: {name: mesh-node-a, namespace: mesh-system}
spec: {nodeName: node-a, serviceAccountName: mesh-node, hostNetwork: true}
---
apiVersion: v1
kind: Pod
metadata: {name: mesh-node-b, namespace: mesh-system}
spec: {nodeName: node-b, serviceAccountName: mesh-node, hostNetwork: true}
"#;

/// A signer client of node `node` with `token`, trusting that node's bundle, run in the
/// node's namespace: what a node proxy (or an attacker on that node holding the token) has.
struct NodeClient<'a> {
    cluster: &'a Cluster,
    node: &'a str,
    client: SignerClient,
}

fn signer_client<'a>(cluster: &'a Cluster, node: &'a str, token: &str) -> NodeClient<'a> {
    let file = cluster
        .dir()
        .join(format!("token-{}", token_file_name(token)));
    std::fs::write(&file, token).unwrap();
    let bundle = TrustBundle::load(&cluster.node_state_dir(node).join("trust-bundle.pem"))
        .unwrap()
        .shared();
    let client = SignerClient {
        address: cluster.signer_ref().unwrap().address.to_string(),
        identity: default_identity("cluster.local"),
        token_file: file,
        bundle,
    };
    NodeClient {
        cluster,
        node,
        client,
    }
}

impl NodeClient<'_> {
    /// Runs `call` on the client in the node's namespace.
    fn run<T, F>(self, call: impl FnOnce(SignerClient) -> F + Send + 'static) -> T
    where
        T: Send + 'static,
        F: std::future::Future<Output = T>,
    {
        let client = self.client;
        self.cluster
            .node(self.node)
            .netns
            .run(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                Ok(runtime.block_on(call(client)))
            })
            .unwrap()
    }
}

/// Asks the signer for `identity` from node `node`'s namespace with `token`.
fn sign_as(cluster: &Cluster, node: &str, token: &str, identity: &str) -> Result<Leaf, SignError> {
    let identity = identity.to_string();
    signer_client(cluster, node, token)
        .run(move |client| async move { client.sign(&identity, Duration::from_secs(600)).await })
}

fn token_file_name(token: &str) -> String {
    format!(
        "{:x}",
        token
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b.into()))
    )
}

/// The reason of a refusal.
fn refused(result: Result<Leaf, SignError>) -> String {
    match result {
        Err(SignError::Refused { reason, .. }) => reason,
        Err(other) => panic!("not a refusal: {other}"),
        Ok(_) => panic!("issued"),
    }
}

fn refusals(cluster: &Cluster, reason: &str) -> u64 {
    cluster
        .signer_metric(&format!("mesh_ca_refusals_total{{reason=\"{reason}\"}}"))
        .unwrap_or(0)
}

fn addr(cluster: &Cluster, pod: &str) -> SocketAddr {
    SocketAddr::from((cluster.pod(pod).ip, WEB_PORT))
}

#[test]
fn the_ca_key_lives_only_in_the_signers_mount_namespace() {
    require_root!();
    let mut cluster = Cluster::new(TWO_NODES).unwrap();
    cluster.start_mesh_everywhere().unwrap();
    let _b1 = Server::start(&cluster.pod("b1").netns, WEB_PORT, Behaviour::Echo).unwrap();
    // Both nodes hold workload certificates and used them.
    assert_eq!(
        echo_text(&cluster.pod("a1").netns, addr(&cluster, "b1"), "hi\n").unwrap(),
        "hi\n"
    );
    let signer = cluster.signer_ref().unwrap();
    let key = signer.key_pem(signer.current()).unwrap();
    // Outside the signer's mount namespace its directory is an empty mount point.
    let outside = signer.vault().join(signer.current()).join("ca-key.pem");
    assert!(
        !outside.exists(),
        "{} is visible outside",
        outside.display()
    );
    let needles = signer::key_needles(&key).unwrap();
    // Positive control: the scan finds the key where it is, in the signer's memory.
    let in_signer = signer::scan_for(signer.pid().unwrap(), None, &needles).unwrap();
    assert!(
        in_signer.iter().any(|(i, _)| *i < 2),
        "the scan does not find the key in the signer: {in_signer:?}"
    );
    for node in ["node-a", "node-b"] {
        let pid = cluster.mesh_pid(node).unwrap();
        let found = signer::scan_for(pid, Some(&cluster.node_state_dir(node)), &needles).unwrap();
        assert!(found.is_empty(), "{node} holds the CA key: {found:?}");
        assert!(cluster
            .metric(node, "mesh_certificates")
            .is_ok_and(|held| held >= 1));
    }
}

#[test]
fn the_signer_signs_only_for_pods_of_the_callers_node_in_file_mode() {
    require_root!();
    let mut cluster = Cluster::new(&format!("{TWO_NODES}{ONLY_ON_B}")).unwrap();
    cluster.start_mesh_everywhere().unwrap();
    let token_a =
        std::fs::read_to_string(cluster.node_state_dir("node-a").join("ca-token")).unwrap();
    // Control: node-a's token for a pod of node-a.
    let leaf = sign_as(&cluster, "node-a", &token_a, CLIENT).unwrap();
    assert_eq!(leaf.chain.len(), 2, "leaf and intermediate");
    // node-a asking for a pod that runs only on node-b: refused, counted, logged.
    assert_eq!(
        refused(sign_as(&cluster, "node-a", &token_a, ONLY_B)),
        "not_on_node"
    );
    assert_eq!(refusals(&cluster, "not_on_node"), 1);
    let log = cluster.signer_ref().unwrap().log();
    assert!(
        log.contains("signing refused") && log.contains("only-b"),
        "{log}"
    );
    // A made-up token.
    assert_eq!(
        refused(sign_as(&cluster, "node-a", "0123456789abcdef0123", CLIENT)),
        "invalid_token"
    );
    // A CSR asking for CA:TRUE, more names, key usages of a CA and ten years: the signer uses
    // its public key and nothing else.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut greedy = rcgen::CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
    greedy.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://cluster.local/ns/kube-system/sa/admin"
            .try_into()
            .unwrap(),
    ));
    greedy.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    greedy.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let csr = greedy.serialize_request(&key).unwrap().pem().unwrap();
    let ten_years = Duration::from_secs(10 * 365 * 24 * 3600);
    let chain = signer_client(&cluster, "node-a", &token_a)
        .run(move |client| async move { client.sign_csr(CLIENT, &csr, ten_years).await })
        .unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    assert!(!leaf.is_ca());
    assert_eq!(
        leaf.subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .len(),
        1,
        "only the SPIFFE ID"
    );
    let usage = leaf.key_usage().unwrap().unwrap().value;
    assert!(!usage.key_cert_sign() && usage.digital_signature());
    let validity = leaf.validity();
    let days = (validity.not_after.timestamp() - validity.not_before.timestamp()) / 86400;
    assert!(days <= 1, "{days} days");
    assert_eq!(
        leaf.public_key().raw,
        rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
    );
    // node-b's own token gets it.
    let token_b =
        std::fs::read_to_string(cluster.node_state_dir("node-b").join("ca-token")).unwrap();
    assert!(sign_as(&cluster, "node-b", &token_b, ONLY_B).is_ok());
}

#[test]
fn node_proxies_authenticate_with_bound_tokens_reviewed_by_the_api() {
    require_root!();
    let config = format!("{TWO_NODES}{ONLY_ON_B}");
    let mut cluster = Cluster::new(&config).unwrap();
    let mut api = FakeApi::new();
    api.apply_yaml(&config).unwrap();
    api.apply_yaml(NODE_PROXIES).unwrap();
    api.listen_in(&cluster.node("node-a").netns, 6443).unwrap();
    let kubeconfig = cluster.dir().join("kubeconfig");
    FakeApi::kubeconfig("http://127.0.0.1:6443", &kubeconfig).unwrap();
    cluster.signer_args = [
        "--kube",
        "--kubeconfig",
        &kubeconfig.to_string_lossy(),
        "--no-node-tokens",
    ]
    .map(String::from)
    .to_vec();
    let proxy_token = |pod: &str| {
        api.token("mesh-system", "mesh-node", Some(pod), &["mesh-ca"], 3600)
            .unwrap()
    };
    for (node, pod) in [("node-a", "mesh-node-a"), ("node-b", "mesh-node-b")] {
        std::fs::create_dir_all(cluster.node_state_dir(node)).unwrap();
        std::fs::write(
            cluster.node_state_dir(node).join("ca-token"),
            proxy_token(pod),
        )
        .unwrap();
    }
    // The nodes get their certificates through TokenReview, and HBONE works with them.
    cluster.start_mesh_everywhere().unwrap();
    let _b1 = Server::start(&cluster.pod("b1").netns, WEB_PORT, Behaviour::Echo).unwrap();
    assert_eq!(
        echo_text(&cluster.pod("a1").netns, addr(&cluster, "b1"), "hi\n").unwrap(),
        "hi\n"
    );
    assert!(
        api.requests("review") >= 2,
        "the signer reviewed the nodes' tokens"
    );
    assert!(
        cluster
            .signer_metric("mesh_ca_certificates_issued_total")
            .unwrap()
            >= 2
    );

    let token_a = proxy_token("mesh-node-a");
    assert!(
        sign_as(&cluster, "node-a", &token_a, CLIENT).is_ok(),
        "control"
    );
    // A valid node-proxy token asks for a pod of another node.
    assert_eq!(
        refused(sign_as(&cluster, "node-a", &token_a, ONLY_B)),
        "not_on_node"
    );
    // An application pod's valid token (a1 runs as mesh/client) asks for its own identity.
    let app = api
        .token("mesh", "client", Some("a1"), &["mesh-ca"], 3600)
        .unwrap();
    assert_eq!(
        refused(sign_as(&cluster, "node-a", &app, CLIENT)),
        "not_node_proxy"
    );
    // The node proxy's token for another audience (the API server's).
    let wrong = api
        .token(
            "mesh-system",
            "mesh-node",
            Some("mesh-node-a"),
            &["https://kubernetes.default.svc"],
            3600,
        )
        .unwrap();
    assert_eq!(
        refused(sign_as(&cluster, "node-a", &wrong, CLIENT)),
        "invalid_token"
    );
    // Expired.
    let expired = api
        .token(
            "mesh-system",
            "mesh-node",
            Some("mesh-node-a"),
            &["mesh-ca"],
            -60,
        )
        .unwrap();
    assert_eq!(
        refused(sign_as(&cluster, "node-a", &expired, CLIENT)),
        "invalid_token"
    );
    // Not bound to a pod.
    let unbound = api
        .token("mesh-system", "mesh-node", None, &["mesh-ca"], 3600)
        .unwrap();
    assert_eq!(
        refused(sign_as(&cluster, "node-a", &unbound, CLIENT)),
        "unbound_token"
    );
    // Its pod deleted: the token stops validating; a new pod of the same name has another
    // UID, and the old token stays refused.
    api.delete("Pod", "mesh-system", "mesh-node-a").unwrap();
    assert_eq!(
        refused(sign_as(&cluster, "node-a", &token_a, CLIENT)),
        "invalid_token"
    );
    api.apply_yaml(&NODE_PROXIES.split("---").nth(1).unwrap().replace(
        "{name: mesh-node-a, namespace: mesh-system}",
        "{name: mesh-node-a, namespace: mesh-system, uid: second}",
    ))
    .unwrap();
    assert_eq!(
        refused(sign_as(&cluster, "node-a", &token_a, CLIENT)),
        "invalid_token"
    );
    // A node-proxy pod the API knows but that is not scheduled: the signer's own pod watch
    // has no node for it.
    api.apply_yaml("apiVersion: v1\nkind: Pod\nmetadata: {name: mesh-node-x, namespace: mesh-system}\nspec: {serviceAccountName: mesh-node, hostNetwork: true}\n")
        .unwrap();
    let pending = api
        .token(
            "mesh-system",
            "mesh-node",
            Some("mesh-node-x"),
            &["mesh-ca"],
            3600,
        )
        .unwrap();
    wait_until("the signer's watch sees mesh-node-x", || {
        refused(sign_as(&cluster, "node-a", &pending, CLIENT)) == "not_scheduled"
    });
    for reason in ["not_on_node", "not_node_proxy", "unbound_token"] {
        assert_eq!(refusals(&cluster, reason), 1, "{reason}");
    }
    assert_eq!(refusals(&cluster, "invalid_token"), 4);
}

/// Every certificate the server at `addr` sent (PEM), as `openssl s_client -showcerts` printed
/// them.
fn served_chain(output: &str) -> Vec<String> {
    output
        .split("-----BEGIN CERTIFICATE-----")
        .skip(1)
        .filter_map(|rest| rest.split_once("-----END CERTIFICATE-----"))
        .map(|(body, _)| format!("-----BEGIN CERTIFICATE-----{body}-----END CERTIFICATE-----\n"))
        .collect()
}

#[test]
fn hbone_between_nodes_uses_an_intermediate_that_verifies_against_the_root_alone() {
    require_root!();
    let mut cluster = Cluster::new(TWO_NODES).unwrap();
    assert!(cluster.ca_intermediate);
    cluster.start_mesh_everywhere().unwrap();
    let _b1 = Server::start(&cluster.pod("b1").netns, WEB_PORT, Behaviour::Echo).unwrap();
    assert_eq!(
        echo_text(&cluster.pod("a1").netns, addr(&cluster, "b1"), "hi\n").unwrap(),
        "hi\n"
    );
    // What b1's HBONE listener serves, fetched with a client certificate of the mesh.
    let ca = cluster.ca().unwrap();
    let leaf = ca.issue(CLIENT, Duration::from_secs(600)).unwrap();
    let dir = cluster.dir();
    let cert = dir.join("client.pem");
    let chain: String = leaf
        .chain
        .iter()
        .map(|c| mesh_node::identity::ca::to_pem(c))
        .collect();
    std::fs::write(&cert, chain).unwrap();
    let key = dir.join("client.key");
    std::fs::write(
        &key,
        mesh_node::identity::ca::pem("PRIVATE KEY", leaf.key.secret_der()),
    )
    .unwrap();
    let root = cluster.node_state_dir("node-a").join("trust-bundle.pem");
    let hbone = SocketAddr::from((cluster.pod("b1").ip, 15008));
    let probe =
        mesh_tests::tools::s_client(&cluster.pod("c1").netns, hbone, &cert, &key, &root, &[])
            .unwrap();
    assert!(probe.established, "{}", probe.output);
    let served = served_chain(&probe.output);
    assert_eq!(served.len(), 2, "leaf and intermediate: {}", probe.output);
    let file = |name: &str, text: &str| -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let (leaf_pem, intermediate) = (file("leaf.pem", &served[0]), file("int.pem", &served[1]));
    let verify = |root: &std::path::Path| {
        std::process::Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(root)
            .arg("-untrusted")
            .arg(&intermediate)
            .arg(&leaf_pem)
            .output()
            .unwrap()
    };
    let ok = verify(&root);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let foreign = mesh_node::identity::ca::generate_root().unwrap();
    let bad = verify(&file("foreign.pem", &foreign.cert));
    assert!(!bad.status.success(), "verified against a foreign root");
    // The root alone is in the bundle: the intermediate is not a root of it.
    let bundle = TrustBundle::load(&root).unwrap();
    assert_eq!(bundle.roots().len(), 1);
}

/// Connections a1 -> b1 and b1 -> a2 (HBONE both ways), one every 20 ms until `stop`,
/// bounded to 5 minutes: `(made, failed, first failure)`.
fn steady_load(
    cluster: &Cluster,
    stop: &AtomicBool,
    made: &AtomicU64,
    failed: &AtomicU64,
) -> Option<String> {
    let started = Instant::now();
    let mut first = None;
    let mut turn = 0u64;
    while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(300) {
        let (from, to) = if turn.is_multiple_of(2) {
            ("a1", "b1")
        } else {
            ("b1", "a2")
        };
        turn += 1;
        match echo_text(&cluster.pod(from).netns, addr(cluster, to), "rotate\n") {
            Ok(back) if back == "rotate\n" => {}
            other => {
                failed.fetch_add(1, Ordering::Relaxed);
                first.get_or_insert(format!("{from} -> {to}: {other:?}"));
            }
        }
        made.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(20));
    }
    first
}

fn fingerprint(cluster: &Cluster, node: &str) -> Option<String> {
    let (_, body) = cluster.admin_get(node, "/metrics").ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix("mesh_trust_bundle_info{fingerprint=\""))
        .and_then(|rest| rest.split_once('"'))
        .map(|(f, _)| f.to_string())
}

#[test]
fn a_root_rotates_under_load_without_a_failed_connection() {
    require_root!();
    let mut cluster = Cluster::new(TWO_NODES).unwrap();
    // Certificates renewed every 3 s, so they roll to the new root quickly.
    cluster.run_args = vec!["--cert-lifetime".into(), "6s".into()];
    cluster.start_mesh_everywhere().unwrap();
    let _b1 = Server::start(&cluster.pod("b1").netns, WEB_PORT, Behaviour::Echo).unwrap();
    let _a2 = Server::start(&cluster.pod("a2").netns, WEB_PORT, Behaviour::Echo).unwrap();
    let mut long = Session::open(&cluster.pod("a1").netns, addr(&cluster, "b1")).unwrap();
    long.roundtrip().unwrap();
    let signer = cluster.signer_ref().unwrap();
    signer.init("ca-2", true).unwrap();
    let old = std::fs::read_to_string(signer.bundle_path("ca-1")).unwrap();
    // Kept before the signer's files are replaced by the new CA's.
    let old_ca = signer.ca("ca-1").unwrap();
    let new = std::fs::read_to_string(signer.bundle_path("ca-2")).unwrap();
    let both = format!("{old}{new}");
    let write_bundle = |node: &str, pem: &str| {
        let path = cluster.node_state_dir(node).join("trust-bundle.pem");
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, pem).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let want = TrustBundle::parse(pem, std::path::Path::new("b"))
            .unwrap()
            .fingerprint()
            .to_string();
        wait_until(&format!("{node} reports bundle {want}"), || {
            fingerprint(&cluster, node).as_deref() == Some(want.as_str())
        });
    };
    let settle = || std::thread::sleep(Duration::from_secs(2));
    let (stop, made, failed) = (AtomicBool::new(false), AtomicU64::new(0), AtomicU64::new(0));
    let first = std::thread::scope(|scope| {
        let load = scope.spawn(|| steady_load(&cluster, &stop, &made, &failed));
        settle();
        // 1. Add the new root everywhere, node-a first (node-b one step behind meanwhile).
        write_bundle("node-a", &both);
        settle();
        write_bundle("node-b", &both);
        settle();
        // 2. Switch the signer to the new CA by updating its files, as a Secret update does:
        // it signs, and serves, with the new CA without a restart. Workload certificates
        // roll at their next renewal; two lifetimes later every certificate of both nodes
        // is of the new root.
        signer.replace_with("ca-2").unwrap();
        wait_until("the signer signs with the new CA", || {
            signer
                .log()
                .contains("CA changed: signing with the new one")
        });
        std::thread::sleep(Duration::from_secs(13));
        // 3. Remove the old root, node-a first.
        write_bundle("node-a", &new);
        settle();
        write_bundle("node-b", &new);
        settle();
        stop.store(true, Ordering::Relaxed);
        load.join().unwrap()
    });
    let (made, failed) = (made.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(made > 300, "only {made} connections");
    assert_eq!(failed, 0, "{failed} of {made} failed: {first:?}");
    long.roundtrip().unwrap();
    // The rotation really happened: a certificate of the old root is refused now, and the
    // nodes' certificates are of the new one.
    let leaf = old_ca.issue(CLIENT, Duration::from_secs(600)).unwrap();
    let bundle = TrustBundle::parse(&new, std::path::Path::new("new"))
        .unwrap()
        .shared();
    assert!(mesh_node::identity::tls::verify_chain(&leaf.chain, &bundle, CLIENT).is_err());
    assert!(
        cluster
            .metric_sum(
                "node-a",
                "mesh_certificates_issued_total",
                &[("reason", "rotation")]
            )
            .unwrap()
            >= 4
    );
}

#[test]
fn a_stopped_signer_costs_nothing_until_certificates_expire_and_expired_ones_are_refused() {
    require_root!();
    let mut cluster = Cluster::new(TWO_NODES).unwrap();
    // Renewal every 6 s, expiry after 12 s.
    cluster.run_args = vec!["--cert-lifetime".into(), "12s".into()];
    cluster.start_mesh_everywhere().unwrap();
    let _b1 = Server::start(&cluster.pod("b1").netns, WEB_PORT, Behaviour::Echo).unwrap();
    let echo = |c: &Cluster| echo_text(&c.pod("a1").netns, addr(c, "b1"), "hi\n");
    assert_eq!(echo(&cluster).unwrap(), "hi\n");
    let rotations = |c: &Cluster, node: &str| {
        c.metric_sum(
            node,
            "mesh_certificates_issued_total",
            &[("reason", "rotation")],
        )
        .unwrap()
    };
    // Stopped right after start (every certificate has nearly its whole lifetime left) for
    // longer than a renewal interval, shorter than a lifetime: every new connection (new TLS
    // handshakes included) works on the certificates held, and the overdue gauge says
    // renewals are failing.
    cluster.stop_signer();
    let stopped = Instant::now();
    while stopped.elapsed() < Duration::from_millis(7500) {
        assert_eq!(
            echo(&cluster).unwrap(),
            "hi\n",
            "at {:?}",
            stopped.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for node in ["node-a", "node-b"] {
        assert!(
            cluster.metric(node, "mesh_certificates_overdue").unwrap() >= 1,
            "{node}"
        );
        assert!(
            cluster
                .metric(node, "mesh_certificate_issue_failures_total")
                .unwrap()
                >= 1
        );
    }
    assert!(cluster
        .mesh_log("node-a")
        .contains("certificate renewal failed, the current certificate stays in use"));
    // Back: renewals resume, nothing is overdue.
    let before = rotations(&cluster, "node-a");
    cluster.start_signer().unwrap();
    wait_until("renewals resumed", || {
        rotations(&cluster, "node-a") > before
            && cluster
                .metric("node-a", "mesh_certificates_overdue")
                .unwrap()
                == 0
    });
    assert_eq!(echo(&cluster).unwrap(), "hi\n");
    // Stopped past expiry: node-a refuses to present an expired certificate, and says why.
    cluster.stop_signer();
    // Until a1's certificate expired (live in /debug/state) and the gauge says so (updated
    // every second).
    let expired = |c: &Cluster| {
        let held = c.debug_state("node-a").is_ok_and(|s| {
            s["certificates"].as_array().is_some_and(|held| {
                held.iter()
                    .any(|h| h["identity"] == CLIENT && h["expired"] == true)
            })
        });
        held && c.admin_get("node-a", "/metrics").is_ok_and(|(_, m)| {
            m.lines()
                .any(|l| l.starts_with("mesh_certificate_expiry_seconds -"))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !expired(&cluster) {
        assert!(Instant::now() < deadline, "a1's certificate did not expire");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        echo(&cluster).is_err(),
        "a connection went through on an expired certificate"
    );
    let record = cluster
        .wait_connection("node-a", "the refused connection", |c| {
            c.original_dst == addr(&cluster, "b1") && c.error.is_some()
        })
        .unwrap();
    let error = record.error.clone().unwrap_or_default();
    assert!(
        error.contains("expired") && error.contains("refused"),
        "{record:?}"
    );
}
