# Sourced by scripts/bench.sh and scripts/test.sh: picks the Python that runs openmsa
# and installs what it needs, so that each command works on a fresh machine.
#  - A machine whose python3 already has torch with CUDA (the GPU machines, which have
#    no network) uses that Python as it is, with this checkout on PYTHONPATH.
#  - Anything else gets ./.venv (created once): torch 2.13.0 (CPU), triton 3.6.0,
#    numpy < 2.3 (triton 3.6's interpreter breaks on numpy >= 2.4), openmsa[test] and,
#    where the index has it, pytest-xdist (scripts/test.sh then uses every core).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ "${OPENMSA_SYSTEM_PYTHON:-}" = 1 ] || python3 -c "import torch, triton, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    PY=python3
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
    VENV="${OPENMSA_VENV:-$ROOT/.venv}"
    STAMP="$VENV/.openmsa-setup-v5"
    if [ ! -f "$STAMP" ]; then
        echo "setting up $VENV (torch 2.13.0 CPU, triton 3.6.0, numpy<2.3, openmsa[test])" >&2
        python3 -m venv "$VENV"
        "$VENV/bin/python" -m pip install -q --upgrade pip >&2 2>/dev/null || true
        "$VENV/bin/python" -m pip install -q "torch==2.13.0" "triton==3.6.0" "numpy<2.3" >&2
        "$VENV/bin/python" -m pip install -q -e ".[test]" >&2
        # parallel tests where the package index has it; the suite runs without it too
        "$VENV/bin/python" -m pip install -q "pytest-xdist>=3.5" >&2 || true
        touch "$STAMP"
    fi
    PY="$VENV/bin/python"
fi
