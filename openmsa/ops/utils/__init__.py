"""Machinery every op uses; the ops (attention, indexer, kl) and the serving kernels import
from here and never from each other's private names.

* ``schedule``: the KV-outer CSR schedule (per group and key block, the query rows that
  selected it), its chunks, and the dense-warmup chunks.
* ``tiles``: Triton helpers of a KV-outer program (segment, key block, entry rows, the
  precision-aware MMA, log2 constants).
* ``partials``: per-entry partials and their deterministic reductions; the scratch budget.
* ``topk``: the streaming Top-k of key blocks (sort keys, NaN-propagating block max).
* ``configs``: launch settings per kernel family and GPU architecture.
* ``reference``: pieces of the PyTorch references (chunking, block layout, masks).
"""
