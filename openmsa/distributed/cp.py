"""Context-parallel MSA over torch.distributed (NCCL on GPUs, gloo on CPUs).

Every rank holds its zigzag shard of the packed sequences (``openmsa.distributed.shard``:
chunks r and 2W - 1 - r of every sequence). One layer then runs as:

1. all-gather the keys (k, v and the index key ki) of every rank, padded to the longest
   shard, into the packed global order (one ``all_gather_into_tensor``);
2. run the three ops on this rank's queries in the fragment form of docs/spec.md section 3:
   each local chunk is a query fragment over the prefix of its sequence's gathered keys
   that ends at the chunk's last token, so no key is copied per fragment;
3. backward: the gradients of the gathered keys come back through a reduce-scatter (the
   all-gather's adjoint), so each rank gets exactly its shard of dk, dv, dki.

The results are this rank's shard of the single-process results (out, topk_indices) and
this rank's part of the KL: ``coeff / (Hkv * total)`` times its rows' KL terms, so the sum
over ranks is the single-process loss. Every rank must run the backward of a loss that
depends on the gathered keys (the reduce-scatter is collective), e.g. its local
``lm_loss + lam * kl``; the gradients of parameters that precede the layer are then
partial sums, to be all-reduced over the ranks as data parallelism does.

gloo cannot run these collectives on CUDA tensors: with a gloo group they go through host
memory (for tests that put several ranks on one GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import _validation as V
from ..api import indexer_kl_loss, indexer_topk, sparse_attention
from .layout import _host_cu, shard_indices

__all__ = ["CPPlan", "cp_plan", "msa_attention_cp", "dense_attention_cp"]


@dataclass(frozen=True)
class CPPlan:
    """This rank's layout, from the global cu_seqlens (built on the host, once per tensor).

    ``cu_seqlens_q`` / ``kv_start`` / ``kv_len``: the fragment form of the local rows (two
    fragments per sequence, early chunk first) over the gathered global keys;
    ``gather_index`` [total]: the row of global token t in the padded all-gather buffer
    (owner rank x ``max_local`` + its local row); ``positions`` [local_total]: the position
    of each local token in its sequence (for RoPE)."""

    world_size: int
    rank: int
    total: int
    local_total: int
    max_local: int
    cu_seqlens_q: torch.Tensor
    kv_start: torch.Tensor
    kv_len: torch.Tensor
    gather_index: torch.Tensor
    positions: torch.Tensor


_PLAN_ATTR = "_openmsa_cp_plan"


def cp_plan(cu_seqlens: torch.Tensor, world_size: int, rank: int) -> CPPlan:
    """The plan of rank ``rank`` of ``world_size`` for the packed global ``cu_seqlens``
    (int32 [num_seqs + 1]); remembered on the tensor with its version counter."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    key = (cu_seqlens._version, world_size, rank)
    cached = getattr(cu_seqlens, _PLAN_ATTR, None)
    if cached is not None and cached[0] == key:
        return cached[1]
    cu = _host_cu(cu_seqlens)
    n, dev = 2 * world_size, cu_seqlens.device
    cu_q, starts, lens = [0], [], []
    for s, e in zip(cu, cu[1:]):
        length = e - s
        for c in (rank, n - 1 - rank):
            lo, hi = c * length // n, (c + 1) * length // n
            cu_q.append(cu_q[-1] + hi - lo)
            starts.append(s)
            lens.append(hi)  # the fragment's keys: its sequence's tokens up to its last one
    index = [shard_indices(cu_seqlens.cpu(), world_size, r) for r in range(world_size)]
    max_local = max(i.numel() for i in index)
    gather_index = torch.empty(cu[-1], dtype=torch.int64)
    for r, i in enumerate(index):
        gather_index[i] = r * max_local + torch.arange(i.numel())
    mine = index[rank]
    seq_start = torch.tensor(cu[:-1], dtype=torch.int64)
    seq_of = torch.searchsorted(torch.tensor(cu[1:], dtype=torch.int64), mine, right=True)
    i32 = dict(dtype=torch.int32, device=dev)
    plan = CPPlan(world_size, rank, cu[-1], mine.numel(), max_local, torch.tensor(cu_q, **i32),
                  torch.tensor(starts, **i32), torch.tensor(lens, **i32), gather_index.to(dev),
                  (mine - seq_start[seq_of]).to(dev))
    try:
        setattr(cu_seqlens, _PLAN_ATTR, (key, plan))
    except (AttributeError, TypeError):
        pass
    return plan


def _through_host(group) -> bool:
    return dist.get_backend(group) == dist.Backend.GLOO


class _AllGatherRows(torch.autograd.Function):
    """[n, F] per rank -> [W * n, F] (rank order); backward: the reduce-scatter (sum)."""

    @staticmethod
    def forward(ctx, x, group, world_size):
        ctx.group, ctx.world_size = group, world_size
        host = _through_host(group) and x.is_cuda
        src = (x.cpu() if host else x).contiguous()
        out = src.new_empty((world_size * src.shape[0],) + tuple(src.shape[1:]))
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        all_gather(out, src, group=group)
        return out.to(x.device) if host else out

    @staticmethod
    def backward(ctx, grad):
        host = _through_host(ctx.group) and grad.is_cuda
        # half-precision partial sums are added in float32: a bf16 ring reduction would
        # round W - 1 times (twice the bytes of the forward's gather)
        src = grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad
        src = (src.cpu() if host else src).contiguous()
        out = src.new_empty((src.shape[0] // ctx.world_size,) + tuple(src.shape[1:]))
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        reduce_scatter(out, src, op=dist.ReduceOp.SUM, group=ctx.group)
        return out.to(grad.device, grad.dtype), None, None


def _gather_keys(plan: CPPlan, group, tensors):
    """The global packed [total, ...] of each local [local_total, ...] tensor: one
    collective per dtype, rows padded to ``plan.max_local``."""
    out = [None] * len(tensors)
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        which = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        flat = torch.cat([tensors[i].reshape(plan.local_total, -1) for i in which], 1)
        flat = F.pad(flat, (0, 0, 0, plan.max_local - plan.local_total))
        full = _AllGatherRows.apply(flat, group, plan.world_size)[plan.gather_index]
        col = 0
        for i in which:
            width = math.prod(tensors[i].shape[1:])
            out[i] = full[:, col:col + width].view(plan.total, *tensors[i].shape[1:])
            col += width
    return out


def _prepare(q, k, v, qi, ki, cu_seqlens, group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context parallelism needs an initialised torch.distributed process group")
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    plan = cp_plan(cu_seqlens, world_size, rank)
    for name, t in (("q", q), ("k", k), ("v", v), ("qi", qi), ("ki", ki)):
        V.check_tensor(name, t, 3, "[local_total, heads, dim] (this rank's shard)")
        if t.shape[0] != plan.local_total:
            raise ValueError(f"{name} must hold this rank's shard of cu_seqlens: "
                             f"{plan.local_total} rows on rank {rank} of {world_size}, got "
                             f"{t.shape[0]} (openmsa.distributed.shard gives it)")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens must be on {q.device} like q, got {cu_seqlens.device}")
    return plan


def _kl_coeff(plan: CPPlan, coeff: float) -> float:
    """The ops normalise the KL by the rows of the call; the parts must add up to the
    single-process normalisation by all rows."""
    return coeff * plan.local_total / plan.total if plan.total else 0.0


def msa_attention_cp(q, k, v, qi, ki, cu_seqlens, *, group=None, block_size=128, topk=16,
                     softmax_scale=None, index_softmax_scale=None, coeff=1.0,
                     deterministic=False, backend="auto", init_blocks=0, local_blocks=1,
                     index_dtype=None):
    """``openmsa.msa_attention`` of one packed batch spread over the ranks of ``group``.

    Args:
        q ``[local_total, Hq, D]``, k, v ``[local_total, Hkv, D]``, qi ``[local_total, Hkv,
            Di]``, ki ``[local_total, 1, Di]``: this rank's shard (``openmsa.distributed.shard``).
        cu_seqlens: int32 ``[num_seqs + 1]``, the global layout (the same on every rank;
            read on the host once per tensor).
        group: the process group (None: the default one). Other arguments as in
            ``msa_attention``; ``coeff`` scales the KL.
    Returns:
        ``(out, kl_loss, topk_indices)``: this rank's shard of out ``[local_total, Hq, D]``
        and of topk_indices ``[Hkv, local_total, K]``, and this rank's part of the KL (the
        parts sum to the single-process KL). Backward gives this rank its shard of every
        gradient; every rank must run it (module docstring).
    """
    return _attention_cp(q, k, v, qi, ki, cu_seqlens, group, dict(topk=topk, init_blocks=init_blocks,
                                                                  local_blocks=local_blocks,
                                                                  index_dtype=index_dtype),
                         block_size, softmax_scale, index_softmax_scale, coeff, deterministic, backend)


def dense_attention_cp(q, k, v, qi, ki, cu_seqlens, *, group=None, block_size=128,
                       softmax_scale=None, index_softmax_scale=None, coeff=1.0,
                       deterministic=False, backend="auto"):
    """The dense warmup (docs/spec.md section 6: full causal attention, the KL over all
    visible tokens) spread over the ranks like :func:`msa_attention_cp`; returns
    ``(out, kl_loss)``: this rank's shard of out and its part of the KL."""
    out, kl, _ = _attention_cp(q, k, v, qi, ki, cu_seqlens, group, None, block_size, softmax_scale,
                               index_softmax_scale, coeff, deterministic, backend)
    return out, kl


def _attention_cp(q, k, v, qi, ki, cu_seqlens, group, index, block_size, softmax_scale,
                  index_softmax_scale, coeff, deterministic, backend):
    """Gather the keys, then the ops on this rank's query fragments over them: the Index
    Branch (its arguments ``index``; None: the dense warmup, every visible token), the Main
    Branch and this rank's part of the KL. Returns (out, kl, topk_indices or None)."""
    plan = _prepare(q, k, v, qi, ki, cu_seqlens, group)
    coeff = V.check_finite_float("coeff", coeff)
    k_g, v_g, ki_g = _gather_keys(plan, group, [k, v, ki])
    frag = dict(kv_start=plan.kv_start, kv_len=plan.kv_len, block_size=block_size,
                deterministic=deterministic, backend=backend)
    cu_q = plan.cu_seqlens_q
    idx = index_lse = None
    if index is not None:
        idx, index_lse = indexer_topk(qi.detach(), ki_g.detach(), cu_q, None,
                                      softmax_scale=index_softmax_scale, **index, **frag)
    out, lse = sparse_attention(q, k_g, v_g, idx, cu_q, None, softmax_scale=softmax_scale, **frag)
    kl = indexer_kl_loss(q.detach(), k_g.detach(), qi, ki_g, idx, cu_q, None,
                         softmax_scale=softmax_scale, index_softmax_scale=index_softmax_scale,
                         coeff=_kl_coeff(plan, coeff), lse=lse, index_lse=index_lse, **frag)
    return out, kl, idx
