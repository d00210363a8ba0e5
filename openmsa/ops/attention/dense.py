"""Dense causal attention over packed varlen sequences (docs/spec.md section 6, warmup: the Main
Branch over every visible token) through the sparse attention kernels, a chunk of key
blocks at a time.

The kernels take at most 64 blocks per query row, so a row's visible blocks are cut into
chunks of ``DENSE_CHUNK_BLOCKS`` local block ids (``dense_chunk_indices``: ids c0 ..
c0 + n - 1 up to the row's local block, -1 after). Then, as in split-KV decoding:

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
reference, the only varlen dense attention before, reads the lengths on the host). A pack
of many short sequences gets chunks that are empty for every row; their programs find no
work. Equal-length batches are better served by torch SDPA (``MSAttention`` uses it).
"""

from __future__ import annotations

import torch

from .schedule import row_info

# Local block ids per chunk (the kernels' K limit); tests lower it to run several chunks
# at small shapes. The dense KL (``openmsa.ops.kl.dense``) uses the same chunks.
DENSE_CHUNK_BLOCKS = 64


def dense_chunk_indices(pos: torch.Tensor, hkv: int, block_size: int, first_block: int,
                        num_blocks: int) -> torch.Tensor:
    """int32 [Hkv, total_q, num_blocks]: the local block ids first_block ..
    first_block + num_blocks - 1 that row t sees (id <= pos[t] // B), -1 for the others
    (the valid ids form a prefix)."""
    ids = torch.arange(first_block, first_block + num_blocks, dtype=torch.int32, device=pos.device)
    local = (pos // block_size).to(torch.int32)
    idx = torch.where(ids[None, :] <= local[:, None], ids[None, :], -1)
    return idx[None].expand(hkv, -1, -1).contiguous()


def dense_chunks(q, k, varlen, block_size):
    """Yields the chunks' index tensors, one at a time (all at once would be
    Hkv x total_q x blocks int32: 2 GB at 128K tokens with Hkv = 4, B = 128)."""
    info = row_info(varlen.cu_seqlens_q, varlen.cu_seqlens_k, q.shape[0], k.shape[0], block_size)
    nblocks = -(-k.shape[0] // block_size)  # >= the block count of every sequence
    for c0 in range(0, nblocks, DENSE_CHUNK_BLOCKS):
        yield dense_chunk_indices(info.pos, k.shape[1], block_size, c0,
                                  min(DENSE_CHUNK_BLOCKS, nblocks - c0))


def _merge(acc_out, acc_lse, out, lse):
    """Merge two partial softmax results (float32 out [T, H, D], lse [T, H]); a NaN lse
    (a NaN row of either side) keeps the row NaN."""
    new = torch.logaddexp(acc_lse, lse)
    empty = new == float("-inf")  # -inf on both sides: nothing visible yet
    w_acc = torch.where(empty, 0.0, torch.exp(acc_lse - new))
    w_new = torch.where(empty, 0.0, torch.exp(lse - new))
    return acc_out * w_acc[..., None] + out.float() * w_new[..., None], new


def dense_attention_forward(q, k, v, varlen, block_size, scale, sparse_forward):
    """(out like q, lse float32 [total_q, Hq]); ``sparse_forward`` is
    ``triton_impl.sparse_attention_forward`` (passed in: no import cycle)."""
    acc_out = acc_lse = None
    for idx in dense_chunks(q, k, varlen, block_size):
        out, lse = sparse_forward(q, k, v, idx, varlen, block_size, scale)
        if acc_out is None:
            acc_out, acc_lse = out.float(), lse
        else:
            acc_out, acc_lse = _merge(acc_out, acc_lse, out, lse)
    if acc_out is None:  # no keys at all
        return torch.zeros_like(q), torch.full(q.shape[:2], float("-inf"), device=q.device)
    return acc_out.to(q.dtype), acc_lse


def dense_attention_backward(do, q, k, v, out, lse, varlen, block_size, scale, sparse_backward,
                             deterministic=False):
    """(dq, dk, dv) like q, k, v; ``sparse_backward`` is ``triton_impl.sparse_attention_backward``
    (``deterministic`` is passed on; the chunks' results are summed in chunk order)."""
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    for idx in dense_chunks(q, k, varlen, block_size):
        a, b, c = sparse_backward(do, q, k, v, out, lse, idx, varlen, block_size, scale,
                                  deterministic)
        dq += a
        dk += b
        dv += c
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
