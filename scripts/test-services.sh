#!/usr/bin/env bash
# Runs a command with the integration-test services up and their URLs exported:
#
#   scripts/test-services.sh cargo test --test api mongo
#
# MongoDB is SecantusDB (a MongoDB-compatible server from PyPI), installed in a venv
# under target/test-services and run in memory. PostgreSQL, Redis and RabbitMQ are
# normally running already; one that does not answer is started. On exit, whatever this
# script started is stopped again; what was already running is left alone.
set -euo pipefail

if [ "$#" -eq 0 ]; then
    echo "usage: $0 <command> [args…]   (e.g. $0 cargo test)" >&2
    exit 2
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
state="$root/target/test-services"
venv="$state/venv"
secantus_version="0.7.0b3"
mkdir -p "$state"

export USERHUB_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:5432/postgres"
export USERHUB_TEST_MONGO_URL="mongodb://127.0.0.1:27017/?directConnection=true"
export USERHUB_TEST_REDIS_URL="redis://127.0.0.1:6379"
export USERHUB_TEST_AMQP_URL="amqp://guest:guest@127.0.0.1:5672/%2f"

# One line per service, on stderr so that the command's own output stays clean.
say() {
    echo "test-services: $*" >&2
}

# What to undo on exit, newest last.
started=()
mongo_pid=""

cleanup() {
    local status=$?
    local i
    for ((i = ${#started[@]} - 1; i >= 0; i--)); do
        case "${started[i]}" in
            mongo) stop_secantus ;;
            postgres) pg_ctlcluster --skip-systemctl-redirect "$(postgres_version)" main stop >/dev/null 2>&1 || true ;;
            redis) redis-cli -h 127.0.0.1 -p 6379 shutdown nosave >/dev/null 2>&1 || true ;;
            rabbitmq) rabbitmqctl stop >/dev/null 2>&1 || true ;;
        esac
        say "stopped ${started[i]}"
    done
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# True when something accepts TCP connections on 127.0.0.1:$1.
answers() {
    timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# Polls until 127.0.0.1:$1 answers or $2 seconds have passed.
wait_for_port() {
    local port=$1 deadline=$((SECONDS + $2))
    until answers "$port"; do
        if ((SECONDS >= deadline)); then
            return 1
        fi
        sleep 0.2
    done
}

postgres_version() {
    find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V | tail -n 1
}

stop_secantus() {
    [ -n "$mongo_pid" ] || return 0
    kill "$mongo_pid" 2>/dev/null || return 0
    local deadline=$((SECONDS + 10))
    while kill -0 "$mongo_pid" 2>/dev/null && ((SECONDS < deadline)); do
        sleep 0.1
    done
    kill -9 "$mongo_pid" 2>/dev/null || true
    wait "$mongo_pid" 2>/dev/null || true
}

start_secantus() {
    if answers 27017; then
        say "mongo: something already answers on 127.0.0.1:27017; using it"
        return
    fi
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv"
    fi
    if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('SecantusDB') != '$secantus_version')" 2>/dev/null \
        || [ ! -x "$venv/bin/secantusd-py" ]; then
        say "mongo: installing SecantusDB $secantus_version into $venv"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "SecantusDB==$secantus_version" >&2
    fi
    local log="$state/secantusd.log"
    # From $state, so that no stray ./secantusd.toml is picked up.
    (cd "$state" && exec "$venv/bin/secantusd-py" --host 127.0.0.1 --port 27017 \
        --storage-path :memory: --log-level WARNING) >"$log" 2>&1 &
    mongo_pid=$!
    started+=(mongo)
    local deadline=$((SECONDS + 60))
    until answers 27017; do
        if ! kill -0 "$mongo_pid" 2>/dev/null || ((SECONDS >= deadline)); then
            say "mongo: SecantusDB did not come up on 127.0.0.1:27017; end of $log:"
            tail -n 30 "$log" >&2
            exit 1
        fi
        sleep 0.2
    done
    say "mongo: started SecantusDB $secantus_version (pid $mongo_pid, in memory) on 127.0.0.1:27017; log in $log"
}

# Checks a service that the machine normally runs; starts it when it does not answer.
# A service that cannot be had has its URL unset, so its tests say they are skipped
# (or fail under CI) instead of failing on a connection error.
ensure_service() {
    local name=$1 port=$2 url_var=$3 seconds=$4
    shift 4
    if wait_for_port "$port" 3; then
        say "$name: already running on 127.0.0.1:$port"
        return
    fi
    if ! command -v "$1" >/dev/null 2>&1; then
        say "$name: not running and $1 is not installed; unsetting $url_var"
        unset "$url_var"
        return
    fi
    if "$@" >"$state/start-$name.log" 2>&1; then
        started+=("$name")
    fi
    if wait_for_port "$port" "$seconds"; then
        say "$name: was not running; started it on 127.0.0.1:$port"
    else
        say "$name: not running and could not be started (see $state/start-$name.log); unsetting $url_var"
        unset "$url_var"
    fi
}

start_secantus
ensure_service postgres 5432 USERHUB_TEST_POSTGRES_URL 30 \
    pg_ctlcluster --skip-systemctl-redirect "$(postgres_version)" main start
mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
ensure_service redis 6379 USERHUB_TEST_REDIS_URL 10 \
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
ensure_service rabbitmq 5672 USERHUB_TEST_AMQP_URL 60 rabbitmq-server -detached

"$@"
