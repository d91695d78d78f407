#!/usr/bin/env bash
# Instructions per request: userhub's CPU work on the read path, counted rather than
# timed. The embedded server (SQLite, memory cache, in-process bus; APP_ENV=production
# settings, rate limits off, log level warn, as in scripts/bench.sh) runs under
# valgrind's callgrind; one keep-alive connection sends N requests after a warm-up, and
# the count is the user-space instructions of the HTTP worker thread that served them.
# Unlike requests a second, the count does not depend on what else the machine is doing:
# the same binary gave the same figure within 0.5% in repeated runs (0.2% on one
# machine), so it shows changes of a percent or two that wrk's noise hides. It leaves
# out the kernel (sockets, scheduling): 40-57% of the CPU samples of a cached GET under
# wrk, in two profiles.
#
#   scripts/bench/instructions.sh [BINARY] [N]   default: target/release/userhub, 2000
#
# Prints one line each for GET /health and a cached GET /api/users/{uuid}, then the
# same count for the benchmark's ceiling (examples/ceiling.rs, a bare actix-web JSON
# handler) when it sits beside the binary (BINARY's directory/examples/ceiling, as cargo
# builds it), and the cached GET's count as a multiple of the ceiling's. For where the
# instructions go, keep the profiles (INSTRUCTIONS_KEEP=DIR) and read them with
# `callgrind_annotate DIR/get/callgrind.out.*` (a binary with symbols: build with
# CARGO_PROFILE_RELEASE_STRIP=false CARGO_PROFILE_RELEASE_DEBUG=line-tables-only).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
helper="$root/scripts/bench/helper.py"
userhub="${1:-$root/target/release/userhub}"
n="${2:-2000}"
ceiling="$(dirname "$userhub")/examples/ceiling"
[ -x "$userhub" ] || { echo "instructions: no binary at $userhub (cargo build --release)" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "instructions: valgrind is not installed" >&2; exit 2; }

work="$(mktemp -d)"
server=""
cleanup() {
    if [ -n "$server" ]; then
        kill "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

secret="instructions-hs256-secret-$(head -c 24 /dev/urandom | base64 | tr -d '/+=')"
issuer=urn:userhub:local
audience=userhub
token="$(python3 "$helper" token "$secret" "$issuer" "$audience")"

# shellcheck source=scripts/bench/settings.sh
source "$root/scripts/bench/settings.sh"
userhub_settings "$secret" "$issuer" "$audience"

# count KIND: one server under callgrind, N requests of KIND: health or get (userhub,
# GET /health or a cached GET of a user it creates first) or ceiling (examples/ceiling).
# Prints the instructions a request and leaves them in `counted`.
count() {
    local kind=$1 port
    port="$(python3 "$helper" free-port)"
    rm -rf "$work/run" && mkdir -p "$work/run"
    local env=("${userhub_env[@]}" APP__SERVER__PORT="$port"
        APP__DATABASE__URL="sqlite://$work/run/userhub.db"
        APP__DOCUMENTS__URL="sqlite://$work/run/userhub.db"
        APP__CACHE__URL=memory:// APP__BUS__URL=memory://)
    local server_cmd=("$userhub" serve) up_path=/health
    if [ "$kind" = ceiling ]; then
        server_cmd=("$ceiling" "127.0.0.1:$port")
        up_path=$ceiling_path
    elif ! env "${env[@]}" "$userhub" migrate >"$work/run/migrate.log" 2>&1; then
        echo "instructions: userhub migrate failed; end of its log:" >&2
        tail -n 20 "$work/run/migrate.log" >&2
        exit 1
    fi
    # Instrumentation starts off (start-up is not counted) and is switched on and off
    # around the measured requests with callgrind_control.
    env "${env[@]}" valgrind --tool=callgrind --instr-atstart=no --separate-threads=yes \
        --callgrind-out-file="$work/run/callgrind.out.%p" \
        "${server_cmd[@]}" >"$work/run/server.log" 2>&1 &
    server=$!
    if ! python3 "$helper" wait-up "http://127.0.0.1:$port$up_path" "$server" "$(date +%s.%N)" 120 >/dev/null; then
        echo "instructions: the server did not come up; end of its log:" >&2
        tail -n 20 "$work/run/server.log" >&2
        exit 1
    fi
    python3 - "$port" "$token" "$n" "$kind" "$server" "$ceiling_path" <<'PY'
import http.client, json, subprocess, sys

port, token, n, kind, server, ceiling_path = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
auth = {"Authorization": "Bearer " + token}
if kind == "health":
    path, headers = "/health", {}
elif kind == "ceiling":
    path, headers = ceiling_path, {}  # as scripts/bench.sh asks it: no token
else:
    conn.request("POST", "/api/users", body=json.dumps({"name": "Ada Lovelace", "email": "ada@example.com"}),
                 headers={**auth, "Content-Type": "application/json"})
    created = conn.getresponse()
    assert created.status == 201, created.status
    uuid = json.loads(created.read())["uuid"]
    path, headers = f"/api/users/{uuid}", auth

def send(count):
    for _ in range(count):
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        response.read()
        assert response.status == 200, (path, response.status)

def control(*args):
    subprocess.run(["callgrind_control", *args, server], check=True, capture_output=True)

send(300)  # warm-up: the caches filled, the connection's buffers grown
control("-i", "on")
send(n)
control("-i", "off")
control("-d")
PY
    kill "$server"
    wait "$server" 2>/dev/null || true
    server=""
    # One profile a thread: the busiest is the HTTP worker that served the connection;
    # the others (timers, the relay's and the worker's polls) are left out, as their
    # count grows with the time the run takes, not with the requests.
    local total=0 part count
    for part in "$work"/run/callgrind.out.*; do
        count="$(awk '/^totals:/ {print $2; exit}' "$part")"
        if [ "${count:-0}" -gt "$total" ]; then
            total=$count
        fi
    done
    if [ -n "${INSTRUCTIONS_KEEP:-}" ]; then
        mkdir -p "$INSTRUCTIONS_KEEP/$kind"
        cp "$work"/run/callgrind.out.* "$INSTRUCTIONS_KEEP/$kind/"
    fi
    counted=$((total / n))
    local label="GET /health"
    [ "$kind" = get ] && label="GET /api/users/{uuid}, memory cache hit"
    [ "$kind" = ceiling ] && label="GET /api/users/{uuid}, the ceiling (examples/ceiling)"
    echo "$label: $counted instructions a request ($n requests)"
}

count health
count get
if [ -x "$ceiling" ]; then
    get=$counted
    count ceiling
    python3 -c 'import sys; print(f"cached GET / ceiling: {int(sys.argv[1]) / int(sys.argv[2]):.2f} times the instructions")' "$get" "$counted"
else
    echo "instructions: no ceiling at $ceiling (cargo build --release --example ceiling); not counted" >&2
fi
