#!/usr/bin/env bash
# Writes the secret files docker-compose.yml mounts: random passwords, and the URLs that
# userhub reads from files (APP__*__URL_FILE), built from them. Existing files are kept,
# so running it again changes nothing; delete ./secrets/ to start over (and the volumes:
# the databases keep the passwords they were created with).
#
#   scripts/compose-secrets.sh [DIR]     (default: ./secrets beside docker-compose.yml)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${1:-$root/secrets}"
mkdir -p "$dir"
chmod 700 "$dir"

random() {
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'
}

# put NAME VALUE: writes $dir/NAME unless it exists. Readable by the containers' users
# (userhub runs as 65532); the folder itself is private.
put() {
    if [ ! -s "$dir/$1" ]; then
        (umask 022 && printf '%s\n' "$2" >"$dir/$1")
        echo "compose-secrets: wrote $dir/$1" >&2
    fi
}

value() {
    tr -d '\n' <"$dir/$1"
}

for name in postgres_password mongo_password redis_password rabbitmq_password grafana_admin_password; do
    put "$name" "$(random)"
done
put userhub_hs256_secret "$(random)$(random)"
put userhub_database_url "postgres://userhub:$(value postgres_password)@postgres:5432/userhub"
put userhub_documents_url "mongodb://userhub:$(value mongo_password)@mongo:27017/userhub?authSource=admin"
put userhub_cache_url "redis://:$(value redis_password)@redis:6379/0"
put userhub_bus_url "amqp://userhub:$(value rabbitmq_password)@rabbitmq:5672/%2f"
