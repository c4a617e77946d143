//! `mesh-node validate` and `mesh-node analyze` on the committed files: every mistake reported
//! with its location, warnings apart from errors, every analyzer finding on a crafted file,
//! and nothing at all on the examples.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use mesh_tests::cluster::mesh_node_bin;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn mesh_node(args: &[&str], files: &[PathBuf]) -> (Option<i32>, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(mesh_node_bin().unwrap())
        .args(args)
        .args(files)
        .output()
        .unwrap();
    (
        status.code(),
        String::from_utf8(stdout).unwrap(),
        String::from_utf8(stderr).unwrap(),
    )
}

fn data(name: &str) -> PathBuf {
    repo().join("tests/data").join(name)
}

#[test]
fn validate_reports_all_ten_mistakes_with_their_locations() {
    let file = data("ten-mistakes.yaml");
    let (code, out, _) = mesh_node(&["validate"], std::slice::from_ref(&file));
    assert_eq!(code, Some(1), "{out}");
    let f = file.display();
    let want = [
        format!("{f}:1:spec.hosts: error: expected a list, found a string"),
        format!("{f}:1:spec.http[0].match[0].headers[\"user-agent\"].regex: error: invalid regex \"(Chrome\": unclosed group"),
        format!("{f}:1:spec.http[0].timeout: error: invalid duration \"10 seconds\""),
        format!("{f}:2:spec.trafficPolicy.loadBalancer.simple: error: unknown value \"ROUND_ROBBIN\"; expected one of"),
        format!("{f}:2:spec.trafficPolicy.outlierDetection.maxEjectionPercent: error: must be between 0 and 100"),
        format!("{f}:2:spec.subsets[0].name: error: required field is missing"),
        format!("{f}:3:spec.mtls.mode: error: unknown value \"STRICTEST\""),
        format!("{f}:4:spec.rules[0].to[0].operation.ports[0]: error: \"http\" is not a port number"),
        format!("{f}:5:spec.ports[0].port: error: 70000 is not an integer between 0 and 65535"),
        format!("{f}:6:spec.podSelector: error: required field is missing (in NetworkPolicy db)"),
    ];
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), want.len(), "{out}");
    for (line, want) in lines.iter().zip(&want) {
        assert!(
            line.starts_with(want.as_str()),
            "expected {want:?}\n got {line:?}"
        );
    }
}

#[test]
fn an_unknown_outlier_field_is_one_warning_and_exit_0() {
    let file = data("outlier-warning.yaml");
    let (code, out, _) = mesh_node(&["validate"], std::slice::from_ref(&file));
    assert_eq!(code, Some(0), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert!(
        lines[0].contains(
            ":1:spec.trafficPolicy.outlierDetection.minRequestVolume: warning: unknown field"
        ) && lines[0]
            .contains("`kubectl apply` (strict field validation by default) would refuse it"),
        "{}",
        lines[0]
    );
}

#[test]
fn analyze_reports_each_problem_of_the_crafted_file() {
    let file = data("analyze-problems.yaml");
    let (code, out, err) = mesh_node(&["analyze"], std::slice::from_ref(&file));
    assert_eq!(code, Some(1), "{out}{err}");
    let f = file.display();
    // (document, field, level and code, resource)
    let want = [
        (
            "1.items[3]",
            "spec.serviceAccountName",
            "warning MESH0006",
            "Pod default/client",
        ),
        (
            "2",
            "spec.hosts",
            "error IST0109",
            "VirtualService default/web",
        ),
        (
            "2",
            "spec.http[0].route[0].destination.subset",
            "error IST0101",
            "VirtualService default/web",
        ),
        (
            "2",
            "spec.http[1].route[0].destination.host",
            "error IST0101",
            "VirtualService default/web",
        ),
        (
            "3",
            "spec.hosts",
            "error IST0109",
            "VirtualService default/web-canary",
        ),
        (
            "3",
            "spec.http[0].route",
            "error MESH0001",
            "VirtualService default/web-canary",
        ),
        (
            "4",
            "spec.subsets[1].labels",
            "error IST0173",
            "DestinationRule default/web",
        ),
        (
            "5",
            "spec.selector",
            "warning IST0127",
            "AuthorizationPolicy default/ghost",
        ),
        (
            "6",
            "spec.selector",
            "warning IST0127",
            "PeerAuthentication default/ghost",
        ),
        (
            "7",
            "spec.selector",
            "warning MESH0002",
            "PeerAuthentication istio-system/web-only",
        ),
        (
            "8",
            "spec.portLevelMtls",
            "error MESH0003",
            "PeerAuthentication default/default",
        ),
        (
            "9",
            "spec.http",
            "warning MESH0004",
            "VirtualService default/raw",
        ),
        (
            "10",
            "spec.rules[0]",
            "warning MESH0004",
            "AuthorizationPolicy default/raw-get",
        ),
        (
            "11",
            "spec.ingress",
            "error MESH0005",
            "NetworkPolicy default/web-8080",
        ),
        (
            "12",
            "spec.host",
            "warning IST0174",
            "DestinationRule default/typo",
        ),
        (
            "14",
            "spec",
            "warning IST0160",
            "Telemetry default/tracing-too",
        ),
        (
            "16",
            "spec.selector",
            "warning IST0159",
            "Telemetry default/web-v1",
        ),
        (
            "17",
            "spec.selector",
            "warning IST0127",
            "Telemetry default/ghost",
        ),
    ];
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), want.len(), "{out}");
    for (line, (doc, field, level, resource)) in lines.iter().zip(want) {
        let prefix = format!("{f}:{doc}:{field}: {level} ");
        assert!(
            line.starts_with(&prefix),
            "expected {prefix:?}\n got {line:?}"
        );
        assert!(line.contains(&format!("[{resource}]")), "{line}");
        assert!(line.contains("; fix: "), "every finding has a hint: {line}");
    }
    assert!(err.contains("8 error(s), 10 warning(s)"), "{err}");
}

#[test]
fn the_examples_validate_and_analyze_clean() {
    let examples = repo().join("examples");
    let istio: Vec<PathBuf> = std::fs::read_dir(examples.join("istio"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert!(istio.len() >= 3, "{istio:?}");
    let sets = [istio, vec![examples.join("demo.yaml")]];
    for set in sets {
        for file in &set {
            let (code, out, _) = mesh_node(&["validate"], std::slice::from_ref(file));
            assert_eq!((code, out.as_str()), (Some(0), ""), "{}", file.display());
        }
        let (code, out, err) = mesh_node(&["analyze"], &set);
        assert_eq!((code, out.as_str()), (Some(0), ""), "{set:?}: {err}");
        assert!(err.contains("no problems found"), "{err}");
    }
}

#[test]
fn istio_documentation_samples_and_kubectl_output_are_read_without_a_finding() {
    for name in ["istio-docs.yaml", "kubectl-get.yaml"] {
        let file = data(name);
        let (code, out, _) = mesh_node(&["validate"], std::slice::from_ref(&file));
        assert_eq!((code, out.as_str()), (Some(0), ""), "{name}");
    }
    let (code, out, err) = mesh_node(&["analyze"], &[data("kubectl-get.yaml")]);
    assert_eq!((code, out.as_str()), (Some(0), ""), "{err}");
}

#[test]
fn analyze_refuses_files_with_errors_and_duplicates_across_files() {
    let (code, out, err) = mesh_node(&["analyze"], &[data("ten-mistakes.yaml")]);
    assert_eq!(code, Some(1));
    assert!(out.contains("error: expected a list"), "{out}");
    assert!(err.contains("fix the errors above first"), "{err}");
    let cluster = repo().join("examples/istio/cluster.yaml");
    let (code, out, _) = mesh_node(&["analyze"], &[cluster.clone(), cluster.clone()]);
    assert_eq!(code, Some(1));
    assert!(
        out.contains("duplicate Namespace default, already defined at"),
        "{out}"
    );
}
