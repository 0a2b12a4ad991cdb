#!/usr/bin/env bash
# Validates deploy/k8s/job.yaml against the Kubernetes API schemas, offline: kubernetes-validate
# (from PyPI; it ships the schemas of every Kubernetes release) in a virtual environment, strict
# (unknown fields are errors), for the oldest release whose Indexed Job fields the manifest uses
# (1.33: backoffLimitPerIndex is GA) and the newest the package knows. Then the infdit contract:
# INFDIT_SHARD_COUNT equals spec.completions and the container runs `upscale ... --shard auto`.
#
#   deploy/k8s/validate.sh [VENV_DIR]    # default: target/k8s-validate-venv
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${1:-target/k8s-validate-venv}
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "kubernetes-validate==1.37.0"
fi
for v in 1.33.0 1.37.0; do
    "$venv/bin/kubernetes-validate" --strict -k "$v" deploy/k8s/job.yaml
done
"$venv/bin/python" - <<'PY'
import yaml
docs = list(yaml.safe_load_all(open("deploy/k8s/job.yaml")))
job = next(d for d in docs if d["kind"] == "Job")
spec = job["spec"]
assert spec["completionMode"] == "Indexed", spec["completionMode"]
c = job["spec"]["template"]["spec"]["containers"][0]
env = {e["name"]: e["value"] for e in c["env"]}
assert int(env["INFDIT_SHARD_COUNT"]) == spec["completions"], (env, spec["completions"])
args = c["args"]
assert args[0] == "upscale" and args[args.index("--shard") + 1] == "auto", args
print(f"deploy/k8s/job.yaml: Indexed Job of {spec['completions']} shards, INFDIT_SHARD_COUNT matches, --shard auto")
PY
