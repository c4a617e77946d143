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
/// Service `mesh/web`: VIP 100.66.0.10:80 (declared TCP: the apps here are not HTTP) ->
/// targetPort `http` (8080).
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
  ports: [{name: tcp-web, port: 80, targetPort: http}]
"#;

/// Port the `web` pods listen on.
pub const WEB_PORT: u16 = 8080;

/// The overlay tests' cluster: namespaces `default` and `ops` enrolled, `plain` not; pods
/// named after their identity, `web-app` pods on both nodes. Compose with the policies below.
///
/// | pod     | node   | ns      | service account | IP          |
/// |---------|--------|---------|-----------------|-------------|
/// | api     | node-a | default | api-service     | 100.65.0.2  |
/// | other   | node-a | default | other           | 100.65.0.3  |
/// | ops1    | node-a | ops     | tools           | 100.65.0.4  |
/// | web-a   | node-a | default | web-app         | 100.65.0.5  |
/// | plain-a | node-a | plain   | default         | 100.65.0.6  |
/// | web-b   | node-b | default | web-app         | 100.65.1.2  |
/// | plain-b | node-b | plain   | default         | 100.65.1.3  |
///
/// Service `default/web-app`: VIP 100.66.0.20:80 -> 8080 on web-a and web-b. Service
/// `default/web-np`: NodePort 30080 (VIP 100.66.0.21:80) -> 8080 on web-a only. web-a maps
/// hostPort 31080 to its 8080.
pub const OVERLAY: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: ops, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: default, labels: {app: api}}
spec: {nodeName: node-a, serviceAccountName: api-service}
status: {podIP: 100.65.0.2, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: default, labels: {app: other}}
spec: {nodeName: node-a, serviceAccountName: other}
status: {podIP: 100.65.0.3, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: ops1, namespace: ops, labels: {app: tools}}
spec: {nodeName: node-a, serviceAccountName: tools}
status: {podIP: 100.65.0.4, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-a, namespace: default, labels: {app: web-app, version: v1}}
spec:
  nodeName: node-a
  serviceAccountName: web-app
  containers: [{name: web, ports: [{containerPort: 8080, hostPort: 31080}]}]
status: {podIP: 100.65.0.5, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: plain-a, namespace: plain}
spec: {nodeName: node-a}
status: {podIP: 100.65.0.6, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-b, namespace: default, labels: {app: web-app, version: v2}}
spec: {nodeName: node-b, serviceAccountName: web-app}
status: {podIP: 100.65.1.2, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: plain-b, namespace: plain}
spec: {nodeName: node-b}
status: {podIP: 100.65.1.3, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-app, namespace: default}
spec:
  clusterIP: 100.66.0.20
  selector: {app: web-app}
  ports: [{name: tcp-web, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web-np, namespace: default}
spec:
  type: NodePort
  clusterIP: 100.66.0.21
  selector: {app: web-app, version: v1}
  ports: [{name: tcp-web, port: 80, targetPort: 8080, nodePort: 30080}]
"#;

/// The `web-np` Service's NodePort.
pub const WEB_NODE_PORT: u16 = 30080;

/// web-a's hostPort.
pub const WEB_HOST_PORT: u16 = 31080;

/// The `web-app` Service's VIP and port.
pub const WEB_APP_VIP: &str = "100.66.0.20:80";

/// The issue's namespace-wide STRICT PeerAuthentication for `default`.
pub const STRICT: &str = r#"
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec: {mtls: {mode: STRICT}}
"#;

/// The same policy, PERMISSIVE.
pub const PERMISSIVE: &str = r#"
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec: {mtls: {mode: PERMISSIVE}}
"#;

/// The issue's L4 AuthorizationPolicy for `web-app`.
pub const WEB_APP_L4: &str = r#"
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: web-app-l4, namespace: default}
spec:
  selector: {matchLabels: {app: web-app}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/api-service"]}}]
  - from: [{source: {namespaces: ["ops"]}}]
    to: [{operation: {ports: ["9000"]}}]
"#;

/// A DENY policy for api-service, mesh-wide (root namespace).
pub const DENY_API: &str = r#"
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-api, namespace: istio-system}
spec:
  action: DENY
  rules: [{from: [{source: {principals: ["cluster.local/ns/default/sa/api-service"]}}]}]
"#;

/// The L7 tests' cluster: namespace `default` enrolled, `plain` not. Three `web-app` pods
/// (one on node-a, two on node-b) with `version` and `role` labels for subsets; clients named
/// after their service accounts on node-a.
///
/// | pod      | node   | ns      | service account | labels                 | IP         |
/// |----------|--------|---------|-----------------|------------------------|------------|
/// | api      | node-a | default | api-service     | app: api               | 100.65.0.2 |
/// | admin    | node-a | default | admin-service   | app: admin             | 100.65.0.3 |
/// | other    | node-a | default | other           | app: other             | 100.65.0.4 |
/// | web-1    | node-a | default | web-app         | v1, role: web          | 100.65.0.5 |
/// | plain-a  | node-a | plain   | default         |                        | 100.65.0.6 |
/// | web-2    | node-b | default | web-app         | v1, role: api          | 100.65.1.2 |
/// | web-3    | node-b | default | web-app         | v2, role: admin        | 100.65.1.3 |
///
/// Service `default/web-app` (VIP 100.66.0.30): port `http` 8080 and port `grpc` 9090, both
/// to the pods' 8080; port `tcp-raw` 7000 to 7000 (declared TCP: stays L4).
pub const L7: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: default, labels: {app: api}}
spec: {nodeName: node-a, serviceAccountName: api-service}
status: {podIP: 100.65.0.2, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: admin, namespace: default, labels: {app: admin}}
spec: {nodeName: node-a, serviceAccountName: admin-service}
status: {podIP: 100.65.0.3, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: default, labels: {app: other}}
spec: {nodeName: node-a, serviceAccountName: other}
status: {podIP: 100.65.0.4, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: default, labels: {app: web-app, version: v1, role: web}}
spec: {nodeName: node-a, serviceAccountName: web-app}
status: {podIP: 100.65.0.5, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: plain-a, namespace: plain}
spec: {nodeName: node-a}
status: {podIP: 100.65.0.6, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: default, labels: {app: web-app, version: v1, role: api}}
spec: {nodeName: node-b, serviceAccountName: web-app}
status: {podIP: 100.65.1.2, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-3, namespace: default, labels: {app: web-app, version: v2, role: admin}}
spec: {nodeName: node-b, serviceAccountName: web-app}
status: {podIP: 100.65.1.3, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-app, namespace: default}
spec:
  clusterIP: 100.66.0.30
  selector: {app: web-app}
  ports:
  - {name: http, port: 8080, targetPort: 8080}
  - {name: grpc, port: 9090, targetPort: 8080}
  - {name: tcp-raw, port: 7000, targetPort: 7000}
"#;

/// The `web-app` Service's HTTP port.
pub const L7_HTTP: &str = "100.66.0.30:8080";
/// The `web-app` Service's gRPC port.
pub const L7_GRPC: &str = "100.66.0.30:9090";

/// The issue's DestinationRule (subsets v1, v2; round robin; pool; outlier detection), with
/// the `role` subsets of the path-routing example added.
pub const WEB_APP_DR: &str = r#"
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: web-app, namespace: default}
spec:
  host: web-app
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 100}
      http: {http1MaxPendingRequests: 100, maxRequestsPerConnection: 2}
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection: {consecutive5xxErrors: 5, interval: 30s, baseEjectionTime: 30s, maxEjectionPercent: 50}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: admin, labels: {role: admin}}
  - {name: api, labels: {role: api}}
  - {name: web, labels: {role: web}}
"#;

/// A DestinationRule with only the `version` subsets v1 and v2 of `web-app`.
pub const WEB_APP_SUBSETS: &str = r#"
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web-app, namespace: default}
spec:
  host: web-app
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
"#;

/// The issue's VirtualService.
pub const WEB_APP_VS: &str = r#"
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: web-app, namespace: default}
spec:
  hosts: [web-app]
  http:
  - match: [{headers: {user-agent: {regex: ".*Chrome.*"}}}]
    route: [{destination: {host: web-app, subset: v2}}]
  - match: [{uri: {prefix: "/api"}}]
    route:
    - {destination: {host: web-app, port: {number: 8080}, subset: v1}, weight: 90}
    - {destination: {host: web-app, port: {number: 8080}, subset: v2}, weight: 10}
    retries: {attempts: 3, perTryTimeout: 2s}
    timeout: 10s
"#;

/// The issue's L7 AuthorizationPolicy.
pub const WEB_APP_AUTHZ: &str = r#"
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: web-app-policy, namespace: default}
spec:
  selector: {matchLabels: {app: web-app}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/api-service"]}}]
    to: [{operation: {methods: ["GET"], paths: ["/api/v1/*"]}}]
  - from: [{source: {principals: ["cluster.local/ns/default/sa/admin-service"]}}]
    to: [{operation: {methods: ["*"]}}]
"#;

/// The benchmark's cluster (`mesh-bench`), also used by tests that need its shape: namespace
/// `bench` (ambient); pod `client` (node-a, 100.65.0.2), `srv-same` (node-a, 100.65.0.3,
/// Service `same` 100.66.0.40) and `srv-cross` (node-b, 100.65.1.2, Service `cross`
/// 100.66.0.41); each Service has `http` 80 -> 8080 and `tcp-raw` 81 -> 8081. A
/// VirtualService per Service (a `/admin` directResponse, then the route with a timeout) and
/// an AuthorizationPolicy on the servers (the client's principal: GET/POST `/*` on 8080, any
/// on 8081).
pub const BENCH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: bench, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench, labels: {app: client}}
spec: {nodeName: node-a, serviceAccountName: client}
status: {podIP: 100.65.0.2, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: srv-same, namespace: bench, labels: {app: same, role: server}}
spec: {nodeName: node-a, serviceAccountName: server}
status: {podIP: 100.65.0.3, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: srv-cross, namespace: bench, labels: {app: cross, role: server}}
spec: {nodeName: node-b, serviceAccountName: server}
status: {podIP: 100.65.1.2, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Service
metadata: {name: same, namespace: bench}
spec:
  clusterIP: 100.66.0.40
  selector: {app: same}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: tcp-raw, port: 81, targetPort: 8081}
---
apiVersion: v1
kind: Service
metadata: {name: cross, namespace: bench}
spec:
  clusterIP: 100.66.0.41
  selector: {app: cross}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: tcp-raw, port: 81, targetPort: 8081}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: same, namespace: bench}
spec:
  hosts: [same]
  http:
  - match: [{uri: {prefix: /admin}}]
    directResponse: {status: 403}
  - match: [{uri: {prefix: /}}]
    route: [{destination: {host: same, port: {number: 80}}}]
    timeout: 10s
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: cross, namespace: bench}
spec:
  hosts: [cross]
  http:
  - match: [{uri: {prefix: /admin}}]
    directResponse: {status: 403}
  - match: [{uri: {prefix: /}}]
    route: [{destination: {host: cross, port: {number: 80}}}]
    timeout: 10s
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: servers, namespace: bench}
spec:
  selector: {matchLabels: {role: server}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/bench/sa/client"]}}]
    to: [{operation: {methods: [GET, POST], paths: ["/*"], ports: ["8080"]}}]
  - from: [{source: {principals: ["cluster.local/ns/bench/sa/client"]}}]
    to: [{operation: {ports: ["8081"]}}]
"#;
