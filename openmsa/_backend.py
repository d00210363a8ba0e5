"""Backend selection: "auto" | "triton" | "reference" (docs/spec.md section 10).

"auto" picks the Triton kernels for CUDA tensors when the op has them and the
PyTorch reference otherwise. "triton" on CPU tensors runs the kernels under
Triton's interpreter (TRITON_INTERPRET=1).

Kernel modules are imported lazily, on the first call of their op: Triton decides
at decoration time whether a kernel is compiled or interpreted, so the interpreter
switch must be set before that import (see ``_load``).
"""

from __future__ import annotations

import importlib
import os

import torch

# op name -> "module:function" of its Triton launcher. The launcher takes the packed,
# validated arguments (see api.py) and returns what the public function returns.
_TRITON_IMPLS = {
    "indexer_topk": "openmsa.ops.indexer.triton_impl:indexer_topk_triton",
    "sparse_attention": "openmsa.ops.attention.triton_impl:sparse_attention_triton",
    "dense_attention": "openmsa.ops.attention.triton_impl:dense_attention_triton",
    "indexer_kl_loss": "openmsa.ops.kl.triton_impl:indexer_kl_loss_triton",
}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_kernel_mode: str | None = None  # "interpreted" or "compiled", fixed by the first load


def _load(path: str, device: torch.device):
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


# Outputs that have the inputs' floating dtype (the rest are float32 / int32 by contract).
_OUTPUTS_LIKE_INPUTS = {"sparse_attention": (0,), "dense_attention": (0,)}


def _upcast_bf16(x):
    return x.float() if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 else x


def _lazy(op: str, path: str):
    def run(*args, **kwargs):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        fn = _load(path, device)
        if device.type == "cpu" and any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16
                                        for a in (*args, *kwargs.values())):
            # Triton's interpreter computes bfloat16 dots wrongly; bfloat16 -> float32 is
            # exact, so the interpreter runs the float32 kernels and casts the outputs back
            # (the casts are differentiable: gradients come back in bfloat16).
            out = fn(*map(_upcast_bf16, args), **{k: _upcast_bf16(v) for k, v in kwargs.items()})
            if op in _OUTPUTS_LIKE_INPUTS:
                out = tuple(o.to(torch.bfloat16) if i in _OUTPUTS_LIKE_INPUTS[op] else o
                            for i, o in enumerate(out))
            return out
        return fn(*args, **kwargs)
    run.__name__ = f"{op}_triton"
    return run


# op name -> callable; the tests may replace it.
TRITON_OPS: dict = {op: _lazy(op, path) for op, path in _TRITON_IMPLS.items()}


def resolve(op: str, backend: str, device: torch.device) -> str:
    """"triton" or "reference". Never raises: an explicit "triton" whose kernels are
    missing raises in ``triton_op``, after the arguments have been validated."""
    if backend == "auto":
        return "triton" if device.type == "cuda" and op in TRITON_OPS else "reference"
    return backend


def triton_op(op: str):
    if op not in TRITON_OPS:
        raise NotImplementedError(
            f"the Triton backend of {op} is not implemented yet; "
            f"use backend='reference' (or 'auto', which falls back to it)"
        )
    return TRITON_OPS[op]
