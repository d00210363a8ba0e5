"""Argument checks of the serving ops and wrappers, host side (never inside a kernel).

- Tensors: the pools, the page table and lengths, the append's tokens and slots (used by
  ``pool.py``, ``slots.py``, ``append.py`` and ``reference.py``). The metadata checks never
  read values; the value checks (page ids of new tokens, slots) read them on the host and run
  only when asked (``check=True``, CPU tensors, the reference backend or
  ``OPENMSA_CHECK_INPUTS=1``; see ``cache.py``).
- The wrappers' constructors and ``plan()`` (``decode.py``, ``prefill.py``): ``plan()`` may read
  the request metadata on the host, ``run()`` never does.
"""

from __future__ import annotations

import math

import torch

from .. import _validation as V
from ..ops.utils.shapes import SUPPORTED


# --------------------------------------------------------------------------- tensors and pools

def check_pools(k_cache, v_cache, ki_cache, *, need_kv: bool = True, need_ki: bool = True):
    """Validate the pools' shapes, dtypes and devices; return
    ``(num_pages, page_size, Hkv, D, Di, device)`` (Hkv, D or Di None for a pool that
    is None and not needed). Metadata only: never reads values."""
    pools = []
    shape = None  # (num_pages, page_size) of the first pool
    hkv = d = di = None
    if need_kv or k_cache is not None or v_cache is not None:
        V.check_tensor("k_cache", k_cache, 4, "[num_pages, page_size, num_kv_heads, head_dim]")
        V.check_tensor("v_cache", v_cache, 4, "[num_pages, page_size, num_kv_heads, head_dim]")
        V.check_float("k_cache", k_cache)
        V.check_same("dtype", [("k_cache", k_cache), ("v_cache", v_cache)], "dtype")
        if k_cache.shape != v_cache.shape:
            raise ValueError(f"v_cache must have the shape of k_cache {tuple(k_cache.shape)}, "
                             f"got {tuple(v_cache.shape)}")
        pools += [("k_cache", k_cache), ("v_cache", v_cache)]
        shape = ("k_cache", tuple(k_cache.shape[:2]))
        hkv, d = k_cache.shape[2], k_cache.shape[3]
        if hkv < 1 or d < 1:
            raise ValueError(f"k_cache must have num_kv_heads >= 1 and head_dim >= 1, got "
                             f"{tuple(k_cache.shape)}")
    if need_ki or ki_cache is not None:
        V.check_tensor("ki_cache", ki_cache, 3, "[num_pages, page_size, index_head_dim]")
        V.check_float("ki_cache", ki_cache)
        pools.append(("ki_cache", ki_cache))
        di = ki_cache.shape[2]
        if di < 1:
            raise ValueError(f"ki_cache must have index_head_dim >= 1, got {tuple(ki_cache.shape)}")
        if shape is None:
            shape = ("ki_cache", tuple(ki_cache.shape[:2]))
        elif tuple(ki_cache.shape[:2]) != shape[1]:
            raise ValueError(f"ki_cache must have [num_pages, page_size] = {list(shape[1])} like "
                             f"{shape[0]}, got {list(ki_cache.shape[:2])}")
    V.check_same("device", pools, "device")
    num_pages, page_size = shape[1]
    if page_size < 1:
        raise ValueError(f"{shape[0]} must have page_size (dim 1) >= 1, got {page_size}")
    return num_pages, page_size, hkv, d, di, pools[0][1].device


def _check_int_tensor(name: str, t, ndim: int, layout: str, dtypes=(torch.int32,)) -> None:
    V.check_tensor(name, t, ndim, layout)
    if t.dtype not in dtypes:
        want = " or ".join(str(x).replace("torch.", "") for x in dtypes)
        raise TypeError(f"{name} must be {want}, got {t.dtype}")


def _check_device(name: str, t: torch.Tensor, device, ref: str) -> None:
    if t.device != device:
        raise ValueError(f"{name} must be on {device} like {ref}, got {t.device}")


def _want_check(check, device: torch.device) -> bool:
    if check is None:
        return device.type == "cpu" or V.check_inputs_on_device()
    return V.check_bool("check", check)


def check_batch_meta(page_table, lens, lens_name: str, device=None):
    """page_table int32 [batch, max_pages] and an int32 [batch] length vector; returns batch."""
    _check_int_tensor("page_table", page_table, 2, "[batch, max_pages] int32")
    _check_int_tensor(lens_name, lens, 1, "[batch] int32")
    batch = page_table.shape[0]
    if lens.shape[0] != batch:
        raise ValueError(f"{lens_name} must have one entry per request (page_table has batch = "
                         f"{batch} rows), got {lens.shape[0]}")
    device = page_table.device if device is None else device
    _check_device("page_table", page_table, device, "the pools")
    _check_device(lens_name, lens, device, "page_table")
    return batch


def _check_page_values(page_table, req, pos, lp, phys, in_table, num_pages, what: str) -> None:
    """Host-side errors for tokens whose page cannot be resolved (reads values: CPU or asked)."""
    bad = (~in_table).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        b, p, q = int(req[i]), int(pos[i]), int(lp[i])
        raise ValueError(
            f"page_table: request {b} needs logical page {q} for its {what} token at position "
            f"{p}, but page_table has only {page_table.shape[1]} columns (max_pages)")
    bad = ((phys < 0) | ((phys >= num_pages) if num_pages is not None else False)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        b, q = int(req[i]), int(lp[i])
        rng = f"[0, {num_pages})" if num_pages is not None else ">= 0"
        raise ValueError(
            f"page_table[{b}, {q}] = {int(phys[i])} (request {b}, logical page {q}, holding its "
            f"{what} token at position {int(pos[i])}) must be a physical page id in {rng}")


def _check_append(k, v, ki, k_cache, v_cache, ki_cache, slots):
    """Metadata checks of append_paged_kv; returns (num_pages, page_size)."""
    if (ki is None) != (ki_cache is None):
        raise ValueError("ki and ki_cache must be given together (or both None for a layer "
                         "without index keys)")
    num_pages, page_size, hkv, d, di, device = check_pools(k_cache, v_cache, ki_cache,
                                                           need_ki=ki is not None)
    V.check_tensor("k", k, 3, "[total_new, num_kv_heads, head_dim]")
    V.check_tensor("v", v, 3, "[total_new, num_kv_heads, head_dim]")
    if k.shape != v.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if tuple(k.shape[1:]) != (hkv, d):
        raise ValueError(f"k must have [num_kv_heads, head_dim] = [{hkv}, {d}] like k_cache, "
                         f"got {list(k.shape[1:])}")
    V.check_same("dtype", [("k_cache", k_cache), ("k", k), ("v", v)], "dtype")
    n = k.shape[0]
    named = [("k_cache", k_cache), ("k", k), ("v", v)]
    if ki is not None:
        if not isinstance(ki, torch.Tensor) or ki.dim() not in (2, 3):
            got = tuple(ki.shape) if isinstance(ki, torch.Tensor) else type(ki).__name__
            raise ValueError(f"ki must be [total_new, 1, index_head_dim] or "
                             f"[total_new, index_head_dim], got {got}")
        if ki.dim() == 3 and ki.shape[1] != 1:
            raise ValueError(f"ki must have exactly one (shared) index head, got {ki.shape[1]}")
        if ki.shape[0] != n or ki.shape[-1] != di:
            raise ValueError(f"ki must have total_new = {n} rows like k and index_head_dim = {di} "
                             f"like ki_cache, got {tuple(ki.shape)}")
        V.check_same("dtype", [("ki_cache", ki_cache), ("ki", ki)], "dtype")
        named.append(("ki", ki))
    _check_int_tensor("slot_mapping", slots, 1, "[total_new] int64 (or int32)",
                      (torch.int64, torch.int32))
    if slots.shape[0] != n:
        raise ValueError(f"slot_mapping must have one slot per new token ({n}), got {slots.shape[0]}")
    named.append(("slot_mapping", slots))
    for name, t in named:
        _check_device(name, t, device, "the pools")
    return num_pages, page_size


def _check_slot_values(slots, num_slots: int) -> None:
    live = slots[slots >= 0].long()
    if live.numel() == 0:
        return
    top = int(live.max())
    if top >= num_slots:
        i = int((slots.long() == top).nonzero()[0, 0])
        raise ValueError(f"slot_mapping[{i}] = {top} is out of range: the pools have "
                         f"num_pages * page_size = {num_slots} slots (negative slots are skipped)")
    uniq, counts = torch.unique(live, return_counts=True)
    if bool((counts > 1).any()):
        dup = int(uniq[counts > 1][0])
        raise ValueError(f"slot_mapping holds slot {dup} more than once: two new tokens cannot "
                         f"share a cache row")


# --------------------------------------------------------------------------- wrappers: config and plan()

def check_int(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def check_wrapper_config(w, num_heads, num_kv_heads, head_dim, index_head_dim, block_size, topk,
                         softmax_scale, index_softmax_scale, init_blocks=0, local_blocks=1) -> None:
    """Validate and set the model constants of a serving wrapper ``w``."""
    w.num_heads = check_int("num_heads", num_heads)
    w.num_kv_heads = check_int("num_kv_heads", num_kv_heads)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    w.head_dim = check_int("head_dim", head_dim)
    w.index_head_dim = check_int("index_head_dim", index_head_dim)
    shapes = SUPPORTED["paged_decode"]
    for name, v, ok in (("head_dim", head_dim, shapes.head_dims),
                        ("index_head_dim", index_head_dim, shapes.index_head_dims)):
        if v not in ok:
            raise ValueError(f"{name} must be one of {', '.join(map(str, ok))}, got {v}")
    w.block_size = check_int("block_size", block_size)
    if block_size not in shapes.block_sizes:
        raise ValueError(f"block_size must be one of {', '.join(map(str, shapes.block_sizes))} "
                         f"(the page size), got {block_size}")
    w.topk = check_int("topk", topk)
    if topk > shapes.max_topk:
        raise ValueError(f"topk must be at most {shapes.max_topk}, got {topk}")
    w.init_blocks, w.local_blocks = V.check_forced_blocks(init_blocks, local_blocks, topk)
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
