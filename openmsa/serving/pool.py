"""The paged pools of one layer (``PagedMSACache``; layout: ``cache.py``)."""

from __future__ import annotations

import torch

from .. import _validation as V
from .append import append_paged_kv
from .slots import slot_mapping

__all__ = ["PagedMSACache"]

# float64 is accepted (as in the ops) so that exact float64 references can use pools.
_POOL_DTYPES = V.FLOAT_DTYPES


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
