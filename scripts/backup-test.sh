#!/usr/bin/env bash
# Backup and restore test, for both users databases userhub runs on:
#
#   PostgreSQL  a database of its own; users created through the running server; backup
#               (pg_dump -Fc) while it serves; the database dropped; restore; every user
#               read back through a server started on the restored database, and the
#               rows compared with the ones before.
#   SQLite      the same with a database file; the backup is taken online, while the
#               server runs; the file deleted; restore; every user read back.
#
# Uses the userhub binary of target/debug (built when missing; USERHUB_BIN to choose
# another) and this machine's PostgreSQL on 127.0.0.1:5432 (user postgres). Everything it
# made is removed at the end. Prints "backup-test: N passed, N failed".
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
users_per_database=${USERHUB_BACKUP_TEST_USERS:-25}
run_id="bt$$$(printf '%04x' $((RANDOM)))"
work="$(mktemp -d "${TMPDIR:-/tmp}/userhub-backup-test.XXXXXX")"
pg_admin_url="postgres://postgres@127.0.0.1:5432/postgres"
pg_database=""
server_pid=""
passed=0
failed=0

say() {
    echo "backup-test: $*" >&2
}

stop_server() {
    [ -n "$server_pid" ] || return 0
    local pid=$server_pid deadline=$((SECONDS + 40))
    server_pid=""
    kill -TERM "$pid" 2>/dev/null || return 0
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$?
    set +e
    stop_server
    if [ -n "$pg_database" ]; then
        psql "$pg_admin_url" -q -c "DROP DATABASE IF EXISTS \"$pg_database\" WITH (FORCE)" >/dev/null 2>&1
    fi
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

bin="${USERHUB_BIN:-$root/target/debug/userhub}"
if [ ! -x "$bin" ]; then
    say "building $bin"
    cargo build --locked --bin userhub >&2
fi
if ! command -v pg_dump >/dev/null 2>&1 || ! command -v pg_restore >/dev/null 2>&1; then
    say "installing postgresql-client (apt)"
    apt-get install -y -q postgresql-client >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q postgresql-client >/dev/null; }
fi

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_server DATABASE_URL LOG: a userhub with the embedded bus, cache and (SQLite)
# document store, on a free port; waits until /health/ready answers 200.
start_server() {
    port="$(free_port)"
    APP_ENV=local APP_CONFIG_DIR="$root/config" \
        APP__SERVER__PORT="$port" \
        APP__DATABASE__URL="$1" \
        APP__DOCUMENTS__URL="sqlite://$work/documents-$run_id.db" \
        APP__BUS__URL=memory:// APP__CACHE__URL=memory:// \
        APP__LOG__FORMAT=json \
        "$bin" serve >"$2" 2>&1 &
    server_pid=$!
    local deadline=$((SECONDS + 60))
    until curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$port/health/ready" 2>/dev/null; do
        kill -0 "$server_pid" 2>/dev/null || { tail -n 20 "$2" >&2; return 1; }
        ((SECONDS < deadline)) || { say "server not ready within 60 s"; tail -n 20 "$2" >&2; return 1; }
        sleep 0.2
    done
    token="$(APP_ENV=local APP_CONFIG_DIR="$root/config" "$bin" token --sub backup-test --role admin)"
}

# create_users N FILE: creates N users through the API; writes "uuid<TAB>email" lines.
create_users() {
    local i body status
    : >"$2"
    for ((i = 1; i <= $1; i++)); do
        body="$(curl -sS --max-time 5 -w '\n%{http_code}' -X POST "http://127.0.0.1:$port/api/users" \
            -H "Authorization: Bearer $token" -H 'content-type: application/json' \
            --data "{\"name\":\"Zoë Backup $i\",\"email\":\"user$i.$run_id@example.com\"}")"
        status="${body##*$'\n'}"
        [ "$status" = 201 ] || { say "POST /api/users answered $status: ${body%$'\n'*}"; return 1; }
        python3 -c 'import json, sys; d = json.load(sys.stdin); print(d["uuid"] + "\t" + d["email"])' \
            <<<"${body%$'\n'*}" >>"$2"
    done
}

# check_users FILE: every user of FILE answers 200 with its e-mail.
check_users() {
    local uuid email body status missing=0
    while IFS=$'\t' read -r uuid email; do
        body="$(curl -sS --max-time 5 -w '\n%{http_code}' -H "Authorization: Bearer $token" \
            "http://127.0.0.1:$port/api/users/$uuid")"
        status="${body##*$'\n'}"
        if [ "$status" != 200 ] || ! grep -qF "\"email\":\"$email\"" <<<"${body%$'\n'*}"; then
            say "user $uuid <$email>: $status ${body%$'\n'*}"
            missing=$((missing + 1))
        fi
    done <"$1"
    [ "$missing" = 0 ] || { say "$missing of $(wc -l <"$1") users not found after the restore"; return 1; }
}

result() {
    if [ "$2" = 0 ]; then
        passed=$((passed + 1))
        echo "backup-test: ok: $1"
    else
        failed=$((failed + 1))
        echo "backup-test: FAILED: $1"
    fi
}

# --- PostgreSQL ---------------------------------------------------------------------------
postgres_case() {
    pg_database="userhub_$run_id"
    local url="postgres://postgres@127.0.0.1:5432/$pg_database"
    local query="SELECT uuid, name, email, created_at, updated_at FROM users ORDER BY uuid"
    psql "$pg_admin_url" -q -v ON_ERROR_STOP=1 -c "CREATE DATABASE \"$pg_database\"" >/dev/null
    start_server "$url" "$work/pg-server-1.log"
    create_users "$users_per_database" "$work/pg-users.tsv"
    say "postgres: created $(wc -l <"$work/pg-users.tsv") users in $pg_database"
    psql "$url" -qAt -c "$query" >"$work/pg-rows-before.txt"
    scripts/backup.sh "$url" "$work/backup/userhub.dump" # online: the server still runs
    stop_server
    psql "$pg_admin_url" -q -v ON_ERROR_STOP=1 -c "DROP DATABASE \"$pg_database\" WITH (FORCE)" >/dev/null
    say "postgres: dropped $pg_database"
    scripts/restore.sh "$work/backup/userhub.dump" "$url"
    psql "$url" -qAt -c "$query" >"$work/pg-rows-after.txt"
    cmp -s "$work/pg-rows-before.txt" "$work/pg-rows-after.txt" ||
        { say "postgres: rows differ after the restore"; diff "$work/pg-rows-before.txt" "$work/pg-rows-after.txt" | head >&2; return 1; }
    start_server "$url" "$work/pg-server-2.log"
    check_users "$work/pg-users.tsv"
    say "postgres: all $(wc -l <"$work/pg-users.tsv") users read back through the API"
    stop_server
}

# --- SQLite ---------------------------------------------------------------------------------
sqlite_case() {
    local db="$work/data/userhub.db"
    local url="sqlite://$db"
    mkdir -p "$work/data"
    start_server "$url" "$work/sqlite-server-1.log"
    create_users "$users_per_database" "$work/sqlite-users.tsv"
    say "sqlite: created $(wc -l <"$work/sqlite-users.tsv") users in $db"
    scripts/backup.sh "$url" "$work/backup/userhub.db" # online: the server still runs
    stop_server
    rm -f "$db" "$db-wal" "$db-shm"
    say "sqlite: deleted $db"
    scripts/restore.sh "$work/backup/userhub.db" "$url"
    start_server "$url" "$work/sqlite-server-2.log"
    check_users "$work/sqlite-users.tsv"
    say "sqlite: all $(wc -l <"$work/sqlite-users.tsv") users read back through the API"
    stop_server
}

# Each case runs in a process of its own (`set -e` holds there, and its trap cleans up).
case "${1:-}" in
    --case)
        "${2}_case"
        exit 0
        ;;
    "") ;;
    *)
        echo "usage: $0" >&2
        exit 2
        ;;
esac

if psql "$pg_admin_url" -qAt -c 'select 1' >/dev/null 2>&1; then
    status=0
    "$0" --case postgres || status=$?
    result "PostgreSQL: online backup, drop, restore, every user back" "$status"
elif [ -n "${CI:-}" ]; then
    result "PostgreSQL: no server answers on 127.0.0.1:5432" 1
else
    echo "backup-test: SKIPPED: PostgreSQL: no server answers on 127.0.0.1:5432"
fi

status=0
"$0" --case sqlite || status=$?
result "SQLite: online backup, delete, restore, every user back" "$status"

echo "backup-test: $passed passed, $failed failed"
[ "$failed" = 0 ]
