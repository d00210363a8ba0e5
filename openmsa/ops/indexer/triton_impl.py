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

from ..utils.configs import launch_config
from ..utils.fp8 import FP8, quantize_fp8_per_token
from ..utils.shapes import check_kernel_shapes
from .kernels import _indexer_topk_kernel
from .lse import index_lse_kv_outer

# Block max: a NaN-propagating tl.reduce when compiled; under the interpreter, whose
# custom-combine reductions run per element in Python, tl.max plus an explicit NaN count
# (same result). None = pick by mode; tests may force either.
NAN_MAX_REDUCE: bool | None = None


def config(di: int, dtype: torch.dtype, nsel: int, device=None, *, two_programs: bool = False):
    """(BLOCK_M, num_warps, num_stages) of one launch with ``nsel`` ranked slots per row
    (``configs.Indexer``); ``dtype``: the dtype the kernel's dots take; ``two_programs``:
    the settings for two programs per SM (with ``register_cap``)."""
    cfg = launch_config("indexer", device)
    if dtype == FP8:
        block_m, num_warps, num_stages = cfg.fp8_tiles[di]
    elif dtype == torch.float32:
        block_m, num_warps, num_stages = cfg.float32_tile
    elif two_programs and di in cfg.two_program_tiles:
        block_m, num_warps, num_stages = cfg.two_program_tiles[di]
    else:
        block_m, num_warps, num_stages = cfg.tiles[di]
    if nsel > 32:
        block_m = min(block_m, cfg.large_topk_rows)
    return block_m, num_warps, num_stages


def register_cap(di: int, dtype: torch.dtype, device=None, *, two_programs: bool) -> int:
    """maxnreg of one launch (0: the compiler's choice, ``configs.Indexer``)."""
    cfg = launch_config("indexer", device)
    if not two_programs or dtype == torch.float32:
        return 0
    if dtype == FP8:
        return cfg.fp8_maxnreg
    return cfg.maxnreg if di in cfg.two_program_tiles else 0


def lse_mode(total_k: int, num_seqs: int, device=None) -> str:
    """Where the selected LSE is computed ("union" or "kv_outer", ``configs.Indexer``)."""
    cfg = launch_config("indexer", device)
    if cfg.lse_mode != "auto":
        return cfg.lse_mode
    return "kv_outer" if total_k > cfg.kv_outer_min_mean_keys * max(num_seqs, 1) else "union"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def indexer_topk_triton(qi, ki, varlen, *, block_size: int, topk: int, scale: float,
                        deterministic: bool, page_table=None, out=None, with_lse: bool = True,
                        init_blocks: int = 0, local_blocks: int = 1, fp8: bool = False):
    """qi [total_q, Hkv, Di], ki [total_k, 1, Di]; varlen: openmsa._validation.Varlen.

    Returns (topk_indices int32 [Hkv, total_q, topk], index_lse float32 [Hkv, total_q]).

    Serving (``openmsa.serving``): with ``page_table`` int32 [batch, max_pages], ki is the
    page pool [num_pages, block_size, Di] and varlen.cu_seqlens_k only gives each
    sequence's key count; ``out`` is a preallocated topk_indices buffer;
    ``with_lse=False`` skips the selected LSE (index_lse is then None). ``init_blocks``,
    ``local_blocks``: the forced blocks (docs/spec.md section 4; at most topk together).
    ``fp8``: rank the E4M3 quantization of qi (per row) and ki (per token) with an FP8 MMA
    (``kernels.py``); index_lse still comes from the unquantized qi, ki.
    """
    check_kernel_shapes("indexer_topk", "indexer", block_size=block_size, qi=qi, topk=topk)
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
    if fp8 and paged:
        raise NotImplementedError("indexer_topk_triton: fp8 ranks packed index keys, not a page pool")
    qi_lse, ki_lse = qi, ki
    qi_scale = ki_scale = None
    if fp8:  # contiguous: the kernel reads both copies with one set of strides
        qi_lse, ki_lse = qi.contiguous(), ki.contiguous()
        qi, qi_scale = quantize_fp8_per_token(qi_lse, finite_payload=True)  # [total_q, Hkv]
        ki, ki_scale = quantize_fp8_per_token(ki_lse, finite_payload=True)
        ki_scale = ki_scale.reshape(-1)

    nsel = topk - init_blocks - local_blocks  # ranked slots per row
    mode = lse_mode(ki.shape[0], varlen.num_seqs, device) if with_lse else None
    if paged and mode == "kv_outer":
        mode = "union"  # the KV-outer LSE pass reads packed keys
    # two programs per SM where measured: packed keys, no LSE pass in the kernel
    two = not paged and mode != "union"
    block_m, num_warps, num_stages = config(di, qi.dtype, nsel, device, two_programs=two)
    cap = register_cap(di, qi.dtype, device, two_programs=two)
    cu_q, cu_k = varlen.cu_seqlens_q, varlen.cu_seqlens_k
    fragments = varlen.kv_start is not None
    # tile_end[b] = sum_{b' <= b} cdiv(Lq_b', BLOCK_M), on the device (no host sync)
    tiles = torch.div(cu_q[1:] - cu_q[:-1] + (block_m - 1), block_m, rounding_mode="floor")
    tile_end = torch.cumsum(tiles, 0, dtype=torch.int32)
    max_tiles = triton.cdiv(total_q, block_m) + num_seqs  # >= sum of cdiv(Lq_b, BLOCK_M)
    kpad = max(2, triton.next_power_of_2(max(nsel, 1)))
    grid = (max_tiles * hkv,)
    _indexer_topk_kernel[grid](
        qi, ki, qi_scale if fp8 else cu_q, ki_scale if fp8 else cu_q, qi_lse, ki_lse,
        cu_q, cu_q if fragments else cu_k, varlen.kv_start if fragments else cu_q,
        varlen.kv_len if fragments else cu_q, tile_end, topk_indices, index_lse if with_lse else topk_indices,
        page_table if paged else cu_q,
        float(scale), num_seqs, total_q, hkv,
        qi.stride(0), qi.stride(1), ki.stride(-2) if paged else ki.stride(0),
        topk_indices.stride(0), topk_indices.stride(1),
        ki.stride(0) if paged else 0, page_table.stride(0) if paged else 0,
        BLOCK_M=block_m, BLOCK=block_size, HEAD_DIM=di,
        TOPK=topk, KPAD=kpad, KOUT=triton.next_power_of_2(topk),
        SEARCH_ITERS=num_seqs.bit_length(), DETERMINISTIC=deterministic,
        DOT_PRECISION="ieee" if qi.dtype == torch.float32 else "tf32",
        NAN_MAX_REDUCE=NAN_MAX_REDUCE if NAN_MAX_REDUCE is not None else not _interpreting(),
        COMPUTE_LSE=mode == "union", PAGED=paged, FRAGMENTS=fragments, INIT_BLOCKS=init_blocks,
        LOCAL_BLOCKS=local_blocks, KI_FP8=fp8,
        num_warps=num_warps, num_stages=num_stages, **({"maxnreg": cap} if cap else {}),
    )
    if mode == "kv_outer":
        index_lse = index_lse_kv_outer(qi_lse, ki_lse, topk_indices, varlen, block_size=block_size, scale=scale)
    return topk_indices, index_lse
