"""Shared test setup: every test starts from the same torch RNG state.

The markers ``slow`` and ``gpu`` are declared in pyproject.toml
([tool.pytest.ini_options]); nothing is registered here.

``OPENMSA_TEST_DOT_ORDER=perturbed`` makes Triton's interpreter sum each dot product in
an order that depends on the output element's row and column, as the vectorised matmul
kernels of some CPUs do (AVX-512: identical columns at different positions round
differently). The suite must pass either way: no test may depend on the CPU's float
rounding order.
"""

import os

import numpy as np
import pytest
import torch


def _perturb_interpreter_dot():
    # Triton fixes the interpreter switch when it is first imported (as the test modules
    # set it): set it the same way before the import below.
    os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
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


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
    yield
