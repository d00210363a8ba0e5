"""Exact paged references for serving (docs/spec.md section 8).

Each function gathers every request's pages into the packed, contiguous layout of docs/spec.md
section 3 and calls the existing reference ops (``indexer_topk`` / ``sparse_attention``
with ``backend="reference"``): no attention math is reimplemented here, so a paged
kernel that matches these matches the non-paged contract.

Conventions (see ``cache.py`` for the pool layout):

- Request b has ``kv_lens[b]`` cached tokens (the step's new tokens already appended)
  and ``Lq_b = cu_seqlens_q[b+1] - cu_seqlens_q[b]`` queries, which are its LAST Lq_b
  positions ``kv_lens[b] - Lq_b .. kv_lens[b] - 1`` (bottom-right causal). Lq_b = 0 is
  allowed; Lq_b > kv_lens[b] is an error.
- ``block_size`` is the page size (it may be left as None, or given as a check), and
  ``topk_indices`` hold LOGICAL page ids, i.e. the request-local block ids of docs/spec.md
  section 3 (never physical pages).

These are references: they read lengths and page ids on the host (a sync on CUDA) and
allocate freely.
"""

from __future__ import annotations

import torch

from .. import _validation as V
from ..api import indexer_topk, sparse_attention
from .checks import _check_device, _check_int_tensor, _check_page_values, check_batch_meta, check_pools
from .slots import _slots_of_positions, _token_positions

__all__ = [
    "gather_paged", "paged_indexer_topk_reference", "paged_sparse_attention_reference",
    "paged_msa_reference",
]


def _kv_lens_host(kv_lens) -> tuple:
    lens = tuple(kv_lens.tolist())
    for b, n in enumerate(lens):
        if n < 0:
            raise ValueError(f"kv_lens must be >= 0, got kv_lens[{b}] = {n}")
    return lens


def _cu_k(lens: tuple, device) -> torch.Tensor:
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def _token_slots(page_table, kv_lens, lens: tuple, page_size: int, num_pages: int):
    """Slots of every cached token, request by request (packed order); raises naming
    page_table on a page past its width or a physical id outside [0, num_pages)."""
    cu_k = _cu_k(lens, kv_lens.device)
    total = sum(lens)
    start = torch.zeros_like(kv_lens)
    req, pos = _token_positions(start, cu_k, total)
    slots, lp, phys, in_table = _slots_of_positions(page_table, req, pos, page_size)
    if total > 0:
        _check_page_values(page_table, req, pos, lp, phys, in_table, num_pages, "cached")
    return slots, cu_k


def gather_paged(k_cache, v_cache, ki_cache, page_table, kv_lens):
    """Read every request's cached tokens out of the pools, packed.

    Args:
        k_cache, v_cache ``[num_pages, page_size, Hkv, D]`` (both may be None),
        ki_cache ``[num_pages, page_size, Di]`` (may be None), page_table int32
        ``[batch, max_pages]``, kv_lens int32 ``[batch]``.
    Returns:
        ``(k, v, ki, cu_seqlens_k)``: k, v ``[total_k, Hkv, D]``, ki ``[total_k, 1, Di]``
        (None where the pool is None) and int32 ``cu_seqlens_k [batch + 1]`` built from
        kv_lens. Copies, in the pools' dtype.
    """
    if k_cache is None and v_cache is None and ki_cache is None:
        raise ValueError("gather_paged needs at least one pool (k_cache/v_cache or ki_cache)")
    has_kv = k_cache is not None or v_cache is not None
    num_pages, page_size, _, _, _, device = check_pools(
        k_cache, v_cache, ki_cache, need_kv=has_kv, need_ki=ki_cache is not None)
    check_batch_meta(page_table, kv_lens, "kv_lens", device)
    lens = _kv_lens_host(kv_lens)
    slots, cu_k = _token_slots(page_table, kv_lens, lens, page_size, num_pages)
    page = torch.div(slots, page_size, rounding_mode="floor")
    row = slots - page * page_size
    k = k_cache[page, row] if has_kv else None
    v = v_cache[page, row] if has_kv else None
    ki = ki_cache[page, row].unsqueeze(1) if ki_cache is not None else None
    return k, v, ki, cu_k


def _block_size(block_size, page_size: int) -> int:
    if block_size is None:
        return page_size
    block_size = V.check_positive_int("block_size", block_size)
    if block_size != page_size:
        raise ValueError(f"block_size ({block_size}) must equal the page size of the pools "
                         f"({page_size}): topk_indices are logical page ids")
    return block_size


def _check_queries(cu_seqlens_q, kv_lens, batch: int, total_q: int, qname: str) -> None:
    """cu_seqlens_q int32 [batch + 1], and Lq_b <= kv_lens[b] (host read: a reference)."""
    _check_int_tensor("cu_seqlens_q", cu_seqlens_q, 1, "[batch + 1] int32")
    if cu_seqlens_q.shape[0] != batch + 1:
        raise ValueError(f"cu_seqlens_q must have batch + 1 = {batch + 1} entries (page_table "
                         f"has batch = {batch} rows), got {cu_seqlens_q.shape[0]}")
    _check_device("cu_seqlens_q", cu_seqlens_q, kv_lens.device, "kv_lens")
    cu = tuple(cu_seqlens_q.tolist())
    V._check_cu_values("cu_seqlens_q", cu, total_q, f"total_q ({qname}.shape[0])")
    for b, n in enumerate(kv_lens.tolist()):
        lq = cu[b + 1] - cu[b]
        if lq > n:
            raise ValueError(f"cu_seqlens_q/kv_lens: request {b} has Lq = {lq} queries but only "
                             f"kv_lens = {n} cached tokens; the queries are the last Lq cached "
                             f"positions, so append the new tokens first")


def paged_indexer_topk_reference(qi, ki_cache, page_table, kv_lens, cu_seqlens_q, *,
                                 block_size=None, topk=16, softmax_scale=None,
                                 deterministic=False, init_blocks=0, local_blocks=1):
    """Index Branch over the paged index keys (docs/spec.md sections 4 and 8).

    qi ``[total_q, Hkv, Di]``; ki_cache ``[num_pages, page_size, Di]``. Returns
    ``topk_indices`` int32 ``[Hkv, total_q, topk]`` (LOGICAL page ids, -1 padded) and
    ``index_lse`` float32 ``[Hkv, total_q]``, exactly ``openmsa.indexer_topk`` on the
    gathered keys (``init_blocks``, ``local_blocks``: its forced blocks).
    """
    V.check_tensor("qi", qi, 3, "[total_q, num_heads_kv, index_head_dim]")
    num_pages, page_size, _, _, di, device = check_pools(None, None, ki_cache, need_kv=False)
    V.check_float("qi", qi)
    V.check_same("dtype", [("qi", qi), ("ki_cache", ki_cache)], "dtype")
    _check_device("qi", qi, device, "ki_cache")
    if qi.shape[2] != di:
        raise ValueError(f"ki_cache must have the index_head_dim of qi ({qi.shape[2]}), got {di}")
    block_size = _block_size(block_size, page_size)
    topk = V.check_positive_int("topk", topk)
    V.check_forced_blocks(init_blocks, local_blocks, topk)
    V.check_scale("softmax_scale", softmax_scale, 1.0)
    V.check_bool("deterministic", deterministic)
    batch = check_batch_meta(page_table, kv_lens, "kv_lens", device)
    _kv_lens_host(kv_lens)
    _check_queries(cu_seqlens_q, kv_lens, batch, qi.shape[0], "qi")
    _, _, ki, cu_k = gather_paged(None, None, ki_cache, page_table, kv_lens)
    return indexer_topk(qi, ki, cu_seqlens_q, cu_k, block_size=block_size, topk=topk,
                        softmax_scale=softmax_scale, deterministic=deterministic,
                        backend="reference", init_blocks=init_blocks, local_blocks=local_blocks)


def _check_q_side(q, k_cache, v_cache):
    V.check_tensor("q", q, 3, "[total_q, num_heads_q, head_dim]")
    num_pages, page_size, hkv, d, _, device = check_pools(k_cache, v_cache, None, need_ki=False)
    V.check_float("q", q)
    V.check_same("dtype", [("q", q), ("k_cache", k_cache)], "dtype")
    _check_device("q", q, device, "k_cache")
    if q.shape[2] != d:
        raise ValueError(f"k_cache must have the head_dim of q ({q.shape[2]}), got {d}")
    V.check_heads(q.shape[1], hkv, "q", "k_cache")
    return page_size, device


def paged_sparse_attention_reference(q, k_cache, v_cache, topk_indices, page_table, kv_lens,
                                     cu_seqlens_q, *, block_size=None, softmax_scale=None):
    """Main Branch over the paged K, V (docs/spec.md sections 5 and 8).

    q ``[total_q, Hq, D]``; k_cache, v_cache ``[num_pages, page_size, Hkv, D]``;
    topk_indices int32 ``[Hkv, total_q, K]`` LOGICAL page ids (None: dense causal
    attention over the whole cache, for dense layers). Returns ``(out, lse)`` exactly as
    ``openmsa.sparse_attention`` on the gathered keys (out like q, differentiable w.r.t.
    q and the pools; lse float32 ``[total_q, Hq]``).
    """
    page_size, device = _check_q_side(q, k_cache, v_cache)
    block_size = _block_size(block_size, page_size)
    V.check_scale("softmax_scale", softmax_scale, 1.0)
    batch = check_batch_meta(page_table, kv_lens, "kv_lens", device)
    _kv_lens_host(kv_lens)
    _check_queries(cu_seqlens_q, kv_lens, batch, q.shape[0], "q")
    if topk_indices is not None:
        V.check_topk_indices(topk_indices, k_cache.shape[2], q.shape[0], device)
    k, v, _, cu_k = gather_paged(k_cache, v_cache, None, page_table, kv_lens)
    return sparse_attention(q, k, v, topk_indices, cu_seqlens_q, cu_k, block_size=block_size,
                            softmax_scale=softmax_scale, backend="reference")


def paged_msa_reference(q, qi, k_cache, v_cache, ki_cache, page_table, kv_lens, cu_seqlens_q,
                        *, block_size=None, topk=16, softmax_scale=None,
                        index_softmax_scale=None, deterministic=False, init_blocks=0,
                        local_blocks=1):
    """One serving step of an MSA layer, forward only: Index Branch, then Main Branch on
    the blocks it chose (no KL).

    Returns ``(out, lse, topk_indices, index_lse)``: out like q, lse float32
    ``[total_q, Hq]``, topk_indices int32 ``[Hkv, total_q, topk]`` (logical page ids),
    index_lse float32 ``[Hkv, total_q]``.
    """
    # Validate both branches' arguments before any work.
    page_size, device = _check_q_side(q, k_cache, v_cache)
    check_pools(k_cache, v_cache, ki_cache)
    V.check_tensor("qi", qi, 3, "[total_q, num_heads_kv, index_head_dim]")
    if qi.shape[0] != q.shape[0]:
        raise ValueError(f"qi must have total_q = {q.shape[0]} rows like q, got {qi.shape[0]}")
    if qi.shape[1] != k_cache.shape[2]:
        raise ValueError(f"qi must have one index head per KV head ({k_cache.shape[2]}), "
                         f"got {qi.shape[1]}")
    V.check_scale("softmax_scale", softmax_scale, 1.0)
    V.check_scale("index_softmax_scale", index_softmax_scale, 1.0)
    V.check_positive_int("topk", topk)
    V.check_forced_blocks(init_blocks, local_blocks, topk)
    V.check_bool("deterministic", deterministic)
    _block_size(block_size, page_size)
    idx, index_lse = paged_indexer_topk_reference(
        qi, ki_cache, page_table, kv_lens, cu_seqlens_q, block_size=block_size, topk=topk,
        softmax_scale=index_softmax_scale, deterministic=deterministic, init_blocks=init_blocks,
        local_blocks=local_blocks)
    out, lse = paged_sparse_attention_reference(
        q, k_cache, v_cache, idx, page_table, kv_lens, cu_seqlens_q, block_size=block_size,
        softmax_scale=softmax_scale)
    return out, lse, idx, index_lse
