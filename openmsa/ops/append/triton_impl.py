"""Launcher of the paged-cache append kernel (reached through the op
openmsa::append_paged_kv, ``openmsa.library``; imported on first use, as every kernel module)."""

import triton

from .kernels import append_kernel


def append_triton(k, v, ki, k_cache, v_cache, ki_cache, slots, page_size, num_slots):
    """Launcher (of the op openmsa::append_paged_kv). No allocation, no host read."""
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
    append_kernel[grid](
        k, v, ki_t, k_cache, v_cache, ki_c, slots,
        n, num_slots, page_size, hkv, d, di,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), s_it, s_id,
        *k_cache.stride(), *v_cache.stride(), s_icp, s_icr, s_icd,
        HAS_KI=ki is not None, TOKENS=tokens, BLOCK_HD=block_hd, BLOCK_DI=block_di, num_warps=4)
