"""PyTorch reference of the Main Branch (spec section 5), forward and backward.

Exact softmax attention of every query head over the token set T(t, g) of its
group: the visible tokens of the selected blocks (sparse) or all visible tokens
(``topk_indices=None``: dense causal attention, used by the warmup phase).

Query rows are processed in chunks; the backward recomputes the scores per chunk
(FlashAttention style: P from the saved LSE, dS = P * (dP - rowsum(dO * O))) so
memory stays bounded by the chunk size instead of growing with total_q x K x B.
"""

from __future__ import annotations

import torch

from ..common import (
    RowMeta, chunk_rows, compute_dtype, gather_keys, masked_softmax_stats, matmul_keys,
    row_meta, safe_lse, scatter_add_keys, selected_key_tokens, sequences,
)


def key_chunks(meta: RowMeta, cu_q: tuple, cu_k: tuple, topk_indices, block_size: int,
               bytes_per_key: int):
    """Yield (rows, key_idx, valid) chunks covering every query row once.

    Sparse (topk_indices given): rows of all sequences together; key_idx/valid are
    [Hkv, R, K*B] per-row token lists. Dense (None): per sequence, key_idx is the
    sequence's keys [1, Lk] shared by all rows and valid is the causal mask [1, R, Lk].
    """
    if topk_indices is not None:
        hkv, total_q, k = topk_indices.shape
        rows_per_chunk = chunk_rows(hkv * k * block_size * bytes_per_key)
        for r0 in range(0, total_q, rows_per_chunk):
            rows = slice(r0, min(total_q, r0 + rows_per_chunk))
            key_idx, valid = selected_key_tokens(topk_indices[:, rows], meta, rows, block_size)
            yield rows, key_idx, valid
        return
    for q0, lq, k0, lk in sequences(cu_q, cu_k):
        keys = torch.arange(lk, device=meta.pos.device)
        rows_per_chunk = chunk_rows(lk * bytes_per_key)
        for r0 in range(q0, q0 + lq, rows_per_chunk):
            rows = slice(r0, min(q0 + lq, r0 + rows_per_chunk))
            valid = keys[None, :] <= meta.pos[rows][:, None]
            yield rows, (keys + k0)[None], valid[None]


def keys_for(x: torch.Tensor, key_idx: torch.Tensor, dtype) -> torch.Tensor:
    """Keys of a chunk: per row [Hkv, R, N, D] (sparse) or shared [H, N, D] (dense)."""
    if key_idx.dim() == 3:
        return gather_keys(x, key_idx, dtype)
    return x[key_idx[0]].to(dtype).transpose(0, 1)


def add_to_keys(dx: torch.Tensor, key_idx: torch.Tensor, contrib: torch.Tensor) -> None:
    if key_idx.dim() == 3:
        scatter_add_keys(dx, key_idx, contrib)
    else:
        dx[key_idx[0]] += contrib.transpose(0, 1).to(dx.dtype)


def group_rows(x: torch.Tensor, rows: slice, hkv: int, dtype) -> torch.Tensor:
    """[total, Hq, D] rows -> [Hkv, R, G, D] (query heads h = g * G + i)."""
    xr = x[rows]
    return xr.view(xr.shape[0], hkv, -1, xr.shape[-1]).to(dtype).permute(1, 0, 2, 3)


def ungroup(x: torch.Tensor) -> torch.Tensor:
    """[Hkv, R, G, ...] -> [R, Hkv * G, ...]."""
    x = x.permute(1, 0, 2, *range(3, x.dim()))
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def attention_scores(q, k, rows, key_idx, valid, hkv, scale, cdt):
    """Masked scores s [Hkv, R, G, N] (masked entries -inf), the grouped queries and keys."""
    qg = group_rows(q, rows, hkv, cdt)
    kk = keys_for(k, key_idx, cdt)
    s = matmul_keys(qg, kk, transpose_keys=True) * scale
    s = s.masked_fill(~valid[:, :, None, :], float("-inf"))
    return s, qg, kk


def attention_forward(q, k, v, topk_indices, cu_q, cu_k, block_size, scale):
    """Returns out (q.dtype) and lse (compute dtype, [total_q, Hq])."""
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    cdt = compute_dtype(q.dtype)
    meta = row_meta(cu_q, cu_k, q.device)
    out = torch.zeros_like(q)
    lse = torch.full((total_q, hq), float("-inf"), dtype=cdt, device=q.device)
    per_key = cdt.itemsize * (2 * hkv * d + 3 * hq) + 2
    for rows, key_idx, valid in key_chunks(meta, cu_q, cu_k, topk_indices, block_size, per_key):
        s, _, _ = attention_scores(q, k, rows, key_idx, valid, hkv, scale, cdt)
        m, p, l = masked_softmax_stats(s)
        o = matmul_keys(p, keys_for(v, key_idx, cdt), transpose_keys=False)
        # Empty T (possible for hand-made indices): out = 0 and lse = -inf, never NaN.
        o = torch.where(l > 0, o / l, torch.zeros_like(o))
        out[rows] = ungroup(o).to(q.dtype)
        lse[rows] = ungroup((m + torch.log(l)).squeeze(-1))
    return out, lse


def attention_backward(do, q, k, v, out, lse, topk_indices, cu_q, cu_k, block_size, scale):
    total_q, hq, d = q.shape
    hkv = k.shape[1]
    cdt = compute_dtype(q.dtype)
    meta = row_meta(cu_q, cu_k, q.device)
    dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
    dk = torch.zeros(k.shape, dtype=cdt, device=q.device)
    dv = torch.zeros(v.shape, dtype=cdt, device=q.device)
    per_key = cdt.itemsize * (4 * hkv * d + 4 * hq) + 2
    for rows, key_idx, valid in key_chunks(meta, cu_q, cu_k, topk_indices, block_size, per_key):
        s, qg, kk = attention_scores(q, k, rows, key_idx, valid, hkv, scale, cdt)
        vv = keys_for(v, key_idx, cdt)
        lse_g = safe_lse(lse[rows].view(-1, hkv, hq // hkv).permute(1, 0, 2))
        p = torch.exp(s - lse_g[..., None])  # [Hkv, R, G, N], 0 where masked
        dog = group_rows(do, rows, hkv, cdt)
        og = group_rows(out, rows, hkv, cdt)
        delta = (dog * og).sum(-1, keepdim=True)
        dp = matmul_keys(dog, vv, transpose_keys=True)
        ds = p * (dp - delta) * scale
        dq[rows] = ungroup(matmul_keys(ds, kk, transpose_keys=False))
        if key_idx.dim() == 3:  # per-row keys: contributions per (row, token)
            dk_c = torch.matmul(ds.transpose(-1, -2), qg)
            dv_c = torch.matmul(p.transpose(-1, -2), dog)
        else:  # shared keys: sum over rows and heads in one product
            r, g = ds.shape[1], ds.shape[2]
            dk_c = torch.matmul(ds.reshape(hkv, r * g, -1).transpose(-1, -2), qg.reshape(hkv, r * g, d))
            dv_c = torch.matmul(p.reshape(hkv, r * g, -1).transpose(-1, -2), dog.reshape(hkv, r * g, d))
        add_to_keys(dk, key_idx, dk_c)
        add_to_keys(dv, key_idx, dv_c)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class SparseAttentionReference(torch.autograd.Function):
    """out, lse = attention over T (sparse) or all visible tokens (topk_indices=None).
    Differentiable w.r.t. q, k, v; lse is not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, topk_indices, cu_q, cu_k, block_size, scale):
        out, lse = attention_forward(q, k, v, topk_indices, cu_q, cu_k, block_size, scale)
        ctx.save_for_backward(q, k, v, topk_indices, out, lse)
        ctx.args = (cu_q, cu_k, block_size, scale)
        lse_out = lse.float()
        ctx.mark_non_differentiable(lse_out)
        return out, lse_out

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, topk_indices, out, lse = ctx.saved_tensors
        cu_q, cu_k, block_size, scale = ctx.args
        dq, dk, dv = attention_backward(do, q, k, v, out, lse, topk_indices, cu_q, cu_k,
                                        block_size, scale)
        return dq, dk, dv, None, None, None, None, None


def sparse_attention_reference(q, k, v, topk_indices, cu_q, cu_k, *, block_size, scale):
    return SparseAttentionReference.apply(q, k, v, topk_indices, cu_q, cu_k, block_size, scale)
