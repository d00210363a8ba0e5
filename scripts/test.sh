#!/usr/bin/env bash
# The test suite (CPU: PyTorch reference + Triton kernels under the interpreter), spread
# over one pytest-xdist worker per CPU core when xdist is installed (each worker runs
# torch on one thread: tests/conftest.py).
source "$(dirname "$0")/env.sh"
if "$PY" -c "import xdist" 2>/dev/null; then
    exec "$PY" -m pytest -q -n "$(nproc)" --dist worksteal "$@"
fi
exec "$PY" -m pytest -q "$@"
