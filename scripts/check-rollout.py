"""Checks that deploy/'s DaemonSet can be upgraded without a refused connection: a surge
rollout (maxSurge 1, maxUnavailable 0), no ports on the host-network pod (Kubernetes would
turn them into hostPorts, keeping the surge pod Pending), exec probes (an HTTP probe would
reach whichever process holds the shared admin port) and a grace period that covers the
drain. Usage: check-rollout.py RENDERED.yaml"""

import re
import sys

import yaml

DEFAULT_DRAIN = 3600


def seconds(text):
    total = 0.0
    for number, unit in re.findall(r"([0-9.]+)(h|ms|m|s)", text):
        total += float(number) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit]
    return total


def main(path):
    problems = []
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    sets = [d for d in docs if d.get("kind") == "DaemonSet"]
    if not sets:
        problems.append("no DaemonSet")
    for ds in sets:
        name = ds["metadata"]["name"]
        update = ds["spec"].get("updateStrategy", {}).get("rollingUpdate", {})
        if update.get("maxSurge") != 1 or update.get("maxUnavailable") != 0:
            problems.append(f"{name}: rollingUpdate is {update}, not maxSurge 1, maxUnavailable 0")
        pod = ds["spec"]["template"]["spec"]
        drain = DEFAULT_DRAIN
        for c in pod["containers"]:
            if pod.get("hostNetwork") and c.get("ports"):
                problems.append(f"{name}/{c['name']}: ports on a host-network pod become hostPorts")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in c and "exec" not in c[probe]:
                    problems.append(f"{name}/{c['name']}: {probe} is not an exec probe")
            for arg in c.get("args", []):
                if arg.startswith("--drain-timeout="):
                    drain = seconds(arg.split("=", 1)[1])
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if grace < drain:
            problems.append(f"{name}: terminationGracePeriodSeconds {grace} < drain timeout {drain:.0f}s")
    for p in problems:
        print(f"check-rollout: {p}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"rollout ok: {len(sets)} DaemonSet(s) roll with surge, no hostPort, exec probes")


main(sys.argv[1])
