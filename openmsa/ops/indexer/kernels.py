"""Triton kernels of the Index Branch (docs/spec.md section 4).

One program per (query tile, KV group g): BLOCK_M consecutive query rows of ONE
sequence. The program

1. loads the qi tile [BLOCK_M, Di] once;
2. streams the candidate key blocks INIT <= c < l - LOCAL + 1 of the tile's last row:
   z = qi @ ki_c^T (fp32 accumulation), block max per row (NaN-propagating), times scale,
   and keeps a streaming per-row Top-(K-INIT-LOCAL) of the row's candidates
   (INIT <= c < l(row) - LOCAL + 1) in registers;
3. writes the row: the selected blocks (sorted by (score desc, id asc) when
   DETERMINISTIC), the forced blocks in ascending order (init blocks 0..INIT-1 and the
   LOCAL blocks ending at l, those <= l; by default only l), then -1 padding;
4. computes index_lse over the selected visible tokens by a second, short pass over the
   union of the blocks selected by the tile's rows, walked in increasing id order (a
   merge of the rows' lists): one tensor-core dot per union block, online logsumexp per
   row over its own blocks. The long pass stays exp-free. The union holds between K
   (rows that agree, the usual case for neighbouring queries) and BLOCK_M*(K-1)+2 blocks
   (unrelated random rows).

The block max propagates NaN (``openmsa.ops.utils.topk.block_max``).

KI_FP8: qi and ki in E4M3 with one float32 scale per query row (``QI_SCALE``, [total_q,
Hkv]) and per key token (``KI_SCALE``): the FP8 MMA runs at twice the 16-bit rate, each
score column is multiplied by its key's scale before the block max and each row's block
max by its query's scale. The payloads are finite (a non-finite vector has a zero
payload and a NaN scale, ``ops/utils/fp8.py``), so NaN reaches the scores through the
scales. The LSE pass reads the unquantized inputs (``QI_LSE``, ``KI_LSE``, laid out
as the FP8 copies): index_lse is the 16-bit inputs' in both modes.

Exactness of the ranking
------------------------
* Candidate blocks c < l(row) - LOCAL + 1 <= l(row) are full and wholly visible
  (c*B + B - 1 < l*B <= p), so the long pass needs no causal or length mask.
* z is scaled AFTER the dot and rounding is monotone, so fl(max_j(dot_j) * s) equals
  max_j fl(dot_j * s), the reference's block score, bit for bit: equal dot products
  tie exactly.
* The streaming Top-(K-1) is ``openmsa.ops.utils.topk``: one int64 sort key per
  (score, block id), larger = better (score descending, then id ascending), in
  [BLOCK_M, KPAD] int64 registers per program.

Scheduling (no host synchronisation, CUDA-graph capturable)
------------------------------------------------------------
``tile_end[b]`` (int32, device) is the inclusive cumsum of cdiv(Lq_b, BLOCK_M). The grid
is an upper bound on the number of tiles (cdiv(total_q, BLOCK_M) + num_seqs) times Hkv;
program pid -> (rank r = pid // Hkv, group g = pid % Hkv) so that the Hkv programs of a
tile run side by side and share ki in L2. Tile id = n_tiles - 1 - r: the latest (longest)
tiles start first; programs with r >= n_tiles return at once. The sequence of a tile is
found by a binary search of tile_end.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..utils.tiles import LN2, LOG2E
from ..utils.topk import block_max, empty_topk, key_block_id, score_key, sorted_topk, topk_insert

_BIG = tl.constexpr(2147483647)  # "no block" in the LSE pass


@triton.jit
def _next_forced(after, n_init, lo_local, local, row_ok):
    """Per row, the smallest forced block (in [0, n_init) or [lo_local, local]) > after."""
    f1 = after + 1
    f_local = tl.maximum(f1, lo_local)
    nxt = tl.where(f1 < n_init, f1, tl.where(f_local <= local, f_local, _BIG))
    return tl.where(row_ok, nxt, _BIG)


@triton.jit
def _indexer_topk_kernel(
    QI, KI, QI_SCALE, KI_SCALE, QI_LSE, KI_LSE, CU_Q, CU_K, KV_START, KV_LEN, TILE_END,
    TOPK_OUT, LSE_OUT, PAGE_TABLE,
    scale,
    num_seqs, total_q, hkv,
    stride_qt, stride_qh, stride_kt,
    stride_ih, stride_it, stride_kp, stride_pb,
    BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
    TOPK: tl.constexpr, KPAD: tl.constexpr, KOUT: tl.constexpr,
    SEARCH_ITERS: tl.constexpr, DETERMINISTIC: tl.constexpr,
    DOT_PRECISION: tl.constexpr, NAN_MAX_REDUCE: tl.constexpr, COMPUTE_LSE: tl.constexpr,
    PAGED: tl.constexpr, FRAGMENTS: tl.constexpr, INIT_BLOCKS: tl.constexpr,
    LOCAL_BLOCKS: tl.constexpr, KI_FP8: tl.constexpr,
):
    NSEL: tl.constexpr = TOPK - INIT_BLOCKS - LOCAL_BLOCKS  # ranked slots

    pid = tl.program_id(0)
    g = pid % hkv
    rank = pid // hkv
    n_tiles = tl.load(TILE_END + num_seqs - 1)
    if rank >= n_tiles:
        return
    tile = n_tiles - 1 - rank

    # sequence of the tile: first b with tile_end[b] > tile (binary search in [lo, hi))
    lo = 0
    hi = num_seqs
    for _ in range(SEARCH_ITERS):
        mid = (lo + hi) // 2
        v = tl.load(TILE_END + mid, mask=mid < num_seqs, other=0)
        go = v <= tile
        lo = tl.where(go, mid + 1, lo)
        hi = tl.where(go, hi, mid)
    b = lo
    q_start = tl.load(CU_Q + b)
    seq_q = tl.load(CU_Q + b + 1) - q_start
    if FRAGMENTS:  # the sequence names its key range (docs/spec.md section 3)
        k_start = tl.load(KV_START + b)
        seq_k = tl.load(KV_LEN + b)
    else:
        k_start = tl.load(CU_K + b)
        seq_k = tl.load(CU_K + b + 1) - k_start
    tiles_b = (seq_q + BLOCK_M - 1) // BLOCK_M
    j = tile - (tl.load(TILE_END + b) - tiles_b)  # tile index inside the sequence

    offs_m = j * BLOCK_M + tl.arange(0, BLOCK_M)  # local query index i
    row_ok = offs_m < seq_q
    pos = seq_k - seq_q + offs_m  # causal position p(i)
    local = pos // BLOCK  # l(i)
    # forced blocks [0, n_init) and [lo_local, local]; candidates [INIT_BLOCKS, cand_end)
    cand_end = local - (LOCAL_BLOCKS - 1)
    lo_local = tl.maximum(cand_end, 0)
    n_init = tl.minimum(lo_local, INIT_BLOCKS)
    n_forced = n_init + local + 1 - lo_local
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK)

    # qi tile [BLOCK_M, Di]; 64-bit row offsets (total_q * Hkv * Di may exceed 2**31)
    q_rows = (q_start + offs_m).to(tl.int64)
    qi = tl.load(QI + q_rows[:, None] * stride_qt + g * stride_qh + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    k_base = KI + k_start.to(tl.int64) * stride_kt
    if KI_FP8:  # the rows' dequantization scales times the softmax scale
        row_scale = tl.load(QI_SCALE + q_rows * hkv + g, mask=row_ok, other=1.0) * scale
    # PAGED (serving): ki is a page pool [num_pages, BLOCK, Di]; block c of sequence b is
    # physical page page_table[b, c] (cu_k then only gives the sequence's key count)
    pt_row = PAGE_TABLE + b.to(tl.int64) * stride_pb

    # ---------------------------------------------------------------- long pass
    col = tl.arange(0, KPAD)
    n_sel = tl.minimum(tl.maximum(cand_end - INIT_BLOCKS, 0), NSEL)  # ranked blocks kept per row
    if NSEL > 0:
        keys, kmin = empty_topk(BLOCK_M, KPAD, NSEL)
        last = tl.minimum(j * BLOCK_M + BLOCK_M, seq_q) - 1
        n_blocks = (seq_k - seq_q + last) // BLOCK - (LOCAL_BLOCKS - 1)  # the last row's cand_end
        for c in range(INIT_BLOCKS, n_blocks):
            if PAGED:
                page = tl.load(pt_row + c).to(tl.int64)
                k_blk = tl.load(KI + page * stride_kp + offs_n[:, None] * stride_kt + offs_d[None, :])
            else:
                kk = (c * BLOCK + offs_n).to(tl.int64)
                k_blk = tl.load(k_base + kk[:, None] * stride_kt + offs_d[None, :])
            if KI_FP8:
                # E4M3 qi and ki (an FP8 MMA): the key scales enter before the block max
                # (a factor per column), the query scales after it (one per row)
                z = tl.dot(qi, tl.trans(k_blk)) * tl.load(KI_SCALE + k_start.to(tl.int64) + kk)[None, :]
                score = block_max(z, 1, NAN_MAX_REDUCE) * row_scale
            else:
                z = tl.dot(qi, tl.trans(k_blk), input_precision=DOT_PRECISION)
                # == max of (z * scale), exactly (rounding is monotone)
                score = block_max(z, 1, NAN_MAX_REDUCE) * scale
            keys, kmin = topk_insert(keys, kmin, score_key(score, c), c < cand_end)
        if DETERMINISTIC:
            keys = sorted_topk(keys, NSEL, KPAD)
        sel = key_block_id(keys)
        sel_ok = row_ok[:, None] & (col[None, :] < n_sel[:, None])
        out_rows = (q_start + offs_m).to(tl.int64) * stride_it + g.to(tl.int64) * stride_ih
        tl.store(TOPK_OUT + out_rows[:, None] + col[None, :], sel, mask=sel_ok)
        sel = tl.where(sel_ok, sel, _BIG)
    else:
        out_rows = (q_start + offs_m).to(tl.int64) * stride_it + g.to(tl.int64) * stride_ih
    # forced blocks from column n_sel, -1 after them
    ocol = tl.arange(0, KOUT)
    f = ocol[None, :] - n_sel[:, None]
    forced = tl.where(f < n_init[:, None], f, lo_local[:, None] + f - n_init[:, None])
    tail = tl.where(f < n_forced[:, None], forced, -1)
    tl.store(TOPK_OUT + out_rows[:, None] + ocol[None, :], tail.to(tl.int32),
             mask=row_ok[:, None] & (ocol[None, :] >= n_sel[:, None]) & (ocol[None, :] < TOPK))

    if COMPUTE_LSE:
        # ---------------------------------------------------------------- LSE pass
        if KI_FP8:  # the LSE of the unquantized inputs (same layout as the FP8 copies)
            qi = tl.load(QI_LSE + q_rows[:, None] * stride_qt + g * stride_qh + offs_d[None, :],
                         mask=row_ok[:, None], other=0.0)
            k_base = KI_LSE + k_start.to(tl.int64) * stride_kt
        # Walk the union of the tile's selected blocks in increasing id order (a merge of the
        # rows' lists); each row accumulates an online logsumexp (base 2) over the visible
        # tokens of its own blocks.
        forced_nxt = _next_forced(-1, n_init, lo_local, local, row_ok)
        if NSEL > 0:
            nxt_row = tl.minimum(tl.min(sel, axis=1), forced_nxt)
        else:
            nxt_row = forced_nxt
        nxt = tl.min(nxt_row, axis=0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        while nxt < _BIG:
            kk = nxt * BLOCK + offs_n
            if PAGED:
                page = tl.load(pt_row + nxt).to(tl.int64)
                k_blk = tl.load(KI + page * stride_kp + offs_n[:, None] * stride_kt + offs_d[None, :],
                                mask=(kk < seq_k)[:, None], other=0.0)
            else:
                k_blk = tl.load(k_base + kk.to(tl.int64)[:, None] * stride_kt + offs_d[None, :],
                                mask=(kk < seq_k)[:, None], other=0.0)
            z = tl.dot(qi, tl.trans(k_blk), input_precision=DOT_PRECISION) * scale
            vis = (nxt_row == nxt)[:, None] & (kk[None, :] <= pos[:, None])
            z = tl.where(vis, z * LOG2E, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(z, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(z - m_safe[:, None]), axis=1)
            m_i = m_new
            # next block of every row after nxt
            forced_nxt = _next_forced(nxt, n_init, lo_local, local, row_ok)
            if NSEL > 0:
                nxt_row = tl.minimum(tl.min(tl.where(sel > nxt, sel, _BIG), axis=1), forced_nxt)
            else:
                nxt_row = forced_nxt
            nxt = tl.min(nxt_row, axis=0)
        lse = (m_i + tl.log2(tl.where(row_ok, l_i, 1.0))) * LN2
        tl.store(LSE_OUT + g.to(tl.int64) * total_q + q_start + offs_m, lse, mask=row_ok)
