"""Launcher of the Triton Index Branch kernel (docs/spec.md section 4; kernels.py).

Takes the packed, validated arguments of ``openmsa.indexer_topk`` and never reads
cu_seqlens values on the host: the per-sequence tile counts and their cumsum are torch
ops on the device, the grid is an upper bound, so the whole op is CUDA-graph capturable.
Extra memory: the outputs plus one int32 per sequence.
"""

from __future__ import annotations

import os

import torch
import triton

from .kernels import _indexer_topk_kernel
from .lse import index_lse_kv_outer

# Block max: a NaN-propagating tl.reduce (one max.NaN per element) when compiled; under
# the interpreter, whose custom-combine reductions run per element in Python, tl.max plus
# an explicit NaN count (same result). None = pick by mode; tests may force either.
NAN_MAX_REDUCE: bool | None = None

SUPPORTED_BLOCK_SIZES = (64, 128)
SUPPORTED_HEAD_DIMS = (64, 128, 256)
MAX_TOPK = 64

# ----------------------------------------------------------------------------- tuning
# (BLOCK_M, num_warps, num_stages) per index head dim Di, for 16-bit inputs. Untuned
# guesses until measured on an H100 (the benchmark may edit these dicts); the register
# and shared-memory figures below are from compiling for sm_90 with Triton 3.6.
# * BLOCK_M: query rows per program. Each key block a program streams costs
#   2*BLOCK_M*B*Di FLOPs for B*Di*2 bytes of ki, i.e. BLOCK_M FLOP/byte: at long context
#   the kernel is bound by ki traffic from L2 unless BLOCK_M is large, hence 128. Larger
#   tiles waste more of the causal triangle in the last tiles of short sequences.
# * num_warps: 8 warps (two warpgroups) for a 128-row tile hold the fp32 z tile
#   [128, B] and the int64 top-k state [128, KPAD] in ~155 registers, no spills.
# * num_stages: ki blocks in flight (cp.async pipeline of the long pass). Shared memory
#   = qi tile + stages ki blocks (B=128, Di=128: 32 KB + 3 x 32 KB = 128 KB); Di=256
#   uses a 64-row tile and 2 stages (164 KB).
TUNING = {
    64: (128, 8, 3),
    128: (128, 8, 3),
    256: (64, 8, 2),
}
# float32 inputs use an exact ("ieee") dot on CUDA cores: the tensor-core sized tiles
# above spill heavily there, so a small tile (not a production dtype; docs/spec.md section 10).
TUNING_FP32 = (32, 8, 2)
# topk > 32 (KPAD = 64 int64 slots per row): halve the tile to stay free of spills.
MAX_BLOCK_M_LARGE_TOPK = 64


def config(di: int, dtype: torch.dtype, topk: int):
    """(BLOCK_M, num_warps, num_stages) of one launch."""
    block_m, num_warps, num_stages = TUNING_FP32 if dtype == torch.float32 else TUNING[di]
    if topk - 1 > 32:
        block_m = min(block_m, MAX_BLOCK_M_LARGE_TOPK)
    return block_m, num_warps, num_stages


def index_lse_mode() -> str:
    """How the selected LSE is computed: "kv_outer" (lse.py: exactly the selected
    (row, block) pairs, independent of how the rows' selections overlap) or "union"
    (inside the indexer kernel: each query tile walks the union of its rows' blocks;
    cheap when neighbouring queries select alike, a second pass over most of the
    context when they do not)."""
    mode = os.environ.get("OPENMSA_INDEX_LSE", "auto")
    if mode not in ("auto", "kv_outer", "union"):
        raise ValueError(f"OPENMSA_INDEX_LSE must be 'auto', 'kv_outer' or 'union', got {mode!r}")
    return mode


# "auto": the KV-outer LSE pays a fixed ~1 ms for its schedule (H100, torch ops) and wins
# from 32K keys per sequence on (H100, bf16, random and correlated queries:
# benchmarks/results/h100/indexer_lse_modes.log: 8K 1.66 vs 0.50 ms, 32K 3.09 vs 3.78 ms,
# 128K 24.2 vs 51.5 ms, 1M 1295 vs 2251 ms).
_KV_OUTER_MIN_MEAN_KEYS = 16384


def resolve_lse_mode(mode: str, total_k: int, num_seqs: int) -> str:
    if mode != "auto":
        return mode
    return "kv_outer" if total_k > _KV_OUTER_MIN_MEAN_KEYS * max(num_seqs, 1) else "union"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check(qi, ki, block_size, topk):
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES} for the Triton "
                         f"indexer, got {block_size} (use backend='reference')")
    if qi.shape[2] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"qi must have index_head_dim in {SUPPORTED_HEAD_DIMS} for the Triton "
                         f"indexer, got {qi.shape[2]} (use backend='reference')")
    if qi.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"qi must be bfloat16, float16 or float32 for the Triton indexer, "
                        f"got {qi.dtype} (use backend='reference')")
    if not 1 <= topk <= MAX_TOPK:
        raise ValueError(f"topk must be in [1, {MAX_TOPK}] for the Triton indexer, got {topk}")


def indexer_topk_triton(qi, ki, varlen, *, block_size: int, topk: int, scale: float,
                        deterministic: bool, page_table=None, out=None, with_lse: bool = True):
    """qi [total_q, Hkv, Di], ki [total_k, 1, Di]; varlen: openmsa._validation.Varlen.

    Returns (topk_indices int32 [Hkv, total_q, topk], index_lse float32 [Hkv, total_q]).

    Serving (``openmsa.serving``): with ``page_table`` int32 [batch, max_pages], ki is the
    page pool [num_pages, block_size, Di] and varlen.cu_seqlens_k only gives each
    sequence's key count; ``out`` is a preallocated topk_indices buffer;
    ``with_lse=False`` skips the selected LSE (index_lse is then None).
    """
    _check(qi, ki, block_size, topk)
    total_q, hkv, di = qi.shape
    device = qi.device
    topk_indices = (torch.empty((hkv, total_q, topk), dtype=torch.int32, device=device)
                    if out is None else out)
    index_lse = torch.empty((hkv, total_q), dtype=torch.float32, device=device) if with_lse else None
    num_seqs = varlen.num_seqs
    if total_q == 0 or num_seqs == 0:
        return topk_indices, index_lse
    if qi.stride(2) != 1:
        qi = qi.contiguous()
    if ki.stride(-1) != 1:
        ki = ki.contiguous()
    paged = page_table is not None

    block_m, num_warps, num_stages = config(di, qi.dtype, topk)
    lse_mode = resolve_lse_mode(index_lse_mode(), ki.shape[0], varlen.num_seqs) if with_lse else None
    if paged and lse_mode == "kv_outer":
        lse_mode = "union"  # the KV-outer LSE pass reads packed keys
    cu_q, cu_k = varlen.cu_seqlens_q, varlen.cu_seqlens_k
    # tile_end[b] = sum_{b' <= b} cdiv(Lq_b', BLOCK_M), on the device (no host sync)
    tiles = torch.div(cu_q[1:] - cu_q[:-1] + (block_m - 1), block_m, rounding_mode="floor")
    tile_end = torch.cumsum(tiles, 0, dtype=torch.int32)
    max_tiles = triton.cdiv(total_q, block_m) + num_seqs  # >= sum of cdiv(Lq_b, BLOCK_M)
    kpad = max(2, triton.next_power_of_2(max(topk - 1, 1)))
    grid = (max_tiles * hkv,)
    _indexer_topk_kernel[grid](
        qi, ki, cu_q, cu_k, tile_end, topk_indices, index_lse if with_lse else topk_indices,
        page_table if paged else cu_q,
        float(scale), num_seqs, total_q, hkv,
        qi.stride(0), qi.stride(1), ki.stride(-2) if paged else ki.stride(0),
        topk_indices.stride(0), topk_indices.stride(1),
        ki.stride(0) if paged else 0, page_table.stride(0) if paged else 0,
        BLOCK_M=block_m, BLOCK_N=block_size, HEAD_DIM=di,
        TOPK=topk, KPAD=kpad, KOUT=triton.next_power_of_2(topk),
        SEARCH_ITERS=num_seqs.bit_length(), DETERMINISTIC=deterministic,
        DOT_PRECISION="ieee" if qi.dtype == torch.float32 else "tf32",
        NAN_MAX_REDUCE=NAN_MAX_REDUCE if NAN_MAX_REDUCE is not None else not _interpreting(),
        COMPUTE_LSE=lse_mode == "union", PAGED=paged,
        num_warps=num_warps, num_stages=num_stages,
    )
    if lse_mode == "kv_outer":
        index_lse = index_lse_kv_outer(qi, ki, topk_indices, varlen, block_size=block_size, scale=scale)
    return topk_indices, index_lse
