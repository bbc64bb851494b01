#!/bin/sh
# The official image runs redis-server without protected mode (its containers are reached over
# the compose network, not loopback).
set -eu
if [ "${1:-}" = redis-server ]; then
    shift
    exec redis-server --protected-mode no --dir /data "$@"
fi
exec "$@"
