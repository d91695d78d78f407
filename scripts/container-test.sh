#!/usr/bin/env bash
# The container test: builds the image and runs it as a user would.
#
#   1. single container (SQLite on a named volume): create a user, read the enriched
#      profile, check the process runs as non-root, SIGTERM -> exit 0 within the
#      shutdown timeout; a new container on the same volume reads the user back;
#   2. the two userhub services of docker-compose.yml (`migrate` one-shot, an `api,relay`
#      container and two `worker` containers) against this machine's PostgreSQL, Redis
#      and RabbitMQ (and MongoDB when USERHUB_TEST_MONGO_URL is set, as
#      scripts/test-services.sh does; else the workers and the api share an SQLite
#      document store on a volume), each with names of its own: a database, a bus prefix
#      and a cache prefix, all removed at the end;
#   3. prints the image size and fails above 40 MB.
#
# Run it under scripts/test-services.sh to have MongoDB too:
#   scripts/test-services.sh scripts/container-test.sh
#
# Without a Docker engine (none answers and none can be installed and started), the test
# is skipped with a message, unless CI is set: then it fails.
#
# Base images: local stand-ins from scripts/base-images.sh, unless BUILDER_IMAGE and
# RUNTIME_IMAGE are set (USERHUB_UPSTREAM_IMAGES=1 builds from the Dockerfile's defaults).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=scripts/docker-engine.sh
source "$root/scripts/docker-engine.sh"

# How readiness is checked: `probe` runs `userhub probe --path /health/ready` inside the
# container (no shell or curl in the image), and the image's HEALTHCHECK must then report
# "healthy"; `curl` asks from the host instead.
readiness_check="${USERHUB_READINESS_CHECK:-probe}"

image="${USERHUB_TEST_IMAGE:-userhub-local/userhub:container-test}"
max_image_bytes=$((40 * 1000 * 1000))
shutdown_timeout_secs=30 # server.shutdown_timeout_secs (config/default.toml)
run_id="ct$$$(printf '%04x' $((RANDOM)))"

say() {
    echo "container-test: $*" >&2
}
fail() {
    echo "container-test: FAIL: $*" >&2
    exit 1
}

# --- what to undo on exit -------------------------------------------------------------
containers=()
volumes=()
pg_database=""
bus_prefix=""
cache_prefix=""

cleanup() {
    local status=$?
    set +e
    local c v
    for c in "${containers[@]}"; do
        if [ "$status" -ne 0 ] && docker container inspect "$c" >/dev/null 2>&1; then
            say "last log lines of $c:"
            docker logs --tail 15 "$c" 2>&1 | sed 's/^/    /' >&2
        fi
        docker rm -f -v "$c" >/dev/null 2>&1 # -v: its anonymous /data volume too
    done
    for v in "${volumes[@]}"; do
        docker volume rm -f "$v" >/dev/null 2>&1
    done
    if [ -n "$pg_database" ]; then
        psql -h 127.0.0.1 -U postgres -q -c "DROP DATABASE IF EXISTS \"$pg_database\" WITH (FORCE)" >/dev/null 2>&1
    fi
    if [ -n "$bus_prefix" ]; then
        delete_bus_topology "$bus_prefix"
    fi
    if [ -n "$cache_prefix" ]; then
        redis-cli -h 127.0.0.1 -p 6379 --scan --pattern "${cache_prefix}*" 2>/dev/null |
            xargs -r redis-cli -h 127.0.0.1 -p 6379 del >/dev/null 2>&1
    fi
    if [ -n "${mongo_database:-}" ] && [ -x "$root/target/test-services/venv/bin/python" ]; then
        "$root/target/test-services/venv/bin/python" - "$USERHUB_TEST_MONGO_URL" "$mongo_database" <<'EOF' >/dev/null 2>&1
import sys
try:
    import pymongo
    pymongo.MongoClient(sys.argv[1], serverSelectionTimeoutMS=3000).drop_database(sys.argv[2])
except Exception:
    pass
EOF
    fi
    docker_engine_stop
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Queues and exchanges whose names start with $1 (rabbitmqctl has no delete_exchange;
# `eval` reaches the broker's own function). rabbitmqctl reads stdin: give it none, or it
# eats the names the loop reads.
delete_bus_topology() {
    local prefix=$1 name
    command -v rabbitmqctl >/dev/null 2>&1 || return 0
    rabbitmqctl list_queues -q --no-table-headers name 2>/dev/null | grep -F "$prefix" |
        while read -r name; do
            [[ $name == "$prefix"* ]] && rabbitmqctl delete_queue "$name" </dev/null >/dev/null 2>&1
        done
    rabbitmqctl list_exchanges -q --no-table-headers name 2>/dev/null | grep -F "$prefix" |
        while read -r name; do
            [[ $name == "$prefix"* ]] && rabbitmqctl eval \
                "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"$name\">>), false, <<\"container-test\">>)." \
                </dev/null >/dev/null 2>&1
        done
    return 0
}

# --- helpers ----------------------------------------------------------------------------
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ready CONTAINER PORT: true when the instance answers 200 on /health/ready.
ready() {
    case "$readiness_check" in
        curl) curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$2/health/ready" 2>/dev/null ;;
        probe) docker exec "$1" /usr/local/bin/userhub probe --path /health/ready >/dev/null 2>&1 ;;
    esac
}

# wait_ready CONTAINER PORT SECONDS
wait_ready() {
    local deadline=$((SECONDS + $3))
    until ready "$1" "$2"; do
        if [ "$(docker inspect -f '{{ .State.Running }}' "$1" 2>/dev/null)" != true ]; then
            fail "$1 stopped before it was ready"
        fi
        ((SECONDS < deadline)) || fail "$1 not ready on port $2 within $3 s"
        sleep 0.2
    done
}

# http METHOD URL [BODY]: prints the body, then the status on its own last line.
http() {
    local args=(-sS --max-time 5 -X "$1" -H "Authorization: Bearer $token" -w '\n%{http_code}')
    [ $# -ge 3 ] && args+=(-H 'content-type: application/json' --data "$3")
    curl "${args[@]}" "$2"
}

# create_user PORT NAME EMAIL: prints the new user's uuid.
create_user() {
    local out status body
    out="$(http POST "http://127.0.0.1:$1/api/users" "{\"name\":\"$2\",\"email\":\"$3\"}")"
    status="${out##*$'\n'}"
    body="${out%$'\n'*}"
    [ "$status" = 201 ] || fail "POST /api/users answered $status: $body"
    python3 -c 'import json, sys; print(json.load(sys.stdin)["uuid"])' <<<"$body"
}

# expect_status PORT PATH STATUS SECONDS [JSON-CHECK]: polls until PATH answers STATUS.
# JSON-CHECK is a Python expression on `d`, the decoded body, that must be true.
expect_status() {
    local port=$1 path=$2 want=$3 deadline=$((SECONDS + $4)) check=${5:-True} out status body
    while :; do
        out="$(http GET "http://127.0.0.1:$port$path" || true)"
        status="${out##*$'\n'}"
        body="${out%$'\n'*}"
        if [ "$status" = "$want" ]; then
            python3 -c "import json, sys; d = json.load(sys.stdin); sys.exit(0 if ($check) else 1)" <<<"$body" ||
                fail "GET $path: unexpected body $body"
            echo "$body"
            return 0
        fi
        ((SECONDS < deadline)) || fail "GET $path answered $status (wanted $want) for $4 s: $body"
        sleep 0.2
    done
}

# stop_and_check CONTAINER: SIGTERM, then exit code 0 within the shutdown timeout.
stop_and_check() {
    local c=$1 started code
    started=$(date +%s.%N)
    docker kill --signal TERM "$c" >/dev/null
    code="$(timeout $((shutdown_timeout_secs + 5)) docker wait "$c")" ||
        fail "$c still running $((shutdown_timeout_secs + 5)) s after SIGTERM"
    local took
    took=$(python3 -c "print(f'{$(date +%s.%N) - $started:.2f}')")
    [ "$code" = 0 ] || fail "$c exited $code after SIGTERM (wanted 0)"
    say "ok: $c exited 0 ${took} s after SIGTERM (limit ${shutdown_timeout_secs} s)"
}

# runs_as_non_root CONTAINER: the uid of the container's main process, seen from the host.
check_non_root() {
    local c=$1 pid uid user
    user="$(docker inspect -f '{{ .Config.User }}' "$c")"
    pid="$(docker inspect -f '{{ .State.Pid }}' "$c")"
    uid="$(awk '/^Uid:/ { print $2 }' "/proc/$pid/status")"
    [ "$uid" != 0 ] || fail "$c runs as root"
    say "ok: $c runs as uid $uid (image user $user)"
}

# --- the engine -------------------------------------------------------------------------
if ! docker_engine_available; then
    if [ -n "${CI:-}" ]; then
        fail "no Docker engine here, and CI is set"
    fi
    echo "container-test: SKIPPED: no Docker engine answers and none can be installed here (set CI=1 to make this a failure)"
    exit 0
fi
docker_engine_ensure || fail "could not start a Docker engine"

# --- build ------------------------------------------------------------------------------
if [ "${USERHUB_UPSTREAM_IMAGES:-}" = 1 ]; then
    build_args=()
    say "building from the Dockerfile's default base images"
else
    if [ -z "${BUILDER_IMAGE:-}" ] || [ -z "${RUNTIME_IMAGE:-}" ]; then
        eval "$("$root/scripts/base-images.sh")"
    fi
    build_args=(--build-arg "BUILDER_IMAGE=$BUILDER_IMAGE" --build-arg "RUNTIME_IMAGE=$RUNTIME_IMAGE")
    say "base images: $BUILDER_IMAGE, $RUNTIME_IMAGE"
fi
mkdir -p target/container-test
build_log=target/container-test/docker-build.log
build_started=$SECONDS
# The builder stage gets a tag of its own, so that its layers (the dependency cache) are
# never dangling; older copies are pruned below.
if ! DOCKER_BUILDKIT=0 docker build --force-rm --network host "${build_args[@]}" \
    --target builder -t userhub-local/userhub-builder:cache . >"$build_log" 2>&1 ||
    ! DOCKER_BUILDKIT=0 docker build --force-rm --network host "${build_args[@]}" -t "$image" . >>"$build_log" 2>&1; then
    tail -n 40 "$build_log" >&2
    fail "docker build failed (log in $build_log)"
fi
build_secs=$((SECONDS - build_started))
docker image prune -f --filter label=org.userhub.stage=builder >/dev/null 2>&1 || true
docker image prune -f --filter label=org.opencontainers.image.title=userhub >/dev/null 2>&1 || true
image_bytes="$(docker image inspect -f '{{ .Size }}' "$image")"
image_mb="$(python3 -c "print(f'{$image_bytes / 1e6:.1f}')")"
say "built $image in ${build_secs} s (log in $build_log)"
echo "container-test: image $image: $image_bytes bytes ($image_mb MB)"
((image_bytes < max_image_bytes)) || fail "image is $image_mb MB, over 40 MB"

secret="$(head -c 48 /dev/urandom | base64 | tr -d '\n')"

# --- 1. one container, SQLite on a volume -------------------------------------------------
volume="userhub-$run_id"
volumes+=("$volume")
port="$(free_port)"
run_single() {
    local name=$1
    containers+=("$name")
    docker run -d --name "$name" --network host -v "$volume:/data" \
        -e APP__SERVER__PORT="$port" -e APP__AUTH__HS256_SECRET="$secret" "$image" >/dev/null
}

say "1. single container on port $port, volume $volume"
run_single "userhub-$run_id-a"
wait_ready "userhub-$run_id-a" "$port" 60
say "ok: ready"
check_non_root "userhub-$run_id-a"
token="$(docker exec "userhub-$run_id-a" /usr/local/bin/userhub token --sub container-test --role admin)"
uuid="$(create_user "$port" "João Silva" "joao.$run_id@example.com")"
say "ok: created user $uuid"
expect_status "$port" "/users/enriched/$uuid" 200 30 \
    "d['uuid'] == '$uuid' and d['linkedin'] == 'linkedin.com/in/joaosilva' and d['github'] == 'github.com/joaosilva'" >/dev/null
say "ok: enriched profile read (linkedin.com/in/joaosilva)"
health="$(docker inspect -f '{{ if .State.Health }}{{ .State.Health.Status }}{{ else }}none{{ end }}' "userhub-$run_id-a")"
say "docker health status: $health"
if [ "$readiness_check" = probe ]; then
    deadline=$((SECONDS + 60))
    until [ "$(docker inspect -f '{{ .State.Health.Status }}' "userhub-$run_id-a")" = healthy ]; do
        ((SECONDS < deadline)) || fail "HEALTHCHECK never reported healthy"
        sleep 0.5
    done
    say "ok: HEALTHCHECK reports healthy"
fi
stop_and_check "userhub-$run_id-a"

say "restarting: a new container on the same volume"
run_single "userhub-$run_id-b"
wait_ready "userhub-$run_id-b" "$port" 60
expect_status "$port" "/api/users/$uuid" 200 10 "d['email'] == 'joao.$run_id@example.com'" >/dev/null
expect_status "$port" "/users/enriched/$uuid" 200 10 "d['github'] == 'github.com/joaosilva'" >/dev/null
say "ok: user and enriched profile read back after the restart"
check_non_root "userhub-$run_id-b"
stop_and_check "userhub-$run_id-b"

# --- 2. the compose services against the machine's services -------------------------------
pg_url_base="${USERHUB_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
amqp_url="${USERHUB_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
redis_url="${USERHUB_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
if ! psql -h 127.0.0.1 -U postgres -qAt -c 'select 1' >/dev/null 2>&1 ||
    ! timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/5672' 2>/dev/null; then
    [ -z "${CI:-}" ] || fail "PostgreSQL or RabbitMQ does not answer on 127.0.0.1"
    echo "container-test: SKIPPED part 2: PostgreSQL or RabbitMQ does not answer on 127.0.0.1"
else
    pg_database="userhub_$run_id"
    psql -h 127.0.0.1 -U postgres -q -c "CREATE DATABASE \"$pg_database\"" >/dev/null
    database_url="${pg_url_base%/*}/$pg_database"
    bus_prefix="$run_id."
    cache_prefix="$run_id:"
    if [ -n "${USERHUB_TEST_MONGO_URL:-}" ]; then
        mongo_database="userhub_$run_id"
        # mongodb://host:port/?opts -> mongodb://host:port/DATABASE?opts
        documents_url="$(python3 -c '
import sys, urllib.parse as u
p = u.urlsplit(sys.argv[1]); print(u.urlunsplit(p._replace(path="/" + sys.argv[2])))' \
            "$USERHUB_TEST_MONGO_URL" "$mongo_database")"
        documents_mounts=()
    else
        # On /data: a new named volume takes the image's /data, owned by user 65532.
        documents_url="sqlite:///data/userhub-documents.db"
        volumes+=("userhub-$run_id-documents")
        documents_mounts=(-v "userhub-$run_id-documents:/data")
        say "no USERHUB_TEST_MONGO_URL: api and workers share an SQLite document store on a volume"
    fi
    stack_env=(
        -e APP__DATABASE__URL="$database_url"
        -e APP__DATABASE__MIGRATE_ON_START=false
        -e APP__DOCUMENTS__URL="$documents_url"
        -e APP__CACHE__URL="$redis_url"
        -e APP__CACHE__KEY_PREFIX="$cache_prefix"
        -e APP__BUS__URL="$amqp_url"
        -e APP__BUS__PREFIX="$bus_prefix"
        -e APP__AUTH__HS256_SECRET="$secret"
    )
    say "2. compose services: database $pg_database, documents $documents_url, bus prefix $bus_prefix"

    # migrate: the one-shot of docker-compose.yml.
    containers+=("userhub-$run_id-migrate")
    docker run --name "userhub-$run_id-migrate" --network host "${stack_env[@]}" "$image" migrate \
        >"target/container-test/migrate.log" 2>&1 || fail "userhub migrate failed: $(tail -n 5 target/container-test/migrate.log)"
    say "ok: migrate exited 0"
    if [ "${#documents_mounts[@]}" -gt 0 ]; then
        # `userhub migrate` migrates database.url only, and with migrate_on_start=false
        # nothing creates an SQLite document store's table: migrate that file as well.
        docker run --rm --network host "${stack_env[@]}" "${documents_mounts[@]}" \
            -e APP__DATABASE__URL="$documents_url" "$image" migrate >>"target/container-test/migrate.log" 2>&1 ||
            fail "userhub migrate of the SQLite document store failed"
    fi

    api_port="$(free_port)"
    containers+=("userhub-$run_id-api")
    docker run -d --name "userhub-$run_id-api" --network host "${stack_env[@]}" "${documents_mounts[@]}" \
        -e APP__SERVER__PORT="$api_port" "$image" serve --roles api,relay >/dev/null
    worker_ports=()
    for i in 1 2; do
        worker_ports+=("$(free_port)")
        containers+=("userhub-$run_id-worker-$i")
        docker run -d --name "userhub-$run_id-worker-$i" --network host "${stack_env[@]}" "${documents_mounts[@]}" \
            -e APP__SERVER__PORT="${worker_ports[-1]}" "$image" serve --roles worker >/dev/null
    done
    wait_ready "userhub-$run_id-api" "$api_port" 60
    wait_ready "userhub-$run_id-worker-1" "${worker_ports[0]}" 60
    wait_ready "userhub-$run_id-worker-2" "${worker_ports[1]}" 60
    say "ok: api,relay on $api_port and two workers on ${worker_ports[*]} are ready"

    token="$(docker exec "userhub-$run_id-api" /usr/local/bin/userhub token --sub container-test --role admin)"
    uuids=()
    for i in 1 2 3 4; do
        uuids+=("$(create_user "$api_port" "Ada Lovelace $i" "ada$i.$run_id@example.com")")
    done
    for u in "${uuids[@]}"; do
        expect_status "$api_port" "/users/enriched/$u" 200 60 "d['uuid'] == '$u' and d['github'].startswith('github.com/adalovelace')" >/dev/null
    done
    say "ok: ${#uuids[@]} users created through api,relay were enriched by the workers (PostgreSQL, RabbitMQ, Redis, documents ${documents_url%%:*})"
    # The rows are really in this run's PostgreSQL database.
    rows="$(psql -h 127.0.0.1 -U postgres -d "$pg_database" -qAt -c 'select count(*) from users')"
    [ "$rows" = "${#uuids[@]}" ] || fail "PostgreSQL has $rows users, wanted ${#uuids[@]}"
    say "ok: PostgreSQL database $pg_database holds the $rows users"

    check_non_root "userhub-$run_id-api"
    stop_and_check "userhub-$run_id-api"
    stop_and_check "userhub-$run_id-worker-1"
    stop_and_check "userhub-$run_id-worker-2"
fi

echo "container-test: image $image: $image_mb MB; build ${build_secs} s"
echo "container-test: passed"
