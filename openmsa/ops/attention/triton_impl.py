"""Autograd Functions and entry points of the Triton sparse attention (launch.py) and of
the dense warmup attention through the same kernels (dense.py)."""

from __future__ import annotations

import torch

from .dense import dense_attention_backward, dense_attention_forward
from .launch import check_supported, sparse_attention_backward, sparse_attention_forward


class SparseAttentionTriton(torch.autograd.Function):
    """Forward and backward through the KV-outer kernels."""

    @staticmethod
    def forward(ctx, q, k, v, topk_indices, varlen, block_size, scale, deterministic):
        out, lse = sparse_attention_forward(q, k, v, topk_indices, varlen, block_size, scale)
        ctx.save_for_backward(q, k, v, topk_indices, out, lse)
        ctx.args = (varlen, block_size, scale, deterministic)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, topk_indices, out, lse = ctx.saved_tensors
        varlen, block_size, scale, deterministic = ctx.args
        dq, dk, dv = sparse_attention_backward(do, q, k, v, out, lse, topk_indices, varlen,
                                               block_size, scale, deterministic)
        return dq, dk, dv, None, None, None, None, None


class DenseAttentionTriton(torch.autograd.Function):
    """Dense causal attention through the same kernels, a chunk of blocks at a time (dense.py)."""

    @staticmethod
    def forward(ctx, q, k, v, varlen, block_size, scale, deterministic):
        out, lse = dense_attention_forward(q, k, v, varlen, block_size, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (varlen, block_size, scale, deterministic)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        varlen, block_size, scale, deterministic = ctx.args
        dq, dk, dv = dense_attention_backward(do, q, k, v, out, lse, varlen, block_size, scale,
                                              deterministic)
        return dq, dk, dv, None, None, None, None


def dense_attention_triton(q, k, v, topk_indices, varlen, *, block_size, scale, deterministic=False):
    """``sparse_attention(..., topk_indices=None)``: every visible token (docs/spec.md section 6 warmup)."""
    if topk_indices is not None:
        raise ValueError("dense_attention_triton takes topk_indices=None")
    check_supported(q, block_size)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return DenseAttentionTriton.apply(q, k, v, varlen, block_size, scale, deterministic)


def sparse_attention_triton(q, k, v, topk_indices, varlen, *, block_size, scale, deterministic=False):
    """``deterministic``: the backward without float atomics (sparse_attention_backward)."""
    check_supported(q, block_size)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return SparseAttentionTriton.apply(q, k, v, topk_indices.contiguous(), varlen, block_size, scale,
                                       deterministic)
