#!/usr/bin/env bash
# The test suite (CPU: PyTorch reference + Triton kernels under the interpreter).
source "$(dirname "$0")/env.sh"
exec "$PY" -m pytest -q "$@"
