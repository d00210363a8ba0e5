"""Autograd Function and entry point of the Triton sparse KL loss (launch.py) and of the
dense warmup KL through the same kernels (dense.py)."""

from __future__ import annotations

import torch

from .dense import dense_kl_forward
from .launch import check_supported, indexer_kl_forward


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


class IndexerKLTriton(torch.autograd.Function):
    """Forward computes the loss and the gradients in one pass; backward scales them."""

    @staticmethod
    def forward(ctx, q, k, qi, ki, topk_indices, varlen, block_size, scale, scale_i, coeff,
                lse, index_lse, deterministic):
        with_grad = bool(ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
        if topk_indices is None:  # dense warmup KL: the same kernels, chunk by chunk (dense.py)
            loss, dqi, dki = dense_kl_forward(q, k, qi, ki, varlen, block_size, scale, scale_i,
                                              coeff, lse, index_lse, with_grad, deterministic)
        else:
            loss, dqi, dki = indexer_kl_forward(q, k, qi, ki, topk_indices, varlen, block_size,
                                                scale, scale_i, coeff, lse, index_lse, with_grad,
                                                deterministic)
        if with_grad:
            ctx.save_for_backward(dqi, dki)
        ctx.shapes = (qi.dtype, ki.dtype, ki.shape)
        return loss

    @staticmethod
    def backward(ctx, grad):
        dqi, dki = ctx.saved_tensors
        qi_dtype, ki_dtype, ki_shape = ctx.shapes
        dqi = (dqi * grad).to(qi_dtype) if ctx.needs_input_grad[2] else None
        dki = (dki * grad).to(ki_dtype).view(ki_shape) if ctx.needs_input_grad[3] else None
        return (None, None, dqi, dki) + (None,) * 9


def indexer_kl_loss_triton(q, k, qi, ki, topk_indices, varlen, *, block_size, scale, scale_i,
                           coeff, lse, index_lse, deterministic=False):
    """Sparse KL of docs/spec.md section 6: float32 0-d loss, differentiable w.r.t. qi and ki only.
    ``topk_indices=None``: the dense warmup KL (T = every visible token), through the same
    kernels a chunk of blocks at a time (dense.py). ``deterministic``: bitwise-repeatable
    dki (no float atomics between programs; module docstring)."""
    check_supported(q, qi, topk_indices, block_size)
    q, k, qi, ki = (_last_dim_contiguous(x.detach() if i < 2 else x)
                    for i, x in enumerate((q, k, qi, ki)))
    if topk_indices is not None:
        topk_indices = topk_indices.contiguous()
    return IndexerKLTriton.apply(q, k, qi, ki, topk_indices, varlen, block_size,
                                 scale, scale_i, coeff, lse, index_lse, deterministic)
