"""PyTorch reference of the indexer's sparse KL loss (docs/spec.md section 6).

Teacher (no gradient): the Main Branch softmax averaged over the G heads of a group,
P_T(j) = mean_h exp(s(h, j) - lse[t, h]), on the token set T(t, g).
Student: P_S(j) = exp(z_g(i, j) - index_lse[g, t]) on the same set.
loss = coeff / (Hkv * total_q) * sum_{t, g} KL(P_T || P_S), gradients to qi and ki
only, through d loss / d z = coeff / (Hkv * total_q) * (P_S - P_T).

With ``topk_indices=None`` T is every visible token (the dense warmup phase).

Non-finite inputs (the rule of ``openmsa.indexer_kl_loss``): IEEE arithmetic, with the
terms of tokens where P_T is exactly 0 dropped (0 log 0 = 0); the normalisers are
max + log(sum exp(. - max)) like the kernels', so a +inf score gives a NaN normaliser
(torch.logsumexp would give +inf).
"""

from __future__ import annotations

import torch

from ..utils.reference import (
    KeyGrad, Keys, attention_scores, compute_dtype, key_chunks, layout_for,
    masked_softmax_stats, matmul_keys, row_meta, safe_lse,
)


def _chunk_distributions(q, keys, qi, ikeys, rows, sel, valid, scale, scale_i, lse, index_lse, cdt):
    """Teacher and log-student over the chunk's key set, both [Hkv, R, N], plus the
    grouped index queries and gathered index keys for the backward."""
    hkv = qi.shape[1]
    s, _, _ = attention_scores(q, keys, rows, sel, valid, hkv, scale, cdt)
    if lse is None:
        m, _, l = masked_softmax_stats(s)
        lse_g = m + torch.log(l)
    else:
        lse_g = lse[rows].to(cdt).view(-1, hkv, s.shape[2]).permute(1, 0, 2)[..., None]
    # [Hkv, R, N], 0 where masked (also for a NaN lse)
    teacher = torch.exp(s - safe_lse(lse_g)).mean(2).masked_fill(~valid, 0.0)

    qig = qi[rows].to(cdt).transpose(0, 1)[:, :, None, :]  # [Hkv, R, 1, Di]
    kik = ikeys.gather(sel)
    z = (matmul_keys(qig, kik, transpose_keys=True) * scale_i)[:, :, 0]  # [Hkv, R, N]
    z = z.masked_fill(~valid, float("-inf"))
    if index_lse is None:
        m_i, _, l_i = masked_softmax_stats(z)
        ilse = m_i + torch.log(l_i)
    else:
        ilse = index_lse[:, rows].to(cdt)[..., None]
    log_student = z - safe_lse(ilse)  # -inf where masked
    return teacher, log_student, valid.expand_as(z), qig, kik


def _kl_terms(teacher, log_student, valid):
    """Per-token KL terms, 0 wherever the teacher is exactly 0 (masked tokens included);
    a NaN teacher keeps its NaN term."""
    nz = teacher != 0
    safe_t = torch.where(nz, teacher, torch.ones_like(teacher))
    safe_s = torch.where(valid, log_student, torch.zeros_like(log_student))
    return torch.where(nz, teacher * (torch.log(safe_t) - safe_s), torch.zeros_like(teacher))


def _prepare(q, k, ki, topk_indices, cu_q, ranges, block_size, cdt):
    meta = row_meta(cu_q, ranges, q.device)
    layout = layout_for(topk_indices, cu_q, ranges, k.shape[0], block_size, q.device)
    return meta, layout, Keys(k, layout, cdt), Keys(ki, layout, cdt)


def kl_forward(q, k, qi, ki, topk_indices, cu_q, ranges, block_size, scale, scale_i, lse, index_lse):
    """Sum over (t, g) of KL(P_T || P_S), unnormalised, in the compute dtype."""
    cdt = compute_dtype(qi.dtype)
    hq, d, hkv = q.shape[1], q.shape[2], k.shape[1]
    meta, layout, keys, ikeys = _prepare(q, k, ki, topk_indices, cu_q, ranges, block_size, cdt)
    total = torch.zeros((), dtype=cdt, device=q.device)
    per_key = cdt.itemsize * (hkv * (d + qi.shape[2] + 6) + 2 * hq) + 2
    for rows, sel, valid in key_chunks(meta, cu_q, ranges, topk_indices, layout, per_key):
        teacher, log_student, valid_e, _, _ = _chunk_distributions(
            q, keys, qi, ikeys, rows, sel, valid, scale, scale_i, lse, index_lse, cdt)
        total = total + _kl_terms(teacher, log_student, valid_e).sum()
    return total


def kl_backward(grad_scale, q, k, qi, ki, topk_indices, cu_q, ranges, block_size, scale, scale_i,
                lse, index_lse):
    """d loss / d qi and d ki for d loss / d z = grad_scale * (P_S - P_T)."""
    cdt = compute_dtype(qi.dtype)
    hq, d, hkv = q.shape[1], q.shape[2], k.shape[1]
    meta, layout, keys, ikeys = _prepare(q, k, ki, topk_indices, cu_q, ranges, block_size, cdt)
    dqi = torch.zeros(qi.shape, dtype=cdt, device=q.device)
    dki = KeyGrad(ki, layout, cdt)
    per_key = cdt.itemsize * (hkv * (d + 2 * qi.shape[2] + 8) + 2 * hq) + 2
    for rows, sel, valid in key_chunks(meta, cu_q, ranges, topk_indices, layout, per_key):
        teacher, log_student, _, qig, kik = _chunk_distributions(
            q, keys, qi, ikeys, rows, sel, valid, scale, scale_i, lse, index_lse, cdt)
        student = torch.exp(log_student).masked_fill(~valid, 0.0)  # 0 masked, NaN index_lse too
        dz = (student - teacher) * (grad_scale * scale_i)  # [Hkv, R, N]
        dqi[rows] = matmul_keys(dz[:, :, None, :], kik, transpose_keys=False)[:, :, 0].transpose(0, 1)
        if layout is not None:
            dki.add(sel, dz[..., None] * qig)  # [Hkv, R, N, Di]
        else:  # shared keys: sum the rows and groups in one product -> [1, N, Di]
            dki.add(sel, torch.einsum("grn,grd->nd", dz, qig[:, :, 0])[None])
    return dqi.to(qi.dtype), dki.result()
