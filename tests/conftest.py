"""Shared test setup: every test starts from the same torch RNG state.

The markers ``slow`` and ``gpu`` are declared in pyproject.toml
([tool.pytest.ini_options]); nothing is registered here.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
    yield
