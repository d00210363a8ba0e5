"""Chunked prefill over a paged cache (docs/spec.md section 8), FlashInfer-style plan/run.

    wrapper = MSAPrefillWrapper(num_heads=64, num_kv_heads=4, head_dim=128, index_head_dim=128)
    wrapper.plan(cu_seqlens_q, kv_lens, page_table)   # request metadata; may allocate / sync
    out, topk_indices = wrapper.run(q, qi, k_cache, v_cache, ki_cache)   # per layer

Each request's new query chunk (its last Lq positions; the chunk's k, v, ki were appended
to the pools first, see ``openmsa.serving.cache``) attends to the request's cached prefix
and to itself, bottom-right causal, varlen across requests. The layout of the pools and
of the metadata is that of ``openmsa.serving.cache``; ``topk_indices`` hold logical page
ids.

``run()`` is the training kernels with paged addressing: the Index Branch's query-tile
kernel (``openmsa.ops.indexer``: fused index GEMM + block max + streaming Top-k, reading
the index-key pages through the page table) and the KV-outer sparse attention forward
(``openmsa.ops.attention``: the block -> queries CSR built on the GPU, K/V blocks read as
pages). Neither reads device values on the host, so a captured ``run()`` replays; unlike
the decode wrapper, ``run()`` allocates the schedule's scratch through PyTorch's caching
allocator (the CSR depends on this layer's Top-k), which CUDA graphs capture from their
private pool. The selected index LSE is not computed (serving has no KL).

Page ids a request uses (its first ceil(kv_lens[b] / B) columns) must be in
[0, num_pages): plan() raises on a negative one, and on one >= ``num_pages`` when given
that (optional) argument; run() raises on one past its pools (a host check of the ids
plan() read: no sync). The kernels (``openmsa.ops``) trust their page table, so run()
clamps the planned table into [0, num_pages) on the device first (one tiny op): a bad id
written behind plan()'s back then reads some other page of the pool, never out of it.

For a few query tokens per request (decode, speculative drafts) use
``openmsa.serving.decode.MSADecodeWrapper``: it splits the index scan of long contexts
across programs, which this query-tile kernel does not.
"""

from __future__ import annotations

import torch

from .. import _backend, library  # noqa: F401 (library: the op torch.ops.openmsa.prefill)
from ..ops.utils.shapes import SUPPORTED
from .checks import check_page_ids, check_planned_pages, check_step_metadata, check_wrapper_config


class MSAPrefillWrapper:
    """Paged chunked prefill (Index Branch Top-k + sparse attention forward)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, index_head_dim: int, *,
                 block_size: int = 128, topk: int = 16, softmax_scale: float | None = None,
                 index_softmax_scale: float | None = None, deterministic: bool = False,
                 init_blocks: int = 0, local_blocks: int = 1):
        check_wrapper_config(self, num_heads, num_kv_heads, head_dim, index_head_dim, block_size, topk,
                             softmax_scale, index_softmax_scale, init_blocks, local_blocks)
        shapes = SUPPORTED["paged_prefill"]
        if block_size not in shapes.block_sizes or index_head_dim not in shapes.index_head_dims:
            raise ValueError(f"block_size must be one of {shapes.block_sizes} and index_head_dim one of "
                             f"{shapes.index_head_dims} for the paged prefill (the Triton indexer's "
                             f"tiles), got {block_size} and {index_head_dim}")
        if not isinstance(deterministic, bool):
            raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
        self.deterministic = deterministic
        self._plan = None

    def plan(self, cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, page_table: torch.Tensor,
             *, dtype: torch.dtype = torch.bfloat16, num_pages: int | None = None) -> None:
        """Request metadata of one step; ``dtype`` is the dtype of q and of the output;
        ``num_pages``: the pools' page count, to check the page ids here rather than in
        run() (a replayed graph runs no check)."""
        cu, lens, _ = check_step_metadata(cu_seqlens_q, kv_lens, page_table, dtype, self.block_size)
        max_page = check_page_ids(page_table, lens, self.block_size, num_pages)
        device = page_table.device
        batch, total_q = len(lens), cu[-1]
        cu_k = torch.tensor([0] + torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)
        key = (batch, total_q, page_table.shape[1], dtype, device)
        p = self._plan
        if p is None or p["key"] != key:
            p = dict(key=key, batch=batch, total_q=total_q, dtype=dtype, device=device,
                     cu_q=torch.empty(batch + 1, dtype=torch.int32, device=device),
                     cu_k=torch.empty(batch + 1, dtype=torch.int32, device=device),
                     page_table=torch.empty(page_table.shape, dtype=torch.int32, device=device),
                     topk=torch.empty((self.num_kv_heads, total_q, self.topk), dtype=torch.int32, device=device),
                     out=torch.empty((total_q, self.num_heads, self.head_dim), dtype=dtype, device=device),
                     lse=torch.empty((total_q, self.num_heads), dtype=torch.float32, device=device))
        p["cu_q"].copy_(cu_seqlens_q)
        p["cu_k"].copy_(cu_k)
        p["page_table"].copy_(page_table)
        # Upper bound on the blocks of all requests (the CSR key space), from the page-table
        # width so that a re-plan with the same shapes keeps a captured graph valid.
        p["num_blocks_bound"] = batch * page_table.shape[1] + 1
        p["total_k"] = int(cu_k[-1])
        p["lens"], p["max_page"] = lens, max_page
        self._plan = p

    def run(self, q, qi, k_cache, v_cache, ki_cache, *, return_lse: bool = False):
        """``(out, topk_indices)`` (``(out, lse, topk_indices)`` with ``return_lse``): the
        wrapper's buffers, overwritten by the next run()."""
        p = self._plan
        if p is None:
            raise RuntimeError("MSAPrefillWrapper: call plan() before run()")
        hq, hkv, d, di, bs = self.num_heads, self.num_kv_heads, self.head_dim, self.index_head_dim, self.block_size
        for name, x, shape in (("q", q, (p["total_q"], hq, d)), ("qi", qi, (p["total_q"], hkv, di))):
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got "
                                 f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        for name, x, tail in (("k_cache", k_cache, (bs, hkv, d)), ("v_cache", v_cache, (bs, hkv, d)),
                              ("ki_cache", ki_cache, (bs, di))):
            if not isinstance(x, torch.Tensor) or x.dim() != len(tail) + 1 or tuple(x.shape[1:]) != tail:
                raise ValueError(f"{name} must have shape [num_pages, {', '.join(map(str, tail))}], got "
                                 f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        for name, x in (("q", q), ("qi", qi), ("k_cache", k_cache), ("v_cache", v_cache), ("ki_cache", ki_cache)):
            if x.device != p["device"]:
                raise ValueError(f"{name} must be on the planned device {p['device']}, got {x.device}")
            if x.stride(-1) != 1:
                raise ValueError(f"{name} must be contiguous in its last dimension")
        if q.dtype != p["dtype"] or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
            raise TypeError(f"q, k_cache and v_cache must have the planned dtype {p['dtype']}, got "
                            f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
        if qi.dtype != ki_cache.dtype:
            raise TypeError(f"qi and ki_cache must have the same dtype, got {qi.dtype} and {ki_cache.dtype}")
        num_pages = min(k_cache.shape[0], v_cache.shape[0], ki_cache.shape[0])
        for name, x in (("k_cache", k_cache), ("v_cache", v_cache), ("ki_cache", ki_cache)):
            check_planned_pages(p, x.shape[0], name, bs)
        if p["total_q"] == 0:
            return (p["out"], p["lse"], p["topk"]) if return_lse else (p["out"], p["topk"])
        p["page_table"].clamp_(0, num_pages - 1)  # memory safety whatever the buffer holds
        torch.ops.openmsa.prefill(*self._op_args(q, qi, k_cache, v_cache, ki_cache))
        out, lse, topk_idx = p["out"], p["lse"], p["topk"]
        return (out, lse, topk_idx) if return_lse else (out, topk_idx)

    def _op_args(self, q, qi, k_cache, v_cache, ki_cache) -> tuple:
        """The arguments of the op openmsa::prefill for this plan (its outputs: the plan's
        topk, out and lse buffers)."""
        p = self._plan
        return (q, qi, k_cache, v_cache, ki_cache, p["cu_q"], p["cu_k"], p["page_table"], p["topk"],
                p["out"], p["lse"], p["total_k"], p["num_blocks_bound"], self.softmax_scale,
                self.index_softmax_scale, self.deterministic, self.init_blocks, self.local_blocks,
                "triton")


def launch_prefill(q, qi, k_cache, v_cache, ki_cache, varlen, page_table, topk_idx, out, lse, *,
                   num_blocks_bound, scale, index_scale, deterministic, init_blocks, local_blocks):
    """The paged Index Branch into topk_idx, then the paged sparse attention forward into out, lse
    (reached through the op openmsa::prefill, openmsa.library)."""
    indexer = _backend._load("openmsa.ops.indexer.triton_impl:indexer_topk_triton", q.device)
    attention = _backend._load("openmsa.ops.attention.triton_impl:sparse_attention_forward", q.device)
    bs = k_cache.shape[1]
    indexer(qi, ki_cache, varlen, block_size=bs, topk=topk_idx.shape[2], scale=index_scale,
            deterministic=deterministic, page_table=page_table, out=topk_idx, with_lse=False,
            init_blocks=init_blocks, local_blocks=local_blocks)
    attention(q, k_cache, v_cache, topk_idx, varlen, bs, scale, page_table=page_table,
              num_blocks_bound=num_blocks_bound, out=out, lse=lse)
