#!/usr/bin/env bash
# Checks the monitoring configuration with promtool:
#
#   promtool check rules deploy/prometheus/alerts.yml           (syntax, PromQL, templates)
#   promtool test rules deploy/prometheus/tests/alerts_test.yml (each alert fires / stays quiet)
#
# and that the Grafana dashboard and its provisioning files parse. promtool comes with
# Debian's `prometheus` package, installed here when it is missing (as root, or with
# sudo), as is python3-yaml. That every metric of the dashboard and the rules is exposed by /metrics is a
# Rust test: cargo test --test api monitoring.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=()
command -v promtool >/dev/null 2>&1 || packages+=(prometheus)
python3 -c 'import yaml' 2>/dev/null || packages+=(python3-yaml)
if [ "${#packages[@]}" -gt 0 ]; then
    echo "check-monitoring: installing ${packages[*]} (Debian packages)" >&2
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        sudo="sudo"
    fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq >&2
    # --no-install-recommends: promtool is all this needs, not the exporters.
    $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >&2
fi
promtool --version 2>&1 | head -n 1

promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/tests/alerts_test.yml

python3 - <<'PY'
import json, pathlib, sys
dashboard = json.loads(pathlib.Path("deploy/grafana/userhub.json").read_text())
panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
missing = [p["title"] for p in panels if not p.get("targets")]
if missing:
    sys.exit(f"panels without a query: {missing}")
print(f"deploy/grafana/userhub.json: {len(panels)} panels, uid {dashboard['uid']}")
PY
python3 - deploy/grafana/provisioning/*/*.yml <<'PY'
import sys
import yaml  # Debian's python3-yaml, installed above when missing
for path in sys.argv[1:]:
    document = yaml.safe_load(open(path))
    if document.get("apiVersion") != 1:
        sys.exit(f"{path}: not a Grafana provisioning file (apiVersion 1)")
    print(f"{path}: parses")
PY
echo "check-monitoring: ok"
