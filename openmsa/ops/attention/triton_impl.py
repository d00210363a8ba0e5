"""Entry points of the Triton sparse attention (launch.py) and of the dense warmup attention
through the same kernels (dense.py), forward and backward. ``openmsa.library`` registers
them, with their autograd, as the ops ``openmsa::sparse_attention`` and
``openmsa::sparse_attention_backward``."""

from __future__ import annotations

from .dense import dense_attention_backward, dense_attention_forward
from .launch import check_supported, sparse_attention_backward, sparse_attention_forward


def _last_dim_contiguous(*xs):
    return tuple(x if x.stride(-1) == 1 else x.contiguous() for x in xs)


def sparse_attention_triton(q, k, v, topk_indices, varlen, *, block_size, scale):
    """(out like q, lse float32 [total_q, Hq]) over the blocks of ``topk_indices``."""
    check_supported(q, block_size)
    q, k, v = _last_dim_contiguous(q, k, v)
    return sparse_attention_forward(q, k, v, topk_indices.contiguous(), varlen, block_size, scale)


def sparse_attention_backward_triton(do, q, k, v, out, lse, topk_indices, varlen, *, block_size,
                                     scale, deterministic=False):
    """(dq, dk, dv) like q, k, v. ``deterministic``: no float atomics (sparse_attention_backward)."""
    q, k, v = _last_dim_contiguous(q, k, v)
    return sparse_attention_backward(do, q, k, v, out, lse, topk_indices.contiguous(), varlen,
                                     block_size, scale, deterministic)


def dense_attention_triton(q, k, v, varlen, *, block_size, scale):
    """``sparse_attention(..., topk_indices=None)``: every visible token (docs/spec.md section 6 warmup)."""
    check_supported(q, block_size)
    q, k, v = _last_dim_contiguous(q, k, v)
    return dense_attention_forward(q, k, v, varlen, block_size, scale)


def dense_attention_backward_triton(do, q, k, v, out, lse, varlen, *, block_size, scale,
                                    deterministic=False):
    q, k, v = _last_dim_contiguous(q, k, v)
    return dense_attention_backward(do, q, k, v, out, lse, varlen, block_size, scale, deterministic)
