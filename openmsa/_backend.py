"""Loading the Triton kernels (docs/spec.md section 10).

Which implementation of an op runs (the PyTorch reference or the Triton kernels, from
``backend="auto" | "triton" | "reference"``) is decided in ``openmsa.library``, which
registers the ops; this module only loads a kernel module's launcher for it. "triton"
on CPU tensors runs the kernels under Triton's interpreter (TRITON_INTERPRET=1).

Kernel modules are imported lazily, on the first call of their op: Triton decides
at decoration time whether a kernel is compiled or interpreted, so the interpreter
switch must be set before that import (see ``_load``).
"""

from __future__ import annotations

import importlib
import os

import torch


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_kernel_mode: str | None = None  # "interpreted" or "compiled", fixed by the first load


def _load(path: str, device: torch.device):
    """The function at ``path`` ("module:function"), its module imported now (the first
    load on CPU tensors turns Triton's interpreter on)."""
    global _kernel_mode
    if _kernel_mode is None:
        if device.type == "cpu" and not _interpreting():
            os.environ["TRITON_INTERPRET"] = "1"
        _kernel_mode = "interpreted" if _interpreting() else "compiled"
    if device.type == "cpu" and _kernel_mode == "compiled":
        raise RuntimeError(
            "backend='triton' on CPU tensors needs Triton's interpreter, but this process "
            "already compiled the kernels for a GPU; set TRITON_INTERPRET=1 before the first call")
    module_name, fn = path.split(":")
    return getattr(importlib.import_module(module_name), fn)
