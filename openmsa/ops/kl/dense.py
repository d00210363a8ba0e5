"""Dense warmup KL (docs/spec.md section 6, warmup: T = every causally visible token) through the
sparse KL kernels, a chunk of key blocks at a time.

The KL over all visible tokens is a sum over key blocks of per-block terms
sum_j P_T(j) (log P_T(j) - log P_S(j)), and its gradient w.r.t. the index scores is
P_S(j) - P_T(j) token by token, once both distributions are normalised over *all*
visible tokens. The sparse kernels (``launch.indexer_kl_forward``) compute exactly
those per-block terms and gradients for any list of blocks, given the two normalisers
(``lse``, ``index_lse``). So the dense KL is:

1. the normalisers over every visible block: per chunk of 64 local block ids (the chunks
   of ``openmsa.ops.utils.schedule.dense_chunks``: the kernels take at most 64 blocks per row), the
   teacher's LSE by the sparse attention forward and the index LSE by the KV-outer pass,
   merged with logaddexp (a row whose chunk holds no visible block gives -inf, the
   neutral element);
2. the sparse KL pass per chunk with those normalisers, losses and gradients summed.

The chunks are those of the dense attention (built on the device, bounded on the host by
total_k / B): no host synchronisation (the PyTorch reference reads the sequence lengths
on the host).

Cost: the teacher LSE pass runs the attention forward with v = k and throws the output
away (the sparse attention kernels have no LSE-only mode), so the dense KL costs about two
attention forwards plus the KL passes over all visible blocks: O(L^2) like any dense
attention, at kernel speed.
"""

from __future__ import annotations

import torch

from ..attention.launch import sparse_attention_forward
from ..indexer.lse import index_lse_kv_outer
from ..utils.schedule import dense_chunks
from .launch import indexer_kl_forward


def dense_kl_forward(q, k, qi, ki, varlen, block_size, scale, scale_i, coeff, lse, index_lse,
                     with_grad, deterministic=False):
    """Like ``indexer_kl_forward`` with T = every visible token: (loss, dqi, dki).
    ``deterministic`` is passed on (the chunks' results are summed in chunk order)."""
    total_q, total_k = q.shape[0], k.shape[0]
    dev = q.device
    if total_q == 0 or total_k == 0:
        return (torch.zeros((), dtype=torch.float32, device=dev),
                torch.zeros(qi.shape, dtype=torch.float32, device=dev) if with_grad else None,
                torch.zeros((total_k, ki.shape[2]), dtype=torch.float32, device=dev) if with_grad else None)

    def merged(lse_of):  # logaddexp over the chunks (-inf: the chunk has no visible key)
        out = None
        for idx in dense_chunks(q, k, varlen, block_size):
            part = lse_of(idx)
            out = part if out is None else torch.logaddexp(out, part)
        return out

    if lse is None:
        lse = merged(lambda idx: sparse_attention_forward(q, k, k, idx, varlen, block_size, scale,
                                                          lse_only=True)[1])
    if index_lse is None:
        index_lse = merged(lambda idx: index_lse_kv_outer(qi, ki, idx, varlen, block_size=block_size,
                                                          scale=scale_i))
    total = dqi = dki = None
    for idx in dense_chunks(q, k, varlen, block_size):
        loss, dq, dk = indexer_kl_forward(q, k, qi, ki, idx, varlen, block_size, scale, scale_i, coeff,
                                  lse, index_lse, with_grad, deterministic)
        total = loss if total is None else total + loss
        if with_grad:
            dqi = dq if dqi is None else dqi.add_(dq)
            dki = dk if dki is None else dki.add_(dk)
    return total, dqi, dki
