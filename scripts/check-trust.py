"""Checks deploy/'s trust boundary: the CA Secret (mesh-ca) is mounted by the signer's
Deployment only, never by the node proxies' DaemonSet; the node proxies get a projected token
bound to the signer's audience and the trust bundle ConfigMap; only the signer's service
account may create TokenReviews. Usage: check-trust.py RENDERED.yaml"""

import sys

import yaml

SECRET = "mesh-ca"


def secret_volumes(pod):
    return [v["name"] for v in pod.get("volumes", []) if v.get("secret", {}).get("secretName") == SECRET]


def main(path):
    problems = []
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    workloads = [d for d in docs if d.get("kind") in ("DaemonSet", "Deployment")]
    signers = []
    for w in workloads:
        name = f"{w['kind']}/{w['metadata']['name']}"
        pod = w["spec"]["template"]["spec"]
        mounted = secret_volumes(pod)
        if w["kind"] == "DaemonSet":
            if mounted:
                problems.append(f"{name}: mounts the CA Secret {SECRET} (every node would hold the key)")
            audiences = [
                s["serviceAccountToken"].get("audience")
                for v in pod.get("volumes", [])
                for s in v.get("projected", {}).get("sources", [])
                if "serviceAccountToken" in s
            ]
            if "mesh-ca" not in audiences:
                problems.append(f"{name}: no projected token for audience mesh-ca")
            if not any(v.get("configMap", {}).get("name") == "mesh-trust-bundle" for v in pod.get("volumes", [])):
                problems.append(f"{name}: no trust bundle ConfigMap")
        elif mounted:
            signers.append(w["metadata"]["name"])
    if signers != ["mesh-ca"]:
        problems.append(f"the CA Secret is mounted by {signers or 'nothing'}, not the signer mesh-ca alone")
    roles = {
        d["metadata"]["name"]
        for d in docs
        if d.get("kind") == "ClusterRole"
        and any("tokenreviews" in r.get("resources", []) for r in d.get("rules", []))
    }
    reviewers = {
        s["name"]
        for d in docs
        if d.get("kind") == "ClusterRoleBinding" and d["roleRef"]["name"] in roles
        for s in d.get("subjects", [])
    }
    if reviewers != {"mesh-ca"}:
        problems.append(f"TokenReviews may be created by {sorted(reviewers)}, not the signer alone")
    for p in problems:
        print(f"check-trust: {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print("trust ok: the CA Secret is the signer's alone; node proxies hold a bound token and the bundle")


main(sys.argv[1])
