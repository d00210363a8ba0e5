"""Triton kernels of the indexer's sparse KL loss (spec section 6), KV-outer.

They run over the schedule of the sparse attention kernels
(``openmsa.ops.attention.schedule``): one program per segment = one key block c of one
group g and a run of the CSR entries (query rows that selected c), walked in tiles of
TOKENS query tokens.

``kl_fused_kernel`` computes the loss and the (unscaled by grad_output) gradients in ONE
pass, like a fused cross-entropy. Per tile:

* main scores s = q[rows, heads of g] . K_c^T * scale for the TOKENS x G_PAD rows, teacher
  P_T(t, j) = mean over the G heads of exp(s - lse[t, h])  ([TOKENS*G_PAD, B] reshaped to
  [TOKENS, G_PAD, B] and summed over the heads; padded heads are masked to 0);
* index scores z = qi[t, g] . ki_c^T * scale_i. ``tl.dot`` needs M >= 16, so the qi tile
  has TM = max(TOKENS, 16) rows: token i sits in row i * REP (REP = TM // TOKENS) and the
  other rows are zeros, so [TM, B] reshaped to [TOKENS, REP, B] and summed over REP gives
  z exactly (adding zeros);
* log P_S = z - index_lse[g, t] on the visible keys (j <= p(t), j < Lk);
* per-entry KL = sum_j P_T (log P_T - log P_S) over P_T > 0, stored at the entry's CSR
  position (summed by torch afterwards: deterministic, no float atomics);
* dz = (P_S - P_T); per-entry dqi partial = dz @ ki_c * grad_scale at the entry's CSR
  position (``dqi_reduce_kernel`` sums a row's <= K partials in slot order:
  deterministic); dki_c += dz^T @ qi in registers over the segment, flushed once per
  segment with float32 atomics (ki has one head shared by all groups). dz is broadcast
  back to TM rows for these two products; the padded qi rows are zero, so their copies
  of dz add nothing to dki, and their dqi rows are not stored.

``kl_index_lse_kernel`` (only when ``index_lse`` is not given) is a short first pass over
the same schedule: the per-entry logsumexp of z over the entry's visible keys; the
launcher merges a row's <= K entries.

Exponentials use exp2 with log2(e) folded into the scales.
"""

import triton
import triton.language as tl

from ..attention.kernels import segment_block

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _index_scores(QI, kit, entry_row, g, es, e1, stride_it, stride_ih,
                  TOKENS: tl.constexpr, TM: tl.constexpr, BLOCK: tl.constexpr, DI: tl.constexpr,
                  IEEE: tl.constexpr):
    """z = qi[t, g] . ki_blk^T (unscaled, float32) of the tile's TOKENS tokens -> [TOKENS, B],
    and the padded qi tile [TM, DI] (token i in row i * REP, zeros elsewhere)."""
    REP: tl.constexpr = TM // TOKENS
    ri = tl.arange(0, TM)
    ei = es + ri // REP
    ok = (ri % REP == 0) & (ei < e1)
    t = tl.load(entry_row + ei, mask=ok, other=0).to(tl.int64)
    di = tl.arange(0, DI)
    qi = tl.load(QI + t[:, None] * stride_it + g * stride_ih + di[None, :],
                 mask=ok[:, None], other=0.0)
    if IEEE:
        zp = tl.dot(qi, tl.trans(kit), input_precision="ieee")
    else:
        zp = tl.dot(qi, tl.trans(kit))
    if REP == 1:
        z = zp
    else:
        z = tl.sum(tl.reshape(zp, (TOKENS, REP, BLOCK)), 1)
    return z, qi, ei, ok


@triton.jit
def kl_fused_kernel(
    Q, K, QI, KI, LSE, ILSE, PART_KL, PART_DQI, DKI,
    tile_group, tile_start, tile_end,
    entry_row, row_seq, row_pos, seq_k_start, seq_len_k, block_base,
    num_blocks_bound, scale_log2, scale_i_log2, grad_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_it, stride_ih, stride_kit,
    stride_lt, stride_lh, stride_ilg, stride_ilt, stride_dkt,
    G: tl.constexpr, G_PAD: tl.constexpr, TOKENS: tl.constexpr, TM: tl.constexpr,
    BLOCK: tl.constexpr, D: tl.constexpr, DI: tl.constexpr,
    IEEE_Q: tl.constexpr, IEEE_I: tl.constexpr, WITH_GRAD: tl.constexpr,
):
    w = tl.program_id(0)
    e0, e1, g, c, k_start, len_k = segment_block(
        w, tile_group, tile_start, tile_end, entry_row, row_seq, seq_k_start, seq_len_k,
        block_base, num_blocks_bound)
    if e0 < e1:
        REP: tl.constexpr = TM // TOKENS
        d = tl.arange(0, D)
        di = tl.arange(0, DI)
        j = c * BLOCK + tl.arange(0, BLOCK)
        key_ok = j < len_k
        krow = k_start + j.to(tl.int64)
        kt = tl.load(K + krow[:, None] * stride_kt + g * stride_kh + d[None, :],
                     mask=key_ok[:, None], other=0.0)
        kit = tl.load(KI + krow[:, None] * stride_kit + di[None, :], mask=key_ok[:, None], other=0.0)
        dki = tl.zeros((BLOCK, DI), tl.float32)
        r = tl.arange(0, TOKENS * G_PAD)
        h = r % G_PAD
        ti = tl.arange(0, TOKENS)
        for es in range(e0, e1, TOKENS):
            # ---- teacher: group mean of the Main Branch softmax, [TOKENS, B]
            e = es + r // G_PAD
            row_ok = (e < e1) & (h < G)
            t = tl.load(entry_row + e, mask=row_ok, other=0).to(tl.int64)
            pos = tl.load(row_pos + t, mask=row_ok, other=-1)
            head = (g * G + h).to(tl.int64)
            q = tl.load(Q + t[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                        mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + t * stride_lt + head * stride_lh, mask=row_ok, other=0.0)
            lse = tl.where(lse == float("-inf"), 0.0, lse) * 1.4426950408889634  # empty T: P = 0
            if IEEE_Q:
                s = tl.dot(q, tl.trans(kt), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(kt))
            visible = (j[None, :] <= pos[:, None]) & key_ok[None, :]
            p = tl.where(visible, tl.exp2(s * scale_log2 - lse[:, None]), 0.0)
            if G_PAD == 1:
                pt = p
            else:
                pt = tl.sum(tl.reshape(p, (TOKENS, G_PAD, BLOCK)), 1) * (1.0 / G)

            # ---- student: index softmax, [TOKENS, B]
            z, qi, ei, qi_ok = _index_scores(QI, kit, entry_row, g, es, e1, stride_it, stride_ih,
                                             TOKENS, TM, BLOCK, DI, IEEE_I)
            et = es + ti
            tok_ok = et < e1
            tt = tl.load(entry_row + et, mask=tok_ok, other=0).to(tl.int64)
            post = tl.load(row_pos + tt, mask=tok_ok, other=-1)
            ilse = tl.load(ILSE + g * stride_ilg + tt * stride_ilt, mask=tok_ok, other=0.0)
            ilse = tl.where(ilse == float("-inf"), 0.0, ilse) * 1.4426950408889634
            vis_t = (j[None, :] <= post[:, None]) & key_ok[None, :]
            log2_ps = z * scale_i_log2 - ilse[:, None]
            ps = tl.where(vis_t, tl.exp2(log2_ps), 0.0)

            # ---- KL(P_T || P_S) of the entry over this block's keys
            pos_t = pt > 0
            term = tl.where(pos_t, pt * (tl.log2(tl.where(pos_t, pt, 1.0)) - log2_ps), 0.0)
            kl = tl.sum(term, 1) * 0.6931471805599453
            tl.store(PART_KL + et, kl, mask=tok_ok)

            if WITH_GRAD:
                dz = ps - pt  # 0 where not visible (both are)
                if REP == 1:
                    dzp = dz
                else:
                    dzp = tl.reshape(tl.broadcast_to(dz[:, None, :], (TOKENS, REP, BLOCK)), (TM, BLOCK))
                if IEEE_I:
                    dqi = tl.dot(dzp, kit, input_precision="ieee")
                    dki += tl.dot(tl.trans(dzp), qi, input_precision="ieee")
                else:
                    dqi = tl.dot(dzp.to(kit.dtype), kit)
                    dki += tl.dot(tl.trans(dzp.to(qi.dtype)), qi)
                tl.store(PART_DQI + ei.to(tl.int64)[:, None] * DI + di[None, :], dqi * grad_scale,
                         mask=qi_ok[:, None])
        if WITH_GRAD:
            tl.atomic_add(DKI + krow[:, None] * stride_dkt + di[None, :], dki * grad_scale,
                          mask=key_ok[:, None])


@triton.jit
def dqi_reduce_kernel(
    PART_DQI, entry_of, DQI, row0, num_rows, topk, stride_qt, stride_qh,
    DI: tl.constexpr, ROWS: tl.constexpr,
):
    """dqi[t, g] = sum of the row's per-entry partials in slot order (deterministic).
    One program per ROWS rows of one group."""
    i = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    g = tl.program_id(1)
    i_ok = i < num_rows
    di = tl.arange(0, DI)
    base = (g.to(tl.int64) * num_rows + i) * topk
    acc = tl.zeros((ROWS, DI), tl.float32)
    for s in range(topk):
        e = tl.load(entry_of + base + s, mask=i_ok, other=-1)
        ok = e >= 0
        acc += tl.load(PART_DQI + e.to(tl.int64)[:, None] * DI + di[None, :], mask=ok[:, None],
                       other=0.0)
    t = (row0 + i).to(tl.int64)
    tl.store(DQI + t[:, None] * stride_qt + g * stride_qh + di[None, :],
             acc.to(DQI.dtype.element_ty), mask=i_ok[:, None])
