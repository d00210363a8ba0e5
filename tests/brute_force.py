"""Brute-force MSA, written from the spec text (docs/spec.md sections 3-6) only.

Independent of openmsa (imports nothing from it). Per-query Python loops in float64,
meant for tiny inputs: simple and obviously correct rather than fast.

Conventions (docs/spec.md section 3):
- packed layout: q [total_q, Hq, D], k, v [total_k, Hkv, D], qi [total_q, Hkv, Di],
  ki [total_k, 1, Di]; cu_q, cu_k int [nseq + 1] (tensor or list).
- sequence b: Lq = cu_q[b+1] - cu_q[b], Lk = cu_k[b+1] - cu_k[b]; local query i sits at
  key position p(i) = Lk - Lq + i and sees keys j <= p(i).
- block c covers local keys [c*B, min((c+1)*B, Lk)); local block of query i is p(i) // B.
- indices int32 [Hkv, total_q, K], block ids local to the sequence.
- every score is scale * <a, b>: the scale multiplies the finished dot product.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def _as_list(cu):
    if isinstance(cu, torch.Tensor):
        return [int(x) for x in cu.tolist()]
    return [int(x) for x in cu]


def num_blocks(lk: int, block_size: int) -> int:
    return (lk + block_size - 1) // block_size


def query_rows(cu_q, cu_k):
    """One entry per packed query row t: (k_start, Lk, p) with p the key position of t."""
    cq, ck = _as_list(cu_q), _as_list(cu_k)
    rows = []
    for b in range(len(cq) - 1):
        lq, lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        assert 0 <= lq <= lk, (b, lq, lk)
        for i in range(lq):
            rows.append((ck[b], lk, lk - lq + i))
    assert len(rows) == cq[-1]
    return rows


def bf_token_set(topk_row, p: int, lk: int, block_size: int) -> list:
    """T(t, g) of docs/spec.md section 5 as a sorted list of LOCAL key positions.

    topk_row: the K block ids of one (g, t); None means every block (dense: all visible keys).
    Ids that are -1 (any negative) or >= the block count are ignored; duplicates count once;
    only keys j <= p are kept.
    """
    if topk_row is None:
        return list(range(p + 1))
    nb = num_blocks(lk, block_size)
    ids = set()
    for c in (topk_row.tolist() if isinstance(topk_row, torch.Tensor) else topk_row):
        c = int(c)
        if 0 <= c < nb:
            ids.add(c)
    return [j for j in range(p + 1) if j // block_size in ids]


def _row(indices, g, t):
    return None if indices is None else indices[g, t]


def bf_all_blocks_indices(cu_q, cu_k, hkv: int, block_size: int, width: int | None = None):
    """Indices selecting every block 0..l(i) of each query (then -1): dense causal as a topk."""
    rows = query_rows(cu_q, cu_k)
    if width is None:
        width = max([p // block_size + 1 for _, _, p in rows], default=1)
    idx = torch.full((hkv, len(rows), width), -1, dtype=torch.int32)
    for t, (_, _, p) in enumerate(rows):
        n = p // block_size + 1
        assert n <= width
        idx[:, t, :n] = torch.arange(n, dtype=torch.int32)
    return idx


# ------------------------------------------------------------------------------------
# Index Branch (docs/spec.md section 4)
# ------------------------------------------------------------------------------------

def bf_index_scores(qi_row, ki_seq, p: int, scale: float):
    """z(j) = scale * <qi_row, ki[j]> for local keys j = 0..p (float64)."""
    return scale * (ki_seq[: p + 1] @ qi_row)


def bf_block_score(z, c: int, block_size: int) -> float:
    """m(c) = max of z over the block's keys present in z; NaN if any of them is NaN."""
    vals = [float(x) for x in z[c * block_size:(c + 1) * block_size]]
    assert vals, "block has no visible key"
    if any(math.isnan(x) for x in vals):
        return math.nan
    return max(vals)


def bf_rank_blocks(scores: dict) -> list:
    """Block ids by score descending, ties by smaller id, NaN below every number."""
    def key(c):
        m = scores[c]
        return (1, 0.0, c) if math.isnan(m) else (0, -m, c)
    return sorted(scores, key=key)


def bf_indexer_topk(qi, ki, cu_q, cu_k, block_size: int, topk: int, scale: float,
                    init_blocks: int = 0, local_blocks: int = 1):
    """Reference Index Branch.

    Returns (indices int32 [Hkv, total_q, topk], index_lse float64 [Hkv, total_q]).
    Row order: the best of the other earlier blocks (score desc, ties by block id, NaN
    last) in the slots the forced blocks leave, then the forced blocks ascending (blocks
    0..init_blocks-1 and l-local_blocks+1..l, those in [0, l]; by default l alone), then -1.
    """
    qi64 = qi.detach().to(F64)
    ki64 = ki.detach().to(F64)
    total_q, hkv, _ = qi64.shape
    rows = query_rows(cu_q, cu_k)
    idx = torch.full((hkv, total_q, topk), -1, dtype=torch.int32)
    lse = torch.empty((hkv, total_q), dtype=F64)
    for t, (k0, lk, p) in enumerate(rows):
        loc = p // block_size
        ki_seq = ki64[k0:k0 + lk, 0]
        for g in range(hkv):
            z = bf_index_scores(qi64[t, g], ki_seq, p, scale)
            forced = sorted({c for c in range(init_blocks) if c <= loc}
                            | {c for c in range(loc - local_blocks + 1, loc + 1) if c >= 0})
            scores = {c: bf_block_score(z, c, block_size) for c in range(loc) if c not in forced}
            chosen = bf_rank_blocks(scores)[: topk - init_blocks - local_blocks]
            row = chosen + forced
            idx[g, t, : len(row)] = torch.tensor(row, dtype=torch.int32)
            tok = bf_token_set(row, p, lk, block_size)
            lse[g, t] = torch.logsumexp(z[tok], dim=0)
    return idx, lse


def bf_index_lse(qi, ki, indices, cu_q, cu_k, block_size: int, scale: float):
    """logsumexp of z over T(t, g) for GIVEN indices (None = dense), float64 [Hkv, total_q];
    -inf where T is empty."""
    qi64 = qi.detach().to(F64)
    ki64 = ki.detach().to(F64)
    hkv = qi64.shape[1]
    lse = torch.full((hkv, qi64.shape[0]), -math.inf, dtype=F64)
    for t, (k0, lk, p) in enumerate(query_rows(cu_q, cu_k)):
        for g in range(hkv):
            tok = bf_token_set(_row(indices, g, t), p, lk, block_size)
            if tok:
                z = bf_index_scores(qi64[t, g], ki64[k0:k0 + lk, 0], p, scale)
                lse[g, t] = torch.logsumexp(z[tok], dim=0)
    return lse


def bf_block_scores_matrix(qi, ki, cu_q, cu_k, block_size: int, scale: float):
    """For tests: list over (g, t) -> dict {block c < l: m(c)} (float64)."""
    qi64 = qi.detach().to(F64)
    ki64 = ki.detach().to(F64)
    out = {}
    for t, (k0, lk, p) in enumerate(query_rows(cu_q, cu_k)):
        loc = p // block_size
        for g in range(qi64.shape[1]):
            z = bf_index_scores(qi64[t, g], ki64[k0:k0 + lk, 0], p, scale)
            out[(g, t)] = {c: bf_block_score(z, c, block_size) for c in range(loc)}
    return out


# ------------------------------------------------------------------------------------
# Main Branch (docs/spec.md section 5)
# ------------------------------------------------------------------------------------

def bf_sparse_attention(q, k, v, indices, cu_q, cu_k, block_size: int, scale: float):
    """Reference Main Branch in float64, differentiable (autograd) w.r.t. q, k, v.

    indices None = dense causal. Returns (out float64 [total_q, Hq, D], lse float64
    [total_q, Hq], detached). Empty T: out 0, lse -inf.
    """
    q = q.to(F64)
    k = k.to(F64)
    v = v.to(F64)
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    grp = hq // hkv
    assert grp * hkv == hq
    rows = query_rows(cu_q, cu_k)
    lse = torch.full((total_q, hq), -math.inf, dtype=F64)
    out_rows = []
    for t, (k0, lk, p) in enumerate(rows):
        heads = []
        for g in range(hkv):
            tok = bf_token_set(_row(indices, g, t), p, lk, block_size)
            if not tok:
                heads.append(q.new_zeros((grp, d)))
                continue
            sel = torch.tensor(tok, dtype=torch.long) + k0
            kk, vv = k[sel, g], v[sel, g]                       # [n, D]
            s = scale * (q[t, g * grp:(g + 1) * grp] @ kk.T)    # [G, n]
            m = torch.logsumexp(s, dim=1)                       # [G]
            heads.append(torch.exp(s - m[:, None]) @ vv)
            lse[t, g * grp:(g + 1) * grp] = m.detach()
        out_rows.append(torch.cat(heads, 0))
    out = torch.stack(out_rows, 0) if out_rows else q.new_zeros((0, hq, d))
    return out, lse


def bf_dense_masked_attention(q, k, v, cu_q, cu_k, scale: float):
    """Dense causal attention in float64 with an explicit bottom-right mask (a second,
    vectorised reference, per sequence; GQA by repeating k/v heads)."""
    q, k, v = q.to(F64), k.to(F64), v.to(F64)
    hq, hkv = q.shape[1], k.shape[1]
    grp = hq // hkv
    cq, ck = _as_list(cu_q), _as_list(cu_k)
    outs = []
    for b in range(len(cq) - 1):
        lq, lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if lq == 0:
            continue
        qb = q[cq[b]:cq[b + 1]].transpose(0, 1)                         # [Hq, Lq, D]
        kb = k[ck[b]:ck[b + 1]].repeat_interleave(grp, 1).transpose(0, 1)
        vb = v[ck[b]:ck[b + 1]].repeat_interleave(grp, 1).transpose(0, 1)
        s = scale * (qb @ kb.transpose(1, 2))                           # [Hq, Lq, Lk]
        i = torch.arange(lq)[:, None]
        j = torch.arange(lk)[None, :]
        s = s.masked_fill(~(j <= lk - lq + i), -math.inf)
        outs.append((torch.softmax(s, -1) @ vb).transpose(0, 1))
    return torch.cat(outs, 0) if outs else q.new_zeros((0, hq, q.shape[2]))


# ------------------------------------------------------------------------------------
# Sparse KL (docs/spec.md section 6)
# ------------------------------------------------------------------------------------

def _kl_terms(q, k, qi, ki, indices, cu_q, cu_k, block_size, scale, scale_i):
    """Yield (t, g, k0, tok, P_T, z) for every (t, g) with a non-empty T.

    P_T (detached, float64) is the group mean of the main softmax on T; z = scale_i *
    <qi, ki> on T (keeps autograd of qi, ki)."""
    q64 = q.detach().to(F64)
    k64 = k.detach().to(F64)
    total_q, hq, _ = q64.shape
    hkv = k64.shape[1]
    grp = hq // hkv
    for t, (k0, lk, p) in enumerate(query_rows(cu_q, cu_k)):
        for g in range(hkv):
            tok = bf_token_set(_row(indices, g, t), p, lk, block_size)
            if not tok:
                continue
            sel = torch.tensor(tok, dtype=torch.long) + k0
            s = scale * (q64[t, g * grp:(g + 1) * grp] @ k64[sel, g].T)   # [G, n]
            p_t = torch.softmax(s, dim=1).mean(0)                        # [n]
            z = scale_i * (ki[sel, 0] @ qi[t, g])                        # [n]
            yield t, g, sel, p_t, z


def bf_kl(q, k, qi, ki, indices, cu_q, cu_k, block_size, scale, scale_i, coeff=1.0):
    """loss = coeff / (Hkv * total_q) * sum_{t,g} KL(P_T || P_S), float64 scalar,
    differentiable (autograd) w.r.t. qi and ki only. Empty T contributes 0.
    indices None = dense warmup (T = all visible keys)."""
    qi = qi.to(F64)
    ki = ki.to(F64)
    total_q, hkv = qi.shape[0], qi.shape[1]
    total = qi.new_zeros(())
    for _, _, _, p_t, z in _kl_terms(q, k, qi, ki, indices, cu_q, cu_k, block_size,
                                     scale, scale_i):
        log_ps = torch.log_softmax(z, dim=0)
        total = total + (torch.xlogy(p_t, p_t) - p_t * log_ps).sum()
    return coeff / (hkv * total_q) * total


def bf_kl_grad(q, k, qi, ki, indices, cu_q, cu_k, block_size, scale, scale_i, coeff=1.0):
    """Analytical gradient of bf_kl: dL/dz = coeff/(Hkv*total_q) * (P_S - P_T), chained
    through z = scale_i * <qi, ki>. Returns (dqi [total_q, Hkv, Di], dki [total_k, 1, Di])
    in float64."""
    qi64 = qi.detach().to(F64)
    ki64 = ki.detach().to(F64)
    total_q, hkv = qi64.shape[0], qi64.shape[1]
    c = coeff / (hkv * total_q)
    dqi = torch.zeros_like(qi64)
    dki = torch.zeros_like(ki64)
    for t, g, sel, p_t, z in _kl_terms(q, k, qi64, ki64, indices, cu_q, cu_k, block_size,
                                       scale, scale_i):
        p_s = torch.softmax(z, dim=0)
        dz = c * (p_s - p_t)                                   # [n]
        dqi[t, g] += scale_i * (dz @ ki64[sel, 0])
        dki[sel, 0] += scale_i * dz[:, None] * qi64[t, g][None, :]
    return dqi, dki
