"""PyTorch reference of the Main Branch (docs/spec.md section 5), forward and backward.

Exact softmax attention of every query head over the token set T(t, g) of its
group: the visible tokens of the selected blocks (sparse) or all visible tokens
(``topk_indices=None``: dense causal attention, used by the warmup phase).

Query rows are processed in chunks; the backward recomputes the scores per chunk
(FlashAttention style: P from the saved LSE, dS = P * (dP - rowsum(dO * O))) so
memory stays bounded by the chunk size instead of growing with total_q x K x B.

Non-finite inputs follow the rule of ``openmsa.sparse_attention``: IEEE arithmetic on the
scores (a NaN or +inf score makes the row NaN, -inf weighs 0), and a key whose V is not
finite makes every row that has it in its token set NaN. Like the kernels, the forward
gives such keys NaN scores (k + 0 * v) and V = 0: through the PV product a non-finite V
would also reach the rows that do not see the key (0 * inf = NaN).
"""

from __future__ import annotations

import torch

from ..utils.reference import (
    KeyGrad, Keys, attention_scores, compute_dtype, group_rows, key_chunks, layout_for,
    masked_softmax_stats, matmul_keys, row_meta, safe_lse, ungroup,
)


def attention_forward(q, k, v, topk_indices, cu_q, ranges, block_size, scale):
    """Returns out (q.dtype) and lse (compute dtype, [total_q, Hq]); ``ranges``: the
    (starts, lens) of the sequences' keys (``key_ranges``)."""
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    cdt = compute_dtype(q.dtype)
    meta = row_meta(cu_q, ranges, q.device)
    layout = layout_for(topk_indices, cu_q, ranges, k.shape[0], block_size, q.device)
    v_fin = torch.isfinite(v)
    if not v_fin.all():  # see the module docstring
        k = k + v * 0
        v = v.masked_fill(~v_fin, 0.0)
    keys, values = Keys(k, layout, cdt), Keys(v, layout, cdt)
    out = torch.zeros_like(q)
    lse = torch.full((total_q, hq), float("-inf"), dtype=cdt, device=q.device)
    per_key = cdt.itemsize * (2 * hkv * d + 3 * hq) + 2
    for rows, sel, valid in key_chunks(meta, cu_q, ranges, topk_indices, layout, per_key):
        s, _, _ = attention_scores(q, keys, rows, sel, valid, hkv, scale, cdt)
        m, p, l = masked_softmax_stats(s)
        o = matmul_keys(p, values.gather(sel), transpose_keys=False)
        # Empty T (possible for hand-made indices): out = 0 and lse = -inf. l == 0 exactly,
        # so that a NaN row (NaN or +inf score: l is NaN) stays NaN.
        o = torch.where(l == 0, torch.zeros_like(o), o / l)
        out[rows] = ungroup(o).to(q.dtype)
        lse[rows] = ungroup((m + torch.log(l)).squeeze(-1))
    return out, lse


def attention_backward(do, q, k, v, out, lse, topk_indices, cu_q, ranges, block_size, scale):
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    cdt = compute_dtype(q.dtype)
    meta = row_meta(cu_q, ranges, q.device)
    layout = layout_for(topk_indices, cu_q, ranges, k.shape[0], block_size, q.device)
    keys, values = Keys(k, layout, cdt), Keys(v, layout, cdt)
    dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
    dk, dv = KeyGrad(k, layout, cdt), KeyGrad(v, layout, cdt)
    per_key = cdt.itemsize * (4 * hkv * d + 4 * hq) + 2
    for rows, sel, valid in key_chunks(meta, cu_q, ranges, topk_indices, layout, per_key):
        s, qg, kk = attention_scores(q, keys, rows, sel, valid, hkv, scale, cdt)
        vv = values.gather(sel)
        lse_g = safe_lse(lse[rows].view(-1, hkv, hq // hkv).permute(1, 0, 2))
        p = torch.exp(s - lse_g[..., None])  # [Hkv, R, G, N], 0 where masked
        dog = group_rows(do, rows, hkv, cdt)
        og = group_rows(out, rows, hkv, cdt)
        delta = (dog * og).sum(-1, keepdim=True)
        dp = matmul_keys(dog, vv, transpose_keys=True)
        ds = p * (dp - delta) * scale
        dq[rows] = ungroup(matmul_keys(ds, kk, transpose_keys=False))
        if layout is not None:  # per-row keys: contributions per (row, token)
            dk.add(sel, torch.matmul(ds.transpose(-1, -2), qg))
            dv.add(sel, torch.matmul(p.transpose(-1, -2), dog))
        else:  # shared keys: sum over rows and heads in one product
            r, g = ds.shape[1], ds.shape[2]
            dk.add(sel, torch.matmul(ds.reshape(hkv, r * g, -1).transpose(-1, -2), qg.reshape(hkv, r * g, d)))
            dv.add(sel, torch.matmul(p.reshape(hkv, r * g, -1).transpose(-1, -2), dog.reshape(hkv, r * g, d)))
    return dq.to(q.dtype), dk.result(), dv.result()
