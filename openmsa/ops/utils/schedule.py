"""KV-outer schedule of the sparse kernels (docs/spec.md section 5: attention, index LSE, KL),
built on the GPU with torch ops: no host synchronisation, so the whole op is graph-capturable.

The Top-k lists say, per (group g, query row t), which key blocks t reads. The
KV-outer loop order needs the inverse: per (g, key block), which query rows selected
it (a CSR list), cut into tiles of ``tokens_per_tile`` rows so that one program
loads one key block once and runs full MMA tiles of (query tokens x heads of the
group). A hot block (the first block is chosen by nearly every query) simply yields
many tiles, which spreads it over many programs.

Entries are (g, t, slot) triples that contribute: the id is in range, not a
duplicate of an earlier slot of the row, and the block starts at or before the
row's causal position (otherwise its token set is empty). Each entry has a place in
the CSR order; the attention kernel writes that entry's partial output there and
the combine kernel finds a row's <= K partials through ``entry_of``.

Deterministic backward (``deterministic=True``): a group (g, key block) cut into several
tiles has its per-key gradient sums (dK, dV, dki) computed by several programs; instead of
meeting in float atomics (whose order varies from run to run), each such tile writes its
sum to a slot of a scratch buffer (``tile_slot``) and ``key_partial_reduce_kernel`` adds
a group's slots in tile order. A group of one tile is the only writer of its keys in the
launch, so it adds its sum directly. Only groups of more than ``tokens_per_tile`` entries
have several tiles, so the slots number less than 2 E / tokens_per_tile (a group of c
entries has ceil(c / T) < 2 c / T tiles when c > T). The launchers run the chunks of query
rows one after the other, so the chunks' sums are added in chunk order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .configs import launch_config


@dataclass
class RowInfo:
    """Per query row, for the whole call (int32, on the device).

    Key blocks belong to key ranges: in the fragment form (docs/spec.md section 3) the query
    sequences whose key ranges start at the same row share that range's blocks (one CSR
    group per block, whichever fragment selected it), so ``seq_len_k`` and ``block_base``
    are those of the longest range starting there. Ranges of different starts are
    disjoint, so a key row belongs to one group per KV group g, as in the ordinary form."""

    seq: torch.Tensor  # sequence of the row
    pos: torch.Tensor  # causal position p = Lk - Lq + i
    seq_k_start: torch.Tensor  # per sequence: first key row
    seq_len_k: torch.Tensor  # per sequence: Lk (fragments: of the longest range at its start)
    block_base: torch.Tensor  # per sequence: global id of its block 0
    num_blocks_bound: int  # host upper bound on the number of global blocks


def row_info(cu_q: torch.Tensor, cu_k: torch.Tensor | None, total_q: int, total_k: int,
             block_size: int, kv_start: torch.Tensor | None = None,
             kv_len: torch.Tensor | None = None) -> RowInfo:
    """``kv_start``/``kv_len`` (int32 [num_seqs]): the fragment form, cu_k unused."""
    nseq = cu_q.numel() - 1
    t = torch.arange(total_q, dtype=torch.int32, device=cu_q.device)
    seq = torch.searchsorted(cu_q[1:].contiguous(), t, right=True).to(torch.int32)
    seq = seq.clamp_(max=max(nseq - 1, 0))
    len_q = cu_q[1:] - cu_q[:-1]
    # Each range adds at most one partial block to total_k / B (ranges of different
    # starts are disjoint).
    bound = total_k // block_size + nseq
    if kv_start is None:
        len_k = cu_k[1:] - cu_k[:-1]
        pos = (len_k - len_q)[seq] + (t - cu_q[:-1][seq])
        nblk = (len_k + block_size - 1) // block_size
        base = (torch.cumsum(nblk, 0) - nblk).to(torch.int32)
        return RowInfo(seq, pos.to(torch.int32), cu_k[:-1].contiguous(),
                       len_k.to(torch.int32).contiguous(), base, bound)
    pos = (kv_len - len_q)[seq] + (t - cu_q[:-1][seq])
    # ranges by start; the ranges of one start form one key range of the longest length
    starts, order = torch.sort(kv_start, stable=True)
    new = torch.ones_like(starts, dtype=torch.bool)
    new[1:] = starts[1:] != starts[:-1]
    group = torch.cumsum(new, 0) - 1
    longest = torch.zeros(nseq, dtype=torch.int64, device=cu_q.device).scatter_reduce_(
        0, group, kv_len.long()[order], "amax")
    nblk = (longest + block_size - 1) // block_size
    group_base = torch.cumsum(nblk, 0) - nblk
    len_k = torch.empty_like(longest).scatter_(0, order, longest[group])
    base = torch.empty_like(longest).scatter_(0, order, group_base[group])
    return RowInfo(seq, pos.to(torch.int32), kv_start.contiguous(), len_k.to(torch.int32),
                   base.to(torch.int32), bound)


@dataclass
class TileSchedule:
    entry_row: torch.Tensor  # int32 [E]: query row of the entry at each CSR position
    entry_of: torch.Tensor  # int32 [Hkv, R, K]: CSR position of (g, row, slot), -1 if none
    tile_group: torch.Tensor  # int32 [W]: (g * num_blocks_bound + global block) of the tile
    tile_start: torch.Tensor  # int32 [W]: first CSR position of the tile
    tile_end: torch.Tensor  # int32 [W]: one past its last (start == end: no work)
    num_tiles_bound: int  # W, a host-side upper bound; the real count is on the device
    # deterministic=True only (else None):
    tile_slot: torch.Tensor | None = None  # int32 [W]: slot of a tile of a multi-tile group, else -1
    reduce_tile: torch.Tensor | None = None  # int32 [M]: first tile of the i-th multi-tile group
    reduce_count: torch.Tensor | None = None  # int32 [M]: its tile count (0 past the real groups)


@triton.jit
def schedule_keys_kernel(
    TOPK, stride_tg, stride_tr, row0, num_rows, row_seq, row_pos, seq_len_k, block_base,
    num_blocks_bound, num_groups, block_size, KEY,
    K: tl.constexpr, K_PAD: tl.constexpr, ROWS: tl.constexpr,
):
    """Per (group g, row, slot): the CSR group key g * num_blocks_bound + global block of
    an entry that contributes, else the sentinel num_groups * num_blocks_bound. One
    program per ROWS rows of one group; the duplicate test compares the row's K slots
    pairwise in registers."""
    i = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    g = tl.program_id(1)
    r_ok = i < num_rows
    sl = tl.arange(0, K_PAD)
    t = row0 + i
    seq = tl.load(row_seq + t, mask=r_ok, other=0)
    pos = tl.load(row_pos + t, mask=r_ok, other=-1)
    nblk = (tl.load(seq_len_k + seq, mask=r_ok, other=0) + block_size - 1) // block_size
    base = tl.load(block_base + seq, mask=r_ok, other=0)
    m = r_ok[:, None] & (sl < K)[None, :]
    ids = tl.load(TOPK + g.to(tl.int64) * stride_tg + i.to(tl.int64)[:, None] * stride_tr
                  + sl[None, :], mask=m, other=-1)
    ok = (ids >= 0) & (ids < nblk[:, None]) & (ids.to(tl.int64) * block_size <= pos[:, None])
    # a slot repeating an earlier slot's id adds nothing (the token set is a set)
    same = (ids[:, :, None] == ids[:, None, :]) & (sl[None, None, :] < sl[None, :, None])
    ok = ok & (tl.max(same.to(tl.int32), 2) == 0)
    key = tl.where(ok, g * num_blocks_bound + base[:, None] + ids, num_groups * num_blocks_bound)
    tl.store(KEY + (g.to(tl.int64) * num_rows + i)[:, None] * K + sl[None, :], key, mask=m)


def slots_bound(num_entries: int, tokens_per_tile: int) -> int:
    """Host bound on the scratch slots of a deterministic schedule of ``num_entries``
    entries (module docstring)."""
    return max(1, 2 * num_entries // tokens_per_tile)


def build_schedule(topk_rows: torch.Tensor, row0: int, info: RowInfo, block_size: int,
                   tokens_per_tile: int, deterministic: bool = False) -> TileSchedule:
    """CSR of the rows [row0, row0 + R) of ``topk_rows`` ([Hkv, R, K] int32);
    ``deterministic`` adds the slots of the fixed-order key-gradient reduction."""
    hkv, r, topk = topk_rows.shape
    dev = topk_rows.device
    nb = info.num_blocks_bound
    sentinel = hkv * nb
    # int32 keys sort faster; hkv * nb stays far below 2**31 for any real context.
    key = torch.empty(hkv * r * topk, dtype=torch.int32, device=dev)
    if r > 0:
        rows_per_program = 32
        schedule_keys_kernel[(triton.cdiv(r, rows_per_program), hkv)](
            topk_rows, topk_rows.stride(0), topk_rows.stride(1), row0, r, info.seq, info.pos,
            info.seq_len_k, info.block_base, nb, hkv, block_size, key,
            K=topk, K_PAD=triton.next_power_of_2(topk), ROWS=rows_per_program, num_warps=4)
    sorted_key, order = torch.sort(key, stable=True)
    e = key.numel()
    # group key x occupies [bounds[x], bounds[x + 1]) of the sorted order (no atomics:
    # a hot block's key would serialise thousands of increments)
    bounds = torch.searchsorted(sorted_key, torch.arange(sentinel + 1, dtype=torch.int32, device=dev))
    group_start = bounds[:-1]
    counts = bounds[1:] - group_start
    tiles = (counts + tokens_per_tile - 1) // tokens_per_tile
    tile_cum = torch.cumsum(tiles, 0)

    # Every non-empty group adds at most one partial tile.
    w_bound = e // tokens_per_tile + min(sentinel, e) + 1
    w = torch.arange(w_bound, device=dev)
    grp = torch.searchsorted(tile_cum, w, right=True).clamp_(max=sentinel - 1)
    first_tile = tile_cum[grp] - tiles[grp]
    start = group_start[grp] + (w - first_tile) * tokens_per_tile
    end = torch.minimum(start + tokens_per_tile, group_start[grp] + counts[grp])
    live = w < tile_cum[-1]
    start = torch.where(live, start, 0)
    end = torch.where(live, end, 0)

    entry_row = ((order // topk) % r + row0).to(torch.int32)
    position = torch.empty(e, dtype=torch.int64, device=dev)
    position[order] = torch.arange(e, device=dev)
    entry_of = torch.where(key < sentinel, position, -1).view(hkv, r, topk).to(torch.int32)
    sched = TileSchedule(entry_row, entry_of, grp.to(torch.int32), start.to(torch.int32),
                         end.to(torch.int32), w_bound)
    if deterministic:
        multi = tiles > 1
        multi_tiles = torch.where(multi, tiles, 0)
        slot_end = torch.cumsum(multi_tiles, 0)
        slot = slot_end[grp] - multi_tiles[grp] + (w - first_tile)
        sched.tile_slot = torch.where(live & multi[grp], slot, -1).to(torch.int32)
        # the i-th multi-tile group; such a group holds more than tokens_per_tile entries
        multi_cum = torch.cumsum(multi, 0)
        i = torch.arange(e // (tokens_per_tile + 1) + 1, device=dev)
        rg = torch.searchsorted(multi_cum, i, right=True).clamp_(max=sentinel - 1)
        ok = i < multi_cum[-1]
        sched.reduce_tile = torch.where(ok, tile_cum[rg] - tiles[rg], 0).to(torch.int32)
        sched.reduce_count = torch.where(ok, tiles[rg], 0).to(torch.int32)
    return sched


def schedule_args(sched: TileSchedule, info: RowInfo) -> tuple:
    """The schedule arguments of a KV-outer kernel, in the order every kernel takes them:
    tile_group, tile_start, tile_end, entry_row, row_seq, row_pos, seq_k_start,
    seq_len_k, block_base, num_blocks_bound."""
    return (sched.tile_group, sched.tile_start, sched.tile_end, sched.entry_row, info.seq,
            info.pos, info.seq_k_start, info.seq_len_k, info.block_base, info.num_blocks_bound)


def schedule_chunks(topk_indices: torch.Tensor, info: RowInfo, block_size: int,
                    tokens_per_tile: int, rows_per_chunk: int, deterministic: bool = False):
    """Yields (row0, rows, schedule) for the chunks of ``rows_per_chunk`` query rows of
    ``topk_indices`` [Hkv, total_q, K], one after the other."""
    total_q = topk_indices.shape[1]
    for row0 in range(0, total_q, rows_per_chunk):
        rows = min(rows_per_chunk, total_q - row0)
        yield row0, rows, build_schedule(topk_indices[:, row0:row0 + rows], row0, info,
                                         block_size, tokens_per_tile, deterministic)


def dense_chunk_indices(pos: torch.Tensor, hkv: int, block_size: int, first_block: int,
                        num_blocks: int) -> torch.Tensor:
    """int32 [Hkv, total_q, num_blocks]: the local block ids first_block ..
    first_block + num_blocks - 1 that row t sees (id <= pos[t] // B), -1 for the others
    (the valid ids form a prefix)."""
    ids = torch.arange(first_block, first_block + num_blocks, dtype=torch.int32, device=pos.device)
    local = (pos // block_size).to(torch.int32)
    idx = torch.where(ids[None, :] <= local[:, None], ids[None, :], -1)
    return idx[None].expand(hkv, -1, -1).contiguous()


def dense_chunks(q: torch.Tensor, k: torch.Tensor, varlen, block_size: int):
    """Every visible block as Top-k lists, a chunk of ``configs.DenseChunks.blocks`` local
    block ids at a time (the kernels take at most 64 blocks per row): yields the chunks'
    index tensors one at a time (all at once would be Hkv x total_q x blocks int32: 2 GB at
    128K tokens with Hkv = 4, B = 128). Bounded on the host by total_k / B: no host read."""
    chunk = launch_config("dense_chunks", q.device).blocks
    info = row_info(varlen.cu_seqlens_q, varlen.cu_seqlens_k, q.shape[0], k.shape[0], block_size,
                    varlen.kv_start, varlen.kv_len)
    nblocks = -(-k.shape[0] // block_size)  # >= the block count of every sequence
    for c0 in range(0, nblocks, chunk):
        yield dense_chunk_indices(info.pos, k.shape[1], block_size, c0, min(chunk, nblocks - c0))
