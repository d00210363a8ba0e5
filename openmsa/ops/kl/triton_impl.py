"""Entry point of the Triton sparse KL loss (launch.py) and of the dense warmup KL through the
same kernels (dense.py). ``openmsa.library`` registers it as the op ``openmsa::indexer_kl_loss``
(the kernels compute the loss and its gradients in one pass; the backward only scales them)."""

from __future__ import annotations

from .dense import dense_kl_forward
from .launch import check_supported, indexer_kl_forward


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def indexer_kl_loss_triton(q, k, qi, ki, topk_indices, varlen, *, block_size, scale, scale_i,
                           coeff, lse, index_lse, with_grad, deterministic=False):
    """Sparse KL of docs/spec.md section 6: (loss float32 0-d, dqi float32 [total_q, Hkv, Di],
    dki float32 [total_k, Di]), the gradients d loss / d qi, ki (None without ``with_grad``).
    ``topk_indices=None``: the dense warmup KL (T = every visible token), through the same
    kernels a chunk of blocks at a time (dense.py). ``deterministic``: bitwise-repeatable
    dki (no float atomics between programs; launch.py)."""
    check_supported(q, qi, topk_indices, block_size)
    q, k, qi, ki = (_last_dim_contiguous(x) for x in (q, k, qi, ki))
    if topk_indices is None:
        return dense_kl_forward(q, k, qi, ki, varlen, block_size, scale, scale_i, coeff, lse,
                                index_lse, with_grad, deterministic)
    return indexer_kl_forward(q, k, qi, ki, topk_indices.contiguous(), varlen, block_size, scale,
                              scale_i, coeff, lse, index_lse, with_grad, deterministic)
