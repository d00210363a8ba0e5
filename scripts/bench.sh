#!/usr/bin/env bash
# The main job: `openmsa bench` (cost model + timings; on a GPU the kernel benchmark).
source "$(dirname "$0")/env.sh"
exec "$PY" -m openmsa.bench.cli bench "$@"
