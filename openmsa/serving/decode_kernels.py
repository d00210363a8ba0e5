"""Triton kernels of paged MSA decode (docs/spec.md sections 4, 5, 8): few query tokens per
request (1 to 16: the main token plus draft tokens, each at its own causal position)
against a long paged cache.

Decode is memory-bound: the Index Branch must read every index key of the request
(Di values per token) and the Main Branch reads K selected blocks per (token, group).
With a small batch there are too few (request, group) pairs to fill the GPU, so both
branches split their work across programs and merge afterwards (flash-decoding):

``decode_topk_split_kernel``: program (request b, split s) scores the request's ROWS =
q_tokens x Hkv index queries (all groups share the index keys: one read of each page
serves them all) against the pages [s * pages_per_split, ...) of the request, and keeps a
streaming per-row Top-(K-INIT-LOCAL) of the candidate blocks INIT <= c < l(row) - LOCAL + 1
(the blocks that are not forced, docs/spec.md section 4; by default c < l) as int64 sort keys
(``openmsa.ops.utils.topk``, shared with the Index Branch kernel: ordered score << 32 |
(0x7FFFFFFF - id), so a larger key is a higher score, ties to the smaller id, NaN below
-inf).

``decode_topk_merge_kernel``: program (request b, row) merges the splits' sorted
candidate lists pairwise (a tree of log2(NSPLIT) merges) and writes the best ranked block
ids (score descending, ties to the smaller id: the spec's deterministic order), then the
forced blocks in ascending order (by default the local block l alone), then -1. The global
Top-n is within the union of the splits' Top-n, so this is exact.

``decode_attention_split_kernel``: program (query row t, group g, split s) runs the G heads
of group g (one MMA tile of G_PAD rows) over the selected blocks of slots
[s * slots_per_split, ...) of its Top-k list (duplicates and blocks past the causal
position skipped), with an online softmax; it writes the normalised partial output and its
LSE, or with one split the final output directly. ``decode_attention_merge_kernel``
combines the splits.

Block ids are LOGICAL page ids of the request (page size = block size B): block c of
request b lives in physical page page_table[b, c] of the pools k_cache, v_cache
[num_pages, B, Hkv, D] and ki_cache [num_pages, B, Di]. All offsets into the pools are
int64 (num_pages * B * Hkv * D passes 2**31 at serving sizes). A page id outside
[0, num_pages) (plan() rejects them; nothing here trusts that) forms no address outside
the pools: the scan reads the id clamped into [0, num_pages), the attention skips the block.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..ops.utils.tiles import LN2, mma
from ..ops.utils.topk import (
    PAD_BASE, block_max, empty_topk, key_block_id, score_key, sorted_topk, topk_insert,
)


@triton.jit
def _load_index_pages(KI_CACHE, KI_SCALE, PAGE_TABLE, b, cb, c1, jj, d, num_pages,
                      stride_kp, stride_kt, stride_pb, stride_sp,
                      BLOCK: tl.constexpr, KI_FP8: tl.constexpr):
    """Index keys of logical pages [cb, cb + PAGES) of request b (masked at c1): [PAGES * B,
    Di], and their per-token FP8 scales [PAGES * B] (ones for 16-bit keys). A page id
    outside [0, num_pages) is clamped into it (two int32 ops, the masks untouched: masking
    the bad pages instead cost 13-20% of the scan with 32 rows on the H200)."""
    cpage = cb + jj // BLOCK
    ok = cpage < c1
    page = tl.load(PAGE_TABLE + b.to(tl.int64) * stride_pb + cpage, mask=ok, other=0)
    page = tl.minimum(tl.maximum(page, 0), num_pages - 1).to(tl.int64)
    kblk = tl.load(KI_CACHE + page[:, None] * stride_kp + (jj % BLOCK)[:, None] * stride_kt + d[None, :],
                   mask=ok[:, None], other=0.0)
    if KI_FP8:
        ksc = tl.load(KI_SCALE + page * stride_sp + jj % BLOCK, mask=ok, other=0.0)
    else:
        ksc = tl.full(jj.shape, 1.0, tl.float32)
    return kblk, ksc


@triton.jit
def _score_index_pages(qi, kblk, ksc, keys, kmin, cb, c1, cand_end, row_ok, pg, scale, QDTYPE: tl.constexpr,
                       ROWS: tl.constexpr, PAGES: tl.constexpr, BLOCK: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, NAN_MAX_REDUCE: tl.constexpr, KI_FP8: tl.constexpr,
                       INIT_BLOCKS: tl.constexpr):
    """Block scores of PAGES pages for every row, inserted into the rows' streaming Top-n
    of int64 keys (score order, then the lower block id) where the block is a candidate
    of the row (INIT_BLOCKS <= c < cand_end)."""
    if KI_FP8:
        # FP8 (E4M3) index keys with one float32 scale per token: half the bytes of the
        # scan. qi is FP8 too (an FP8 MMA; its per-row scale cannot change a row's
        # ranking, so it is not needed) or 16-bit (the keys are converted to it).
        z = tl.dot(qi, tl.trans(kblk.to(QDTYPE)))
        z = z * ksc[None, :]
    else:
        z = tl.dot(qi, tl.trans(kblk), input_precision=DOT_PRECISION)
    bmax_all = block_max(tl.reshape(z, (ROWS, PAGES, BLOCK)), 2, NAN_MAX_REDUCE)
    for pi in tl.static_range(PAGES):
        c = cb + pi
        if PAGES == 1:
            bmax = tl.reshape(bmax_all, (ROWS,))
        else:
            # column pi (a masked sum with one term; NaN kept by the where)
            bmax = tl.sum(tl.where(pg[None, :] == pi, bmax_all, 0.0), 1)
            bmax = tl.where(tl.sum(tl.where(pg[None, :] == pi, (bmax_all != bmax_all).to(tl.int32), 0), 1) > 0,
                            float("nan"), bmax)
        score = bmax * scale  # the reference's block score, bit for bit (monotone rounding)
        keys, kmin = topk_insert(keys, kmin, score_key(score, c),
                                 row_ok & (c >= INIT_BLOCKS) & (c < cand_end) & (c < c1))
    return keys, kmin


@triton.jit
def decode_topk_split_kernel(
    QI, KI_CACHE, PAGE_TABLE, ROW_SEQ_START, KV_LENS, CAND, PAGES_PER_SPLIT, KI_SCALE,
    scale, num_splits, num_pages,
    stride_qt, stride_qh, stride_kp, stride_kt, stride_pb, stride_sp,
    HKV: tl.constexpr, QMAX: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
    DI: tl.constexpr, TOPK: tl.constexpr, KPAD: tl.constexpr, PAGES: tl.constexpr,
    DOT_PRECISION: tl.constexpr, NAN_MAX_REDUCE: tl.constexpr, KI_FP8: tl.constexpr,
    INIT_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr,
):
    b = tl.program_id(0)
    s = tl.program_id(1)
    NSEL: tl.constexpr = TOPK - INIT_BLOCKS - LOCAL_BLOCKS  # ranked slots
    # read from memory so that a captured CUDA graph follows a re-plan
    pages_per_split = tl.load(PAGES_PER_SPLIT)
    q0 = tl.load(ROW_SEQ_START + b)
    nq = tl.load(ROW_SEQ_START + b + 1) - q0
    kv_len = tl.load(KV_LENS + b)
    r = tl.arange(0, ROWS)
    i = r // HKV  # query token of the row
    g = r % HKV  # its group
    row_ok = (i < nq) & (i < QMAX)
    pos = kv_len - nq + i
    cand_end = tl.where(row_ok, pos // BLOCK - (LOCAL_BLOCKS - 1), 0)  # candidates c < cand_end
    d = tl.arange(0, DI)
    qi = tl.load(QI + (q0 + i).to(tl.int64)[:, None] * stride_qt + g[:, None] * stride_qh + d[None, :],
                 mask=row_ok[:, None], other=0.0)
    col = tl.arange(0, KPAD)
    keys, kmin = empty_topk(ROWS, KPAD, NSEL)
    # candidate blocks: c < cand_end(row) for some row; the last row has the largest
    n_cand = tl.max(cand_end, axis=0)
    if NSEL == 0:
        n_cand = n_cand * 0  # nothing is ranked: no page to scan
    c0 = s * pages_per_split
    c1 = tl.minimum(c0 + pages_per_split, n_cand)
    # PAGES pages per iteration: one [ROWS, PAGES * B] dot and more bytes in flight per
    # program (the scan is memory-bound; a small batch has few programs)
    jj = tl.arange(0, PAGES * BLOCK)
    pg = tl.arange(0, PAGES)
    # (the compiled loop keeps one key buffer whatever num_stages says, so each step waits for
    # its keys; prefetching the next step's keys into registers was slower on the H100:
    # benchmarks/NOTES.md)
    for cb in range(c0, c1, PAGES):
        kblk, ksc = _load_index_pages(KI_CACHE, KI_SCALE, PAGE_TABLE, b, cb, c1, jj, d, num_pages,
                                      stride_kp, stride_kt, stride_pb, stride_sp, BLOCK, KI_FP8)
        keys, kmin = _score_index_pages(qi, kblk, ksc, keys, kmin, cb, c1, cand_end, row_ok, pg, scale,
                                        QI.dtype.element_ty, ROWS, PAGES, BLOCK, DOT_PRECISION,
                                        NAN_MAX_REDUCE, KI_FP8, INIT_BLOCKS)
    # sorted lists (best first) let the merge combine two lists with one max and one sort
    keys = sorted_topk(keys, NSEL, KPAD)
    base = ((b * num_splits + s).to(tl.int64) * ROWS + r)[:, None] * KPAD + col[None, :]
    tl.store(CAND + base, keys)


@triton.jit
def _merge_sorted_lists(keys, NLISTS: tl.constexpr, LOG2: tl.constexpr, KPAD: tl.constexpr):
    """[NLISTS, KPAD] lists sorted best first -> the best KPAD keys of all, sorted [KPAD].
    For two sorted lists a, b, max(a, reversed b) holds the best KPAD keys of their union
    (keys are distinct, or padding below every real key); sorting it gives the merged
    list. A tree of such merges costs log2(NLISTS) small sorts instead of one sort of
    all keys."""
    for lvl in tl.static_range(LOG2):
        pair = tl.permute(tl.reshape(keys, (NLISTS >> (lvl + 1), 2, KPAD)), (0, 2, 1))
        first, second = tl.split(pair)
        keys = tl.sort(tl.maximum(first, tl.flip(second, 1)), 1, descending=True)
    return tl.reshape(keys, (KPAD,))


@triton.jit
def decode_topk_reduce_kernel(
    CAND, CAND_OUT, ROW_SEQ_START, num_splits, num_groups,
    HKV: tl.constexpr, QMAX: tl.constexpr, ROWS: tl.constexpr, TOPK: tl.constexpr,
    KPAD: tl.constexpr, GROUP: tl.constexpr, LOG2_GROUP: tl.constexpr, NSEL: tl.constexpr,
):
    """First merge level when there are many splits: program (request b, row r, group j)
    merges the sorted lists of splits [j * GROUP, (j + 1) * GROUP) into one sorted list,
    so that the final merge (one program per row) reads num_groups lists, not num_splits."""
    b = tl.program_id(0)
    r = tl.program_id(1)
    j = tl.program_id(2)
    q0 = tl.load(ROW_SEQ_START + b)
    nq = tl.load(ROW_SEQ_START + b + 1) - q0
    i = r // HKV
    if (i < nq) & (i < QMAX):
        sp = j * GROUP + tl.arange(0, GROUP)
        col = tl.arange(0, KPAD)
        idx = ((b * num_splits + sp).to(tl.int64) * ROWS + r)[:, None] * KPAD + col[None, :]
        keys = tl.load(CAND + idx, mask=(sp < num_splits)[:, None] & (col < NSEL)[None, :],
                       other=PAD_BASE)
        top = _merge_sorted_lists(keys, GROUP, LOG2_GROUP, KPAD)
        tl.store(CAND_OUT + ((b * num_groups + j).to(tl.int64) * ROWS + r) * KPAD + col, top)


@triton.jit
def decode_topk_merge_kernel(
    CAND, ROW_SEQ_START, KV_LENS, TOPK_OUT, num_splits,
    stride_ig, stride_it,
    HKV: tl.constexpr, QMAX: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
    TOPK: tl.constexpr, KPAD: tl.constexpr, KOUT: tl.constexpr, NSPLIT_PAD: tl.constexpr,
    LOG2_NSPLIT: tl.constexpr, INIT_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr,
):
    b = tl.program_id(0)
    r = tl.program_id(1)
    NSEL: tl.constexpr = TOPK - INIT_BLOCKS - LOCAL_BLOCKS  # ranked slots
    q0 = tl.load(ROW_SEQ_START + b)
    nq = tl.load(ROW_SEQ_START + b + 1) - q0
    i = r // HKV
    g = r % HKV
    if (i < nq) & (i < QMAX):
        kv_len = tl.load(KV_LENS + b)
        local = (kv_len - nq + i) // BLOCK
        # forced blocks [0, n_init) and [lo_local, local] (docs/spec.md section 4)
        cand_end = local - (LOCAL_BLOCKS - 1)
        lo_local = tl.maximum(cand_end, 0)
        n_init = tl.minimum(lo_local, INIT_BLOCKS)
        n_forced = n_init + local + 1 - lo_local
        t = (q0 + i).to(tl.int64)
        out = TOPK_OUT + g.to(tl.int64) * stride_ig + t * stride_it
        ocol = tl.arange(0, KOUT)
        n_sel = tl.minimum(tl.maximum(cand_end - INIT_BLOCKS, 0), NSEL)
        f = ocol - n_sel
        forced = tl.where(f < n_init, f, lo_local + f - n_init)
        tail = tl.where(f < n_forced, forced, -1)
        if NSEL > 0:
            sp = tl.arange(0, NSPLIT_PAD)
            col = tl.arange(0, KPAD)
            idx = ((b * num_splits + sp).to(tl.int64) * ROWS + r)[:, None] * KPAD + col[None, :]
            keys = tl.load(CAND + idx, mask=(sp < num_splits)[:, None] & (col < NSEL)[None, :],
                           other=PAD_BASE)
            top = _merge_sorted_lists(keys, NSPLIT_PAD, LOG2_NSPLIT, KPAD)
            pick = (col[None, :] == ocol[:, None]) & (ocol[:, None] < n_sel)
            sel = tl.sum(tl.where(pick, top[None, :], 0), 1)
            ids = key_block_id(sel)
            row = tl.where(ocol < n_sel, ids, tail)
        else:
            row = tail
        tl.store(out + ocol, row.to(tl.int32), mask=ocol < TOPK)


@triton.jit
def decode_attention_split_kernel(
    Q, K_CACHE, V_CACHE, TOPK_IDX, PAGE_TABLE, ROW_SEQ, ROW_POS, KV_LENS,
    OUT, LSE, PART_O, PART_LSE,
    scale_log2, v_scale, slots_per_split, num_splits, num_groups, num_pages,
    stride_qt, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
    stride_ig, stride_it, stride_pb, stride_ot, stride_oh, stride_lt,
    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
    TOPK: tl.constexpr, KPAD: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    """KV_FP8: K, V pages in FP8 (E4M3) with one scale each per layer (vLLM's contract):
    the tiles are converted to q's dtype after the load (half the bytes, 16-bit MMAs),
    k_scale is folded into scale_log2 and v_scale multiplies the output."""
    t = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    b = tl.load(ROW_SEQ + t)
    pos = tl.load(ROW_POS + t)
    kv_len = tl.load(KV_LENS + b)
    nblk = (kv_len + BLOCK - 1) // BLOCK
    h = tl.arange(0, G_PAD)
    h_ok = h < G
    d = tl.arange(0, D)
    head = (g * G + h).to(tl.int64)
    q = tl.load(Q + t.to(tl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=h_ok[:, None], other=0.0)
    idx_row = TOPK_IDX + g.to(tl.int64) * stride_ig + t.to(tl.int64) * stride_it
    col = tl.arange(0, KPAD)
    ids = tl.load(idx_row + col, mask=col < TOPK, other=-1)
    jn = tl.arange(0, BLOCK)
    m = tl.full((G_PAD,), float("-inf"), tl.float32)
    l = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, D), tl.float32)
    k0 = s * slots_per_split
    k1 = tl.minimum(k0 + slots_per_split, TOPK)
    for slot in range(k0, k1):
        c = tl.load(idx_row + slot)
        # the token set is a set: a slot repeating an earlier slot's block adds nothing
        dup = tl.sum(((ids == c) & (col < slot)).to(tl.int32), 0) > 0
        if (c >= 0) & (c < nblk) & (c * BLOCK <= pos) & (dup == 0):
            page = tl.load(PAGE_TABLE + b.to(tl.int64) * stride_pb + c).to(tl.int64)
            if (page >= 0) & (page < num_pages):  # an id outside the pool: no tokens
                kt = tl.load(K_CACHE + page * stride_kp + jn[:, None] * stride_kt + g * stride_kh + d[None, :])
                vt = tl.load(V_CACHE + page * stride_vp + jn[:, None] * stride_vt + g * stride_vh + d[None, :])
                if KV_FP8:
                    kt = kt.to(Q.dtype.element_ty)
                    vt = vt.to(Q.dtype.element_ty)
                sc = mma(q, tl.trans(kt), IEEE)
                j = c * BLOCK + jn
                sc = tl.where(((j <= pos) & (j < kv_len))[None, :], sc * scale_log2, float("-inf"))
                m_new = tl.maximum(m, tl.max(sc, 1))
                alpha = tl.exp2(m - m_new)  # m_new is finite: the block's first key is visible
                p = tl.exp2(sc - m_new[:, None])
                l = l * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + mma(p.to(vt.dtype), vt, IEEE)
                m = m_new
    l_safe = tl.where(l > 0, l, 1.0)
    o = acc * (v_scale / l_safe)[:, None]
    lse = tl.where(l > 0, (m + tl.log2(l_safe)) * LN2, float("-inf"))
    if SPLIT:
        prow = ((t.to(tl.int64) * num_groups + g) * num_splits + s) * G_PAD + h
        tl.store(PART_O + prow[:, None] * D + d[None, :], o)
        tl.store(PART_LSE + prow, lse)
    else:
        tl.store(OUT + t.to(tl.int64) * stride_ot + head[:, None] * stride_oh + d[None, :],
                 o.to(OUT.dtype.element_ty), mask=h_ok[:, None])
        tl.store(LSE + t.to(tl.int64) * stride_lt + head, lse, mask=h_ok)


@triton.jit
def decode_attention_merge_kernel(
    PART_O, PART_LSE, OUT, LSE, num_splits, num_groups,
    stride_ot, stride_oh, stride_lt,
    G: tl.constexpr, G_PAD: tl.constexpr, HC: tl.constexpr, D: tl.constexpr,
    NSPLIT_PAD: tl.constexpr,
):
    """out[t, heads of g] = the splits' partial outputs weighted by exp(lse_s - lse).

    Program (t, g, c) merges HC heads of the group: all splits' partials are loaded as one
    [NSPLIT_PAD, HC, D] tile, so their loads are in flight together (a loop over the splits
    issues them one after another: 7.4 us for 16 splits at batch 1 on the H100, where the
    few programs are latency-bound)."""
    t = tl.program_id(0)
    g = tl.program_id(1)
    h = tl.program_id(2) * HC + tl.arange(0, HC)
    d = tl.arange(0, D)
    sp = tl.arange(0, NSPLIT_PAD)
    base = (t.to(tl.int64) * num_groups + g) * num_splits
    prow = (base + sp)[:, None] * G_PAD + h[None, :]  # [NSPLIT_PAD, HC]
    sp_ok = (sp < num_splits)[:, None]
    lse_s = tl.load(PART_LSE + prow, mask=sp_ok, other=float("-inf"))
    mx = tl.max(lse_s, 0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp(lse_s - mx_safe[None, :])  # 0 for empty splits
    den = tl.sum(w, 0)
    po = tl.load(PART_O + prow[:, :, None] * D + d[None, None, :], mask=sp_ok[:, :, None], other=0.0)
    acc = tl.sum(w[:, :, None] * po, 0)  # [HC, D]
    den_safe = tl.where(den > 0, den, 1.0)
    out = acc / den_safe[:, None]
    lse = tl.where(den > 0, mx_safe + tl.log(den_safe), float("-inf"))
    h_ok = h < G
    head = (g * G + h).to(tl.int64)
    tl.store(OUT + t.to(tl.int64) * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(OUT.dtype.element_ty), mask=h_ok[:, None])
    tl.store(LSE + t.to(tl.int64) * stride_lt + head, lse, mask=h_ok)
