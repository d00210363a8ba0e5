"""Rotary position embedding (NeoX half-split layout), full or partial.

Only the first ``rotary_dim`` channels of each head rotate; the rest pass through
(partial RoPE). The same function serves q, k and the index branch's qi, ki, as
docs/spec.md section 7 asks.
"""

from __future__ import annotations

import torch


def rope_cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float, dtype=torch.float32):
    """cos, sin of shape [*positions.shape, rotary_dim // 2] in float32."""
    inv_freq = theta ** (-torch.arange(0, rotary_dim, 2, device=positions.device,
                                       dtype=torch.float32) / rotary_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; cos/sin [T, R/2]. Rotates x[..., :R] in float32, keeps x's dtype."""
    half = cos.shape[-1]
    if half == 0:
        return x
    rot, rest = x[..., : 2 * half].float(), x[..., 2 * half:]
    x1, x2 = rot[..., :half], rot[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out
