#!/usr/bin/env bash
# Starts a throw-away userhub and runs scripts/schemathesis.sh against it:
#
#   scripts/schemathesis-local.sh [USERHUB_BINARY] [-- ST_RUN_ARGS…]
#
# USERHUB_BINARY defaults to target/debug/userhub. The server listens on a free port of
# 127.0.0.1 with a fresh SQLite database in a temporary folder, the in-process bus and
# cache, rate limiting off, and only the configuration compiled into the binary (plus
# the APP__* variables below). A token for it is minted with `userhub token --sub
# schemathesis --role admin --ttl 1h` under the same environment, so it is signed with
# the same secret.
#
# Waits for GET /health (deadline $USERHUB_START_TIMEOUT_SECS, default 60), runs
# Schemathesis, stops the server with SIGTERM and exits with Schemathesis' status. The
# server's log is kept in target/schemathesis/server.log; the temporary folder is
# removed on exit.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="$root/target/schemathesis"
start_timeout="${USERHUB_START_TIMEOUT_SECS:-60}"
stop_timeout=40

say() {
    echo "schemathesis-local.sh: $*" >&2
}

binary="$root/target/debug/userhub"
if [ "$#" -gt 0 ] && [ "$1" != "--" ]; then
    binary="$1"
    shift
fi
if [ "$#" -gt 0 ] && [ "$1" = "--" ]; then
    shift
fi
if [ ! -x "$binary" ]; then
    say "no userhub binary at $binary (build it with: cargo build)"
    exit 2
fi
binary="$(cd "$(dirname "$binary")" && pwd)/$(basename "$binary")"

mkdir -p "$state"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/userhub-schemathesis.XXXXXX")"
server_pid=""
runner_pid=""

stop_server() {
    if [ -z "$server_pid" ] || ! kill -0 "$server_pid" 2>/dev/null; then
        server_pid=""
        return 0
    fi
    kill -TERM "$server_pid" 2>/dev/null || true
    local deadline=$((SECONDS + stop_timeout))
    while kill -0 "$server_pid" 2>/dev/null; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            say "server $server_pid still running ${stop_timeout}s after SIGTERM: SIGKILL"
            kill -KILL "$server_pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
}

stop_runner() {
    if [ -n "$runner_pid" ] && kill -0 "$runner_pid" 2>/dev/null; then
        kill -TERM "$runner_pid" 2>/dev/null || true
        wait "$runner_pid" 2>/dev/null || true
    fi
    runner_pid=""
}

cleanup() {
    local status=$?
    stop_runner
    stop_server
    rm -rf "$tmp"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A free port of 127.0.0.1, chosen by the kernel.
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"

mkdir -p "$tmp/config"
export APP_CONFIG_DIR="$tmp/config" # empty: the embedded defaults, then APP__* below
export APP_ENV="local"
export APP__SERVER__HOST="127.0.0.1"
export APP__SERVER__PORT="$port"
export APP__DATABASE__URL="sqlite://$tmp/userhub.db"
export APP__DOCUMENTS__URL="sqlite://$tmp/userhub.db"
export APP__CACHE__URL="memory://"
export APP__BUS__URL="memory://"
export APP__RATE_LIMIT__ENABLED="false"
export APP__LOG__FORMAT="json"
unset RUST_LOG

token="$("$binary" token --sub schemathesis --role admin --ttl 1h)"

say "starting $binary on 127.0.0.1:$port (database $tmp/userhub.db)"
"$binary" serve >"$state/server.log" 2>&1 &
server_pid=$!

base_url="http://127.0.0.1:$port"
deadline=$((SECONDS + start_timeout))
until curl --silent --fail --max-time 2 --noproxy '*' -o /dev/null "$base_url/health"; do
    if ! kill -0 "$server_pid" 2>/dev/null; then
        say "the server exited before answering /health; its log:"
        tail -n 40 "$state/server.log" >&2
        server_pid=""
        exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        say "no answer from $base_url/health within ${start_timeout}s; the server's log:"
        tail -n 40 "$state/server.log" >&2
        exit 1
    fi
    sleep 0.2
done
say "server up at $base_url"

# In the background so that a SIGTERM/SIGINT sent to this script is handled at once.
TOKEN="$token" "$root/scripts/schemathesis.sh" "$base_url" -- "$@" &
runner_pid=$!
status=0
wait "$runner_pid" || status=$?
runner_pid=""

stop_server
say "server stopped; schemathesis status $status"
exit "$status"
