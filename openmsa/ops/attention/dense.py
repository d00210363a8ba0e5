"""Dense causal attention over packed varlen sequences (docs/spec.md section 6, warmup: the Main
Branch over every visible token) through the sparse attention kernels, a chunk of key
blocks at a time.

The kernels take at most 64 blocks per query row, so a row's visible blocks are cut into
chunks of local block ids (``openmsa.ops.utils.schedule.dense_chunks``: ids c0 .. c0 + n - 1
up to the row's local block, -1 after). Then, as in split-KV decoding:

* forward: each chunk gives (out_m, lse_m) over its keys; the merge is
  lse = logaddexp_m lse_m and out = sum_m exp(lse_m - lse) out_m (a chunk with no visible
  key has lse_m = -inf and weight 0);
* backward: the sparse backward of each chunk, run with the *merged* out and lse, is the
  dense backward restricted to that chunk's keys (P = exp(s - lse) is the softmax over all
  visible keys; the correction rowsum(dO * O) uses the merged O). dk and dv of a key come
  from the one chunk that holds its block; dq is the float32 sum of the chunks' dq. (Each
  chunk's backward recomputes rowsum(dO * O), O(T * H * D): small next to its attention.)

Chunk indices are built on the device from the rows' causal positions and the number of
chunks is bounded on the host by total_k / B: no host synchronisation (the PyTorch
reference reads the lengths on the host). A pack
of many short sequences gets chunks that are empty for every row; their programs find no
work. Equal-length batches are better served by torch SDPA (``MSAttention`` uses it).
"""

from __future__ import annotations

import torch

from ..utils.partials import merge_partial
from ..utils.schedule import dense_chunks
from .launch import sparse_attention_backward, sparse_attention_forward


def dense_attention_forward(q, k, v, varlen, block_size, scale):
    """(out like q, lse float32 [total_q, Hq])."""
    acc_out = acc_lse = None
    for idx in dense_chunks(q, k, varlen, block_size):
        out, lse = sparse_attention_forward(q, k, v, idx, varlen, block_size, scale)
        if acc_out is None:
            acc_out, acc_lse = out.float(), lse
        else:
            acc_out, acc_lse = merge_partial(acc_out, acc_lse, out, lse)
    if acc_out is None:  # no keys at all
        return torch.zeros_like(q), torch.full(q.shape[:2], float("-inf"), device=q.device)
    return acc_out.to(q.dtype), acc_lse


def dense_attention_backward(do, q, k, v, out, lse, varlen, block_size, scale,
                             deterministic=False):
    """(dq, dk, dv) like q, k, v (``deterministic`` is passed on; the chunks' results are
    summed in chunk order)."""
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    for idx in dense_chunks(q, k, varlen, block_size):
        a, b, c = sparse_attention_backward(do, q, k, v, out, lse, idx, varlen, block_size,
                                            scale, deterministic)
        dq += a
        dk += b
        dv += c
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
