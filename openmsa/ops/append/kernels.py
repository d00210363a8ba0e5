"""Triton kernel of the paged-cache append: each new token's K, V (and index key) rows copied
to its slot of the pools (layout: ``openmsa.serving.cache``)."""

import triton
import triton.language as tl


@triton.jit
def append_kernel(
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
