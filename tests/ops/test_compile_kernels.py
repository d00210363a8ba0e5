"""Every Triton kernel the ops launch compiles for a Hopper GPU (sm_90), checked on the
CPU: the interpreter tests run kernel bodies as Python, which accepts code the GPU
compiler rejects (a module global that is not a tl.constexpr, for one). See
tests/compile_kernels.py; it runs in its own process because the kernels must be imported
compiled, not interpreted."""

import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "compile_kernels.py")


def test_every_launched_kernel_compiles_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, SCRIPT, "--arch", "90"], capture_output=True, text=True,
                          env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert "compiled" in proc.stdout.splitlines()[-1]
