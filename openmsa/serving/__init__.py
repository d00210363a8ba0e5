"""Serving building blocks (docs/spec.md section 8): the paged KV + index-key cache, the append
op that writes a step's new tokens into it, and exact paged references.

Layout (see ``cache.py``): page size = block size B; ``k_cache, v_cache
[num_pages, page_size, Hkv, D]`` and ``ki_cache [num_pages, page_size, Di]``;
``page_table`` int32 ``[batch, max_pages]`` maps a request's logical pages (= its block
ids, which ``topk_indices`` hold) to physical pages; ``kv_lens`` int32 ``[batch]``.
A step's queries are the last Lq cached positions of their request.

Wrappers (FlashInfer-style plan/run; see their modules): ``MSADecodeWrapper`` (1 to 16
query tokens per request: split index scan + exact Top-k merge, split sparse attention)
and ``MSAPrefillWrapper`` (chunked prefill through the training kernels with paged
addressing).

Not imported by ``openmsa/__init__.py``: import ``openmsa.serving`` explicitly.
"""

from .append import append_paged_kv
from .checks import check_pools
from .decode import MSADecodeWrapper
from .fp8 import append_index_scales, quantize_fp8_per_token
from .pool import PagedMSACache
from .prefill import MSAPrefillWrapper
from .reference import (
    gather_paged, paged_indexer_topk_reference, paged_msa_reference,
    paged_sparse_attention_reference,
)
from .slots import slot_mapping

__all__ = [
    "MSADecodeWrapper", "MSAPrefillWrapper", "PagedMSACache", "quantize_fp8_per_token",
    "append_index_scales", "slot_mapping", "append_paged_kv", "check_pools", "gather_paged",
    "paged_indexer_topk_reference", "paged_sparse_attention_reference", "paged_msa_reference",
]
