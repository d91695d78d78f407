#!/usr/bin/env bash
# The benchmark: userhub's hot paths next to their ceilings, measured in the
# same run on the same machine, as a markdown table of ratios.
#
#   scripts/bench.sh                         10 s a path (DURATION=30s for longer)
#   BENCH_QUICK=1 scripts/bench.sh           3 s a path
#   BENCH_GUARD=1 scripts/bench.sh           exit 3 when a ratio is below half its goal
#                                            (BENCH_GUARD_SKIP=key,… leaves rows out)
#   BENCH_PROFILE=debug scripts/bench.sh     the debug binaries (no release build);
#                                            BENCH_GOAL_SCALE=0.4 scales the guarded goals
#   BENCH_KEEP=1                             keep target/bench/run-*/ (logs, wrk output)
#   BENCH_ENRICH_LIMIT=SECONDS               longest wait for the enrichment backlog
#
# Paths, each with `wrk -t2 -c64 -d$DURATION` (APP_ENV=production settings, rate limits
# off, one admin bearer token):
#   - the ceiling: examples/ceiling.rs, a minimal actix-web JSON handler;
#   - embedded (SQLite, memory cache, in-process bus): GET /health, GET /api/users/{uuid}
#     (cache hit), POST /api/users (unique users, scripts/bench/post_users.lua), then the
#     enrichment keep-up: how long after the last 201 the last user is enriched;
#   - services, when PostgreSQL (5432), Redis (6379) and RabbitMQ (5672) answer on
#     127.0.0.1: GET /api/users/{uuid} (Redis hit), POST /api/users on PostgreSQL +
#     RabbitMQ and its keep-up, and pgbench of the same insert+outbox transaction
#     (scripts/bench/create_user.pgbench, 16 clients) as the ceiling of the POST.
# Everything listens on 127.0.0.1 only; what the run starts (processes, a database,
# Redis keys, RabbitMQ queues, files under target/bench/) is removed on exit.
# wrk is installed from Debian when missing (needs root for apt-get).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
helper="$root/scripts/bench/helper.py"

if [ "${BENCH_QUICK:-0}" = 1 ]; then
    DURATION="${DURATION:-3s}"
else
    DURATION="${DURATION:-10s}"
fi
secs="${DURATION%s}"
if ! [[ "$secs" =~ ^[0-9]+$ ]]; then
    echo "bench: DURATION must be whole seconds, e.g. 10s (got $DURATION)" >&2
    exit 2
fi
profile="${BENCH_PROFILE:-release}"
# Longest wait for the enrichment backlog after a POST run.
enrich_limit="${BENCH_ENRICH_LIMIT:-$((secs * 6 + 10))}"

say() {
    echo "bench: $*" >&2
}

run_id="$(date +%s)$$"
work="$root/target/bench/run-$run_id"
mkdir -p "$work"
results="$work/results.json"

# What to undo on exit.
pids=()
pg_db=""
redis_prefix=""
amqp_prefix=""

stop_pid() {
    local pid=$1
    kill "$pid" 2>/dev/null || return 0
    local deadline=$((SECONDS + 15))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$?
    local pid
    for pid in "${pids[@]}"; do
        stop_pid "$pid"
    done
    if [ -n "$pg_db" ]; then
        dropdb -h 127.0.0.1 -U postgres --if-exists --force "$pg_db" >/dev/null 2>&1 \
            || say "could not drop database $pg_db"
    fi
    if [ -n "$redis_prefix" ]; then
        redis-cli -h 127.0.0.1 -p 6379 --scan --pattern "${redis_prefix}*" 2>/dev/null \
            | xargs -r -n 100 redis-cli -h 127.0.0.1 -p 6379 del >/dev/null 2>&1 || true
    fi
    if [ -n "$amqp_prefix" ]; then
        local name
        for name in $(timeout 30 rabbitmqctl -q list_queues name 2>/dev/null | grep "^$amqp_prefix" || true); do
            timeout 30 rabbitmqctl -q delete_queue "$name" >/dev/null 2>&1 || true
        done
        for name in $(timeout 30 rabbitmqctl -q list_exchanges name 2>/dev/null | grep "^$amqp_prefix" || true); do
            timeout 30 rabbitmqctl -q eval \
                "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"$name\">>), false, <<\"bench\">>)." \
                >/dev/null 2>&1 || say "could not delete exchange $name"
        done
    fi
    if [ "${BENCH_KEEP:-0}" != 1 ]; then
        rm -rf "$work"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

answers() {
    timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# --- tools and binaries -------------------------------------------------------------
if ! command -v wrk >/dev/null 2>&1; then
    say "installing Debian's wrk"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends wrk >/dev/null
fi

build_start=$SECONDS
if [ "$profile" = release ]; then
    say "cargo build --release --locked (binary and examples/ceiling.rs)"
    cargo build --release --locked --bin userhub --example ceiling >&2
    bindir="$root/target/release"
else
    say "cargo build --locked (debug binary and examples/ceiling.rs)"
    cargo build --locked --bin userhub --example ceiling >&2
    bindir="$root/target/debug"
fi
say "build took $((SECONDS - build_start)) s"
userhub="$bindir/userhub"
ceiling="$bindir/examples/ceiling"

python3 "$helper" put "$results" duration "$DURATION"
python3 "$helper" put "$results" profile "$profile"
python3 "$helper" put "$results" started "$(date -u +%Y-%m-%dT%H:%M:%SZ)"

# --- helpers --------------------------------------------------------------------------
secret="bench-hs256-secret-$(head -c 24 /dev/urandom | base64 | tr -d '/+=')"
issuer="urn:userhub:local"
audience="userhub"
token="$(python3 "$helper" token "$secret" "$issuer" "$audience")"

wait_http() {
    local url=$1 pid=$2 log=$3 deadline=$((SECONDS + 60))
    until curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null || ((SECONDS >= deadline)); then
            say "$url did not come up; end of $log:"
            tail -n 30 "$log" >&2
            exit 1
        fi
        sleep 0.1
    done
}

# start_userhub NAME PORT [VAR=VALUE…]: serves every role with APP_ENV=production.
start_userhub() {
    local name=$1 port=$2
    shift 2
    local log="$work/$name.log"
    env APP_ENV=production \
        APP__SERVER__HOST=127.0.0.1 \
        APP__SERVER__PORT="$port" \
        APP__SERVER__DRAIN_SECS=0 \
        APP__SERVER__SHUTDOWN_TIMEOUT_SECS=5 \
        APP__AUTH__HS256_SECRET="$secret" \
        APP__AUTH__ISSUER="$issuer" \
        APP__AUTH__AUDIENCE="$audience" \
        APP__CONSOLE__SESSION_KEY="bench-console-session-key-$(head -c 24 /dev/urandom | base64 | tr -d '/+=')" \
        APP__RATE_LIMIT__ENABLED=false \
        APP__LOG__LEVEL=warn \
        "$@" "$userhub" serve >"$log" 2>&1 &
    started_pid=$!
    pids+=("$started_pid")
    wait_http "http://127.0.0.1:$port/health" "$started_pid" "$log"
}

stop_started() {
    local pid=$1 keep=() p
    stop_pid "$pid"
    for p in "${pids[@]}"; do
        [ "$p" = "$pid" ] || keep+=("$p")
    done
    pids=("${keep[@]}")
}

# run_wrk KEY URL [wrk args…]: one measurement, parsed into the results.
run_wrk() {
    local key=$1 url=$2
    shift 2
    local out="$work/$key.wrk"
    say "$key: wrk -t2 -c64 -d$DURATION $url"
    timeout $((secs + 60)) wrk -t2 -c64 -d"$DURATION" --latency "$@" "$url" >"$out" 2>&1 || {
        say "$key: wrk failed:"
        cat "$out" >&2
        exit 1
    }
    python3 "$helper" wrk "$results" "$key" "$out"
}

# create_user PORT: one user, read once so that it is cached; prints its uuid.
create_user() {
    local port=$1 body uuid
    body="$(curl -fsS --max-time 10 -X POST "http://127.0.0.1:$port/api/users" \
        -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
        -d "{\"name\":\"Ada Lovelace\",\"email\":\"ada-$run_id@example.com\"}")"
    uuid="$(python3 -c 'import json,sys; print(json.load(sys.stdin)["uuid"])' <<<"$body")"
    curl -fsS -o /dev/null --max-time 10 -H "Authorization: Bearer $token" \
        "http://127.0.0.1:$port/api/users/$uuid"
    echo "$uuid"
}

# post_users KEY PORT: POST flat out for DURATION; prints the time the load ended.
post_users() {
    local key=$1 port=$2
    BENCH_RUN="$run_id" BENCH_TOKEN="$token" \
        run_wrk "$key" "http://127.0.0.1:$port" -s "$root/scripts/bench/post_users.lua"
    date +%s.%N >"$work/$key.end"
}

# --- the ceiling ------------------------------------------------------------------------
port="$(python3 "$helper" free-port)"
"$ceiling" "127.0.0.1:$port" >"$work/ceiling.log" 2>&1 &
ceiling_pid=$!
pids+=("$ceiling_pid")
wait_http "http://127.0.0.1:$port/api/users/0193a0a0-0000-7000-8000-000000000000" "$ceiling_pid" "$work/ceiling.log"
run_wrk ceiling_get "http://127.0.0.1:$port/api/users/0193a0a0-0000-7000-8000-000000000000"
stop_started "$ceiling_pid"

# --- embedded: SQLite, memory cache, in-process bus -------------------------------------
port="$(python3 "$helper" free-port)"
mkdir -p "$work/embedded"
db="$work/embedded/userhub.db"
start_userhub embedded "$port" \
    APP__DATABASE__URL="sqlite://$db" APP__DOCUMENTS__URL="sqlite://$db" \
    APP__CACHE__URL=memory:// APP__BUS__URL=memory://
embedded_pid=$started_pid
uuid="$(create_user "$port")"
run_wrk embedded_health "http://127.0.0.1:$port/health"
run_wrk embedded_get "http://127.0.0.1:$port/api/users/$uuid" -H "Authorization: Bearer $token"
post_users embedded_post "$port"
python3 "$helper" wait-enriched "$results" embedded_enrich sqlite "$db" "$db" \
    "$(cat "$work/embedded_post.end")" "$enrich_limit"
stop_started "$embedded_pid"

# --- services: PostgreSQL, Redis, RabbitMQ --------------------------------------------
missing=""
answers 5432 || missing+=" PostgreSQL(5432)"
answers 6379 || missing+=" Redis(6379)"
answers 5672 || missing+=" RabbitMQ(5672)"
if [ -n "$missing" ]; then
    say "not on 127.0.0.1:$missing; skipping the services profile (scripts/test-services.sh starts them)"
    for key in services_get services_post services_enrich pgbench_create; do
        python3 "$helper" put "$results" "${key}_skipped" "not running:$missing"
    done
else
    pg_db="userhub_bench_$run_id"
    createdb -h 127.0.0.1 -U postgres "$pg_db"
    pg_url="postgres://postgres@127.0.0.1:5432/$pg_db"
    redis_prefix="userhub-bench-$run_id:"
    amqp_prefix="userhub-bench-$run_id."
    port="$(python3 "$helper" free-port)"
    mkdir -p "$work/services"
    profiles="$work/services/profiles.db"
    start_userhub services "$port" \
        APP__DATABASE__URL="$pg_url" APP__DOCUMENTS__URL="sqlite://$profiles" \
        APP__CACHE__URL=redis://127.0.0.1:6379 APP__CACHE__KEY_PREFIX="$redis_prefix" \
        APP__BUS__URL='amqp://guest:guest@127.0.0.1:5672/%2f' APP__BUS__PREFIX="$amqp_prefix"
    services_pid=$started_pid
    uuid="$(create_user "$port")"
    run_wrk services_get "http://127.0.0.1:$port/api/users/$uuid" -H "Authorization: Bearer $token"
    post_users services_post "$port"
    python3 "$helper" wait-enriched "$results" services_enrich postgres "$pg_url" "$profiles" \
        "$(cat "$work/services_post.end")" "$enrich_limit"
    stop_started "$services_pid"

    say "pgbench_create: pgbench -c16 -j2 -T$secs -M prepared (insert+outbox transaction)"
    timeout $((secs + 60)) pgbench -h 127.0.0.1 -U postgres -n -c16 -j2 -T"$secs" -M prepared \
        -f "$root/scripts/bench/create_user.pgbench" "$pg_db" >"$work/pgbench.out" 2>&1 || {
        say "pgbench failed:"
        cat "$work/pgbench.out" >&2
        exit 1
    }
    python3 "$helper" pgbench "$results" pgbench_create "$work/pgbench.out"
fi

# --- the table --------------------------------------------------------------------------
echo
status=0
python3 "$helper" table "$results" || status=$?
exit "$status"
