"""Triton kernels of the Index Branch (docs/spec.md section 4).

One program per (query tile, KV group g): BLOCK_M consecutive query rows of ONE
sequence. The program

1. loads the qi tile [BLOCK_M, Di] once;
2. streams the key blocks c < l(last row of the tile) of the sequence: z = qi @ ki_c^T
   (fp32 accumulation), block max per row (NaN-propagating), times scale, and keeps a
   streaming per-row Top-(K-1) of the candidate blocks (c < l(row)) in registers;
3. writes the row: the selected blocks (sorted by (score desc, id asc) when
   DETERMINISTIC), the local block l, then -1 padding;
4. computes index_lse over the selected visible tokens by a second, short pass over the
   union of the blocks selected by the tile's rows, walked in increasing id order (a
   merge of the rows' lists): one tensor-core dot per union block, online logsumexp per
   row over its own blocks. The long pass stays exp-free. The union holds between K
   (rows that agree, the usual case for neighbouring queries) and BLOCK_M*(K-1)+2 blocks
   (unrelated random rows).

The block max propagates NaN (``NAN_MAX_REDUCE``: a max.NaN tl.reduce when compiled; the
interpreter runs custom reductions per element in Python, so there it is tl.max plus a
NaN count, with the same result).

Exactness of the ranking
------------------------
* Candidate blocks c < l(row) are full and wholly visible (c*B + B - 1 < l*B <= p), so
  the long pass needs no causal or length mask.
* z is scaled AFTER the dot and rounding is monotone, so fl(max_j(dot_j) * s) equals
  max_j fl(dot_j * s), the reference's block score, bit for bit: equal dot products
  tie exactly.
* Each (score, block id) pair becomes one int64 sort key
      key = (ordered(score) << 32) | (0x7FFFFFFF - id)
  where ordered() maps fp32 bits to an order-preserving int32 (-0.0 normalised to +0.0,
  NaN just below -inf). Larger key = better block: score descending, then id ascending.
  Keys of different blocks are distinct, so "replace the row's minimum" replaces exactly
  one slot.
* Top-k state: [BLOCK_M, KPAD] int64 per program. Slots s < K-1 start as distinct
  padding keys below every real key (PAD_BASE + s), so they are filled in slot order:
  the filled slots are always a prefix. Slots s >= K-1 (KPAD is a power of two) hold
  INT64_MAX and are never replaced.

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

# key constants (see module docstring)
_NAN_ORD = tl.constexpr(-0x7F800002)  # ordered int32 of NaN: just below -inf (-0x7F800001)
_PAD_BASE = tl.constexpr(-9223372036854775807)  # -(2**63 - 1): padding keys PAD_BASE + slot
_INT64_MAX = tl.constexpr(9223372036854775807)
_BIG = tl.constexpr(2147483647)  # "no block" in the LSE pass


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _indexer_topk_kernel(
    qi_ptr, ki_ptr, cu_q_ptr, cu_k_ptr, tile_end_ptr,
    idx_ptr, lse_ptr, page_table_ptr,
    scale,
    num_seqs, total_q, hkv,
    stride_qt, stride_qh, stride_kt,
    stride_ih, stride_it, stride_kp, stride_pb,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    TOPK: tl.constexpr, KPAD: tl.constexpr, KOUT: tl.constexpr,
    SEARCH_ITERS: tl.constexpr, DETERMINISTIC: tl.constexpr,
    DOT_PRECISION: tl.constexpr, NAN_MAX_REDUCE: tl.constexpr, COMPUTE_LSE: tl.constexpr,
    PAGED: tl.constexpr,
):
    NSEL: tl.constexpr = TOPK - 1
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453

    pid = tl.program_id(0)
    g = pid % hkv
    rank = pid // hkv
    n_tiles = tl.load(tile_end_ptr + num_seqs - 1)
    if rank >= n_tiles:
        return
    tile = n_tiles - 1 - rank

    # sequence of the tile: first b with tile_end[b] > tile (binary search in [lo, hi))
    lo = 0
    hi = num_seqs
    for _ in range(SEARCH_ITERS):
        mid = (lo + hi) // 2
        v = tl.load(tile_end_ptr + mid, mask=mid < num_seqs, other=0)
        go = v <= tile
        lo = tl.where(go, mid + 1, lo)
        hi = tl.where(go, hi, mid)
    b = lo
    q_start = tl.load(cu_q_ptr + b)
    seq_q = tl.load(cu_q_ptr + b + 1) - q_start
    k_start = tl.load(cu_k_ptr + b)
    seq_k = tl.load(cu_k_ptr + b + 1) - k_start
    tiles_b = (seq_q + BLOCK_M - 1) // BLOCK_M
    j = tile - (tl.load(tile_end_ptr + b) - tiles_b)  # tile index inside the sequence

    offs_m = j * BLOCK_M + tl.arange(0, BLOCK_M)  # local query index i
    row_ok = offs_m < seq_q
    pos = seq_k - seq_q + offs_m  # causal position p(i)
    local = pos // BLOCK_N  # l(i)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)

    # qi tile [BLOCK_M, Di]; 64-bit row offsets (total_q * Hkv * Di may exceed 2**31)
    q_rows = (q_start + offs_m).to(tl.int64)
    qi = tl.load(qi_ptr + q_rows[:, None] * stride_qt + g * stride_qh + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    k_base = ki_ptr + k_start.to(tl.int64) * stride_kt
    # PAGED (serving): ki is a page pool [num_pages, BLOCK_N, Di]; block c of sequence b is
    # physical page page_table[b, c] (cu_k then only gives the sequence's key count)
    pt_row = page_table_ptr + b.to(tl.int64) * stride_pb

    # ---------------------------------------------------------------- long pass
    col = tl.arange(0, KPAD)
    n_sel = tl.minimum(local, NSEL)  # earlier blocks kept per row
    if NSEL > 0:
        keys = tl.where(col[None, :] < NSEL,
                        _PAD_BASE + col[None, :].to(tl.int64),
                        tl.full([BLOCK_M, KPAD], _INT64_MAX, tl.int64))
        kmin = tl.min(keys, axis=1)
        last = tl.minimum(j * BLOCK_M + BLOCK_M, seq_q) - 1
        n_blocks = (seq_k - seq_q + last) // BLOCK_N  # blocks before the last row's l
        for c in range(0, n_blocks):
            if PAGED:
                page = tl.load(pt_row + c).to(tl.int64)
                k_blk = tl.load(ki_ptr + page * stride_kp + offs_n[:, None] * stride_kt + offs_d[None, :])
            else:
                kk = (c * BLOCK_N + offs_n).to(tl.int64)
                k_blk = tl.load(k_base + kk[:, None] * stride_kt + offs_d[None, :])
            z = tl.dot(qi, tl.trans(k_blk), input_precision=DOT_PRECISION)
            if NAN_MAX_REDUCE:  # compiled: one max.NaN reduction
                bmax = tl.reduce(z, 1, _max_nan)
            else:  # interpreter: a custom combine_fn runs per element in Python; use numpy's
                bmax = tl.max(z, axis=1)
                bmax = tl.where(tl.sum((z != z).to(tl.int32), axis=1) > 0, float("nan"), bmax)
            score = bmax * scale  # == max of (z * scale), exactly (rounding is monotone)
            score = tl.where(score == 0.0, 0.0, score)  # -0.0 -> +0.0
            u = score.to(tl.int32, bitcast=True)
            o = tl.where(u < 0, u ^ 0x7FFFFFFF, u)
            o = tl.where(score != score, _NAN_ORD, o)
            cand = (o.to(tl.int64) << 32) | (0x7FFFFFFF - c)
            ins = (c < local) & (cand > kmin)
            keys = tl.where(ins[:, None] & (keys == kmin[:, None]), cand[:, None], keys)
            kmin = tl.min(keys, axis=1)
        if DETERMINISTIC:
            keys = tl.where(col[None, :] < NSEL, keys,
                            tl.full([BLOCK_M, KPAD], _PAD_BASE, tl.int64))
            keys = tl.sort(keys, dim=1, descending=True)
        sel = (0x7FFFFFFF - (keys & 0xFFFFFFFF)).to(tl.int32)  # block ids
        sel_ok = row_ok[:, None] & (col[None, :] < n_sel[:, None])
        out_rows = (q_start + offs_m).to(tl.int64) * stride_it + g.to(tl.int64) * stride_ih
        tl.store(idx_ptr + out_rows[:, None] + col[None, :], sel, mask=sel_ok)
        sel = tl.where(sel_ok, sel, _BIG)
    else:
        out_rows = (q_start + offs_m).to(tl.int64) * stride_it + g.to(tl.int64) * stride_ih
    # local block at column n_sel, -1 after it
    ocol = tl.arange(0, KOUT)
    tail = tl.where(ocol[None, :] == n_sel[:, None], local[:, None], -1)
    tl.store(idx_ptr + out_rows[:, None] + ocol[None, :], tail.to(tl.int32),
             mask=row_ok[:, None] & (ocol[None, :] >= n_sel[:, None]) & (ocol[None, :] < TOPK))

    if COMPUTE_LSE:
        # ---------------------------------------------------------------- LSE pass
        # Walk the union of the tile's selected blocks in increasing id order (a merge of the
        # rows' lists); each row accumulates an online logsumexp (base 2) over the visible
        # tokens of its own blocks.
        local_ok = tl.where(row_ok, local, _BIG)
        if NSEL > 0:
            nxt_row = tl.minimum(tl.min(sel, axis=1), local_ok)
        else:
            nxt_row = local_ok
        nxt = tl.min(nxt_row, axis=0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        while nxt < _BIG:
            kk = nxt * BLOCK_N + offs_n
            if PAGED:
                page = tl.load(pt_row + nxt).to(tl.int64)
                k_blk = tl.load(ki_ptr + page * stride_kp + offs_n[:, None] * stride_kt + offs_d[None, :],
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
            if NSEL > 0:
                nxt_row = tl.minimum(tl.min(tl.where(sel > nxt, sel, _BIG), axis=1),
                                     tl.where(local_ok > nxt, local_ok, _BIG))
            else:
                nxt_row = tl.where(local_ok > nxt, local_ok, _BIG)
            nxt = tl.min(nxt_row, axis=0)
        lse = (m_i + tl.log2(tl.where(row_ok, l_i, 1.0))) * LN2
        tl.store(lse_ptr + g.to(tl.int64) * total_q + q_start + offs_m, lse, mask=row_ok)
