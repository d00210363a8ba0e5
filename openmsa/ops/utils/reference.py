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

# Bytes of temporaries a reference chunk may allocate. 128 MiB keeps a 32K-token,
# default-configuration layer well inside a 24 GB CPU machine.
_DEFAULT_CHUNK_BYTES = 128 << 20


def chunk_bytes() -> int:
    return int(os.environ.get("OPENMSA_REF_CHUNK_BYTES", _DEFAULT_CHUNK_BYTES))


def chunk_rows(bytes_per_row: int) -> int:
    return max(1, chunk_bytes() // max(1, bytes_per_row))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (for gradcheck); everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def key_ranges(cu_k: tuple | None, kv_ranges: tuple | None = None) -> tuple:
    """(starts, lens): the key range of every query sequence as host tuples, from the
    fragment form's ``kv_ranges`` (docs/spec.md section 3) or else from cu_k."""
    if kv_ranges is not None:
        return tuple(kv_ranges[0]), tuple(kv_ranges[1])
    return tuple(cu_k[:-1]), tuple(b - a for a, b in zip(cu_k[:-1], cu_k[1:]))


@dataclass(frozen=True)
class RowMeta:
    """Per query row (packed index t): where its sequence's keys start, how many keys
    the sequence has (Lk) and the row's causal position p = Lk - Lq + i."""

    k_start: torch.Tensor  # int64 [total_q]
    seq_len_k: torch.Tensor  # int64 [total_q]
    pos: torch.Tensor  # int64 [total_q]


def row_meta(cu_q: tuple, ranges: tuple, device) -> RowMeta:
    """``ranges``: the (starts, lens) of ``key_ranges``."""
    cu_q_t = torch.tensor(cu_q, dtype=torch.int64)
    lq = cu_q_t[1:] - cu_q_t[:-1]
    k_start = torch.repeat_interleave(torch.tensor(ranges[0], dtype=torch.int64), lq)
    seq_len_k = torch.repeat_interleave(torch.tensor(ranges[1], dtype=torch.int64), lq)
    q_start = torch.repeat_interleave(cu_q_t[:-1], lq)
    t = torch.arange(int(cu_q_t[-1]), dtype=torch.int64)
    pos = (seq_len_k - torch.repeat_interleave(lq, lq)) + (t - q_start)
    return RowMeta(k_start.to(device), seq_len_k.to(device), pos.to(device))


def sequences(cu_q: tuple, ranges: tuple):
    """Yield (q_start, Lq, k_start, Lk) for every sequence with at least one query."""
    for b in range(len(cu_q) - 1):
        lq = cu_q[b + 1] - cu_q[b]
        if lq > 0:
            yield cu_q[b], lq, ranges[0][b], ranges[1][b]


@dataclass(frozen=True)
class BlockLayout:
    """Keys re-laid as blocks of B tokens, so that a selected block is one contiguous
    [B, D] slice per head: gathers and scatter-adds then move whole blocks instead of
    single tokens. Global block ``row_block_base[t] + c`` is block c of row t's
    sequence; block ``num_blocks`` is an all-zero dummy that invalid slots point to.

    Blocks belong to key ranges, not to query sequences: query sequences whose key ranges
    start at the same row (fragments of one sequence, docs/spec.md section 3) share the
    blocks of the longest such range, so the gradients of their keys meet in one place."""

    block_size: int
    num_blocks: int
    total_k: int
    token_slot: torch.Tensor  # int64 [n]: position in the blocked order of key row token_rows[i]
    token_rows: torch.Tensor  # int64 [n]: the key rows that lie in some range
    row_block_base: torch.Tensor  # int64 [total_q]


def block_layout(cu_q: tuple, ranges: tuple, total_k: int, block_size: int, device) -> BlockLayout:
    starts, lens = ranges
    longest = {}  # range start -> the longest length starting there
    for s, n in zip(starts, lens):
        if n > 0:
            longest[s] = max(longest.get(s, 0), n)
    base, rows, slots, nblk = {}, [], [], 0
    for s in sorted(longest):
        n = longest[s]
        base[s] = nblk
        rows.append(torch.arange(s, s + n, dtype=torch.int64))
        slots.append(torch.arange(nblk * block_size, nblk * block_size + n, dtype=torch.int64))
        nblk += (n + block_size - 1) // block_size
    empty = torch.empty(0, dtype=torch.int64)
    token_rows = torch.cat(rows) if rows else empty
    token_slot = torch.cat(slots) if slots else empty
    lq = torch.tensor([b - a for a, b in zip(cu_q[:-1], cu_q[1:])], dtype=torch.int64)
    seq_base = torch.tensor([base.get(s, 0) for s in starts], dtype=torch.int64)
    row_base = torch.repeat_interleave(seq_base, lq)
    return BlockLayout(block_size, nblk, total_k, token_slot.to(device), token_rows.to(device),
                       row_base.to(device))


def to_blocks(x: torch.Tensor, layout: BlockLayout, dtype) -> torch.Tensor:
    """[total_k, H, D] -> [num_blocks + 1, H, B, D] in ``dtype``, zero padded."""
    _, h, d = x.shape
    b = layout.block_size
    xb = torch.zeros((layout.num_blocks + 1) * b, h, d, dtype=dtype, device=x.device)
    xb[layout.token_slot] = x[layout.token_rows].to(dtype)
    return xb.view(layout.num_blocks + 1, b, h, d).transpose(1, 2).contiguous()


def from_blocks(xb: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Inverse of to_blocks: [num_blocks + 1, H, B, D] -> [total_k, H, D] (0 for key rows
    that lie in no range)."""
    nb, h, b, d = xb.shape
    out = torch.zeros((layout.total_k, h, d), dtype=xb.dtype, device=xb.device)
    out[layout.token_rows] = xb.transpose(1, 2).reshape(nb * b, h, d)[layout.token_slot]
    return out


def selected_blocks(topk_rows: torch.Tensor, meta: RowMeta, layout: BlockLayout, rows: slice):
    """Global block ids and token mask of the selected blocks, docs/spec.md section 5.

    topk_rows: int32 [Hkv, R, K] block ids of the rows ``rows``.
    Returns (gid [Hkv, R, K] into the blocked layout, the dummy block where a slot is
    invalid) and valid [Hkv, R, K * B]: the token belongs to T(t, g), i.e. its block id
    is in range, not a duplicate of an earlier slot, and the token is visible (j <= p).
    """
    bsz = layout.block_size
    ids = topk_rows.long()
    hkv, r, k = ids.shape
    pos = meta.pos[rows]
    num_blocks = (meta.seq_len_k[rows] + bsz - 1) // bsz
    ok = (ids >= 0) & (ids < num_blocks[None, :, None])
    # Duplicated ids count once: drop a slot whose id already appeared in an earlier slot.
    same = ids[..., :, None] == ids[..., None, :]
    earlier = torch.ones(k, k, dtype=torch.bool, device=ids.device).tril(-1)
    ok &= ~(same & earlier).any(-1)
    local_j = ids[..., None] * bsz + torch.arange(bsz, device=ids.device)
    valid = ok[..., None] & (local_j <= pos[None, :, None, None])
    gid = torch.where(ok, ids + layout.row_block_base[rows][None, :, None], layout.num_blocks)
    return gid, valid.view(hkv, r, k * bsz)


def _heads(xb: torch.Tensor, gid: torch.Tensor) -> torch.Tensor:
    """Head index per gid entry: group g for per-group keys, 0 for the shared index key."""
    if xb.shape[1] == 1:
        return torch.zeros((), dtype=torch.long, device=gid.device)
    return torch.arange(gid.shape[0], device=gid.device).view(-1, 1, 1)


def gather_blocks(xb: torch.Tensor, gid: torch.Tensor) -> torch.Tensor:
    """xb [num_blocks + 1, H, B, D] (H = Hkv, or 1 for the shared index key);
    gid [Hkv, R, K]. Returns [Hkv, R, K * B, D]: the selected blocks of group g."""
    hkv, r, k = gid.shape
    return xb[gid, _heads(xb, gid)].view(hkv, r, k * xb.shape[2], xb.shape[3])


def scatter_add_blocks(dxb: torch.Tensor, gid: torch.Tensor, contrib: torch.Tensor) -> None:
    """Inverse of gather_blocks: dxb[gid[g, r, s], head] += the slot's [B, D] slice."""
    nb, h, b, d = dxb.shape
    flat = (gid * h + _heads(dxb, gid)).reshape(-1)
    dxb.view(nb * h, b, d).index_add_(0, flat, contrib.reshape(-1, b, d).to(dxb.dtype))


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


def key_chunks(meta: RowMeta, cu_q: tuple, ranges: tuple, topk_indices, layout, bytes_per_key: int):
    """Yield (rows, sel, valid) chunks covering every query row once; ``bytes_per_key``
    is what one (row, key slot) pair costs in temporaries, all heads included.

    Sparse (topk_indices given): rows of all sequences together; ``sel`` is the
    [Hkv, R, K] global block ids of the blocked layout and valid the [Hkv, R, K*B]
    token mask. Dense (None): per sequence; ``sel`` is the sequence's key ids [1, Lk]
    shared by all rows and valid the causal mask [1, R, Lk].
    """
    if topk_indices is not None:
        _, total_q, k = topk_indices.shape
        rows_per_chunk = chunk_rows(k * layout.block_size * bytes_per_key)
        for r0 in range(0, total_q, rows_per_chunk):
            rows = slice(r0, min(total_q, r0 + rows_per_chunk))
            gid, valid = selected_blocks(topk_indices[:, rows], meta, layout, rows)
            yield rows, gid, valid
        return
    for q0, lq, k0, lk in sequences(cu_q, ranges):
        keys = torch.arange(lk, device=meta.pos.device)
        rows_per_chunk = chunk_rows(lk * bytes_per_key)
        for r0 in range(q0, q0 + lq, rows_per_chunk):
            rows = slice(r0, min(q0 + lq, r0 + rows_per_chunk))
            valid = keys[None, :] <= meta.pos[rows][:, None]
            yield rows, (keys + k0)[None], valid[None]


class Keys:
    """A key-side tensor x [total_k, H, D] (H = Hkv, or 1 for the shared index key)
    prepared for the chunks: blocked (sparse) or used in place (dense, layout None)."""

    def __init__(self, x: torch.Tensor, layout, dtype):
        self.x, self.layout, self.dtype = x, layout, dtype
        self.blocks = to_blocks(x, layout, dtype) if layout is not None else None

    def gather(self, sel: torch.Tensor) -> torch.Tensor:
        """Per-row keys [Hkv, R, K*B, D] (sparse) or shared keys [H, Lk, D] (dense)."""
        if self.blocks is not None:
            return gather_blocks(self.blocks, sel)
        return self.x[sel[0]].to(self.dtype).transpose(0, 1)


class KeyGrad:
    """Accumulates the gradient of a key-side tensor chunk by chunk."""

    def __init__(self, x: torch.Tensor, layout, dtype):
        self.x, self.layout = x, layout
        if layout is not None:
            self.acc = torch.zeros((layout.num_blocks + 1, x.shape[1], layout.block_size, x.shape[2]),
                                   dtype=dtype, device=x.device)
        else:
            self.acc = torch.zeros(x.shape, dtype=dtype, device=x.device)

    def add(self, sel: torch.Tensor, contrib: torch.Tensor) -> None:
        """contrib: [Hkv, R, K*B, D] per row (sparse) or [H, Lk, D] summed over rows (dense)."""
        if self.layout is not None:
            scatter_add_blocks(self.acc, sel, contrib)
        else:
            self.acc[sel[0]] += contrib.transpose(0, 1)

    def result(self) -> torch.Tensor:
        g = from_blocks(self.acc, self.layout) if self.layout is not None else self.acc
        return g.to(self.x.dtype)


def layout_for(topk_indices, cu_q, ranges, total_k, block_size, device):
    return None if topk_indices is None else block_layout(cu_q, ranges, total_k, block_size, device)


def group_rows(x: torch.Tensor, rows: slice, hkv: int, dtype) -> torch.Tensor:
    """[total, Hq, D] rows -> [Hkv, R, G, D] (query heads h = g * G + i)."""
    xr = x[rows]
    return xr.view(xr.shape[0], hkv, -1, xr.shape[-1]).to(dtype).permute(1, 0, 2, 3)


def ungroup(x: torch.Tensor) -> torch.Tensor:
    """[Hkv, R, G, ...] -> [R, Hkv * G, ...]."""
    x = x.permute(1, 0, 2, *range(3, x.dim()))
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def attention_scores(q, keys: Keys, rows, sel, valid, hkv, scale, cdt):
    """Masked scores s [Hkv, R, G, N] (masked entries -inf), the grouped queries and keys."""
    qg = group_rows(q, rows, hkv, cdt)
    kk = keys.gather(sel)
    s = matmul_keys(qg, kk, transpose_keys=True) * scale
    s = s.masked_fill(~valid[:, :, None, :], float("-inf"))
    return s, qg, kk
