//! The Kubernetes API source against a fake API server that speaks the real list/watch wire
//! protocol (tests/src/kube_api.rs): the same resources give the same snapshot through the
//! file and through the API; with real eBPF in a netns cluster, adds, updates and deletes of
//! every kind reach the state and the kernel maps; 410 Gone and dropped connections recover.

use std::{net::Ipv4Addr, time::Duration};

use mesh_node::{config, state::State};
use mesh_tests::{
    cluster::Cluster,
    fixtures::{L7, STRICT, WEB_APP_AUTHZ, WEB_APP_DR, WEB_APP_VS},
    kube_api::FakeApi,
    require_root,
};
use serde_json::Value;

/// What a snapshot says, without its generation.
fn snapshot(state: &State) -> Value {
    let mut v = serde_json::to_value(state).unwrap();
    v["generation"] = Value::Null;
    v
}

#[test]
fn file_and_kube_sources_build_identical_snapshots() {
    let mut yaml = String::new();
    for file in ["cluster", "traffic", "security", "telemetry"] {
        let path = format!(
            "{}/../examples/istio/{file}.yaml",
            env!("CARGO_MANIFEST_DIR")
        );
        yaml.push_str(&std::fs::read_to_string(path).unwrap());
        yaml.push_str("\n---\n");
    }
    let from_file = config::parse_str("examples", &yaml).unwrap();
    let mut api = FakeApi::new();
    api.apply_yaml(&yaml).unwrap();
    let url = api.listen_here().unwrap();
    let dir = std::env::temp_dir().join(format!("mesh-kube-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    FakeApi::kubeconfig(&url, &kubeconfig).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (store, from_kube) = runtime
        .block_on(async {
            tokio::time::timeout(
                Duration::from_secs(20),
                mesh_node::kube_source::start(Some(&kubeconfig)),
            )
            .await
        })
        .expect("initial sync within 20 s")
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let mesh = Default::default();
    for node in ["k3s-server", "k3s-agent-1", "node-a"] {
        let a = snapshot(&State::build(&from_file, node, &mesh, 1));
        let b = snapshot(&State::build(&from_kube, node, &mesh, 1));
        assert_eq!(a, b, "snapshots differ for node {node}");
    }
    assert!(!a_few(&from_kube), "the examples have every kind");
    let sorted = |r: &config::Resources| {
        let mut t = r.telemetries.clone();
        t.sort_by_key(|t| t.metadata.qualified());
        t
    };
    assert_eq!(sorted(&from_kube), sorted(&from_file));
    assert!(store.len() >= 20, "{} objects", store.len());
    assert!(api.requests("list") >= 10, "every kind listed");
}

/// False when every kind has at least one resource.
fn a_few(r: &config::Resources) -> bool {
    [
        r.namespaces.len(),
        r.pods.len(),
        r.services.len(),
        r.endpoint_slices.len(),
        r.network_policies.len(),
        r.virtual_services.len(),
        r.destination_rules.len(),
        r.peer_authentications.len(),
        r.authorization_policies.len(),
        r.telemetries.len(),
    ]
    .contains(&0)
}

/// Waits (up to 10 s) until node `name`'s `/debug/state` satisfies `check`.
fn eventually(cluster: &Cluster, name: &str, what: &str, check: impl Fn(&Value) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let state = cluster.debug_state(name).unwrap();
        if check(&state) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} on {name}: {}",
            serde_json::to_string_pretty(&state).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn enrolled(state: &Value) -> Vec<Ipv4Addr> {
    let mut ips: Vec<Ipv4Addr> = state["datapath"]["enrolled"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().parse().unwrap())
        .collect();
    ips.sort();
    ips
}

fn workload<'a>(state: &'a Value, name: &str) -> &'a Value {
    state["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == name)
        .unwrap_or(&Value::Null)
}

fn has_vip(state: &Value, vip: &str) -> bool {
    state["services"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["vip"] == vip)
}

const HOST: &str = "web-app.default.svc.cluster.local";

#[test]
fn kube_changes_of_every_kind_reach_the_state_and_the_kernel_and_watches_recover() {
    require_root!();
    let base = format!("{L7}{WEB_APP_DR}{WEB_APP_VS}{WEB_APP_AUTHZ}");
    let mut cluster = Cluster::new(&base).unwrap();
    let mut api = FakeApi::new();
    api.apply_yaml(&base).unwrap();
    for node in ["node-a", "node-b"] {
        api.listen_in(&cluster.node(node).netns, 6443).unwrap();
    }
    let kubeconfig = cluster.dir().join("kubeconfig");
    FakeApi::kubeconfig("http://127.0.0.1:6443", &kubeconfig).unwrap();
    cluster.kubeconfig = Some(kubeconfig);
    cluster.start_mesh_everywhere().unwrap();
    for node in ["node-a", "node-b"] {
        let log = cluster.mesh_log(node);
        assert!(
            log.contains("kube: initial sync done"),
            "{node} reads the API: {log}"
        );
    }

    // Initial sync: enrolment in the kernel map, Services, routing resources, policies.
    let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
    let node_a = [
        ip("100.65.0.2"),
        ip("100.65.0.3"),
        ip("100.65.0.4"),
        ip("100.65.0.5"),
    ];
    eventually(&cluster, "node-a", "initial enrolment", |s| {
        enrolled(s) == node_a
    });
    eventually(&cluster, "node-b", "initial enrolment", |s| {
        enrolled(s) == [ip("100.65.1.2"), ip("100.65.1.3")]
    });
    let state = cluster.debug_state("node-a").unwrap();
    assert!(has_vip(&state, "100.66.0.30:8080"));
    assert_eq!(state["virtual_services"][HOST][0], "default/web-app");
    assert_eq!(state["destination_rules"][HOST][0], "default/web-app");
    assert_eq!(
        workload(&state, "web-1")["authorization"][0],
        "default/web-app-policy"
    );

    // Namespace: update (enrol `plain`), then back.
    let plain = |label: &str| {
        format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: plain, labels: {{{label}}}}}\n")
    };
    api.apply_yaml(&plain("istio.io/dataplane-mode: ambient"))
        .unwrap();
    eventually(&cluster, "node-a", "plain-a enrolled", |s| {
        enrolled(s).contains(&ip("100.65.0.6"))
    });
    api.apply_yaml(&plain("team: x")).unwrap();
    eventually(&cluster, "node-a", "plain-a out", |s| enrolled(s) == node_a);

    // Pod: update (opt out), delete, add back.
    let other = "apiVersion: v1\nkind: Pod\nmetadata: {name: other, namespace: default, labels: {app: other}}\nspec: {nodeName: node-a, serviceAccountName: other}\nstatus: {podIP: 100.65.0.4, conditions: [{type: Ready, status: \"True\"}]}\n";
    api.apply_yaml(&other.replace(
        "{app: other}",
        "{app: other, istio.io/dataplane-mode: none}",
    ))
    .unwrap();
    eventually(&cluster, "node-a", "other opted out", |s| {
        !enrolled(s).contains(&ip("100.65.0.4"))
    });
    api.apply_yaml(other).unwrap();
    eventually(&cluster, "node-a", "other back", |s| enrolled(s) == node_a);
    api.delete("Pod", "default", "other").unwrap();
    eventually(&cluster, "node-a", "other deleted", |s| {
        !enrolled(s).contains(&ip("100.65.0.4")) && workload(s, "other").is_null()
    });
    api.apply_yaml(other).unwrap();
    eventually(&cluster, "node-a", "other added", |s| enrolled(s) == node_a);

    // Service and EndpointSlice: add, update, delete.
    let extra = |port: u16, address: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: extra}}\nspec: {{clusterIP: 100.66.0.40, ports: [{{name: tcp, port: {port}}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: extra-1, labels: {{kubernetes.io/service-name: extra}}}}\naddressType: IPv4\nports: [{{name: tcp, port: 9000}}]\nendpoints: [{{addresses: [{address}]}}]\n"
        )
    };
    let endpoints = |s: &Value, vip: &str| -> Vec<String> {
        s["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["vip"] == vip)
            .map(|x| {
                x["endpoints"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e.as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    api.apply_yaml(&extra(70, "100.65.1.2")).unwrap();
    eventually(&cluster, "node-a", "Service extra", |s| {
        endpoints(s, "100.66.0.40:70") == ["100.65.1.2:9000"]
    });
    api.apply_yaml(&extra(71, "100.65.1.3")).unwrap();
    eventually(&cluster, "node-a", "Service extra updated", |s| {
        !has_vip(s, "100.66.0.40:70") && endpoints(s, "100.66.0.40:71") == ["100.65.1.3:9000"]
    });
    api.delete("EndpointSlice", "default", "extra-1").unwrap();
    api.delete("Service", "default", "extra").unwrap();
    eventually(&cluster, "node-a", "Service extra gone", |s| {
        !has_vip(s, "100.66.0.40:71")
    });

    // VirtualService and DestinationRule: update (host), delete, add back.
    api.apply_yaml(&WEB_APP_VS.replace(
        "hosts: [web-app]",
        "hosts: [web-app.default.svc.cluster.local, other]",
    ))
    .unwrap();
    eventually(&cluster, "node-a", "VirtualService hosts", |s| {
        s["virtual_services"]["other.default.svc.cluster.local"][0] == "default/web-app"
    });
    api.delete("VirtualService", "default", "web-app").unwrap();
    api.delete("DestinationRule", "default", "web-app").unwrap();
    eventually(&cluster, "node-a", "routing gone", |s| {
        s["virtual_services"].as_object().unwrap().is_empty()
            && s["destination_rules"].as_object().unwrap().is_empty()
    });
    api.apply_yaml(&format!("{WEB_APP_DR}{WEB_APP_VS}"))
        .unwrap();
    eventually(&cluster, "node-a", "routing back", |s| {
        s["virtual_services"][HOST][0] == "default/web-app"
            && s["destination_rules"][HOST][0] == "default/web-app"
    });

    // PeerAuthentication: add, update, delete.
    api.apply_yaml(STRICT).unwrap();
    eventually(&cluster, "node-b", "STRICT", |s| {
        workload(s, "web-3")["mtls"]["mode"] == "STRICT"
    });
    api.apply_yaml(&STRICT.replace("STRICT", "DISABLE"))
        .unwrap();
    eventually(&cluster, "node-b", "DISABLE", |s| {
        workload(s, "web-3")["mtls"]["mode"] == "DISABLE"
    });
    api.delete("PeerAuthentication", "default", "default")
        .unwrap();
    eventually(&cluster, "node-b", "no PeerAuthentication", |s| {
        workload(s, "web-3")["mtls"]["mode"] == "PERMISSIVE"
    });

    // AuthorizationPolicy: update (selector), delete.
    api.apply_yaml(&WEB_APP_AUTHZ.replace("{app: web-app}", "{app: api}"))
        .unwrap();
    eventually(&cluster, "node-a", "policy moved", |s| {
        workload(s, "api")["authorization"][0] == "default/web-app-policy"
            && workload(s, "web-1")["authorization"]
                .as_array()
                .unwrap()
                .is_empty()
    });
    api.delete("AuthorizationPolicy", "default", "web-app-policy")
        .unwrap();
    eventually(&cluster, "node-a", "policy gone", |s| {
        workload(s, "api")["authorization"]
            .as_array()
            .unwrap()
            .is_empty()
    });

    // NetworkPolicy: add, update, delete.
    let netpol = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny-all}\nspec: {podSelector: {}, policyTypes: [Ingress]}\n";
    api.apply_yaml(netpol).unwrap();
    eventually(&cluster, "node-a", "NetworkPolicy", |s| {
        s["network_policies"][0] == "default/deny-all"
    });
    api.apply_yaml(&netpol.replace("[Ingress]", "[Ingress, Egress]"))
        .unwrap();
    api.delete("NetworkPolicy", "default", "deny-all").unwrap();
    eventually(&cluster, "node-a", "NetworkPolicy gone", |s| {
        s["network_policies"].as_array().unwrap().is_empty()
    });

    // An invalid edit of a valid policy keeps its last valid version; a policy that was
    // never valid is enforced fail closed (deny all to what it selects).
    let rejected = cluster
        .metric("node-a", "mesh_config_rejected_total")
        .unwrap();
    api.apply_yaml(WEB_APP_AUTHZ).unwrap();
    eventually(&cluster, "node-a", "policy back", |s| {
        workload(s, "web-1")["authorization"][0] == "default/web-app-policy"
    });
    let broken = "\n    when: [{key: no.such.key, values: [x]}]\n";
    api.apply_yaml(&format!("{}{broken}", WEB_APP_AUTHZ.trim_end()))
        .unwrap();
    let fresh = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: fresh-broken}\nspec: {selector: {matchLabels: {app: api}}, rules: [{when: [{key: no.such.key, values: [x]}]}]}\n";
    api.apply_yaml(fresh).unwrap();
    eventually(&cluster, "node-a", "invalid policies fail closed", |s| {
        workload(s, "web-1")["authorization"][0] == "default/web-app-policy"
            && workload(s, "api")["authorization"][0] == "default/fresh-broken"
    });
    let now = cluster
        .metric("node-a", "mesh_config_rejected_total")
        .unwrap();
    assert!(
        now >= rejected + 2,
        "both invalid objects counted: {rejected} -> {now}"
    );
    api.delete("AuthorizationPolicy", "default", "fresh-broken")
        .unwrap();
    api.delete("AuthorizationPolicy", "default", "web-app-policy")
        .unwrap();
    eventually(&cluster, "node-a", "invalid policies deleted", |s| {
        workload(s, "api")["authorization"]
            .as_array()
            .unwrap()
            .is_empty()
            && workload(s, "web-1")["authorization"]
                .as_array()
                .unwrap()
                .is_empty()
    });

    // A dropped connection: the watchers resume and see what changed meanwhile.
    let watches = api.requests_for("watch", "Pod");
    api.drop_watches();
    api.delete("Pod", "default", "admin").unwrap();
    eventually(&cluster, "node-a", "change after a dropped watch", |s| {
        !enrolled(s).contains(&ip("100.65.0.3"))
    });
    assert!(
        api.requests_for("watch", "Pod") > watches,
        "the Pod watch was reopened"
    );

    // 410 Gone: watches are refused while a Pod is added and another deleted, and the
    // history is compacted; the watchers can only learn of it by listing again.
    let (lists, gone) = (
        api.requests_for("list", "Pod"),
        api.requests_for("gone", "Pod"),
    );
    api.pause_watches(true);
    api.apply_yaml(
        &other
            .replace("name: other", "name: admin")
            .replace("100.65.0.4", "100.65.0.3")
            .replace(
                "serviceAccountName: other",
                "serviceAccountName: admin-service",
            ),
    )
    .unwrap();
    api.delete("Pod", "default", "other").unwrap();
    api.compact();
    api.pause_watches(false);
    eventually(&cluster, "node-a", "changes seen after 410 Gone", |s| {
        enrolled(s).contains(&ip("100.65.0.3"))
            && !enrolled(s).contains(&ip("100.65.0.4"))
            && workload(s, "other").is_null()
    });
    assert!(
        api.requests_for("gone", "Pod") > gone,
        "the Pod watch met 410 Gone"
    );
    assert!(
        api.requests_for("list", "Pod") > lists,
        "the Pod watcher listed again"
    );
    // The relist replaced the Pods: the deleted one is gone, nothing doubled.
    let state = cluster.debug_state("node-a").unwrap();
    let pods = state["workloads"].as_array().unwrap().len();
    assert_eq!(pods, 6, "one workload per pod after the relist");
}
