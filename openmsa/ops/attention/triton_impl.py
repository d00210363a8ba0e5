"""Launchers of the KV-outer sparse attention forward and backward (kernels.py,
schedule.py), and their autograd Function.

A tile is TOKENS query tokens x G_PAD heads of one group (the MMA's rows) against one
key block; a segment is a run of tiles of one (group, block) that keeps the block in
registers. The backward also keeps dK, dV of the block (or of half of it, in the split
launch) in registers over a segment and flushes them with one atomic add; with
``deterministic=True`` the segments of a key block cut into several segments write their
sums to scratch slots instead, added in a fixed order by ``key_partial_reduce_kernel``
(schedule.py), so that repeated backward passes are bitwise equal.

Query rows are processed in chunks so that the partial outputs (one [G, D] tile
per (row, group, selected block)) stay within ``OPENMSA_PARTIAL_BYTES``
(default 4 GiB) however long the sequence. Chunk sizes depend only on shapes, so
the launcher never reads device values on the host.
"""

from __future__ import annotations

import os

import torch
import triton

from .dense import dense_attention_backward, dense_attention_forward
from .kernels import (
    LOG2E, combine_kernel, dq_reduce_kernel, key_partial_reduce_kernel, softmax_delta_kernel,
    sparse_bwd_kernel, sparse_fwd_tile_kernel,
)
from .schedule import build_schedule, row_info, slots_bound


def _partial_bytes() -> int:
    """Scratch for partial outputs (and dQ partials). 4 GiB: fewer, larger query chunks
    reuse each loaded key block for more queries (128K forward on H100: 55.6 ms at 2 GiB,
    52.1 at 4, 51.2 at 8; benchmarks/results/h100/attention_sweep3.log)."""
    return int(os.environ.get("OPENMSA_PARTIAL_BYTES", 4 << 30))


def _fwd_knobs():
    """(tile rows, segment tiles, warps, stages) of the forward tile kernel. Defaults from
    benchmarks/results/h100/attention_fwd_sweep.log (128K, H100): one warpgroup on 64-row
    tiles (164-180 registers, ~107 KB shared) lets two programs share an SM; 128-row tiles
    with 8 warps ran at 1 program per SM (12.5% occupancy in ncu), 66 vs 55 ms."""
    return (int(os.environ.get("OPENMSA_FWD_TILE_ROWS", 64)),
            int(os.environ.get("OPENMSA_FWD_SEGMENT_TILES", 16)),
            int(os.environ.get("OPENMSA_FWD_WARPS", 4)), int(os.environ.get("OPENMSA_FWD_STAGES", 3)))


def _bwd_knobs():
    """(tile rows, segment tiles, warps, stages, split dK/dV from dQ, launch). 128K
    fwd+bwd on the H100 (benchmarks/results/h100/): the split kernel with 64-row tiles
    and one warpgroup, 253 ms, against 284 ms for the best fused launch (8 warps, one
    program per SM; attention_bwd_sweep.log); launch="interleaved" (the three roles of a
    segment, dK/dV of each half block and dQ, side by side in one grid, so two of the
    three reads of Q and dO hit L2) 195 ms against 207 ms for "separate" (dK/dV roles,
    then the dQ role; session2/run1_bwd.log); 128 tiles (512 entries) per segment, i.e.
    an eighth of the dK/dV flushes and K/V loads of 16: 185 (16) -> 167 (64) ms
    (session2/run2_bwd.log), 161 (64) -> 158 (128) ms (session2/run3_bwd.log)."""
    launch = os.environ.get("OPENMSA_BWD_LAUNCH", "interleaved")
    if launch not in ("interleaved", "separate"):
        raise ValueError(f"OPENMSA_BWD_LAUNCH must be 'interleaved' or 'separate', got {launch!r}")
    return (int(os.environ.get("OPENMSA_BWD_TILE_ROWS", 64)), int(os.environ.get("OPENMSA_BWD_SEGMENT_TILES", 128)),
            int(os.environ.get("OPENMSA_BWD_WARPS", 4)), int(os.environ.get("OPENMSA_BWD_STAGES", 1)),
            os.environ.get("OPENMSA_BWD_SPLIT", "1") == "1", launch)


def _dq_partial_dtype(dtype):
    """Per-entry dQ partials (the largest buffer of the backward): bfloat16 for bfloat16
    inputs, float32 otherwise; OPENMSA_BWD_DQ_PARTIAL=fp32 forces float32. Measured on
    the H100 (benchmarks/results/h100/dq_partial*.log): 128K fwd+bwd 242 -> 211 ms, dq
    relative error against the float32 reference 2.7e-3 -> 3.1e-3 (dk, dv unchanged)."""
    if os.environ.get("OPENMSA_BWD_DQ_PARTIAL", "bf16") == "bf16" and dtype == torch.bfloat16:
        return torch.bfloat16
    return torch.float32


SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)


def _check_supported(q, block_size):
    d = q.shape[2]
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q: the Triton sparse attention supports head_dim in "
                         f"{{16, 32, 64, 128, 256}}, got {d}")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size: the Triton sparse attention supports 16, 32, 64 or 128, "
                         f"got {block_size}")


def sparse_attention_forward(q, k, v, topk_indices, varlen, block_size, scale, *,
                             page_table=None, num_blocks_bound=None, out=None, lse=None,
                             lse_only=False):
    """out like q, lse float32 [total_q, Hq]. Serving (``openmsa.serving``): with
    ``page_table`` int32 [batch, max_pages], k and v are page pools [num_pages,
    block_size, Hkv, D], varlen.cu_seqlens_k only gives each sequence's key count and
    ``num_blocks_bound`` (host int >= the number of blocks of all sequences) replaces the
    one derived from k's length; ``out`` / ``lse`` are preallocated outputs.
    ``lse_only``: only lse is wanted (out is then meaningless), so that v (any tensor of
    k's shape, e.g. k) does not take part in the non-finite rule of api.sparse_attention."""
    total_q, hq, d = q.shape
    paged = page_table is not None
    hkv = k.shape[-2] if paged else k.shape[1]
    g = hq // hkv
    g_pad = triton.next_power_of_2(g)
    tile_rows, segment_tiles, warps, stages = _fwd_knobs()
    tokens = max(1, tile_rows // g_pad)
    topk = topk_indices.shape[2]
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty((total_q, hq), dtype=torch.float32, device=q.device) if lse is None else lse
    if total_q == 0:
        return out, lse
    info = row_info(varlen.cu_seqlens_q, varlen.cu_seqlens_k, total_q, k.shape[0], block_size)
    if paged:
        info.num_blocks_bound = num_blocks_bound
    rows_per_chunk = max(1, min(total_q, _partial_bytes() // (hkv * topk * g * (d * q.element_size() + 4))))
    # Partials in the input dtype: bf16 halves the traffic of the write + combine read,
    # which bounds the KV-outer forward (fp32 partials cap it near 200 TFLOP/s on an
    # H100), at the precision the bf16 output has anyway.
    part_o = torch.empty((hkv * rows_per_chunk * topk * g, d), dtype=q.dtype, device=q.device)
    part_lse = torch.empty((hkv * rows_per_chunk * topk * g,), dtype=torch.float32, device=q.device)
    ieee = q.dtype == torch.float32
    for row0 in range(0, total_q, rows_per_chunk):
        rows = min(rows_per_chunk, total_q - row0)
        sched = build_schedule(topk_indices[:, row0:row0 + rows], row0, info, block_size,
                               tokens * segment_tiles)
        sparse_fwd_tile_kernel[(sched.num_tiles_bound,)](
            q, k, v, part_o, part_lse,
            sched.tile_group, sched.tile_start, sched.tile_end,
            sched.entry_row, info.seq, info.pos, info.seq_k_start, info.seq_len_k, info.block_base,
            info.num_blocks_bound, scale * LOG2E,
            q.stride(0), q.stride(1),
            k.stride(-3) if paged else k.stride(0), k.stride(-2),
            v.stride(-3) if paged else v.stride(0), v.stride(-2),
            page_table if paged else q, k.stride(0) if paged else 0, v.stride(0) if paged else 0,
            page_table.stride(0) if paged else 0,
            G=g, G_PAD=g_pad, TOKENS=tokens, BLOCK=block_size, D=d, IEEE=ieee, PAGED=paged,
            CHECK_V=not lse_only, num_warps=warps, num_stages=stages,
        )
        combine_kernel[(rows, hkv)](
            part_o, part_lse, sched.entry_of, out, lse,
            row0, rows, topk,
            out.stride(0), out.stride(1), lse.stride(0),
            G=g, G_PAD=g_pad, D=d, num_warps=4,
        )
    return out, lse


def reduce_key_partials(sched, info, part, dst, stride_dt, stride_dg, block_size):
    """Deterministic flush (schedule.py): dst += the slots of every multi-tile group of
    ``sched``, in tile order. ``part``: float32 [slots * block_size, D]."""
    rows = min(32, block_size)
    key_partial_reduce_kernel[(sched.reduce_tile.numel(), block_size // rows)](
        part, dst, sched.reduce_tile, sched.reduce_count, sched.tile_slot,
        sched.tile_group, sched.tile_start, sched.tile_end, sched.entry_row, info.seq,
        info.seq_k_start, info.seq_len_k, info.block_base, info.num_blocks_bound,
        stride_dt, stride_dg, BLOCK=block_size, D=part.shape[1], ROWS=rows, num_warps=4)


def sparse_attention_backward(do, q, k, v, out, lse, topk_indices, varlen, block_size, scale,
                              deterministic=False):
    """(dq, dk, dv) like q, k, v. ``deterministic``: dK, dV without float atomics between
    programs (bitwise-repeatable); scratch of 2 x 2 x B x D x 4 bytes per tokens_per_tile
    entries, taken from the partial budget (1/8 of the bf16 dQ partials at the defaults)."""
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    g_pad = triton.next_power_of_2(g)
    tile_rows, segment_tiles, warps, stages, split_kv, launch = _bwd_knobs()
    tokens = max(1, tile_rows // g_pad)
    topk = topk_indices.shape[2]
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    if total_q == 0:
        return dq, dk.to(k.dtype), dv.to(v.dtype)
    do = do if do.stride(-1) == 1 else do.contiguous()
    info = row_info(varlen.cu_seqlens_q, varlen.cu_seqlens_k, total_q, k.shape[0], block_size)
    dq_dtype = _dq_partial_dtype(q.dtype)
    per_entry = g * d * dq_dtype.itemsize
    entries_per_tile = tokens * segment_tiles
    if deterministic:  # dK and dV slots, at most 2 per entries_per_tile entries
        per_entry += 2 * 2 * block_size * d * 4 / entries_per_tile
    rows_per_chunk = max(1, min(total_q, int(_partial_bytes() // (hkv * topk * per_entry))))
    part_dq = torch.empty((hkv * rows_per_chunk * topk * g, d), dtype=dq_dtype, device=q.device)
    if deterministic:
        slots = slots_bound(hkv * rows_per_chunk * topk, entries_per_tile)
        part_dk = torch.empty((slots * block_size, d), dtype=torch.float32, device=q.device)
        part_dv = torch.empty_like(part_dk)
    ieee = q.dtype == torch.float32
    # delta = rowsum(dO * O), the softmax backward's correction term, per (row, head).
    delta = torch.empty((total_q, hq), dtype=torch.float32, device=q.device)
    delta_rows = 32
    softmax_delta_kernel[(triton.cdiv(total_q * hq, delta_rows),)](
        do, out, delta, total_q, hq, do.stride(0), do.stride(1), out.stride(0), out.stride(1),
        ROWS=delta_rows, D=d, num_warps=4)
    for row0 in range(0, total_q, rows_per_chunk):
        rows = min(rows_per_chunk, total_q - row0)
        sched = build_schedule(topk_indices[:, row0:row0 + rows], row0, info, block_size,
                               entries_per_tile, deterministic)
        slot_args = (sched.tile_slot, part_dk, part_dv) if deterministic else (sched.tile_group, dk, dv)
        args = (
            q, k, v, do, lse, delta, part_dq, dk, dv, *slot_args,
            sched.tile_group, sched.tile_start, sched.tile_end,
            sched.entry_row, info.seq, info.pos, info.seq_k_start, info.seq_len_k, info.block_base,
            info.num_blocks_bound, scale, scale * LOG2E,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            do.stride(0), do.stride(1), lse.stride(0), dk.stride(0), dk.stride(1),
        )
        common = dict(G=g, G_PAD=g_pad, TOKENS=tokens, BLOCK=block_size, D=d, IEEE=ieee,
                      DETERMINISTIC=deterministic, num_warps=warps, num_stages=stages)
        w = sched.num_tiles_bound
        if split_kv and block_size % 2 == 0 and block_size >= 32:
            if launch == "interleaved":
                # the 3 roles of a segment side by side: Q, dO rows come from L2 twice
                sparse_bwd_kernel[(3 * w,)](*args, SPLIT=True, ROLE_COUNT=3, ROLE_OFFSET=0,
                                            **common)
            else:
                sparse_bwd_kernel[(2 * w,)](*args, SPLIT=True, ROLE_COUNT=2, ROLE_OFFSET=0,
                                            **common)
                sparse_bwd_kernel[(w,)](*args, SPLIT=True, ROLE_COUNT=1, ROLE_OFFSET=2, **common)
        else:
            sparse_bwd_kernel[(w,)](*args, SPLIT=False, ROLE_COUNT=1, ROLE_OFFSET=0, **common)
        if deterministic:
            for part, dst in ((part_dk, dk), (part_dv, dv)):
                reduce_key_partials(sched, info, part, dst, dst.stride(0), dst.stride(1), block_size)
        dq_reduce_kernel[(rows, hkv)](
            part_dq, sched.entry_of, dq, row0, rows, topk, dq.stride(0), dq.stride(1),
            G=g, G_PAD=g_pad, D=d, num_warps=4,
        )
    return dq, dk.to(k.dtype), dv.to(v.dtype)


class SparseAttentionTriton(torch.autograd.Function):
    """Forward and backward through the KV-outer kernels."""

    @staticmethod
    def forward(ctx, q, k, v, topk_indices, varlen, block_size, scale, deterministic):
        out, lse = sparse_attention_forward(q, k, v, topk_indices, varlen, block_size, scale)
        ctx.save_for_backward(q, k, v, topk_indices, out, lse)
        ctx.args = (varlen, block_size, scale, deterministic)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, topk_indices, out, lse = ctx.saved_tensors
        varlen, block_size, scale, deterministic = ctx.args
        dq, dk, dv = sparse_attention_backward(do, q, k, v, out, lse, topk_indices, varlen,
                                               block_size, scale, deterministic)
        return dq, dk, dv, None, None, None, None, None


class DenseAttentionTriton(torch.autograd.Function):
    """Dense causal attention through the same kernels, a chunk of blocks at a time (dense.py)."""

    @staticmethod
    def forward(ctx, q, k, v, varlen, block_size, scale, deterministic):
        out, lse = dense_attention_forward(q, k, v, varlen, block_size, scale,
                                           sparse_attention_forward)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (varlen, block_size, scale, deterministic)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        varlen, block_size, scale, deterministic = ctx.args
        dq, dk, dv = dense_attention_backward(do, q, k, v, out, lse, varlen, block_size, scale,
                                              sparse_attention_backward, deterministic)
        return dq, dk, dv, None, None, None, None


def dense_attention_triton(q, k, v, topk_indices, varlen, *, block_size, scale, deterministic=False):
    """``sparse_attention(..., topk_indices=None)``: every visible token (docs/spec.md section 6 warmup)."""
    if topk_indices is not None:
        raise ValueError("dense_attention_triton takes topk_indices=None")
    _check_supported(q, block_size)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return DenseAttentionTriton.apply(q, k, v, varlen, block_size, scale, deterministic)


def sparse_attention_triton(q, k, v, topk_indices, varlen, *, block_size, scale, deterministic=False):
    """``deterministic``: the backward without float atomics (sparse_attention_backward)."""
    _check_supported(q, block_size)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return SparseAttentionTriton.apply(q, k, v, topk_indices.contiguous(), varlen, block_size, scale,
                                       deterministic)
