"""Selected index LSE (docs/spec.md section 4) computed KV-outer, after the Top-k.

index_lse[g, t] = logsumexp of z_g(t, j) over the visible tokens of t's selected
blocks. The indexer kernel can compute it itself by walking, per query tile, the
union of the rows' selected blocks; with uncorrelated selections that union is most of
the context (a second full pass, with exponentials). Here instead each (group, key
block) loads its index keys once and scores only the query rows that selected it
(the CSR schedule of the sparse attention kernels), so the work is exactly
total_q x Hkv x K blocks, whatever the selection pattern.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..attention.kernels import segment_block
from ..attention.schedule import build_schedule, row_info

_TOKENS = 64  # query rows per MMA tile (one index head per group: rows are tokens)
_SEGMENT_TILES = 8  # tiles per program that reuse the loaded key block
_MAX_ROWS_PER_CHUNK = 1 << 18  # bounds the schedule's temporaries at 1M tokens


@triton.jit
def index_lse_partial_kernel(
    QI, KI, PART,
    tile_group, tile_start, tile_end,
    entry_row, row_seq, row_pos, seq_k_start, seq_len_k, block_base,
    num_blocks_bound, scale,
    stride_qt, stride_qh, stride_kt,
    TOKENS: tl.constexpr, BLOCK: tl.constexpr, DI: tl.constexpr, IEEE: tl.constexpr,
):
    """PART[e] = logsumexp over entry e's visible tokens of its block of z."""
    w = tl.program_id(0)
    e0, e1, g, c, k_start, len_k = segment_block(
        w, tile_group, tile_start, tile_end, entry_row, row_seq, seq_k_start, seq_len_k,
        block_base, num_blocks_bound)
    if e0 < e1:
        d = tl.arange(0, DI)
        j = c * BLOCK + tl.arange(0, BLOCK)
        key_ok = j < len_k
        kblk = tl.load(KI + (k_start + j.to(tl.int64))[:, None] * stride_kt + d[None, :],
                       mask=key_ok[:, None], other=0.0)
        r = tl.arange(0, TOKENS)
        for es in range(e0, e1, TOKENS):
            e = es + r
            ok = e < e1
            t = tl.load(entry_row + e, mask=ok, other=0).to(tl.int64)
            pos = tl.load(row_pos + t, mask=ok, other=-1)
            qi = tl.load(QI + t[:, None] * stride_qt + g * stride_qh + d[None, :],
                         mask=ok[:, None], other=0.0)
            if IEEE:
                z = tl.dot(qi, tl.trans(kblk), input_precision="ieee")
            else:
                z = tl.dot(qi, tl.trans(kblk))
            # scale after the dot, like the reference; then base 2 for exp2
            z = z * scale * 1.4426950408889634
            z = tl.where((j[None, :] <= pos[:, None]) & key_ok[None, :], z, float("-inf"))
            m = tl.max(z, 1)
            m_safe = tl.where(m == float("-inf"), 0.0, m)
            l = tl.sum(tl.exp2(z - m_safe[:, None]), 1)
            # l == 0: no visible token (-inf); a NaN score makes l NaN and keeps the LSE NaN
            lse = tl.where(l == 0, float("-inf"),
                           (m_safe + tl.log2(tl.where(l == 0, 1.0, l))) * 0.6931471805599453)
            tl.store(PART + e, lse, mask=ok)


def index_lse_kv_outer(qi, ki, topk_indices, varlen, *, block_size: int, scale: float) -> torch.Tensor:
    """float32 [Hkv, total_q]; no host synchronisation."""
    total_q, hkv, di = qi.shape
    topk = topk_indices.shape[2]
    index_lse = torch.empty((hkv, total_q), dtype=torch.float32, device=qi.device)
    info = row_info(varlen.cu_seqlens_q, varlen.cu_seqlens_k, total_q, ki.shape[0], block_size)
    rows_per_chunk = min(total_q, _MAX_ROWS_PER_CHUNK)
    part = torch.empty(hkv * rows_per_chunk * topk, dtype=torch.float32, device=qi.device)
    for row0 in range(0, total_q, rows_per_chunk):
        rows = min(rows_per_chunk, total_q - row0)
        sched = build_schedule(topk_indices[:, row0:row0 + rows], row0, info, block_size,
                               _TOKENS * _SEGMENT_TILES)
        index_lse_partial_kernel[(sched.num_tiles_bound,)](
            qi, ki, part,
            sched.tile_group, sched.tile_start, sched.tile_end,
            sched.entry_row, info.seq, info.pos, info.seq_k_start, info.seq_len_k, info.block_base,
            info.num_blocks_bound, scale,
            qi.stride(0), qi.stride(1), ki.stride(0),
            TOKENS=_TOKENS, BLOCK=block_size, DI=di, IEEE=qi.dtype == torch.float32,
            num_warps=4, num_stages=2,
        )
        e = sched.entry_of.long()
        vals = torch.where(e >= 0, part[e.clamp(min=0)], float("-inf"))
        index_lse[:, row0:row0 + rows] = torch.logsumexp(vals, dim=-1)
    return index_lse
