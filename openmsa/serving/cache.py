"""Paged KV + index-key cache for serving (docs/spec.md section 8), and its append op.

Layout (fixed; the serving kernels read exactly this):

- Page size = block size ``B`` (default 128): logical page ``p`` of a request holds its
  tokens ``[p*B, (p+1)*B)``, i.e. key block ``p`` of docs/spec.md section 3. ``topk_indices``
  therefore hold LOGICAL page ids, which are the non-paged block ids of the request.
- Pools, vLLM / FlashInfer "NHD" layout, one set per layer:
  ``k_cache, v_cache [num_pages, page_size, Hkv, D]`` and
  ``ki_cache [num_pages, page_size, Di]`` (one index key per token, shared by the
  Hkv groups; no head dim, unlike the non-paged ``ki [total_k, 1, Di]``).
  Any dtype the ops support (bfloat16, float16, float32; float64 for references).
  The ops take strides, so a pool may be a view (e.g. ``kv[:, 0]`` of a FlashInfer-style
  ``[num_pages, 2, page_size, Hkv, D]`` tensor) as long as each of its dims has one stride.
- ``page_table`` int32 ``[batch, max_pages]``: logical page ``p`` of request ``b`` is
  physical page ``page_table[b, p]``. Columns past the request's pages may hold
  anything (-1, 0, stale ids); they are never read.
- ``kv_lens`` int32 ``[batch]``: valid tokens of request ``b``; its token ``j`` is row
  ``j % B`` of physical page ``page_table[b, j // B]``. Rows past ``kv_lens`` in the last
  page are stale and never read.
- A flat *slot* is ``physical_page * page_size + row`` (int64), the index of a token row
  in the pools viewed as ``[num_pages * page_size, ...]``. A negative slot means "no
  token here" (padding) and is skipped by the append, as in vLLM.

Host synchronisation: ``append_paged_kv`` never reads device values on the host on its
Triton path (graph-capturable: no allocation, no sync). Value checks (slots in range, no
duplicates; page-table entries in ``slot_mapping``) run when the tensors are on the CPU,
on the reference backend, when ``check=True`` is passed, or when
``OPENMSA_CHECK_INPUTS=1`` is set (as for the other ops, see ``_validation``). Unchecked,
an invalid slot is skipped instead of written out of bounds.
"""

from __future__ import annotations

import numbers

import torch
import triton.language as tl  # names in the kernel source; importing decorates nothing

from .. import _validation as V
from .._backend import _load

__all__ = ["PagedMSACache", "slot_mapping", "append_paged_kv", "check_pools"]

# float64 is accepted (as in the ops) so that exact float64 references can use pools.
_POOL_DTYPES = V.FLOAT_DTYPES


# --------------------------------------------------------------------------- validation

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


# --------------------------------------------------------------------------- the cache

class PagedMSACache:
    """One layer's paged pools: ``k_cache``, ``v_cache [num_pages, page_size, Hkv, D]``
    and ``ki_cache [num_pages, page_size, Di]`` (see the module docstring).

    The pools are zero-initialised (allocation is a one-off; zeros keep never-written rows
    finite, although no op reads rows past ``kv_lens``). Page allocation (which request
    owns which physical page) is the scheduler's business: this class only owns memory.
    """

    def __init__(self, num_pages, page_size, num_kv_heads, head_dim, index_head_dim,
                 dtype=torch.bfloat16, device=None):
        self.num_pages = V.check_positive_int("num_pages", num_pages)
        self.page_size = V.check_positive_int("page_size", page_size)
        self.num_kv_heads = V.check_positive_int("num_kv_heads", num_kv_heads)
        self.head_dim = V.check_positive_int("head_dim", head_dim)
        self.index_head_dim = V.check_positive_int("index_head_dim", index_head_dim)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
        if dtype not in _POOL_DTYPES:
            raise TypeError(f"dtype must be bfloat16, float16 or float32 (float64 for "
                            f"references), got {dtype}")
        try:
            device = torch.device("cpu" if device is None else device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must name a torch device, got {device!r}") from exc
        self.dtype, self.device = dtype, device
        kv_shape = (self.num_pages, self.page_size, self.num_kv_heads, self.head_dim)
        self.k_cache = torch.zeros(kv_shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(kv_shape, dtype=dtype, device=device)
        self.ki_cache = torch.zeros((self.num_pages, self.page_size, self.index_head_dim),
                                    dtype=dtype, device=device)

    @property
    def block_size(self) -> int:
        """The MSA block size B is the page size."""
        return self.page_size

    @property
    def num_slots(self) -> int:
        return self.num_pages * self.page_size

    def slot_mapping(self, page_table, start_lens, cu_seqlens_new, *, num_new_tokens=None,
                     check=None) -> torch.Tensor:
        """:func:`slot_mapping` with this cache's page size and page count."""
        return slot_mapping(page_table, start_lens, cu_seqlens_new, page_size=self.page_size,
                            num_pages=self.num_pages, num_new_tokens=num_new_tokens, check=check)

    def append(self, k, v, ki, slots, *, backend="auto", check=None) -> None:
        """:func:`append_paged_kv` into this cache's pools."""
        append_paged_kv(k, v, ki, self.k_cache, self.v_cache, self.ki_cache, slots,
                        backend=backend, check=check)

    def __repr__(self) -> str:
        return (f"PagedMSACache(num_pages={self.num_pages}, page_size={self.page_size}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"index_head_dim={self.index_head_dim}, dtype={self.dtype}, device={self.device})")


# --------------------------------------------------------------------------- slot mapping

def _token_positions(start_lens, cu_seqlens_new, total: int):
    """(request, position) int64 [total] of each new token: request b's tokens
    cu[b] .. cu[b+1]-1 sit at positions start_lens[b] + 0, 1, ..."""
    dev = cu_seqlens_new.device
    cu = cu_seqlens_new.long()
    t = torch.arange(total, dtype=torch.int64, device=dev)
    batch = start_lens.shape[0]
    # searchsorted(cu[1:], t, right) counts requests ending at or before t: request of t
    # (empty requests end where they start, so they are skipped over).
    req = torch.searchsorted(cu[1:].contiguous(), t, right=True).clamp_(max=max(batch - 1, 0))
    if batch == 0:
        return req, torch.full_like(t, -1)
    pos = start_lens.long()[req] + (t - cu[req])
    return req, pos


def _slots_of_positions(page_table, req, pos, page_size: int):
    """Slot int64 of each (request, position); -1 where the position is negative, past the
    page table's width, or maps to a negative physical page. Also returns the logical
    page and physical page of each token (for error messages)."""
    width = page_table.shape[1]
    lp = torch.div(pos, page_size, rounding_mode="floor")
    in_table = (pos >= 0) & (lp < width)
    if width == 0 or page_table.shape[0] == 0:
        phys = torch.full_like(pos, -1)
    else:
        phys = page_table[req, lp.clamp(0, width - 1)].long()
    ok = in_table & (phys >= 0)
    slots = torch.where(ok, phys * page_size + (pos - lp * page_size), torch.full_like(pos, -1))
    return slots, lp, phys, in_table


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


def slot_mapping(page_table, start_lens, cu_seqlens_new, *, page_size=128, num_pages=None,
                 num_new_tokens=None, check=None) -> torch.Tensor:
    """Flat cache slots of the new tokens of a step, for :func:`append_paged_kv`.

    Args:
        page_table: int32 ``[batch, max_pages]`` logical -> physical page.
        start_lens: int32 ``[batch]``: tokens already cached per request (kv_lens before
            the append); request b's new tokens take positions ``start_lens[b]`` onwards.
        cu_seqlens_new: int32 ``[batch + 1]``: the new tokens, packed (usually the step's
            ``cu_seqlens_q``).
        page_size: tokens per page (= block size B). num_pages: pool size, only used to
            check page ids (optional).
        num_new_tokens: ``cu_seqlens_new[-1]`` if known on the host; otherwise it is read
            from the tensor (a device->host sync on CUDA: fine in ``plan()``, not in a graph).
        check: read the values and raise on a token whose logical page is past the table's
            width or maps to a negative (or >= num_pages) physical page, and on bad
            lengths. None (default): only for CPU tensors or with OPENMSA_CHECK_INPUTS=1.
            Unchecked, such tokens get slot -1 (the append skips them) instead of an error.
    Returns:
        int64 ``[total_new]`` slots ``physical_page * page_size + position % page_size``,
        on the device of the inputs.
    """
    page_size = V.check_positive_int("page_size", page_size)
    if num_pages is not None:
        num_pages = V.check_positive_int("num_pages", num_pages)
    batch = check_batch_meta(page_table, start_lens, "start_lens")
    _check_int_tensor("cu_seqlens_new", cu_seqlens_new, 1, "[batch + 1] int32")
    if cu_seqlens_new.shape[0] != batch + 1:
        raise ValueError(f"cu_seqlens_new must have batch + 1 = {batch + 1} entries (page_table "
                         f"has batch = {batch} rows), got {cu_seqlens_new.shape[0]}")
    _check_device("cu_seqlens_new", cu_seqlens_new, page_table.device, "page_table")
    dev = page_table.device
    do_check = _want_check(check, dev)
    if num_new_tokens is None:
        total = int(cu_seqlens_new[-1])  # host read; documented (sync on CUDA)
    else:
        if isinstance(num_new_tokens, bool) or not isinstance(num_new_tokens, numbers.Integral) \
                or num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be a non-negative int, got {num_new_tokens!r}")
        total = int(num_new_tokens)
    if total < 0:
        raise ValueError(f"cu_seqlens_new[-1] must be >= 0, got {total}")
    if do_check:
        cu = tuple(cu_seqlens_new.tolist())
        V._check_cu_values("cu_seqlens_new", cu, total,
                           "num_new_tokens" if num_new_tokens is not None else "its last entry")
        starts = start_lens.tolist()
        for b, s in enumerate(starts):
            if s < 0:
                raise ValueError(f"start_lens must be >= 0, got start_lens[{b}] = {s}")
    req, pos = _token_positions(start_lens, cu_seqlens_new, total)
    slots, lp, phys, in_table = _slots_of_positions(page_table, req, pos, page_size)
    if do_check and total > 0:
        _check_page_values(page_table, req, pos, lp, phys, in_table, num_pages, "new")
    elif num_pages is not None:
        slots = torch.where(phys < num_pages, slots, torch.full_like(slots, -1))
    return slots


# --------------------------------------------------------------------------- append

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


def append_paged_kv(k, v, ki, k_cache, v_cache, ki_cache, slot_mapping, *, backend="auto",
                    check=None) -> None:
    """Write the new tokens of a step into the paged pools, in place.

    Args:
        k, v: ``[total_new, Hkv, D]``; ki: ``[total_new, 1, Di]`` or ``[total_new, Di]``
            (or None together with ki_cache=None for a layer without index keys).
        k_cache, v_cache: ``[num_pages, page_size, Hkv, D]``; ki_cache:
            ``[num_pages, page_size, Di]``; same dtype as the tokens (no cast).
        slot_mapping: int64 (or int32) ``[total_new]``: flat slot of each token (see
            :func:`slot_mapping`); a negative slot skips the token. Slots must be distinct.
        backend: "auto" (Triton on CUDA, reference on CPU), "triton" (on CPU tensors: under
            Triton's interpreter) or "reference".
        check: validate slot values (< num_pages * page_size, no duplicates) on the host.
            None: for CPU tensors, the reference backend or OPENMSA_CHECK_INPUTS=1. Unchecked,
            the kernel skips out-of-range slots (never writes out of bounds); duplicated
            slots then leave one of the writes, unspecified which.
    The Triton path allocates nothing and never syncs: it is CUDA-graph capturable.
    """
    backend = V.check_backend(backend)
    num_pages, page_size = _check_append(k, v, ki, k_cache, v_cache, ki_cache, slot_mapping)
    # Not _backend.resolve: "auto" there picks Triton only for ops registered in its table.
    impl = backend if backend != "auto" else (
        "triton" if k_cache.device.type == "cuda" else "reference")
    num_slots = num_pages * page_size
    # The reference syncs anyway (boolean indexing), so it always checks unless told not to.
    if (impl == "reference" and check is None) or _want_check(check, k_cache.device):
        _check_slot_values(slot_mapping, num_slots)
    if k.shape[0] == 0:
        return
    if impl == "reference":
        _append_reference(k, v, ki, k_cache, v_cache, ki_cache, slot_mapping, page_size, num_slots)
    else:
        _load("openmsa.serving.cache:_append_triton", k_cache.device)(
            k, v, ki, k_cache, v_cache, ki_cache, slot_mapping, page_size, num_slots)


def _append_reference(k, v, ki, k_cache, v_cache, ki_cache, slots, page_size, num_slots):
    """Plain indexed copy (index_put_): the same skip rule as the kernel."""
    s = slots.long()
    keep = (s >= 0) & (s < num_slots)
    s = s[keep]
    page = torch.div(s, page_size, rounding_mode="floor")
    row = s - page * page_size
    with torch.no_grad():
        k_cache[page, row] = k[keep]
        v_cache[page, row] = v[keep]
        if ki is not None:
            ki_cache[page, row] = ki.reshape(ki.shape[0], ki.shape[-1])[keep]


# --------------------------------------------------------------------------- Triton kernel
# The kernel is written as a plain function and handed to triton.jit on first use (via
# ``_backend._load``): Triton decides at decoration time whether a kernel is compiled or
# interpreted, so decorating at import would freeze that choice before the backend has
# set TRITON_INTERPRET for CPU tensors.

def _append_kernel_src(
    K, V, KI, K_CACHE, V_CACHE, KI_CACHE, SLOTS,
    num_tokens, num_slots, page_size, num_heads, head_dim, index_head_dim,
    stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd, stride_it, stride_id,
    stride_kcp, stride_kcr, stride_kch, stride_kcd,
    stride_vcp, stride_vcr, stride_vch, stride_vcd,
    stride_icp, stride_icr, stride_icd,
    HAS_KI: tl.constexpr, TOKENS: tl.constexpr, BLOCK_HD: tl.constexpr, BLOCK_DI: tl.constexpr,
):
    """One program per (TOKENS tokens, BLOCK_HD of the flattened (head, dim) row). The
    index key (one Di vector per token) is copied by the programs of column 0. All
    address arithmetic is int64: num_pages * page_size * Hkv * D may exceed 2**31."""
    t = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)
    col = tl.program_id(1)
    t_ok = t < num_tokens
    slot = tl.load(SLOTS + t, mask=t_ok, other=-1).to(tl.int64)
    # negative: padding token; >= num_slots: invalid and unchecked, never written
    ok = t_ok & (slot >= 0) & (slot < num_slots)
    slot = tl.where(ok, slot, 0)
    page = slot // page_size
    row = slot - page * page_size
    t64 = t.to(tl.int64)

    hd = col * BLOCK_HD + tl.arange(0, BLOCK_HD)
    h = (hd // head_dim).to(tl.int64)
    d = (hd % head_dim).to(tl.int64)
    m = ok[:, None] & (hd < num_heads * head_dim)[None, :]
    k = tl.load(K + t64[:, None] * stride_kt + (h * stride_kh + d * stride_kd)[None, :], mask=m)
    v = tl.load(V + t64[:, None] * stride_vt + (h * stride_vh + d * stride_vd)[None, :], mask=m)
    tl.store(K_CACHE + (page * stride_kcp + row * stride_kcr)[:, None]
             + (h * stride_kch + d * stride_kcd)[None, :], k, mask=m)
    tl.store(V_CACHE + (page * stride_vcp + row * stride_vcr)[:, None]
             + (h * stride_vch + d * stride_vcd)[None, :], v, mask=m)

    if HAS_KI:
        ki_ok = ok & (col == 0)
        for i0 in range(0, index_head_dim, BLOCK_DI):
            di = i0 + tl.arange(0, BLOCK_DI)
            mi = ki_ok[:, None] & (di < index_head_dim)[None, :]
            di64 = di.to(tl.int64)
            x = tl.load(KI + t64[:, None] * stride_it + (di64 * stride_id)[None, :], mask=mi)
            tl.store(KI_CACHE + (page * stride_icp + row * stride_icr)[:, None]
                     + (di64 * stride_icd)[None, :], x, mask=mi)


_append_kernel = None


def _append_triton(k, v, ki, k_cache, v_cache, ki_cache, slots, page_size, num_slots):
    """Launcher (reached through ``_backend._load``). No allocation, no host read."""
    global _append_kernel
    import triton

    if _append_kernel is None:
        _append_kernel = triton.jit(_append_kernel_src)
    n, hkv, d = k.shape
    hd = hkv * d
    block_hd = min(triton.next_power_of_2(hd), 1024)
    tokens = max(1, min(64, 4096 // block_hd))  # ~4K elements per tile and tensor
    if ki is not None:
        di = ki.shape[-1]
        ki_args = (ki, ki_cache, ki.stride(0), ki.stride(-1), *ki_cache.stride())
        block_di = min(triton.next_power_of_2(di), 256)
    else:  # dummy pointers; HAS_KI=False removes every use
        di, block_di = 1, 1
        ki_args = (k, k_cache, 0, 0, 0, 0, 0)
    ki_t, ki_c, s_it, s_id, s_icp, s_icr, s_icd = ki_args
    grid = (triton.cdiv(n, tokens), triton.cdiv(hd, block_hd))
    _append_kernel[grid](
        k, v, ki_t, k_cache, v_cache, ki_c, slots,
        n, num_slots, page_size, hkv, d, di,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), s_it, s_id,
        *k_cache.stride(), *v_cache.stride(), s_icp, s_icr, s_icd,
        HAS_KI=ki is not None, TOKENS=tokens, BLOCK_HD=block_hd, BLOCK_DI=block_di, num_warps=4)
