"""Shared test setup: every test starts from the same torch RNG state.

Tests are grouped like the package (ops/, serving/, api/, layers/, integrations/, ...);
``helpers.py`` and ``brute_force.py`` here are importable from all of them (pyproject.toml
puts tests/ on the path). The marker ``gpu`` is declared in pyproject.toml; such tests are
skipped where there is no CUDA device.

``OPENMSA_TEST_DOT_ORDER=perturbed`` makes Triton's interpreter sum each dot product in
an order that depends on the output element's row and column, as the vectorised matmul
kernels of some CPUs do (AVX-512: identical columns at different positions round
differently). The suite must pass either way: no test may depend on the CPU's float
rounding order.
"""

import contextlib
import os

import numpy as np
import pytest
import torch


# Triton's kernels run compiled on a GPU, under the interpreter elsewhere. Triton fixes
# the switch when it is first imported, and pytest imports this file before any test.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")


def _perturb_interpreter_dot():
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    plain = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        out = plain(self, a, b, d, input_precision, max_num_imprecise_acc)
        x, y = np.asarray(a.data), np.asarray(b.data)
        n_k = x.shape[-1]
        if n_k < 2 or x.dtype.kind != "f" or out.data.dtype.kind != "f":
            return out
        acc = out.data.dtype
        h = n_k // 3 + 1
        # The same sum in another association: (first third) + (the rest), then + d.
        split = (np.matmul(x[..., :h], y[..., :h, :], dtype=acc)
                 + np.matmul(x[..., h:], y[..., h:, :], dtype=acc)) + d.data
        rows = np.arange(out.data.shape[-2])[:, None]
        cols = np.arange(out.data.shape[-1])[None, :]
        return interpreter.TensorHandle(np.where((rows + cols) % 2 == 1, split, out.data).astype(acc),
                                        out.dtype)

    builder.create_dot = create_dot


if os.environ.get("OPENMSA_TEST_DOT_ORDER") == "perturbed":
    _perturb_interpreter_dot()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped where there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    """The tests' tensors are small: intra-op threads only add overhead, and on a shared CPU
    OpenMP spin-waiting makes small ops ~100x slower. One thread per test process."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def launch():
    """``launch(name, **fields)``: change launch settings (openmsa.ops.utils.configs) for
    the rest of the test, e.g. small tiles or several query chunks at small shapes."""
    from openmsa.ops.utils.configs import override
    with contextlib.ExitStack() as stack:
        yield lambda name, **fields: stack.enter_context(override(name, **fields))
