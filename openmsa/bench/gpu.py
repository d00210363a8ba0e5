"""GPU benchmark of the MSA ops against dense cuDNN SDPA and FlexAttention.

Protocol (DEVELOPERS.md): CUDA events after warmup, median of many runs, inputs
rotated so that consecutive runs never hit the previous run's data in L2, the
baselines timed in the same process on the same card.
"""

from __future__ import annotations

import math
import statistics

import torch

from .cost_model import MSAConfig, selected_tokens

L2_BYTES = 50 << 20


def bench(fn_factory, sets: int, warmup: int = 3, runs: int = 10) -> dict:
    """fn_factory(i) -> a callable on input set i % sets. Times each call with CUDA events."""
    fns = [fn_factory(i) for i in range(sets)]
    for i in range(warmup):
        fns[i % sets]()
    torch.cuda.synchronize()
    times = []
    for i in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fns[i % sets]()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    med = statistics.median(times)
    return {"median_ms": med, "min_ms": min(times),
            "cv": statistics.pstdev(times) / statistics.mean(times) if runs > 1 else 0.0, "runs": runs}


def rotation(bytes_per_set: int) -> int:
    """Input sets needed so that reuse distance exceeds twice the L2."""
    return max(1, math.ceil(2 * L2_BYTES / max(1, bytes_per_set)) + 1)


SELECTIONS = ("uniform", "skewed")
SKEW_RUN = 256  # queries that share one pool of content blocks (per KV group)


def random_topk(n: int, cfg: MSAConfig, gen: torch.Generator, device,
                selection: str = "uniform") -> torch.Tensor:
    """Valid MSA indices for one causal sequence of n tokens without running an
    indexer: per (group, query) min(K-1, l) distinct earlier blocks, then the local block
    l, then -1.

    ``selection="uniform"``: the earlier blocks at random (random index scores select
    this way). ``"skewed"``: a synthetic of the selections of trained models, which are
    far from uniform: the sink block 0 and the two blocks before the local one in every
    row that has them, and the rest from content blocks that neighbouring queries share
    (a block's score is a draw per run of SKEW_RUN queries and group plus a per-query draw
    of a twentieth of its range), so most rows of a run select the same blocks."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    b, k = cfg.block_size, cfg.topk
    out = torch.full((cfg.num_kv_heads, n, k), -1, dtype=torch.int32, device=device)
    pos = torch.arange(n, device=device)
    local = pos // b
    nblk = (n + b - 1) // b
    blocks = torch.arange(nblk, device=device)
    rows = max(1, (256 << 20) // (4 * cfg.num_kv_heads * nblk))
    if selection == "skewed":
        rows = max(SKEW_RUN, rows // SKEW_RUN * SKEW_RUN)  # whole runs per chunk
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        loc = local[r0:r1]
        score = torch.rand((cfg.num_kv_heads, r1 - r0, nblk), generator=gen, device=device)
        if selection == "skewed":
            runs = -(-(r1 - r0) // SKEW_RUN)
            pool = torch.rand((cfg.num_kv_heads, runs, nblk), generator=gen, device=device)
            score = pool.repeat_interleave(SKEW_RUN, 1)[:, :r1 - r0] + 0.05 * score
            near = (blocks[None, :] == 0) | ((blocks[None, :] < loc[:, None])
                                             & (blocks[None, :] >= loc[:, None] - 2))
            score = score + 2.0 * near[None]
        score = score.masked_fill(blocks[None, None] >= loc[None, :, None], -1.0)
        w = min(k - 1, nblk)
        sel = torch.topk(score, w, dim=-1).indices if w > 0 else score[..., :0].long()
        nsel = loc.clamp(max=k - 1)
        slot = torch.arange(k, device=device)
        chosen = torch.full((cfg.num_kv_heads, r1 - r0, k), -1, dtype=torch.long, device=device)
        chosen[..., :w] = sel
        row = torch.where(slot < nsel[:, None], chosen, torch.where(slot == nsel[:, None], loc[:, None], -1))
        out[:, r0:r1] = row.to(torch.int32)
    return out


def flex_block_mask(n: int, cfg: MSAConfig, gen: torch.Generator, device):
    """A FlexAttention BlockMask with MSA's block budget per 128-query block: the
    causal diagonal block plus K-1 random earlier full blocks."""
    from torch.nn.attention.flex_attention import BlockMask

    b, k = cfg.block_size, cfg.topk
    nq = (n + b - 1) // b
    qb = torch.arange(nq, device=device)
    score = torch.rand((nq, nq), generator=gen, device=device)
    score = score.masked_fill(torch.arange(nq, device=device)[None] >= qb[:, None], -1.0)
    w = min(k - 1, nq)
    full_idx = torch.topk(score, w, dim=-1).indices.to(torch.int32) if w > 0 else \
        torch.zeros((nq, 1), dtype=torch.int32, device=device)
    full_num = qb.clamp(max=k - 1).to(torch.int32)
    # Pad kv_indices to nq columns as BlockMask expects.
    full = torch.zeros((nq, nq), dtype=torch.int32, device=device)
    full[:, :full_idx.shape[1]] = full_idx
    part = torch.zeros((nq, nq), dtype=torch.int32, device=device)
    part[:, 0] = qb.to(torch.int32)
    part_num = torch.ones(nq, dtype=torch.int32, device=device)

    def causal(bi, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return BlockMask.from_kv_blocks(part_num[None, None], part[None, None], full_num[None, None],
                                    full[None, None], BLOCK_SIZE=b, mask_mod=causal,
                                    seq_lengths=(n, n))


def flops(n: int, cfg: MSAConfig) -> dict:
    """Useful FLOPs of one causal sequence (visible pairs only)."""
    pairs = selected_tokens(n, cfg.block_size, cfg.topk)
    return {
        "sparse_fwd": 4 * cfg.num_heads * cfg.head_dim * pairs,
        "sparse_bwd": 10 * cfg.num_heads * cfg.head_dim * pairs,  # 5 GEMMs of the backward
        "index": 2 * cfg.num_kv_heads * cfg.index_head_dim * (n * (n + 1) // 2),
        "dense_fwd": 4 * cfg.num_heads * cfg.head_dim * (n * (n + 1) // 2),
        "dense_bwd": 10 * cfg.num_heads * cfg.head_dim * (n * (n + 1) // 2),
    }


def compiled_kernel_report(module) -> list[str]:
    """Registers, spills and shared memory of every Triton kernel of ``module``
    compiled in this process (one line per specialisation)."""
    lines = []
    for name in sorted(dir(module)):
        cache = getattr(getattr(module, name), "device_caches", None)
        if not cache:
            continue
        for dev_cache in cache.values():
            for compiled in dev_cache[0].values():
                md = compiled.metadata
                lines.append(f"{name}: regs {compiled.n_regs}, spills {compiled.n_spills}, "
                             f"shared {md.shared} B, warps {md.num_warps}, stages {md.num_stages}")
    return lines
