"""Triton kernels of the sparse attention forward, KV-outer (docs/spec.md section 5).

``sparse_fwd_tile_kernel``: one program per segment of the schedule (schedule.py):
one key block of one group and a run of the query rows that selected it, walked in
tiles of TOKENS query tokens x the G_PAD heads of the group (one MMA tile). It loads
the key block once, computes the exact softmax of each tile's rows over the block's
visible keys and writes normalised partial outputs and their LSEs at the entries'
CSR positions.

``combine_kernel``: one program per (query row, group) merges the row's <= K partials
(flash-decoding style) into the output and the final LSE.

Scores are kept in log2 units (scale * log2(e) folded into one multiply) so the
softmax uses exp2.

Non-finite inputs (api.sparse_attention): a NaN or +inf score makes the row's sums NaN
(exp2(s - m) is NaN at s = m = +inf), and the guards for empty token sets test for an
exact 0 so that they let NaN through. The block maximum may drop NaN (tl.max / tl.maximum
on the GPU return the other operand): NaN still reaches the sums through exp2(NaN - m).
A key whose V is not finite makes the rows that have it in their token set NaN, whatever
its weight, as SDPA's 0 * NaN does (CHECK_V: its scores are made NaN and its V 0, once per
segment; an LSE-only caller, the KL's teacher normaliser, turns this off).

Deterministic backward: ``key_partial_reduce_kernel`` (see schedule.py).
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def segment_block(w, tile_group, tile_start, tile_end, entry_row, row_seq, seq_k_start,
                  seq_len_k, block_base, num_blocks_bound):
    """What program w of a schedule (schedule.py) works on: its CSR entry range [e0, e1)
    (empty for the programs past the real count), its group g, the key block's id c
    within its sequence, the sequence's first key row and its key count."""
    e0 = tl.load(tile_start + w)
    e1 = tl.load(tile_end + w)
    grp = tl.load(tile_group + w)
    g = grp // num_blocks_bound
    seq = tl.load(row_seq + tl.load(entry_row + e0))
    c = grp % num_blocks_bound - tl.load(block_base + seq)
    k_start = tl.load(seq_k_start + seq).to(tl.int64)
    len_k = tl.load(seq_len_k + seq)
    return e0, e1, g, c, k_start, len_k


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
            t = tl.load(entry_row + e, mask=row_ok, other=0).to(tl.int64)
            pos = tl.load(row_pos + t, mask=row_ok, other=-1)
            q = tl.load(Q + t[:, None] * stride_qt + (g * G + h)[:, None].to(tl.int64) * stride_qh
                        + d[None, :], mask=row_ok[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(kt), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(kt))
            s = s * scale_log2
            visible = (j[None, :] <= pos[:, None]) & key_ok[None, :]
            s = tl.where(visible, s, float("-inf"))
            m = tl.max(s, 1)
            m = tl.where(m == float("-inf"), 0.0, m)
            p = tl.exp2(s - m[:, None])
            l = tl.sum(p, 1)
            if IEEE:
                o = tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
            else:
                o = tl.dot(p.to(vt.dtype), vt)
            # l == 0: no key of the block in the token set (out 0, lse -inf); NaN passes
            l_safe = tl.where(l == 0, 1.0, l)
            o = o / l_safe[:, None]
            lse = tl.where(l == 0, float("-inf"), (m + tl.log2(l_safe)) * 0.6931471805599453)
            out_row = e.to(tl.int64) * G + h
            tl.store(PART_O + out_row[:, None] * D + d[None, :], o.to(PART_O.dtype.element_ty),
                     mask=row_ok[:, None])
            tl.store(PART_LSE + out_row, lse, mask=row_ok)


@triton.jit
def combine_kernel(
    PART_O, PART_LSE, entry_of, OUT, LSE,
    row0, num_rows, topk,
    stride_ot, stride_oh, stride_lt,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
):
    i = tl.program_id(0)  # row within the chunk
    g = tl.program_id(1)
    h = tl.arange(0, G_PAD)
    h_ok = h < G
    d = tl.arange(0, D)
    base = (g.to(tl.int64) * num_rows + i) * topk
    # Pass 1: running max and normaliser of the partial LSEs, per head.
    m = tl.full((G_PAD,), float("-inf"), tl.float32)
    for s in range(topk):
        e = tl.load(entry_of + base + s)
        if e >= 0:
            lse_s = tl.load(PART_LSE + e.to(tl.int64) * G + h, mask=h_ok, other=float("-inf"))
            m = tl.maximum(m, lse_s)  # may drop a NaN partial: it reaches den through wgt
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    den = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, D), tl.float32)
    for s in range(topk):
        e = tl.load(entry_of + base + s)
        if e >= 0:
            row = e.to(tl.int64) * G + h
            lse_s = tl.load(PART_LSE + row, mask=h_ok, other=float("-inf"))
            wgt = tl.exp(lse_s - m_safe)
            den += wgt
            acc += wgt[:, None] * tl.load(PART_O + row[:, None] * D + d[None, :],
                                          mask=h_ok[:, None], other=0.0).to(tl.float32)
    den_safe = tl.where(den == 0, 1.0, den)
    out = acc / den_safe[:, None]  # empty token set: acc = 0 -> out = 0; NaN passes
    lse = tl.where(den == 0, float("-inf"), m_safe + tl.log(den_safe))
    t = (row0 + i).to(tl.int64)
    heads = (g * G + h).to(tl.int64)
    tl.store(OUT + t * stride_ot + heads[:, None] * stride_oh + d[None, :],
             out.to(OUT.dtype.element_ty), mask=h_ok[:, None])
    tl.store(LSE + t * stride_lt + heads, lse, mask=h_ok)


@triton.jit
def _bwd_segment(
    w, split, Q, K, V, DO, LSE, DELTA, PART_DQ, DK, DV, TILE_SLOT, PART_DK, PART_DV,
    tile_group, tile_start, tile_end,
    entry_row, row_seq, row_pos, seq_k_start, seq_len_k, block_base,
    num_blocks_bound, scale, scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_lt, stride_dkt, stride_dkh,
    G: tl.constexpr, G_PAD: tl.constexpr, TOKENS: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr,
    WITH_DQ: tl.constexpr, WITH_DKDV: tl.constexpr, DETERMINISTIC: tl.constexpr,
):
    """Segment w of the schedule: one key block of one group (keys [split * BLOCK_N,
    (split + 1) * BLOCK_N) of it) and a run of the CSR entries that selected it, walked
    TOKENS query tokens (x G heads) at a time. WITH_DKDV: dK, dV of the slice accumulate
    in registers over the segment and are added to the float32 accumulators once
    (atomics only between segments of a hot block; DETERMINISTIC: such segments write
    their sums to their scratch slot instead, rows [split * BLOCK_N, ...) of a [BLOCK, D]
    slot of PART_DK / PART_DV, for key_partial_reduce_kernel). WITH_DQ (needs BLOCK_N ==
    BLOCK): dQ of each entry goes to its CSR position, reduced per row by dq_reduce_kernel."""
    e0, e1, g, c, k_start, len_k = segment_block(
        w, tile_group, tile_start, tile_end, entry_row, row_seq, seq_k_start, seq_len_k,
        block_base, num_blocks_bound)
    if e0 < e1:
        d = tl.arange(0, D)
        j = c * BLOCK + split * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = j < len_k
        krow = k_start + j.to(tl.int64)
        kt = tl.load(K + krow[:, None] * stride_kt + g * stride_kh + d[None, :],
                     mask=key_ok[:, None], other=0.0)
        vt = tl.load(V + krow[:, None] * stride_vt + g * stride_vh + d[None, :],
                     mask=key_ok[:, None], other=0.0)
        if WITH_DKDV:
            dk = tl.zeros((BLOCK_N, D), tl.float32)
            dv = tl.zeros((BLOCK_N, D), tl.float32)
        r = tl.arange(0, TOKENS * G_PAD)
        h = r % G_PAD
        for es in range(e0, e1, TOKENS):
            e = es + r // G_PAD
            row_ok = (e < e1) & (h < G)
            t = tl.load(entry_row + e, mask=row_ok, other=0).to(tl.int64)
            pos = tl.load(row_pos + t, mask=row_ok, other=-1)
            head = (g * G + h).to(tl.int64)
            q = tl.load(Q + t[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                        mask=row_ok[:, None], other=0.0)
            do = tl.load(DO + t[:, None] * stride_dot + head[:, None] * stride_doh + d[None, :],
                         mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + t * stride_lt + head, mask=row_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + t * stride_lt + head, mask=row_ok, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(kt), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(kt))
            visible = (j[None, :] <= pos[:, None]) & key_ok[None, :]
            p = tl.where(visible, tl.exp2(s * scale_log2 - lse[:, None]), 0.0)
            if WITH_DKDV:
                if IEEE:
                    dv += tl.dot(tl.trans(p), do, input_precision="ieee")
                else:
                    dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            if IEEE:
                dp = tl.dot(do, tl.trans(vt), input_precision="ieee")
            else:
                dp = tl.dot(do, tl.trans(vt))
            ds = p * (dp - delta[:, None])
            if WITH_DKDV:
                if IEEE:
                    dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
                else:
                    dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
            if WITH_DQ:
                if IEEE:
                    dq = tl.dot(ds, kt, input_precision="ieee")
                else:
                    dq = tl.dot(ds.to(kt.dtype), kt)
                out_row = e.to(tl.int64) * G + h
                tl.store(PART_DQ + out_row[:, None] * D + d[None, :],
                         (dq * scale).to(PART_DQ.dtype.element_ty), mask=row_ok[:, None])
        if WITH_DKDV:
            dst = krow[:, None] * stride_dkt + g * stride_dkh + d[None, :]
            if DETERMINISTIC:
                slot = tl.load(TILE_SLOT + w)
                if slot >= 0:
                    prow = slot.to(tl.int64) * BLOCK + split * BLOCK_N + tl.arange(0, BLOCK_N)
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
def key_partial_reduce_kernel(
    PART, DST, reduce_tile, reduce_count, tile_slot,
    tile_group, tile_start, tile_end, entry_row, row_seq, seq_k_start, seq_len_k, block_base,
    num_blocks_bound, stride_dt, stride_dg,
    BLOCK: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr,
):
    """Deterministic key-gradient flush (schedule.py): program (i, r) adds to DST[keys of
    rows [r * ROWS, (r + 1) * ROWS) of block c, group g] the [BLOCK, D] float32 slots of
    the i-th multi-tile group (g, c) of the schedule, summed in tile order. It is the only
    writer of those addresses in its launch, so a plain read-add-write suffices. DST row of
    key row kr and group g: kr * stride_dt + g * stride_dg."""
    i = tl.program_id(0)
    n = tl.load(reduce_count + i)
    if n > 0:
        w0 = tl.load(reduce_tile + i)
        e0, e1, g, c, k_start, len_k = segment_block(
            w0, tile_group, tile_start, tile_end, entry_row, row_seq, seq_k_start, seq_len_k,
            block_base, num_blocks_bound)
        jr = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        d = tl.arange(0, D)
        slot0 = tl.load(tile_slot + w0).to(tl.int64)
        acc = tl.zeros((ROWS, D), tl.float32)
        for s in range(n):
            acc += tl.load(PART + ((slot0 + s) * BLOCK + jr)[:, None] * D + d[None, :])
        j = c * BLOCK + jr
        key_ok = (j < len_k)[:, None]
        dst = (DST + (k_start + j.to(tl.int64))[:, None] * stride_dt
               + g.to(tl.int64) * stride_dg + d[None, :])
        tl.store(dst, tl.load(dst, mask=key_ok, other=0.0) + acc, mask=key_ok)


@triton.jit
def dq_reduce_kernel(
    PART_DQ, entry_of, DQ, row0, num_rows, topk, stride_qt, stride_qh,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
):
    """dq[t, heads of g] = sum of the row's per-entry partials (fixed order: deterministic)."""
    i = tl.program_id(0)
    g = tl.program_id(1)
    h = tl.arange(0, G_PAD)
    h_ok = h < G
    d = tl.arange(0, D)
    base = (g.to(tl.int64) * num_rows + i) * topk
    acc = tl.zeros((G_PAD, D), tl.float32)
    for s in range(topk):
        e = tl.load(entry_of + base + s)
        if e >= 0:
            row = e.to(tl.int64) * G + h
            acc += tl.load(PART_DQ + row[:, None] * D + d[None, :], mask=h_ok[:, None],
                           other=0.0).to(tl.float32)
    t = (row0 + i).to(tl.int64)
    heads = (g * G + h).to(tl.int64)
    tl.store(DQ + t * stride_qt + heads[:, None] * stride_qh + d[None, :],
             acc.to(DQ.dtype.element_ty), mask=h_ok[:, None])


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
