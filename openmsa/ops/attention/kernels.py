"""Triton kernels of the sparse attention forward, KV-outer (docs/spec.md section 5).

``sparse_fwd_tile_kernel``: one program per segment of the schedule (schedule.py):
one key block of one group and a run of the query rows that selected it, walked in
tiles of TOKENS query tokens x the G_PAD heads of the group (one MMA tile). It loads
the key block once, computes the exact softmax of each tile's rows over the block's
visible keys and writes normalised partial outputs and their LSEs at the entries'
CSR positions.

The row's <= K partials are merged by ``openmsa.ops.utils.partials.combine_kernel``.

Scores are kept in log2 units (scale * log2(e) folded into one multiply) so the
softmax uses exp2.

Non-finite inputs (api.sparse_attention): a NaN or +inf score makes the row's sums NaN
(exp2(s - m) is NaN at s = m = +inf), and the guards for empty token sets test for an
exact 0 so that they let NaN through. The block maximum may drop NaN (tl.max / tl.maximum
on the GPU return the other operand): NaN still reaches the sums through exp2(NaN - m).
A key whose V is not finite makes the rows that have it in their token set NaN, whatever
its weight, as SDPA's 0 * NaN does (CHECK_V: its scores are made NaN and its V 0, once per
segment; an LSE-only caller, the KL's teacher normaliser, turns this off).

Deterministic backward: the segments of a key block cut into several write their dK, dV
sums to scratch slots (``openmsa.ops.utils.schedule``), added in tile order by
``openmsa.ops.utils.partials.key_partial_reduce_kernel``.
"""

import triton
import triton.language as tl

from ..utils.tiles import LN2, LOG2E, entry_tokens, key_block, mma, segment_block


@triton.jit
def sparse_fwd_tile_kernel(
    Q, K, V, PART_O, PART_LSE,
    tile_group, tile_start, tile_end,
    entry_row, row_seq, row_pos, seq_k_start, seq_len_k, block_base,
    num_blocks_bound, scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    PAGE_TABLE, stride_kp, stride_vp, stride_pb,
    G: tl.constexpr, G_PAD: tl.constexpr, TOKENS: tl.constexpr, BLOCK: tl.constexpr,
    D: tl.constexpr, IEEE: tl.constexpr, PAGED: tl.constexpr, CHECK_V: tl.constexpr,
):
    w = tl.program_id(0)
    e0, e1, g, c, k_start, len_k = segment_block(
        w, tile_group, tile_start, tile_end, entry_row, row_seq, seq_k_start, seq_len_k,
        block_base, num_blocks_bound)
    if e0 < e1:

        d = tl.arange(0, D)
        jn = tl.arange(0, BLOCK)
        j = c * BLOCK + jn  # key positions within the sequence
        key_ok = j < len_k
        if PAGED:
            # serving: K, V are page pools [num_pages, BLOCK, Hkv, D]; block c of the
            # sequence is physical page page_table[seq, c]
            seq = tl.load(row_seq + tl.load(entry_row + e0))
            page = tl.load(PAGE_TABLE + seq.to(tl.int64) * stride_pb + c).to(tl.int64)
            k_off = page * stride_kp + jn.to(tl.int64) * stride_kt
            v_off = page * stride_vp + jn.to(tl.int64) * stride_vt
        else:
            krow = k_start + j.to(tl.int64)
            k_off = krow * stride_kt
            v_off = krow * stride_vt
        kt = tl.load(K + k_off[:, None] + g * stride_kh + d[None, :], mask=key_ok[:, None], other=0.0)
        vt = tl.load(V + v_off[:, None] + g * stride_vh + d[None, :], mask=key_ok[:, None], other=0.0)
        if CHECK_V:
            # poison[j] = 0, or NaN when v[j] is not finite: NaN scores for key j (every row
            # with j in its token set is NaN) and v[j] = 0 (through the PV product a
            # non-finite v[j] would reach the rows that do not see j: 0 * inf = NaN)
            poison = tl.sum(vt * 0.0, 1)
            kt = kt + poison[:, None]
            vt = tl.where((poison == 0)[:, None], vt, 0.0)
        r = tl.arange(0, TOKENS * G_PAD)
        h = r % G_PAD
        # The block stays in registers while the segment's query tiles stream past it.
        for es in range(e0, e1, TOKENS):
            e = es + r // G_PAD
            row_ok = (e < e1) & (h < G)
            t, pos = entry_tokens(entry_row, row_pos, e, row_ok)
            q = tl.load(Q + t[:, None] * stride_qt + (g * G + h)[:, None].to(tl.int64) * stride_qh
                        + d[None, :], mask=row_ok[:, None], other=0.0)
            s = mma(q, tl.trans(kt), IEEE) * scale_log2
            visible = (j[None, :] <= pos[:, None]) & key_ok[None, :]
            s = tl.where(visible, s, float("-inf"))
            m = tl.max(s, 1)
            m = tl.where(m == float("-inf"), 0.0, m)
            p = tl.exp2(s - m[:, None])
            l = tl.sum(p, 1)
            o = mma(p.to(vt.dtype), vt, IEEE)
            # l == 0: no key of the block in the token set (out 0, lse -inf); NaN passes
            l_safe = tl.where(l == 0, 1.0, l)
            o = o / l_safe[:, None]
            lse = tl.where(l == 0, float("-inf"), (m + tl.log2(l_safe)) * LN2)
            out_row = e.to(tl.int64) * G + h
            tl.store(PART_O + out_row[:, None] * D + d[None, :], o.to(PART_O.dtype.element_ty),
                     mask=row_ok[:, None])
            tl.store(PART_LSE + out_row, lse, mask=row_ok)


@triton.jit
def _bwd_segment(
    w, split, Q, K, V, DO, LSE, DELTA, PART_DQ, DK, DV, TILE_SLOT, PART_DK, PART_DV,
    tile_group, tile_start, tile_end,
    entry_row, row_seq, row_pos, seq_k_start, seq_len_k, block_base,
    num_blocks_bound, scale, scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_lt, stride_dkt, stride_dkh,
    G: tl.constexpr, G_PAD: tl.constexpr, TOKENS: tl.constexpr, BLOCK: tl.constexpr,
    SLICE: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr,
    WITH_DQ: tl.constexpr, WITH_DKDV: tl.constexpr, DETERMINISTIC: tl.constexpr,
):
    """Segment w of the schedule: one key block of one group (keys [split * SLICE,
    (split + 1) * SLICE) of it) and a run of the CSR entries that selected it, walked
    TOKENS query tokens (x G heads) at a time. WITH_DKDV: dK, dV of the slice accumulate
    in registers over the segment and are added to the float32 accumulators once
    (atomics only between segments of a hot block; DETERMINISTIC: such segments write
    their sums to their scratch slot instead, rows [split * SLICE, ...) of a [BLOCK, D]
    slot of PART_DK / PART_DV, for key_partial_reduce_kernel). WITH_DQ (needs SLICE ==
    BLOCK): dQ of each entry goes to its CSR position, summed per row by row_sum_kernel."""
    e0, e1, g, c, k_start, len_k = segment_block(
        w, tile_group, tile_start, tile_end, entry_row, row_seq, seq_k_start, seq_len_k,
        block_base, num_blocks_bound)
    if e0 < e1:
        d = tl.arange(0, D)
        j = c * BLOCK + split * SLICE + tl.arange(0, SLICE)
        key_ok = j < len_k
        krow = k_start + j.to(tl.int64)
        kt = key_block(K, k_start, j, key_ok, stride_kt, g * stride_kh, d)
        vt = key_block(V, k_start, j, key_ok, stride_vt, g * stride_vh, d)
        if WITH_DKDV:
            dk = tl.zeros((SLICE, D), tl.float32)
            dv = tl.zeros((SLICE, D), tl.float32)
        r = tl.arange(0, TOKENS * G_PAD)
        h = r % G_PAD
        for es in range(e0, e1, TOKENS):
            e = es + r // G_PAD
            row_ok = (e < e1) & (h < G)
            t, pos = entry_tokens(entry_row, row_pos, e, row_ok)
            head = (g * G + h).to(tl.int64)
            q = tl.load(Q + t[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                        mask=row_ok[:, None], other=0.0)
            do = tl.load(DO + t[:, None] * stride_dot + head[:, None] * stride_doh + d[None, :],
                         mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + t * stride_lt + head, mask=row_ok, other=0.0) * LOG2E
            delta = tl.load(DELTA + t * stride_lt + head, mask=row_ok, other=0.0)
            s = mma(q, tl.trans(kt), IEEE)
            visible = (j[None, :] <= pos[:, None]) & key_ok[None, :]
            p = tl.where(visible, tl.exp2(s * scale_log2 - lse[:, None]), 0.0)
            if WITH_DKDV:
                dv += mma(tl.trans(p.to(do.dtype)), do, IEEE)
            dp = mma(do, tl.trans(vt), IEEE)
            ds = p * (dp - delta[:, None])
            if WITH_DKDV:
                dk += mma(tl.trans(ds.to(q.dtype)), q, IEEE)
            if WITH_DQ:
                dq = mma(ds.to(kt.dtype), kt, IEEE)
                out_row = e.to(tl.int64) * G + h
                tl.store(PART_DQ + out_row[:, None] * D + d[None, :],
                         (dq * scale).to(PART_DQ.dtype.element_ty), mask=row_ok[:, None])
        if WITH_DKDV:
            dst = krow[:, None] * stride_dkt + g * stride_dkh + d[None, :]
            if DETERMINISTIC:
                slot = tl.load(TILE_SLOT + w)
                if slot >= 0:
                    prow = slot.to(tl.int64) * BLOCK + split * SLICE + tl.arange(0, SLICE)
                    tl.store(PART_DK + prow[:, None] * D + d[None, :], dk * scale)
                    tl.store(PART_DV + prow[:, None] * D + d[None, :], dv)
                else:  # the only segment of its group: one add per address in the launch
                    tl.atomic_add(DK + dst, dk * scale, mask=key_ok[:, None])
                    tl.atomic_add(DV + dst, dv, mask=key_ok[:, None])
            else:
                tl.atomic_add(DK + dst, dk * scale, mask=key_ok[:, None])
                tl.atomic_add(DV + dst, dv, mask=key_ok[:, None])


@triton.jit
def sparse_bwd_kernel(
    Q, K, V, DO, LSE, DELTA, PART_DQ, DK, DV, TILE_SLOT, PART_DK, PART_DV,
    tile_group, tile_start, tile_end,
    entry_row, row_seq, row_pos, seq_k_start, seq_len_k, block_base,
    num_blocks_bound, scale, scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_lt, stride_dkt, stride_dkh,
    G: tl.constexpr, G_PAD: tl.constexpr, TOKENS: tl.constexpr, BLOCK: tl.constexpr,
    D: tl.constexpr, IEEE: tl.constexpr,
    SPLIT: tl.constexpr, ROLE_COUNT: tl.constexpr, ROLE_OFFSET: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
):
    """The backward of segment pid // ROLE_COUNT, role ROLE_OFFSET + pid % ROLE_COUNT.

    SPLIT=False: one role, dQ, dK and dV of the whole block in one pass (dK, dV
    accumulators of [BLOCK, D] float32: one program per SM at BLOCK = D = 128).
    SPLIT=True: roles 0 and 1 accumulate dK, dV of the two half blocks, role 2 computes
    dQ over the whole block; S and dP are computed twice, but each role needs half the
    registers, so two programs share an SM. Launched with ROLE_COUNT=3 the three roles of
    a segment are neighbours in the grid, run at the same time and read the same query
    rows, so two of the three reads of Q and dO per entry hit L2; ROLE_COUNT=2 / 1 with
    offsets 0 / 2 launch the dK/dV roles and the dQ role separately. DETERMINISTIC: see
    _bwd_segment."""
    pid = tl.program_id(0)
    w = pid // ROLE_COUNT
    role = ROLE_OFFSET + pid % ROLE_COUNT
    args = (Q, K, V, DO, LSE, DELTA, PART_DQ, DK, DV, TILE_SLOT, PART_DK, PART_DV,
            tile_group, tile_start, tile_end,
            entry_row, row_seq, row_pos, seq_k_start, seq_len_k, block_base,
            num_blocks_bound, scale, scale_log2,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
            stride_dot, stride_doh, stride_lt, stride_dkt, stride_dkh)
    if SPLIT:
        if role < 2:
            _bwd_segment(w, role, *args, G, G_PAD, TOKENS, BLOCK, BLOCK // 2, D, IEEE,
                         False, True, DETERMINISTIC)
        else:
            _bwd_segment(w, 0, *args, G, G_PAD, TOKENS, BLOCK, BLOCK, D, IEEE, True, False,
                         DETERMINISTIC)
    else:
        _bwd_segment(w, 0, *args, G, G_PAD, TOKENS, BLOCK, BLOCK, D, IEEE, True, True,
                     DETERMINISTIC)


@triton.jit
def softmax_delta_kernel(
    DO, OUT, DELTA, num_rows, num_heads, stride_dot, stride_doh, stride_ot, stride_oh,
    ROWS: tl.constexpr, D: tl.constexpr,
):
    """delta[t, h] = sum_d dO[t, h, d] * O[t, h, d] in float32 (the softmax backward's
    correction term), ROWS (row, head) pairs per program, without float32 copies of
    dO and O."""
    i = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    ok = i < num_rows * num_heads
    t = i // num_heads
    h = i % num_heads
    d = tl.arange(0, D)
    do = tl.load(DO + t[:, None] * stride_dot + h[:, None] * stride_doh + d[None, :],
                 mask=ok[:, None], other=0.0).to(tl.float32)
    o = tl.load(OUT + t[:, None] * stride_ot + h[:, None] * stride_oh + d[None, :],
                mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + i, tl.sum(do * o, 1), mask=ok)
