"""Shared pieces of the PyTorch reference implementations.

The references are exact (float32 math for half inputs, float64 for float64 inputs)
and memory-bounded: work is split into chunks of query rows sized by
``chunk_rows``, so that a long sequence never materialises O(total_q x total_k)
state. They are vectorised over the rows of a chunk; the only Python loops are over
chunks (and, where keys must be shared, over sequences).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# Bytes of temporaries a reference chunk may allocate. 256 MiB keeps a 32K-token,
# default-configuration layer well inside a 24 GB CPU machine.
_DEFAULT_CHUNK_BYTES = 256 << 20


def chunk_bytes() -> int:
    return int(os.environ.get("OPENMSA_REF_CHUNK_BYTES", _DEFAULT_CHUNK_BYTES))


def chunk_rows(bytes_per_row: int) -> int:
    return max(1, chunk_bytes() // max(1, bytes_per_row))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (for gradcheck); everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class RowMeta:
    """Per query row (packed index t): where its sequence's keys start, how many keys
    the sequence has (Lk) and the row's causal position p = Lk - Lq + i."""

    k_start: torch.Tensor  # int64 [total_q]
    seq_len_k: torch.Tensor  # int64 [total_q]
    pos: torch.Tensor  # int64 [total_q]


def row_meta(cu_q: tuple, cu_k: tuple, device) -> RowMeta:
    cu_q_t = torch.tensor(cu_q, dtype=torch.int64)
    cu_k_t = torch.tensor(cu_k, dtype=torch.int64)
    lq = cu_q_t[1:] - cu_q_t[:-1]
    lk = cu_k_t[1:] - cu_k_t[:-1]
    k_start = torch.repeat_interleave(cu_k_t[:-1], lq)
    seq_len_k = torch.repeat_interleave(lk, lq)
    q_start = torch.repeat_interleave(cu_q_t[:-1], lq)
    t = torch.arange(int(cu_q_t[-1]), dtype=torch.int64)
    pos = (seq_len_k - torch.repeat_interleave(lq, lq)) + (t - q_start)
    return RowMeta(k_start.to(device), seq_len_k.to(device), pos.to(device))


def sequences(cu_q: tuple, cu_k: tuple):
    """Yield (q_start, Lq, k_start, Lk) for every sequence with at least one query."""
    for b in range(len(cu_q) - 1):
        lq = cu_q[b + 1] - cu_q[b]
        if lq > 0:
            yield cu_q[b], lq, cu_k[b], cu_k[b + 1] - cu_k[b]


def selected_key_tokens(topk_rows: torch.Tensor, meta: RowMeta, rows: slice, block_size: int):
    """Key tokens of the selected blocks, spec section 5.

    topk_rows: int32 [Hkv, R, K] block ids of the rows ``rows``.
    Returns (key_idx, valid), both [Hkv, R, K * block_size]: global key token ids
    (0 where invalid, so that gathers stay in bounds) and whether the token belongs
    to T(t, g): its block id is in range, not a duplicate of an earlier slot, and the
    token is causally visible (j <= p).
    """
    ids = topk_rows.long()
    hkv, r, k = ids.shape
    pos = meta.pos[rows]
    num_blocks = (meta.seq_len_k[rows] + block_size - 1) // block_size
    ok = (ids >= 0) & (ids < num_blocks[None, :, None])
    # Duplicated ids count once: drop a slot whose id already appeared in an earlier slot.
    same = ids[..., :, None] == ids[..., None, :]
    earlier = torch.ones(k, k, dtype=torch.bool, device=ids.device).tril(-1)
    ok &= ~(same & earlier).any(-1)
    local_j = ids[..., None] * block_size + torch.arange(block_size, device=ids.device)
    valid = ok[..., None] & (local_j <= pos[None, :, None, None])
    key_idx = torch.where(valid, local_j + meta.k_start[rows][None, :, None, None], 0)
    return key_idx.view(hkv, r, k * block_size), valid.view(hkv, r, k * block_size)


def gather_keys(x: torch.Tensor, key_idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [total_k, H, D] with H = Hkv or 1 (shared index key); key_idx [Hkv, R, N].
    Returns [Hkv, R, N, D] in ``dtype``: x[key_idx[g, r, n], g]."""
    hkv = key_idx.shape[0]
    if x.shape[1] == 1:
        return x[:, 0][key_idx].to(dtype)
    heads = torch.arange(hkv, device=key_idx.device).view(hkv, 1, 1)
    return x[key_idx, heads].to(dtype)


def scatter_add_keys(dx: torch.Tensor, key_idx: torch.Tensor, contrib: torch.Tensor) -> None:
    """Inverse of gather_keys: dx[key_idx[g, r, n], g] += contrib[g, r, n] (in place).
    dx [total_k, H, D] with H = Hkv or 1; contributions of invalid slots are zero."""
    hkv, r, n, d = contrib.shape
    if dx.shape[1] == 1:
        dx[:, 0].index_add_(0, key_idx.reshape(-1), contrib.reshape(-1, d).to(dx.dtype))
        return
    heads = torch.arange(hkv, device=key_idx.device).view(hkv, 1, 1).expand_as(key_idx)
    dx.index_put_((key_idx.reshape(-1), heads.reshape(-1)), contrib.reshape(-1, d).to(dx.dtype),
                  accumulate=True)


def matmul_keys(a: torch.Tensor, keys: torch.Tensor, transpose_keys: bool) -> torch.Tensor:
    """Batched product against per-row keys [Hkv, R, N, D] or keys shared by all rows
    [Hkv, N, D] (dense path), avoiding a broadcast copy of shared keys.

    a: [Hkv, R, G, X]. Computes a @ keys^T ([.., G, N]) if transpose_keys, else
    a @ keys ([.., G, D]).
    """
    kt = keys.transpose(-1, -2) if transpose_keys else keys
    if keys.dim() == 4:
        return torch.matmul(a, kt)
    hkv, r, g, x = a.shape
    return torch.matmul(a.reshape(hkv, r * g, x), kt).view(hkv, r, g, -1)


def masked_softmax_stats(s: torch.Tensor):
    """Row max (with -inf rows mapped to 0 so that exp never sees -inf - -inf),
    probabilities and their sum, for scores whose masked entries are -inf."""
    m = s.amax(-1, keepdim=True)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    return m, p, p.sum(-1, keepdim=True)


def safe_lse(lse: torch.Tensor) -> torch.Tensor:
    """An empty key set has lse = -inf; exp(s - lse) must then be 0, not NaN."""
    return torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)
