//! Cluster configs shared by the end-to-end tests.

/// Two nodes; namespace `mesh` is enrolled (ambient), `plain` is not.
///
/// | pod | node   | ns    | IP          | role                         |
/// |-----|--------|-------|-------------|------------------------------|
/// | a1  | node-a | mesh  | 100.65.0.2  | client                       |
/// | a2  | node-a | mesh  | 100.65.0.3  | server, Service `web` (8080) |
/// | b1  | node-b | mesh  | 100.65.1.2  | server, Service `web` (8080) |
/// | c1  | node-a | plain | 100.65.0.4  | client / server              |
/// | c2  | node-b | plain | 100.65.1.3  | server                       |
/// | c3  | node-a | plain | 100.65.0.5  | server                       |
///
/// Service `mesh/web`: VIP 100.66.0.10:80 -> targetPort `http` (8080).
pub const TWO_NODES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: a1, namespace: mesh, labels: {app: client}}
spec: {nodeName: node-a, serviceAccountName: client}
status: {podIP: 100.65.0.2, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: a2, namespace: mesh, labels: {app: web}}
spec:
  nodeName: node-a
  serviceAccountName: web
  containers: [{name: web, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 100.65.0.3, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b1, namespace: mesh, labels: {app: web}}
spec:
  nodeName: node-b
  serviceAccountName: web
  containers: [{name: web, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 100.65.1.2, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: c1, namespace: plain}
spec: {nodeName: node-a}
status: {podIP: 100.65.0.4, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: c2, namespace: plain}
spec: {nodeName: node-b}
status: {podIP: 100.65.1.3, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: c3, namespace: plain}
spec: {nodeName: node-a}
status: {podIP: 100.65.0.5, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: mesh}
spec:
  clusterIP: 100.66.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
"#;

/// Port the `web` pods listen on.
pub const WEB_PORT: u16 = 8080;
