#!/usr/bin/env bash
# `make test-compose`: the real compose stack on a real Docker engine, end to end.
#   1. a Docker engine (engine.sh: the running one, or Debian's docker.io installed and started);
#   2. the images (images.sh: local Debian base, stand-ins for the third-party services, the
#      project's image from Dockerfile.gpu), cached by the engine between runs;
#   3. tests/compose/ (pytest): train, promote, scale, kill a worker, add a worker host;
#   4. the engine stopped again if this run started it (the projects are `down -v` by the test).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}

started=$(date +%s)
exports=$(scripts/compose_stack/engine.sh start)
eval "$exports"
trap 'scripts/compose_stack/engine.sh stop' EXIT

scripts/compose_stack/images.sh
echo "== images ready after $(( $(date +%s) - started )) s"

FE_COMPOSE_STACK=1 APP_IMAGE=${APP_IMAGE:-face-emotions:compose-test} \
    "$PY" -m pytest tests/compose -p no:cacheprovider -s -v -o addopts="" "$@"
echo "== make test-compose passed in $(( $(date +%s) - started )) s"
