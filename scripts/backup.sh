#!/usr/bin/env bash
# Backs up userhub's users database (users, outbox, bus queue and dead letters), the
# source of truth; the document store is derived from it (docs/operations.md).
#
#   scripts/backup.sh postgres://USER[:PASSWORD]@HOST:PORT/DATABASE  FILE.dump
#   scripts/backup.sh sqlite:///data/userhub.db                      FILE.db
#
# PostgreSQL: `pg_dump --format=custom` (compressed, consistent: one snapshot), which
#   pg_restore reads selectively; the server keeps serving. pg_dump's major version must
#   be at least the server's (PG_DUMP=/usr/lib/postgresql/17/bin/pg_dump to choose one).
# SQLite: SQLite's online backup (`.backup`, or Python's sqlite3 backup API when the
#   sqlite3 shell is missing): a consistent copy while userhub keeps writing, then
#   `PRAGMA integrity_check` on the copy.
#
# Both write FILE atomically (FILE.partial, then renamed) and FILE.sha256 beside it.
# Exit status 0 only when the backup is complete and readable.
set -euo pipefail

usage() {
    echo "usage: $0 DATABASE_URL FILE   (postgres://… or sqlite://PATH)" >&2
    exit 2
}
[ $# -eq 2 ] || usage
url=$1
file=$2

say() {
    echo "backup: $*" >&2
}

partial="$file.partial"
trap 'rm -f "$partial"' EXIT
mkdir -p "$(dirname "$file")"

started=$SECONDS
case "$url" in
    postgres://* | postgresql://*)
        pg_dump="${PG_DUMP:-pg_dump}"
        "$pg_dump" --format=custom --compress=6 --no-owner --no-privileges \
            --file="$partial" --dbname="$url"
        # A dump pg_restore cannot list is no backup.
        tables="$(pg_restore --list "$partial" | grep -c ' TABLE DATA ' || true)"
        say "pg_dump: $tables tables' data"
        ;;
    sqlite://*)
        path="${url#sqlite://}"
        path="${path%%\?*}"
        [ -f "$path" ] || { say "no SQLite database at $path"; exit 1; }
        if command -v sqlite3 >/dev/null 2>&1; then
            sqlite3 "$path" ".timeout 10000" ".backup '$partial'"
        else
            python3 - "$path" "$partial" <<'EOF'
import sqlite3, sys
source = sqlite3.connect(sys.argv[1], timeout=10)
target = sqlite3.connect(sys.argv[2])
with target:
    source.backup(target)
target.close()
source.close()
EOF
        fi
        check="$(python3 -c 'import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute("PRAGMA integrity_check").fetchone()[0])' "$partial")"
        [ "$check" = ok ] || { say "integrity_check of the copy: $check"; exit 1; }
        ;;
    *)
        usage
        ;;
esac

mv "$partial" "$file"
(cd "$(dirname "$file")" && sha256sum "$(basename "$file")" >"$(basename "$file").sha256")
say "wrote $file ($(stat -c %s "$file") bytes) in $((SECONDS - started)) s"
