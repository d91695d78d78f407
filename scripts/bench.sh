#!/usr/bin/env bash
# The benchmark: userhub's hot paths next to their ceilings, measured in the
# same run on the same machine, as a markdown table of ratios and checks.
#
#   scripts/bench.sh                         10 s a path, 60 s of POST for the keep-up
#                                            rows (DURATION=30s, BENCH_KEEPUP_DURATION=…)
#   BENCH_QUICK=1 scripts/bench.sh           3 s a path (keep-up POST too); 3,000 messages
#                                            for the SQLite consumer rows and 500 for the
#                                            MongoDB ones, instead of 20,000 and 2,000
#                                            (BENCH_CONSUMER_MESSAGES,
#                                            BENCH_CONSUMER_MONGO_MESSAGES)
#   BENCH_GUARD=1 scripts/bench.sh           exit 3 on a gross regression: a ratio or rate
#                                            below half its goal, a time or size above
#                                            twice its goal (BENCH_GUARD_SKIP=key,… leaves
#                                            rows out)
#   BENCH_PROFILE=debug scripts/bench.sh     the debug binaries (no release build);
#                                            BENCH_GOAL_SCALE=0.4 scales the guarded goals
#   BENCH_BIN_DIR=DIR                        no build: DIR/userhub and DIR/examples/ceiling
#                                            (e.g. another checkout's target/release); the
#                                            profile follows DIR's name (…/debug: debug)
#   BENCH_KEEP=1                             keep target/bench/run-*/ (logs, wrk output)
#   BENCH_ENRICH_LIMIT=SECONDS               longest wait for an enrichment backlog
#
# Rows, each path with `wrk -t2 -c64 -d$DURATION` (APP_ENV=production settings, rate
# limits off, log level warn, one admin bearer token):
#   - the ceiling: examples/ceiling.rs, a minimal actix-web JSON handler. It stays up
#     for the whole run and is measured again after each read row (GET /health, the
#     cached GETs) and before the services one: each read ratio is to the mean of the
#     ceiling runs just before and just after it;
#   - embedded (SQLite, memory cache, in-process bus), one process with every role:
#     start → first 200 from /health (on a database `userhub migrate` prepared, polled
#     every 10 ms) and idle RSS (VmRSS 1 s later, before any load); GET /health;
#     GET /api/users/{uuid} (cache hit); POST /api/users flat out for
#     $BENCH_KEEPUP_DURATION (unique users, scripts/bench/post_users.lua) and the
#     enrichment keep-up: how long after the last 201 the last user is enriched; then
#     POST at half that flat-out rate (paced by post_users.lua) for $DURATION and, for
#     the users of that phase alone, p50/p99 of creation→enriched by the stores'
#     timestamps (profile created_at − user created_at);
#   - services, when PostgreSQL (5432), Redis (6379) and RabbitMQ (5672) answer on
#     127.0.0.1: pgbench of the POST's insert of the user and its event (scripts/bench/
#     create_user.pgbench, 16 clients, in a database of its own) as the ceiling of the
#     POST; then the same start/RSS, GET (Redis hit), POST, keep-up and half-load rows
#     on PostgreSQL + RabbitMQ + a SQLite profile store, and POST paced at 0.6 ×
#     pgbench's tps for $DURATION, whose p99 is checked against 50 ms;
#   - consumer throughput (services only): N users inserted into a fresh PostgreSQL
#     database, queued by `userhub reenrich --all` through an api,relay process, then a
#     worker-only process drains the RabbitMQ queue into a fresh SQLite profile store
#     (without APP_ENV=production, which refuses a SQLite store when roles are split),
#     against the store's ceiling: the same upsert in a bare python3 sqlite3 loop, one
#     transaction a message; and, when something answers on 127.0.0.1:27017 (e.g.
#     SecantusDB, started by scripts/test-services.sh), the same into a MongoDB store
#     against a bare pymongo loop of update_one({uuid}, upsert) (and, for comparison,
#     of the store's own conditional filter; pymongo is pip-installed when missing).
# Everything listens on and talks to 127.0.0.1 only; what the run starts (processes,
# PostgreSQL and MongoDB databases, Redis keys, RabbitMQ queues, files under
# target/bench/) is removed on exit. wrk is installed from Debian when missing (needs
# root for apt-get).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
helper="$root/scripts/bench/helper.py"

seconds_of() {
    local value=$1 name=$2
    if ! [[ "${value%s}" =~ ^[0-9]+$ ]] || [ "${value%s}" = 0 ]; then
        echo "bench: $name must be whole seconds, e.g. 10s (got $value)" >&2
        exit 2
    fi
    echo "${value%s}"
}

if [ "${BENCH_QUICK:-0}" = 1 ]; then
    DURATION="${DURATION:-3s}"
    keepup_duration="${BENCH_KEEPUP_DURATION:-$DURATION}"
    consumer_messages="${BENCH_CONSUMER_MESSAGES:-3000}"
    mongo_messages="${BENCH_CONSUMER_MONGO_MESSAGES:-500}"
else
    DURATION="${DURATION:-10s}"
    keepup_duration="${BENCH_KEEPUP_DURATION:-60s}"
    consumer_messages="${BENCH_CONSUMER_MESSAGES:-20000}"
    mongo_messages="${BENCH_CONSUMER_MONGO_MESSAGES:-2000}"
fi
secs="$(seconds_of "$DURATION" DURATION)"
keepup_secs="$(seconds_of "$keepup_duration" BENCH_KEEPUP_DURATION)"
for count in "$consumer_messages" "$mongo_messages"; do
    if ! [[ "$count" =~ ^[0-9]+$ ]] || ((count < 2)); then
        echo "bench: BENCH_CONSUMER_MESSAGES and BENCH_CONSUMER_MONGO_MESSAGES must be whole numbers ≥ 2 (got $count)" >&2
        exit 2
    fi
done
if ((mongo_messages > consumer_messages)); then
    mongo_messages=$consumer_messages
fi
# BENCH_BIN_DIR=DIR: use DIR/userhub and DIR/examples/ceiling as they are (no build);
# the profile then defaults to DIR's name when that is debug.
if [ -z "${BENCH_PROFILE:-}" ] && [ -n "${BENCH_BIN_DIR:-}" ]; then
    case "$(basename "$BENCH_BIN_DIR")" in
        debug) BENCH_PROFILE=debug ;;
    esac
fi
profile="${BENCH_PROFILE:-release}"
# Longest wait for the enrichment backlog after a POST run.
enrich_limit="${BENCH_ENRICH_LIMIT:-$((keepup_secs * 6 + 10))}"
# Longest wait for the consumer to drain its queue, and for a ceiling loop.
consumer_limit=$((consumer_messages / 100 > 60 ? consumer_messages / 100 : 60))
ceiling_limit=60

say() {
    echo "bench: $*" >&2
}

run_id="$(date +%s)$$"
work="$root/target/bench/run-$run_id"
mkdir -p "$work"
results="$work/results.json"

# What to undo on exit.
pids=()
pg_dbs=()
mongo_dbs=()
mongo_url="mongodb://127.0.0.1:27017/?directConnection=true"
mongo_python=""
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
    local pid db
    for pid in "${pids[@]}"; do
        stop_pid "$pid"
    done
    for db in "${pg_dbs[@]}"; do
        dropdb -h 127.0.0.1 -U postgres --if-exists --force "$db" >/dev/null 2>&1 \
            || say "could not drop database $db"
    done
    if ((${#mongo_dbs[@]})) && [ -n "$mongo_python" ]; then
        timeout 30 "$mongo_python" "$helper" mongo-drop "$mongo_url" "${mongo_dbs[@]}" >/dev/null 2>&1 \
            || say "could not drop the MongoDB databases ${mongo_dbs[*]}"
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
if [ -n "${BENCH_BIN_DIR:-}" ]; then
    # Binaries built elsewhere (another checkout's target/release, say), copied so
    # that a rebuild there during the run cannot mix two builds in one table.
    for bin in userhub examples/ceiling; do
        if [ ! -x "$BENCH_BIN_DIR/$bin" ]; then
            say "BENCH_BIN_DIR: $BENCH_BIN_DIR/$bin is missing or not executable"
            exit 2
        fi
    done
    say "using $BENCH_BIN_DIR/userhub and $BENCH_BIN_DIR/examples/ceiling (BENCH_BIN_DIR; no build)"
    bindir="$work/bin"
    mkdir -p "$bindir/examples"
    cp "$BENCH_BIN_DIR/userhub" "$bindir/userhub"
    cp "$BENCH_BIN_DIR/examples/ceiling" "$bindir/examples/ceiling"
elif [ "$profile" = release ]; then
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
python3 "$helper" put "$results" keepup_duration "$keepup_duration"
python3 "$helper" put "$results" profile "$profile"
python3 "$helper" put "$results" started "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
if [ -n "${BENCH_BIN_DIR:-}" ]; then
    python3 "$helper" put "$results" note_bin "binaries: copies of $BENCH_BIN_DIR/userhub and examples/ceiling (BENCH_BIN_DIR), $(date -u -r "$BENCH_BIN_DIR/userhub" +%Y-%m-%dT%H:%M:%SZ)"
fi

# --- helpers --------------------------------------------------------------------------
secret="bench-hs256-secret-$(head -c 24 /dev/urandom | base64 | tr -d '/+=')"
issuer="urn:userhub:local"
audience="userhub"
token="$(python3 "$helper" token "$secret" "$issuer" "$audience")"

# The settings of every userhub process of the run; a profile's URLs come on top.
# shellcheck source=scripts/bench/settings.sh
source "$root/scripts/bench/settings.sh"
userhub_settings "$secret" "$issuer" "$audience"

# wait_up NAME URL PID T0 [RESULTS_KEY]: polls URL until it answers 200 (see helper.py
# wait-up); with RESULTS_KEY records the start-up time and the idle RSS.
wait_up() {
    local name=$1 url=$2 pid=$3 t0=$4 key=${5:-}
    if ! python3 "$helper" wait-up "$url" "$pid" "$t0" 60 ${key:+"$results" "$key"} >/dev/null; then
        say "$name did not come up; end of $work/$name.log:"
        tail -n 30 "$work/$name.log" >&2
        exit 1
    fi
}

# start_userhub [--measure KEY] NAME PORT [VAR=VALUE…]: `userhub serve` with the run's
# settings (APP_ENV=production, every role unless USERHUB_ROLES=… is given; a later
# VAR=VALUE wins), started in the background; returns once /health answers. With
# --measure, records KEY: the time from the start to the first 200 and the idle RSS.
# Sets started_pid and started_t0 (the Unix time just before the start).
start_userhub() {
    local key=""
    if [ "$1" = --measure ]; then
        key=$2
        shift 2
    fi
    local name=$1 port=$2
    shift 2
    started_t0="$(date +%s.%N)"
    env "${userhub_env[@]}" APP__SERVER__PORT="$port" "$@" "$userhub" serve >"$work/$name.log" 2>&1 &
    started_pid=$!
    pids+=("$started_pid")
    wait_up "$name" "http://127.0.0.1:$port/health" "$started_pid" "$started_t0" "$key"
}

# run_userhub NAME [VAR=VALUE…] COMMAND…: a one-shot userhub command (migrate,
# reenrich) with the run's settings; its output goes to $work/NAME.log.
run_userhub() {
    local name=$1 vars=()
    shift
    while [ "$#" -gt 0 ] && [[ "$1" == *=* ]]; do
        vars+=("$1")
        shift
    done
    timeout 300 env "${userhub_env[@]}" "${vars[@]}" "$userhub" "$@" >>"$work/$name.log" 2>&1 || {
        say "userhub $* failed; end of $work/$name.log:"
        tail -n 30 "$work/$name.log" >&2
        exit 1
    }
}

stop_started() {
    local pid=$1 keep=() p
    stop_pid "$pid"
    for p in "${pids[@]}"; do
        [ "$p" = "$pid" ] || keep+=("$p")
    done
    pids=("${keep[@]}")
}

# run_wrk KEY DURATION URL [wrk args…]: one measurement, parsed into the results.
run_wrk() {
    local key=$1 duration=$2 url=$3
    shift 3
    local out="$work/$key.wrk"
    say "$key: wrk -t2 -c64 -d$duration $url${BENCH_RATE:+ (paced at $BENCH_RATE req/s)}"
    timeout $((${duration%s} + 60)) wrk -t2 -c64 -d"$duration" --latency "$@" "$url" >"$out" 2>&1 || {
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

# post_users PROFILE PORT USERS_KIND USERS_WHERE PROFILES_DB: POST flat out for the
# keep-up duration (as PROFILE_post), then waits until the profile store (SQLite file
# PROFILES_DB) holds a profile for every user (USERS_KIND sqlite: in the file
# USERS_WHERE; postgres: in the database URL USERS_WHERE) as PROFILE_enrich.
post_users() {
    local profile=$1 port=$2 users_kind=$3 users_where=$4 profiles_db=$5
    BENCH_RUN="$run_id" BENCH_TOKEN="$token" \
        run_wrk "${profile}_post" "$keepup_duration" "http://127.0.0.1:$port" \
        -s "$root/scripts/bench/post_users.lua"
    local post_end
    post_end="$(date +%s.%N)"
    python3 "$helper" wait-enriched "$results" "${profile}_enrich" "$users_kind" "$users_where" \
        "$profiles_db" "$post_end" "$enrich_limit"
}

# half_load PROFILE PORT USERS_KIND USERS_WHERE PROFILES_DB: POST for DURATION at half
# the flat-out rate PROFILE_post measured, as users of their own (e-mail
# bench-<run>half-…); then their creation→enriched latency (PROFILE_halfload).
half_load() {
    local profile=$1 port=$2 users_kind=$3 users_where=$4 profiles_db=$5 rate
    rate="$(python3 "$helper" half-rate "$results" "${profile}_post")"
    BENCH_RUN="${run_id}half" BENCH_TOKEN="$token" BENCH_RATE="$rate" BENCH_THREADS=2 \
        run_wrk "${profile}_halfload_post" "$DURATION" "http://127.0.0.1:$port" \
        -s "$root/scripts/bench/post_users.lua"
    python3 "$helper" creation-latency "$results" "${profile}_halfload" "$users_kind" \
        "$users_where" "$profiles_db" "${run_id}half" "${profile}_halfload_post" "$rate" "$enrich_limit"
}

# print_table: the table, and the run's exit status (3: the guard failed).
print_table() {
    echo
    local status=0
    python3 "$helper" table "$results" || status=$?
    exit "$status"
}

# --- the ceiling ------------------------------------------------------------------------
port="$(python3 "$helper" free-port)"
ceiling_t0="$(date +%s.%N)"
"$ceiling" "127.0.0.1:$port" >"$work/ceiling.log" 2>&1 &
ceiling_pid=$!
pids+=("$ceiling_pid")
ceiling_url="http://127.0.0.1:$port$ceiling_path"
wait_up ceiling "$ceiling_url" "$ceiling_pid" "$ceiling_t0"
run_wrk ceiling_get "$DURATION" "$ceiling_url"

# read_row KEY BEFORE URL [wrk args…]: a read path between two runs of the ceiling
# (which stays up, idle, for the whole run); its ratio is taken against their mean, so
# a machine that gets faster or slower during the run moves both sides of it. BEFORE is
# the key of the ceiling run just before, or "new" to run one.
read_row() {
    local key=$1 before=$2
    shift 2
    if [ "$before" = new ]; then
        before="${key}_ceiling_before"
        run_wrk "$before" "$DURATION" "$ceiling_url"
    fi
    run_wrk "$key" "$DURATION" "$@"
    run_wrk "${key}_ceiling_after" "$DURATION" "$ceiling_url"
    python3 "$helper" put "$results" "${key}_ceilings" "$before,${key}_ceiling_after"
}

# --- embedded: SQLite, memory cache, in-process bus -------------------------------------
port="$(python3 "$helper" free-port)"
mkdir -p "$work/embedded"
db="$work/embedded/userhub.db"
embedded_env=(APP__DATABASE__URL="sqlite://$db" APP__DOCUMENTS__URL="sqlite://$db"
    APP__CACHE__URL=memory:// APP__BUS__URL=memory://)
run_userhub embedded-migrate "${embedded_env[@]}" migrate
start_userhub --measure embedded_start embedded "$port" "${embedded_env[@]}"
embedded_pid=$started_pid
uuid="$(create_user "$port")"
read_row embedded_health ceiling_get "http://127.0.0.1:$port/health"
read_row embedded_get embedded_health_ceiling_after "http://127.0.0.1:$port/api/users/$uuid" -H "Authorization: Bearer $token"
post_users embedded "$port" sqlite "$db" "$db"
half_load embedded "$port" sqlite "$db" "$db"
stop_started "$embedded_pid"

# --- services: PostgreSQL, Redis, RabbitMQ --------------------------------------------
missing=""
answers 5432 || missing+=" PostgreSQL(5432)"
answers 6379 || missing+=" Redis(6379)"
answers 5672 || missing+=" RabbitMQ(5672)"
if [ -n "$missing" ]; then
    say "not on 127.0.0.1:$missing; skipping the services profile (scripts/test-services.sh starts them)"
    for key in services_start services_rss services_get services_post services_post_paced services_enrich \
        services_halfload pgbench_create consumer_sql consumer_sql_rate consumer_mongo; do
        python3 "$helper" put "$results" "${key}_skipped" "not running:$missing"
    done
    print_table
fi

pg_db="userhub_bench_$run_id"
createdb -h 127.0.0.1 -U postgres "$pg_db"
pg_dbs+=("$pg_db")
# Plain TCP to PostgreSQL, for userhub and pgbench alike: on loopback TLS protects
# nothing, and it costs the two differently (sqlx's rustls socket was 23% of the
# server's CPU samples under a POST load; libpq's TLS cost pgbench 14%).
pg_url="postgres://postgres@127.0.0.1:5432/$pg_db?sslmode=disable"
redis_prefix="userhub-bench-$run_id:"
amqp_prefix="userhub-bench-$run_id."
amqp_url='amqp://guest:guest@127.0.0.1:5672/%2f'
port="$(python3 "$helper" free-port)"
mkdir -p "$work/services"
profiles="$work/services/profiles.db"
services_env=(APP__DATABASE__URL="$pg_url" APP__DOCUMENTS__URL="sqlite://$profiles"
    APP__CACHE__URL=redis://127.0.0.1:6379 APP__CACHE__KEY_PREFIX="$redis_prefix"
    APP__BUS__URL="$amqp_url" APP__BUS__PREFIX="$amqp_prefix")
run_userhub services-migrate "${services_env[@]}" migrate

# The ceiling of the POST first, in a database of its own (its outbox rows must not
# reach the bus of the run): pgbench of the same statement, the user and its event in
# one data-modifying WITH.
pgbench_db="${pg_db}_pgbench"
createdb -h 127.0.0.1 -U postgres "$pgbench_db"
pg_dbs+=("$pgbench_db")
run_userhub pgbench-migrate APP__DATABASE__URL="postgres://postgres@127.0.0.1:5432/$pgbench_db" migrate
say "pgbench_create: pgbench -c16 -j2 -T$secs -M prepared (the user+event statement)"
timeout $((secs + 60)) env PGSSLMODE=disable pgbench -h 127.0.0.1 -U postgres -n -c16 -j2 -T"$secs" -M prepared \
    -f "$root/scripts/bench/create_user.pgbench" "$pgbench_db" >"$work/pgbench.out" 2>&1 || {
    say "pgbench failed:"
    cat "$work/pgbench.out" >&2
    exit 1
}
python3 "$helper" pgbench "$results" pgbench_create "$work/pgbench.out"

start_userhub --measure services_start services "$port" "${services_env[@]}"
services_pid=$started_pid
uuid="$(create_user "$port")"
read_row services_get new "http://127.0.0.1:$port/api/users/$uuid" -H "Authorization: Bearer $token"
post_users services "$port" postgres "$pg_url" "$profiles"
half_load services "$port" postgres "$pg_url" "$profiles"
# The latency half of the POST goal: p99 at 0.6 × pgbench's tps (users of their own).
rate="$(python3 "$helper" scaled-rate "$results" pgbench_create 0.6)"
BENCH_RUN="${run_id}paced" BENCH_TOKEN="$token" BENCH_RATE="$rate" BENCH_THREADS=2 \
    run_wrk services_post_paced "$DURATION" "http://127.0.0.1:$port" \
    -s "$root/scripts/bench/post_users.lua"
python3 "$helper" put "$results" services_post_paced_target "$rate"
stop_started "$services_pid"

# --- consumer throughput: RabbitMQ → profile store, against the store's own ceiling ------
# One api,relay process (APP_ENV=production: PostgreSQL and RabbitMQ, and a MongoDB
# documents.url that it never opens) turns `userhub reenrich --all` into N messages in
# the work queue; then a worker-only process drains them into a fresh store.
n=$consumer_messages
consumer_db="userhub_bench_${run_id}_consumer"
createdb -h 127.0.0.1 -U postgres "$consumer_db"
pg_dbs+=("$consumer_db")
consumer_prefix="${amqp_prefix}consumer."
consumer_queue="${consumer_prefix}enrichment.users"
mkdir -p "$work/consumer"
consumer_env=(APP__DATABASE__URL="postgres://postgres@127.0.0.1:5432/$consumer_db?sslmode=disable"
    APP__DOCUMENTS__URL="mongodb://127.0.0.1:27017/userhub_bench_${run_id}_unused?directConnection=true"
    APP__CACHE__URL=redis://127.0.0.1:6379 APP__CACHE__KEY_PREFIX="${redis_prefix}consumer:"
    APP__BUS__URL="$amqp_url" APP__BUS__PREFIX="$consumer_prefix")
start_userhub consumer-relay "$(python3 "$helper" free-port)" "${consumer_env[@]}" USERHUB_ROLES=api,relay
relay_pid=$started_pid
say "consumer: inserting $n users into $consumer_db"
psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -U postgres -d "$consumer_db" -c "
    INSERT INTO users (uuid, name, email, email_key, name_key)
    SELECT gen_random_uuid(), 'Consumer User ' || i, 'consumer-$run_id-' || i || '@example.com',
           'consumer-$run_id-' || i || '@example.com', 'consumer user ' || i
      FROM generate_series(1, $n) AS i" >/dev/null

# queue_users: every user as a message in the (empty) work queue.
queue_users() {
    say "consumer: userhub reenrich --all; waiting for $n messages in $consumer_queue"
    run_userhub consumer-reenrich "${consumer_env[@]}" reenrich --all
    python3 "$helper" wait-queue "$consumer_queue" "$n" "$consumer_limit" || exit 1
}

# consume KEY NAME KIND WHERE [VAR=VALUE…]: a worker-only process drains the queue into
# its store (KIND sqlite: the file WHERE; mongo: the database URL WHERE; VAR=VALUE: its
# documents.url and more); records KEY, then stops it once every message is
# acknowledged.
consume() {
    local key=$1 name=$2 kind=$3 where=$4
    shift 4
    start_userhub "$name" "$(python3 "$helper" free-port)" "${consumer_env[@]}" USERHUB_ROLES=worker "$@"
    local worker_pid=$started_pid python=python3
    [ "$kind" = mongo ] && python="$mongo_python"
    if "$python" "$helper" wait-profiles "$results" "$key" "$kind" "$where" "$n" "$started_t0" "$consumer_limit"; then
        # The acknowledgements follow the writes.
        python3 "$helper" wait-queue "$consumer_queue" 0 30 || exit 1
        stop_started "$worker_pid"
    else
        say "$key: the worker did not write $n profiles within $consumer_limit s"
        python3 "$helper" put "$results" "${key}_skipped" "did not finish; see $name.log"
        stop_started "$worker_pid"
        # What it left would be counted as the next store's messages.
        timeout 30 rabbitmqctl -q purge_queue "$consumer_queue" >/dev/null
    fi
}

queue_users
# Production refuses a SQLite store when the roles are split across processes (see
# src/startup/adapters.rs refuse_traps): this one process runs in development mode, with
# production's settings where they matter (pool size, JSON logs at level warn).
say "consumer_sql: the worker runs WITHOUT APP_ENV=production (production refuses a SQLite store across processes)"
python3 "$helper" put "$results" note_consumer_sql "consumer throughput, SQLite store: the worker-only process ran without APP_ENV=production (refused there for a SQLite store when roles are split), with production's pool size and JSON logs at level warn"
consume consumer_sql consumer-sql sqlite "$work/consumer/profiles.db" \
    APP_ENV=development APP__DOCUMENTS__URL="sqlite://$work/consumer/profiles.db" \
    APP__DATABASE__MAX_CONNECTIONS=16 APP__LOG__FORMAT=json

say "consumer_sql_ceiling: $n upserts in a python3 sqlite3 loop, one transaction each"
ceiling_db="$work/consumer/ceiling.db"
run_userhub consumer-ceiling-migrate APP__DATABASE__URL="sqlite://$ceiling_db" \
    APP__DOCUMENTS__URL="sqlite://$ceiling_db" APP__BUS__URL=memory:// APP__CACHE__URL=memory:// migrate
python3 "$helper" sqlite-ceiling "$results" consumer_sql_ceiling "$root/src/enrichment/store.rs" \
    "$ceiling_db" "$n" "$ceiling_limit"

# mongo_python: a python3 that imports pymongo (test-services.sh's SecantusDB venv has
# one; else pip installs it, quietly).
find_mongo_python() {
    local python
    for python in python3 "$root/target/test-services/venv/bin/python"; do
        if "$python" -c 'import pymongo' >/dev/null 2>&1; then
            command -v "$python"
            return 0
        fi
    done
    say "installing pymongo (pip) for the MongoDB rows"
    python3 -m pip install --quiet --disable-pip-version-check pymongo >&2 || return 1
    command -v python3
}

if ! answers 27017; then
    say "consumer_mongo: nothing answers on 127.0.0.1:27017; skipping the MongoDB rows"
    python3 "$helper" put "$results" consumer_mongo_skipped "nothing answers on 127.0.0.1:27017"
elif ! mongo_python="$(find_mongo_python)"; then
    mongo_python=""
    say "consumer_mongo: no pymongo to be had; skipping the MongoDB rows"
    python3 "$helper" put "$results" consumer_mongo_skipped "pymongo could not be installed"
else
    consumer_mongo_db="userhub_bench_${run_id}_consumer"
    ceiling_mongo_db="userhub_bench_${run_id}_ceiling"
    mongo_dbs+=("userhub_bench_${run_id}_unused" "$consumer_mongo_db" "$ceiling_mongo_db" "${ceiling_mongo_db}_store")
    # Fewer messages than for SQLite: SecantusDB (Python) is slow, and slower the more
    # documents a collection holds (the store's conditional filter scans it).
    say "consumer: keeping $mongo_messages of the $n users for the MongoDB rows"
    psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -U postgres -d "$consumer_db" -c "
        DELETE FROM users WHERE uuid NOT IN (SELECT uuid FROM users ORDER BY uuid LIMIT $mongo_messages)" >/dev/null
    n=$mongo_messages
    queue_users
    # MongoDB, PostgreSQL and RabbitMQ: this worker runs with APP_ENV=production.
    consume consumer_mongo consumer-mongo mongo "mongodb://127.0.0.1:27017/$consumer_mongo_db?directConnection=true" \
        APP__DOCUMENTS__URL="mongodb://127.0.0.1:27017/$consumer_mongo_db?directConnection=true"
    say "consumer_mongo_ceiling: $n upserts in a pymongo loop"
    "$mongo_python" "$helper" mongo-ceiling "$results" consumer_mongo_ceiling \
        "mongodb://127.0.0.1:27017/$ceiling_mongo_db?directConnection=true" "$n" "$ceiling_limit" \
        || say "consumer_mongo_ceiling: the pymongo loop failed"
    # For comparison (not the goal's ceiling): the same loop with the store's own filter.
    say "consumer_mongo_ceiling_store: the same with the store's conditional filter"
    "$mongo_python" "$helper" mongo-ceiling "$results" consumer_mongo_ceiling_store \
        "mongodb://127.0.0.1:27017/${ceiling_mongo_db}_store?directConnection=true" "$n" "$ceiling_limit" store \
        || say "consumer_mongo_ceiling_store: the pymongo loop failed"
fi
stop_started "$relay_pid"

print_table
