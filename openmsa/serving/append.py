"""The append op: write a step's new tokens into the paged pools (layout: ``cache.py``); its
reference and Triton kernel are ``openmsa.ops.append`` (the kernel's launcher allocates nothing
and never syncs: CUDA-graph capturable)."""

from __future__ import annotations

import torch

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
