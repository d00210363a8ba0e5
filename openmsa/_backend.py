"""Backend selection: "auto" | "triton" | "reference" (spec section 10).

"auto" picks the Triton kernels for CUDA tensors when the op has them and the
PyTorch reference otherwise. "triton" on CPU tensors runs the kernels under
Triton's interpreter (TRITON_INTERPRET=1). Ops register their Triton
implementation in ``TRITON_OPS`` when it lands.
"""

from __future__ import annotations

import torch

# op name -> callable; filled by the Triton kernel modules as they land.
TRITON_OPS: dict = {}


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
