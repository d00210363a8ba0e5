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

from ..utils.configs import launch_config
from ..utils.schedule import row_info, schedule_args, schedule_chunks
from ..utils.tiles import LN2, LOG2E, entry_tokens, key_block, mma, segment_block


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
        kblk = key_block(KI, k_start, j, key_ok, stride_kt, 0, d)
        r = tl.arange(0, TOKENS)
        for es in range(e0, e1, TOKENS):
            e = es + r
            ok = e < e1
            t, pos = entry_tokens(entry_row, row_pos, e, ok)
            qi = tl.load(QI + t[:, None] * stride_qt + g * stride_qh + d[None, :],
                         mask=ok[:, None], other=0.0)
            # scale after the dot, like the reference; then base 2 for exp2
            z = mma(qi, tl.trans(kblk), IEEE) * scale * LOG2E
            z = tl.where((j[None, :] <= pos[:, None]) & key_ok[None, :], z, float("-inf"))
            m = tl.max(z, 1)
            m_safe = tl.where(m == float("-inf"), 0.0, m)
            l = tl.sum(tl.exp2(z - m_safe[:, None]), 1)
            # l == 0: no visible token (-inf); a NaN score makes l NaN and keeps the LSE NaN
            lse = tl.where(l == 0, float("-inf"),
                           (m_safe + tl.log2(tl.where(l == 0, 1.0, l))) * LN2)
            tl.store(PART + e, lse, mask=ok)


def index_lse_kv_outer(qi, ki, topk_indices, varlen, *, block_size: int, scale: float) -> torch.Tensor:
    """float32 [Hkv, total_q]; no host synchronisation."""
    total_q, hkv, di = qi.shape
    topk = topk_indices.shape[2]
    index_lse = torch.empty((hkv, total_q), dtype=torch.float32, device=qi.device)
    info = row_info(varlen.cu_seqlens_q, varlen.cu_seqlens_k, total_q, ki.shape[0], block_size,
                    varlen.kv_start, varlen.kv_len)
    cfg = launch_config("index_lse", qi.device)
    chunk = min(total_q, cfg.max_rows_per_chunk)
    part = torch.empty(hkv * chunk * topk, dtype=torch.float32, device=qi.device)
    for row0, rows, sched in schedule_chunks(topk_indices, info, block_size,
                                             cfg.tokens * cfg.segment_tiles, chunk):
        index_lse_partial_kernel[(sched.num_tiles_bound,)](
            qi, ki, part, *schedule_args(sched, info), scale,
            qi.stride(0), qi.stride(1), ki.stride(0),
            TOKENS=cfg.tokens, BLOCK=block_size, DI=di, IEEE=qi.dtype == torch.float32,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        e = sched.entry_of.long()
        vals = torch.where(e >= 0, part[e.clamp(min=0)], float("-inf"))
        index_lse[:, row0:row0 + rows] = torch.logsumexp(vals, dim=-1)
    return index_lse
