#!/usr/bin/env bash
# Runs Schemathesis (pinned below) against a running userhub:
#
#   TOKEN=$(userhub token --sub schemathesis --role admin) scripts/schemathesis.sh [BASE_URL] [-- ST_RUN_ARGS…]
#
# BASE_URL (or $SCHEMATHESIS_BASE_URL) defaults to http://127.0.0.1:8080 and must be
# http://127.0.0.1:PORT: this script only ever talks to this machine. The token comes
# from $TOKEN or $USERHUB_TOKEN and is sent as `Authorization: Bearer …`.
#
# The settings (all checks, all four phases, seed, examples per operation, reports) are
# in schemathesis.toml at the repository root. Reports go to target/schemathesis/report/
# (JUnit XML and NDJSON events); the console output is kept in
# target/schemathesis/run.log. Anything after `--` is passed to `st run` as is.
#
# The document is the one the server serves (BASE_URL/api-docs/openapi.json); set
# SCHEMATHESIS_SCHEMA to a local file to try a changed document against the same server
# before changing the server's annotations.
#
# Exits with Schemathesis' status: 0 only when no check failed and no error happened,
# and 1 as well when the run made fewer than $SCHEMATHESIS_MIN_CASES test cases
# (default 2000).
#
# Schemathesis lives in a venv under target/schemathesis/venv, created on first use
# (needs python3 and PyPI) and reused while it holds the pinned version.
set -euo pipefail

schemathesis_version="4.32.5"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="$root/target/schemathesis"
venv="$state/venv"
min_cases="${SCHEMATHESIS_MIN_CASES:-2000}"

say() {
    echo "schemathesis.sh: $*" >&2
}

base_url="${SCHEMATHESIS_BASE_URL:-http://127.0.0.1:8080}"
if [ "$#" -gt 0 ] && [ "$1" != "--" ]; then
    base_url="$1"
    shift
fi
if [ "$#" -gt 0 ] && [ "$1" = "--" ]; then
    shift
fi
base_url="${base_url%/}"

if ! [[ "$base_url" =~ ^http://127\.0\.0\.1:[0-9]{1,5}$ ]]; then
    say "refusing base URL '$base_url': only http://127.0.0.1:PORT is allowed"
    exit 2
fi

token="${TOKEN:-${USERHUB_TOKEN:-}}"
if [ -z "$token" ]; then
    say "no token: set TOKEN (e.g. TOKEN=\$(userhub token --sub schemathesis --role admin))"
    exit 2
fi

mkdir -p "$state"
if [ "$("$venv/bin/st" --version 2>/dev/null || true)" != "st, version $schemathesis_version" ]; then
    say "installing schemathesis==$schemathesis_version into $venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "schemathesis==$schemathesis_version"
fi

# Straight to 127.0.0.1, whatever proxy the environment names.
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY
export NO_PROXY="127.0.0.1" no_proxy="127.0.0.1"

export SCHEMATHESIS_BASE_URL="$base_url"
export USERHUB_TOKEN="$token"

schema="$base_url/api-docs/openapi.json"
if [ -n "${SCHEMATHESIS_SCHEMA:-}" ]; then
    schema="$(cd "$(dirname "$SCHEMATHESIS_SCHEMA")" && pwd)/$(basename "$SCHEMATHESIS_SCHEMA")"
fi

rm -rf "$state/report"
mkdir -p "$state/report"
log="$state/run.log"

# From here on, everything this script prints is also kept in the log.
exec > >(tee "$log") 2>&1

say "schemathesis $schemathesis_version against $base_url, document $schema (config: schemathesis.toml)"
cd "$root"
started=$(date +%s)
# In the background so that a SIGTERM/SIGINT sent to this script reaches it at once
# (a non-interactive shell would otherwise wait for it, and it ignores SIGINT).
"$venv/bin/st" --config-file "$root/schemathesis.toml" run --no-color "$schema" "$@" &
st_pid=$!
trap 'kill -TERM "$st_pid" 2>/dev/null; wait "$st_pid"; exit 143' TERM
trap 'kill -TERM "$st_pid" 2>/dev/null; wait "$st_pid"; exit 130' INT
status=0
wait "$st_pid" || status=$?
trap - TERM INT
elapsed=$(($(date +%s) - started))

# Test cases per phase, counted from the NDJSON event stream.
cases=$("$venv/bin/python" - "$state/report" <<'EOF'
import json, pathlib, sys
from collections import Counter

per_phase = Counter()
for path in pathlib.Path(sys.argv[1]).glob("*.ndjson"):
    for line in path.read_text().splitlines():
        event = json.loads(line)
        finished = event.get("ScenarioFinished")
        if finished is None:
            continue
        phase = finished.get("phase") or "?"
        recorder = finished.get("recorder") or {}
        per_phase[phase] += len(recorder.get("cases") or {})
print(" ".join(f"{phase}={count}" for phase, count in sorted(per_phase.items())) or "none")
print(sum(per_phase.values()))
EOF
) || cases=$'unknown\n0'
per_phase=$(head -n 1 <<<"$cases")
total=$(tail -n 1 <<<"$cases")
say "finished in ${elapsed}s with status $status; test cases: $total ($per_phase)"

if [ "$status" -eq 0 ] && [ "$total" -lt "$min_cases" ]; then
    say "only $total test cases, fewer than $min_cases: raise generation.max-examples"
    status=1
fi
exit "$status"
