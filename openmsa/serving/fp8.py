"""FP8 (E4M3) helpers for the serving pools (the scale contract of
``MSADecodeWrapper.run``).

* Index keys: one float32 scale per token, ``ki = ki_fp8 * ki_scale``. Per-token scales
  keep keys of very different norms accurate; the decode scan multiplies each score column
  by its token's scale after the FP8 dot product, which keeps the block ranking exact for
  the dequantized keys.
* K, V pages: one scale per tensor and layer (``k = k_fp8 * k_scale``), as vLLM's FP8 KV
  cache; calibrate it offline (e.g. amax / 448 over a calibration set).
"""

from __future__ import annotations

import torch

from ..ops.utils.fp8 import FP8, FP8_MAX, quantize_fp8_per_token  # noqa: F401  (the serving API)


def append_index_scales(ki_scale: torch.Tensor, scales: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write the per-token scales of new index keys (``quantize_fp8_per_token``) at their
    slots of ``ki_scale [num_pages, B]`` (the slots of ``openmsa.serving.slot_mapping``; all
    must be >= 0 here). Graph-safe (one index_copy_)."""
    if ki_scale.dtype != torch.float32 or ki_scale.dim() != 2:
        raise ValueError(f"ki_scale must be float32 [num_pages, B], got {ki_scale.dtype} {tuple(ki_scale.shape)}")
    if scales.shape != slot_mapping.shape:
        raise ValueError(f"scales must have one value per slot, got {tuple(scales.shape)} and "
                         f"{tuple(slot_mapping.shape)}")
    if slot_mapping.device.type == "cpu" and bool((slot_mapping < 0).any()):
        raise ValueError("slot_mapping: append_index_scales needs slots >= 0")
    ki_scale.view(-1).index_copy_(0, slot_mapping.long(), scales.float())
