# shellcheck shell=bash
# Sourced by the container scripts: makes sure a Docker engine answers, and stops the
# one it started (only that one) when the sourcing script calls docker_engine_stop.
#
#   source scripts/docker-engine.sh
#   docker_engine_available || { echo "no Docker engine"; exit 0; }   # optional
#   docker_engine_ensure          # installs docker.io if needed, starts dockerd
#   trap docker_engine_stop EXIT  # (or call it from the script's own cleanup)
#
# The engine is started as the issue describes for this kind of machine:
# `dockerd --iptables=false --bridge=none`, so containers use `--network host`.

_docker_engine_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_docker_engine_state="$_docker_engine_root/target/docker-engine"
_docker_engine_pid=""

_docker_engine_say() {
    echo "docker-engine: $*" >&2
}

# True when a Docker engine answers on the default socket (or $DOCKER_HOST).
docker_engine_answers() {
    command -v docker >/dev/null 2>&1 && timeout 10 docker info >/dev/null 2>&1
}

# True when an engine answers, or one can be installed and started here (root, apt).
docker_engine_available() {
    docker_engine_answers && return 0
    command -v dockerd >/dev/null 2>&1 && return 0
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1
}

docker_engine_ensure() {
    if docker_engine_answers; then
        _docker_engine_say "an engine is already running; using it"
        return 0
    fi
    if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
        _docker_engine_say "installing docker.io (apt)"
        apt-get install -y -q docker.io >/dev/null 2>&1 ||
            { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q docker.io >/dev/null; }
    fi
    mkdir -p "$_docker_engine_state"
    local log="$_docker_engine_state/dockerd.log"
    dockerd --iptables=false --bridge=none >"$log" 2>&1 &
    _docker_engine_pid=$!
    local deadline=$((SECONDS + 60))
    until docker_engine_answers; do
        if ! kill -0 "$_docker_engine_pid" 2>/dev/null || ((SECONDS >= deadline)); then
            _docker_engine_say "dockerd did not come up within 60 s; end of $log:"
            tail -n 20 "$log" >&2
            _docker_engine_pid=""
            return 1
        fi
        sleep 0.3
    done
    _docker_engine_say "started dockerd (pid $_docker_engine_pid); log in $log"
}

# Stops the engine this shell started, if any; an engine found running is left alone.
docker_engine_stop() {
    [ -n "$_docker_engine_pid" ] || return 0
    local pid=$_docker_engine_pid
    _docker_engine_pid=""
    kill -TERM "$pid" 2>/dev/null || return 0
    local deadline=$((SECONDS + 30))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
        sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    _docker_engine_say "stopped dockerd (pid $pid)"
}
