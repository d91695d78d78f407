#!/usr/bin/env bash
# The user search at scale: seeds a PostgreSQL database of its own with N users
# (default 1,000,000), then measures, with pgbench, the exact statements userhub runs
# for `GET /api/users`:
#
#   - `q` for a rare term and for a term with no match (planned per term, as userhub
#     plans them: unnamed statements), and the same forced onto generic plans;
#   - keyset pages at increasing depths, on forced generic plans too;
#
# and the same searches end to end through `GET /api/users?q=…` of a userhub binary
# serving that database. Prints p50/p99 per case and drops the database at the end.
#
#   scripts/search-bench.sh [USERS]        (USERHUB_BIN=path/to/userhub to pick a binary)
#
# Needs the PostgreSQL of 127.0.0.1:5432 (user postgres, trust auth), psql, pgbench
# and python3. Talks to 127.0.0.1 only.
set -euo pipefail

users=${1:-1000000}
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin=${USERHUB_BIN:-}
if [ -z "$bin" ]; then
    for candidate in "$root/target/release/userhub" "$root/target/debug/userhub"; do
        if [ -x "$candidate" ]; then bin=$candidate; break; fi
    done
fi
[ -x "$bin" ] || { echo "no userhub binary: cargo build first (or set USERHUB_BIN)" >&2; exit 2; }

db="userhub_search_bench_$$"
admin="postgres://postgres@127.0.0.1:5432/postgres"
url="postgres://postgres@127.0.0.1:5432/$db"
work=$(mktemp -d)
server_pid=""
cleanup() {
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
    psql -q "$admin" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

say() { printf '%s\n' "$*" >&2; }

psql -q "$admin" -c "CREATE DATABASE $db" >/dev/null
APP_ENV=test APP__DATABASE__URL="$url" "$bin" migrate 2>/dev/null

say "seeding $users users…"
started=$SECONDS
psql -q "$url" <<SQL
-- Realistic shapes: 10,000 first/last name pairs, every e-mail at one of 5 domains,
-- UUIDv7s in creation order (the keyset).
WITH first(names) AS (SELECT array['Ada','Grace','Alan','Edsger','Barbara','Donald',
        'Ken','Dennis','Margaret','Frances','Niklaus','John','Tim','Linus','Guido',
        'Bjarne','James','Larry','Sophie','Radia','Hedy','Karen','Jean','Joan','Annie',
        'Katherine','Dorothy','Mary','Evelyn','Betty','Marlyn','Ruth','Kathleen','Adele',
        'Lynn','Anita','Shafi','Judea','Leslie','Robin','Tony','Peter','Butler','Ivan',
        'Fernando','Charles','Ole','Kristen','Andrew','Whitfield']),
     last(names) AS (SELECT array(SELECT 'Surname' || n || chr(97 + n % 26) || chr(97 + (n / 26) % 26)
                                   FROM generate_series(1, 200) n))
INSERT INTO users (uuid, name, email, email_key, name_key, created_at, updated_at)
SELECT (lpad(to_hex(1735689600000 + i), 12, '0') || '7' || substr(h, 1, 3) || '8'
        || substr(h, 4, 15))::uuid,
       f || ' ' || l,
       lower(f) || '.' || lower(l) || i || '@' || d,
       lower(lower(f) || '.' || lower(l) || i || '@' || d),
       lower(f || ' ' || l),
       now(), now()
  FROM generate_series(1, $users) i,
       LATERAL (SELECT md5(i::text) AS h,
                       (SELECT names FROM first)[1 + i % 50] AS f,
                       (SELECT names FROM last)[1 + (i / 50) % 200] AS l,
                       (array['example.com','example.org','mail.test','corp.test','uni.test'])[1 + i % 5] AS d) x;
-- A handful of users with a rare word, spread over the keyset.
UPDATE users SET name = 'Zyxquorp ' || name, name_key = 'zyxquorp ' || name_key
 WHERE uuid IN (SELECT uuid FROM users ORDER BY uuid OFFSET $users / 7 LIMIT 1)
    OR uuid IN (SELECT uuid FROM users ORDER BY uuid OFFSET $users / 2 LIMIT 1)
    OR uuid IN (SELECT uuid FROM users ORDER BY uuid DESC OFFSET 3 LIMIT 1);
ANALYZE users;
SQL
say "seeded in $((SECONDS - started)) s"

# Per-transaction latencies (microseconds, field 3 of pgbench's log) -> p50 p99 in ms.
percentiles() {
    sort -n | awk '{ v[NR] = $1 } END {
        p50 = v[int(NR * 0.50 + 0.5)]; p99 = v[int(NR * 0.99 + 0.5)];
        printf "p50 %6.2f ms   p99 %6.2f ms   (%d runs)\n", p50 / 1000, p99 / 1000, NR }'
}

# run NAME MODE PLAN SQL [-D var=value…]: 200 runs on one connection.
run() {
    local name=$1 mode=$2 plan=$3 sql=$4
    shift 4
    printf '%s\n' "$sql" >"$work/script.sql"
    rm -f "$work"/log*
    (cd "$work" && PGOPTIONS="-c plan_cache_mode=$plan" pgbench -n -c 1 -t 200 \
        -M "$mode" -f script.sql -l --log-prefix=log "$@" "$url" >/dev/null)
    printf '%-46s %-8s %-19s ' "$name" "$mode" "$plan"
    cat "$work"/log* | awk '{ print $3 }' | percentiles
}

search=$(cat <<'SQL'
SELECT uuid, name, email, created_at, updated_at, version FROM users
 WHERE (name_key LIKE :q ESCAPE '\' OR email_key LIKE :q ESCAPE '\')
 ORDER BY uuid DESC LIMIT 51;
SQL
)
page=$(cat <<'SQL'
SELECT uuid, name, email, created_at, updated_at, version FROM users
 WHERE uuid < :cursor ORDER BY uuid DESC LIMIT 51;
SQL
)

echo "== database: the statements of GET /api/users, $users users"
for term in zyxquorp qqqzzzxxx; do
    run "q=$term (as userhub runs it)" extended auto "$search" -D "q=%$term%"
    run "q=$term (forced generic plan)" prepared force_generic_plan "$search" -D "q=%$term%"
done
run "q=grace (a common term)" extended auto "$search" -D "q=%grace%"
for depth in 50 10000 $((users / 2)) $((users - 100)); do
    cursor=$(psql -qtA "$url" -c "SELECT uuid FROM users ORDER BY uuid DESC OFFSET $depth LIMIT 1")
    run "keyset page after $depth users" prepared force_generic_plan "$page" -D "cursor=$cursor"
done

echo "== end to end: GET /api/users through $(basename "$(dirname "$(dirname "$bin")")")/$(basename "$(dirname "$bin")")/userhub"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export APP_ENV=test APP__DATABASE__URL="$url" APP__DOCUMENTS__URL="sqlite://$work/docs.db" \
    APP__SERVER__PORT="$port" APP__RATE_LIMIT__ENABLED=false APP__LOG__LEVEL=warn
token=$("$bin" token --sub bench --role users:read 2>/dev/null)
"$bin" serve --roles api >"$work/server.log" 2>&1 &
server_pid=$!
python3 - "$port" "$token" <<'PY'
import json, sys, time, urllib.request
port, token = sys.argv[1], sys.argv[2]
base = f"http://127.0.0.1:{port}"
deadline = time.monotonic() + 30
while True:
    try:
        urllib.request.urlopen(base + "/health", timeout=1)
        break
    except Exception:
        if time.monotonic() > deadline:
            sys.exit("userhub did not start")
        time.sleep(0.1)
def measure(path, runs=200):
    times = []
    for _ in range(runs):
        request = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {token}"})
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=10) as response:
            body = json.load(response)
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return times[len(times) // 2], times[int(len(times) * 0.99) - 1], len(body)
for path in ["/api/users?q=zyxquorp", "/api/users?q=qqqzzzxxx", "/api/users?q=grace", "/api/users"]:
    p50, p99, found = measure(path)
    print(f"{path:<46} p50 {p50:6.2f} ms   p99 {p99:6.2f} ms   ({found} users on the page)")
PY
