"""The append op: write a step's new tokens into the paged pools (layout: ``cache.py``), with
a plain PyTorch reference and a Triton kernel (its launcher allocates nothing and never syncs:
CUDA-graph capturable)."""

from __future__ import annotations

import torch
import triton.language as tl  # names in the kernel source; importing decorates nothing

from .. import _validation as V
from ..library import resolve
from .checks import _check_append, _check_slot_values, _want_check

__all__ = ["append_paged_kv"]


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
    impl = resolve("append_paged_kv", backend, k_cache.device)
    num_slots = num_pages * page_size
    # The reference syncs anyway (boolean indexing), so it always checks unless told not to.
    if (impl == "reference" and check is None) or _want_check(check, k_cache.device):
        _check_slot_values(slot_mapping, num_slots)
    torch.ops.openmsa.append_paged_kv(k, v, ki, k_cache, v_cache, ki_cache, slot_mapping, impl)


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
# The kernel is written as a plain function and handed to triton.jit on first use (the op
# openmsa::append_paged_kv loads this launcher through ``_backend._load``): Triton decides
# at decoration time whether a kernel is compiled or interpreted, so decorating at import
# would freeze that choice before the backend has set TRITON_INTERPRET for CPU tensors.

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
    """Launcher (of the op openmsa::append_paged_kv). No allocation, no host read."""
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
