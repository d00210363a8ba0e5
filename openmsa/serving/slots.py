"""Slot mapping: the flat cache slot (``physical_page * page_size + row``) of each new token
of a step, from the page table (layout: ``cache.py``)."""

from __future__ import annotations

import numbers

import torch

from .. import _validation as V
from .checks import _check_device, _check_int_tensor, _check_page_values, _want_check, check_batch_meta

__all__ = ["slot_mapping"]


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
