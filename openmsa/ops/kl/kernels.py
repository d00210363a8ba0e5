"""Triton kernels of the indexer's sparse KL loss (docs/spec.md section 6), KV-outer.

They run over the KV-outer schedule (``openmsa.ops.utils.schedule``, the sparse
attention's): one program per segment = one key block c of one
group g and a run of the CSR entries (query rows that selected c). Two passes, so that
each runs full MMA tiles with few registers:

``kl_teacher_kernel`` (the Main Branch side) walks the segment in tiles of TOKENS query
tokens x G_PAD heads (the attention forward's tile): main scores
s = q[rows, heads of g] . K_c^T * scale, P = exp(s - lse[t, h]) on the visible keys
(j <= p(t), j < Lk), and the teacher P_T(t, j) = mean over the G heads of P ([TOKENS *
G_PAD, B] reshaped to [TOKENS, G_PAD, B], padded heads masked to 0), stored float32 at
the entry's CSR position ([E, B]: 512 bytes per entry at B = 128).

``kl_student_kernel`` (the Index Branch side) walks the same segment ROWS entries at a
time (one index head per entry, so a full MMA tile of entries): index scores
z = qi[t, g] . ki_c^T * scale_i, log P_S = z - index_lse[g, t] on the visible keys,
the per-entry KL = sum_j P_T (log P_T - log P_S) over P_T > 0 (summed by torch
afterwards: deterministic), and with gradients dz = P_S - P_T:
per-entry dqi partial = dz @ ki_c (``openmsa.ops.utils.partials.row_sum_kernel`` sums a
row's <= K partials in slot order: deterministic) and dki_c += dz^T @ qi in registers over the segment,
flushed once per segment with float32 atomics (ki has one head shared by all groups).
Deterministic mode (DETERMINISTIC): every group g flushes into its own float32 dki_g
(stride_dkg; summed over g in order by the launcher), a group's only segment adds its
sum directly and the segments of a block cut into several write their scratch slot
(``openmsa.ops.utils.schedule``), added in tile order by key_partial_reduce_kernel.

Non-finite values: the KL terms are dropped where P_T == 0 exactly (0 log 0 = 0), not
where "P_T > 0" fails, so that a NaN teacher keeps its NaN term.

Two passes rather than one: a fused pass (the index scores on a [TOKENS, Di] qi tile
padded to 16 rows, the [B, Di] float32 dki accumulator beside the [TOKENS * G_PAD, B]
scores) ran at one program per SM, 64 ms at 128K on an H100 (benchmarks/NOTES.md).

Exponentials use exp2 with log2(e) folded into the scales.
"""

import triton
import triton.language as tl

from ..utils.tiles import LN2, LOG2E, entry_tokens, key_block, mma, segment_block


@triton.jit
def kl_teacher_kernel(
    Q, K, LSE, PART_PT,
    tile_group, tile_start, tile_end,
    entry_row, row_seq, row_pos, seq_k_start, seq_len_k, block_base,
    num_blocks_bound, scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_lh,
    G: tl.constexpr, G_PAD: tl.constexpr, TOKENS: tl.constexpr, BLOCK: tl.constexpr,
    D: tl.constexpr, IEEE: tl.constexpr,
):
    w = tl.program_id(0)
    e0, e1, g, c, k_start, len_k = segment_block(
        w, tile_group, tile_start, tile_end, entry_row, row_seq, seq_k_start, seq_len_k,
        block_base, num_blocks_bound)
    if e0 < e1:
        d = tl.arange(0, D)
        jb = tl.arange(0, BLOCK)
        j = c * BLOCK + jb
        key_ok = j < len_k
        kt = key_block(K, k_start, j, key_ok, stride_kt, g * stride_kh, d)
        r = tl.arange(0, TOKENS * G_PAD)
        h = r % G_PAD
        head = (g * G + h).to(tl.int64)
        ti = tl.arange(0, TOKENS)
        for es in range(e0, e1, TOKENS):
            e = es + r // G_PAD
            row_ok = (e < e1) & (h < G)
            t, pos = entry_tokens(entry_row, row_pos, e, row_ok)
            q = tl.load(Q + t[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                        mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + t * stride_lt + head * stride_lh, mask=row_ok, other=0.0)
            lse = tl.where(lse == float("-inf"), 0.0, lse) * LOG2E  # empty T: P = 0
            s = mma(q, tl.trans(kt), IEEE)
            visible = (j[None, :] <= pos[:, None]) & key_ok[None, :]
            p = tl.where(visible, tl.exp2(s * scale_log2 - lse[:, None]), 0.0)
            if G_PAD == 1:
                pt = p
            else:
                pt = tl.sum(tl.reshape(p, (TOKENS, G_PAD, BLOCK)), 1) * (1.0 / G)
            et = es + ti
            tl.store(PART_PT + et.to(tl.int64)[:, None] * BLOCK + jb[None, :], pt,
                     mask=(et < e1)[:, None])


@triton.jit
def kl_student_kernel(
    QI, KI, ILSE, PART_PT, PART_KL, PART_DQI, DKI, TILE_SLOT, PART_DKI,
    tile_group, tile_start, tile_end,
    entry_row, row_seq, row_pos, seq_k_start, seq_len_k, block_base,
    num_blocks_bound, scale_i_log2, grad_scale,
    stride_it, stride_ih, stride_kit, stride_ilg, stride_ilt, stride_dkt, stride_dkg,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, DI: tl.constexpr, IEEE: tl.constexpr,
    WITH_GRAD: tl.constexpr, DETERMINISTIC: tl.constexpr,
):
    w = tl.program_id(0)
    e0, e1, g, c, k_start, len_k = segment_block(
        w, tile_group, tile_start, tile_end, entry_row, row_seq, seq_k_start, seq_len_k,
        block_base, num_blocks_bound)
    if e0 < e1:
        di = tl.arange(0, DI)
        jb = tl.arange(0, BLOCK)
        j = c * BLOCK + jb
        key_ok = j < len_k
        krow = k_start + j.to(tl.int64)
        kit = key_block(KI, k_start, j, key_ok, stride_kit, 0, di)
        if WITH_GRAD:
            dki = tl.zeros((BLOCK, DI), tl.float32)
        ri = tl.arange(0, ROWS)
        for es in range(e0, e1, ROWS):
            e = es + ri
            ok = e < e1
            e64 = e.to(tl.int64)
            t, pos = entry_tokens(entry_row, row_pos, e, ok)
            qi = tl.load(QI + t[:, None] * stride_it + g * stride_ih + di[None, :],
                         mask=ok[:, None], other=0.0)
            ilse = tl.load(ILSE + g * stride_ilg + t * stride_ilt, mask=ok, other=0.0)
            ilse = tl.where(ilse == float("-inf"), 0.0, ilse) * LOG2E
            pt = tl.load(PART_PT + e64[:, None] * BLOCK + jb[None, :], mask=ok[:, None], other=0.0)
            z = mma(qi, tl.trans(kit), IEEE)
            visible = (j[None, :] <= pos[:, None]) & key_ok[None, :]
            log2_ps = z * scale_i_log2 - ilse[:, None]
            ps = tl.where(visible, tl.exp2(log2_ps), 0.0)
            # KL(P_T || P_S) of the entry over this block's keys (P_T = 0 off the visible keys)
            nz = pt != 0
            term = tl.where(nz, pt * (tl.log2(tl.where(nz, pt, 1.0)) - log2_ps), 0.0)
            tl.store(PART_KL + e, tl.sum(term, 1) * LN2, mask=ok)
            if WITH_GRAD:
                dz = ps - pt  # 0 where not visible (both are)
                dqi = mma(dz.to(kit.dtype), kit, IEEE)
                dki += mma(tl.trans(dz.to(qi.dtype)), qi, IEEE)
                tl.store(PART_DQI + e64[:, None] * DI + di[None, :], dqi * grad_scale,
                         mask=ok[:, None])
        if WITH_GRAD:
            dst = DKI + krow[:, None] * stride_dkt + di[None, :]
            if DETERMINISTIC:
                dst += g.to(tl.int64) * stride_dkg
                slot = tl.load(TILE_SLOT + w)
                if slot >= 0:
                    prow = slot.to(tl.int64) * BLOCK + jb
                    tl.store(PART_DKI + prow[:, None] * DI + di[None, :], dki * grad_scale)
                else:  # the only segment of (g, block): one add per address in the launch
                    tl.atomic_add(dst, dki * grad_scale, mask=key_ok[:, None])
            else:
                tl.atomic_add(dst, dki * grad_scale, mask=key_ok[:, None])
