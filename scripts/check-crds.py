#!/usr/bin/env python3
"""Validates every example resource of the Istio kinds the mesh reads against the CRDs in deploy/crds
(generated from the typed model), as an API server with strict field validation would:
unknown fields are errors, types and enums must match, the apiVersion must be served. Also
checks that a misspelt field and a wrong type are refused, so the check is known to work."""
import copy
import pathlib
import sys

import jsonschema
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent


def strict(schema):
    """OpenAPI v3 (Kubernetes flavour) to JSON Schema with unknown fields refused."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return {"type": "object"}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def load_crds():
    crds = {}
    for path in sorted((ROOT / "deploy/crds").glob("*.*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
            crds[(f"{group}/{version['name']}", kind)] = strict(spec)
    return crds


def problems(crds, doc):
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in crds:
        return [f"{key[0]} {key[1]} is not served by the CRDs"]
    validator = jsonschema.Draft7Validator(crds[key])
    return [f"spec.{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc.get("spec") or {})]


def main():
    crds = load_crds()
    kinds = {k for (_, k) in crds}
    checked, failed = 0, 0
    files = sorted((ROOT / "examples").glob("*.yaml")) + sorted((ROOT / "examples/istio").glob("*.yaml"))
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            items = (doc or {}).get("items", []) if (doc or {}).get("kind") == "List" else [doc]
            for item in items:
                if not item or item.get("kind") not in kinds:
                    continue
                checked += 1
                for problem in problems(crds, item):
                    failed += 1
                    name = item.get("metadata", {}).get("name")
                    print(f"{path.relative_to(ROOT)}: {item['kind']} {name}: {problem}", file=sys.stderr)
    # Controls: the check refuses what an API server would.
    vs = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
          "spec": {"hosts": ["a"], "http": [{"route": [{"destination": {"host": "a"}, "weight": 100}]}]}}
    if problems(crds, vs):
        sys.exit(f"check-crds: a valid VirtualService was refused: {problems(crds, vs)}")
    misspelt = copy.deepcopy(vs)
    misspelt["spec"]["http"][0]["retrys"] = {"attempts": 3}
    wrong_type = copy.deepcopy(vs)
    wrong_type["spec"]["http"][0]["route"][0]["weight"] = "ninety"
    for bad in (misspelt, wrong_type):
        if not problems(crds, bad):
            sys.exit("check-crds: an invalid VirtualService passed: the check does not work")
    if failed:
        sys.exit(f"check-crds: {failed} problem(s) in {checked} example resources")
    print(f"crds ok: {checked} example resources of {len(kinds)} kinds validate against deploy/crds")


if __name__ == "__main__":
    main()
