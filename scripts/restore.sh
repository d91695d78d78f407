#!/usr/bin/env bash
# Restores a backup made by scripts/backup.sh into the users database.
#
#   scripts/restore.sh FILE.dump postgres://USER[:PASSWORD]@HOST:PORT/DATABASE
#   scripts/restore.sh FILE.db   sqlite:///data/userhub.db
#   … --force   replace a database that already holds tables
#
# Stop every userhub process that uses the database first (api, relay, workers).
# The checksum beside the backup (FILE.sha256) is verified when present.
#
# PostgreSQL: creates DATABASE when it does not exist (connecting to the server's
#   `postgres` database), then `pg_restore` in one transaction, stopping at the first
#   error; with --force, existing objects are dropped first (--clean --if-exists).
# SQLite: copies the backup into place (the old file, if any, is kept as PATH.before-restore
#   with --force), after `PRAGMA integrity_check` on the backup.
#
# Then start userhub: its migrations bring an older backup up to the current schema, and
# `userhub reenrich --all` (planned) rebuilds the document store from the users.
set -euo pipefail

usage() {
    echo "usage: $0 BACKUP_FILE DATABASE_URL [--force]" >&2
    exit 2
}
[ $# -ge 2 ] && [ $# -le 3 ] || usage
file=$1
url=$2
force=false
if [ $# -eq 3 ]; then
    [ "$3" = --force ] || usage
    force=true
fi

say() {
    echo "restore: $*" >&2
}

[ -f "$file" ] || { say "no backup file $file"; exit 1; }
if [ -f "$file.sha256" ]; then
    (cd "$(dirname "$file")" && sha256sum --quiet -c "$(basename "$file").sha256") ||
        { say "checksum mismatch: $file is not the file backup.sh wrote"; exit 1; }
fi

started=$SECONDS
case "$url" in
    postgres://* | postgresql://*)
        # postgres://…/DATABASE?params -> DATABASE, and the same URL for the `postgres` database
        database="$(python3 -c 'import sys, urllib.parse as u; print(u.unquote(u.urlsplit(sys.argv[1]).path.lstrip("/")))' "$url")"
        admin_url="$(python3 -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(u.urlunsplit(p._replace(path="/postgres")))' "$url")"
        [ -n "$database" ] || { say "the URL names no database"; exit 1; }
        exists="$(psql "$admin_url" -qAt -v ON_ERROR_STOP=1 \
            -c "SELECT 1 FROM pg_database WHERE datname = '${database//\'/\'\'}'")"
        if [ "$exists" != 1 ]; then
            say "creating database $database"
            psql "$admin_url" -q -v ON_ERROR_STOP=1 -c "CREATE DATABASE \"${database//\"/\"\"}\"" >/dev/null
            clean=()
        else
            tables="$(psql "$url" -qAt -c "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")"
            if [ "$tables" != 0 ] && ! $force; then
                say "database $database already holds $tables tables; restore into an empty one, or pass --force to replace them"
                exit 1
            fi
            clean=(--clean --if-exists)
        fi
        pg_restore --no-owner --no-privileges --exit-on-error --single-transaction \
            "${clean[@]}" --dbname="$url" "$file"
        users="$(psql "$url" -qAt -c 'SELECT count(*) FROM users')"
        say "restored $database: $users users"
        ;;
    sqlite://*)
        path="${url#sqlite://}"
        path="${path%%\?*}"
        check="$(python3 -c 'import sqlite3, sys; print(sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True).execute("PRAGMA integrity_check").fetchone()[0])' "$file")"
        [ "$check" = ok ] || { say "integrity_check of the backup: $check"; exit 1; }
        if [ -e "$path" ]; then
            $force || { say "$path exists; pass --force to replace it"; exit 1; }
            mv "$path" "$path.before-restore"
            [ ! -e "$path-wal" ] || mv "$path-wal" "$path.before-restore-wal"
            say "kept the old database as $path.before-restore"
        fi
        # A WAL or shared-memory file of the old database must not be applied to the new one.
        rm -f "$path-wal" "$path-shm" "$path-journal"
        mkdir -p "$(dirname "$path")"
        cp "$file" "$path.restoring"
        # Owned like its folder (in a container volume: userhub's user, 65532).
        [ "$(id -u)" != 0 ] || chown --reference="$(dirname "$path")" "$path.restoring"
        mv "$path.restoring" "$path"
        users="$(python3 -c 'import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute("SELECT count(*) FROM users").fetchone()[0])' "$path")"
        say "restored $path: $users users"
        ;;
    *)
        usage
        ;;
esac
say "done in $((SECONDS - started)) s"
