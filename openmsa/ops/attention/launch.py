"""Launchers of the KV-outer sparse attention forward and backward (kernels.py, over the
schedule of ``openmsa.ops.utils.schedule``); the autograd Functions are in triton_impl.py.

A tile is TOKENS query tokens x G_PAD heads of one group (the MMA's rows) against one
key block; a segment is a run of tiles of one (group, block) that keeps the block in
registers. The backward also keeps dK, dV of the block (or of half of it, in the split
launch) in registers over a segment and flushes them with one atomic add; with
``deterministic=True`` the segments of a key block cut into several segments write their
sums to scratch slots instead, added in a fixed order by ``key_partial_reduce_kernel``,
so that repeated backward passes are bitwise equal.

Query rows are processed in chunks so that the partial outputs (one [G, D] tile per
(row, group, selected block)) stay within the scratch budget (``configs.Scratch``) however
long the sequence. Chunk sizes depend only on shapes, so the launcher never reads device
values on the host. Launch settings: ``configs.AttentionForward`` / ``AttentionBackward``.
"""

from __future__ import annotations

import torch
import triton

from ..utils.configs import launch_config
from ..utils.partials import combine_kernel, reduce_key_partials, rows_per_chunk, sum_rows
from ..utils.schedule import row_info, schedule_args, schedule_chunks, slots_bound
from ..utils.shapes import check_kernel_shapes
from ..utils.tiles import LOG2E
from .kernels import softmax_delta_kernel, sparse_bwd_kernel, sparse_fwd_tile_kernel

# Per-entry dQ partials (the backward's largest buffer) in bfloat16 for bfloat16 inputs,
# float32 otherwise. H100 (benchmarks/results/h100/dq_partial*.log): 128K fwd+bwd 242 ->
# 211 ms, dq relative error against the float32 reference 2.7e-3 -> 3.1e-3 (dk, dv
# unchanged). A numerics choice, so not a launch setting.
DQ_PARTIAL_DTYPE = {torch.bfloat16: torch.bfloat16}

def check_supported(q, block_size):
    check_kernel_shapes("sparse_attention", "sparse attention", block_size=block_size, q=q,
                        check_dtypes=False)


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
    cfg = launch_config("attention_fwd", q.device)
    tokens = max(1, cfg.tile_rows // g_pad)
    topk = topk_indices.shape[2]
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty((total_q, hq), dtype=torch.float32, device=q.device) if lse is None else lse
    if total_q == 0:
        return out, lse
    info = row_info(varlen.cu_seqlens_q, varlen.cu_seqlens_k, total_q, k.shape[0], block_size,
                    varlen.kv_start, varlen.kv_len)
    if paged:
        info.num_blocks_bound = num_blocks_bound
    chunk = rows_per_chunk(total_q, hkv * topk * g * (d * q.element_size() + 4), q.device)
    # Partials in the input dtype: bf16 halves the traffic of the write + combine read,
    # which bounds the KV-outer forward (fp32 partials cap it near 200 TFLOP/s on an
    # H100), at the precision the bf16 output has anyway.
    part_o = torch.empty((hkv * chunk * topk * g, d), dtype=q.dtype, device=q.device)
    part_lse = torch.empty((hkv * chunk * topk * g,), dtype=torch.float32, device=q.device)
    ieee = q.dtype == torch.float32
    for row0, rows, sched in schedule_chunks(topk_indices, info, block_size,
                                             tokens * cfg.segment_tiles, chunk):
        sparse_fwd_tile_kernel[(sched.num_tiles_bound,)](
            q, k, v, part_o, part_lse, *schedule_args(sched, info), scale * LOG2E.value,
            q.stride(0), q.stride(1),
            k.stride(-3) if paged else k.stride(0), k.stride(-2),
            v.stride(-3) if paged else v.stride(0), v.stride(-2),
            page_table if paged else q, k.stride(0) if paged else 0, v.stride(0) if paged else 0,
            page_table.stride(0) if paged else 0,
            G=g, G_PAD=g_pad, TOKENS=tokens, BLOCK=block_size, D=d, IEEE=ieee, PAGED=paged,
            CHECK_V=not lse_only, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        combine_kernel[(rows, hkv)](
            part_o, part_lse, sched.entry_of, out, lse,
            row0, rows, topk,
            out.stride(0), out.stride(1), lse.stride(0),
            G=g, G_PAD=g_pad, D=d, num_warps=4,
        )
    return out, lse


def sparse_attention_backward(do, q, k, v, out, lse, topk_indices, varlen, block_size, scale,
                              deterministic=False):
    """(dq, dk, dv) like q, k, v. ``deterministic``: dK, dV without float atomics between
    programs (bitwise-repeatable); scratch of 2 x 2 x B x D x 4 bytes per tokens_per_tile
    entries, taken from the partial budget (1/8 of the bf16 dQ partials at the defaults)."""
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    g_pad = triton.next_power_of_2(g)
    cfg = launch_config("attention_bwd", q.device)
    tokens = max(1, cfg.tile_rows // g_pad)
    topk = topk_indices.shape[2]
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    if total_q == 0:
        return dq, dk.to(k.dtype), dv.to(v.dtype)
    do = do if do.stride(-1) == 1 else do.contiguous()
    info = row_info(varlen.cu_seqlens_q, varlen.cu_seqlens_k, total_q, k.shape[0], block_size,
                    varlen.kv_start, varlen.kv_len)
    dq_dtype = DQ_PARTIAL_DTYPE.get(q.dtype, torch.float32)
    per_entry = g * d * dq_dtype.itemsize
    entries_per_tile = tokens * cfg.segment_tiles
    if deterministic:  # dK and dV slots, at most 2 per entries_per_tile entries
        per_entry += 2 * 2 * block_size * d * 4 / entries_per_tile
    chunk = rows_per_chunk(total_q, hkv * topk * per_entry, q.device)
    part_dq = torch.empty((hkv * chunk * topk * g, d), dtype=dq_dtype, device=q.device)
    if deterministic:
        slots = slots_bound(hkv * chunk * topk, entries_per_tile)
        part_dk = torch.empty((slots * block_size, d), dtype=torch.float32, device=q.device)
        part_dv = torch.empty_like(part_dk)
    ieee = q.dtype == torch.float32
    # delta = rowsum(dO * O), the softmax backward's correction term, per (row, head).
    delta = torch.empty((total_q, hq), dtype=torch.float32, device=q.device)
    delta_rows = 32
    softmax_delta_kernel[(triton.cdiv(total_q * hq, delta_rows),)](
        do, out, delta, total_q, hq, do.stride(0), do.stride(1), out.stride(0), out.stride(1),
        ROWS=delta_rows, D=d, num_warps=4)
    for row0, rows, sched in schedule_chunks(topk_indices, info, block_size, entries_per_tile,
                                             chunk, deterministic):
        slot_args = (sched.tile_slot, part_dk, part_dv) if deterministic else (sched.tile_group, dk, dv)
        args = (
            q, k, v, do, lse, delta, part_dq, dk, dv, *slot_args, *schedule_args(sched, info),
            scale, scale * LOG2E.value,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            do.stride(0), do.stride(1), lse.stride(0), dk.stride(0), dk.stride(1),
        )
        common = dict(G=g, G_PAD=g_pad, TOKENS=tokens, BLOCK=block_size, D=d, IEEE=ieee,
                      DETERMINISTIC=deterministic, num_warps=cfg.num_warps,
                      num_stages=cfg.num_stages)
        w = sched.num_tiles_bound
        if cfg.split and block_size % 2 == 0 and block_size >= 32:
            if cfg.launch == "interleaved":
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
        sum_rows(part_dq, sched.entry_of, dq, row0, rows, g)
    return dq, dk.to(k.dtype), dv.to(v.dtype)
