#!/usr/bin/env bash
# Builds every image `make test-compose` runs, on a running engine (see engine.sh):
#   1. a Debian bookworm base from debootstrap (no registry is reachable here), once;
#   2. the stand-ins for PostgreSQL, Redis and MinIO (docker/standins/);
#   3. the project's image from Dockerfile.gpu on that base (BASE_IMAGE build argument).
# Docker's layer cache (under the engine's data root) makes a second run take seconds.
# Extra CA certificates for PyPI (/usr/local/share/ca-certificates/*.crt, as behind a
# TLS-inspecting proxy) go in as the BuildKit secret `extra_ca`, never into a layer.
set -euo pipefail
cd "$(dirname "$0")/../.."

BASE=${FE_BASE_IMAGE:-face-emotions-test/debian:bookworm}
APP_IMAGE=${APP_IMAGE:-face-emotions:compose-test}
WORK=${FE_DOCKER_DIR:-/var/cache/face-emotions/docker}
MIRROR=${FE_DEBIAN_MIRROR:-$(grep -hoE '^URIs: *http[^ ]+/debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | head -1 | sed 's/^URIs: *//')}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

# BuildKit (for the secret mount): the 20.10 CLI has it built in, newer CLIs need buildx.
if docker buildx version >/dev/null 2>&1; then
    BUILD=(docker build)
elif [[ -x /usr/bin/docker ]] && /usr/bin/docker version --format '{{.Client.Version}}' 2>/dev/null | grep -q '^20\.'; then
    BUILD=(/usr/bin/docker build)
else
    BUILD=(docker build)
fi
export DOCKER_BUILDKIT=1

step() { echo "== $(date +%T) $*"; }

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    step "base image $BASE: debootstrap bookworm from $MIRROR"
    rootfs=$(mktemp -d "$WORK/rootfs.XXXXXX")
    debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { echo "debootstrap failed (see $WORK/debootstrap.log)" >&2; exit 1; }
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" -c . | docker import -c 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
    rm -rf "$rootfs"
fi

secret=()
ca_bundle="$WORK/extra-ca.pem"
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cat /usr/local/share/ca-certificates/*.crt >"$ca_bundle"
    secret=(--secret "id=extra_ca,src=$ca_bundle")
fi

for standin in postgres redis s3; do
    step "stand-in image face-emotions-test/$standin"
    "${BUILD[@]}" --progress=plain --build-arg "BASE_IMAGE=$BASE" "${secret[@]}" \
        -t "face-emotions-test/$standin:latest" -f "docker/standins/$standin/Dockerfile" docker \
        >"$WORK/standin-$standin.log" 2>&1 \
        || { tail -30 "$WORK/standin-$standin.log" >&2; echo "stand-in $standin did not build" >&2; exit 1; }
done

step "project image $APP_IMAGE (Dockerfile.gpu on $BASE)"
build_log="$WORK/app-image-build.log"
if ! "${BUILD[@]}" --progress=plain --build-arg "BASE_IMAGE=$BASE" "${secret[@]}" \
    -t "$APP_IMAGE" -f Dockerfile.gpu . >"$build_log" 2>&1; then
    tail -40 "$build_log" >&2
    echo "the project image did not build (log: $build_log)" >&2
    exit 1
fi
grep -E '^#[0-9]+ \[|CACHED' "$build_log" | grep -vE '^#[0-9]+ \[internal\]' | head -40 || true
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^face-emotions' || true
step "images ready"
