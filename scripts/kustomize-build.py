#!/usr/bin/env python3
"""Builds a kustomization the way `kubectl kustomize` does for the features deploy/ uses
(`resources` files and directories, `namespace`), for the offline checks: kubectl cannot be
installed on the CI machines. Prints the manifests as multi-document YAML."""
import pathlib
import sys

import yaml

CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
    "PriorityClass", "StorageClass",
}
SUPPORTED = {"apiVersion", "kind", "namespace", "resources"}


def build(directory: pathlib.Path) -> list:
    path = directory / "kustomization.yaml"
    kustomization = yaml.safe_load(path.read_text())
    unknown = set(kustomization) - SUPPORTED
    if unknown:
        sys.exit(f"{path}: fields this check does not implement: {sorted(unknown)}")
    docs = []
    for entry in kustomization.get("resources", []):
        target = directory / entry
        if target.is_dir():
            docs.extend(build(target))
        elif target.is_file():
            docs.extend(d for d in yaml.safe_load_all(target.read_text()) if d)
        else:
            sys.exit(f"{path}: resource {entry} does not exist")
    namespace = kustomization.get("namespace")
    if namespace:
        for doc in docs:
            if doc.get("kind") not in CLUSTER_SCOPED:
                doc.setdefault("metadata", {})["namespace"] = namespace
            if doc.get("kind") in ("ClusterRoleBinding", "RoleBinding"):
                for subject in doc.get("subjects", []):
                    if subject.get("kind") == "ServiceAccount":
                        subject["namespace"] = namespace
    seen = set()
    for doc in docs:
        key = (doc.get("kind"), doc["metadata"].get("namespace"), doc["metadata"]["name"])
        if key in seen:
            sys.exit(f"{path}: {key} defined twice")
        seen.add(key)
    return docs


if __name__ == "__main__":
    print(yaml.safe_dump_all(build(pathlib.Path(sys.argv[1])), sort_keys=False), end="")
