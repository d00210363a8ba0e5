"""PyTorch reference of the paged-cache append (layout: ``openmsa.serving.cache``)."""

from __future__ import annotations

import torch


def append_reference(k, v, ki, k_cache, v_cache, ki_cache, slots, page_size, num_slots):
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
