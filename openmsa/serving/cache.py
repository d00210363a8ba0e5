"""Paged KV + index-key cache for serving (docs/spec.md section 8): the layout, and the names
that work on it.

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

Where the code lives: ``pool.py`` (``PagedMSACache``, the pools of one layer), ``slots.py``
(``slot_mapping``), ``append.py`` (``append_paged_kv``: reference and Triton kernel),
``checks.py`` (``check_pools`` and the other argument checks). This module re-exports their
public names.
"""

from .append import append_paged_kv
from .checks import check_pools
from .pool import PagedMSACache
from .slots import slot_mapping

__all__ = ["PagedMSACache", "slot_mapping", "append_paged_kv", "check_pools"]
