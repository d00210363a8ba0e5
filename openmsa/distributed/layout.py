"""Zigzag layout of packed varlen sequences over ``world_size`` ranks.

Sequence b of length L is cut into 2W chunks (W = world_size) as evenly as integers
allow: chunk c holds the tokens [floor(c L / 2W), floor((c + 1) L / 2W)), so any length
works, including lengths not divisible by 2W and shorter than 2W (some chunks are then
empty). Rank r holds chunks r and 2W - 1 - r of every sequence, in sequence order and,
within a sequence, the early chunk first. The layout is planned on the host from
``cu_seqlens`` (one read, like a serving plan); the gathers run on the tensors' device.
"""

from __future__ import annotations

import torch

from .. import _validation as V


def _host_cu(cu_seqlens) -> list[int]:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D [num_seqs + 1], got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu}")
    return cu


def _check_rank(world_size, rank) -> tuple[int, int]:
    world_size = V.check_positive_int("world_size", world_size)
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) = [0, {world_size}), got {rank}")
    return world_size, rank


def shard_indices(cu_seqlens: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    """int64 [local_total]: the packed token indices rank ``rank`` holds, in its order."""
    cu = _host_cu(cu_seqlens)
    world_size, rank = _check_rank(world_size, rank)
    n = 2 * world_size
    parts = []
    for start, end in zip(cu, cu[1:]):
        length = end - start
        for c in (rank, n - 1 - rank):
            lo, hi = start + c * length // n, start + (c + 1) * length // n
            parts.append(torch.arange(lo, hi, dtype=torch.int64))
    out = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
    return out.to(cu_seqlens.device)


def shard(x: torch.Tensor, cu_seqlens: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    """This rank's tokens of the packed ``x`` [total, ...] (a copy, in the zigzag order)."""
    cu = _host_cu(cu_seqlens)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] != cu[-1]:
        raise ValueError(f"x must have cu_seqlens[-1] = {cu[-1]} rows, got shape {tuple(x.shape)}")
    return x.index_select(0, shard_indices(cu_seqlens, world_size, rank).to(x.device))


def unshard(parts, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Inverse of ``shard``: the packed [total, ...] tensor from every rank's shard
    (``parts[r]`` = rank r's, world_size = len(parts))."""
    cu = _host_cu(cu_seqlens)
    parts = list(parts)
    world_size = len(parts)
    if world_size < 1:
        raise ValueError("parts must hold one shard per rank, got none")
    idx = [shard_indices(cu_seqlens, world_size, r) for r in range(world_size)]
    for r, (p, i) in enumerate(zip(parts, idx)):
        if not isinstance(p, torch.Tensor) or p.dim() < 1 or p.shape[0] != i.numel():
            raise ValueError(f"parts[{r}] must have {i.numel()} rows (rank {r}'s shard), got "
                             f"{tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__}")
    cat = torch.cat(parts)
    out = torch.empty((cu[-1],) + tuple(cat.shape[1:]), dtype=cat.dtype, device=cat.device)
    out[torch.cat(idx).to(cat.device)] = cat
    return out
