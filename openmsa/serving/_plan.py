"""Argument checks shared by the serving wrappers' constructors and plan() (host side:
plan() may read the request metadata on the host, run() never does)."""

from __future__ import annotations

import math

import torch


def check_int(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def check_wrapper_config(w, num_heads, num_kv_heads, head_dim, index_head_dim, block_size, topk,
                         softmax_scale, index_softmax_scale) -> None:
    """Validate and set the model constants of a serving wrapper ``w``."""
    w.num_heads = check_int("num_heads", num_heads)
    w.num_kv_heads = check_int("num_kv_heads", num_kv_heads)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    w.head_dim = check_int("head_dim", head_dim)
    w.index_head_dim = check_int("index_head_dim", index_head_dim)
    for name, v in (("head_dim", head_dim), ("index_head_dim", index_head_dim)):
        if v not in (16, 32, 64, 128, 256):
            raise ValueError(f"{name} must be one of 16, 32, 64, 128, 256, got {v}")
    w.block_size = check_int("block_size", block_size)
    if block_size not in (16, 32, 64, 128):
        raise ValueError(f"block_size must be 16, 32, 64 or 128 (the page size), got {block_size}")
    w.topk = check_int("topk", topk)
    if topk > 64:
        raise ValueError(f"topk must be at most 64, got {topk}")
    w.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    w.index_softmax_scale = (1.0 / math.sqrt(index_head_dim) if index_softmax_scale is None
                             else float(index_softmax_scale))


def check_step_metadata(cu_seqlens_q, kv_lens, page_table, dtype, block_size, max_q=None):
    """Validate one step's request metadata (reads it on the host) and return the host
    lists (cu_seqlens_q, kv_lens, query counts)."""
    for name, x, dim in (("cu_seqlens_q", cu_seqlens_q, 1), ("kv_lens", kv_lens, 1),
                         ("page_table", page_table, 2)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {x.dtype}")
        if x.dim() != dim:
            raise ValueError(f"{name} must have {dim} dimension(s), got shape {tuple(x.shape)}")
    batch = kv_lens.numel()
    if cu_seqlens_q.numel() != batch + 1:
        raise ValueError(f"cu_seqlens_q must have batch + 1 = {batch + 1} entries, got {cu_seqlens_q.numel()}")
    if page_table.shape[0] != batch:
        raise ValueError(f"page_table must have batch = {batch} rows, got {page_table.shape[0]}")
    device = page_table.device
    if cu_seqlens_q.device != device or kv_lens.device != device:
        raise ValueError("cu_seqlens_q, kv_lens and page_table must be on the same device")
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    cu = cu_seqlens_q.cpu().tolist()
    lens = kv_lens.cpu().tolist()
    qlens = [cu[i + 1] - cu[i] for i in range(batch)]
    if cu[0] != 0 or any(n < 0 for n in qlens):
        raise ValueError(f"cu_seqlens_q must start at 0 and be non-decreasing, got {cu}")
    if max_q is not None and any(n > max_q for n in qlens):
        raise ValueError(f"cu_seqlens_q: at most max_q_per_request = {max_q} "
                         f"query tokens per request, got {max(qlens)}")
    max_pages = page_table.shape[1]
    for b, (n, kl) in enumerate(zip(qlens, lens)):
        if kl < n:
            raise ValueError(f"kv_lens[{b}] = {kl} is smaller than the request's {n} query tokens")
        if -(-kl // block_size) > max_pages:
            raise ValueError(f"kv_lens[{b}] = {kl} needs {-(-kl // block_size)} pages, "
                             f"page_table has {max_pages}")
    return cu, lens, qlens


def check_page_ids(page_table, lens, block_size, num_pages=None):
    """Every page id a request uses (its first ceil(kv_lens[b] / B) columns) must be >= 0,
    and < ``num_pages`` when given. One device reduction and one small host read (plan()
    syncs anyway). Returns ``(largest id used, its request, its column)`` (-1, -1, -1 when
    no page is used) so that run(), which knows the pools, can check it without a sync."""
    if num_pages is not None:
        check_int("num_pages", num_pages)
    batch, width = page_table.shape
    if batch == 0 or width == 0:
        return -1, -1, -1
    dev = page_table.device
    need = torch.tensor([-(-n // block_size) for n in lens], dtype=torch.int32).to(dev)
    used = torch.arange(width, device=dev)[None, :] < need[:, None]
    lo = torch.where(used, page_table, 2**31 - 1).flatten()
    hi = torch.where(used, page_table, -1).flatten()
    lo_v, lo_i, hi_v, hi_i = torch.stack([lo.min().long(), lo.argmin(), hi.max().long(), hi.argmax()]).tolist()
    if lo_v < 0:
        raise_bad_page(lo_i // width, lo_i % width, lo_v, lens[lo_i // width], block_size, num_pages)
    if num_pages is not None and hi_v >= num_pages:
        raise_bad_page(hi_i // width, hi_i % width, hi_v, lens[hi_i // width], block_size, num_pages)
    return (hi_v, hi_i // width, hi_i % width) if hi_v >= 0 else (-1, -1, -1)


def raise_bad_page(b, c, value, kv_len, block_size, num_pages, pool=None):
    rng = f"[0, {num_pages})" if num_pages is not None else ">= 0"
    where = f" (the pages of {pool})" if pool else ""
    raise ValueError(f"page_table[{b}, {c}] = {value}: request {b} uses its first "
                     f"{-(-kv_len // block_size)} page-table columns (kv_lens[{b}] = {kv_len}, page size "
                     f"{block_size}), and every page id it uses must be a physical page in {rng}{where}")


def check_planned_pages(plan, num_pages, pool, block_size):
    """run()'s host-side check of the planned page ids against a pool's size (no sync)."""
    top, b, c = plan["max_page"]
    if top >= num_pages:
        raise_bad_page(b, c, top, plan["lens"][b], block_size, num_pages, pool)
