"""FP8 (E4M3) quantization shared by the Index Branch kernels (prefill, training and the
serving pools): one float32 scale per vector, ``x ~= x_fp8 * scale``.

The Index Branch ranks blocks by the block max of index scores: a factor per key token
changes the ranking, so the kernels multiply each score column by its key's scale before
the block max; a positive factor per query row cannot, so it may enter after the block
max (the prefill kernel) or not at all (the decode scan). Selections are exact for the
dequantized values.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 value


CHUNK_VECTORS = 1 << 20  # vectors quantized per step: bounds the float32 temporaries


def quantize_fp8_per_token(x: torch.Tensor, *, finite_payload: bool = False):
    """``x [..., Di]`` -> ``(x_fp8 [..., Di] float8_e4m3fn, scale [...] float32)`` with
    ``x ~= x_fp8 * scale[..., None]``, scale = amax over the last dim / 448 (1 for a zero
    row). No host synchronisation; the float32 temporaries hold at most ``CHUNK_VECTORS``
    vectors at a time (1M tokens of 4 index heads: 4 steps).

    Non-finite inputs stay non-finite: by default a NaN entry stays NaN in ``x_fp8`` and a
    vector with an infinite entry gets an infinite scale (it dequantizes to NaN). With
    ``finite_payload`` a vector with any non-finite entry gets scale NaN and a zero
    payload instead, so the FP8 values a kernel multiplies are always finite (an E4M3 NaN
    is not NaN to every FP8 dot: Triton's interpreter reads it as 480) and the NaN
    reaches the result through the scale."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError("x must be a floating-point tensor with at least one dimension")
    flat = x.reshape(-1, x.shape[-1])
    x_fp8 = torch.empty(flat.shape, dtype=FP8, device=x.device)
    scale = torch.empty(flat.shape[0], dtype=torch.float32, device=x.device)
    for r0 in range(0, flat.shape[0], CHUNK_VECTORS):
        rows = slice(r0, r0 + CHUNK_VECTORS)
        xf = flat[rows].float()
        amax = xf.abs().amax(-1)
        sc = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        if finite_payload:
            bad = ~torch.isfinite(amax)
            sc = torch.where(bad, float("nan"), sc)
            xf = torch.where(bad[:, None], 0.0, xf / torch.where(bad, 1.0, sc)[:, None])
        else:
            xf = xf / sc[:, None]
        x_fp8[rows] = xf
        scale[rows] = sc
    return x_fp8.view(x.shape), scale.view(x.shape[:-1])


def dequantize_fp8(x_fp8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``x_fp8 * scale[..., None]``: the values an FP8 path computes with."""
    return x_fp8.float() * scale[..., None]
