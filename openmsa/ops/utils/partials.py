"""Per-entry partial results of the KV-outer kernels and their reductions.

A KV-outer program writes one partial per CSR entry (query row, group, selected block):
a normalised output and its LSE (attention forward), a dQ or dqi term (backwards), a KL
term. The row's <= K partials are then reduced in slot order, so the reductions are
deterministic: ``combine_kernel`` merges (out, lse) partials flash-decoding style,
``row_sum_kernel`` sums gradient partials. Per-key gradient sums (dK, dV, dki) of the
segments of one key block meet in ``key_partial_reduce_kernel`` when the backward is
deterministic (schedule.py).

The partials of all rows would not fit at long context: launchers cut the query rows into
chunks of ``rows_per_chunk`` rows, sized from shapes only (never from device values), so
that a chunk's partials stay within the scratch budget (configs.Scratch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import launch_config
from .tiles import segment_block


def rows_per_chunk(total_q: int, bytes_per_row: float, device, max_rows: int | None = None) -> int:
    """Query rows per chunk: as many as the scratch budget holds at ``bytes_per_row`` (at
    least one, at most total_q and max_rows)."""
    budget = launch_config("scratch", device).partial_bytes
    rows = min(total_q, int(budget // bytes_per_row))
    if max_rows is not None:
        rows = min(rows, max_rows)
    return max(1, rows)


@triton.jit
def combine_kernel(
    PART_O, PART_LSE, entry_of, OUT, LSE,
    row0, num_rows, topk,
    stride_ot, stride_oh, stride_lt,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
):
    """Program (row i of the chunk, group g): out, lse of the G heads from the row's <= K
    (out, lse) partials: lse = logsumexp of the partial LSEs, out = their exp(lse_s - lse)
    weighted sum. An empty token set gives out 0, lse -inf; a NaN partial makes both NaN."""
    i = tl.program_id(0)
    g = tl.program_id(1)
    h = tl.arange(0, G_PAD)
    h_ok = h < G
    d = tl.arange(0, D)
    base = (g.to(tl.int64) * num_rows + i) * topk
    # Pass 1: running max of the partial LSEs, per head.
    m = tl.full((G_PAD,), float("-inf"), tl.float32)
    for s in range(topk):
        e = tl.load(entry_of + base + s)
        if e >= 0:
            lse_s = tl.load(PART_LSE + e.to(tl.int64) * G + h, mask=h_ok, other=float("-inf"))
            m = tl.maximum(m, lse_s)  # may drop a NaN partial: it reaches den through wgt
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    den = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, D), tl.float32)
    for s in range(topk):
        e = tl.load(entry_of + base + s)
        if e >= 0:
            row = e.to(tl.int64) * G + h
            lse_s = tl.load(PART_LSE + row, mask=h_ok, other=float("-inf"))
            wgt = tl.exp(lse_s - m_safe)
            den += wgt
            acc += wgt[:, None] * tl.load(PART_O + row[:, None] * D + d[None, :],
                                          mask=h_ok[:, None], other=0.0).to(tl.float32)
    den_safe = tl.where(den == 0, 1.0, den)
    out = acc / den_safe[:, None]  # empty token set: acc = 0 -> out = 0; NaN passes
    lse = tl.where(den == 0, float("-inf"), m_safe + tl.log(den_safe))
    t = (row0 + i).to(tl.int64)
    heads = (g * G + h).to(tl.int64)
    tl.store(OUT + t * stride_ot + heads[:, None] * stride_oh + d[None, :],
             out.to(OUT.dtype.element_ty), mask=h_ok[:, None])
    tl.store(LSE + t * stride_lt + heads, lse, mask=h_ok)


@triton.jit
def row_sum_kernel(
    PART, entry_of, DST, row0, num_rows, topk, stride_dt, stride_dh,
    G: tl.constexpr, G_PAD: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
):
    """DST[row0 + i, heads of g] = the sum of the row's per-entry partials [G, D] (PART row
    e * G + h for entry e), in slot order; 0 for a row without entries. Program (ROWS rows
    of the chunk, group g)."""
    r = tl.arange(0, ROWS * G_PAD)
    i = tl.program_id(0) * ROWS + r // G_PAD
    g = tl.program_id(1)
    h = r % G_PAD
    ok = (i < num_rows) & (h < G)
    d = tl.arange(0, D)
    base = (g.to(tl.int64) * num_rows + i) * topk
    acc = tl.zeros((ROWS * G_PAD, D), tl.float32)
    for s in range(topk):
        e = tl.load(entry_of + base + s, mask=ok, other=-1)
        row = e.to(tl.int64) * G + h
        acc += tl.load(PART + row[:, None] * D + d[None, :], mask=(e >= 0)[:, None],
                       other=0.0).to(tl.float32)
    t = (row0 + i).to(tl.int64)
    heads = (g * G + h).to(tl.int64)
    tl.store(DST + t[:, None] * stride_dt + heads[:, None] * stride_dh + d[None, :],
             acc.to(DST.dtype.element_ty), mask=ok[:, None])


def sum_rows(part, entry_of, dst, row0, rows, groups_per_head, *, rows_per_program=1):
    """Launch row_sum_kernel over the rows [row0, row0 + rows) of dst [total_q, H, D]
    (H = Hkv x G heads; ``entry_of`` [Hkv, rows, K] of the chunk)."""
    hkv, _, topk = entry_of.shape
    g = groups_per_head
    row_sum_kernel[(triton.cdiv(rows, rows_per_program), hkv)](
        part, entry_of, dst, row0, rows, topk, dst.stride(0), dst.stride(1),
        G=g, G_PAD=triton.next_power_of_2(g), ROWS=rows_per_program, D=dst.shape[2],
        num_warps=4)


@triton.jit
def key_partial_reduce_kernel(
    PART, DST, reduce_tile, reduce_count, tile_slot,
    tile_group, tile_start, tile_end, entry_row, row_seq, seq_k_start, seq_len_k, block_base,
    num_blocks_bound, stride_dt, stride_dg,
    BLOCK: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr,
):
    """Deterministic key-gradient flush (schedule.py): program (i, r) adds to DST[keys of
    rows [r * ROWS, (r + 1) * ROWS) of block c, group g] the [BLOCK, D] float32 slots of
    the i-th multi-tile group (g, c) of the schedule, summed in tile order. It is the only
    writer of those addresses in its launch, so a plain read-add-write suffices. DST row of
    key row kr and group g: kr * stride_dt + g * stride_dg."""
    i = tl.program_id(0)
    n = tl.load(reduce_count + i)
    if n > 0:
        w0 = tl.load(reduce_tile + i)
        e0, e1, g, c, k_start, len_k = segment_block(
            w0, tile_group, tile_start, tile_end, entry_row, row_seq, seq_k_start, seq_len_k,
            block_base, num_blocks_bound)
        jr = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        d = tl.arange(0, D)
        slot0 = tl.load(tile_slot + w0).to(tl.int64)
        acc = tl.zeros((ROWS, D), tl.float32)
        for s in range(n):
            acc += tl.load(PART + ((slot0 + s) * BLOCK + jr)[:, None] * D + d[None, :])
        j = c * BLOCK + jr
        key_ok = (j < len_k)[:, None]
        dst = (DST + (k_start + j.to(tl.int64))[:, None] * stride_dt
               + g.to(tl.int64) * stride_dg + d[None, :])
        tl.store(dst, tl.load(dst, mask=key_ok, other=0.0) + acc, mask=key_ok)


def reduce_key_partials(sched, info, part, dst, stride_dt, stride_dg, block_size):
    """Deterministic flush (schedule.py): dst += the slots of every multi-tile group of
    ``sched``, in tile order. ``part``: float32 [slots * block_size, D]."""
    rows = min(32, block_size)
    key_partial_reduce_kernel[(sched.reduce_tile.numel(), block_size // rows)](
        part, dst, sched.reduce_tile, sched.reduce_count, sched.tile_slot,
        sched.tile_group, sched.tile_start, sched.tile_end, sched.entry_row, info.seq,
        info.seq_k_start, info.seq_len_k, info.block_base, info.num_blocks_bound,
        stride_dt, stride_dg, BLOCK=block_size, D=part.shape[1], ROWS=rows, num_warps=4)


def merge_partial(acc_out, acc_lse, out, lse):
    """Merge two partial softmax results (float32 out [T, H, D], lse [T, H]) over disjoint
    key sets; a NaN lse (a NaN row of either side) keeps the row NaN."""
    new = torch.logaddexp(acc_lse, lse)
    empty = new == float("-inf")  # -inf on both sides: nothing visible yet
    w_acc = torch.where(empty, 0.0, torch.exp(acc_lse - new))
    w_new = torch.where(empty, 0.0, torch.exp(lse - new))
    return acc_out * w_acc[..., None] + out.float() * w_new[..., None], new
